//! Delivery guarantees and windows: QoS 2 exactly once across a reconnection, no-local,
//! overlapping subscriptions, and Receive Maximum in both directions.

use roost_core::{Packet, PubResponse, QoS, ReasonCode, SubscriptionOptions};

use crate::settings::Settings;

use super::util::*;
use crate::metrics::DisconnectReason;

/// A harness with a QoS 2 subscriber to `t`.
async fn subscribed() -> (Harness, Id) {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "t", QoS::ExactlyOnce)).await;
    h.take(sub);
    (h, sub)
}

#[tokio::test(start_paused = true)]
async fn qos2_publish_resumed_after_reconnect_with_pubrel_is_delivered_once() {
    let (mut h, sub) = subscribed().await;
    let (publ, _) = h.connect(v5("pub").expiry(60)).await;
    h.send(publ, publish("t", "once", QoS::ExactlyOnce, 7))
        .await;
    assert_eq!(h.take(publ), [pubrec(7)]);
    h.lose(publ).await;

    let (publ, ack) = h.connect(v5("pub").resume().expiry(60)).await;
    assert!(ack.session_present);
    h.send(publ, pubrel(7)).await;
    assert_eq!(h.take(publ), [pubcomp(7)]);
    assert_eq!(payloads(&h.take_publishes(sub)), ["once"]);
}

#[tokio::test(start_paused = true)]
async fn qos2_publish_resent_after_reconnect_is_acknowledged_but_not_delivered_again() {
    let (mut h, sub) = subscribed().await;
    let (publ, _) = h.connect(v311("pub", false)).await;
    h.send(publ, publish("t", "once", QoS::ExactlyOnce, 7))
        .await;
    assert_eq!(h.take(publ), [pubrec(7)]);
    h.lose(publ).await;

    // The PUBREC was lost on the way: the client sends the PUBLISH again, with DUP.
    let (publ, _) = h.connect(v311("pub", false)).await;
    let Packet::Publish(p) = publish("t", "once", QoS::ExactlyOnce, 7) else {
        unreachable!()
    };
    h.send(
        publ,
        Packet::Publish(roost_core::Publish { dup: true, ..p }),
    )
    .await;
    assert_eq!(h.take(publ), [pubrec(7)]);
    h.send(publ, pubrel(7)).await;
    assert_eq!(h.take(publ), [pubcomp(7)]);
    assert_eq!(payloads(&h.take_publishes(sub)), ["once"], "exactly once");
}

#[tokio::test(start_paused = true)]
async fn pubrel_for_an_unknown_packet_id_is_answered_0x92() {
    let mut h = Harness::new().await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, pubrel(3)).await;
    let [
        Packet::PubComp(PubResponse {
            packet_id, reason, ..
        }),
    ] = &h.take(publ)[..]
    else {
        panic!("PUBCOMP expected");
    };
    assert_eq!(
        (*packet_id, *reason),
        (3, ReasonCode::PacketIdentifierNotFound)
    );
}

#[tokio::test(start_paused = true)]
async fn no_local_keeps_a_clients_own_messages_from_it() {
    let mut h = Harness::new().await;
    let (me, _) = h.connect(v5("me")).await;
    let (other, _) = h.connect(v5("other")).await;
    let no_local = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: true,
        ..Default::default()
    };
    h.send(me, subscribe_with(1, "chat", no_local)).await;
    h.send(other, subscribe(1, "chat", QoS::AtLeastOnce)).await;
    h.take(me);
    h.take(other);

    h.send(me, publish("chat", "mine", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(
        h.take(me),
        [puback(1)],
        "only the PUBACK, not its own message"
    );
    assert_eq!(payloads(&h.take_publishes(other)), ["mine"]);
    h.send(other, publish("chat", "theirs", QoS::AtMostOnce, 0))
        .await;
    assert_eq!(payloads(&h.take_publishes(me)), ["theirs"]);
}

#[tokio::test(start_paused = true)]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub")).await;
    h.send(sub, subscribe(1, "a/+", QoS::AtMostOnce)).await;
    h.send(sub, subscribe(2, "a/#", QoS::ExactlyOnce)).await;
    h.send(sub, subscribe(3, "a/b", QoS::AtLeastOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("a/b", "x", QoS::ExactlyOnce, 1)).await;
    let got = h.take_publishes(sub);
    assert_eq!(payloads(&got), ["x"]);
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
}

#[tokio::test(start_paused = true)]
async fn receive_maximum_bounds_the_messages_in_flight_to_a_client() {
    let mut h = Harness::new().await;
    let (sub, ack) = h.connect(v5("sub").receive_maximum(2)).await;
    assert_eq!(ack.properties.receive_maximum, Some(1024));
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    for (i, m) in ["1", "2", "3", "4", "5"].into_iter().enumerate() {
        h.send(publ, publish("t", m, QoS::AtLeastOnce, i as u16 + 1))
            .await;
    }
    let first = h.take_publishes(sub);
    assert_eq!(payloads(&first), ["1", "2"], "two in flight at most");
    h.send(sub, puback(first[0].packet_id)).await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["3"]);
    h.send(sub, puback(first[1].packet_id)).await;
    let next = h.take_publishes(sub);
    assert_eq!(payloads(&next), ["4"]);
    h.send(sub, puback(next[0].packet_id)).await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["5"]);
}

#[tokio::test(start_paused = true)]
async fn a_client_over_the_brokers_receive_maximum_is_disconnected_0x93() {
    let mut h = Harness::with(Settings {
        max_inflight: 2,
        ..Settings::default()
    })
    .await;
    let (publ, ack) = h.connect(v5("pub")).await;
    assert_eq!(ack.properties.receive_maximum, Some(2));
    h.send_all(
        publ,
        vec![
            publish("t", "1", QoS::ExactlyOnce, 1),
            publish("t", "2", QoS::ExactlyOnce, 2),
            publish("t", "3", QoS::ExactlyOnce, 3),
        ],
    )
    .await;
    let out = h.take(publ);
    assert_eq!(out[..2], [pubrec(1), pubrec(2)]);
    let Some(Packet::Disconnect(d)) = out.get(2) else {
        panic!("DISCONNECT expected: {out:?}");
    };
    assert_eq!(d.reason, ReasonCode::ReceiveMaximumExceeded);
    assert_eq!(
        h.closed_for(publ),
        Some(DisconnectReason::ReceiveMaximumExceeded)
    );
}

#[tokio::test(start_paused = true)]
async fn a_resumed_session_sends_its_queue_within_the_new_receive_maximum() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(60)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.lose(sub).await;
    let (publ, _) = h.connect(v5("pub")).await;
    for (i, m) in ["1", "2", "3"].into_iter().enumerate() {
        h.send(publ, publish("t", m, QoS::AtLeastOnce, i as u16 + 1))
            .await;
    }
    let (sub, _) = h
        .connect(v5("sub").resume().expiry(60).receive_maximum(1))
        .await;
    let first = h.take_publishes(sub);
    assert_eq!(payloads(&first), ["1"]);
    h.send(sub, puback(first[0].packet_id)).await;
    let second = h.take_publishes(sub);
    assert_eq!(payloads(&second), ["2"]);
    h.send(sub, puback(second[0].packet_id)).await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["3"]);
}

#[tokio::test(start_paused = true)]
async fn a_qos2_message_counts_against_receive_maximum_until_pubcomp() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").receive_maximum(1)).await;
    h.send(sub, subscribe(1, "t", QoS::ExactlyOnce)).await;
    h.take(sub);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "1", QoS::ExactlyOnce, 1)).await;
    h.send(publ, publish("t", "2", QoS::ExactlyOnce, 2)).await;
    let first = h.take_publishes(sub);
    assert_eq!(payloads(&first), ["1"]);
    h.send(sub, pubrec(first[0].packet_id)).await;
    assert_eq!(h.take(sub), [pubrel(first[0].packet_id)], "not 2 yet");
    h.send(sub, pubcomp(first[0].packet_id)).await;
    assert_eq!(payloads(&h.take_publishes(sub)), ["2"]);
}

#[tokio::test(start_paused = true)]
async fn packet_ids_still_in_flight_after_a_takeover_are_not_reused() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("sub").expiry(60)).await;
    h.send(old, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(old);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "1", QoS::AtLeastOnce, 1)).await;
    h.send(publ, publish("t", "2", QoS::AtLeastOnce, 2)).await;
    let sent = h.take_publishes(old);
    let (new, _) = h.connect(v5("sub").resume().expiry(60)).await;
    let resent = h.take_publishes(new);
    assert_eq!(payloads(&resent), ["1", "2"]);
    h.send(new, puback(sent[0].packet_id)).await;
    h.send(publ, publish("t", "3", QoS::AtLeastOnce, 3)).await;
    let third = h.take_publishes(new);
    assert_eq!(payloads(&third), ["3"]);
    assert_ne!(
        third[0].packet_id, sent[1].packet_id,
        "2 is still in flight"
    );
    // Acknowledging 2 acknowledges 2, not 3.
    h.send(new, puback(sent[1].packet_id)).await;
    let (newer, _) = h.connect(v5("sub").resume().expiry(60)).await;
    assert_eq!(payloads(&h.take_publishes(newer)), ["3"]);
}

#[tokio::test(start_paused = true)]
async fn a_publish_whose_delivery_cannot_be_stored_is_not_acknowledged() {
    let mut h = Harness::new().await;
    let (sub, _) = h.connect(v5("sub").expiry(60)).await;
    h.send(sub, subscribe(1, "t", QoS::AtLeastOnce)).await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "stored", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(h.take(publ), [puback(1)]);
    assert!(
        h.store
            .ops()
            .iter()
            .any(|op| matches!(op, crate::store::Op::PutEntry(c, _, _) if &**c == "sub")),
        "the delivery to the persistent session was stored"
    );

    h.store.fail();
    h.send(publ, publish("t", "lost", QoS::AtLeastOnce, 2))
        .await;
    let out = h.take(publ);
    assert!(
        !out.contains(&puback(2)),
        "no PUBACK for what was not stored: {out:?}"
    );
    let [Packet::Disconnect(d)] = &out[..] else {
        panic!("DISCONNECT expected: {out:?}");
    };
    assert_eq!(d.reason, ReasonCode::UnspecifiedError);
    assert_eq!(h.closed_for(publ), Some(DisconnectReason::StorageFailure));
}
