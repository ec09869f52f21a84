//! Keep-alive on the paused clock: a silent client is closed after one and a half
//! periods (its will published), any packet keeps it alive.

use std::time::Duration;

use roost_core::{Packet, QoS, ReasonCode};

use crate::settings::Settings;

use super::util::*;
use crate::metrics::DisconnectReason;

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_after_one_and_a_half_keep_alives_and_its_will_published() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch")).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    let (a, _) = h
        .connect(v5("a").keep_alive(10).will(will("will/a", "silent", None)))
        .await;
    h.sleep(14 * SEC).await;
    assert!(h.is_connected(a), "still within 1.5 keep-alives");
    h.sleep(SEC).await;
    assert!(!h.is_connected(a));
    assert_eq!(h.closed_for(a), Some(DisconnectReason::KeepAliveTimeout));
    let [Packet::Disconnect(d)] = &h.take(a)[..] else {
        panic!("a DISCONNECT for the v5 client");
    };
    assert_eq!(d.reason, ReasonCode::KeepAliveTimeout);
    assert_eq!(payloads(&h.take_publishes(watch)), ["silent"]);
}

#[tokio::test(start_paused = true)]
async fn pings_keep_a_client_alive() {
    let mut h = Harness::new().await;
    let (a, _) = h.connect(v311("a", true).keep_alive(10)).await;
    for _ in 0..10 {
        h.sleep(10 * SEC).await;
        h.send(a, Packet::PingReq).await;
        assert_eq!(h.take(a), [Packet::PingResp]);
    }
    assert!(h.is_connected(a));
    h.sleep(15 * SEC).await;
    assert!(!h.is_connected(a));
    assert!(h.take(a).is_empty(), "3.1.1: closed without a DISCONNECT");
}

#[tokio::test(start_paused = true)]
async fn the_server_keep_alive_caps_what_a_v5_client_asks_for() {
    let mut h = Harness::with(Settings {
        max_keep_alive: 20,
        ..Settings::default()
    })
    .await;
    let (a, ack) = h.connect(v5("a").keep_alive(600)).await;
    assert_eq!(ack.properties.server_keep_alive, Some(20));
    h.sleep(29 * SEC).await;
    assert!(h.is_connected(a));
    h.sleep(SEC).await;
    assert_eq!(h.closed_for(a), Some(DisconnectReason::KeepAliveTimeout));
}

/// A client whose token expires is closed then, whatever its keep-alive: a v5 client is
/// told 0x87 (not authorized), a 3.1.1 client's socket just closes.
#[tokio::test(start_paused = true)]
async fn a_client_is_closed_when_its_token_expires() {
    let mut h = Harness::new().await;
    let at = crate::clock::now() + 30 * SEC;
    let (a, _) = h
        .try_connect_until(v5("a").keep_alive(20), Some(at))
        .await
        .expect("connected");
    let (b, _) = h
        .try_connect_until(v311("b", true), Some(at))
        .await
        .expect("connected");
    for _ in 0..2 {
        h.sleep(14 * SEC).await;
        h.send(a, Packet::PingReq).await;
        assert_eq!(h.take(a), [Packet::PingResp]);
    }
    assert!(h.is_connected(a) && h.is_connected(b), "28 s of 30");
    h.sleep(2 * SEC).await;
    assert!(!h.is_connected(a) && !h.is_connected(b));
    assert_eq!(h.closed_for(a), Some(DisconnectReason::TokenExpired));
    assert_eq!(h.closed_for(b), Some(DisconnectReason::TokenExpired));
    let [Packet::Disconnect(d)] = &h.take(a)[..] else {
        panic!("a DISCONNECT for the v5 client");
    };
    assert_eq!(d.reason, ReasonCode::NotAuthorized);
    assert!(h.take(b).is_empty(), "3.1.1: closed without a DISCONNECT");
}
