//! roost-storage: append-only segment logs with CRC framing, group commit, crash
//! recovery and retention. The `$queue/` partitions sit on these logs.
//!
//! A [`Storage`] is a directory holding many named [`Log`]s (thousands of partitions),
//! written by one shared group committer (see `commit.rs`): appends from any number of
//! tasks are batched into one write(2) per log per round, and each appender awaits a
//! future that resolves with its offset once the record is durable under the log's
//! [`Durability`]. `Fsync` logs share a write-ahead journal (`journal.rs`): a round's
//! records go to their segments and, copied, into one journal write, so one fdatasync
//! makes a round of every log durable; the segments are synced later, before the
//! journal space is reused. In both modes the record has reached the kernel
//! (write(2), not a user-space buffer) before anything resolves, so `kill -9` loses
//! nothing acknowledged; in `Buffered` mode power loss may cost up to the sync interval.
//! A write or fsync error is never swallowed: the log turns read-only, the waiting
//! appenders get [`Error::ReadOnly`], and [`Log::failure`] / [`Storage::failed_logs`]
//! report it.
//!
//! ```no_run
//! # async fn demo() -> roost_storage::Result<()> {
//! use roost_storage::{LogConfig, ReadLimit, Record, Storage};
//! let storage = Storage::open("./data/queues")?;
//! let (log, recovery) = storage.open_log("orders-0", LogConfig::default())?;
//! if !recovery.is_clean() {
//!     eprintln!("orders-0 recovered: {recovery:?}");
//! }
//! let first = log
//!     .append(vec![Record::now("props".into(), "hello".into())])
//!     .await?;
//! let records = log.read(first, ReadLimit::bytes(1 << 20))?;
//! assert_eq!(&records[0].payload[..], b"hello");
//! # Ok(()) }
//! ```
//!
//! # On-disk format (version 1)
//!
//! ```text
//! <storage dir>/.journal-0, .journal-1     the journal of Fsync logs (format in journal.rs)
//! <storage dir>/<log name>/
//!     log.id                          8 bytes: this incarnation of the log
//!     00000000000000000000.log        records with offsets 0..
//!     00000000000000000000.index      sparse offset index of that segment
//!     00000000000000000000.timeindex  sparse time index of that segment
//!     00000000000000052113.log        next segment: base offset 52113, zero-padded to 20
//!     ...
//! <storage dir>/quarantine/<log name>/<file>.<unix ms>
//!                                     damaged files as recovery found them (quarantine.rs)
//! ```
//!
//! A record lost to damage in the middle of a segment reads back as a *lost record*:
//! its offset and the timestamp before it, no headers, no payload
//! ([`Recovery::lost`] lists them when the log is opened).
//!
//! All integers are little-endian. A `.log` file is a sequence of records:
//!
//! ```text
//! length     u32   bytes after this field (crc + body)
//! crc        u32   CRC32C (Castagnoli) of the body
//! body:
//!   version  u8    1
//!   offset   u64   dense across the log, first record ever is 0
//!   timestamp u64  milliseconds since the Unix epoch, never decreasing along a log
//!   hdr_len  u32   length of headers
//!   headers  [hdr_len]  opaque (the queue layer keeps MQTT properties here)
//!   payload  [rest]
//! ```
//!
//! A record costs 29 bytes beyond its headers and payload. Records are contiguous from
//! byte 0 and the first has the segment's base offset.
//!
//! `.index` entries are `(relative offset u32, byte position u32)`; `.timeindex` entries
//! are `(timestamp u64, relative offset u32)`. Both are written at the first record
//! starting at least `index_interval_bytes` after the previous entry (offset `base` at
//! byte 0 is implicit), so their size is about 0.3% of the data. When a segment is
//! sealed its time index also gets an entry for its last record, which therefore
//! carries the segment's largest timestamp.
//!
//! # Recovery
//!
//! [`Storage::open`] first replays the journal: records it holds that a log's active
//! segment lost (a power cut after the journal sync, before the segment reached the
//! disk) are appended to the segment again and synced; what the segment holds already
//! is skipped. The journal is then voided. Each log's [`Recovery`] says how many
//! records were restored.
//!
//! Sealed segments (all but the last) were fully synced before the next segment was
//! created, and the directory was synced after creating it. On open their index files
//! are only checked for shape and bounds; malformed or missing ones are rebuilt from the
//! data. The active (last) segment is scanned from its last index entry that points at
//! a valid record; the scan checks every CRC and that offsets are dense, and the file is
//! cut after the last good record. What was cut is returned in [`Recovery`]. Damage in
//! the middle of a segment is salvaged (see `quarantine.rs`): records that check keep
//! their offsets, lost ones read back as lost records. A read that meets damage while
//! running (a bad block under a running broker) salvages the segment the same way,
//! sealed or active, and goes on ([`Log::take_found_damage`]).
//!
//! # Limits
//!
//! Sparse indexes are held in memory for every segment (about 20 bytes per 4 KiB of
//! data at the default interval). Positions are u32, so segments are at most 1 GiB plus
//! one record, and records at most 512 MiB framed.
#![deny(missing_docs)]

mod commit;
mod error;
mod format;
mod journal;
pub mod latency;
mod log;
mod offset;
pub mod quarantine;
mod segment;
pub mod space;
mod storage;

pub use error::{Error, Result};
pub use log::{
    Append, DamagedSegment, Deleted, Durability, Log, LogConfig, LogRecord, LogStats, ReadLimit,
    Record, Recovery, Retention, TruncatedTail,
};
pub use offset::Offset;
pub use storage::{JournalDamage, Storage};

#[cfg(test)]
mod tests;
