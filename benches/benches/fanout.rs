//! The broker's whole publish path: one PUBLISH fanned out to 1,000 online subscribers.
//!
//! A real [`Broker`] (store in a temp directory, default config) has 1,000 clients
//! attached the way the connection task attaches them: a [`ConnectionHandle`] holding
//! the sending side of the client's mailbox, a clean (non-persistent) session, one
//! subscription to `bench/fanout` at QoS 1. Each iteration hands a 64-byte message to
//! [`Broker::publish`], which matches it in the router, builds one delivery per client
//! and queues it in that client's mailbox (shard lock, mailbox lock, waker).
//!
//! Timed: `publish` only. Not timed: building the `Arc<Message>` (the decoder's job,
//! see the codec bench) and draining the 1,000 mailboxes afterwards, which is done as a
//! connection task does it: `recv` polled until it is pending again, so the mailbox
//! gives its storage back and registers its waker, as an idle connection's does. The
//! wake-up is a no-op waker here; in the broker it schedules the connection's task.
//! Each drain checks that every client got exactly one delivery.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use roost_benches::{CountingAlloc, Flamegraph, allocations_per_op};
use roost_core::{Message, Properties, ProtocolVersion, QoS, SubscriptionOptions};
use roost_engine::auth::AllowAll;
use roost_engine::broker::{Attach, Broker, ClientInfo, ConnectionHandle, Fanout, Mailbox};
use roost_engine::store::MemoryStore;
use roost_queue::Queues;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const SUBSCRIBERS: usize = 1_000;
const TOPIC: &str = "bench/fanout";

struct Setup {
    broker: Arc<Broker>,
    mailboxes: Vec<Mailbox>,
    /// Keeps the store's and queues' directory alive.
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    // Clean sessions store nothing: the store is not on the path measured.
    let (queues, _) =
        Queues::open(dir.path().join("queues"), Default::default(), true).expect("queues open");
    let broker = Broker::new(
        Default::default(),
        Arc::new(MemoryStore::default()),
        Arc::new(AllowAll),
        queues,
    );

    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..SubscriptionOptions::default()
    };
    let mut mailboxes = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let client_id: Arc<str> = Arc::from(format!("sub-{i}"));
        let (tx, rx) = roost_engine::mailbox::mailbox(broker.delivery_capacity());
        let handle = ConnectionHandle {
            mailbox: tx,
            info: Arc::new(ClientInfo {
                id: broker.next_id(),
                persistent: false,
                stalled: Default::default(),
                overflowed: Default::default(),
                peer: ([127, 0, 0, 1], 40_000 + i as u16).into(),
                protocol: ProtocolVersion::V3_1_1,
                username: None,
                connected_at_ms: 0,
            }),
        };
        assert!(matches!(
            broker.attach(&client_id, true, handle),
            Attach::Fresh
        ));
        broker.subscribe(TOPIC, &client_id, options, None);
        mailboxes.push(rx);
    }
    let mut s = Setup {
        broker,
        mailboxes,
        _dir: dir,
    };
    // An idle connection task waits in `recv`, its waker registered.
    assert_eq!(drain(&mut s.mailboxes), 0);
    s
}

/// Takes every queued delivery the way a connection task does (until `recv` is
/// pending); returns how many there were. Panics unless each mailbox had 0 or 1.
fn drain(mailboxes: &mut [Mailbox]) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    let mut total = 0;
    for rx in mailboxes.iter() {
        let mut got = 0;
        loop {
            let recv = pin!(rx.recv());
            match recv.poll(&mut cx) {
                Poll::Ready(Some(d)) => {
                    black_box(d);
                    got += 1;
                }
                Poll::Ready(None) => panic!("mailbox closed"),
                Poll::Pending => break,
            }
        }
        assert!(got <= 1, "a subscriber got {got} deliveries of one message");
        total += got;
    }
    total
}

fn message(qos: QoS) -> Message {
    Message {
        topic: TOPIC.into(),
        payload: Bytes::from(vec![b'x'; 64]),
        qos,
        retain: false,
        properties: Properties::default(),
        publisher: Some(Arc::from("publisher")),
        received_at: Instant::now(),
    }
}

fn bench_fanout(c: &mut Criterion) {
    let mut s = setup();
    let mut out = Fanout::default();

    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for (name, qos) in [
        ("publish qos0 to 1000", QoS::AtMostOnce),
        ("publish qos1 to 1000", QoS::AtLeastOnce),
    ] {
        let template = message(qos);

        // Allocations of `publish` alone: the drain (and the message) is outside the count.
        let mut total = 0.0;
        let rounds = 200;
        for _ in 0..rounds {
            let msg = Arc::new(template.clone());
            let mut overflowed = true;
            total += allocations_per_op(1, || {
                overflowed = s.broker.publish(msg.clone(), &mut out, false) == Ok(true)
            });
            // Clean sessions with room: nothing stored, nothing for the publisher to wait
            // for, nothing dropped.
            assert!(out.ops.is_empty() && out.only_ops());
            assert!(!overflowed);
            assert_eq!(drain(&mut s.mailboxes), SUBSCRIBERS);
        }
        let allocs = total / f64::from(rounds);
        println!(
            "fanout/{name}: {allocs:.2} allocations per message, {:.4} per delivery",
            allocs / SUBSCRIBERS as f64
        );

        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let msg = Arc::new(template.clone());
                    let start = Instant::now();
                    let _ = s.broker.publish(msg, &mut out, false);
                    timed += start.elapsed();
                    assert_eq!(drain(&mut s.mailboxes), SUBSCRIBERS);
                }
                timed
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_profiler(Flamegraph::new(1000));
    targets = bench_fanout
}
criterion_main!(benches);
