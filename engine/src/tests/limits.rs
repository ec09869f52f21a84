//! The limits a client meets: a subscriber too slow for its publishers, one that
//! acknowledges nothing, and the bounds on sessions and their expiry.

use std::time::Duration;

use roost_core::{Packet, QoS, ReasonCode};

use super::util::*;
use crate::metrics::DisconnectReason;
use crate::settings::Settings;

#[tokio::test(start_paused = true)]
async fn a_client_that_acknowledges_nothing_is_disconnected_as_a_slow_consumer() {
    let mut h = Harness::with(Settings {
        max_queued_messages: 2,
        slow_consumer_timeout_ms: 5_000,
        ..Settings::default()
    })
    .await;
    let (sub, _) = h.connect(v5("sub").receive_maximum(1)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    for (i, m) in ["1", "2", "3", "4"].into_iter().enumerate() {
        h.send(publ, publish("t", m, QoS::AtLeastOnce, i as u16 + 1))
            .await;
    }
    let first = h.take_publishes(sub);
    assert_eq!(payloads(&first), ["1"]);
    h.sleep(Duration::from_secs(4)).await;
    // Progress restarts the clock.
    h.send(sub, puback(first[0].packet_id)).await;
    let second = h.take_publishes(sub);
    assert_eq!(payloads(&second), ["2"]);
    h.sleep(Duration::from_secs(4)).await;
    assert!(h.is_connected(sub));
    h.sleep(Duration::from_secs(1)).await;
    assert!(!h.is_connected(sub));
    assert_eq!(h.closed_for(sub), Some(DisconnectReason::SlowConsumer));
    let [Packet::Disconnect(d)] = &h.take(sub)[..] else {
        panic!("DISCONNECT 0x97");
    };
    assert_eq!(d.reason, ReasonCode::QuotaExceeded);
}

#[tokio::test(start_paused = true)]
async fn a_connection_is_refused_0x97_past_max_sessions_but_an_existing_session_resumes() {
    let mut h = Harness::with(Settings {
        max_sessions: 2,
        ..Default::default()
    })
    .await;
    let (a, _) = h.connect(v5("a").expiry(60)).await;
    h.connect(v5("b")).await;
    let refused = h.try_connect(v5("c")).await.map(|(_, ack)| ack);
    assert_eq!(
        refused.map_err(|(code, _)| code),
        Err(ReasonCode::QuotaExceeded)
    );
    h.lose(a).await;
    let (_, ack) = h.connect(v5("a").resume().expiry(60)).await;
    assert!(
        ack.session_present,
        "a stored session counts as held already"
    );
}

#[tokio::test(start_paused = true)]
async fn a_publisher_waits_at_most_max_delivery_wait_for_a_stuck_subscriber() {
    let mut h = Harness::with(Settings {
        // A mailbox of 16 deliveries.
        max_queued_messages: 1,
        max_delivery_wait_ms: 5_000,
        ..Settings::default()
    })
    .await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(sub);
    h.hold(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    let start = tokio::time::Instant::now();
    const PAYLOADS: [&str; 18] = [
        "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "17", "18",
    ];
    for (i, m) in PAYLOADS[..16].iter().enumerate() {
        h.send(publ, publish("t", m, QoS::AtLeastOnce, i as u16 + 1))
            .await;
    }
    assert_eq!(h.take(publ).len(), 16, "16 PUBACKs at once");
    assert_eq!(start.elapsed(), Duration::ZERO);

    // The mailbox is full: the PUBACK waits for room, then the message is dropped for
    // the stuck subscriber.
    h.send(publ, publish("t", PAYLOADS[16], QoS::AtLeastOnce, 17))
        .await;
    assert_eq!(h.take(publ), [puback(17)]);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // A subscriber known to be stuck costs later publishers no wait.
    h.send(publ, publish("t", PAYLOADS[17], QoS::AtLeastOnce, 18))
        .await;
    assert_eq!(h.take(publ), [puback(18)]);
    assert_eq!(start.elapsed(), Duration::from_secs(5));

    h.release(sub).await;
    assert_eq!(payloads(&h.take_publishes(sub)), PAYLOADS[..16]);
    h.send(publ, publish("t", "after", QoS::AtLeastOnce, 19))
        .await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["after"]);
}

#[tokio::test(start_paused = true)]
async fn session_expiry_is_capped_by_session_expiry_max_and_the_client_told() {
    let mut h = Harness::with(Settings {
        session_expiry_max: 60,
        ..Settings::default()
    })
    .await;
    let (a, ack) = h.connect(v5("a").expiry(3600)).await;
    assert_eq!(ack.properties.session_expiry_interval, Some(60));
    h.lose(a).await;
    h.sleep(Duration::from_secs(59)).await;
    assert!(h.has_session("a"));
    h.sleep(Duration::from_secs(1)).await;
    assert!(!h.has_session("a"));
    let (_, ack) = h.connect(v5("b").expiry(30)).await;
    assert_eq!(
        ack.properties.session_expiry_interval, None,
        "told only when capped"
    );
}
