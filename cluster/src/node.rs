//! One node of a cluster at work: the engine's [`Peers`] (publishes out to other
//! nodes, routes, claims) and the [`Handler`] of what its links bring in (publishes
//! from other nodes, session moves, consensus traffic).
//!
//! Session ownership: every CONNECT claims its client id through the control plane
//! (one write; refused with "server unavailable" where no majority can be reached).
//! The claim names the previous owner, which the new owner asks for the session; the
//! previous owner also acts on the applied claim by itself (closing the old connection
//! with 0x8E and keeping the session ready for [`DEPARTING_FOR`]), so a client id has
//! one live owner even when the request is lost. A node that was down or cut off when
//! its clients moved finds out once it has caught up with the log, and gives up those
//! sessions then.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use roost_core::{Message, QoS};
use roost_engine::broker::{Broker, Fanout};
use roost_engine::peers::{Claim, Forwarded, Peers, ShareKey, Unavailable, Wait};
use roost_engine::record;
use roost_engine::session::Session;
use roost_router::Matches;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::consensus::Consensus;
use crate::link::{Handler, Link, Links};
use crate::raft::state::Applied;
use crate::raft::types::{Command, NodeId, Outcome};
use crate::request::Request;
use crate::routes::{Route, node_of};

/// How long a session that moved away waits here for its new owner to fetch it.
pub const DEPARTING_FOR: Duration = Duration::from_secs(30);
/// How long a publisher waits for other nodes to store a forwarded QoS 1/2 message.
const ACK_WAIT: Duration = Duration::from_secs(5);
/// How long a new owner waits for the previous owner to hand a session over.
const TAKE_WAIT: Duration = Duration::from_secs(3);

type Departing = Arc<tokio::sync::Mutex<Option<Session>>>;

/// A CONNECT's claim waiting to be proposed: client id, request id, and who waits.
type ClaimWork = (String, u64, oneshot::Sender<Result<Outcome, Unavailable>>);

/// Claims proposed in one write at most.
const CLAIM_BATCH: usize = 1024;

/// Work for the one task that proposes this node's routes, in order.
enum RouteWork {
    /// A route came (true) or went (false); the sender is told once it was proposed.
    Change(bool, Route, Option<oneshot::Sender<()>>),
    /// State every route of this node afresh (after a restart): what the local
    /// subscriptions are when it is proposed, which covers every change queued before.
    Resync,
}

/// Counters of the data plane.
#[derive(Default)]
pub struct Counters {
    /// Messages sent to another node.
    pub forwarded: AtomicU64,
    /// Messages received from another node.
    pub received: AtomicU64,
    /// Sessions that moved here from another node.
    pub sessions_in: AtomicU64,
    /// Sessions that moved from here to another node.
    pub sessions_out: AtomicU64,
    /// CONNECTs refused because the control plane was out of reach.
    pub claims_refused: AtomicU64,
}

/// A running node.
pub struct Node {
    pub(crate) me: NodeId,
    pub(crate) consensus: Arc<dyn Consensus>,
    pub(crate) links: Arc<Links>,
    broker: Arc<Broker>,
    /// Local subscriptions per route (a route stands while its count is positive).
    local: Mutex<HashMap<Route, usize>>,
    route_tx: mpsc::UnboundedSender<RouteWork>,
    claim_tx: mpsc::UnboundedSender<ClaimWork>,
    departing: Mutex<HashMap<String, (u64, Departing)>>,
    next_request: AtomicU64,
    /// Set once the node has applied the log it had when it started.
    caught_up: AtomicBool,
    start_index: u64,
    /// Data-plane counters.
    pub counters: Arc<Counters>,
    /// The replicated queue partitions of this node.
    pub replicas: Arc<crate::replicas::Replicas>,
}

impl Node {
    pub(crate) fn new(
        me: NodeId,
        consensus: Arc<dyn Consensus>,
        links: Arc<Links>,
        broker: Arc<Broker>,
        start_index: u64,
        replicas: Arc<crate::replicas::Replicas>,
    ) -> Arc<Node> {
        let (route_tx, route_rx) = mpsc::unbounded_channel();
        let (claim_tx, claim_rx) = mpsc::unbounded_channel();
        let node = Arc::new(Node {
            me,
            consensus,
            links,
            broker,
            local: Mutex::default(),
            route_tx,
            claim_tx,
            departing: Mutex::default(),
            // Unique across restarts without storing anything: claims of one start
            // never reuse another start's ids.
            next_request: AtomicU64::new(record::unix_ms() << 16),
            caught_up: AtomicBool::new(false),
            start_index,
            counters: Arc::default(),
            replicas,
        });
        tokio::spawn(node.clone().propose_routes(route_rx));
        tokio::spawn(node.clone().propose_claims(claim_rx));
        node
    }

    /// Proposes route changes in order, as many as are queued in one write; retries
    /// what could not be committed. A resync in a batch replaces the batch: the local
    /// subscriptions are updated before their changes are queued, so the routes they
    /// give at that moment include every change of the batch.
    async fn propose_routes(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<RouteWork>) {
        let mut batch = Vec::new();
        let mut resync = false;
        let mut waiters = Vec::new();
        loop {
            if batch.is_empty() && !resync {
                let Some(work) = rx.recv().await else {
                    return;
                };
                take(work, &mut batch, &mut resync, &mut waiters);
            }
            while let Ok(work) = rx.try_recv() {
                take(work, &mut batch, &mut resync, &mut waiters);
            }
            let cmd = if resync {
                Command::SetRoutes {
                    node: self.me,
                    keep: self.local.lock().keys().cloned().collect(),
                }
            } else {
                Command::Routes {
                    node: self.me,
                    changes: batch.clone(),
                }
            };
            match self.consensus.propose(cmd).await {
                Ok(_) => {
                    batch.clear();
                    resync = false;
                }
                Err(e) => {
                    debug!("route changes not committed yet ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            // A subscriber waits for the first attempt only: without a majority its
            // SUBACK is not held for ever (local delivery works meanwhile).
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Proposes the claims of CONNECTs as they come, as many as are waiting in one
    /// write (a reconnect storm costs a write per batch, not per client). A batch that
    /// cannot be committed refuses its CONNECTs.
    async fn propose_claims(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<ClaimWork>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < CLAIM_BATCH
                && let Ok(more) = rx.try_recv()
            {
                batch.push(more);
            }
            let claims = batch
                .iter()
                .map(|(client, request, _)| (client.clone(), *request))
                .collect();
            let cmd = Command::Claims {
                node: self.me,
                claims,
            };
            // Proposed in its own task: the next batch gathers meanwhile.
            let consensus = self.consensus.clone();
            let waiting: Vec<_> = batch.drain(..).map(|(_, _, tx)| tx).collect();
            tokio::spawn(async move {
                match consensus.propose(cmd).await {
                    Ok(Outcome::Claims(each)) if each.len() == waiting.len() => {
                        for (tx, outcome) in waiting.into_iter().zip(each) {
                            let _ = tx.send(Ok(outcome));
                        }
                    }
                    Ok(_) | Err(_) => {
                        for tx in waiting {
                            let _ = tx.send(Err(Unavailable));
                        }
                    }
                }
            });
        }
    }

    /// Acts on what the control plane applied.
    pub(crate) async fn follow(self: Arc<Self>, mut applied: mpsc::UnboundedReceiver<Applied>) {
        let mut members = std::collections::BTreeSet::new();
        while let Some(a) = applied.recv().await {
            match a {
                Applied::Claimed {
                    client,
                    owner,
                    index,
                    ..
                } => {
                    if owner != self.me && index > self.start_index {
                        self.depart(client, index);
                    }
                }
                Applied::Membership => {
                    let now = self.consensus.state().members();
                    for (id, addr, _) in &now {
                        self.links.know(*id, addr.clone());
                    }
                    let now: std::collections::BTreeSet<NodeId> =
                        now.into_iter().map(|(id, _, _)| id).collect();
                    // A removed member is not dialed or sent anything any more.
                    for gone in members.difference(&now) {
                        if *gone != self.me {
                            info!(node = gone, "no longer a member: link closed");
                            self.links.forget(*gone);
                        }
                    }
                    members = now;
                }
                Applied::Placed(queue) => self.replicas.placed(queue),
            }
        }
    }

    /// Client `client` is now another node's (claim at `epoch`): if it has a session
    /// here, take it from its connection and keep it for the new owner a while.
    fn depart(self: &Arc<Self>, client: String, epoch: u64) {
        if !self.broker.has_session(&client) {
            return;
        }
        let slot: Departing = Arc::default();
        let Ok(guard) = slot.clone().try_lock_owned() else {
            return;
        };
        self.departing
            .lock()
            .insert(client.clone(), (epoch, slot.clone()));
        let node = self.clone();
        tokio::spawn(async move {
            let mut guard = guard;
            let id: Arc<str> = client.as_str().into();
            *guard = node.broker.release(&id).await;
            drop(guard);
            if slot.lock().await.is_some() {
                info!(client_id = %client, "client connected to another node: session handed over");
            }
            tokio::time::sleep(DEPARTING_FOR).await;
            let stale = {
                let mut departing = node.departing.lock();
                match departing.get(&client) {
                    Some((e, s)) if *e == epoch && Arc::ptr_eq(s, &slot) => {
                        departing.remove(&client)
                    }
                    _ => None,
                }
            };
            if let Some((_, slot)) = stale
                && let Some(session) = slot.lock().await.take()
            {
                debug!(client_id = %client, "moved session never fetched: ended");
                node.broker.discard_session(session);
            }
        });
    }

    /// When the link to the leader goes down (a killed process closes its sockets at
    /// once), stands for election as soon as the leader's lease has run out, unless
    /// a new leader is known by then. The survivors stagger by rank so that one of
    /// them asks first and the others vote for it rather than split the vote.
    pub(crate) async fn watch_leader(self: Arc<Self>, mut down: mpsc::UnboundedReceiver<NodeId>) {
        while let Some(gone) = down.recv().await {
            self.replicas.peer_down(gone);
            if self.consensus.leader() != Some(gone) {
                continue;
            }
            let rank = self
                .consensus
                .voters()
                .into_iter()
                .filter(|&v| v != gone)
                .position(|v| v == self.me);
            let Some(rank) = rank else { continue };
            let node = self.clone();
            tokio::spawn(async move {
                // Past the lease by a margin (the voters heard the leader's last
                // heartbeat a little after this node may have), then again while no
                // leader emerges (a refused or split vote).
                let mut wait =
                    node.consensus.lease() + Duration::from_millis(15 + 30 * rank as u64);
                for _ in 0..4 {
                    tokio::time::sleep(wait).await;
                    let leader = node.consensus.leader();
                    if leader.is_some() && leader != Some(gone) {
                        return;
                    }
                    debug!(
                        gone,
                        "leader's link is down and its lease over: standing for election"
                    );
                    node.consensus.elect().await;
                    wait = Duration::from_millis(40 + 20 * rank as u64);
                }
            });
        }
    }

    /// Waits until the node has applied the log it started with, then gives up the
    /// sessions that moved elsewhere meanwhile and states its routes afresh.
    pub(crate) async fn catch_up(self: Arc<Self>) {
        while self.consensus.applied_index() < self.start_index {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.caught_up.store(true, Ordering::Relaxed);
        let state = self.consensus.state().clone();
        for s in self.broker.sessions() {
            if state.owner(&s.client_id).is_some_and(|o| o != self.me) {
                info!(client_id = %s.client_id, "session owned by another node since: ended here");
                if let Some(session) = self.broker.release(&s.client_id).await {
                    drop(session);
                }
            }
        }
        let _ = self.route_tx.send(RouteWork::Resync);
        if self.start_index > 0 {
            // Restarted: what changed while this node was down.
            self.catch_up_retained().await;
        }
    }

    /// Messages for another node that its link could not take.
    pub fn forward_dropped(&self) -> u64 {
        self.links.dropped.load(Ordering::Relaxed)
    }

    /// The cluster as this node sees it.
    ///
    /// The leader is the one this node can act through: none while it has no live link
    /// to the leader it last heard of, nor while it leads without a majority of voters
    /// it can reach (openraft keeps naming a cut-off leader until it hears otherwise).
    pub fn status(&self) -> Status {
        let members: Vec<Member> = self
            .consensus
            .state()
            .members()
            .into_iter()
            .map(|(id, addr, voter)| Member {
                id,
                up: id == self.me || self.links.is_up(id),
                cluster_addr: addr,
                voter,
            })
            .collect();
        let voters = members.iter().filter(|m| m.voter).count();
        let reachable = members.iter().filter(|m| m.voter && m.up).count();
        // A leader cut off with a minority still believes it leads (openraft has no
        // check-quorum step-down), and its followers there still hear from it: a node
        // names a leader only when it reaches a majority of the voters itself.
        let leader = self
            .consensus
            .leader()
            .filter(|&l| reachable * 2 > voters && (l == self.me || self.links.is_up(l)));
        Status {
            node_id: self.me,
            leader,
            members,
            caught_up: self.caught_up.load(Ordering::Relaxed),
        }
    }

    /// Every retained message here, for a peer catching up (see [`Request::Retained`]).
    fn retained_copy(&self) -> Result<Bytes, String> {
        let mut out = Vec::new();
        for msg in self.broker.retained_messages() {
            let record = record::encode_retained(&msg);
            out.extend_from_slice(&(record.len() as u32).to_be_bytes());
            out.extend_from_slice(&record);
            if out.len() > crate::wire::MAX_FRAME - 1024 {
                return Err("too many retained messages to copy in one answer".into());
            }
        }
        Ok(Bytes::from(out))
    }

    /// A node that was down missed the retained messages set and cleared meanwhile:
    /// it takes them from a peer that is up.
    async fn catch_up_retained(&self) {
        let body = Bytes::from(serde_json::to_vec(&Request::Retained).unwrap_or_default());
        for peer in self.links.up() {
            let since = roost_engine::clock::now();
            match self
                .links
                .request(peer, body.clone(), Duration::from_secs(10))
                .await
            {
                Ok(bytes) => {
                    let now = roost_engine::clock::now();
                    let now_ms = record::unix_ms();
                    let mut theirs = Vec::new();
                    let mut rest = &bytes[..];
                    while rest.len() >= 4 {
                        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                        let Some(item) = rest.get(4..4 + n) else {
                            break;
                        };
                        if let Some(m) = record::decode_retained(item, now, now_ms) {
                            theirs.push(m);
                        }
                        rest = &rest[4 + n..];
                    }
                    let (taken, cleared) = self.broker.merge_retained(theirs, since);
                    info!(from = peer, taken, cleared, "retained messages caught up");
                    return;
                }
                Err(e) => warn!(peer, "cannot copy retained messages: {e}"),
            }
        }
    }

    async fn take_session(&self, client: String, epoch: u64) -> Result<Bytes, String> {
        // The claim must be applied here first, so its departure has begun.
        let deadline = tokio::time::Instant::now() + TAKE_WAIT;
        while self.consensus.applied_index() < epoch && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let slot = self.departing.lock().get(&client).map(|(_, s)| s.clone());
        let session = match slot {
            Some(slot) => slot.lock().await.take(),
            None if self.broker.has_session(&client) => {
                let id: Arc<str> = client.as_str().into();
                self.broker.release(&id).await
            }
            None => None,
        };
        Ok(match session {
            Some(session) => {
                self.counters.sessions_out.fetch_add(1, Ordering::Relaxed);
                Bytes::from(record::encode_transfer(&session))
            }
            None => Bytes::new(),
        })
    }
}

/// Adds one piece of route work to the batch being built.
fn take(
    work: RouteWork,
    batch: &mut Vec<(bool, Route)>,
    resync: &mut bool,
    waiters: &mut Vec<oneshot::Sender<()>>,
) {
    match work {
        RouteWork::Change(add, route, waiter) => {
            batch.push((add, route));
            waiters.extend(waiter);
        }
        RouteWork::Resync => *resync = true,
    }
}

/// What `GET /api/v1/cluster` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// This node.
    pub node_id: NodeId,
    /// The control plane's leader, as this node knows it.
    pub leader: Option<NodeId>,
    /// The members.
    pub members: Vec<Member>,
    /// True once this node has applied the log it started with.
    pub caught_up: bool,
}

/// A member as [`Status`] shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    /// Its node id.
    pub id: NodeId,
    /// Its cluster address.
    pub cluster_addr: String,
    /// This node has a live link to it (always true for this node).
    pub up: bool,
    /// A voting member (not a learner still catching up).
    pub voter: bool,
}

fn route_of(share_group: Option<&str>, filter: &str) -> Route {
    Route {
        share: share_group.map(str::to_owned),
        filter: filter.to_owned(),
    }
}

impl Peers for Node {
    fn forward(&self, msg: &Arc<Message>, shared: &[ShareKey]) -> Forwarded {
        let mut matches = Matches::default();
        self.consensus
            .state()
            .routes
            .matches(&msg.topic, &mut matches);
        // Per destination node: the share groups it takes (present: it gets the message).
        let mut plan: BTreeMap<NodeId, Vec<ShareKey>> = BTreeMap::new();
        for s in &matches.direct {
            if let Some(n) = node_of(s)
                && n != self.me
                && self.links.is_up(n)
            {
                plan.entry(n).or_default();
            }
        }
        let mut taken = Vec::new();
        for g in &matches.shared {
            let key = ShareKey {
                group: g.group.clone(),
                filter: g.filter.clone(),
            };
            let here = shared.contains(&key);
            let chosen = g
                .rotation()
                .filter_map(|i| node_of(&g.members[i]))
                .find(|&n| {
                    if n == self.me {
                        here
                    } else {
                        self.links.is_up(n)
                    }
                });
            match chosen {
                Some(n) if n != self.me => {
                    plan.entry(n).or_default().push(key.clone());
                    taken.push(key);
                }
                _ => {}
            }
        }
        if msg.retain {
            // Every node keeps every retained message.
            for n in self.links.up() {
                plan.entry(n).or_default();
            }
        }
        if plan.is_empty() {
            return Forwarded { taken, wait: None };
        }
        let mut encoded = Vec::with_capacity(64 + msg.payload.len() + msg.topic.len());
        record::encode_message(msg, &mut encoded);
        let encoded = Bytes::from(encoded);
        let want_ack = msg.qos != QoS::AtMostOnce;
        let mut acks = Vec::new();
        for (n, shared) in plan {
            let sent = self
                .links
                .get(n)
                .ok_or(crate::link::LinkError::Unreachable(n))
                .and_then(|l| l.publish(shared, encoded.clone(), want_ack));
            match sent {
                Ok(ack) => {
                    self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                    acks.extend(ack);
                }
                Err(_) => {
                    self.links.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let wait: Option<Wait> = (!acks.is_empty()).then(|| {
            Box::pin(async move {
                let all = async {
                    for ack in acks {
                        ack.await;
                    }
                };
                if tokio::time::timeout(ACK_WAIT, all).await.is_err() {
                    debug!("another node did not confirm a forwarded message in time");
                }
            }) as Wait
        });
        Forwarded { taken, wait }
    }

    fn subscribed(&self, share_group: Option<&str>, filter: &str) -> Option<Wait> {
        let route = route_of(share_group, filter);
        {
            let mut local = self.local.lock();
            let n = local.entry(route.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                return None;
            }
        }
        let (tx, rx) = oneshot::channel();
        let _ = self.route_tx.send(RouteWork::Change(true, route, Some(tx)));
        Some(Box::pin(async move {
            let _ = rx.await;
        }))
    }

    fn unsubscribed(&self, share_group: Option<&str>, filter: &str) {
        let route = route_of(share_group, filter);
        {
            let mut local = self.local.lock();
            match local.get_mut(&route) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return;
                }
                Some(_) => {
                    local.remove(&route);
                }
                None => return,
            }
        }
        let _ = self.route_tx.send(RouteWork::Change(false, route, None));
    }

    fn claim(&self, client_id: &Arc<str>) -> Claim {
        let (tx, rx) = oneshot::channel();
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let _ = self.claim_tx.send((client_id.to_string(), request, tx));
        let links = self.links.clone();
        let client = client_id.clone();
        let counters = self.counters.clone();
        Box::pin(async move {
            let outcome = rx.await.unwrap_or(Err(Unavailable)).inspect_err(|_| {
                counters.claims_refused.fetch_add(1, Ordering::Relaxed);
                warn!(client_id = %client, "CONNECT refused: cannot claim the client id (no majority)");
            })?;
            let Outcome::Claimed {
                epoch,
                previous: Some(previous),
            } = outcome
            else {
                return Ok(None);
            };
            let request = Request::TakeSession {
                client: client.to_string(),
                epoch,
            };
            let body = Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
            match links.request(previous, body, TAKE_WAIT).await {
                Ok(bytes) if bytes.is_empty() => Ok(None),
                Ok(bytes) => match record::decode_transfer(&client, &bytes) {
                    Some(session) => {
                        counters.sessions_in.fetch_add(1, Ordering::Relaxed);
                        info!(client_id = %client, from = previous, "session moved here");
                        Ok(Some(session))
                    }
                    None => {
                        warn!(client_id = %client, from = previous, "moved session is damaged: starting a new one");
                        Ok(None)
                    }
                },
                Err(e) => {
                    info!(client_id = %client, from = previous, "session not moved ({e}): starting a new one");
                    Ok(None)
                }
            }
        })
    }
}

impl Handler for Node {
    fn request(
        self: Arc<Self>,
        from: NodeId,
        body: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, String>> + Send>> {
        Box::pin(async move {
            let request: Request =
                serde_json::from_slice(&body).map_err(|e| format!("malformed request: {e}"))?;
            match request {
                Request::TakeSession { client, epoch } => self.take_session(client, epoch).await,
                Request::Retained => self.retained_copy(),
                Request::Part { group, rpc } => self.replicas.answer(group, rpc).await,
                Request::Queue(msg) => self.replicas.consumers().answer(from, msg),
                other => self.consensus.answer(other).await,
            }
        })
    }

    fn publish(self: Arc<Self>, link: Arc<Link>, ack: u64, shared: Vec<ShareKey>, message: Bytes) {
        let now = roost_engine::clock::now();
        let Some(msg) = record::decode_retained(&message, now, record::unix_ms()) else {
            warn!(node = link.node, "undecodable message from a peer dropped");
            return;
        };
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let mut out = Fanout::default();
        self.broker
            .publish_from_peer(Arc::new(msg), &shared, &mut out);
        if ack == 0 && out.ops.is_empty() && out.only_ops() {
            return;
        }
        let broker = self.broker.clone();
        tokio::spawn(async move {
            match broker.settle(out).await {
                Ok(()) if ack != 0 => {
                    link.send(crate::wire::Frame::Acked { id: ack });
                }
                Ok(()) => {}
                Err(e) => warn!("message from node {} not stored: {e}", link.node),
            }
        });
    }
}
