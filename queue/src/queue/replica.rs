//! A queue whose partitions a cluster replicates (roost-cluster, "cluster II").
//!
//! The queue stays the state machine: every replica of a partition holds a full copy
//! of it (records, group progress) in its own queue, and changes it only as the
//! partition's replicated log says. A [`Replicator`] installed on the queue takes what
//! a client asks for instead: [`Queue::produce`] goes to the partition's log (and
//! resolves once it is committed there, which applies it here through
//! [`Queue::apply_produce`]), and a settle is passed on with [`Replicator::settled`]
//! (applied on every replica with [`Queue::apply_settle`]). Only the partitions this
//! node leads are delivered from here ([`Queue::set_led`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{NewMessage, Queue};
use crate::error::ProduceError;
use crate::format::MessageId;
use crate::group::GroupKey;
use crate::replication::{ReplicatedProduce, Replicator, SettleHow};
use crate::{DeliverySink, QueueDelivery};

impl Queue {
    /// Hands the queue's partitions to `replicator`: from now on produces and settles
    /// go through it, and no partition is delivered from here until
    /// [`Queue::set_led`] says this node leads it.
    pub fn set_replicator(&self, replicator: Arc<dyn Replicator>) {
        let r = &self.inner.replica;
        *r.led.write() = vec![false; self.partitions() as usize];
        *r.replicator.write() = Some(replicator);
    }

    /// Whether the queue's partitions are replicated.
    pub fn is_replicated(&self) -> bool {
        self.inner.replica.replicator.read().is_some()
    }

    pub(super) fn replicator(&self) -> Option<Arc<dyn Replicator>> {
        self.inner.replica.replicator.read().clone()
    }

    /// Whether this node delivers partition `p` (always, unless replicated).
    pub(super) fn is_led(&self, p: usize) -> bool {
        let r = &self.inner.replica;
        if r.replicator.read().is_none() {
            return true;
        }
        r.led.read().get(p).copied().unwrap_or(false)
    }

    /// This node leads partition `p` now (or no longer): its consumers here get its
    /// messages (or stop getting them; what they hold stays theirs to settle).
    pub fn set_led(&self, p: u32, led: bool) {
        {
            let mut l = self.inner.replica.led.write();
            if let Some(slot) = l.get_mut(p as usize) {
                *slot = led;
            }
        }
        if led {
            self.kick();
        }
    }

    /// The offset the next record of partition `p` gets.
    pub fn next_offset(&self, p: u32) -> Option<u64> {
        self.logs().get(p as usize).map(|l| l.next_offset())
    }

    /// The replicated half of [`Queue::produce`]. Limits are checked here, where the
    /// produce arrives; the partition is picked here too (round-robin and hashes are
    /// this node's).
    pub(super) fn produce_replicated(
        &self,
        r: Arc<dyn Replicator>,
        msg: NewMessage,
    ) -> ReplicatedProduce {
        let refuse = |e: ProduceError| -> ReplicatedProduce { Box::pin(async move { Err(e) }) };
        if self.inner.deleted.load(Ordering::SeqCst) {
            return refuse(ProduceError::Deleted(self.inner.name.to_string()));
        }
        // What applying it would refuse is refused here, before it is in the log:
        // every replica must store every produce the log commits.
        if msg.subtopic.len() > super::MAX_SUBTOPIC {
            return refuse(ProduceError::SubtopicTooLong(msg.subtopic.len()));
        }
        if let Err(e) = self.meta_of(&msg) {
            return refuse(e);
        }
        let size = (msg.payload.len() + msg.headers.len() + msg.subtopic.len()) as u64;
        if !self.has_room(size) {
            self.inner.quota_refusals.fetch_add(1, Ordering::Relaxed);
            let cfg = self.inner.config.read();
            let what = if self.depth() >= cfg.max_depth {
                "max_depth"
            } else {
                "max_bytes"
            };
            return refuse(ProduceError::QuotaExceeded {
                queue: self.inner.name.to_string(),
                what,
            });
        }
        let p = self.pick_partition(&msg, self.partitions() as usize);
        r.produce(p as u32, msg)
    }

    /// Applies a produce the replicated log of partition `p` committed: appends it
    /// here as it is (no limit, no dedup: the log decided), resolving with its id
    /// once it is durable under the queue's durability.
    pub fn apply_produce(
        &self,
        p: u32,
        msg: NewMessage,
    ) -> impl Future<Output = Result<MessageId, ProduceError>> + Send + 'static {
        let started = self.start_produce_at(msg, None, Some(p as usize));
        let this = self.clone();
        async move { this.finish_produce(started?).await }
    }

    /// Applies a settle the replicated log committed: group `key` (declared here if
    /// new) is past these offsets. Resolves once the progress record is durable.
    pub fn apply_settle(
        &self,
        key: &GroupKey,
        offsets: &[(u32, u64)],
    ) -> impl Future<Output = Result<(), crate::QueueError>> + Send + 'static {
        let partitions = self.partitions();
        let append = self.with_state(|q, st| {
            q.ensure_group(st, key);
            let slot = st.groups.get_mut(key)?;
            let mut done = Vec::new();
            for &(p, o) in offsets.iter().filter(|(p, _)| *p < partitions) {
                // Held here (this node led the partition and delivered it): settled
                // as an ack; otherwise recorded as progress.
                slot.group.drop_inflight(p as usize, o);
                slot.group.replay_settled(p as usize, o);
                done.push((p, o));
            }
            st.dirty = true;
            (!done.is_empty())
                .then(|| q.append_progress(vec![super::Progress::Settle(key.clone(), done)]))
        });
        self.kick();
        async move {
            if let Some(a) = append {
                a.await.map_err(crate::QueueError::from)?;
            }
            Ok(())
        }
    }

    /// Passes the delivery counts of a dispatch (its `Progress::Delivered` records) to
    /// the replicator, if any.
    pub(super) fn replicate_delivered(&self, counts: &[super::Progress]) {
        let Some(r) = self.replicator() else {
            return;
        };
        for c in counts {
            if let super::Progress::Delivered(key, items) = c {
                r.delivered(key, items);
            }
        }
    }

    /// Applies delivery counts the replicated log of partition `p` committed: group
    /// `key` (declared here if new) delivered these (offset, count, redelivery time:
    /// after a nack, else 0)s. The leader that made them has them in flight already;
    /// another replica keeps them (see `Group::learn_delivered`) and records the
    /// counts in its progress, so a restart keeps them too (the backoff, as on one
    /// node, lives in memory only).
    pub fn apply_delivered(&self, key: &GroupKey, p: u32, counts: &[(u64, u32, u64)]) {
        if p >= self.partitions() || self.is_led(p as usize) {
            return;
        }
        let append = self.with_state(|q, st| {
            q.ensure_group(st, key);
            let slot = st.groups.get_mut(key)?;
            for &(o, n, due) in counts {
                slot.group.learn_delivered(p as usize, o, n, due);
            }
            let items = counts.iter().map(|&(o, n, _)| (p, o, n)).collect();
            Some(q.append_progress(vec![super::Progress::Delivered(key.clone(), items)]))
        });
        // Not awaited, as a leader's own delivery counts are not.
        drop(append);
    }

    /// `consumer` stands for a consumer of another node: it joins like a local one
    /// (with `sink` passing deliveries over the link), and its settles are done here.
    pub fn join_proxy(
        &self,
        key: &GroupKey,
        consumer: Arc<str>,
        window: u32,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<(), crate::QueueError> {
        self.inner.replica.proxies.write().insert(consumer.clone());
        self.join(key, consumer, window, sink)
    }

    /// Removes a proxy member from every group (its node went away or its consumer
    /// left): what it held is delivered again.
    pub fn leave_proxy(&self, key: Option<&GroupKey>, consumer: &str) {
        // Still a proxy while it leaves: its leaving is not passed on.
        self.inner
            .replica
            .proxies
            .write()
            .insert(Arc::from(consumer));
        match key {
            Some(k) => self.leave(k, consumer),
            None => {
                self.leave_all(consumer);
                self.inner.replica.proxies.write().remove(consumer);
            }
        }
    }

    /// A delivery another node's leader made to `consumer` of group `key` here:
    /// handed to the consumer's connection; false if it cannot take it now (or is
    /// not a member here any more).
    pub fn offer_from_leader(&self, key: &GroupKey, consumer: &str, d: QueueDelivery) -> bool {
        let sink = {
            let st = self.inner.state.lock();
            st.groups
                .get(key)
                .and_then(|slot| slot.sinks.get(consumer).cloned())
        };
        sink.is_some_and(|s| s.offer(d))
    }

    /// Before a settle is done here: passes it on when another node delivered it.
    pub(super) fn settled_elsewhere(
        &self,
        how: SettleHow,
        consumer: &str,
        key: Option<&GroupKey>,
        id: &MessageId,
    ) -> bool {
        let Some(r) = self.replicator() else {
            return false;
        };
        if self.is_led(id.partition as usize)
            || self.inner.replica.proxies.read().contains(consumer)
        {
            return false;
        }
        r.settle_elsewhere(how, consumer, key, id)
    }

    pub(super) fn tell_joined(&self, key: &GroupKey, consumer: &str, window: u32) {
        if let Some(r) = self.replicator()
            && !self.inner.replica.proxies.read().contains(consumer)
        {
            r.joined(key, consumer, window);
        }
    }

    pub(super) fn tell_left(&self, key: Option<&GroupKey>, consumer: &str) {
        if let Some(r) = self.replicator()
            && !self.inner.replica.proxies.read().contains(consumer)
        {
            r.left(key, consumer);
        }
    }
}
