//! Replicated `$queue/` partitions (cluster II): which queues are replicated, where
//! their partitions live, and the way in for produces and settles.
//!
//! Every queue of a clustered node with a `replication_factor` above 1 (0 means the
//! default, 3; either is clamped to the number of voters) is replicated: its first
//! node places it in the control plane ([`Command::Place`]: per partition, the
//! replicas, spread by a hash of the name), and every replica runs one Raft group per
//! partition it holds ([`PartitionRaft`]). The queue gets a [`Replicator`]: a produce
//! on any node goes to its partition's leader (forwarded over the link when that is
//! another node) and is acknowledged once a majority of the replicas has it; a settle
//! on the leader is committed to the same log, so every replica knows what was
//! consumed. A node delivers only the partitions it leads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use roost_queue::{
    AckMode, GroupKey, MessageId, NewMessage, ProduceError, Queue, QueueConfig, Queues,
    ReplicatedProduce, Replicator, SettleHow,
};
use roost_storage::Storage;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::consensus::Consensus;
use crate::consumers::Consumers;
use crate::link::Links;
use crate::outbox::{Change, Item, Outbox};
use crate::raft::partition::lag::Lag;
use crate::raft::partition::machine::op_of;
use crate::raft::partition::types::{GroupId, Op, OpOutcome};
use crate::raft::partition::{NotHere, PartRpc, PartTiming, PartitionRaft};
use crate::raft::types::{Command, NodeId};
use crate::request::Request;

/// The cluster's default `replication_factor`.
pub const DEFAULT_REPLICATION: u32 = 3;
/// How long a produce or settle may take to commit before it is refused.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node waits for a partition's leader to say how far behind its replicas
/// are (for `GET /api/v1/queues/{name}`).
const LAGS_TIMEOUT: Duration = Duration::from_millis(500);

/// Where a partition lives and who leads it (`GET /api/v1/queues/{name}`).
#[derive(Debug, Clone, Serialize)]
pub struct PartitionPlacement {
    /// The partition.
    pub partition: u32,
    /// Its leader as this node knows it.
    pub leader: Option<NodeId>,
    /// Its replicas.
    pub replicas: Vec<NodeId>,
    /// The replicas in sync with the leader: those whose lag is at most the cluster's
    /// `in_sync_lag_ms` (the leader included). The leader's view, asked over the link
    /// when another node leads; empty when no leader answers.
    pub in_sync: Vec<NodeId>,
    /// How far behind the leader each replica is, in ms (`None`: more than
    /// `in_sync_lag_ms`); the leader's view, empty when no leader answers.
    pub lag_ms: BTreeMap<NodeId, Option<u64>>,
    /// The offset the next message gets in this node's copy of the partition (equal on
    /// every replica once they have applied the same log).
    pub local_end: Option<u64>,
}

/// The replicated partitions of this node.
pub struct Replicas {
    me: NodeId,
    links: Arc<Links>,
    consensus: Arc<dyn Consensus>,
    queues: Queues,
    storage: Storage,
    timing: PartTiming,
    groups: RwLock<HashMap<GroupId, Arc<PartitionRaft>>>,
    /// Groups being started (a message may arrive for one meanwhile).
    starting: Mutex<HashSet<GroupId>>,
    /// Consumers across nodes.
    consumers: Arc<Consumers>,
    /// What this node has to propose, per partition (see [`crate::outbox`]).
    outboxes: Mutex<HashMap<GroupId, Arc<Outbox>>>,
}

impl Replicas {
    /// The replicas of node `me`, their logs in `dir`.
    pub fn open(
        me: NodeId,
        dir: &std::path::Path,
        links: Arc<Links>,
        consensus: Arc<dyn Consensus>,
        queues: Queues,
        timing: PartTiming,
    ) -> Result<Arc<Replicas>, String> {
        let storage = Storage::open(dir)
            .map_err(|e| format!("cannot open the partition logs in {}: {e}", dir.display()))?;
        let consumers = Consumers::new(links.clone(), queues.clone());
        Ok(Arc::new(Replicas {
            consumers,
            me,
            links,
            consensus,
            queues,
            storage,
            timing,
            groups: RwLock::default(),
            starting: Mutex::default(),
            outboxes: Mutex::default(),
        }))
    }

    /// Replicates every queue open now and every queue created from now on.
    pub fn attach(self: &Arc<Self>) {
        for q in self.queues.queues() {
            self.adopt(&q);
        }
        let weak = Arc::downgrade(self);
        self.queues.on_create(Arc::new(move |q| {
            if let Some(r) = weak.upgrade() {
                r.adopt(q);
            }
        }));
    }

    /// The number of replicas `config` asks for here (1: not replicated).
    fn factor(&self, config: &QueueConfig) -> u32 {
        let voters = self.consensus.voters().len().max(1) as u32;
        let asked = match config.replication_factor {
            0 => DEFAULT_REPLICATION,
            n => n,
        };
        asked.min(voters)
    }

    fn adopt(self: &Arc<Self>, q: &Queue) {
        let placed = self.consensus.state().placement(q.name()).is_some();
        if !placed && self.factor(&q.config()) <= 1 {
            return;
        }
        q.set_replicator(Arc::new(QueueReplicator {
            replicas: Arc::downgrade(self),
            queue: Arc::from(q.name()),
        }));
        let me = self.clone();
        let name = q.name().to_owned();
        let config = q.config();
        let factor = self.factor(&config);
        tokio::spawn(async move {
            if me.consensus.state().placement(&name).is_none() {
                me.place(&name, config, factor).await;
            }
            me.ensure(&name).await;
        });
    }

    /// fdatasync durations of the partitions' Raft logs (one storage for all).
    pub fn sync_latency(&self) -> &roost_storage::latency::SyncLatency {
        self.storage.sync_latency()
    }

    /// Proposes where `queue`'s partitions live (the first proposal for a queue wins).
    async fn place(&self, queue: &str, config: QueueConfig, factor: u32) {
        let partitions = config.partitions;
        let mut voters = self.consensus.voters();
        voters.sort_unstable();
        let n = voters.len().max(1);
        let start = queue
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
            as usize;
        let replicas: Vec<Vec<NodeId>> = (0..partitions as usize)
            .map(|p| {
                (0..factor as usize)
                    .map(|i| voters[(start + p + i) % n])
                    .collect()
            })
            .collect();
        loop {
            let cmd = Command::Place {
                queue: queue.to_owned(),
                replicas: replicas.clone(),
                config: Some(config.clone()),
            };
            match self.consensus.propose(cmd).await {
                Ok(_) => return,
                Err(e) => {
                    debug!(queue, "placement not committed yet ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// The control plane placed `queue` (heard from the log).
    pub(crate) fn placed(self: &Arc<Self>, queue: String) {
        let me = self.clone();
        tokio::spawn(async move { me.ensure(&queue).await });
    }

    /// Starts this node's replicas of `queue`'s partitions (creating the queue here if
    /// another node created it).
    async fn ensure(self: &Arc<Self>, queue: &str) {
        let Some(placement) = self.consensus.state().placement(queue) else {
            return;
        };
        let mine: Vec<u32> = placement
            .iter()
            .enumerate()
            .filter(|(_, r)| r.contains(&self.me))
            .map(|(p, _)| p as u32)
            .collect();
        // A node that holds no replica still knows the queue: produces here are
        // forwarded (its consumers get nothing from it: see the README).
        let q = match self.queues.get(queue) {
            Some(q) => q,
            None => {
                // With the settings it was created with where the placement has them.
                let config = QueueConfig {
                    partitions: placement.len() as u32,
                    ..self
                        .consensus
                        .state()
                        .queue_config(queue)
                        .unwrap_or_default()
                };
                match self.queues.create(queue, config) {
                    Ok(q) => q,
                    Err(e) => match self.queues.get(queue) {
                        Some(q) => q,
                        None => {
                            warn!(queue, "cannot create the replicated queue here: {e}");
                            return;
                        }
                    },
                }
            }
        };
        if q.partitions() as usize != placement.len() {
            warn!(
                queue,
                "has {} partitions here but {} in its placement: not replicated here",
                q.partitions(),
                placement.len()
            );
            return;
        }
        if !q.is_replicated() {
            q.set_replicator(Arc::new(QueueReplicator {
                replicas: Arc::downgrade(self),
                queue: Arc::from(queue),
            }));
        }
        let members: BTreeMap<NodeId, String> = self
            .consensus
            .state()
            .members()
            .into_iter()
            .map(|(id, addr, _)| (id, addr))
            .collect();
        for p in mine {
            let id = GroupId {
                queue: queue.to_owned(),
                partition: p,
            };
            if self.groups.read().contains_key(&id) || !self.starting.lock().insert(id.clone()) {
                continue;
            }
            let replicas: BTreeMap<NodeId, String> = placement[p as usize]
                .iter()
                .filter_map(|r| members.get(r).map(|a| (*r, a.clone())))
                .collect();
            let started = PartitionRaft::start(
                self.me,
                id.clone(),
                &self.storage,
                q.clone(),
                &crate::raft::partition::Replicas {
                    members: replicas,
                    preferred: placement[p as usize].first() == Some(&self.me),
                },
                self.links.clone(),
                self.timing,
            )
            .await;
            match started {
                Ok(g) => {
                    let led = q.clone();
                    g.on_leadership(move |leads| led.set_led(p, leads));
                    self.groups.write().insert(id.clone(), Arc::new(g));
                    debug!(partition = %id, "replica started");
                }
                Err(e) => warn!(partition = %id, "replica not started: {e}"),
            }
            self.starting.lock().remove(&id);
        }
    }

    /// Consumers across nodes.
    pub(crate) fn consumers(&self) -> &Arc<Consumers> {
        &self.consumers
    }

    fn group(&self, id: &GroupId) -> Option<Arc<PartitionRaft>> {
        self.groups.read().get(id).cloned()
    }

    /// Answers a peer's message for one of this node's partitions.
    pub(crate) async fn answer(
        self: &Arc<Self>,
        id: GroupId,
        rpc: PartRpc,
    ) -> Result<Bytes, String> {
        if self.group(&id).is_none() {
            // Placed, but this replica is not started yet (the placement was just
            // applied, or this node restarted): start it first, or wait for the start
            // under way.
            self.ensure(&id.queue).await;
            for _ in 0..100 {
                if !self.starting.lock().contains(&id) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        match self.group(&id) {
            Some(g) => g.answer(rpc).await,
            None => Err(format!("no replica of partition {id} here")),
        }
    }

    /// Commits `op` to partition `id` through its leader, wherever it is.
    async fn propose(&self, id: &GroupId, op: Op) -> Result<OpOutcome, String> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let mut turn = 0usize;
        let mut why = String::from("no leader");
        loop {
            let mut target = None;
            if let Some(g) = self.group(id) {
                match tokio::time::timeout_at(deadline, g.propose_here(op.clone())).await {
                    Err(_) => return Err("no majority of the replicas answered in time".into()),
                    Ok(Ok(outcome)) => return Ok(outcome),
                    Ok(Err(NotHere::Leader(l))) => target = l.filter(|&l| l != self.me),
                    Ok(Err(NotHere::Failed(e))) => why = e,
                }
            } else if let Some(placement) = self.consensus.state().placement(&id.queue) {
                // Not a replica: ask them in turn (one that does not lead forwards
                // nothing but says no; the next try asks the next one).
                let replicas = placement
                    .get(id.partition as usize)
                    .cloned()
                    .unwrap_or_default();
                let up: Vec<NodeId> = replicas
                    .into_iter()
                    .filter(|&r| self.links.is_up(r))
                    .collect();
                if !up.is_empty() {
                    target = Some(up[turn % up.len()]);
                    turn += 1;
                }
            }
            if let Some(t) = target {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let request = Request::Part {
                    group: id.clone(),
                    rpc: PartRpc::Propose(op.clone()),
                };
                let body = Bytes::from(serde_json::to_vec(&request).map_err(|e| e.to_string())?);
                match self.links.request(t, body, left).await {
                    Ok(answer) => {
                        if let Ok(outcome) = serde_json::from_slice::<OpOutcome>(&answer) {
                            return Ok(outcome);
                        }
                        why = "malformed answer".into();
                    }
                    Err(e) => why = e.to_string(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(why);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes `item` to partition `id` with whatever else waits for it (see
    /// [`crate::outbox`]), starting the partition's sender if none runs.
    fn send(self: &Arc<Self>, id: &GroupId, item: Item) {
        let outbox = self.outboxes.lock().entry(id.clone()).or_default().clone();
        if outbox.push(item) {
            let me = self.clone();
            let id = id.clone();
            tokio::spawn(async move { me.send_batches(id, outbox).await });
        }
    }

    /// Proposes the batches of `outbox` (partition `id`) one after another until it
    /// is empty.
    async fn send_batches(self: Arc<Self>, id: GroupId, outbox: Arc<Outbox>) {
        // Under `ack_mode = "leader"` the leader answers once its own log has it.
        let leader_mode = self
            .queues
            .get(&id.queue)
            .is_some_and(|q| q.config().ack_mode == AckMode::Leader);
        while let Some(batch) = outbox.take(|| leader_mode.then(request_id)) {
            let outcome = self.propose(&id, batch.op.clone()).await;
            let failed = outcome.is_err();
            let again = batch.answered(outcome);
            if !again.is_empty() {
                outbox.put_back(again);
            }
            if failed {
                // No leader answered in time: give the election a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// A node's link went down: where it led a partition of which this node is a
    /// replica, stand for election once its lease is over (as the control plane does).
    /// The lease runs from when the replicas last heard the leader: this one's own
    /// last heartbeat tells when, and the others heard the same heartbeat within a few
    /// milliseconds, so the first in rank stands 15 ms after that, the next 30 ms
    /// later (no split vote).
    pub(crate) fn peer_down(self: &Arc<Self>, gone: NodeId) {
        self.consumers.node_down(gone);
        // openraft's leader lease is the longest election timeout.
        let lease = Duration::from_millis(self.timing.election_ms.1);
        let led: Vec<Arc<PartitionRaft>> = self
            .groups
            .read()
            .values()
            .filter(|g| g.leader() == Some(gone))
            .cloned()
            .collect();
        let now = std::time::Instant::now();
        for g in led {
            let rank = g
                .replicas()
                .into_iter()
                .filter(|&r| r != gone)
                .position(|r| r == self.me)
                .unwrap_or(0);
            let margin = Duration::from_millis(15 + 30 * rank as u64);
            let lease_over = g.heard().map_or(now + lease, |h| h + lease);
            tokio::spawn(async move {
                let mut wait = (lease_over + margin).saturating_duration_since(now);
                for _ in 0..4 {
                    tokio::time::sleep(wait).await;
                    let leader = g.leader();
                    if leader.is_some() && leader != Some(gone) {
                        return;
                    }
                    g.elect().await;
                    wait = Duration::from_millis(40 + 20 * rank as u64);
                }
            });
        }
    }

    /// Where `queue`'s partitions live, if it is replicated.
    pub async fn placement(self: &Arc<Self>, queue: &str) -> Option<Vec<PartitionPlacement>> {
        let placement = self.consensus.state().placement(queue)?;
        let local = self.queues.get(queue);
        let mut asked = tokio::task::JoinSet::new();
        for (p, replicas) in placement.iter().enumerate() {
            let me = self.clone();
            let id = GroupId {
                queue: queue.to_owned(),
                partition: p as u32,
            };
            let replicas = replicas.clone();
            asked.spawn(async move {
                let lags = me.leader_lags(&id, &replicas).await;
                (id.partition, lags)
            });
        }
        let mut lags: BTreeMap<u32, Vec<Lag>> = BTreeMap::new();
        while let Some(answer) = asked.join_next().await {
            if let Ok((p, l)) = answer {
                lags.insert(p, l);
            }
        }
        Some(
            placement
                .into_iter()
                .enumerate()
                .map(|(p, replicas)| {
                    let id = GroupId {
                        queue: queue.to_owned(),
                        partition: p as u32,
                    };
                    let lags = lags.remove(&id.partition).unwrap_or_default();
                    PartitionPlacement {
                        partition: p as u32,
                        leader: self.group(&id).and_then(|g| g.leader()),
                        replicas,
                        in_sync: lags
                            .iter()
                            .filter(|l| l.in_sync())
                            .map(|l| l.replica)
                            .collect(),
                        lag_ms: lags
                            .iter()
                            .map(|l| (l.replica, l.lag.map(|d| d.as_millis() as u64)))
                            .collect(),
                        local_end: local.as_ref().and_then(|q| q.next_offset(p as u32)),
                    }
                })
                .collect(),
        )
    }

    /// The lag of each replica of partition `id` as its leader sees it: this node's
    /// own view when it leads, else the answer of the leader it knows (or of the first
    /// of `replicas` that leads, on a node that holds no replica); empty when no leader
    /// answers in time.
    async fn leader_lags(&self, id: &GroupId, replicas: &[NodeId]) -> Vec<Lag> {
        let g = self.group(id);
        if let Some(g) = &g
            && g.is_leader()
        {
            return g.lags();
        }
        let asked: Vec<NodeId> = match g.as_ref().map(|g| g.leader()) {
            Some(Some(leader)) => vec![leader],
            Some(None) => Vec::new(),
            None => replicas.to_vec(),
        };
        for target in asked.into_iter().filter(|&t| t != self.me) {
            let request = Request::Part {
                group: id.clone(),
                rpc: PartRpc::Lags,
            };
            let Ok(body) = serde_json::to_vec(&request) else {
                return Vec::new();
            };
            let answer = self
                .links
                .request(target, Bytes::from(body), LAGS_TIMEOUT)
                .await;
            if let Ok(lags) = answer.map(|a| serde_json::from_slice::<Vec<Lag>>(&a))
                && let Ok(lags) = lags
                && !lags.is_empty()
            {
                return lags;
            }
        }
        Vec::new()
    }

    /// Stops every group (at shutdown).
    pub async fn shut_down(&self) {
        let groups: Vec<Arc<PartitionRaft>> = self.groups.read().values().cloned().collect();
        for g in groups {
            g.shut_down().await;
        }
        info!("replicated partitions stopped");
    }
}

/// A request id for an `ack_mode = "leader"` proposal: unique within this process,
/// and random from one process to the next (a leader matches its log's entries to the
/// proposals waiting on it by this id).
fn request_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The [`Replicator`] of one queue.
struct QueueReplicator {
    replicas: Weak<Replicas>,
    queue: Arc<str>,
}

impl QueueReplicator {
    fn partition(&self, partition: u32) -> GroupId {
        GroupId {
            queue: self.queue.to_string(),
            partition,
        }
    }

    /// Sends one item per partition of `items` ((partition, item) pairs), made by
    /// `item` from that partition's share.
    fn send_by_partition<T>(
        &self,
        items: impl IntoIterator<Item = (u32, T)>,
        item: impl Fn(Vec<T>) -> Item,
    ) {
        let Some(r) = self.replicas.upgrade() else {
            return;
        };
        let mut by_partition: BTreeMap<u32, Vec<T>> = BTreeMap::new();
        for (p, t) in items {
            by_partition.entry(p).or_default().push(t);
        }
        for (p, ts) in by_partition {
            r.send(&self.partition(p), item(ts));
        }
    }
}

impl Replicator for QueueReplicator {
    fn produce(&self, partition: u32, msg: NewMessage) -> ReplicatedProduce {
        let replicas = self.replicas.clone();
        let queue = self.queue.clone();
        Box::pin(async move {
            let unavailable = |why: String| ProduceError::Unavailable {
                queue: queue.to_string(),
                partition,
                why,
            };
            let r = replicas
                .upgrade()
                .ok_or_else(|| unavailable("the cluster is shutting down".into()))?;
            // A queue created a moment ago is placed by its first write.
            let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
            while r.consensus.state().placement(&queue).is_none() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(unavailable("the queue is not placed yet".into()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let bytes = msg.payload.len() + msg.headers.len() + msg.subtopic.len();
            let (answer, offset) = tokio::sync::oneshot::channel();
            r.send(
                &GroupId {
                    queue: queue.to_string(),
                    partition,
                },
                Item::Produce {
                    op: op_of(msg),
                    bytes,
                    answer,
                },
            );
            let offset = offset
                .await
                .map_err(|_| unavailable("the cluster is shutting down".into()))?
                .map_err(unavailable)?;
            Ok(MessageId {
                queue: queue.clone(),
                partition,
                offset,
            })
        })
    }

    fn settled(&self, key: &GroupKey, offsets: &[(u32, u64)]) {
        self.send_by_partition(offsets.iter().copied(), |offsets| {
            Item::group(key, Change::Settle(offsets))
        });
    }

    fn delivered(&self, key: &GroupKey, counts: &[(u32, u64, u32)]) {
        self.send_by_partition(counts.iter().map(|&(p, o, n)| (p, (o, n))), |counts| {
            Item::group(key, Change::Delivered(counts))
        });
    }

    fn nacked(&self, key: &GroupKey, retries: &[(u32, u64, u32, u64)]) {
        self.send_by_partition(
            retries.iter().map(|&(p, o, n, due)| (p, (o, n, due))),
            |retries| Item::group(key, Change::Nacked(retries)),
        );
    }

    fn joined(&self, key: &GroupKey, consumer: &str, window: u32) {
        if let Some(r) = self.replicas.upgrade() {
            r.consumers.joined(&self.queue, key, consumer, window);
        }
    }

    fn left(&self, key: Option<&GroupKey>, consumer: &str) {
        if let Some(r) = self.replicas.upgrade() {
            r.consumers.left(&self.queue, key, consumer);
        }
    }

    fn settle_elsewhere(
        &self,
        how: SettleHow,
        consumer: &str,
        key: Option<&GroupKey>,
        id: &MessageId,
    ) -> bool {
        self.replicas
            .upgrade()
            .is_some_and(|r| r.consumers.settle_elsewhere(how, consumer, key, id))
    }
}
