//! A client's session: the state that outlives one network connection.
//!
//! Invariants:
//! - a packet identifier is in `inflight` at most once, and is not handed out again
//!   until its flow completes (PUBACK, PUBCOMP, or a PUBREC with an error code);
//! - `inflight` keeps send order, so a resumed session resends in the original order;
//! - `pending` never holds more than the configured `max_queued_messages`, nor more
//!   payload bytes than `max_queued_bytes` (when set);
//! - every byte in a `pending` is charged to the broker's [`QueuedBytes`] account while
//!   it is there, and released when it leaves (taken, dropped, or the session ends), so
//!   the account is the broker-wide total that `max_total_queued_bytes` bounds;
//! - every change to a stored delivery (sent, released, done, dropped) and to the
//!   incoming QoS 2 ids of a persistent session is recorded in `journal`, in order, for
//!   the owner of the session to hand to the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use roost_core::{LastWill, Message, PacketId, QoS, SubscriptionOptions};

use crate::store::Op;

/// The share group and filter a delivery came through, so that it can go to another
/// member if this one leaves with it unacknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRef {
    /// `<group>` of `$share/<group>/<filter>`.
    pub group: Arc<str>,
    /// The filter proper.
    pub filter: Arc<str>,
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The shared message.
    pub msg: Arc<Message>,
    /// QoS for this subscriber: min(message QoS, subscription QoS).
    pub qos: QoS,
    /// RETAIN flag as this subscriber sees it.
    pub retain: bool,
    /// Identifiers of the matching subscriptions (5.0).
    pub subscription_ids: Box<[u32]>,
    /// Set when the message came through a shared subscription.
    pub share: Option<Arc<ShareRef>>,
    /// Key of the stored copy, for a QoS 1/2 message to a persistent session.
    pub seq: Option<u64>,
    /// Set for a message from a `$queue/`: settling it acks or nacks it there.
    pub queue: Option<Arc<QueueRef>>,
}

/// A queue message delivered to this session, for settling it in its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRef {
    /// The queue it came from (by name: the queue itself holds the consumer's sink).
    pub queue: Arc<str>,
    /// The consumer group it was delivered for.
    pub group: roost_queue::GroupKey,
    /// Its id in the queue.
    pub id: roost_queue::MessageId,
}

pub use crate::store::InflightState;

/// An outgoing QoS 1/2 message that is not acknowledged yet.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Its packet identifier.
    pub packet_id: PacketId,
    /// The message and per-subscriber fields.
    pub delivery: Delivery,
    /// Stage of the QoS flow.
    pub state: InflightState,
}

/// The bytes ([`Message::weight`]) of the messages held in the queues of all sessions
/// of one broker, and their bound (`max_total_queued_bytes`). Per-session bounds alone
/// let ten thousand persistent sessions that never read take the machine; this one
/// account, shared by every [`Pending`], keeps the sum bounded.
///
/// Charged when a message enters a session queue, released when it leaves; checked
/// before it enters. The check and the charge are not one atomic step, so the bound can
/// be passed by at most one message per thread enqueueing at that instant.
///
/// [`Message::weight`]: roost_core::Message::weight
#[derive(Debug, Default)]
pub struct QueuedBytes {
    held: AtomicU64,
    /// 0: no bound.
    max: u64,
}

impl QueuedBytes {
    /// An empty account bounded by `max` bytes (0: no bound).
    pub fn new(max: u64) -> QueuedBytes {
        QueuedBytes {
            held: AtomicU64::new(0),
            max,
        }
    }

    /// Bytes held now in all session queues.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The bound (0: none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// True when `bytes` more still fit under the bound.
    pub fn has_room_for(&self, bytes: u64) -> bool {
        self.max == 0 || self.held().saturating_add(bytes) <= self.max
    }

    fn charge(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: u64) {
        // Never below zero, even if a caller released twice (it would be a bug).
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(bytes))
            });
    }
}

/// How much a session may hold in [`Pending`].
#[derive(Debug, Clone, Copy)]
pub struct QueueBound<'a> {
    /// Most messages (`max_queued_messages`).
    pub messages: usize,
    /// Most payload bytes (`max_queued_bytes`); 0: no byte bound.
    pub bytes: u64,
    /// The broker-wide account (`max_total_queued_bytes`).
    pub total: &'a Arc<QueuedBytes>,
}

/// Which bound a full session queue hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// `max_queued_messages`.
    Messages,
    /// `max_queued_bytes`.
    Bytes,
    /// `max_total_queued_bytes`: all sessions together hold the most they may.
    Total,
}

impl QueueBound<'_> {
    /// Why `pending` cannot take a message of `bytes` (its [`Message::weight`]), if it
    /// cannot. A message larger than the whole byte bound is still taken by an empty
    /// queue, so the bound never makes a session unable to receive a large message; the
    /// broker-wide bound has no such exception.
    ///
    /// [`Message::weight`]: roost_core::Message::weight
    pub fn check(&self, pending: &Pending, bytes: usize) -> Result<(), QueueFull> {
        if pending.len() >= self.messages {
            return Err(QueueFull::Messages);
        }
        if self.bytes > 0 && !pending.is_empty() && pending.bytes() + bytes as u64 > self.bytes {
            return Err(QueueFull::Bytes);
        }
        if !self.total.has_room_for(bytes as u64) {
            return Err(QueueFull::Total);
        }
        Ok(())
    }

    /// True while `pending` is below the session's own bounds (the broker-wide one does
    /// not make publishers wait: past it, messages are dropped).
    pub fn has_room(&self, pending: &Pending) -> bool {
        pending.len() < self.messages && (self.bytes == 0 || pending.bytes() < self.bytes)
    }
}

/// Messages a session holds for later, in order, with their bytes counted (topic,
/// payload and properties: a message of empty payload and a megabyte of user
/// properties is not taken for free) and charged to the broker's [`QueuedBytes`].
///
/// Size: one pointer, boxed on the first message queued. Every connected client's task
/// holds its session (see `an_idle_connection_task_stays_small` in the broker), and
/// most never queue anything; the queue, its byte count and the account it charges are
/// only paid for by sessions that do.
#[derive(Debug, Default)]
pub struct Pending {
    held: Option<Box<Held>>,
}

/// What a [`Pending`] holds once something was queued.
#[derive(Debug)]
struct Held {
    items: VecDeque<Delivery>,
    bytes: u64,
    account: Arc<QueuedBytes>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.account.release(self.bytes);
    }
}

impl Pending {
    /// Messages held.
    pub fn len(&self) -> usize {
        self.held.as_ref().map_or(0, |h| h.items.len())
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held ([`roost_core::Message::weight`] of each).
    pub fn bytes(&self) -> u64 {
        self.held.as_ref().map_or(0, |h| h.bytes)
    }

    /// Appends and charges `account` (bounds are the caller's business: see
    /// [`QueueBound::check`]). A queue keeps the account it was first charged to.
    pub fn push_back(&mut self, d: Delivery, account: &Arc<QueuedBytes>) {
        let held = self.held.get_or_insert_with(|| {
            Box::new(Held {
                items: VecDeque::new(),
                bytes: 0,
                account: account.clone(),
            })
        });
        let w = d.msg.weight() as u64;
        held.bytes += w;
        held.account.charge(w);
        held.items.push_back(d);
    }

    /// Takes the oldest.
    pub fn pop_front(&mut self) -> Option<Delivery> {
        let held = self.held.as_mut()?;
        let d = held.items.pop_front()?;
        let w = d.msg.weight() as u64;
        held.bytes -= w;
        held.account.release(w);
        Some(d)
    }

    /// Keeps only what `keep` accepts, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&Delivery) -> bool) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let mut bytes = 0;
        held.items.retain(|d| {
            let kept = keep(d);
            if kept {
                bytes += d.msg.weight() as u64;
            }
            kept
        });
        held.account.release(held.bytes - bytes);
        held.bytes = bytes;
    }

    /// Moves the charge of what is held to `account` (a queue keeps the account it was
    /// first charged to otherwise).
    pub fn charge_to(&mut self, account: &Arc<QueuedBytes>) {
        if let Some(held) = self.held.as_mut()
            && !Arc::ptr_eq(&held.account, account)
        {
            held.account.release(held.bytes);
            account.charge(held.bytes);
            held.account = account.clone();
        }
    }

    /// Every message held, oldest first, to change in place.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Delivery> {
        self.held.iter_mut().flat_map(|h| h.items.iter_mut())
    }
}

impl std::ops::Index<usize> for Pending {
    type Output = Delivery;
    fn index(&self, i: usize) -> &Delivery {
        match &self.held {
            Some(h) => &h.items[i],
            None => panic!("index {i} of an empty session queue"),
        }
    }
}

/// A subscription as the session remembers it (the router holds the matching copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// Options from SUBSCRIBE.
    pub options: SubscriptionOptions,
    /// Subscription identifier (5.0).
    pub identifier: Option<u32>,
    /// The v5 `consumer-group` user property of a `$queue/` subscription, which names
    /// its group and is not in the filter: the group it joins again when the session
    /// resumes.
    pub consumer_group: Option<Arc<str>>,
}

/// The hasher of a session's own maps: keyed once per process, at random, and held in
/// no map, so each map is 16 bytes smaller than with its own `RandomState` (in every
/// connected client). The keys must not be fixed: the client chooses what goes in
/// these maps (its filters), and a set of filters precomputed to collide would make
/// every lookup a scan of them, on a worker thread other clients share.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessKeyed;

impl std::hash::BuildHasher for ProcessKeyed {
    type Hasher = std::collections::hash_map::DefaultHasher;

    fn build_hasher(&self) -> Self::Hasher {
        static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        KEYS.get_or_init(Default::default).build_hasher()
    }
}

/// The session state of one client id.
#[derive(Debug)]
pub struct Session {
    /// Client identifier (possibly assigned by the broker).
    pub client_id: Arc<str>,
    /// Subscriptions by raw filter (with any `$share/<group>/` prefix).
    pub subscriptions: HashMap<String, SubscriptionRecord, ProcessKeyed>,
    /// Outgoing QoS 1/2 messages in send order.
    pub inflight: VecDeque<Inflight>,
    /// Messages waiting for a free slot in the window or for the client to return.
    pub pending: Pending,
    /// Incoming QoS 2 packet ids for which PUBREC was sent and PUBREL not yet seen.
    pub incoming_qos2: HashSet<PacketId, ProcessKeyed>,
    /// Seconds the session lives after its connection ends (`u32::MAX`: forever).
    pub expiry_interval: u32,
    /// A will waiting for its delay to pass (set when the connection ended). Boxed:
    /// rare, and a will is hundreds of bytes.
    pub pending_will: Option<Box<LastWill>>,
    /// Messages dropped because `pending` was full (saturating; 32 bits keep the
    /// session, which every idle connection's task holds, a line smaller).
    pub dropped: u32,
    /// Store operations not yet handed to the store.
    pub journal: Vec<Op>,
    /// True once a session record was written to the store (so ending the session
    /// must delete it).
    pub stored: bool,
    next_packet_id: PacketId,
    /// Ids handed out since `inflight` was last seen empty by
    /// [`Session::allocate_packet_id`], or [`ISSUED_UNKNOWN`] (a resumed session's
    /// in-flight ids came from elsewhere). While it is known, every id in flight is
    /// among the last `issued` handed out, so the next one cannot be in use.
    issued: u16,
}

/// [`Session::issued`] when the ids in flight may not all come from this counter.
const ISSUED_UNKNOWN: u16 = u16::MAX;

impl Session {
    /// The subscriptions that are routes, not `$queue/` consumer groups (which the
    /// queues keep, joined again when the session resumes).
    pub fn routes(&self) -> impl Iterator<Item = (&String, &SubscriptionRecord)> {
        self.subscriptions
            .iter()
            .filter(|(filter, _)| !crate::queues::is_queue_filter(filter))
    }

    /// A fresh, empty session.
    pub fn new(client_id: Arc<str>) -> Self {
        Session {
            client_id,
            subscriptions: HashMap::default(),
            inflight: VecDeque::new(),
            pending: Pending::default(),
            incoming_qos2: HashSet::default(),
            expiry_interval: 0,
            pending_will: None,
            dropped: 0,
            journal: Vec::new(),
            stored: false,
            next_packet_id: 1,
            issued: ISSUED_UNKNOWN,
        }
    }

    /// Queues a delivery while no connection is attached. QoS 0 messages are not
    /// kept for offline sessions (the spec allows dropping them); QoS 1/2 are kept up
    /// to `bound`. Returns false when the delivery was dropped.
    pub fn enqueue_offline(&mut self, d: Delivery, bound: QueueBound<'_>) -> bool {
        // A queue delivery goes back to its queue, which redelivers it.
        if d.qos == QoS::AtMostOnce || d.queue.is_some() {
            return false;
        }
        self.enqueue(d, bound).is_ok()
    }

    /// Appends to `pending` unless it is full (then counts a drop).
    pub fn enqueue(&mut self, d: Delivery, bound: QueueBound<'_>) -> Result<(), QueueFull> {
        if let Err(full) = bound.check(&self.pending, d.msg.weight()) {
            self.dropped = self.dropped.saturating_add(1);
            self.forget(&d);
            return Err(full);
        }
        self.pending.push_back(d, bound.total);
        Ok(())
    }

    /// True when the session outlives its connection (and so is stored).
    pub fn is_persistent(&self) -> bool {
        self.expiry_interval > 0
    }

    /// Records that a delivery is finished with (acknowledged, expired or dropped).
    pub fn forget(&mut self, d: &Delivery) {
        if let Some(seq) = d.seq {
            self.journal
                .push(Op::DeleteEntry(self.client_id.clone(), seq));
        }
    }

    /// Records the packet id and QoS stage of a stored delivery in flight.
    pub fn note_inflight(&mut self, f: &Inflight) {
        if let Some(seq) = f.delivery.seq {
            self.journal.push(Op::PutInflight(
                self.client_id.clone(),
                seq,
                f.packet_id,
                f.state,
            ));
        }
    }

    /// Records an incoming QoS 2 id awaiting PUBREL.
    pub fn add_incoming_qos2(&mut self, packet_id: PacketId) {
        self.incoming_qos2.insert(packet_id);
        if self.is_persistent() {
            self.journal
                .push(Op::PutInbound(self.client_id.clone(), packet_id));
        }
    }

    /// Forgets an incoming QoS 2 id; false if it was not there.
    pub fn remove_incoming_qos2(&mut self, packet_id: PacketId) -> bool {
        let removed = self.incoming_qos2.remove(&packet_id);
        if removed && self.is_persistent() {
            self.journal
                .push(Op::DeleteInbound(self.client_id.clone(), packet_id));
        }
        removed
    }

    /// The next free packet identifier, skipping those still in flight.
    /// `None` only if all 65,535 are in use, which the window size prevents.
    pub fn allocate_packet_id(&mut self) -> Option<PacketId> {
        if self.inflight.is_empty() {
            self.issued = 0;
        }
        // Ids cycle through 1..=65535: the next one repeats an id handed out since the
        // reset only after 65,535 of them, so below that it is free without looking
        // through what is in flight (which costs a pass over up to `max_inflight`
        // entries per message).
        if self.issued < ISSUED_UNKNOWN - 1 {
            self.issued += 1;
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            return Some(id);
        }
        self.issued = ISSUED_UNKNOWN;
        for _ in 0..u16::MAX {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|f| f.packet_id == id) {
                return Some(id);
            }
        }
        None
    }

    /// Removes and returns every delivery (in flight or pending) that came through a
    /// shared subscription, so the broker can hand it to another group member.
    pub fn take_shared(&mut self) -> Vec<Delivery> {
        let mut out: Vec<Delivery> = Vec::new();
        self.inflight.retain(|f| {
            // A QoS 2 message whose PUBREC arrived was received by the client: moving
            // it would deliver it twice, so only unreceived ones move.
            if f.delivery.share.is_some() && f.state == InflightState::Published {
                out.push(f.delivery.clone());
                false
            } else {
                true
            }
        });
        self.pending.retain(|d| {
            if d.share.is_some() {
                out.push(d.clone());
                false
            } else {
                true
            }
        });
        // They will be stored again under their new owner.
        for d in &out {
            self.forget(d);
        }
        for d in &mut out {
            d.seq = None;
        }
        out
    }

    /// Deletes the stored copy of a session that is no longer persistent (resumed with
    /// expiry 0): it now ends with its connection, so no record of it may stay in the
    /// store, where a restart would bring it back with its old expiry and delayed will.
    /// Its messages are no longer stored either.
    pub fn unstore(&mut self) {
        if !self.stored {
            return;
        }
        self.stored = false;
        self.journal.push(Op::DeleteSession(self.client_id.clone()));
        for f in &mut self.inflight {
            f.delivery.seq = None;
        }
        for d in self.pending.iter_mut() {
            d.seq = None;
        }
    }

    /// Removes every queue delivery: when the connection goes, the queue hands them
    /// to another consumer (or to this one when it returns), not the session.
    pub fn drop_queue_deliveries(&mut self) {
        self.inflight.retain(|f| f.delivery.queue.is_none());
        self.pending.retain(|d| d.queue.is_none());
    }

    /// Drops pending messages whose expiry has passed (in-flight ones are kept: their
    /// delivery has started, and the spec only expires messages not yet sent).
    pub fn expire_pending(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.pending.retain(|d| {
            let live = !d.msg.is_expired(now);
            if !live {
                expired.push(d.seq);
            }
            live
        });
        for seq in expired.into_iter().flatten() {
            self.journal
                .push(Op::DeleteEntry(self.client_id.clone(), seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use roost_core::Properties;

    pub(crate) fn delivery(qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                properties: Properties::default(),
                publisher: None,
                received_at: Instant::now(),
            }),
            qos,
            retain: false,
            subscription_ids: Box::default(),
            share: None,
            seq: None,
            queue: None,
        }
    }

    fn in_flight(packet_id: PacketId) -> Inflight {
        Inflight {
            packet_id,
            delivery: delivery(QoS::AtLeastOnce),
            state: InflightState::Published,
        }
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        // As after a resume: ids in flight that this session did not hand out.
        let mut s = Session::new("c".into());
        s.next_packet_id = u16::MAX;
        s.inflight.push_back(in_flight(u16::MAX));
        s.inflight.push_back(in_flight(1));
        assert_eq!(
            s.allocate_packet_id(),
            Some(2),
            "65535 and 1 are in flight, 0 is never used"
        );
    }

    #[test]
    fn packet_ids_stay_unique_through_wraps_with_messages_in_flight() {
        let mut s = Session::new("c".into());
        let mut rounds = 0;
        // Three wraps of the id space with 100 messages in flight throughout, one
        // acknowledged (the oldest) per new one: no id may be handed out twice while in
        // flight.
        while rounds < 3 * 65_535 {
            let id = s.allocate_packet_id().expect("ids left");
            assert!(
                !s.inflight.iter().any(|f| f.packet_id == id),
                "{id} handed out while in flight"
            );
            s.inflight.push_back(in_flight(id));
            if s.inflight.len() > 100 {
                s.inflight.pop_front();
            }
            rounds += 1;
        }
        // A message stuck in flight for a whole wrap: the counter falls back to looking.
        let mut s = Session::new("c".into());
        let stuck = s.allocate_packet_id().expect("id");
        s.inflight.push_back(in_flight(stuck));
        for _ in 0..2 * 65_535 {
            let id = s.allocate_packet_id().expect("ids left");
            assert_ne!(id, stuck, "the stuck id was handed out again");
        }
    }

    #[test]
    fn offline_queue_is_bounded_and_skips_qos0() {
        let mut s = Session::new("c".into());
        let unbounded = Arc::default();
        let two = QueueBound {
            messages: 2,
            bytes: 0,
            total: &unbounded,
        };
        assert!(!s.enqueue_offline(delivery(QoS::AtMostOnce), two));
        assert!(s.enqueue_offline(delivery(QoS::AtLeastOnce), two));
        assert!(s.enqueue_offline(delivery(QoS::ExactlyOnce), two));
        assert!(!s.enqueue_offline(delivery(QoS::AtLeastOnce), two));
        assert_eq!(s.pending.len(), 2);
        assert_eq!(s.dropped, 1);
    }

    #[test]
    fn byte_bound_counts_payloads_and_admits_one_oversized_message() {
        let mut s = Session::new("c".into());
        // What a test delivery weighs: its topic and its 1-byte payload.
        let w = delivery(QoS::AtLeastOnce).msg.weight() as u64;
        let unbounded = Arc::default();
        let bound = QueueBound {
            messages: 100,
            bytes: 2 * w,
            total: &unbounded,
        };
        assert_eq!(s.enqueue(delivery(QoS::AtLeastOnce), bound), Ok(()));
        assert_eq!(s.enqueue(delivery(QoS::AtLeastOnce), bound), Ok(()));
        assert_eq!(
            s.enqueue(delivery(QoS::AtLeastOnce), bound),
            Err(QueueFull::Bytes)
        );
        assert_eq!(s.pending.bytes(), 2 * w);
        assert!(!bound.has_room(&s.pending));
        assert!(s.pending.pop_front().is_some());
        assert_eq!(s.pending.bytes(), w);
        assert!(bound.has_room(&s.pending));
        s.pending.retain(|_| false);
        assert_eq!(s.pending.bytes(), 0);
        // An empty queue takes a message bigger than the whole bound.
        let tiny = QueueBound {
            messages: 100,
            bytes: 0,
            total: &unbounded,
        };
        assert_eq!(s.enqueue(delivery(QoS::AtLeastOnce), tiny), Ok(()));
        let mut big = delivery(QoS::AtLeastOnce);
        Arc::make_mut(&mut big.msg).payload = Bytes::from_static(b"0123456789");
        let mut t = Session::new("d".into());
        assert_eq!(t.enqueue(big, bound), Ok(()));
    }

    #[test]
    fn broker_wide_bound_spans_sessions_and_is_released_by_every_exit() {
        let w = delivery(QoS::AtLeastOnce).msg.weight() as u64;
        let total = Arc::new(QueuedBytes::new(3 * w));
        let bound = QueueBound {
            messages: 100,
            bytes: 0,
            total: &total,
        };
        let (mut a, mut b) = (Session::new("a".into()), Session::new("b".into()));
        assert_eq!(a.enqueue(delivery(QoS::AtLeastOnce), bound), Ok(()));
        assert_eq!(a.enqueue(delivery(QoS::AtLeastOnce), bound), Ok(()));
        assert_eq!(b.enqueue(delivery(QoS::AtLeastOnce), bound), Ok(()));
        assert_eq!(total.held(), 3 * w);
        // Full for everyone, the empty session included (no large-message exception).
        let mut c = Session::new("c".into());
        assert_eq!(
            c.enqueue(delivery(QoS::AtLeastOnce), bound),
            Err(QueueFull::Total)
        );
        assert_eq!(c.dropped, 1);
        // Taking, dropping by filter, and ending the session each give the bytes back.
        assert!(a.pending.pop_front().is_some());
        assert_eq!(total.held(), 2 * w);
        b.pending.retain(|_| false);
        assert_eq!(total.held(), w);
        assert_eq!(c.enqueue(delivery(QoS::AtLeastOnce), bound), Ok(()));
        drop(a);
        drop(c);
        assert_eq!(total.held(), 0);
        // A restored queue moves its charge to the broker's account.
        let loader = Arc::new(QueuedBytes::new(0));
        let mut r = Session::new("r".into());
        r.pending.push_back(delivery(QoS::AtLeastOnce), &loader);
        r.pending.charge_to(&total);
        assert_eq!((loader.held(), total.held()), (0, w));
    }
}
