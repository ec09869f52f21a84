//! Storage-backed tests: a real `Storage` in a temp dir, sinks that are channels.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::*;

mod beyond;

type Rx = mpsc::UnboundedReceiver<QueueDelivery>;

/// Takes everything offered.
struct ChannelSink(mpsc::UnboundedSender<QueueDelivery>);

impl DeliverySink for ChannelSink {
    fn offer(&self, d: QueueDelivery) -> bool {
        self.0.send(d).is_ok()
    }
}

/// Takes at most `cap` offers until `open` is raised.
struct GateSink {
    tx: mpsc::UnboundedSender<QueueDelivery>,
    taken: AtomicUsize,
    cap: AtomicUsize,
}

impl DeliverySink for GateSink {
    fn offer(&self, d: QueueDelivery) -> bool {
        if self.taken.load(Ordering::SeqCst) >= self.cap.load(Ordering::SeqCst) {
            return false;
        }
        self.taken.fetch_add(1, Ordering::SeqCst);
        self.tx.send(d).is_ok()
    }
}

fn sink() -> (Arc<dyn DeliverySink>, Rx) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(ChannelSink(tx)), rx)
}

fn cfg() -> QueueConfig {
    QueueConfig {
        partitions: 4,
        ..QueueConfig::default()
    }
}

fn open(dir: &std::path::Path) -> Queues {
    match Queues::open(dir, cfg(), true) {
        Ok((q, _notes)) => q,
        Err(e) => panic!("open: {e}"),
    }
}

fn msg(subtopic: &str, payload: &str) -> NewMessage {
    NewMessage {
        subtopic: subtopic.into(),
        partition_key: None,
        headers: Bytes::from_static(b"h"),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..NewMessage::default()
    }
}

async fn produce(q: &Queue, m: NewMessage) -> MessageId {
    match q.produce(m).await {
        Ok(id) => id,
        Err(e) => panic!("produce: {e}"),
    }
}

async fn recv(rx: &mut Rx) -> QueueDelivery {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(d)) => d,
        other => panic!("no delivery: {other:?}"),
    }
}

async fn recv_n(rx: &mut Rx, n: usize) -> Vec<QueueDelivery> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(recv(rx).await);
    }
    v
}

async fn nothing(rx: &mut Rx) {
    let got = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
    assert!(got.is_err(), "unexpected delivery {got:?}");
}

async fn ack(q: &Queue, c: &str, d: &QueueDelivery) {
    match q.ack(c, Some(&d.group), &d.id).await {
        Ok(true) => {}
        other => panic!("ack of {} by {c}: {other:?}", d.id),
    }
}

fn group(name: &str) -> GroupKey {
    GroupKey::new(name, None)
}

fn text(d: &QueueDelivery) -> String {
    String::from_utf8_lossy(&d.payload).into_owned()
}

#[tokio::test]
async fn produce_consume_ack_round_trip() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let queues = open(dir.path());
    let q = queues
        .get_or_create("orders")
        .unwrap_or_else(|e| panic!("{e}"));
    let id = produce(&q, msg("eu/dev1", "one")).await;
    assert_eq!(id.queue.as_ref(), "orders");
    assert_eq!(q.depth(), 1);
    let (s, mut rx) = sink();
    q.join(&group("g"), "c1".into(), 0, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let d = recv(&mut rx).await;
    assert_eq!(d.id, id);
    assert_eq!(d.subtopic, "eu/dev1");
    assert_eq!(&d.headers[..], b"h");
    assert_eq!(text(&d), "one");
    assert_eq!(d.delivery_count, 1);
    assert!(d.timestamp_ms > 0);
    assert_eq!(
        d.id.to_string().parse::<MessageId>().ok(),
        Some(d.id.clone())
    );
    let info = q.info();
    assert_eq!(info.groups[0].in_flight, 1);
    ack(&q, "c1", &d).await;
    assert_eq!(q.depth(), 0);
    let info = q.info();
    assert_eq!((info.groups[0].lag, info.groups[0].in_flight), (0, 0));
    // A second ack of the same message changes nothing.
    assert!(matches!(q.ack("c1", None, &d.id).await, Ok(false)));
    let later = produce(&q, msg("eu/dev1", "two")).await;
    assert_eq!(
        recv(&mut rx).await.id,
        later,
        "delivered as soon as it is durable"
    );
}

#[tokio::test]
async fn two_groups_each_get_everything() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = open(dir.path())
        .get_or_create("q")
        .unwrap_or_else(|e| panic!("{e}"));
    let (sa, mut a) = sink();
    let (sb, mut b) = sink();
    q.join(&group("a"), "ca".into(), 100, sa)
        .unwrap_or_else(|e| panic!("{e}"));
    q.join(&group("b"), "cb".into(), 100, sb)
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..20 {
        produce(&q, msg("", &i.to_string())).await;
    }
    let mut got_a: Vec<String> = recv_n(&mut a, 20).await.iter().map(text).collect();
    let mut got_b: Vec<String> = recv_n(&mut b, 20).await.iter().map(text).collect();
    got_a.sort();
    got_b.sort();
    assert_eq!(got_a, got_b);
    assert_eq!(got_a.len(), 20);
    nothing(&mut a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_order_holds_under_three_concurrent_consumers() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let queues = open(dir.path());
    let q = queues
        .create(
            "ordered",
            QueueConfig {
                partitions: 8,
                ..cfg()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let (tx, mut all) = mpsc::unbounded_channel::<(String, QueueDelivery)>();
    for c in ["c1", "c2", "c3"] {
        let (s, mut rx) = sink();
        q.join(&group("workers"), c.into(), 4, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let (q, tx) = (q.clone(), tx.clone());
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                tokio::task::yield_now().await;
                let _ = q.ack(c, Some(&d.group), &d.id).await;
                if tx.send((c.to_owned(), d)).is_err() {
                    return;
                }
            }
        });
    }
    // Ten devices, each publishing a numbered sequence, from concurrent producers.
    let mut producers = Vec::new();
    for dev in 0..10 {
        let q = q.clone();
        producers.push(tokio::spawn(async move {
            for n in 0..30 {
                let _ = q
                    .produce(msg(&format!("dev/{dev}"), &format!("{dev}:{n}")))
                    .await;
            }
        }));
    }
    for p in producers {
        let _ = p.await;
    }
    let mut per_device: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut consumers = BTreeSet::new();
    for _ in 0..300 {
        let (c, d) = match tokio::time::timeout(Duration::from_secs(10), all.recv()).await {
            Ok(Some(x)) => x,
            other => panic!("missing deliveries: {other:?}"),
        };
        assert_eq!(d.delivery_count, 1);
        consumers.insert(c);
        per_partition
            .entry(d.id.partition)
            .or_default()
            .push(d.id.offset);
        let t = text(&d);
        let (dev, n) = t.split_once(':').unwrap_or_default();
        per_device
            .entry(dev.to_owned())
            .or_default()
            .push(n.parse().unwrap_or(0));
    }
    for (p, offsets) in &per_partition {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: {offsets:?}"
        );
    }
    for (dev, ns) in &per_device {
        assert_eq!(
            *ns,
            (0..30).collect::<Vec<u32>>(),
            "device {dev} out of order"
        );
    }
    assert_eq!(consumers.len(), 3, "work was shared");
    assert_eq!(q.depth(), 0);
}

#[tokio::test]
async fn window_limits_in_flight_and_slow_consumer_blocks_nobody() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = open(dir.path())
        .create(
            "w",
            QueueConfig {
                partitions: 1,
                ..cfg()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..10 {
        produce(&q, msg("", &i.to_string())).await;
    }
    let (tx, mut slow) = mpsc::unbounded_channel();
    let gate = Arc::new(GateSink {
        tx,
        taken: AtomicUsize::new(0),
        cap: AtomicUsize::new(2),
    });
    q.join(&group("slow"), "s".into(), 3, gate.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let (fs, mut fast) = sink();
    q.join(&group("fast"), "f".into(), 3, fs)
        .unwrap_or_else(|e| panic!("{e}"));
    // The slow sink refuses its third; the fast group is not held back.
    let got = recv_n(&mut slow, 2).await;
    nothing(&mut slow).await;
    for _ in 0..10 {
        let d = recv(&mut fast).await;
        ack(&q, "f", &d).await;
    }
    gate.cap.store(100, Ordering::SeqCst);
    q.wake();
    let third = recv(&mut slow).await;
    assert_eq!(text(&third), "2", "the refused offer comes next, in order");
    nothing(&mut slow).await; // window of 3 is full
    ack(&q, "s", &got[0]).await;
    assert_eq!(text(&recv(&mut slow).await), "3");
}

#[tokio::test]
async fn leave_mid_stream_redelivers_to_the_others() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = open(dir.path())
        .create(
            "r",
            QueueConfig {
                partitions: 2,
                ..cfg()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    let (sa, mut a) = sink();
    q.join(&g, "a".into(), 100, sa)
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..10 {
        produce(&q, msg("", &i.to_string())).await;
    }
    let held = recv_n(&mut a, 10).await;
    ack(&q, "a", &held[0]).await;
    let (sb, mut b) = sink();
    q.join(&g, "b".into(), 100, sb)
        .unwrap_or_else(|e| panic!("{e}"));
    q.leave(&g, "a");
    let again = recv_n(&mut b, 9).await;
    assert!(again.iter().all(|d| d.delivery_count == 2));
    let mut seen: Vec<String> = again.iter().map(text).collect();
    seen.push(text(&held[0]));
    seen.sort();
    let mut want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    want.sort();
    assert_eq!(seen, want, "nothing lost");
    // a's late ack after leaving still counts for the message it held, if it is
    // not in flight to b: here b holds them all, so it is ignored.
    assert!(matches!(q.ack("a", Some(&g), &held[1].id).await, Ok(false)));
}

#[tokio::test]
async fn filters_form_separate_groups() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = open(dir.path())
        .get_or_create("f")
        .unwrap_or_else(|e| panic!("{e}"));
    let (s1, mut eu) = sink();
    let (s2, mut all) = sink();
    q.join(&GroupKey::new("g", Some("eu/+")), "c".into(), 100, s1)
        .unwrap_or_else(|e| panic!("{e}"));
    q.join(&group("g"), "c".into(), 100, s2)
        .unwrap_or_else(|e| panic!("{e}"));
    for t in ["eu/1", "us/1", "eu/2", "", "eu/2/x"] {
        produce(&q, msg(t, t)).await;
    }
    let mut got: Vec<String> = recv_n(&mut eu, 2).await.iter().map(text).collect();
    got.sort();
    assert_eq!(got, ["eu/1", "eu/2"]);
    nothing(&mut eu).await;
    assert_eq!(recv_n(&mut all, 5).await.len(), 5);
    assert!(
        q.join(&GroupKey::new("g", Some("a/#/b")), "c".into(), 1, sink().0)
            .is_err(),
        "invalid filter refused"
    );
}

#[tokio::test]
async fn acked_messages_do_not_come_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    {
        let q = open(dir.path())
            .get_or_create("c")
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 0..10 {
            produce(&q, msg(&format!("d{}", i % 3), &i.to_string())).await;
        }
        let (s, mut rx) = sink();
        q.join(&g, "c1".into(), 100, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let ds = recv_n(&mut rx, 10).await;
        for d in ds
            .iter()
            .filter(|d| text(d).parse::<u32>().unwrap_or(0) % 2 == 0)
        {
            ack(&q, "c1", d).await;
        }
        // No maintain, no snapshot, no leave: everything dropped as is.
    }
    let (queues, notes) = Queues::open(dir.path(), cfg(), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(notes.is_empty(), "{notes:?}");
    let q = queues
        .get("c")
        .unwrap_or_else(|| panic!("queue not recreated"));
    assert_eq!(q.info().groups[0].lag, 5);
    assert!(q.depth() >= 5);
    let (s, mut rx) = sink();
    q.join(&g, "c2".into(), 100, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let again = recv_n(&mut rx, 5).await;
    let mut odd: Vec<String> = again.iter().map(text).collect();
    odd.sort();
    assert_eq!(odd, ["1", "3", "5", "7", "9"]);
    // Their first delivery was recorded (before the acks, which were durable): this
    // is their second.
    assert!(
        again.iter().all(|d| d.delivery_count == 2),
        "counts go on across the restart: {:?}",
        again.iter().map(|d| d.delivery_count).collect::<Vec<_>>()
    );
    nothing(&mut rx).await;
    // Settle the rest, snapshot, and restart again: nothing comes back.
    for d in &again {
        ack(&q, "c2", d).await;
    }
    q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
    drop((q, queues));
    let queues = open(dir.path());
    let q = queues
        .get("c")
        .unwrap_or_else(|| panic!("queue not recreated"));
    assert_eq!(q.depth(), 0);
    let (s, mut rx) = sink();
    q.join(&g, "c3".into(), 100, s)
        .unwrap_or_else(|e| panic!("{e}"));
    nothing(&mut rx).await;
}

#[tokio::test]
async fn a_burst_of_acks_settles_together_and_durably() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    let unacked: BTreeSet<String> = {
        let q = open(dir.path())
            .get_or_create("b")
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 0..12 {
            produce(&q, msg(&format!("d{}", i % 4), &i.to_string())).await;
        }
        let (s, mut rx) = sink();
        q.join(&g, "c1".into(), 6, s)
            .unwrap_or_else(|e| panic!("{e}"));
        // The window holds 6; settling them in one call frees it for the other 6.
        let first = recv_n(&mut rx, 6).await;
        nothing(&mut rx).await;
        let mut ids: Vec<MessageId> = first.iter().map(|d| d.id.clone()).collect();
        // Ids the consumer does not hold count for nothing and spoil nothing.
        ids.push(MessageId {
            queue: "b".into(),
            partition: 99,
            offset: 0,
        });
        match q.ack_many("c1", Some(&g), &ids).await {
            Ok(true) => {}
            other => panic!("ack_many: {other:?}"),
        }
        let second = recv_n(&mut rx, 6).await;
        // Acking them again finds nothing outstanding.
        match q.ack_many("c1", Some(&g), &ids[..6]).await {
            Ok(false) => {}
            other => panic!("second ack_many: {other:?}"),
        }
        let mut got: Vec<String> = first.iter().chain(&second).map(text).collect();
        got.sort_by_key(|t| t.parse::<u32>().unwrap_or(0));
        let want: Vec<String> = (0..12).map(|i: u32| i.to_string()).collect();
        assert_eq!(got, want);
        second.iter().map(text).collect()
    };
    // After a restart only the six never acked come again.
    let queues = open(dir.path());
    let q = queues
        .get("b")
        .unwrap_or_else(|| panic!("queue not recreated"));
    let (s, mut rx) = sink();
    q.join(&g, "c2".into(), 100, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let again: BTreeSet<String> = recv_n(&mut rx, 6).await.iter().map(text).collect();
    assert_eq!(again, unacked);
    nothing(&mut rx).await;
}

#[tokio::test]
async fn quota_exceeded_at_max_depth() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = open(dir.path())
        .create(
            "full",
            QueueConfig {
                max_depth: 3,
                ..cfg()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..3 {
        produce(&q, msg("", &i.to_string())).await;
    }
    let err = q.produce(msg("", "x")).await;
    match err {
        Err(e @ ProduceError::QuotaExceeded { .. }) => {
            assert_eq!(e.reason_code(), roost_core::ReasonCode::QuotaExceeded)
        }
        other => panic!("expected quota exceeded, got {other:?}"),
    }
    assert!(!q.has_room(1));
    // A 3.1.1 producer waits for room; consuming one makes room.
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.wait_for_room(1).await })
    };
    let (s, mut rx) = sink();
    q.join(&group("g"), "c".into(), 1, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let d = recv(&mut rx).await;
    ack(&q, "c", &d).await;
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap_or_else(|_| panic!("waiter not woken"))
        .unwrap_or_else(|e| panic!("{e}"));
    produce(&q, msg("", "fits")).await;
}

#[tokio::test]
async fn dead_letters_after_max_deliveries_and_the_dlq_is_consumable() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let queues = open(dir.path());
    let config = QueueConfig {
        partitions: 1,
        max_deliveries: 2,
        backoff_initial_ms: 1,
        backoff_max_ms: 1,
        ack_timeout_ms: 50,
        ..cfg()
    };
    let q = queues
        .create("jobs", config)
        .unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    produce(&q, msg("a/b", "poison")).await;
    produce(&q, msg("", "timeout")).await;
    produce(&q, msg("", "rejected")).await;
    let first = recv_n(&mut rx, 3).await;
    // poison: nacked twice.
    assert!(q.nack("c", Some(&g), &first[0].id));
    // rejected: straight to dead letters.
    assert!(q.reject("c", Some(&g), &first[2].id));
    tokio::time::sleep(Duration::from_millis(5)).await;
    q.tick(now_ms());
    let second = recv(&mut rx).await;
    assert_eq!((text(&second), second.delivery_count), ("poison".into(), 2));
    assert!(q.nack("c", Some(&g), &second.id));
    // timeout: its ack timeout passes twice.
    q.tick(now_ms() + 60);
    let t2 = recv(&mut rx).await;
    assert_eq!((text(&t2), t2.delivery_count), ("timeout".into(), 2));
    q.tick(now_ms() + 200);
    // Consume the dead-letter queue.
    let dlq = queues.get("jobs$dlq").unwrap_or_else(|| panic!("no dlq"));
    assert_eq!(dlq.name(), "jobs$dlq");
    let (s, mut drx) = sink();
    dlq.join(&g, "d".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut dead = recv_n(&mut drx, 3).await;
    dead.sort_by_key(|d| d.dead_letter.map(|o| o.offset));
    let summary: Vec<(String, String, Option<DeadReason>, Option<u32>)> = dead
        .iter()
        .map(|d| {
            (
                text(d),
                d.subtopic.clone(),
                d.dead_letter.map(|o| o.reason),
                d.dead_letter.map(|o| o.delivery_count),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "poison".into(),
                "a/b".into(),
                Some(DeadReason::MaxDeliveries),
                Some(2)
            ),
            (
                "timeout".into(),
                "".into(),
                Some(DeadReason::MaxDeliveries),
                Some(2)
            ),
            (
                "rejected".into(),
                "".into(),
                Some(DeadReason::Rejected),
                Some(1)
            ),
        ]
    );
    // The source group settles each once its dead-letter copy is durable, which the
    // dead-letter queue may show a moment earlier.
    for _ in 0..500 {
        if q.depth() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(q.depth(), 0, "all three settled in the source group");
    assert_eq!(q.info().dead_letters, 3);
    for d in &dead {
        ack(&dlq, "d", d).await;
    }
    assert_eq!(dlq.depth(), 0);
    nothing(&mut rx).await;
}

#[tokio::test]
async fn reset_by_offset_timestamp_earliest_latest() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let q = open(dir.path())
        .create(
            "replay",
            QueueConfig {
                partitions: 1,
                ..cfg()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..5 {
        produce(&q, msg("", &i.to_string())).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mark = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 5..8 {
        produce(&q, msg("", &i.to_string())).await;
    }
    let g = group("g");
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 100, s)
        .unwrap_or_else(|e| panic!("{e}"));
    for d in recv_n(&mut rx, 8).await {
        ack(&q, "c", &d).await;
    }
    let texts = |v: Vec<QueueDelivery>| v.iter().map(text).collect::<Vec<_>>();
    q.reset(&g, ResetTo::Offset(6))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = recv_n(&mut rx, 2).await;
    assert_eq!(texts(got.clone()), ["6", "7"]);
    for d in &got {
        ack(&q, "c", d).await;
    }
    q.reset(&g, ResetTo::Timestamp(mark))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = recv_n(&mut rx, 3).await;
    assert_eq!(texts(got.clone()), ["5", "6", "7"]);
    q.reset(&g, ResetTo::Latest)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    nothing(&mut rx).await;
    assert_eq!(
        q.info().groups[0].in_flight,
        0,
        "reset forgets what was out"
    );
    q.reset(&g, ResetTo::Earliest)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recv_n(&mut rx, 8).await.len(), 8);
    // A reset is durable: after a restart the group resumes from it.
    q.reset(&g, ResetTo::Offset(7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    drop(q);
    let queues = open(dir.path());
    let q = queues.get("replay").unwrap_or_else(|| panic!("gone"));
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 100, s)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(texts(recv_n(&mut rx, 1).await), ["7"]);
    nothing(&mut rx).await;
}

#[tokio::test]
async fn registry_persists_config_grows_partitions_purges_and_deletes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    {
        let queues = open(dir.path());
        for bad in ["", "a/b", "a$dlq", "x:y", &"n".repeat(129)] {
            assert!(queues.create(bad, cfg()).is_err(), "{bad:?}");
        }
        let c = QueueConfig {
            partitions: 2,
            capture_filters: vec!["sensors/#".into()],
            ..cfg()
        };
        let q = queues
            .create(".hidden-ok", c.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            queues.create(".hidden-ok", c.clone()),
            Err(QueueError::AlreadyExists(_))
        ));
        assert_eq!(queues.capturing("sensors/1").len(), 1);
        assert!(queues.capturing("other").is_empty());
        assert!(
            queues
                .update(
                    ".hidden-ok",
                    QueueConfig {
                        partitions: 1,
                        ..c.clone()
                    }
                )
                .is_err()
        );
        queues
            .update(".hidden-ok", QueueConfig { partitions: 3, ..c })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.partitions(), 3);
        for i in 0..9 {
            produce(&q, msg("", &i.to_string())).await;
        }
        assert_eq!(q.depth(), 9);
        queues
            .purge(".hidden-ok")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.depth(), 0);
        produce(&q, msg("", "after")).await;
        queues
            .create("gone", cfg())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (queues, _) = Queues::open(dir.path(), cfg(), false).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = queues.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, [".hidden-ok", "gone"]);
    let q = queues.get(".hidden-ok").unwrap_or_else(|| panic!("gone"));
    assert_eq!(q.partitions(), 3);
    assert_eq!(q.config().capture_filters, ["sensors/#"]);
    let (s, mut rx) = sink();
    q.join(&group("late"), "c".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        text(&recv(&mut rx).await),
        "after",
        "purged messages stay gone"
    );
    nothing(&mut rx).await;
    queues.delete("gone").unwrap_or_else(|e| panic!("{e}"));
    assert!(queues.get("gone").is_none());
    assert!(
        matches!(queues.get_or_create("new"), Err(QueueError::NotFound(_))),
        "auto-create off"
    );
    drop(queues);
    let (queues, notes) = Queues::open(dir.path(), cfg(), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(queues.get("gone").is_none());
    assert!(notes.is_empty(), "{notes:?}");
}

#[tokio::test]
async fn maintain_deletes_segments_every_group_has_passed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let queues = open(dir.path());
    let q = queues
        .create(
            "big",
            QueueConfig {
                partitions: 1,
                ..cfg()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let payload = "x".repeat(64 * 1024);
    // 16 MiB segments: ~300 messages of 64 KiB fill more than one.
    for _ in 0..300 {
        produce(&q, msg("", &payload)).await;
    }
    let before = q.bytes();
    let (sa, mut a) = sink();
    let (sb, mut b) = sink();
    q.join(&group("a"), "a".into(), 1000, sa)
        .unwrap_or_else(|e| panic!("{e}"));
    q.join(&group("b"), "b".into(), 1000, sb)
        .unwrap_or_else(|e| panic!("{e}"));
    for d in recv_n(&mut a, 300).await {
        ack(&q, "a", &d).await;
    }
    q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(q.bytes(), before, "group b has not consumed anything");
    for d in recv_n(&mut b, 300).await {
        ack(&q, "b", &d).await;
    }
    q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(q.bytes() < before, "{} !< {before}", q.bytes());
    drop((q, queues));
    let queues = open(dir.path());
    let q = queues.get("big").unwrap_or_else(|| panic!("gone"));
    assert_eq!(q.depth(), 0);
}

mod random_schedules {
    //! The no-loss property on the real queue: random produces, acks, nacks, timeouts,
    //! joins and leaves in two groups; then steady consumers drain. Every message ends
    //! settled exactly once per group (acked, or dead-lettered and then found in the
    //! dead-letter queue), and no consumer ever holds more than its window.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Produce(u8),
        Ack(usize),
        Nack(usize),
        Timeout,
        Join(u8),
        Leave(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1..5u8).prop_map(Op::Produce),
            4 => any::<usize>().prop_map(Op::Ack),
            2 => any::<usize>().prop_map(Op::Nack),
            1 => Just(Op::Timeout),
            2 => (0..6u8).prop_map(Op::Join),
            1 => (0..6u8).prop_map(Op::Leave),
        ]
    }

    /// Consumer `c` is in group `c % 2` with window `1 + c % 3`.
    fn member(c: u8) -> (GroupKey, String, u32) {
        (
            group(&format!("g{}", c % 2)),
            format!("c{c}"),
            1 + u32::from(c % 3),
        )
    }

    #[derive(Default)]
    struct World {
        rx: BTreeMap<String, Rx>,
        /// Deliveries each consumer holds (received, not yet settled by it).
        held: BTreeMap<String, Vec<QueueDelivery>>,
        acked: BTreeMap<String, BTreeSet<MessageId>>,
        produced: BTreeSet<MessageId>,
    }

    impl World {
        /// Receives what was offered; during the random phase (`check_window`), checks
        /// that nobody holds more than its window. (While draining, a tick may expire a
        /// delivery the test has not seen yet, so a consumer can briefly see both the
        /// stale copy and the redelivery.)
        fn pump(&mut self, check_window: bool) {
            for (c, rx) in self.rx.iter_mut() {
                while let Ok(d) = rx.try_recv() {
                    self.held.entry(c.clone()).or_default().push(d);
                }
            }
            for c in (0..6u8).filter(|_| check_window) {
                let (_, name, window) = member(c);
                let n = self.held.get(&name).map_or(0, Vec::len);
                assert!(n as u32 <= window, "{name} holds {n} > window {window}");
            }
        }

        fn take(&mut self, i: usize) -> Option<(String, QueueDelivery)> {
            let all: Vec<(String, usize)> = self
                .held
                .iter()
                .flat_map(|(c, v)| (0..v.len()).map(move |k| (c.clone(), k)))
                .collect();
            let (c, k) = all.get(i % all.len().max(1))?.clone();
            let d = self.held.get_mut(&c)?.remove(k);
            Some((c, d))
        }

        async fn ack(&mut self, q: &Queue, c: &str, d: &QueueDelivery) {
            if let Ok(true) = q.ack(c, Some(&d.group), &d.id).await {
                let fresh = self
                    .acked
                    .entry(d.group.group.to_string())
                    .or_default()
                    .insert(d.id.clone());
                assert!(fresh, "{} settled twice in {}", d.id, d.group);
            }
        }
    }

    async fn run(ops: Vec<Op>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let queues = open(dir.path());
        let config = QueueConfig {
            partitions: 3,
            durability: Durability::Buffered,
            max_deliveries: 3,
            backoff_initial_ms: 1,
            backoff_max_ms: 1,
            ack_timeout_ms: 20,
            ..cfg()
        };
        let q = queues.create("p", config).unwrap_or_else(|e| panic!("{e}"));
        let mut w = World::default();
        for op in ops {
            match op {
                Op::Produce(n) => {
                    for i in 0..n {
                        let id = produce(&q, msg(&format!("k{i}"), "m")).await;
                        w.produced.insert(id);
                    }
                }
                Op::Ack(i) => {
                    if let Some((c, d)) = w.take(i) {
                        w.ack(&q, &c, &d).await;
                    }
                }
                Op::Nack(i) => {
                    if let Some((c, d)) = w.take(i) {
                        q.nack(&c, Some(&d.group), &d.id);
                    }
                }
                Op::Timeout => {
                    // Every delivery's ack timeout and every backoff passes.
                    w.held.clear();
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    q.tick(now_ms());
                }
                Op::Join(c) => {
                    let (key, name, window) = member(c);
                    if !w.rx.contains_key(&name) {
                        let (s, rx) = sink();
                        w.rx.insert(name.clone(), rx);
                        q.join(&key, name.into(), window, s)
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                }
                Op::Leave(c) => {
                    let (key, name, _) = member(c);
                    q.leave(&key, &name);
                    w.rx.remove(&name);
                    w.held.remove(&name);
                }
            }
            tokio::task::yield_now().await;
            w.pump(true);
        }
        // Drain: everyone joins and acks everything; dead letters are copied.
        for c in 0..6u8 {
            let (key, name, window) = member(c);
            if !w.rx.contains_key(&name) {
                let (s, rx) = sink();
                w.rx.insert(name.clone(), rx);
                q.join(&key, name.into(), window, s)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        for _ in 0..2000 {
            w.pump(false);
            let held: Vec<(String, QueueDelivery)> = std::mem::take(&mut w.held)
                .into_iter()
                .flat_map(|(c, v)| v.into_iter().map(move |d| (c.clone(), d)))
                .collect();
            for (c, d) in held {
                w.ack(&q, &c, &d).await;
            }
            if q.info().groups.iter().all(|g| g.lag == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            q.tick(now_ms());
        }
        let info = q.info();
        for g in &info.groups {
            assert_eq!((g.lag, g.in_flight), (0, 0), "{} not drained", g.key);
        }
        // What each group did not ack must be in the dead-letter queue, once per group.
        let mut want_dead: BTreeMap<(u32, u64), usize> = BTreeMap::new();
        for g in ["g0", "g1"] {
            let acked = w.acked.get(g).cloned().unwrap_or_default();
            assert!(acked.is_subset(&w.produced));
            for id in w.produced.difference(&acked) {
                *want_dead.entry((id.partition, id.offset)).or_default() += 1;
            }
        }
        let dlq = q
            .dead_letters()
            .cloned()
            .unwrap_or_else(|| panic!("no dlq"));
        let total: usize = want_dead.values().sum();
        let (s, mut drx) = sink();
        dlq.join(&group("audit"), "a".into(), 10_000, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got_dead: BTreeMap<(u32, u64), usize> = BTreeMap::new();
        for d in recv_n(&mut drx, total).await {
            let o = d.dead_letter.unwrap_or_else(|| panic!("no origin"));
            *got_dead.entry((o.partition, o.offset)).or_default() += 1;
        }
        nothing(&mut drx).await;
        assert_eq!(got_dead, want_dead);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn every_message_settles_exactly_once_per_group(
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(run(ops));
        }
    }
}

#[tokio::test]
async fn progress_log_is_checkpointed_and_truncated() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let queues = open(dir.path());
    let config = QueueConfig {
        partitions: 2,
        durability: Durability::Buffered,
        ..cfg()
    };
    let q = queues
        .create("busy", config)
        .unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 64, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let progress = queues
        .storage()
        .log("g.busy")
        .unwrap_or_else(|| panic!("no progress log"));
    // About 60 bytes per settle record: 1 MiB progress segments roll every ~17K acks.
    let total = 40_000u64;
    let mut peak_segments = 0;
    for round in 0..(total / 1000) {
        let ids: Vec<_> = (0..1000)
            .map(|i| q.produce(msg("", &i.to_string())))
            .collect();
        for id in ids {
            id.await.unwrap_or_else(|e| panic!("{e}"));
        }
        for _ in 0..1000 {
            let d = recv(&mut rx).await;
            let _durable_later = q.ack("c", Some(&g), &d.id);
        }
        peak_segments = peak_segments.max(progress.segment_count());
        if round % 10 == 9 {
            q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
        }
    }
    q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(peak_segments >= 2, "the test must roll the progress log");
    assert!(
        progress.segment_count() <= 2,
        "{} segments kept",
        progress.segment_count()
    );
    assert_eq!(q.depth(), 0);
    drop((q, progress, queues));
    // Replaying the truncated log (snapshot first) still knows everything was settled.
    let queues = open(dir.path());
    let q = queues.get("busy").unwrap_or_else(|| panic!("gone"));
    assert_eq!(q.depth(), 0);
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 64, s)
        .unwrap_or_else(|e| panic!("{e}"));
    nothing(&mut rx).await;
}

/// `max_deliveries` bounds deliveries across restarts: counts are recorded with the
/// group progress, restated after each snapshot, and a delivery cut short by a crash
/// counts as one.
#[tokio::test]
async fn delivery_counts_survive_restarts_and_snapshots() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = QueueConfig {
        partitions: 1,
        max_deliveries: 3,
        backoff_initial_ms: 1,
        backoff_max_ms: 1,
        ..cfg()
    };
    let g = group("g");
    {
        let queues = open(dir.path());
        let q = queues
            .create("bounded", config.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        produce(&q, msg("", "poison")).await;
        let (s, mut rx) = sink();
        q.join(&g, "c".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let first = recv(&mut rx).await;
        assert_eq!(first.delivery_count, 1);
        assert!(q.nack("c", Some(&g), &first.id));
        tokio::time::sleep(Duration::from_millis(5)).await;
        q.tick(now_ms());
        let second = recv(&mut rx).await;
        assert_eq!(second.delivery_count, 2);
        // A snapshot truncates the progress log: the count must be restated after it.
        q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
        // Crash with the second delivery in flight.
    }
    {
        let queues = open(dir.path());
        let q = queues.get("bounded").unwrap_or_else(|| panic!("gone"));
        let (s, mut rx) = sink();
        q.join(&g, "c".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let third = recv(&mut rx).await;
        assert_eq!(
            third.delivery_count, 3,
            "the interrupted second delivery counts"
        );
        // Something durable after it, so the count of the third delivery is on disk
        // (appends of one storage are committed in order).
        produce(&q, msg("other", "later")).await;
        assert_eq!(text(&recv(&mut rx).await), "later");
        // Crash with the third (last allowed) delivery in flight.
    }
    let queues = open(dir.path());
    let q = queues.get("bounded").unwrap_or_else(|| panic!("gone"));
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let again = recv(&mut rx).await;
    assert_eq!(
        (text(&again), again.delivery_count),
        ("later".into(), 2),
        "only the other message comes again"
    );
    nothing(&mut rx).await;
    q.tick(now_ms());
    let dlq = queues
        .get("bounded$dlq")
        .unwrap_or_else(|| panic!("no dlq"));
    let (s, mut drx) = sink();
    dlq.join(&g, "d".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let dead = recv(&mut drx).await;
    assert_eq!(text(&dead), "poison");
    assert_eq!(
        dead.dead_letter.map(|o| (o.reason, o.delivery_count)),
        Some((DeadReason::MaxDeliveries, 3))
    );
}

/// Child half of [`survives_kill_9`], which runs it in a process of its own (with
/// `--ignored`) and kills it. Ignored in a plain `cargo test` so that it is never counted
/// as a test that passed; run without `ROOST_QUEUE_CRASH_DIR` it fails.
#[tokio::test]
#[ignore = "the child process of survives_kill_9, which runs it"]
async fn crash_child() {
    use std::io::Write;
    let Some(dir) = std::env::var_os("ROOST_QUEUE_CRASH_DIR") else {
        panic!("crash_child is run by survives_kill_9 with ROOST_QUEUE_CRASH_DIR set");
    };
    let queues = open(std::path::Path::new(&dir));
    let q = queues
        .get_or_create("crash")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = std::io::stdout();
    // The test harness may have left its "test ... " line unterminated.
    let _ = writeln!(out);
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(produce(&q, msg(&format!("d{}", i % 7), &i.to_string())).await);
    }
    let g = group("g");
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 1000, s)
        .unwrap_or_else(|e| panic!("{e}"));
    for d in recv_n(&mut rx, 200).await {
        if text(&d).parse::<u32>().unwrap_or(1) % 2 == 0 {
            ack(&q, "c", &d).await; // durable before it is reported
            let _ = writeln!(out, "ACKED {}", d.id);
        } else {
            let _ = writeln!(out, "UNACKED {}", d.id);
        }
    }
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    // Keep producing until killed; report each produce once it is durable.
    for i in 200.. {
        let id = produce(&q, msg("", &i.to_string())).await;
        let _ = writeln!(out, "PRODUCED {id}");
        let _ = out.flush();
    }
}

/// A real crash: the child process is killed with SIGKILL while producing. After
/// reopening, every produce it saw resolve is there, durably acked messages never come
/// again, and unacked ones all do.
#[tokio::test]
async fn survives_kill_9() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ROOST_QUEUE_CRASH_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (mut acked, mut unacked, mut produced) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut ready = false;
    let mut record = |line: &str, ready: &mut bool| {
        let parse = |s: &str| s.parse::<MessageId>().unwrap_or_else(|e| panic!("{e}"));
        if let Some(id) = line.strip_prefix("ACKED ") {
            acked.insert(parse(id));
        } else if let Some(id) = line.strip_prefix("UNACKED ") {
            unacked.insert(parse(id));
        } else if let Some(id) = line.strip_prefix("PRODUCED ") {
            produced.insert(parse(id));
        } else if line == "READY" {
            *ready = true;
        }
    };
    while !ready {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => record(&line, &mut ready),
            Err(e) => panic!("child did not get ready: {e}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().unwrap_or_else(|e| panic!("{e}")); // SIGKILL
    let _ = child.wait();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        record(&line, &mut ready);
    }
    assert_eq!((acked.len(), unacked.len()), (100, 100));
    assert!(!produced.is_empty(), "killed before producing more");

    let q = open(dir.path())
        .get("crash")
        .unwrap_or_else(|| panic!("queue lost"));
    let (s, mut rx) = sink();
    q.join(&group("g"), "c2".into(), 100_000, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut again = BTreeSet::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        again.insert(d.id);
    }
    assert!(
        again.is_disjoint(&acked),
        "durably acked messages delivered again"
    );
    assert!(unacked.is_subset(&again), "unacked messages lost");
    assert!(produced.is_subset(&again), "acknowledged produces lost");
}

/// A partition segment overwritten in the middle and the group progress log cut short
/// while the queue was closed: the queue opens, reports what each log lost, delivers
/// every message that can be read (in order) and none that cannot.
#[tokio::test]
async fn damaged_partition_and_progress_logs_are_reported_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = QueueConfig {
        partitions: 1,
        segment_bytes: 4096,
        ..QueueConfig::default()
    };
    let g = group("g");
    {
        let (queues, _) =
            Queues::open(dir.path(), config.clone(), true).unwrap_or_else(|e| panic!("{e}"));
        let q = queues.get_or_create("d").unwrap_or_else(|e| panic!("{e}"));
        for i in 0..300 {
            produce(&q, msg("dev", &format!("message {i:04}"))).await;
        }
        let (s, mut rx) = sink();
        q.join(&g, "c1".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        for d in recv_n(&mut rx, 10).await {
            ack(&q, "c1", &d).await;
        }
    }
    let segments = |log: &str| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir.path().join("logs").join(log))
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|e| e.unwrap_or_else(|e| panic!("{e}")).path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        v.sort();
        v
    };
    let parts = segments("p0.d");
    assert!(parts.len() > 3, "the test spans segments: {parts:?}");
    let victim = &parts[1];
    let mut bytes = std::fs::read(victim).unwrap_or_else(|e| panic!("{e}"));
    let mid = bytes.len() / 2;
    bytes[mid..mid + 24].fill(0xEE);
    std::fs::write(victim, &bytes).unwrap_or_else(|e| panic!("{e}"));
    let progress = segments("g.d")
        .pop()
        .unwrap_or_else(|| panic!("no progress log"));
    let len = std::fs::metadata(&progress).map_or(0, |m| m.len());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&progress)
        .unwrap_or_else(|e| panic!("{e}"));
    // Overwrite (not cut) the progress log's first records: a bad block there.
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 16], len / 3)
        .unwrap_or_else(|e| panic!("{e}"));
    drop(f);

    let (queues, notes) = Queues::open(dir.path(), config, true).unwrap_or_else(|e| panic!("{e}"));
    let q = queues
        .get("d")
        .unwrap_or_else(|| panic!("queue not opened"));
    let damage = q.info().damage;
    let part = damage
        .iter()
        .find(|d| d.partition == Some(0))
        .unwrap_or_else(|| panic!("no partition damage reported: {damage:?}"));
    assert_eq!(part.lost.len(), 1, "{part:?}");
    let lost = part.lost[0].clone();
    assert!(
        !lost.is_empty() && lost.end - lost.start <= 2,
        "24 bytes: {lost:?}"
    );
    assert_eq!(part.quarantined.len(), 1);
    assert!(part.quarantined[0].starts_with(dir.path().join("logs").join("quarantine")));
    assert!(
        damage
            .iter()
            .any(|d| d.partition.is_none() && !d.quarantined.is_empty()),
        "progress damage reported: {damage:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("quarantined as") && n.contains("partition 0")),
        "{notes:?}"
    );
    // Everything readable comes, in order; the lost offsets never do. Settles lost with
    // the progress records may bring some of the first ten again (at least once).
    let (s, mut rx) = sink();
    q.join(&g, "c2".into(), 1000, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = BTreeSet::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        assert!(
            !lost.contains(&d.id.offset),
            "lost offset {} delivered",
            d.id.offset
        );
        assert_eq!(text(&d), format!("message {:04}", d.id.offset));
        got.insert(d.id.offset);
    }
    let want: BTreeSet<u64> = (10..300).filter(|o| !lost.contains(o)).collect();
    assert!(
        want.is_subset(&got),
        "missing: {:?}",
        want.difference(&got).collect::<Vec<_>>()
    );
}

#[test]
fn partition_logs_are_told_by_name_from_the_queue_s_other_logs() {
    use crate::queue::{partition_log_name, progress_log_name};
    for q in ["orders", "a.b"] {
        assert!(crate::is_partition_log_of(
            &partition_log_name(q, false, 0),
            q
        ));
        assert!(crate::is_partition_log_of(
            &partition_log_name(q, false, 17),
            q
        ));
        assert!(!crate::is_partition_log_of(
            &partition_log_name(q, true, 0),
            q
        ));
        assert!(!crate::is_partition_log_of(&progress_log_name(q, false), q));
        assert!(!crate::is_partition_log_of(
            &partition_log_name(q, false, 0),
            "other"
        ));
    }
    assert!(!crate::is_partition_log_of("p.orders", "orders"));
    assert!(!crate::is_partition_log_of(
        &partition_log_name("orders2", false, 0),
        "orders"
    ));
}
