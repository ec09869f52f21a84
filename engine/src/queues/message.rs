//! What a publish becomes in a queue, and back: the stored message of a produce or a
//! capture (its properties kept as headers), read again on delivery. Depends on
//! nothing of the engine, so the router's side (captures) and the queues' side share it.

use bytes::{Bytes, BytesMut};
use roost_core::codec::{self, PublishView};
use roost_core::{Message, Packet, Properties, ProtocolVersion, QoS};
use roost_queue::{NewMessage, ProduceError};

/// A user property of a message.
pub fn user_property<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The message to store for a PUBLISH to a queue: its properties travel as headers;
/// the user properties `partition-key`, `dedup-id`, `delay-ms` and `deliver-at` are
/// read by the queue. A `delay-ms` or `deliver-at` that is not a whole number of
/// milliseconds is refused.
pub fn new_message(msg: &Message, subtopic: &str) -> Result<NewMessage, ProduceError> {
    Ok(NewMessage {
        subtopic: subtopic.to_owned(),
        partition_key: partition_key(msg),
        headers: encode_headers(&msg.properties, ""),
        payload: msg.payload.clone(),
        dedup_id: dedup_id(msg),
        deliver_at: deliver_at(msg, roost_queue::now_ms)?,
    })
}

/// The copy of an ordinary publish that a queue's capture filter matched: its whole
/// topic is the subtopic (what consumer filters match) and the original topic. A
/// malformed delay is ignored here (the publish itself went through).
pub fn captured_message(msg: &Message) -> NewMessage {
    NewMessage {
        subtopic: msg.topic.clone(),
        partition_key: partition_key(msg),
        headers: encode_stored(&msg.properties, &msg.topic, msg.retain),
        payload: msg.payload.clone(),
        dedup_id: dedup_id(msg),
        deliver_at: deliver_at(msg, roost_queue::now_ms).ok().flatten(),
    }
}

fn dedup_id(msg: &Message) -> Option<Bytes> {
    user_property(msg, "dedup-id").map(|k| Bytes::copy_from_slice(k.as_bytes()))
}

/// When a message may be delivered: `deliver-at` (Unix ms) or now + `delay-ms`; the
/// later if both are given.
/// `now` is read only for a `delay-ms` (most produces carry neither property).
fn deliver_at(msg: &Message, now: impl FnOnce() -> u64) -> Result<Option<u64>, ProduceError> {
    let number = |name: &str, why: &'static str| {
        user_property(msg, name)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| ProduceError::InvalidProperty(why))
            })
            .transpose()
    };
    let delay = number("delay-ms", "delay-ms is not a number of milliseconds")?;
    let at = number(
        "deliver-at",
        "deliver-at is not a Unix time in milliseconds",
    )?;
    Ok(match (delay.map(|d| now().saturating_add(d)), at) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    })
}

/// What the stored headers of a captured publish say of it: its properties, its
/// original topic and its retain flag (a bridge forwards all three). `None` for headers
/// that do not decode.
pub fn captured_publish(headers: &Bytes) -> Option<(Properties, String, bool)> {
    let mut buf = BytesMut::from(&headers[..]);
    match codec::decode(&mut buf, Some(ProtocolVersion::V5), usize::MAX) {
        Ok(Some(Packet::Publish(p))) => Some((p.properties, p.topic, p.retain)),
        _ => None,
    }
}

fn partition_key(msg: &Message) -> Option<Bytes> {
    user_property(msg, "partition-key").map(|k| Bytes::copy_from_slice(k.as_bytes()))
}

/// The stored headers of a publish to `$queue/` without properties (the common case):
/// what [`encode_headers`] writes for it (a v5 PUBLISH, QoS 0, remaining length 3: an
/// empty topic and an empty property list). Shared instead of encoded per message, and
/// recognised on delivery without decoding.
pub(super) const NO_HEADERS: &[u8] = &[0x30, 0x03, 0x00, 0x00, 0x00];

/// Properties as stored with a queue message: an MQTT 5.0 PUBLISH with no payload,
/// so the codec does the work and validates it on the way back. Its topic is the
/// original topic of a captured publish, empty for a publish to `$queue/`.
pub(super) fn encode_headers(properties: &Properties, original_topic: &str) -> Bytes {
    encode_stored(properties, original_topic, false)
}

/// [`encode_headers`] with the publish's retain flag kept in the stored PUBLISH's flags
/// (captured publishes: a bridge forwards it).
fn encode_stored(properties: &Properties, original_topic: &str, retain: bool) -> Bytes {
    if original_topic.is_empty() && *properties == Properties::default() {
        return Bytes::from_static(NO_HEADERS);
    }
    let empty = Bytes::new();
    let view = PublishView {
        dup: false,
        qos: QoS::AtMostOnce,
        retain,
        topic: original_topic,
        packet_id: 0,
        properties,
        subscription_identifiers: &[],
        message_expiry_interval: None,
        topic_alias: None,
        payload: &empty,
    };
    let mut buf = BytesMut::new();
    // Properties that came through the decoder always encode again.
    let _ = codec::encode_publish(&view, ProtocolVersion::V5, &mut buf);
    buf.freeze()
}

/// The properties and the original topic (empty unless captured) of stored headers.
pub(super) fn decode_headers(headers: &Bytes) -> (Properties, String) {
    if headers[..] == *NO_HEADERS {
        return (Properties::default(), String::new());
    }
    let mut buf = BytesMut::from(&headers[..]);
    match codec::decode(&mut buf, Some(ProtocolVersion::V5), usize::MAX) {
        Ok(Some(Packet::Publish(p))) => (p.properties, p.topic),
        _ => (Properties::default(), String::new()),
    }
}
