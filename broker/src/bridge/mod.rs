//! Bridges: roost as a client of another MQTT broker, forwarding topics each way.
//!
//! Each `[[bridge]]` is one MQTT connection to a remote broker, kept up by its own task
//! ([`link`]), with topic mappings that forward local publishes out (`out`), remote
//! publishes in (`in`), or both.
//!
//! Invariants:
//! - what goes `out` is first stored in the bridge's own durable queue,
//!   `bridge.<name>` (one partition, so one order): a local publisher's PUBACK waits for
//!   that copy, like any queue capture, and a message leaves the queue only when the
//!   remote acknowledged it (QoS 1/2). So nothing is lost while the remote is down or
//!   roost restarts; past the queue's bound (`queue_max_messages`, `queue_max_bytes`)
//!   new messages are dropped and counted;
//! - what comes `in` is acknowledged to the remote only after it is published locally
//!   (and stored where that needs storing);
//! - a message never loops back: what comes in is published under the bridge's client
//!   id, which its outgoing queue does not capture; towards the remote, MQTT 5 No Local
//!   keeps the remote from sending the bridge's own messages back, and an MQTT 3.1.1
//!   remote's echoes are recognised and dropped.

mod link;
mod registry;
mod settings;
mod status;
mod wire;

pub use registry::Bridges;
pub use settings::{BridgeConfig, Direction, TopicMapping};
pub use status::{BridgeDrop, BridgeError, BridgeStatus};
