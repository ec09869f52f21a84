//! Every bridge of the broker: their queues, tasks and metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use roost_engine::broker::Broker;
use tokio::sync::watch;

use super::link;
use super::settings::BridgeConfig;
use super::status::{BridgeError, BridgeStatus};

/// Every bridge of the broker.
#[derive(Debug, Default, Clone)]
pub struct Bridges {
    bridges: Vec<Arc<BridgeStatus>>,
}

impl Bridges {
    /// Creates (or updates) each bridge's queue; call before the broker takes clients,
    /// so their publishes are captured from the first.
    pub fn prepare(
        queues: &roost_queue::Queues,
        configs: &[BridgeConfig],
    ) -> Result<Bridges, BridgeError> {
        let mut bridges = Vec::new();
        for config in configs {
            let name = config.queue_name();
            let wanted = config.queue_config();
            let queue = match queues.get(&name) {
                Some(_) => queues.update(&name, wanted),
                None => queues.create(&name, wanted),
            }
            .map_err(|source| BridgeError::Queue {
                name: config.name.clone(),
                source,
            })?;
            bridges.push(Arc::new(BridgeStatus::new(config.clone(), queue)));
        }
        Ok(Bridges { bridges })
    }

    /// Starts one task per bridge; they end when `shutdown` turns true.
    pub fn start(
        &self,
        broker: &Arc<Broker>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinSet<()>, BridgeError> {
        let mut tasks = tokio::task::JoinSet::new();
        for status in &self.bridges {
            let link = link::Link::new(broker.clone(), status.clone())?;
            broker.exclude_from_capture(link.client_id(), status.config.queue_name());
            tasks.spawn(link.run(shutdown.clone()));
        }
        Ok(tasks)
    }

    /// The bridges, in configuration order.
    pub fn list(&self) -> &[Arc<BridgeStatus>] {
        &self.bridges
    }

    /// Appends the bridges' metric families (Prometheus text format) to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let families: [(&str, &str, &str); 4] = [
            (
                "roost_bridge_up",
                "gauge",
                "1 while the bridge's connection to its remote is up.",
            ),
            (
                "roost_bridge_messages_forwarded_total",
                "counter",
                "Messages a bridge forwarded: out (acknowledged by the remote) and in (published locally).",
            ),
            (
                "roost_bridge_queued_messages",
                "gauge",
                "Messages waiting in a bridge's outgoing queue.",
            ),
            (
                "roost_bridge_messages_dropped_total",
                "counter",
                "Messages a bridge dropped: queue_full (past queue_max_messages or queue_max_bytes), remote_refused, unmapped.",
            ),
        ];
        for (name, kind, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for b in &self.bridges {
                let bridge = &b.config.name;
                match name {
                    "roost_bridge_up" => {
                        let _ =
                            writeln!(out, "{name}{{bridge=\"{bridge}\"}} {}", u8::from(b.is_up()));
                    }
                    "roost_bridge_messages_forwarded_total" => {
                        for (direction, n) in [("out", &b.forwarded_out), ("in", &b.forwarded_in)] {
                            let _ = writeln!(
                                out,
                                "{name}{{bridge=\"{bridge}\",direction=\"{direction}\"}} {}",
                                n.load(Ordering::Relaxed)
                            );
                        }
                    }
                    "roost_bridge_queued_messages" => {
                        let _ = writeln!(out, "{name}{{bridge=\"{bridge}\"}} {}", b.queue.depth());
                    }
                    _ => {
                        for (reason, n) in [
                            ("queue_full", b.queue.quota_refusals()),
                            ("remote_refused", b.remote_refused.load(Ordering::Relaxed)),
                            ("unmapped", b.unmapped.load(Ordering::Relaxed)),
                        ] {
                            let _ = writeln!(
                                out,
                                "{name}{{bridge=\"{bridge}\",reason=\"{reason}\"}} {n}"
                            );
                        }
                    }
                }
            }
        }
    }
}
