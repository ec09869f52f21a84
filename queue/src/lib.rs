//! roost-queue: durable partitioned `$queue/` queues.
#![deny(missing_docs)]

#[allow(dead_code)] // the storage-backed shell that uses it lands next
mod group;

pub use group::ConsumerId;
