//! Packet encoding.
//!
//! Each body is described once (`body`, `publish_body`) against [`Sink`]; a counting
//! pass sizes it and checks field limits, then one `reserve` and a writing pass fill the
//! buffer. Nothing is written when a check fails, and nothing is allocated in between.
//!
//! 5.0 short forms are always used where the spec allows them (acks and DISCONNECT
//! without properties, AUTH/acks with Success and no properties), because some peers
//! only accept those.

use bytes::{BufMut, BytesMut};

use super::error::EncodeError;
use super::props::PropSet;
use super::publish_view::PublishView;
use super::sink::{Counter, PropsOut, Sink, Writer};
use super::wire::{MAX_VARINT, put_varint, varint_len};
use crate::packet::*;
use crate::reason::ReasonCode;

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
    if let Packet::Publish(p) = packet {
        return encode_publish(&PublishView::of(p), version, buf);
    }
    if matches!(packet, Packet::Auth(_)) && !version.is_v5() {
        return Err(EncodeError::NotInVersion);
    }
    let mut counter = Counter::default();
    body(packet, version, &mut counter);
    let header = first_byte(packet);
    write_frame(header, &counter, buf, |w| body(packet, version, w))
}

/// The encoded size of `packet` for `version`, fixed header included.
///
/// Equals the bytes [`encode`] appends when it succeeds; 0 for AUTH in 3.x.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    if let Packet::Publish(p) = packet {
        return publish_len(&PublishView::of(p), version);
    }
    if matches!(packet, Packet::Auth(_)) && !version.is_v5() {
        return 0;
    }
    let mut counter = Counter::default();
    body(packet, version, &mut counter);
    frame_len(counter.len)
}

/// Appends a PUBLISH built from borrowed parts to `buf`.
pub fn encode_publish(
    view: &PublishView<'_>,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut counter = Counter::default();
    publish_body(view, version, &mut counter);
    write_frame(publish_first_byte(view), &counter, buf, |w| {
        publish_body(view, version, w)
    })
}

/// The encoded size of a PUBLISH built from borrowed parts, fixed header included.
pub fn publish_len(view: &PublishView<'_>, version: ProtocolVersion) -> usize {
    let mut counter = Counter::default();
    publish_body(view, version, &mut counter);
    frame_len(counter.len)
}

fn frame_len(body: usize) -> usize {
    1 + varint_len(body) + body
}

/// Checks the counting pass, then writes the fixed header and the body in one go.
fn write_frame(
    first: u8,
    counter: &Counter,
    buf: &mut BytesMut,
    write_body: impl FnOnce(&mut Writer<'_>),
) -> Result<(), EncodeError> {
    if counter.len > MAX_VARINT {
        return Err(EncodeError::PacketTooLarge);
    }
    if counter.field_too_long {
        return Err(EncodeError::FieldTooLong);
    }
    buf.reserve(frame_len(counter.len));
    buf.put_u8(first);
    put_varint(buf, counter.len);
    let start = buf.len();
    write_body(&mut counter.writer(buf));
    debug_assert_eq!(
        buf.len() - start,
        counter.len,
        "count and write passes disagree"
    );
    Ok(())
}

fn first_byte(packet: &Packet) -> u8 {
    let kind = packet.packet_type() as u8;
    // PUBREL, SUBSCRIBE and UNSUBSCRIBE carry the fixed flags 0010.
    let flags = match packet {
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    kind << 4 | flags
}

fn publish_first_byte(view: &PublishView<'_>) -> u8 {
    let qos = view.qos as u8;
    // DUP is meaningless at QoS 0 and a receiver must refuse it there, so drop it.
    let dup = view.dup && qos > 0;
    (PacketType::Publish as u8) << 4 | u8::from(dup) << 3 | qos << 1 | u8::from(view.retain)
}

fn publish_body<S: Sink>(view: &PublishView<'_>, version: ProtocolVersion, s: &mut S) {
    s.string(view.topic);
    if view.qos != QoS::AtMostOnce {
        s.u16(view.packet_id);
    }
    if version.is_v5() {
        PropsOut {
            props: view.properties,
            subscription_identifiers: view.subscription_identifiers,
            message_expiry_interval: view.message_expiry_interval,
            topic_alias: view.topic_alias,
            allowed: PropSet::Publish.allowed(),
        }
        .write(s);
    }
    s.raw(view.payload);
}

fn body<S: Sink>(packet: &Packet, v: ProtocolVersion, s: &mut S) {
    match packet {
        Packet::Connect(c) => connect(c, v, s),
        Packet::ConnAck(c) => {
            s.u8(u8::from(c.session_present));
            if v.is_v5() {
                s.u8(c.code.as_u8());
                PropsOut::of(&c.properties, PropSet::ConnAck).write(s);
            } else {
                s.u8(c.code.to_v3_connack());
            }
        }
        Packet::Publish(p) => publish_body(&PublishView::of(p), v, s),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            s.u16(r.packet_id);
            if v.is_v5() {
                reason_and_properties(
                    r.reason,
                    PropsOut::of(&r.properties, PropSet::PubResponse),
                    s,
                );
            }
        }
        Packet::Subscribe(sub) => {
            s.u16(sub.packet_id);
            if v.is_v5() {
                PropsOut::of(&sub.properties, PropSet::Subscribe).write(s);
            }
            for (filter, o) in &sub.filters {
                s.string(filter);
                let mut options = o.qos as u8;
                if v.is_v5() {
                    options |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling as u8) << 4;
                }
                s.u8(options);
            }
        }
        Packet::SubAck(ack) => {
            s.u16(ack.packet_id);
            if v.is_v5() {
                PropsOut::of(&ack.properties, PropSet::SubAck).write(s);
            }
            for &code in &ack.reasons {
                s.u8(if v.is_v5() {
                    code.as_u8()
                } else {
                    v3_suback(code)
                });
            }
        }
        Packet::Unsubscribe(u) => {
            s.u16(u.packet_id);
            if v.is_v5() {
                PropsOut::of(&u.properties, PropSet::Unsubscribe).write(s);
            }
            for filter in &u.filters {
                s.string(filter);
            }
        }
        Packet::UnsubAck(ack) => {
            s.u16(ack.packet_id);
            // 3.x UNSUBACK is the packet identifier alone.
            if v.is_v5() {
                PropsOut::of(&ack.properties, PropSet::UnsubAck).write(s);
                for &code in &ack.reasons {
                    s.u8(code.as_u8());
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v.is_v5() {
                reason_and_properties(
                    d.reason,
                    PropsOut::of(&d.properties, PropSet::Disconnect),
                    s,
                );
            }
        }
        Packet::Auth(a) => {
            let props = PropsOut::of(&a.properties, PropSet::Auth);
            // Only the empty form is spelled out for AUTH; otherwise keep the property
            // length even when it is 0, which every 5.0 receiver accepts.
            if a.reason != ReasonCode::Success || props.content_len() > 0 {
                s.u8(a.reason.as_u8());
                props.write(s);
            }
        }
    }
}

/// The tail of a 5.0 PUBACK/PUBREC/PUBREL/PUBCOMP/DISCONNECT in its shortest form.
fn reason_and_properties<S: Sink>(reason: ReasonCode, props: PropsOut<'_>, s: &mut S) {
    if props.content_len() > 0 {
        s.u8(reason.as_u8());
        props.write(s);
    } else if reason != ReasonCode::Success {
        s.u8(reason.as_u8());
    }
}

/// 3.x SUBACK knows granted QoS 0-2 and failure 0x80 only.
fn v3_suback(code: ReasonCode) -> u8 {
    match code {
        ReasonCode::Success | ReasonCode::GrantedQoS1 | ReasonCode::GrantedQoS2 => code.as_u8(),
        _ => 0x80,
    }
}

fn connect<S: Sink>(c: &Connect, v: ProtocolVersion, s: &mut S) {
    s.string(if v == ProtocolVersion::V3_1 {
        "MQIsdp"
    } else {
        "MQTT"
    });
    s.u8(v.level());
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    s.u8(flags);
    s.u16(c.keep_alive);
    if v.is_v5() {
        PropsOut::of(&c.properties, PropSet::Connect).write(s);
    }
    s.string(&c.client_id);
    if let Some(w) = &c.will {
        if v.is_v5() {
            PropsOut::of(&w.properties, PropSet::Will).write(s);
        }
        s.string(&w.topic);
        s.binary(&w.payload);
    }
    if let Some(u) = &c.username {
        s.string(u);
    }
    if let Some(p) = &c.password {
        s.binary(p);
    }
}
