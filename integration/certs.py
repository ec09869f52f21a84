"""Test certificates, made at test time with Python's `cryptography` package.

`make_pki(directory)` writes a test CA, a server certificate for 127.0.0.1/localhost,
a client certificate (CN sensor-1) from that CA, and a second "rogue" CA with its own
server and client certificates, which a broker or client configured with the first CA
must refuse. Every certificate is valid from an hour ago for two days.
"""

from __future__ import annotations

import datetime
import ipaddress
import types

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Issued:
    """A certificate and its key, written as PEM files."""

    def __init__(self, cert, key, directory, name):
        self.cert, self.key = cert, key
        self.cert_path = directory / f"{name}.crt"
        self.key_path = directory / f"{name}.key"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))


def issue(directory, name, cn, issuer=None, ca=False, server=False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "roost tests"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key, directory, name)


def make_pki(d):
    ca = issue(d, "ca", "roost test CA", ca=True)
    rogue = issue(d, "rogue-ca", "rogue CA", ca=True)
    return types.SimpleNamespace(
        dir=d,
        ca=ca,
        server=issue(d, "server", "localhost", issuer=ca, server=True),
        client=issue(d, "client", "sensor-1", issuer=ca),
        rogue_ca=rogue,
        rogue_server=issue(d, "rogue-server", "localhost", issuer=rogue, server=True),
        rogue_client=issue(d, "rogue-client", "sensor-1", issuer=rogue),
    )
