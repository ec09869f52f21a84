//! roost-queue: durable partitioned `$queue/` queues with consumer groups,
//! acknowledgements, redelivery and dead letters, on roost-storage logs.
//!
//! A [`Queues`] registry holds every queue of a data directory. A [`Queue`] has N
//! partitions, each a segment log; [`Queue::produce`] appends a message to one (by
//! partition key, else subtopic hash, else round-robin) and resolves once it is durable.
//! Consumers [`Queue::join`] a group ([`GroupKey`]: name plus optional subtopic filter)
//! with a [`DeliverySink`]; every group sees every message, members share partitions
//! (one owner per partition), and each member has at most `window` unsettled messages.
//! [`Queue::ack`] settles (durably, through the same group commit), [`Queue::nack`]
//! redelivers after a backoff, [`Queue::reject`] dead-letters; unsettled deliveries come
//! again after the ack timeout or when their consumer leaves, and go to the dead-letter
//! queue ([`Queue::dead_letters`]) after `max_deliveries`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use roost_queue::{DeliverySink, GroupKey, NewMessage, QueueConfig, QueueDelivery, Queues};
//!
//! struct Print;
//! impl DeliverySink for Print {
//!     fn offer(&self, d: QueueDelivery) -> bool {
//!         println!("{} (try {}): {:?}", d.id, d.delivery_count, d.payload);
//!         true
//!     }
//! }
//!
//! let (queues, notes) = Queues::open("./data/queues", QueueConfig::default(), true)?;
//! notes.iter().for_each(|n| eprintln!("{n}"));
//! let orders = queues.get_or_create("orders")?;
//! let id = orders
//!     .produce(NewMessage { subtopic: "eu/dev1".into(), payload: "hi".into(), ..Default::default() })
//!     .await?;
//! let group = GroupKey::new("billing", None);
//! orders.join(&group, Arc::from("worker-1"), 0, Arc::new(Print))?;
//! orders.ack("worker-1", Some(&group), &id).await?;
//! # Ok(()) }
//! ```
//!
//! # Durability and recovery
//!
//! A produce resolves after its record is durable under the queue's durability. An ack
//! changes memory at once and appends a settle record to the queue's progress log; the
//! future [`Queue::ack`] returns resolves when that record is durable. After a crash the
//! progress log is replayed: settled messages whose settle record was durable are never
//! delivered again; everything else is, with its delivery count going on from the last
//! durable one. Each delivery appends its count to the progress log (not awaited: it
//! is durable with the next commit round), and each snapshot is followed by the counts
//! of everything outstanding, so a crash forgets at most the deliveries of its last
//! round. A delivery cut short by a crash counts; a message that has had
//! `max_deliveries` is dead-lettered after the restart instead of delivered. In-flight
//! ownership and nack backoffs live in memory only: after a restart everything
//! unsettled is due at once.
//! A message is settled by dead-lettering only once its copy in the dead-letter queue is
//! durable; if that copy fails it stays for redelivery.
#![deny(missing_docs)]

mod config;
mod damage;
mod dedup;
mod error;
mod format;
mod group;
mod ledger;
mod message;
mod queue;
mod registry;
mod replication;

pub use config::{AckMode, Durability, MAX_PARTITIONS, QueueConfig};
pub use damage::Damage;
pub use error::{ProduceError, QueueError};
pub use format::{DeadReason, InvalidMessageId, MessageId, Origin};
pub use group::{ConsumerId, GroupKey, Window};
pub use queue::transfer::{Redrive, RedriveReport};
pub use queue::{
    DeliverySink, GroupInfo, NewMessage, Produce, Queue, QueueDelivery, QueueInfo, ResetTo,
    Settled, is_partition_log_of, now_ms,
};
pub use registry::{DEAD_LETTER_SUFFIX, Queues, valid_queue_name};
pub use replication::{ReplicatedProduce, Replicator, SettleHow};

#[cfg(test)]
mod tests;
