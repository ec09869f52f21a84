//! The Raft logs of every replicated partition on this node, on roost's segment
//! storage: one `Fsync` log per partition, all in one [`Storage`], so one fdatasync
//! covers a round of appends of every partition (as RabbitMQ's `ra` shares one WAL).
//!
//! Records are tagged like the control plane's (`E` entry, `V` vote, `T` truncation,
//! `P` purge, and `C` the committed log id). Unlike the control plane, an entry is not
//! kept in memory once its record is durable: the log remembers where it is and reads
//! it back when a follower needs it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use parking_lot::Mutex;
use roost_storage::{Durability, Log, LogConfig, Offset, ReadLimit, Record, Storage};

use super::types::{Op, PartConfig};
use crate::raft::types::NodeId;

const ENTRY: u8 = b'E';
const VOTE: u8 = b'V';
const TRUNCATE: u8 = b'T';
const PURGE: u8 = b'P';
const COMMITTED: u8 = b'C';

/// The messages an entry stores: the offset the state machine gives the first, and
/// how many (the k-th message of the log gets offset k).
#[derive(Clone, Copy)]
struct Produced {
    first: u64,
    count: u64,
}

enum Slot {
    /// Being written: kept until its offset is known.
    Memory(Box<Entry<PartConfig>>, Option<Produced>),
    /// On disk at this offset.
    Disk(LogId<NodeId>, Offset, Option<Produced>),
}

impl Slot {
    fn log_id(&self) -> LogId<NodeId> {
        match self {
            Slot::Memory(e, _) => e.log_id,
            Slot::Disk(id, _, _) => *id,
        }
    }

    fn produced(&self) -> Option<Produced> {
        match self {
            Slot::Memory(_, k) | Slot::Disk(_, _, k) => *k,
        }
    }
}

fn op_of(e: &Entry<PartConfig>) -> Option<&Op> {
    match &e.payload {
        EntryPayload::Normal(op) => Some(op),
        _ => None,
    }
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, Slot>,
    vote: Option<Vote<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// The number of messages the log's entries store.
    produced: u64,
    /// The number of messages of the entries purged.
    purged_produced: u64,
}

impl State {
    /// Adds `entry` at its index, dropping what followed it (a conflict rewrote the
    /// log from there), with `at` (its record, when on disk). Returns what messages it
    /// stores.
    fn insert(&mut self, entry: Entry<PartConfig>, at: Option<Offset>) -> Option<Produced> {
        let index = entry.log_id.index;
        self.cut(index);
        let count = op_of(&entry).map_or(0, Op::produces);
        let produced = (count > 0).then_some(Produced {
            first: self.produced,
            count,
        });
        self.produced += count;
        let slot = match at {
            Some(offset) => Slot::Disk(entry.log_id, offset, produced),
            None => Slot::Memory(Box::new(entry), produced),
        };
        self.entries.insert(index, slot);
        produced
    }

    /// Drops the entries from `index` on.
    fn cut(&mut self, index: u64) {
        if self.entries.split_off(&index).is_empty() {
            return;
        }
        self.produced = self
            .entries
            .values()
            .rev()
            .find_map(Slot::produced)
            .map_or(self.purged_produced, |k| k.first + k.count);
    }

    /// Forgets the entries up to `upto`.
    fn purge(&mut self, upto: LogId<NodeId>) {
        let kept = self.entries.split_off(&(upto.index + 1));
        if let Some(k) = self.entries.values().rev().find_map(Slot::produced) {
            self.purged_produced = k.first + k.count;
        }
        self.entries = kept;
        self.last_purged = Some(upto);
    }
}

/// Proposals waiting for their entry to be on this node's disk (`ack_mode = "leader"`):
/// request id -> where to send the message's offset.
pub type EarlyWaiters = Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<u64>>>>;

/// The Raft log of one partition (cheap to clone: openraft asks for readers).
#[derive(Clone)]
pub struct PartLog {
    log: Log,
    state: Arc<Mutex<State>>,
    early: EarlyWaiters,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl PartLog {
    /// Opens (or creates) log `name` in `storage` and reads its history back.
    pub fn open(storage: &Storage, name: &str) -> Result<PartLog, String> {
        let config = LogConfig {
            durability: Durability::Fsync,
            segment_bytes: 16 << 20,
            ..LogConfig::default()
        };
        let (log, recovery) = storage
            .open_log(name, config)
            .map_err(|e| format!("cannot open partition log {name}: {e}"))?;
        if !recovery.is_clean() {
            tracing::warn!("partition log {name} recovered: {recovery:?}");
        }
        let mut state = State::default();
        let mut at = log.start_offset();
        let end = log.next_offset();
        while at < end {
            let records = log
                .read(at, ReadLimit::bytes(4 << 20))
                .map_err(|e| format!("cannot read partition log {name} at {at}: {e}"))?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for r in records {
                replay(&mut state, &r.headers, &r.payload, r.offset)
                    .map_err(|e| format!("partition log {name}: {e}"))?;
            }
        }
        Ok(PartLog {
            log,
            state: Arc::new(Mutex::new(state)),
            early: EarlyWaiters::default(),
        })
    }

    /// Where `ack_mode = "leader"` proposals wait for their entry (see
    /// [`EarlyWaiters`]).
    pub fn early_waiters(&self) -> EarlyWaiters {
        self.early.clone()
    }

    fn append_record(&self, kind: u8, body: Vec<u8>) -> roost_storage::Append {
        self.log.append(vec![Record::now(
            Bytes::from(vec![kind]),
            Bytes::from(body),
        )])
    }

    fn read_entry(&self, offset: Offset) -> Result<Entry<PartConfig>, std::io::Error> {
        let records = self
            .log
            .read(
                offset,
                ReadLimit {
                    max_records: 1,
                    max_bytes: usize::MAX,
                },
            )
            .map_err(io_err)?;
        let r = records
            .into_iter()
            .next()
            .filter(|r| r.offset == offset && r.headers.first() == Some(&ENTRY))
            .ok_or_else(|| io_err(format!("entry record {offset} is missing")))?;
        serde_json::from_slice(&r.payload).map_err(io_err)
    }
}

fn replay(state: &mut State, headers: &[u8], payload: &[u8], offset: Offset) -> Result<(), String> {
    let bad = |e: serde_json::Error| format!("record {offset} is damaged: {e}");
    match headers.first() {
        Some(&ENTRY) => {
            let entry: Entry<PartConfig> = serde_json::from_slice(payload).map_err(bad)?;
            // A rewritten index replaces what followed it, as in `truncate`.
            state.insert(entry, Some(offset));
        }
        Some(&VOTE) => state.vote = Some(serde_json::from_slice(payload).map_err(bad)?),
        Some(&COMMITTED) => state.committed = serde_json::from_slice(payload).map_err(bad)?,
        Some(&TRUNCATE) => {
            let since: u64 = serde_json::from_slice(payload).map_err(bad)?;
            state.cut(since);
        }
        Some(&PURGE) => {
            let upto: LogId<NodeId> = serde_json::from_slice(payload).map_err(bad)?;
            state.purge(upto);
        }
        _ => return Err(format!("record {offset} has an unknown kind")),
    }
    Ok(())
}

impl RaftLogReader<PartConfig> for PartLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<PartConfig>>, StorageError<NodeId>> {
        // Collected under the lock, read from disk outside it.
        enum Got {
            Ready(Entry<PartConfig>),
            At(Offset),
        }
        let got: Vec<Got> = {
            let s = self.state.lock();
            s.entries
                .range(range)
                .map(|(_, slot)| match slot {
                    Slot::Memory(e, _) => Got::Ready((**e).clone()),
                    Slot::Disk(_, at, _) => Got::At(*at),
                })
                .collect()
        };
        let mut out = Vec::with_capacity(got.len());
        for g in got {
            out.push(match g {
                Got::Ready(e) => e,
                Got::At(at) => self
                    .read_entry(at)
                    .map_err(|e| StorageIOError::read_logs(&e))?,
            });
        }
        Ok(out)
    }
}

impl RaftLogStorage<PartConfig> for PartLog {
    type LogReader = PartLog;

    async fn get_log_state(&mut self) -> Result<LogState<PartConfig>, StorageError<NodeId>> {
        let s = self.state.lock();
        let last = s.entries.values().next_back().map(Slot::log_id);
        Ok(LogState {
            last_purged_log_id: s.last_purged,
            last_log_id: last.or(s.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let body = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.append_record(VOTE, body)
            .await
            .map_err(|e| StorageIOError::write_vote(&io_err(e)))?;
        self.state.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not awaited: a lost one only means re-learning the commit from the leader.
        let body = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&e))?;
        drop(self.append_record(COMMITTED, body));
        self.state.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<PartConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<PartConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<PartConfig>> = entries.into_iter().collect();
        let mut records = Vec::with_capacity(entries.len());
        for e in &entries {
            let body = serde_json::to_vec(e).map_err(|e| StorageIOError::write_logs(&e))?;
            records.push(Record::now(Bytes::from_static(&[ENTRY]), Bytes::from(body)));
        }
        let append = self.log.append(records);
        let ids: Vec<LogId<NodeId>> = entries.iter().map(|e| e.log_id).collect();
        // (request id, offset of the first message) of the entries whose proposer
        // waits for this write.
        let mut early = Vec::new();
        {
            let mut s = self.state.lock();
            for e in entries {
                let r = op_of(&e).and_then(Op::early);
                // Appended after a conflict: what followed the index is gone.
                if let (Some(r), Some(k)) = (r, s.insert(e, None)) {
                    early.push((r, k.first));
                }
            }
        }
        let state = self.state.clone();
        let waiters = self.early.clone();
        tokio::spawn(async move {
            match append.await {
                Ok(first) => {
                    let mut s = state.lock();
                    for (i, id) in ids.into_iter().enumerate() {
                        if let Some(slot) = s.entries.get_mut(&id.index)
                            && slot.log_id() == id
                        {
                            *slot = Slot::Disk(id, first + i as u64, slot.produced());
                        }
                    }
                    drop(s);
                    callback.log_io_completed(Ok(()));
                    if !early.is_empty() {
                        let mut w = waiters.lock();
                        for (r, k) in early {
                            if let Some(tx) = w.remove(&r) {
                                let _ = tx.send(k);
                            }
                        }
                    }
                }
                Err(e) => callback.log_io_completed(Err(io_err(e))),
            }
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let body = serde_json::to_vec(&log_id.index).map_err(|e| StorageIOError::write_logs(&e))?;
        self.append_record(TRUNCATE, body)
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        self.state.lock().cut(log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Snapshots are off for partitions (the log is kept whole), so openraft never
        // purges; recorded anyway for a correct replay should it do so.
        let body = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.append_record(PURGE, body)
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        self.state.lock().purge(log_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn entry(index: u64, op: Op) -> Entry<PartConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(op),
        }
    }

    fn produce() -> Op {
        Op::Produce {
            subtopic: String::new(),
            key: None,
            headers: Vec::new(),
            payload: vec![1],
            dedup_id: None,
            deliver_at: None,
            early: None,
        }
    }

    fn batch(produces: usize) -> Op {
        let mut ops = vec![Op::Settle {
            group: "g".into(),
            filter: None,
            offsets: vec![0],
        }];
        ops.extend((0..produces).map(|_| produce()));
        Op::Batch { ops, early: None }
    }

    fn first(p: Option<Produced>) -> Option<(u64, u64)> {
        p.map(|p| (p.first, p.count))
    }

    #[test]
    fn entries_count_the_messages_they_store_across_batches_cuts_and_purges() {
        let mut s = State::default();
        assert_eq!(first(s.insert(entry(1, produce()), None)), Some((0, 1)));
        assert_eq!(first(s.insert(entry(2, batch(3)), Some(7))), Some((1, 3)));
        assert_eq!(first(s.insert(entry(3, batch(0)), None)), None);
        assert_eq!(first(s.insert(entry(4, batch(2)), None)), Some((4, 2)));
        assert_eq!(s.produced, 6);
        // A conflict rewrites the log from index 3: the messages of 3 and 4 are gone.
        assert_eq!(first(s.insert(entry(3, produce()), None)), Some((4, 1)));
        assert_eq!(s.produced, 5);
        s.cut(2);
        assert_eq!(s.produced, 1);
        s.insert(entry(2, batch(2)), None);
        s.purge(LogId::new(CommittedLeaderId::new(1, 1), 2));
        assert_eq!(s.produced, 3);
        s.insert(entry(3, produce()), None);
        s.cut(3);
        assert_eq!(s.produced, 3, "what was purged still counts");
    }
}
