//! A log: a directory of segments with dense offsets, appended to by the shared
//! committer and read by anyone.
//!
//! Invariants:
//! - offsets are dense: the records of a log are `start_offset()..next_offset()`
//!   with no gaps, and the first record ever appended has offset 0;
//! - timestamps never decrease along a log: a record stamped earlier than its
//!   predecessor is stored with its predecessor's timestamp;
//! - readers see a record only once its append has resolved (after write(2) in
//!   `Buffered` mode, after fdatasync in `Fsync` mode), so a reader never sees a
//!   record that a crash could still take back in `Fsync` mode;
//! - only the committer thread writes; the last segment is the active one and is the
//!   only one ever written or truncated; retention deletes whole sealed segments only.
//!
//! Locks, always taken in this order when nested: `writer` (committer, open, delete)
//! then `state` (readers, retention, publication). `pending` is never held with either.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::Offset;
use crate::error::{Error, Result, io_err};
use crate::format::{self, IndexEntry, MAX_FRAME, RECORD_OVERHEAD, TimeEntry};
use crate::latency::SyncLatency;
use crate::segment::{
    self, DATA_EXT, INDEX_EXT, Indexer, ReadStep, Segment, SegmentPaths, TIME_EXT,
};

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Resolve after the batch was written and `fdatasync`ed: survives power loss.
    #[default]
    Fsync,
    /// Resolve after write(2): survives `kill -9` of the process; power loss may cost up
    /// to [`LogConfig::sync_interval`] of acknowledged records.
    Buffered,
}

/// How much a log keeps. Deletion is by whole sealed segments; the active segment
/// is never deleted, so a log may hold somewhat more than these limits say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Delete a sealed segment once its newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest sealed segments while the log's bytes exceed this.
    pub max_bytes: Option<u64>,
}

/// Per-log settings, fixed when the log is opened (retention can change later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// When appends resolve.
    pub durability: Durability,
    /// How often a `Buffered` log is fdatasynced in the background.
    pub sync_interval: Duration,
    /// Roll to a new segment once the active one would grow past this many bytes
    /// (clamped to 4 KiB..=1 GiB). A record larger than this gets a segment of its own.
    pub segment_bytes: u64,
    /// Bytes between sparse index entries (at least 1).
    pub index_interval_bytes: u32,
    /// Retention limits, applied by [`Log::enforce_retention`].
    pub retention: Retention,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            durability: Durability::Fsync,
            sync_interval: Duration::from_secs(1),
            segment_bytes: 64 * 1024 * 1024,
            index_interval_bytes: 4096,
            retention: Retention::default(),
        }
    }
}

impl LogConfig {
    fn segment_bytes(&self) -> u64 {
        self.segment_bytes.clamp(4096, 1 << 30)
    }
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Milliseconds since the Unix epoch (see the module docs on monotonicity).
    pub timestamp: u64,
    /// Opaque to the log; the queue layer keeps MQTT properties here.
    pub headers: Bytes,
    /// The message body.
    pub payload: Bytes,
}

impl Record {
    /// A record stamped with the current time.
    pub fn now(headers: Bytes, payload: Bytes) -> Record {
        Record {
            timestamp: now_ms(),
            headers,
            payload,
        }
    }
}

/// A record read back from a log. `headers` and `payload` share one read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Position of the record in its log.
    pub offset: Offset,
    /// Milliseconds since the Unix epoch, as stored.
    pub timestamp: u64,
    /// As appended.
    pub headers: Bytes,
    /// As appended.
    pub payload: Bytes,
}

/// Bounds on one [`Log::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    /// At most this many records.
    pub max_records: usize,
    /// At most this many bytes of framed records, except that a read returns at least one
    /// record when one is available, however large.
    pub max_bytes: usize,
}

impl ReadLimit {
    /// Up to `max_bytes` bytes, any number of records.
    pub fn bytes(max_bytes: usize) -> ReadLimit {
        ReadLimit {
            max_records: usize::MAX,
            max_bytes,
        }
    }
}

/// What opening a log repaired. Empty ([`Recovery::is_clean`]) after a clean shutdown;
/// the caller should log anything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The active segment's tail that was cut off because it was torn or corrupt.
    pub truncated: Option<TruncatedTail>,
    /// Base offsets of segments whose index files were missing or malformed and were
    /// rebuilt from the data.
    pub rebuilt_indexes: Vec<Offset>,
    /// Sealed segments with damage inside that were kept as they are. Always empty now:
    /// damage is salvaged (`lost`, `quarantined`), on open and when a read meets it.
    pub damaged_segments: Vec<DamagedSegment>,
    /// Stray index files without a data file, deleted.
    pub removed_files: Vec<PathBuf>,
    /// Records restored from the journal: acknowledged `Fsync` records that the
    /// segment lost (a power cut before the segment reached the disk).
    pub replayed: u64,
    /// The journal held records from this offset on that do not continue the log (the
    /// records before it are missing from both): not restored.
    pub journal_gap: Option<Offset>,
    /// Offsets whose records were lost to damage in the middle of a segment: they read
    /// back as lost records (no headers, no payload; see `quarantine.rs`).
    pub lost: Vec<Range<Offset>>,
    /// Copies of damaged files moved aside into `<storage dir>/quarantine/<log>/`
    /// before recovery rewrote or cut them.
    pub quarantined: Vec<PathBuf>,
}

impl Recovery {
    /// Nothing was repaired or dropped.
    pub fn is_clean(&self) -> bool {
        *self == Recovery::default()
    }

    /// This recovery followed by `later` (the same log opened again).
    pub(crate) fn merge(mut self, later: Recovery) -> Recovery {
        self.truncated = self.truncated.or(later.truncated);
        self.rebuilt_indexes.extend(later.rebuilt_indexes);
        self.damaged_segments.extend(later.damaged_segments);
        self.removed_files.extend(later.removed_files);
        self.replayed += later.replayed;
        self.journal_gap = self.journal_gap.or(later.journal_gap);
        self.lost.extend(later.lost);
        self.quarantined.extend(later.quarantined);
        self
    }
}

/// Bytes dropped from the end of the active segment during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    /// Base offset of the segment.
    pub segment: Offset,
    /// Byte position the segment was cut at (the end of the last good record).
    pub position: u64,
    /// Number of bytes dropped.
    pub bytes: u64,
    /// Records (complete or partial) in the dropped bytes, if their framing could be
    /// followed to the end of the file.
    pub records: Option<u64>,
    /// The offset the first dropped record would have had.
    pub first_dropped_offset: Offset,
    /// Why the first dropped record was rejected.
    pub reason: String,
}

/// Damage found inside a sealed segment while rebuilding its indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSegment {
    /// Base offset of the segment.
    pub segment: Offset,
    /// Byte position of the first damaged record.
    pub position: u64,
    /// What is wrong.
    pub reason: String,
}

/// What one retention pass or [`Log::truncate_before`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Whole segments deleted.
    pub segments: usize,
    /// Their data bytes.
    pub bytes: u64,
    /// The log's first offset afterwards.
    pub start_offset: Offset,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records appended since open.
    pub records: u64,
    /// Data bytes written since open.
    pub bytes: u64,
    /// write(2) calls on data files.
    pub writes: u64,
    /// fdatasyncs that made this log's appends durable: of its data files, and for an
    /// `Fsync` log the journal syncs of the rounds it was in.
    pub syncs: u64,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A handle to one log. Cheap to clone; all clones share the log.
#[derive(Clone)]
pub struct Log {
    pub(crate) inner: Arc<LogInner>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// The future returned by [`Log::append`]: the offset of the batch's first record,
/// once the batch is durable under the log's [`Durability`].
///
/// The records are queued when `append` is called, not when this is first polled,
/// so appends issued one after another keep their order even if awaited later.
#[derive(Debug)]
#[must_use = "the append is queued already; await this to learn whether it became durable"]
pub struct Append {
    state: AppendState,
}

#[derive(Debug)]
enum AppendState {
    Done(Option<Result<Offset>>),
    Waiting(oneshot::Receiver<Result<Offset>>),
}

impl Future for Append {
    type Output = Result<Offset>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            AppendState::Done(r) => Poll::Ready(r.take().unwrap_or(Err(Error::Closed))),
            AppendState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(Error::Closed))),
        }
    }
}

impl Log {
    /// The log's name (its directory name under the storage directory).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Queues `records` for the shared committer and returns a future for the offset of
    /// the first of them (the rest follow densely). One call is one unit of group commit:
    /// batching many records per call is what makes high throughput cheap.
    ///
    /// Fails at once if the log is read-only or closed, or if a record is larger than
    /// 512 MiB framed.
    pub fn append(&self, records: Vec<Record>) -> Append {
        self.enqueue(Batch::Many(records))
    }

    /// [`Log::append`] of one record, without a vector of its own (a queue produce
    /// appends one message at a time).
    pub fn append_one(&self, record: Record) -> Append {
        self.enqueue(Batch::One(record))
    }

    fn enqueue(&self, records: Batch) -> Append {
        let done = |r| Append {
            state: AppendState::Done(Some(r)),
        };
        if let Err(e) = self.inner.check_writable() {
            return done(Err(e));
        }
        for r in records.as_slice() {
            let size = format::frame_len(r.headers.len(), r.payload.len());
            if size > MAX_FRAME {
                return done(Err(Error::RecordTooLarge {
                    size,
                    max: MAX_FRAME,
                }));
            }
        }
        let (tx, rx) = oneshot::channel();
        let schedule = {
            let mut p = self.inner.pending.lock();
            p.appends.push(PendingAppend { records, tx });
            !std::mem::replace(&mut p.scheduled, true)
        };
        if schedule && !self.inner.committer.schedule(self.inner.clone()) {
            let stranded = {
                let mut p = self.inner.pending.lock();
                p.scheduled = false;
                std::mem::take(&mut p.appends)
            };
            for a in stranded {
                let _ = a.tx.send(Err(Error::Closed));
            }
        }
        Append {
            state: AppendState::Waiting(rx),
        }
    }

    /// Reads records from offset `from` on, within `limit`. Returns an empty batch only
    /// when `from == next_offset()`. Fails with [`Error::OffsetOutOfRange`] outside
    /// `start_offset()..=next_offset()` and with [`Error::Corrupt`] on damaged data.
    ///
    /// This does blocking `pread`s (normally served from the page cache).
    pub fn read(&self, from: Offset, limit: ReadLimit) -> Result<Vec<LogRecord>> {
        // Sized for a small read up front instead of growing from empty; 12 records
        // (80 bytes each) stay under 1 KiB, which glibc serves without first
        // consolidating its free lists as it does for larger requests.
        let mut out = Vec::with_capacity(limit.max_records.min(12));
        self.inner.read(from, limit, &mut out)?;
        Ok(out)
    }

    /// [`Log::read`] into `out` (cleared first), so that a reader that reads all the
    /// time (a queue's dispatch) keeps one buffer instead of allocating one per read.
    pub fn read_into(
        &self,
        from: Offset,
        limit: ReadLimit,
        out: &mut Vec<LogRecord>,
    ) -> Result<()> {
        out.clear();
        self.inner.read(from, limit, out)
    }

    /// The first offset whose record has a timestamp at or after `timestamp`, or
    /// `next_offset()` if every record is older.
    pub fn offset_for_timestamp(&self, timestamp: u64) -> Result<Offset> {
        let (mut from, end) = {
            let st = self.inner.state.lock();
            let end = st.next_offset();
            match st
                .segments
                .iter()
                .find(|s| s.max_timestamp.is_some_and(|t| t >= timestamp))
            {
                Some(seg) => (seg.time_start(timestamp), end),
                None => return Ok(end),
            }
        };
        loop {
            let batch = self.read(
                from,
                ReadLimit {
                    max_records: 1024,
                    max_bytes: 256 * 1024,
                },
            )?;
            let Some(last) = batch.last() else {
                return Ok(end.max(from));
            };
            if let Some(r) = batch.iter().find(|r| r.timestamp >= timestamp) {
                return Ok(r.offset);
            }
            from = last.offset + 1;
        }
    }

    /// One past the last readable record: the offset the next record will get once
    /// everything queued so far has resolved.
    pub fn next_offset(&self) -> Offset {
        self.inner.state.lock().next_offset()
    }

    /// The first offset still held.
    pub fn start_offset(&self) -> Offset {
        self.inner.state.lock().start_offset()
    }

    /// Bytes of data held in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.inner.state.lock().segments.iter().map(|s| s.len).sum()
    }

    /// Number of segments (the active one included).
    pub fn segment_count(&self) -> usize {
        self.inner.state.lock().segments.len()
    }

    /// Replaces the retention limits.
    pub fn set_retention(&self, retention: Retention) {
        *self.inner.retention.lock() = retention;
    }

    /// Deletes sealed segments that the retention limits exclude, judging age against
    /// `now_ms` (milliseconds since the epoch).
    pub fn enforce_retention(&self, now_ms: u64) -> Result<Deleted> {
        let retention = *self.inner.retention.lock();
        let cutoff = retention
            .max_age
            .map(|age| now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)));
        self.inner.delete_segments(|seg, total| {
            let too_old = cutoff.is_some_and(|c| seg.max_timestamp.is_none_or(|t| t < c));
            let too_big = retention.max_bytes.is_some_and(|max| total > max);
            too_old || too_big
        })
    }

    /// Deletes every sealed segment whose records all lie before `offset`, for a caller
    /// (the queue layer) that knows every consumer has passed them.
    pub fn truncate_before(&self, offset: Offset) -> Result<Deleted> {
        self.inner
            .delete_segments(|seg, _| seg.next_offset <= offset)
    }

    /// True when damage was found while running and not yet taken: a read of a
    /// segment (sealed or active) met records that fail their CRC, and the segment was
    /// quarantined and salvaged as recovery does on open (`lost` and `quarantined` of
    /// [`Log::take_found_damage`]; see `quarantine.rs`). The read itself went on past
    /// the damage.
    pub fn has_found_damage(&self) -> bool {
        self.inner.has_found_damage.load(Ordering::Acquire)
    }

    /// Damage found while running since the last call (see [`Log::has_found_damage`]).
    pub fn take_found_damage(&self) -> Option<Recovery> {
        if !self.inner.has_found_damage.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.inner.found_damage.lock().take()
    }

    /// The I/O error that made this log read-only, if one did.
    pub fn failure(&self) -> Option<Arc<io::Error>> {
        self.inner.failure.lock().clone()
    }

    /// Counters since the log was opened.
    pub fn stats(&self) -> LogStats {
        let s = &self.inner.stats;
        LogStats {
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
        }
    }

    /// Test hook: make the next data-file write or fdatasync of this log fail.
    #[cfg(test)]
    pub(crate) fn inject_fault(&self, write: bool, sync: bool) {
        self.inner.faults.fail_write.store(write, Ordering::SeqCst);
        self.inner.faults.fail_sync.store(sync, Ordering::SeqCst);
    }
}

/// An append waiting for the committer.
pub(crate) struct PendingAppend {
    records: Batch,
    pub(crate) tx: oneshot::Sender<Result<Offset>>,
}

/// The records of one append: one (no vector to allocate, and for the committer to
/// free) or many.
enum Batch {
    One(Record),
    Many(Vec<Record>),
}

impl Batch {
    fn as_slice(&self) -> &[Record] {
        match self {
            Batch::One(r) => std::slice::from_ref(r),
            Batch::Many(v) => v,
        }
    }
}

impl PendingAppend {
    /// Bytes its records take framed in a segment.
    pub(crate) fn framed_bytes(&self) -> u64 {
        self.records
            .as_slice()
            .iter()
            .map(|r| format::frame_len(r.headers.len(), r.payload.len()) as u64)
            .sum()
    }
}

/// An append written by the committer, waiting to be resolved with its first offset.
pub(crate) type Completion = (oneshot::Sender<Result<Offset>>, Offset);

#[derive(Default)]
pub(crate) struct Pending {
    appends: Vec<PendingAppend>,
    /// The log is in the committer's ready queue (or being taken from it).
    scheduled: bool,
    /// A `Buffered` log being interval-synced: the committer leaves new appends queued
    /// until the sync ends and reschedules the log.
    busy: bool,
}

#[derive(Default)]
pub(crate) struct Stats {
    records: AtomicU64,
    bytes: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
}

#[cfg(test)]
#[derive(Default)]
pub(crate) struct Faults {
    fail_write: AtomicBool,
    fail_sync: AtomicBool,
}

/// What readers see: the segments, oldest first; the last is active.
pub(crate) struct LogState {
    segments: Vec<Segment>,
    /// The newest published records as they were written, so that a consumer reading
    /// at the tail (the usual case) gets them without a read(2) or a buffer of its own.
    tail: VecDeque<Cached>,
    /// Bytes held in `tail`.
    tail_bytes: usize,
}

/// Frames of consecutive records `first..end`, as written to the segment.
#[derive(Clone)]
pub(crate) struct Cached {
    first: Offset,
    end: Offset,
    frames: Bytes,
}

/// At most this many bytes of a log's newest records stay in memory for readers: at
/// 25,000 100-byte messages a second into one partition that is about 10 ms of them,
/// enough for consumers that keep up, and little for thousands of idle partitions.
const TAIL_BYTES: usize = 32 * 1024;

/// The tail's chunks are cut from arenas of this size (one allocation per arena, not
/// per chunk: glibc consolidates its free lists on every allocation of 1 KiB or more).
const TAIL_ARENA: usize = 16 * 1024;

impl LogState {
    fn next_offset(&self) -> Offset {
        self.segments.last().map_or(0, |s| s.next_offset)
    }

    fn start_offset(&self) -> Offset {
        self.segments.first().map_or(0, |s| s.base)
    }
}

/// The committer's view of the active segment, including bytes written but not yet
/// published to readers.
pub(crate) struct Writer {
    base: Offset,
    data: Arc<File>,
    /// The active segment's index files, opened when an entry is first written to
    /// them: most of an idle log's open files otherwise (thousands of idle partitions
    /// ran into the limit on open files with three per log).
    index_file: Option<File>,
    time_file: Option<File>,
    index_file_len: u64,
    time_file_len: u64,
    write_pos: u64,
    /// Where the active segment's writeback was last asked for (`Fsync` logs; see
    /// [`WRITEBACK_CHUNK`]).
    writeback_from: u64,
    next_offset: Offset,
    last_timestamp: Option<u64>,
    indexer: Indexer,
    /// Entries not yet published to readers; the first `index_written`/`time_written`
    /// of them are already in the index files.
    new_index: Vec<IndexEntry>,
    new_time: Vec<TimeEntry>,
    index_written: usize,
    time_written: usize,
    /// Last time-index entry's relative offset (published or not).
    last_time_rel: Option<u32>,
    /// Written since the last sync (Buffered logs).
    dirty: bool,
    closed: bool,
    /// Offset of the first record in the encode buffer, when it holds any.
    buf_first: Option<Offset>,
    /// Written frames not yet published, for the readers' tail cache.
    unpublished: Vec<Cached>,
    /// Where the tail's next chunk is copied to.
    arena: bytes::BytesMut,
}

/// An `Fsync` log's records are durable in the journal; its segment is synced when the
/// journal's lap is checkpointed or the segment rolls. Left to that, a segment's dirty
/// pages pile up for a whole lap and go to the disk all at once, and the journal's
/// fdatasyncs wait behind them (3-9 ms instead of 0.3 ms for 40 ms every second at 300K
/// msg/s: the PUBACK p99.9 of 40-50 ms). So the writer asks the kernel to start writing
/// the segment back each time this much more of it is written (without waiting for it,
/// and promising nothing: durability still comes from the journal and those syncs).
const WRITEBACK_CHUNK: u64 = 1 << 20;

/// Starts writeback of the active segment's whole pages written since the last call,
/// once they add up to [`WRITEBACK_CHUNK`] (see there).
fn start_writeback(w: &mut Writer) {
    // The page the next write continues is left out: writing it back now could make
    // that write wait for the device.
    let end = w.write_pos & !(PAGE - 1);
    if w.writeback_from > end {
        w.writeback_from = end;
    }
    if end - w.writeback_from < WRITEBACK_CHUNK {
        return;
    }
    sync_file_range_write(&w.data, w.writeback_from, end - w.writeback_from);
    w.writeback_from = end;
}

/// The smallest page size of the platforms roost runs on.
const PAGE: u64 = 4096;

/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: asks for writeback of the range and
/// returns without waiting for it. A failure is ignored: this is only a hint, and a
/// real write error shows at the next fdatasync.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn sync_file_range_write(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(from), Ok(len)) = (i64::try_from(from), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a descriptor this `File` keeps open; no memory is
    // passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_file_range_write(_: &File, _: u64, _: u64) {}

/// What a log needs of the group committer (`commit.rs`, which implements it for its
/// shared state): sync timing and faults, and the way onto a writer's ready queue.
/// A trait so that this file does not name the committer: the committer's queues hold
/// logs and each log holds its committer, and only one of the two files may name the
/// other without an import circle.
pub(crate) trait CommitQueue: Send + Sync {
    /// Where the fdatasyncs of the storage's data files are timed.
    fn syncs(&self) -> &SyncLatency;

    /// Called just before each data-file fdatasync (a slow disk can be injected here).
    fn before_sync(&self);

    /// Fault injection: true if an fdatasync of the log named `log` is to fail (see
    /// [`crate::Storage::inject_sync_failure`]).
    fn sync_fails(&self, log: &str) -> bool;

    /// The storage's count of files copied into quarantine.
    fn quarantined(&self) -> &AtomicU64;

    /// Hands `log` (with appends queued, marked scheduled) to its writer; false once
    /// storage has stopped.
    fn schedule(&self, log: Arc<LogInner>) -> bool;
}

pub(crate) struct LogInner {
    pub(crate) name: String,
    /// This incarnation of the log (see `journal.rs`), kept in `log.id` in its directory.
    pub(crate) id: u64,
    /// 1 + the journal lap in which this log was last written (0: never), so that each
    /// lap lists a log once for its checkpoint.
    pub(crate) journal_lap: AtomicU64,
    dir: PathBuf,
    pub(crate) config: LogConfig,
    retention: Mutex<Retention>,
    state: Mutex<LogState>,
    writer: Mutex<Writer>,
    pending: Mutex<Pending>,
    failed: AtomicBool,
    failure: Mutex<Option<Arc<io::Error>>>,
    closed: AtomicBool,
    committer: Arc<dyn CommitQueue>,
    stats: Stats,
    /// Damage found and repaired while reading (see [`LogInner::repair`]), not
    /// yet taken by [`Log::take_found_damage`].
    found_damage: Mutex<Option<Recovery>>,
    /// Set with `found_damage`, so that a reader can look without a lock.
    has_found_damage: AtomicBool,
    /// One repair at a time.
    repairing: Mutex<()>,
    #[cfg(test)]
    faults: Faults,
}

/// The error of an fdatasync that [`crate::Storage::inject_sync_failure`] made fail.
fn injected_sync_failure() -> io::Error {
    io::Error::other("fdatasync failed (injected fault)")
}

/// The file holding a log's incarnation id.
const ID_FILE: &str = "log.id";

/// Reads the log's incarnation id, giving the log one (synced, with its directory)
/// if it has none yet, before anything of it can reach the journal.
fn read_or_create_id(dir: &Path) -> Result<u64> {
    let path = dir.join(ID_FILE);
    if let Some(b) = segment::read_file_if_exists(&path).map_err(io_err(&path))?
        && let Ok(a) = <[u8; 8]>::try_from(b.as_slice())
    {
        return Ok(u64::from_le_bytes(a));
    }
    let id = crate::journal::new_log_id();
    segment::write_index_file(&path, &id.to_le_bytes()).map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(id)
}

/// The incarnation id a log directory holds, if any (for journal replay).
pub(crate) fn stored_id(dir: &Path) -> Option<u64> {
    let b = fs::read(dir.join(ID_FILE)).ok()?;
    Some(u64::from_le_bytes(<[u8; 8]>::try_from(b.as_slice()).ok()?))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn open_index_writer(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
}

/// The index file in `slot`, opened at `path` if it is not open yet.
fn lazy_open<'a>(slot: &'a mut Option<File>, path: &Path) -> io::Result<&'a File> {
    if slot.is_none() {
        *slot = Some(open_index_writer(path)?);
    }
    slot.as_ref()
        .ok_or_else(|| io::Error::other("index file not open"))
}

/// Reads the record at `pos` and checks that it is a valid record with `offset`.
fn record_at(file: &File, pos: u64, file_len: u64, offset: Offset) -> bool {
    let avail = file_len.saturating_sub(pos);
    let mut len = avail.min(64 * 1024);
    for _ in 0..2 {
        let Ok(b) = segment::read_bytes(file, pos, usize::try_from(len).unwrap_or(0)) else {
            return false;
        };
        match format::decode_record(&b) {
            format::Decoded::Record(r) => return r.offset == offset,
            format::Decoded::Incomplete { frame_len } if (frame_len as u64) <= avail => {
                len = frame_len as u64;
            }
            _ => return false,
        }
    }
    false
}

impl LogInner {
    /// Opens (creating if needed) the log in `dir`, recovering as described in the crate
    /// docs.
    pub(crate) fn open(
        name: String,
        dir: PathBuf,
        config: LogConfig,
        committer: Arc<dyn CommitQueue>,
    ) -> Result<(Arc<LogInner>, Recovery)> {
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let id = read_or_create_id(&dir)?;
        let mut recovery = Recovery::default();
        let mut bases = Vec::new();
        let mut index_only = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let file_name = entry.file_name();
            let Some((base, ext)) = file_name.to_str().and_then(segment::parse_file_name) else {
                continue;
            };
            match ext {
                DATA_EXT => bases.push(base),
                INDEX_EXT | TIME_EXT => index_only.push((base, entry.path())),
                // A salvage cut short by a crash: the segment itself was not replaced.
                crate::quarantine::TEMP_EXT => {
                    let path = entry.path();
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    recovery.removed_files.push(path);
                }
                _ => {}
            }
        }
        bases.sort_unstable();
        let mut removed = false;
        for (base, path) in index_only {
            if bases.binary_search(&base).is_err() {
                fs::remove_file(&path).map_err(io_err(&path))?;
                recovery.removed_files.push(path);
                removed = true;
            }
        }
        recovery.removed_files.sort();
        if bases.is_empty() {
            let paths = SegmentPaths::new(&dir, 0);
            segment::open_data(&paths.data, true).map_err(io_err(&paths.data))?;
            bases.push(0);
            removed = true;
        }
        if removed {
            sync_dir(&dir)?;
        }
        let interval = u64::from(config.index_interval_bytes.max(1));
        let mut segments = Vec::with_capacity(bases.len());
        for pair in bases.windows(2) {
            segments.push(open_sealed(
                &dir,
                &name,
                pair[0],
                pair[1],
                interval,
                &mut recovery,
            )?);
        }
        let active_base = bases.last().copied().unwrap_or(0);
        let (active, mut writer) = open_active(&dir, &name, active_base, interval, &mut recovery)?;
        if writer.last_timestamp.is_none() {
            writer.last_timestamp = segments.last().and_then(|s: &Segment| s.max_timestamp);
        }
        segments.push(active);
        let inner = Arc::new(LogInner {
            name,
            id,
            journal_lap: AtomicU64::new(0),
            dir,
            config,
            retention: Mutex::new(config.retention),
            state: Mutex::new(LogState {
                segments,
                tail: VecDeque::new(),
                tail_bytes: 0,
            }),
            writer: Mutex::new(writer),
            pending: Mutex::new(Pending::default()),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            closed: AtomicBool::new(false),
            committer,
            stats: Stats::default(),
            found_damage: Mutex::new(None),
            has_found_damage: AtomicBool::new(false),
            repairing: Mutex::new(()),
            #[cfg(test)]
            faults: Faults::default(),
        });
        Ok((inner, recovery))
    }

    fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if self.failed.load(Ordering::Acquire)
            && let Some(cause) = self.failure.lock().clone()
        {
            return Err(Error::ReadOnly {
                log: self.name.clone(),
                cause,
            });
        }
        Ok(())
    }

    /// Marks the log read-only because of `e`; keeps the first error.
    pub(crate) fn fail(&self, e: io::Error) -> Arc<io::Error> {
        let mut f = self.failure.lock();
        let cause = f.get_or_insert_with(|| Arc::new(e)).clone();
        self.failed.store(true, Ordering::Release);
        cause
    }

    /// Turns a committer-side I/O error into the error appenders see, failing the log
    /// unless the error came from it being closed.
    pub(crate) fn on_error(&self, e: io::Error) -> Error {
        if !self.closed.load(Ordering::Acquire) {
            self.fail(e);
        }
        self.write_error()
    }

    pub(crate) fn write_error(&self) -> Error {
        if self.closed.load(Ordering::Acquire) {
            return Error::Closed;
        }
        match self.failure.lock().clone() {
            Some(cause) => Error::ReadOnly {
                log: self.name.clone(),
                cause,
            },
            None => Error::Closed,
        }
    }

    /// Stops further appends, fails queued ones, and waits for the committer to be
    /// done with this log.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut w = self.writer.lock();
        w.closed = true;
        drop(w);
        let stranded = std::mem::take(&mut self.pending.lock().appends);
        for a in stranded {
            let _ = a.tx.send(Err(Error::Closed));
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves this log's queued appends into `into` (which must be empty).
    /// Returns how many were taken.
    /// For the committer (`Buffered` logs): takes nothing while the log is being
    /// interval-synced (that sync reschedules it).
    pub(crate) fn take_pending(&self, into: &mut Vec<PendingAppend>) -> usize {
        let mut p = self.pending.lock();
        p.scheduled = false;
        if p.busy {
            return 0;
        }
        std::mem::swap(&mut p.appends, into);
        into.len()
    }

    /// Appends queued on this log and not yet taken by its writer.
    pub(crate) fn pending_appends(&self) -> usize {
        self.pending.lock().appends.len()
    }

    /// Marks the log busy for an interval sync; false if it is busy already.
    pub(crate) fn begin_sync(&self) -> bool {
        !std::mem::replace(&mut self.pending.lock().busy, true)
    }

    /// Ends a busy spell. Returns true if appends are waiting and the log must be put on
    /// the ready queue (it is marked scheduled already).
    pub(crate) fn end_sync(&self) -> bool {
        let mut p = self.pending.lock();
        p.busy = false;
        !p.appends.is_empty() && !std::mem::replace(&mut p.scheduled, true)
    }

    /// Fails the queued appends of a log the stopped committer will not take.
    pub(crate) fn fail_stranded(&self) {
        let stranded = {
            let mut p = self.pending.lock();
            p.scheduled = false;
            std::mem::take(&mut p.appends)
        };
        for a in stranded {
            let _ = a.tx.send(Err(Error::Closed));
        }
    }

    /// Encodes `appends` into `buf` and writes them to the active segment (rolling as
    /// needed), pushing one completion per append onto `done`. With `journal`, the
    /// frames written also go into it as entries (see `journal.rs`). On error the log
    /// has failed; `done` and what remains of `appends` must be failed by the caller.
    ///
    /// Returns whether a `Buffered` log just became dirty.
    pub(crate) fn write_appends(
        &self,
        appends: &mut Vec<PendingAppend>,
        buf: &mut Vec<u8>,
        done: &mut Vec<Completion>,
        mut journal: Option<&mut Vec<u8>>,
    ) -> io::Result<bool> {
        let mut w = self.writer.lock();
        if w.closed || self.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("log closed or read-only"));
        }
        let mut records = 0u64;
        for a in appends.drain(..) {
            let first = w.next_offset;
            for r in a.records.as_slice() {
                if let Err(e) = self.push_record(&mut w, buf, r, journal.as_deref_mut()) {
                    done.push((a.tx, first));
                    return Err(e);
                }
                records += 1;
            }
            done.push((a.tx, first));
        }
        self.flush(&mut w, buf, journal)?;
        self.stats.records.fetch_add(records, Ordering::Relaxed);
        let newly_dirty = self.config.durability == Durability::Buffered && !w.dirty;
        if self.config.durability == Durability::Buffered {
            w.dirty = true;
            self.publish(&mut w);
        }
        Ok(newly_dirty)
    }

    /// Encodes one record at the writer's next offset into `buf`, rolling the segment
    /// first if the record does not fit.
    fn push_record(
        &self,
        w: &mut Writer,
        buf: &mut Vec<u8>,
        r: &Record,
        journal: Option<&mut Vec<u8>>,
    ) -> io::Result<()> {
        let frame = format::frame_len(r.headers.len(), r.payload.len()) as u64;
        let mut pos = w.write_pos + buf.len() as u64;
        if pos > 0 && pos + frame > self.config.segment_bytes() {
            self.roll(w, buf, journal)?;
            pos = 0;
        }
        let offset = w.next_offset;
        let timestamp = r.timestamp.max(w.last_timestamp.unwrap_or(0));
        let base = w.base;
        let Writer {
            indexer,
            new_index,
            new_time,
            ..
        } = &mut *w;
        let before = new_time.len();
        indexer.observe(base, pos, offset, timestamp, new_index, new_time);
        if new_time.len() > before {
            w.last_time_rel = new_time.last().map(|e| e.rel);
        }
        if buf.is_empty() {
            w.buf_first = Some(offset);
        }
        format::encode_record(buf, offset, timestamp, &r.headers, &r.payload);
        w.next_offset += 1;
        w.last_timestamp = Some(timestamp);
        Ok(())
    }

    /// Writes `buf` (copying it into `journal` as one entry) and any unwritten index
    /// entries.
    fn flush(
        &self,
        w: &mut Writer,
        buf: &mut Vec<u8>,
        journal: Option<&mut Vec<u8>>,
    ) -> io::Result<()> {
        if !buf.is_empty() {
            #[cfg(test)]
            if self.faults.fail_write.swap(false, Ordering::SeqCst) {
                buf.clear();
                return Err(io::Error::other("injected write failure"));
            }
            let r = w.data.write_all_at(buf, w.write_pos);
            let first = w.buf_first.take();
            if r.is_ok() {
                if let Some(j) = journal {
                    crate::journal::push_entry(j, self.id, &self.name, buf);
                }
                if let Some(first) = first.filter(|_| buf.len() <= TAIL_BYTES / 2) {
                    if w.arena.capacity() < buf.len() {
                        w.arena = bytes::BytesMut::with_capacity(TAIL_ARENA.max(buf.len()));
                    }
                    w.arena.extend_from_slice(buf);
                    let frames = w.arena.split().freeze();
                    w.unpublished.push(Cached {
                        first,
                        end: w.next_offset,
                        frames,
                    });
                }
            }
            let len = buf.len() as u64;
            buf.clear();
            r?;
            w.write_pos += len;
            self.stats.writes.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(len, Ordering::Relaxed);
            if self.config.durability == Durability::Fsync {
                start_writeback(w);
            }
        }
        if w.index_written < w.new_index.len() {
            let mut b = Vec::new();
            format::encode_index(&mut b, &w.new_index[w.index_written..]);
            let path = SegmentPaths::new(&self.dir, w.base).index;
            lazy_open(&mut w.index_file, &path)?.write_all_at(&b, w.index_file_len)?;
            w.index_file_len += b.len() as u64;
            w.index_written = w.new_index.len();
        }
        if w.time_written < w.new_time.len() {
            let mut b = Vec::new();
            format::encode_time_index(&mut b, &w.new_time[w.time_written..]);
            let path = SegmentPaths::new(&self.dir, w.base).time;
            lazy_open(&mut w.time_file, &path)?.write_all_at(&b, w.time_file_len)?;
            w.time_file_len += b.len() as u64;
            w.time_written = w.new_time.len();
        }
        Ok(())
    }

    fn sync_data(&self, w: &Writer) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        if self.committer.sync_fails(&self.name) {
            return Err(injected_sync_failure());
        }
        let started = std::time::Instant::now();
        self.committer.before_sync();
        w.data.sync_data()?;
        self.committer.syncs().record(started.elapsed());
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// fdatasyncs the active segment's data and both index files.
    fn sync_segment(&self, w: &Writer) -> io::Result<()> {
        self.sync_data(w)?;
        // An index file never opened was not written since the segment was opened (its
        // content was synced when it was created or rebuilt).
        if let Some(f) = &w.index_file {
            f.sync_data()?;
        }
        w.time_file.as_ref().map_or(Ok(()), File::sync_data)
    }

    /// Makes everything written so far visible to readers.
    fn publish(&self, w: &mut Writer) {
        let mut st = self.state.lock();
        for c in w.unpublished.drain(..) {
            // Only a run of consecutive records is useful: a gap (a chunk not cached)
            // starts the cache afresh.
            if st.tail.back().is_some_and(|b| b.end != c.first) {
                st.tail.clear();
                st.tail_bytes = 0;
            }
            st.tail_bytes += c.frames.len();
            st.tail.push_back(c);
            while st.tail_bytes > TAIL_BYTES {
                match st.tail.pop_front() {
                    Some(old) => st.tail_bytes -= old.frames.len(),
                    None => break,
                }
            }
        }
        // The newest records were not cached (a write too large for it): what the cache
        // holds is no longer the tail. Readers of those older records read the file, as
        // for any record before the tail (and meet damage there, if any).
        if st.tail.back().is_some_and(|b| b.end != w.next_offset) {
            st.tail.clear();
            st.tail_bytes = 0;
        }
        if let Some(seg) = st.segments.last_mut().filter(|s| s.base == w.base) {
            seg.len = w.write_pos;
            seg.next_offset = w.next_offset;
            if w.next_offset > w.base {
                seg.max_timestamp = w.last_timestamp;
            }
            seg.index.append(&mut w.new_index);
            seg.time_index.append(&mut w.new_time);
        }
        w.index_written = 0;
        w.time_written = 0;
    }

    /// Publishes what was written, once the journal sync of its round made it durable
    /// (or, with `sync`, after syncing the segment itself: a round too large for the
    /// journal).
    pub(crate) fn publish_durable(&self, sync: bool) -> io::Result<()> {
        let mut w = self.writer.lock();
        if w.closed {
            return Err(io::Error::other("log closed"));
        }
        #[cfg(test)]
        if self.faults.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        // The journal's fdatasync made this round durable; a failure injected for this
        // log stands for that fdatasync failing for it.
        if self.committer.sync_fails(&self.name) {
            return Err(injected_sync_failure());
        }
        if sync {
            self.sync_data(&w)?;
        } else {
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.publish(&mut w);
        Ok(())
    }

    /// A checkpoint's sync: makes the segment hold durably what the journal holds for
    /// it. A closed (deleted) log has nothing to keep.
    pub(crate) fn checkpoint_sync(&self) -> io::Result<()> {
        let w = self.writer.lock();
        if w.closed {
            return Ok(());
        }
        self.sync_data(&w)
    }

    /// Appends the records of journal entries that the log does not hold yet (their
    /// offsets continue the log), then syncs them: recovery after a power cut lost
    /// the segment's tail. Returns the records added, and the first offset that could
    /// not be placed if an entry leaves a gap.
    pub(crate) fn replay(
        &self,
        records: &[(Offset, u64, Bytes, Bytes)],
    ) -> io::Result<(u64, Option<Offset>)> {
        let mut w = self.writer.lock();
        let mut buf = Vec::new();
        let mut added = 0;
        let mut gap = None;
        for (offset, timestamp, headers, payload) in records {
            if *offset < w.next_offset {
                continue;
            }
            if *offset > w.next_offset {
                gap = Some(*offset);
                break;
            }
            let r = Record {
                timestamp: *timestamp,
                headers: headers.clone(),
                payload: payload.clone(),
            };
            self.push_record(&mut w, &mut buf, &r, None)?;
            added += 1;
        }
        if added > 0 {
            self.flush(&mut w, &mut buf, None)?;
            self.sync_segment(&w)?;
        }
        Ok((added, gap))
    }

    /// The background sync of a `Buffered` log.
    pub(crate) fn background_sync(&self) -> io::Result<()> {
        let mut w = self.writer.lock();
        if w.closed || !w.dirty {
            return Ok(());
        }
        w.dirty = false;
        self.sync_data(&w)
    }

    /// Seals the active segment (flushed, final time entry, all three files synced)
    /// and starts a new one at the next offset.
    fn roll(
        &self,
        w: &mut Writer,
        buf: &mut Vec<u8>,
        journal: Option<&mut Vec<u8>>,
    ) -> io::Result<()> {
        if let Some(ts) = w.last_timestamp {
            let last_rel = u32::try_from(w.next_offset - 1 - w.base).unwrap_or(u32::MAX);
            if w.last_time_rel != Some(last_rel) {
                w.new_time.push(TimeEntry {
                    timestamp: ts,
                    rel: last_rel,
                });
                w.last_time_rel = Some(last_rel);
            }
        }
        self.flush(w, buf, journal)?;
        self.sync_segment(w)?;
        let base = w.next_offset;
        let paths = SegmentPaths::new(&self.dir, base);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&paths.data)?;
        // Created empty now (recovery expects them), opened again when written.
        File::create(&paths.index)?;
        File::create(&paths.time)?;
        File::open(&self.dir)?.sync_all()?;
        self.publish(w);
        let data = Arc::new(data);
        self.state.lock().segments.push(Segment {
            base,
            paths,
            data: data.clone(),
            len: 0,
            next_offset: base,
            max_timestamp: None,
            index: Vec::new(),
            time_index: Vec::new(),
        });
        w.base = base;
        w.data = data;
        w.index_file = None;
        w.time_file = None;
        w.index_file_len = 0;
        w.time_file_len = 0;
        w.write_pos = 0;
        w.writeback_from = 0;
        w.indexer.last_index_pos = 0;
        w.last_time_rel = None;
        w.dirty = false;
        Ok(())
    }

    /// Removes sealed segments, oldest first, while `doomed(segment, bytes held)` says so.
    fn delete_segments(&self, doomed: impl Fn(&Segment, u64) -> bool) -> Result<Deleted> {
        let (gone, start_offset) = {
            let mut st = self.state.lock();
            let mut total: u64 = st.segments.iter().map(|s| s.len).sum();
            let mut n = 0;
            while n + 1 < st.segments.len() && doomed(&st.segments[n], total) {
                total -= st.segments[n].len;
                n += 1;
            }
            let gone: Vec<Segment> = st.segments.drain(..n).collect();
            (gone, st.start_offset())
        };
        let mut deleted = Deleted {
            segments: gone.len(),
            bytes: 0,
            start_offset,
        };
        if gone.is_empty() {
            return Ok(deleted);
        }
        for seg in &gone {
            deleted.bytes += seg.len;
            for path in [&seg.paths.data, &seg.paths.index, &seg.paths.time] {
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::Io {
                            path: path.clone(),
                            source: e,
                        });
                    }
                }
            }
        }
        sync_dir(&self.dir)?;
        Ok(deleted)
    }

    /// See [`Log::read`]; `out` is empty.
    fn read(&self, mut from: Offset, limit: ReadLimit, out: &mut Vec<LogRecord>) -> Result<()> {
        let mut bytes = 0usize;
        let mut repaired = false;
        loop {
            let snap = {
                let st = self.state.lock();
                let (start, end) = (st.start_offset(), st.next_offset());
                if from < start || from > end {
                    if out.is_empty() {
                        return Err(Error::OffsetOutOfRange {
                            log: self.name.clone(),
                            requested: from,
                            start,
                            end,
                        });
                    }
                    return Ok(());
                }
                if from == end {
                    return Ok(());
                }
                // The chunks are consecutive and ordered: a binary search, not a scan
                // (a partition that gets one record per commit round holds hundreds).
                let i = st.tail.partition_point(|c| c.end <= from);
                if let Some(c) = st.tail.get(i).filter(|c| c.first <= from) {
                    Source::Tail(c.clone())
                } else {
                    let i = st.segments.partition_point(|s| s.base <= from);
                    let Some(seg) = i.checked_sub(1).and_then(|i| st.segments.get(i)) else {
                        return Ok(());
                    };
                    let (pos, offset) = seg.start_for(from);
                    Source::File(Snapshot {
                        base: seg.base,
                        file: seg.data.clone(),
                        len: seg.len,
                        next_offset: seg.next_offset,
                        pos,
                        offset,
                    })
                }
            };
            let next = match snap {
                Source::Tail(c) => self.read_cached(&c, from, limit, out, &mut bytes)?,
                Source::File(snap) => {
                    match self.read_segment(&snap, from, limit, out, &mut bytes) {
                        // Damage at rest, met while running: salvaged as on open, then
                        // read again from where this read got to.
                        Err(Error::Corrupt { .. }) if !repaired && self.repair(snap.base)? => {
                            repaired = true;
                            from = out.last().map_or(from, |r| r.offset + 1);
                            continue;
                        }
                        r => r?,
                    }
                }
            };
            if out.len() >= limit.max_records || bytes >= limit.max_bytes || next == from {
                return Ok(());
            }
            from = next;
        }
    }

    /// Repairs segment `base` after a read found damage in it, as recovery does on
    /// open (see [`LogInner::repair_active`] and [`LogInner::repair_sealed`]), and
    /// reports what was lost through [`Log::take_found_damage`]. False when there is
    /// nothing to repair now.
    fn repair(&self, base: Offset) -> Result<bool> {
        let _one = self.repairing.lock();
        // The writer's segment is its to repair; one that rolls meanwhile is repaired as
        // a sealed one by the next read.
        let active = self.writer.lock().base == base;
        let repaired = if active {
            self.repair_active(base)?
        } else {
            self.repair_sealed(base)?
        };
        let Some(recovery) = repaired else {
            return Ok(false);
        };
        self.committer
            .quarantined()
            .fetch_add(recovery.quarantined.len() as u64, Ordering::Relaxed);
        let mut found = self.found_damage.lock();
        *found = Some(match found.take() {
            Some(earlier) => earlier.merge(recovery),
            None => recovery,
        });
        self.has_found_damage.store(true, Ordering::Release);
        Ok(true)
    }

    /// Salvages the active segment `base` after a read found damage in it.
    ///
    /// The writer's lock is held throughout, so nothing is appended meanwhile (the
    /// committer waits on this log for as long as the salvage reads and rewrites the
    /// segment, at most `segment_bytes`). Every record up to the writer's next offset
    /// was written and published: those that do not check become lost records, as for
    /// a sealed segment on open (quarantine copy, rewrite, indexes rebuilt), and the
    /// writer and readers move to the rewritten file (reads in flight keep the old
    /// one). `None` when there is nothing to do now: `base` is no longer the active
    /// segment, a round written to it has not finished its journal sync (the rewrite
    /// would hand its records to readers before they are durable; the next read tries
    /// again), or its data checks after all.
    ///
    /// Once the segment is replaced the old writer's file is gone: if the rewritten
    /// one cannot be opened, the log fails (read-only) rather than append to a file
    /// that is no longer the segment.
    fn repair_active(&self, base: Offset) -> Result<Option<Recovery>> {
        let mut w = self.writer.lock();
        if w.base != base || w.closed {
            return Ok(None);
        }
        {
            let st = self.state.lock();
            let published = st.segments.last().is_some_and(|s| {
                s.base == base && s.len == w.write_pos && s.next_offset == w.next_offset
            });
            if !published || !w.unpublished.is_empty() {
                return Ok(None);
            }
        }
        let paths = SegmentPaths::new(&self.dir, base);
        let mut recovery = Recovery::default();
        let end = w.next_offset;
        if !salvage_segment(
            &self.dir,
            &self.name,
            &paths,
            base,
            Some(end),
            &mut recovery,
        )? {
            return Ok(None);
        }
        let interval = u64::from(self.config.index_interval_bytes.max(1));
        let reopened = open_active(&self.dir, &self.name, base, interval, &mut recovery).and_then(
            |(segment, writer)| {
                if writer.next_offset == end {
                    Ok((segment, writer))
                } else {
                    Err(Error::Corrupt {
                        log: self.name.clone(),
                        segment: base,
                        position: writer.write_pos,
                        reason: format!(
                            "salvaged active segment ends at offset {}, expected {end}",
                            writer.next_offset
                        ),
                    })
                }
            },
        );
        let (segment, mut writer) = match reopened {
            Ok(reopened) => reopened,
            Err(e) => {
                self.fail(io::Error::other(format!(
                    "active segment {base} could not be reopened after its salvage: {e}"
                )));
                return Err(e);
            }
        };
        writer.last_timestamp = writer.last_timestamp.max(w.last_timestamp);
        recovery.rebuilt_indexes.push(base);
        *w = writer;
        let mut st = self.state.lock();
        if let Some(seg) = st.segments.last_mut().filter(|s| s.base == base) {
            *seg = segment;
        }
        Ok(Some(recovery))
    }

    /// Salvages sealed segment `base` after a read found damage in it: the same repair
    /// as on open (quarantine copy, rewrite with lost records, indexes rebuilt), then
    /// the segment readers see is swapped for the repaired one (reads in flight keep
    /// the old file). `None` when there is nothing to repair: the active segment (see
    /// [`LogInner::repair_active`]), a segment gone meanwhile, or one whose data checks
    /// after all.
    fn repair_sealed(&self, base: Offset) -> Result<Option<Recovery>> {
        let (paths, next_base) = {
            let st = self.state.lock();
            let Some(i) = st.segments.iter().position(|s| s.base == base) else {
                return Ok(None);
            };
            let Some(next) = st.segments.get(i + 1) else {
                return Ok(None);
            };
            (SegmentPaths::new(&self.dir, base), next.base)
        };
        let mut recovery = Recovery::default();
        if !salvage_segment(
            &self.dir,
            &self.name,
            &paths,
            base,
            Some(next_base),
            &mut recovery,
        )? {
            return Ok(None);
        }
        let interval = u64::from(self.config.index_interval_bytes.max(1));
        let repaired = open_sealed(
            &self.dir,
            &self.name,
            base,
            next_base,
            interval,
            &mut recovery,
        )?;
        let mut st = self.state.lock();
        if let Some(seg) = st.segments.iter_mut().find(|s| s.base == base) {
            *seg = repaired;
        }
        Ok(Some(recovery))
    }

    /// Appends records `from..` of a cached chunk to `out`, within the same limits as
    /// [`LogInner::read_segment`]; returns the offset after the last record looked at.
    fn read_cached(
        &self,
        c: &Cached,
        from: Offset,
        limit: ReadLimit,
        out: &mut Vec<LogRecord>,
        bytes: &mut usize,
    ) -> Result<Offset> {
        let mut at = 0usize;
        let mut expected = c.first;
        // Records before `from` are stepped over by their length alone: the cache holds
        // frames this process encoded, and each one read is still checked whole.
        while expected < from && expected < c.end {
            match format::frame_len_at(&c.frames[at..]) {
                Some(len) if at + len <= c.frames.len() => {
                    at += len;
                    expected += 1;
                }
                _ => break,
            }
        }
        // One allocation for what this chunk can give, not a doubling per few records.
        let room = limit.max_records.saturating_sub(out.len());
        out.reserve(usize::try_from(c.end - expected).map_or(room, |n| n.min(room)));
        while expected < c.end {
            let r = match segment::read_step(&c.frames, at, expected) {
                ReadStep::Record(r) => r,
                // The cache holds what this process encoded: damage is a bug, not disk.
                ReadStep::Need(_) | ReadStep::Damaged(_) => {
                    return Err(Error::Corrupt {
                        log: self.name.clone(),
                        segment: c.first,
                        position: at as u64,
                        reason: "cached records do not decode".into(),
                    });
                }
            };
            if r.offset >= from {
                if !out.is_empty() && bytes.saturating_add(r.frame_len) > limit.max_bytes {
                    return Ok(expected);
                }
                out.push(LogRecord {
                    offset: r.offset,
                    timestamp: r.timestamp,
                    headers: c.frames.slice(at + r.headers.0..at + r.headers.1),
                    payload: c.frames.slice(at + r.payload.0..at + r.payload.1),
                });
                *bytes += r.frame_len;
            }
            at += r.frame_len;
            expected += 1;
            if out.len() >= limit.max_records || *bytes >= limit.max_bytes {
                return Ok(expected);
            }
        }
        Ok(expected)
    }

    /// Appends records `from..` of one segment to `out`; returns the offset after the last
    /// record looked at.
    fn read_segment(
        &self,
        snap: &Snapshot,
        from: Offset,
        limit: ReadLimit,
        out: &mut Vec<LogRecord>,
        bytes: &mut usize,
    ) -> Result<Offset> {
        let corrupt = |position: u64, reason: String| Error::Corrupt {
            log: self.name.clone(),
            segment: snap.base,
            position,
            reason,
        };
        let mut pos = snap.pos;
        let mut expected = snap.offset;
        let skip = from.saturating_sub(snap.offset) > 0;
        let interval = self.config.index_interval_bytes as usize;
        // Read in chunks of at most 1 MiB, sized by the record limit too (at ~1 KiB a
        // record; the loop reads on when records are larger): a consumer taking a few
        // records from a long backlog must not read (and zero a buffer for) a megabyte
        // each time.
        let chunk_for = |bytes: usize, records: usize| {
            let by_records = limit
                .max_records
                .saturating_sub(records)
                .saturating_mul(1024);
            limit
                .max_bytes
                .saturating_sub(bytes)
                .min(by_records)
                .clamp(16 * 1024, 1 << 20)
        };
        let mut want =
            chunk_for(*bytes, out.len()) + if skip { interval + RECORD_OVERHEAD } else { 0 };
        while pos < snap.len && expected < snap.next_offset {
            let n = (snap.len - pos).min(want as u64);
            let chunk = segment::read_bytes(&snap.file, pos, usize::try_from(n).unwrap_or(0))
                .map_err(io_err(&self.dir))?;
            let mut at = 0usize;
            let mut need = 0usize;
            while at < chunk.len() {
                match segment::read_step(&chunk, at, expected) {
                    ReadStep::Record(r) => {
                        if r.offset >= from {
                            if !out.is_empty()
                                && bytes.saturating_add(r.frame_len) > limit.max_bytes
                            {
                                return Ok(expected);
                            }
                            out.push(LogRecord {
                                offset: r.offset,
                                timestamp: r.timestamp,
                                headers: chunk.slice(at + r.headers.0..at + r.headers.1),
                                payload: chunk.slice(at + r.payload.0..at + r.payload.1),
                            });
                            *bytes += r.frame_len;
                        }
                        at += r.frame_len;
                        expected += 1;
                        if out.len() >= limit.max_records || *bytes >= limit.max_bytes {
                            return Ok(expected);
                        }
                    }
                    ReadStep::Need(frame) => {
                        if pos + at as u64 + frame as u64 > snap.len {
                            return Err(corrupt(
                                pos + at as u64,
                                format!("record of {frame} bytes runs past the segment end"),
                            ));
                        }
                        need = frame;
                        break;
                    }
                    ReadStep::Damaged(reason) => {
                        return Err(corrupt(pos + at as u64, reason.to_string()));
                    }
                }
            }
            pos += at as u64;
            want = need.max(chunk_for(*bytes, out.len()));
        }
        if expected < snap.next_offset {
            return Err(corrupt(
                pos,
                format!(
                    "segment data ends at offset {expected}, expected {}",
                    snap.next_offset
                ),
            ));
        }
        Ok(expected)
    }
}

/// Where one step of a read takes its records from.
enum Source {
    Tail(Cached),
    File(Snapshot),
}

struct Snapshot {
    base: Offset,
    file: Arc<File>,
    len: u64,
    next_offset: Offset,
    pos: u64,
    offset: Offset,
}

/// Salvages the damaged segment `base` of log `log` (see `quarantine.rs`): its file is
/// copied into the quarantine directory, then rewritten with lost records in place of
/// what cannot be read, and its index files removed (positions moved) for the caller to
/// rebuild. `end` is the next segment's base for a sealed segment. Returns false if
/// nothing in the middle was lost (a whole file, or only a torn tail of the active one).
fn salvage_segment(
    dir: &Path,
    log: &str,
    paths: &SegmentPaths,
    base: Offset,
    end: Option<Offset>,
    recovery: &mut Recovery,
) -> Result<bool> {
    let data = fs::read(&paths.data).map_err(io_err(&paths.data))?;
    let Some(salvaged) = crate::quarantine::salvage(&data, base, end) else {
        return Ok(false);
    };
    let storage_dir = dir.parent().unwrap_or(dir);
    let copy = crate::quarantine::quarantine_copy(storage_dir, log, &paths.data)
        .map_err(io_err(&paths.data))?;
    crate::quarantine::replace(&paths.data, &salvaged.bytes).map_err(io_err(&paths.data))?;
    for index in [&paths.index, &paths.time] {
        match fs::remove_file(index) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(index)(e)),
        }
    }
    recovery.quarantined.push(copy);
    recovery.lost.extend(salvaged.lost);
    Ok(true)
}

fn open_sealed(
    dir: &Path,
    log: &str,
    base: Offset,
    next_base: Offset,
    interval: u64,
    recovery: &mut Recovery,
) -> Result<Segment> {
    let paths = SegmentPaths::new(dir, base);
    let file = segment::open_data(&paths.data, false).map_err(io_err(&paths.data))?;
    let len = file.metadata().map_err(io_err(&paths.data))?.len();
    let records = next_base.saturating_sub(base);
    let index = segment::read_file_if_exists(&paths.index)
        .map_err(io_err(&paths.index))?
        .and_then(|b| format::parse_index(&b));
    let time = segment::read_file_if_exists(&paths.time)
        .map_err(io_err(&paths.time))?
        .and_then(|b| format::parse_time_index(&b));
    // Every record's CRC is checked on open, whether or not the indexes look right:
    // damage at rest (a bad block, an edit) is found and salvaged here, not by a
    // consumer stuck on an unreadable offset later. Sequential reads at disk speed.
    let mut check = Indexer {
        interval,
        last_index_pos: 0,
    };
    let verified =
        segment::scan(&file, len, base, (0, base), &mut check).map_err(io_err(&paths.data))?;
    let whole = verified.stop.is_none() && verified.next_offset == next_base;
    if !whole && salvage_segment(dir, log, &paths, base, Some(next_base), recovery)? {
        // Rewritten whole (lost records in the gaps): open it again, indexes rebuilt.
        recovery.rebuilt_indexes.push(base);
        return open_sealed(dir, log, base, next_base, interval, recovery);
    }
    if let (Some(index), Some(time)) = (index, time)
        && whole
    {
        let sealed_entry_ok = if len == 0 {
            time.is_empty()
        } else {
            time.last().is_some_and(|e| u64::from(e.rel) + 1 == records)
        };
        if sealed_entry_ok && segment::indexes_fit(&index, &time, len, records) {
            return Ok(Segment {
                base,
                max_timestamp: time.last().map(|e| e.timestamp),
                paths,
                data: Arc::new(file),
                len,
                next_offset: next_base,
                index,
                time_index: time,
            });
        }
    }
    // Rebuild both indexes from the data.
    let mut indexer = Indexer {
        interval,
        last_index_pos: 0,
    };
    let scan =
        segment::scan(&file, len, base, (0, base), &mut indexer).map_err(io_err(&paths.data))?;
    if let Some(stop) = &scan.stop {
        recovery.damaged_segments.push(DamagedSegment {
            segment: base,
            position: scan.end,
            reason: stop.to_string(),
        });
    } else if scan.next_offset != next_base {
        recovery.damaged_segments.push(DamagedSegment {
            segment: base,
            position: scan.end,
            reason: format!(
                "segment holds offsets up to {}, next segment starts at {next_base}",
                scan.next_offset
            ),
        });
    }
    let mut time_index = scan.time_index;
    if let Some(ts) = scan.max_timestamp {
        let rel = u32::try_from(scan.next_offset - 1 - base).unwrap_or(u32::MAX);
        if time_index.last().map(|e| e.rel) != Some(rel) {
            time_index.push(TimeEntry { timestamp: ts, rel });
        }
    }
    segment::write_index_file(&paths.index, &segment::index_bytes(&scan.index))
        .map_err(io_err(&paths.index))?;
    segment::write_index_file(&paths.time, &segment::time_bytes(&time_index))
        .map_err(io_err(&paths.time))?;
    recovery.rebuilt_indexes.push(base);
    Ok(Segment {
        base,
        paths,
        data: Arc::new(file),
        len,
        next_offset: next_base,
        max_timestamp: scan.max_timestamp,
        index: scan.index,
        time_index,
    })
}

fn open_active(
    dir: &Path,
    log: &str,
    base: Offset,
    interval: u64,
    recovery: &mut Recovery,
) -> Result<(Segment, Writer)> {
    let paths = SegmentPaths::new(dir, base);
    let file = segment::open_data(&paths.data, false).map_err(io_err(&paths.data))?;
    let file_len = file.metadata().map_err(io_err(&paths.data))?.len();
    let index_raw = segment::read_file_if_exists(&paths.index).map_err(io_err(&paths.index))?;
    let time_raw = segment::read_file_if_exists(&paths.time).map_err(io_err(&paths.time))?;
    let parsed_index = index_raw.as_deref().and_then(format::parse_index);
    let parsed_time = time_raw.as_deref().and_then(format::parse_time_index);
    let malformed = file_len > 0 && (parsed_index.is_none() || parsed_time.is_none());

    // Check every record, not only those after the last index entry (see open_sealed):
    // damage in the middle is salvaged, keeping the records after it.
    let mut check = Indexer {
        interval,
        last_index_pos: 0,
    };
    let verified =
        segment::scan(&file, file_len, base, (0, base), &mut check).map_err(io_err(&paths.data))?;
    if verified.end < file_len && salvage_segment(dir, log, &paths, base, None, recovery)? {
        // Records that check follow the damage: they were kept, with lost records
        // before them; open the rewritten segment again.
        recovery.rebuilt_indexes.push(base);
        return open_active(dir, log, base, interval, recovery);
    }

    // Start from the last index entry that points at the record it claims to.
    let mut index = parsed_index.unwrap_or_default();
    index.retain(|e| u64::from(e.position) < file_len);
    let mut start = (0, base);
    while let Some(e) = index.last() {
        let pos = u64::from(e.position);
        let offset = base + u64::from(e.rel);
        if record_at(&file, pos, file_len, offset) {
            start = (pos, offset);
            break;
        }
        index.pop();
    }
    let start_rel = index.last().map(|e| e.rel);
    let mut time = parsed_time.unwrap_or_default();
    time.retain(|t| start_rel.is_some_and(|r| t.rel <= r));

    let mut indexer = Indexer {
        interval,
        last_index_pos: start.0,
    };
    let scan =
        segment::scan(&file, file_len, base, start, &mut indexer).map_err(io_err(&paths.data))?;
    if scan.end < file_len {
        if !matches!(scan.stop, Some(segment::StopReason::Incomplete)) {
            // Not a torn write: bytes that are not records. Keep them aside before the
            // tail is cut.
            let storage_dir = dir.parent().unwrap_or(dir);
            let copy = crate::quarantine::quarantine_copy(storage_dir, log, &paths.data)
                .map_err(io_err(&paths.data))?;
            recovery.quarantined.push(copy);
        }
        recovery.truncated = Some(TruncatedTail {
            segment: base,
            position: scan.end,
            bytes: file_len - scan.end,
            records: segment::count_frames(&file, scan.end, file_len),
            first_dropped_offset: scan.next_offset,
            reason: scan
                .stop
                .as_ref()
                .map_or_else(String::new, ToString::to_string),
        });
        file.set_len(scan.end).map_err(io_err(&paths.data))?;
        file.sync_all().map_err(io_err(&paths.data))?;
    }
    index.extend_from_slice(&scan.index);
    time.extend_from_slice(&scan.time_index);
    let index_bytes = segment::index_bytes(&index);
    if index_raw.as_deref() != Some(index_bytes.as_slice()) {
        segment::write_index_file(&paths.index, &index_bytes).map_err(io_err(&paths.index))?;
    }
    let time_bytes = segment::time_bytes(&time);
    if time_raw.as_deref() != Some(time_bytes.as_slice()) {
        segment::write_index_file(&paths.time, &time_bytes).map_err(io_err(&paths.time))?;
    }
    if malformed {
        recovery.rebuilt_indexes.push(base);
    }
    let data = Arc::new(file);
    let writer = Writer {
        base,
        data: data.clone(),
        index_file: None,
        time_file: None,
        index_file_len: index_bytes.len() as u64,
        time_file_len: time_bytes.len() as u64,
        write_pos: scan.end,
        writeback_from: scan.end,
        next_offset: scan.next_offset,
        last_timestamp: scan.max_timestamp,
        indexer,
        new_index: Vec::new(),
        new_time: Vec::new(),
        index_written: 0,
        time_written: 0,
        last_time_rel: time.last().map(|t| t.rel),
        dirty: false,
        closed: false,
        buf_first: None,
        unpublished: Vec::new(),
        arena: bytes::BytesMut::new(),
    };
    let segment = Segment {
        base,
        paths,
        data,
        len: scan.end,
        next_offset: scan.next_offset,
        max_timestamp: scan.max_timestamp,
        index,
        time_index: time,
    };
    Ok((segment, writer))
}
