//! roost: an MQTT 3.1 / 3.1.1 / 5.0 broker.
//!
//! The `roost` binary (src/main.rs) is a thin `main` over this library. The library
//! exists so that benchmarks can drive the broker's own code paths (building a
//! [`broker::Broker`], attaching connections through their mailboxes, publishing)
//! without a socket; it is not a stable API. Modules only the broker uses are private.
#![deny(missing_docs)]

mod acl;
mod admin;
pub mod auth;
mod auth_hook;
pub mod broker;
pub mod config;
mod connection;
mod lifecycle;
mod mailbox;
mod memory;
mod metrics;
mod passwd;
pub mod persist;
mod protocol;
mod queues;
mod rate;
pub mod retained;
mod scram;
pub mod server;
mod session;
mod sys;
mod tls;
mod transport;
mod websocket;

// A connection's mailbox, for attaching a connection without a socket (benches);
// the module itself stays private.
pub use mailbox::mailbox;
// `roost passwd`, for the binary.
pub use passwd::run as run_passwd;
