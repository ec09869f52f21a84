//! roost: an MQTT 3.1 / 3.1.1 / 5.0 broker.
//!
//! The `roost` binary (src/main.rs) is a thin `main` over this library: the shell around
//! the engine (crate `roost-engine`). It owns the sockets (TCP, TLS, WebSocket), the
//! connection tasks that drive the engine, the session store on disk, authentication
//! and ACL files, configuration, the admin API and metrics. The library exists so that
//! benchmarks can drive the broker's own code paths without a socket; it is not a
//! stable API. Modules only the broker uses are private.
#![deny(missing_docs)]

mod acl;
mod admin;
pub mod auth;
mod auth_hook;
pub mod config;
mod connection;
mod memory;
mod passwd;
pub mod persist;
pub mod server;
mod sys;
mod tls;
mod transport;
mod websocket;

// `roost passwd`, for the binary.
pub use passwd::run as run_passwd;
