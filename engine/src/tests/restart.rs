//! A broker that stops and starts again: stored sessions come back with their
//! subscriptions, queues and in-flight messages, and the time spent down counts
//! against session expiry and will delay.

use std::time::Duration;

use roost_core::{Packet, QoS};

use super::util::*;

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_persistent_session_comes_back_with_its_subscription_and_in_flight_messages() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(600)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "acked", QoS::AtLeastOnce, 1))
        .await;
    h.send(publ, publish("t", "in flight", QoS::AtLeastOnce, 2))
        .await;
    let sent = h.take_publishes(sub);
    h.send(sub, puback(sent[0].packet_id)).await;

    h.restart(SEC).await;
    let (sub, ack) = h.connect(v5("sub").resume().expiry(600)).await;
    assert!(ack.session_present);
    let resent = h.take_publishes(sub);
    assert_eq!(payloads(&resent), ["in flight"]);
    assert!(resent[0].dup);
    assert_eq!(resent[0].packet_id, sent[1].packet_id);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "after", QoS::AtLeastOnce, 3))
        .await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["after"]);
}

#[tokio::test(start_paused = true)]
async fn time_spent_down_counts_against_session_expiry() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(30)).await;
    h.lose(a).await;
    h.restart(20 * SEC).await;
    assert!(h.has_session("a"));
    h.sleep(9 * SEC).await;
    assert!(h.has_session("a"));
    h.sleep(SEC).await;
    assert!(!h.has_session("a"));
}

#[tokio::test(start_paused = true)]
async fn a_session_that_expired_while_the_broker_was_down_is_gone() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(30)).await;
    h.send(a, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(a).await;
    h.restart(60 * SEC).await;
    assert!(!h.has_session("a"));
    assert_eq!(h.broker.subscription_count(), 0);
    let (_, ack) = h.connect(v5("a").resume().expiry(30)).await;
    assert!(!ack.session_present);
}

#[tokio::test(start_paused = true)]
async fn a_will_delay_goes_on_across_a_restart() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch").expiry(600)).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    let (a, _) = h
        .connect(v5("a").expiry(600).will(will("will/a", "late", Some(30))))
        .await;
    h.lose(a).await;
    h.restart(20 * SEC).await;
    let (watch, _) = h.connect(v5("watch").resume().expiry(600)).await;
    h.sleep(9 * SEC).await;
    assert!(h.take(watch).is_empty());
    h.sleep(SEC).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["late"]);
}

#[tokio::test(start_paused = true)]
async fn a_client_connected_when_the_broker_stopped_has_its_will_published_on_restart() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch").expiry(600)).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    h.connect(v5("a").expiry(600).will(will("will/a", "crashed", None)))
        .await;
    h.restart(SEC).await;
    let (watch, _) = h.connect(v5("watch").resume().expiry(600)).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["crashed"]);
    let (_, ack) = h.connect(v5("a").resume().expiry(600)).await;
    assert!(ack.session_present);
}

#[tokio::test(start_paused = true)]
async fn a_qos2_publish_released_after_a_restart_is_delivered_once() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(600)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v311("pub", false)).await;
    h.send(publ, publish("t", "once", QoS::ExactlyOnce, 9))
        .await;
    assert_eq!(h.take(publ), [pubrec(9)]);
    let first = h.take_publishes(sub);
    h.send(sub, puback(first[0].packet_id)).await;

    h.restart(SEC).await;
    let (sub, _) = h.connect(v5("sub").resume().expiry(600)).await;
    let (publ, _) = h.connect(v311("pub", false)).await;
    let Packet::Publish(p) = publish("t", "once", QoS::ExactlyOnce, 9) else {
        unreachable!()
    };
    h.send(
        publ,
        Packet::Publish(roost_core::Publish { dup: true, ..p }),
    )
    .await;
    assert_eq!(h.take(publ), [pubrec(9)]);
    h.send(publ, pubrel(9)).await;
    assert_eq!(h.take(publ), [pubcomp(9)]);
    assert!(
        h.take(sub).is_empty(),
        "delivered before the restart, not again"
    );
}

#[tokio::test(start_paused = true)]
async fn retained_messages_come_back_after_a_restart() {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, retain("a", "kept", QoS::AtLeastOnce, 1)).await;
    h.send(publ, retain("b", "x", QoS::AtLeastOnce, 2)).await;
    h.send(publ, retain("b", "", QoS::AtLeastOnce, 3)).await;
    h.restart(SEC).await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "#", QoS::AtLeastOnce)).await;
    let out = h.take(sub);
    assert!(matches!(out[0], Packet::SubAck(_)));
    let Packet::Publish(p) = &out[1] else {
        panic!("the retained message: {out:?}");
    };
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("a", &b"kept"[..]));
    assert_eq!(out.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_session_resumed_with_expiry_0_does_not_come_back_after_a_restart() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(600)).await;
    h.send(a, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(a).await;
    // Back, now with a session that ends with the connection.
    let (_a, ack) = h.connect(v5("a").resume()).await;
    assert!(ack.session_present);
    h.restart(SEC).await;
    assert!(
        !h.has_session("a"),
        "the connection it ended with is gone, so is the session"
    );
    let (_, ack) = h.connect(v5("a").resume()).await;
    assert!(!ack.session_present);
}

#[tokio::test(start_paused = true)]
async fn a_will_cancelled_by_a_reconnection_is_not_published_after_a_restart() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch").expiry(600)).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    let (a, _) = h
        .connect(v5("a").expiry(600).will(will("will/a", "stale", Some(60))))
        .await;
    h.lose(a).await;
    // Reconnecting before the delay cancels that will; this connection has none.
    h.connect(v5("a").resume()).await;
    h.restart(SEC).await;
    let (watch, _) = h.connect(v5("watch").resume().expiry(600)).await;
    h.sleep(120 * SEC).await;
    assert!(h.take(watch).is_empty(), "the cancelled will came back");
}
