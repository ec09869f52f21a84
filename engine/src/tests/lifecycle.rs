//! A session's life around its connections: session present, wills (with their delay
//! against the session's expiry), and expiry while offline.

use std::time::Duration;

use roost_core::{Packet, QoS, ReasonCode};

use super::util::*;

const SEC: Duration = Duration::from_secs(1);

/// A harness with a client subscribed to `will/#` at QoS 1, which watches for wills.
async fn watched() -> (Harness, Id) {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch")).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    (h, watch)
}

#[tokio::test(start_paused = true)]
async fn session_present_is_set_only_for_a_resumed_session() {
    let mut h = Harness::new().await;
    let (a, ack) = h.connect(v5("a").expiry(60)).await;
    assert!(!ack.session_present);
    h.disconnect(a, ReasonCode::Success, None).await;
    let (a, ack) = h.connect(v5("a").resume().expiry(60)).await;
    assert!(ack.session_present);
    h.disconnect(a, ReasonCode::Success, None).await;
    let (_, ack) = h.connect(v5("a").expiry(60)).await;
    assert!(!ack.session_present, "clean start discards the session");

    let (b, ack) = h.connect(v311("b", false)).await;
    assert!(!ack.session_present);
    h.lose(b).await;
    let (b, ack) = h.connect(v311("b", false)).await;
    assert!(ack.session_present);
    h.lose(b).await;
    let (_, ack) = h.connect(v311("b", true)).await;
    assert!(!ack.session_present);
}

#[tokio::test(start_paused = true)]
async fn a_will_is_published_when_the_connection_is_lost_but_not_after_a_normal_disconnect() {
    let (mut h, watch) = watched().await;
    let (a, _) = h
        .connect(v5("a").will(will("will/a", "a lost", None)))
        .await;
    let (b, _) = h
        .connect(v5("b").will(will("will/b", "b left", None)))
        .await;
    let (c, _) = h
        .connect(v311("c", true).will(will("will/c", "c lost", None)))
        .await;
    h.lose(a).await;
    h.disconnect(b, ReasonCode::Success, None).await;
    h.lose(c).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["a lost", "c lost"]);
}

#[tokio::test(start_paused = true)]
async fn disconnect_with_will_message_0x04_publishes_the_will() {
    let (mut h, watch) = watched().await;
    let (a, _) = h.connect(v5("a").will(will("will/a", "bye", None))).await;
    h.disconnect(a, ReasonCode::DisconnectWithWillMessage, None)
        .await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["bye"]);
}

#[tokio::test(start_paused = true)]
async fn a_will_delay_shorter_than_the_expiry_publishes_the_will_after_the_delay() {
    let (mut h, watch) = watched().await;
    let (a, _) = h
        .connect(v5("a").expiry(60).will(will("will/a", "late", Some(10))))
        .await;
    h.lose(a).await;
    h.sleep(9 * SEC).await;
    assert!(h.take(watch).is_empty(), "not before the delay");
    h.sleep(SEC).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["late"]);
    // The session outlives its will.
    h.sleep(40 * SEC).await;
    let (_, ack) = h.connect(v5("a").resume().expiry(60)).await;
    assert!(ack.session_present);
    assert!(h.take(watch).is_empty(), "the will is published once");
}

#[tokio::test(start_paused = true)]
async fn a_session_expiring_before_the_will_delay_publishes_the_will_at_expiry() {
    let (mut h, watch) = watched().await;
    let (a, _) = h
        .connect(
            v5("a")
                .expiry(30)
                .will(will("will/a", "expired", Some(100))),
        )
        .await;
    h.lose(a).await;
    h.sleep(29 * SEC).await;
    assert!(h.take(watch).is_empty());
    assert!(h.has_session("a"));
    h.sleep(SEC).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["expired"]);
    assert!(!h.has_session("a"));
    h.sleep(100 * SEC).await;
    assert!(h.take(watch).is_empty(), "the will is published once");
}

#[tokio::test(start_paused = true)]
async fn a_will_delay_with_session_expiry_0_is_cut_short_by_the_session_end() {
    let (mut h, watch) = watched().await;
    let (a, _) = h
        .connect(v5("a").will(will("will/a", "now", Some(30))))
        .await;
    h.lose(a).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["now"]);
}

#[tokio::test(start_paused = true)]
async fn reconnecting_before_the_will_delay_cancels_the_will() {
    let (mut h, watch) = watched().await;
    let (a, _) = h
        .connect(v5("a").expiry(60).will(will("will/a", "never", Some(10))))
        .await;
    h.lose(a).await;
    h.sleep(5 * SEC).await;
    let (a, ack) = h.connect(v5("a").resume().expiry(60)).await;
    assert!(ack.session_present);
    h.sleep(120 * SEC).await;
    assert!(h.take(watch).is_empty());
    assert!(h.is_connected(a));
}

#[tokio::test(start_paused = true)]
async fn an_expired_session_is_gone_with_its_queued_messages() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(30)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(sub).await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "queued", QoS::AtLeastOnce, 1))
        .await;
    h.sleep(29 * SEC).await;
    assert!(h.has_session("sub"));
    h.sleep(SEC).await;
    assert!(!h.has_session("sub"));
    assert_eq!(h.broker.subscription_count(), 0, "its subscription is gone");

    let (sub, ack) = h.connect(v5("sub").resume().expiry(30)).await;
    assert!(!ack.session_present);
    assert!(h.take(sub).is_empty(), "the queued message went with it");
    h.send(publ, publish("t", "later", QoS::AtLeastOnce, 2))
        .await;
    assert!(h.take(sub).is_empty(), "not subscribed any more");
}

#[tokio::test(start_paused = true)]
async fn an_offline_session_keeps_qos1_messages_but_not_qos0() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(300)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(sub).await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "q0", QoS::AtMostOnce, 0)).await;
    h.send(publ, publish("t", "q1", QoS::AtLeastOnce, 1)).await;
    h.send(publ, publish("t", "q2", QoS::ExactlyOnce, 2)).await;
    h.sleep(100 * SEC).await;
    let (sub, ack) = h.connect(v5("sub").resume().expiry(300)).await;
    assert!(ack.session_present);
    let got = h.take_publishes(sub);
    assert_eq!(payloads(&got), ["q1", "q2"]);
    assert_eq!(
        got[1].qos,
        QoS::AtLeastOnce,
        "capped at the subscription's QoS"
    );
}

#[tokio::test(start_paused = true)]
async fn a_v311_persistent_session_never_expires() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v311("sub", false)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(sub).await;
    h.sleep(Duration::from_secs(365 * 24 * 3600)).await;
    let (publ, _) = h.connect(v311("pub", true)).await;
    h.send(publ, publish("t", "a year later", QoS::AtLeastOnce, 1))
        .await;
    let (sub, ack) = h.connect(v311("sub", false)).await;
    assert!(ack.session_present);
    assert_eq!(payloads(&h.take_publishes(sub)), ["a year later"]);
}

#[tokio::test(start_paused = true)]
async fn disconnect_can_end_the_session_at_once_with_expiry_0() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(3600)).await;
    h.send(a, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.disconnect(a, ReasonCode::Success, Some(0)).await;
    assert!(!h.has_session("a"));
    assert_eq!(h.broker.subscription_count(), 0);
    let (_, ack) = h.connect(v5("a").resume().expiry(3600)).await;
    assert!(!ack.session_present);
}

#[tokio::test(start_paused = true)]
async fn disconnect_may_not_raise_an_expiry_of_0_to_keep_the_session() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a")).await;
    h.send(a, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(a);
    h.disconnect(a, ReasonCode::Success, Some(60)).await;
    let Some(Packet::Disconnect(d)) = h.take(a).pop() else {
        panic!("the server answers with DISCONNECT");
    };
    assert_eq!(d.reason, ReasonCode::ProtocolError);
    assert!(!h.has_session("a"));
}

#[tokio::test(start_paused = true)]
async fn disconnect_can_extend_the_session_expiry() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(10)).await;
    h.disconnect(a, ReasonCode::Success, Some(100)).await;
    h.sleep(99 * SEC).await;
    assert!(h.has_session("a"));
    h.sleep(SEC).await;
    assert!(!h.has_session("a"));
}

#[tokio::test(start_paused = true)]
async fn the_expiry_of_an_earlier_disconnection_does_not_end_a_session_resumed_since() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v5("a").expiry(10)).await;
    h.lose(a).await;
    h.sleep(5 * SEC).await;
    let (a, _) = h.connect(v5("a").resume().expiry(10)).await;
    h.sleep(3 * SEC).await;
    h.lose(a).await;
    // The first expiry (10 s after the first loss) has passed; the second has not.
    h.sleep(9 * SEC).await;
    assert!(h.has_session("a"));
    h.sleep(SEC).await;
    assert!(!h.has_session("a"));
}

#[tokio::test(start_paused = true)]
async fn a_message_that_expires_while_queued_offline_is_not_delivered() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(300)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(sub).await;
    let (publ, _) = h.connect(v5("pub")).await;
    let Packet::Publish(mut short) = publish("t", "short", QoS::AtLeastOnce, 1) else {
        unreachable!()
    };
    short.properties.message_expiry_interval = Some(10);
    let Packet::Publish(mut long) = publish("t", "long", QoS::AtLeastOnce, 2) else {
        unreachable!()
    };
    long.properties.message_expiry_interval = Some(100);
    h.send(publ, Packet::Publish(short)).await;
    h.send(publ, Packet::Publish(long)).await;
    h.sleep(30 * SEC).await;
    let (sub, _) = h.connect(v5("sub").resume().expiry(300)).await;
    let got = h.take_publishes(sub);
    assert_eq!(payloads(&got), ["long"]);
    assert_eq!(
        got[0].properties.message_expiry_interval,
        Some(70),
        "the time it waited is taken off"
    );
}

#[tokio::test(start_paused = true)]
async fn an_offline_session_queues_at_most_max_queued_messages_and_drops_the_newest() {
    let mut h = Harness::with(crate::settings::Settings {
        max_queued_messages: 2,
        ..Default::default()
    })
    .await;
    let (sub, _) = h.connect(v5("sub").expiry(300)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(sub).await;
    let (publ, _) = h.connect(v5("pub")).await;
    for (i, m) in ["1", "2", "3", "4"].into_iter().enumerate() {
        h.send(publ, publish("t", m, QoS::AtLeastOnce, i as u16 + 1))
            .await;
    }
    let (sub, _) = h.connect(v5("sub").resume().expiry(300)).await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["1", "2"]);
}

#[tokio::test(start_paused = true)]
async fn messages_routed_to_a_connection_as_it_closes_stay_with_its_session() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(300)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(sub);
    h.hold(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "in the mailbox", QoS::AtLeastOnce, 1))
        .await;
    h.lose(sub).await;
    assert!(h.take(sub).is_empty());
    let (sub, _) = h.connect(v5("sub").resume().expiry(300)).await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["in the mailbox"]);
}

#[tokio::test(start_paused = true)]
async fn a_short_expiry_scheduled_behind_a_long_one_ends_on_time() {
    let mut h = Harness::new().await;
    let (long, _) = h.connect(v5("long").expiry(1000)).await;
    let (short, _) = h.connect(v5("short").expiry(10)).await;
    h.lose(long).await;
    h.sleep(SEC).await;
    h.lose(short).await;
    h.sleep(10 * SEC).await;
    assert!(!h.has_session("short"));
    assert!(h.has_session("long"));
}

#[tokio::test(start_paused = true)]
async fn disconnect_0x04_with_an_expiry_shorter_than_the_will_delay_publishes_at_that_expiry() {
    let (mut h, watch) = watched().await;
    let (a, _) = h
        .connect(v5("a").expiry(600).will(will("will/a", "w", Some(60))))
        .await;
    h.disconnect(a, ReasonCode::DisconnectWithWillMessage, Some(5))
        .await;
    h.sleep(4 * SEC).await;
    assert!(h.take(watch).is_empty());
    h.sleep(SEC).await;
    assert_eq!(payloads(&h.take_publishes(watch)), ["w"]);
    assert!(!h.has_session("a"));
}
