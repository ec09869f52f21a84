//! Bytes to packets and back.
//!
//! Decoding: [`decode`] looks at the fixed header first and refuses a packet whose
//! remaining length exceeds the limit before any of its body is buffered. Every UTF-8
//! string is checked for validity and for U+0000; a v5 property is rejected when it is
//! not allowed in its packet or appears twice where the spec forbids it.
//!
//! Encoding: [`encode`] writes any packet for a protocol version; [`encode_publish`]
//! writes a PUBLISH from borrowed parts so a fanned-out message is never copied.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::packet::*;
use crate::properties::Properties;
use crate::reason::ReasonCode;

mod decoder;
mod encoder;
mod props;
mod wire;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

/// Why bytes could not be decoded into a packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The bytes break the packet grammar (0x81).
    #[error("malformed packet: {0}")]
    MalformedPacket(&'static str),
    /// The packet is well formed but breaks a protocol rule (0x82).
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// Remaining length plus header over the limit (0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Total packet size announced by the fixed header.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// CONNECT with a protocol level roost does not speak (0x84 / 3.x return code 1).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// CONNECT whose protocol name is neither `MQTT` nor `MQIsdp`.
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// Topic alias 0 (0x94).
    #[error("topic alias 0")]
    TopicAliasInvalid,
}

impl DecodeError {
    /// The reason code a v5 server sends (CONNACK or DISCONNECT) for this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::MalformedPacket(_) => ReasonCode::MalformedPacket,
            DecodeError::ProtocolError(_) => ReasonCode::ProtocolError,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocolVersion(_) | DecodeError::InvalidProtocolName => {
                ReasonCode::UnsupportedProtocolVersion
            }
            DecodeError::TopicAliasInvalid => ReasonCode::TopicAliasInvalid,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// A string or binary field longer than 65,535 bytes.
    #[error("field too long")]
    FieldTooLong,
    /// Remaining length over 268,435,455.
    #[error("packet too large")]
    PacketTooLarge,
    /// The packet does not exist in the target protocol version (AUTH in 3.x).
    #[error("packet not valid in this protocol version")]
    NotInVersion,
}

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

/// Decodes one packet from the front of `buf`, advancing it past the packet.
///
/// `version` is `None` until CONNECT has been read: then only CONNECT is accepted and
/// its own protocol level decides how it is parsed. Returns `Ok(None)` when `buf` holds
/// no complete packet yet. `max_packet_size` bounds the whole packet (fixed header
/// included) and is checked as soon as the fixed header is readable.
///
/// A CONNECT is decoded whatever `version` says (a second CONNECT is the caller's
/// protocol error to report). On `Ok(None)` nothing is consumed; after an error the
/// offending packet may or may not have been consumed, and the connection is expected
/// to be closed. Topic name/filter rules (wildcards, empty names, `$share/`) are not
/// checked here: see [`crate::topic`].
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    decoder::decode(buf, version, max_packet_size)
}

/// Appends `packet` encoded for `version` to `buf`.
///
/// 3.x drops every property and ack reason code; 5.0 writes only the properties the
/// spec allows in that packet, and uses the short forms of acks, DISCONNECT and AUTH
/// whenever the content allows. CONNECT is written with the name and level of
/// `version` (not of its `protocol` field). A PUBLISH at QoS 0 is written without DUP.
/// Nothing is appended when an error is returned. A subscription identifier above
/// 268,435,455 is reported as [`EncodeError::FieldTooLong`].
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    encoder::encode(packet, version, buf)
}

/// The encoded size of `packet` for `version`, fixed header included.
///
/// Equals the bytes [`encode`] appends when it succeeds; 0 for AUTH in 3.x.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    encoder::encoded_len(packet, version)
}

/// Appends a PUBLISH built from borrowed parts to `buf`.
pub fn encode_publish(
    view: &PublishView<'_>,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    encoder::encode_publish(view, version, buf)
}

/// The encoded size of a PUBLISH built from borrowed parts, fixed header included.
pub fn publish_len(view: &PublishView<'_>, version: ProtocolVersion) -> usize {
    encoder::publish_len(view, version)
}

impl<'a> PublishView<'a> {
    /// A view of an owned PUBLISH whose own properties supply the subscription
    /// identifiers, message expiry and topic alias.
    pub fn of(publish: &'a Publish) -> Self {
        encoder::view_of(publish)
    }
}
