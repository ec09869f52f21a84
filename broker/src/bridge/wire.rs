//! A bridge's connection to its remote: a TCP (or TLS) stream that reads and writes
//! whole MQTT packets with roost's own codec, seen from the client side.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use roost_core::{Packet, ProtocolVersion, codec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::settings::BridgeConfig;

/// Largest packet taken from a remote (a remote may send what its clients send).
const MAX_PACKET: usize = 256 * 1024 * 1024;

/// Longest wait for the TCP connection and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How a bridge reaches its remote: TLS settings when it uses TLS.
#[derive(Clone)]
pub struct Dialer {
    address: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    /// Reads the TLS files of `config` (when it uses TLS).
    pub fn new(config: &BridgeConfig) -> Result<Dialer, String> {
        let tls = if config.tls {
            let mut roots = rustls::RootCertStore::empty();
            let ca = config.ca_file.as_ref().ok_or("tls needs ca_file")?;
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("ca_file {}: {e}", ca.display()))?
            {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", ca.display()))?;
            }
            let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
            let client = match (&config.cert_file, &config.key_file) {
                (Some(cert), Some(key)) => {
                    let chain = CertificateDer::pem_file_iter(cert)
                        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
                    let key = PrivateKeyDer::from_pem_file(key)
                        .map_err(|e| format!("key_file {}: {e}", key.display()))?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| format!("cert_file: {e}"))?
                }
                _ => builder.with_no_client_auth(),
            };
            let host = config
                .address
                .rsplit_once(':')
                .map_or(config.address.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| format!("address: {host:?} is no TLS server name: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(client)), name))
        } else {
            None
        };
        Ok(Dialer {
            address: config.address.clone(),
            tls,
        })
    }

    /// Connects (and shakes hands), within [`CONNECT_TIMEOUT`].
    pub async fn dial(&self, version: ProtocolVersion) -> Result<Wire, String> {
        let connect = async {
            let tcp = TcpStream::connect(&self.address)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}", self.address))?;
            let _ = tcp.set_nodelay(true);
            let stream: Box<dyn Stream> = match &self.tls {
                Some((connector, name)) => Box::new(
                    connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS handshake with {}: {e}", self.address))?,
                ),
                None => Box::new(tcp),
            };
            Ok::<_, String>(stream)
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| format!("no connection to {} within 10 s", self.address))??;
        Ok(Wire {
            stream,
            buf: BytesMut::with_capacity(8192),
            out: BytesMut::with_capacity(8192),
            version,
        })
    }
}

/// A connected stream speaking MQTT.
pub struct Wire {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    out: BytesMut,
    version: ProtocolVersion,
}

impl Wire {
    /// The next packet; `Ok(None)` when the remote closed. Cancel-safe: what was read
    /// stays in the buffer.
    pub async fn read(&mut self) -> Result<Option<Packet>, String> {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.version), MAX_PACKET)
                .map_err(|e| format!("bad packet from the remote: {e}"))?
            {
                return Ok(Some(p));
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// Adds `packet` to what [`Wire::flush`] writes.
    pub fn queue(&mut self, packet: &Packet) -> Result<(), String> {
        codec::encode(packet, self.version, &mut self.out)
            .map_err(|e| format!("cannot encode {:?}: {e}", packet.packet_type()))
    }

    /// Whether packets wait to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes what was queued.
    pub async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = self.out.split();
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("write error: {e}"))?;
        self.stream
            .flush()
            .await
            .map_err(|e| format!("write error: {e}"))
    }

    /// Sends `packet` at once.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), String> {
        self.queue(packet)?;
        self.flush().await
    }
}
