//! The broker's shared state: sessions, subscriptions, retained messages, routing.
//!
//! Locking: the session map is sharded; a shard lock is held only to look at or swap a
//! slot (or, when a publish is fanned out, to hand deliveries to that shard's clients),
//! never across an await or while routing (routing takes shard locks itself, so
//! holding one while routing could deadlock). The router has its own fine-grained locks
//! and the retained store its own `RwLock`.
//!
//! A session is either attached to a live connection (its state is owned by that
//! connection's task; deliveries go through its bounded mailbox) or detached (its state
//! sits in the map; deliveries are queued into it directly).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hashbrown::hash_table::{self, HashTable};
use parking_lot::{Mutex, RwLock};
use roost_core::topic;
use roost_core::{LastWill, Message, QoS, RetainHandling};
use roost_router::{Matches, Router, Subscription};
use tokio::sync::oneshot;

use crate::auth::Authenticator;
use crate::lifecycle::OfflineTimers;
use crate::mailbox::{self, TrySendError};
use crate::metrics::{DropReason, Limit, Metrics, StoreRefusal};
use crate::peers::{Peers, ShareKey, Wait};
use crate::rate::TokenBucket;
use crate::record as persist;
use crate::retained::{self, Retained, Scan};
use crate::session::{Delivery, Session, ShareRef};
use crate::settings::{Limits, Settings};
use crate::store::{Op, SessionStore};
use roost_queue::Queues;

const SHARDS: usize = 64;

thread_local! {
    /// The order in which [`Broker::deliver_direct`] visits one publish's matches
    /// (shard, hash of the client id, index), kept per thread so that ordering them
    /// allocates nothing per publish.
    static ORDER: std::cell::Cell<Vec<(usize, u64, usize)>> = const { std::cell::Cell::new(Vec::new()) };
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Handed to the subscriber (or queued for it, or waiting for room at it).
    Yes,
    /// Not taken: no such session, an offline one for QoS 0, or tried online only.
    No,
    /// Dropped because the subscriber's mailbox was full: its publisher should let
    /// subscribers run before it routes more.
    Overflowed,
}

/// True when `keys` names the share group `g` matched.
fn names_any(keys: &[ShareKey], g: &roost_router::SharedMatch) -> bool {
    keys.iter()
        .any(|k| k.group == g.group && k.filter == g.filter)
}

/// Counts one more in `count` unless it holds `max` already; the guard gives it back.
/// Serves answered refusals, handshakes in progress and the credential checks waiting
/// in line (the shell's auth gate).
pub fn enter(count: &AtomicUsize, max: usize) -> Option<impl Drop + '_> {
    struct Entered<'a>(&'a AtomicUsize);
    impl Drop for Entered<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Entered(count))
}

/// The broker's side of a connection's mailbox: deliveries and control requests.
pub type MailboxSender = mailbox::Sender<Delivery, Control>;
/// The connection task's side of its mailbox.
pub type Mailbox = mailbox::Receiver<Delivery, Control>;

/// A QoS 1/2 delivery that found its subscriber's channel full.
#[derive(Debug)]
pub struct Blocked {
    /// The subscriber.
    pub client_id: Arc<str>,
    /// Its mailbox.
    pub sender: MailboxSender,
    /// Its connection, whose `stalled` flag is set when a wait for room timed out:
    /// later deliveries drop at once until the subscriber has room again.
    pub client: Arc<ClientInfo>,
    /// The delivery.
    pub delivery: Delivery,
}

/// What routing a publish produced for its publisher to finish.
///
/// Every connection task holds one across its flush, so what only slow subscribers
/// and capturing queues need is boxed, and created when first needed.
#[derive(Default)]
pub struct Fanout {
    /// Store writes to make (and wait for) before acknowledging.
    pub ops: Vec<Op>,
    /// What else to wait for before acknowledging, if anything.
    pub waits: Option<Box<Waits>>,
}

/// What a publisher waits for besides its store writes.
#[derive(Default)]
pub struct Waits {
    /// Deliveries to wait for room for before acknowledging.
    pub blocked: Vec<Blocked>,
    /// A bit per connection id modulo 64 of the connections in `blocked`: a clear bit
    /// says at once that a connection has nothing blocked, so routing a batch with a
    /// few blocked subscribers does not scan the blocked list for every delivery.
    pub blocked_mask: u64,
    /// What else to wait for before acknowledging: copies into queues whose capture
    /// filters matched (already queued for writing, in order), other nodes storing a
    /// forwarded message, a new route becoming known cluster-wide.
    pub pending: Vec<Wait>,
}

impl Fanout {
    pub(crate) fn waits(&mut self) -> &mut Waits {
        self.waits.get_or_insert_default()
    }

    /// True when routing left nothing to do but the store writes.
    pub fn only_ops(&self) -> bool {
        self.waits
            .as_ref()
            .is_none_or(|w| w.blocked.is_empty() && w.pending.is_empty())
    }
}

/// Waits (each at most `wait` from now) for room for blocked deliveries. Returns the
/// store writes that undo the ones that were dropped (counted in `metrics`).
pub async fn send_blocked(blocked: Vec<Blocked>, wait: Duration, metrics: &Metrics) -> Vec<Op> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut undo = Vec::new();
    for b in blocked {
        let seq = b.delivery.seq;
        let sent = matches!(
            tokio::time::timeout_at(deadline, b.sender.send(b.delivery)).await,
            Ok(Ok(()))
        );
        if !sent {
            metrics.dropped(DropReason::SlowSubscriber, 1);
            b.client.stalled.store(true, Ordering::Relaxed);
            tracing::debug!(client_id = %b.client_id, "client not keeping up, message dropped");
            if let Some(seq) = seq {
                undo.push(Op::DeleteEntry(b.client_id, seq));
            }
        }
    }
    undo
}

/// Requests from the broker to a connection task.
#[derive(Debug)]
pub enum Control {
    /// Another connection took the client id: close (v5 DISCONNECT 0x8E) and hand the
    /// session over through `reply`.
    TakeOver {
        /// Receives the session and the will decision of the old connection.
        reply: oneshot::Sender<Handover>,
    },
    /// An administrator ends the connection (v5 DISCONNECT 0x98, administrative
    /// action); the session is kept or ended as on any disconnect.
    Kick,
    /// The server is shutting down (v5 DISCONNECT 0x8B); the will is not published.
    Shutdown,
}

/// What a connection that was taken over gives to its successor.
#[derive(Debug)]
pub struct Handover {
    /// The session state.
    pub session: Session,
    /// The old connection's will, if it still stands and has a delay (a will without
    /// delay is published by the old connection itself).
    pub delayed_will: Option<LastWill>,
}

/// The sending ends a live connection is reached by. Two pointers: the session map
/// holds one per connected client.
#[derive(Debug, Clone)]
pub struct ConnectionHandle {
    /// Deliveries (bounded, so a stalled client cannot grow memory without limit)
    /// and control requests.
    pub mailbox: MailboxSender,
    /// What the broker knows about the connection.
    pub info: Arc<ClientInfo>,
}

/// A live connection as the broker and the admin API see it: one allocation per
/// connection for all of it.
#[derive(Debug)]
pub struct ClientInfo {
    /// Unique per connection, to tell a successor from a predecessor.
    pub id: u64,
    /// The session outlives the connection, so QoS 1/2 deliveries to it are stored.
    pub persistent: bool,
    /// Set while the connection is not keeping up (see [`Blocked::client`]).
    pub stalled: AtomicBool,
    /// Set by the connection's own task when publishes it read overflowed a
    /// subscriber's mailbox, so that it yields before reading on (here rather than in
    /// the task, whose every byte every idle connection pays for).
    pub overflowed: AtomicBool,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// The MQTT version of its CONNECT.
    pub protocol: roost_core::ProtocolVersion,
    /// The username it authenticated with, if any.
    pub username: Option<String>,
    /// When it connected, milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
}

/// A session as the admin API lists it.
#[derive(Debug)]
pub struct SessionInfo {
    /// The client id.
    pub client_id: Arc<str>,
    /// The live connection, if the client is connected.
    pub connection: Option<Arc<ClientInfo>>,
    /// Subscriptions of a stored (offline) session; `None` while connected (its
    /// state is owned by the connection task).
    pub subscriptions: Option<usize>,
    /// Messages queued for a stored session.
    pub queued: Option<usize>,
}

/// A client id with its hash (from the broker's hasher): the hash picks the shard and
/// is reused for the lookup inside it, so a client id is hashed once per lookup.
#[derive(Clone, Copy)]
pub(crate) struct Key<'a> {
    id: &'a str,
    hash: u64,
}

/// Which shard a hash picks: bits that hashbrown uses neither for the bucket index (the
/// low bits, for tables under 2^32 buckets) nor for its control tag (the top seven), so
/// the keys of one shard still spread over its table.
fn shard_index(hash: u64) -> usize {
    (hash >> 32) as usize % SHARDS
}

/// One shard of the session map: the slot of each client id in it.
pub(crate) struct Shard {
    slots: HashTable<(Arc<str>, Slot)>,
    /// The broker's hasher, to rehash entries when the table grows.
    hasher: RandomState,
    /// Sessions in all shards together (shared by the shards, kept by their inserts
    /// and removes), for `max_sessions` without visiting every shard.
    total: Arc<AtomicUsize>,
}

impl Shard {
    fn new(hasher: &RandomState, total: &Arc<AtomicUsize>) -> Self {
        Shard {
            slots: HashTable::new(),
            hasher: hasher.clone(),
            total: total.clone(),
        }
    }

    pub(crate) fn get(&self, key: Key<'_>) -> Option<&Slot> {
        self.slots
            .find(key.hash, |(id, _)| **id == *key.id)
            .map(|(_, slot)| slot)
    }

    pub(crate) fn get_mut(&mut self, key: Key<'_>) -> Option<&mut Slot> {
        self.slots
            .find_mut(key.hash, |(id, _)| **id == *key.id)
            .map(|(_, slot)| slot)
    }

    /// Puts `slot` in place for `key` (whose id is `id`), returning the one it replaces.
    pub(crate) fn insert(&mut self, key: Key<'_>, id: &Arc<str>, slot: Slot) -> Option<Slot> {
        debug_assert_eq!(key.id, &**id);
        let hasher = &self.hasher;
        match self.slots.entry(
            key.hash,
            |(i, _)| **i == *key.id,
            |(i, _)| hasher.hash_one(&**i),
        ) {
            hash_table::Entry::Occupied(mut e) => Some(std::mem::replace(&mut e.get_mut().1, slot)),
            hash_table::Entry::Vacant(e) => {
                e.insert((id.clone(), slot));
                self.total.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, key: Key<'_>) -> Option<Slot> {
        let entry = self
            .slots
            .find_entry(key.hash, |(id, _)| **id == *key.id)
            .ok()?;
        self.total.fetch_sub(1, Ordering::Relaxed);
        Some(entry.remove().0.1)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Slot)> {
        self.slots.iter().map(|(id, slot)| (id, slot))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().map(|(_, slot)| slot)
    }
}

#[derive(Debug)]
pub(crate) enum Slot {
    Online(ConnectionHandle),
    Offline {
        session: Box<Session>,
        /// Bumped on every detach so stale expiry/will timers do nothing.
        generation: u64,
    },
}

/// How a new connection found its session.
#[derive(Debug)]
pub enum Attach {
    /// A stored session, ready to resume.
    Resumed(Box<Session>),
    /// A session still attached elsewhere: await the handover, then resume or clean.
    TakingOver(oneshot::Receiver<Handover>),
    /// No session existed (or it was discarded): start fresh.
    Fresh,
    /// No session existed, and `max_sessions` are held: refused, nothing attached.
    Refused,
}

/// Shared broker state; one per process, behind an `Arc`.
pub struct Broker {
    /// The limits every client meets.
    pub limits: Arc<Limits>,
    /// Who may connect, and the ACL each connection is held to.
    pub auth: Arc<dyn Authenticator>,
    /// The `$queue/` work queues.
    pub queues: Queues,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    pub(crate) router: Router,
    pub(crate) shards: Vec<Mutex<Shard>>,
    /// Sessions in the map, live and stored (see [`Shard::total`]).
    pub(crate) sessions: Arc<AtomicUsize>,
    pub(crate) hasher: RandomState,
    pub(crate) retained: RwLock<Retained>,
    pub(crate) next_id: AtomicU64,
    pub(crate) connections: AtomicUsize,
    /// Most connections open at once since start.
    pub(crate) connections_max: AtomicUsize,
    /// Most connections open at once since [`Broker::take_connection_peak`].
    pub(crate) connections_peak: AtomicUsize,
    /// When offline sessions' wills are due and when they expire.
    pub(crate) timers: OfflineTimers,
    /// Refused connections being answered (see [`Broker::start_refusal`]).
    pub(crate) refusing: AtomicUsize,
    /// TLS and WebSocket handshakes in progress (see [`Broker::start_handshake`]).
    pub(crate) handshakes: AtomicUsize,
    /// Connections per source address, kept only under `max_connections_per_ip`.
    pub(crate) per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// New connections allowed, under `max_connect_rate`.
    pub(crate) connect_rate: Option<Mutex<TokenBucket>>,
    pub(crate) store: Arc<dyn SessionStore>,
    /// Next key for a stored delivery; keys only grow, so a session's stored queue
    /// reads back in order.
    pub(crate) next_seq: AtomicU64,
    /// The other nodes, when this one is part of a cluster (set once, at start).
    pub(crate) peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// Publishers whose messages a queue does not capture: (publisher, queue). A bridge
    /// republishes what comes from its remote under its own id, and its outgoing queue
    /// must not send that back.
    pub(crate) capture_exclusions: RwLock<Vec<(Arc<str>, String)>>,
}

impl Broker {
    /// A broker with `settings` over `store`; call [`Broker::restore`] with what the
    /// store loaded.
    pub fn new(
        settings: Settings,
        store: Arc<dyn SessionStore>,
        auth: Arc<dyn Authenticator>,
        queues: Queues,
    ) -> Arc<Broker> {
        let retained = Retained::new(retained::Bounds {
            messages: settings.max_retained_messages,
            bytes: settings.max_retained_bytes,
        });
        let connect_rate = (settings.max_connect_rate > 0).then(|| {
            Mutex::new(TokenBucket::new(
                f64::from(settings.max_connect_rate),
                crate::clock::now(),
            ))
        });
        let hasher = RandomState::new();
        let sessions = Arc::new(AtomicUsize::new(0));
        Arc::new(Broker {
            queues,
            metrics: Arc::default(),
            limits: Arc::new(Limits::new(settings).with_store_room(store.room())),
            auth,
            router: Router::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(&hasher, &sessions)))
                .collect(),
            sessions,
            hasher,
            retained: RwLock::new(retained),
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            connections_max: AtomicUsize::new(0),
            connections_peak: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            timers: OfflineTimers::default(),
            per_ip: Mutex::new(HashMap::new()),
            connect_rate,
            store,
            next_seq: AtomicU64::new(1),
            peers: std::sync::OnceLock::new(),
            capture_exclusions: RwLock::new(Vec::new()),
        })
    }

    /// Makes this broker one node of a cluster: publishes go to `peers` too, and
    /// subscriptions are told to them. Set once, before clients are served; false if
    /// peers were set already.
    pub fn set_peers(&self, peers: Arc<dyn Peers>) -> bool {
        if self.peers.set(peers.clone()).is_err() {
            return false;
        }
        // Subscriptions restored before this node joined its cluster are routes too.
        for shard in &self.shards {
            for slot in shard.lock().values() {
                if let Slot::Offline { session, .. } = slot {
                    for (raw, _) in session.routes() {
                        if let Ok(f) = topic::parse_filter(raw) {
                            drop(peers.subscribed(f.share_group, f.filter));
                        }
                    }
                }
            }
        }
        true
    }

    /// The other nodes, if this broker is one node of a cluster.
    pub fn peers(&self) -> Option<&Arc<dyn Peers>> {
        self.peers.get()
    }

    /// Messages published under `publisher`'s id are not captured by the queue named
    /// `queue` (a bridge's incoming messages are not copied into its outgoing queue).
    pub fn exclude_from_capture(&self, publisher: Arc<str>, queue: String) {
        self.capture_exclusions.write().push((publisher, queue));
    }

    /// The durable store.
    pub fn store(&self) -> &dyn SessionStore {
        &*self.store
    }

    /// A fresh unique number (connection ids, generations, assigned client ids).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a new connection from `ip`, or names the limit that refuses it (and
    /// then counts nothing). Every admitted connection is later given back with
    /// [`Broker::remove_connection`].
    pub fn try_add_connection(&self, ip: IpAddr) -> Result<(), Limit> {
        if let Some(bucket) = &self.connect_rate
            && !bucket.lock().try_take(1.0, crate::clock::now())
        {
            return Err(Limit::ConnectRate);
        }
        let max = self.limits.max_connections;
        let n = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Limit::Connections)?;
        self.connections_max.fetch_max(n + 1, Ordering::Relaxed);
        self.connections_peak.fetch_max(n + 1, Ordering::Relaxed);
        let per_ip = self.limits.max_connections_per_ip;
        if per_ip > 0 {
            let mut counts = self.per_ip.lock();
            let n = counts.entry(ip).or_insert(0);
            if *n >= per_ip {
                drop(counts);
                self.connections.fetch_sub(1, Ordering::AcqRel);
                return Err(Limit::ConnectionsPerIp);
            }
            *n += 1;
        }
        Ok(())
    }

    /// Counts a refused connection that is being answered, unless `max` are already;
    /// the count is given back when the returned guard is dropped.
    pub fn start_refusal(&self, max: usize) -> Option<impl Drop + '_> {
        enter(&self.refusing, max)
    }

    /// Counts a TLS or WebSocket handshake in progress, unless `max` are already (they
    /// come before the connection is counted against `max_connections`); the count is
    /// given back when the returned guard is dropped.
    pub fn start_handshake(&self, max: usize) -> Option<impl Drop + '_> {
        enter(&self.handshakes, max)
    }

    /// The most connections open at once since the last call.
    pub fn take_connection_peak(&self) -> usize {
        self.connections_peak
            .swap(self.connection_count(), Ordering::Relaxed)
    }

    /// Uncounts a connection admitted by [`Broker::try_add_connection`].
    pub fn remove_connection(&self, ip: IpAddr) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        if self.limits.max_connections_per_ip > 0 {
            let mut counts = self.per_ip.lock();
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }

    /// Most connections open at once since start.
    pub fn connection_peak(&self) -> usize {
        self.connections_max.load(Ordering::Relaxed)
    }

    /// Number of sessions, live and stored.
    pub fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Number of open client connections (counted from accept, before CONNECT).
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Number of subscriptions in the router.
    pub fn subscription_count(&self) -> usize {
        self.router.len()
    }

    /// Every session, live and stored, sorted by client id (for the admin API).
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut all = Vec::new();
        for shard in &self.shards {
            for (id, slot) in shard.lock().iter() {
                all.push(match slot {
                    Slot::Online(h) => SessionInfo {
                        client_id: id.clone(),
                        connection: Some(h.info.clone()),
                        subscriptions: None,
                        queued: None,
                    },
                    Slot::Offline { session, .. } => SessionInfo {
                        client_id: id.clone(),
                        connection: None,
                        subscriptions: Some(session.subscriptions.len()),
                        queued: Some(session.pending.len()),
                    },
                });
            }
        }
        all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        all
    }

    /// Asks the live connection of `client_id` to close (v5 DISCONNECT 0x98). False
    /// when the client is not connected.
    pub fn kick(&self, client_id: &str) -> bool {
        let key = self.key(client_id);
        match self.shard(key).lock().get(key) {
            Some(Slot::Online(h)) => h.mailbox.control(Control::Kick).is_ok(),
            _ => false,
        }
    }

    /// Frees the mailbox storage of connections that received nothing since the last
    /// call (see [`crate::mailbox::Sender::release_idle_storage`]).
    pub fn release_idle_mailboxes(&self) {
        for shard in &self.shards {
            for slot in shard.lock().values() {
                if let Slot::Online(h) = slot {
                    h.mailbox.release_idle_storage();
                }
            }
        }
    }

    /// Tells every live connection to close because the server is shutting down. A
    /// connection attached after its shard was passed sees the shutdown flag instead.
    pub fn shut_down_connections(&self) {
        for shard in &self.shards {
            for slot in shard.lock().values() {
                if let Slot::Online(h) = slot {
                    let _ = h.mailbox.control(Control::Shutdown);
                }
            }
        }
    }

    /// The client id with its hash, which picks the shard and finds the slot in it.
    pub(crate) fn key<'a>(&self, client_id: &'a str) -> Key<'a> {
        Key {
            id: client_id,
            hash: self.hasher.hash_one(client_id),
        }
    }

    pub(crate) fn shard(&self, key: Key<'_>) -> &Mutex<Shard> {
        &self.shards[shard_index(key.hash)]
    }

    /// Adds a subscription of `client_id` to the router. `raw` may be `$share/...`.
    /// In a cluster, a new subscription may have to wait for its route to be known
    /// cluster-wide before its SUBACK: that is the returned wait.
    pub fn subscribe(
        &self,
        raw: &str,
        client_id: &Arc<str>,
        options: roost_core::SubscriptionOptions,
        identifier: Option<u32>,
    ) -> Option<Wait> {
        let f = topic::parse_filter(raw).ok()?;
        let replaced = self.router.subscribe(
            f.share_group,
            f.filter,
            Subscription {
                client_id: client_id.clone(),
                options,
                identifier,
            },
        );
        if replaced {
            return None;
        }
        self.peers.get()?.subscribed(f.share_group, f.filter)
    }

    /// Removes a subscription of `client_id` from the router.
    pub fn unsubscribe(&self, raw: &str, client_id: &str) {
        if let Ok(f) = topic::parse_filter(raw)
            && self.router.unsubscribe(f.share_group, f.filter, client_id)
            && let Some(peers) = self.peers.get()
        {
            peers.unsubscribed(f.share_group, f.filter);
        }
    }

    /// The reading of the retained messages a new subscription of `raw` should get,
    /// if any (see [`Broker::read_retained`]).
    pub fn retained_to_send(
        &self,
        raw: &str,
        options: roost_core::SubscriptionOptions,
        existed: bool,
    ) -> Option<Scan> {
        let f = topic::parse_filter(raw).ok()?;
        let wanted = match options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        // Shared subscriptions never get retained messages on subscribe.
        (wanted && f.share_group.is_none()).then(|| Scan::new(f.filter))
    }

    /// Moves a reading of the retained messages on by one step: up to `max` matching
    /// messages go into `found`. True when the reading is over.
    pub fn read_retained(
        &self,
        scan: &mut Scan,
        max: usize,
        now: Instant,
        found: &mut Vec<Arc<Message>>,
    ) -> bool {
        self.retained.read().scan(scan, max, now, found)
    }

    /// Every retained message, for another node catching up.
    pub fn retained_messages(&self) -> Vec<Arc<Message>> {
        self.retained.read().all()
    }

    /// Takes in another node's retained messages, read from it at `since` (this node
    /// was down or cut off): a topic it holds with a newer message than here is taken;
    /// one it does not hold is cleared here, unless this node's message arrived after
    /// `since` (then the other node's copy was read before it). Returns (taken,
    /// cleared).
    pub fn merge_retained(&self, theirs: Vec<Message>, since: Instant) -> (usize, usize) {
        let mut ops = Vec::new();
        let (mut taken, mut cleared) = (0, 0);
        {
            let mut retained = self.retained.write();
            let theirs: HashMap<String, Message> =
                theirs.into_iter().map(|m| (m.topic.clone(), m)).collect();
            for mine in retained.all() {
                if !theirs.contains_key(&mine.topic) && mine.received_at < since {
                    let clear = Arc::new(Message {
                        payload: bytes::Bytes::new(),
                        ..(*mine).clone()
                    });
                    if retained.apply(&clear) == Ok(retained::Change::Cleared) {
                        ops.push(Op::DeleteRetained(mine.topic.clone()));
                        cleared += 1;
                    }
                }
            }
            for (topic, msg) in theirs {
                let newer = retained
                    .get(&topic)
                    .is_none_or(|mine| mine.received_at < msg.received_at);
                if !newer {
                    continue;
                }
                let msg = Arc::new(msg);
                if retained.apply(&msg) == Ok(retained::Change::Stored) {
                    ops.push(Op::PutRetained(topic, persist::encode_retained(&msg)));
                    taken += 1;
                }
            }
        }
        self.store.submit_detached(ops);
        (taken, cleared)
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.read().len()
    }

    /// Bytes of retained messages, as `max_retained_bytes` counts them.
    pub fn retained_bytes(&self) -> u64 {
        self.retained.read().bytes()
    }

    /// Routes a message to every matching subscription; keeps it first if retained.
    /// What the publisher must wait for before acknowledging goes into `out`. True when
    /// a subscriber's mailbox was full and a delivery was dropped (QoS 0): its publisher
    /// should let subscribers run before it routes more.
    ///
    /// A retained message that `max_retained_messages` or `max_retained_bytes` leaves
    /// no room for is not kept (counted, and logged at debug level). With
    /// `refuse_unretainable` (a v5 publisher at QoS 1/2, which can be told) it is not
    /// routed either: `Err` names the bound, and the publisher gets 0x97.
    pub fn publish(
        &self,
        msg: Arc<Message>,
        out: &mut Fanout,
        refuse_unretainable: bool,
    ) -> Result<bool, retained::Full> {
        if msg.retain
            && let Err(full) = self.retain(&msg, out)
        {
            match full {
                retained::Full::Messages => self.metrics.limit_tripped(Limit::RetainedMessages, 1),
                retained::Full::Bytes => self.metrics.limit_tripped(Limit::RetainedBytes, 1),
                retained::Full::Store => self.metrics.store_refused(StoreRefusal::Retained, 1),
            }
            tracing::debug!(topic = %msg.topic, "retained message not kept: {full:?} bound reached");
            if refuse_unretainable {
                return Err(full);
            }
        }
        self.capture(&msg, out);
        let mut matches = Matches::default();
        self.router.matches(&msg.topic, &mut matches);
        let taken = match self.peers.get() {
            Some(peers) => {
                let shared: Vec<ShareKey> = matches
                    .shared
                    .iter()
                    .map(|g| ShareKey {
                        group: g.group.clone(),
                        filter: g.filter.clone(),
                    })
                    .collect();
                let forwarded = peers.forward(&msg, &shared);
                if let Some(wait) = forwarded.wait {
                    out.waits().pending.push(wait);
                }
                forwarded.taken
            }
            None => Vec::new(),
        };
        let mut overflowed = self.deliver_direct(&msg, &matches.direct, out);
        // Share groups whose turn another node took are not this node's to deliver.
        overflowed |= self.deliver_groups(&msg, &matches.shared, |g| !names_any(&taken, g), out);
        Ok(overflowed)
    }

    /// Routes a message another node forwarded: to every matching local subscription,
    /// and to this node's members of the share groups in `shared` (the sender took
    /// their turn for this node). A retained message is kept here too (each node keeps
    /// every retained message). Never forwarded again.
    pub fn publish_from_peer(&self, msg: Arc<Message>, shared: &[ShareKey], out: &mut Fanout) {
        if msg.retain
            && let Err(full) = self.retain(&msg, out)
        {
            tracing::debug!(topic = %msg.topic, "retained message from a peer not kept: {full:?} bound reached");
        }
        let mut matches = Matches::default();
        self.router.matches(&msg.topic, &mut matches);
        self.deliver_direct(&msg, &matches.direct, out);
        self.deliver_groups(&msg, &matches.shared, |g| names_any(shared, g), out);
    }

    /// Keeps (or clears) `msg` as its topic's retained message and queues the store
    /// write; `Err` names the bound that left no room (nothing changed then).
    fn retain(&self, msg: &Arc<Message>, out: &mut Fanout) -> Result<(), retained::Full> {
        if !self.limits.store_room.has_room() {
            return Err(retained::Full::Store);
        }
        match self.retained.write().apply(msg)? {
            retained::Change::Stored => out.ops.push(Op::PutRetained(
                msg.topic.clone(),
                persist::encode_retained(msg),
            )),
            retained::Change::Cleared => out.ops.push(Op::DeleteRetained(msg.topic.clone())),
            retained::Change::None => {}
        }
        Ok(())
    }

    /// Delivers `msg` to one member of each share group in `groups` that `mine` says
    /// this node serves. True when a delivery was dropped for a full mailbox.
    fn deliver_groups(
        &self,
        msg: &Arc<Message>,
        groups: &[roost_router::SharedMatch],
        mine: impl Fn(&roost_router::SharedMatch) -> bool,
        out: &mut Fanout,
    ) -> bool {
        let mut overflowed = false;
        for group in groups.iter().filter(|g| mine(g)) {
            let share = Arc::new(ShareRef {
                group: group.group.clone(),
                filter: group.filter.clone(),
            });
            overflowed |= self.deliver_shared(msg, group, share, None, out) == Taken::Overflowed;
        }
        overflowed
    }

    /// One delivery per client: a client with overlapping subscriptions gets the
    /// message once, at the highest QoS, with all their subscription identifiers.
    ///
    /// Each client id is hashed once: the hash orders the matches (so a client's
    /// subscriptions sit together and each shard's clients are adjacent, where sorting
    /// by the ids themselves compared strings), picks the shard, and finds the slot.
    /// Each shard is locked once for all of its clients. True when a delivery was
    /// dropped for a full mailbox.
    fn deliver_direct(&self, msg: &Arc<Message>, subs: &[Subscription], out: &mut Fanout) -> bool {
        let mut overflowed = false;
        let mut order = ORDER.take();
        order.clear();
        order.extend(subs.iter().enumerate().map(|(i, s)| {
            let hash = self.hasher.hash_one(&*s.client_id);
            (shard_index(hash), hash, i)
        }));
        order.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| subs[a.2].client_id.cmp(&subs[b.2].client_id))
        });
        let mut i = 0;
        while i < order.len() {
            let shard_no = order[i].0;
            let mut shard = self.shards[shard_no].lock();
            while i < order.len() && order[i].0 == shard_no {
                let (_, hash, first) = order[i];
                let client = &subs[first].client_id;
                let mut qos = None::<QoS>;
                let mut retain = false;
                let mut ids = Vec::new();
                while i < order.len() && order[i].1 == hash && subs[order[i].2].client_id == *client
                {
                    let s = &subs[order[i].2];
                    i += 1;
                    if s.options.no_local && msg.publisher.as_deref() == Some(&**client) {
                        continue;
                    }
                    qos = Some(qos.map_or(s.options.qos, |q| q.max(s.options.qos)));
                    retain |= s.options.retain_as_published && msg.retain;
                    ids.extend(s.identifier);
                }
                let Some(qos) = qos else { continue };
                let key = Key { id: client, hash };
                overflowed |= self.deliver_to(
                    shard.get_mut(key),
                    client,
                    Delivery {
                        msg: msg.clone(),
                        qos: msg.qos.min(qos),
                        retain,
                        subscription_ids: ids.into(),
                        share: None,
                        seq: None,
                        queue: None,
                    },
                    false,
                    out,
                ) == Taken::Overflowed;
            }
        }
        ORDER.set(order);
        overflowed
    }

    /// Picks one member of a share group, round-robin over those online; if none is
    /// online, the next one in turn queues it. `except` is a member that just left.
    fn deliver_shared(
        &self,
        msg: &Arc<Message>,
        group: &roost_router::SharedMatch,
        share: Arc<ShareRef>,
        except: Option<&str>,
        out: &mut Fanout,
    ) -> Taken {
        let candidates: Vec<usize> = group
            .rotation()
            .filter(|&i| Some(&*group.members[i].client_id) != except)
            .collect();
        let make = |s: &Subscription| Delivery {
            msg: msg.clone(),
            qos: msg.qos.min(s.options.qos),
            retain: s.options.retain_as_published && msg.retain,
            subscription_ids: s.identifier.into_iter().collect(),
            share: Some(share.clone()),
            seq: None,
            queue: None,
        };
        for &i in &candidates {
            let s = &group.members[i];
            if self.deliver(&s.client_id, make(s), true, out) == Taken::Yes {
                return Taken::Yes;
            }
        }
        if let Some(&i) = candidates.first() {
            let s = &group.members[i];
            return self.deliver(&s.client_id, make(s), false, out);
        }
        Taken::No
    }

    /// Gives a delivery that a leaving member had to another member of its group.
    /// Without another member it goes back to the leaving client's session, which
    /// keeps it if it is stored (persistent).
    pub(crate) fn redeliver_shared(&self, d: Delivery, leaving: &Arc<str>, out: &mut Fanout) {
        let Some(share) = d.share.clone() else {
            self.deliver(leaving, d, false, out);
            return;
        };
        let mut matches = Matches::default();
        self.router.matches(&d.msg.topic, &mut matches);
        let group = matches
            .shared
            .iter()
            .find(|g| g.group == share.group && g.filter == share.filter);
        if let Some(group) = group
            && self.deliver_shared(&d.msg, group, share, Some(leaving), out) == Taken::Yes
        {
            return;
        }
        self.deliver(leaving, d, false, out);
    }

    /// Hands a delivery to a live connection or queues it in a stored session (not
    /// with `online_only`). A QoS 1/2 delivery to a persistent session is stored first.
    /// A QoS 1/2 delivery to a connection whose channel is full goes to `out`'s blocked
    /// (the publisher waits for room, bounded) unless that connection is known to be
    /// stalled.
    pub(crate) fn deliver(
        &self,
        client_id: &Arc<str>,
        d: Delivery,
        online_only: bool,
        out: &mut Fanout,
    ) -> Taken {
        let key = self.key(client_id);
        let mut shard = self.shard(key).lock();
        self.deliver_to(shard.get_mut(key), client_id, d, online_only, out)
    }

    /// [`Broker::deliver`] to the slot of `client_id`, under its shard's lock.
    fn deliver_to(
        &self,
        slot: Option<&mut Slot>,
        client_id: &Arc<str>,
        mut d: Delivery,
        online_only: bool,
        out: &mut Fanout,
    ) -> Taken {
        match slot {
            Some(Slot::Online(h)) => {
                // A store short of space takes no new messages: a connected persistent
                // session still gets this one, unstored (like a clean session's).
                let stored = h.info.persistent
                    && d.qos != QoS::AtMostOnce
                    && self.limits.store_room.has_room();
                // Behind a blocked delivery to the same client, keep the order.
                let bit = 1u64 << (h.info.id % 64);
                let queued_behind = out.waits.as_ref().is_some_and(|w| {
                    w.blocked_mask & bit != 0 && w.blocked.iter().any(|b| b.client_id == *client_id)
                });
                let taken = if queued_behind {
                    Err(d)
                } else if stored {
                    // Stored before it can reach the subscriber: reserve the slot first.
                    match h.mailbox.try_reserve() {
                        Some(permit) => {
                            self.store_delivery(client_id, &mut d, out);
                            permit.send(d);
                            Ok(())
                        }
                        None => Err(d),
                    }
                } else {
                    h.mailbox.try_send(d).map_err(TrySendError::into_inner)
                };
                match taken {
                    Ok(()) => {
                        h.info.stalled.store(false, Ordering::Relaxed);
                        Taken::Yes
                    }
                    Err(mut d)
                        if !online_only
                            && d.qos != QoS::AtMostOnce
                            && !h.info.stalled.load(Ordering::Relaxed) =>
                    {
                        if stored {
                            self.store_delivery(client_id, &mut d, out);
                        }

                        let waits = out.waits();
                        waits.blocked_mask |= bit;
                        waits.blocked.push(Blocked {
                            client_id: client_id.clone(),
                            sender: h.mailbox.clone(),
                            client: h.info.clone(),
                            delivery: d,
                        });
                        Taken::Yes
                    }
                    Err(_) => {
                        tracing::debug!(client_id = %client_id, "client not keeping up, message dropped");
                        // A shared delivery tried online-only goes to another member.
                        if online_only {
                            return Taken::No;
                        }
                        self.metrics.dropped(DropReason::SlowSubscriber, 1);
                        Taken::Overflowed
                    }
                }
            }
            Some(Slot::Offline { session, .. }) if !online_only => {
                if d.qos == QoS::AtMostOnce {
                    return Taken::No;
                }
                if !self.limits.store_room.has_room() {
                    // Kept only in memory it would be claimed stored: dropped, counted.
                    session.dropped = session.dropped.saturating_add(1);
                    self.metrics.dropped(DropReason::StoreFull, 1);
                    tracing::debug!(client_id = %client_id, "session store short of space, message for an offline session dropped");
                    return Taken::No;
                }
                if let Err(full) = self
                    .limits
                    .max_queued()
                    .check(&session.pending, d.msg.weight())
                {
                    session.dropped = session.dropped.saturating_add(1);
                    self.metrics.dropped(DropReason::OfflineQueueFull, 1);
                    if let Some(limit) = Limit::of_queue_full(full) {
                        self.metrics.limit_tripped(limit, 1);
                    }
                    tracing::debug!(client_id = %client_id, "offline queue full, message dropped");
                    return Taken::No;
                }
                self.store_delivery(client_id, &mut d, out);
                session.pending.push_back(d, &self.limits.queued);
                Taken::Yes
            }
            _ => Taken::No,
        }
    }

    /// Stores a delivery to a persistent session. The write is queued now, before the
    /// delivery can reach the subscriber (whose own later writes for it must come
    /// after), and the publisher waits for a barrier behind it before acknowledging.
    pub(crate) fn store_delivery(&self, client_id: &Arc<str>, d: &mut Delivery, out: &mut Fanout) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let entry = persist::encode_entry(d);
        // Read before the write is queued: a refusal of its round comes after.
        let refusals = self.limits.store_room.refusals();
        self.store
            .submit_detached(vec![Op::PutEntry(client_id.clone(), seq, entry)]);
        // An earlier barrier in a row stands for this write too (it saw fewer refusals).
        if !matches!(out.ops.last(), Some(Op::Barrier(_))) {
            out.ops.push(Op::Barrier(refusals));
        }
        d.seq = Some(seq);
    }

    /// Copies a publish into every queue whose capture filters match its topic.
    fn capture(&self, msg: &Message, out: &mut Fanout) {
        for queue in self.queues.capturing(&msg.topic) {
            if let Some(publisher) = &msg.publisher
                && self
                    .capture_exclusions
                    .read()
                    .iter()
                    .any(|(p, q)| p == publisher && q == queue.name())
            {
                continue;
            }
            let produce = queue.produce(crate::queues::captured_message(msg));
            let name = queue.name().to_owned();
            out.waits().pending.push(Box::pin(async move {
                if let Err(e) = produce.await {
                    tracing::warn!(queue = %name, "captured message not stored: {e}");
                }
            }));
        }
    }

    /// Publishes a message that no client sent (status topics), in the background.
    pub fn publish_detached(&self, msg: Arc<Message>) {
        let mut out = Fanout::default();
        let _ = self.publish(msg, &mut out, false);
        self.finish_detached(out);
    }

    /// Stores what a routing step outside any connection produced, and waits in the
    /// background (bounded) for room for its blocked deliveries.
    pub(crate) fn finish_detached(&self, out: Fanout) {
        self.store.submit_detached(out.ops);
        let Some(waits) = out.waits else {
            return;
        };
        let Waits {
            blocked, pending, ..
        } = *waits;
        for wait in pending {
            tokio::spawn(wait);
        }
        if !blocked.is_empty() {
            let wait = self.limits.delivery_wait();
            let store = self.store.clone();
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                let undo = send_blocked(blocked, wait, &metrics).await;
                store.submit_detached(undo);
            });
        }
    }

    /// Carries out what a routing step outside any connection produced (a message
    /// from another node) and waits until it is stored: what it left pending, room at
    /// blocked subscribers (bounded), then its store writes.
    pub async fn settle(&self, out: Fanout) -> Result<(), crate::store::StoreError> {
        let mut ops = out.ops;
        if let Some(waits) = out.waits {
            ops.extend(self.wait_for(*waits).await);
        }
        self.store.submit(ops).wait().await
    }

    /// Waits for what routing left pending (captures, other nodes, routes) and for
    /// room at blocked subscribers; returns the store writes that undo deliveries
    /// dropped meanwhile.
    pub(crate) async fn wait_for(&self, waits: Waits) -> Vec<Op> {
        let Waits {
            blocked, pending, ..
        } = waits;
        for wait in pending {
            wait.await;
        }
        if blocked.is_empty() {
            return Vec::new();
        }
        send_blocked(blocked, self.limits.delivery_wait(), &self.metrics).await
    }

    /// True when a session of `client_id` is here (live or stored).
    pub fn has_session(&self, client_id: &str) -> bool {
        let key = self.key(client_id);
        self.shard(key).lock().get(key).is_some()
    }

    /// Capacity of a connection's delivery channel.
    pub fn delivery_capacity(&self) -> usize {
        self.limits.max_queued_messages.max(16)
    }
}
