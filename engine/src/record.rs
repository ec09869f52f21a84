//! The bytes of durable records: sessions, queued and in-flight messages, retained
//! messages. What a [`crate::store::SessionStore`] writes and reads back at startup.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use roost_core::codec::{self, PublishView};
use roost_core::{
    LastWill, Message, Packet, PacketId, ProtocolVersion, QoS, RetainHandling, SubscriptionOptions,
};

use crate::session::{Delivery, Inflight, QueuedBytes, Session, ShareRef, SubscriptionRecord};
use crate::store::InflightState;

/// A session as found on disk at startup.
#[derive(Debug)]
pub struct StoredSession {
    /// The session, with its queue and in-flight messages in their original order.
    pub session: Session,
    /// True when the client was connected when roost stopped (crash or kill).
    pub connected: bool,
    /// Wall-clock time of disconnection, ms since the epoch (0 if connected).
    pub disconnected_at_ms: u64,
    /// The will (of the live connection if `connected`, else one awaiting its delay).
    pub will: Option<LastWill>,
}

/// Everything loaded at startup.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Stored sessions.
    pub sessions: Vec<StoredSession>,
    /// Retained messages (expired ones already left out).
    pub retained: Vec<Message>,
    /// The next free entry sequence number.
    pub next_seq: u64,
    /// What could not be decoded and was deleted, one line each, for the log.
    pub dropped: Vec<String>,
}

// ----- loading -----

/// What became of one stored record at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Taken into the loaded state.
    Kept,
    /// Not needed any more (left behind by a session that is gone, or expired): the
    /// store deletes it, silently.
    Stale,
    /// Cannot be decoded: the store deletes it (what was lost is in
    /// [`Loaded::dropped`], for the log).
    Damaged,
}

/// The rules of loading stored records into sessions and retained messages at startup,
/// for any store: it hands the records in, kind by kind (sessions first, then the
/// in-flight states, then the queued messages in sequence order, then the rest), and
/// deletes what [`Read`] says is not kept. Queued messages join their session's
/// in-flight list when they have an in-flight state, else its queue, in order.
#[derive(Debug)]
pub struct Loader {
    now: Instant,
    now_ms: u64,
    sessions: HashMap<Arc<str>, StoredSession>,
    states: HashMap<(Arc<str>, u64), (PacketId, InflightState)>,
    max_seq: u64,
    loaded: Loaded,
    /// What the loaded session queues are charged to until the broker takes them over
    /// ([`crate::session::Pending::charge_to`]).
    queued: Arc<QueuedBytes>,
}

impl Default for Loader {
    fn default() -> Self {
        Loader::new()
    }
}

impl Loader {
    /// A loader reading times against now.
    pub fn new() -> Loader {
        Loader {
            now: crate::clock::now(),
            now_ms: unix_ms(),
            sessions: HashMap::new(),
            states: HashMap::new(),
            max_seq: 0,
            loaded: Loaded::default(),
            queued: Arc::default(),
        }
    }

    /// A session record of `client`.
    pub fn session(&mut self, client: &str, value: &[u8]) -> Read {
        match decode_session(client, value, self.now, self.now_ms) {
            Some(s) => {
                self.sessions.insert(s.session.client_id.clone(), s);
                Read::Kept
            }
            None => self.damaged(format!("session record {client:?}: cannot be decoded")),
        }
    }

    /// The in-flight state of `client`'s queued message `seq`.
    pub fn inflight(&mut self, client: &str, seq: u64, packet_id: PacketId, state: InflightState) {
        self.states.insert((client.into(), seq), (packet_id, state));
    }

    /// `client`'s queued message `seq`.
    pub fn entry(&mut self, client: &str, seq: u64, value: &[u8]) -> Read {
        self.max_seq = self.max_seq.max(seq);
        let Some(stored) = self.sessions.get_mut(client) else {
            return Read::Stale;
        };
        let Some(mut delivery) = decode_entry(value, self.now, self.now_ms) else {
            return self.damaged(format!(
                "queued message {seq} of session {client:?}: cannot be decoded"
            ));
        };
        delivery.seq = Some(seq);
        match self.states.get(&(stored.session.client_id.clone(), seq)) {
            Some(&(packet_id, state)) => stored.session.inflight.push_back(Inflight {
                packet_id,
                delivery,
                state,
            }),
            None => stored.session.pending.push_back(delivery, &self.queued),
        }
        Read::Kept
    }

    /// An inbound QoS 2 packet id of `client` awaiting PUBREL.
    pub fn inbound(&mut self, client: &str, packet_id: PacketId) -> Read {
        match self.sessions.get_mut(client) {
            Some(stored) => {
                stored.session.incoming_qos2.insert(packet_id);
                Read::Kept
            }
            None => Read::Stale,
        }
    }

    /// The retained message of `topic`.
    pub fn retained(&mut self, topic: &str, value: &[u8]) -> Read {
        match decode_retained(value, self.now, self.now_ms) {
            Some(m) if !m.is_expired(self.now) => {
                self.loaded.retained.push(m);
                Read::Kept
            }
            Some(_) => Read::Stale,
            None => self.damaged(format!("retained message on {topic:?}: cannot be decoded")),
        }
    }

    /// Notes a damaged record (`line` says which, for the log).
    pub fn damaged(&mut self, line: String) -> Read {
        self.loaded.dropped.push(line);
        Read::Damaged
    }

    /// What was loaded, with the damaged records in `dropped`.
    pub fn finish(mut self) -> Loaded {
        self.loaded.next_seq = self.max_seq + 1;
        self.loaded.sessions = self.sessions.into_values().collect();
        self.loaded
    }
}

// ----- encodings -----
//
// Every record starts with a format version byte (1). Strings and byte strings are a
// u16 big-endian length then the bytes; messages are an MQTT 5.0 PUBLISH packet as
// the codec writes it, preceded by the time of receipt and the publisher's id.

const FORMAT: u8 = 1;

/// The bit of a subscription's options byte that says its consumer group follows the
/// identifier (records written before the group was kept have it clear, and read the same).
const GROUP_FOLLOWS: u8 = 6;

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock time (ms since the epoch) of a monotonic instant in the past.
pub fn instant_to_unix_ms(at: Instant) -> u64 {
    let age = crate::clock::now().saturating_duration_since(at);
    unix_ms().saturating_sub(age.as_millis() as u64)
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s[..usize::from(len)]);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// Encodes a message (topic, payload, QoS, retain, properties, receipt time, publisher).
pub fn encode_message(msg: &Message, out: &mut Vec<u8>) {
    out.extend_from_slice(&instant_to_unix_ms(msg.received_at).to_be_bytes());
    match &msg.publisher {
        Some(p) => {
            out.push(1);
            put_str(out, p.as_bytes());
        }
        None => out.push(0),
    }
    let view = PublishView {
        dup: false,
        qos: msg.qos,
        retain: msg.retain,
        topic: &msg.topic,
        packet_id: 1,
        properties: &msg.properties,
        subscription_identifiers: &[],
        message_expiry_interval: msg.properties.message_expiry_interval,
        topic_alias: None,
        payload: &msg.payload,
    };
    let mut buf = BytesMut::new();
    // A message we accepted always re-encodes (its fields came through the decoder).
    let _ = codec::encode_publish(&view, ProtocolVersion::V5, &mut buf);
    out.extend_from_slice(&buf);
}

/// Reads a retained message record written by [`encode_retained`]; `None` if damaged.
pub fn decode_retained(value: &[u8], now: Instant, now_ms: u64) -> Option<Message> {
    decode_message(&mut Reader(value), now, now_ms)
}

fn decode_message(r: &mut Reader<'_>, now: Instant, now_ms: u64) -> Option<Message> {
    let received_ms = r.u64()?;
    let publisher = match r.u8()? {
        0 => None,
        _ => Some(Arc::<str>::from(r.str()?)),
    };
    let mut buf = BytesMut::from(r.rest());
    let Ok(Some(Packet::Publish(p))) =
        codec::decode(&mut buf, Some(ProtocolVersion::V5), usize::MAX)
    else {
        return None;
    };
    let age = Duration::from_millis(now_ms.saturating_sub(received_ms));
    Some(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: p.properties,
        publisher,
        received_at: now.checked_sub(age).unwrap_or(now),
    })
}

/// Encodes a queued delivery (per-subscriber fields, then the message).
pub fn encode_entry(d: &Delivery) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + d.msg.payload.len() + d.msg.topic.len());
    out.push(FORMAT);
    out.push(d.qos as u8);
    out.push(u8::from(d.retain));
    out.extend_from_slice(&(d.subscription_ids.len() as u16).to_be_bytes());
    for id in &d.subscription_ids {
        out.extend_from_slice(&id.to_be_bytes());
    }
    match &d.share {
        Some(s) => {
            out.push(1);
            put_str(&mut out, s.group.as_bytes());
            put_str(&mut out, s.filter.as_bytes());
        }
        None => out.push(0),
    }
    encode_message(&d.msg, &mut out);
    out
}

/// Reads a queued message record written by [`encode_entry`]; `None` if it is damaged.
/// `now` and `now_ms` (the same moment) turn its time of receipt into an [`Instant`].
pub fn decode_entry(value: &[u8], now: Instant, now_ms: u64) -> Option<Delivery> {
    let mut r = Reader(value);
    if r.u8()? != FORMAT {
        return None;
    }
    let qos = QoS::from_u8(r.u8()?)?;
    let retain = r.u8()? != 0;
    let n = r.u16()?;
    let subscription_ids = (0..n).map(|_| r.u32()).collect::<Option<Box<[u32]>>>()?;
    let share = match r.u8()? {
        0 => None,
        _ => Some(Arc::new(ShareRef {
            group: r.str()?.into(),
            filter: r.str()?.into(),
        })),
    };
    let msg = decode_message(&mut r, now, now_ms)?;
    Some(Delivery {
        msg: Arc::new(msg),
        qos,
        retain,
        subscription_ids,
        share,
        seq: None,
        queue: None,
    })
}

/// Encodes a retained message.
pub fn encode_retained(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + msg.payload.len() + msg.topic.len());
    encode_message(msg, &mut out);
    out
}

/// Encodes a session record.
pub fn encode_session(session: &Session, connected: bool, will: Option<&LastWill>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT);
    out.extend_from_slice(&session.expiry_interval.to_be_bytes());
    out.push(u8::from(connected));
    out.extend_from_slice(&unix_ms().to_be_bytes());
    out.extend_from_slice(&(session.subscriptions.len() as u32).to_be_bytes());
    for (filter, record) in &session.subscriptions {
        put_str(&mut out, filter.as_bytes());
        let o = record.options;
        let options = (o.qos as u8)
            | (u8::from(o.no_local) << 2)
            | (u8::from(o.retain_as_published) << 3)
            | ((o.retain_handling as u8) << 4)
            | (u8::from(record.consumer_group.is_some()) << GROUP_FOLLOWS);
        out.push(options);
        match record.identifier {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.to_be_bytes());
            }
            None => out.push(0),
        }
        if let Some(group) = &record.consumer_group {
            put_str(&mut out, group.as_bytes());
        }
    }
    match will {
        Some(w) => {
            out.push(1);
            let msg = Message {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                properties: w.properties.clone(),
                publisher: None,
                received_at: crate::clock::now(),
            };
            // The will delay is not a PUBLISH property: keep it beside the message.
            out.extend_from_slice(&w.properties.will_delay_interval.unwrap_or(0).to_be_bytes());
            encode_message(&msg, &mut out);
        }
        None => out.push(0),
    }
    out
}

/// Reads `client`'s session record written by [`encode_session`]; `None` if damaged.
pub fn decode_session(
    client: &str,
    value: &[u8],
    now: Instant,
    now_ms: u64,
) -> Option<StoredSession> {
    let mut r = Reader(value);
    if r.u8()? != FORMAT {
        return None;
    }
    let expiry = r.u32()?;
    let connected = r.u8()? != 0;
    let disconnected_at_ms = r.u64()?;
    let mut session = Session::new(client.into());
    session.expiry_interval = expiry;
    for _ in 0..r.u32()? {
        let filter = r.str()?.to_owned();
        let b = r.u8()?;
        let options = SubscriptionOptions {
            qos: QoS::from_u8(b & 0b11)?,
            no_local: b & 0b100 != 0,
            retain_as_published: b & 0b1000 != 0,
            retain_handling: match (b >> 4) & 0b11 {
                0 => RetainHandling::SendAtSubscribe,
                1 => RetainHandling::SendIfNew,
                2 => RetainHandling::DoNotSend,
                _ => return None,
            },
        };
        let identifier = match r.u8()? {
            0 => None,
            _ => Some(r.u32()?),
        };
        let consumer_group = match b >> GROUP_FOLLOWS & 1 {
            1 => Some(Arc::from(r.str()?)),
            _ => None,
        };
        session.subscriptions.insert(
            filter,
            SubscriptionRecord {
                options,
                identifier,
                consumer_group,
            },
        );
    }
    let will = match r.u8()? {
        0 => None,
        _ => {
            let delay = r.u32()?;
            let m = decode_message(&mut r, now, now_ms)?;
            let mut properties = m.properties;
            properties.will_delay_interval = (delay > 0).then_some(delay);
            Some(LastWill {
                topic: m.topic,
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                properties,
            })
        }
    };
    Some(StoredSession {
        session,
        connected,
        disconnected_at_ms: if connected { 0 } else { disconnected_at_ms },
        will,
    })
}

// ----- a session moving to another node -----

/// Encodes a whole session (its record, in-flight and queued messages in order, and
/// the inbound QoS 2 ids) for another node, which reads it with [`decode_transfer`]:
/// the same records the store holds, in one buffer, so a moved session is read back
/// by the same rules as one loaded at startup.
pub fn encode_transfer(session: &Session) -> Vec<u8> {
    fn frame(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
        out.push(kind);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut out = Vec::new();
    out.push(FORMAT);
    frame(
        &mut out,
        b'S',
        &encode_session(session, false, session.pending_will.as_deref()),
    );
    for f in &session.inflight {
        let mut body = Vec::new();
        body.extend_from_slice(&f.packet_id.to_be_bytes());
        body.push(match f.state {
            InflightState::Published => 0,
            InflightState::Released => 1,
        });
        body.extend_from_slice(&encode_entry(&f.delivery));
        frame(&mut out, b'F', &body);
    }
    for i in 0..session.pending.len() {
        frame(&mut out, b'Q', &encode_entry(&session.pending[i]));
    }
    for id in &session.incoming_qos2 {
        frame(&mut out, b'I', &id.to_be_bytes());
    }
    out
}

/// Reads a session written by [`encode_transfer`] for `client`; `None` if it is
/// damaged (or names no session). Its deliveries' store keys are the buffer's own,
/// to be replaced by the receiving node's ([`crate::broker::Broker::adopt`]).
pub fn decode_transfer(client: &str, value: &[u8]) -> Option<StoredSession> {
    let mut r = Reader(value);
    if r.u8()? != FORMAT {
        return None;
    }
    let mut loader = Loader::new();
    let mut seq = 0u64;
    while !r.0.is_empty() {
        let kind = r.u8()?;
        let n = r.u32()? as usize;
        let body = r.take(n)?;
        let read = match kind {
            b'S' => loader.session(client, body),
            b'F' => {
                let mut b = Reader(body);
                let packet_id = b.u16()?;
                let state = match b.u8()? {
                    0 => InflightState::Published,
                    _ => InflightState::Released,
                };
                seq += 1;
                loader.inflight(client, seq, packet_id, state);
                loader.entry(client, seq, b.rest())
            }
            b'Q' => {
                seq += 1;
                loader.entry(client, seq, body)
            }
            b'I' => loader.inbound(client, u16::from_be_bytes(body.try_into().ok()?)),
            _ => return None,
        };
        if read != Read::Kept {
            return None;
        }
    }
    loader.finish().sessions.pop()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use roost_core::Properties;

    fn payload_of(d: &Delivery) -> Bytes {
        d.msg.payload.clone()
    }

    fn message(topic: &str, payload: &'static [u8]) -> Message {
        let properties = Properties {
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            message_expiry_interval: Some(100),
            ..Properties::default()
        };
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties,
            publisher: Some("pub".into()),
            received_at: Instant::now(),
        }
    }

    fn delivery(payload: &'static [u8]) -> Delivery {
        Delivery {
            msg: Arc::new(message("t/x", payload)),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![3, 9].into(),
            share: Some(Arc::new(ShareRef {
                group: "g".into(),
                filter: "t/+".into(),
            })),
            seq: None,
            queue: None,
        }
    }

    #[test]
    fn entry_round_trip() {
        let d = delivery(b"payload");
        let back = decode_entry(&encode_entry(&d), Instant::now(), unix_ms()).expect("decodes");
        assert_eq!(back.qos, d.qos);
        assert_eq!(back.subscription_ids, d.subscription_ids);
        assert_eq!(back.share, d.share);
        assert_eq!(back.msg.topic, "t/x");
        assert_eq!(payload_of(&back), "payload");
        assert_eq!(
            back.msg.properties.user_properties,
            d.msg.properties.user_properties
        );
        assert_eq!(back.msg.publisher.as_deref(), Some("pub"));
        assert!(
            back.msg
                .remaining_expiry(Instant::now())
                .is_some_and(|s| s > 95)
        );
        assert!(decode_entry(&encode_entry(&d)[..20], Instant::now(), unix_ms()).is_none());
    }

    #[test]
    fn a_moved_session_reads_back_whole() {
        let mut s = Session::new("mover".into());
        s.expiry_interval = 300;
        s.subscriptions.insert(
            "a/+".into(),
            SubscriptionRecord {
                options: SubscriptionOptions::default(),
                identifier: Some(4),
                consumer_group: None,
            },
        );
        s.inflight.push_back(Inflight {
            packet_id: 7,
            delivery: delivery(b"in flight"),
            state: InflightState::Released,
        });
        let account = Arc::new(crate::session::QueuedBytes::new(0));
        s.pending.push_back(delivery(b"queued 1"), &account);
        s.pending.push_back(delivery(b"queued 2"), &account);
        s.incoming_qos2.insert(42);
        s.pending_will = Some(Box::new(LastWill {
            topic: "w".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties {
                will_delay_interval: Some(30),
                ..Properties::default()
            },
        }));
        let bytes = encode_transfer(&s);
        let stored = decode_transfer("mover", &bytes).expect("decodes");
        assert_eq!(
            stored
                .will
                .as_ref()
                .map(|w| (w.topic.as_str(), w.properties.will_delay_interval)),
            Some(("w", Some(30)))
        );
        let back = stored.session;
        assert_eq!(back.expiry_interval, 300);
        assert_eq!(back.subscriptions.len(), 1);
        assert_eq!(back.inflight.len(), 1);
        assert_eq!(back.inflight[0].packet_id, 7);
        assert_eq!(back.inflight[0].state, InflightState::Released);
        assert_eq!(payload_of(&back.inflight[0].delivery), "in flight");
        let queued: Vec<Bytes> = (0..back.pending.len())
            .map(|i| payload_of(&back.pending[i]))
            .collect();
        assert_eq!(queued, ["queued 1", "queued 2"]);
        assert!(back.incoming_qos2.contains(&42));
        // Damage anywhere is refused, never half-read.
        for cut in [1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                decode_transfer("mover", &bytes[..cut]).is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn session_round_trip() {
        let mut s = Session::new("c".into());
        s.expiry_interval = 77;
        s.subscriptions.insert(
            "$share/g/a/+".into(),
            SubscriptionRecord {
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
                identifier: Some(12),
                consumer_group: Some("billing".into()),
            },
        );
        let mut will = LastWill {
            topic: "w".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        };
        will.properties.will_delay_interval = Some(5);
        let bytes = encode_session(&s, false, Some(&will));
        let back = decode_session("c", &bytes, Instant::now(), unix_ms()).expect("decodes");
        assert_eq!(back.session.expiry_interval, 77);
        assert_eq!(back.session.subscriptions, s.subscriptions);
        assert!(!back.connected);
        assert!(back.disconnected_at_ms > 0);
        assert_eq!(back.will, Some(will));
    }
}
