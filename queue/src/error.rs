//! Error types, each mapped to the MQTT reason code the broker answers with.

use std::path::PathBuf;

use roost_core::ReasonCode;

/// Errors of registry and group operations.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Queue names are 1 to 128 of `[A-Za-z0-9_.-]`.
    #[error("invalid queue name {0:?}: use 1-128 of [A-Za-z0-9_.-]")]
    InvalidName(String),
    /// No such queue (and auto-creation is off).
    #[error("no queue named {0:?}")]
    NotFound(String),
    /// `create` of a queue that exists.
    #[error("queue {0:?} already exists")]
    AlreadyExists(String),
    /// A setting is out of range, or an update would shrink the partitions.
    #[error("invalid queue config: {0}")]
    InvalidConfig(String),
    /// A consumer filter that is not a valid MQTT topic filter.
    #[error("invalid filter {0:?}")]
    InvalidFilter(String),
    /// The queue was deleted while the call was in progress.
    #[error("queue {0:?} was deleted")]
    Deleted(String),
    /// Creating the queue would pass the registry's `max_queues`.
    #[error("queue {name:?} not created: {max} queues exist (max_queues)")]
    TooManyQueues {
        /// The queue that was not created.
        name: String,
        /// The limit.
        max: usize,
    },
    /// Creating the group would pass the queue's `max_consumer_groups`.
    #[error("group {group:?} not created: queue {queue:?} has {max} groups (max_consumer_groups)")]
    TooManyGroups {
        /// The queue.
        queue: String,
        /// The group that was not created.
        group: String,
        /// The limit.
        max: u32,
    },
    /// Reading or writing a queue's config file failed.
    #[error("queue config file {}: {reason}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The storage layer failed.
    #[error(transparent)]
    Storage(#[from] roost_storage::Error),
}

impl QueueError {
    /// The reason code for an MQTT client whose request failed with this.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            QueueError::InvalidName(_) => ReasonCode::TopicNameInvalid,
            QueueError::InvalidFilter(_) => ReasonCode::TopicFilterInvalid,
            QueueError::NotFound(_) | QueueError::Deleted(_) => ReasonCode::TopicNameInvalid,
            QueueError::TooManyQueues { .. } | QueueError::TooManyGroups { .. } => {
                ReasonCode::QuotaExceeded
            }
            _ => ReasonCode::UnspecifiedError,
        }
    }
}

/// Why a produce was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The queue is at `max_depth` or `max_bytes`: a v5 producer gets PUBACK 0x97, a
    /// 3.1.1 producer's PUBACK waits (see [`crate::Queue::wait_for_room`]).
    #[error("queue {queue:?} is full ({what})")]
    QuotaExceeded {
        /// The queue.
        queue: String,
        /// Which limit: "max_depth" or "max_bytes".
        what: &'static str,
    },
    /// The subtopic is longer than an MQTT topic can be.
    #[error("subtopic of {0} bytes is too long")]
    SubtopicTooLong(usize),
    /// The queue was deleted.
    #[error("queue {0:?} was deleted")]
    Deleted(String),
    /// A queue property of the produce (`dedup-id`, `delay-ms`, `deliver-at`,
    /// `partition-key`, `ack-message-id`) is malformed or too long.
    #[error("invalid queue property: {0}")]
    InvalidProperty(&'static str),
    /// An `ack-message-id` names a message that is not outstanding for this consumer
    /// (unknown, settled already, or held by another consumer): nothing was stored.
    #[error("message {0} is not held by this consumer")]
    NotHeld(String),
    /// The append failed; the message was not stored. [`roost_storage::Error::NoSpace`]
    /// (the disk is full) is answered like a full queue: 0x97 for v5, a waiting PUBACK
    /// for 3.1.1 until space returns.
    #[error(transparent)]
    Storage(#[from] roost_storage::Error),
    /// The queue's partition is replicated and no majority of its replicas can be
    /// reached from here (a cut, or too many nodes down): nothing was stored. Answered
    /// like a full queue: 0x97 for v5, a waiting PUBACK for 3.1.1.
    #[error("partition {partition} of queue {queue:?} has no reachable majority: {why}")]
    Unavailable {
        /// The queue.
        queue: String,
        /// The partition.
        partition: u32,
        /// Why, as the cluster says it.
        why: String,
    },
}

impl ProduceError {
    /// The PUBACK/PUBREC reason code for a v5 producer.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ProduceError::QuotaExceeded { .. }
            | ProduceError::Unavailable { .. }
            | ProduceError::Storage(roost_storage::Error::NoSpace { .. }) => {
                ReasonCode::QuotaExceeded
            }
            ProduceError::SubtopicTooLong(_) => ReasonCode::TopicNameInvalid,
            ProduceError::Deleted(_) => ReasonCode::TopicNameInvalid,
            ProduceError::InvalidProperty(_) => ReasonCode::ImplementationSpecificError,
            // As a `$ack` of a message the consumer does not hold.
            ProduceError::NotHeld(_) => ReasonCode::UnspecifiedError,
            ProduceError::Storage(_) => ReasonCode::UnspecifiedError,
        }
    }

    /// True when the disk had no room for the message, or its replicas no majority:
    /// it may be stored later.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            ProduceError::Storage(roost_storage::Error::NoSpace { .. })
                | ProduceError::Unavailable { .. }
        )
    }
}
