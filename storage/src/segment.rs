//! One segment: a data file of framed records plus its two sparse index files.
//!
//! This module knows how to name, scan, recover and read a segment. It keeps no
//! locks and spawns nothing; [`crate::log`] decides which segment is active and
//! who may touch it.
//!
//! Invariants of a segment on disk, which recovery restores and the writer keeps:
//! - records are contiguous from byte 0, with dense offsets from the base offset;
//! - every `.index` entry points at the start of a record and both its fields
//!   strictly increase; offset `base` at byte 0 is implicit and never written;
//! - `.timeindex` entries are written at the same records as `.index` entries, plus
//!   one final entry for the last record when the segment is sealed, so the last
//!   entry of a sealed segment carries its largest timestamp.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::Offset;
use crate::format::{
    self, Damage, Decoded, FRAME_PREFIX, INDEX_ENTRY, IndexEntry, MAX_FRAME, TIME_ENTRY, TimeEntry,
};

/// Width of the zero-padded base offset in segment file names.
const NAME_DIGITS: usize = 20;

/// Chunk size for sequential scans.
const SCAN_CHUNK: usize = 1 << 20;

/// File extensions of a segment's three files.
pub(crate) const DATA_EXT: &str = "log";
pub(crate) const INDEX_EXT: &str = "index";
pub(crate) const TIME_EXT: &str = "timeindex";

pub(crate) fn file_name(base: Offset, ext: &str) -> String {
    format!("{base:0NAME_DIGITS$}.{ext}")
}

/// Splits `00000000000000000042.log` into `(42, "log")`.
pub(crate) fn parse_file_name(name: &str) -> Option<(Offset, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

/// Paths of one segment's files.
#[derive(Debug, Clone)]
pub(crate) struct SegmentPaths {
    pub data: PathBuf,
    pub index: PathBuf,
    pub time: PathBuf,
}

impl SegmentPaths {
    pub fn new(dir: &Path, base: Offset) -> Self {
        SegmentPaths {
            data: dir.join(file_name(base, DATA_EXT)),
            index: dir.join(file_name(base, INDEX_EXT)),
            time: dir.join(file_name(base, TIME_EXT)),
        }
    }
}

/// The readable view of a segment, as readers see it.
#[derive(Debug)]
pub(crate) struct Segment {
    pub base: Offset,
    pub paths: SegmentPaths,
    pub data: Arc<File>,
    /// Bytes of readable records (for the active segment: durable under the log's mode).
    pub len: u64,
    /// One past the last readable record.
    pub next_offset: Offset,
    /// Timestamp of the last readable record (timestamps never decrease in a log).
    pub max_timestamp: Option<u64>,
    pub index: Vec<IndexEntry>,
    pub time_index: Vec<TimeEntry>,
}

impl Segment {
    /// Where to start reading to reach `offset`: (byte position, offset at it).
    pub fn start_for(&self, offset: Offset) -> (u64, Offset) {
        let rel = u32::try_from(offset.saturating_sub(self.base)).unwrap_or(u32::MAX);
        match format::index_lookup(&self.index, rel) {
            Some(e) => (u64::from(e.position), self.base + u64::from(e.rel)),
            None => (0, self.base),
        }
    }

    /// The offset to start a timestamp search from: the last time-index entry
    /// strictly older than `timestamp`, or the base.
    pub fn time_start(&self, timestamp: u64) -> Offset {
        let i = self.time_index.partition_point(|e| e.timestamp < timestamp);
        match i.checked_sub(1) {
            Some(i) => self.base + u64::from(self.time_index[i].rel),
            None => self.base,
        }
    }
}

/// Why a scan stopped before the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The last frame is cut short (a torn write).
    Incomplete,
    /// A complete frame whose bytes do not check.
    Damaged(Damage),
    /// A valid frame carrying the wrong offset.
    OffsetGap { expected: Offset, found: Offset },
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Incomplete => f.write_str("incomplete record (torn write)"),
            StopReason::Damaged(d) => d.fmt(f),
            StopReason::OffsetGap { expected, found } => {
                write!(f, "record carries offset {found}, expected {expected}")
            }
        }
    }
}

/// What a sequential scan of a segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Byte position just past the last good record.
    pub end: u64,
    pub next_offset: Offset,
    pub max_timestamp: Option<u64>,
    /// Index entries for records after the starting point.
    pub index: Vec<IndexEntry>,
    pub time_index: Vec<TimeEntry>,
    /// Set if the scan stopped before `file_len`.
    pub stop: Option<StopReason>,
}

/// Decides whether the record at `pos` gets index entries, and records them.
pub(crate) struct Indexer {
    pub interval: u64,
    pub last_index_pos: u64,
}

impl Indexer {
    pub fn observe(
        &mut self,
        base: Offset,
        pos: u64,
        offset: Offset,
        timestamp: u64,
        index: &mut Vec<IndexEntry>,
        time: &mut Vec<TimeEntry>,
    ) {
        if pos.saturating_sub(self.last_index_pos) < self.interval {
            return;
        }
        let (Ok(rel), Ok(position)) = (u32::try_from(offset - base), u32::try_from(pos)) else {
            return;
        };
        index.push(IndexEntry { rel, position });
        time.push(TimeEntry { timestamp, rel });
        self.last_index_pos = pos;
    }
}

/// Reads exactly `len` bytes at `pos`.
fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Vec<u8>> {
    // Read into uninitialized capacity: `vec![0; len]` asks the allocator for zeroed
    // memory, which jemalloc gives for chunks this large by handing the pages back to
    // the kernel and faulting fresh ones in (77K page faults a second for a consumer
    // reading a backlog, half its delivery rate), and `pread` overwrites it anyway.
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = pos + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The capacity may be larger than asked for, and a read may have filled it.
    buf.truncate(len);
    Ok(buf)
}

/// Scans records from `(start_pos, start_offset)` to `file_len`, checking every CRC
/// and that offsets are dense, and building index entries as the writer would have.
pub(crate) fn scan(
    file: &File,
    file_len: u64,
    base: Offset,
    start: (u64, Offset),
    indexer: &mut Indexer,
) -> io::Result<Scan> {
    let (mut pos, mut next) = start;
    let mut max_timestamp = None;
    let mut index = Vec::new();
    let mut time_index = Vec::new();
    let mut stop = None;
    // `chunk[cursor..]` holds the file's bytes from `pos` on.
    let mut chunk: Vec<u8> = Vec::new();
    let mut cursor = 0usize;
    while pos < file_len {
        match format::decode_record(&chunk[cursor..]) {
            Decoded::Record(r) => {
                if r.offset != next {
                    stop = Some(StopReason::OffsetGap {
                        expected: next,
                        found: r.offset,
                    });
                    break;
                }
                indexer.observe(
                    base,
                    pos,
                    r.offset,
                    r.timestamp,
                    &mut index,
                    &mut time_index,
                );
                max_timestamp = Some(r.timestamp);
                next += 1;
                pos += r.frame_len as u64;
                cursor += r.frame_len;
            }
            Decoded::Incomplete { frame_len } => {
                let remaining = file_len - pos;
                let want = frame_len.max(FRAME_PREFIX) as u64;
                if want > remaining {
                    stop = Some(StopReason::Incomplete);
                    break;
                }
                chunk.drain(..cursor);
                cursor = 0;
                let have = chunk.len() as u64;
                let read = (remaining - have).min((SCAN_CHUNK as u64).max(want - have));
                let more = read_at(file, pos + have, usize::try_from(read).unwrap_or(0))?;
                chunk.extend_from_slice(&more);
            }
            Decoded::Damaged(d) => {
                stop = Some(StopReason::Damaged(d));
                break;
            }
        }
    }
    Ok(Scan {
        end: pos,
        next_offset: next,
        max_timestamp,
        index,
        time_index,
        stop,
    })
}

/// Counts the frames in `[from, file_len)` by their length fields, a partial last
/// frame included; `None` if a length field is impossible.
pub(crate) fn count_frames(file: &File, mut from: u64, file_len: u64) -> Option<u64> {
    let mut n = 0u64;
    while from < file_len {
        n += 1;
        if file_len - from < 4 {
            return Some(n);
        }
        let b = read_at(file, from, 4).ok()?;
        let length = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
        let frame = length + 4;
        if frame < format::RECORD_OVERHEAD as u64 || frame > MAX_FRAME as u64 {
            return None;
        }
        from += frame;
    }
    Some(n)
}

pub(crate) fn read_file_if_exists(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the contents of an index file and syncs it.
pub(crate) fn write_index_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()
}

pub(crate) fn open_data(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .open(path)
}

/// A complete frame read for the read path: the bytes plus what they decode to.
pub(crate) enum ReadStep {
    Record(format::RawRecord),
    /// More bytes are needed: the frame is this long.
    Need(usize),
    Damaged(StopReason),
}

/// Decodes the record at `chunk[at..]`, expecting offset `expected`.
pub(crate) fn read_step(chunk: &Bytes, at: usize, expected: Offset) -> ReadStep {
    match format::decode_record(&chunk[at..]) {
        Decoded::Record(r) if r.offset == expected => ReadStep::Record(r),
        Decoded::Record(r) => ReadStep::Damaged(StopReason::OffsetGap {
            expected,
            found: r.offset,
        }),
        Decoded::Incomplete { frame_len } => ReadStep::Need(frame_len.max(FRAME_PREFIX)),
        Decoded::Damaged(d) => ReadStep::Damaged(StopReason::Damaged(d)),
    }
}

/// Reads `len` bytes at `pos` into shared, sliceable memory.
pub(crate) fn read_bytes(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    Ok(Bytes::from(read_at(file, pos, len)?))
}

/// Encoded sizes of index files, for checks against what is on disk.
pub(crate) fn index_bytes(entries: &[IndexEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * INDEX_ENTRY);
    format::encode_index(&mut b, entries);
    b
}

pub(crate) fn time_bytes(entries: &[TimeEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * TIME_ENTRY);
    format::encode_time_index(&mut b, entries);
    b
}

/// Checks a sealed segment's parsed indexes against its data length and offset range.
pub(crate) fn indexes_fit(
    index: &[IndexEntry],
    time: &[TimeEntry],
    len: u64,
    records: u64,
) -> bool {
    let index_ok = index
        .last()
        .is_none_or(|e| u64::from(e.position) < len && u64::from(e.rel) < records);
    let time_ok = time.last().is_none_or(|e| u64::from(e.rel) < records);
    index_ok && time_ok
}
