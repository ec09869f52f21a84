//! `$SYS/broker/...` status topics, in Mosquitto's naming so existing dashboards work.
//!
//! Published retained every `sys_interval` seconds (0 turns them off). Like every
//! `$` topic they are not matched by a leading wildcard (`#` does not get them), and
//! the ACL covers them like any other topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use roost_core::{Message, Properties, QoS};
use tokio::sync::watch;

use crate::broker::Broker;
use crate::metrics::DropReason;

/// Publishes the status topics every `interval` until shutdown.
pub async fn publish_periodically(
    broker: Arc<Broker>,
    interval: Duration,
    started: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => publish_once(&broker, started),
            _ = shutdown.changed() => return,
        }
    }
}

/// The status topics and their current values.
pub fn status(broker: &Broker, started: Instant) -> Vec<(&'static str, String)> {
    let m = &broker.metrics;
    let received: u64 = m.received_by_qos().iter().sum();
    let sent: u64 = m.sent_by_qos().iter().sum();
    let dropped: u64 = DropReason::ALL.iter().map(|r| m.dropped_for(*r)).sum();
    vec![
        (
            "$SYS/broker/version",
            format!("roost {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", started.elapsed().as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            broker.connection_count().to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            broker.session_count().to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            broker.subscription_count().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            broker.retained_count().to_string(),
        ),
        ("$SYS/broker/messages/received", received.to_string()),
        ("$SYS/broker/messages/sent", sent.to_string()),
        ("$SYS/broker/publish/messages/dropped", dropped.to_string()),
    ]
}

fn publish_once(broker: &Arc<Broker>, started: Instant) {
    for (topic, value) in status(broker, started) {
        broker.publish_detached(Arc::new(Message {
            topic: topic.to_owned(),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            publisher: None,
            received_at: Instant::now(),
        }));
    }
}
