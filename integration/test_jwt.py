"""JWT authentication: the CONNECT password is a signed token (jwt_secret_file or
jwt_public_key_file). Good tokens get in as their `sub`; expired, wrongly signed, unsigned
(`alg: none`) and wrong-audience tokens get CONNACK 0x86 (3.1.1: 4) and a log line naming
the reason, never the token; an `acl` claim narrows what the client may do; a connection
is closed when its token expires (v5: DISCONNECT 0x87).

Tokens are made here with the standard library (HMAC) and `cryptography` (RSA), so the
broker's verifier (the jsonwebtoken crate) is checked against an independent signer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import pytest

import mqttraw
from broker import IS_MOSQUITTO
from conftest import VERSIONS, wait_for

pytestmark = pytest.mark.skipif(IS_MOSQUITTO, reason="roost's own JWT authentication")

SECRET = b"an HMAC secret of at least 32 bytes, for tests only"
BAD_CREDENTIALS = {4: 4, 5: 0x86}
SUB_DENIED = {4: 0x80, 5: 0x87}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: dict, claims: dict, sign) -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(sign(head.encode()))


def hs256(claims: dict, secret: bytes = SECRET, alg="HS256") -> str:
    return signed({"alg": alg, "typ": "JWT"}, claims,
                  lambda m: hmac.new(secret, m, hashlib.sha256).digest())


def cid():
    return f"jwt-{uuid.uuid4().hex[:10]}"


def connect(b, version, token, client_id=None, username="token", **kw):
    """A raw client connected with `token` as its password; returns (client, CONNACK)."""
    c = mqttraw.RawClient(b.host, b.port, version)
    # MQTT 3.1.1 sends a password only with a username (roost replaces it with `sub`);
    # a v5 client may send the token alone.
    user = username if version == 4 else None
    ack = c.connect(client_id or cid(), username=user, password=token.encode(),
                    expect_rc=None, **kw)
    return c, ack


@pytest.fixture
def jwt_broker(broker_with, tmp_path):
    secret = tmp_path / "jwt-secret"
    secret.write_bytes(SECRET + b"\n")
    return broker_with(jwt_secret_file=str(secret), jwt_audience="roost-test")


def claims(**extra):
    c = {"sub": "alice", "aud": "roost-test", "exp": int(time.time()) + 300}
    c.update(extra)
    return c


@pytest.mark.parametrize("version", VERSIONS)
def test_a_good_token_gets_in_as_its_subject(jwt_broker, version):
    b = jwt_broker
    c, ack = connect(b, version, hs256(claims()))
    assert ack.rc == 0, ack
    c.subscribe("x/#", qos=1)
    c.publish("x/1", b"hello", qos=1, pid=1)
    assert c.expect(mqttraw.PUBACK).rc == 0
    assert c.expect(mqttraw.PUBLISH).payload == b"hello"
    c.disconnect()
    # No password, no token: anonymous access is off once a JWT key is configured.
    a = mqttraw.RawClient(b.host, b.port, version)
    assert a.connect(cid(), expect_rc=None).rc == {4: 5, 5: 0x87}[version]
    a.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_bad_tokens_are_refused_and_the_log_names_why(jwt_broker, version):
    b = jwt_broker
    now = int(time.time())
    good = claims()
    unsigned = b64(json.dumps({"alg": "none"}).encode()) + "." + \
        b64(json.dumps(good).encode()) + "."
    cases = [
        ("expired", hs256(claims(exp=now - 5))),
        ("bad signature", hs256(good, secret=b"another secret, also 32 bytes long!!")),
        ("unsigned (alg none)", unsigned),
        ("wrong audience", hs256(claims(aud="someone-else"))),
        ("not yet valid", hs256(claims(nbf=now + 600))),
        ("malformed", "definitely.not-a.jwt"),
    ]
    for why, token in cases:
        c, ack = connect(b, version, token)
        assert ack.rc == BAD_CREDENTIALS[version], (why, ack)
        if version == 5:
            assert ack.props.get(mqttraw.REASON_STRING) == f"bad token: {why}", ack.props
        closed, _ = c.wait_closed(5)
        assert closed, f"{why}: connection left open"
        c.close()
        assert wait_for(lambda: f"bad token: {why}" in b.log_tail(400), 5), b.log_tail()
    log = b.log_tail(400)
    for _, token in cases:
        # The log names the reason, never the token (nor its signature).
        signature = token.rsplit(".", 1)[-1]
        assert token not in log and (len(signature) < 20 or signature not in log)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_acl_claim_narrows_what_the_client_may_do(jwt_broker, version):
    b = jwt_broker
    client_id = cid()
    token = hs256(claims(acl={"pub": ["devices/%c/out"], "sub": ["users/%u/#"]}))
    c, ack = connect(b, version, token, client_id=client_id)
    assert ack.rc == 0, ack
    denied = SUB_DENIED[version]
    # %u is the token's subject (alice), not the CONNECT's username.
    assert c.subscribe([("users/alice/#", 1), ("users/token/#", 1), ("devices/#", 1)]).rcs \
        == [1, denied, denied]
    c.publish(f"devices/{client_id}/out", b"mine", qos=1, pid=1)
    assert c.expect(mqttraw.PUBACK).rc == 0
    c.publish("devices/other/out", b"not mine", qos=1, pid=2)
    assert c.expect(mqttraw.PUBACK).rc == (0x87 if version == 5 else 0)
    c.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_the_connection_closes_when_its_token_expires(jwt_broker, version):
    b = jwt_broker
    c, ack = connect(b, version, hs256(claims(exp=int(time.time()) + 3)), keepalive=60)
    assert ack.rc == 0, ack
    start = time.monotonic()
    if version == 5:
        d = c.expect(mqttraw.DISCONNECT, timeout=8)
        assert d.rc == 0x87, d
        assert d.props.get(mqttraw.REASON_STRING) == "token expired", d.props
    closed, _ = c.wait_closed(8)
    assert closed, "still connected after the token expired"
    assert time.monotonic() - start < 6
    c.close()
    assert "token_expired" in b.log_tail(400) or "token expired" in b.log_tail(400)


def test_rs256_public_key_and_no_algorithm_confusion(broker_with, tmp_path):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "jwt.pem"
    path.write_bytes(pem)
    b = broker_with(jwt_public_key_file=str(path), jwt_issuer="https://issuer.test/")
    good = {"sub": "bob", "iss": "https://issuer.test/", "exp": int(time.time()) + 60}
    rs = signed({"alg": "RS256"}, good,
                lambda m: key.sign(m, padding.PKCS1v15(), hashes.SHA256()))
    c, ack = connect(b, 5, rs)
    assert ack.rc == 0, ack
    c.disconnect()
    # The public key used as an HMAC secret: the key serves RSA algorithms only.
    c, ack = connect(b, 5, hs256(good, secret=pem))
    assert ack.rc == 0x86 and ack.props.get(mqttraw.REASON_STRING) == \
        "bad token: algorithm not accepted", ack
    c.close()
    other_issuer = dict(good, iss="https://elsewhere.test/")
    rs = signed({"alg": "RS256"}, other_issuer,
                lambda m: key.sign(m, padding.PKCS1v15(), hashes.SHA256()))
    c, ack = connect(b, 4, rs)
    assert ack.rc == 4, ack
    c.close()
