//! roost: an MQTT 3.1 / 3.1.1 / 5.0 broker.
//!
//! The `roost` binary (src/main.rs) is a thin `main` over this library: the shell around
//! the engine (crate `roost-engine`), in folders by concern:
//! - [`net`]: listeners' transports and the connection tasks that drive the engine;
//! - [`security`]: the password file, the auth hook, ACLs;
//! - [`persistence`]: the session store on disk;
//! - [`operations`]: the admin API and metrics, `$SYS` topics, memory;
//! - [`bridge`]: connections to other brokers that forward topics each way;
//! - [`config`]: the configuration (the engine's settings and the shell's own), and
//!   [`server`]: the start and orderly stop of it all.
#![deny(missing_docs)]

pub mod bridge;
pub mod config;
mod net;
mod operations;
pub use operations::stalls::{STALL_THRESHOLD, StallDetector};
mod persistence;
mod security;
pub mod server;

// `roost passwd`, for the binary.
pub use security::passwd::run as run_passwd;
// `roost queues`, for the binary.
pub use operations::queues_command::run as run_queues;
