//! The control plane's Raft log, on roost's own segment storage (one `Fsync` log in
//! the node's data directory, group-committed like every other log).
//!
//! The log is a history of records, each a JSON body tagged by its header byte: an
//! entry (`E`), the vote (`V`), a truncation of the entries from an index on (`T`,
//! a conflict Raft resolved), a purge up to a log id (`P`, entries a snapshot
//! covers). Reading the history in order gives the state: the entries in a map by
//! index, the last vote, the last purge. Entries are few (membership, session owners,
//! routes: writes are rare) and all of them since the last purge are kept in memory.
//!
//! Invariant: a purge first appends the current vote and purge marker again, then
//! drops the storage's prefix before the oldest record still needed, so what remains
//! read in order still gives the same state.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use roost_storage::{Durability, Log, LogConfig, Offset, ReadLimit, Record, Storage};

use super::types::{NodeId, TypeConfig};

const ENTRY: u8 = b'E';
const VOTE: u8 = b'V';
const TRUNCATE: u8 = b'T';
const PURGE: u8 = b'P';

#[derive(Default)]
struct State {
    /// By index, with the offset of its record once that is known (durable).
    entries: BTreeMap<u64, (Entry<TypeConfig>, Option<Offset>)>,
    vote: Option<Vote<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
}

/// The Raft log of one node (cheap to clone: openraft asks for readers).
#[derive(Clone)]
pub struct LogStore {
    /// The storage the log is in; its committer runs while a handle lives.
    _storage: Arc<Storage>,
    log: Log,
    state: Arc<Mutex<State>>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl LogStore {
    /// Opens (or creates) the log in `storage` and reads its history back.
    pub fn open(storage: Storage) -> Result<LogStore, String> {
        let config = LogConfig {
            durability: Durability::Fsync,
            segment_bytes: 8 << 20,
            ..LogConfig::default()
        };
        let (log, recovery) = storage
            .open_log("control", config)
            .map_err(|e| format!("cannot open the control-plane log: {e}"))?;
        if !recovery.is_clean() {
            tracing::warn!("control-plane log recovered: {recovery:?}");
        }
        let mut state = State::default();
        let mut at = log.start_offset();
        let end = log.next_offset();
        while at < end {
            let records = log
                .read(at, ReadLimit::bytes(4 << 20))
                .map_err(|e| format!("cannot read the control-plane log at {at}: {e}"))?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for r in records {
                replay(&mut state, &r.headers, &r.payload, r.offset)?;
            }
        }
        Ok(LogStore {
            _storage: Arc::new(storage),
            log,
            state: Arc::new(Mutex::new(state)),
        })
    }

    /// The index of the last entry held (0 when none).
    pub fn last_index(&self) -> u64 {
        let s = self.state.lock();
        s.entries
            .keys()
            .next_back()
            .copied()
            .or(s.last_purged.map(|l| l.index))
            .unwrap_or(0)
    }

    fn append_record(&self, kind: u8, body: Vec<u8>) -> roost_storage::Append {
        self.log.append(vec![Record::now(
            Bytes::from(vec![kind]),
            Bytes::from(body),
        )])
    }
}

fn replay(state: &mut State, headers: &[u8], payload: &[u8], offset: Offset) -> Result<(), String> {
    let bad = |e: serde_json::Error| format!("control-plane log record {offset} is damaged: {e}");
    match headers.first() {
        Some(&ENTRY) => {
            let entry: Entry<TypeConfig> = serde_json::from_slice(payload).map_err(bad)?;
            state
                .entries
                .insert(entry.log_id.index, (entry, Some(offset)));
        }
        Some(&VOTE) => state.vote = Some(serde_json::from_slice(payload).map_err(bad)?),
        Some(&TRUNCATE) => {
            let since: u64 = serde_json::from_slice(payload).map_err(bad)?;
            state.entries.split_off(&since);
        }
        Some(&PURGE) => {
            let upto: LogId<NodeId> = serde_json::from_slice(payload).map_err(bad)?;
            state.entries = state.entries.split_off(&(upto.index + 1));
            state.last_purged = Some(upto);
        }
        _ => {
            return Err(format!(
                "control-plane log record {offset} has an unknown kind"
            ));
        }
    }
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let s = self.state.lock();
        Ok(s.entries
            .range(range)
            .map(|(_, (e, _))| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let s = self.state.lock();
        let last = s.entries.values().next_back().map(|(e, _)| e.log_id);
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

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let mut records = Vec::with_capacity(entries.len());
        for e in &entries {
            let body = serde_json::to_vec(e).map_err(|e| StorageIOError::write_logs(&e))?;
            records.push(Record::now(Bytes::from_static(&[ENTRY]), Bytes::from(body)));
        }
        // Queued in order now, readable at once; durable when the future resolves.
        let append = self.log.append(records);
        let ids: Vec<LogId<NodeId>> = entries.iter().map(|e| e.log_id).collect();
        {
            let mut s = self.state.lock();
            for e in entries {
                s.entries.insert(e.log_id.index, (e, None));
            }
        }
        let state = self.state.clone();
        tokio::spawn(async move {
            match append.await {
                Ok(first) => {
                    let mut s = state.lock();
                    for (i, id) in ids.into_iter().enumerate() {
                        if let Some((e, at)) = s.entries.get_mut(&id.index)
                            && e.log_id == id
                        {
                            *at = Some(first + i as u64);
                        }
                    }
                    drop(s);
                    callback.log_io_completed(Ok(()));
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
        self.state.lock().entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = self.state.lock().vote;
        let purge = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        let marker = self.append_record(PURGE, purge);
        let vote = vote.map(|v| {
            let body = serde_json::to_vec(&v).unwrap_or_default();
            self.append_record(VOTE, body)
        });
        let marker_at = marker
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        if let Some(v) = vote {
            v.await
                .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        }
        let keep_from = {
            let mut s = self.state.lock();
            s.entries = s.entries.split_off(&(log_id.index + 1));
            s.last_purged = Some(log_id);
            // An entry whose record's offset is not known yet (still being written)
            // may sit anywhere before the marker: then nothing is dropped this time.
            s.entries
                .values()
                .map(|(_, at)| *at)
                .try_fold(marker_at, |min, at| at.map(|at| min.min(at)))
        };
        if let Some(keep_from) = keep_from
            && let Err(e) = self.log.truncate_before(keep_from)
        {
            tracing::warn!("control-plane log: cannot drop purged records: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("serializes")
    }

    fn put(state: &mut State, kind: u8, body: Vec<u8>, offset: Offset) {
        replay(state, &[kind], &body, offset).expect("replays");
    }

    /// The history read in order gives the state: a conflict truncation drops what
    /// follows it (and later appends replace it), a purge drops what precedes it, the
    /// last vote wins; a record of an unknown kind or a damaged body is an error.
    #[test]
    fn history_replays_to_the_state() {
        let mut s = State::default();
        for i in 1..=5 {
            put(&mut s, ENTRY, json(&entry(1, i)), i);
        }
        put(&mut s, TRUNCATE, json(&4u64), 6);
        put(&mut s, ENTRY, json(&entry(2, 4)), 7);
        let vote = Vote::new(2, 3);
        put(&mut s, VOTE, json(&vote), 8);
        put(
            &mut s,
            PURGE,
            json(&LogId::new(CommittedLeaderId::new(1, 1), 2)),
            9,
        );
        let indexes: Vec<(u64, u64)> = s
            .entries
            .values()
            .map(|(e, _)| (e.log_id.index, e.log_id.leader_id.term))
            .collect();
        assert_eq!(indexes, [(3, 1), (4, 2)]);
        assert_eq!(s.vote, Some(vote));
        assert_eq!(s.last_purged.map(|l| l.index), Some(2));
        assert!(replay(&mut s, b"X", b"{}", 10).is_err());
        assert!(replay(&mut s, &[ENTRY], b"{not json", 11).is_err());
    }

    /// A log written, closed and opened again reads back the same entries and vote.
    #[tokio::test]
    async fn the_log_reads_back_after_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let storage = Storage::open(dir.path()).expect("storage");
            let mut log = LogStore::open(storage).expect("log");
            log.save_vote(&Vote::new(3, 2)).await.expect("vote");
            for i in 1..=3 {
                let body = serde_json::to_vec(&entry(3, i)).expect("json");
                log.append_record(ENTRY, body).await.expect("append");
            }
            log.truncate(LogId::new(CommittedLeaderId::new(3, 1), 3))
                .await
                .expect("truncate");
        }
        let storage = Storage::open(dir.path()).expect("storage");
        let mut log = LogStore::open(storage).expect("log");
        assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(3, 2)));
        let got = log.try_get_log_entries(0..10).await.expect("entries");
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(log.last_index(), 2);
    }
}
