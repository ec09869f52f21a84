//! `$queue/` through the engine: produce acknowledged once stored, deliveries with the
//! queue's user properties, settled by PUBACK, refused (v5 >= 0x80) and redelivered.

use roost_core::{Packet, QoS, ReasonCode};

use super::util::*;

/// A v5 consumer of `$share/g/$queue/jobs` and a v5 producer.
async fn queue() -> (Harness, Id, Id) {
    let mut h = Harness::new().await;
    let (consumer, _) = h.connect(v5("worker")).await;
    h.send(
        consumer,
        subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce),
    )
    .await;
    let [Packet::SubAck(ack)] = &h.take(consumer)[..] else {
        panic!("SUBACK");
    };
    assert_eq!(ack.reasons, [ReasonCode::granted(QoS::AtLeastOnce)]);
    let (producer, _) = h.connect(v5("producer")).await;
    (h, consumer, producer)
}

/// The consumer group's (lag, in flight, waiting for redelivery).
fn group_state(h: &Harness) -> (u64, u64, u64) {
    let q = h.broker.queues.get("jobs").expect("queue jobs");
    let info = q.info();
    let g = &info.groups[0];
    (g.lag, g.in_flight, g.waiting)
}

#[tokio::test(start_paused = true)]
async fn a_queue_message_is_acknowledged_once_stored_delivered_with_its_properties_and_settled() {
    let (mut h, consumer, producer) = queue().await;
    h.send(
        producer,
        publish("$queue/jobs", "work", QoS::AtLeastOnce, 5),
    )
    .await;
    assert_eq!(h.take(producer), [puback(5)]);
    assert_eq!(h.broker.queues.get("jobs").expect("queue").depth(), 1);

    let got = h.take_publishes(consumer);
    assert_eq!(payloads(&got), ["work"]);
    let m = &got[0];
    assert_eq!(m.topic, "$queue/jobs");
    assert_eq!(m.qos, QoS::AtLeastOnce);
    assert_eq!(user_property(m, "queue"), Some("jobs"));
    assert_eq!(user_property(m, "delivery-count"), Some("1"));
    assert_eq!(user_property(m, "topic"), Some("$queue/jobs"));
    assert!(user_property(m, "message-id").is_some_and(|id| id.starts_with("jobs:")));
    assert_eq!(group_state(&h), (1, 1, 0));

    h.send(consumer, puback(m.packet_id)).await;
    assert_eq!(group_state(&h), (0, 0, 0), "settled");
    h.tick_queues(60_000).await;
    assert!(
        h.take(consumer).is_empty(),
        "a settled message is not redelivered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_v5_puback_over_0x80_nacks_and_the_message_comes_again_with_delivery_count_2() {
    let (mut h, consumer, producer) = queue().await;
    h.send(
        producer,
        publish("$queue/jobs", "work", QoS::AtLeastOnce, 1),
    )
    .await;
    let first = h.take_publishes(consumer);
    let id = user_property(&first[0], "message-id").map(str::to_owned);
    h.send(
        consumer,
        puback_with(first[0].packet_id, ReasonCode::UnspecifiedError),
    )
    .await;
    assert!(h.take(consumer).is_empty(), "not at once: it backs off");
    assert_eq!(group_state(&h), (1, 0, 1));

    h.tick_queues(2_000).await;
    let again = h.take_publishes(consumer);
    assert_eq!(payloads(&again), ["work"]);
    assert_eq!(user_property(&again[0], "delivery-count"), Some("2"));
    assert_eq!(
        user_property(&again[0], "message-id").map(str::to_owned),
        id
    );
    h.send(consumer, puback(again[0].packet_id)).await;
    assert_eq!(group_state(&h), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_queue_message_held_by_a_consumer_that_leaves_goes_to_another() {
    let (mut h, first, producer) = queue().await;
    h.send(
        producer,
        publish("$queue/jobs", "work", QoS::AtLeastOnce, 1),
    )
    .await;
    assert_eq!(payloads(&h.take_publishes(first)), ["work"]);
    let (second, _) = h.connect(v5("worker-2")).await;
    h.send(
        second,
        subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce),
    )
    .await;
    h.take(second);
    h.lose(first).await;
    let got = h.take_publishes(second);
    assert_eq!(payloads(&got), ["work"]);
    assert_eq!(user_property(&got[0], "delivery-count"), Some("2"));
}

#[tokio::test(start_paused = true)]
async fn a_v311_consumer_settles_queue_messages_with_puback() {
    let mut h = Harness::new().await;
    let (consumer, _) = h.connect(v311("worker", true)).await;
    h.send(
        consumer,
        subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce),
    )
    .await;
    h.take(consumer);
    let (producer, _) = h.connect(v311("producer", true)).await;
    h.send(producer, publish("$queue/jobs", "a", QoS::AtLeastOnce, 1))
        .await;
    h.send(producer, publish("$queue/jobs", "b", QoS::AtLeastOnce, 2))
        .await;
    assert_eq!(h.take(producer), [puback(1), puback(2)]);
    let got = h.take_publishes(consumer);
    let mut got_payloads = payloads(&got);
    got_payloads.sort_unstable();
    assert_eq!(got_payloads, ["a", "b"]);
    for p in &got {
        h.send(consumer, puback(p.packet_id)).await;
    }
    assert_eq!(group_state(&h), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_consumer_with_receive_maximum_1_gets_one_queue_message_at_a_time() {
    let mut h = Harness::new().await;
    let (consumer, _) = h.connect(v5("worker").receive_maximum(1)).await;
    h.send(
        consumer,
        subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce),
    )
    .await;
    h.take(consumer);
    let (producer, _) = h.connect(v5("producer")).await;
    let mut seen = Vec::new();
    for (i, m) in ["a", "b", "c"].into_iter().enumerate() {
        h.send(
            producer,
            publish("$queue/jobs", m, QoS::AtLeastOnce, i as u16 + 1),
        )
        .await;
    }
    for _ in 0..3 {
        let got = h.take_publishes(consumer);
        assert_eq!(got.len(), 1, "one in flight at a time: {got:?}");
        seen.push(
            std::str::from_utf8(&got[0].payload)
                .expect("utf8")
                .to_owned(),
        );
        h.send(consumer, puback(got[0].packet_id)).await;
    }
    seen.sort_unstable();
    assert_eq!(seen, ["a", "b", "c"]);
    assert_eq!(group_state(&h), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_v5_consumer_without_receive_maximum_gets_the_adaptive_window_not_65535() {
    // Receive Maximum left at its default (65,535): the consumer said nothing about
    // what it can work through, so it is measured like a 3.x consumer, and what it
    // does not hold stays in the queue for the group.
    let (mut h, consumer, producer) = queue().await;
    for i in 0..100u16 {
        h.send(
            producer,
            publish("$queue/jobs", "work", QoS::AtLeastOnce, i + 1),
        )
        .await;
    }
    h.take(producer);
    let got = h.take_publishes(consumer);
    assert_eq!(got.len(), 32, "the adaptive window's start, not all 100");
    let info = h.broker.queues.get("jobs").expect("queue").info();
    assert_eq!(info.groups[0].windows, [32]);
    assert_eq!(group_state(&h), (100, 32, 0));
}

#[tokio::test(start_paused = true)]
async fn a_qos2_produce_resent_before_pubrel_is_stored_once() {
    let (mut h, consumer, producer) = queue().await;
    let Packet::Publish(p) = publish("$queue/jobs", "work", QoS::ExactlyOnce, 4) else {
        unreachable!()
    };
    h.send(producer, Packet::Publish(p.clone())).await;
    assert_eq!(h.take(producer), [pubrec(4)]);
    h.send(
        producer,
        Packet::Publish(roost_core::Publish { dup: true, ..p }),
    )
    .await;
    assert_eq!(h.take(producer), [pubrec(4)]);
    h.send(producer, pubrel(4)).await;
    assert_eq!(h.take(producer), [pubcomp(4)]);
    assert_eq!(h.broker.queues.get("jobs").expect("queue").depth(), 1);
    assert_eq!(payloads(&h.take_publishes(consumer)), ["work"]);
}

#[tokio::test(start_paused = true)]
async fn a_qos2_queue_delivery_is_settled_by_pubcomp() {
    let mut h = Harness::new().await;
    let (consumer, _) = h.connect(v5("worker")).await;
    h.send(
        consumer,
        subscribe(1, "$share/g/$queue/jobs", QoS::ExactlyOnce),
    )
    .await;
    h.take(consumer);
    let (producer, _) = h.connect(v5("producer")).await;
    h.send(
        producer,
        publish("$queue/jobs", "work", QoS::AtLeastOnce, 1),
    )
    .await;
    let got = h.take_publishes(consumer);
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    h.send(consumer, pubrec(got[0].packet_id)).await;
    assert_eq!(h.take(consumer), [pubrel(got[0].packet_id)]);
    assert_eq!(group_state(&h), (1, 1, 0), "not settled by PUBREC");
    h.send(consumer, pubcomp(got[0].packet_id)).await;
    assert_eq!(group_state(&h), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_persistent_consumer_gets_what_was_produced_while_it_was_away() {
    let mut h = Harness::new().await;
    let (consumer, _) = h.connect(v311("worker", false)).await;
    h.send(
        consumer,
        subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce),
    )
    .await;
    h.take(consumer);
    let (producer, _) = h.connect(v5("producer")).await;
    h.send(
        producer,
        publish("$queue/jobs", "held", QoS::AtLeastOnce, 1),
    )
    .await;
    assert_eq!(payloads(&h.take_publishes(consumer)), ["held"]);
    h.lose(consumer).await;
    h.send(producer, publish("$queue/jobs", "new", QoS::AtLeastOnce, 2))
        .await;
    assert_eq!(h.take(producer), [puback(1), puback(2)]);

    let (consumer, ack) = h.connect(v311("worker", false)).await;
    assert!(ack.session_present);
    let got = h.take_publishes(consumer);
    let mut got_payloads = payloads(&got);
    got_payloads.sort_unstable();
    assert_eq!(
        got_payloads,
        ["held", "new"],
        "the unsettled one comes again"
    );
    for p in &got {
        h.send(consumer, puback(p.packet_id)).await;
    }
    assert_eq!(group_state(&h), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn after_unsubscribe_a_consumer_gets_no_more_queue_messages() {
    let (mut h, consumer, producer) = queue().await;
    h.send(
        consumer,
        Packet::Unsubscribe(roost_core::Unsubscribe {
            packet_id: 2,
            filters: vec!["$share/g/$queue/jobs".into()],
            ..Default::default()
        }),
    )
    .await;
    let [Packet::UnsubAck(ack)] = &h.take(consumer)[..] else {
        panic!("UNSUBACK");
    };
    assert_eq!(ack.reasons, [ReasonCode::Success]);
    h.send(
        producer,
        publish("$queue/jobs", "work", QoS::AtLeastOnce, 1),
    )
    .await;
    assert_eq!(h.take(producer), [puback(1)], "stored all the same");
    assert!(h.take(consumer).is_empty());
}

/// A queue `jobs` that holds one unsettled message at most.
fn create_small_queue(h: &Harness) {
    h.broker
        .queues
        .create(
            "jobs",
            roost_queue::QueueConfig {
                max_depth: 1,
                ..Default::default()
            },
        )
        .expect("queue created");
}

#[tokio::test(start_paused = true)]
async fn a_v5_produce_to_a_full_queue_is_refused_0x97() {
    let mut h = Harness::new().await;
    create_small_queue(&h);
    let (producer, _) = h.connect(v5("producer")).await;
    h.send(producer, publish("$queue/jobs", "a", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(h.take(producer), [puback(1)]);
    h.send(producer, publish("$queue/jobs", "b", QoS::AtLeastOnce, 2))
        .await;
    let [Packet::PubAck(ack)] = &h.take(producer)[..] else {
        panic!("PUBACK");
    };
    assert_eq!((ack.packet_id, ack.reason), (2, ReasonCode::QuotaExceeded));
}

#[tokio::test(start_paused = true)]
async fn a_v311_producer_to_a_full_queue_waits_for_room_instead() {
    let mut h = Harness::new().await;
    create_small_queue(&h);
    let (consumer, _) = h.connect(v5("worker")).await;
    h.send(
        consumer,
        subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce),
    )
    .await;
    h.take(consumer);
    let (producer, _) = h.connect(v311("producer", true)).await;
    h.send(producer, publish("$queue/jobs", "a", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(h.take(producer), [puback(1)]);
    let a = h.take_publishes(consumer);
    h.send(producer, publish("$queue/jobs", "b", QoS::AtLeastOnce, 2))
        .await;
    assert!(
        h.take(producer).is_empty(),
        "no PUBACK while the queue is full"
    );
    // Settling a makes room: b is stored, acknowledged and delivered.
    h.send(consumer, puback(a[0].packet_id)).await;
    assert_eq!(h.take(producer), [puback(2)]);
    assert_eq!(payloads(&h.take_publishes(consumer)), ["b"]);
}

/// A v5 `consumer-group` property is not in the filter: the session keeps it with the
/// subscription, so the consumer comes back in its group (it came back in `default`,
/// got again what `billing` had settled, and left `billing` without members, holding
/// the queue's depth).
#[tokio::test(start_paused = true)]
async fn a_resumed_consumer_group_subscription_stays_in_its_group() {
    let mut h = Harness::new().await;
    let (consumer, _) = h.connect(v5("worker").expiry(600)).await;
    let Packet::Subscribe(mut s) = subscribe(1, "$queue/jobs", QoS::AtLeastOnce) else {
        unreachable!()
    };
    s.properties
        .user_properties
        .push(("consumer-group".into(), "billing".into()));
    h.send(consumer, Packet::Subscribe(s)).await;
    h.take(consumer);
    let (producer, _) = h.connect(v5("producer")).await;
    h.send(producer, publish("$queue/jobs", "one", QoS::AtLeastOnce, 1))
        .await;
    let got = h.take_publishes(consumer);
    h.send(consumer, puback(got[0].packet_id)).await;
    h.lose(consumer).await;

    let (consumer, _) = h.connect(v5("worker").resume().expiry(600)).await;
    h.send(producer, publish("$queue/jobs", "two", QoS::AtLeastOnce, 2))
        .await;
    assert_eq!(
        payloads(&h.take_publishes(consumer)),
        ["two"],
        "one was settled by billing"
    );
    let info = h.broker.queues.get("jobs").expect("queue").info();
    let groups: Vec<(&str, u64)> = info.groups.iter().map(|g| (&*g.key.group, g.lag)).collect();
    assert_eq!(groups, [("billing", 1)]);
}

/// A queue log whose fdatasync fails (injected into the queues' real storage): a v5
/// producer gets PUBACK 0x80; a 3.1.1 producer, which a PUBACK could only tell
/// "stored", is disconnected instead; what was stored before is still delivered.
#[tokio::test(start_paused = true)]
async fn a_produce_to_a_failed_log_is_refused_0x80_and_a_3_1_1_producer_disconnected() {
    let (mut h, consumer, producer) = queue().await;
    h.send(
        producer,
        publish("$queue/jobs", "kept", QoS::AtLeastOnce, 1),
    )
    .await;
    assert_eq!(h.take(producer), [puback(1)]);
    assert_eq!(payloads(&h.take_publishes(consumer)), ["kept"]);
    assert!(
        h.broker
            .queues
            .storage()
            .inject_sync_failure(|log| roost_queue::is_partition_log_of(log, "jobs"))
    );
    h.send(
        producer,
        publish("$queue/jobs", "lost", QoS::AtLeastOnce, 2),
    )
    .await;
    match &h.take(producer)[..] {
        [Packet::PubAck(a)] => assert_eq!(a.reason, ReasonCode::UnspecifiedError),
        other => panic!("PUBACK 0x80 expected: {other:?}"),
    }
    let (old, _) = h.connect(v311("old", true)).await;
    h.send(old, publish("$queue/jobs", "lost too", QoS::AtLeastOnce, 1))
        .await;
    assert!(h.take(old).is_empty(), "no PUBACK for what was not stored");
    assert!(!h.is_connected(old));
    assert_eq!(
        h.closed_for(old),
        Some(crate::metrics::DisconnectReason::StorageFailure)
    );
    assert!(h.take_publishes(consumer).is_empty());
}
