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

use roost_engine::broker::Broker;
use roost_engine::metrics::DropReason;

/// Publishes the status topics every `interval` until shutdown.
pub async fn publish_periodically(
    broker: Arc<Broker>,
    interval: Duration,
    started: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    let mut load = Load::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let counters = Counters::read(&broker);
                load.update(&counters, Instant::now());
                publish_once(&broker, status(&broker, started, &counters, &load));
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// The broker's cumulative counters, read once per tick for the status topics and the
/// `load/...` rates.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    received: u64,
    sent: u64,
    dropped: u64,
    payload_in: u64,
    payload_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    connections: u64,
}

/// Names of the `$SYS/broker/load/<name>/{1min,5min,15min}` topics.
const LOADS: [&str; 8] = [
    "messages/received",
    "messages/sent",
    "publish/received",
    "publish/sent",
    "publish/dropped",
    "bytes/received",
    "bytes/sent",
    "connections",
];

impl Counters {
    /// The counters now.
    pub fn read(broker: &Broker) -> Counters {
        let m = &broker.metrics;
        let (bytes_in, bytes_out) = m.network_bytes();
        Counters {
            received: m.received_by_qos().iter().sum(),
            sent: m.sent_by_qos().iter().sum(),
            dropped: DropReason::ALL.iter().map(|r| m.dropped_for(*r)).sum(),
            payload_in: m.received_bytes_by_qos().iter().sum(),
            payload_out: m.sent_bytes_by_qos().iter().sum(),
            bytes_in,
            bytes_out,
            connections: m.connections_accepted(),
        }
    }

    /// The values the `load/...` topics are rates of, in [`LOADS`] order.
    fn loads(&self) -> [u64; LOADS.len()] {
        [
            self.received,
            self.sent,
            self.received,
            self.sent,
            self.dropped,
            self.bytes_in,
            self.bytes_out,
            self.connections,
        ]
    }
}

/// Mosquitto's load figures: per-minute rates smoothed over 1, 5 and 15 minutes with
/// exponentially decaying weights, so a dashboard sees a trend, not each tick's noise.
#[derive(Debug, Default)]
pub struct Load {
    last: Option<(Counters, Instant)>,
    /// Per-minute averages, `[counter][window]`.
    averages: [[f64; 3]; LOADS.len()],
}

/// The averaging windows, in seconds, and their topic suffixes.
const WINDOWS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

impl Load {
    fn update(&mut self, now_counters: &Counters, now: Instant) {
        if let Some((before, at)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.0 {
                let (now_values, before_values) = (now_counters.loads(), before.loads());
                for (i, avg) in self.averages.iter_mut().enumerate() {
                    let per_minute =
                        now_values[i].saturating_sub(before_values[i]) as f64 * 60.0 / dt;
                    for (w, (window, _)) in WINDOWS.iter().enumerate() {
                        let keep = (-dt / window).exp();
                        avg[w] = avg[w] * keep + per_minute * (1.0 - keep);
                    }
                }
            }
        }
        self.last = Some((*now_counters, now));
    }
}

/// The status topics and their values, from `counters` read this tick.
pub fn status(
    broker: &Broker,
    started: Instant,
    counters: &Counters,
    load: &Load,
) -> Vec<(String, String)> {
    let c = counters;
    let connected = broker.connection_count();
    let sessions = broker.session_count();
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out: Vec<(String, String)> = [
        ("version", format!("roost {}", env!("CARGO_PKG_VERSION"))),
        ("uptime", format!("{} seconds", started.elapsed().as_secs())),
        ("time", unix.to_string()),
        ("clients/connected", connected.to_string()),
        ("clients/active", connected.to_string()),
        (
            "clients/disconnected",
            sessions.saturating_sub(connected).to_string(),
        ),
        (
            "clients/inactive",
            sessions.saturating_sub(connected).to_string(),
        ),
        ("clients/total", sessions.to_string()),
        ("clients/maximum", broker.connection_peak().to_string()),
        (
            "subscriptions/count",
            broker.subscription_count().to_string(),
        ),
        (
            "retained messages/count",
            broker.retained_count().to_string(),
        ),
        ("messages/received", c.received.to_string()),
        ("messages/sent", c.sent.to_string()),
        ("publish/messages/received", c.received.to_string()),
        ("publish/messages/sent", c.sent.to_string()),
        ("publish/messages/dropped", c.dropped.to_string()),
        ("publish/bytes/received", c.payload_in.to_string()),
        ("publish/bytes/sent", c.payload_out.to_string()),
        ("bytes/received", c.bytes_in.to_string()),
        ("bytes/sent", c.bytes_out.to_string()),
    ]
    .into_iter()
    .map(|(topic, value)| (format!("$SYS/broker/{topic}"), value))
    .collect();
    for (name, avg) in LOADS.iter().zip(&load.averages) {
        for ((_, suffix), value) in WINDOWS.iter().zip(avg) {
            out.push((
                format!("$SYS/broker/load/{name}/{suffix}"),
                format!("{value:.2}"),
            ));
        }
    }
    out
}

fn publish_once(broker: &Arc<Broker>, status: Vec<(String, String)>) {
    for (topic, value) in status {
        broker.publish_detached(Arc::new(Message {
            topic,
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Properties::default(),
            publisher: None,
            received_at: Instant::now(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_averages_approach_a_steady_rate() {
        let t0 = Instant::now();
        let mut load = Load::default();
        let mut c = Counters::default();
        load.update(&c, t0);
        // 100 messages received every 10 s: 600 per minute.
        for step in 1..=90 {
            c.received += 100;
            load.update(&c, t0 + Duration::from_secs(10 * step));
        }
        let [one, five, fifteen] = load.averages[0];
        assert!((one - 600.0).abs() < 1.0, "{one}");
        // 15 minutes in, the 5-minute average is close, the 15-minute one still rising.
        assert!((five - 600.0).abs() < 40.0, "{five}");
        assert!(fifteen > 300.0 && fifteen < 600.0, "{fifteen}");
        assert!(one >= five && five >= fifteen);
        // Nothing else moved.
        assert_eq!(load.averages[1], [0.0; 3]);
    }
}
