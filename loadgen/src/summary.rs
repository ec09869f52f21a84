//! The end-of-run summary: accounting of what was sent against what arrived, and its
//! two renderings (a human block and one JSON object).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;

use crate::client::Subscriber;
use crate::stats::{Delivery, LatencySummary, SeqTracker};

/// Broker memory as seen in /proc/PID/status during `conn`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BrokerMemory {
    /// The broker's pid.
    pub pid: u32,
    /// VmRSS before opening connections, KiB.
    pub rss_before_kib: u64,
    /// VmRSS with every connection open, KiB.
    pub rss_connected_kib: u64,
    /// VmRSS a moment after all connections closed, KiB.
    pub rss_after_close_kib: Option<u64>,
    /// VmHWM (peak RSS) at the end, KiB.
    pub hwm_kib: u64,
    /// (connected - before) / established connections, bytes.
    pub bytes_per_connection: Option<f64>,
}

/// Connection counts.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Connections {
    /// Connections the scenario asked for.
    pub attempted: u64,
    /// Handshakes that completed.
    pub established: u64,
    /// Handshakes that failed.
    pub failed: u64,
    /// Established connections lost before the end.
    pub dropped: u64,
}

/// Everything a run reports.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Topology of pubsub (fan-in, fan-out, p2p, shared).
    pub mode: Option<String>,
    /// host:port.
    pub broker: String,
    /// 3.1, 3.1.1 or 5.
    pub mqtt_version: String,
    /// Publish/subscribe QoS.
    pub qos: Option<u8>,
    /// Payload bytes.
    pub payload_bytes: Option<usize>,
    /// Target publish rate, msg/s over all publishers (None: unbounded).
    pub rate_target: Option<f64>,
    /// Publishers.
    pub publishers: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// Connection counts.
    pub connections: Connections,
    /// Warm-up seconds (traffic not measured).
    pub warmup_s: f64,
    /// Length of the measured window, seconds.
    pub measured_s: f64,
    /// Publishes written in the measured window.
    pub sent: u64,
    /// `sent` per second.
    pub sent_per_s: f64,
    /// Acks received in the measured window (QoS 1/2).
    pub acked: u64,
    /// Deliveries received in the measured window.
    pub delivered: u64,
    /// `delivered` per second.
    pub delivered_per_s: f64,
    /// Publishes written in the whole run (warm-up included).
    pub total_sent: u64,
    /// Deliveries in the whole run, drain included, duplicates included.
    pub total_delivered: u64,
    /// Deliveries the topology calls for: each publish once per subscriber (or group).
    pub expected: u64,
    /// Expected deliveries that never arrived (whole run). None when unknowable (sub).
    pub loss: Option<u64>,
    /// Sequence numbers missing below the highest one seen (sub only).
    pub gaps: Option<u64>,
    /// Deliveries of a message a subscriber (or group) already had.
    pub duplicates: u64,
    /// Messages that arrived after a later one from the same publisher.
    pub out_of_order: u64,
    /// Deliveries to a subscriber that should not have had them (p2p cross-talk).
    pub misrouted: u64,
    /// Deliveries without a roost-bench stamp.
    pub foreign: u64,
    /// QoS 1/2 publishes never acknowledged.
    pub unacked: u64,
    /// End-to-end latency of messages sent in the measured window, microseconds.
    pub latency_us: Option<LatencySummary>,
    /// PUBLISH to PUBACK/PUBCOMP, microseconds.
    pub ack_latency_us: Option<LatencySummary>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Broker memory (`conn` with --broker-pid).
    pub broker_memory: Option<BrokerMemory>,
}

/// Loss, duplicates and misrouting of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Summed over every expected (audience, publisher) pair.
    pub delivery: Delivery,
    /// Deliveries to an audience that was not expected to hear that publisher.
    pub misrouted: u64,
}

/// Accounts every subscriber's trackers against `expect`: the (audience, publisher)
/// pairs the topology calls for, each audience owing one delivery of every message
/// the publisher sent (`sent` by publisher id).
pub fn account(
    expect: &[(usize, u32)],
    sent: &HashMap<u32, u64>,
    subscribers: &[&Subscriber],
) -> Accounting {
    let mut members: HashMap<(usize, u32), Vec<&SeqTracker>> = HashMap::new();
    for sub in subscribers {
        for (pid, t) in sub.trackers.iter().enumerate() {
            if t.received > 0 {
                members
                    .entry((sub.audience, pid as u32))
                    .or_default()
                    .push(t);
            }
        }
    }
    let mut acc = Accounting::default();
    for key in expect {
        let trackers = members.remove(key).unwrap_or_default();
        let sent = sent.get(&key.1).copied().unwrap_or(0);
        acc.delivery.add(Delivery::of(sent, &trackers));
    }
    acc.misrouted = members.values().flatten().map(|t| t.received).sum();
    acc
}

impl Summary {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mode = self
            .mode
            .as_deref()
            .map(|m| format!(" {m}"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "roost-bench {}{mode} against {} (MQTT {})",
            self.scenario, self.broker, self.mqtt_version
        );
        let c = &self.connections;
        let _ = writeln!(
            s,
            "  connections  {} established of {} ({} failed, {} dropped)",
            c.established, c.attempted, c.failed, c.dropped
        );
        if self.scenario != "conn" {
            let shape = if self.scenario == "sub" {
                format!(
                    "{} subscribers, QoS {}",
                    self.subscribers,
                    self.qos.unwrap_or(0)
                )
            } else {
                format!(
                    "{} pub -> {} sub, QoS {}, {} B payload, rate {}",
                    self.publishers,
                    self.subscribers,
                    self.qos.unwrap_or(0),
                    self.payload_bytes.unwrap_or(0),
                    self.rate_target
                        .map_or("unbounded".to_string(), |r| format!("{r} msg/s"))
                )
            };
            let _ = writeln!(s, "  traffic      {shape}");
            let _ = writeln!(
                s,
                "  measured     {:.2} s after {:.2} s warm-up",
                self.measured_s, self.warmup_s
            );
            let _ = writeln!(
                s,
                "  throughput   sent {:.0} msg/s, delivered {:.0} msg/s",
                self.sent_per_s, self.delivered_per_s
            );
            let loss = match (self.loss, self.gaps) {
                (Some(l), _) => format!("loss {l} of {} expected", self.expected),
                (None, Some(g)) => format!("sequence gaps {g}"),
                (None, None) => "loss n/a".into(),
            };
            if self.subscribers > 0 {
                let _ = writeln!(
                    s,
                    "  delivery     {loss}, duplicates {}, out of order {}, misrouted {}",
                    self.duplicates, self.out_of_order, self.misrouted
                );
            }
            if self.qos.is_some_and(|q| q > 0) && self.publishers > 0 {
                let _ = writeln!(s, "  unacked      {}", self.unacked);
            }
            for (name, l) in [
                ("latency", &self.latency_us),
                ("ack latency", &self.ack_latency_us),
            ] {
                if let Some(l) = l {
                    let _ = writeln!(
                        s,
                        "  {name:<12} p50 {} p90 {} p99 {} p99.9 {} max {} ({} samples)",
                        us(l.p50),
                        us(l.p90),
                        us(l.p99),
                        us(l.p99_9),
                        us(l.max),
                        l.count
                    );
                }
            }
        }
        if let Some(m) = &self.broker_memory {
            let _ = writeln!(
                s,
                "  broker rss   {} KiB before, {} KiB connected, {} after close, peak {} KiB",
                m.rss_before_kib,
                m.rss_connected_kib,
                m.rss_after_close_kib
                    .map_or("n/a".to_string(), |k| format!("{k} KiB")),
                m.hwm_kib
            );
            if let Some(b) = m.bytes_per_connection {
                let _ = writeln!(s, "  per conn     {b:.0} bytes of broker RSS");
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors       none");
        } else {
            let _ = writeln!(s, "  errors");
            for (kind, n) in &self.errors {
                let _ = writeln!(s, "    {n:>8}  {kind}");
            }
        }
        s
    }
}

/// Microseconds as a short human figure.
fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_core::QoS;

    fn sub(audience: usize, heard: &[(u32, &[u64])]) -> Subscriber {
        let mut s = Subscriber::new("t".into(), QoS::AtMostOnce, audience);
        for (p, seqs) in heard {
            let p = *p as usize;
            if s.trackers.len() <= p {
                s.trackers.resize_with(p + 1, SeqTracker::default);
            }
            for &q in *seqs {
                s.trackers[p].record(q);
            }
        }
        s
    }

    #[test]
    fn fan_out_loss_duplicates_and_misrouting() {
        // Publisher 0 sent 5 to two subscribers: one got all (one twice), one missed 3.
        let a = sub(0, &[(0, &[0, 1, 2, 3, 4, 4])]);
        let b = sub(1, &[(0, &[0, 1, 2, 4])]);
        let sent = HashMap::from([(0, 5)]);
        let acc = account(&[(0, 0), (1, 0)], &sent, &[&a, &b]);
        assert_eq!(acc.delivery.expected, 10);
        assert_eq!(acc.delivery.lost, 1);
        assert_eq!(acc.delivery.duplicates, 1);
        assert_eq!(acc.misrouted, 0);
        // p2p: subscriber 1 should only hear publisher 1.
        let c = sub(1, &[(0, &[0]), (1, &[0, 1])]);
        let sent = HashMap::from([(0, 1), (1, 2)]);
        let acc = account(&[(0, 0), (1, 1)], &sent, &[&c]);
        assert_eq!(acc.misrouted, 1);
        assert_eq!(acc.delivery.lost, 1, "audience 0 never heard publisher 0");
    }

    #[test]
    fn shared_group_is_one_audience() {
        let a = sub(0, &[(0, &[0, 2, 4]), (1, &[1])]);
        let b = sub(0, &[(0, &[1, 3]), (1, &[0, 1])]);
        let sent = HashMap::from([(0, 5), (1, 2)]);
        let acc = account(&[(0, 0), (0, 1)], &sent, &[&a, &b]);
        assert_eq!(acc.delivery.expected, 7);
        assert_eq!(acc.delivery.lost, 0);
        assert_eq!(
            acc.delivery.duplicates, 1,
            "publisher 1's seq 1 reached both"
        );
    }

    #[test]
    fn render_mentions_the_essentials() {
        let s = Summary {
            scenario: "pubsub".into(),
            subscribers: 1,
            loss: Some(0),
            latency_us: Some(LatencySummary {
                count: 1,
                min: 1.0,
                mean: 1.0,
                p50: 120.0,
                p90: 1.0,
                p99: 2500.0,
                p99_9: 1.0,
                max: 1.0,
            }),
            ..Default::default()
        };
        let text = s.render();
        assert!(text.contains("p50 120 us"), "{text}");
        assert!(text.contains("p99 2.50 ms"), "{text}");
        assert!(text.contains("loss 0"), "{text}");
    }
}
