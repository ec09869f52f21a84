//! Queue benchmark: durable (`fsync`) produce-and-consume of 100-byte messages through a
//! roost-queue with 8 partitions and one consumer group.
//!
//! 256 producer tasks each produce and await (the PUBACK-equivalent: the message is
//! fsynced) before the next, like 256 QoS 1 publishers with one message in flight. One
//! consumer with a window of 4096 receives through a sink that hands each delivery to an
//! ack task, which acks at once (the ack's durability future is not awaited; the ack is
//! appended to the progress log through the same group commit). An iteration ends when
//! every message of the batch has been delivered and acked. The data lives under
//! `ROOST_BENCH_DIR` (default: the system temp dir), which must be a real disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use roost_queue::{
    DeliverySink, Durability, GroupKey, NewMessage, QueueConfig, QueueDelivery, Queues,
};
use tokio::sync::mpsc;

const PAYLOAD: usize = 100;
const BATCH: u64 = 20_000;
const PRODUCERS: u64 = 256;

struct AckSink(mpsc::UnboundedSender<QueueDelivery>);

impl DeliverySink for AckSink {
    fn offer(&self, d: QueueDelivery) -> bool {
        self.0.send(d).is_ok()
    }
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("ROOST_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("roost-queue-bench")
        .tempdir_in(base)
        .expect("bench dir")
}

fn produce_consume(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = bench_dir();
    let config = QueueConfig {
        partitions: 8,
        durability: Durability::Fsync,
        max_depth: u64::MAX,
        max_bytes: u64::MAX,
        consumer_window: 4096,
        ..QueueConfig::default()
    };
    let (queues, _) = Queues::open(dir.path(), config.clone(), false).expect("open");
    let queue = queues.create("bench", config).expect("create");
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<QueueDelivery>();
    {
        let (queue, acked) = (queue.clone(), acked.clone());
        rt.spawn(async move {
            while let Some(d) = rx.recv().await {
                let _durable_later = queue.ack("consumer", Some(&d.group), &d.id);
                acked.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let group = GroupKey::new("workers", None);
    queue
        .join(&group, Arc::from("consumer"), 4096, Arc::new(AckSink(tx)))
        .expect("join");
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);

    let mut g = c.benchmark_group("queue");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function(
        "fsync produce+consume+ack 100B, 8 partitions, 1 group, 256 producers",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start_acked = acked.load(Ordering::Relaxed);
                    let start = Instant::now();
                    rt.block_on(async {
                        let tasks: Vec<_> = (0..PRODUCERS)
                            .map(|i| {
                                let (queue, payload) = (queue.clone(), payload.clone());
                                tokio::spawn(async move {
                                    for n in 0..BATCH / PRODUCERS + u64::from(i < BATCH % PRODUCERS)
                                    {
                                        let msg = NewMessage {
                                            subtopic: format!("dev/{i}"),
                                            partition_key: None,
                                            headers: Bytes::new(),
                                            payload: payload.clone(),
                                            ..NewMessage::default()
                                        };
                                        queue.produce(msg).await.expect("produce");
                                        std::hint::black_box(n);
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("producer");
                        }
                        while acked.load(Ordering::Relaxed) - start_acked < BATCH {
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                    });
                    total += start.elapsed();
                }
                total
            })
        },
    );
    g.finish();
    let info = queue.info();
    eprintln!(
        "queue after bench: depth {}, lag {}, in flight {}",
        info.depth, info.groups[0].lag, info.groups[0].in_flight
    );
}

criterion_group!(benches, produce_consume);
criterion_main!(benches);
