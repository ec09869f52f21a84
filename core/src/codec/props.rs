//! MQTT 5.0 properties on the wire.
//!
//! Which property may appear in which packet follows table 2-4 of the 5.0 spec, kept
//! here as one bit mask per packet (bit n = identifier n; every identifier is below 64).
//! The decoder rejects a property outside its packet's mask as malformed; the encoder
//! silently leaves such a property out (see `PropsOut` in `sink`), so whatever it
//! writes the decoder accepts.

use super::error::DecodeError;
use super::wire::Reader;
use crate::properties::{Properties, id};

/// The property sets of table 2-4; the will properties of CONNECT are a set of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PropSet {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    PubResponse,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

const fn bits(ids: &[u8]) -> u64 {
    let mut mask = 0u64;
    let mut i = 0;
    while i < ids.len() {
        mask |= 1u64 << ids[i];
        i += 1;
    }
    mask
}

pub(super) const fn bit(identifier: u8) -> u64 {
    1u64 << identifier
}

/// Properties a message carries: those of PUBLISH and of the will (minus the
/// PUBLISH-only subscription identifier and topic alias).
const MESSAGE: &[u8] = &[
    id::PAYLOAD_FORMAT_INDICATOR,
    id::MESSAGE_EXPIRY_INTERVAL,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::USER_PROPERTY,
];

const CONNECT: u64 = bits(&[
    id::SESSION_EXPIRY_INTERVAL,
    id::AUTHENTICATION_METHOD,
    id::AUTHENTICATION_DATA,
    id::REQUEST_PROBLEM_INFORMATION,
    id::REQUEST_RESPONSE_INFORMATION,
    id::RECEIVE_MAXIMUM,
    id::TOPIC_ALIAS_MAXIMUM,
    id::USER_PROPERTY,
    id::MAXIMUM_PACKET_SIZE,
]);
const WILL: u64 = bits(MESSAGE) | bit(id::WILL_DELAY_INTERVAL);
const CONNACK: u64 = bits(&[
    id::SESSION_EXPIRY_INTERVAL,
    id::ASSIGNED_CLIENT_IDENTIFIER,
    id::SERVER_KEEP_ALIVE,
    id::AUTHENTICATION_METHOD,
    id::AUTHENTICATION_DATA,
    id::RESPONSE_INFORMATION,
    id::SERVER_REFERENCE,
    id::REASON_STRING,
    id::RECEIVE_MAXIMUM,
    id::TOPIC_ALIAS_MAXIMUM,
    id::MAXIMUM_QOS,
    id::RETAIN_AVAILABLE,
    id::USER_PROPERTY,
    id::MAXIMUM_PACKET_SIZE,
    id::WILDCARD_SUBSCRIPTION_AVAILABLE,
    id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    id::SHARED_SUBSCRIPTION_AVAILABLE,
]);
const PUBLISH: u64 = bits(MESSAGE) | bit(id::SUBSCRIPTION_IDENTIFIER) | bit(id::TOPIC_ALIAS);
/// PUBACK & co., SUBACK and UNSUBACK.
const ACK: u64 = bits(&[id::REASON_STRING, id::USER_PROPERTY]);
const SUBSCRIBE: u64 = bits(&[id::SUBSCRIPTION_IDENTIFIER, id::USER_PROPERTY]);
const UNSUBSCRIBE: u64 = bits(&[id::USER_PROPERTY]);
const DISCONNECT: u64 = bits(&[
    id::SESSION_EXPIRY_INTERVAL,
    id::SERVER_REFERENCE,
    id::REASON_STRING,
    id::USER_PROPERTY,
]);
const AUTH: u64 = bits(&[
    id::AUTHENTICATION_METHOD,
    id::AUTHENTICATION_DATA,
    id::REASON_STRING,
    id::USER_PROPERTY,
]);

/// Every identifier the spec defines.
const KNOWN: u64 = CONNECT | WILL | CONNACK | PUBLISH | SUBSCRIBE | DISCONNECT | AUTH;

impl PropSet {
    pub(super) const fn allowed(self) -> u64 {
        match self {
            PropSet::Connect => CONNECT,
            PropSet::Will => WILL,
            PropSet::ConnAck => CONNACK,
            PropSet::Publish => PUBLISH,
            PropSet::PubResponse | PropSet::SubAck | PropSet::UnsubAck => ACK,
            PropSet::Subscribe => SUBSCRIBE,
            PropSet::Unsubscribe => UNSUBSCRIBE,
            PropSet::Disconnect => DISCONNECT,
            PropSet::Auth => AUTH,
        }
    }
}

fn protocol_error(why: &'static str) -> DecodeError {
    DecodeError::ProtocolError(why)
}

/// A byte property whose only legal values are 0 and 1.
fn flag(r: &mut Reader, why: &'static str) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(protocol_error(why)),
    }
}

fn nonzero_u16(r: &mut Reader, why: &'static str) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(protocol_error(why)),
        v => Ok(v),
    }
}

/// Reads a property length and the properties it covers, checking each against `set`.
pub(super) fn decode(r: &mut Reader, set: PropSet) -> Result<Properties, DecodeError> {
    let len = r.varint()?;
    let mut r = Reader::new(r.take(len)?);
    let allowed = set.allowed();
    let mut seen = 0u64;
    let mut p = Properties::default();
    while !r.is_empty() {
        // Identifiers are Variable Byte Integers, though every defined one fits a byte.
        let ident = r.varint()?;
        let Ok(ident) = u8::try_from(ident) else {
            return Err(DecodeError::MalformedPacket("unknown property identifier"));
        };
        if ident >= 64 || KNOWN & bit(ident) == 0 {
            return Err(DecodeError::MalformedPacket("unknown property identifier"));
        }
        if allowed & bit(ident) == 0 {
            return Err(DecodeError::MalformedPacket(
                "property not allowed in this packet",
            ));
        }
        let repeatable = ident == id::USER_PROPERTY
            || (ident == id::SUBSCRIPTION_IDENTIFIER && set == PropSet::Publish);
        if seen & bit(ident) != 0 && !repeatable {
            return Err(protocol_error("property included more than once"));
        }
        seen |= bit(ident);
        match ident {
            id::PAYLOAD_FORMAT_INDICATOR => {
                p.payload_format_indicator =
                    Some(flag(&mut r, "payload format indicator not 0 or 1")?);
            }
            id::MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
            id::CONTENT_TYPE => p.content_type = Some(r.string()?),
            id::RESPONSE_TOPIC => p.response_topic = Some(r.string()?),
            id::CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
            id::SUBSCRIPTION_IDENTIFIER => {
                let v = r.varint()?;
                if v == 0 {
                    return Err(protocol_error("subscription identifier 0"));
                }
                // A varint is at most 268,435,455, so it always fits a u32.
                p.subscription_identifiers.push(v as u32);
            }
            id::SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
            id::ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
            id::SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
            id::AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
            id::AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
            id::REQUEST_PROBLEM_INFORMATION => {
                p.request_problem_information =
                    Some(flag(&mut r, "request problem information not 0 or 1")?);
            }
            id::WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
            id::REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information =
                    Some(flag(&mut r, "request response information not 0 or 1")?);
            }
            id::RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
            id::SERVER_REFERENCE => p.server_reference = Some(r.string()?),
            id::REASON_STRING => p.reason_string = Some(r.string()?),
            id::RECEIVE_MAXIMUM => {
                p.receive_maximum = Some(nonzero_u16(&mut r, "receive maximum 0")?)
            }
            id::TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
            id::TOPIC_ALIAS => match r.u16()? {
                0 => return Err(DecodeError::TopicAliasInvalid),
                v => p.topic_alias = Some(v),
            },
            id::MAXIMUM_QOS => p.maximum_qos = Some(flag(&mut r, "maximum QoS not 0 or 1")?),
            id::RETAIN_AVAILABLE => {
                p.retain_available = Some(flag(&mut r, "retain available not 0 or 1")?);
            }
            id::USER_PROPERTY => {
                let name = r.string()?;
                let value = r.string()?;
                p.user_properties.push((name, value));
            }
            id::MAXIMUM_PACKET_SIZE => match r.u32()? {
                0 => return Err(protocol_error("maximum packet size 0")),
                v => p.maximum_packet_size = Some(v),
            },
            id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                p.wildcard_subscription_available =
                    Some(flag(&mut r, "wildcard subscription available not 0 or 1")?);
            }
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                p.subscription_identifier_available = Some(flag(
                    &mut r,
                    "subscription identifier available not 0 or 1",
                )?);
            }
            id::SHARED_SUBSCRIPTION_AVAILABLE => {
                p.shared_subscription_available =
                    Some(flag(&mut r, "shared subscription available not 0 or 1")?);
            }
            // KNOWN above lists exactly the identifiers matched here.
            _ => return Err(DecodeError::MalformedPacket("unknown property identifier")),
        }
    }
    Ok(p)
}
