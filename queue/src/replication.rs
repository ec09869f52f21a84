//! How a cluster replicates a queue's partitions: the [`Replicator`] it installs on a
//! queue (see `Queue::set_replicator`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::ProduceError;
use crate::format::MessageId;
use crate::group::GroupKey;
use crate::message::NewMessage;

/// A produce sent through a [`Replicator`].
pub type ReplicatedProduce = Pin<Box<dyn Future<Output = Result<MessageId, ProduceError>> + Send>>;

/// How a queue's partitions are replicated (implemented by the cluster).
pub trait Replicator: Send + Sync + 'static {
    /// Stores `msg` in `partition` through its replicated log; resolves with its id
    /// once the log has it as the queue's `ack_mode` asks.
    fn produce(&self, partition: u32, msg: NewMessage) -> ReplicatedProduce;
    /// Group `key` settled these (partition, offset)s here (a partition this node
    /// leads): every replica must learn it.
    fn settled(&self, key: &GroupKey, offsets: &[(u32, u64)]);
    /// Group `key` delivered these (partition, offset, delivery count)s here (from a
    /// partition this node leads): every replica must learn the counts, so that
    /// `max_deliveries` holds after a failover.
    fn delivered(&self, key: &GroupKey, counts: &[(u32, u64, u32)]);
    /// Group `key` had these (partition, offset, delivery count, redelivery time in ms
    /// since the epoch)s nacked here: every replica must learn the backoff, so that a
    /// new leader does not deliver them again before it is over.
    fn nacked(&self, key: &GroupKey, retries: &[(u32, u64, u32, u64)]);
    /// A consumer here joined group `key` (window as [`crate::Queue::join`] takes it):
    /// the leaders of the partitions elsewhere deliver to it through this node.
    fn joined(&self, key: &GroupKey, consumer: &str, window: u32);
    /// A consumer here left group `key` (every group when `None`).
    fn left(&self, key: Option<&GroupKey>, consumer: &str);
    /// `consumer` settles `id` (`how`); true when another node delivered it, which the
    /// settle was passed on to.
    fn settle_elsewhere(
        &self,
        how: SettleHow,
        consumer: &str,
        key: Option<&GroupKey>,
        id: &MessageId,
    ) -> bool;
}

/// How a consumer settles a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SettleHow {
    /// Acknowledged.
    Ack,
    /// Negatively acknowledged: deliver again after the backoff.
    Nack,
    /// Rejected: to the dead-letter queue.
    Reject,
}

/// The replication state of one queue.
#[derive(Default)]
pub(crate) struct ReplicaState {
    pub(crate) replicator: RwLock<Option<Arc<dyn Replicator>>>,
    /// Per partition, whether this node leads it (only with a replicator).
    pub(crate) led: RwLock<Vec<bool>>,
    /// Members that stand for a consumer of another node (their settles come from
    /// that node and are never passed on again).
    pub(crate) proxies: RwLock<std::collections::HashSet<Arc<str>>>,
}
