//! Retained messages: matched by wildcards on subscribe, sent as the subscription's
//! retain handling says, cleared by an empty retained publish.

use roost_core::{Packet, Publish, QoS, RetainHandling, SubscriptionOptions};

use super::util::*;

/// A harness whose publisher has retained `a/b`, `a/c/d` and `b/x`.
async fn with_retained() -> (Harness, Id) {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, retain("a/b", "ab", QoS::AtLeastOnce, 1)).await;
    h.send(publ, retain("a/c/d", "acd", QoS::AtLeastOnce, 2))
        .await;
    h.send(publ, retain("b/x", "bx", QoS::AtMostOnce, 0)).await;
    h.take(publ);
    (h, publ)
}

fn options(retain_handling: RetainHandling) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_handling,
        ..Default::default()
    }
}

/// The SUBACK, then the retained messages sent with it, sorted by topic.
fn after_suback(packets: Vec<Packet>) -> Vec<Publish> {
    let mut packets = packets.into_iter();
    assert!(
        matches!(packets.next(), Some(Packet::SubAck(_))),
        "SUBACK first"
    );
    let mut publishes: Vec<Publish> = packets
        .map(|p| match p {
            Packet::Publish(p) => p,
            other => panic!("only retained messages after the SUBACK, got {other:?}"),
        })
        .collect();
    publishes.sort_by(|a, b| a.topic.cmp(&b.topic));
    publishes
}

#[tokio::test(start_paused = true)]
async fn retained_messages_are_matched_by_wildcard_filters() {
    let (mut h, _) = with_retained().await;
    let (sub, _) = h.connect(v5("sub")).await;
    let cases: [(&str, &[&str]); 5] = [
        ("a/#", &["ab", "acd"]),
        ("a/+", &["ab"]),
        ("+/x", &["bx"]),
        ("#", &["ab", "acd", "bx"]),
        ("a/+/d", &["acd"]),
    ];
    for (i, (filter, expected)) in cases.into_iter().enumerate() {
        h.send(sub, subscribe(i as u16 + 1, filter, QoS::AtLeastOnce))
            .await;
        let got = after_suback(h.take(sub));
        assert_eq!(payloads(&got), expected, "filter {filter}");
        assert!(got.iter().all(|p| p.retain), "sent with RETAIN set");
    }
}

#[tokio::test(start_paused = true)]
async fn retain_handling_0_sends_retained_messages_on_every_subscribe() {
    let (mut h, _) = with_retained().await;
    let (sub, _) = h.connect(v5("sub")).await;
    for id in 1..=2 {
        h.send(
            sub,
            subscribe_with(id, "a/b", options(RetainHandling::SendAtSubscribe)),
        )
        .await;
        assert_eq!(payloads(&after_suback(h.take(sub))), ["ab"]);
    }
}

#[tokio::test(start_paused = true)]
async fn retain_handling_1_sends_retained_messages_only_for_a_new_subscription() {
    let (mut h, _) = with_retained().await;
    let (sub, _) = h.connect(v5("sub").expiry(60)).await;
    let sub_1 = || subscribe_with(1, "a/#", options(RetainHandling::SendIfNew));
    h.send(sub, sub_1()).await;
    let retained = after_suback(h.take(sub));
    assert_eq!(payloads(&retained), ["ab", "acd"]);
    for p in &retained {
        h.send(sub, puback(p.packet_id)).await;
    }
    h.send(sub, sub_1()).await;
    assert!(after_suback(h.take(sub)).is_empty(), "it existed already");
    // It still exists in the resumed session.
    h.lose(sub).await;
    let (sub, _) = h.connect(v5("sub").resume().expiry(60)).await;
    h.send(sub, sub_1()).await;
    assert!(after_suback(h.take(sub)).is_empty());
}

#[tokio::test(start_paused = true)]
async fn retain_handling_2_never_sends_retained_messages() {
    let (mut h, publ) = with_retained().await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(
        sub,
        subscribe_with(1, "a/#", options(RetainHandling::DoNotSend)),
    )
    .await;
    assert!(after_suback(h.take(sub)).is_empty());
    // Live messages still flow.
    h.send(publ, publish("a/b", "live", QoS::AtLeastOnce, 9))
        .await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["live"]);
}

#[tokio::test(start_paused = true)]
async fn an_empty_retained_publish_clears_the_retained_message() {
    let (mut h, publ) = with_retained().await;
    h.send(publ, retain("a/b", "", QoS::AtLeastOnce, 3)).await;
    assert_eq!(h.broker.retained_count(), 2);
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "a/#", QoS::AtLeastOnce)).await;
    assert_eq!(payloads(&after_suback(h.take(sub))), ["acd"]);
}

#[tokio::test(start_paused = true)]
async fn a_live_message_has_retain_cleared_unless_retain_as_published() {
    let mut h = Harness::new().await;
    let (plain, _) = h.connect(v5("plain")).await;
    let (rap, _) = h.connect(v5("rap")).await;
    h.send(plain, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.send(
        rap,
        subscribe_with(
            1,
            "t",
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                retain_as_published: true,
                ..Default::default()
            },
        ),
    )
    .await;
    h.take(plain);
    h.take(rap);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, retain("t", "r", QoS::AtLeastOnce, 1)).await;
    assert!(!h.take_publishes(plain)[0].retain);
    assert!(h.take_publishes(rap)[0].retain);
}

#[tokio::test(start_paused = true)]
async fn a_retained_message_expires_and_is_sent_with_the_expiry_it_has_left() {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    for (i, (topic, secs)) in [("s", 10), ("l", 100)].into_iter().enumerate() {
        let Packet::Publish(mut p) = retain(topic, "r", QoS::AtLeastOnce, i as u16 + 1) else {
            unreachable!()
        };
        p.properties.message_expiry_interval = Some(secs);
        h.send(publ, Packet::Publish(p)).await;
    }
    h.sleep(std::time::Duration::from_secs(30)).await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "#", QoS::AtLeastOnce)).await;
    let got = after_suback(h.take(sub));
    assert_eq!(got.len(), 1, "the short-lived one expired: {got:?}");
    assert_eq!(got[0].topic, "l");
    assert_eq!(got[0].properties.message_expiry_interval, Some(70));
}

#[tokio::test(start_paused = true)]
async fn wildcards_at_the_first_level_do_not_match_dollar_topics() {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, retain("$sys/up", "r", QoS::AtLeastOnce, 1))
        .await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "#", QoS::AtLeastOnce)).await;
    h.send(sub, subscribe(2, "+/up", QoS::AtLeastOnce)).await;
    h.send(sub, subscribe(3, "$sys/#", QoS::AtLeastOnce)).await;
    let out = h.take(sub);
    assert_eq!(
        out.len(),
        4,
        "three SUBACKs and one retained message: {out:?}"
    );
    let Packet::Publish(p) = &out[3] else {
        panic!("the retained message for $sys/#: {out:?}");
    };
    assert_eq!(p.topic, "$sys/up");
    h.send(publ, publish("$sys/up", "live", QoS::AtLeastOnce, 2))
        .await;
    assert_eq!(
        payloads(&h.take_publishes(sub)),
        ["live"],
        "once, for $sys/#"
    );
}

#[tokio::test(start_paused = true)]
async fn a_v5_retained_publish_past_max_retained_messages_is_refused_0x97() {
    let mut h = Harness::with(crate::settings::Settings {
        max_retained_messages: 1,
        ..Default::default()
    })
    .await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "#", QoS::AtLeastOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, retain("a", "1", QoS::AtLeastOnce, 1)).await;
    assert_eq!(h.take(publ), [puback(1)]);
    h.send(publ, retain("b", "2", QoS::AtLeastOnce, 2)).await;
    let [Packet::PubAck(ack)] = &h.take(publ)[..] else {
        panic!("PUBACK");
    };
    assert_eq!(ack.reason, roost_core::ReasonCode::QuotaExceeded);
    assert_eq!(
        payloads(&h.take_publishes(sub)),
        ["1"],
        "the refused one is not routed"
    );
    // Replacing the one retained message is fine.
    h.send(publ, retain("a", "3", QoS::AtLeastOnce, 3)).await;
    assert_eq!(h.take(publ), [puback(3)]);
}

#[tokio::test(start_paused = true)]
async fn a_retained_will_is_kept_for_later_subscribers() {
    let mut h = Harness::new().await;
    let mut w = will("status/a", "offline", None);
    w.retain = true;
    let (a, _) = h.connect(v311("a", true).will(w)).await;
    h.lose(a).await;
    let (sub, _) = h.connect(v311("sub", true)).await;
    h.send(sub, subscribe(1, "status/+", QoS::AtLeastOnce))
        .await;
    let got = after_suback(h.take(sub));
    assert_eq!(payloads(&got), ["offline"]);
    assert!(got[0].retain);
}

#[tokio::test(start_paused = true)]
async fn many_retained_messages_are_all_sent_once_in_steps() {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    let topics: Vec<String> = (0..600).map(|i| format!("r/{i}")).collect();
    h.send_all(
        publ,
        topics
            .iter()
            .map(|t| retain(t, "x", QoS::AtMostOnce, 0))
            .collect(),
    )
    .await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "r/#", QoS::AtMostOnce)).await;
    let mut got: Vec<String> = after_suback(h.take(sub))
        .into_iter()
        .map(|p| p.topic)
        .collect();
    got.sort_unstable();
    let mut expected = topics.clone();
    expected.sort_unstable();
    assert_eq!(got, expected);
}

#[tokio::test(start_paused = true)]
async fn retained_messages_at_qos1_are_paced_by_the_session_queue_and_all_arrive() {
    let mut h = Harness::with(crate::settings::Settings {
        max_queued_messages: 50,
        ..Default::default()
    })
    .await;
    let (publ, _) = h.connect(v5("pub")).await;
    let topics: Vec<String> = (0..300).map(|i| format!("r/{i}")).collect();
    h.send_all(
        publ,
        topics
            .iter()
            .enumerate()
            .map(|(i, t)| retain(t, "x", QoS::AtLeastOnce, i as u16 + 1))
            .collect(),
    )
    .await;
    let (sub, _) = h.connect(v5("sub").receive_maximum(10)).await;
    h.send(sub, subscribe(1, "r/#", QoS::AtLeastOnce)).await;
    let mut got = Vec::new();
    let mut packets = after_suback(h.take(sub));
    for _ in 0..100 {
        if packets.is_empty() {
            break;
        }
        assert!(packets.len() <= 10, "at most 10 in flight");
        let acks = packets.iter().map(|p| puback(p.packet_id)).collect();
        got.extend(packets.into_iter().map(|p| p.topic));
        h.send_all(sub, acks).await;
        packets = h.take_publishes(sub);
    }
    got.sort_unstable();
    let mut expected = topics.clone();
    expected.sort_unstable();
    assert_eq!(got, expected);
}
