//! A replicated partition's state machine: the partition of the node's own queue.
//!
//! Applying a produce appends the message to the local partition, applying a settle
//! or a delivery count records it in the local group progress. The queue's files are the state; nothing
//! else is kept. Every start re-applies the log from its first entry (partitions take
//! no snapshots yet): a produce whose offset the local partition already has (the
//! k-th produce of the log is offset k) is skipped, and settles are idempotent.

use std::io::Cursor;

use bytes::Bytes;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use roost_queue::{GroupKey, NewMessage, Queue};

use super::types::{Op, OpOutcome, PartConfig};
use crate::raft::types::NodeId;

/// The state machine of partition `partition` of `queue`.
pub struct PartMachine {
    queue: Queue,
    partition: u32,
    /// Produce entries applied (or found applied already) since this start.
    produced: u64,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

impl PartMachine {
    /// The machine of `partition` of `queue`.
    pub fn new(queue: Queue, partition: u32) -> PartMachine {
        PartMachine {
            queue,
            partition,
            produced: 0,
            applied: None,
            membership: StoredMembership::default(),
        }
    }

    /// Applies one change (not a batch); a produce's append is queued on `appends`
    /// with the offset it must get.
    fn apply_op(&mut self, op: Op, appends: &mut Vec<(u64, Append)>) -> Result<OpOutcome, String> {
        Ok(match op {
            Op::Settle {
                group,
                filter,
                offsets,
            } => {
                let key = GroupKey::new(&group, filter.as_deref());
                let offsets: Vec<(u32, u64)> =
                    offsets.into_iter().map(|o| (self.partition, o)).collect();
                // Not awaited: a settle lost in a crash is applied again at the next
                // start, which re-applies the whole log.
                drop(self.queue.apply_settle(&key, &offsets));
                OpOutcome::Done
            }
            Op::Delivered {
                group,
                filter,
                counts,
            } => {
                let key = GroupKey::new(&group, filter.as_deref());
                let counts: Vec<(u64, u32, u64)> =
                    counts.into_iter().map(|(o, n)| (o, n, 0)).collect();
                self.queue.apply_delivered(&key, self.partition, &counts);
                OpOutcome::Done
            }
            Op::Nacked {
                group,
                filter,
                retries,
            } => {
                let key = GroupKey::new(&group, filter.as_deref());
                self.queue.apply_delivered(&key, self.partition, &retries);
                OpOutcome::Done
            }
            Op::Batch { .. } => return Err("a batch inside a batch".into()),
            op @ Op::Produce { .. } => {
                let k = self.produced;
                self.produced += 1;
                let have = self.queue.next_offset(self.partition).unwrap_or(0);
                if k >= have {
                    let Some(msg) = message_of(op) else {
                        return Err("not a produce".into());
                    };
                    appends.push((k, Box::pin(self.queue.apply_produce(self.partition, msg))));
                }
                OpOutcome::Produced(k)
            }
        })
    }
}

/// A produce's append to the local partition.
type Append = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<roost_queue::MessageId, roost_queue::ProduceError>>
            + Send,
    >,
>;

fn failed(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

/// The message a produce entry carries.
pub fn message_of(op: Op) -> Option<NewMessage> {
    match op {
        Op::Produce {
            subtopic,
            key,
            headers,
            payload,
            dedup_id,
            deliver_at,
            early: _,
        } => Some(NewMessage {
            subtopic,
            partition_key: key.map(Bytes::from),
            headers: Bytes::from(headers),
            payload: Bytes::from(payload),
            dedup_id: dedup_id.map(Bytes::from),
            deliver_at,
        }),
        Op::Settle { .. } | Op::Delivered { .. } | Op::Nacked { .. } | Op::Batch { .. } => None,
    }
}

/// The produce change of a message.
pub fn op_of(msg: NewMessage) -> Op {
    Op::Produce {
        early: None,
        subtopic: msg.subtopic,
        key: msg.partition_key.map(|b| b.to_vec()),
        headers: msg.headers.to_vec(),
        payload: msg.payload.to_vec(),
        dedup_id: msg.dedup_id.map(|b| b.to_vec()),
        deliver_at: msg.deliver_at,
    }
}

impl RaftStateMachine<PartConfig> for PartMachine {
    type SnapshotBuilder = NoSnapshots;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<OpOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<PartConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        // Appends are queued in order as they are applied, and awaited together.
        let mut appends = Vec::new();
        for entry in entries {
            let outcome = match entry.payload {
                EntryPayload::Blank => OpOutcome::Done,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    OpOutcome::Done
                }
                EntryPayload::Normal(Op::Batch { ops, .. }) => OpOutcome::Batch(
                    ops.into_iter()
                        .map(|op| self.apply_op(op, &mut appends))
                        .collect::<Result<_, _>>()
                        .map_err(failed)?,
                ),
                EntryPayload::Normal(op) => self.apply_op(op, &mut appends).map_err(failed)?,
            };
            self.applied = Some(entry.log_id);
            out.push(outcome);
        }
        for (k, append) in appends {
            match append.await {
                Ok(id) if id.offset == k => {}
                Ok(id) => {
                    return Err(failed(format!(
                        "partition {} of {}: produce {k} was stored at offset {}: the local copy \
                         has diverged from the log",
                        self.partition,
                        self.queue.name(),
                        id.offset
                    )));
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        NoSnapshots
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Err(failed("partitions take no snapshots"))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        Err(failed("partitions take no snapshots"))
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartConfig>>, StorageError<NodeId>> {
        Ok(None)
    }
}

/// Partitions keep their whole log (snapshot policy `Never`): nothing to build.
pub struct NoSnapshots;

impl RaftSnapshotBuilder<PartConfig> for NoSnapshots {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartConfig>, StorageError<NodeId>> {
        Err(failed("partitions take no snapshots"))
    }
}
