//! The session store's write-ahead journal (fjall's), checked by roost before fjall
//! opens the store: damage in a journal file is found, the file copied aside, and the
//! damaged bytes cut out, so that fjall replays every batch that is still intact.
//!
//! Why roost reads fjall's format itself: fjall's recovery (3.1; its only recovery
//! mode, `TolerateCorruptTail`, is not configurable) reads a journal file batch by
//! batch and, at the first entry that does not decode (a bad tag, a bad trailer),
//! truncates the file there and stops, with no more than a debug-level log line:
//! every batch after the damage is gone from the file and from the store, and nothing
//! reports it. A batch whose checksum does not match fails the whole open instead, and
//! the store would be moved aside whole. Neither tells a torn last write (a crash,
//! nothing acknowledged) from damage in the middle.
//!
//! # Format (fjall 3.1, `journal/entry.rs`)
//!
//! ```text
//! <store dir>/<n>.jnl   no header; created with 64 MiB of zeros (preallocated)
//!   batch = Start, `count` Item or Clear entries, End; back to back
//!   Start  tag 1, count u32, seqno u64
//!   Item   tag 2, value type u8 (0 value, 1 tombstone, 2 weak tombstone),
//!          compression u8 (0 none, 1 lz4), keyspace id u64, key len u16,
//!          value len u32, stored value len u32, key, stored value
//!   Clear  tag 4, keyspace id u64
//!   End    tag 3, checksum u64 (XXH3-64 of the batch's entries as stored), "FJL" 3
//! ```
//!
//! # Invariants
//!
//! - A journal file is rewritten only when it holds damage, and then holds exactly its
//!   intact batches, with their bytes and in their order (fjall replays them with their
//!   own sequence numbers); the original is copied into quarantine first, durably, and
//!   the rewrite is atomic (temporary file, fsync, rename, directory fsync).
//! - A torn last write (the last batch runs into the end of the file or into zeros
//!   that run to the end) is not damage: fjall cuts it, as after any crash.
//! - Damage is any other unreadable byte range: between intact batches (the batches
//!   after it are kept), or at the end (nothing readable follows, but the bytes are not
//!   a torn write: a batch that fails its checksum, garbage).
//!
//! Runs while the broker holds the data directory's lock, before fjall opens the store.

use std::fs;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

const TAG_START: u8 = 1;
const TAG_ITEM: u8 = 2;
const TAG_END: u8 = 3;
const TAG_CLEAR: u8 = 4;
/// Ends every End entry.
const TRAILER: &[u8; 4] = b"FJL\x03";

/// A journal file of the store that held damage, found and cut out before the store
/// was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalDamage {
    /// The journal file.
    pub file: PathBuf,
    /// Its byte ranges that were not intact batches (cut from the file).
    pub damaged: Vec<Range<u64>>,
    /// Intact batches after the first damaged range, kept (fjall would have dropped
    /// them).
    pub kept_after: usize,
    /// The file as it was, in the quarantine directory.
    pub quarantined: PathBuf,
}

/// What a journal file holds.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scan {
    /// Intact batches, in file order.
    batches: Vec<Range<usize>>,
    /// Byte ranges that are not intact batches and not a torn last write.
    damaged: Vec<Range<usize>>,
}

/// Checks every journal file (`*.jnl`) of the store in `dir`: each damaged one is
/// copied into `<data dir>/quarantine/<store dir name>/` (the data directory being the
/// store directory's parent) and rewritten with its intact batches only. A directory
/// that does not exist yet holds no damage. Errors are the file system's (a copy or
/// rewrite that cannot be made leaves the file as it was).
pub fn repair(dir: &Path) -> io::Result<Vec<JournalDamage>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "jnl") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let data_dir = dir.parent().unwrap_or(dir);
    let store = dir
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let mut found = Vec::new();
    for file in files {
        let data = read_written(&file)?;
        let scan = scan(&data);
        let Some(first) = scan.damaged.first() else {
            continue;
        };
        let kept_after = scan.batches.iter().filter(|b| b.start >= first.end).count();
        let quarantined = roost_storage::quarantine::quarantine_copy(data_dir, &store, &file)?;
        let mut intact = Vec::with_capacity(data.len());
        for batch in &scan.batches {
            intact.extend_from_slice(&data[batch.clone()]);
        }
        roost_storage::quarantine::replace(&file, &intact)?;
        found.push(JournalDamage {
            file,
            damaged: scan
                .damaged
                .iter()
                .map(|r| r.start as u64..r.end as u64)
                .collect(),
            kept_after,
            quarantined,
        });
    }
    Ok(found)
}

/// Reads a journal file up to its last byte that is not zero. fjall creates each file
/// with 64 MiB of zeros and writes from its start: reading those into memory at every
/// start would cost as much as the rest together, and they hold nothing (the scan of
/// what was written ends the same way without them: at a batch's end, or torn).
fn read_written(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = fs::File::open(path)?;
    let mut data = Vec::new();
    // Zeros read after `data`, added to it only if something follows them.
    let mut zeros = 0;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(0) => return Ok(data),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let part = &chunk[..n];
        if is_zero(part) {
            zeros += n;
            continue;
        }
        let last = part.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        data.resize(data.len() + zeros, 0);
        data.extend_from_slice(&part[..last]);
        zeros = n - last;
    }
}

/// Reads a journal file: its intact batches, and what is damaged between and after
/// them.
fn scan(data: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut at = 0;
    loop {
        match batch_at(data, at) {
            Ok(end) => {
                out.batches.push(at..end);
                at = end;
            }
            Err(_) if is_zero(&data[at..]) => return out,
            Err(bad) => {
                if let Some(next) = next_batch(data, at + 1) {
                    out.damaged.push(at..next);
                    at = next;
                    continue;
                }
                let torn = match bad {
                    Bad::Truncated => true,
                    Bad::Invalid(from) => is_zero(&data[from..]),
                };
                if !torn {
                    let written = data.iter().rposition(|&b| b != 0).map_or(at, |i| i + 1);
                    out.damaged.push(at..written.max(at));
                }
                return out;
            }
        }
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    // No early exit: this form is vectorised, and zeros are the common case.
    bytes.iter().fold(0, |acc, &b| acc | b) == 0
}

/// The first position from `from` on where an intact batch starts.
fn next_batch(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len()).find(|&at| data[at] == TAG_START && batch_at(data, at).is_ok())
}

/// Why a batch does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    /// It runs past the end of the file.
    Truncated,
    /// Its bytes are not a batch, from about this position on (where a torn write's
    /// zeros would start).
    Invalid(usize),
}

/// Reads the batch at `at`: where it ends, if it is whole and intact.
fn batch_at(data: &[u8], at: usize) -> Result<usize, Bad> {
    let mut r = Reader { data, pos: at };
    if r.u8()? != TAG_START {
        return Err(Bad::Invalid(at));
    }
    let count = r.u32()?;
    r.take(8)?; // seqno
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    for _ in 0..count {
        let entry = r.pos;
        match r.u8()? {
            TAG_ITEM => {
                let value_type = r.u8()?;
                let compression = r.u8()?;
                if value_type > 2 || compression > 1 {
                    return Err(Bad::Invalid(entry));
                }
                r.take(8)?; // keyspace id
                let key_len = usize::from(r.u16()?);
                r.take(4)?; // value length before compression
                let stored = r.u32()? as usize;
                r.take(key_len)?;
                r.take(stored)?;
            }
            TAG_CLEAR => {
                r.take(8)?;
            }
            _ => return Err(Bad::Invalid(entry)),
        }
        hash.update(&data[entry..r.pos]);
    }
    let end = r.pos;
    if r.u8()? != TAG_END {
        return Err(Bad::Invalid(end));
    }
    let checksum = r.u64()?;
    let trailer = r.take(TRAILER.len())?;
    if trailer != TRAILER {
        // A write torn in the End entry leaves its first bytes, then zeros.
        let good = trailer
            .iter()
            .zip(TRAILER)
            .take_while(|(a, b)| a == b)
            .count();
        let written = &data[end..r.pos - TRAILER.len() + good];
        let from = if is_zero(&trailer[good..]) {
            end + written.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
        } else {
            end
        };
        return Err(Bad::Invalid(from));
    }
    if hash.digest() != checksum {
        return Err(Bad::Invalid(end));
    }
    Ok(r.pos)
}

/// Little-endian reads that fail with [`Bad::Truncated`] past the end.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Bad> {
        let end = self.pos.checked_add(n).ok_or(Bad::Truncated)?;
        let bytes = self.data.get(self.pos..end).ok_or(Bad::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Bad> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, Bad> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, Bad> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, Bad> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Bad> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch as fjall writes it: `items` of (keyspace, key, value), or a Clear for
    /// an empty key.
    fn batch(seqno: u64, items: &[(u64, &[u8], &[u8])]) -> Vec<u8> {
        let mut entries = Vec::new();
        for (keyspace, key, value) in items {
            if key.is_empty() {
                entries.push(TAG_CLEAR);
                entries.extend_from_slice(&keyspace.to_le_bytes());
                continue;
            }
            entries.extend_from_slice(&[TAG_ITEM, 0, 0]);
            entries.extend_from_slice(&keyspace.to_le_bytes());
            entries.extend_from_slice(&(key.len() as u16).to_le_bytes());
            entries.extend_from_slice(&(value.len() as u32).to_le_bytes());
            entries.extend_from_slice(&(value.len() as u32).to_le_bytes());
            entries.extend_from_slice(key);
            entries.extend_from_slice(value);
        }
        let mut out = vec![TAG_START];
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        out.extend_from_slice(&seqno.to_le_bytes());
        out.extend_from_slice(&entries);
        out.push(TAG_END);
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&entries).to_le_bytes());
        out.extend_from_slice(TRAILER);
        out
    }

    /// Five batches back to back, then zeros (fjall preallocates); their ranges.
    fn journal() -> (Vec<u8>, Vec<Range<usize>>) {
        let mut data = Vec::new();
        let mut ranges = Vec::new();
        for i in 0..5u64 {
            let key = format!("client-{i}");
            let value = vec![i as u8 + 1; 40];
            let b = batch(
                i + 1,
                &[
                    (1, key.as_bytes(), &value),
                    (2, b"r", b"retained"),
                    (3, b"", b""),
                ],
            );
            ranges.push(data.len()..data.len() + b.len());
            data.extend_from_slice(&b);
        }
        data.resize(data.len() + 4096, 0);
        (data, ranges)
    }

    #[test]
    fn a_whole_journal_and_a_torn_last_batch_are_not_damage() {
        let (data, ranges) = journal();
        assert_eq!(
            scan(&data),
            Scan {
                batches: ranges.clone(),
                damaged: vec![]
            }
        );
        // Cut inside the last batch, at every byte, with and without zeros after it.
        let last = ranges[4].clone();
        for cut in last.start + 1..last.end {
            let mut torn = data[..cut].to_vec();
            assert_eq!(scan(&torn).damaged, vec![], "cut at {cut}");
            assert_eq!(scan(&torn).batches, ranges[..4].to_vec());
            torn.resize(data.len(), 0);
            assert_eq!(scan(&torn).damaged, vec![], "zeros from {cut}");
            assert_eq!(scan(&torn).batches, ranges[..4].to_vec());
        }
        assert_eq!(scan(&[]), Scan::default());
    }

    #[test]
    fn damage_in_the_middle_keeps_every_batch_after_it() {
        let (data, ranges) = journal();
        let mut damaged = data.clone();
        let hit = ranges[1].start + 30;
        damaged[hit..hit + 8].fill(0xEE);
        let s = scan(&damaged);
        assert_eq!(s.damaged, vec![ranges[1].clone()]);
        assert_eq!(
            s.batches,
            vec![
                ranges[0].clone(),
                ranges[2].clone(),
                ranges[3].clone(),
                ranges[4].clone()
            ]
        );
        // A zeroed block over two batches' border: both lost, the rest kept.
        let mut zeroed = data.clone();
        zeroed[ranges[2].end - 10..ranges[3].start + 10].fill(0);
        let s = scan(&zeroed);
        assert_eq!(s.damaged, vec![ranges[2].start..ranges[4].start]);
        assert_eq!(s.batches.len(), 3);
        // A flipped bit in the checksum of the first batch.
        let mut flipped = data.clone();
        flipped[ranges[0].end - 6] ^= 1;
        assert_eq!(scan(&flipped).damaged, vec![ranges[0].clone()]);
    }

    #[test]
    fn a_damaged_last_batch_is_damage_not_a_torn_write() {
        let (data, ranges) = journal();
        let mut damaged = data.clone();
        let hit = ranges[4].start + 20;
        damaged[hit..hit + 4].fill(0xEE);
        let s = scan(&damaged);
        assert_eq!(s.damaged, vec![ranges[4].clone()]);
        assert_eq!(s.batches, ranges[..4].to_vec());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 11u64;
        for len in 0..400 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    // Mostly small values, so tags and lengths come up.
                    ((seed >> 59) as u8) & 0x7
                })
                .collect();
            let s = scan(&junk);
            assert!(s.batches.iter().chain(&s.damaged).all(|r| r.end <= len));
        }
    }

    #[test]
    fn reading_leaves_out_only_the_zeros_at_the_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("1.jnl");
        let mut data = vec![0u8; 3 << 20];
        data[10] = 1;
        data[(2 << 20) + 5] = 2; // after a whole chunk of zeros
        fs::write(&path, &data).expect("write");
        assert_eq!(read_written(&path).expect("read"), data[..(2 << 20) + 6]);
        fs::write(&path, [0u8; 4096]).expect("write");
        assert!(read_written(&path).expect("read").is_empty());
    }

    #[test]
    fn repair_copies_the_file_aside_and_keeps_the_intact_batches() {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let dir = data_dir.path().join("state");
        fs::create_dir_all(&dir).expect("mkdir");
        let (data, ranges) = journal();
        fs::write(dir.join("1.jnl"), &data).expect("write");
        let mut damaged = data.clone();
        damaged[ranges[2].start + 25] ^= 0xFF;
        fs::write(dir.join("2.jnl"), &damaged).expect("write");
        fs::write(dir.join("version"), b"not a journal").expect("write");

        let found = repair(&dir).expect("repair");
        assert_eq!(found.len(), 1, "{found:?}");
        let d = &found[0];
        assert_eq!(d.file, dir.join("2.jnl"));
        assert_eq!(
            d.damaged,
            vec![ranges[2].start as u64..ranges[2].end as u64]
        );
        assert_eq!(d.kept_after, 2);
        assert!(
            d.quarantined
                .starts_with(data_dir.path().join("quarantine").join("state"))
        );
        assert_eq!(fs::read(&d.quarantined).expect("copy"), damaged);
        let mut intact = Vec::new();
        for r in [0, 1, 3, 4] {
            intact.extend_from_slice(&data[ranges[r].clone()]);
        }
        assert_eq!(fs::read(dir.join("2.jnl")).expect("read"), intact);
        assert_eq!(
            fs::read(dir.join("1.jnl")).expect("read"),
            data,
            "untouched"
        );
        // Nothing left to repair.
        assert_eq!(repair(&dir).expect("again"), vec![]);
        assert_eq!(
            repair(&data_dir.path().join("missing")).expect("none"),
            vec![]
        );
    }
}
