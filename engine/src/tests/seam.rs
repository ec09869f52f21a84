//! The seam a cluster plugs into: a subscriber or a session that lives elsewhere is a
//! [`ConnectionHandle`] (a mailbox and its [`ClientInfo`]) in the session map, with
//! routes in the router, and no protocol state machine here. Whatever takes from the
//! mailbox (a link to another node) gets what the broker routes to it.

use std::sync::Arc;

use roost_core::{QoS, SubscriptionOptions};

use super::util::*;
use crate::broker::{Attach, ClientInfo, ConnectionHandle};

/// A subscriber that is not a connection: attached through the engine's API, it gets
/// a message a real client publishes, through its mailbox alone.
#[tokio::test(start_paused = true)]
async fn a_subscriber_elsewhere_gets_what_is_routed_to_it_through_its_mailbox() {
    let mut h = Harness::new().await;
    let remote: Arc<str> = "node-2/sub".into();
    let (tx, rx) = crate::mailbox::mailbox(16);
    let info = Arc::new(ClientInfo {
        id: h.broker.next_id(),
        persistent: false,
        stalled: Default::default(),
        overflowed: Default::default(),
        peer: ([127, 0, 0, 2], 7000).into(),
        protocol: roost_core::ProtocolVersion::V5,
        username: None,
        connected_at_ms: 0,
    });
    let handle = ConnectionHandle { mailbox: tx, info };
    assert!(matches!(
        h.broker.attach(&remote, true, handle),
        Attach::Fresh
    ));
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..SubscriptionOptions::default()
    };
    h.broker.subscribe("sensors/+/temp", &remote, options, None);

    let (publisher, _) = h.connect(v5("local-pub")).await;
    h.send(
        publisher,
        publish("sensors/hall/temp", "19.5", QoS::AtLeastOnce, 1),
    )
    .await;
    assert_eq!(h.take(publisher).len(), 1, "PUBACK");
    let d = rx
        .try_recv()
        .expect("the delivery is in the remote's mailbox");
    assert_eq!(d.msg.topic, "sensors/hall/temp");
    assert_eq!(&d.msg.payload[..], b"19.5");
    assert_eq!(d.qos, QoS::AtLeastOnce);
    assert!(rx.try_recv().is_none(), "once");
}
