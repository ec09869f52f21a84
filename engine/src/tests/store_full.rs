//! A session store short of disk space: new state that cannot be stored is refused
//! before anything changes (SUBACK 0x97 / 3.x 0x80 for a persistent session's
//! subscription, a message for an offline session dropped and counted, a retained
//! message not kept), what does not need the store goes on, and all of it is taken
//! again once there is room.

use roost_core::{Packet, QoS, ReasonCode};

use super::util::*;
use crate::metrics::{DropReason, StoreRefusal};
use crate::store::Op;

fn suback_reasons(packets: &[Packet]) -> Vec<ReasonCode> {
    match packets {
        [Packet::SubAck(s)] => s.reasons.clone(),
        other => panic!("one SUBACK expected: {other:?}"),
    }
}

fn stored_entries_for(h: &Harness, client: &str) -> usize {
    h.store
        .ops()
        .iter()
        .filter(|op| matches!(op, Op::PutEntry(c, _, _) if &**c == client))
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_full_session_store_refuses_new_state_and_takes_it_again_when_space_returns() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(600)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    assert_eq!(suback_reasons(&h.take(sub)), [ReasonCode::GrantedQoS1]);
    let (old, _) = h.connect(v311("old", false)).await;
    let (clean, _) = h.connect(v5("clean")).await;
    let (publ, _) = h.connect(v5("pub")).await;

    h.store.set_full(true);
    // Persistent sessions' subscriptions cannot be stored: refused, nothing changed.
    h.send(sub, subscribe(2, "u", QoS::AtLeastOnce)).await;
    assert_eq!(suback_reasons(&h.take(sub)), [ReasonCode::QuotaExceeded]);
    h.send(old, subscribe(1, "u", QoS::AtLeastOnce)).await;
    let refused = suback_reasons(&h.take(old));
    assert!(
        refused.len() == 1 && refused[0].is_error(),
        "3.1.1: failure (0x80): {refused:?}"
    );
    // A clean session stores nothing: its subscription is granted.
    h.send(clean, subscribe(1, "u", QoS::AtLeastOnce)).await;
    assert_eq!(suback_reasons(&h.take(clean)), [ReasonCode::GrantedQoS1]);
    assert_eq!(
        h.broker.metrics.store_refusals(StoreRefusal::Subscription),
        2
    );

    // A connected persistent session still gets a message (unstored); once offline,
    // a message for it is dropped and counted, not kept in memory as if stored.
    let entries_before = stored_entries_for(&h, "sub");
    h.send(publ, publish("t", "live", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(h.take(publ), [puback(1)]);
    assert_eq!(payloads(&h.take_publishes(sub)), ["live"]);
    assert_eq!(stored_entries_for(&h, "sub"), entries_before);
    h.lose(sub).await;
    h.send(publ, publish("t", "dropped", QoS::AtLeastOnce, 2))
        .await;
    assert_eq!(h.take(publ), [puback(2)], "the publisher is not held up");
    assert_eq!(h.broker.metrics.dropped_for(DropReason::StoreFull), 1);
    assert_eq!(stored_entries_for(&h, "sub"), entries_before);

    // A retained message is not kept; a v5 QoS 1 publisher is told (0x97).
    h.send(publ, retain("r", "kept?", QoS::AtLeastOnce, 3))
        .await;
    match &h.take(publ)[..] {
        [Packet::PubAck(a)] => assert_eq!(a.reason, ReasonCode::QuotaExceeded),
        other => panic!("PUBACK 0x97 expected: {other:?}"),
    }
    assert_eq!(h.broker.retained_count(), 0);
    assert_eq!(h.broker.metrics.store_refusals(StoreRefusal::Retained), 1);

    // Space returns: everything is taken again, with no restart.
    h.store.set_full(false);
    h.send(publ, publish("t", "stored", QoS::AtLeastOnce, 4))
        .await;
    assert_eq!(h.take(publ), [puback(4)]);
    assert_eq!(stored_entries_for(&h, "sub"), entries_before + 1);
    h.send(publ, retain("r", "kept", QoS::AtLeastOnce, 5)).await;
    assert_eq!(h.take(publ), [puback(5)]);
    assert_eq!(h.broker.retained_count(), 1);
    let (sub, ack) = h.connect(v5("sub").resume().expiry(600)).await;
    assert!(ack.session_present);
    // "live" was in flight, unacknowledged, when the connection went: it comes again
    // from memory (it would not survive a restart); "dropped" never comes.
    assert_eq!(payloads(&h.take_publishes(sub)), ["live", "stored"]);
    h.send(sub, subscribe(3, "u", QoS::AtLeastOnce)).await;
    assert_eq!(suback_reasons(&h.take(sub)), [ReasonCode::GrantedQoS1]);
}

/// A CONNECT whose session record cannot be stored is refused with a CONNACK (v5: the
/// store's reason; 3.1.1: 3, server unavailable), never answered by a DISCONNECT
/// before any CONNACK, and leaves no will behind.
#[tokio::test(start_paused = true)]
async fn a_connect_whose_session_cannot_be_stored_gets_a_refusing_connack() {
    let mut h = Harness::new().await;
    h.store.fail();
    let (v5c, ack) = h.connect(v5("p5").expiry(60)).await;
    assert_eq!(ack.code, ReasonCode::UnspecifiedError);
    assert_eq!(
        h.closed_for(v5c),
        Some(crate::metrics::DisconnectReason::StorageFailure)
    );
    assert!(h.take(v5c).is_empty(), "nothing after the CONNACK");
    let (v3c, ack) = h.connect(v311("p3", false)).await;
    assert_eq!(ack.code, ReasonCode::ServerUnavailable);
    assert_eq!(
        h.closed_for(v3c),
        Some(crate::metrics::DisconnectReason::StorageFailure)
    );
}
