//! The storage error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::Offset;

/// Everything that can go wrong in a storage call.
///
/// The broker maps these onto MQTT: an append that fails with any variant means the
/// publish was not stored, so a v5 producer gets PUBACK 0x80 (unspecified error) and
/// a 3.1.1 producer is disconnected rather than acknowledged; except [`Error::NoSpace`],
/// which is answered like a full queue (0x97; a 3.1.1 PUBACK waits for space).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// An earlier write or fsync of this log failed; the log refuses appends from then on
    /// because what reached the disk is unknown. Reopening the log recovers it.
    #[error("log {log} is read-only after an I/O error: {cause}")]
    ReadOnly {
        /// The log's name.
        log: String,
        /// The error that made the log read-only.
        cause: Arc<io::Error>,
    },
    /// The file system has too little space left to take the append (a round is
    /// written only if [`crate::space::RESERVE`] bytes stay free after it). Nothing was
    /// written and the log stays writable: the append may be tried again later.
    #[error("no space left in {}: {needed} bytes needed (with reserve), {available} free", path.display())]
    NoSpace {
        /// The storage directory.
        path: PathBuf,
        /// Bytes the round needed, reserve included.
        needed: u64,
        /// Bytes the file system had free.
        available: u64,
    },
    /// A record's CRC or framing does not check: the data on disk is damaged.
    /// Damaged bytes are never returned as records.
    #[error("corrupt record in log {log}, segment {segment}, byte {position}: {reason}")]
    Corrupt {
        /// The log's name.
        log: String,
        /// Base offset of the segment holding the damage.
        segment: Offset,
        /// Byte position of the damaged record within the segment.
        position: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A read asked for an offset the log does not hold (deleted by retention, or not
    /// yet written).
    #[error("offset {requested} is outside log {log}'s range {start}..={end}")]
    OffsetOutOfRange {
        /// The log's name.
        log: String,
        /// The offset asked for.
        requested: Offset,
        /// The first offset still held.
        start: Offset,
        /// The next offset to be written.
        end: Offset,
    },
    /// One record is larger than a segment may hold.
    #[error("record of {size} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// Encoded size of the record.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A log name that is not a safe directory name.
    #[error("invalid log name {0:?}: use 1-200 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    /// `open_log` for a log that is already open in this `Storage`.
    #[error("log {0} is already open")]
    AlreadyOpen(String),
    /// The storage was shut down or the log deleted.
    #[error("storage closed")]
    Closed,
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
