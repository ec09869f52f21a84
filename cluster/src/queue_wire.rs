//! What the nodes say to each other about consumers of replicated queues (JSON in a
//! REQUEST frame, see [`crate::request::Request::Queue`]).

use roost_queue::SettleHow;
use serde::{Deserialize, Serialize};

/// A group key on the wire: name and optional filter.
pub type WireKey = (String, Option<String>);

/// One delivery of a partition's leader to a consumer of another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireDelivery {
    /// The consumer (its client id on its own node).
    pub consumer: String,
    /// Its group.
    pub key: WireKey,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Delivery count.
    pub count: u32,
    /// Subtopic.
    pub subtopic: String,
    /// Encoded MQTT properties.
    pub headers: Vec<u8>,
    /// Body.
    pub payload: Vec<u8>,
    /// When it was stored.
    pub timestamp_ms: u64,
}

/// Consumer traffic of one replicated queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QueueMsg {
    /// A consumer of the sending node joined a group: deliver to it from the
    /// partitions led here.
    Join {
        /// The queue.
        queue: String,
        /// The group.
        key: WireKey,
        /// The consumer.
        consumer: String,
        /// Its window (0: adaptive).
        window: u32,
    },
    /// It left the group (every group when `None`).
    Leave {
        /// The queue.
        queue: String,
        /// The group, or all.
        key: Option<WireKey>,
        /// The consumer.
        consumer: String,
    },
    /// Deliveries, in order (answer: one JSON bool per delivery, true if taken).
    Deliver {
        /// The queue.
        queue: String,
        /// The deliveries.
        items: Vec<WireDelivery>,
    },
    /// A consumer of the sending node settled a delivery made from here.
    Settle {
        /// The queue.
        queue: String,
        /// The group, if the settle named it.
        key: Option<WireKey>,
        /// The consumer.
        consumer: String,
        /// How.
        how: SettleHow,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
    },
}
