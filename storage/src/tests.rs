//! Behaviour of logs as the queue layer will rely on it: round trips, crash recovery,
//! corruption, indexes, rolling, retention, timestamps, group commit, durability.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::segment::{self, SegmentPaths};
use crate::*;

fn rec(i: u64) -> Record {
    Record {
        timestamp: 1_000 + i,
        headers: Bytes::from(format!("h{i}")),
        payload: Bytes::from(vec![(i % 251) as u8; (i % 97) as usize + 1]),
    }
}

/// 4 KiB segments (the minimum) and an index entry every 256 bytes.
fn small() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("roost-storage-test")
        .tempdir_in(std::env::temp_dir())
        .expect("temp dir")
}

async fn append_n(log: &Log, range: std::ops::Range<u64>, batch: usize) {
    let all: Vec<u64> = range.collect();
    for chunk in all.chunks(batch.max(1)) {
        let first = log
            .append(chunk.iter().map(|&i| rec(i)).collect())
            .await
            .expect("append");
        assert_eq!(first, chunk[0], "offsets are dense and start at 0");
    }
}

fn read_all(log: &Log) -> Vec<LogRecord> {
    let mut out = Vec::new();
    let mut from = log.start_offset();
    loop {
        let batch = log.read(from, ReadLimit::bytes(1000)).expect("read");
        let Some(last) = batch.last() else {
            return out;
        };
        from = last.offset + 1;
        out.extend(batch);
    }
}

fn assert_records(records: &[LogRecord], range: std::ops::Range<u64>) {
    let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, range.clone().collect::<Vec<_>>());
    for r in records {
        let want = rec(r.offset);
        assert_eq!(r.headers, want.headers, "headers of {}", r.offset);
        assert_eq!(r.payload, want.payload, "payload of {}", r.offset);
        assert_eq!(r.timestamp, want.timestamp, "timestamp of {}", r.offset);
    }
}

fn frame_of(r: &LogRecord) -> u64 {
    crate::format::frame_len(r.headers.len(), r.payload.len()) as u64
}

fn segment_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_round_trip() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q-0", small()).expect("open log");
    assert!(recovery.is_clean());
    assert_eq!((log.start_offset(), log.next_offset()), (0, 0));
    assert!(log.read(0, ReadLimit::bytes(100)).expect("read").is_empty());
    append_n(&log, 0..500, 7).await;
    assert_eq!(log.next_offset(), 500);
    assert_records(&read_all(&log), 0..500);
    // Any starting offset, any record limit.
    for from in [0, 1, 17, 250, 333, 499] {
        let got = log
            .read(
                from,
                ReadLimit {
                    max_records: 5,
                    max_bytes: usize::MAX,
                },
            )
            .expect("read");
        assert_records(&got, from..(from + 5).min(500));
    }
    // A byte limit smaller than one record still returns that record.
    assert_eq!(log.read(10, ReadLimit::bytes(1)).expect("read").len(), 1);
    assert!(
        log.read(500, ReadLimit::bytes(100))
            .expect("read")
            .is_empty()
    );
    assert!(matches!(
        log.read(501, ReadLimit::bytes(100)),
        Err(Error::OffsetOutOfRange { end: 500, .. })
    ));
    // An empty append is a no-op that reports the next offset.
    assert_eq!(log.append(Vec::new()).await.expect("empty"), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_reads_from_a_long_backlog_and_records_larger_than_the_first_chunk() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage
        .open_log("big", LogConfig::default())
        .expect("open log");
    // 40 KB records: one is larger than the first read a 2-record limit makes.
    let big = |i: u64| Record {
        timestamp: 1_000 + i,
        headers: Bytes::from(format!("h{i}")),
        payload: Bytes::from(vec![(i % 251) as u8; 40_000 + i as usize]),
    };
    log.append((0..20).map(big).collect())
        .await
        .expect("append");
    // And a backlog of small ones behind them.
    append_n(&log, 20..3_000, 100).await;
    let two = ReadLimit {
        max_records: 2,
        max_bytes: 1 << 20,
    };
    for from in [0, 7, 19] {
        let got = log.read(from, two).expect("read");
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![from, from + 1]);
        assert_eq!(got[0].payload, big(from).payload);
    }
    for from in [20, 1_500, 2_998] {
        let got = log.read(from, two).expect("read");
        assert_records(&got, from..from + 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_continues_with_the_next_offset() {
    let dir = temp();
    {
        let storage = Storage::open(dir.path()).expect("open");
        let (log, _) = storage.open_log("q", small()).expect("open log");
        append_n(&log, 0..300, 10).await;
    }
    let storage = Storage::open(dir.path()).expect("reopen");
    assert_eq!(storage.log_names().expect("names"), vec!["q".to_owned()]);
    let (log, recovery) = storage.open_log("q", small()).expect("reopen log");
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(log.next_offset(), 300);
    append_n(&log, 300..320, 3).await;
    assert_records(&read_all(&log), 0..320);
}

/// Writes `n` records into a fresh log and returns the active segment's path and the
/// byte position where its last record starts.
async fn log_with_records(dir: &Path, n: u64) -> (PathBuf, u64) {
    let storage = Storage::open(dir).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    append_n(&log, 0..n, 5).await;
    let active = segment_files(&dir.join("q"), "log")
        .pop()
        .expect("a segment");
    let records = read_all(&log);
    let len = fs::metadata(&active).expect("meta").len();
    let last_len = frame_of(&records[records.len() - 1]);
    (active, len - last_len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_cut_at_every_byte_of_the_last_record() {
    let dir = temp();
    let n = 200;
    let (active, last_start) = log_with_records(dir.path(), n).await;
    let log_dir = dir.path().join("q");
    assert!(
        segment_files(&log_dir, "log").len() > 2,
        "the test spans segments"
    );
    let saved: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&log_dir)
        .expect("dir")
        .map(|e| {
            let p = e.expect("entry").path();
            let b = fs::read(&p).expect("read");
            (p, b)
        })
        .collect();
    let full_len = fs::metadata(&active).expect("meta").len();
    for cut in last_start..full_len {
        for (p, b) in &saved {
            fs::write(p, b).expect("restore");
        }
        OpenOptions::new()
            .write(true)
            .open(&active)
            .and_then(|f| f.set_len(cut))
            .expect("cut");
        let storage = Storage::open(dir.path()).expect("open");
        let (log, recovery) = storage.open_log("q", small()).expect("open log");
        let tail = recovery.truncated.as_ref();
        if cut == last_start {
            assert!(recovery.is_clean(), "cut {cut}: {recovery:?}");
        } else {
            let tail = tail.expect("a truncated tail is reported");
            assert_eq!(tail.bytes, cut - last_start, "cut {cut}");
            assert_eq!(tail.position, last_start);
            assert_eq!(tail.first_dropped_offset, n - 1);
            assert_eq!(tail.records, Some(1), "cut {cut}");
        }
        assert_eq!(log.next_offset(), n - 1, "cut {cut}");
        assert_eq!(fs::metadata(&active).expect("meta").len(), last_start);
        let first = log.append(vec![rec(n - 1)]).await.expect("append");
        assert_eq!(first, n - 1);
        assert_records(&read_all(&log), 0..n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_tail_record_is_cut_and_counted() {
    let dir = temp();
    let (active, last_start) = log_with_records(dir.path(), 50).await;
    // Damage the second-to-last record: both it and the good one after it go.
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    let prev = log.read(48, ReadLimit::bytes(1)).expect("read");
    let prev_len = frame_of(&prev[0]);
    drop(log);
    drop(storage);
    let f = OpenOptions::new().write(true).open(&active).expect("open");
    f.write_all_at(&[0xFF], last_start - 3).expect("flip");
    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    // The good record after it is found again: only record 48 is lost.
    assert_eq!(recovery.truncated, None);
    assert_eq!(recovery.lost, vec![48..49]);
    assert_eq!(log.next_offset(), 50);
    let last_two = log.read(48, ReadLimit::bytes(1 << 20)).expect("read");
    assert!(last_two[0].payload.is_empty());
    assert_records(&last_two[1..], 49..50);
    drop(log);
    drop(storage);
    // Damage in the last record leaves nothing to find again: the tail is cut.
    let len = fs::metadata(&active).expect("meta").len();
    let f = OpenOptions::new().write(true).open(&active).expect("open");
    f.write_all_at(&[0xFF], len - 3).expect("flip");
    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    let tail = recovery.truncated.expect("truncated");
    assert_eq!(tail.records, Some(1));
    assert_eq!(tail.reason, "CRC32C mismatch");
    assert_eq!(
        recovery.quarantined.len(),
        1,
        "a damaged (not torn) tail is kept aside"
    );
    assert_eq!(log.next_offset(), 49);
    let _ = prev_len;
}

/// One flipped bit in a sealed segment, found by a read while the log is open: the
/// damaged record is never served as data; the read goes on past it (a lost record,
/// empty, with the timestamp before it), the segment is quarantined and salvaged at
/// once (the copy is the damaged file as it was), and the next open finds nothing to
/// repair. (Damage found on open: `damaged_segments_are_quarantined_and_the_rest_is_served`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc_corruption_in_a_sealed_segment_is_never_served_as_data() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    // Enough that the first segment's records are no longer in the in-memory tail.
    append_n(&log, 0..3000, 10).await;
    let first_segment = segment_files(&dir.path().join("q"), "log")[0].clone();
    // Find record 20 and flip one payload byte of it.
    let r20 = log.read(20, ReadLimit::bytes(1)).expect("read")[0].clone();
    let bytes = fs::read(&first_segment).expect("read");
    let at = bytes
        .windows(r20.payload.len())
        .position(|w| w == &r20.payload[..])
        .expect("payload on disk") as u64;
    let f = OpenOptions::new()
        .write(true)
        .open(&first_segment)
        .expect("open");
    f.write_all_at(&[r20.payload[0] ^ 0x01], at).expect("flip");

    let read = log
        .read(
            0,
            ReadLimit {
                max_records: 30,
                max_bytes: usize::MAX,
            },
        )
        .expect("a read past the damage");
    assert_eq!(read.len(), 30);
    assert_records(&read[..20], 0..20);
    assert!(read[20].headers.is_empty() && read[20].payload.is_empty());
    assert_eq!(read[20].timestamp, rec(19).timestamp);
    assert_records(&read[21..], 21..30);
    let found = log.take_found_damage().expect("reported");
    assert_eq!(found.lost, vec![20..21]);
    assert_eq!(
        fs::read(&found.quarantined[0]).expect("quarantined copy"),
        {
            let mut b = bytes.clone();
            b[at as usize] ^= 0x01;
            b
        },
        "the quarantined copy is the damaged file as it was"
    );
    assert_eq!(storage.quarantined_total(), 1);
    let all = read_all(&log);
    assert_eq!(all.len(), 3000);
    assert_records(&all[21..], 21..3000);
    // Opening again finds nothing more to repair.
    drop(log);
    drop(storage);
    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(storage.quarantined_total(), 0);
    assert!(
        log.read(20, ReadLimit::bytes(1)).expect("read")[0]
            .payload
            .is_empty()
    );
}

/// A sealed segment cut short and the active segment overwritten in the middle: the
/// log opens, serves every record that checks, and reports exactly what it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_segments_are_quarantined_and_the_rest_is_served() {
    let dir = temp();
    let n = 400;
    let (active, last_start) = log_with_records(dir.path(), n).await;
    let log_dir = dir.path().join("q");
    let segments = segment_files(&log_dir, "log");
    assert!(segments.len() > 3, "the test spans segments");
    let base_of = |p: &Path| -> u64 {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("base")
    };
    // Cut the second segment to half its length.
    let second = &segments[1];
    let (second_base, third_base) = (base_of(second), base_of(&segments[2]));
    let second_len = fs::metadata(second).expect("meta").len();
    OpenOptions::new()
        .write(true)
        .open(second)
        .and_then(|f| f.set_len(second_len / 2))
        .expect("cut");
    // Overwrite 40 bytes in the middle of the active segment, well before its last record.
    let active_base = base_of(&active);
    let f = OpenOptions::new().write(true).open(&active).expect("open");
    f.write_all_at(&[0x5A; 40], last_start / 2)
        .expect("overwrite");
    drop(f);

    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    assert_eq!(recovery.lost.len(), 2, "{recovery:?}");
    let (cut, overwritten) = (&recovery.lost[0], &recovery.lost[1]);
    assert!(cut.start > second_base && cut.end == third_base, "{cut:?}");
    assert!(
        overwritten.start > active_base && overwritten.end < n - 1,
        "{overwritten:?}"
    );
    assert!(
        overwritten.end - overwritten.start <= 2,
        "40 bytes cost at most two records"
    );
    assert_eq!(recovery.quarantined.len(), 2);
    assert_eq!(storage.quarantined_total(), 2);
    for q in &recovery.quarantined {
        assert!(
            q.starts_with(dir.path().join("quarantine").join("q")),
            "{q:?}"
        );
    }
    assert_eq!(log.next_offset(), n, "nothing after the damage was cut");
    let all = read_all(&log);
    assert_eq!(all.len() as u64, n);
    for r in &all {
        let lost = recovery.lost.iter().any(|l| l.contains(&r.offset));
        if lost {
            assert!(
                r.headers.is_empty() && r.payload.is_empty(),
                "lost record {}",
                r.offset
            );
        } else {
            assert_records(std::slice::from_ref(r), r.offset..r.offset + 1);
        }
    }
    // Appends go on after the last good offset; the storage lists no "quarantine" log.
    assert_eq!(log.append(vec![rec(n)]).await.expect("append"), n);
    assert_eq!(storage.log_names().expect("names"), vec!["q".to_owned()]);
    // A rewrite cut short by a crash (its temporary file) is removed on the next open.
    drop(log);
    drop(storage);
    let stray = log_dir.join(format!("{:020}.salvage", second_base));
    fs::write(&stray, b"half a rewrite").expect("stray");
    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    assert_eq!(recovery.removed_files, vec![stray.clone()]);
    assert!(!stray.exists());
    assert!(
        recovery.lost.is_empty() && recovery.quarantined.is_empty(),
        "{recovery:?}"
    );
    assert_eq!(log.next_offset(), n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_garbage_index_files_are_rebuilt_identically() {
    let dir = temp();
    let log_dir = dir.path().join("q");
    {
        let storage = Storage::open(dir.path()).expect("open");
        let (log, _) = storage.open_log("q", small()).expect("open log");
        append_n(&log, 0..400, 9).await;
    }
    let mut originals = Vec::new();
    for ext in ["index", "timeindex"] {
        for p in segment_files(&log_dir, ext) {
            originals.push((p.clone(), fs::read(&p).expect("read")));
        }
    }
    let indexes = segment_files(&log_dir, "index");
    let times = segment_files(&log_dir, "timeindex");
    assert!(indexes.len() >= 3);
    fs::remove_file(&indexes[0]).expect("rm");
    fs::write(&indexes[1], b"garbage!garbage!junk").expect("garbage");
    fs::write(&times[2], [0xAB; 24]).expect("garbage");
    let active = indexes.len() - 1;
    fs::remove_file(&indexes[active]).expect("rm active index");
    fs::remove_file(&times[active]).expect("rm active time index");
    // A stray index file without data is removed.
    let stray = log_dir.join(segment::file_name(99_999, "index"));
    fs::write(&stray, b"x").expect("stray");

    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    assert!(recovery.truncated.is_none());
    assert_eq!(recovery.removed_files, vec![stray.clone()]);
    let bases: Vec<u64> = indexes
        .iter()
        .map(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).expect("name");
            segment::parse_file_name(name).expect("segment name").0
        })
        .collect();
    let mut rebuilt = recovery.rebuilt_indexes.clone();
    rebuilt.sort_unstable();
    assert_eq!(rebuilt, vec![bases[0], bases[1], bases[2], bases[active]]);
    for (p, want) in &originals {
        assert_eq!(&fs::read(p).expect("read"), want, "{} rebuilt", p.display());
    }
    assert!(!stray.exists());
    assert_records(&read_all(&log), 0..400);
    assert_eq!(log.offset_for_timestamp(1_000 + 123).expect("ts"), 123);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_at_the_configured_size() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    append_n(&log, 0..300, 10).await;
    let log_dir = dir.path().join("q");
    let data = segment_files(&log_dir, "log");
    assert_eq!(data.len(), log.segment_count());
    assert!(data.len() > 3);
    let mut expect_base = 0;
    for p in &data {
        let name = p.file_name().and_then(|n| n.to_str()).expect("name");
        let (base, _) = segment::parse_file_name(name).expect("named by base offset");
        assert_eq!(base, expect_base, "segments are contiguous");
        let len = fs::metadata(p).expect("meta").len();
        assert!(len <= 4096, "{name} has {len} bytes");
        let f = fs::File::open(p).expect("open");
        let mut idx = segment::Indexer {
            interval: 256,
            last_index_pos: 0,
        };
        let scan = segment::scan(&f, len, base, (0, base), &mut idx).expect("scan");
        assert!(scan.stop.is_none());
        expect_base = scan.next_offset;
        assert!(SegmentPaths::new(&log_dir, base).index.exists());
    }
    assert_eq!(expect_base, 300);
    // A record larger than a segment gets a segment of its own.
    let big = Record {
        timestamp: 5_000,
        headers: Bytes::new(),
        payload: Bytes::from(vec![7u8; 10_000]),
    };
    let before = log.segment_count();
    let at = log.append(vec![big.clone()]).await.expect("big");
    assert_eq!(at, 300);
    log.append(vec![rec(301)]).await.expect("after big");
    assert_eq!(log.segment_count(), before + 2);
    let back = log.read(300, ReadLimit::bytes(1)).expect("read big");
    assert_eq!(back[0].payload, big.payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_deletes_only_whole_sealed_segments() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    append_n(&log, 0..400, 10).await;
    let segments = log.segment_count();
    let size = log.size_bytes();
    log.set_retention(Retention {
        max_age: None,
        max_bytes: Some(size / 2),
    });
    let deleted = log.enforce_retention(u64::MAX).expect("retention");
    assert!(deleted.segments > 0);
    assert_eq!(log.segment_count(), segments - deleted.segments);
    assert!(log.size_bytes() <= size / 2);
    assert_eq!(log.size_bytes() + deleted.bytes, size);
    let start = log.start_offset();
    assert_eq!(deleted.start_offset, start);
    assert_eq!(
        segment_files(&dir.path().join("q"), "log").len(),
        log.segment_count()
    );
    assert_records(&read_all(&log), start..400);
    assert!(matches!(
        log.read(start - 1, ReadLimit::bytes(10)),
        Err(Error::OffsetOutOfRange { .. })
    ));
    // Even a limit of zero keeps the active segment.
    log.set_retention(Retention {
        max_age: None,
        max_bytes: Some(0),
    });
    log.enforce_retention(u64::MAX).expect("retention");
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.next_offset(), 400);
    append_n(&log, 400..410, 5).await;
    // After a reopen the log still starts where retention left it.
    let start = log.start_offset();
    drop(log);
    drop(storage);
    let storage = Storage::open(dir.path()).expect("open");
    let (log, recovery) = storage.open_log("q", small()).expect("open log");
    assert!(recovery.is_clean());
    assert_eq!((log.start_offset(), log.next_offset()), (start, 410));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_and_truncate_before() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    append_n(&log, 0..400, 10).await;
    // Record i has timestamp 1000 + i. With max_age 100 ms at now = 1300, a segment
    // goes when its newest record is older than 1200, i.e. all its offsets < 200.
    log.set_retention(Retention {
        max_age: Some(Duration::from_millis(100)),
        max_bytes: None,
    });
    let deleted = log.enforce_retention(1_300).expect("age");
    assert!(deleted.segments > 0);
    let start = log.start_offset();
    assert!(start <= 200, "start {start}");
    let first = log.read(start, ReadLimit::bytes(1)).expect("read");
    assert_eq!(first[0].offset, start);
    // The segment before `start` ended before 200; the one at `start` reaches 200.
    let seg_end = log
        .read(start, ReadLimit::bytes(usize::MAX))
        .expect("read")
        .len() as u64;
    assert!(start + seg_end > 199);
    // Everything old, yet the active segment stays.
    log.enforce_retention(u64::MAX).expect("age");
    assert_eq!(log.segment_count(), 1);

    let (log2, _) = storage.open_log("r", small()).expect("open log");
    append_n(&log2, 0..400, 10).await;
    let deleted = log2.truncate_before(150).expect("truncate");
    assert!(deleted.segments > 0);
    assert!(log2.start_offset() <= 150);
    assert!(log2.read(150, ReadLimit::bytes(1)).is_ok());
    assert_eq!(log2.truncate_before(0).expect("noop").segments, 0);
    log2.truncate_before(u64::MAX).expect("all sealed");
    assert_eq!(log2.segment_count(), 1);
    assert_eq!(log2.next_offset(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    assert_eq!(log.offset_for_timestamp(0).expect("empty"), 0);
    // Timestamps 10, 10, 10, 20, 20, 20, ... with one stamped in the past (clamped).
    let mut records = Vec::new();
    for i in 0..600u64 {
        let mut r = rec(i);
        r.timestamp = 10 * (i / 3 + 1);
        if i == 301 {
            r.timestamp = 5;
        }
        records.push(r);
    }
    for chunk in records.chunks(13) {
        log.append(chunk.to_vec()).await.expect("append");
    }
    let stored: Vec<u64> = read_all(&log).iter().map(|r| r.timestamp).collect();
    assert_eq!(
        stored[301], stored[300],
        "a timestamp from the past is clamped"
    );
    assert!(stored.windows(2).all(|w| w[0] <= w[1]));
    for ts in (0..2_100).step_by(7) {
        let want = stored
            .iter()
            .position(|&t| t >= ts)
            .map_or(600, |p| p as u64);
        assert_eq!(
            log.offset_for_timestamp(ts).expect("lookup"),
            want,
            "ts {ts}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_logs_share_the_committer() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let mut logs = Vec::new();
    for i in 0..40 {
        let durability = if i % 2 == 0 {
            Durability::Fsync
        } else {
            Durability::Buffered
        };
        let config = LogConfig {
            durability,
            ..small()
        };
        logs.push(storage.open_log(&format!("p-{i}"), config).expect("open").0);
    }
    let mut tasks = Vec::new();
    for log in &logs {
        for t in 0..8u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut offsets = Vec::new();
                for k in 0..25u64 {
                    let n = ((t + k) % 3 + 1) as usize;
                    let batch = (0..n).map(|j| rec(t * 1000 + k * 10 + j as u64)).collect();
                    offsets.push((log.append(batch).await.expect("append"), n as u64));
                }
                offsets
            }));
        }
    }
    let mut per_log: Vec<Vec<(u64, u64)>> = vec![Vec::new(); logs.len()];
    for (i, task) in tasks.into_iter().enumerate() {
        per_log[i / 8].extend(task.await.expect("task"));
    }
    for (log, mut batches) in logs.iter().zip(per_log) {
        batches.sort_unstable();
        let mut next = 0;
        for (first, n) in batches {
            assert_eq!(first, next, "batches tile the offsets of {}", log.name());
            next += n;
        }
        assert_eq!(log.next_offset(), next);
        assert_eq!(read_all(log).len() as u64, next);
        let stats = log.stats();
        assert_eq!(stats.records, next);
        assert!(stats.writes <= 200, "at most one write per append");
    }
    assert!(storage.failed_logs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_appends_resolve_after_a_sync() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", LogConfig::default()).expect("open");
    for i in 0..5 {
        log.append(vec![rec(i)]).await.expect("append");
        let s = log.stats();
        assert!(s.syncs > i, "append {i} resolved after {} syncs", s.syncs);
        assert_eq!(log.next_offset(), i + 1, "readable once resolved");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_appends_reach_the_kernel_before_resolving_and_sync_on_interval() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let config = LogConfig {
        durability: Durability::Buffered,
        sync_interval: Duration::from_millis(200),
        ..LogConfig::default()
    };
    let (log, _) = storage.open_log("q", config).expect("open");
    let payload = Bytes::from_static(b"visible-to-another-process");
    log.append(vec![Record::now(Bytes::new(), payload.clone())])
        .await
        .expect("append");
    assert_eq!(log.stats().syncs, 0, "buffered does not wait for a sync");
    // Another reader of the file (as after kill -9) sees the record already.
    let on_disk = fs::read(dir.path().join("q").join(segment::file_name(0, "log"))).expect("read");
    assert!(on_disk.windows(payload.len()).any(|w| w == &payload[..]));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        log.stats().syncs,
        1,
        "one background sync for the dirty log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_makes_the_log_read_only() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", LogConfig::default()).expect("open");
    let (other, _) = storage
        .open_log("other", LogConfig::default())
        .expect("open");
    log.append(vec![rec(0)]).await.expect("healthy");
    log.inject_fault(false, true);
    let failed = log.append(vec![rec(1)]).await;
    assert!(
        matches!(&failed, Err(Error::ReadOnly { log, .. }) if log == "q"),
        "{failed:?}"
    );
    assert!(matches!(
        log.append(vec![rec(2)]).await,
        Err(Error::ReadOnly { .. })
    ));
    assert!(log.failure().is_some());
    let failed_logs = storage.failed_logs();
    assert_eq!(failed_logs.len(), 1);
    assert_eq!(failed_logs[0].0, "q");
    assert!(failed_logs[0].1.to_string().contains("fdatasync"));
    // The failed batch is not readable; what was durable before still is.
    assert_eq!(log.next_offset(), 1);
    assert_eq!(log.read(0, ReadLimit::bytes(100)).expect("read").len(), 1);
    // Other logs keep working.
    assert_eq!(other.append(vec![rec(0)]).await.expect("other"), 0);
}

/// Damage that appears while the log is open (a bad block under a sealed segment):
/// the read that meets it does not fail and returns no damaged bytes; the segment is
/// quarantined and salvaged as on open, the lost offsets come back as lost records,
/// the damage is reported once (`take_found_damage`, `quarantined_total`), and
/// appends go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_by_a_read_while_running_is_quarantined_and_read_past() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open log");
    let n = 600;
    append_n(&log, 0..n, 5).await;
    let segments = segment_files(&dir.path().join("q"), "log");
    assert!(segments.len() > 10, "the test spans segments");
    // The second segment, long sealed and far from the readers' in-memory tail.
    let second = &segments[1];
    let len = fs::metadata(second).expect("meta").len();
    let f = OpenOptions::new().write(true).open(second).expect("open");
    f.write_all_at(&[0xEE; 32], len / 2).expect("overwrite");
    drop(f);
    assert_eq!(log.take_found_damage(), None);

    assert_salvaged(&storage, &log, dir.path(), n, len);
    // Reported once; reading again finds nothing more to repair.
    assert_eq!(read_all(&log).len() as u64, n);
    assert_eq!(log.take_found_damage(), None);
    assert_eq!(storage.quarantined_total(), 1);
    assert_eq!(log.append(vec![rec(n)]).await.expect("append"), n);
}

/// The readers' in-memory tail holds the newest records only: once a write too large
/// for it comes, the older records it held are read from the file again (where damage,
/// if any, is met), not served from memory while the tail has moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_cache_lets_go_of_records_once_newer_ones_are_not_cached() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage
        .open_log("q", LogConfig::default())
        .expect("open log");
    // Small writes (cached), then one over half the cache (not cached).
    append_n(&log, 0..100, 5).await;
    let big: Vec<Record> = (100..600).map(rec).collect();
    log.append(big).await.expect("append");
    let segments = segment_files(&dir.path().join("q"), "log");
    let f = OpenOptions::new()
        .write(true)
        .open(&segments[0])
        .expect("open");
    f.write_all_at(&[0xEE; 32], 200).expect("overwrite");
    drop(f);
    let all = read_all(&log);
    assert_eq!(all.len(), 600);
    let found = log
        .take_found_damage()
        .expect("the damaged records were read from the file");
    assert_eq!(found.lost.len(), 1, "{found:?}");
}

/// Damage in the middle of the *active* segment under a running log (a bad block under
/// the segment being appended to): the read that meets it salvages the segment as
/// recovery does on open, reports it once, and reads past it; later reads and appends
/// go on without a restart, and a restart finds nothing more to repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_active_segment_found_while_running_is_salvaged_without_a_restart() {
    for durability in [Durability::Fsync, Durability::Buffered] {
        let dir = temp();
        let config = LogConfig {
            durability,
            sync_interval: Duration::from_millis(10),
            segment_bytes: 1 << 20,
            index_interval_bytes: 256,
            ..LogConfig::default()
        };
        let storage = Storage::open(dir.path()).expect("open");
        let (log, _) = storage.open_log("q", config).expect("open log");
        let n = 1500;
        append_n(&log, 0..n, 5).await;
        let segments = segment_files(&dir.path().join("q"), "log");
        assert_eq!(segments.len(), 1, "one segment: the active one");
        // Far from the readers' in-memory tail (its newest 32 KiB).
        let len = fs::metadata(&segments[0]).expect("meta").len();
        let at = len / 5;
        assert!(len - at > 40 * 1024, "{len}");
        let f = OpenOptions::new()
            .write(true)
            .open(&segments[0])
            .expect("open");
        f.write_all_at(&[0xEE; 32], at).expect("overwrite");
        drop(f);

        let lost = assert_salvaged(&storage, &log, dir.path(), n, len);
        // Appends go on into the rewritten segment, and everything reads back.
        append_n(&log, n..n + 100, 7).await;
        let all = read_all(&log);
        assert_eq!(all.len() as u64, n + 100);
        assert_records(&all[lost.end as usize..], lost.end..n + 100);
        assert_eq!(log.take_found_damage(), None, "reported once");
        assert_eq!(storage.quarantined_total(), 1);
        drop(log);
        drop(storage);
        // A restart finds the segment whole: the lost records stay lost records.
        let storage = Storage::open(dir.path()).expect("reopen");
        let (log, recovery) = storage.open_log("q", config).expect("open log");
        assert!(recovery.is_clean(), "{durability:?}: {recovery:?}");
        let all = read_all(&log);
        assert_eq!(all.len() as u64, n + 100);
        assert!(all[lost.start as usize].payload.is_empty());
        assert_records(&all[..lost.start as usize], 0..lost.start);
        assert_eq!(storage.quarantined_total(), 0);
    }
}

/// The runtime hook (`Storage::inject_sync_failure`, which the broker's
/// `ROOST_TEST_FAIL_FSYNC_QUEUE` sets) fails the fdatasyncs of the logs it names only,
/// from when it is set, through the same path as a real failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_sync_failure_fails_only_the_logs_it_names() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (chosen, _) = storage
        .open_log("p0.chosen", LogConfig::default())
        .expect("open");
    let (other, _) = storage
        .open_log("p0.other", LogConfig::default())
        .expect("open");
    chosen.append(vec![rec(0)]).await.expect("before the fault");
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trigger = armed.clone();
    assert!(storage.inject_sync_failure(move |log| {
        log == "p0.chosen" && trigger.load(std::sync::atomic::Ordering::SeqCst)
    }));
    assert!(!storage.inject_sync_failure(|_| true), "set once");
    chosen.append(vec![rec(1)]).await.expect("not armed yet");
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = chosen.append(vec![rec(2)]).await;
    assert!(
        matches!(&failed, Err(Error::ReadOnly { log, .. }) if log == "p0.chosen"),
        "{failed:?}"
    );
    assert!(storage.failed_logs()[0].1.to_string().contains("injected"));
    assert_eq!(
        chosen.read(0, ReadLimit::bytes(1000)).expect("read").len(),
        2
    );
    assert_eq!(other.append(vec![rec(0)]).await.expect("other"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_makes_the_log_read_only_in_both_modes() {
    for durability in [Durability::Fsync, Durability::Buffered] {
        let dir = temp();
        let storage = Storage::open(dir.path()).expect("open");
        let config = LogConfig {
            durability,
            ..LogConfig::default()
        };
        let (log, _) = storage.open_log("q", config).expect("open");
        log.inject_fault(true, false);
        assert!(matches!(
            log.append(vec![rec(0)]).await,
            Err(Error::ReadOnly { .. })
        ));
        assert!(matches!(
            log.append(vec![rec(0)]).await,
            Err(Error::ReadOnly { .. })
        ));
        assert_eq!(storage.failed_logs().len(), 1);
        // Reopening (a restart) recovers a writable log.
        drop(log);
        drop(storage);
        let storage = Storage::open(dir.path()).expect("open");
        let (log, _) = storage.open_log("q", config).expect("open");
        assert_eq!(log.append(vec![rec(0)]).await.expect("append"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_sync_is_reported() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let config = LogConfig {
        durability: Durability::Buffered,
        sync_interval: Duration::from_millis(50),
        ..LogConfig::default()
    };
    let (log, _) = storage.open_log("q", config).expect("open");
    log.inject_fault(false, true);
    log.append(vec![rec(0)])
        .await
        .expect("buffered resolves after write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(log.failure().is_some());
    assert!(matches!(
        log.append(vec![rec(1)]).await,
        Err(Error::ReadOnly { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_storage_completes_queued_appends() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open");
    let pending: Vec<Append> = (0..50).map(|i| log.append(vec![rec(i)])).collect();
    drop(storage);
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.await.expect("queued append completes"), i as u64);
    }
    assert!(matches!(
        log.append(vec![rec(50)]).await,
        Err(Error::Closed)
    ));
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open");
    assert_records(&read_all(&log), 0..50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_names_are_checked_and_logs_can_be_deleted() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    for bad in ["", ".", "..", "a/b", ".hidden", "sp ace"] {
        assert!(matches!(
            storage.open_log(bad, small()),
            Err(Error::InvalidName(_))
        ));
    }
    let (log, _) = storage.open_log("q", small()).expect("open");
    assert!(matches!(
        storage.open_log("q", small()),
        Err(Error::AlreadyOpen(_))
    ));
    log.append(vec![rec(0)]).await.expect("append");
    assert!(storage.log("q").is_some());
    storage.delete_log("q").expect("delete");
    assert!(storage.log("q").is_none());
    assert!(!dir.path().join("q").exists());
    assert!(matches!(log.append(vec![rec(1)]).await, Err(Error::Closed)));
    assert!(storage.log_names().expect("names").is_empty());
}

/// Copies a storage directory as it is now (page cache included): what `kill -9` of
/// the process leaves on disk.
/// The directory of a storage with logs `p-0` and `p-1` (`small()`), `p0.0` records
/// appended to p-0 in appends of `p0.1`, then `p1` likewise to p-1, copied while it is
/// open: what a power cut leaves before it takes the active segments.
async fn two_logs_copied(p0: (u64, usize), p1: (u64, usize)) -> tempfile::TempDir {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let l0 = storage.open_log("p-0", small()).expect("open").0;
    let l1 = storage.open_log("p-1", small()).expect("open").0;
    append_n(&l0, 0..p0.0, p0.1).await;
    append_n(&l1, 0..p1.0, p1.1).await;
    drop((l0, l1));
    let copy = temp();
    copy_dir(dir.path(), copy.path());
    drop(storage);
    copy
}

/// After 32 bytes of log `q`'s segment (`len` bytes long, `n` records) were damaged
/// while it ran: reading it all gives every offset, the damage reported once as one run
/// of at most two lost records (empty placeholders), every other record whole, and one
/// quarantine copy of the whole file, counted. Returns the lost run.
fn assert_salvaged(
    storage: &Storage,
    log: &Log,
    dir: &Path,
    n: u64,
    len: u64,
) -> std::ops::Range<u64> {
    let all = read_all(log);
    assert_eq!(all.len() as u64, n, "every offset read, none skipped");
    let found = log.take_found_damage().expect("damage reported");
    assert_eq!(found.lost.len(), 1, "{found:?}");
    let lost = found.lost[0].clone();
    assert!(
        !lost.is_empty() && lost.end - lost.start <= 2,
        "32 bytes cost at most two records: {lost:?}"
    );
    for r in &all {
        if lost.contains(&r.offset) {
            assert!(
                r.headers.is_empty() && r.payload.is_empty(),
                "lost {}",
                r.offset
            );
        } else {
            assert_records(std::slice::from_ref(r), r.offset..r.offset + 1);
        }
    }
    assert_eq!(found.quarantined.len(), 1);
    assert!(found.quarantined[0].starts_with(dir.join("quarantine").join("q")));
    assert_eq!(
        fs::read(&found.quarantined[0]).expect("copy").len() as u64,
        len
    );
    assert_eq!(storage.quarantined_total(), 1);
    lost
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// What a power cut can take from a log written through the journal: everything of
/// the active segment (never synced since it was created) and its indexes.
fn lose_active_segment(log_dir: &Path, keep: u64) {
    let active = segment_files(log_dir, "log").pop().expect("a segment");
    let f = OpenOptions::new().write(true).open(&active).expect("open");
    let len = f.metadata().expect("meta").len();
    f.set_len(keep.min(len)).expect("cut");
    for ext in ["index", "timeindex"] {
        let _ = fs::remove_file(active.with_extension(ext));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_restores_what_a_power_cut_took_from_the_segments() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let mut logs = Vec::new();
    for name in ["p-0", "p-1", "p-2"] {
        logs.push(storage.open_log(name, small()).expect("open").0);
    }
    // Interleaved appends, several per round, rolling segments (4 KiB).
    let tasks: Vec<_> = logs
        .iter()
        .map(|log| {
            let log = log.clone();
            tokio::spawn(async move { append_n(&log, 0..300, 3).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let copy = temp();
    copy_dir(dir.path(), copy.path());
    // p-0 loses its whole active segment, p-1 half of it plus garbage, p-2 nothing.
    lose_active_segment(&copy.path().join("p-0"), 0);
    let p1 = segment_files(&copy.path().join("p-1"), "log")
        .pop()
        .expect("seg");
    let half = fs::metadata(&p1).expect("meta").len() / 2;
    lose_active_segment(&copy.path().join("p-1"), half);
    OpenOptions::new()
        .write(true)
        .open(&p1)
        .expect("open")
        .write_all_at(&[0xAB; 100], half)
        .expect("garbage");

    let restored = Storage::open(copy.path()).expect("reopen");
    for (name, lost) in [("p-0", true), ("p-1", true), ("p-2", false)] {
        let (log, recovery) = restored.open_log(name, small()).expect("open");
        assert_records(&read_all(&log), 0..300);
        assert_eq!(recovery.journal_gap, None);
        if lost {
            assert!(recovery.replayed > 0, "{name}: {recovery:?}");
        } else {
            assert_eq!(recovery.replayed, 0, "{name}: nothing was lost");
        }
        // Still appendable at the right offset.
        assert_eq!(log.append(vec![rec(300)]).await.expect("append"), 300);
    }
    drop(restored);
    // The journal was voided once the records were back: a second open repairs nothing.
    let again = Storage::open(copy.path()).expect("reopen");
    for name in ["p-0", "p-1", "p-2"] {
        let (log, recovery) = again.open_log(name, small()).expect("open");
        assert!(recovery.is_clean(), "{name}: {recovery:?}");
        assert_records(&read_all(&log), 0..301);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_files_take_turns_and_checkpoints_keep_everything() {
    let dir = temp();
    // 16 KiB per journal file: a checkpoint every few dozen records.
    let storage = Storage::open_with_journal_bytes(dir.path(), 16 * 1024).expect("open");
    let (a, _) = storage.open_log("a", small()).expect("open");
    let (b, _) = storage.open_log("b", LogConfig::default()).expect("open");
    let (ta, tb) = (a.clone(), b.clone());
    let x = tokio::spawn(async move { append_n(&ta, 0..1500, 2).await });
    let y = tokio::spawn(async move { append_n(&tb, 0..1500, 7).await });
    x.await.expect("a");
    y.await.expect("b");
    // b's last records after a's: their entries are in the journal's current lap.
    append_n(&b, 1500..1510, 1).await;
    let total = |name: &str| if name == "a" { 1500 } else { 1510 };
    assert!(storage.failed_logs().is_empty());
    // A kill -9 now (the page cache survives) loses nothing and replays nothing new.
    let copy = temp();
    copy_dir(dir.path(), copy.path());
    {
        let s = Storage::open(copy.path()).expect("open copy");
        for name in ["a", "b"] {
            let (log, recovery) = s.open_log(name, small()).expect("open");
            assert_eq!(recovery.replayed, 0);
            assert_records(&read_all(&log), 0..total(name));
        }
    }
    // A power cut at this moment keeps what checkpoints synced and loses at worst the
    // rest of each segment: everything from the first record the journal still holds
    // (b has one 64 MiB segment, so its byte positions are sums of frame lengths).
    let copy = temp();
    copy_dir(dir.path(), copy.path());
    let (_, entries, _) = crate::journal::open(copy.path()).expect("journal");
    let held = entries
        .iter()
        .filter(|e| e.name == "b")
        .flat_map(crate::journal::frames)
        .map(|r| r.0)
        .min()
        .expect("the journal holds b's latest records");
    assert!(held > 0, "checkpoints voided the older entries");
    let records = read_all(&b);
    let keep: u64 = records[..held as usize].iter().map(frame_of).sum();
    lose_active_segment(&copy.path().join("b"), keep);
    {
        let s = Storage::open(copy.path()).expect("open copy");
        let (log, recovery) = s.open_log("b", LogConfig::default()).expect("open");
        assert_eq!(recovery.replayed, 1510 - held, "{recovery:?}");
        assert_records(&read_all(&log), 0..1510);
    }
    drop(storage);
    let s = Storage::open(dir.path()).expect("reopen");
    for name in ["a", "b"] {
        let (log, recovery) = s.open_log(name, small()).expect("open");
        assert!(recovery.is_clean(), "a clean stop leaves a void journal");
        assert_records(&read_all(&log), 0..total(name));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_deleted_and_created_again_gets_nothing_of_its_old_life() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", small()).expect("open");
    append_n(&log, 0..20, 1).await;
    storage.delete_log("q").expect("delete");
    let (log, _) = storage.open_log("q", small()).expect("open again");
    append_n(&log, 0..3, 1).await;
    let copy = temp();
    copy_dir(dir.path(), copy.path());
    lose_active_segment(&copy.path().join("q"), 0);
    let restored = Storage::open(copy.path()).expect("reopen");
    let (log, recovery) = restored.open_log("q", small()).expect("open");
    assert_eq!(recovery.replayed, 3, "{recovery:?}");
    assert_records(&read_all(&log), 0..3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_write_fails_the_round_and_every_fsync_log_after_it() {
    let dir = temp();
    let storage = Storage::open(dir.path()).expect("open");
    let (log, _) = storage.open_log("q", LogConfig::default()).expect("open");
    let buffered = LogConfig {
        durability: Durability::Buffered,
        ..LogConfig::default()
    };
    let (other, _) = storage
        .open_log("other", LogConfig::default())
        .expect("open");
    let (side, _) = storage.open_log("side", buffered).expect("open");
    log.append(vec![rec(0)]).await.expect("healthy");
    storage.inject_journal_fault();
    let failed = log.append(vec![rec(1)]).await;
    assert!(
        matches!(&failed, Err(Error::ReadOnly { cause, .. }) if cause.to_string().contains("journal")),
        "{failed:?}"
    );
    assert_eq!(log.next_offset(), 1, "the failed round is not readable");
    // The journal is not trusted after a failed write or sync: other Fsync logs fail too,
    // Buffered logs (not journaled) keep working.
    assert!(matches!(
        other.append(vec![rec(0)]).await,
        Err(Error::ReadOnly { .. })
    ));
    assert_eq!(side.append(vec![rec(0)]).await.expect("buffered"), 0);
    let failed: Vec<String> = storage.failed_logs().into_iter().map(|f| f.0).collect();
    assert_eq!(failed, ["other", "q"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_served_from_the_in_memory_tail_match_reads_from_disk() {
    let dir = temp();
    let live: Vec<Vec<LogRecord>>;
    let cases: Vec<(u64, ReadLimit)> = [0u64, 1, 250, 431, 490, 499, 500]
        .into_iter()
        .flat_map(|from| {
            [
                ReadLimit {
                    max_records: 1,
                    max_bytes: usize::MAX,
                },
                ReadLimit {
                    max_records: 10,
                    max_bytes: usize::MAX,
                },
                ReadLimit::bytes(100),
                ReadLimit::bytes(5000),
                ReadLimit::bytes(1 << 20),
            ]
            .map(|l| (from, l))
        })
        .collect();
    {
        let storage = Storage::open(dir.path()).expect("open");
        let (log, _) = storage.open_log("q", small()).expect("open");
        append_n(&log, 0..500, 7).await;
        live = cases
            .iter()
            .map(|(from, limit)| log.read(*from, *limit).expect("live read"))
            .collect();
    }
    let storage = Storage::open(dir.path()).expect("reopen");
    let (log, _) = storage.open_log("q", small()).expect("open");
    for ((from, limit), got) in cases.iter().zip(live) {
        let disk = log.read(*from, *limit).expect("disk read");
        assert_eq!(got, disk, "read from {from} with {limit:?}");
    }
}

/// Each storage times its own fdatasyncs (for `/metrics`): an `Fsync` append is
/// counted by the storage it went to, and not by another one in the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_storage_times_its_own_syncs() {
    let (dir_a, dir_b) = (temp(), temp());
    let a = Storage::open(dir_a.path()).expect("open");
    let b = Storage::open(dir_b.path()).expect("open");
    let (log, _) = a.open_log("q", LogConfig::default()).expect("open log");
    log.append(vec![rec(0)]).await.expect("append");
    assert!(a.sync_latency().snapshot().count() >= 1);
    assert_eq!(b.sync_latency().snapshot().count(), 0);
}

mod model {
    //! Random append / read / reopen / truncate sequences against an in-memory model.

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<(u64, usize, usize)>),
        Read {
            from: u64,
            max_records: usize,
            max_bytes: usize,
        },
        Reopen,
        TruncateBefore(u64),
        Timestamp(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec((0u64..50, 0usize..20, 0usize..600), 0..12).prop_map(Op::Append),
            3 => (0u64..300, 1usize..50, 1usize..5000)
                .prop_map(|(from, max_records, max_bytes)| Op::Read { from, max_records, max_bytes }),
            1 => Just(Op::Reopen),
            1 => (0u64..300).prop_map(Op::TruncateBefore),
            1 => (0u64..3000).prop_map(Op::Timestamp),
        ]
    }

    fn record(seed: u64, ts: u64, h: usize, p: usize) -> Record {
        Record {
            timestamp: ts,
            headers: Bytes::from(vec![(seed % 7) as u8; h]),
            payload: Bytes::from(vec![(seed % 251) as u8; p]),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            let dir = temp();
            let config = LogConfig { index_interval_bytes: 100, ..small() };
            let mut storage = Storage::open(dir.path()).expect("open");
            let mut log = storage.open_log("m", config).expect("open").0;
            // The model: every record ever appended, and the first one still held.
            let mut model: Vec<LogRecord> = Vec::new();
            let mut last_ts = 0u64;
            for op in ops {
                match op {
                    Op::Append(batch) => {
                        let records: Vec<Record> = batch
                            .iter()
                            .map(|&(dt, h, p)| record(model.len() as u64, 1_000 + dt * 10 + model.len() as u64 / 3, h, p))
                            .collect();
                        let first = rt.block_on(log.append(records.clone())).expect("append");
                        prop_assert_eq!(first, model.len() as u64);
                        for r in records {
                            last_ts = last_ts.max(r.timestamp);
                            model.push(LogRecord { offset: model.len() as u64, timestamp: last_ts, headers: r.headers, payload: r.payload });
                        }
                    }
                    Op::Read { from, max_records, max_bytes } => {
                        let start = log.start_offset();
                        let end = model.len() as u64;
                        let got = log.read(from, ReadLimit { max_records, max_bytes });
                        if from < start || from > end {
                            prop_assert!(matches!(got, Err(Error::OffsetOutOfRange { .. })), "{:?}", got);
                        } else {
                            let got = got.expect("read");
                            prop_assert_eq!(got.is_empty(), from == end);
                            prop_assert!(got.len() <= max_records);
                            let bytes: usize = got.iter().map(|r| crate::format::frame_len(r.headers.len(), r.payload.len())).sum();
                            prop_assert!(got.len() <= 1 || bytes <= max_bytes);
                            for (k, r) in got.iter().enumerate() {
                                prop_assert_eq!(r, &model[(from as usize) + k]);
                            }
                        }
                    }
                    Op::Reopen => {
                        drop(log);
                        drop(storage);
                        storage = Storage::open(dir.path()).expect("reopen");
                        let (l, recovery) = storage.open_log("m", config).expect("reopen");
                        prop_assert!(recovery.is_clean(), "{:?}", recovery);
                        log = l;
                        prop_assert_eq!(log.next_offset(), model.len() as u64);
                    }
                    Op::TruncateBefore(offset) => {
                        let before = log.start_offset();
                        let d = log.truncate_before(offset).expect("truncate");
                        prop_assert!(d.start_offset <= offset.max(before));
                        prop_assert_eq!(d.start_offset, log.start_offset());
                        prop_assert_eq!(log.next_offset(), model.len() as u64);
                    }
                    Op::Timestamp(ts) => {
                        let start = log.start_offset() as usize;
                        let want = model[start..]
                            .iter()
                            .find(|r| r.timestamp >= ts)
                            .map_or(model.len() as u64, |r| r.offset);
                        prop_assert_eq!(log.offset_for_timestamp(ts).expect("ts"), want);
                    }
                }
            }
        }
    }
}

/// A full file system (a small tmpfs, so only as root) refuses appends with
/// `Error::NoSpace` before writing anything: acknowledged records stay readable, the
/// log stays writable, and appends go through again once space returns.
#[tokio::test]
async fn a_full_disk_refuses_appends_cleanly_and_they_resume_when_space_returns() {
    let root = fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    if !root {
        eprintln!("skipped: mounting a tmpfs to fill needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(dir.path())
        .status();
    assert!(
        mount.is_ok_and(|s| s.success()),
        "mount tmpfs as root failed"
    );
    /// Unmounts on every way out, a failed assertion included. Lazily (`-l`): the
    /// storage's committer thread may still hold a file open when this runs, and a
    /// plain umount would then fail with EBUSY and leave the tmpfs mounted.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    // Room to give back later, taken before the log fills the rest.
    let filler = dir.path().join("filler");
    fs::write(&filler, vec![1u8; 6 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let storage = Storage::open_with_journal_bytes(dir.path().join("s"), 1 << 20)
        .unwrap_or_else(|e| panic!("{e}"));
    let (log, _) = storage
        .open_log("full", LogConfig::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let payload = Bytes::from(vec![7u8; 64 * 1024]);
    let mut stored = Vec::new();
    let refused = loop {
        match log
            .append(vec![Record::now(Bytes::new(), payload.clone())])
            .await
        {
            Ok(offset) => stored.push(offset),
            Err(e) => break e,
        }
        assert!(stored.len() < 1000, "never refused");
    };
    assert!(matches!(refused, Error::NoSpace { .. }), "{refused}");
    assert!(storage.space_shortage().is_some());
    assert!(log.failure().is_none(), "the log did not turn read-only");
    assert!(stored.len() > 20, "{} stored", stored.len());
    // Refused again while nothing changes; nothing half-written in between.
    let again = log
        .append(vec![Record::now(Bytes::new(), payload.clone())])
        .await;
    assert!(matches!(again, Err(Error::NoSpace { .. })), "{again:?}");
    // Everything acknowledged is there.
    let back = log
        .read(stored[0], ReadLimit::bytes(usize::MAX))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.len(), stored.len());
    // Space returns (the filler goes): appends resume by themselves.
    fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    assert!(storage.space_shortage().is_none());
    let next = log
        .append(vec![Record::now(Bytes::new(), payload.clone())])
        .await
        .unwrap_or_else(|e| panic!("after space returned: {e}"));
    assert_eq!(next, stored[stored.len() - 1] + 1);
}

/// Files under `dir` that this process holds open.
fn open_files_under(dir: &std::path::Path) -> usize {
    let Ok(fds) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir))
        .count()
}

/// Thousands of idle partitions must fit under the limit on open files: an idle log
/// holds one file per segment (its data), and opens an index file only to write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_log_holds_only_its_data_files_open() {
    let dir = temp();
    {
        let storage = Storage::open(dir.path()).expect("open");
        let (log, _) = storage.open_log("q", small()).expect("open");
        append_n(&log, 0..100, 7).await;
        assert!(log.segment_count() > 1, "rolled: sealed segments too");
    }
    let storage = Storage::open(dir.path()).expect("reopen");
    let (log, recovery) = storage.open_log("q", small()).expect("open");
    assert!(recovery.is_clean(), "{recovery:?}");
    let log_dir = dir.path().join("q");
    assert_eq!(open_files_under(&log_dir), log.segment_count());
    // Written to again, the active segment's index files are opened, and what they
    // hold is what a reopen expects (it rebuilds nothing).
    append_n(&log, 100..200, 7).await;
    assert!(open_files_under(&log_dir) <= log.segment_count() + 2);
    drop(log);
    drop(storage);
    let storage = Storage::open(dir.path()).expect("reopen");
    let (log, recovery) = storage.open_log("q", small()).expect("open");
    assert!(recovery.is_clean(), "{recovery:?}");
    assert_eq!(log.next_offset(), 200);
    let read = log
        .read(150, ReadLimit::bytes(usize::MAX))
        .expect("read back");
    assert_eq!(read.first().map(|r| r.offset), Some(150));
    assert_eq!(read.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_middle_of_the_journal_is_quarantined_and_what_follows_is_replayed() {
    // p-1's entries come after every entry of p-0 in the journal.
    let copy = two_logs_copied((300, 3), (30, 3)).await;
    // A power cut takes both logs' active segments.
    let active = segment_files(&copy.path().join("p-0"), "log")
        .pop()
        .expect("seg");
    let base: u64 = active
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("a segment is named by its base offset");
    let target = base + 3;
    assert!((100..297).contains(&target), "active segment base {base}");
    lose_active_segment(&copy.path().join("p-0"), 0);
    lose_active_segment(&copy.path().join("p-1"), 0);
    // The journal entry that holds p-0's record `target` is damaged (a bad block).
    let needle = format!("h{target}").into_bytes();
    let mut hit = None;
    for name in journal::FILE_NAMES {
        let path = copy.path().join(name);
        let bytes = fs::read(&path).expect("journal");
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            hit = Some((path, at));
        }
    }
    let (path, at) = hit.expect("the record is in the journal");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .write_all_at(&[0xEE; 8], at as u64)
        .expect("damage");

    let restored = Storage::open(copy.path()).expect("reopen");
    assert_eq!(restored.quarantined_total(), 1);
    let damage = restored.journal_damage();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].file, path);
    assert!(damage[0].skipped.contains(&(at as u64)), "{damage:?}");
    assert!(
        damage[0]
            .quarantined
            .starts_with(copy.path().join("quarantine").join("journal"))
    );
    // The copy is the damaged file as it was (the journal itself is voided).
    let kept = fs::read(&damage[0].quarantined).expect("copy");
    assert_eq!(&kept[at..at + 8], &[0xEE; 8]);
    // p-1's entries come after the damage: all of them are restored.
    let (log, recovery) = restored.open_log("p-1", small()).expect("open");
    assert_records(&read_all(&log), 0..30);
    assert!(recovery.replayed > 0, "{recovery:?}");
    // p-0 gets back what came before the damaged entry, stops at the gap after it,
    // and says so, with the quarantined copy.
    let (log, recovery) = restored.open_log("p-0", small()).expect("open");
    let end = log.next_offset();
    assert!((base..=target).contains(&end), "p-0 ends at {end}");
    assert_records(&read_all(&log), 0..end);
    assert!(
        recovery.journal_gap.is_some_and(|g| g > end),
        "{recovery:?}"
    );
    assert_eq!(recovery.quarantined, vec![damage[0].quarantined.clone()]);
    // Still appendable where it ends.
    assert_eq!(log.append(vec![rec(end)]).await.expect("append"), end);
}

/// A journal file whose header is damaged (its epoch unreadable) after a power cut took
/// the active segments: the file is copied into quarantine before it gets a fresh
/// header, counted, reported with `header`, and its entries (found by the epoch they
/// carry themselves) are replayed: nothing the journal held is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_header_is_quarantined_and_its_entries_are_replayed() {
    let copy = two_logs_copied((200, 3), (40, 4)).await;
    lose_active_segment(&copy.path().join("p-0"), 0);
    lose_active_segment(&copy.path().join("p-1"), 0);
    let needle = b"h199";
    let path = journal::FILE_NAMES
        .iter()
        .map(|name| copy.path().join(name))
        .find(|p| {
            let bytes = fs::read(p).expect("journal");
            bytes.windows(needle.len()).any(|w| w == needle)
        })
        .expect("the records are in a journal file");
    OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .write_all_at(&[0xEE; 16], 4)
        .expect("damage the header");

    let restored = Storage::open(copy.path()).expect("reopen");
    assert_eq!(restored.quarantined_total(), 1);
    let damage = restored.journal_damage();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].file, path);
    assert!(damage[0].header, "{damage:?}");
    assert_eq!(
        damage[0].skipped,
        0..journal::HEADER,
        "the first entry is intact"
    );
    assert!(
        damage[0]
            .quarantined
            .starts_with(copy.path().join("quarantine").join("journal"))
    );
    let kept = fs::read(&damage[0].quarantined).expect("copy");
    assert_eq!(&kept[4..20], &[0xEE; 16], "the copy is the file as it was");
    for (name, n) in [("p-0", 200), ("p-1", 40)] {
        let (log, recovery) = restored.open_log(name, small()).expect("open");
        assert_records(&read_all(&log), 0..n);
        assert!(recovery.replayed > 0, "{name}: {recovery:?}");
        assert_eq!(recovery.journal_gap, None, "{name}: {recovery:?}");
        assert_eq!(log.append(vec![rec(n)]).await.expect("append"), n);
    }
    drop(restored);
    // The file got a good header: a second open finds nothing to repair or replay.
    let again = Storage::open(copy.path()).expect("reopen");
    assert!(again.journal_damage().is_empty());
    assert_eq!(again.quarantined_total(), 0);
    for (name, n) in [("p-0", 201), ("p-1", 41)] {
        let (log, recovery) = again.open_log(name, small()).expect("open");
        assert!(recovery.is_clean(), "{name}: {recovery:?}");
        assert_records(&read_all(&log), 0..n);
    }
}
