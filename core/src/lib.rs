//! roost-core: the MQTT packet model and codec shared by every roost crate.
//!
//! This crate is pure: no tokio, no I/O. It knows MQTT 3.1 (protocol level 3,
//! `MQIsdp`), 3.1.1 (level 4) and 5.0 (level 5). Payloads are `bytes::Bytes` so a
//! decoded PUBLISH shares the read buffer instead of copying it.
//!
//! - [`packet`]: one struct per control packet, and the [`Packet`] enum.
//! - [`properties`]: the MQTT 5.0 property set.
//! - [`reason`]: reason codes, with their MQTT 3.x return-code equivalents.
//! - [`topic`]: topic name and filter rules, wildcard matching, `$share/`.
//! - [`codec`]: bytes to packets and back, with every check the spec asks of a receiver.
#![deny(missing_docs)]

pub mod codec;
pub mod message;
pub mod packet;
pub mod properties;
mod qos;
pub mod reason;
pub mod topic;

pub use codec::{DecodeError, EncodeError};
pub use message::Message;
pub use packet::*;
pub use properties::Properties;
pub use reason::ReasonCode;
