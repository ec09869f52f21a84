//! The codec's two error types.
//!
//! They stand alone because every layer of the codec returns them (wire primitives,
//! property parsing, the decoder and the encoder), and the codec's front file only
//! re-exports; here each layer can reach them without reaching into another.

use thiserror::Error;

use crate::reason::ReasonCode;

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
