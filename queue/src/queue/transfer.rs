//! Transfers: one durable step that settles a message of this queue and stores a new
//! record in another queue (or this one). Two features ride on it:
//!
//! - atomic ack-and-produce ([`Queue::ack_and_produce`]): a consumer's produce that
//!   carries `ack-message-id` settles that delivery and stores the new message;
//! - dead-letter redrive ([`Queue::redrive`]): dead letters go back into their queue
//!   and out of the dead-letter queue, for every group of it.
//!
//! The commit point is the transfer record in the source's progress log (see
//! `format.rs`): it settles the message on replay and holds the whole target record.
//! Only once it is durable is the target record appended, tagged with the txn; a done
//! record follows. A crash between the two leaves a transfer without its done record:
//! on open, [`Queue::recover_transfers`] looks for the tagged record in the target
//! partition (from the transfer's timestamp on) and appends it if it is missing. So
//! after a crash both happened or neither, and the target record is never doubled.
//! While the transfer record is being written the message is `dying` in its groups (as
//! for a dead-letter append): not redelivered, and back to redelivery if the write fails.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use roost_storage::{ReadLimit, Record};
use tracing::warn;

use super::{NewMessage, Queue, Reservation, apply_drop, now_ms};
use crate::error::{ProduceError, QueueError};
use crate::format::{self, MAX_SUBTOPIC, MessageId, Progress, Transfer, decode_message};

/// Which dead letters [`Queue::redrive`] moves back into the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// Every dead letter.
    All,
    /// The oldest `n`.
    Count(u64),
    /// These, by the `message-id` the dead-letter queue delivers them with
    /// (`<name>$dlq:0:<offset>`).
    Ids(Vec<MessageId>),
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Each dead letter moved: its id in the dead-letter queue and its new id.
    pub moved: Vec<(MessageId, MessageId)>,
    /// Requested ids that are not dead letters of this queue now.
    pub missing: Vec<MessageId>,
    /// Why the redrive stopped before moving everything asked for (the queue is full,
    /// a write failed), if it did.
    pub stopped: Option<String>,
}

/// A target record, ready to append once its transfer record is durable.
struct Plan {
    txn: u64,
    partition: usize,
    headers: Bytes,
    payload: Bytes,
    size: u64,
    key: Option<Bytes>,
    dedup_id: Option<Bytes>,
    /// Counts the record against the target's limits (none during recovery).
    reservation: Option<Reservation>,
}

/// Dead letters a redrive reads per transfer batch.
const REDRIVE_BATCH: usize = 512;

impl Queue {
    /// Atomic ack-and-produce: settles `id` (a delivery `consumer` holds in this queue)
    /// and stores `msg` in `target`, in one durable step: after a crash either both
    /// happened or neither. Resolves with the new message's id once it is stored.
    /// Fails with [`ProduceError::NotHeld`] if `consumer` does not hold `id` (nothing is
    /// stored then), and with the target's quota errors as a produce would. If `msg`
    /// carries a `dedup-id` the target stored within its window, only the ack happens.
    pub fn ack_and_produce(
        &self,
        consumer: &str,
        id: &MessageId,
        target: &Queue,
        msg: NewMessage,
    ) -> impl Future<Output = Result<MessageId, ProduceError>> + Send + 'static {
        let begun = self.begin_transfer(consumer, id, target, msg);
        let (this, target) = (self.clone(), target.clone());
        async move {
            let (append, p, o, keys, plan) = match begun? {
                Begun::Duplicate(settled, mid) => {
                    settled.await.map_err(|e| match e {
                        QueueError::Storage(s) => ProduceError::Storage(s),
                        other => ProduceError::NotHeld(other.to_string()),
                    })?;
                    return Ok(mid);
                }
                Begun::Appending(a) => *a,
            };
            let txn = plan.txn;
            match append.await {
                Err(e) => {
                    let now = now_ms();
                    this.with_state(|q, st| {
                        let due = now + st.settings.backoff(1);
                        for k in &keys {
                            if let Some(slot) = st.groups.get_mut(k) {
                                slot.group.dead_letter_failed(p, o, due);
                            }
                        }
                        q.dispatch_all(st, now);
                    });
                    return Err(e.into());
                }
                Ok(offset) => {
                    this.inner.ledger.lock().open.insert(txn, offset);
                    this.with_state(|q, st| {
                        for k in &keys {
                            if let Some(slot) = st.groups.get_mut(k) {
                                slot.group.dead_lettered(p, o);
                            }
                        }
                        st.dirty = true;
                        q.dispatch_all(st, now_ms());
                    });
                }
            }
            this.store_transfer(&target, plan).await
        }
    }

    fn begin_transfer(
        &self,
        consumer: &str,
        id: &MessageId,
        target: &Queue,
        msg: NewMessage,
    ) -> Result<Begun, ProduceError> {
        let not_held = || ProduceError::NotHeld(id.to_string());
        let (p, o) = self.locate(id).ok_or_else(not_held)?;
        if let Some(d) = &msg.dedup_id {
            let (window, max) = {
                let c = target.inner.config.read();
                (c.dedup_window_ms, c.dedup_max_ids)
            };
            let stored = target.inner.dedup.lock().stored(d, now_ms(), window, max);
            if let Some(mid) = stored {
                let settled = self.ack(consumer, None, id);
                if !settled.found {
                    return Err(not_held());
                }
                return Ok(Begun::Duplicate(settled, mid));
            }
        }
        let txn = self.inner.ledger.lock().next_txn(now_ms());
        let plan = self.plan(target, msg, txn, None)?;
        let keys = self.with_state(|q, st| {
            let keys: Vec<_> = Queue::settle_targets(st, None, consumer, p, o)
                .into_iter()
                .filter(|k| {
                    st.groups
                        .get_mut(k)
                        .and_then(|slot| slot.group.reject(p, o, consumer))
                        .is_some()
                })
                .collect();
            if !keys.is_empty() {
                q.dispatch_all(st, now_ms());
            }
            keys
        });
        if keys.is_empty() {
            return Err(not_held());
        }
        let record = Progress::Transfer(Transfer {
            txn,
            drop: false,
            keys: keys.clone(),
            partition: p as u32,
            offset: o,
            target: target.name().to_owned(),
            target_partition: plan.partition as u32,
            headers: plan.headers.clone(),
            payload: plan.payload.clone(),
        });
        let append = self.append_progress(vec![record]);
        Ok(Begun::Appending(Box::new((append, p, o, keys, plan))))
    }

    /// The target record of transfer `txn` carrying `msg` into `target` (into
    /// `partition`, else where a produce would go), counted against its limits.
    fn plan(
        &self,
        target: &Queue,
        msg: NewMessage,
        txn: u64,
        partition: Option<usize>,
    ) -> Result<Plan, ProduceError> {
        target
            .check_deleted()
            .map_err(|_| ProduceError::Deleted(target.name().into()))?;
        if msg.subtopic.len() > MAX_SUBTOPIC {
            return Err(ProduceError::SubtopicTooLong(msg.subtopic.len()));
        }
        let mut meta = target.meta_of(&msg)?;
        meta.transfer = Some((Bytes::copy_from_slice(self.name().as_bytes()), txn));
        let headers = format::encode_message(&msg.subtopic, None, &meta, &msg.headers);
        let size = (29 + headers.len() + msg.payload.len()) as u64;
        let reservation = target.reserve(size)?;
        let n = target.partitions() as usize;
        let partition = partition
            .filter(|&p| p < n)
            .unwrap_or_else(|| target.pick_partition(&msg, n));
        Ok(Plan {
            txn,
            partition,
            headers,
            payload: msg.payload,
            size,
            key: meta.key,
            dedup_id: meta.dedup_id,
            reservation: Some(reservation),
        })
    }

    /// Appends the target record of a transfer whose record is durable (queued before
    /// this returns), then records the transfer as done.
    fn store_transfer(
        &self,
        target: &Queue,
        plan: Plan,
    ) -> impl Future<Output = Result<MessageId, ProduceError>> + Send + 'static {
        let append = target.logs().get(plan.partition).map(|log| {
            log.append(vec![Record::now(
                plan.headers.clone(),
                plan.payload.clone(),
            )])
        });
        let (this, target) = (self.clone(), target.clone());
        async move {
            let Some(append) = append else {
                return Err(ProduceError::Deleted(target.name().into()));
            };
            let result = append.await;
            let Plan {
                txn,
                partition,
                size,
                key,
                dedup_id,
                reservation,
                ..
            } = plan;
            drop(reservation);
            let offset = match result {
                Ok(o) => o,
                Err(e) => {
                    warn!(queue = %this.name(), target = %target.name(), txn, error = %e,
                          "transfer's target append failed; it is retried at the next start");
                    return Err(e.into());
                }
            };
            target.stored(partition, offset, size, key.as_ref());
            let id = MessageId {
                queue: target.inner.name.clone(),
                partition: partition as u32,
                offset,
            };
            if let Some(d) = dedup_id {
                target.inner.dedup.lock().insert(d, id.clone(), now_ms());
            }
            this.inner.ledger.lock().open.remove(&txn);
            // Not awaited: a snapshot (the only thing that deletes the transfer record)
            // is appended after it, so it is durable before the record can go.
            let _queued = this.append_progress(vec![Progress::TransferDone(txn)]);
            Ok(id)
        }
    }

    /// Moves dead letters back into this queue (into the partition they came from),
    /// each in one durable step with its removal from the dead-letter queue, for
    /// every group of that queue, present and future. Their delivery counts start
    /// again. A dead letter in flight to a dead-letter consumer is moved too (its ack
    /// then changes nothing).
    pub async fn redrive(&self, which: Redrive) -> Result<RedriveReport, QueueError> {
        self.check_deleted()?;
        let Some(dlq) = self.inner.dead_letters.clone() else {
            return Err(QueueError::InvalidConfig(
                "a dead-letter queue has no dead letters to redrive".into(),
            ));
        };
        let Some(log) = dlq.logs().first().cloned() else {
            return Ok(RedriveReport::default());
        };
        let (start, end) = (log.start_offset(), log.next_offset());
        let mut report = RedriveReport::default();
        // What may be moved: above the floor, not dropped, not settled by every group
        // (a dead-letter consumer acked it), not being moved by another redrive.
        let candidates: Vec<u64> = {
            let st = dlq.inner.state.lock();
            let ledger = dlq.inner.ledger.lock();
            let from = st.floors.first().copied().unwrap_or(0).max(start);
            let is_dead_letter = |o: u64| {
                o >= from
                    && o < end
                    && !st.dropped.first().is_some_and(|d| d.contains(&o))
                    && !ledger.moving.contains(&(0, o))
                    && (st.groups.is_empty()
                        || st.groups.values().any(|s| !s.group.is_settled(0, o)))
            };
            match &which {
                Redrive::Ids(ids) => {
                    let mut found = Vec::new();
                    for id in ids {
                        if *id.queue == *dlq.inner.name
                            && id.partition == 0
                            && is_dead_letter(id.offset)
                        {
                            found.push(id.offset);
                        } else {
                            report.missing.push(id.clone());
                        }
                    }
                    found.sort_unstable();
                    found.dedup();
                    found
                }
                Redrive::All => (from..end).filter(|&o| is_dead_letter(o)).collect(),
                Redrive::Count(n) => (from..end)
                    .filter(|&o| is_dead_letter(o))
                    .take(usize::try_from(*n).unwrap_or(usize::MAX))
                    .collect(),
            }
        };
        for chunk in candidates.chunks(REDRIVE_BATCH) {
            dlq.inner
                .ledger
                .lock()
                .moving
                .extend(chunk.iter().map(|&o| (0, o)));
            let moved = self.redrive_batch(&dlq, chunk, &mut report).await;
            {
                let mut ledger = dlq.inner.ledger.lock();
                for &o in chunk {
                    ledger.moving.remove(&(0, o));
                }
            }
            moved?;
            if report.stopped.is_some() {
                break;
            }
        }
        Ok(report)
    }

    /// Redrives the dead letters at `offsets` of `dlq` (claimed in its `moving`).
    async fn redrive_batch(
        &self,
        dlq: &Queue,
        offsets: &[u64],
        report: &mut RedriveReport,
    ) -> Result<(), QueueError> {
        let Some(log) = dlq.logs().first().cloned() else {
            return Ok(());
        };
        let mut plans = Vec::new();
        let mut records = Vec::new();
        for &o in offsets {
            let read = log.read(
                o,
                ReadLimit {
                    max_records: 1,
                    max_bytes: 1,
                },
            );
            let record = match read {
                Ok(mut r) if r.first().is_some_and(|r| r.offset == o) => r.swap_remove(0),
                // Retention took it meanwhile: not a dead letter any more.
                _ => continue,
            };
            let Some(h) = decode_message(&record.headers) else {
                continue;
            };
            let msg = NewMessage {
                subtopic: String::from_utf8_lossy(&h.subtopic).into_owned(),
                headers: h.headers,
                payload: record.payload,
                ..NewMessage::default()
            };
            let txn = dlq.inner.ledger.lock().next_txn(now_ms());
            let home = h.origin.map(|origin| origin.partition as usize);
            let plan = match dlq.plan(self, msg, txn, home) {
                Ok(p) => p,
                Err(e) => {
                    report.stopped = Some(e.to_string());
                    break;
                }
            };
            records.push(Progress::Transfer(Transfer {
                txn,
                drop: true,
                keys: Vec::new(),
                partition: 0,
                offset: o,
                target: self.name().to_owned(),
                target_partition: plan.partition as u32,
                headers: plan.headers.clone(),
                payload: plan.payload.clone(),
            }));
            plans.push((o, plan));
        }
        if plans.is_empty() {
            return Ok(());
        }
        let first = dlq.append_progress(records).await?;
        let dropped: Vec<u64> = plans.iter().map(|(o, _)| *o).collect();
        {
            let mut ledger = dlq.inner.ledger.lock();
            for (_, plan) in &plans {
                ledger.open.insert(plan.txn, first);
            }
        }
        let start = log.start_offset();
        dlq.with_state(|_, st| {
            apply_drop(st, 0, &dropped, start);
            st.dirty = true;
        });
        dlq.inner.room.notify_waiters();
        let stores: Vec<_> = plans
            .into_iter()
            .map(|(o, plan)| (o, dlq.store_transfer(self, plan)))
            .collect();
        for (o, store) in stores {
            let from = MessageId {
                queue: dlq.inner.name.clone(),
                partition: 0,
                offset: o,
            };
            match store.await {
                Ok(to) => report.moved.push((from, to)),
                Err(e) => report.stopped = Some(e.to_string()),
            }
        }
        Ok(())
    }

    /// Finishes the transfers out of this queue that replay found without their done
    /// record (the broker stopped between a transfer record and its target record):
    /// appends each target record that is not in its target partition yet. `find`
    /// gives a queue by name. Blocks on disk I/O. Returns what it did, for the log.
    pub(crate) fn recover_transfers(&self, find: impl Fn(&str) -> Option<Queue>) -> Vec<String> {
        let recovered = std::mem::take(&mut self.inner.ledger.lock().recovered);
        let mut notes = Vec::new();
        for (txn, r) in recovered {
            let t = r.transfer;
            let Some(target) = find(&t.target) else {
                notes.push(format!(
                    "queue {}: transfer {txn} to queue {} (deleted) dropped",
                    self.name(),
                    t.target
                ));
                let _queued = self.append_progress(vec![Progress::TransferDone(txn)]);
                continue;
            };
            let partition = t.target_partition as usize;
            match self.find_transfer(&target, partition, txn, r.timestamp) {
                Ok(true) => {
                    let _queued = self.append_progress(vec![Progress::TransferDone(txn)]);
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    notes.push(format!(
                        "queue {}: transfer {txn} not checked in {} ({e}); kept for the next start",
                        self.name(),
                        t.target
                    ));
                    continue;
                }
            }
            let key = decode_message(&t.headers).and_then(|h| {
                target
                    .inner
                    .config
                    .read()
                    .last_value
                    .then_some(h.meta.key)?
            });
            let plan = Plan {
                txn,
                partition,
                size: (29 + t.headers.len() + t.payload.len()) as u64,
                headers: t.headers,
                payload: t.payload,
                key,
                dedup_id: None,
                reservation: None,
            };
            match block_on(self.store_transfer(&target, plan)) {
                Ok(id) => notes.push(format!(
                    "queue {}: unfinished transfer {txn} completed: stored as {id}",
                    self.name()
                )),
                Err(e) => notes.push(format!(
                    "queue {}: unfinished transfer {txn} still not stored ({e}); kept for the next start",
                    self.name()
                )),
            }
        }
        notes
    }

    /// Whether `target`'s partition holds the record of transfer `txn` from this
    /// queue (written at or after `since`).
    fn find_transfer(
        &self,
        target: &Queue,
        partition: usize,
        txn: u64,
        since: u64,
    ) -> Result<bool, roost_storage::Error> {
        let Some(log) = target.logs().get(partition).cloned() else {
            return Ok(false);
        };
        let mut from = log.offset_for_timestamp(since)?;
        while from < log.next_offset() {
            let batch = log.read(from, ReadLimit::bytes(1 << 20))?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                from = rec.offset + 1;
                let tagged = decode_message(&rec.headers).and_then(|h| h.meta.transfer);
                if tagged
                    .is_some_and(|(source, t)| t == txn && &source[..] == self.name().as_bytes())
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

/// How [`Queue::ack_and_produce`] began.
enum Begun {
    /// The message's `dedup-id` is stored already: only the ack (this settle).
    Duplicate(super::Settled, MessageId),
    /// The transfer record is being appended.
    Appending(Box<Appending>),
}

/// The transfer record's append, the settled message, its groups and the target record.
type Appending = (
    roost_storage::Append,
    usize,
    u64,
    Vec<crate::group::GroupKey>,
    Plan,
);

/// Runs `f` to completion on this thread (recovery at open, before any runtime work:
/// the appends it waits for are resolved by the storage's own threads).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(test)]
impl Queue {
    /// Test hook: an ack-and-produce that "crashes" after its transfer record is
    /// durable and before its target record is appended.
    pub(crate) async fn transfer_record_only(
        &self,
        consumer: &str,
        id: &MessageId,
        target: &Queue,
        msg: NewMessage,
    ) -> bool {
        match self.begin_transfer(consumer, id, target, msg) {
            Ok(Begun::Appending(a)) => a.0.await.is_ok(),
            _ => false,
        }
    }
}
