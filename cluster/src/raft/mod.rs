//! The control plane on openraft: one Raft group over all nodes. Everything that
//! names openraft is in this module; the rest of roost sees [`Consensus`].
//!
//! Its log is a roost-storage log in `<data>/cluster/raft` ([`log_store`]); its
//! snapshot a JSON file beside it ([`state`]). Elections are tuned for a LAN: a
//! heartbeat every 50 ms and an election timeout of 120-200 ms (openraft's leader
//! lease is the longest timeout). A leader killed outright closes its links at once:
//! the survivors stand for election as soon as its lease has run out (see
//! `crate::node`), so a new leader is in place about 200-250 ms after the old one dies
//! instead of after a lease plus a second randomized timeout.

pub mod log_store;
pub mod network;
pub mod partition;
pub mod state;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, SnapshotPolicy};
use roost_storage::Storage;
use tokio::sync::mpsc;

use crate::consensus::{BoxFuture, Consensus, Unavailable};
use crate::link::Links;
use crate::request::{MemberChange, Request};
use log_store::LogStore;
use network::Network;
use state::{Applied, ControlState, StateMachine};
use types::{Command, NodeId, Outcome, TypeConfig};

/// The default of [`Timing::in_sync_lag_ms`].
pub const DEFAULT_IN_SYNC_LAG_MS: u64 = 1000;

/// Timing of the control plane and the partition groups (milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Shortest election timeout.
    pub election_min_ms: u64,
    /// Longest election timeout.
    pub election_max_ms: u64,
    /// How long a write may take before it is refused.
    pub write_timeout: Duration,
    /// A replica of a queue partition is in sync while it lags its leader by at most
    /// this: it has every entry the leader had this long ago and answered it within
    /// this long (see `partition::lag`).
    pub in_sync_lag_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 50,
            election_min_ms: 120,
            election_max_ms: 200,
            write_timeout: Duration::from_secs(2),
            in_sync_lag_ms: DEFAULT_IN_SYNC_LAG_MS,
        }
    }
}

impl Timing {
    /// The election timeouts of the queue partitions' groups: three quarters of the
    /// control plane's, at least two heartbeat intervals (100-150 ms by default). A
    /// partition's failover waits for its leader's lease (the longest election
    /// timeout) to run out, and its producers wait with it, so it is shorter there;
    /// the control plane's changes (placements, members) can wait. A leader that
    /// stalls for less than the shortest keeps its partitions.
    pub fn partition_election_ms(&self) -> (u64, u64) {
        let min = (self.election_min_ms * 3 / 4).max(self.heartbeat_ms * 2);
        let max = (self.election_max_ms * 3 / 4).max(min + 1);
        (min, max)
    }
}

/// This node's member of the Raft group.
pub struct RaftNode {
    me: NodeId,
    raft: openraft::Raft<TypeConfig>,
    state: Arc<ControlState>,
    links: Arc<Links>,
    timing: Timing,
    /// The last log index present when the node started (see [`RaftNode::start_index`]).
    start_index: u64,
}

impl RaftNode {
    /// Starts node `me` on the data in `dir`. With `initial` members (id, address) and
    /// a pristine log, the group is formed with them (every initial node does this with
    /// the same list, which openraft allows); otherwise the node waits to be added.
    pub async fn start(
        me: NodeId,
        cluster: &str,
        dir: &Path,
        initial: Option<&BTreeMap<NodeId, String>>,
        links: Arc<Links>,
        timing: Timing,
        notify: mpsc::UnboundedSender<Applied>,
    ) -> Result<RaftNode, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let storage = Storage::open(dir.join("raft"))
            .map_err(|e| format!("cannot open the control-plane storage: {e}"))?;
        let log = LogStore::open(storage)?;
        let start_index = log.last_index();
        let state = Arc::new(ControlState::default());
        let sm = StateMachine::open(state.clone(), notify, dir.join("snapshot.json"))?;
        let config = Config {
            cluster_name: cluster.to_owned(),
            heartbeat_interval: timing.heartbeat_ms,
            election_timeout_min: timing.election_min_ms,
            election_timeout_max: timing.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(2000),
            max_in_snapshot_log_to_keep: 200,
            ..Config::default()
        }
        .validate()
        .map_err(|e| format!("control-plane settings: {e}"))?;
        let network = Network {
            links: links.clone(),
        };
        let raft = openraft::Raft::new(me, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| format!("cannot start the control plane: {e}"))?;
        if let Some(initial) = initial {
            let pristine = !raft.is_initialized().await.unwrap_or(true);
            if pristine {
                let members: BTreeMap<NodeId, BasicNode> = initial
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
                    .collect();
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!("control plane already formed: {e}");
                }
            }
        }
        Ok(RaftNode {
            me,
            raft,
            state,
            links,
            timing,
            start_index,
        })
    }

    /// The last log index this node had when it started: entries up to it were
    /// applied before (in an earlier life), and the node acts on them only once it
    /// has caught up with them.
    pub fn start_index(&self) -> u64 {
        self.start_index
    }

    async fn write_here(&self, cmd: Command) -> Result<Outcome, Result<Option<NodeId>, String>> {
        self.raft
            .client_write(cmd)
            .await
            .map(|r| r.data)
            .map_err(elsewhere)
    }

    async fn members_here(
        &self,
        change: &MemberChange,
    ) -> Result<(), Result<Option<NodeId>, String>> {
        let result = match change {
            MemberChange::Add { id, addr } => {
                self.links.know(*id, addr.clone());
                match self
                    .raft
                    .add_learner(*id, BasicNode::new(addr.clone()), true)
                    .await
                {
                    Ok(_) => {
                        self.raft
                            .change_membership(
                                ChangeMembers::AddVoterIds(BTreeSet::from([*id])),
                                false,
                            )
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
            MemberChange::Remove { id } => {
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([*id])), false)
                    .await
            }
        };
        result.map(|_| ()).map_err(elsewhere)
    }

    /// Runs `here` on this node if it leads, else forwards `request` to the leader,
    /// until one commits or the write timeout passes.
    async fn through_leader<T, F, Fut>(
        &self,
        here: F,
        request: impl Fn() -> Request,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> Result<T, Unavailable>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Result<Option<NodeId>, String>>>,
    {
        let deadline = tokio::time::Instant::now() + self.timing.write_timeout;
        loop {
            let leader = match tokio::time::timeout_at(deadline, here()).await {
                Err(_) => return Err(Unavailable::NoQuorum),
                Ok(Ok(t)) => return Ok(t),
                Ok(Err(Ok(leader))) => leader,
                Ok(Err(Err(why))) => {
                    tracing::debug!("control-plane write failed here: {why}");
                    None
                }
            };
            if let Some(leader) = leader.filter(|&l| l != self.me) {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let body = Bytes::from(serde_json::to_vec(&request()).unwrap_or_default());
                match self.links.request(leader, body, left).await {
                    Ok(answer) => match parse(&answer) {
                        Some(t) => return Ok(t),
                        None => return Err(Unavailable::Refused("malformed answer".into())),
                    },
                    Err(e) => tracing::debug!("control-plane write via node {leader}: {e}"),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Unavailable::NoQuorum);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Why a write could not be made here: `Ok(leader)` when another node leads (or none
/// is known), `Err` with the reason otherwise.
fn elsewhere(
    e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> Result<Option<NodeId>, String> {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Ok(f.leader_id),
        e => Err(e.to_string()),
    }
}

fn json<T: serde::Serialize>(t: &T) -> Result<Bytes, String> {
    serde_json::to_vec(t)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

impl Consensus for RaftNode {
    fn propose(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, Unavailable>> {
        Box::pin(async move {
            self.through_leader(
                || self.write_here(cmd.clone()),
                || Request::Propose(cmd.clone()),
                |b| serde_json::from_slice(b).ok(),
            )
            .await
        })
    }

    fn change_members(&self, change: MemberChange) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            self.through_leader(
                || self.members_here(&change),
                || Request::Members(change.clone()),
                |_| Some(()),
            )
            .await
        })
    }

    fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    fn state(&self) -> &Arc<ControlState> {
        &self.state
    }

    fn applied_index(&self) -> u64 {
        self.state.last_applied().map_or(0, |l| l.index)
    }

    fn answer(&self, request: Request) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            match request {
                Request::Append(rpc) => json(&self.raft.append_entries(rpc).await),
                Request::Vote(rpc) => json(&self.raft.vote(rpc).await),
                Request::Snapshot(rpc) => json(&self.raft.install_snapshot(rpc).await),
                Request::Propose(cmd) => match self.write_here(cmd).await {
                    Ok(outcome) => json(&outcome),
                    Err(Ok(leader)) => Err(format!("not the leader (leader: {leader:?})")),
                    Err(Err(why)) => Err(why),
                },
                Request::Members(change) => match self.members_here(&change).await {
                    Ok(()) => Ok(Bytes::new()),
                    Err(Ok(leader)) => Err(format!("not the leader (leader: {leader:?})")),
                    Err(Err(why)) => Err(why),
                },
                Request::TakeSession { .. }
                | Request::Retained
                | Request::Part { .. }
                | Request::Queue(_) => Err("not a consensus request".into()),
            }
        })
    }

    fn elect(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.raft.trigger().elect().await;
        })
    }

    fn lease(&self) -> Duration {
        // openraft's leader lease is the longest election timeout.
        Duration::from_millis(self.timing.election_max_ms)
    }

    fn voters(&self) -> Vec<NodeId> {
        self.state
            .members()
            .into_iter()
            .filter(|(_, _, voter)| *voter)
            .map(|(id, _, _)| id)
            .collect()
    }

    fn shut_down(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.raft.shutdown().await;
        })
    }
}
