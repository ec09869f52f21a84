//! Segment-log benchmarks: group-committed appends of 100-byte records from 1, 16 and
//! 256 concurrent appenders in both durability modes, and sequential reads.
//!
//! Each appender is a tokio task that appends a batch of `batch` records and awaits it
//! before the next, so with `batch = 1` every record is one round trip through the
//! committer and the disk, and throughput is bounded by appenders / fdatasync latency.
//! Larger batches model a producer (or a broker connection task) that hands the log
//! several publishes at once. The data lives under `ROOST_BENCH_DIR` (default: the
//! system temp dir), which must be on a real disk, not tmpfs, for `fsync` to mean
//! anything.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use roost_storage::{Durability, Log, LogConfig, ReadLimit, Record, Storage};

const PAYLOAD: usize = 100;

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("ROOST_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("roost-storage-bench")
        .tempdir_in(base)
        .expect("bench dir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn batch_of(n: usize) -> Vec<Record> {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    (0..n)
        .map(|_| Record::now(Bytes::new(), payload.clone()))
        .collect()
}

/// `appenders` tasks spread over `logs`, each doing `rounds` appends of `batch` records.
fn run_appends(
    rt: &tokio::runtime::Runtime,
    logs: &[Log],
    appenders: usize,
    batch: usize,
    rounds: u64,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..appenders)
            .map(|i| {
                let log = logs[i % logs.len()].clone();
                tokio::spawn(async move {
                    for _ in 0..rounds {
                        log.append(batch_of(batch)).await.expect("append");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("appender");
        }
        start.elapsed()
    })
}

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    let cases: &[(&str, Durability, usize, usize, usize)] = &[
        // (label, mode, appenders, records per append, logs)
        ("fsync", Durability::Fsync, 1, 1, 1),
        ("fsync", Durability::Fsync, 16, 1, 1),
        ("fsync", Durability::Fsync, 256, 1, 1),
        ("fsync", Durability::Fsync, 1, 16, 1),
        ("fsync", Durability::Fsync, 16, 16, 1),
        ("fsync", Durability::Fsync, 256, 16, 1),
        ("fsync-64-logs", Durability::Fsync, 256, 16, 64),
        ("buffered", Durability::Buffered, 1, 1, 1),
        ("buffered", Durability::Buffered, 16, 1, 1),
        ("buffered", Durability::Buffered, 256, 1, 1),
        ("buffered", Durability::Buffered, 1, 16, 1),
        ("buffered", Durability::Buffered, 16, 16, 1),
        ("buffered", Durability::Buffered, 256, 16, 1),
    ];
    let mut group = c.benchmark_group("storage_append_100B");
    for &(label, durability, appenders, batch, nlogs) in cases {
        let dir = bench_dir();
        let storage = Storage::open(dir.path()).expect("storage");
        let config = LogConfig {
            durability,
            ..LogConfig::default()
        };
        let logs: Vec<Log> = (0..nlogs)
            .map(|i| storage.open_log(&format!("p{i}"), config).expect("log").0)
            .collect();
        group.throughput(Throughput::Elements((appenders * batch) as u64));
        let id = BenchmarkId::new(label, format!("{appenders}appenders_x{batch}"));
        group.bench_function(id, |b| {
            b.iter_custom(|rounds| run_appends(&rt, &logs, appenders, batch, rounds))
        });
        let (records, syncs, writes) = logs.iter().fold((0, 0, 0), |acc, l| {
            let s = l.stats();
            (acc.0 + s.records, acc.1 + s.syncs, acc.2 + s.writes)
        });
        eprintln!(
            "  {label}/{appenders}x{batch}: {records} records, {writes} writes, {syncs} fdatasyncs, \
             {:.0} records per write",
            records as f64 / writes.max(1) as f64
        );
        drop(logs);
        drop(storage);
    }
    group.finish();
}

fn bench_read(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    let storage = Storage::open(dir.path()).expect("storage");
    let config = LogConfig {
        durability: Durability::Buffered,
        ..LogConfig::default()
    };
    let (log, _) = storage.open_log("read", config).expect("log");
    let total: u64 = 500_000;
    rt.block_on(async {
        for _ in 0..total / 1000 {
            log.append(batch_of(1000)).await.expect("fill");
        }
    });
    let mut group = c.benchmark_group("storage_read_100B");
    for per_read in [100usize, 1000] {
        group.throughput(Throughput::Elements(per_read as u64));
        let mut from = 0u64;
        group.bench_function(BenchmarkId::new("sequential", per_read), |b| {
            b.iter(|| {
                let records = log
                    .read(
                        from,
                        ReadLimit {
                            max_records: per_read,
                            max_bytes: usize::MAX,
                        },
                    )
                    .expect("read");
                from = (from + records.len() as u64) % (total - per_read as u64);
                black_box(records)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_append, bench_read
}
criterion_main!(benches);
