//! One openraft group per replicated queue partition ("cluster II"), over the
//! partition logs of [`log`] (one [`Storage`] per node: one group commit for all) and
//! the node-to-node links ([`network`]). The group's state machine is the partition
//! of the node's own queue ([`machine`]). The leader measures how far behind each
//! replica is ([`lag`]). Everything here names openraft; the rest of the cluster uses
//! [`PartitionRaft`].

pub mod lag;
pub mod log;
pub mod machine;
pub mod network;
pub mod types;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, SnapshotPolicy};
use roost_queue::Queue;
use roost_storage::Storage;

use crate::link::Links;
use crate::raft::types::NodeId;
use lag::{Lag, ReplicaLag};
use log::PartLog;
use machine::PartMachine;
use network::PartNetwork;
pub use types::PartRpc;
use types::{GroupId, Op, OpOutcome, PartConfig};

/// Timing of partition groups.
#[derive(Debug, Clone, Copy)]
pub struct PartTiming {
    /// Heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// Election timeout range (ms).
    pub election_ms: (u64, u64),
    /// A replica is in sync while it lags its leader by at most this (see [`lag`]).
    pub in_sync_lag: Duration,
}

/// The replicas of a partition as the placement names them.
pub struct Replicas {
    /// Id -> cluster address.
    pub members: BTreeMap<NodeId, String>,
    /// This node is the placement's first replica: it forms the group.
    pub preferred: bool,
}

/// This node's replica of one partition.
pub struct PartitionRaft {
    /// Which partition.
    pub id: GroupId,
    me: NodeId,
    raft: openraft::Raft<PartConfig>,
    early: log::EarlyWaiters,
    lag: Arc<ReplicaLag>,
    /// When this replica last got entries or a heartbeat from a leader.
    heard: parking_lot::Mutex<Option<Instant>>,
}

/// Why a proposal could not be made here.
pub enum NotHere {
    /// Another node leads (or none is known).
    Leader(Option<NodeId>),
    /// It failed (says why).
    Failed(String),
}

impl PartitionRaft {
    /// Starts this node's replica of `id`, its log in `storage`, its state `queue`'s
    /// partition. A pristine group is formed with `replicas` (see [`Replicas`]).
    pub async fn start(
        me: NodeId,
        id: GroupId,
        storage: &Storage,
        queue: Queue,
        replicas: &Replicas,
        links: Arc<Links>,
        timing: PartTiming,
    ) -> Result<PartitionRaft, String> {
        let preferred = replicas.preferred;
        let replicas = &replicas.members;
        let name = format!("p.{}.{}", id.queue, id.partition);
        let log = PartLog::open(storage, &name)?;
        let early = log.early_waiters();
        let machine = PartMachine::new(queue, id.partition);
        let config = Config {
            cluster_name: format!("roost-{id}"),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_ms.0,
            election_timeout_max: timing.election_ms.1,
            snapshot_policy: SnapshotPolicy::Never,
            // Entries are batches (up to `outbox::MAX_BATCH_BYTES` of messages, or
            // one larger message; a third more as JSON): a follower that is behind
            // gets at most this many per message, under the link's 64 MiB frame with
            // messages up to the default `max_packet_size` (1 MiB).
            max_payload_entries: 32,
            ..Config::default()
        }
        .validate()
        .map_err(|e| format!("partition {id} settings: {e}"))?;
        let lag = Arc::new(ReplicaLag::new(timing.in_sync_lag));
        let network = PartNetwork {
            links,
            group: id.clone(),
            lag: lag.clone(),
        };
        let raft = openraft::Raft::new(me, Arc::new(config), network, log, machine)
            .await
            .map_err(|e| format!("cannot start partition {id}: {e}"))?;
        watch_log_end(&raft, me, lag.clone());
        if !raft.is_initialized().await.unwrap_or(true) {
            let members: BTreeMap<NodeId, BasicNode> = replicas
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
                .collect();
            // Only the placement's first replica forms the group, so it is the first
            // leader: leaders spread over the nodes as the placement spreads them. The
            // others form it only if no leader has shown up after a while (the first
            // replica was down when the queue was placed).
            let wait = if preferred {
                Duration::ZERO
            } else {
                Duration::from_secs(2)
            };
            let r = raft.clone();
            let group = id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let formed = r.is_initialized().await.unwrap_or(true);
                if !formed && let Err(e) = r.initialize(members).await {
                    tracing::debug!("partition {group} already formed: {e}");
                }
            });
        }
        Ok(PartitionRaft {
            id,
            me,
            raft,
            early,
            lag,
            heard: parking_lot::Mutex::new(None),
        })
    }

    /// The leader as this replica knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this replica leads.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.me)
    }

    /// The replicas (voters).
    pub fn replicas(&self) -> Vec<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// On the leader: how far behind each replica is (the leader included, at zero;
    /// see [`lag`]). Elsewhere: empty.
    pub fn lags(&self) -> Vec<Lag> {
        let m = self.raft.metrics().borrow().clone();
        let Some(replication) = m.replication.as_ref() else {
            return Vec::new();
        };
        let end = m.last_log_index.map_or(0, |i| i + 1);
        let matched: BTreeMap<NodeId, u64> = replication
            .iter()
            .map(|(id, matched)| (*id, matched.map_or(0, |l| l.index + 1)))
            .collect();
        self.lag.lags(self.me, end, &matched, Instant::now())
    }

    /// Tells `f` whether this replica leads, now and on every change, until the group
    /// stops.
    pub fn on_leadership(&self, f: impl Fn(bool) + Send + 'static) {
        let mut rx = self.raft.metrics();
        let me = self.me;
        tokio::spawn(async move {
            let mut was = None;
            loop {
                let now = rx.borrow_and_update().current_leader == Some(me);
                if was != Some(now) {
                    f(now);
                    was = Some(now);
                }
                if rx.changed().await.is_err() {
                    f(false);
                    return;
                }
            }
        });
    }

    /// Commits `op` if this replica leads. A change with a request id
    /// (`ack_mode = "leader"`, see [`Op::Batch`]) is answered as soon as this node's
    /// log has it on disk, commit or not, with [`OpOutcome::Produced`] and the offset
    /// of its first message.
    pub async fn propose_here(&self, op: Op) -> Result<OpOutcome, NotHere> {
        let Some(r) = op.early().filter(|_| op.produces() > 0) else {
            return Self::write_with(&self.raft, op).await;
        };
        let (tx, on_disk) = tokio::sync::oneshot::channel();
        self.early.lock().insert(r, tx);
        let raft = self.raft.clone();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        // The commit goes on after the answer; its outcome is only needed when it comes
        // first (not the leader, or the write failed).
        tokio::spawn(async move {
            let _ = done_tx.send(Self::write_with(&raft, op).await);
        });
        let outcome = tokio::select! {
            Ok(k) = on_disk => Ok(OpOutcome::Produced(k)),
            Ok(result) = done => result,
            else => Err(NotHere::Failed("the partition's Raft stopped".into())),
        };
        self.early.lock().remove(&r);
        outcome
    }

    async fn write_with(raft: &openraft::Raft<PartConfig>, op: Op) -> Result<OpOutcome, NotHere> {
        raft.client_write(op)
            .await
            .map(|r| r.data)
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    NotHere::Leader(f.leader_id)
                }
                e => NotHere::Failed(e.to_string()),
            })
    }

    /// Answers a peer's message for this group.
    pub async fn answer(&self, rpc: PartRpc) -> Result<Bytes, String> {
        match rpc {
            PartRpc::Append(rpc) => {
                *self.heard.lock() = Some(Instant::now());
                json(&self.raft.append_entries(rpc).await)
            }
            PartRpc::Vote(rpc) => json(&self.raft.vote(rpc).await),
            PartRpc::Snapshot(rpc) => json(&self.raft.install_snapshot(rpc).await),
            PartRpc::Propose(op) => match self.propose_here(op).await {
                Ok(outcome) => json(&outcome),
                Err(NotHere::Leader(l)) => Err(format!("not the leader (leader: {l:?})")),
                Err(NotHere::Failed(why)) => Err(why),
            },
            PartRpc::Lags => json(&self.lags()),
        }
    }

    /// When this replica last got entries or a heartbeat from a leader (`None`: not
    /// since it started). openraft's replicas refuse to vote for anyone else until a
    /// leader lease has passed since then.
    pub fn heard(&self) -> Option<Instant> {
        *self.heard.lock()
    }

    /// Stands for election now.
    pub async fn elect(&self) {
        let _ = self.raft.trigger().elect().await;
    }

    /// Stops the group.
    pub async fn shut_down(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// Tells `lag` of every change of whether `me` leads and where its log ends, until the
/// group stops.
fn watch_log_end(raft: &openraft::Raft<PartConfig>, me: NodeId, lag: Arc<ReplicaLag>) {
    let mut rx = raft.metrics();
    tokio::spawn(async move {
        loop {
            {
                let m = rx.borrow_and_update();
                let end = m.last_log_index.map_or(0, |i| i + 1);
                lag.observe(
                    m.current_leader == Some(me),
                    m.current_term,
                    end,
                    Instant::now(),
                );
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

fn json<T: serde::Serialize>(t: &T) -> Result<Bytes, String> {
    serde_json::to_vec(t)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}
