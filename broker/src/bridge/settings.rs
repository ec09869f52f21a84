//! A bridge's settings: the `[[bridge]]` table and its topic mappings.

use std::path::PathBuf;

use roost_core::topic;
use roost_queue::QueueConfig;
use serde::{Deserialize, Serialize};

/// One `[[bridge]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The bridge's name: in logs, metrics, the API, and its queue's name.
    pub name: String,
    /// `host:port` of the remote broker.
    pub address: String,
    /// Client id at the remote (default `roost-bridge-<name>`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Username at the remote.
    #[serde(default)]
    pub username: Option<String>,
    /// Password at the remote.
    #[serde(default)]
    pub password: Option<String>,
    /// File whose content (less a trailing newline) is the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connect with TLS (needs `ca_file`).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA certificates that the remote's certificate must chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for a remote that asks for one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `"3.1.1"` or `"5"`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// What is forwarded.
    pub topics: Vec<TopicMapping>,
    /// Keep-alive towards the remote, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: u16,
    /// QoS 1/2 messages sent and not yet acknowledged by the remote.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Messages the outgoing queue holds at most; newer ones are dropped past it.
    #[serde(default = "default_queue_max_messages")]
    pub queue_max_messages: u64,
    /// Bytes the outgoing queue holds at most.
    #[serde(default = "default_queue_max_bytes")]
    pub queue_max_bytes: u64,
    /// First wait before reconnecting, milliseconds (doubling, with jitter).
    #[serde(default = "default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Longest wait before reconnecting, milliseconds.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

fn default_protocol() -> String {
    "5".into()
}
fn default_keep_alive() -> u16 {
    60
}
fn default_inflight() -> u16 {
    64
}
fn default_queue_max_messages() -> u64 {
    1_000_000
}
fn default_queue_max_bytes() -> u64 {
    1 << 30
}
fn default_reconnect_initial_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}

/// One entry of a bridge's `topics`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMapping {
    /// The topic filter, after the prefixes.
    pub filter: String,
    /// `out`, `in` or `both`.
    pub direction: Direction,
    /// Most QoS a forwarded message travels with (out: the QoS it is sent with).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Put before the filter locally (and stripped from local topics going out).
    #[serde(default)]
    pub local_prefix: String,
    /// Put before the filter at the remote (and stripped from remote topics coming in).
    #[serde(default)]
    pub remote_prefix: String,
}

fn default_qos() -> u8 {
    1
}

/// Which way a mapping forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local publishes to the remote.
    Out,
    /// Remote publishes to local subscribers.
    In,
    /// Both, without looping.
    Both,
}

impl TopicMapping {
    pub(super) fn goes_out(&self) -> bool {
        matches!(self.direction, Direction::Out | Direction::Both)
    }

    pub(super) fn comes_in(&self) -> bool {
        matches!(self.direction, Direction::In | Direction::Both)
    }

    /// The filter on the local side.
    pub(super) fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.filter)
    }

    /// The filter on the remote side.
    pub(super) fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.filter)
    }

    /// The remote topic of a local one, when this mapping sends it out.
    pub(super) fn outward(&self, local: &str) -> Option<String> {
        if !self.goes_out() || !topic::matches(&self.local_filter(), local) {
            return None;
        }
        let rest = local.strip_prefix(&self.local_prefix)?;
        Some(format!("{}{rest}", self.remote_prefix))
    }

    /// The local topic of a remote one, when this mapping brings it in.
    pub(super) fn inward(&self, remote: &str) -> Option<String> {
        if !self.comes_in() || !topic::matches(&self.remote_filter(), remote) {
            return None;
        }
        let rest = remote.strip_prefix(&self.remote_prefix)?;
        Some(format!("{}{rest}", self.local_prefix))
    }
}

impl BridgeConfig {
    /// The name of the bridge's outgoing queue.
    pub fn queue_name(&self) -> String {
        format!("bridge.{}", self.name)
    }

    /// Its client id at the remote.
    pub fn remote_client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("roost-bridge-{}", self.name))
    }

    pub(super) fn is_v5(&self) -> bool {
        self.protocol == "5"
    }

    /// Checks what parses but makes no sense; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 100
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        if !name_ok {
            return Err("name: 1 to 100 of A-Z a-z 0-9 _ -".into());
        }
        if self.address.rsplit_once(':').is_none_or(|(host, port)| {
            host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0)
        }) {
            return Err(format!("address: {:?} is not host:port", self.address));
        }
        if self.protocol != "5" && self.protocol != "3.1.1" {
            return Err(format!(
                "protocol: {:?} is not \"3.1.1\" or \"5\"",
                self.protocol
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err("password and password_file: set one or the other".into());
        }
        if self.tls && self.ca_file.is_none() {
            return Err("tls: needs ca_file (the CA the remote's certificate chains to)".into());
        }
        if !self.tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err("ca_file / cert_file: set, but tls is false".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file: set both or neither".into());
        }
        if self.topics.is_empty() {
            return Err("topics: at least one mapping is needed".into());
        }
        for (i, t) in self.topics.iter().enumerate() {
            if t.qos > 2 {
                return Err(format!("topics[{i}].qos: {} is not 0, 1 or 2", t.qos));
            }
            for (key, prefix) in [
                ("local_prefix", &t.local_prefix),
                ("remote_prefix", &t.remote_prefix),
            ] {
                if prefix.contains(['+', '#']) {
                    return Err(format!("topics[{i}].{key}: no wildcards in a prefix"));
                }
            }
            for filter in [t.local_filter(), t.remote_filter()] {
                if topic::validate_filter(&filter).is_err() || filter.starts_with("$share/") {
                    return Err(format!(
                        "topics[{i}].filter: {filter:?} is not a valid topic filter"
                    ));
                }
            }
        }
        if self.inflight == 0 || self.keep_alive == 0 {
            return Err("inflight and keep_alive: at least 1".into());
        }
        if self.queue_max_messages == 0 || self.queue_max_bytes == 0 {
            return Err("queue_max_messages and queue_max_bytes: at least 1".into());
        }
        if self.reconnect_initial_ms == 0 || self.reconnect_max_ms < self.reconnect_initial_ms {
            return Err("reconnect_initial_ms: at least 1, and at most reconnect_max_ms".into());
        }
        Ok(())
    }

    /// The outgoing queue's settings: one partition (one order), captures of every
    /// outgoing mapping, and no dead letters (a message is retried until the remote
    /// takes it).
    pub(super) fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            partitions: 1,
            capture_filters: self
                .topics
                .iter()
                .filter(|t| t.goes_out())
                .map(TopicMapping::local_filter)
                .collect(),
            max_depth: self.queue_max_messages,
            max_bytes: self.queue_max_bytes,
            max_deliveries: u32::MAX,
            ack_timeout_ms: 10 * 60 * 1000,
            consumer_window: u32::from(self.inflight),
            ..QueueConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(filter: &str, direction: Direction, local: &str, remote: &str) -> TopicMapping {
        TopicMapping {
            filter: filter.into(),
            direction,
            qos: 1,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn prefixes_map_topics_each_way() {
        let out = mapping("sensors/#", Direction::Out, "", "site-1/");
        assert_eq!(
            out.outward("sensors/a/t").as_deref(),
            Some("site-1/sensors/a/t")
        );
        assert_eq!(out.outward("other/a"), None);
        assert_eq!(out.inward("site-1/sensors/a"), None, "out only");
        let both = mapping("cmd/+", Direction::Both, "local/", "remote/");
        assert_eq!(both.outward("local/cmd/x").as_deref(), Some("remote/cmd/x"));
        assert_eq!(both.inward("remote/cmd/y").as_deref(), Some("local/cmd/y"));
        assert_eq!(both.inward("cmd/y"), None);
    }

    #[test]
    fn bad_settings_name_their_key() {
        let good = BridgeConfig {
            name: "cloud".into(),
            address: "broker.example:8883".into(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
            protocol: "5".into(),
            topics: vec![mapping("sensors/#", Direction::Out, "", "site-1/")],
            keep_alive: 60,
            inflight: 64,
            queue_max_messages: 10,
            queue_max_bytes: 1000,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 1000,
        };
        assert_eq!(good.validate(), Ok(()));
        type Change = fn(&mut BridgeConfig);
        let changes: [(Change, &str); 9] = [
            (|c| c.name = "a b".into(), "name"),
            (|c| c.address = "nohost".into(), "address"),
            (|c| c.address = "h:0".into(), "address"),
            (|c| c.protocol = "4".into(), "protocol"),
            (|c| c.tls = true, "tls"),
            (|c| c.topics.clear(), "topics"),
            (|c| c.topics[0].qos = 3, "topics[0].qos"),
            (
                |c| c.topics[0].remote_prefix = "a/#/".into(),
                "topics[0].remote_prefix",
            ),
            (|c| c.topics[0].filter = "a/#/b".into(), "topics[0].filter"),
        ];
        for (change, key) in changes {
            let mut c = good.clone();
            change(&mut c);
            let e = c.validate().expect_err(key);
            assert!(e.starts_with(key), "{key}: {e}");
        }
    }
}
