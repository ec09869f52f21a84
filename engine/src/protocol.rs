//! The per-connection MQTT protocol as a sans-I/O state machine.
//!
//! [`Connection`] takes decoded packets, deliveries and clock readings in, and gives
//! encoded bytes ([`Connection::take_output`]) and [`Event`]s for the broker out. It
//! never touches a socket, a timer or another session, so every QoS flow, window,
//! alias and keep-alive rule is unit-tested below without tokio.
//!
//! The CONNECT handshake is split in two because it needs the session map in between:
//! [`plan_connect`] checks the CONNECT and decides the client id, expiry and keep-alive;
//! the broker then finds or creates the session; [`Connection::accept`] writes CONNACK
//! and resumes the session (DUP resend of in-flight messages, then the queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use roost_core::codec::{self, PublishView};
use roost_core::topic::{self, TopicError};
use roost_core::{
    ConnAck, Connect, DecodeError, Disconnect, LastWill, Message, Packet, PacketId,
    ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe,
};

use crate::access::{Access, Authorizer};
use crate::metrics::DisconnectReason;
use crate::queues::QueueFilter;
use crate::retained::Scan;
use crate::scram;
use crate::session::{
    Delivery, Inflight, InflightState, QueueFull, QueueRef, Session, SubscriptionRecord,
};
use crate::store::Op;

pub use crate::settings::Limits;

/// What the broker must do on behalf of a connection.
#[derive(Debug, Clone)]
pub enum Event {
    /// Route this message to subscribers (and store it if retained).
    Publish(Arc<Message>),
    /// A v5 QoS 1/2 retained publish: route and retain it, or refuse it with 0x97 when
    /// the retained bounds leave no room, then resolve `ack` (see
    /// [`Connection::resolve_ack`]).
    RetainedPublish {
        /// The message.
        msg: Arc<Message>,
        /// The deferred acknowledgement.
        ack: AckToken,
    },
    /// Add (or replace) this subscription in the router, then send retained messages
    /// as its options say.
    Subscribe {
        /// Raw filter, with any `$share/<group>/` prefix.
        filter: String,
        /// Subscription options.
        options: SubscriptionOptions,
        /// Subscription identifier.
        identifier: Option<u32>,
        /// True when the session already had this subscription (retain handling 1).
        existed: bool,
    },
    /// Remove this subscription from the router.
    Unsubscribe {
        /// Raw filter, as subscribed.
        filter: String,
    },
    /// Join (or create) the consumer group a `$queue/` subscription names.
    QueueSubscribe {
        /// Raw filter, as the session keeps it.
        filter: String,
        /// The queue, group and filter it names.
        parsed: QueueFilter,
        /// Subscription options (the QoS of deliveries).
        options: SubscriptionOptions,
        /// Subscription identifier.
        identifier: Option<u32>,
        /// True when the session already had this subscription.
        existed: bool,
        /// For a subscription from a SUBSCRIBE: the SUBACK waits for the broker to say
        /// whether the queue and group could be joined (or created), with
        /// [`Connection::settle_subscription`]. `None` when a resumed session rejoins.
        held: Option<HeldSlot>,
    },
    /// Leave the groups of a `$queue/` subscription's queue.
    QueueUnsubscribe {
        /// The queue.
        queue: String,
    },
    /// Store this `$queue/...` publish in its queue, then resolve its acknowledgement
    /// (`ack`, absent for QoS 0) with [`Connection::resolve_ack`].
    QueuePublish {
        /// The message, topic `$queue/<name>[/<rest>]`.
        msg: Arc<Message>,
        /// The deferred acknowledgement.
        ack: Option<AckToken>,
    },
    /// A queue delivery was acknowledged (or, with `nack`, refused) by the client.
    QueueSettle {
        /// Which message, for which group.
        queue: Arc<QueueRef>,
        /// True for a v5 PUBACK/PUBREC with a reason code of 0x80 or above.
        nack: bool,
    },
}

/// Identifies a deferred acknowledgement of an inbound publish.
pub type AckToken = u64;

/// A filter's place in a SUBACK that waits for the broker (see [`Event::Subscribe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSlot {
    packet_id: PacketId,
    index: usize,
}

/// A SUBACK waiting for the broker's word on its `$queue/` filters.
#[derive(Debug)]
struct HeldSubAck {
    packet_id: PacketId,
    reasons: Vec<ReasonCode>,
    /// Places of repeated filters, each with the place whose reason code it repeats.
    repeats: Vec<(usize, usize)>,
    /// Filters not settled yet.
    open: usize,
}

/// The places of a SUBSCRIBE's filters that repeat a later one, each with that later
/// place: a filter given twice is subscribed once, with its last options (as if each
/// replaced the one before), and every place gets the same reason code. Without this
/// one packet of a few thousand copies of one filter would be as many subscriptions'
/// work (and retained messages).
fn repeated_filters(filters: &[(String, SubscriptionOptions)]) -> Vec<(usize, usize)> {
    if filters.len() < 2 {
        return Vec::new();
    }
    let mut last = std::collections::HashMap::with_capacity(filters.len());
    for (i, (raw, _)) in filters.iter().enumerate() {
        last.insert(raw.as_str(), i);
    }
    filters
        .iter()
        .enumerate()
        .filter_map(|(i, (raw, _))| {
            let at = last.get(raw.as_str()).copied().unwrap_or(i);
            (at != i).then_some((i, at))
        })
        .collect()
}

/// Longest `consumer-group` user property taken on a `$queue/` subscription (each
/// subscription keeps a copy; a queue name may have 128 bytes).
const MAX_CONSUMER_GROUP: usize = 256;

/// An acknowledgement of an inbound QoS 1/2 publish, kept in arrival order: MQTT
/// wants PUBACKs (and PUBRECs) in the order of their PUBLISHes, and a queue publish is
/// acknowledged only once stored.
#[derive(Debug, Clone, Copy)]
struct PendingAck {
    packet_id: PacketId,
    qos: QoS,
    token: AckToken,
    reason: Option<ReasonCode>,
    /// Reason string for an error reason code.
    why: &'static str,
}

/// The outcome of [`plan_connect`] for an acceptable CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectPlan {
    /// Client id to use (the client's, or one assigned by the broker).
    pub client_id: Arc<str>,
    /// True when the broker assigned the id (a v5 CONNACK then carries it).
    pub assigned: bool,
    /// Clean session / clean start.
    pub clean_start: bool,
    /// Session expiry in seconds after the connection ends (`u32::MAX`: never).
    pub session_expiry: u32,
    /// True when `session_expiry` was capped below what the client asked (v5 tells it).
    pub expiry_capped: bool,
    /// Keep-alive in force, in seconds (0: none).
    pub keep_alive: u16,
    /// Set when the broker overrides the client's keep-alive (v5 Server Keep Alive).
    pub server_keep_alive: Option<u16>,
    /// The last Authentication Data of an enhanced authentication (the SCRAM
    /// server-final-message), for the CONNACK; set once the exchange succeeded.
    pub authentication_data: Option<bytes::Bytes>,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Send CONNACK with this code, then close.
    Code(ReasonCode, &'static str),
    /// Close without CONNACK (MQTT 3.x malformed content).
    Close(&'static str),
}

/// Longest client id accepted. The session store keys a session's records by its client
/// id and a few bytes more, and its keys hold at most 65535 bytes; MQTT allows a 65535
/// byte id, so the longest few are refused (0x85, 3.x return code 2) rather than stored.
pub const MAX_CLIENT_ID_BYTES: usize = 65_000;

/// Checks a CONNECT and decides the session parameters. `assign_id` makes a client id
/// when the client sent none and may have one.
pub fn plan_connect(
    c: &Connect,
    limits: &Limits,
    assign_id: impl FnOnce() -> String,
) -> Result<ConnectPlan, ConnectRefusal> {
    let v5 = c.protocol.is_v5();
    if v5
        && c.properties
            .authentication_method
            .as_deref()
            .is_some_and(|m| m != scram::METHOD)
    {
        return Err(ConnectRefusal::Code(
            ReasonCode::BadAuthenticationMethod,
            "unsupported authentication method (roost supports SCRAM-SHA-256)",
        ));
    }
    if let Some(will) = &c.will {
        let bad = topic::validate_name(&will.topic).is_err()
            || topic::level_count(&will.topic) > limits.max_topic_levels;
        if bad {
            return Err(if v5 {
                ConnectRefusal::Code(ReasonCode::TopicNameInvalid, "invalid will topic")
            } else {
                ConnectRefusal::Close("invalid will topic")
            });
        }
    }
    let (client_id, assigned) = if c.client_id.is_empty() {
        let allowed = match c.protocol {
            ProtocolVersion::V5 => true,
            ProtocolVersion::V3_1_1 => c.clean_start,
            ProtocolVersion::V3_1 => false,
        };
        if !allowed {
            return Err(ConnectRefusal::Code(
                ReasonCode::ClientIdentifierNotValid,
                "an empty client id needs clean session",
            ));
        }
        (Arc::<str>::from(assign_id()), true)
    } else if c.client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(ConnectRefusal::Code(
            ReasonCode::ClientIdentifierNotValid,
            "client id longer than 65000 bytes",
        ));
    } else {
        (Arc::<str>::from(c.client_id.as_str()), false)
    };
    let asked_expiry = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let session_expiry = asked_expiry.min(limits.session_expiry_max);
    let max_ka = limits.max_keep_alive;
    let (keep_alive, server_keep_alive) =
        if v5 && max_ka > 0 && (c.keep_alive == 0 || c.keep_alive > max_ka) {
            (max_ka, Some(max_ka))
        } else {
            (c.keep_alive, None)
        };
    Ok(ConnectPlan {
        client_id,
        assigned: assigned && v5,
        clean_start: c.clean_start,
        session_expiry,
        expiry_capped: session_expiry != asked_expiry,
        keep_alive,
        server_keep_alive,
        authentication_data: None,
    })
}

/// Appends the CONNACK refusing a CONNECT of `version` with `code` to `out`.
pub fn write_refusal(version: ProtocolVersion, code: ReasonCode, why: &str, out: &mut BytesMut) {
    let mut ack = ConnAck {
        session_present: false,
        code,
        ..ConnAck::default()
    };
    if version.is_v5() {
        ack.properties.reason_string = Some(why.to_owned());
    }
    // Our own CONNACKs always encode: fields are short and the version is known.
    let _ = codec::encode(&Packet::ConnAck(ack), version, out);
}

/// Why the connection is ending, as decided by the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// Short description for the log.
    pub why: String,
    /// The reason code sent in DISCONNECT, or received from the client.
    pub reason: ReasonCode,
    /// Why, as counted in `/metrics`.
    pub kind: DisconnectReason,
    /// True when the client ended the connection with DISCONNECT.
    pub by_client: bool,
}

/// Output buffers at least this large keep their spare room after a write.
const OUTPUT_KEPT: usize = 4096;

/// One client connection's protocol state, wrapped around its [`Session`].
#[derive(Debug)]
pub struct Connection {
    version: ProtocolVersion,
    session: Session,
    limits: Arc<Limits>,
    /// Seconds (0: no keep-alive); small integers keep the state of every connected
    /// client small.
    keep_alive: u16,
    last_received: Instant,
    /// Most QoS 1/2 messages in flight towards the client.
    send_window: u16,
    /// Largest packet the client accepts (`u32::MAX`, more than any MQTT packet, when it
    /// set no limit).
    client_max_packet: u32,
    /// v5 Request Problem Information: may we send reason strings on acks?
    problem_information: bool,
    /// Topic aliases and re-authentication, for the clients that use them.
    extensions: Option<Box<Extensions>>,
    /// The client's Topic Alias Maximum (0: the client takes no aliases).
    client_alias_maximum: u16,
    /// The will, cleared by a normal DISCONNECT or a server shutdown. Boxed: most
    /// clients have none, and a will is hundreds of bytes.
    will: Option<Box<LastWill>>,
    /// CONNECT asked for session expiry 0 (then DISCONNECT may not raise it).
    connect_expiry_zero: bool,
    /// The stored session record is out of date (new connection, subscriptions changed).
    record_dirty: bool,
    /// The CONNACK is in the output, not yet taken for writing.
    connack_unsent: bool,
    /// Acknowledgements of inbound publishes waiting for an earlier one to be resolved.
    acks: std::collections::VecDeque<PendingAck>,
    next_ack_token: AckToken,
    out: BytesMut,
    events: Vec<Event>,
    /// Boxed: set once, at the end.
    close: Option<Box<Close>>,
    /// The ACL this client is held to; `None` when no ACL is configured.
    access: Option<Arc<dyn Authorizer>>,
    /// Counts for `/metrics` since the last [`Connection::take_counts`].
    counts: Counts,
}

/// What only some clients use. Boxed and created on first use: a connection without
/// any of it carries 8 bytes instead of 48 (in every connected client's task).
#[derive(Debug, Default)]
struct Extensions {
    /// Inbound topic aliases, indexed by alias - 1.
    aliases: Vec<Option<String>>,
    /// Outbound topic aliases in use on this connection (at most the client's Topic
    /// Alias Maximum; handed out first come, first served, never reassigned).
    outbound_aliases: std::collections::HashMap<String, u16>,
    /// Set for a client that authenticated with SCRAM: it may re-authenticate.
    reauth: Option<ReAuth>,
    /// SUBACKs waiting for the broker to settle their `$queue/` filters, in order.
    held_subacks: Vec<HeldSubAck>,
    /// New subscriptions' retained messages still to send, in order.
    retained_reads: std::collections::VecDeque<RetainedRead>,
    /// When the client's credentials (a token's `exp`) stop being valid: the connection
    /// is closed then.
    credentials_expire: Option<Instant>,
}

/// A new subscription's reading of the retained messages, a chunk at a time.
#[derive(Debug)]
struct RetainedRead {
    scan: Scan,
    options: SubscriptionOptions,
    identifier: Option<u32>,
}

/// Most retained messages taken in one chunk.
const RETAINED_CHUNK: usize = 256;

/// Output past which no more retained messages are taken until it is written: QoS 0
/// ones go straight to the output, so this is what paces them to the socket.
const RETAINED_OUTPUT_MAX: usize = 64 * 1024;

/// What a SCRAM-authenticated connection needs to re-authenticate (AUTH 0x19).
#[derive(Debug)]
struct ReAuth {
    /// The user of the first authentication: a re-authentication must prove the same one,
    /// since the ACL in force is that user's.
    username: String,
    credentials: Arc<dyn scram::Credentials>,
    /// The exchange between the server-first-message and the client-final-message.
    exchange: Option<scram::Exchange>,
}

/// What a connection did since its counts were last taken (for `/metrics`).
///
/// Taken after every batch of work, so the packet counts fit 32 bits (keeping every
/// connected client's state small); the byte counts do not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// PUBLISH packets first sent (not resends), by QoS 0, 1, 2.
    pub sent: [u32; 3],
    /// Their payload bytes, by QoS.
    pub sent_bytes: [u64; 3],
    /// Messages dropped because the session queue was full.
    pub dropped_queue_full: u32,
    /// Of those, the ones dropped by the byte bound.
    pub dropped_over_bytes: u32,
    /// Of those, the ones dropped by the broker-wide byte bound.
    pub dropped_over_total: u32,
    /// Subscriptions refused by `max_subscriptions_per_client`.
    pub subscriptions_refused: u32,
    /// Subscriptions of a persistent session refused because the session store is
    /// short of disk space.
    pub subscriptions_refused_no_space: u32,
}

impl Connection {
    /// Accepts a planned CONNECT: writes CONNACK, resends what the resumed session had
    /// in flight (PUBLISH with DUP, or PUBREL), then sends what it had queued. `access`
    /// is checked before routing a PUBLISH, granting a subscription and delivering.
    pub fn accept(
        connect: Connect,
        plan: &ConnectPlan,
        mut session: Session,
        session_present: bool,
        limits: Arc<Limits>,
        access: Option<Arc<dyn Authorizer>>,
        now: Instant,
    ) -> Connection {
        let version = connect.protocol;
        let props = &connect.properties;
        session.expiry_interval = plan.session_expiry;
        session.pending_will = None;
        if !session.is_persistent() {
            session.unstore();
        }
        let send_window = if version.is_v5() {
            props
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(limits.max_inflight)
        } else {
            limits.max_inflight
        };
        let client_max_packet = if version.is_v5() {
            props.maximum_packet_size.unwrap_or(u32::MAX)
        } else {
            u32::MAX
        };
        let mut conn = Connection {
            version,
            session,
            keep_alive: plan.keep_alive,
            last_received: now,
            send_window,
            client_max_packet,
            problem_information: props.request_problem_information != Some(0),
            extensions: None,
            client_alias_maximum: if version.is_v5() {
                props.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            will: connect.will.map(Box::new),
            connect_expiry_zero: plan.session_expiry == 0,
            record_dirty: true,
            connack_unsent: true,
            acks: std::collections::VecDeque::new(),
            next_ack_token: 1,
            limits,
            out: BytesMut::new(),
            events: Vec::new(),
            close: None,
            access,
            counts: Counts::default(),
        };
        let mut ack = ConnAck {
            session_present,
            code: ReasonCode::Success,
            ..ConnAck::default()
        };
        if version.is_v5() {
            let p = &mut ack.properties;
            p.receive_maximum = Some(conn.limits.max_inflight);
            p.maximum_packet_size = Some(conn.limits.max_packet_size);
            p.topic_alias_maximum = Some(conn.limits.topic_alias_maximum);
            p.server_keep_alive = plan.server_keep_alive;
            if plan.assigned {
                p.assigned_client_identifier = Some(plan.client_id.to_string());
            }
            if plan.expiry_capped {
                p.session_expiry_interval = Some(plan.session_expiry);
            }
            // MQTT-4.12.0-5: a successful CONNACK repeats the CONNECT's method.
            if plan.authentication_data.is_some() {
                p.authentication_method = connect.properties.authentication_method.clone();
                p.authentication_data = plan.authentication_data.clone();
            }
        }
        conn.send(Packet::ConnAck(ack));
        if session_present {
            conn.resend_inflight(now);
        }
        conn.session.expire_pending(now);
        conn.drain_pending(now);
        conn
    }

    /// The protocol version of this connection.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The client id.
    pub fn client_id(&self) -> &Arc<str> {
        &self.session.client_id
    }

    /// Bytes to write to the socket, in order.
    pub fn take_output(&mut self) -> BytesMut {
        self.connack_unsent = false;
        // A small buffer goes whole, so a connection that falls idle keeps no output
        // buffer (splitting would keep the rest of it, and a shared header, alive); a
        // large one keeps its spare room for the next batch.
        if self.out.capacity() < OUTPUT_KEPT {
            std::mem::take(&mut self.out)
        } else {
            self.out.split()
        }
    }

    /// Bytes waiting to be written.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }

    /// True when there is output to write.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The store operations this connection's session produced since the last call,
    /// including a new session record when its subscriptions, expiry or will changed.
    /// They must be stored before the output that goes with them is written.
    pub fn take_store_ops(&mut self) -> Vec<Op> {
        if self.record_dirty && self.session.is_persistent() {
            self.record_dirty = false;
            self.session.stored = true;
            let record = crate::record::encode_session(&self.session, true, self.will.as_deref());
            self.session
                .journal
                .push(Op::PutSession(self.session.client_id.clone(), record));
        }
        std::mem::take(&mut self.session.journal)
    }

    /// The most unacknowledged messages the client takes (its v5 Receive Maximum,
    /// capped by `max_inflight`).
    pub fn send_window(&self) -> usize {
        usize::from(self.send_window)
    }

    /// The session's subscriptions (raw filter and record).
    pub fn subscriptions(&self) -> impl Iterator<Item = (&String, &SubscriptionRecord)> {
        self.session.subscriptions.iter()
    }

    /// True while the session queue can take more deliveries; when it is full the
    /// connection stops taking them, which makes publishers wait.
    pub fn has_room(&self) -> bool {
        self.limits.max_queued().has_room(&self.session.pending)
    }

    /// The events that make a resumed session's `$queue/` subscriptions join their
    /// groups again (the `$share/<group>/` of the filter, or the `consumer-group`
    /// property kept with the subscription, or `default`).
    pub fn resumed_queue_subscriptions(&self) -> Vec<Event> {
        self.session
            .subscriptions
            .iter()
            .filter_map(|(raw, r)| {
                Some(Event::QueueSubscribe {
                    parsed: crate::queues::parse_filter(raw, r.consumer_group.as_deref())?,
                    filter: raw.clone(),
                    options: r.options,
                    identifier: r.identifier,
                    existed: true,
                    held: None,
                })
            })
            .collect()
    }

    /// Sends `filter`'s retained messages to the client, a chunk at a time (see
    /// [`Connection::retained_wanted`]).
    pub fn read_retained(
        &mut self,
        scan: Scan,
        options: SubscriptionOptions,
        identifier: Option<u32>,
    ) {
        self.extensions
            .get_or_insert_default()
            .retained_reads
            .push_back(RetainedRead {
                scan,
                options,
                identifier,
            });
    }

    /// How many retained messages the connection takes now for its oldest unfinished
    /// read, with that read's scan: none while its output or session queue is full.
    pub fn retained_wanted(&mut self) -> Option<(&mut Scan, usize)> {
        let wanted = self.retained_room();
        let read = self.extensions.as_mut()?.retained_reads.front_mut()?;
        (wanted > 0).then_some((&mut read.scan, wanted))
    }

    /// True when [`Connection::retained_wanted`] has a step to take now.
    pub fn wants_retained(&self) -> bool {
        self.retained_room() > 0
    }

    fn retained_room(&self) -> usize {
        let Some(read) = self
            .extensions
            .as_ref()
            .and_then(|e| e.retained_reads.front())
        else {
            return 0;
        };
        if self.out.len() >= RETAINED_OUTPUT_MAX || self.close.is_some() {
            return 0;
        }
        match read.options.qos {
            QoS::AtMostOnce => RETAINED_CHUNK,
            _ => self
                .limits
                .max_queued_messages
                .saturating_sub(self.session.pending.len())
                .min(RETAINED_CHUNK),
        }
    }

    /// Delivers what a step of the oldest retained read found; `done` ends that read.
    pub fn deliver_retained(&mut self, found: Vec<Arc<Message>>, done: bool, now: Instant) {
        let Some(read) = self
            .extensions
            .as_mut()
            .and_then(|e| e.retained_reads.front())
        else {
            return;
        };
        let (options, identifier) = (read.options, read.identifier);
        for msg in found {
            let qos = msg.qos.min(options.qos);
            self.deliver(
                Delivery {
                    msg,
                    qos,
                    retain: true,
                    subscription_ids: identifier.into_iter().collect(),
                    share: None,
                    seq: None,
                    queue: None,
                },
                now,
            );
        }
        if done && let Some(e) = self.extensions.as_mut() {
            e.retained_reads.pop_front();
        }
    }

    /// Events for the broker, in order.
    #[cfg(test)]
    pub fn take_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// The pending events as a whole buffer, for a caller that must change the
    /// connection while it carries them out; hand the emptied buffer back with
    /// [`Connection::recycle_events`] so the next packets reuse its allocation.
    pub fn take_event_buffer(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Takes back a buffer from [`Connection::take_event_buffer`]; events raised
    /// meanwhile stay pending, in order.
    pub fn recycle_events(&mut self, mut buffer: Vec<Event>) {
        buffer.clear();
        buffer.append(&mut self.events);
        self.events = buffer;
    }

    /// Set once the connection must close (after the output is flushed).
    pub fn close_reason(&self) -> Option<&Close> {
        self.close.as_deref()
    }

    /// Tells the keep-alive check that roost itself will not read from the client
    /// before `until` (it is throttled), so silence until then is not the client's.
    pub fn hold_reads_until(&mut self, until: Instant) {
        self.last_received = self.last_received.max(until);
    }

    /// When [`Connection::tick`] must run next (the keep-alive deadline).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.close.is_some() {
            return None;
        }
        [self.keep_alive_deadline(), self.credentials_expire()]
            .into_iter()
            .flatten()
            .min()
    }

    /// MQTT: the server closes after one and a half keep-alive periods of silence.
    fn keep_alive_deadline(&self) -> Option<Instant> {
        if self.keep_alive == 0 {
            return None;
        }
        let keep_alive = Duration::from_secs(u64::from(self.keep_alive));
        Some(self.last_received + keep_alive + keep_alive / 2)
    }

    fn credentials_expire(&self) -> Option<Instant> {
        self.extensions.as_ref()?.credentials_expire
    }

    /// Holds the connection to credentials that stop being valid at `at` (a token's
    /// `exp`): [`Connection::tick`] closes it then, a v5 client with DISCONNECT 0x87.
    pub fn expire_credentials_at(&mut self, at: Instant) {
        self.extensions.get_or_insert_default().credentials_expire = Some(at);
    }

    /// Advances the clock: enforces the keep-alive and the credentials' expiry.
    pub fn tick(&mut self, now: Instant) {
        if self.close.is_some() {
            return;
        }
        if self.credentials_expire().is_some_and(|t| now >= t) {
            tracing::info!(client_id = %self.session.client_id, "disconnected: token expired");
            self.server_disconnect(
                ReasonCode::NotAuthorized,
                DisconnectReason::TokenExpired,
                "token expired",
            );
        } else if self.keep_alive_deadline().is_some_and(|t| now >= t) {
            self.fail(ReasonCode::KeepAliveTimeout, "keep-alive timeout");
        }
    }

    /// Ends the connection by the server's decision (takeover, shutdown). A v5 client
    /// is told why (`reason`); `kind` is what `/metrics` counts. `keep_will` says
    /// whether the will is still published.
    pub fn disconnect(
        &mut self,
        reason: ReasonCode,
        kind: DisconnectReason,
        why: &str,
        keep_will: bool,
    ) {
        if self.close.is_some() {
            return;
        }
        if !keep_will {
            self.will = None;
        }
        self.server_disconnect(reason, kind, why);
    }

    /// Ends the connection because what its output acknowledges could not be stored:
    /// the output is dropped, and the client is told `reason` (v5) by a DISCONNECT, or
    /// by a refusing CONNACK (3.x: 3, server unavailable) if the dropped output held
    /// the CONNACK (a DISCONNECT may not come before it). `kind` is what `/metrics`
    /// counts.
    pub fn close_unstored(&mut self, reason: ReasonCode, kind: DisconnectReason, why: &str) {
        let connack_dropped = self.connack_unsent;
        let _ = self.take_output();
        if !connack_dropped {
            self.disconnect(reason, kind, why, true);
            return;
        }
        if self.close.is_some() {
            return;
        }
        // Refused, it never connected: no will.
        self.will = None;
        let code = if self.version.is_v5() {
            reason
        } else {
            ReasonCode::ServerUnavailable
        };
        write_refusal(self.version, code, why, &mut self.out);
        self.close = Some(Box::new(Close {
            why: why.to_owned(),
            reason,
            kind,
            by_client: false,
        }));
    }

    /// Ends the connection because the socket did: closed by the client without a
    /// DISCONNECT, or failed. The will is published.
    pub fn lost(&mut self, kind: DisconnectReason, why: &str) {
        if self.close.is_none() {
            self.close = Some(Box::new(Close {
                why: why.to_owned(),
                reason: ReasonCode::UnspecifiedError,
                kind,
                // The client's end went: nothing to linger for.
                by_client: true,
            }));
        }
    }

    /// What was counted since the last call (and resets the counts).
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Ends the connection because the bytes could not be decoded.
    pub fn decode_error(&mut self, e: &DecodeError) {
        self.fail(e.reason_code(), &e.to_string());
    }

    /// Takes the session to keep (or drop) and the will to publish, if any, from a
    /// connection that has ended (which is left with an empty session).
    pub fn finish(&mut self) -> (Session, Option<LastWill>) {
        let empty = Session::new(self.session.client_id.clone());
        (
            std::mem::replace(&mut self.session, empty),
            self.will.take().map(|w| *w),
        )
    }

    /// Handles one packet from the client.
    pub fn handle(&mut self, packet: Packet, now: Instant) {
        if self.close.is_some() {
            return;
        }
        self.last_received = now;
        match packet {
            Packet::Publish(p) => self.on_publish(p, now),
            Packet::PubAck(r) => self.on_puback(r, now),
            Packet::PubRec(r) => self.on_pubrec(r, now),
            Packet::PubRel(r) => self.on_pubrel(r),
            Packet::PubComp(r) => self.on_pubcomp(r, now),
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => self.send(Packet::PingResp),
            Packet::Disconnect(d) => self.on_disconnect(d),
            Packet::Connect(_) => self.fail(ReasonCode::ProtocolError, "second CONNECT"),
            Packet::Auth(a) => self.on_auth(a),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.fail(ReasonCode::ProtocolError, "packet only a server may send")
            }
        }
    }

    /// Lets a client that authenticated with SCRAM as `username` re-authenticate (MQTT
    /// 4.12.1) against `credentials`.
    pub fn enable_reauthentication(
        &mut self,
        username: String,
        credentials: Arc<dyn scram::Credentials>,
    ) {
        self.extensions.get_or_insert_default().reauth = Some(ReAuth {
            username,
            credentials,
            exchange: None,
        });
    }

    /// Offers a message to the client: sent now if the window allows, else queued.
    pub fn deliver(&mut self, d: Delivery, now: Instant) {
        if self.close.is_some() {
            // Keep QoS 1/2 with the session; it outlives this connection.
            self.session.enqueue_offline(d, self.limits.max_queued());
            return;
        }
        if d.msg.is_expired(now) || !self.may(Access::Read, &d.msg.topic) {
            self.session.forget(&d);
            return;
        }
        if d.qos == QoS::AtMostOnce {
            self.write_publish(&d, 0, false, now);
            return;
        }
        if self.session.pending.is_empty()
            && self.session.inflight.len() < usize::from(self.send_window)
        {
            self.send_new(d, now);
        } else if let Err(full) = self.session.enqueue(d, self.limits.max_queued()) {
            self.counts.dropped_queue_full += 1;
            match full {
                QueueFull::Bytes => self.counts.dropped_over_bytes += 1,
                QueueFull::Total => self.counts.dropped_over_total += 1,
                QueueFull::Messages => {}
            }
            tracing::debug!(client_id = %self.session.client_id, "session queue full, message dropped");
        }
    }

    // ----- inbound -----

    /// Re-authentication: AUTH 0x19 with a client-first-message, AUTH 0x18 back with the
    /// server-first-message, AUTH 0x18 with the client-final-message, AUTH 0x00 back with
    /// the server-final-message. Other packets flow meanwhile; a failure disconnects with
    /// 0x87 (DISCONNECT has no 0x86).
    fn on_auth(&mut self, a: roost_core::Auth) {
        let Some(reauth) = self.extensions.as_mut().and_then(|e| e.reauth.as_mut()) else {
            return self.fail(
                ReasonCode::ProtocolError,
                "AUTH without an authentication method",
            );
        };
        if a.properties.authentication_method.as_deref() != Some(scram::METHOD) {
            return self.fail(
                ReasonCode::ProtocolError,
                "AUTH with another authentication method than CONNECT's",
            );
        }
        let reply = match reauth.exchange.take() {
            // AUTH 0x19 starts a re-authentication with the client-first-message.
            None if a.reason == ReasonCode::ReAuthenticate => {
                let data = a.properties.authentication_data.as_deref().unwrap_or(&[]);
                scram::begin(data, &*reauth.credentials)
                    .map(|(exchange, server_first)| {
                        reauth.exchange = Some(exchange);
                        server_first
                    })
                    .map_err(|e| e.to_string())
            }
            Some(exchange) => match scram::client_final(&a) {
                Ok(data) => match exchange.finish(data) {
                    Ok(done) if done.username == reauth.username => {
                        tracing::debug!(client_id = %self.session.client_id, "re-authenticated");
                        Ok(scram::auth_packet(ReasonCode::Success, done.server_final))
                    }
                    Ok(_) => Err("re-authenticated as another user".to_owned()),
                    Err(e) => Err(e.to_string()),
                },
                Err(why) => return self.fail(ReasonCode::ProtocolError, why),
            },
            None => {
                return self.fail(
                    ReasonCode::ProtocolError,
                    "AUTH reason code out of sequence",
                );
            }
        };
        match reply {
            Ok(auth) => self.send(Packet::Auth(auth)),
            Err(why) => self.fail(
                ReasonCode::NotAuthorized,
                &format!("re-authentication failed: {why}"),
            ),
        }
    }

    fn on_publish(&mut self, mut p: Publish, now: Instant) {
        if !p.properties.subscription_identifiers.is_empty() {
            return self.fail(
                ReasonCode::ProtocolError,
                "subscription identifier in a client's PUBLISH",
            );
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            let slot = usize::from(alias).checked_sub(1);
            let max = usize::from(self.limits.topic_alias_maximum);
            let Some(slot) = slot.filter(|s| *s < max) else {
                return self.fail(ReasonCode::TopicAliasInvalid, "topic alias out of range");
            };
            if p.topic.is_empty() {
                let known = self.extensions.as_ref().and_then(|e| e.aliases.get(slot));
                match known.and_then(Option::as_ref) {
                    Some(t) => p.topic = t.clone(),
                    None => return self.fail(ReasonCode::ProtocolError, "unknown topic alias"),
                }
            } else {
                let aliases = &mut self.extensions.get_or_insert_default().aliases;
                if aliases.len() <= slot {
                    aliases.resize(slot + 1, None);
                }
                aliases[slot] = Some(p.topic.clone());
            }
        }
        match topic::validate_name(&p.topic) {
            Ok(()) => {}
            Err(TopicError::Empty) => {
                return self.fail(ReasonCode::ProtocolError, "empty topic without alias");
            }
            Err(_) => return self.fail(ReasonCode::TopicNameInvalid, "wildcard in topic name"),
        }
        if topic::level_count(&p.topic) > self.limits.max_topic_levels {
            if p.qos != QoS::AtMostOnce && self.version.is_v5() {
                return self.reject_publish(
                    &p,
                    ReasonCode::TopicNameInvalid,
                    "too many topic levels",
                );
            }
            return self.fail(ReasonCode::TopicNameInvalid, "too many topic levels");
        }
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            if p.qos != QoS::AtMostOnce {
                return self.reject_publish(
                    &p,
                    ReasonCode::PayloadFormatInvalid,
                    "payload is not UTF-8",
                );
            }
            return self.fail(ReasonCode::PayloadFormatInvalid, "payload is not UTF-8");
        }
        if p.qos == QoS::ExactlyOnce {
            if self.session.incoming_qos2.contains(&p.packet_id) {
                // A resend before PUBREL: acknowledge again, deliver once. If the first
                // PUBREC is still waiting (a queue publish being stored), it will do.
                if self.acks.iter().any(|a| a.packet_id == p.packet_id) {
                    return;
                }
                return self.ack_publish(p.packet_id, QoS::ExactlyOnce, ReasonCode::Success, "");
            }
            if self.session.incoming_qos2.len() >= usize::from(self.limits.max_inflight) {
                return self.fail(
                    ReasonCode::ReceiveMaximumExceeded,
                    "more QoS 2 publishes than receive maximum",
                );
            }
        }
        if p.qos != QoS::AtMostOnce && self.inbound_unacknowledged() >= self.limits.max_inflight {
            // A 3.x client is not read from while it is at the bound (see
            // `inbound_full`), so only a v5 client that ignores its Receive Maximum
            // (QoS 1 publishes whose acknowledgements wait for a queue) gets here.
            return self.fail(
                ReasonCode::ReceiveMaximumExceeded,
                "more unacknowledged publishes than receive maximum",
            );
        }
        let packet_id = p.packet_id;
        let qos = p.qos;
        if !self.may(Access::Write, &p.topic) {
            tracing::debug!(client_id = %self.session.client_id, topic = %p.topic, "PUBLISH denied by the ACL");
            if self.version.is_v5() && qos != QoS::AtMostOnce {
                return self.reject_publish(&p, ReasonCode::NotAuthorized, "not authorized");
            }
            // MQTT 3.x has no way to say no: acknowledge as usual, route nothing.
            if qos == QoS::ExactlyOnce {
                self.session.add_incoming_qos2(packet_id);
            }
            return self.ack_publish(packet_id, qos, ReasonCode::Success, "");
        }
        let msg = Arc::new(Message {
            topic: p.topic,
            payload: p.payload,
            qos,
            retain: p.retain,
            properties: p.properties,
            publisher: Some(self.session.client_id.clone()),
            received_at: now,
        });
        if qos == QoS::ExactlyOnce {
            self.session.add_incoming_qos2(packet_id);
        }
        if msg.topic.starts_with("$queue/") {
            let ack = (qos != QoS::AtMostOnce).then(|| self.defer_ack(packet_id, qos));
            self.events.push(Event::QueuePublish { msg, ack });
            return;
        }
        if msg.retain && qos != QoS::AtMostOnce && self.version.is_v5() {
            // Only the broker knows whether there is room to retain it.
            let ack = self.defer_ack(packet_id, qos);
            if let Some(a) = self.acks.back_mut() {
                a.why = "retained message bounds reached";
            }
            self.events.push(Event::RetainedPublish { msg, ack });
            return;
        }
        self.events.push(Event::Publish(msg));
        self.ack_publish(packet_id, qos, ReasonCode::Success, "");
    }

    /// Inbound QoS 1/2 publishes the client has no PUBACK/PUBCOMP for yet: QoS 1 ones
    /// whose acknowledgement waits (for a queue, or behind one that does) and QoS 2
    /// ones before PUBREL. What the client's Receive Maximum bounds.
    fn inbound_unacknowledged(&self) -> u16 {
        let cheap = self.acks.len() + self.session.incoming_qos2.len();
        if cheap < usize::from(self.limits.max_inflight) {
            // An upper bound (QoS 2 acks are counted twice) that is already under it.
            return cheap as u16;
        }
        let qos1 = self
            .acks
            .iter()
            .filter(|a| a.qos == QoS::AtLeastOnce)
            .count();
        u16::try_from(qos1 + self.session.incoming_qos2.len()).unwrap_or(u16::MAX)
    }

    /// True while a 3.x client is at its bound of unacknowledged inbound publishes
    /// (`max_inflight`; 3.x has no Receive Maximum to tell it): it is not read from
    /// until acknowledgements make room, so its pending acknowledgements stay bounded.
    pub fn inbound_full(&self) -> bool {
        !self.version.is_v5() && self.acks.len() >= usize::from(self.limits.max_inflight)
    }

    /// Acknowledges an inbound publish now, or after the deferred ones before it.
    fn ack_publish(
        &mut self,
        packet_id: PacketId,
        qos: QoS,
        reason: ReasonCode,
        why: &'static str,
    ) {
        if qos == QoS::AtMostOnce {
            return;
        }
        if self.acks.is_empty() {
            self.write_ack(packet_id, qos, reason, why);
        } else {
            let token = self.defer_ack(packet_id, qos);
            if let Some(a) = self.acks.back_mut() {
                a.why = why;
            }
            self.resolve_ack(token, reason);
        }
    }

    fn defer_ack(&mut self, packet_id: PacketId, qos: QoS) -> AckToken {
        let token = self.next_ack_token;
        self.next_ack_token += 1;
        self.acks.push_back(PendingAck {
            packet_id,
            qos,
            token,
            reason: None,
            why: "publish refused",
        });
        token
    }

    /// Resolves a deferred acknowledgement (see [`Event::QueuePublish`]); it is sent
    /// once every acknowledgement before it is resolved too.
    pub fn resolve_ack(&mut self, token: AckToken, reason: ReasonCode) {
        if let Some(a) = self.acks.iter_mut().find(|a| a.token == token) {
            a.reason = Some(reason);
        }
        while let Some(&PendingAck {
            packet_id,
            qos,
            reason: Some(reason),
            why,
            ..
        }) = self.acks.front()
        {
            self.acks.pop_front();
            if self.close.is_none() {
                self.write_ack(packet_id, qos, reason, why);
            }
        }
    }

    fn write_ack(&mut self, packet_id: PacketId, qos: QoS, reason: ReasonCode, why: &str) {
        let mut r = if reason.is_error() {
            self.response(packet_id, reason, why)
        } else {
            PubResponse::new(packet_id)
        };
        if !self.version.is_v5() {
            r.reason = ReasonCode::Success;
        }
        if qos == QoS::ExactlyOnce {
            if reason.is_error() && self.version.is_v5() {
                // An error PUBREC ends the QoS 2 flow: the id is free again.
                self.session.remove_incoming_qos2(packet_id);
            }
            self.send(Packet::PubRec(r));
        } else {
            self.send(Packet::PubAck(r));
        }
    }

    /// True when the ACL (if any) allows `access` on `topic`.
    fn may(&self, access: Access, topic: &str) -> bool {
        self.access.as_ref().is_none_or(|a| a.allows(access, topic))
    }

    /// Answers a QoS 1/2 publish that is not routed with an error reason code.
    fn reject_publish(&mut self, p: &Publish, reason: ReasonCode, why: &'static str) {
        self.ack_publish(p.packet_id, p.qos, reason, why);
    }

    fn on_puback(&mut self, r: PubResponse, now: Instant) {
        match self.find_inflight(r.packet_id) {
            Some(i) if self.session.inflight[i].delivery.qos == QoS::AtLeastOnce => {
                if let Some(done) = self.session.inflight.remove(i) {
                    self.finished(&done.delivery, r.reason.is_error());
                }
                self.drain_pending(now);
            }
            _ => {
                tracing::debug!(client_id = %self.session.client_id, packet_id = r.packet_id, "PUBACK for unknown packet id")
            }
        }
    }

    fn on_pubrec(&mut self, r: PubResponse, now: Instant) {
        let Some(i) = self
            .find_inflight(r.packet_id)
            .filter(|&i| self.session.inflight[i].delivery.qos == QoS::ExactlyOnce)
        else {
            let reply = self.response(
                r.packet_id,
                ReasonCode::PacketIdentifierNotFound,
                "unknown packet id",
            );
            return self.send(Packet::PubRel(reply));
        };
        if r.reason.is_error() {
            // The receiver refused the message: the flow ends here.
            if let Some(done) = self.session.inflight.remove(i) {
                self.finished(&done.delivery, true);
            }
            return self.drain_pending(now);
        }
        self.session.inflight[i].state = InflightState::Released;
        let released = self.session.inflight[i].clone();
        self.session.note_inflight(&released);
        self.send(Packet::PubRel(PubResponse::new(r.packet_id)));
    }

    /// A delivery's flow ended: forget its stored copy; settle it if it came from a
    /// queue (a v5 error reason code is a nack: the queue redelivers it later).
    fn finished(&mut self, d: &Delivery, refused: bool) {
        self.session.forget(d);
        if let Some(queue) = &d.queue {
            self.events.push(Event::QueueSettle {
                queue: queue.clone(),
                nack: refused,
            });
        }
    }

    fn on_pubrel(&mut self, r: PubResponse) {
        let reply = if self.session.remove_incoming_qos2(r.packet_id) {
            PubResponse::new(r.packet_id)
        } else {
            self.response(
                r.packet_id,
                ReasonCode::PacketIdentifierNotFound,
                "unknown packet id",
            )
        };
        self.send(Packet::PubComp(reply));
    }

    fn on_pubcomp(&mut self, r: PubResponse, now: Instant) {
        match self.find_inflight(r.packet_id) {
            Some(i) if self.session.inflight[i].state == InflightState::Released => {
                if let Some(done) = self.session.inflight.remove(i) {
                    self.finished(&done.delivery, false);
                }
                self.drain_pending(now);
            }
            _ => {
                tracing::debug!(client_id = %self.session.client_id, packet_id = r.packet_id, "PUBCOMP for unknown packet id")
            }
        }
    }

    fn on_subscribe(&mut self, s: Subscribe) {
        let identifier = s.properties.subscription_identifiers.first().copied();
        let consumer_group = s
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k == "consumer-group")
            .map(|(_, v)| v.as_str());
        let repeats = repeated_filters(&s.filters);
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut held = 0;
        // `repeats` is in the order of the places.
        let mut next_repeat = repeats.iter().map(|&(at, _)| at).peekable();
        for (i, (raw, options)) in s.filters.into_iter().enumerate() {
            if next_repeat.next_if_eq(&i).is_some() {
                // Given its reason code when the SUBACK is sent, from the last place.
                reasons.push(ReasonCode::Success);
                continue;
            }
            let parsed = match topic::parse_filter(&raw) {
                Ok(f) if topic::level_count(f.filter) <= self.limits.max_topic_levels => f,
                _ => {
                    reasons.push(ReasonCode::TopicFilterInvalid);
                    continue;
                }
            };
            if parsed.share_group.is_some() && options.no_local {
                return self.fail(
                    ReasonCode::ProtocolError,
                    "no-local on a shared subscription",
                );
            }
            if !self.may(Access::Subscribe, parsed.filter) {
                tracing::debug!(client_id = %self.session.client_id, filter = %raw, "SUBSCRIBE denied by the ACL");
                reasons.push(ReasonCode::NotAuthorized);
                continue;
            }
            // `$queue/` filters are told apart here, once: they name consumer groups to
            // join, not routes.
            let queue = crate::queues::parse_filter(&raw, consumer_group);
            if queue.is_some() && consumer_group.is_some_and(|g| g.len() > MAX_CONSUMER_GROUP) {
                reasons.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            let max = self.limits.max_subscriptions_per_client;
            if max > 0
                && self.session.subscriptions.len() >= max
                && !self.session.subscriptions.contains_key(&raw)
            {
                tracing::debug!(client_id = %self.session.client_id, filter = %raw, "SUBSCRIBE refused: max_subscriptions_per_client");
                self.counts.subscriptions_refused += 1;
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            if self.session.is_persistent() && !self.limits.store_room.has_room() {
                // Granted, it would be lost at the next restart: refused until there
                // is room to store it.
                tracing::debug!(client_id = %self.session.client_id, filter = %raw, "SUBSCRIBE refused: session store short of space");
                self.counts.subscriptions_refused_no_space += 1;
                reasons.push(ReasonCode::QuotaExceeded);
                continue;
            }
            let record = SubscriptionRecord {
                options,
                identifier,
                consumer_group: consumer_group.filter(|_| queue.is_some()).map(Arc::from),
            };
            let existed = self
                .session
                .subscriptions
                .insert(raw.clone(), record)
                .is_some();
            self.record_dirty = true;
            match queue {
                Some(parsed) => {
                    held += 1;
                    let slot = HeldSlot {
                        packet_id: s.packet_id,
                        index: reasons.len(),
                    };
                    self.events.push(Event::QueueSubscribe {
                        filter: raw,
                        parsed,
                        options,
                        identifier,
                        existed,
                        held: Some(slot),
                    });
                }
                None => self.events.push(Event::Subscribe {
                    filter: raw,
                    options,
                    identifier,
                    existed,
                }),
            }
            reasons.push(ReasonCode::granted(options.qos));
        }
        if held > 0 {
            self.extensions
                .get_or_insert_default()
                .held_subacks
                .push(HeldSubAck {
                    packet_id: s.packet_id,
                    reasons,
                    repeats,
                    open: held,
                });
        } else {
            self.send_suback(s.packet_id, reasons, &repeats);
        }
    }

    fn send_suback(
        &mut self,
        packet_id: PacketId,
        mut reasons: Vec<ReasonCode>,
        repeats: &[(usize, usize)],
    ) {
        for &(at, from) in repeats {
            reasons[at] = reasons[from];
        }
        let why = if reasons.contains(&ReasonCode::NotAuthorized) {
            "not authorized"
        } else if reasons.contains(&ReasonCode::QuotaExceeded) {
            "quota exceeded"
        } else {
            "invalid topic filter"
        };
        let properties = self.problem_properties(reasons.iter().any(|r| r.is_error()), why);
        self.send(Packet::SubAck(SubAck {
            packet_id,
            reasons,
            properties,
        }));
    }

    /// The broker's word on a `$queue/` subscription of a held SUBACK (see
    /// [`Event::Subscribe`]): `Err` refuses it with that reason code (and the session
    /// forgets the filter, unless it had it before). The SUBACK is sent once each of
    /// its queue filters is settled.
    pub fn settle_subscription(
        &mut self,
        slot: HeldSlot,
        filter: &str,
        existed: bool,
        outcome: Result<(), ReasonCode>,
    ) {
        let Some(extensions) = self.extensions.as_mut() else {
            return;
        };
        let Some(at) = extensions
            .held_subacks
            .iter()
            .position(|h| h.packet_id == slot.packet_id)
        else {
            return;
        };
        let held = &mut extensions.held_subacks[at];
        if let (Err(code), Some(reason)) = (outcome, held.reasons.get_mut(slot.index)) {
            *reason = code;
        }
        held.open -= 1;
        let done = (held.open == 0).then(|| extensions.held_subacks.remove(at));
        if outcome.is_err() && !existed {
            self.session.subscriptions.remove(filter);
        }
        if let Some(done) = done {
            self.send_suback(done.packet_id, done.reasons, &done.repeats);
        }
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for raw in u.filters {
            if self.session.subscriptions.remove(&raw).is_some() {
                self.record_dirty = true;
                self.events
                    .push(match crate::queues::parse_filter(&raw, None) {
                        Some(f) => Event::QueueUnsubscribe { queue: f.queue },
                        None => Event::Unsubscribe { filter: raw },
                    });
                reasons.push(ReasonCode::Success);
            } else {
                reasons.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        self.send(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reasons,
            properties: Default::default(),
        }));
    }

    fn on_disconnect(&mut self, d: Disconnect) {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.connect_expiry_zero && expiry != 0 {
                return self.fail(
                    ReasonCode::ProtocolError,
                    "session expiry set on DISCONNECT after 0 on CONNECT",
                );
            }
            self.session.expiry_interval = expiry.min(self.limits.session_expiry_max);
        }
        // Only a normal disconnection (0x00) discards the will; 0x04 and errors keep it.
        if d.reason == ReasonCode::NORMAL_DISCONNECTION {
            self.will = None;
        }
        self.close = Some(Box::new(Close {
            why: format!("client sent DISCONNECT ({:?})", d.reason),
            reason: d.reason,
            kind: DisconnectReason::ClientDisconnect,
            by_client: true,
        }));
    }

    // ----- outbound -----

    fn send_new(&mut self, d: Delivery, now: Instant) {
        if !self.fits(&d, now) {
            self.session.forget(&d);
            return;
        }
        let Some(packet_id) = self.session.allocate_packet_id() else {
            let _ = self.session.enqueue(d, self.limits.max_queued());
            return;
        };
        if self.write_publish(&d, packet_id, false, now) {
            let f = Inflight {
                packet_id,
                delivery: d,
                state: InflightState::Published,
            };
            self.session.note_inflight(&f);
            self.session.inflight.push_back(f);
        } else {
            self.session.forget(&d);
        }
    }

    fn drain_pending(&mut self, now: Instant) {
        while self.session.inflight.len() < usize::from(self.send_window) {
            let Some(d) = self.session.pending.pop_front() else {
                break;
            };
            // Queued while offline, or before the ACL changed: checked on the way out.
            if d.msg.is_expired(now) || !self.may(Access::Read, &d.msg.topic) {
                self.session.forget(&d);
                continue;
            }
            if d.qos == QoS::AtMostOnce {
                self.write_publish(&d, 0, false, now);
            } else {
                self.send_new(d, now);
            }
        }
    }

    fn resend_inflight(&mut self, now: Instant) {
        let inflight = std::mem::take(&mut self.session.inflight);
        for f in &inflight {
            match f.state {
                InflightState::Published => {
                    self.write_publish(&f.delivery, f.packet_id, true, now);
                }
                InflightState::Released => {
                    self.send(Packet::PubRel(PubResponse::new(f.packet_id)));
                }
            }
        }
        self.session.inflight = inflight;
    }

    /// Encodes a PUBLISH unless it is larger than the client accepts (then the message
    /// is dropped for this client, as the spec says). Returns whether it was written.
    fn write_publish(
        &mut self,
        d: &Delivery,
        packet_id: PacketId,
        dup: bool,
        now: Instant,
    ) -> bool {
        if !self.fits(d, now) {
            return false;
        }
        let mut view = publish_view(d, packet_id, dup, now);
        // Outbound topic aliases: the first PUBLISH on a topic carries topic + alias,
        // later ones the alias alone (MQTT 5.0 §3.3.2.3.4); aliases live as long as
        // this network connection, so a resumed session starts afresh.
        if self.client_alias_maximum > 0 {
            // The client's maximum, but no more than the broker's own: each alias holds
            // a copy of its topic for the connection's life, and the client picks the
            // number.
            let most = usize::from(
                self.client_alias_maximum
                    .min(self.limits.topic_alias_maximum),
            );
            let aliases = &mut self.extensions.get_or_insert_default().outbound_aliases;
            if let Some(&alias) = aliases.get(&d.msg.topic) {
                view.topic = "";
                view.topic_alias = Some(alias);
            } else if aliases.len() < most {
                let alias = aliases.len() as u16 + 1;
                aliases.insert(d.msg.topic.clone(), alias);
                view.topic_alias = Some(alias);
            }
        }
        match codec::encode_publish(&view, self.version, &mut self.out) {
            Ok(()) => {
                if !dup {
                    self.counts.sent[d.qos as usize] += 1;
                    self.counts.sent_bytes[d.qos as usize] += d.msg.payload.len() as u64;
                }
                true
            }
            Err(e) => {
                tracing::debug!(client_id = %self.session.client_id, error = %e, "cannot encode PUBLISH, dropped");
                false
            }
        }
    }

    /// True when the PUBLISH for `d` is within the client's Maximum Packet Size (the
    /// packet id's value does not change the size).
    fn fits(&self, d: &Delivery, now: Instant) -> bool {
        let fits = codec::publish_len(&publish_view(d, 1, false, now), self.version)
            <= self.client_max_packet as usize;
        if !fits {
            tracing::debug!(client_id = %self.session.client_id, topic = %d.msg.topic, "message larger than the client's maximum packet size, dropped");
        }
        fits
    }

    fn find_inflight(&self, packet_id: PacketId) -> Option<usize> {
        self.session
            .inflight
            .iter()
            .position(|f| f.packet_id == packet_id)
    }

    /// A response with an error reason code and, when the client allows it, a reason string.
    fn response(&self, packet_id: PacketId, reason: ReasonCode, why: &str) -> PubResponse {
        PubResponse {
            packet_id,
            reason,
            properties: self.problem_properties(true, why),
        }
    }

    fn problem_properties(&self, failed: bool, why: &str) -> roost_core::Properties {
        let mut p = roost_core::Properties::default();
        if failed && self.version.is_v5() && self.problem_information {
            p.reason_string = Some(why.to_owned());
        }
        p
    }

    /// Protocol violation or limit breach: tell a v5 client why, then close; the will
    /// is published.
    fn fail(&mut self, reason: ReasonCode, why: &str) {
        if self.close.is_none() {
            self.server_disconnect(reason, DisconnectReason::of_failure(reason), why);
        }
    }

    fn server_disconnect(&mut self, reason: ReasonCode, kind: DisconnectReason, why: &str) {
        if self.version.is_v5() {
            let mut d = Disconnect {
                reason,
                properties: Default::default(),
            };
            // DISCONNECT may always carry a reason string (Request Problem Information
            // does not cover it); it is dropped if the client's size limit forbids it.
            d.properties.reason_string = Some(why.to_owned());
            self.send(Packet::Disconnect(d));
        }
        self.close = Some(Box::new(Close {
            why: why.to_owned(),
            reason,
            kind,
            by_client: false,
        }));
    }

    /// Encodes a non-PUBLISH packet. If it is larger than the client allows, the
    /// reason string and user properties go first (the spec's own remedy).
    fn send(&mut self, mut packet: Packet) {
        if codec::encoded_len(&packet, self.version) > self.client_max_packet as usize {
            strip_problem_properties(&mut packet);
        }
        if let Err(e) = codec::encode(&packet, self.version, &mut self.out) {
            tracing::debug!(client_id = %self.session.client_id, error = %e, "cannot encode {:?}", packet.packet_type());
        }
    }
}

fn publish_view(d: &Delivery, packet_id: PacketId, dup: bool, now: Instant) -> PublishView<'_> {
    PublishView {
        dup,
        qos: d.qos,
        retain: d.retain,
        topic: &d.msg.topic,
        packet_id,
        properties: &d.msg.properties,
        subscription_identifiers: &d.subscription_ids,
        message_expiry_interval: d.msg.remaining_expiry(now),
        topic_alias: None,
        payload: &d.msg.payload,
    }
}

fn strip_problem_properties(packet: &mut Packet) {
    let props = match packet {
        Packet::ConnAck(p) => &mut p.properties,
        Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
            &mut p.properties
        }
        Packet::SubAck(p) => &mut p.properties,
        Packet::UnsubAck(p) => &mut p.properties,
        Packet::Disconnect(p) => &mut p.properties,
        Packet::Auth(p) => &mut p.properties,
        _ => return,
    };
    props.reason_string = None;
    props.user_properties.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;
    use bytes::Bytes;
    use roost_core::{Properties, RetainHandling};

    const V5: ProtocolVersion = ProtocolVersion::V5;
    const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

    fn settings() -> Settings {
        Settings {
            max_inflight: 4,
            max_queued_messages: 8,
            max_queued_bytes: 0,
            topic_alias_maximum: 3,
            max_keep_alive: 60,
            ..Settings::default()
        }
    }

    fn limits() -> Arc<Limits> {
        Arc::new(Limits::new(settings()))
    }

    fn connect_packet(version: ProtocolVersion) -> Connect {
        Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 10,
            client_id: "c1".into(),
            ..Connect::default()
        }
    }

    /// Connects a client and returns the machine and the CONNACK it wrote.
    fn open(connect: Connect, session: Option<Session>, now: Instant) -> (Connection, ConnAck) {
        let limits = limits();
        let plan = plan_connect(&connect, &limits, || "assigned".into()).expect("accepted");
        let present = session.is_some();
        let session = session.unwrap_or_else(|| Session::new(plan.client_id.clone()));
        let version = connect.protocol;
        let mut conn = Connection::accept(connect, &plan, session, present, limits, None, now);
        let mut packets = output(&mut conn, version);
        let Packet::ConnAck(ack) = packets.remove(0) else {
            panic!("CONNACK first");
        };
        // Anything after CONNACK (resends) is put back for the test to read.
        for p in packets {
            codec::encode(&p, version, &mut conn.out).expect("re-encode");
        }
        (conn, ack)
    }

    fn output(conn: &mut Connection, version: ProtocolVersion) -> Vec<Packet> {
        let mut buf = conn.take_output();
        let mut packets = Vec::new();
        while let Some(p) =
            codec::decode(&mut buf, Some(version), usize::MAX).expect("valid output")
        {
            packets.push(p);
        }
        assert!(buf.is_empty(), "trailing bytes in output");
        packets
    }

    fn publish(qos: QoS, packet_id: PacketId, topic: &str) -> Publish {
        Publish {
            qos,
            packet_id,
            topic: topic.into(),
            payload: Bytes::from_static(b"hello"),
            ..Publish::default()
        }
    }

    fn delivery(qos: QoS, payload: &'static [u8], now: Instant) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: "t/1".into(),
                payload: Bytes::from_static(payload),
                qos,
                retain: false,
                properties: Properties::default(),
                publisher: None,
                received_at: now,
            }),
            qos,
            retain: false,
            subscription_ids: Box::default(),
            share: None,
            seq: None,
            queue: None,
        }
    }

    fn published_events(conn: &mut Connection) -> usize {
        conn.take_events()
            .filter(|e| matches!(e, Event::Publish(_)))
            .count()
    }

    fn disconnect_reason(packets: &[Packet]) -> Option<ReasonCode> {
        packets.iter().find_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason),
            _ => None,
        })
    }

    #[test]
    fn v5_connack_announces_limits_and_assigned_id() {
        let now = Instant::now();
        let mut c = connect_packet(V5);
        c.client_id.clear();
        let (conn, ack) = open(c, None, now);
        assert_eq!(ack.code, ReasonCode::Success);
        assert!(!ack.session_present);
        assert_eq!(
            ack.properties.assigned_client_identifier.as_deref(),
            Some("assigned")
        );
        assert_eq!(ack.properties.receive_maximum, Some(4));
        assert_eq!(ack.properties.topic_alias_maximum, Some(3));
        assert_eq!(&**conn.client_id(), "assigned");
    }

    fn auth(reason: ReasonCode, method: &str, data: &[u8]) -> Packet {
        let mut a = roost_core::Auth {
            reason,
            properties: Properties::default(),
        };
        a.properties.authentication_method = Some(method.to_owned());
        a.properties.authentication_data = Some(Bytes::copy_from_slice(data));
        Packet::Auth(a)
    }

    fn auth_reply(packets: &[Packet]) -> (ReasonCode, String) {
        match packets {
            [Packet::Auth(a)] => {
                assert_eq!(
                    a.properties.authentication_method.as_deref(),
                    Some(scram::METHOD)
                );
                let data = a.properties.authentication_data.clone().expect("data");
                (a.reason, String::from_utf8(data.to_vec()).expect("utf8"))
            }
            other => panic!("expected one AUTH, got {other:?}"),
        }
    }

    #[test]
    fn scram_connack_repeats_the_method_and_carries_the_server_final_message() {
        let mut c = connect_packet(V5);
        c.properties.authentication_method = Some(scram::METHOD.into());
        let l = limits();
        let mut plan = plan_connect(&c, &l, || "x".into()).expect("SCRAM-SHA-256 is supported");
        plan.authentication_data = Some(Bytes::from_static(b"v=abc"));
        let mut conn = Connection::accept(
            c,
            &plan,
            Session::new(plan.client_id.clone()),
            false,
            l,
            None,
            Instant::now(),
        );
        let packets = output(&mut conn, V5);
        let Some(Packet::ConnAck(ack)) = packets.first() else {
            panic!("CONNACK first: {packets:?}");
        };
        assert_eq!(ack.code, ReasonCode::Success);
        assert_eq!(
            ack.properties.authentication_method.as_deref(),
            Some(scram::METHOD)
        );
        assert_eq!(
            ack.properties.authentication_data.as_deref(),
            Some(&b"v=abc"[..])
        );
    }

    /// A connection authenticated with SCRAM as `alice`, and its credentials.
    fn scram_connection(now: Instant) -> Connection {
        let (mut conn, _) = open(connect_packet(V5), None, now);
        let users = scram::tests::users(&[("alice", "wonderland"), ("bob", "builder")]);
        conn.enable_reauthentication("alice".into(), Arc::new(users));
        conn
    }

    /// Sends AUTH 0x19 and AUTH 0x18 for `user`/`password`; returns the replies to the
    /// second and the server signature the client expects.
    fn reauthenticate(
        conn: &mut Connection,
        user: &str,
        password: &str,
        now: Instant,
    ) -> (Vec<Packet>, String) {
        let bare = format!("n={user},r=clientnonce");
        conn.handle(
            auth(
                ReasonCode::ReAuthenticate,
                scram::METHOD,
                format!("n,,{bare}").as_bytes(),
            ),
            now,
        );
        let (reason, server_first) = auth_reply(&output(conn, V5));
        assert_eq!(reason, ReasonCode::ContinueAuthentication);
        let (client_final, signature) =
            scram::tests::client_final(password, "n,,", &bare, &server_first);
        conn.handle(
            auth(
                ReasonCode::ContinueAuthentication,
                scram::METHOD,
                client_final.as_bytes(),
            ),
            now,
        );
        (output(conn, V5), signature)
    }

    #[test]
    fn scram_reauthentication_succeeds_and_can_repeat() {
        let now = Instant::now();
        let mut conn = scram_connection(now);
        for _ in 0..2 {
            let (packets, signature) = reauthenticate(&mut conn, "alice", "wonderland", now);
            assert_eq!(auth_reply(&packets), (ReasonCode::Success, signature));
            assert!(conn.close_reason().is_none());
        }
        // Other packets flow between the AUTH packets.
        conn.handle(
            auth(ReasonCode::ReAuthenticate, scram::METHOD, b"n,,n=alice,r=x"),
            now,
        );
        let _ = output(&mut conn, V5);
        conn.handle(Packet::PingReq, now);
        assert!(matches!(
            output(&mut conn, V5).as_slice(),
            [Packet::PingResp]
        ));
    }

    #[test]
    fn scram_reauthentication_failures_disconnect() {
        let now = Instant::now();
        // Wrong password, and the right password of another user: 0x87.
        for (user, password) in [("alice", "nope"), ("bob", "builder")] {
            let mut conn = scram_connection(now);
            let (packets, _) = reauthenticate(&mut conn, user, password, now);
            assert_eq!(disconnect_reason(&packets), Some(ReasonCode::NotAuthorized));
            assert!(conn.close_reason().is_some(), "{user}");
        }
        // Out of sequence, another method, malformed: protocol error or 0x87.
        for (packet, code) in [
            (
                auth(ReasonCode::ContinueAuthentication, scram::METHOD, b"c=biws"),
                ReasonCode::ProtocolError,
            ),
            (
                auth(ReasonCode::ReAuthenticate, "SCRAM-SHA-1", b"n,,n=alice,r=x"),
                ReasonCode::ProtocolError,
            ),
            (
                auth(ReasonCode::Success, scram::METHOD, b""),
                ReasonCode::ProtocolError,
            ),
            (
                auth(ReasonCode::ReAuthenticate, scram::METHOD, b"garbage"),
                ReasonCode::NotAuthorized,
            ),
        ] {
            let mut conn = scram_connection(now);
            conn.handle(packet, now);
            assert_eq!(disconnect_reason(&output(&mut conn, V5)), Some(code));
        }
        // Without SCRAM at CONNECT, AUTH is a protocol error.
        let (mut conn, _) = open(connect_packet(V5), None, now);
        conn.handle(
            auth(ReasonCode::ReAuthenticate, scram::METHOD, b"n,,n=alice,r=x"),
            now,
        );
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::ProtocolError)
        );
    }

    #[test]
    fn connect_refusals() {
        let l = limits();
        let mut c = connect_packet(V311);
        c.client_id.clear();
        c.clean_start = false;
        assert!(matches!(
            plan_connect(&c, &l, || "x".into()),
            Err(ConnectRefusal::Code(
                ReasonCode::ClientIdentifierNotValid,
                _
            ))
        ));
        c.clean_start = true;
        let plan = plan_connect(&c, &l, || "x".into()).expect("3.1.1 empty id with clean session");
        assert!(!plan.assigned, "3.1.1 has no way to tell the client its id");
        let mut c = connect_packet(ProtocolVersion::V3_1);
        c.client_id.clear();
        assert!(plan_connect(&c, &l, || "x".into()).is_err());
        let mut c = connect_packet(V5);
        c.properties.authentication_method = Some("SCRAM-SHA-1".into());
        assert!(matches!(
            plan_connect(&c, &l, || "x".into()),
            Err(ConnectRefusal::Code(ReasonCode::BadAuthenticationMethod, _))
        ));
        let mut c = connect_packet(V5);
        c.will = Some(LastWill {
            topic: "a/#".into(),
            ..LastWill::default()
        });
        assert!(matches!(
            plan_connect(&c, &l, || "x".into()),
            Err(ConnectRefusal::Code(ReasonCode::TopicNameInvalid, _))
        ));
    }

    #[test]
    fn server_keep_alive_caps_v5_only() {
        let l = limits();
        let mut c = connect_packet(V5);
        c.keep_alive = 600;
        let plan = plan_connect(&c, &l, String::new).expect("ok");
        assert_eq!((plan.keep_alive, plan.server_keep_alive), (60, Some(60)));
        c.keep_alive = 0;
        assert_eq!(
            plan_connect(&c, &l, String::new)
                .expect("ok")
                .server_keep_alive,
            Some(60)
        );
        let mut c = connect_packet(V311);
        c.keep_alive = 600;
        let plan = plan_connect(&c, &l, String::new).expect("ok");
        assert_eq!((plan.keep_alive, plan.server_keep_alive), (600, None));
    }

    #[test]
    fn session_expiry_by_version() {
        let l = limits();
        let mut c = connect_packet(V311);
        c.clean_start = false;
        assert_eq!(
            plan_connect(&c, &l, String::new)
                .expect("ok")
                .session_expiry,
            u32::MAX
        );
        c.clean_start = true;
        assert_eq!(
            plan_connect(&c, &l, String::new)
                .expect("ok")
                .session_expiry,
            0
        );
        let mut c = connect_packet(V5);
        c.properties.session_expiry_interval = Some(30);
        assert_eq!(
            plan_connect(&c, &l, String::new)
                .expect("ok")
                .session_expiry,
            30
        );
    }

    #[test]
    fn qos1_inbound_routes_then_acks() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V311), None, now);
        conn.handle(Packet::Publish(publish(QoS::AtLeastOnce, 7, "a/b")), now);
        assert_eq!(published_events(&mut conn), 1);
        assert_eq!(
            output(&mut conn, V311),
            vec![Packet::PubAck(PubResponse::new(7))]
        );
    }

    #[test]
    fn qos2_inbound_is_delivered_once() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        conn.handle(Packet::Publish(publish(QoS::ExactlyOnce, 9, "a")), now);
        let mut dup = publish(QoS::ExactlyOnce, 9, "a");
        dup.dup = true;
        conn.handle(Packet::Publish(dup), now);
        assert_eq!(
            published_events(&mut conn),
            1,
            "a resent QoS 2 publish is routed once"
        );
        assert_eq!(
            output(&mut conn, V5),
            vec![
                Packet::PubRec(PubResponse::new(9)),
                Packet::PubRec(PubResponse::new(9))
            ]
        );
        conn.handle(Packet::PubRel(PubResponse::new(9)), now);
        assert_eq!(
            output(&mut conn, V5),
            vec![Packet::PubComp(PubResponse::new(9))]
        );
        conn.handle(Packet::PubRel(PubResponse::new(9)), now);
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::PubComp(r)] if r.reason == ReasonCode::PacketIdentifierNotFound),
            "{out:?}"
        );
        // After PUBCOMP the id is free: the same id is a new message.
        conn.handle(Packet::Publish(publish(QoS::ExactlyOnce, 9, "a")), now);
        assert_eq!(published_events(&mut conn), 1);
    }

    #[test]
    fn qos2_inbound_over_receive_maximum_disconnects() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        for id in 1..=4 {
            conn.handle(Packet::Publish(publish(QoS::ExactlyOnce, id, "a")), now);
        }
        assert!(conn.close_reason().is_none());
        conn.handle(Packet::Publish(publish(QoS::ExactlyOnce, 5, "a")), now);
        let out = output(&mut conn, V5);
        assert_eq!(
            disconnect_reason(&out),
            Some(ReasonCode::ReceiveMaximumExceeded)
        );
        assert!(conn.close_reason().is_some());
    }

    #[test]
    fn outbound_window_follows_client_receive_maximum() {
        let now = Instant::now();
        let mut c = connect_packet(V5);
        c.properties.receive_maximum = Some(2);
        let (mut conn, _) = open(c, None, now);
        for _ in 0..5 {
            conn.deliver(delivery(QoS::AtLeastOnce, b"m", now), now);
        }
        let out = output(&mut conn, V5);
        let ids: Vec<_> = out
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.packet_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![1, 2], "only receive-maximum messages in flight");
        conn.handle(Packet::PubAck(PubResponse::new(1)), now);
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::Publish(p)] if p.packet_id == 3),
            "{out:?}"
        );
        // QoS 0 is not subject to the window.
        conn.deliver(delivery(QoS::AtMostOnce, b"q0", now), now);
        assert_eq!(output(&mut conn, V5).len(), 1);
    }

    #[test]
    fn outbound_qos2_flow() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V311), None, now);
        conn.deliver(delivery(QoS::ExactlyOnce, b"m", now), now);
        let out = output(&mut conn, V311);
        assert!(
            matches!(&out[..], [Packet::Publish(p)] if p.qos == QoS::ExactlyOnce && p.packet_id == 1 && !p.dup)
        );
        conn.handle(Packet::PubRec(PubResponse::new(1)), now);
        assert_eq!(
            output(&mut conn, V311),
            vec![Packet::PubRel(PubResponse::new(1))]
        );
        conn.handle(Packet::PubComp(PubResponse::new(1)), now);
        let (session, _) = conn.finish();
        assert!(session.inflight.is_empty());
    }

    #[test]
    fn resumed_session_resends_with_dup_and_same_ids() {
        let now = Instant::now();
        let mut c = connect_packet(V311);
        c.clean_start = false;
        let (mut conn, _) = open(c.clone(), None, now);
        conn.deliver(delivery(QoS::AtLeastOnce, b"one", now), now);
        conn.deliver(delivery(QoS::ExactlyOnce, b"two", now), now);
        let _ = output(&mut conn, V311);
        conn.handle(Packet::PubRec(PubResponse::new(2)), now);
        let _ = output(&mut conn, V311);
        let (session, _) = conn.finish();

        let (mut conn, ack) = open(c, Some(session), now);
        assert!(ack.session_present);
        let out = output(&mut conn, V311);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            matches!(&out[0], Packet::Publish(p) if p.dup && p.packet_id == 1 && p.payload == "one")
        );
        assert_eq!(out[1], Packet::PubRel(PubResponse::new(2)));
        // New messages do not reuse ids still in flight.
        conn.deliver(delivery(QoS::AtLeastOnce, b"three", now), now);
        let out = output(&mut conn, V311);
        assert!(matches!(&out[..], [Packet::Publish(p)] if p.packet_id == 3 && !p.dup));
    }

    #[test]
    fn queued_messages_are_sent_on_resume() {
        let now = Instant::now();
        let mut session = Session::new("c1".into());
        session.enqueue_offline(delivery(QoS::AtLeastOnce, b"q", now), limits().max_queued());
        let mut c = connect_packet(V5);
        c.clean_start = false;
        let (mut conn, _) = open(c, Some(session), now);
        let out = output(&mut conn, V5);
        assert!(matches!(&out[..], [Packet::Publish(p)] if p.payload == "q" && !p.dup));
    }

    #[test]
    fn topic_aliases() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        let mut p = publish(QoS::AtMostOnce, 0, "long/topic/name");
        p.properties.topic_alias = Some(2);
        conn.handle(Packet::Publish(p), now);
        let mut p = publish(QoS::AtMostOnce, 0, "");
        p.properties.topic_alias = Some(2);
        conn.handle(Packet::Publish(p), now);
        let topics: Vec<String> = conn
            .take_events()
            .filter_map(|e| match e {
                Event::Publish(m) => Some(m.topic.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(topics, ["long/topic/name", "long/topic/name"]);
        let mut p = publish(QoS::AtMostOnce, 0, "");
        p.properties.topic_alias = Some(3);
        conn.handle(Packet::Publish(p), now);
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::ProtocolError)
        );

        let (mut conn, _) = open(connect_packet(V5), None, now);
        let mut p = publish(QoS::AtMostOnce, 0, "x");
        p.properties.topic_alias = Some(4);
        conn.handle(Packet::Publish(p), now);
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::TopicAliasInvalid)
        );
    }

    #[test]
    fn outbound_topic_aliases_within_the_client_maximum() {
        let now = Instant::now();
        let mut c = connect_packet(V5);
        c.properties.topic_alias_maximum = Some(1);
        let (mut conn, _) = open(c, None, now);
        let mut other = delivery(QoS::AtMostOnce, b"o", now);
        Arc::make_mut(&mut other.msg).topic = "other".into();
        for d in [
            delivery(QoS::AtMostOnce, b"1", now),
            delivery(QoS::AtLeastOnce, b"2", now),
            other,
        ] {
            conn.deliver(d, now);
        }
        let sent: Vec<(String, Option<u16>)> = output(&mut conn, V5)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.topic, p.properties.topic_alias),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            sent,
            [
                ("t/1".into(), Some(1)),
                (String::new(), Some(1)),
                ("other".into(), None)
            ]
        );
        // Without a Topic Alias Maximum from the client, no aliases.
        let (mut conn, _) = open(connect_packet(V5), None, now);
        conn.deliver(delivery(QoS::AtMostOnce, b"1", now), now);
        conn.deliver(delivery(QoS::AtMostOnce, b"1", now), now);
        let out = output(&mut conn, V5);
        assert!(out.iter().all(|p| matches!(p, Packet::Publish(p) if p.topic == "t/1" && p.properties.topic_alias.is_none())));
    }

    #[test]
    fn keep_alive_is_one_and_a_half_periods() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        conn.tick(now + Duration::from_millis(14_900));
        assert!(conn.close_reason().is_none());
        conn.handle(Packet::PingReq, now + Duration::from_secs(14));
        assert_eq!(output(&mut conn, V5), vec![Packet::PingResp]);
        conn.tick(now + Duration::from_secs(28));
        assert!(conn.close_reason().is_none(), "PINGREQ restarted the clock");
        conn.tick(now + Duration::from_secs(29));
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::KeepAliveTimeout)
        );
        let (_, will) = conn.finish();
        assert!(will.is_none(), "no will was set");
    }

    #[test]
    fn messages_over_client_maximum_packet_size_are_dropped() {
        let now = Instant::now();
        let mut c = connect_packet(V5);
        c.properties.maximum_packet_size = Some(40);
        let (mut conn, _) = open(c, None, now);
        conn.deliver(delivery(QoS::AtLeastOnce, &[b'x'; 100], now), now);
        assert!(output(&mut conn, V5).is_empty());
        conn.deliver(delivery(QoS::AtLeastOnce, b"small", now), now);
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::Publish(p)] if p.packet_id == 1),
            "the dropped message used no packet id"
        );
    }

    #[test]
    fn message_expiry_counts_down_and_expired_messages_are_not_sent() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        let mut d = delivery(QoS::AtMostOnce, b"e", now);
        Arc::make_mut(&mut d.msg).properties.message_expiry_interval = Some(10);
        conn.deliver(d.clone(), now + Duration::from_secs(4));
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::Publish(p)] if p.properties.message_expiry_interval == Some(6)),
            "{out:?}"
        );
        conn.deliver(d, now + Duration::from_secs(11));
        assert!(output(&mut conn, V5).is_empty());
    }

    #[test]
    fn subscriptions_past_the_limit_are_refused_with_quota_exceeded() {
        let now = Instant::now();
        let limits = Arc::new(Limits::new(Settings {
            max_subscriptions_per_client: 2,
            ..settings()
        }));
        let plan = plan_connect(&connect_packet(V5), &limits, || "x".into()).expect("plan");
        let mut conn = Connection::accept(
            connect_packet(V5),
            &plan,
            Session::new(plan.client_id.clone()),
            false,
            limits,
            None,
            now,
        );
        let _ = output(&mut conn, V5);
        let opts = SubscriptionOptions::default();
        conn.handle(
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![("a".into(), opts), ("b".into(), opts), ("c".into(), opts)],
                properties: Properties::default(),
            }),
            now,
        );
        // Re-subscribing to a held filter is not a new subscription.
        conn.handle(
            Packet::Subscribe(Subscribe {
                packet_id: 2,
                filters: vec![("a".into(), opts)],
                properties: Properties::default(),
            }),
            now,
        );
        let out = output(&mut conn, V5);
        let reasons: Vec<_> = out
            .iter()
            .filter_map(|p| match p {
                Packet::SubAck(a) => Some(a.reasons.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            [
                vec![
                    ReasonCode::Success,
                    ReasonCode::Success,
                    ReasonCode::QuotaExceeded
                ],
                vec![ReasonCode::Success],
            ]
        );
        assert_eq!(conn.take_counts().subscriptions_refused, 1);
    }

    #[test]
    fn subscribe_reason_codes_and_events() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        let opts = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            retain_handling: RetainHandling::SendIfNew,
            ..Default::default()
        };
        let mut sub = Subscribe {
            packet_id: 3,
            filters: vec![
                ("a/+".into(), opts),
                ("a/#/b".into(), opts),
                ("$share/g/x".into(), opts),
            ],
            properties: Properties::default(),
        };
        sub.properties.subscription_identifiers = vec![42];
        conn.handle(Packet::Subscribe(sub.clone()), now);
        let out = output(&mut conn, V5);
        let Packet::SubAck(ack) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            ack.reasons,
            [
                ReasonCode::GrantedQoS1,
                ReasonCode::TopicFilterInvalid,
                ReasonCode::GrantedQoS1
            ]
        );
        let existed: Vec<bool> = conn
            .take_events()
            .map(|e| match e {
                Event::Subscribe {
                    existed,
                    identifier,
                    ..
                } => {
                    assert_eq!(identifier, Some(42));
                    existed
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(existed, [false, false]);
        conn.handle(Packet::Subscribe(sub), now);
        let existed = conn
            .take_events()
            .all(|e| matches!(e, Event::Subscribe { existed: true, .. }));
        assert!(existed, "second subscribe replaces");

        let bad = Subscribe {
            packet_id: 4,
            filters: vec![(
                "$share/g/y".into(),
                SubscriptionOptions {
                    no_local: true,
                    ..opts
                },
            )],
            properties: Properties::default(),
        };
        let _ = output(&mut conn, V5);
        conn.handle(Packet::Subscribe(bad), now);
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::ProtocolError)
        );
    }

    #[test]
    fn unsubscribe_reports_missing_filters() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        conn.handle(
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![("a".into(), SubscriptionOptions::default())],
                properties: Properties::default(),
            }),
            now,
        );
        let _ = output(&mut conn, V5);
        let _ = conn.take_events().count();
        conn.handle(
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 2,
                filters: vec!["a".into(), "b".into()],
                properties: Properties::default(),
            }),
            now,
        );
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::UnsubAck(a)] if a.reasons == [ReasonCode::Success, ReasonCode::NoSubscriptionExisted])
        );
        assert_eq!(conn.take_events().count(), 1);
    }

    fn with_will(version: ProtocolVersion) -> Connect {
        let mut c = connect_packet(version);
        c.will = Some(LastWill {
            topic: "will/t".into(),
            payload: Bytes::from_static(b"gone"),
            ..LastWill::default()
        });
        c
    }

    #[test]
    fn will_is_kept_unless_normal_disconnect() {
        let now = Instant::now();
        let (mut conn, _) = open(with_will(V5), None, now);
        conn.handle(Packet::Disconnect(Disconnect::default()), now);
        assert!(
            output(&mut conn, V5).is_empty(),
            "the server does not answer DISCONNECT"
        );
        assert!(conn.close_reason().is_some());
        assert!(
            conn.finish().1.is_none(),
            "normal disconnect discards the will"
        );

        let (mut conn, _) = open(with_will(V5), None, now);
        conn.handle(
            Packet::Disconnect(Disconnect {
                reason: ReasonCode::DisconnectWithWillMessage,
                ..Disconnect::default()
            }),
            now,
        );
        assert!(conn.finish().1.is_some(), "0x04 keeps the will");

        let (mut conn, _) = open(with_will(V311), None, now);
        conn.handle(Packet::ConnAck(ConnAck::default()), now);
        assert!(conn.close_reason().is_some());
        assert!(
            output(&mut conn, V311).is_empty(),
            "3.1.1 gets no DISCONNECT"
        );
        assert!(conn.finish().1.is_some(), "protocol error keeps the will");

        let (mut conn, _) = open(with_will(V5), None, now);
        conn.disconnect(
            ReasonCode::ServerShuttingDown,
            DisconnectReason::ServerShutdown,
            "bye",
            false,
        );
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::ServerShuttingDown)
        );
        assert!(conn.finish().1.is_none());
    }

    #[test]
    fn disconnect_may_not_raise_zero_session_expiry() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        let mut d = Disconnect::default();
        d.properties.session_expiry_interval = Some(100);
        conn.handle(Packet::Disconnect(d), now);
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::ProtocolError)
        );

        let mut c = connect_packet(V5);
        c.properties.session_expiry_interval = Some(10);
        let (mut conn, _) = open(c, None, now);
        let mut d = Disconnect::default();
        d.properties.session_expiry_interval = Some(0);
        conn.handle(Packet::Disconnect(d), now);
        assert_eq!(conn.finish().0.expiry_interval, 0);
    }

    #[test]
    fn wildcard_topic_and_bad_payload_format() {
        let now = Instant::now();
        let (mut conn, _) = open(connect_packet(V5), None, now);
        let mut p = publish(QoS::AtLeastOnce, 1, "a");
        p.properties.payload_format_indicator = Some(1);
        p.payload = Bytes::from_static(&[0xff, 0xfe]);
        conn.handle(Packet::Publish(p), now);
        assert_eq!(published_events(&mut conn), 0);
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::PubAck(r)] if r.reason == ReasonCode::PayloadFormatInvalid)
        );
        conn.handle(Packet::Publish(publish(QoS::AtMostOnce, 0, "a/+")), now);
        assert_eq!(
            disconnect_reason(&output(&mut conn, V5)),
            Some(ReasonCode::TopicNameInvalid)
        );
    }

    /// Allows every access on topics under `ok/` (and the filters within it).
    #[derive(Debug)]
    struct OkPrefixOnly;

    impl Authorizer for OkPrefixOnly {
        fn allows(&self, _access: Access, topic: &str) -> bool {
            topic.starts_with("ok/")
        }
    }

    fn open_guarded(version: ProtocolVersion, now: Instant) -> Connection {
        let connect = connect_packet(version);
        let limits = limits();
        let plan = plan_connect(&connect, &limits, || "assigned".into()).expect("accepted");
        let session = Session::new(plan.client_id.clone());
        let access: Arc<dyn Authorizer> = Arc::new(OkPrefixOnly);
        let mut conn =
            Connection::accept(connect, &plan, session, false, limits, Some(access), now);
        let out = output(&mut conn, version);
        assert!(matches!(out[0], Packet::ConnAck(_)), "{out:?}");
        conn
    }

    fn delivery_on(topic: &str, qos: QoS, now: Instant) -> Delivery {
        let mut d = delivery(qos, b"x", now);
        Arc::make_mut(&mut d.msg).topic = topic.into();
        d
    }

    #[test]
    fn acl_denied_publish_v5_gets_not_authorized() {
        let now = Instant::now();
        let mut conn = open_guarded(V5, now);
        conn.handle(Packet::Publish(publish(QoS::AtLeastOnce, 1, "no/x")), now);
        conn.handle(Packet::Publish(publish(QoS::ExactlyOnce, 2, "no/x")), now);
        conn.handle(Packet::Publish(publish(QoS::AtMostOnce, 0, "no/x")), now);
        assert_eq!(published_events(&mut conn), 0);
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::PubAck(a), Packet::PubRec(b)]
                if a.reason == ReasonCode::NotAuthorized && b.reason == ReasonCode::NotAuthorized),
            "{out:?}"
        );
        conn.handle(Packet::Publish(publish(QoS::AtLeastOnce, 3, "ok/x")), now);
        assert_eq!(published_events(&mut conn), 1);
        assert!(conn.close_reason().is_none());
    }

    #[test]
    fn acl_denied_publish_v311_is_acked_and_dropped() {
        let now = Instant::now();
        let mut conn = open_guarded(V311, now);
        conn.handle(Packet::Publish(publish(QoS::AtMostOnce, 0, "no/x")), now);
        conn.handle(Packet::Publish(publish(QoS::AtLeastOnce, 1, "no/x")), now);
        conn.handle(Packet::Publish(publish(QoS::ExactlyOnce, 2, "no/x")), now);
        conn.handle(Packet::PubRel(PubResponse::new(2)), now);
        assert_eq!(published_events(&mut conn), 0);
        let out = output(&mut conn, V311);
        assert!(
            matches!(&out[..], [Packet::PubAck(a), Packet::PubRec(b), Packet::PubComp(c)]
                if a.packet_id == 1 && b.packet_id == 2 && c.packet_id == 2
                    && c.reason == ReasonCode::Success),
            "{out:?}"
        );
        assert!(conn.close_reason().is_none());
    }

    #[test]
    fn acl_denied_subscribe() {
        for version in [V5, V311] {
            let now = Instant::now();
            let mut conn = open_guarded(version, now);
            let opts = SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            };
            conn.handle(
                Packet::Subscribe(Subscribe {
                    packet_id: 1,
                    filters: vec![
                        ("no/#".into(), opts),
                        ("ok/+".into(), opts),
                        ("$share/g/ok/a".into(), opts),
                        ("$share/g/no/a".into(), opts),
                    ],
                    properties: Properties::default(),
                }),
                now,
            );
            let out = output(&mut conn, version);
            let Packet::SubAck(ack) = &out[0] else {
                panic!("{out:?}")
            };
            // 3.x knows only 0x80 for a failure.
            let denied = if version.is_v5() {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::UnspecifiedError
            };
            assert_eq!(
                ack.reasons,
                [
                    denied,
                    ReasonCode::GrantedQoS1,
                    ReasonCode::GrantedQoS1,
                    denied
                ],
                "{version:?}"
            );
            let filters: Vec<String> = conn
                .take_events()
                .filter_map(|e| match e {
                    Event::Subscribe { filter, .. } => Some(filter),
                    _ => None,
                })
                .collect();
            assert_eq!(filters, ["ok/+", "$share/g/ok/a"]);
            assert!(conn.finish().0.subscriptions.len() == 2);
        }
    }

    #[test]
    fn acl_checks_read_per_delivery() {
        let now = Instant::now();
        let mut conn = open_guarded(V5, now);
        conn.deliver(delivery_on("no/1", QoS::AtMostOnce, now), now);
        conn.deliver(delivery_on("no/2", QoS::AtLeastOnce, now), now);
        conn.deliver(delivery_on("ok/3", QoS::AtLeastOnce, now), now);
        let out = output(&mut conn, V5);
        let topics: Vec<&str> = out
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.topic.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(topics, ["ok/3"]);
        assert!(conn.session.inflight.len() == 1);

        // Queued while offline: checked when the session resumes.
        let mut session = Session::new("c1".into());
        session.enqueue_offline(
            delivery_on("no/4", QoS::AtLeastOnce, now),
            limits().max_queued(),
        );
        session.enqueue_offline(
            delivery_on("ok/5", QoS::AtLeastOnce, now),
            limits().max_queued(),
        );
        let mut c = connect_packet(V5);
        c.clean_start = false;
        let limits = limits();
        let plan = plan_connect(&c, &limits, || "assigned".into()).expect("accepted");
        let access: Arc<dyn Authorizer> = Arc::new(OkPrefixOnly);
        let mut conn = Connection::accept(c, &plan, session, true, limits, Some(access), now);
        let out = output(&mut conn, V5);
        assert!(
            matches!(&out[..], [Packet::ConnAck(_), Packet::Publish(p)] if p.topic == "ok/5"),
            "{out:?}"
        );
        assert!(conn.session.pending.is_empty());
    }
}
