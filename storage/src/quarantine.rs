//! Damaged segments: what can be read is kept, what cannot is moved aside.
//!
//! A segment damaged in the middle (a bad block, an operator's editor, a file cut
//! short) is rewritten on recovery: every record that still checks keeps its offset and
//! bytes, and each record lost to the damage becomes a *lost record*, an empty record
//! (no headers, no payload) with the lost offset and the timestamp of the record before
//! it. Offsets stay dense, so indexes, readers and consumers' cursors go on past the
//! damage exactly as before; a reader that meets an empty record knows its content was
//! lost. The damaged file itself is copied first, unchanged, to
//! `<storage dir>/quarantine/<log>/<file>.<unix ms>`, so nothing the disk held is
//! thrown away by recovery.
//!
//! The copy and the atomic rewrite are public for the broker's other store (the session
//! store's journal, checked before it is opened), so that damaged files of every store
//! land in one quarantine directory the same way.
//!
//! Invariants: a rewrite never changes the offset or the bytes of a record that checks;
//! the segment file is replaced atomically (temporary file, fsync, rename, directory
//! fsync), after its quarantine copy is durable.

use std::fs::{self, File};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::Offset;
use crate::format::{self, Decoded};

/// The directory under the storage directory that holds quarantined files (never a
/// log name, see `storage::valid_name`).
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// Extension of a segment's rewrite before it replaces the segment.
pub(crate) const TEMP_EXT: &str = "salvage";

/// A damaged segment's readable records, with lost records in the gaps.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Salvaged {
    /// The segment's new bytes.
    pub bytes: Vec<u8>,
    /// The offsets whose records could not be read (now lost records), in order.
    pub lost: Vec<Range<Offset>>,
}

/// Finds the next record at or after byte `from` that checks and carries an offset in
/// `next..end`: the point where reading can go on after damage.
fn resync(data: &[u8], from: usize, next: Offset, end: Option<Offset>) -> Option<(usize, Offset)> {
    (from..data.len()).find_map(|at| match format::decode_record(&data[at..]) {
        Decoded::Record(r) if r.offset > next && end.is_none_or(|e| r.offset < e) => {
            Some((at, r.offset))
        }
        _ => None,
    })
}

/// Salvages the records of segment `base` from `data`. For a sealed segment `end` is
/// the next segment's base: everything up to it that does not check is lost. For the
/// active segment (`end` is `None`) bytes after the last record that checks are cut,
/// as for a torn write. Returns `None` when nothing in the middle was lost (the data is
/// whole, or only its tail is unreadable in the active segment).
pub(crate) fn salvage(data: &[u8], base: Offset, end: Option<Offset>) -> Option<Salvaged> {
    let mut out = Vec::with_capacity(data.len());
    let mut lost: Vec<Range<Offset>> = Vec::new();
    let (mut pos, mut next, mut timestamp) = (0usize, base, None::<u64>);
    let mut lose = |out: &mut Vec<u8>, range: Range<Offset>, ts: u64| {
        for offset in range.clone() {
            format::encode_record(out, offset, ts, &[], &[]);
        }
        lost.push(range);
    };
    while end.is_none_or(|e| next < e) {
        if let Decoded::Record(r) = format::decode_record(&data[pos.min(data.len())..])
            && r.offset == next
        {
            out.extend_from_slice(&data[pos..pos + r.frame_len]);
            timestamp = Some(r.timestamp);
            pos += r.frame_len;
            next += 1;
            continue;
        }
        match resync(data, pos + 1, next, end) {
            Some((at, offset)) => {
                let ts = timestamp.unwrap_or_else(|| match format::decode_record(&data[at..]) {
                    Decoded::Record(r) => r.timestamp,
                    _ => 0,
                });
                lose(&mut out, next..offset, ts);
                pos = at;
                next = offset;
            }
            None => {
                if let Some(e) = end {
                    lose(&mut out, next..e, timestamp.unwrap_or(0));
                }
                break;
            }
        }
    }
    (!lost.is_empty()).then_some(Salvaged { bytes: out, lost })
}

/// Copies `file` (a file of log `log`, or of another store under `storage_dir`)
/// unchanged into the quarantine directory of `storage_dir`, as
/// `quarantine/<log>/<file name>.<unix ms>`, durably. Returns the copy's path.
pub fn quarantine_copy(storage_dir: &Path, log: &str, file: &Path) -> std::io::Result<PathBuf> {
    let dir = storage_dir.join(QUARANTINE_DIR).join(log);
    fs::create_dir_all(&dir)?;
    let name = file
        .file_name()
        .map_or_else(|| "segment".into(), |n| n.to_string_lossy().into_owned());
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut copy = dir.join(format!("{name}.{ms}"));
    let mut n = 1;
    while copy.exists() {
        copy = dir.join(format!("{name}.{ms}.{n}"));
        n += 1;
    }
    fs::copy(file, &copy)?;
    File::open(&copy)?.sync_all()?;
    File::open(&dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(copy)
}

/// Replaces `path` with `bytes` atomically and durably (through `<path stem>.salvage`,
/// which a crash may leave behind).
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(TEMP_EXT);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(base: Offset, n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for o in base..base + n {
            starts.push(buf.len());
            format::encode_record(
                &mut buf,
                o,
                1000 + o,
                b"h",
                format!("payload {o}").as_bytes(),
            );
        }
        (buf, starts)
    }

    fn offsets_and_payloads(bytes: &[u8]) -> Vec<(Offset, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Decoded::Record(r) = format::decode_record(&bytes[at..]) {
            out.push((r.offset, bytes[at + r.payload.0..at + r.payload.1].to_vec()));
            at += r.frame_len;
        }
        assert_eq!(at, bytes.len(), "salvaged bytes decode to the end");
        out
    }

    #[test]
    fn whole_segments_need_no_salvage() {
        let (buf, _) = segment(10, 5);
        assert_eq!(salvage(&buf, 10, Some(15)), None);
        assert_eq!(salvage(&buf, 10, None), None);
    }

    #[test]
    fn damage_in_the_middle_loses_only_the_damaged_records() {
        let (mut buf, starts) = segment(10, 6);
        // Overwrite the middle of record 12 and all of record 13.
        for b in &mut buf[starts[2] + 10..starts[4]] {
            *b = 0xAB;
        }
        for end in [Some(16), None] {
            let s = salvage(&buf, 10, end).expect("damage found");
            assert_eq!(s.lost, vec![12..14]);
            let recs = offsets_and_payloads(&s.bytes);
            assert_eq!(
                recs.iter().map(|r| r.0).collect::<Vec<_>>(),
                (10..16).collect::<Vec<_>>()
            );
            assert_eq!(recs[1].1, b"payload 11");
            assert!(recs[2].1.is_empty() && recs[3].1.is_empty());
            assert_eq!(recs[5].1, b"payload 15");
        }
    }

    #[test]
    fn a_sealed_segment_cut_short_loses_its_end_up_to_the_next_base() {
        let (buf, starts) = segment(0, 8);
        let cut = &buf[..starts[5] + 3];
        let s = salvage(cut, 0, Some(8)).expect("damage found");
        assert_eq!(s.lost, vec![5..8]);
        assert_eq!(offsets_and_payloads(&s.bytes).len(), 8);
        // The active segment cannot know what it lost at its end: a torn tail.
        assert_eq!(salvage(cut, 0, None), None);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 7u64;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = salvage(&junk, 3, Some(9));
            let _ = salvage(&junk, 3, None);
        }
    }
}
