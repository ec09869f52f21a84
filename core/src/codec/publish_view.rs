//! [`PublishView`]: a PUBLISH to encode, borrowed rather than owned.
//!
//! It stands alone because it is both the encoder's input and a public type that
//! the engine builds once per subscriber; the encoder depends on it, never the reverse.

use bytes::Bytes;

use crate::packet::{PacketId, Publish, QoS};
use crate::properties::Properties;

/// A PUBLISH to write, borrowed from a shared message plus per-subscriber fields.
#[derive(Debug, Clone, Copy)]
pub struct PublishView<'a> {
    /// Redelivery flag.
    pub dup: bool,
    /// Delivery QoS (the minimum of message and subscription QoS).
    pub qos: QoS,
    /// Retain flag as sent to this subscriber.
    pub retain: bool,
    /// Topic name (may be empty only with a topic alias, 5.0).
    pub topic: &'a str,
    /// Packet identifier (ignored for QoS 0).
    pub packet_id: PacketId,
    /// Message properties; its `subscription_identifiers`, `message_expiry_interval`
    /// and `topic_alias` are ignored in favour of the three fields below.
    pub properties: &'a Properties,
    /// Subscription identifiers of the matching subscriptions (5.0).
    pub subscription_identifiers: &'a [u32],
    /// Remaining message expiry in seconds (5.0).
    pub message_expiry_interval: Option<u32>,
    /// Topic alias (5.0).
    pub topic_alias: Option<u16>,
    /// Application payload.
    pub payload: &'a Bytes,
}

impl<'a> PublishView<'a> {
    /// A view of an owned PUBLISH whose own properties supply the subscription
    /// identifiers, message expiry and topic alias.
    pub fn of(publish: &'a Publish) -> Self {
        PublishView {
            dup: publish.dup,
            qos: publish.qos,
            retain: publish.retain,
            topic: &publish.topic,
            packet_id: publish.packet_id,
            properties: &publish.properties,
            subscription_identifiers: &publish.properties.subscription_identifiers,
            message_expiry_interval: publish.properties.message_expiry_interval,
            topic_alias: publish.properties.topic_alias,
            payload: &publish.payload,
        }
    }
}
