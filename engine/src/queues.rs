//! The MQTT face of `$queue/` work queues (the queues themselves are `roost_queue`).
//!
//! - Produce: PUBLISH to `$queue/<name>` or `$queue/<name>/<rest>`; the acknowledgement
//!   waits until the queue has stored the message (v5 producers get 0x97 when the queue
//!   is full, 3.x producers wait for room). `partition-key` picks the partition.
//! - Consume: SUBSCRIBE to `$share/<group>/$queue/<name>[/<filter>]`, or to
//!   `$queue/<name>[/<filter>]` with the v5 user property `consumer-group` (else the
//!   group `default`); `$queue/<name>/$dlq` is the dead-letter queue. Deliveries carry
//!   the user properties `queue`, `partition`, `offset`, `message-id`, `delivery-count`
//!   and `topic` (the topic it was published to).
//! - Settle: PUBACK/PUBCOMP acks, a v5 PUBACK/PUBREC >= 0x80 nacks; or PUBLISH to
//!   `$queue/<name>/$ack`, `$nack`, `$reject` with the `message-id` user property.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use roost_core::codec::{self, PublishView};
use roost_core::{Message, Packet, Properties, ProtocolVersion, QoS, ReasonCode};
use roost_queue::{
    DeliverySink, GroupKey, MessageId, NewMessage, ProduceError, Queue, QueueDelivery,
};

use crate::broker::Control;
use crate::mailbox::WeakSender;
use crate::session::{Delivery, QueueRef};

/// A queue subscription, parsed from its raw filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFilter {
    /// Queue name (`<name>$dlq` for a dead-letter queue).
    pub queue: String,
    /// Group and filter.
    pub group: GroupKey,
    /// The topic deliveries carry: matches the subscription filter.
    pub topic_base: String,
}

/// Parses `$share/<g>/$queue/<name>[/<filter>]` or `$queue/<name>[/<filter>]`.
pub fn parse_filter(raw: &str, consumer_group: Option<&str>) -> Option<QueueFilter> {
    let (share, rest) = match raw.strip_prefix("$share/") {
        Some(r) => {
            let (g, rest) = r.split_once('/')?;
            (Some(g), rest)
        }
        None => (None, raw),
    };
    let rest = rest.strip_prefix("$queue/")?;
    let (name, filter) = match rest.split_once('/') {
        Some((n, f)) => (n, Some(f).filter(|f| !f.is_empty())),
        None => (rest, None),
    };
    let group = share.or(consumer_group).unwrap_or("default");
    if filter == Some("$dlq") {
        return Some(QueueFilter {
            queue: format!("{name}{}", roost_queue::DEAD_LETTER_SUFFIX),
            group: GroupKey::new(group, None),
            topic_base: format!("$queue/{name}/$dlq"),
        });
    }
    Some(QueueFilter {
        queue: name.to_owned(),
        group: GroupKey::new(group, filter),
        topic_base: format!("$queue/{name}"),
    })
}

/// True for a filter that names a queue (it never goes to the router).
pub fn is_queue_filter(raw: &str) -> bool {
    parse_filter(raw, None).is_some()
}

/// What a PUBLISH to `$queue/...` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueTopic<'a> {
    /// Store a message: queue name and the rest of the topic (may be empty).
    Produce(&'a str, &'a str),
    /// Settle the message named by the `message-id` property.
    Settle(&'a str, Settle),
}

/// How a consumer settles a message by publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// `$ack`
    Ack,
    /// `$nack`: redeliver later.
    Nack,
    /// `$reject`: straight to the dead-letter queue.
    Reject,
}

/// Parses a `$queue/` topic name.
pub fn parse_topic(topic: &str) -> Option<QueueTopic<'_>> {
    let rest = topic.strip_prefix("$queue/")?;
    let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
    Some(match sub {
        "$ack" => QueueTopic::Settle(name, Settle::Ack),
        "$nack" => QueueTopic::Settle(name, Settle::Nack),
        "$reject" => QueueTopic::Settle(name, Settle::Reject),
        _ => QueueTopic::Produce(name, sub),
    })
}

/// A user property of a message.
pub fn user_property<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The message to store for a PUBLISH to a queue: its properties travel as headers.
pub fn new_message(msg: &Message, subtopic: &str) -> NewMessage {
    NewMessage {
        subtopic: subtopic.to_owned(),
        partition_key: partition_key(msg),
        headers: encode_headers(&msg.properties, ""),
        payload: msg.payload.clone(),
    }
}

/// The copy of an ordinary publish that a queue's capture filter matched: its whole
/// topic is the subtopic (what consumer filters match) and the original topic.
pub fn captured_message(msg: &Message) -> NewMessage {
    NewMessage {
        subtopic: msg.topic.clone(),
        partition_key: partition_key(msg),
        headers: encode_headers(&msg.properties, &msg.topic),
        payload: msg.payload.clone(),
    }
}

fn partition_key(msg: &Message) -> Option<Bytes> {
    user_property(msg, "partition-key").map(|k| Bytes::copy_from_slice(k.as_bytes()))
}

/// The stored headers of a publish to `$queue/` without properties (the common case):
/// what [`encode_headers`] writes for it (a v5 PUBLISH, QoS 0, remaining length 3: an
/// empty topic and an empty property list). Shared instead of encoded per message, and
/// recognised on delivery without decoding.
const NO_HEADERS: &[u8] = &[0x30, 0x03, 0x00, 0x00, 0x00];

/// Properties as stored with a queue message: an MQTT 5.0 PUBLISH with no payload,
/// so the codec does the work and validates it on the way back. Its topic is the
/// original topic of a captured publish, empty for a publish to `$queue/`.
fn encode_headers(properties: &Properties, original_topic: &str) -> Bytes {
    if original_topic.is_empty() && *properties == Properties::default() {
        return Bytes::from_static(NO_HEADERS);
    }
    let empty = Bytes::new();
    let view = PublishView {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
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
fn decode_headers(headers: &Bytes) -> (Properties, String) {
    if headers[..] == *NO_HEADERS {
        return (Properties::default(), String::new());
    }
    let mut buf = BytesMut::from(&headers[..]);
    match codec::decode(&mut buf, Some(ProtocolVersion::V5), usize::MAX) {
        Ok(Some(Packet::Publish(p))) => (p.properties, p.topic),
        _ => (Properties::default(), String::new()),
    }
}

/// The SUBACK reason code of a `$queue/` subscription that failed with `e`.
pub fn subscribe_reason(e: &roost_queue::QueueError) -> ReasonCode {
    use roost_queue::QueueError;
    match e {
        QueueError::TooManyQueues { .. } | QueueError::TooManyGroups { .. } => {
            ReasonCode::QuotaExceeded
        }
        QueueError::InvalidName(_) | QueueError::InvalidFilter(_) => ReasonCode::TopicFilterInvalid,
        _ => ReasonCode::UnspecifiedError,
    }
}

/// The reason code a producer gets for a failed produce.
pub fn produce_reason(e: &ProduceError) -> ReasonCode {
    e.reason_code()
}

/// Hands queue deliveries to one connection's mailbox. Holds the mailbox
/// weakly, so a connection that is gone refuses rather than keeps it open.
pub struct QueueSink {
    sender: WeakSender<Delivery, Control>,
    topic_base: String,
    qos: QoS,
    identifier: Option<u32>,
    /// The connection speaks MQTT 5.0. Only 5.0 carries properties, so a delivery to a
    /// 3.x consumer skips building them (the stored ones and the six user properties
    /// queue deliveries carry): most of a delivery's allocations.
    v5: bool,
}

impl QueueSink {
    /// A sink for a subscription of `filter` at `qos` (queue deliveries are at least
    /// QoS 1) by a connection speaking `version`.
    pub fn new(
        sender: WeakSender<Delivery, Control>,
        filter: &QueueFilter,
        qos: QoS,
        identifier: Option<u32>,
        version: ProtocolVersion,
    ) -> QueueSink {
        QueueSink {
            sender,
            topic_base: filter.topic_base.clone(),
            qos: qos.max(QoS::AtLeastOnce),
            identifier,
            v5: version.is_v5(),
        }
    }
}

impl DeliverySink for QueueSink {
    fn offer(&self, d: QueueDelivery) -> bool {
        let Some(sender) = self.sender.upgrade() else {
            return false;
        };
        let Some(permit) = sender.try_reserve() else {
            return false;
        };
        permit.send(to_delivery(d, self));
        true
    }
}

fn to_delivery(d: QueueDelivery, sink: &QueueSink) -> Delivery {
    let visible_name =
        d.id.queue
            .strip_suffix(roost_queue::DEAD_LETTER_SUFFIX)
            .unwrap_or(&d.id.queue);
    // With a filter the subscription names the subtopic, so the topic carries it too.
    let topic = if d.group.filter.is_some() && d.dead_letter.is_none() {
        format!("$queue/{visible_name}/{}", d.subtopic)
    } else {
        sink.topic_base.clone()
    };
    let properties = if sink.v5 {
        delivery_properties(&d, visible_name)
    } else {
        Properties::default()
    };
    let qos = sink.qos;
    Delivery {
        msg: Arc::new(Message {
            topic,
            payload: d.payload,
            qos,
            retain: false,
            properties,
            publisher: None,
            received_at: Instant::now(),
        }),
        qos,
        retain: false,
        subscription_ids: sink.identifier.into_iter().collect(),
        share: None,
        seq: None,
        queue: Some(Arc::new(QueueRef {
            queue: d.id.queue.clone(),
            group: d.group,
            id: d.id,
        })),
    }
}

/// The properties of a delivery to a 5.0 consumer: as produced, plus the user
/// properties that say where the message lives (`queue`, `partition`, `offset`,
/// `message-id`, `delivery-count`) and where it was published (`topic`).
fn delivery_properties(d: &QueueDelivery, visible_name: &str) -> Properties {
    let (mut properties, captured_from) = decode_headers(&d.headers);
    let original = if !captured_from.is_empty() {
        captured_from
    } else if d.subtopic.is_empty() {
        format!("$queue/{visible_name}")
    } else {
        format!("$queue/{visible_name}/{}", d.subtopic)
    };
    let extra = [
        ("queue", visible_name.to_owned()),
        ("partition", d.id.partition.to_string()),
        ("offset", d.id.offset.to_string()),
        ("message-id", d.id.to_string()),
        ("delivery-count", d.delivery_count.to_string()),
        ("topic", original),
    ];
    properties.user_properties.reserve_exact(extra.len());
    properties
        .user_properties
        .extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
    properties.message_expiry_interval = None;
    properties
}

/// Settles by message id (from `$ack`/`$nack`/`$reject` publishes); true if the
/// queue knew the message as in flight to `consumer`.
pub fn settle(queue: &Queue, consumer: &str, id: &MessageId, how: Settle) -> bool {
    match how {
        Settle::Ack => {
            drop(queue.ack(consumer, None, id));
            true
        }
        Settle::Nack => queue.nack(consumer, None, id),
        Settle::Reject => queue.reject(consumer, None, id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let f = parse_filter("$share/workers/$queue/orders", None).expect("queue");
        assert_eq!(f.queue, "orders");
        assert_eq!(f.group, GroupKey::new("workers", None));
        let f = parse_filter("$queue/orders/eu/+", Some("g")).expect("queue");
        assert_eq!(f.group, GroupKey::new("g", Some("eu/+")));
        assert_eq!(f.topic_base, "$queue/orders");
        let f = parse_filter("$queue/orders", None).expect("queue");
        assert_eq!(f.group, GroupKey::new("default", None));
        let f = parse_filter("$share/g/$queue/orders/$dlq", None).expect("dlq");
        assert_eq!(
            f.queue,
            format!("orders{}", roost_queue::DEAD_LETTER_SUFFIX)
        );
        assert!(parse_filter("$share/g/orders", None).is_none());
        assert!(parse_filter("a/$queue/x", None).is_none());
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_topic("$queue/jobs"),
            Some(QueueTopic::Produce("jobs", ""))
        );
        assert_eq!(
            parse_topic("$queue/jobs/dev/1"),
            Some(QueueTopic::Produce("jobs", "dev/1"))
        );
        assert_eq!(
            parse_topic("$queue/jobs/$nack"),
            Some(QueueTopic::Settle("jobs", Settle::Nack))
        );
        assert_eq!(parse_topic("queue/jobs"), None);
    }

    #[test]
    fn shared_empty_headers_are_what_the_codec_writes() {
        let empty = Properties::default();
        let view = PublishView {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "",
            packet_id: 0,
            properties: &empty,
            subscription_identifiers: &[],
            message_expiry_interval: None,
            topic_alias: None,
            payload: &Bytes::new(),
        };
        let mut buf = BytesMut::new();
        codec::encode_publish(&view, ProtocolVersion::V5, &mut buf).expect("encodes");
        assert_eq!(&buf[..], NO_HEADERS);
        assert_eq!(&encode_headers(&empty, "")[..], NO_HEADERS);
        assert_eq!(
            decode_headers(&encode_headers(&empty, "")),
            (empty, String::new())
        );
    }

    fn delivery(headers: Bytes) -> QueueDelivery {
        QueueDelivery {
            id: MessageId {
                queue: Arc::from("jobs"),
                partition: 3,
                offset: 41,
            },
            group: GroupKey::new("g", None),
            delivery_count: 2,
            subtopic: "dev/1".into(),
            headers,
            payload: Bytes::from_static(b"work"),
            timestamp_ms: 0,
            dead_letter: None,
        }
    }

    /// A 5.0 consumer gets the message's own properties and the queue's user
    /// properties; a 3.1.1 consumer (which cannot receive properties) gets the same
    /// message and settles it the same way, without them being built.
    #[test]
    fn deliveries_carry_properties_only_for_v5_consumers() {
        let (sender, _mailbox) = crate::mailbox::mailbox::<Delivery, Control>(4);
        let filter = parse_filter("$share/g/$queue/jobs", None).expect("queue filter");
        let props = Properties {
            content_type: Some("text/plain".into()),
            ..Properties::default()
        };
        let stored = encode_headers(&props, "");
        let v5 = QueueSink::new(
            sender.downgrade(),
            &filter,
            QoS::AtLeastOnce,
            None,
            ProtocolVersion::V5,
        );
        let d = to_delivery(delivery(stored.clone()), &v5);
        assert_eq!(d.msg.topic, "$queue/jobs");
        assert_eq!(d.msg.payload, Bytes::from_static(b"work"));
        assert_eq!(d.msg.properties.content_type.as_deref(), Some("text/plain"));
        let user: Vec<(&str, &str)> = d
            .msg
            .properties
            .user_properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            user,
            [
                ("queue", "jobs"),
                ("partition", "3"),
                ("offset", "41"),
                ("message-id", "jobs:3:41"),
                ("delivery-count", "2"),
                ("topic", "$queue/jobs/dev/1"),
            ]
        );
        let v3 = QueueSink::new(
            sender.downgrade(),
            &filter,
            QoS::AtLeastOnce,
            None,
            ProtocolVersion::V3_1_1,
        );
        let d3 = to_delivery(delivery(stored), &v3);
        assert_eq!(d3.msg.topic, "$queue/jobs");
        assert_eq!(d3.msg.payload, Bytes::from_static(b"work"));
        assert_eq!(d3.msg.properties, Properties::default());
        assert_eq!(d3.queue, d.queue);
    }

    #[test]
    fn headers_round_trip() {
        let props = Properties {
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            content_type: Some("text/plain".into()),
            correlation_data: Some(Bytes::from_static(b"c")),
            ..Properties::default()
        };
        assert_eq!(
            decode_headers(&encode_headers(&props, "")),
            (props.clone(), String::new())
        );
        assert_eq!(
            decode_headers(&encode_headers(&props, "a/b")),
            (props, "a/b".to_owned())
        );
    }
}
