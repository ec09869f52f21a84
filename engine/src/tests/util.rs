//! The engine in a box: a [`Harness`] runs a broker with an in-memory session store
//! ([`MemoryStore`]), [`AllowAll`] auth, `$queue/` queues on a temporary directory and
//! the offline sessions' timer task, and serves each client the way the connection
//! task of `roost-broker` does (`serve_session`, `flush`, `finish`), minus the socket:
//! packets in, decoded packets out. In the spirit of quinn-proto's `Pair`.
//!
//! Writing a test:
//!
//! ```text
//! #[tokio::test(start_paused = true)]
//! async fn a_name_that_says_what_a_user_would_see() {
//!     let mut h = Harness::new().await;
//!     let (sub, _) = h.connect(v5("sub")).await;        // CONNACK returned, the rest kept
//!     h.send(sub, subscribe(1, "a/+", QoS::AtLeastOnce)).await;
//!     assert!(matches!(h.take(sub)[..], [Packet::SubAck(_)]));
//!     let (publ, _) = h.connect(v311("pub", true)).await;
//!     h.send(publ, publish("a/b", "hi", QoS::AtLeastOnce, 7)).await;
//!     let got = h.take_publishes(sub);                  // every client was driven
//!     h.sleep(Duration::from_secs(90)).await;           // paused time: wills, expiry, keep-alive
//! }
//! ```
//!
//! Every call that acts ([`Harness::connect`], [`Harness::send`], [`Harness::lose`],
//! [`Harness::sleep`]) ends by driving every connected client until nothing is left to
//! do: deliveries taken from mailboxes, control requests (takeover) answered, queue
//! produce acknowledgements sent, due timers run, each step committed before its output
//! is decoded into the client's inbox. A client taken over (or otherwise closed by the
//! broker) is ended as the real task ends it; its last packets stay in its inbox.
//!
//! A client can be held ([`Harness::hold`]): its task takes nothing from its mailbox
//! until released, as a task that is not scheduled, so deliveries pile up there.
//!
//! Time is tokio's paused clock (`start_paused = true`), which is the engine's clock
//! ([`crate::clock::now`]). Never await anything that waits on another client here: a
//! paused runtime with nothing to run jumps its clock to the next timer. (The harness
//! polls instead of awaiting; `$queue/` produces, which wait on the queue's disk thread,
//! are waited for in real time.) The one wait the engine itself has on another client,
//! a publisher's for room at a full subscriber, is bounded by a timer: behind a held
//! subscriber the clock jumps by `max_delivery_wait_ms`, as a stuck subscriber would
//! make a publisher wait. `$queue/` redelivery runs on the wall clock in milliseconds:
//! move it with [`Harness::tick_queues`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use roost_core::codec;
use roost_core::{
    ConnAck, Connect, Disconnect, LastWill, Packet, PacketId, ProtocolVersion, PubResponse,
    Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};
use tokio::sync::oneshot;

use crate::auth::AllowAll;
use crate::broker::{Broker, Fanout, Handover};
use crate::client::{Admitted, Client};
use crate::metrics::DisconnectReason;
use crate::protocol::{self, ConnectRefusal};
use crate::record::{Loaded, Loader, Read};
use crate::settings::Settings;
use crate::store::{InflightState, MemoryStore, Op, SessionStore};

/// A client of the harness, by the order it connected in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(usize);

/// One connection the harness serves.
struct Peer {
    client: Client,
    /// Packets the broker wrote to it, decoded, not yet taken by the test.
    inbox: Vec<Packet>,
    /// The connection task's `outbound_full_since` (the slow-consumer clock).
    full_since: Option<Instant>,
    /// Set once the connection ended (`Client::end` ran).
    ended: bool,
    /// Deliveries, acknowledgements and timers wait (see [`Harness::hold`]).
    held: bool,
}

/// A broker and the clients it serves, all in this test's runtime.
pub struct Harness {
    /// The broker.
    pub broker: Arc<Broker>,
    /// What the broker stored, in order (`fail()` makes it refuse every write).
    pub store: Arc<MemoryStore>,
    peers: Vec<Peer>,
    timers: tokio::task::JoinHandle<()>,
    /// The queues' directories (one per broker started, see [`Harness::restart`]).
    _dirs: Vec<tempfile::TempDir>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.timers.abort();
    }
}

/// Longest real time a `$queue/` produce may take to be stored.
const PRODUCE_WAIT: Duration = Duration::from_secs(10);

impl Harness {
    /// A broker with the default settings.
    pub async fn new() -> Harness {
        Harness::with(Settings::default()).await
    }

    /// A broker with `settings`.
    pub async fn with(settings: Settings) -> Harness {
        let store = Arc::new(MemoryStore::default());
        let (broker, dir) = start(settings, store.clone());
        let timers = tokio::spawn(broker.clone().run_offline_timers());
        Harness {
            broker,
            store,
            peers: Vec::new(),
            timers,
            _dirs: vec![dir],
        }
    }

    /// The broker process dies and starts again `down` later (wall-clock time, as its
    /// store records it; the paused clock does not move): every connection is gone
    /// without ending (no DISCONNECT, no will, no detach), and a new broker restores
    /// what the old one stored. Clients of before stay ended. (`$queue/` queues start
    /// empty: they have their own storage.)
    pub async fn restart(&mut self, down: Duration) {
        for peer in &mut self.peers {
            peer.ended = true;
        }
        self.timers.abort();
        let ops = self.store.ops();
        let loaded = load(&ops, down);
        let store = Arc::new(MemoryStore::default());
        store.submit_detached(ops);
        let (broker, dir) = start((*self.broker.limits).clone(), store.clone());
        broker.restore(loaded);
        self.timers = tokio::spawn(broker.clone().run_offline_timers());
        self.broker = broker;
        self.store = store;
        self._dirs.push(dir);
        settle_tasks().await;
    }

    /// Connects a client (taking over a connected one with its client id, which the
    /// harness serves meanwhile) and returns it with its CONNACK; what follows the
    /// CONNACK (resent in-flight messages, queued ones) stays in its inbox.
    pub async fn connect(&mut self, connect: Connect) -> (Id, ConnAck) {
        match self.try_connect(connect).await {
            Ok(c) => c,
            Err((code, why)) => panic!("CONNECT refused ({code:?}): {why}"),
        }
    }

    /// [`Harness::connect`], or the CONNACK code that refused the client.
    pub async fn try_connect(
        &mut self,
        connect: Connect,
    ) -> Result<(Id, ConnAck), (ReasonCode, String)> {
        self.try_connect_until(connect, None).await
    }

    /// [`Harness::try_connect`] with credentials that expire at `expires_at` (a token).
    pub async fn try_connect_until(
        &mut self,
        connect: Connect,
        expires_at: Option<std::time::Instant>,
    ) -> Result<(Id, ConnAck), (ReasonCode, String)> {
        let plan = protocol::plan_connect(&connect, &self.broker.limits, || {
            format!("roost-{:016x}", self.broker.next_id())
        })
        .map_err(|r| match r {
            ConnectRefusal::Code(code, why) => (code, why.to_owned()),
            ConnectRefusal::Close(why) => (ReasonCode::ProtocolError, why.to_owned()),
        })?;
        let peer: SocketAddr = ([127, 0, 0, 1], 1024 + self.peers.len() as u16).into();
        let broker = self.broker.clone();
        let admitted = Admitted {
            access: None,
            scram_user: None,
            expires_at,
        };
        let attach = tokio::spawn(async move {
            Client::attach(&broker, Box::new(connect), &plan, peer, admitted).await
        });
        // A takeover waits for the old connection to hand its session over: serve the
        // others until it has.
        for _ in 0..1000 {
            if attach.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
            self.drive_once().await;
        }
        assert!(attach.is_finished(), "attach never finished");
        let client = attach
            .await
            .expect("attach did not panic")
            .map_err(|refusal| (refusal.reason_code(), refusal.to_string()))?;
        let id = Id(self.peers.len());
        self.peers.push(Peer {
            client,
            inbox: Vec::new(),
            full_since: None,
            ended: false,
            held: false,
        });
        // The connection task's first flush: the CONNACK and what the session resends.
        self.flush(id, &mut Fanout::default()).await;
        self.drive().await;
        let ack = match self.peer(id).inbox.first() {
            Some(Packet::ConnAck(ack)) => ack.clone(),
            other => panic!("CONNACK first, got {other:?}"),
        };
        self.peer(id).inbox.remove(0);
        Ok((id, ack))
    }

    /// The client sends `packet`; its events are carried out and committed before its
    /// output is read, then every client is driven.
    pub async fn send(&mut self, id: Id, packet: Packet) {
        self.send_all(id, vec![packet]).await;
    }

    /// The client sends `packets` in one read: each is handled (and its events carried
    /// out) before the next, one commit for them all, as `handle_buffered` does.
    pub async fn send_all(&mut self, id: Id, packets: Vec<Packet>) {
        assert!(!self.peer(id).ended, "{id:?} has ended");
        let broker = self.broker.clone();
        let mut fanout = Fanout::default();
        for packet in packets {
            let peer = self.peer(id);
            if peer.client.conn.close_reason().is_some() {
                break;
            }
            peer.client
                .handle(&broker, packet, crate::clock::now(), &mut fanout);
        }
        self.flush(id, &mut fanout).await;
        self.end_if_closed(id, None).await;
        self.drive().await;
    }

    /// The client's socket closes without a DISCONNECT (its will applies).
    pub async fn lose(&mut self, id: Id) {
        self.peer(id)
            .client
            .conn
            .lost(DisconnectReason::ClientClosed, "socket closed by client");
        self.end_if_closed(id, None).await;
        self.drive().await;
    }

    /// The client sends DISCONNECT with `reason` (and an optional new session expiry).
    pub async fn disconnect(&mut self, id: Id, reason: ReasonCode, expiry: Option<u32>) {
        let mut d = Disconnect {
            reason,
            ..Disconnect::default()
        };
        d.properties.session_expiry_interval = expiry;
        self.send(id, Packet::Disconnect(d)).await;
        assert!(self.peer(id).ended, "DISCONNECT ends the connection");
    }

    /// Lets `d` of paused time pass: the offline sessions' timers fire in order, and
    /// each client's own deadlines (keep-alive, slow consumer) are met on time.
    pub async fn sleep(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            let now = tokio::time::Instant::now();
            let broker = self.broker.clone();
            let next = self
                .peers
                .iter_mut()
                .filter(|p| !p.ended)
                .filter_map(|p| p.client.next_deadline(&broker, &mut p.full_since))
                .map(tokio::time::Instant::from_std)
                .filter(|t| *t > now)
                .min()
                .map_or(until, |t| t.min(until));
            tokio::time::sleep_until(next).await;
            // Let the offline timer task run what came due.
            settle_tasks().await;
            self.drive().await;
            if tokio::time::Instant::now() >= until {
                break;
            }
        }
    }

    /// Moves the `$queue/` clock (wall clock milliseconds) `ms` ahead: redeliveries
    /// whose backoff or ack timeout has passed by then are offered; clients are driven.
    pub async fn tick_queues(&mut self, ms: u64) {
        self.broker.queues.tick(roost_queue::now_ms() + ms);
        self.drive().await;
    }

    /// Takes what the broker sent to the client since the last take.
    pub fn take(&mut self, id: Id) -> Vec<Packet> {
        std::mem::take(&mut self.peer(id).inbox)
    }

    /// What the broker sent to the client since the last take, left in place.
    pub fn inbox(&self, id: Id) -> &[Packet] {
        &self.peers[id.0].inbox
    }

    /// Takes what the broker sent to the client, which must be PUBLISHes only.
    pub fn take_publishes(&mut self, id: Id) -> Vec<Publish> {
        self.take(id)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p,
                other => panic!("{id:?}: expected only PUBLISH, got {other:?}"),
            })
            .collect()
    }

    /// The client's task stops taking what the broker hands it (deliveries stay in
    /// its mailbox, timers wait) until [`Harness::release`]; it still answers a
    /// takeover, which its `select!` may pick first.
    pub fn hold(&mut self, id: Id) {
        self.peer(id).held = true;
    }

    /// Ends a [`Harness::hold`], and drives the client.
    pub async fn release(&mut self, id: Id) {
        self.peer(id).held = false;
        self.drive().await;
    }

    /// True while the client is connected.
    pub fn is_connected(&self, id: Id) -> bool {
        !self.peers[id.0].ended
    }

    /// Why the client's connection ended (or is ending), if it did.
    pub fn closed_for(&self, id: Id) -> Option<DisconnectReason> {
        self.peers[id.0].client.conn.close_reason().map(|c| c.kind)
    }

    /// True when the broker holds a session (live or offline) for `client_id`.
    pub fn has_session(&self, client_id: &str) -> bool {
        self.broker
            .sessions()
            .iter()
            .any(|s| &*s.client_id == client_id)
    }

    fn peer(&mut self, id: Id) -> &mut Peer {
        &mut self.peers[id.0]
    }

    /// Drives every connected client until none has anything left to do, waiting (in
    /// real time) for `$queue/` produces to be stored.
    pub async fn drive(&mut self) {
        for _ in 0..100_000 {
            if !self.drive_once().await && !self.wait_for_produce().await {
                return;
            }
        }
        panic!("the clients never went quiet");
    }

    /// One turn of each connected client's loop for what is ready now; true if any
    /// client did something.
    async fn drive_once(&mut self) -> bool {
        let mut worked = false;
        for i in 0..self.peers.len() {
            if !self.peers[i].ended {
                worked |= self.turn(Id(i)).await;
            }
        }
        worked
    }

    /// One turn of `serve_session`'s loop for client `id` if something woke it: a
    /// control request, a delivery, a produce acknowledgement, room in a queue, or its
    /// timer. The order among several ready ones is fixed here (tokio's `select!` picks
    /// at random).
    async fn turn(&mut self, id: Id) -> bool {
        let broker = self.broker.clone();
        let now = crate::clock::now();
        let peer = self.peer(id);
        let client = &mut peer.client;
        // The top of the loop, before its wait: the deadline is computed every time,
        // which is also what restarts the slow-consumer clock once there is room.
        let deadline = client.next_deadline(&broker, &mut peer.full_since);
        if let Some(Some(request)) = client.mailbox.recv_control().now_or_never() {
            if let Some(reply) = client.control(request) {
                // `finish`: the DISCONNECT is written, then the session handed over.
                self.flush(id, &mut Fanout::default()).await;
                self.end(id, Some(reply)).await;
                return true;
            }
        } else if peer.held {
            return false;
        } else if client.conn.has_room()
            && let Some(d) = client.mailbox.try_recv()
        {
            client.deliver_batch(d, now);
        } else if let Some((token, reason)) = client.queues.next_produced() {
            client.produced(token, reason);
        } else if client
            .queues
            .room_needed()
            .is_some_and(|(q, bytes)| q.has_room(bytes))
        {
            client.queues.start_waiting();
        } else if deadline.is_some_and(|t| t <= now) {
            client.on_timer(&broker, now, &mut peer.full_since);
        } else {
            return false;
        }
        self.flush(id, &mut Fanout::default()).await;
        self.end_if_closed(id, None).await;
        true
    }

    /// Waits (in real time, bounded) until some client's `$queue/` produce is stored,
    /// and sends its acknowledgement. False when no produce is in progress.
    async fn wait_for_produce(&mut self) -> bool {
        let producing: Vec<usize> = (0..self.peers.len())
            .filter(|&i| !self.peers[i].ended && self.peers[i].client.queues.is_producing())
            .collect();
        if producing.is_empty() {
            return false;
        }
        let started = std::time::Instant::now();
        loop {
            for &i in &producing {
                if let Some((token, reason)) = self.peers[i].client.queues.next_produced() {
                    self.peers[i].client.produced(token, reason);
                    self.flush(Id(i), &mut Fanout::default()).await;
                    self.end_if_closed(Id(i), None).await;
                    return true;
                }
            }
            assert!(
                started.elapsed() < PRODUCE_WAIT,
                "a $queue/ produce was not stored in {PRODUCE_WAIT:?}"
            );
            // The queue's disk thread resolves it; the paused clock must not move.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `flush`: carries out pending events, stores, and only then reads the output.
    async fn flush(&mut self, id: Id, fanout: &mut Fanout) {
        let broker = self.broker.clone();
        let peer = self.peer(id);
        peer.client.commit(&broker, fanout).await;
        if peer.client.conn.has_output() {
            let out = peer.client.conn.take_output();
            let version = peer.client.conn.version();
            peer.inbox.extend(decode_all(out, version));
        }
    }

    /// Ends the client if its connection is to close (`finish` without a handover).
    async fn end_if_closed(&mut self, id: Id, taken_over: Option<oneshot::Sender<Handover>>) {
        let peer = self.peer(id);
        if !peer.ended && peer.client.conn.close_reason().is_some() {
            self.end(id, taken_over).await;
        }
    }

    /// `finish`: what is left is flushed, then the session handed on (or kept, or ended).
    async fn end(&mut self, id: Id, taken_over: Option<oneshot::Sender<Handover>>) {
        self.flush(id, &mut Fanout::default()).await;
        let broker = self.broker.clone();
        let peer = self.peer(id);
        peer.ended = true;
        peer.client.end(&broker, taken_over).await;
    }
}

/// A broker over `store`, with queues in a new temporary directory.
fn start(settings: Settings, store: Arc<MemoryStore>) -> (Arc<Broker>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (queues, _notes) =
        roost_queue::Queues::open(dir.path(), Default::default(), true).expect("queues");
    let broker = Broker::new(settings, store, Arc::new(AllowAll), queues);
    (broker, dir)
}

/// What a store that made `ops` durable loads at startup, `down` after they were
/// written: the ops replayed as the broker's store applies them (keys overwritten,
/// a session deleted with everything it stored), then decoded as the broker's loader
/// does (`broker/src/persist.rs`).
fn load(ops: &[Op], down: Duration) -> Loaded {
    type Key = (Arc<str>, u64);
    let mut sessions: BTreeMap<Arc<str>, Vec<u8>> = BTreeMap::new();
    let mut entries: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
    let mut inflight: BTreeMap<Key, (PacketId, InflightState)> = BTreeMap::new();
    let mut inbound: BTreeSet<(Arc<str>, PacketId)> = BTreeSet::new();
    let mut retained: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for op in ops {
        match op.clone() {
            Op::PutSession(c, v) => {
                sessions.insert(c, v);
            }
            Op::DeleteSession(c) => {
                sessions.remove(&c);
                entries.retain(|(client, _), _| *client != c);
                inflight.retain(|(client, _), _| *client != c);
                inbound.retain(|(client, _)| *client != c);
            }
            Op::PutEntry(c, seq, v) => {
                entries.insert((c, seq), v);
            }
            Op::PutInflight(c, seq, pid, state) => {
                inflight.insert((c, seq), (pid, state));
            }
            Op::DeleteEntry(c, seq) => {
                entries.remove(&(c.clone(), seq));
                inflight.remove(&(c, seq));
            }
            Op::PutInbound(c, pid) => {
                inbound.insert((c, pid));
            }
            Op::DeleteInbound(c, pid) => {
                inbound.remove(&(c, pid));
            }
            Op::PutRetained(t, v) => {
                retained.insert(t, v);
            }
            Op::DeleteRetained(t) => {
                retained.remove(&t);
            }
            Op::Barrier(_) => {}
        }
    }
    // Fed to the loading rules the way the broker's store feeds them: sessions, then
    // in-flight states, then queued messages in order, then the rest.
    let mut loader = Loader::new();
    for (client, value) in &sessions {
        assert_eq!(loader.session(client, value), Read::Kept, "a valid record");
    }
    for ((client, seq), &(packet_id, state)) in &inflight {
        loader.inflight(client, *seq, packet_id, state);
    }
    for ((client, seq), value) in &entries {
        assert_ne!(
            loader.entry(client, *seq, value),
            Read::Damaged,
            "a valid entry"
        );
    }
    for (client, pid) in inbound {
        loader.inbound(&client, pid);
    }
    for (topic, value) in &retained {
        loader.retained(topic, value);
    }
    let mut loaded = loader.finish();
    // Time spent down, as the store's clock would have seen it.
    let down_ms = u64::try_from(down.as_millis()).unwrap_or(u64::MAX);
    for s in &mut loaded.sessions {
        if !s.connected {
            s.disconnected_at_ms = s.disconnected_at_ms.saturating_sub(down_ms);
        }
    }
    loaded
}

/// Lets the other tasks of this runtime (the offline timers) run what is ready.
async fn settle_tasks() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// Decodes everything the broker wrote; it must be whole, valid packets.
pub fn decode_all(mut out: bytes::BytesMut, version: ProtocolVersion) -> Vec<Packet> {
    let mut packets = Vec::new();
    while let Some(p) = codec::decode(&mut out, Some(version), usize::MAX).expect("valid output") {
        packets.push(p);
    }
    assert!(out.is_empty(), "a partial packet in the output");
    packets
}

// ----- packets -----

/// A v5 CONNECT with clean start, no keep-alive and session expiry 0.
pub fn v5(client_id: &str) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        client_id: client_id.into(),
        ..Connect::default()
    }
}

/// A 3.1.1 CONNECT with `clean` session and no keep-alive.
pub fn v311(client_id: &str, clean: bool) -> Connect {
    Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: clean,
        client_id: client_id.into(),
        ..Connect::default()
    }
}

/// Changes to a CONNECT, chained: `v5("a").resume().expiry(60)`.
pub trait ConnectExt {
    /// Clean start 0: resume a stored session.
    fn resume(self) -> Self;
    /// v5 Session Expiry Interval.
    fn expiry(self, secs: u32) -> Self;
    /// The will.
    fn will(self, will: LastWill) -> Self;
    /// Keep-alive, in seconds.
    fn keep_alive(self, secs: u16) -> Self;
    /// v5 Receive Maximum.
    fn receive_maximum(self, n: u16) -> Self;
}

impl ConnectExt for Connect {
    fn resume(mut self) -> Self {
        self.clean_start = false;
        self
    }

    fn expiry(mut self, secs: u32) -> Self {
        self.properties.session_expiry_interval = Some(secs);
        self
    }

    fn will(mut self, will: LastWill) -> Self {
        self.will = Some(will);
        self
    }

    fn keep_alive(mut self, secs: u16) -> Self {
        self.keep_alive = secs;
        self
    }

    fn receive_maximum(mut self, n: u16) -> Self {
        self.properties.receive_maximum = Some(n);
        self
    }
}

/// A QoS 1 will on `topic`, published `delay` seconds after the connection is lost
/// (v5 Will Delay Interval).
pub fn will(topic: &str, payload: &'static str, delay: Option<u32>) -> LastWill {
    let mut w = LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        ..LastWill::default()
    };
    w.properties.will_delay_interval = delay;
    w
}

/// A PUBLISH (`packet_id` is ignored at QoS 0).
pub fn publish(topic: &str, payload: &'static str, qos: QoS, packet_id: PacketId) -> Packet {
    Packet::Publish(Publish {
        qos,
        packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        ..Publish::default()
    })
}

/// A retained PUBLISH.
pub fn retain(topic: &str, payload: &'static str, qos: QoS, packet_id: PacketId) -> Packet {
    match publish(topic, payload, qos, packet_id) {
        Packet::Publish(p) => Packet::Publish(Publish { retain: true, ..p }),
        _ => unreachable!("publish builds a PUBLISH"),
    }
}

/// A SUBSCRIBE of one filter at `qos`.
pub fn subscribe(packet_id: PacketId, filter: &str, qos: QoS) -> Packet {
    subscribe_with(
        packet_id,
        filter,
        SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        },
    )
}

/// A SUBSCRIBE of one filter with `options`.
pub fn subscribe_with(packet_id: PacketId, filter: &str, options: SubscriptionOptions) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: vec![(filter.into(), options)],
        ..Subscribe::default()
    })
}

/// PUBACK with success.
pub fn puback(packet_id: PacketId) -> Packet {
    Packet::PubAck(PubResponse::new(packet_id))
}

/// PUBACK with a (v5) reason code.
pub fn puback_with(packet_id: PacketId, reason: ReasonCode) -> Packet {
    Packet::PubAck(PubResponse {
        reason,
        ..PubResponse::new(packet_id)
    })
}

/// PUBREC.
pub fn pubrec(packet_id: PacketId) -> Packet {
    Packet::PubRec(PubResponse::new(packet_id))
}

/// PUBREL.
pub fn pubrel(packet_id: PacketId) -> Packet {
    Packet::PubRel(PubResponse::new(packet_id))
}

/// PUBCOMP.
pub fn pubcomp(packet_id: PacketId) -> Packet {
    Packet::PubComp(PubResponse::new(packet_id))
}

/// The payloads of `publishes`, as text.
pub fn payloads(publishes: &[Publish]) -> Vec<&str> {
    publishes
        .iter()
        .map(|p| std::str::from_utf8(&p.payload).expect("UTF-8 payload"))
        .collect()
}

/// The value of the user property `key` of a PUBLISH.
pub fn user_property<'a>(p: &'a Publish, key: &str) -> Option<&'a str> {
    p.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
