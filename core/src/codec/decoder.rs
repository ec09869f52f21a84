//! Packet decoding.
//!
//! Order of checks: fixed header (type, flags, first-packet rule), then the size limit,
//! then completeness; only a complete packet is split off the read buffer, so every
//! body parser sees exactly its packet's bytes and must consume all of them.

use bytes::{Buf, BytesMut};

use super::error::DecodeError;
use super::props::{self, PropSet};
use super::wire::{Reader, remaining_length};
use crate::packet::*;
use crate::properties::Properties;
use crate::reason::ReasonCode;

fn malformed(why: &'static str) -> DecodeError {
    DecodeError::MalformedPacket(why)
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
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let Some((remaining, len_bytes)) = remaining_length(rest)? else {
        return Ok(None);
    };
    check_fixed_header(first, version)?;
    let header_len = 1 + len_bytes;
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    frame.advance(header_len);
    let mut r = Reader::new(frame);
    let flags = first & 0x0F;

    let packet = match (first >> 4, version) {
        (1, _) => Packet::Connect(Box::new(connect(&mut r)?)),
        // check_fixed_header let only CONNECT through without a version.
        (_, None) => return Err(DecodeError::ProtocolError("first packet must be CONNECT")),
        (2, Some(v)) => Packet::ConnAck(connack(&mut r, v)?),
        (3, Some(v)) => Packet::Publish(publish(&mut r, v, flags)?),
        (4, Some(v)) => Packet::PubAck(pub_response(&mut r, v)?),
        (5, Some(v)) => Packet::PubRec(pub_response(&mut r, v)?),
        (6, Some(v)) => Packet::PubRel(pub_response(&mut r, v)?),
        (7, Some(v)) => Packet::PubComp(pub_response(&mut r, v)?),
        (8, Some(v)) => Packet::Subscribe(subscribe(&mut r, v)?),
        (9, Some(v)) => Packet::SubAck(suback(&mut r, v)?),
        (10, Some(v)) => Packet::Unsubscribe(unsubscribe(&mut r, v)?),
        (11, Some(v)) => Packet::UnsubAck(unsuback(&mut r, v)?),
        (12, Some(_)) => Packet::PingReq,
        (13, Some(_)) => Packet::PingResp,
        (14, Some(v)) => Packet::Disconnect(disconnect(&mut r, v)?),
        (15, Some(_)) => Packet::Auth(auth(&mut r)?),
        _ => return Err(malformed("reserved packet type")),
    };
    // Every parser reads its whole content; anything left over breaks the grammar.
    r.finish()?;
    Ok(Some(packet))
}

/// Type and flag checks that need nothing but the first byte of the fixed header.
fn check_fixed_header(first: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0F;
    if kind == 0 {
        return Err(malformed("reserved packet type 0"));
    }
    if version.is_none() && kind != 1 {
        return Err(DecodeError::ProtocolError("first packet must be CONNECT"));
    }
    if kind == 15 && !version.is_some_and(ProtocolVersion::is_v5) {
        return Err(malformed("packet type 15 is reserved before MQTT 5.0"));
    }
    match kind {
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(malformed("PUBLISH QoS 0 with DUP set"));
            }
        }
        6 | 8 | 10 => {
            if flags != 0b0010 {
                return Err(malformed("fixed header flags must be 0010"));
            }
        }
        _ => {
            if flags != 0 {
                return Err(malformed("fixed header flags must be 0000"));
            }
        }
    }
    Ok(())
}

fn packet_id(r: &mut Reader) -> Result<PacketId, DecodeError> {
    match r.u16()? {
        0 => Err(malformed("packet identifier 0")),
        id => Ok(id),
    }
}

fn reason(byte: u8) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(byte).ok_or(malformed("unknown reason code"))
}

fn read_properties(
    r: &mut Reader,
    v: ProtocolVersion,
    set: PropSet,
) -> Result<Properties, DecodeError> {
    if v.is_v5() {
        props::decode(r, set)
    } else {
        Ok(Properties::default())
    }
}

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    // Read the name as raw bytes: an unknown name is its own error, not a UTF-8 one.
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT" | b"MQIsdp", other) => return Err(DecodeError::UnsupportedProtocolVersion(other)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_u8((flags >> 3) & 0b11).ok_or(malformed("will QoS 3"))?;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(malformed("will QoS or retain set without the will flag"));
    }
    // 5.0 lets a password stand alone (e.g. a token); 3.x forbids it.
    if has_password && !has_username && !protocol.is_v5() {
        return Err(malformed("password flag without user name flag"));
    }
    let keep_alive = r.u16()?;
    let properties = read_properties(r, protocol, PropSet::Connect)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = read_properties(r, protocol, PropSet::Will)?;
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn connack(r: &mut Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let ack_flags = r.u8()?;
    if ack_flags & 0xFE != 0 {
        return Err(malformed("CONNACK reserved flags set"));
    }
    let byte = r.u8()?;
    let code = if v.is_v5() {
        reason(byte)?
    } else {
        ReasonCode::from_v3_connack(byte).ok_or(malformed("unknown CONNACK return code"))?
    };
    Ok(ConnAck {
        session_present: ack_flags & 0x01 != 0,
        code,
        properties: read_properties(r, v, PropSet::ConnAck)?,
    })
}

fn publish(r: &mut Reader, v: ProtocolVersion, flags: u8) -> Result<Publish, DecodeError> {
    // check_fixed_header already refused QoS 3; this only avoids an unwrap.
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(malformed("PUBLISH with QoS 3"))?;
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r)?
    };
    let properties = read_properties(r, v, PropSet::Publish)?;
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. In 5.0 the reason code and the property length
/// may be left off (remaining length 2 or 3), meaning Success and no properties.
fn pub_response(r: &mut Reader, v: ProtocolVersion) -> Result<PubResponse, DecodeError> {
    let packet_id = packet_id(r)?;
    let mut response = PubResponse::new(packet_id);
    if v.is_v5() && !r.is_empty() {
        response.reason = reason(r.u8()?)?;
        if !r.is_empty() {
            response.properties = props::decode(r, PropSet::PubResponse)?;
        }
    }
    Ok(response)
}

fn subscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = read_properties(r, v, PropSet::Subscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = subscription_options(r.u8()?, v)?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError(
            "SUBSCRIBE without topic filters",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn subscription_options(byte: u8, v: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    // 3.x has only the requested QoS here; 5.0 adds three options in bits 2-5.
    let reserved = if v.is_v5() { 0xC0 } else { 0xFC };
    if byte & reserved != 0 {
        return Err(malformed("reserved bits set in subscription options"));
    }
    let qos = QoS::from_u8(byte & 0b11).ok_or(malformed("subscription QoS 3"))?;
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::ProtocolError("retain handling 3")),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0x04 != 0,
        retain_as_published: byte & 0x08 != 0,
        retain_handling,
    })
}

fn suback(r: &mut Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = read_properties(r, v, PropSet::SubAck)?;
    let mut reasons = Vec::new();
    while !r.is_empty() {
        let byte = r.u8()?;
        let code = if v.is_v5() {
            reason(byte)?
        } else {
            match byte {
                0x00 => ReasonCode::GRANTED_QOS0,
                0x01 => ReasonCode::GrantedQoS1,
                0x02 => ReasonCode::GrantedQoS2,
                0x80 => ReasonCode::UnspecifiedError,
                _ => return Err(malformed("unknown SUBACK return code")),
            }
        };
        reasons.push(code);
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn unsubscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = read_properties(r, v, PropSet::Unsubscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError(
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn unsuback(r: &mut Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = read_properties(r, v, PropSet::UnsubAck)?;
    let mut reasons = Vec::new();
    // 3.x UNSUBACK has no payload: anything here is left for finish() to refuse.
    if v.is_v5() {
        while !r.is_empty() {
            reasons.push(reason(r.u8()?)?);
        }
    }
    Ok(UnsubAck {
        packet_id,
        reasons,
        properties,
    })
}

/// DISCONNECT: empty in 3.x; in 5.0 an empty body means normal disconnection and a
/// one-byte body a reason without properties.
fn disconnect(r: &mut Reader, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if v.is_v5() && !r.is_empty() {
        d.reason = reason(r.u8()?)?;
        if !r.is_empty() {
            d.properties = props::decode(r, PropSet::Disconnect)?;
        }
    }
    Ok(d)
}

/// AUTH (5.0 only; the fixed-header check refused it in 3.x). Empty body = Success.
fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth::default();
    if !r.is_empty() {
        a.reason = reason(r.u8()?)?;
        if !r.is_empty() {
            a.properties = props::decode(r, PropSet::Auth)?;
        }
    }
    Ok(a)
}
