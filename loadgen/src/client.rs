//! The lean MQTT client: one connection's protocol state, with no I/O.
//!
//! Bytes read from the socket are appended to `rbuf` and handed to
//! [`Client::process`]; whatever the client must send (acks, publishes, pings) is
//! appended to `wbuf` for the caller to write. Both buffers are owned by the client and
//! reused for the whole run, so the steady state allocates nothing per message:
//!
//! - a publish is encoded with [`encode_publish`] from a payload template shared by all
//!   messages of a publisher, and the stamp (send time, publisher, sequence) is then
//!   written over the payload's first bytes in the write buffer;
//! - a received PUBLISH is parsed in place (fixed header, topic, packet id, v5
//!   properties skipped) because the codec's owned `Publish` would allocate its topic;
//!   every other packet goes through the codec's [`decode`], which for acks allocates
//!   nothing.
//!
//! Invariant: a publisher's packet ids are slots of a fixed table; a slot is busy from
//! the PUBLISH until its PUBACK (QoS 1) or PUBCOMP (QoS 2), and at most `inflight_max`
//! are busy at once.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use hdrhistogram::Histogram;
use roost_core::codec::{DecodeError, PublishView, decode, encode, encode_publish};
use roost_core::{
    Connect, Disconnect, Packet, ProtocolVersion, PubResponse, QoS, ReasonCode, Subscribe,
    SubscriptionOptions,
};

use crate::pacer::Pacer;
use crate::stamp::{STAMP_LEN, Stamp};
use crate::stats::{Seen, SeqTracker, new_histogram};

/// Largest packet accepted from the broker.
const MAX_PACKET: usize = 256 * 1024 * 1024 + 64 * 1024;
/// Publisher ids at or above this are not tracked (a foreign or garbled stamp).
const MAX_TRACKED_PUBLISHERS: u32 = 1 << 16;

/// Why a connection ended or could not start; the key of the error report.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientError {
    /// CONNACK with an error code.
    Refused(ReasonCode),
    /// SUBACK with a failure code.
    SubscribeRefused(ReasonCode),
    /// The broker sent DISCONNECT (5.0).
    Disconnected(ReasonCode),
    /// The broker closed the connection.
    Closed,
    /// The broker's bytes do not decode.
    Decode(DecodeError),
    /// The broker broke the protocol in a way the decoder does not see.
    Protocol(&'static str),
}

impl ClientError {
    /// A stable description used to count errors by kind.
    pub fn kind(&self) -> String {
        let code = |rc: &ReasonCode| format!("{:#04x} {rc:?}", rc.as_u8());
        match self {
            ClientError::Refused(rc) => format!("connect refused: CONNACK {}", code(rc)),
            ClientError::SubscribeRefused(rc) => {
                format!("subscribe refused: SUBACK {}", code(rc))
            }
            ClientError::Disconnected(rc) => {
                format!("disconnected by broker: DISCONNECT {}", code(rc))
            }
            ClientError::Closed => "connection closed by broker".into(),
            ClientError::Decode(e) => format!("bad packet from broker: {e}"),
            ClientError::Protocol(why) => format!("protocol error: {why}"),
        }
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Decode(e)
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// CONNECT sent.
    AwaitConnAck,
    /// SUBSCRIBE sent.
    AwaitSubAck,
    /// Handshake done: traffic flows.
    Ready,
}

/// Per worker task counters and histograms, flushed to the shared totals periodically.
#[derive(Debug)]
pub struct Tally {
    /// Publishes written.
    pub sent: u64,
    /// PUBACK/PUBCOMP received (successful).
    pub acked: u64,
    /// PUBLISH received by subscribers (duplicates included).
    pub delivered: u64,
    /// Publishes written while the measured window was open.
    pub measured_sent: u64,
    /// Acknowledgements received while the measured window was open.
    pub measured_acked: u64,
    /// Deliveries received while the measured window was open.
    pub measured_delivered: u64,
    /// End-to-end latency (ns) of first deliveries sent inside the measured window.
    pub latency: Histogram<u64>,
    /// PUBLISH to PUBACK/PUBCOMP time (ns) inside the measured window.
    pub ack_latency: Histogram<u64>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Only messages sent in `[window.0, window.1)` are recorded in the histograms.
    pub window: (u64, u64),
    /// Whether stamps come from this process's clock (not in `sub`, whose publishers
    /// are elsewhere): only then is end-to-end latency meaningful.
    pub timed: bool,
}

impl Tally {
    /// An empty tally that records nothing until its window is set.
    pub fn new() -> Tally {
        Tally {
            sent: 0,
            acked: 0,
            delivered: 0,
            measured_sent: 0,
            measured_acked: 0,
            measured_delivered: 0,
            latency: new_histogram(),
            ack_latency: new_histogram(),
            errors: BTreeMap::new(),
            window: (u64::MAX, u64::MAX),
            timed: true,
        }
    }

    /// A tally for a connection handshake, which records no latency: small, because
    /// there is one per connection being opened.
    pub fn for_handshake() -> Tally {
        let tiny =
            || Histogram::new_with_bounds(1, 2, 0).unwrap_or_else(|_| unreachable!("valid bounds"));
        Tally {
            sent: 0,
            acked: 0,
            delivered: 0,
            measured_sent: 0,
            measured_acked: 0,
            measured_delivered: 0,
            latency: tiny(),
            ack_latency: tiny(),
            errors: BTreeMap::new(),
            window: (u64::MAX, u64::MAX),
            timed: true,
        }
    }

    /// Counts one error of `kind`.
    pub fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    fn in_window(&self, sent_ns: u64) -> bool {
        sent_ns >= self.window.0 && sent_ns < self.window.1
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally::new()
    }
}

/// A connection's purpose.
#[derive(Debug)]
pub enum Role {
    /// Connects and keeps the connection alive (`conn`).
    Idle,
    /// Publishes stamped messages.
    Publisher(Box<Publisher>),
    /// Subscribes and accounts for what arrives.
    Subscriber(Box<Subscriber>),
}

/// Publishing state.
#[derive(Debug)]
pub struct Publisher {
    /// The publisher id written into every stamp (dense from 0 in a run).
    pub id: u32,
    /// Topic published to.
    pub topic: String,
    /// Publish QoS.
    pub qos: QoS,
    /// Payload template: zeros; the stamp is written over its copy in `wbuf`.
    payload: Bytes,
    /// Empty properties, kept so encoding borrows rather than builds them.
    props: roost_core::Properties,
    /// Next sequence number.
    pub next_seq: u32,
    /// Publishes written.
    pub sent: u64,
    /// Publishes acknowledged (QoS 1/2).
    pub acked: u64,
    /// Stop after this many (from --count).
    pub limit: Option<u64>,
    /// This publisher's share of --rate in messages per second; `None`: unbounded.
    pub rate: Option<f64>,
    /// The schedule for `rate`, made when publishing starts.
    pub pacer: Option<Pacer>,
    /// Send time + 1 per packet id slot (0: free); index = packet id - 1.
    slots: Vec<u64>,
    next_slot: usize,
    /// Busy slots.
    pub inflight: u16,
    /// Most busy slots allowed (--inflight, capped by the broker's Receive Maximum).
    pub inflight_max: u16,
}

impl Publisher {
    /// A publisher with id `id` sending `size`-byte payloads to `topic`.
    pub fn new(id: u32, topic: String, qos: QoS, size: usize, inflight_max: u16) -> Publisher {
        let slots = if qos == QoS::AtMostOnce {
            0
        } else {
            (usize::from(inflight_max) * 4).clamp(256, 65535)
        };
        Publisher {
            id,
            topic,
            qos,
            payload: Bytes::from(vec![0u8; size.max(STAMP_LEN)]),
            props: roost_core::Properties::default(),
            next_seq: 0,
            sent: 0,
            acked: 0,
            limit: None,
            rate: None,
            pacer: None,
            slots: vec![0; slots],
            next_slot: 0,
            inflight: 0,
            inflight_max,
        }
    }

    /// Roughly the encoded size of one publish, for sizing write batches.
    pub fn approx_packet_len(&self) -> usize {
        self.payload.len() + self.topic.len() + 10
    }

    /// Whether the count limit has been reached.
    pub fn done(&self) -> bool {
        self.limit.is_some_and(|l| self.sent >= l)
    }

    /// How many more publishes may be written now, ignoring the pacer.
    pub fn room(&self) -> u64 {
        let left = self.limit.map_or(u64::MAX, |l| l.saturating_sub(self.sent));
        if self.qos == QoS::AtMostOnce {
            return left;
        }
        if self.slots.get(self.next_slot).is_none_or(|&s| s != 0) {
            return 0;
        }
        left.min(u64::from(self.inflight_max.saturating_sub(self.inflight)))
    }

    /// Appends one stamped PUBLISH to `wbuf`.
    fn publish(&mut self, now_ns: u64, version: ProtocolVersion, wbuf: &mut BytesMut) -> bool {
        let packet_id = if self.qos == QoS::AtMostOnce {
            0
        } else {
            self.slots[self.next_slot] = now_ns + 1;
            let id = self.next_slot as u16 + 1;
            self.next_slot = (self.next_slot + 1) % self.slots.len();
            self.inflight += 1;
            id
        };
        let view = PublishView {
            dup: false,
            qos: self.qos,
            retain: false,
            topic: &self.topic,
            packet_id,
            properties: &self.props,
            subscription_identifiers: &[],
            message_expiry_interval: None,
            topic_alias: None,
            payload: &self.payload,
        };
        if encode_publish(&view, version, wbuf).is_err() {
            return false;
        }
        let start = wbuf.len() - self.payload.len();
        Stamp {
            sent_ns: now_ns,
            publisher: self.id,
            seq: self.next_seq,
        }
        .write(&mut wbuf[start..]);
        self.next_seq = self.next_seq.wrapping_add(1);
        self.sent += 1;
        true
    }

    /// Frees the slot of `packet_id`; returns its send time.
    fn settle(&mut self, packet_id: u16) -> Option<u64> {
        let slot = self.slots.get_mut(usize::from(packet_id).checked_sub(1)?)?;
        let sent = slot.checked_sub(1)?;
        *slot = 0;
        self.inflight = self.inflight.saturating_sub(1);
        Some(sent)
    }

    fn is_busy(&self, packet_id: u16) -> bool {
        usize::from(packet_id)
            .checked_sub(1)
            .and_then(|i| self.slots.get(i))
            .is_some_and(|&s| s != 0)
    }
}

/// Subscribing state.
#[derive(Debug)]
pub struct Subscriber {
    /// Topic filter subscribed to.
    pub filter: String,
    /// Subscription QoS.
    pub qos: QoS,
    /// The audience this subscriber belongs to (itself, or its shared group).
    pub audience: usize,
    /// Sequence numbers seen, by publisher id.
    pub trackers: Vec<SeqTracker>,
    /// Deliveries without a usable stamp.
    pub foreign: u64,
}

impl Subscriber {
    /// A subscriber to `filter` in `audience`.
    pub fn new(filter: String, qos: QoS, audience: usize) -> Subscriber {
        Subscriber {
            filter,
            qos,
            audience,
            trackers: Vec::new(),
            foreign: 0,
        }
    }
}

/// One connection's protocol state and buffers.
#[derive(Debug)]
pub struct Client {
    /// Protocol version of this connection.
    pub version: ProtocolVersion,
    /// Bytes read and not yet processed.
    pub rbuf: BytesMut,
    /// Bytes to write.
    pub wbuf: BytesMut,
    /// Handshake progress.
    pub state: State,
    /// What the connection is for.
    pub role: Role,
    /// Keep-alive in seconds (the broker's Server Keep Alive wins in 5.0).
    pub keep_alive: u16,
    /// When bytes were last written, for keep-alive.
    pub last_write_ns: u64,
    /// How much to reserve before a read: grows when reads fill it, so idle
    /// connections stay small and busy ones read in large batches.
    pub read_chunk: usize,
    client_id: String,
    clean_start: bool,
}

impl Client {
    /// A client that has not connected yet.
    pub fn new(version: ProtocolVersion, client_id: String, keep_alive: u16, role: Role) -> Self {
        Client {
            version,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            state: State::AwaitConnAck,
            role,
            keep_alive,
            last_write_ns: 0,
            read_chunk: 512,
            client_id,
            clean_start: true,
        }
    }

    /// Queues CONNECT.
    pub fn start(&mut self) {
        let connect = Connect {
            protocol: self.version,
            clean_start: self.clean_start,
            keep_alive: self.keep_alive,
            client_id: self.client_id.clone(),
            ..Default::default()
        };
        self.queue(&Packet::Connect(Box::new(connect)));
        self.state = State::AwaitConnAck;
    }

    /// Queues DISCONNECT (normal disconnection).
    pub fn disconnect(&mut self) {
        self.queue(&Packet::Disconnect(Disconnect::default()));
    }

    /// Queues PINGREQ.
    pub fn ping(&mut self) {
        self.queue(&Packet::PingReq);
    }

    fn queue(&mut self, p: &Packet) {
        // Encoding fails only for oversized fields, which roost-bench never builds.
        let _ = encode(p, self.version, &mut self.wbuf);
    }

    fn queue_ack(&mut self, p: Packet) {
        self.queue(&p);
    }

    /// The publisher state, if this connection publishes.
    pub fn publisher(&mut self) -> Option<&mut Publisher> {
        match &mut self.role {
            Role::Publisher(p) => Some(p),
            _ => None,
        }
    }

    /// Writes up to `n` publishes into `wbuf`; returns how many.
    pub fn publish(&mut self, n: u64, now_ns: u64, tally: &mut Tally) -> u64 {
        let version = self.version;
        let Role::Publisher(p) = &mut self.role else {
            return 0;
        };
        let mut done = 0;
        while done < n && p.room() > 0 {
            if !p.publish(now_ns, version, &mut self.wbuf) {
                tally.error("publish could not be encoded".into());
                break;
            }
            done += 1;
        }
        tally.sent += done;
        if tally.in_window(now_ns) {
            tally.measured_sent += done;
        }
        done
    }

    /// Processes every complete packet in `rbuf` (received at `now_ns`). With
    /// `handshake`, stops as soon as the handshake completes, leaving later packets for
    /// the worker that will own the connection.
    pub fn process(
        &mut self,
        now_ns: u64,
        tally: &mut Tally,
        handshake: bool,
    ) -> Result<(), ClientError> {
        loop {
            if handshake && self.state == State::Ready {
                return Ok(());
            }
            let Some((first, header_len, total)) = frame(&self.rbuf)? else {
                return Ok(());
            };
            if first >> 4 == 3 {
                let (qos, packet_id, payload) =
                    parse_publish(&self.rbuf[..total], first, header_len, self.version)?;
                let stamp = Stamp::read(&self.rbuf[payload]);
                self.rbuf.advance(total);
                self.on_publish(qos, packet_id, stamp, now_ns, tally);
                continue;
            }
            match decode(&mut self.rbuf, Some(self.version), MAX_PACKET)? {
                Some(packet) => self.on_packet(packet, now_ns, tally)?,
                None => return Ok(()),
            }
        }
    }

    fn on_publish(
        &mut self,
        qos: QoS,
        packet_id: u16,
        stamp: Option<Stamp>,
        now_ns: u64,
        tally: &mut Tally,
    ) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue_ack(Packet::PubAck(PubResponse::new(packet_id))),
            QoS::ExactlyOnce => self.queue_ack(Packet::PubRec(PubResponse::new(packet_id))),
        }
        // A PUBLISH before SUBACK (an external publisher in `sub`) is acked but not
        // counted: the run has not started for this subscriber.
        let (State::Ready, Role::Subscriber(sub)) = (self.state, &mut self.role) else {
            return;
        };
        tally.delivered += 1;
        if tally.in_window(now_ns) {
            tally.measured_delivered += 1;
        }
        let Some(st) = stamp.filter(|s| s.publisher < MAX_TRACKED_PUBLISHERS) else {
            sub.foreign += 1;
            return;
        };
        let idx = st.publisher as usize;
        if sub.trackers.len() <= idx {
            sub.trackers.resize_with(idx + 1, SeqTracker::default);
        }
        if sub.trackers[idx].record(u64::from(st.seq)) == Seen::New
            && tally.timed
            && tally.in_window(st.sent_ns)
        {
            tally
                .latency
                .saturating_record(now_ns.saturating_sub(st.sent_ns).max(1));
        }
    }

    fn on_packet(
        &mut self,
        packet: Packet,
        now_ns: u64,
        tally: &mut Tally,
    ) -> Result<(), ClientError> {
        match packet {
            Packet::ConnAck(ack) => {
                if self.state != State::AwaitConnAck {
                    return Err(ClientError::Protocol("second CONNACK"));
                }
                if ack.code.is_error() {
                    return Err(ClientError::Refused(ack.code));
                }
                if let Some(k) = ack.properties.server_keep_alive {
                    self.keep_alive = k;
                }
                if let (Some(rm), Role::Publisher(p)) =
                    (ack.properties.receive_maximum, &mut self.role)
                {
                    p.inflight_max = p.inflight_max.min(rm.max(1));
                }
                match &self.role {
                    Role::Subscriber(sub) => {
                        let opts = SubscriptionOptions {
                            qos: sub.qos,
                            ..Default::default()
                        };
                        let s = Subscribe {
                            packet_id: 1,
                            filters: vec![(sub.filter.clone(), opts)],
                            properties: Default::default(),
                        };
                        self.queue(&Packet::Subscribe(s));
                        self.state = State::AwaitSubAck;
                    }
                    _ => self.state = State::Ready,
                }
            }
            Packet::SubAck(ack) => {
                if self.state != State::AwaitSubAck {
                    return Err(ClientError::Protocol("unexpected SUBACK"));
                }
                match ack.reasons.first() {
                    Some(rc) if rc.is_error() => return Err(ClientError::SubscribeRefused(*rc)),
                    Some(_) => self.state = State::Ready,
                    None => return Err(ClientError::Protocol("SUBACK without a reason code")),
                }
            }
            Packet::PubAck(r) => self.settle(r, now_ns, tally, true)?,
            Packet::PubRec(r) => {
                if r.reason.is_error() {
                    self.settle(r, now_ns, tally, false)?;
                } else {
                    let busy = self.publisher().is_some_and(|p| p.is_busy(r.packet_id));
                    if !busy {
                        return Err(ClientError::Protocol("PUBREC for an unknown packet id"));
                    }
                    self.queue_ack(Packet::PubRel(PubResponse::new(r.packet_id)));
                }
            }
            Packet::PubComp(r) => self.settle(r, now_ns, tally, true)?,
            Packet::PubRel(r) => self.queue_ack(Packet::PubComp(PubResponse::new(r.packet_id))),
            Packet::PingResp | Packet::UnsubAck(_) => {}
            Packet::Disconnect(d) => return Err(ClientError::Disconnected(d.reason)),
            Packet::Auth(_) => return Err(ClientError::Protocol("AUTH is not supported")),
            Packet::Connect(_)
            | Packet::Publish(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq => return Err(ClientError::Protocol("client packet from broker")),
        }
        Ok(())
    }

    fn settle(
        &mut self,
        r: PubResponse,
        now_ns: u64,
        tally: &mut Tally,
        final_ack: bool,
    ) -> Result<(), ClientError> {
        let Some(p) = self.publisher() else {
            return Err(ClientError::Protocol(
                "publish acknowledgement to a non-publisher",
            ));
        };
        let Some(sent_ns) = p.settle(r.packet_id) else {
            return Err(ClientError::Protocol(
                "acknowledgement for an unknown packet id",
            ));
        };
        if r.reason.is_error() {
            tally.error(format!(
                "publish rejected: {:#04x} {:?}",
                r.reason.as_u8(),
                r.reason
            ));
            return Ok(());
        }
        if final_ack {
            p.acked += 1;
            tally.acked += 1;
            if tally.in_window(now_ns) {
                tally.measured_acked += 1;
            }
            if tally.in_window(sent_ns) {
                tally
                    .ack_latency
                    .saturating_record(now_ns.saturating_sub(sent_ns).max(1));
            }
        }
        Ok(())
    }
}

/// Finds the first complete packet in `buf`: (first byte, fixed header length, total
/// length), or `None` until it is all there.
fn frame(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, ClientError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            let total = header + remaining;
            if total > MAX_PACKET {
                return Err(DecodeError::PacketTooLarge {
                    size: total,
                    max: MAX_PACKET,
                }
                .into());
            }
            return Ok((buf.len() >= total).then_some((first, header, total)));
        }
    }
    Err(DecodeError::MalformedPacket("remaining length over 4 bytes").into())
}

/// Reads a complete PUBLISH in place: QoS, packet id and the payload's byte range.
fn parse_publish(
    pkt: &[u8],
    first: u8,
    header_len: usize,
    version: ProtocolVersion,
) -> Result<(QoS, u16, Range<usize>), ClientError> {
    let bad = |why| ClientError::Decode(DecodeError::MalformedPacket(why));
    let qos = QoS::from_u8((first >> 1) & 3).ok_or(bad("PUBLISH with QoS 3"))?;
    let u16_at = |i: usize| -> Result<u16, ClientError> {
        match pkt.get(i..i + 2) {
            Some(&[a, b]) => Ok(u16::from_be_bytes([a, b])),
            _ => Err(bad("PUBLISH too short")),
        }
    };
    let mut at = header_len;
    let topic_len = usize::from(u16_at(at)?);
    at += 2 + topic_len;
    let mut packet_id = 0;
    if qos != QoS::AtMostOnce {
        packet_id = u16_at(at)?;
        if packet_id == 0 {
            return Err(bad("packet identifier 0"));
        }
        at += 2;
    }
    if version.is_v5() {
        let mut len = 0usize;
        let mut i = 0;
        loop {
            let b = *pkt.get(at).ok_or(bad("PUBLISH too short"))?;
            at += 1;
            len |= usize::from(b & 0x7F) << (7 * i);
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i == 4 {
                return Err(bad("property length over 4 bytes"));
            }
        }
        at += len;
    }
    if at > pkt.len() {
        return Err(bad("PUBLISH too short"));
    }
    Ok((qos, packet_id, at..pkt.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_core::{ConnAck, Properties, Publish, SubAck};

    fn broker_sends(c: &mut Client, p: Packet) {
        encode(&p, c.version, &mut c.rbuf).expect("encodes");
    }

    fn sent_by(c: &mut Client) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Some(p) = decode(&mut c.wbuf, Some(c.version), MAX_PACKET).expect("decodes") {
            out.push(p);
        }
        out
    }

    fn ready_publisher(v: ProtocolVersion, qos: QoS) -> Client {
        let p = Publisher::new(3, "t/x".into(), qos, 40, 2);
        let mut c = Client::new(v, "pub".into(), 30, Role::Publisher(Box::new(p)));
        c.start();
        c.wbuf.clear();
        broker_sends(&mut c, Packet::ConnAck(ConnAck::default()));
        c.process(0, &mut Tally::new(), true).expect("connack");
        assert_eq!(c.state, State::Ready);
        c
    }

    #[test]
    fn publishes_are_stamped_and_the_window_is_honoured() {
        for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let mut c = ready_publisher(v, QoS::AtLeastOnce);
            let mut tally = Tally::new();
            tally.window = (0, u64::MAX);
            assert_eq!(c.publish(5, 1000, &mut tally), 2, "window of 2");
            let sent = sent_by(&mut c);
            let Packet::Publish(Publish {
                packet_id, payload, ..
            }) = &sent[1]
            else {
                panic!("{sent:?}")
            };
            assert_eq!(*packet_id, 2);
            assert_eq!(payload.len(), 40);
            let st = Stamp::read(payload).expect("stamped");
            assert_eq!((st.sent_ns, st.publisher, st.seq), (1000, 3, 1));
            // Acking the first frees one slot; its latency is recorded.
            broker_sends(&mut c, Packet::PubAck(PubResponse::new(1)));
            c.process(1500, &mut tally, false).expect("puback");
            assert_eq!((tally.acked, tally.ack_latency.len()), (1, 1));
            assert_eq!(tally.ack_latency.max(), 500);
            assert_eq!(c.publish(5, 2000, &mut tally), 1);
            // An ack for an id not in flight is the broker's protocol error.
            broker_sends(&mut c, Packet::PubAck(PubResponse::new(9)));
            assert!(c.process(2500, &mut tally, false).is_err());
        }
    }

    #[test]
    fn qos2_publish_flow() {
        let mut c = ready_publisher(ProtocolVersion::V5, QoS::ExactlyOnce);
        let mut tally = Tally::new();
        c.publish(1, 10, &mut tally);
        sent_by(&mut c);
        broker_sends(&mut c, Packet::PubRec(PubResponse::new(1)));
        c.process(20, &mut tally, false).expect("pubrec");
        assert_eq!(sent_by(&mut c), vec![Packet::PubRel(PubResponse::new(1))]);
        assert_eq!(tally.acked, 0);
        broker_sends(&mut c, Packet::PubComp(PubResponse::new(1)));
        c.process(30, &mut tally, false).expect("pubcomp");
        assert_eq!(tally.acked, 1);
    }

    #[test]
    fn subscriber_handshake_acks_and_accounting() {
        for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let sub = Subscriber::new("t/#".into(), QoS::AtLeastOnce, 0);
            let mut c = Client::new(v, "sub".into(), 30, Role::Subscriber(Box::new(sub)));
            c.start();
            sent_by(&mut c);
            let mut tally = Tally::new();
            tally.window = (100, 200);
            broker_sends(&mut c, Packet::ConnAck(ConnAck::default()));
            c.process(0, &mut tally, true).expect("connack");
            assert_eq!(c.state, State::AwaitSubAck);
            assert!(matches!(sent_by(&mut c)[..], [Packet::Subscribe(_)]));
            broker_sends(
                &mut c,
                Packet::SubAck(SubAck {
                    packet_id: 1,
                    reasons: vec![ReasonCode::GrantedQoS1],
                    properties: Properties::default(),
                }),
            );
            let publish = |seq: u32, sent_ns: u64, pid: u16| {
                let mut payload = vec![0u8; 20];
                Stamp {
                    sent_ns,
                    publisher: 1,
                    seq,
                }
                .write(&mut payload);
                let mut props = Properties::default();
                if v.is_v5() {
                    props.user_properties.push(("k".into(), "v".into()));
                }
                Packet::Publish(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: "t/a".into(),
                    packet_id: pid,
                    payload: payload.into(),
                    properties: props,
                    ..Default::default()
                })
            };
            // One PUBLISH right behind the SUBACK: the handshake leaves it alone.
            broker_sends(&mut c, publish(0, 150, 1));
            c.process(0, &mut tally, true).expect("suback");
            assert_eq!(c.state, State::Ready);
            assert!(!c.rbuf.is_empty());
            broker_sends(&mut c, publish(2, 50, 2));
            broker_sends(&mut c, publish(0, 150, 3));
            c.process(400, &mut tally, false).expect("publishes");
            assert_eq!(tally.delivered, 3);
            assert_eq!(
                tally.latency.len(),
                1,
                "seq 2 sent before the window, 0 twice"
            );
            assert_eq!(tally.latency.max(), 250);
            let acks = sent_by(&mut c);
            assert_eq!(acks.len(), 3, "{acks:?}");
            let Role::Subscriber(sub) = &c.role else {
                unreachable!()
            };
            let t = &sub.trackers[1];
            assert_eq!((t.unique, t.duplicates, t.gaps()), (2, 1, 1));
        }
    }

    #[test]
    fn refusals_are_reported_with_their_code() {
        let mut c = Client::new(ProtocolVersion::V3_1_1, "x".into(), 30, Role::Idle);
        c.start();
        broker_sends(
            &mut c,
            Packet::ConnAck(ConnAck {
                code: ReasonCode::NotAuthorized,
                ..Default::default()
            }),
        );
        let e = c.process(0, &mut Tally::new(), true).expect_err("refused");
        assert_eq!(e, ClientError::Refused(ReasonCode::NotAuthorized));
        assert!(e.kind().contains("0x87"), "{}", e.kind());
    }

    #[test]
    fn torn_and_malformed_input() {
        let mut c = ready_publisher(ProtocolVersion::V3_1_1, QoS::AtMostOnce);
        let mut tally = Tally::new();
        // Half a packet waits for the rest.
        c.rbuf.extend_from_slice(&[0x30, 10, 0, 3, b't']);
        c.process(0, &mut tally, false).expect("incomplete is fine");
        assert_eq!(c.rbuf.len(), 5);
        // A topic length past the end of the packet is malformed.
        c.rbuf.clear();
        c.rbuf.extend_from_slice(&[0x30, 3, 0, 9, b't']);
        assert!(c.process(0, &mut tally, false).is_err());
        c.rbuf.clear();
        c.rbuf.extend_from_slice(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 1]);
        assert!(c.process(0, &mut tally, false).is_err());
    }
}
