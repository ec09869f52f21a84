//! What one node has to propose to one replicated partition, proposed as batches.
//!
//! Every produce, settle and delivery count of a partition would otherwise be an
//! entry of its own: one Raft round, one JSON encoding and one write per replica for
//! each, which is what held replicated queues to a few thousand messages a second,
//! and what a consumer draining a queue quickly turned into a flood of entries that
//! starved the leader's heartbeats. Here they wait in the partition's outbox while
//! its previous proposal is being committed, and go out together as one
//! [`Op::Batch`]: one proposal in flight per partition and node, so the entries of a
//! node reach the log in the order they were made (a key's produces keep their
//! order), and a batch grows with the commit latency, as a group commit does.
//!
//! A batch that cannot be committed fails its produces (their producers hear it and
//! may retry); its settles and delivery counts go back to the front of the outbox
//! and are proposed again (to whoever leads by then), up to [`MAX_TRIES`] times: a
//! settle lost would make the next leader deliver an acknowledged message again.

use std::collections::VecDeque;

use parking_lot::Mutex;
use roost_queue::GroupKey;
use tokio::sync::oneshot;

use crate::raft::partition::types::{Op, OpOutcome};

/// A batch holds messages up to about this many bytes (one larger message goes
/// alone).
pub const MAX_BATCH_BYTES: usize = 256 << 10;
/// A batch holds at most this many changes.
const MAX_BATCH_ITEMS: usize = 4096;
/// How many times a settle or a delivery count is proposed before it is given up.
pub const MAX_TRIES: u32 = 15;

/// Where a produce's offset (or why it has none) is sent.
pub type ProduceAnswer = oneshot::Sender<Result<u64, String>>;

/// One change waiting to be proposed.
pub enum Item {
    /// Store a message ([`Op::Produce`]); the answer goes to `answer`.
    Produce {
        /// The change.
        op: Op,
        /// Its size in bytes.
        bytes: usize,
        /// Where the offset goes.
        answer: ProduceAnswer,
    },
    /// A change of group `key`'s progress.
    Group {
        /// The group.
        key: GroupKey,
        /// What changed.
        change: Change,
        /// Proposals of it that failed so far.
        tries: u32,
    },
}

impl Item {
    /// A group change not tried yet.
    pub fn group(key: &GroupKey, change: Change) -> Item {
        Item::Group {
            key: key.clone(),
            change,
            tries: 0,
        }
    }
}

/// A change of a group's progress, as [`Op::Settle`], [`Op::Delivered`] and
/// [`Op::Nacked`] carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These offsets were settled.
    Settle(Vec<u64>),
    /// These (offset, delivery count)s were delivered.
    Delivered(Vec<(u64, u32)>),
    /// These (offset, delivery count, redelivery time)s were nacked.
    Nacked(Vec<(u64, u32, u64)>),
}

impl Change {
    /// About how many bytes it takes in an entry.
    fn bytes(&self) -> usize {
        match self {
            Change::Settle(v) => v.len() * 8,
            Change::Delivered(v) => v.len() * 12,
            Change::Nacked(v) => v.len() * 20,
        }
    }

    /// The change of group `key` as an entry's change.
    fn op(&self, key: &GroupKey) -> Op {
        let group = key.group.to_string();
        let filter = key.filter.as_deref().map(str::to_owned);
        match self.clone() {
            Change::Settle(offsets) => Op::Settle {
                group,
                filter,
                offsets,
            },
            Change::Delivered(counts) => Op::Delivered {
                group,
                filter,
                counts,
            },
            Change::Nacked(retries) => Op::Nacked {
                group,
                filter,
                retries,
            },
        }
    }

    /// Adds it to `op` if that is the same kind of change of the same group.
    fn join(&self, key: &GroupKey, op: &mut Op) -> bool {
        let same = |group: &str, filter: &Option<String>| {
            *key.group == *group && key.filter.as_deref() == filter.as_deref()
        };
        match (self, op) {
            (
                Change::Settle(v),
                Op::Settle {
                    group,
                    filter,
                    offsets,
                },
            ) if same(group, filter) => offsets.extend_from_slice(v),
            (
                Change::Delivered(v),
                Op::Delivered {
                    group,
                    filter,
                    counts,
                },
            ) if same(group, filter) => counts.extend_from_slice(v),
            (
                Change::Nacked(v),
                Op::Nacked {
                    group,
                    filter,
                    retries,
                },
            ) if same(group, filter) => retries.extend_from_slice(v),
            _ => return false,
        }
        true
    }
}

#[derive(Default)]
struct Waiting {
    items: VecDeque<Item>,
    /// A proposal of this outbox is under way (its sender takes the next batch).
    busy: bool,
}

/// One partition's outbox on one node.
#[derive(Default)]
pub struct Outbox {
    waiting: Mutex<Waiting>,
}

/// A batch taken from an [`Outbox`], to propose as [`Batch::op`].
pub struct Batch {
    /// The entry to propose.
    pub op: Op,
    /// The produces' answers, in the order of their changes in `op`.
    answers: Vec<ProduceAnswer>,
    /// The settles and delivery counts, as taken (proposed again if `op` fails).
    again: Vec<Item>,
}

impl Outbox {
    /// Adds `item`. True when no proposal is under way: the caller must start a
    /// sender, which takes batches until [`Outbox::take`] finds none.
    pub fn push(&self, item: Item) -> bool {
        let mut w = self.waiting.lock();
        w.items.push_back(item);
        !std::mem::replace(&mut w.busy, true)
    }

    /// Puts `items` (a failed batch's settles and counts, see [`Batch::answered`])
    /// back at the front, in their order.
    pub fn put_back(&self, items: Vec<Item>) {
        let mut w = self.waiting.lock();
        for item in items.into_iter().rev() {
            w.items.push_front(item);
        }
    }

    /// The next batch: what waits, up to the limits, in order, as one entry (a
    /// settle or count right after one of the same group joins it). `early` is the
    /// request id to give it under `ack_mode = "leader"`. `None` when nothing waits:
    /// the sender stops (the next push starts another).
    pub fn take(&self, early: impl FnOnce() -> Option<u64>) -> Option<Batch> {
        let mut w = self.waiting.lock();
        if w.items.is_empty() {
            w.busy = false;
            return None;
        }
        let (mut ops, mut answers, mut again) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bytes, mut items) = (0usize, 0usize);
        while let Some(item) = w.items.front() {
            let size = match item {
                Item::Produce { bytes, .. } => *bytes,
                Item::Group { change, .. } => change.bytes(),
            };
            if items > 0 && (bytes + size > MAX_BATCH_BYTES || items >= MAX_BATCH_ITEMS) {
                break;
            }
            bytes += size;
            items += 1;
            let Some(item) = w.items.pop_front() else {
                break;
            };
            match item {
                Item::Produce { op, answer, .. } => {
                    ops.push(op);
                    answers.push(answer);
                }
                Item::Group { key, change, tries } => {
                    // Joined with the change before it when that is of the same kind
                    // and group (their order within the entry is kept either way).
                    if !ops.last_mut().is_some_and(|op| change.join(&key, op)) {
                        ops.push(change.op(&key));
                    }
                    again.push(Item::Group { key, change, tries });
                }
            }
        }
        let early = if answers.is_empty() { None } else { early() };
        Some(Batch {
            op: Op::Batch { ops, early },
            answers,
            again,
        })
    }
}

impl Batch {
    /// Sends every produce its offset from `outcome` (the batch's outcomes, or under
    /// `ack_mode = "leader"` the offset of its first message), or the error. Returns
    /// what to propose again: after a failure, the settles and counts not tried
    /// [`MAX_TRIES`] times yet.
    pub fn answered(self, outcome: Result<OpOutcome, String>) -> Vec<Item> {
        let offsets: Result<Vec<u64>, String> = match (&self.op, outcome) {
            (_, Err(e)) => Err(e),
            (Op::Batch { ops, .. }, Ok(OpOutcome::Batch(outcomes))) => ops
                .iter()
                .zip(outcomes)
                .filter(|(op, _)| matches!(op, Op::Produce { .. }))
                .map(|(_, o)| match o {
                    OpOutcome::Produced(k) => Ok(k),
                    other => Err(format!("unexpected answer {other:?}")),
                })
                .collect(),
            (_, Ok(OpOutcome::Produced(first))) => {
                Ok((0..self.answers.len() as u64).map(|i| first + i).collect())
            }
            (_, Ok(other)) => Err(format!("unexpected answer {other:?}")),
        };
        match offsets {
            Ok(offsets) if offsets.len() == self.answers.len() => {
                for (answer, k) in self.answers.into_iter().zip(offsets) {
                    let _ = answer.send(Ok(k));
                }
                Vec::new()
            }
            Ok(offsets) => {
                let why = format!(
                    "{} offsets answered for {} produces",
                    offsets.len(),
                    self.answers.len()
                );
                self.failed(why)
            }
            Err(why) => self.failed(why),
        }
    }

    fn failed(self, why: String) -> Vec<Item> {
        for answer in self.answers {
            let _ = answer.send(Err(why.clone()));
        }
        let mut again = Vec::new();
        for item in self.again {
            let Item::Group { key, change, tries } = item else {
                continue;
            };
            if tries + 1 < MAX_TRIES {
                again.push(Item::Group {
                    key,
                    change,
                    tries: tries + 1,
                });
                continue;
            }
            let (what, lost) = match change {
                Change::Settle(_) => ("settles", "those messages may be delivered again"),
                Change::Delivered(_) => ("delivery counts", "they start over"),
                Change::Nacked(_) => ("nack backoffs", "those messages may come sooner"),
            };
            tracing::warn!(
                group = %key.group,
                "{what} not replicated after {MAX_TRIES} tries ({why}): {lost} after a failover"
            );
        }
        again
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(n: u8) -> (Item, oneshot::Receiver<Result<u64, String>>) {
        let (answer, rx) = oneshot::channel();
        let op = Op::Produce {
            subtopic: String::new(),
            key: None,
            headers: Vec::new(),
            payload: vec![n; 100],
            dedup_id: None,
            deliver_at: None,
            early: None,
        };
        (
            Item::Produce {
                op,
                bytes: 100,
                answer,
            },
            rx,
        )
    }

    fn settle(group: &str, offsets: &[u64]) -> Item {
        Item::group(
            &GroupKey::new(group, None),
            Change::Settle(offsets.to_vec()),
        )
    }

    #[test]
    fn what_waits_goes_out_as_one_batch_in_order_and_each_produce_gets_its_offset() {
        let outbox = Outbox::default();
        let (p1, mut r1) = produce(1);
        let (p2, mut r2) = produce(2);
        assert!(outbox.push(p1), "the first push starts a sender");
        assert!(!outbox.push(settle("g", &[0])), "one sender at a time");
        assert!(!outbox.push(settle("g", &[1, 2])));
        assert!(!outbox.push(settle("h", &[0])));
        assert!(!outbox.push(p2));
        let batch = outbox.take(|| Some(9)).expect("a batch");
        let Op::Batch { ops, early } = &batch.op else {
            panic!("not a batch")
        };
        assert_eq!(*early, Some(9));
        assert_eq!(ops.len(), 4, "{ops:?}");
        assert!(
            matches!(&ops[1], Op::Settle { group, offsets, .. } if group == "g" && offsets == &[0, 1, 2])
        );
        assert!(matches!(&ops[2], Op::Settle { group, .. } if group == "h"));
        let outcomes = vec![
            OpOutcome::Produced(10),
            OpOutcome::Done,
            OpOutcome::Done,
            OpOutcome::Produced(11),
        ];
        assert!(batch.answered(Ok(OpOutcome::Batch(outcomes))).is_empty());
        assert_eq!(r1.try_recv().expect("answered"), Ok(10));
        assert_eq!(r2.try_recv().expect("answered"), Ok(11));
        assert!(outbox.take(|| None).is_none(), "empty: the sender stops");
        let (p3, _r3) = produce(3);
        assert!(outbox.push(p3), "and the next push starts one again");
    }

    #[test]
    fn early_answers_count_from_the_first_offset_and_batches_keep_to_their_size() {
        let outbox = Outbox::default();
        let mut answers = Vec::new();
        for i in 0..(MAX_BATCH_BYTES / 100 + 10) {
            let (p, r) = produce(i as u8);
            outbox.push(p);
            answers.push(r);
        }
        let first = outbox.take(|| Some(1)).expect("a batch");
        let Op::Batch { ops, .. } = &first.op else {
            panic!()
        };
        let n = ops.len();
        assert_eq!(n, MAX_BATCH_BYTES / 100);
        assert!(first.answered(Ok(OpOutcome::Produced(5))).is_empty());
        for (i, r) in answers.iter_mut().take(n).enumerate() {
            assert_eq!(r.try_recv().expect("answered"), Ok(5 + i as u64));
        }
        let rest = outbox.take(|| None).expect("a batch");
        assert!(matches!(&rest.op, Op::Batch { ops, early: None } if ops.len() == 10));
    }

    #[test]
    fn a_failed_batch_fails_its_produces_and_puts_its_settles_back_until_the_last_try() {
        let outbox = Outbox::default();
        let (p, mut r) = produce(1);
        outbox.push(settle("g", &[4]));
        outbox.push(p);
        let again = outbox
            .take(|| None)
            .expect("a batch")
            .answered(Err("no leader".into()));
        assert_eq!(r.try_recv().expect("answered"), Err("no leader".into()));
        assert_eq!(again.len(), 1);
        outbox.push(settle("g", &[5]));
        outbox.put_back(again);
        let batch = outbox.take(|| None).expect("a batch");
        assert!(
            matches!(&batch.op, Op::Batch { ops, .. } if matches!(&ops[..], [Op::Settle { offsets, .. }] if offsets == &[4, 5])),
            "put back first, then joined with the next settle of the group"
        );
        let mut again = batch.answered(Err("no leader".into()));
        for _ in 0..MAX_TRIES {
            if again.is_empty() {
                break;
            }
            outbox.put_back(again);
            again = outbox
                .take(|| None)
                .expect("a batch")
                .answered(Err("x".into()));
        }
        assert!(again.is_empty(), "given up after {MAX_TRIES} tries");
    }
}
