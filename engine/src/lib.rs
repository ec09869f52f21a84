//! roost's engine: the MQTT broker without I/O.
//!
//! The per-connection protocol state machine ([`protocol`]), sessions ([`session`]) and
//! their lifecycle ([`lifecycle`]: will delay, expiry, takeover), routing and fan-out
//! ([`broker`]), retained messages ([`retained`]), the limits clients meet
//! ([`settings`]) and the `$queue/` glue ([`queues`]). It reaches what it needs from
//! outside through small traits: a [`store::SessionStore`] for what must be durable, an
//! [`auth::Authenticator`] and [`access::Authorizer`] for who may do what. It knows no
//! socket, TLS, file format of its own choosing, command line or HTTP: the `roost`
//! binary (crate `roost-broker`) is the shell that does.
#![deny(missing_docs)]

pub mod access;
pub mod auth;
pub mod broker;
pub mod client;
pub mod clock;
pub mod lifecycle;
pub mod mailbox;
pub mod metrics;
pub mod peers;
pub mod protocol;
pub mod queues;
pub mod rate;
pub mod record;
pub mod retained;
pub mod scram;
pub mod session;
pub mod settings;
pub mod store;

#[cfg(test)]
mod tests;

pub use settings::Settings;
