//! One connected client as the engine serves it: the protocol state machine with its
//! session, the mailbox other connections deliver into, and its `$queue/` traffic.
//!
//! The shell (a connection task with a socket, or a test) drives a [`Client`] with
//! what happened: a packet read ([`Client::handle`]), deliveries that arrived
//! ([`Client::deliver_batch`]), a queue acknowledgement that is ready
//! ([`Client::produced`]), a request from the broker ([`Client::control`]), the clock
//! ([`Client::on_timer`]). After each, [`Client::commit`] carries out what the
//! protocol asked of the broker and stores what must be durable; only then may the
//! shell write [`Connection::take_output`] to the client: nothing is acknowledged
//! before it is stored. The client's end is [`Client::end`].
//!
//! Invariant: events are carried out in the order of the packets that caused them, each
//! packet's before the next is handled (a SUBSCRIBE takes effect before a PUBLISH read
//! after it, on any connection).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use roost_core::{Connect, DecodeError, Packet, ReasonCode};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::access::Authorizer;
use crate::auth::Refusal;
use crate::broker::{
    Attach, Broker, ClientInfo, ConnectionHandle, Control, Fanout, Handover, Mailbox,
};
use crate::mailbox;
use crate::metrics::{DisconnectReason, DropReason, Limit, StoreRefusal};
use crate::protocol::{AckToken, ConnectPlan, Connection, Event};
use crate::queues::{self, QueueIo};
use crate::session::{Delivery, Session};
use crate::store::StoreError;

/// Most deliveries taken from the mailbox in one batch, so a busy subscriber still
/// reads its socket and answers pings.
pub const DELIVERY_BATCH: usize = 256;

/// Output past which a batch of deliveries stops, to be written before more are taken:
/// 256 deliveries of large messages would otherwise be encoded at once.
pub const DELIVERY_BATCH_BYTES: usize = 256 * 1024;

/// A client past its CONNECT: what its connection serves until it ends.
pub struct Client {
    /// The protocol state machine, with the session.
    pub conn: Connection,
    /// Deliveries and requests for this connection.
    pub mailbox: Mailbox,
    /// Its `$queue/` produces waiting for their acknowledgements.
    pub queues: QueueIo,
    /// The connection's id and peer address, among others.
    pub info: Arc<ClientInfo>,
}

/// What authentication decided for a CONNECT, for [`Client::attach`].
pub struct Admitted {
    /// The ACL the client is held to (`None`: anything goes).
    pub access: Option<Arc<dyn Authorizer>>,
    /// The user a SCRAM exchange proved the client to be (it may re-authenticate).
    pub scram_user: Option<String>,
    /// When the client's credentials expire (a token's `exp`): the connection ends then.
    pub expires_at: Option<Instant>,
}

impl Client {
    /// Attaches the client of an accepted `connect` to its session: resumed, taken over
    /// from the connection that has its client id (which is told to close and hands the
    /// session over), or new. Writes the CONNACK (and what a resumed session resends)
    /// into the connection's output. Refused past `max_sessions`.
    ///
    /// The session map changes at the call; the future waits only for a takeover's
    /// handover. (Not an `async fn`, which would keep its arguments twice: this future
    /// is part of every connection's handshake, and its size costs memory per client.)
    pub fn attach<'a>(
        broker: &'a Arc<Broker>,
        connect: Box<Connect>,
        plan: &'a ConnectPlan,
        peer: std::net::SocketAddr,
        admitted: Admitted,
    ) -> impl std::future::Future<Output = Result<Client, Refusal>> + 'a {
        let client_id = plan.client_id.clone();
        let (mailbox_tx, mailbox) = mailbox::mailbox(broker.delivery_capacity());
        let info = Arc::new(ClientInfo {
            id: broker.next_id(),
            persistent: plan.session_expiry > 0,
            stalled: Default::default(),
            overflowed: Default::default(),
            peer,
            protocol: connect.protocol,
            username: connect.username.clone(),
            connected_at_ms: roost_queue::now_ms(),
        });
        let queue_io = QueueIo::new(mailbox_tx.downgrade());
        let found = broker.attach(
            &client_id,
            plan.clean_start,
            ConnectionHandle {
                mailbox: mailbox_tx,
                info: info.clone(),
            },
        );
        async move {
            let previous = match found {
                Attach::Refused => {
                    info!(client_id = %plan.client_id, %peer, "connection refused: max_sessions reached");
                    return Err(Refusal::TooManySessions);
                }
                Attach::Fresh => None,
                Attach::Resumed(s) => Some(*s),
                Attach::TakingOver(rx) => broker.take_over(rx.await.ok(), plan.clean_start),
            };
            let parts = (mailbox, queue_io, info);
            Ok(Client::accept(
                broker, *connect, plan, previous, admitted, parts,
            ))
        }
    }

    /// Accepts the CONNECT on the session found for it.
    fn accept(
        broker: &Broker,
        connect: Connect,
        plan: &ConnectPlan,
        previous: Option<Session>,
        admitted: Admitted,
        (mailbox, queues, info): (Mailbox, QueueIo, Arc<ClientInfo>),
    ) -> Client {
        let session_present = previous.is_some();
        let session = previous.unwrap_or_else(|| Session::new(plan.client_id.clone()));
        let conn = Connection::accept(
            connect,
            plan,
            session,
            session_present,
            broker.limits.clone(),
            admitted.access,
            crate::clock::now(),
        );
        let mut client = Client {
            conn,
            mailbox,
            queues,
            info,
        };
        if let Some(at) = admitted.expires_at {
            client.conn.expire_credentials_at(at);
        }
        if let Some(user) = admitted.scram_user {
            client
                .conn
                .enable_reauthentication(user, broker.auth.scram());
        }
        debug!(client_id = %plan.client_id, peer = %client.info.peer, version = ?client.conn.version(), session_present, "client connected");
        // A resumed session's queue subscriptions join their groups again.
        for event in client.conn.resumed_queue_subscriptions() {
            queues::subscribe(broker, &mut client.conn, &client.queues, &event);
        }
        client
    }

    /// Handles one packet from the client and carries out what it asked of the broker
    /// (see the module's invariant).
    pub fn handle(&mut self, broker: &Broker, packet: Packet, now: Instant, fanout: &mut Fanout) {
        self.conn.handle(packet, now);
        self.run_events(broker, fanout);
    }

    /// Ends the connection because the bytes could not be decoded.
    pub fn decode_error(&mut self, broker: &Broker, e: &DecodeError, fanout: &mut Fanout) {
        self.conn.decode_error(e);
        self.run_events(broker, fanout);
    }

    /// Carries out what the protocol asked of the broker, noting in [`ClientInfo`]
    /// that a publish overflowed a subscriber's mailbox (the shell then lets the
    /// subscribers run before it reads more).
    pub fn run_events(&mut self, broker: &Broker, fanout: &mut Fanout) {
        if run_events(broker, &mut self.conn, fanout, &mut self.queues) {
            self.info.overflowed.store(true, Ordering::Relaxed);
        }
    }

    /// Takes a delivery that arrived, and as many more as wait in the mailbox (up to
    /// [`DELIVERY_BATCH`], or [`DELIVERY_BATCH_BYTES`] of output, while there is room).
    pub fn deliver_batch(&mut self, first: Delivery, now: Instant) {
        self.conn.deliver(first, now);
        for _ in 1..DELIVERY_BATCH {
            if !self.conn.has_room() || self.conn.output_len() >= DELIVERY_BATCH_BYTES {
                break;
            }
            match self.mailbox.try_recv() {
                Some(d) => self.conn.deliver(d, now),
                None => break,
            }
        }
    }

    /// A queue produce's acknowledgement is ready: sends it, and every other ready one
    /// (produces of one commit resolve together: one write for them all).
    pub fn produced(&mut self, token: AckToken, reason: ReasonCode) {
        self.resolve_produced(token, reason);
        while let Some((token, reason)) = self.queues.next_produced() {
            self.resolve_produced(token, reason);
        }
        self.queues.tidy();
    }

    /// Acknowledges a queue produce; one that failed (a failed log: not stored) ends a
    /// 3.x producer's connection instead, since its PUBACK has no reason code and
    /// would say stored. (A full queue or disk never fails a 3.x produce: it waits.)
    fn resolve_produced(&mut self, token: AckToken, reason: ReasonCode) {
        if reason.is_error() && !self.conn.version().is_v5() {
            info!(client_id = %self.conn.client_id(), ?reason, "queue produce not stored: disconnecting the 3.x producer instead of acknowledging");
            self.conn.disconnect(
                reason,
                DisconnectReason::StorageFailure,
                "queue produce not stored",
                true,
            );
            return;
        }
        self.conn.resolve_ack(token, reason);
    }

    /// A request from the broker. A takeover ends the connection at once: the reply
    /// channel is returned for [`Client::end`] to hand the session over.
    pub fn control(&mut self, request: Control) -> Option<oneshot::Sender<Handover>> {
        match request {
            Control::TakeOver { reply } => {
                self.conn.disconnect(
                    ReasonCode::SessionTakenOver,
                    DisconnectReason::TakenOver,
                    "session taken over",
                    true,
                );
                return Some(reply);
            }
            Control::Shutdown => self.conn.disconnect(
                ReasonCode::ServerShuttingDown,
                DisconnectReason::ServerShutdown,
                "server shutting down",
                false,
            ),
            Control::Kick => {
                info!(client_id = %self.conn.client_id(), "disconnected by an administrator");
                self.conn.disconnect(
                    ReasonCode::AdministrativeAction,
                    DisconnectReason::AdminKick,
                    "disconnected by an administrator",
                    true,
                );
            }
        }
        None
    }

    /// When the client is to be disconnected as a slow consumer, if its outbound
    /// buffer is full now: its session queue is at its bound because it acknowledges
    /// nothing in flight, so it takes no more deliveries and publishers wait on it or
    /// drop for it. Any progress (an acknowledgement that makes room) restarts the
    /// clock, `full_since`.
    pub fn slow_consumer_deadline(
        &self,
        broker: &Broker,
        full_since: &mut Option<Instant>,
    ) -> Option<Instant> {
        let limit = broker.limits.slow_consumer_timeout()?;
        if self.conn.has_room() {
            *full_since = None;
            return None;
        }
        Some(*full_since.get_or_insert_with(crate::clock::now) + limit)
    }

    /// The next time [`Client::on_timer`] has something to do: the keep-alive, the
    /// slow-consumer limit, or (at once) retained messages still to send.
    pub fn next_deadline(
        &self,
        broker: &Broker,
        full_since: &mut Option<Instant>,
    ) -> Option<Instant> {
        let slow = self.slow_consumer_deadline(broker, full_since);
        // Retained messages still to send for a new subscription: at once.
        let retained = self.conn.wants_retained().then(crate::clock::now);
        [self.conn.next_deadline(), slow, retained]
            .into_iter()
            .flatten()
            .min()
    }

    /// The clock reached `now`: the slow-consumer limit and the keep-alive are enforced,
    /// and a step of retained messages is taken if there is room for it.
    pub fn on_timer(&mut self, broker: &Broker, now: Instant, full_since: &mut Option<Instant>) {
        if self
            .slow_consumer_deadline(broker, full_since)
            .is_some_and(|t| now >= t)
        {
            broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
            info!(client_id = %self.conn.client_id(), "disconnected: slow consumer (outbound buffer full for slow_consumer_timeout_ms)");
            self.conn.disconnect(
                ReasonCode::QuotaExceeded,
                DisconnectReason::SlowConsumer,
                "slow consumer: outbound buffer full",
                true,
            );
        }
        self.conn.tick(now);
        read_retained(broker, &mut self.conn);
    }

    /// Carries out pending events, waits for what routing asked the publisher to wait
    /// for (capturing queues, subscribers without room), stores what the events and
    /// the session changed, and counts what was sent. Afterwards the output may be
    /// written. A store that fails ends the connection (its acknowledgements promised
    /// what was not stored, so they are dropped).
    #[allow(clippy::manual_async_fn)]
    pub fn commit<'a>(
        &'a mut self,
        broker: &'a Broker,
        fanout: &'a mut Fanout,
    ) -> impl std::future::Future<Output = ()> + 'a {
        // An async block, not an `async fn`, which would store its arguments twice (this
        // future is part of every connection task).
        async move {
            self.run_events(broker, fanout);
            // (A block of its own, so the writes' list is gone once they are stored.)
            {
                let mut ops = std::mem::take(&mut fanout.ops);
                if let Some(waits) = fanout.waits.take() {
                    // Boxed: rare, and its state would otherwise enlarge every task.
                    ops.extend(Box::pin(broker.wait_for(*waits)).await);
                }
                // Routing's writes first: the session's own journal may finish what
                // routing began.
                ops.append(&mut self.conn.take_store_ops());
                if !ops.is_empty() {
                    let ticket = broker.store().submit(ops);
                    match ticket.wait().await {
                        Ok(()) => {}
                        Err(e @ StoreError::NoSpace(_)) => {
                            tracing::warn!(client_id = %self.conn.client_id(), "closing the connection without its acknowledgements: {e}");
                            self.conn.close_unstored(
                                ReasonCode::QuotaExceeded,
                                DisconnectReason::StorageFull,
                                "no space to store session state",
                            );
                        }
                        Err(e) => {
                            tracing::error!(client_id = %self.conn.client_id(), "cannot store session state: {e}");
                            self.conn.close_unstored(
                                ReasonCode::UnspecifiedError,
                                DisconnectReason::StorageFailure,
                                "storage failure",
                            );
                        }
                    }
                }
            }
            count(broker, &mut self.conn);
        }
    }

    /// Ends the client: its queue deliveries go back to their queues, the session is
    /// handed to the connection that took the client id over (`taken_over`), or kept
    /// offline or ended by the broker, with its will published or scheduled.
    pub async fn end(
        &mut self,
        broker: &Arc<Broker>,
        taken_over: Option<oneshot::Sender<Handover>>,
    ) {
        if let Some(close) = self.conn.close_reason() {
            broker.metrics.disconnected(close.kind);
            if close.kind == DisconnectReason::ReceiveMaximumExceeded {
                broker.metrics.limit_tripped(Limit::InboundInflight, 1);
            }
        }
        let client_id = self.conn.client_id().clone();
        let (session, will) = self.conn.finish();
        broker
            .end_session(
                &client_id,
                self.info.id,
                session,
                will,
                taken_over,
                &mut self.mailbox,
            )
            .await;
    }
}

/// Adds what the connection counted since the last time to the broker's metrics.
fn count(broker: &Broker, conn: &mut Connection) {
    let counts = conn.take_counts();
    let m = &broker.metrics;
    for (i, qos) in [
        roost_core::QoS::AtMostOnce,
        roost_core::QoS::AtLeastOnce,
        roost_core::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        m.sent(qos, u64::from(counts.sent[i]), counts.sent_bytes[i]);
    }
    m.dropped(
        DropReason::SessionQueueFull,
        u64::from(counts.dropped_queue_full),
    );
    m.limit_tripped(Limit::QueuedBytes, u64::from(counts.dropped_over_bytes));
    m.limit_tripped(
        Limit::TotalQueuedBytes,
        u64::from(counts.dropped_over_total),
    );
    m.limit_tripped(
        Limit::SubscriptionsPerClient,
        u64::from(counts.subscriptions_refused),
    );
    m.store_refused(
        StoreRefusal::Subscription,
        u64::from(counts.subscriptions_refused_no_space),
    );
}

/// Carries out what the protocol asked of the broker. True when a publish overflowed
/// a subscriber's mailbox (see [`Broker::publish`]).
fn run_events(
    broker: &Broker,
    conn: &mut Connection,
    fanout: &mut Fanout,
    queue_io: &mut QueueIo,
) -> bool {
    let mut events = conn.take_event_buffer();
    if events.is_empty() {
        conn.recycle_events(events);
        return false;
    }
    let mut overflowed = false;
    // PUBACKs of queue deliveries that arrived together settle together: one lock, one
    // dispatch and one progress record per group instead of one each.
    let mut acks = queues::PendingAcks::default();
    for event in events.drain(..) {
        if let Event::QueueSettle { queue, nack: false } = event {
            acks.push(broker, conn.client_id(), queue);
            continue;
        }
        acks.settle(broker, conn.client_id());
        match event {
            Event::Publish(msg) => {
                broker.metrics.received(msg.qos, msg.payload.len());
                overflowed |= broker.publish(msg, fanout, false).unwrap_or(false);
            }
            Event::RetainedPublish { msg, ack } => {
                broker.metrics.received(msg.qos, msg.payload.len());
                let reason = match broker.publish(msg, fanout, true) {
                    Ok(o) => {
                        overflowed |= o;
                        ReasonCode::Success
                    }
                    Err(_) => ReasonCode::QuotaExceeded,
                };
                conn.resolve_ack(ack, reason);
            }
            Event::Subscribe {
                filter,
                options,
                identifier,
                existed,
            } => {
                if let Some(wait) = broker.subscribe(&filter, conn.client_id(), options, identifier)
                {
                    fanout.waits().pending.push(wait);
                }
                if let Some(scan) = broker.retained_to_send(&filter, options, existed) {
                    conn.read_retained(scan, options, identifier);
                }
            }
            Event::Unsubscribe { filter } => broker.unsubscribe(&filter, conn.client_id()),
            event @ Event::QueueSubscribe { .. } => {
                queues::subscribe(broker, conn, queue_io, &event);
            }
            Event::QueueUnsubscribe { queue } => {
                // The group of a v5 `consumer-group` subscription is not in the
                // filter: leave every group of that queue this client is in.
                if let Some(q) = broker.queues.get(&queue) {
                    q.leave_all(conn.client_id());
                }
            }
            Event::QueuePublish { msg, ack } => {
                broker.metrics.received(msg.qos, msg.payload.len());
                queues::publish(broker, conn, queue_io, &msg, ack)
            }
            Event::QueueSettle { queue, nack } => {
                if let Some(q) = broker.queues.get(&queue.queue) {
                    if nack {
                        q.nack(conn.client_id(), Some(&queue.group), &queue.id);
                    } else {
                        drop(q.ack(conn.client_id(), Some(&queue.group), &queue.id));
                    }
                }
            }
        }
    }
    acks.settle(broker, conn.client_id());
    conn.recycle_events(events);
    // The first step of new subscriptions' retained messages goes out with their SUBACK.
    read_retained(broker, conn);
    overflowed
}

/// Takes one step of the oldest unfinished reading of retained messages, if the
/// connection has room for more; the shell comes back for the next step once this one
/// is written (see [`Connection::retained_wanted`]).
fn read_retained(broker: &Broker, conn: &mut Connection) {
    let Some((scan, max)) = conn.retained_wanted() else {
        return;
    };
    // The clock is read only here: a batch of events is most often a few PUBACKs.
    let now = crate::clock::now();
    let mut found = Vec::new();
    let done = broker.read_retained(scan, max, now, &mut found);
    conn.deliver_retained(found, done, now);
}
