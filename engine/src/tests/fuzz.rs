//! A stateful fuzzer: random sequences of packets from several clients through the
//! [`Harness`], checked against what a client could check on the wire.
//!
//! Four client ids, two of them persistent sessions (a 3.1.1 `clean=false` one and a v5
//! one with a long session expiry) and two clean ones, do random things: connect (a
//! connected id is taken over), subscribe to wildcard filters and shared groups,
//! publish at QoS 0/1/2 (acknowledging PUBRECs late, out of order), acknowledge what
//! they receive late and out of order, disconnect or lose the connection, produce to
//! and consume from a `$queue/`. Checked:
//!
//! - nothing panics (the harness asserts that the broker's tasks do not);
//! - the broker never sends a new PUBLISH (DUP 0) with a packet id the client still
//!   holds in flight (QoS 1 unacknowledged, QoS 2 before its PUBCOMP), across
//!   takeovers and reconnects of persistent sessions too;
//! - every QoS 1/2 message the broker acknowledged (PUBACK, PUBREC) reaches every
//!   persistent session that had a matching QoS 1/2 subscription when it was
//!   published (checked after each session reconnects and drains at the end);
//! - every `$queue/` produce acknowledged is delivered to the group at least once.
//!
//! `cargo test` runs a bounded number of cases (seeded, so a failure names its seed
//! and reproduces). Longer runs:
//!
//! ```text
//! ROOST_FUZZ_CASES=2000 ROOST_FUZZ_SEED=$RANDOM cargo test -p roost-engine --lib fuzz -- --nocapture
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use roost_core::{Packet, PacketId, Publish, QoS};

use super::util::*;

/// xorshift64*: small, seedable, the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const FILTERS: [&str; 6] = ["a/b", "a/+", "a/#", "#", "+/b", "x/#"];
const SHARED: [&str; 2] = ["$share/g/a/#", "$share/g/+/b"];
const TOPICS: [&str; 4] = ["a/b", "a/c", "x/b", "x/y/z"];
const QUEUE_GROUP: &str = "$share/w/$queue/jq";

fn qos_of(n: usize) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Where a message the broker sent is, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// QoS 1, not yet acknowledged.
    Unacked,
    /// QoS 2, PUBREC not yet sent.
    Received,
    /// QoS 2, PUBREC sent, waiting for PUBREL / PUBCOMP.
    Recorded,
}

/// One client id, across its connections.
struct Model {
    name: &'static str,
    persistent: bool,
    v5: bool,
    conn: Option<Id>,
    /// Subscriptions of the session (kept across connects if persistent).
    subs: Vec<(String, QoS)>,
    /// Packet ids the broker has in flight to this client.
    inbound: BTreeMap<PacketId, Inbound>,
    /// Acknowledgements owed to the broker, sent later in random order.
    owed: Vec<Packet>,
    /// This client's own publishes awaiting the broker's answer: id -> (payload, QoS,
    /// PUBREC seen).
    outbound: BTreeMap<PacketId, (String, QoS, bool)>,
    next_pid: PacketId,
    received: BTreeSet<String>,
}

impl Model {
    fn new(name: &'static str, persistent: bool, v5: bool) -> Model {
        Model {
            name,
            persistent,
            v5,
            conn: None,
            subs: Vec::new(),
            inbound: BTreeMap::new(),
            owed: Vec::new(),
            outbound: BTreeMap::new(),
            next_pid: 1,
            received: BTreeSet::new(),
        }
    }

    fn connect_packet(&self) -> roost_core::Connect {
        match (self.v5, self.persistent) {
            (true, true) => v5(self.name).resume().expiry(3600),
            (true, false) => v5(self.name),
            (false, p) => v311(self.name, !p),
        }
    }

    fn fresh_pid(&mut self) -> PacketId {
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if !self.outbound.contains_key(&pid) {
                return pid;
            }
        }
    }

    /// The connection ended: owed acknowledgements are never sent.
    fn ended(&mut self) {
        self.conn = None;
        self.owed.clear();
        self.outbound
            .retain(|_, (_, qos, rec)| *qos == QoS::ExactlyOnce && *rec);
        if !self.persistent {
            self.subs.clear();
            self.inbound.clear();
            self.outbound.clear();
        }
    }
}

struct Run {
    h: Harness,
    rng: Rng,
    clients: Vec<Model>,
    /// Payloads each persistent client must receive.
    expected: BTreeMap<usize, BTreeSet<String>>,
    /// Payloads produced to the queue and acknowledged.
    queued: BTreeSet<String>,
    /// Queue deliveries, by payload, to any client.
    queue_got: BTreeSet<String>,
    seq: u64,
    seed: u64,
}

impl Run {
    fn fail(&self, what: String) -> ! {
        panic!("fuzz seed {}: {what}", self.seed)
    }

    /// Reads what the broker sent to client `c` on connection `id`.
    async fn read(&mut self, c: usize, id: Id) {
        let packets = self.h.take(id);
        for p in packets {
            self.on_packet(c, p);
        }
    }

    fn on_packet(&mut self, c: usize, p: Packet) {
        let seed = self.seed;
        let m = &mut self.clients[c];
        match p {
            Packet::Publish(p) => {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                if p.topic.starts_with("$queue/") || payload.starts_with('q') {
                    self.queue_got.insert(payload.clone());
                }
                m.received.insert(payload);
                let pid = p.packet_id;
                match p.qos {
                    QoS::AtMostOnce => {}
                    qos => {
                        if !p.dup && m.inbound.contains_key(&pid) {
                            panic!(
                                "fuzz seed {seed}: {} got a new PUBLISH with packet id {pid} \
                                 still in flight ({:?})",
                                m.name, m.inbound[&pid]
                            );
                        }
                        let state = if qos == QoS::AtLeastOnce {
                            Inbound::Unacked
                        } else {
                            Inbound::Received
                        };
                        // A resent QoS 2 whose PUBREC was sent stays recorded.
                        let e = m.inbound.entry(pid).or_insert(state);
                        if *e != Inbound::Recorded {
                            *e = state;
                        }
                        m.owed.push(if qos == QoS::AtLeastOnce {
                            puback(pid)
                        } else {
                            pubrec(pid)
                        });
                    }
                }
            }
            Packet::PubRel(r) => {
                m.owed.push(pubcomp(r.packet_id));
            }
            Packet::PubAck(r) => {
                if let Some((payload, _, _)) = m.outbound.remove(&r.packet_id)
                    && !r.reason.is_error()
                {
                    self.accepted(c, payload);
                }
            }
            Packet::PubRec(r) => {
                let accepted = match m.outbound.get_mut(&r.packet_id) {
                    Some(e) if !r.reason.is_error() && !e.2 => {
                        e.2 = true;
                        Some(e.0.clone())
                    }
                    Some(_) if r.reason.is_error() => {
                        m.outbound.remove(&r.packet_id);
                        None
                    }
                    _ => None,
                };
                if let Some(payload) = accepted {
                    self.clients[c].owed.push(pubrel(r.packet_id));
                    self.accepted(c, payload);
                }
            }
            Packet::PubComp(r) => {
                m.outbound.remove(&r.packet_id);
            }
            Packet::SubAck(_) | Packet::Disconnect(_) | Packet::ConnAck(_) => {}
            other => {
                let name = m.name;
                self.fail(format!("{name} got an unexpected {other:?}"))
            }
        }
    }

    /// The broker acknowledged `payload` from client `from`: record who must get it.
    fn accepted(&mut self, _from: usize, payload: String) {
        let topic = payload.split('|').nth(1).unwrap_or("").to_owned();
        if topic.starts_with("$queue/") {
            self.queued.insert(payload);
            return;
        }
        for (i, m) in self.clients.iter().enumerate() {
            if m.persistent
                && m.subs.iter().any(|(f, q)| {
                    *q != QoS::AtMostOnce && !f.starts_with("$share/") && matches(f, &topic)
                })
            {
                self.expected.entry(i).or_default().insert(payload.clone());
            }
        }
    }

    async fn read_all(&mut self) {
        for c in 0..self.clients.len() {
            if let Some(id) = self.clients[c].conn {
                self.read(c, id).await;
                if !self.h.is_connected(id) {
                    self.clients[c].ended();
                }
            }
        }
    }

    /// Sends one owed acknowledgement of client `c`, picked at random.
    async fn settle_one(&mut self, c: usize) {
        let Some(id) = self.clients[c].conn else {
            return;
        };
        if self.clients[c].owed.is_empty() {
            return;
        }
        let i = self.rng.below(self.clients[c].owed.len());
        let packet = self.clients[c].owed.swap_remove(i);
        let m = &mut self.clients[c];
        match &packet {
            Packet::PubAck(r) | Packet::PubComp(r) => {
                m.inbound.remove(&r.packet_id);
            }
            Packet::PubRec(r) => {
                m.inbound.insert(r.packet_id, Inbound::Recorded);
            }
            _ => {}
        }
        self.h.send(id, packet).await;
    }

    async fn connect(&mut self, c: usize) {
        if let Some(old) = self.clients[c].conn {
            self.read(c, old).await;
        }
        let (id, ack) = self.h.connect(self.clients[c].connect_packet()).await;
        if let Some(old) = self.clients[c].conn.take() {
            self.read(c, old).await;
            self.clients[c].ended();
        }
        let m = &mut self.clients[c];
        if !m.persistent || !ack.session_present {
            m.subs.clear();
            m.inbound.clear();
            m.outbound.clear();
        }
        m.conn = Some(id);
        // PUBRELs of QoS 2 publishes the broker recorded before the connection ended.
        let rels: Vec<PacketId> = m.outbound.iter().filter(|e| e.1.2).map(|e| *e.0).collect();
        m.owed.extend(rels.into_iter().map(pubrel));
    }

    async fn step(&mut self) {
        // Clients stay away for a while, so persistent sessions collect messages offline.
        let mut c = self.rng.below(self.clients.len());
        if self.clients[c].conn.is_none() {
            let online: Vec<usize> = (0..self.clients.len())
                .filter(|&i| self.clients[i].conn.is_some())
                .collect();
            if online.is_empty() || self.rng.chance(20) {
                self.connect(c).await;
                self.read_all().await;
                return;
            }
            c = *self.rng.pick(&online);
        }
        let Some(id) = self.clients[c].conn else {
            return;
        };
        match self.rng.below(100) {
            0..=9 => {
                let (filter, qos) = match self.rng.below(10) {
                    0..=5 => (
                        self.rng.pick(&FILTERS).to_string(),
                        qos_of(self.rng.below(3)),
                    ),
                    6..=7 => (
                        self.rng.pick(&SHARED).to_string(),
                        qos_of(self.rng.below(3)),
                    ),
                    _ => (QUEUE_GROUP.to_owned(), QoS::AtLeastOnce),
                };
                let pid = self.clients[c].fresh_pid();
                self.h.send(id, subscribe(pid, &filter, qos)).await;
                let m = &mut self.clients[c];
                m.subs.retain(|(f, _)| *f != filter);
                m.subs.push((filter, qos));
            }
            10..=44 => {
                let queue = self.rng.chance(15);
                let topic = if queue {
                    "$queue/jq".to_owned()
                } else {
                    self.rng.pick(&TOPICS).to_string()
                };
                let qos = if queue {
                    qos_of(1 + self.rng.below(2))
                } else {
                    qos_of(self.rng.below(3))
                };
                self.seq += 1;
                let payload = format!("{}{}|{topic}", if queue { "q" } else { "m" }, self.seq);
                let pid = if qos == QoS::AtMostOnce {
                    0
                } else {
                    let pid = self.clients[c].fresh_pid();
                    self.clients[c]
                        .outbound
                        .insert(pid, (payload.clone(), qos, false));
                    pid
                };
                let packet = Packet::Publish(Publish {
                    qos,
                    packet_id: pid,
                    topic,
                    payload: Bytes::from(payload),
                    ..Publish::default()
                });
                self.h.send(id, packet).await;
            }
            45..=79 => {
                for _ in 0..1 + self.rng.below(3) {
                    self.settle_one(c).await;
                }
            }
            80..=84 => self.connect(c).await,
            85..=89 => {
                self.read(c, id).await;
                self.h.lose(id).await;
                self.read(c, id).await;
                self.clients[c].ended();
            }
            90..=93 => {
                self.read(c, id).await;
                self.h
                    .disconnect(id, roost_core::ReasonCode::Success, None)
                    .await;
                self.read(c, id).await;
                self.clients[c].ended();
            }
            94..=96 => {
                self.h
                    .tick_queues(1_000 + self.rng.below(40_000) as u64)
                    .await
            }
            _ => {
                self.h
                    .sleep(Duration::from_millis(self.rng.below(3_000) as u64))
                    .await
            }
        }
        self.read_all().await;
    }

    /// Every client connects again (persistent ones resume) and acknowledges everything
    /// until nothing more comes; a last consumer joins the queue's group.
    async fn drain(&mut self) {
        for c in 0..self.clients.len() {
            if self.clients[c].persistent || self.clients[c].conn.is_some() {
                self.connect(c).await;
                self.read_all().await;
            }
        }
        let (q, _) = self.h.connect(v5("fuzz-drain")).await;
        self.h
            .send(q, subscribe(1, QUEUE_GROUP, QoS::AtLeastOnce))
            .await;
        self.clients.push(Model::new("fuzz-drain", false, true));
        let last = self.clients.len() - 1;
        self.clients[last].conn = Some(q);
        for round in 0..200 {
            self.read_all().await;
            let mut any = false;
            for c in 0..self.clients.len() {
                while !self.clients[c].owed.is_empty() && self.clients[c].conn.is_some() {
                    self.settle_one(c).await;
                    any = true;
                }
            }
            self.read_all().await;
            if !any {
                if round > 3 {
                    break;
                }
                self.h.tick_queues(120_000).await;
                self.h.sleep(Duration::from_secs(1)).await;
            }
        }
    }

    fn check(&self) {
        for (c, want) in &self.expected {
            let m = &self.clients[*c];
            let missing: Vec<_> = want.difference(&m.received).collect();
            if !missing.is_empty() {
                self.fail(format!(
                    "{} (persistent) never got acknowledged {missing:?}",
                    m.name
                ));
            }
        }
        let missing: Vec<_> = self.queued.difference(&self.queue_got).collect();
        if !missing.is_empty() {
            self.fail(format!(
                "acknowledged $queue/ produces never delivered: {missing:?}"
            ));
        }
    }
}

async fn run_case(seed: u64, steps: usize) -> (usize, usize) {
    let mut run = Run {
        h: Harness::new().await,
        rng: Rng(seed | 1),
        clients: vec![
            Model::new("p311", true, false),
            Model::new("p5", true, true),
            Model::new("c311", false, false),
            Model::new("c5", false, true),
        ],
        expected: BTreeMap::new(),
        queued: BTreeSet::new(),
        queue_got: BTreeSet::new(),
        seq: 0,
        seed,
    };
    for _ in 0..steps {
        run.step().await;
    }
    run.drain().await;
    run.check();
    (
        run.expected.values().map(BTreeSet::len).sum(),
        run.queued.len(),
    )
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(start_paused = true)]
async fn random_packet_sequences_keep_the_invariants() {
    let cases = env_u64("ROOST_FUZZ_CASES").unwrap_or(40);
    let steps = env_u64("ROOST_FUZZ_STEPS").unwrap_or(150) as usize;
    let base = env_u64("ROOST_FUZZ_SEED").unwrap_or(0x5eed);
    let (mut checked, mut queued) = (0, 0);
    for case in 0..cases {
        let (c, q) = run_case(base.wrapping_add(case.wrapping_mul(0x9e37_79b9)), steps).await;
        checked += c;
        queued += q;
    }
    // The cases must exercise the invariants, not pass vacuously.
    assert!(
        checked > cases as usize,
        "only {checked} deliveries to persistent sessions checked"
    );
    assert!(queued > 0, "no $queue/ produce was acknowledged");
    eprintln!(
        "fuzz: {cases} cases x {steps} steps, {checked} persistent deliveries and {queued} queue produces checked"
    );
}

#[test]
fn the_filter_model_matches_like_mqtt() {
    assert!(matches("a/+", "a/b") && matches("a/#", "a/b/c") && matches("#", "x/y/z"));
    assert!(matches("+/b", "x/b") && !matches("a/+", "a/b/c") && !matches("a/b", "a/c"));
}
