//! The kinds of listener and the handshake each runs before MQTT starts.
//!
//! The handshake (TLS, WebSocket upgrade, or both) runs inside the connection's own task,
//! never in the accept loop, so a slow or silent client cannot hold up accepting others.
//! It gets `connect_timeout` in all, and is abandoned when the broker shuts down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::Either;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::net::connection;
use crate::net::tls::{self, TlsContext};
use crate::net::websocket;
use roost_engine::broker::Broker;

/// What a listener speaks on top of TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT directly on TCP (`bind`).
    Tcp,
    /// MQTT on TLS (`tls_bind`).
    Tls,
    /// MQTT in WebSocket binary messages (`ws_bind`).
    Ws,
    /// MQTT in WebSocket over TLS (`wss_bind`).
    Wss,
}

impl Transport {
    /// How the listener is named in logs.
    pub fn describe(self) -> &'static str {
        match self {
            Transport::Tcp => "MQTT",
            Transport::Tls => "MQTT over TLS",
            Transport::Ws => "MQTT over WebSocket",
            Transport::Wss => "MQTT over WebSocket with TLS",
        }
    }

    /// Whether this listener needs the TLS settings.
    pub fn uses_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }
}

/// Runs the handshake `transport` needs on an accepted socket, then serves MQTT on it.
pub fn serve(
    transport: Transport,
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<TlsContext>>,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> {
    let _ = stream.set_nodelay(true);
    match transport {
        // A plain TCP connection's task is the MQTT connection alone: no state of the
        // TLS and WebSocket setup is carried for its whole life.
        Transport::Tcp => Either::Left(connection::serve(broker, stream, peer, None, shutdown)),
        _ => Either::Right(Box::pin(upgrade_and_serve(
            transport, broker, stream, peer, tls, shutdown,
        ))),
    }
}

async fn upgrade_and_serve(
    transport: Transport,
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<TlsContext>>,
    shutdown: watch::Receiver<bool>,
) {
    let timeout = broker.limits.connect_timeout();
    // A WebSocket message holds at most about one maximum-size packet (plus slack for a
    // client that packs a small packet next to it).
    let max_message = broker.limits.max_packet_size as usize + 1024;
    let use_cn = tls.as_ref().is_some_and(|t| t.use_cn_as_username);
    let acceptor = match (transport.uses_tls(), &tls) {
        (false, _) => None,
        (true, Some(tls)) => Some(tls.acceptor()),
        (true, None) => {
            debug!(%peer, "no TLS settings for a TLS listener");
            return;
        }
    };
    let mut stop = shutdown.clone();
    // Held until the handshake is done (dropped with it below, or with the task).
    let counter = broker.clone();
    let Some(handshaking) = counter.start_handshake(HANDSHAKES_IN_PROGRESS) else {
        debug!(%peer, "closed: {HANDSHAKES_IN_PROGRESS} handshakes in progress");
        return;
    };
    macro_rules! handshake {
        ($what:literal, $fut:expr) => {
            tokio::select! {
                done = tokio::time::timeout(timeout, Box::pin($fut)) => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        debug!(%peer, "{} handshake failed: {e}", $what);
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "{} handshake not done within connect_timeout", $what);
                        return;
                    }
                },
                _ = stop.changed() => return,
            }
        };
    }
    // Every task is as large as the largest state its future can be in, so the TLS and
    // WebSocket paths are boxed: a plain TCP connection does not pay for them.
    match (transport, acceptor) {
        (Transport::Tcp, _) => {
            drop(handshaking);
            connection::serve(broker, stream, peer, None, shutdown).await
        }
        (Transport::Ws, _) => {
            let ws = handshake!("WebSocket", websocket::accept(stream, max_message));
            drop(handshaking);
            Box::pin(connection::serve(broker, ws, peer, None, shutdown)).await;
        }
        (Transport::Tls, Some(acceptor)) => {
            let (tls, identity) = handshake!("TLS", async {
                let tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
                let identity = peer_identity(use_cn, &tls, peer)?;
                Ok::<_, String>((tls, identity))
            });
            drop(handshaking);
            Box::pin(connection::serve(broker, tls, peer, identity, shutdown)).await;
        }
        (Transport::Wss, Some(acceptor)) => {
            let both = async {
                let tls = acceptor.accept(stream).await.map_err(|e| e.to_string())?;
                let identity = peer_identity(use_cn, &tls, peer)?;
                let ws = websocket::accept(tls, max_message)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((ws, identity))
            };
            let (ws, identity) = handshake!("TLS/WebSocket", both);
            drop(handshaking);
            Box::pin(connection::serve(broker, ws, peer, identity, shutdown)).await;
        }
        (Transport::Tls | Transport::Wss, None) => {}
    }
}

/// Most TLS and WebSocket handshakes in progress at once. A handshake comes before the
/// connection counts against `max_connections` (the CONNECT is inside it), and holds a
/// task, a socket and the TLS or HTTP state for up to `connect_timeout`, so this is
/// what bounds a flood of clients that start one and never finish it. Past it,
/// new ones are closed at once.
const HANDSHAKES_IN_PROGRESS: usize = 1024;

/// The username the client certificate gives with `tls_use_cn_as_username`. A verified
/// certificate without a Common Name is refused rather than falling back to whatever
/// username the client claims.
fn peer_identity<S>(
    use_cn: bool,
    stream: &TlsStream<S>,
    peer: SocketAddr,
) -> Result<Option<String>, String> {
    if !use_cn {
        return Ok(None);
    }
    match tls::peer_common_name(stream) {
        Some(name) => {
            debug!(%peer, username = %name, "TLS client certificate Common Name is the username");
            Ok(Some(name))
        }
        None => Err("the client certificate has no Common Name to use as username".into()),
    }
}
