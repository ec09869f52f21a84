//! The consumer-group state machine: partition cursors, membership and assignment,
//! in-flight tracking, redelivery and backoff. Sans-I/O: no tokio, no disk, no clock;
//! every call that depends on time takes `now` (milliseconds), so tests drive it with a
//! fake clock and the storage-backed [`crate::Queue`] is a thin shell around it.
//!
//! Invariants of one [`Cursor`] (one group, one partition):
//! - every offset below `committed` is settled (acked, dead-lettered, or skipped by the
//!   group's filter); `committed` never moves backwards except by an explicit reset;
//! - `acked` holds settled offsets at or above `committed` (never `committed` itself);
//! - `next` is the first offset never yet handed out, `committed <= next`, and `next` is
//!   never in `acked`;
//! - an offset in `committed..next` that is not in `acked` is in exactly one of
//!   `inflight` (held by a consumer), `retry` (waiting to be redelivered, possibly after a
//!   backoff), `delayed` (its `deliver_at` has not come: first delivery waits, later
//!   offsets go ahead) or `dying` (its dead-letter or transfer append is in progress) —
//!   except right after restore or reset, when `next == committed` and nothing is
//!   outstanding but the restored delivery counts ([`Group::replay_delivered`]), which
//!   sit in `retry` at or above `next`; `next` steps over them;
//! - new offsets are handed out in increasing order: first delivery is in offset order;
//! - a message is never handed out once it has had `max_deliveries` (a redelivery that
//!   reaches the bound, from a consumer leaving or from a restored count, waits in
//!   `retry` for [`Group::expire`] to dead-letter it).
//!
//! Group invariants: each partition has at most one owner, always a member; a member's
//! `inflight` equals the number of `inflight` entries naming it across all cursors and
//! never exceeds its window (deliveries stop at the window; the counter only falls).
//!
//! [`GroupKey`], the name of a group, lives here too: the queue shell keys its groups by
//! it and the progress records (`format.rs`) write it, so it sits below both.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Identifies one consumer (the broker uses the MQTT client id).
pub type ConsumerId = Arc<str>;

/// A consumer group on one queue: the group name plus the optional filter, matched
/// against a message's subtopic. Consumers with different filters are different groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    /// The group name (`default` when a subscription names none).
    pub group: Arc<str>,
    /// The MQTT topic filter after the queue name, if any.
    pub filter: Option<Arc<str>>,
}

impl GroupKey {
    /// A key from its parts.
    pub fn new(group: &str, filter: Option<&str>) -> GroupKey {
        GroupKey {
            group: Arc::from(group),
            filter: filter.map(Arc::from),
        }
    }

    pub(crate) fn matches(&self, subtopic: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| roost_core::topic::matches(f, subtopic))
    }
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.filter {
            Some(filter) => write!(f, "{}[{}]", self.group, filter),
            None => f.write_str(&self.group),
        }
    }
}

/// Redelivery settings of a queue, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// A delivery not settled within this long is redelivered.
    pub ack_timeout_ms: u64,
    /// After this many deliveries a failed message is dead-lettered; 0 means never.
    pub max_deliveries: u32,
    /// Backoff after the first nack.
    pub backoff_initial_ms: u64,
    /// Upper bound of the backoff.
    pub backoff_max_ms: u64,
}

impl Settings {
    /// The wait before redelivering a message nacked on its `count`-th delivery:
    /// `backoff_initial * 2^(count-1)`, capped at `backoff_max`.
    pub fn backoff(&self, count: u32) -> u64 {
        let shift = count.saturating_sub(1).min(40);
        self.backoff_initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.backoff_max_ms)
    }

    fn exhausted(&self, count: u32) -> bool {
        self.max_deliveries > 0 && count >= self.max_deliveries
    }
}

/// A message handed to a consumer and not yet settled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    consumer: ConsumerId,
    /// Deliveries so far, this one included.
    count: u32,
    /// When the ack timeout fires.
    deadline: u64,
    /// When it was handed out: an adaptive window measures how long its consumer holds
    /// messages.
    since: u64,
}

/// A message waiting to be delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    /// Deliveries so far.
    count: u32,
    /// Not before this time.
    due: u64,
}

/// Progress of one group through one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    committed: u64,
    acked: BTreeSet<u64>,
    next: u64,
    inflight: BTreeMap<u64, InFlight>,
    retry: BTreeMap<u64, Retry>,
    dying: BTreeMap<u64, u32>,
    /// Messages whose first delivery waits for their `deliver_at`: offset -> due, and
    /// the same ordered by due time (what [`Group::pick`] looks at).
    delayed: BTreeMap<u64, u64>,
    delayed_due: BTreeSet<(u64, u64)>,
    /// The partition changed owner while messages of it were in flight to another
    /// member: no new offset goes to the new owner until those are settled or taken
    /// back (see [`Group::in_handover`]). Cleared by the next first delivery.
    handover: bool,
}

impl Cursor {
    /// A cursor restored from durable progress: everything outstanding is forgotten
    /// (so it will be delivered again, with its delivery count starting over).
    pub fn restored(committed: u64, acked: impl IntoIterator<Item = u64>) -> Cursor {
        let mut c = Cursor {
            committed,
            next: committed,
            ..Cursor::default()
        };
        for a in acked {
            c.settle_offset(a);
        }
        c.advance_next();
        c
    }

    /// Every offset below this is settled.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Settled offsets above `committed`.
    pub fn acked(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked.iter().copied()
    }

    /// Unsettled messages below `end` (the partition's next offset).
    pub fn lag(&self, end: u64) -> u64 {
        let above = self.acked.range(..end).count() as u64;
        end.saturating_sub(self.committed).saturating_sub(above)
    }

    fn settle_offset(&mut self, offset: u64) {
        if offset < self.committed {
            return;
        }
        if offset == self.committed {
            self.committed += 1;
            while self.acked.remove(&self.committed) {
                self.committed += 1;
            }
        } else {
            self.acked.insert(offset);
        }
        if self.next < self.committed {
            self.next = self.committed;
        }
        self.advance_next();
    }

    /// Steps `next` over settled offsets and over outstanding ones: in normal
    /// operation everything outstanding is below `next`, but restored delivery counts
    /// put offsets in `retry` above it, which must not be handed out as new again.
    fn advance_next(&mut self) {
        while self.acked.contains(&self.next)
            || self.retry.contains_key(&self.next)
            || self.inflight.contains_key(&self.next)
            || self.dying.contains_key(&self.next)
        {
            self.next += 1;
        }
    }

    fn undelay(&mut self, offset: u64) -> bool {
        match self.delayed.remove(&offset) {
            Some(due) => self.delayed_due.remove(&(due, offset)),
            None => false,
        }
    }

    /// Keeps only the delayed offsets `keep` says yes to.
    fn retain_delayed(&mut self, keep: impl Fn(u64) -> bool) {
        self.delayed.retain(|&o, _| keep(o));
        self.delayed_due.retain(|&(_, o)| keep(o));
    }

    /// Deliveries so far of every outstanding message that had one, by offset.
    pub fn delivery_counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let inflight = self.inflight.iter().map(|(&o, f)| (o, f.count));
        let retry = self.retry.iter().map(|(&o, r)| (o, r.count));
        let dying = self.dying.iter().map(|(&o, &c)| (o, c));
        inflight.chain(retry).chain(dying).filter(|&(_, c)| c > 0)
    }

    fn is_settled(&self, offset: u64) -> bool {
        offset < self.committed || self.acked.contains(&offset)
    }
}

/// How many unsettled messages a member may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Exactly this many (a consumer that paces itself, such as a bridge's link).
    Fixed(u32),
    /// A window that follows the consumer's acknowledgements, at most `max` and at most
    /// the queue's `consumer_window` (see `Member::observe`): an MQTT consumer's, with
    /// `max` its Receive Maximum (MQTT 5), or `u32::MAX` when it announces none (3.x).
    /// An MQTT 5 client that leaves Receive Maximum at its default of 65,535 would
    /// otherwise hold that many messages however slowly it works through them.
    Adaptive {
        /// The largest the window grows to.
        max: u32,
    },
}

impl From<u32> for Window {
    /// `n` messages exactly; 0 for an adaptive window bounded by `consumer_window` only.
    fn from(n: u32) -> Window {
        match n {
            0 => Window::Adaptive { max: u32::MAX },
            n => Window::Fixed(n),
        }
    }
}

/// The window an adaptive member starts with (or `max`, if lower).
pub(crate) const ADAPTIVE_START: u32 = 32;
/// The smallest an adaptive window gets (or `max`, if lower).
pub(crate) const ADAPTIVE_FLOOR: u32 = 4;
/// An adaptive window that was full doubles while its consumer settles messages within
/// this many milliseconds on average: the window, not the consumer, was the limit.
pub(crate) const GROW_BELOW_MS: u64 = 50;
/// An adaptive window halves while its consumer takes longer than this on average: it
/// has more than it can work through, and what it holds waits there instead of going to
/// the group's next owner of the partition after a leave or a timeout.
pub(crate) const SHRINK_ABOVE_MS: u64 = 250;

/// Per-member bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    window: u32,
    inflight: u32,
    adaptive: Option<Adaptive>,
}

/// What an adaptive window measured since it last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Adaptive {
    max: u32,
    /// Settles measured, and the milliseconds their messages were held in all.
    settles: u32,
    held_ms: u64,
    /// The window was full at some point.
    full: bool,
}

impl Member {
    fn new(window: Window) -> Member {
        let (window, adaptive) = match window {
            Window::Fixed(n) => (n.max(1), None),
            Window::Adaptive { max } => {
                let max = max.max(1);
                let adaptive = Adaptive {
                    max,
                    settles: 0,
                    held_ms: 0,
                    full: false,
                };
                (ADAPTIVE_START.min(max), Some(adaptive))
            }
        };
        Member {
            window,
            inflight: 0,
            adaptive,
        }
    }

    /// The consumer answered (ack or nack) a message it held for `held_ms`. Every
    /// quarter window of answers, an adaptive window doubles if it was full and the
    /// answers came within [`GROW_BELOW_MS`] on average (a fast consumer: more in
    /// flight covers the round trip), or halves if they took longer than
    /// [`SHRINK_ABOVE_MS`] (a slow consumer: what it holds would only wait there).
    /// By Little's law the window then settles near the consumer's rate times those
    /// times, between [`ADAPTIVE_FLOOR`] and `max`.
    fn observe(&mut self, held_ms: u64) {
        let Some(a) = &mut self.adaptive else {
            return;
        };
        a.settles += 1;
        a.held_ms = a.held_ms.saturating_add(held_ms);
        if a.settles < (self.window / 4).max(1) {
            return;
        }
        let mean = a.held_ms / u64::from(a.settles);
        if mean > SHRINK_ABOVE_MS {
            self.window = (self.window / 2).max(ADAPTIVE_FLOOR.min(a.max));
        } else if a.full && mean < GROW_BELOW_MS {
            self.window = self.window.saturating_mul(2).min(a.max);
        }
        a.settles = 0;
        a.held_ms = 0;
        a.full = false;
    }

    /// A message it held timed out: an adaptive window drops to its floor.
    fn timed_out(&mut self) {
        if let Some(a) = &mut self.adaptive {
            self.window = ADAPTIVE_FLOOR.min(a.max);
            a.settles = 0;
            a.held_ms = 0;
            a.full = false;
        }
    }

    /// Joined again: a fixed window takes the new value, an adaptive one keeps what it
    /// learnt within the new bound.
    fn rejoin(&mut self, window: Window) {
        match (window, &mut self.adaptive) {
            (Window::Adaptive { max }, Some(a)) => {
                a.max = max.max(1);
                self.window = self.window.min(a.max);
            }
            (w, _) => {
                *self = Member {
                    inflight: self.inflight,
                    ..Member::new(w)
                }
            }
        }
    }
}

/// What the group would deliver next on a partition: see [`Group::pick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pick {
    /// The partition's owner, which has room in its window.
    pub consumer: ConsumerId,
    /// The offset to deliver.
    pub offset: u64,
    /// Deliveries before this one (0 for a first delivery).
    pub count: u32,
    /// A redelivery (from `retry`) or a delayed message now due (from `delayed`), rather
    /// than the next new offset: read alone, and already matched against the filter.
    pub retry: bool,
}

/// The result of settling a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Settled now: the caller persists the ack.
    Settled,
    /// Not outstanding for this consumer (unknown, already settled, held by another
    /// consumer, or being dead-lettered): nothing changed.
    Ignored,
}

/// The result of a nack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nack {
    /// Will be redelivered at `due`.
    Retry {
        /// Redelivery time.
        due: u64,
        /// Deliveries so far.
        count: u32,
    },
    /// Delivered `count` times, the maximum: the caller dead-letters it.
    DeadLetter {
        /// Deliveries so far.
        count: u32,
    },
    /// Not in flight to this consumer: nothing changed.
    Ignored,
}

/// A message the caller must append to the dead-letter queue, then report back with
/// [`Group::dead_lettered`] or [`Group::dead_letter_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    /// Partition of the message.
    pub partition: usize,
    /// Offset of the message.
    pub offset: u64,
    /// Deliveries so far.
    pub count: u32,
}

/// One consumer group (for one filter) on one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Group {
    members: BTreeMap<ConsumerId, Member>,
    owners: Vec<Option<ConsumerId>>,
    cursors: Vec<Cursor>,
}

impl Group {
    /// A group with no members whose cursors start at `starts` (one per partition).
    pub fn new(starts: &[u64]) -> Group {
        Group::from_cursors(starts.iter().map(|&s| Cursor::restored(s, [])).collect())
    }

    /// A group with no members and the given cursors.
    pub fn from_cursors(cursors: Vec<Cursor>) -> Group {
        Group {
            members: BTreeMap::new(),
            owners: vec![None; cursors.len()],
            cursors,
        }
    }

    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.cursors.len()
    }

    /// The cursor of partition `p`.
    pub fn cursor(&self, p: usize) -> Option<&Cursor> {
        self.cursors.get(p)
    }

    /// All cursors.
    pub fn cursors(&self) -> &[Cursor] {
        &self.cursors
    }

    /// Adds partitions (a queue only grows) starting at `starts`, and rebalances.
    pub fn add_partitions(&mut self, starts: &[u64]) {
        for &s in starts {
            self.cursors.push(Cursor::restored(s, []));
        }
        self.rebalance();
    }

    /// Members, sorted by id.
    pub fn members(&self) -> impl Iterator<Item = &ConsumerId> {
        self.members.keys()
    }

    /// Whether `consumer` is a member.
    pub fn is_member(&self, consumer: &str) -> bool {
        self.members.contains_key(consumer)
    }

    /// Messages in flight to `consumer`.
    #[cfg(test)]
    pub fn inflight_of(&self, consumer: &str) -> u32 {
        self.members.get(consumer).map_or(0, |m| m.inflight)
    }

    /// The current window of `consumer` (0 if not a member).
    pub fn window_of(&self, consumer: &str) -> u32 {
        self.members.get(consumer).map_or(0, |m| m.window)
    }

    /// Room left in `consumer`'s window.
    pub fn room_of(&self, consumer: &str) -> u32 {
        self.members
            .get(consumer)
            .map_or(0, |m| m.window.saturating_sub(m.inflight))
    }

    /// Whether `offset` of partition `p` is in flight to `consumer`.
    pub fn holds(&self, p: usize, offset: u64, consumer: &str) -> bool {
        self.cursors
            .get(p)
            .and_then(|c| c.inflight.get(&offset))
            .is_some_and(|f| &*f.consumer == consumer)
    }

    /// Messages in flight to all members.
    pub fn inflight(&self) -> u64 {
        self.cursors.iter().map(|c| c.inflight.len() as u64).sum()
    }

    /// The owner of partition `p`.
    pub fn owner(&self, p: usize) -> Option<&ConsumerId> {
        self.owners.get(p).and_then(|o| o.as_ref())
    }

    /// Adds `consumer` with an in-flight `window` (at least 1), or updates the window of
    /// a member, and rebalances. Returns true if it was not a member.
    pub fn join(&mut self, consumer: ConsumerId, window: Window) -> bool {
        let added = match self.members.get_mut(&consumer) {
            Some(m) => {
                m.rejoin(window);
                false
            }
            None => {
                self.members.insert(consumer, Member::new(window));
                true
            }
        };
        if added {
            self.rebalance();
        }
        added
    }

    /// Removes `consumer`, puts everything in flight to it up for redelivery at once
    /// (delivery counts kept) and rebalances. Returns false if it was not a member.
    pub fn leave(&mut self, consumer: &str, now: u64) -> bool {
        if self.members.remove(consumer).is_none() {
            return false;
        }
        for c in &mut self.cursors {
            let mine: Vec<u64> = c
                .inflight
                .iter()
                .filter(|(_, f)| &*f.consumer == consumer)
                .map(|(&o, _)| o)
                .collect();
            for o in mine {
                if let Some(f) = c.inflight.remove(&o) {
                    c.retry.insert(
                        o,
                        Retry {
                            count: f.count,
                            due: now,
                        },
                    );
                }
            }
        }
        self.rebalance();
        true
    }

    /// Round-robin over members sorted by id: partition `p` goes to member `p % n`.
    /// A partition that moves to another member while the previous one still holds
    /// some of its messages is in handover until they are settled (see
    /// [`Group::in_handover`]).
    fn rebalance(&mut self) {
        let ids: Vec<ConsumerId> = self.members.keys().cloned().collect();
        let owners: Vec<Option<ConsumerId>> = (0..self.cursors.len())
            .map(|p| (!ids.is_empty()).then(|| ids[p % ids.len()].clone()))
            .collect();
        for (p, c) in self.cursors.iter_mut().enumerate() {
            if self.owners.get(p).and_then(Option::as_ref) != owners[p].as_ref()
                && !c.inflight.is_empty()
            {
                c.handover = true;
            }
        }
        self.owners = owners;
    }

    /// Whether partition `p` waits for a handover: members other than its owner still
    /// hold messages of it, so its next new offsets wait (a key's messages are then
    /// worked on in offset order even while the partition changes hands: its new owner
    /// starts once the old one has answered, or the ack timeout has taken them back).
    pub fn in_handover(&self, p: usize) -> bool {
        let (Some(c), Some(owner)) = (self.cursors.get(p), self.owner(p)) else {
            return false;
        };
        c.handover && c.inflight.values().any(|f| f.consumer != *owner)
    }

    /// What to deliver next on partition `p`, whose log ends at `end`: the lowest due
    /// redelivery that has not had `max_deliveries`, else the delayed message due first
    /// (if due), else the next new offset; `None` when the partition has no owner, the
    /// owner's window is full, or nothing is ready.
    pub fn pick(&self, p: usize, end: u64, now: u64, s: &Settings) -> Option<Pick> {
        let owner = self.owner(p)?;
        let member = self.members.get(owner)?;
        if member.inflight >= member.window {
            return None;
        }
        let c = self.cursors.get(p)?;
        if let Some((&offset, r)) = c
            .retry
            .iter()
            .find(|(_, r)| r.due <= now && !s.exhausted(r.count))
        {
            return Some(Pick {
                consumer: owner.clone(),
                offset,
                count: r.count,
                retry: true,
            });
        }
        if c.handover && self.in_handover(p) {
            return None;
        }
        if let Some(&(due, offset)) = c.delayed_due.first()
            && due <= now
        {
            return Some(Pick {
                consumer: owner.clone(),
                offset,
                count: 0,
                retry: true,
            });
        }
        (c.next < end).then(|| Pick {
            consumer: owner.clone(),
            offset: c.next,
            count: 0,
            retry: false,
        })
    }

    /// Records that `pick` (from [`Group::pick`], nothing changed since) was handed to
    /// its consumer: in flight until `now + ack_timeout_ms`.
    pub fn delivered(&mut self, p: usize, pick: &Pick, now: u64, ack_timeout_ms: u64) {
        let Some(c) = self.cursors.get_mut(p) else {
            return;
        };
        if pick.retry {
            if c.retry.remove(&pick.offset).is_none() && !c.undelay(pick.offset) {
                return;
            }
        } else {
            if pick.offset != c.next {
                return;
            }
            c.next += 1;
            c.advance_next();
        }
        if !pick.retry {
            // Picked past the handover check: nothing of another member's is in flight.
            c.handover = false;
        }
        c.inflight.insert(
            pick.offset,
            InFlight {
                consumer: pick.consumer.clone(),
                count: pick.count + 1,
                deadline: now.saturating_add(ack_timeout_ms),
                since: now,
            },
        );
        if let Some(m) = self.members.get_mut(&pick.consumer) {
            m.inflight += 1;
            if let Some(a) = &mut m.adaptive
                && m.inflight >= m.window
            {
                a.full = true;
            }
        }
    }

    /// Settles the new offset `offset` of partition `p` without delivering it (the
    /// group's filter does not match it).
    pub fn skip(&mut self, p: usize, offset: u64) {
        if let Some(c) = self.cursors.get_mut(p)
            && offset == c.next
        {
            c.next += 1;
            c.settle_offset(offset);
        }
    }

    /// Holds back the new offset `offset` of partition `p` until `due` (its
    /// `deliver_at`): later offsets are delivered meanwhile, and it is picked, as a
    /// first delivery, once `due` has passed.
    pub fn defer(&mut self, p: usize, offset: u64, due: u64) {
        if let Some(c) = self.cursors.get_mut(p)
            && offset == c.next
        {
            c.next += 1;
            c.advance_next();
            c.delayed.insert(offset, due);
            c.delayed_due.insert((due, offset));
        }
    }

    /// Messages held back for their `deliver_at`, across partitions.
    pub fn delayed(&self) -> u64 {
        self.cursors.iter().map(|c| c.delayed.len() as u64).sum()
    }

    /// Takes `offset` of partition `p` out of flight if `consumer` holds it; `now` (when
    /// the consumer answered) feeds its adaptive window.
    fn take_inflight(
        &mut self,
        p: usize,
        offset: u64,
        consumer: &str,
        now: Option<u64>,
    ) -> Option<InFlight> {
        let c = self.cursors.get_mut(p)?;
        if c.inflight
            .get(&offset)
            .is_none_or(|f| &*f.consumer != consumer)
        {
            return None;
        }
        let f = c.inflight.remove(&offset)?;
        if let Some(m) = self.members.get_mut(&f.consumer) {
            m.inflight = m.inflight.saturating_sub(1);
            if let Some(now) = now {
                m.observe(now.saturating_sub(f.since));
            }
        }
        Some(f)
    }

    /// Acknowledges `offset` of partition `p` by `consumer`. Counts when the message is
    /// in flight to that consumer or waiting for redelivery (a late ack after a timeout
    /// or a disconnect still saves a redelivery); ignored otherwise. `now` is when the
    /// ack came (the adaptive window measures with it).
    pub fn ack(&mut self, p: usize, offset: u64, consumer: &str, now: u64) -> Settle {
        if self.take_inflight(p, offset, consumer, Some(now)).is_none() {
            let Some(c) = self.cursors.get_mut(p) else {
                return Settle::Ignored;
            };
            if c.retry.remove(&offset).is_none() {
                return Settle::Ignored;
            }
        }
        if let Some(c) = self.cursors.get_mut(p) {
            c.settle_offset(offset);
        }
        Settle::Settled
    }

    /// Forgets the delivery of `offset` of partition `p` in flight, whoever holds it
    /// (it was settled on another node, which leads the partition now).
    pub fn drop_inflight(&mut self, p: usize, offset: u64) {
        let Some(c) = self.cursors.get_mut(p) else {
            return;
        };
        if let Some(f) = c.inflight.remove(&offset)
            && let Some(m) = self.members.get_mut(&f.consumer)
        {
            m.inflight = m.inflight.saturating_sub(1);
        }
    }

    /// Negative acknowledgement by `consumer`: redeliver after the backoff, or hand it
    /// to the dead-letter queue once it has had `max_deliveries`.
    pub fn nack(&mut self, p: usize, offset: u64, consumer: &str, now: u64, s: &Settings) -> Nack {
        let Some(f) = self.take_inflight(p, offset, consumer, Some(now)) else {
            return Nack::Ignored;
        };
        let Some(c) = self.cursors.get_mut(p) else {
            return Nack::Ignored;
        };
        if s.exhausted(f.count) {
            c.dying.insert(offset, f.count);
            Nack::DeadLetter { count: f.count }
        } else {
            let due = now.saturating_add(s.backoff(f.count));
            c.retry.insert(
                offset,
                Retry {
                    count: f.count,
                    due,
                },
            );
            Nack::Retry {
                due,
                count: f.count,
            }
        }
    }

    /// Rejection by `consumer`: straight to the dead-letter queue. Counts for a message
    /// in flight to that consumer or waiting for redelivery. Returns the delivery count
    /// for the dead-letter record, or `None` if ignored.
    pub fn reject(&mut self, p: usize, offset: u64, consumer: &str) -> Option<u32> {
        let count = match self.take_inflight(p, offset, consumer, None) {
            Some(f) => f.count,
            None => self.cursors.get_mut(p)?.retry.remove(&offset)?.count,
        };
        self.cursors.get_mut(p)?.dying.insert(offset, count);
        Some(count)
    }

    /// Ack timeouts: every delivery whose deadline has passed is redelivered now, or
    /// dead-lettered if it has had `max_deliveries`; so is every redelivery that has had
    /// them (its consumer left, or its count was restored). Returns the dead letters.
    #[cfg(test)]
    pub fn expire(&mut self, now: u64, s: &Settings) -> Vec<DeadLetter> {
        self.expire_where(now, s, |_| true)
    }

    /// [`Group::expire`] on the partitions `here` says yes to (a replica that does not
    /// lead a partition leaves its timeouts and dead letters to the leader).
    pub fn expire_where(
        &mut self,
        now: u64,
        s: &Settings,
        here: impl Fn(usize) -> bool,
    ) -> Vec<DeadLetter> {
        let mut dead = Vec::new();
        for (p, c) in self.cursors.iter_mut().enumerate() {
            if !here(p) {
                continue;
            }
            let spent: Vec<(u64, u32)> = c
                .retry
                .iter()
                .filter(|(_, r)| s.exhausted(r.count))
                .map(|(&o, r)| (o, r.count))
                .collect();
            for (offset, count) in spent {
                c.retry.remove(&offset);
                c.dying.insert(offset, count);
                dead.push(DeadLetter {
                    partition: p,
                    offset,
                    count,
                });
            }
            let expired: Vec<u64> = c
                .inflight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(&o, _)| o)
                .collect();
            for offset in expired {
                let Some(f) = c.inflight.remove(&offset) else {
                    continue;
                };
                if let Some(m) = self.members.get_mut(&f.consumer) {
                    m.inflight = m.inflight.saturating_sub(1);
                    m.timed_out();
                }
                if s.exhausted(f.count) {
                    c.dying.insert(offset, f.count);
                    dead.push(DeadLetter {
                        partition: p,
                        offset,
                        count: f.count,
                    });
                } else {
                    c.retry.insert(
                        offset,
                        Retry {
                            count: f.count,
                            due: now,
                        },
                    );
                }
            }
        }
        dead
    }

    /// The dead-letter append of `offset` is durable: it is settled in this group.
    /// Returns false if it was no longer being dead-lettered (e.g. the group was reset).
    pub fn dead_lettered(&mut self, p: usize, offset: u64) -> bool {
        let Some(c) = self.cursors.get_mut(p) else {
            return false;
        };
        if c.dying.remove(&offset).is_none() {
            return false;
        }
        c.settle_offset(offset);
        true
    }

    /// The dead-letter append of `offset` failed: it stays for redelivery (count kept)
    /// from `due` on.
    pub fn dead_letter_failed(&mut self, p: usize, offset: u64, due: u64) {
        if let Some(c) = self.cursors.get_mut(p)
            && let Some(count) = c.dying.remove(&offset)
        {
            c.retry.insert(offset, Retry { count, due });
        }
    }

    /// Moves partition `p` to `offset`: everything from there on is delivered (again),
    /// everything before counts as settled. Outstanding deliveries are forgotten (their
    /// late acks are ignored) and free their consumers' windows.
    pub fn reset(&mut self, p: usize, offset: u64) {
        let Some(c) = self.cursors.get_mut(p) else {
            return;
        };
        for f in std::mem::take(&mut c.inflight).into_values() {
            if let Some(m) = self.members.get_mut(&f.consumer) {
                m.inflight = m.inflight.saturating_sub(1);
            }
        }
        *c = Cursor::restored(offset, []);
    }

    /// Applies a durable delivery count (replaying progress): `offset` of partition `p`
    /// was handed out `count` times and is not settled (unless a later settle says so).
    /// It waits in `retry`, due at once, so its next delivery counts on from there.
    pub fn replay_delivered(&mut self, p: usize, offset: u64, count: u32) {
        let Some(c) = self.cursors.get_mut(p) else {
            return;
        };
        if offset < c.committed || c.acked.contains(&offset) || count == 0 {
            return;
        }
        c.retry.insert(offset, Retry { count, due: 0 });
        c.advance_next();
    }

    /// Another replica's leader delivered `offset` of partition `p` for the `count`-th
    /// time (and, after a nack, redelivers it at `due`, else 0): kept like a restored
    /// count ([`Group::replay_delivered`]), so that if this replica comes to lead the
    /// partition it delivers it again first (not before `due`), as delivery
    /// `count + 1`. What is settled, or held or being dead-lettered here, is left as it
    /// is; a count and its due time only grow.
    pub fn learn_delivered(&mut self, p: usize, offset: u64, count: u32, due: u64) {
        let Some(c) = self.cursors.get_mut(p) else {
            return;
        };
        if offset < c.committed
            || count == 0
            || c.acked.contains(&offset)
            || c.inflight.contains_key(&offset)
            || c.dying.contains_key(&offset)
        {
            return;
        }
        c.undelay(offset);
        let r = c.retry.entry(offset).or_insert(Retry { count, due });
        r.count = r.count.max(count);
        r.due = r.due.max(due);
        c.advance_next();
    }

    /// Applies a durable settle (replaying progress): `offset` counts as settled.
    pub fn replay_settled(&mut self, p: usize, offset: u64) {
        if let Some(c) = self.cursors.get_mut(p) {
            c.retry.remove(&offset);
            c.dying.remove(&offset);
            c.undelay(offset);
            c.settle_offset(offset);
        }
    }

    /// The partition's log now starts at `start` (retention or purge removed what was
    /// before): those offsets count as settled. Deliveries in flight below `start` stay
    /// in flight until acked or timed out; their redelivery is dropped.
    pub fn clamp_start(&mut self, p: usize, start: u64) {
        let Some(c) = self.cursors.get_mut(p) else {
            return;
        };
        if c.committed >= start {
            return;
        }
        c.committed = start;
        c.acked = c.acked.split_off(&start);
        while c.acked.remove(&c.committed) {
            c.committed += 1;
        }
        c.retry = c.retry.split_off(&start);
        c.dying = c.dying.split_off(&start);
        c.retain_delayed(|o| o >= start);
        c.next = c.next.max(c.committed);
        c.advance_next();
    }

    /// The partition's log ends at `end` (its tail was lost in a crash under `buffered`
    /// durability): nothing at or beyond `end` can be settled or outstanding.
    pub fn clamp_end(&mut self, p: usize, end: u64) {
        let Some(c) = self.cursors.get(p) else {
            return;
        };
        if c.committed > end {
            self.reset(p, end);
            return;
        }
        if let Some(c) = self.cursors.get_mut(p) {
            // split_off leaves the offsets below `end` in place.
            let _beyond = c.acked.split_off(&end);
            c.retain_delayed(|o| o < end);
            let _gone = c.retry.split_off(&end);
            c.next = c.next.min(end).max(c.committed);
            c.advance_next();
        }
    }

    /// Whether `offset` of partition `p` is settled in this group.
    pub fn is_settled(&self, p: usize, offset: u64) -> bool {
        self.cursors.get(p).is_some_and(|c| c.is_settled(offset))
    }

    /// Redeliveries waiting for their backoff, across partitions.
    pub fn waiting(&self) -> u64 {
        self.cursors.iter().map(|c| c.retry.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests;
