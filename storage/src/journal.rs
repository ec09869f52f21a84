//! The write-ahead journal of `Fsync` logs: one fdatasync makes a round of appends to
//! any number of logs durable.
//!
//! Without it every `Fsync` log pays its own fdatasync per batch, and each one costs
//! the same (~75 us of CPU and several device requests in this VM) however few records
//! it carries: a queue with 8 partitions and a progress log spent 9 syncs where one
//! would do. With it the journal thread writes each log's new records to the log's
//! segment as before (write(2), no sync), copies the same frames into one journal
//! write, fdatasyncs only the journal, and then publishes and resolves every append of
//! the round. The segments are synced later, in the background, before the journal
//! space that covers them is reused (a checkpoint).
//!
//! Two journal files take turns: while one is filled, the other's checkpoint runs on
//! the sync pool (fdatasync of every log written during its lap, then a new epoch in
//! its header, which voids its entries). The journal thread waits only if it fills a
//! file before the other's checkpoint has finished.
//!
//! # Format
//!
//! ```text
//! <storage dir>/.journal-0, .journal-1
//!   header (4 KiB, rewritten only by a checkpoint):
//!     magic "roostjnl", version u32 = 1, epoch u64, crc32c u32 of the 20 bytes before
//!   entries from byte 4096, back to back:
//!     len       u32   bytes after this field
//!     crc       u32   CRC32C of the rest of the entry
//!     epoch     u64   the header's epoch when written
//!     log id    u64   the log incarnation (`log.id` in the log's directory)
//!     name_len  u16
//!     name      [name_len]  the log's directory name
//!     frames    [rest]      the records exactly as written to the segment
//! ```
//!
//! Recovery (in `Storage::open`) reads the entries of both files up to the first one
//! that is torn, damaged or of another epoch, and re-appends to each log the records
//! that its segments lost (a power cut after the journal sync but before the segments
//! reached the disk). A record already in its log (offset below the log's next
//! offset: the usual case after `kill -9`, where the page cache survives) is skipped;
//! so are entries for a log whose directory is gone or holds another incarnation
//! (deleted and created again under the same name). Then both files get a new epoch.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::format;

/// The journal files, in the storage directory (not valid log names, so never mistaken
/// for logs).
pub(crate) const FILE_NAMES: [&str; 2] = [".journal-0", ".journal-1"];

/// Bytes before the first entry.
pub(crate) const HEADER: u64 = 4096;

/// Default size each journal file may reach before the other takes over.
pub(crate) const DEFAULT_FILE_BYTES: u64 = 64 * 1024 * 1024;

const MAGIC: &[u8; 8] = b"roostjnl";
const VERSION: u32 = 1;
const HEADER_USED: usize = 8 + 4 + 8 + 4;

/// Entry bytes before the name.
const ENTRY_FIXED: usize = 4 + 4 + 8 + 8 + 2;

/// One journal file.
pub(crate) struct JournalFile {
    pub(crate) file: File,
    /// The epoch in its header: only entries stamped with it count.
    pub(crate) epoch: u64,
}

impl JournalFile {
    /// Gives the file a new epoch (voiding every entry in it) and syncs the header.
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        let epoch = self.epoch.wrapping_add(1);
        self.file.write_all_at(&header_bytes(epoch), 0)?;
        self.file.sync_data()?;
        self.epoch = epoch;
        Ok(())
    }
}

fn header_bytes(epoch: u64) -> [u8; HEADER_USED] {
    let mut h = [0u8; HEADER_USED];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

fn parse_header(b: &[u8]) -> Option<u64> {
    let h = b.get(..HEADER_USED)?;
    if &h[..8] != MAGIC || h[8..12] != VERSION.to_le_bytes() {
        return None;
    }
    if crc32c::crc32c(&h[..20]).to_le_bytes() != h[20..24] {
        return None;
    }
    Some(u64::from_le_bytes(h[12..20].try_into().ok()?))
}

/// A fresh epoch for a file without a readable header: time-based, so it is unlikely to
/// match entries left from an earlier life of the file.
fn fresh_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(1)
}

/// A new log incarnation id (see the module docs).
pub(crate) fn new_log_id() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    fresh_epoch() ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What a journal file held for the logs: entries in file order.
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) log_id: u64,
    pub(crate) frames: Bytes,
}

/// Damage in a journal file: entries of the current epoch that could not be read, with
/// readable ones after them (a torn write at the end of the last round is not damage:
/// nothing of the epoch follows it), or a header that does not check over a file that
/// holds something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damaged {
    /// The journal file's name.
    pub(crate) file: &'static str,
    /// The bytes skipped: from the first unreadable entry to the next readable one; for
    /// a damaged header, from byte 0 to the first readable entry.
    pub(crate) skipped: std::ops::Range<u64>,
    /// The header was unreadable: the epoch was taken from the first intact entry.
    pub(crate) header: bool,
}

/// Opens (creating if needed) both journal files and reads their entries, stepping
/// over damage in the middle of a file (reported in the third value).
///
/// A file that is empty or all zeros (never written) gets a fresh header. A damaged
/// header over a file that holds more is damage too: its entries carry the epoch as
/// well, so the first intact entry after the header gives it and they are read as
/// usual (should that epoch have been voided already, a checkpoint put its records in
/// their logs, and replay skips them); the file keeps its damaged header here (the
/// caller copies it aside, then voids it with a fresh epoch, see
/// [`JournalFile::reset`]).
pub(crate) fn open(dir: &Path) -> io::Result<(Vec<JournalFile>, Vec<Entry>, Vec<Damaged>)> {
    let mut files = Vec::with_capacity(FILE_NAMES.len());
    let mut entries = Vec::new();
    let mut damaged = Vec::new();
    let mut created = false;
    for name in FILE_NAMES {
        let path = dir.join(name);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        created |= !existed;
        let bytes = if existed {
            std::fs::read(&path)?
        } else {
            Vec::new()
        };
        let mut jf = JournalFile { file, epoch: 0 };
        let first = usize::try_from(HEADER).unwrap_or(usize::MAX);
        match parse_header(&bytes) {
            Some(epoch) => {
                jf.epoch = epoch;
                read_entries(
                    &Bytes::from(bytes),
                    first,
                    epoch,
                    name,
                    &mut entries,
                    &mut damaged,
                );
            }
            None if bytes.iter().all(|&b| b == 0) => {
                jf.epoch = fresh_epoch();
                jf.file.write_all_at(&header_bytes(jf.epoch), 0)?;
                jf.file.sync_data()?;
            }
            None => {
                // Not voided with a fresh header yet: the caller copies the file aside
                // first. Any epoch but the entries' serves as the file's next one.
                jf.epoch = fresh_epoch();
                let bytes = Bytes::from(bytes);
                let found = first_entry(&bytes, first);
                damaged.push(Damaged {
                    file: name,
                    skipped: 0..found.map_or(bytes.len(), |(at, _)| at) as u64,
                    header: true,
                });
                if let Some((at, epoch)) = found {
                    read_entries(&bytes, at, epoch, name, &mut entries, &mut damaged);
                }
            }
        }
        files.push(jf);
    }
    if created {
        File::open(dir)?.sync_all()?;
    }
    Ok((files, entries, damaged))
}

/// Reads the entries of `epoch` from `at` on into `entries`, stepping over damage in
/// the middle (pushed onto `damaged`) to the next intact entry of the epoch.
fn read_entries(
    bytes: &Bytes,
    mut at: usize,
    epoch: u64,
    file: &'static str,
    entries: &mut Vec<Entry>,
    damaged: &mut Vec<Damaged>,
) {
    loop {
        let stop = scan(bytes, at, epoch, entries);
        let Some(next) = next_entry(bytes, stop.saturating_add(1), epoch) else {
            return;
        };
        damaged.push(Damaged {
            file,
            skipped: stop as u64..next as u64,
            header: false,
        });
        at = next;
    }
}

/// The first position from `from` on where an intact entry of any epoch starts, with
/// its epoch: how a file whose header is lost finds its entries.
fn first_entry(bytes: &Bytes, from: usize) -> Option<(usize, u64)> {
    let last = bytes.len().checked_sub(ENTRY_FIXED)?;
    (from..=last).find_map(|at| {
        // Cheap tests that most bytes fail before the CRC (there is no epoch to match):
        // a length that fits, and a name made of a log name's characters.
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().ok()?) as usize;
        let name_len = usize::from(u16::from_le_bytes([bytes[at + 24], bytes[at + 25]]));
        let name = bytes.get(at + ENTRY_FIXED..at + ENTRY_FIXED + name_len)?;
        if name_len == 0
            || ENTRY_FIXED - 4 + name_len > len
            || len > bytes.len() - at - 4
            || !name
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return None;
        }
        let epoch = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().ok()?);
        entry_at(bytes, at, epoch).map(|_| (at, epoch))
    })
}

/// The entry at `at` if it is whole, intact and of `epoch`, and where it ends.
fn entry_at(bytes: &Bytes, at: usize, epoch: u64) -> Option<(Entry, usize)> {
    let fixed = bytes.get(at..at.checked_add(ENTRY_FIXED)?)?;
    let len = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]) as usize;
    let end = at.checked_add(4)?.checked_add(len)?;
    if len < ENTRY_FIXED - 4 || end > bytes.len() {
        return None;
    }
    let field = |from: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[from..from + 8]);
        u64::from_le_bytes(a)
    };
    // The epoch first: a cheap test that most bytes fail when searching (see
    // `next_entry`), before the CRC.
    if field(at + 8) != epoch {
        return None;
    }
    let crc = u32::from_le_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    if crc32c::crc32c(&bytes[at + 8..end]) != crc {
        return None;
    }
    let log_id = field(at + 16);
    let name_len = usize::from(u16::from_le_bytes([bytes[at + 24], bytes[at + 25]]));
    let name_end = at + ENTRY_FIXED + name_len;
    if name_end > end {
        return None;
    }
    let name = std::str::from_utf8(&bytes[at + ENTRY_FIXED..name_end]).ok()?;
    let entry = Entry {
        name: name.to_owned(),
        log_id,
        frames: bytes.slice(name_end..end),
    };
    Some((entry, end))
}

/// Reads entries from `at` on while they are whole, intact and of `epoch`; returns
/// where the first one that is not starts.
fn scan(bytes: &Bytes, mut at: usize, epoch: u64, out: &mut Vec<Entry>) -> usize {
    while let Some((entry, end)) = entry_at(bytes, at, epoch) {
        out.push(entry);
        at = end;
    }
    at
}

/// The first position from `from` on where an intact entry of `epoch` starts, if any.
fn next_entry(bytes: &Bytes, from: usize, epoch: u64) -> Option<usize> {
    let stamp = epoch.to_le_bytes();
    let last = bytes.len().checked_sub(ENTRY_FIXED)?;
    (from..=last)
        .find(|&at| bytes[at + 8..at + 16] == stamp && entry_at(bytes, at, epoch).is_some())
}

/// Starts an entry for `frames` of one log at the end of `buf`. Its epoch and CRC are
/// filled in by [`seal`] once the round knows which file it goes to.
pub(crate) fn push_entry(buf: &mut Vec<u8>, log_id: u64, name: &str, frames: &[u8]) {
    let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
    let len = ENTRY_FIXED - 4 + name.len() + frames.len();
    buf.reserve(len + 4);
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&[0; 8]);
    buf.extend_from_slice(&log_id.to_le_bytes());
    buf.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_le_bytes());
    buf.extend_from_slice(name);
    buf.extend_from_slice(frames);
}

/// Stamps every entry in `buf` with `epoch` and its CRC.
pub(crate) fn seal(buf: &mut [u8], epoch: u64) {
    let mut at = 0;
    while at + ENTRY_FIXED <= buf.len() {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let end = at + 4 + len;
        buf[at + 8..at + 16].copy_from_slice(&epoch.to_le_bytes());
        let crc = crc32c::crc32c(&buf[at + 8..end]);
        buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// The records of one entry, decoded: `(offset, timestamp, headers, payload)`.
/// Stops at the first frame that does not decode (an entry's CRC already covers its
/// frames, so that would be a bug, not a torn write).
pub(crate) fn frames(entry: &Entry) -> Vec<(u64, u64, Bytes, Bytes)> {
    let mut out = Vec::new();
    let mut at = 0;
    let b = &entry.frames;
    while at < b.len() {
        match format::decode_record(&b[at..]) {
            format::Decoded::Record(r) => {
                out.push((
                    r.offset,
                    r.timestamp,
                    b.slice(at + r.headers.0..at + r.headers.1),
                    b.slice(at + r.payload.0..at + r.payload.1),
                ));
                at += r.frame_len;
            }
            _ => break,
        }
    }
    out
}

/// Entries grouped by log name, each log's in file order of the file they came from,
/// files in order; replay sorts out the rest by offset.
pub(crate) fn by_log(entries: Vec<Entry>) -> HashMap<String, Vec<Entry>> {
    let mut map: HashMap<String, Vec<Entry>> = HashMap::new();
    for e in entries {
        map.entry(e.name.clone()).or_default().push(e);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_scanning_stops_at_damage_or_another_epoch() {
        let mut raw = Vec::new();
        format::encode_record(&mut raw, 7, 1_000, b"h", b"payload");
        format::encode_record(&mut raw, 8, 1_001, b"", b"second");
        let mut buf = Vec::new();
        push_entry(&mut buf, 42, "q-0", &raw);
        push_entry(&mut buf, 43, "q-1", &raw[..40]);
        seal(&mut buf, 5);
        let mut file = vec![0u8; HEADER as usize];
        file[..HEADER_USED].copy_from_slice(&header_bytes(5));
        file.extend_from_slice(&buf);
        let file = Bytes::from(file);
        assert_eq!(parse_header(&file), Some(5));

        let mut out = Vec::new();
        scan(&file, HEADER as usize, 5, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].name.as_str(), out[0].log_id), ("q-0", 42));
        let decoded = frames(&out[0]);
        assert_eq!(decoded.len(), 2);
        assert_eq!((decoded[1].0, decoded[1].1), (8, 1_001));
        assert_eq!(&decoded[1].3[..], b"second");
        assert_eq!(
            frames(&out[1]).len(),
            1,
            "a cut frame inside an entry ends it"
        );

        out.clear();
        scan(&file, HEADER as usize, 6, &mut out);
        assert!(out.is_empty(), "entries of another epoch are void");

        // A flipped byte in the second entry keeps the first only; a torn tail too.
        let mut damaged = file.to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        out.clear();
        scan(&Bytes::from(damaged), HEADER as usize, 5, &mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        scan(&file.slice(..file.len() - 3), HEADER as usize, 5, &mut out);
        assert_eq!(out.len(), 1);

        // Damage in the first entry: the second is found after it; a torn tail has
        // nothing of the epoch after it, so it is not damage.
        let mut damaged = file.to_vec();
        damaged[HEADER as usize + 40] ^= 1;
        let damaged = Bytes::from(damaged);
        out.clear();
        let stop = scan(&damaged, HEADER as usize, 5, &mut out);
        assert_eq!((out.len(), stop), (0, HEADER as usize));
        let next = next_entry(&damaged, stop + 1, 5).expect("the second entry");
        scan(&damaged, next, 5, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "q-1");
        let torn = file.slice(..file.len() - 3);
        out.clear();
        let stop = scan(&torn, HEADER as usize, 5, &mut out);
        assert_eq!(next_entry(&torn, stop + 1, 5), None);
        assert_eq!(
            next_entry(&file, stop + 1, 6),
            None,
            "another epoch's entry"
        );
    }

    #[test]
    fn a_bad_header_is_not_read_as_an_epoch() {
        let mut h = header_bytes(9).to_vec();
        assert_eq!(parse_header(&h), Some(9));
        h[13] ^= 0xff;
        assert_eq!(parse_header(&h), None);
        assert_eq!(parse_header(&[0u8; 10]), None);
    }

    #[test]
    fn a_file_never_written_is_fresh_and_a_garbled_header_is_damage() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Created, cut before its header reached the disk: not damage.
        std::fs::write(dir.path().join(FILE_NAMES[0]), [0u8; 100]).expect("write");
        // A garbled header over bytes that are no entry: damage, nothing to read.
        let mut garbled = vec![0xABu8; HEADER as usize + 300];
        garbled[HEADER as usize..].fill(0x11);
        std::fs::write(dir.path().join(FILE_NAMES[1]), &garbled).expect("write");
        let (files, entries, damaged) = open(dir.path()).expect("open");
        assert!(entries.is_empty());
        assert_eq!(
            damaged,
            vec![Damaged {
                file: FILE_NAMES[1],
                skipped: 0..garbled.len() as u64,
                header: true,
            }]
        );
        let fresh = std::fs::read(dir.path().join(FILE_NAMES[0])).expect("read");
        assert_eq!(parse_header(&fresh), Some(files[0].epoch));
        // Left as it was for the caller to copy aside before voiding it.
        let kept = std::fs::read(dir.path().join(FILE_NAMES[1])).expect("read");
        assert_eq!(kept, garbled);
    }
}
