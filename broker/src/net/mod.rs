//! The network shell: listeners' transports (TCP, TLS, WebSocket), and the connection
//! task that reads and writes a client's socket and drives the engine's
//! [`roost_engine::client::Client`] with what happens on it.

pub mod connection;
pub mod tls;
pub mod transport;
pub mod websocket;
