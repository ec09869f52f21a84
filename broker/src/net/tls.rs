//! TLS for the `tls_bind` and `wss_bind` listeners: rustls server settings built from PEM
//! files, optional client-certificate verification (mutual TLS), and reload on SIGHUP.
//!
//! Only TLS 1.2 and 1.3 are offered (rustls has nothing older). The settings in force live
//! in an [`ArcSwap`]; each connection's handshake takes the ones current when it starts, so
//! a reload never disturbs connections already up, and a reload that fails (a half-written
//! key file, say) keeps the old certificates and says why in the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::Config;

/// Why the TLS settings cannot be built from the files: each message names the config
/// key whose file is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A TLS listener without a certificate or key (the configuration's check comes
    /// first; this guards a `Config` built otherwise).
    #[error("tls_bind/wss_bind: a TLS listener needs tls_cert and tls_key")]
    NoCertificateConfigured,
    /// A certificate file (`tls_cert`, `tls_client_ca`) cannot be read or parsed.
    #[error("{key}: cannot read {}: {source}", path.display())]
    ReadCertificates {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{key}: no PEM certificate in {}", path.display())]
    NoCertificate {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The `tls_key` file holds no private key roost can use.
    #[error("tls_key: no usable private key in {}: {source}", path.display())]
    PrivateKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: pem::Error,
    },
    /// The crypto provider offers neither TLS 1.2 nor 1.3.
    #[error("TLS: the crypto provider does not support TLS 1.2/1.3: {source}")]
    Provider {
        /// What rustls said.
        source: rustls::Error,
    },
    /// A certificate of `tls_client_ca` is not a usable CA certificate.
    #[error("tls_client_ca: bad CA certificate in {}: {source}", path.display())]
    BadCaCertificate {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// No client-certificate verifier can be built from the CAs of `tls_client_ca`.
    #[error("tls_client_ca: cannot use the CAs in {}: {source}", path.display())]
    ClientVerifier {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        source: VerifierBuilderError,
    },
    /// The certificate of `tls_cert` and the key of `tls_key` do not go together.
    #[error(
        "tls_cert/tls_key: {} and {} do not make a usable certificate and key pair: {source}",
        cert.display(),
        key.display()
    )]
    KeyPair {
        /// The `tls_cert` file.
        cert: PathBuf,
        /// The `tls_key` file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// The TLS settings shared by every TLS listener, reloadable from the same files.
pub struct TlsContext {
    /// `tls_use_cn_as_username`: a verified client certificate's Common Name is the
    /// client's username.
    pub use_cn_as_username: bool,
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
}

/// Where the PEM files are; read at start and again on each reload.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl TlsContext {
    /// Loads the certificates when a TLS listener is configured; `None` otherwise.
    /// Errors name the config key whose file is at fault.
    pub fn from_config(config: &Config) -> Result<Option<Arc<TlsContext>>, TlsError> {
        if config.tls_bind.is_empty() && config.wss_bind.is_empty() {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Err(TlsError::NoCertificateConfigured);
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.tls_client_ca.clone(),
        };
        let server = build_server_config(&files)?;
        Ok(Some(Arc::new(TlsContext {
            use_cn_as_username: config.tls_use_cn_as_username,
            files,
            current: ArcSwap::from_pointee(server),
        })))
    }

    /// An acceptor with the settings in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Re-reads the PEM files and swaps the new settings in; on error the old stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let server = build_server_config(&self.files)?;
        self.current.store(Arc::new(server));
        Ok(())
    }
}

fn build_server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert, "tls_cert")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::PrivateKey {
        path: files.key.clone(),
        source,
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Provider { source })?;
    let builder = match &files.client_ca {
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::KeyPair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })
}

/// Requires every client to present a certificate issued by one of the CAs in `ca`.
fn client_verifier(
    ca: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca, "tls_client_ca")? {
        roots
            .add(cert)
            .map_err(|source| TlsError::BadCaCertificate {
                path: ca.to_path_buf(),
                source,
            })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|source| TlsError::ClientVerifier {
            path: ca.to_path_buf(),
            source,
        })
}

/// The certificates of the PEM file `path`, named by the config `key`.
fn read_certs(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificates {
            key,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The subject Common Name of the client's verified certificate, if it sent one.
pub fn peer_common_name<S>(stream: &TlsStream<S>) -> Option<String> {
    let (_, session) = stream.get_ref();
    let leaf = session.peer_certificates()?.first()?;
    common_name(leaf.as_ref())
}

/// The first Common Name (OID 2.5.4.3) in the subject of a DER X.509 certificate.
///
/// A deliberately small DER walk: Certificate ::= SEQUENCE { tbsCertificate, ... } and
/// TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
/// validity, subject, ... }. Anything unexpected gives `None`, never a panic.
pub fn common_name(der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = der_element(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    if tbs.first() == Some(&0xA0) {
        tbs = der_element(tbs)?.2; // explicit version
    }
    for _ in 0..4 {
        tbs = der_element(tbs)?.2; // serial, signature, issuer, validity
    }
    let (tag, mut subject, _) = der_element(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    while !subject.is_empty() {
        let (tag, mut rdn, rest) = der_element(subject)?;
        subject = rest;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, attribute, rest) = der_element(rdn)?;
            rdn = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_element(attribute)?;
            if tag == OID && oid == CN {
                let (tag, text, _) = der_element(value)?;
                return directory_string(tag, text);
            }
        }
    }
    None
}

/// Decodes the DirectoryString forms seen in practice.
fn directory_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, TeletexString (ASCII in practice)
        0x0C | 0x13 | 0x16 | 0x14 => String::from_utf8(bytes.to_vec()).ok(),
        // BMPString: UTF-16BE
        0x1E if bytes.len().is_multiple_of(2) => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// Splits one DER element off `input`: (tag, contents, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with_cn(cn: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "roost");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn common_name_of_a_certificate() {
        assert_eq!(
            common_name(&cert_with_cn("sensor-17")).as_deref(),
            Some("sensor-17")
        );
        assert_eq!(
            common_name(&cert_with_cn("Ünïcode")).as_deref(),
            Some("Ünïcode")
        );
    }

    #[test]
    fn common_name_missing_or_garbage_is_none() {
        let mut params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let key = KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        assert_eq!(common_name(&der), None);
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        let good = cert_with_cn("x");
        for cut in 0..good.len() {
            let _ = common_name(&good[..cut]);
        }
    }

    #[test]
    fn loads_reloads_and_names_bad_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert.pem()).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        let config = Config {
            tls_bind: vec!["127.0.0.1:0".parse().expect("addr")],
            tls_cert: Some(cert_path.clone()),
            tls_key: Some(key_path.clone()),
            ..Config::default()
        };
        let tls = TlsContext::from_config(&config)
            .expect("loads")
            .expect("configured");
        tls.reload().expect("reloads");

        // A broken key file fails the reload and names the key; the old settings stay.
        std::fs::write(&key_path, "not a key").expect("write");
        let e = tls.reload().expect_err("bad key");
        assert!(e.to_string().contains("tls_key"), "{e}");
        let _ = tls.acceptor();
        std::fs::write(&key_path, key.serialize_pem()).expect("write");

        let bad = Config {
            tls_cert: Some(dir.path().join("missing.pem")),
            ..config.clone()
        };
        let e = TlsContext::from_config(&bad)
            .err()
            .expect("missing cert file");
        assert!(e.to_string().contains("tls_cert"), "{e}");

        let bad = Config {
            tls_client_ca: Some(key_path.clone()),
            ..config
        };
        let e = TlsContext::from_config(&bad).err().expect("no CA in file");
        assert!(e.to_string().contains("tls_client_ca"), "{e}");
    }
}
