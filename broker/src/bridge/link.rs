//! One bridge's task: connect to the remote, forward both ways while the connection
//! lasts, reconnect with backoff and jitter when it drops.
//!
//! Out: the task is the one consumer of the bridge's queue (group `bridge`). Each
//! message the queue hands it is sent to the remote; it is settled in the queue when
//! the remote acknowledges it (PUBACK, or PUBCOMP for QoS 2; QoS 0 once written). When
//! the connection drops, the task leaves the group, so what was in flight is handed out
//! again, first and in order, on the next connection.
//!
//! In: the task subscribes at the remote (a persistent session, so the remote keeps
//! what arrives while the bridge is away) and publishes what comes locally under its
//! own client id, acknowledging to the remote once that is done.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use roost_core::{
    Connect, Disconnect, Message, Packet, PacketId, Properties, ProtocolVersion, PubResponse,
    Publish, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};
use roost_engine::broker::{Broker, Fanout};
use roost_queue::{DeliverySink, GroupKey, MessageId, QueueDelivery};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::settings::Direction;
use super::status::{BridgeDrop, BridgeError, BridgeStatus};
use super::wire::{Dialer, Wire};

/// The consumer group a bridge reads its queue as.
const GROUP: &str = "bridge";

/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(30);

/// Session expiry asked of an MQTT 5 remote: a week of keeping what comes in while
/// the bridge is away.
const SESSION_EXPIRY: u32 = 7 * 24 * 3600;

/// Recent messages an MQTT 3.1.1 `both` bridge sent, to recognise their echoes.
const ECHO_MEMORY: usize = 65_536;

/// A bridge's task and what it needs.
pub struct Link {
    broker: Arc<Broker>,
    status: Arc<BridgeStatus>,
    dialer: Dialer,
    client_id: Arc<str>,
    password: Option<Bytes>,
    version: ProtocolVersion,
}

/// Hands the queue's deliveries to the task (bounded by the consumer window).
struct Sink(mpsc::Sender<QueueDelivery>);

impl DeliverySink for Sink {
    fn offer(&self, delivery: QueueDelivery) -> bool {
        self.0.try_send(delivery).is_ok()
    }
}

/// Why a connection ended.
enum End {
    /// roost shuts down.
    Shutdown,
    /// The connection failed; the task reconnects.
    Lost(String),
}

impl Link {
    /// Reads the bridge's password and TLS files.
    pub fn new(broker: Arc<Broker>, status: Arc<BridgeStatus>) -> Result<Link, BridgeError> {
        let config = &status.config;
        let password = match (&config.password, &config.password_file) {
            (Some(p), _) => Some(Bytes::from(p.clone().into_bytes())),
            (None, Some(path)) => {
                let text = std::fs::read(path).map_err(|source| BridgeError::Password {
                    name: config.name.clone(),
                    path: path.display().to_string(),
                    source,
                })?;
                let text = text.strip_suffix(b"\n").unwrap_or(&text);
                Some(Bytes::copy_from_slice(text))
            }
            (None, None) => None,
        };
        let dialer = Dialer::new(config).map_err(|why| BridgeError::Tls {
            name: config.name.clone(),
            why,
        })?;
        let version = if config.is_v5() {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V3_1_1
        };
        Ok(Link {
            client_id: Arc::from(config.remote_client_id()),
            broker,
            status,
            dialer,
            password,
            version,
        })
    }

    /// The id the bridge's incoming messages are published under.
    pub fn client_id(&self) -> Arc<str> {
        self.client_id.clone()
    }

    /// Connects and forwards until `shutdown`, reconnecting after each loss.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.status.config.name.clone();
        let mut failures: u32 = 0;
        while !*shutdown.borrow() {
            let started = Instant::now();
            let end = self.connection(&mut shutdown).await;
            let was_up = self.status.is_up();
            match end {
                End::Shutdown => break,
                End::Lost(why) => {
                    if was_up {
                        warn!(bridge = %name, address = %self.status.config.address, "bridge connection lost: {why}");
                    } else {
                        debug!(bridge = %name, address = %self.status.config.address, "bridge cannot connect: {why}");
                    }
                    self.status.lost(&why);
                }
            }
            failures = if was_up && started.elapsed() >= STABLE {
                0
            } else {
                failures.saturating_add(1)
            };
            let delay = backoff(
                self.status.config.reconnect_initial_ms,
                self.status.config.reconnect_max_ms,
                failures,
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.status.lost("roost shut down");
    }

    /// One connection, from CONNECT to its end.
    async fn connection(&self, shutdown: &mut watch::Receiver<bool>) -> End {
        let mut wire = match self.dialer.dial(self.version).await {
            Ok(w) => w,
            Err(why) => return End::Lost(why),
        };
        if let Err(why) = self.handshake(&mut wire).await {
            return End::Lost(why);
        }
        self.status.connected();
        let config = &self.status.config;
        info!(bridge = %config.name, address = %config.address, protocol = %config.protocol, "bridge connected");
        let queue = self.status.queue.clone();
        let key = GroupKey::new(GROUP, None);
        let (tx, rx) = mpsc::channel(usize::from(config.inflight));
        // A fixed window of `inflight`: the link knows its own limit (the channel's size),
        // so the queue's adaptive window for consumers that announce none does not apply.
        let window = u32::from(config.inflight);
        if let Err(e) = queue.join(&key, self.client_id.clone(), window, Arc::new(Sink(tx))) {
            return End::Lost(format!("cannot read the bridge's queue: {e}"));
        }
        let mut session = Session {
            link: self,
            wire,
            deliveries: rx,
            in_flight: HashMap::new(),
            incoming_qos2: HashMap::new(),
            next_id: 1,
            ping_sent: None,
            echoes: Echoes::default(),
        };
        let end = session.serve(shutdown).await;
        // What was in flight goes out again, first, on the next connection.
        queue.leave(&key, &self.client_id);
        end
    }

    /// CONNECT, CONNACK, and the subscriptions of the incoming mappings.
    async fn handshake(&self, wire: &mut Wire) -> Result<(), String> {
        let config = &self.status.config;
        let mut connect = Connect {
            protocol: self.version,
            clean_start: false,
            keep_alive: config.keep_alive,
            client_id: self.client_id.to_string(),
            will: None,
            username: config.username.clone(),
            password: self.password.clone(),
            properties: Properties::default(),
        };
        if self.version.is_v5() {
            connect.properties.session_expiry_interval = Some(SESSION_EXPIRY);
            connect.properties.receive_maximum = Some(u16::MAX);
        }
        wire.send(&Packet::Connect(Box::new(connect))).await?;
        let ack = tokio::time::timeout(super::wire::CONNECT_TIMEOUT, wire.read())
            .await
            .map_err(|_| "no CONNACK within 10 s".to_owned())??;
        match ack {
            Some(Packet::ConnAck(a)) if a.code == ReasonCode::Success => {}
            Some(Packet::ConnAck(a)) => {
                return Err(format!("the remote refused the connection: {:?}", a.code));
            }
            Some(other) => {
                return Err(format!(
                    "the remote answered CONNECT with {:?}",
                    other.packet_type()
                ));
            }
            None => return Err("the remote closed the connection at CONNECT".into()),
        }
        let filters: Vec<(String, SubscriptionOptions)> = config
            .topics
            .iter()
            .filter(|t| t.comes_in())
            .map(|t| {
                (
                    t.remote_filter(),
                    SubscriptionOptions {
                        qos: QoS::from_u8(t.qos).unwrap_or(QoS::AtLeastOnce),
                        // The remote does not send the bridge's own messages back.
                        no_local: self.version.is_v5(),
                        retain_as_published: true,
                        ..SubscriptionOptions::default()
                    },
                )
            })
            .collect();
        if !filters.is_empty() {
            wire.send(&Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters,
                properties: Properties::default(),
            }))
            .await?;
        }
        Ok(())
    }
}

/// The wait before reconnect attempt `failures` (1 after the first failure): doubling
/// from `initial_ms` up to `max_ms`, then a random half of it taken off, so bridges that
/// lost the same remote do not all come back at the same moment.
fn backoff(initial_ms: u64, max_ms: u64, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let full = initial_ms.saturating_mul(1u64 << exp).min(max_ms).max(1);
    let mut random = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let jitter = u64::from_le_bytes(random) % (full / 2 + 1);
    Duration::from_millis(full - jitter)
}

/// What the bridge sent and has not been acknowledged yet.
struct Sent {
    id: MessageId,
    group: GroupKey,
}

/// One connection's state.
struct Session<'a> {
    link: &'a Link,
    wire: Wire,
    deliveries: mpsc::Receiver<QueueDelivery>,
    /// Packet id -> the queue message it carries (QoS 1/2 out).
    in_flight: HashMap<PacketId, Sent>,
    /// QoS 2 publishes from the remote, published locally, waiting for PUBREL.
    incoming_qos2: HashMap<PacketId, ()>,
    next_id: PacketId,
    ping_sent: Option<Instant>,
    echoes: Echoes,
}

/// What woke a session. Handled right after the wait and never held across one, so
/// its size costs nothing and boxing a packet would.
#[allow(clippy::large_enum_variant)]
enum Woke {
    Packet(Result<Option<Packet>, String>),
    Delivery(QueueDelivery),
    KeepAlive,
    Shutdown,
}

impl Session<'_> {
    async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> End {
        let keep_alive = Duration::from_secs(u64::from(self.link.status.config.keep_alive));
        let mut ticker = tokio::time::interval(keep_alive);
        ticker.tick().await;
        loop {
            let room = self.in_flight.len() < usize::from(self.link.status.config.inflight);
            let woke = tokio::select! {
                p = self.wire.read() => Woke::Packet(p),
                Some(d) = self.deliveries.recv(), if room => Woke::Delivery(d),
                _ = ticker.tick() => Woke::KeepAlive,
                _ = shutdown.changed() => Woke::Shutdown,
            };
            let step = match woke {
                Woke::Packet(Ok(Some(p))) => self.on_packet(p).await,
                Woke::Packet(Ok(None)) => Err("the remote closed the connection".into()),
                Woke::Packet(Err(why)) => Err(why),
                Woke::Delivery(d) => {
                    let mut step = self.send_out(d);
                    // Take what else is ready, up to the window, for one write.
                    while step.is_ok()
                        && self.in_flight.len() < usize::from(self.link.status.config.inflight)
                    {
                        match self.deliveries.try_recv() {
                            Ok(d) => step = self.send_out(d),
                            Err(_) => break,
                        }
                    }
                    step
                }
                Woke::KeepAlive => self.keep_alive(keep_alive),
                Woke::Shutdown => {
                    let bye = Packet::Disconnect(Disconnect::default());
                    let _ = self.wire.send(&bye).await;
                    return End::Shutdown;
                }
            };
            if let Err(why) = step {
                return End::Lost(why);
            }
            if self.wire.has_output()
                && let Err(why) = self.wire.flush().await
            {
                return End::Lost(why);
            }
        }
    }

    fn keep_alive(&mut self, period: Duration) -> Result<(), String> {
        if let Some(sent) = self.ping_sent
            && sent.elapsed() >= period
        {
            return Err("no PINGRESP within the keep-alive".into());
        }
        if self.ping_sent.is_none() {
            self.ping_sent = Some(Instant::now());
            self.wire.queue(&Packet::PingReq)?;
        }
        Ok(())
    }

    fn next_packet_id(&mut self) -> PacketId {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&id) {
                return id;
            }
        }
    }

    /// Sends one message of the queue to the remote.
    fn send_out(&mut self, d: QueueDelivery) -> Result<(), String> {
        let status = &self.link.status;
        let (mut properties, topic, retain) = roost_engine::queues::captured_publish(&d.headers)
            .unwrap_or_else(|| (Properties::default(), d.subtopic.clone(), false));
        let mapped = status
            .config
            .topics
            .iter()
            .find_map(|t| t.outward(&topic).map(|remote| (remote, t)));
        let Some((remote_topic, mapping)) = mapped else {
            status.dropped(BridgeDrop::Unmapped);
            self.settle(&d.id, &d.group);
            return Ok(());
        };
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        let qos = QoS::from_u8(mapping.qos).unwrap_or(QoS::AtLeastOnce);
        if !self.link.version.is_v5() && mapping.direction == Direction::Both {
            self.echoes.sent(&remote_topic, &d.payload);
        }
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            self.next_packet_id()
        };
        self.wire.queue(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: remote_topic,
            packet_id,
            properties,
            payload: d.payload.clone(),
        }))?;
        if qos == QoS::AtMostOnce {
            status.forwarded_out.fetch_add(1, Ordering::Relaxed);
            self.settle(&d.id, &d.group);
        } else {
            self.in_flight.insert(
                packet_id,
                Sent {
                    id: d.id,
                    group: d.group,
                },
            );
        }
        Ok(())
    }

    /// The message is done with: the queue lets it go.
    fn settle(&self, id: &MessageId, group: &GroupKey) {
        let queue = &self.link.status.queue;
        let settled = queue.ack(&self.link.client_id, Some(group), id);
        // The settle took effect; its durability follows with the queue's next commit.
        tokio::spawn(async move {
            let _ = settled.await;
        });
    }

    /// The remote acknowledged (or refused) packet `packet_id`.
    fn acknowledged(&mut self, packet_id: PacketId, reason: ReasonCode) {
        let Some(sent) = self.in_flight.remove(&packet_id) else {
            return;
        };
        let status = &self.link.status;
        if (reason as u8) >= 0x80 {
            warn!(bridge = %status.config.name, "the remote refused a message: {reason:?}");
            status.dropped(BridgeDrop::RemoteRefused);
        } else {
            status.forwarded_out.fetch_add(1, Ordering::Relaxed);
        }
        self.settle(&sent.id, &sent.group);
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), String> {
        match packet {
            Packet::PubAck(a) | Packet::PubComp(a) => self.acknowledged(a.packet_id, a.reason),
            Packet::PubRec(r) => {
                if (r.reason as u8) >= 0x80 {
                    self.acknowledged(r.packet_id, r.reason);
                } else {
                    self.wire
                        .queue(&Packet::PubRel(PubResponse::new(r.packet_id)))?;
                }
            }
            Packet::Publish(p) => self.came_in(p).await?,
            Packet::PubRel(r) => {
                self.incoming_qos2.remove(&r.packet_id);
                self.wire
                    .queue(&Packet::PubComp(PubResponse::new(r.packet_id)))?;
            }
            Packet::SubAck(a) => {
                for (reason, filter) in a.reasons.iter().zip(
                    self.link
                        .status
                        .config
                        .topics
                        .iter()
                        .filter(|t| t.comes_in()),
                ) {
                    if (*reason as u8) >= 0x80 {
                        warn!(bridge = %self.link.status.config.name, filter = %filter.remote_filter(), "the remote refused the subscription: {reason:?}");
                    }
                }
            }
            Packet::PingResp => self.ping_sent = None,
            Packet::Disconnect(d) => {
                return Err(format!("the remote disconnected: {:?}", d.reason));
            }
            other => {
                return Err(format!(
                    "unexpected {:?} from the remote",
                    other.packet_type()
                ));
            }
        }
        Ok(())
    }

    /// A publish from the remote: published locally, then acknowledged.
    async fn came_in(&mut self, p: Publish) -> Result<(), String> {
        let status = &self.link.status;
        let duplicate_qos2 =
            p.qos == QoS::ExactlyOnce && self.incoming_qos2.contains_key(&p.packet_id);
        let echo = !self.link.version.is_v5() && self.echoes.is_echo(&p.topic, &p.payload);
        let local = status.config.topics.iter().find_map(|t| t.inward(&p.topic));
        if let (Some(topic), false, false) = (local, duplicate_qos2, echo) {
            let mut properties = p.properties;
            properties.topic_alias = None;
            properties.subscription_identifiers.clear();
            let msg = Message {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                publisher: Some(self.link.client_id.clone()),
                received_at: roost_engine::clock::now(),
            };
            publish_locally(&self.link.broker, Arc::new(msg)).await?;
            status.forwarded_in.fetch_add(1, Ordering::Relaxed);
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self
                .wire
                .queue(&Packet::PubAck(PubResponse::new(p.packet_id)))?,
            QoS::ExactlyOnce => {
                self.incoming_qos2.insert(p.packet_id, ());
                self.wire
                    .queue(&Packet::PubRec(PubResponse::new(p.packet_id)))?;
            }
        }
        Ok(())
    }
}

/// Publishes `msg` to local subscribers and waits until what that stored is stored:
/// the remote's acknowledgement follows only then.
async fn publish_locally(broker: &Broker, msg: Arc<Message>) -> Result<(), String> {
    let mut out = Fanout::default();
    // A retained message past the retained bounds is still routed (not retained).
    let _ = broker.publish(msg, &mut out, false);
    broker
        .settle(out)
        .await
        .map_err(|e| format!("cannot store an incoming message: {e}"))?;
    Ok(())
}

/// The messages an MQTT 3.1.1 bridge sent recently on `both` mappings (3.1.1 has no
/// No Local): one that comes back from the remote is the bridge's own, and is dropped.
#[derive(Default)]
struct Echoes {
    hasher: std::collections::hash_map::RandomState,
    counts: HashMap<u64, u32>,
    order: VecDeque<u64>,
}

impl Echoes {
    fn fingerprint(&self, topic: &str, payload: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        topic.hash(&mut h);
        payload.hash(&mut h);
        h.finish()
    }

    fn sent(&mut self, topic: &str, payload: &[u8]) {
        let f = self.fingerprint(topic, payload);
        *self.counts.entry(f).or_default() += 1;
        self.order.push_back(f);
        if self.order.len() > ECHO_MEMORY
            && let Some(old) = self.order.pop_front()
        {
            self.forget(old);
        }
    }

    fn forget(&mut self, f: u64) {
        if let Some(n) = self.counts.get_mut(&f) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&f);
            }
        }
    }

    /// Whether a message from the remote is one the bridge sent (and forgets it).
    fn is_echo(&mut self, topic: &str, payload: &[u8]) -> bool {
        let f = self.fingerprint(topic, payload);
        if !self.counts.contains_key(&f) {
            return false;
        }
        self.forget(f);
        if let Some(at) = self.order.iter().position(|x| *x == f) {
            self.order.remove(at);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_below_it() {
        for failures in 1..40 {
            let full = (100u64 << (failures - 1).min(32)).min(5000);
            let d = backoff(100, 5000, failures).as_millis() as u64;
            assert!(d <= full && d >= full / 2, "{failures}: {d} of {full}");
        }
        let draws: std::collections::HashSet<_> = (0..20).map(|_| backoff(1000, 1000, 5)).collect();
        assert!(draws.len() > 1, "jitter varies");
    }

    #[test]
    fn an_echo_is_recognised_once() {
        let mut e = Echoes::default();
        e.sent("a/b", b"x");
        e.sent("a/b", b"x");
        assert!(!e.is_echo("a/b", b"y"));
        assert!(e.is_echo("a/b", b"x"));
        assert!(e.is_echo("a/b", b"x"));
        assert!(!e.is_echo("a/b", b"x"), "each send is one echo");
    }
}
