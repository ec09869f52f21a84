//! Dedup, delayed delivery, last-value queues, atomic ack-and-produce and dead-letter
//! redrive, each also across a reopen (what a restart after `kill -9` replays).

use super::*;

fn with_dedup(subtopic: &str, payload: &str, id: &str) -> NewMessage {
    NewMessage {
        dedup_id: Some(Bytes::copy_from_slice(id.as_bytes())),
        ..msg(subtopic, payload)
    }
}

fn one_partition() -> QueueConfig {
    QueueConfig {
        partitions: 1,
        ..cfg()
    }
}

#[tokio::test]
async fn a_dedup_id_is_stored_once_within_the_window_and_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let first = {
        let queues = open(dir.path());
        let q = queues.get_or_create("d").unwrap_or_else(|e| panic!("{e}"));
        // Two at once: the second waits for the first and gets its id.
        let (a, b) = tokio::join!(
            q.produce(with_dedup("x", "one", "id-1")),
            q.produce(with_dedup("y", "two", "id-1"))
        );
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("{e}")),
            b.unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(a, b);
        let again = produce(&q, with_dedup("z", "three", "id-1")).await;
        assert_eq!(again, a);
        produce(&q, with_dedup("x", "other", "id-2")).await;
        assert_eq!(q.depth(), 2);
        a
    };
    let queues = open(dir.path());
    let q = queues.get_or_create("d").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(produce(&q, with_dedup("x", "retry", "id-1")).await, first);
    assert_eq!(q.depth(), 2);
    let (s, mut rx) = sink();
    q.join(&group("g"), "c".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let got: BTreeSet<String> = recv_n(&mut rx, 2).await.iter().map(text).collect();
    assert_eq!(got, BTreeSet::from(["one".to_owned(), "other".to_owned()]));
    nothing(&mut rx).await;
    // A window of 0 remembers nothing.
    let short = QueueConfig {
        dedup_window_ms: 0,
        ..cfg()
    };
    let q0 = queues.create("d0", short).unwrap_or_else(|e| panic!("{e}"));
    let a = produce(&q0, with_dedup("", "a", "same")).await;
    let b = produce(&q0, with_dedup("", "b", "same")).await;
    assert_ne!(a, b);
    // Too long an id is refused, not stored.
    let long = "x".repeat(5000);
    assert!(matches!(
        q0.produce(with_dedup("", "c", &long)).await,
        Err(ProduceError::InvalidProperty(_))
    ));
}

#[tokio::test]
async fn a_delayed_message_waits_without_holding_back_later_ones_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    let due = now_ms() + 1_500; // room for two `nothing` checks on a loaded machine
    {
        let queues = open(dir.path());
        let q = queues
            .create("later", one_partition())
            .unwrap_or_else(|e| panic!("{e}"));
        let delayed = NewMessage {
            deliver_at: Some(due),
            ..msg("k1", "delayed")
        };
        produce(&q, delayed).await;
        produce(&q, msg("k2", "now")).await;
        let (s, mut rx) = sink();
        q.join(&g, "c".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let d = recv(&mut rx).await;
        assert_eq!(text(&d), "now");
        ack(&q, "c", &d).await;
        nothing(&mut rx).await;
        assert_eq!(q.info().groups[0].delayed, 1);
        q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
    }
    // Reopened before it is due: still held, then delivered once due.
    let queues = open(dir.path());
    let q = queues.get("later").unwrap_or_else(|| panic!("no queue"));
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    nothing(&mut rx).await;
    while now_ms() < due {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    q.tick(now_ms());
    let d = recv(&mut rx).await;
    assert_eq!((text(&d), d.delivery_count), ("delayed".into(), 1));
    assert!(now_ms() >= due);
    ack(&q, "c", &d).await;
    assert_eq!(q.depth(), 0);
}

#[tokio::test]
async fn a_last_value_queue_delivers_only_the_newest_message_per_key() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let keyed = |key: &str, payload: &str| NewMessage {
        partition_key: Some(Bytes::copy_from_slice(key.as_bytes())),
        ..msg("", payload)
    };
    let config = QueueConfig {
        last_value: true,
        ..cfg()
    };
    {
        let queues = open(dir.path());
        let q = queues
            .create("state", config)
            .unwrap_or_else(|e| panic!("{e}"));
        for (k, v) in [
            ("a", "a1"),
            ("b", "b1"),
            ("a", "a2"),
            ("a", "a3"),
            ("c", "c1"),
        ] {
            produce(&q, keyed(k, v)).await;
        }
        produce(&q, msg("", "no key")).await;
    }
    let queues = open(dir.path());
    let q = queues.get("state").unwrap_or_else(|| panic!("no queue"));
    produce(&q, keyed("b", "b2")).await;
    let (s, mut rx) = sink();
    q.join(&group("g"), "c".into(), 100, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let got: BTreeSet<String> = recv_n(&mut rx, 4).await.iter().map(text).collect();
    let want = ["a3", "b2", "c1", "no key"].map(String::from);
    assert_eq!(got, BTreeSet::from(want));
    nothing(&mut rx).await;
}

#[tokio::test]
async fn ack_and_produce_settles_and_stores_in_one_step_and_recovers_after_a_crash() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    {
        let queues = open(dir.path());
        let input = queues
            .create("in", one_partition())
            .unwrap_or_else(|e| panic!("{e}"));
        let output = queues
            .create("out", one_partition())
            .unwrap_or_else(|e| panic!("{e}"));
        for p in ["a", "b", "c"] {
            produce(&input, msg("", p)).await;
        }
        let (s, mut rx) = sink();
        input
            .join(&g, "w".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let ds = recv_n(&mut rx, 3).await;
        // Not held by this consumer: refused, nothing stored.
        let refused = input
            .ack_and_produce("other", &ds[0].id, &output, msg("", "x"))
            .await;
        assert!(
            matches!(refused, Err(ProduceError::NotHeld(_))),
            "{refused:?}"
        );
        assert_eq!(output.depth(), 0);
        // a: both steps.
        let id = input
            .ack_and_produce("w", &ds[0].id, &output, msg("", "A"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.queue.as_ref(), "out");
        // Settled: a second one for the same delivery is refused.
        let twice = input
            .ack_and_produce("w", &ds[0].id, &output, msg("", "A"))
            .await;
        assert!(matches!(twice, Err(ProduceError::NotHeld(_))));
        // b: the transfer record only, as if the broker died before the target append.
        assert!(
            input
                .transfer_record_only("w", &ds[1].id, &output, msg("", "B"))
                .await
        );
        // c: nothing durable (the worker is killed before it produces).
        assert_eq!(output.depth(), 1);
    }
    let (queues, notes) = Queues::open(dir.path(), cfg(), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(notes.iter().any(|n| n.contains("completed")), "{notes:?}");
    let input = queues.get("in").unwrap_or_else(|| panic!("no in"));
    let output = queues.get("out").unwrap_or_else(|| panic!("no out"));
    // Both happened for a and b; neither for c.
    let (s, mut rx) = sink();
    output
        .join(&g, "r".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let out: Vec<String> = recv_n(&mut rx, 2).await.iter().map(text).collect();
    assert_eq!(out, ["A", "B"]);
    nothing(&mut rx).await;
    let (s, mut rx) = sink();
    input
        .join(&g, "w".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(text(&recv(&mut rx).await), "c");
    nothing(&mut rx).await;
    drop((input, output, queues));
    // A second restart finds the transfer finished: no duplicate of B.
    let (queues, notes) = Queues::open(dir.path(), cfg(), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(!notes.iter().any(|n| n.contains("transfer")), "{notes:?}");
    let output = queues.get("out").unwrap_or_else(|| panic!("no out"));
    assert_eq!(output.info().groups[0].lag, 2);
    assert_eq!(output.depth(), 2);
}

#[tokio::test]
async fn redrive_moves_dead_letters_back_by_id_count_or_all_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let g = group("g");
    let config = QueueConfig {
        partitions: 2,
        ..cfg()
    };
    let (dead_ids, left_texts) = {
        let queues = open(dir.path());
        let q = queues
            .create("jobs", config)
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 0..5 {
            produce(&q, msg(&format!("dev/{i}"), &format!("m{i}"))).await;
        }
        let (s, mut rx) = sink();
        q.join(&g, "c".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        for d in recv_n(&mut rx, 5).await {
            assert!(q.reject("c", Some(&g), &d.id));
        }
        let dlq = q
            .dead_letters()
            .cloned()
            .unwrap_or_else(|| panic!("no dlq"));
        for _ in 0..500 {
            if dlq.depth() == 5 && q.info().groups[0].lag == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dlq.depth(), 5);
        let (s, mut drx) = sink();
        dlq.join(&g, "d".into(), 10, s)
            .unwrap_or_else(|e| panic!("{e}"));
        let dead = recv_n(&mut drx, 5).await;
        let ids: Vec<MessageId> = dead.iter().map(|d| d.id.clone()).collect();
        // By id (one bogus): moved back to the partition it came from.
        let bogus: MessageId = "jobs$dlq:0:99".parse().unwrap_or_else(|e| panic!("{e}"));
        let r = q
            .redrive(Redrive::Ids(vec![ids[3].clone(), bogus.clone()]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.missing, [bogus]);
        assert_eq!(r.moved.len(), 1);
        assert_eq!(r.moved[0].0, ids[3]);
        assert_eq!(
            Some(r.moved[0].1.partition),
            dead[3].dead_letter.map(|o| o.partition)
        );
        let back = recv(&mut rx).await;
        assert_eq!((text(&back), back.delivery_count), (text(&dead[3]), 1));
        ack(&q, "c", &back).await;
        // By count: the oldest two.
        let r = q
            .redrive(Redrive::Count(2))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let moved: Vec<&MessageId> = r.moved.iter().map(|(from, _)| from).collect();
        assert_eq!(moved, [&ids[0], &ids[1]]);
        for d in recv_n(&mut rx, 2).await {
            ack(&q, "c", &d).await;
        }
        // Depth counts from the oldest unsettled (2); the group's lag is what is left.
        assert_eq!(dlq.info().groups[0].lag, 2);
        q.maintain(now_ms()).await.unwrap_or_else(|e| panic!("{e}"));
        let texts = BTreeSet::from([text(&dead[2]), text(&dead[4])]);
        (vec![ids[2].clone(), ids[4].clone()], texts)
    };
    let queues = open(dir.path());
    let q = queues.get("jobs").unwrap_or_else(|| panic!("no queue"));
    let dlq = q
        .dead_letters()
        .cloned()
        .unwrap_or_else(|| panic!("no dlq"));
    assert_eq!(dlq.info().groups[0].lag, 2);
    // A group made now sees only the two left.
    let (s, mut drx) = sink();
    dlq.join(&group("late"), "d2".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let left: Vec<MessageId> = recv_n(&mut drx, 2)
        .await
        .iter()
        .map(|d| d.id.clone())
        .collect();
    assert_eq!(left, dead_ids);
    nothing(&mut drx).await;
    let r = q
        .redrive(Redrive::All)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.moved.len(), 2);
    assert_eq!(dlq.depth(), 0);
    let again = q
        .redrive(Redrive::All)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(again.moved.is_empty());
    let (s, mut rx) = sink();
    q.join(&g, "c".into(), 10, s)
        .unwrap_or_else(|e| panic!("{e}"));
    let got: BTreeSet<String> = recv_n(&mut rx, 2).await.iter().map(text).collect();
    assert_eq!(got, left_texts);
}
