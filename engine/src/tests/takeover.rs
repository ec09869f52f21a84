//! A client id connecting while its previous connection is still open: the old one is
//! closed (v5: DISCONNECT 0x8E) and hands the session over, in-flight messages included.

use roost_core::{Packet, QoS, ReasonCode};

use super::util::*;
use crate::metrics::DisconnectReason;

fn disconnect_reasons(packets: &[Packet]) -> Vec<ReasonCode> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn v5_takeover_tells_the_old_connection_0x8e_and_resumes_the_session() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev").expiry(60)).await;
    h.send(old, subscribe(1, "cmd/#", QoS::AtLeastOnce)).await;
    h.take(old);

    let (new, ack) = h.connect(v5("dev").resume().expiry(60)).await;
    assert!(ack.session_present, "the session was handed over");
    assert_eq!(
        disconnect_reasons(&h.take(old)),
        [ReasonCode::SessionTakenOver]
    );
    assert!(!h.is_connected(old));
    assert_eq!(h.closed_for(old), Some(DisconnectReason::TakenOver));

    // The subscription came with the session.
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("cmd/reboot", "now", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(payloads(&h.take_publishes(new)), ["now"]);
    assert!(h.take(old).is_empty(), "nothing reaches the old connection");
}

#[tokio::test(start_paused = true)]
async fn v311_takeover_closes_the_old_connection_silently_and_resumes_the_session() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v311("dev", false)).await;
    h.send(old, subscribe(1, "cmd/#", QoS::AtLeastOnce)).await;
    h.take(old);

    let (new, ack) = h.connect(v311("dev", false)).await;
    assert!(ack.session_present);
    assert!(
        h.take(old).is_empty(),
        "3.1.1 has no DISCONNECT from the server: the socket just closes"
    );
    assert_eq!(h.closed_for(old), Some(DisconnectReason::TakenOver));
    let (publ, _) = h.connect(v311("pub", true)).await;
    h.send(publ, publish("cmd/x", "1", QoS::AtLeastOnce, 1))
        .await;
    assert_eq!(payloads(&h.take_publishes(new)), ["1"]);
}

#[tokio::test(start_paused = true)]
async fn takeover_resends_an_unacknowledged_qos1_message_with_dup() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev").expiry(60)).await;
    h.send(old, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(old);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "m1", QoS::AtLeastOnce, 1)).await;
    let first = h.take_publishes(old);
    assert_eq!(payloads(&first), ["m1"]);
    assert!(!first[0].dup);

    // Not acknowledged: the new connection gets it again, same packet id, DUP set.
    let (new, ack) = h.connect(v5("dev").resume().expiry(60)).await;
    assert!(ack.session_present);
    let again = h.take_publishes(new);
    assert_eq!(payloads(&again), ["m1"]);
    assert!(again[0].dup);
    assert_eq!(again[0].packet_id, first[0].packet_id);
    assert_eq!(again[0].qos, QoS::AtLeastOnce);

    // Acknowledged on the new connection, it is done: the next one resends nothing.
    h.send(new, puback(again[0].packet_id)).await;
    let (newer, _) = h.connect(v5("dev").resume().expiry(60)).await;
    assert!(h.take(newer).is_empty());
}

#[tokio::test(start_paused = true)]
async fn takeover_resends_an_unreceived_qos2_message_and_continues_a_released_one_with_pubrel() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev").expiry(60)).await;
    h.send(old, subscribe(1, "t", QoS::ExactlyOnce)).await;
    h.take(old);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "a", QoS::ExactlyOnce, 1)).await;
    h.send(publ, publish("t", "b", QoS::ExactlyOnce, 2)).await;
    let sent = h.take_publishes(old);
    assert_eq!(payloads(&sent), ["a", "b"]);
    // "a" reached the client (PUBREC), "b" did not.
    h.send(old, pubrec(sent[0].packet_id)).await;
    assert_eq!(h.take(old), [pubrel(sent[0].packet_id)]);

    let (new, ack) = h.connect(v5("dev").resume().expiry(60)).await;
    assert!(ack.session_present);
    let resent = h.take(new);
    assert_eq!(resent.len(), 2, "{resent:?}");
    assert_eq!(
        resent[0],
        pubrel(sent[0].packet_id),
        "the flow of a goes on with PUBREL, a is not sent again"
    );
    let Packet::Publish(b) = &resent[1] else {
        panic!("b is resent: {resent:?}");
    };
    assert!(b.dup);
    assert_eq!(
        (b.packet_id, &b.payload[..]),
        (sent[1].packet_id, &b"b"[..])
    );

    // Finishing both flows on the new connection leaves nothing to resend.
    h.send(new, pubcomp(sent[0].packet_id)).await;
    h.send(new, pubrec(b.packet_id)).await;
    assert_eq!(h.take(new), [pubrel(b.packet_id)]);
    h.send(new, pubcomp(b.packet_id)).await;
    let (newer, _) = h.connect(v5("dev").resume().expiry(60)).await;
    assert!(h.take(newer).is_empty());
}

#[tokio::test(start_paused = true)]
async fn takeover_with_clean_start_discards_the_old_session() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev").expiry(60)).await;
    h.send(old, subscribe(1, "t", QoS::AtLeastOnce)).await;
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "m1", QoS::AtLeastOnce, 1)).await;
    h.take(old);

    let (new, ack) = h.connect(v5("dev").expiry(60)).await;
    assert!(!ack.session_present);
    assert_eq!(
        disconnect_reasons(&h.take(old)),
        [ReasonCode::SessionTakenOver]
    );
    assert!(
        h.take(new).is_empty(),
        "no resend of the old session's message"
    );
    h.send(publ, publish("t", "m2", QoS::AtLeastOnce, 2)).await;
    assert!(h.take(new).is_empty(), "the old subscription is gone");
    assert_eq!(h.broker.subscription_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn takeover_of_a_connection_with_session_expiry_0_starts_a_new_session() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev")).await;
    h.send(old, subscribe(1, "t", QoS::AtLeastOnce)).await;
    let (_new, ack) = h.connect(v5("dev").resume().expiry(60)).await;
    assert!(
        !ack.session_present,
        "a session with expiry 0 ends with its connection"
    );
    assert_eq!(h.broker.subscription_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn takeover_publishes_a_will_without_delay_but_not_a_delayed_one() {
    let mut h = Harness::new().await;
    let (watch, _) = h.connect(v5("watch")).await;
    h.send(watch, subscribe(1, "will/#", QoS::AtLeastOnce))
        .await;
    h.take(watch);

    let (_a, _) = h
        .connect(v5("a").expiry(60).will(will("will/a", "a gone", None)))
        .await;
    let (_b, _) = h
        .connect(v5("b").expiry(60).will(will("will/b", "b gone", Some(5))))
        .await;
    h.connect(v5("a").resume().expiry(60)).await;
    h.connect(v5("b").resume().expiry(60)).await;
    h.sleep(std::time::Duration::from_secs(30)).await;
    assert_eq!(
        payloads(&h.take_publishes(watch)),
        ["a gone"],
        "a takeover is a server-side close: the will stands, but a resumed session \
         cancels a will still waiting for its delay"
    );
}

#[tokio::test(start_paused = true)]
async fn messages_waiting_in_the_old_connections_mailbox_go_to_the_new_one() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev").expiry(60)).await;
    h.send(old, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(old);
    h.hold(old);
    let (publ, _) = h.connect(v5("pub")).await;
    h.send(publ, publish("t", "m1", QoS::AtLeastOnce, 1)).await;
    h.send(publ, publish("t", "m2", QoS::AtMostOnce, 0)).await;
    let (new, _) = h.connect(v5("dev").resume().expiry(60)).await;
    assert_eq!(
        disconnect_reasons(&h.take(old)),
        [ReasonCode::SessionTakenOver]
    );
    assert_eq!(
        payloads(&h.take_publishes(new)),
        ["m1"],
        "the QoS 1 message is kept with the session (QoS 0 may be dropped)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_session_taken_over_by_a_v311_client_resends_in_3_1_1() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("dev").expiry(u32::MAX)).await;
    h.send(old, subscribe(1, "t", QoS::AtLeastOnce)).await;
    h.take(old);
    let (publ, _) = h.connect(v5("pub")).await;
    let Packet::Publish(mut p) = publish("t", "m", QoS::AtLeastOnce, 1) else {
        unreachable!()
    };
    p.properties.content_type = Some("text/plain".into());
    h.send(publ, Packet::Publish(p)).await;
    let sent = h.take_publishes(old);
    assert_eq!(
        sent[0].properties.content_type.as_deref(),
        Some("text/plain")
    );
    let (new, ack) = h.connect(v311("dev", false)).await;
    assert!(ack.session_present);
    // Decoded as 3.1.1 by the harness: a v5 encoding would not parse.
    let resent = h.take_publishes(new);
    assert_eq!(payloads(&resent), ["m"]);
    assert!(resent[0].dup);
    assert!(resent[0].properties.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_queue_consumer_taken_over_gets_its_unsettled_message_on_the_new_connection() {
    let mut h = Harness::new().await;
    let (old, _) = h.connect(v5("worker").expiry(60)).await;
    h.send(old, subscribe(1, "$share/g/$queue/jobs", QoS::AtLeastOnce))
        .await;
    h.take(old);
    let (producer, _) = h.connect(v5("producer")).await;
    h.send(
        producer,
        publish("$queue/jobs", "work", QoS::AtLeastOnce, 1),
    )
    .await;
    assert_eq!(payloads(&h.take_publishes(old)), ["work"]);

    let (new, ack) = h.connect(v5("worker").resume().expiry(60)).await;
    assert!(ack.session_present);
    let got = h.take_publishes(new);
    assert_eq!(payloads(&got), ["work"], "once, not also as a resend");
    assert_eq!(user_property(&got[0], "delivery-count"), Some("2"));
    h.send(new, puback(got[0].packet_id)).await;
    let q = h.broker.queues.get("jobs").expect("queue");
    assert_eq!(
        q.info().groups[0].lag,
        0,
        "settled through the new connection"
    );
}
