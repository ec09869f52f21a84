//! Per-queue settings: the `[queues.<name>]` keys of the broker config, the admin API's
//! JSON body, and the `queues/<name>.toml` file each queue keeps next to its data.

use std::time::Duration;

use roost_storage::{LogConfig, Retention};
use serde::{Deserialize, Serialize};

use crate::QueueError;
use crate::group::Settings;

/// When a produce counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the message is on disk (fdatasync, group-committed): survives power loss.
    #[default]
    Fsync,
    /// After the message reached the kernel; synced on an interval: survives `kill -9`,
    /// power loss may cost up to a second.
    Buffered,
}

/// The settings of one queue. Every key has a default; unknown keys are refused so a
/// typo in the config file is an error rather than a silent default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Number of partitions (1..=1024). May grow later, never shrink.
    pub partitions: u32,
    /// When a produce is acknowledged. A change applies when the queue is next opened.
    pub durability: Durability,
    /// A delivery not settled within this long is redelivered (delivery count + 1).
    pub ack_timeout_ms: u64,
    /// After this many deliveries a message that is nacked or times out goes to the
    /// dead-letter queue (at least 1).
    pub max_deliveries: u32,
    /// Redelivery delay after the first nack; doubles with every delivery.
    pub backoff_initial_ms: u64,
    /// Upper bound of the nack backoff.
    pub backoff_max_ms: u64,
    /// Produce fails with quota exceeded once this many messages are unsettled by some
    /// group (or held in the log while the queue has no group).
    pub max_depth: u64,
    /// Produce fails with quota exceeded once the queue's logs hold this many bytes.
    pub max_bytes: u64,
    /// Delete log segments older than this even if some group has not consumed them.
    pub retention_ms: Option<u64>,
    /// Delete the oldest segments of a partition while it holds more than this, even if
    /// some group has not consumed them.
    pub retention_bytes: Option<u64>,
    /// Topic filters whose ordinary publishes the broker also stores in this queue.
    pub capture_filters: Vec<String>,
    /// Largest in-flight window of a consumer that announces no receive maximum (MQTT
    /// 3.x). The window adapts below it: it starts at 32, doubles while the consumer
    /// fills it and settles within 50 ms, halves while it takes longer than 250 ms, and
    /// drops to 4 when a delivery times out (see `group::Member::observe`).
    pub consumer_window: u32,
    /// Size at which a partition log starts a new segment (retention deletes whole
    /// segments). 4 KiB..=1 GiB.
    pub segment_bytes: u64,
    /// With `buffered` durability: how often the logs are synced, in milliseconds.
    pub sync_interval_ms: u64,
    /// Consumer groups the queue may have; a subscription naming one more is refused
    /// ([`QueueError::TooManyGroups`]). 0: no limit. Groups are named by clients, and
    /// each keeps its progress and in-flight state, so this bounds what they can make
    /// the broker hold.
    pub max_consumer_groups: u32,
    /// A produce whose `dedup-id` the queue stored within this many milliseconds is
    /// acknowledged as a success and not stored again. The ids are kept in the message
    /// records, so this holds across restarts (opening the queue reads this window of
    /// every partition).
    pub dedup_window_ms: u64,
    /// Most `dedup-id`s remembered at once; past it the oldest are forgotten before
    /// their window ends (each costs about 100 bytes of memory).
    pub dedup_max_ids: u64,
    /// A last-value queue: per `partition-key`, a group that has not consumed a
    /// message yet gets only the newest one (older ones of the key are skipped as
    /// settled). For device-state feeds. Messages without a key are all delivered.
    pub last_value: bool,
    /// In a cluster: on how many nodes each partition is kept (0: the cluster's
    /// default, 3; clamped to the number of members). 1 keeps the queue on the node
    /// that created it, as on a single node.
    pub replication_factor: u32,
    /// In a cluster: when a produce is acknowledged.
    pub ack_mode: AckMode,
}

/// When a produce to a replicated queue is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once a majority of the partition's replicas has it (under `durability`).
    #[default]
    Quorum,
    /// Once the partition's leader has it on its own disk; replication follows (a
    /// message acknowledged just before its leader is lost may be lost with it).
    Leader,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            partitions: 8,
            durability: Durability::Fsync,
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
            max_depth: 1_000_000,
            max_bytes: 1 << 30,
            retention_ms: None,
            retention_bytes: None,
            capture_filters: Vec::new(),
            consumer_window: 256,
            segment_bytes: 16 << 20,
            sync_interval_ms: 1_000,
            max_consumer_groups: 1_000,
            dedup_window_ms: 120_000,
            dedup_max_ids: 1_000_000,
            last_value: false,
            replication_factor: 0,
            ack_mode: AckMode::Quorum,
        }
    }
}

/// Largest partition count a queue may have.
pub const MAX_PARTITIONS: u32 = 1024;

impl QueueConfig {
    /// Checks ranges and capture filters.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |why: String| Err(QueueError::InvalidConfig(why));
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return bad(format!("partitions must be 1..={MAX_PARTITIONS}"));
        }
        if self.ack_timeout_ms == 0 {
            return bad("ack_timeout_ms must be at least 1".into());
        }
        if self.max_deliveries == 0 {
            return bad("max_deliveries must be at least 1".into());
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return bad("backoff_max_ms must be at least backoff_initial_ms".into());
        }
        if self.max_depth == 0 || self.max_bytes == 0 {
            return bad("max_depth and max_bytes must be at least 1".into());
        }
        if self.consumer_window == 0 {
            return bad("consumer_window must be at least 1".into());
        }
        if !(4096..=1 << 30).contains(&self.segment_bytes) {
            return bad("segment_bytes must be 4096..=1073741824".into());
        }
        if self.sync_interval_ms == 0 {
            return bad("sync_interval_ms must be at least 1".into());
        }
        if self.dedup_max_ids == 0 {
            return bad("dedup_max_ids must be at least 1".into());
        }
        for f in &self.capture_filters {
            if roost_core::topic::validate_filter(f).is_err() || f.starts_with("$queue/") {
                return bad(format!("invalid capture filter {f:?}"));
            }
        }
        Ok(())
    }

    pub(crate) fn settings(&self) -> Settings {
        Settings {
            ack_timeout_ms: self.ack_timeout_ms,
            max_deliveries: self.max_deliveries,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_max_ms: self.backoff_max_ms,
        }
    }

    pub(crate) fn retention(&self) -> Retention {
        Retention {
            max_age: self.retention_ms.map(Duration::from_millis),
            max_bytes: self.retention_bytes,
        }
    }

    pub(crate) fn log_config(&self) -> LogConfig {
        LogConfig {
            durability: match self.durability {
                Durability::Fsync => roost_storage::Durability::Fsync,
                Durability::Buffered => roost_storage::Durability::Buffered,
            },
            segment_bytes: self.segment_bytes,
            sync_interval: Duration::from_millis(self.sync_interval_ms),
            retention: self.retention(),
            ..LogConfig::default()
        }
    }

    /// The dead-letter queue's settings: one partition, everything else inherited.
    /// Its messages are never dead-lettered again (rejecting one discards it).
    pub(crate) fn dead_letter_config(&self) -> QueueConfig {
        QueueConfig {
            partitions: 1,
            capture_filters: Vec::new(),
            last_value: false,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_refuses_unknown_keys() {
        let c: QueueConfig =
            toml::from_str("partitions = 3\ndurability = \"buffered\"").unwrap_or_default();
        assert_eq!(c.partitions, 3);
        assert_eq!(c.durability, Durability::Buffered);
        assert_eq!(c.ack_timeout_ms, 30_000);
        assert!(toml::from_str::<QueueConfig>("partitons = 3").is_err());
        let round: Result<QueueConfig, _> =
            toml::to_string(&c).map(|s| toml::from_str(&s).unwrap_or_default());
        assert_eq!(round.ok(), Some(c));
    }

    #[test]
    fn validation() {
        assert!(QueueConfig::default().validate().is_ok());
        for bad in [
            QueueConfig {
                partitions: 0,
                ..Default::default()
            },
            QueueConfig {
                max_deliveries: 0,
                ..Default::default()
            },
            QueueConfig {
                capture_filters: vec!["a/#/b".into()],
                ..Default::default()
            },
            QueueConfig {
                backoff_max_ms: 1,
                ..Default::default()
            },
            QueueConfig {
                segment_bytes: 100,
                ..Default::default()
            },
            QueueConfig {
                sync_interval_ms: 0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
