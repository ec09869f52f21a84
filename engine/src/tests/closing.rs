//! Connections the server ends itself: an administrator's kick and a shutdown.

use roost_core::{Packet, QoS, ReasonCode};

use super::util::*;
use crate::metrics::DisconnectReason;

fn only_disconnect(packets: &[Packet]) -> ReasonCode {
    match packets {
        [Packet::Disconnect(d)] => d.reason,
        other => panic!("one DISCONNECT expected, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_kicked_client_is_told_0x98_and_its_will_is_published() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch")).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    let (a, _) = h
        .connect(v5("a").will(will("will/a", "kicked", None)))
        .await;
    assert!(h.broker.kick("a"));
    h.drive().await;
    assert_eq!(
        only_disconnect(&h.take(a)),
        ReasonCode::AdministrativeAction
    );
    assert_eq!(h.closed_for(a), Some(DisconnectReason::AdminKick));
    assert_eq!(payloads(&h.take_publishes(watch)), ["kicked"]);
    assert!(!h.broker.kick("a"), "no longer connected");
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_tells_clients_0x8b_publishes_no_will_and_keeps_persistent_sessions() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch").expiry(600)).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);
    let (a, _) = h.connect(v5("a").will(will("will/a", "down", None))).await;
    h.broker.shut_down_connections();
    h.drive().await;
    for c in [watch, a] {
        assert_eq!(only_disconnect(&h.take(c)), ReasonCode::ServerShuttingDown);
        assert_eq!(h.closed_for(c), Some(DisconnectReason::ServerShutdown));
    }
    assert!(h.has_session("watch"));
    assert!(!h.has_session("a"));
    let (watch, _) = h.connect(v5("watch").resume().expiry(600)).await;
    assert!(h.take(watch).is_empty(), "the will was not published");
}
