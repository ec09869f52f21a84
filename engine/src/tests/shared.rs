//! Shared subscriptions (`$share/<group>/<filter>`): one member gets each message, and
//! what a leaving member had unacknowledged goes to another.

use roost_core::{Packet, QoS, SubscriptionOptions};

use super::util::*;

/// Two members of `$share/g/jobs/#` at QoS 1, and a publisher.
async fn group() -> (Harness, [Id; 2], Id) {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a")).await;
    let (b, _) = h.connect(v5("b")).await;
    for m in [a, b] {
        h.send(m, subscribe(1, "$share/g/jobs/#", QoS::AtLeastOnce))
            .await;
        h.take(m);
    }
    let (publ, _) = h.connect(v5("pub")).await;
    (h, [a, b], publ)
}

#[tokio::test(start_paused = true)]
async fn each_message_goes_to_one_member_of_the_group() {
    let (mut h, [a, b], publ) = group().await;
    for (i, payload) in ["1", "2", "3", "4"].into_iter().enumerate() {
        h.send(
            publ,
            publish("jobs/x", payload, QoS::AtLeastOnce, i as u16 + 1),
        )
        .await;
    }
    let to_a = h.take_publishes(a);
    let to_b = h.take_publishes(b);
    let mut all: Vec<&str> = payloads(&to_a).into_iter().chain(payloads(&to_b)).collect();
    all.sort_unstable();
    assert_eq!(all, ["1", "2", "3", "4"], "each exactly once");
    assert!(
        !to_a.is_empty() && !to_b.is_empty(),
        "both members get work"
    );
}

#[tokio::test(start_paused = true)]
async fn a_qos1_message_in_flight_to_a_leaving_member_goes_to_another_member() {
    let (mut h, [a, b], publ) = group().await;
    h.send(publ, publish("jobs/x", "job", QoS::AtLeastOnce, 1))
        .await;
    let (holder, other) = if h.inbox(a).is_empty() {
        (b, a)
    } else {
        (a, b)
    };
    h.take(holder);
    h.lose(holder).await;
    let got = h.take_publishes(other);
    assert_eq!(payloads(&got), ["job"]);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    // Acknowledged there, it is done.
    h.send(other, puback(got[0].packet_id)).await;
    assert!(h.take(other).is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_acknowledged_shared_message_is_not_redelivered_when_its_member_leaves() {
    let (mut h, [a, b], publ) = group().await;
    h.send(publ, publish("jobs/x", "job", QoS::AtLeastOnce, 1))
        .await;
    let (holder, other) = if h.inbox(a).is_empty() {
        (b, a)
    } else {
        (a, b)
    };
    let got = h.take_publishes(holder);
    h.send(holder, puback(got[0].packet_id)).await;
    h.lose(holder).await;
    assert!(h.take(other).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_last_member_leaving_keeps_its_message_in_its_persistent_session() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(60)).await;
    h.send(a, subscribe(1, "$share/g/jobs", QoS::AtLeastOnce))
        .await;
    h.take(a);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("jobs", "job", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(payloads(&h.take_publishes(a)), ["job"]);
    h.lose(a).await;
    let (a, ack) = h.connect(v5("a").resume().expiry(60)).await;
    assert!(ack.session_present);
    assert_eq!(payloads(&h.take_publishes(a)), ["job"]);
}

#[tokio::test(start_paused = true)]
async fn a_shared_subscription_gets_no_retained_messages() {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, retain("jobs", "old", QoS::AtLeastOnce, 1))
        .await;
    let (a, _) = h.connect(v5("a")).await;
    h.send(
        a,
        subscribe_with(
            1,
            "$share/g/jobs",
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        ),
    )
    .await;
    assert!(matches!(h.take(a)[..], [Packet::SubAck(_)]));
}

#[tokio::test(start_paused = true)]
async fn a_group_sends_to_its_online_members_while_another_is_offline() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(600)).await;
    let (b, _) = h.connect(v5("b")).await;
    for m in [a, b] {
        h.send(m, subscribe(1, "$share/g/jobs", QoS::AtLeastOnce))
            .await;
        h.take(m);
    }
    h.lose(a).await;
    let (publ, _) = h.connect(v5("pub")).await;
    for (i, m) in ["1", "2", "3"].into_iter().enumerate() {
        h.send(publ, publish("jobs", m, QoS::AtLeastOnce, i as u16 + 1))
            .await;
    }
    assert_eq!(payloads(&h.take_publishes(b)), ["1", "2", "3"]);
    let (a, ack) = h.connect(v5("a").resume().expiry(600)).await;
    assert!(ack.session_present);
    assert!(
        h.take(a).is_empty(),
        "nothing was queued for the offline member"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shared_message_queued_for_a_member_whose_session_expires_goes_to_another() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(10)).await;
    h.send(a, subscribe(1, "$share/g/jobs", QoS::AtLeastOnce))
        .await;
    h.lose(a).await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("jobs", "job", QoS::AtLeastOnce, 1))
        .await;
    // Queued for the only member, offline; then another member joins.
    let (b, _) = h.connect(v5("b")).await;
    h.send(b, subscribe(1, "$share/g/jobs", QoS::AtLeastOnce))
        .await;
    h.take(b);
    h.sleep(std::time::Duration::from_secs(10)).await;
    assert!(!h.has_session("a"));
    assert_eq!(payloads(&h.take_publishes(b)), ["job"]);
}
