//! One task per client connection: the thin I/O shell around [`protocol::Connection`].
//!
//! The task owns the socket, a reused read buffer and the session state while the
//! client is connected. It reads and decodes packets, feeds them to the state machine,
//! carries out the machine's [`Event`]s on the shared [`Broker`], takes deliveries from
//! its bounded channel, and writes what the machine produced in one syscall per batch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use roost_core::codec;
use roost_core::{Connect, DecodeError, Packet, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::acl::{Access, Authorizer};
use crate::auth;
use crate::broker::{
    Attach, Broker, ClientInfo, ConnectionHandle, Control, Fanout, Handover, send_blocked,
};
use crate::metrics::DropReason;
use crate::protocol::{self, AckToken, ConnectRefusal, Connection, Event};
use crate::queues::{self, QueueTopic};
use crate::session::{Delivery, Session};
use futures_util::stream::{FuturesUnordered, StreamExt};
use roost_core::Message;

/// Most deliveries taken from the channel before the output is flushed, so a busy
/// subscriber still reads its socket and answers pings.
const DELIVERY_BATCH: usize = 256;

/// Serves one accepted socket until it closes.
///
/// `peer_identity` is who the transport proved the client to be (the Common Name of a
/// verified TLS client certificate with `tls_use_cn_as_username`); when present it
/// replaces the username of the CONNECT, before authentication sees it.
pub async fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    peer_identity: Option<String>,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = Io {
        stream,
        read_buf: BytesMut::with_capacity(1024),
    };
    if !broker.try_add_connection() {
        Box::pin(refuse_over_limit(&broker, &mut io)).await;
        return;
    }
    if let Err(why) = run(&broker, &mut io, peer, peer_identity, shutdown).await {
        debug!(%peer, "connection ended: {why}");
    }
    broker.remove_connection();
}

struct Io<S> {
    stream: S,
    read_buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Reads until one packet decodes. `Ok(None)` is a clean end of stream.
    async fn read_packet(
        &mut self,
        broker: &Broker,
        version: Option<roost_core::ProtocolVersion>,
    ) -> Result<Option<Packet>, ReadError> {
        loop {
            let max = broker.limits.max_packet_size as usize;
            if let Some(p) =
                codec::decode(&mut self.read_buf, version, max).map_err(ReadError::Decode)?
            {
                return Ok(Some(p));
            }
            if self.read_buf.capacity() - self.read_buf.len() < 512 {
                self.read_buf.reserve(4096);
            }
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Half-closes and lingers briefly so the last bytes written reach the client.
    async fn close_gracefully(&mut self) {
        let _ = self.stream.shutdown().await;
        let _ = tokio::time::timeout(LINGER, self.discard_until_eof()).await;
    }

    /// Reads and drops input until the peer closes (bounded by the caller's timeout).
    async fn discard_until_eof(&mut self) {
        let mut scrap = [0u8; 1024];
        while let Ok(n) = self.stream.read(&mut scrap).await {
            if n == 0 {
                break;
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

enum ReadError {
    Decode(DecodeError),
    Io(std::io::Error),
}

/// Reads the CONNECT of a connection over the limit and refuses it.
async fn refuse_over_limit<S: AsyncRead + AsyncWrite + Unpin>(broker: &Broker, io: &mut Io<S>) {
    let timeout = Duration::from_secs(u64::from(broker.config.connect_timeout));
    if let Ok(Ok(Some(Packet::Connect(c)))) =
        tokio::time::timeout(timeout, io.read_packet(broker, None)).await
    {
        let mut out = BytesMut::new();
        protocol::write_refusal(
            c.protocol,
            ReasonCode::QuotaExceeded,
            "too many connections",
            &mut out,
        );
        let _ = io.write(&out).await;
        io.close_gracefully().await;
    }
    debug!("connection refused: max_connections reached");
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    io: &mut Io<S>,
    peer: SocketAddr,
    peer_identity: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    let timeout = Duration::from_secs(u64::from(broker.config.connect_timeout));
    let first = tokio::time::timeout(timeout, io.read_packet(broker, None))
        .await
        .map_err(|_| "no CONNECT in time".to_string())?;
    let mut connect: Box<Connect> = match first {
        Ok(Some(Packet::Connect(c))) => c,
        Ok(Some(_)) => return Err("first packet was not CONNECT".into()),
        Ok(None) => return Err("closed before CONNECT".into()),
        Err(ReadError::Io(e)) => return Err(format!("read error: {e}")),
        Err(ReadError::Decode(e)) => {
            // Only an unsupported protocol level is answered (3.1.1 return code 1);
            // anything else malformed in a CONNECT is closed on silently.
            if let DecodeError::UnsupportedProtocolVersion(_) = e {
                let mut out = BytesMut::new();
                protocol::write_refusal(
                    roost_core::ProtocolVersion::V3_1_1,
                    ReasonCode::UnsupportedProtocolVersion,
                    "",
                    &mut out,
                );
                let _ = io.write(&out).await;
                io.close_gracefully().await;
            }
            return Err(format!("bad CONNECT: {e}"));
        }
    };
    // A client the transport proved (verified certificate) needs no password.
    let transport_authenticated = peer_identity.is_some();
    if let Some(identity) = peer_identity {
        connect.username = Some(identity);
    }
    let plan = protocol::plan_connect(&connect, &broker.limits, || {
        format!("roost-{:016x}", broker.next_id())
    });
    let plan = match plan {
        Ok(plan) => plan,
        Err(ConnectRefusal::Code(code, why)) => {
            let mut out = BytesMut::new();
            protocol::write_refusal(connect.protocol, code, why, &mut out);
            let _ = io.write(&out).await;
            io.close_gracefully().await;
            return Err(format!("CONNECT refused ({code:?}): {why}"));
        }
        Err(ConnectRefusal::Close(why)) => return Err(format!("CONNECT refused: {why}")),
    };
    let client_id = plan.client_id.clone();
    // Rare, one-off paths are boxed so their state does not enlarge every idle
    // connection's task for its whole life.
    let access = match Box::pin(admit(
        broker,
        &connect,
        &client_id,
        peer,
        transport_authenticated,
    ))
    .await
    {
        Ok(access) => access,
        Err((code, why)) => {
            info!(client_id = %client_id, %peer, username = ?connect.username, "connection refused ({code:?}): {why}");
            let mut out = BytesMut::new();
            protocol::write_refusal(connect.protocol, code, why, &mut out);
            let _ = io.write(&out).await;
            io.close_gracefully().await;
            return Err(format!("CONNECT refused ({code:?}): {why}"));
        }
    };
    let (delivery_tx, mut deliveries) = mpsc::channel::<Delivery>(broker.delivery_capacity());
    let mut qio = QueueIo {
        sender: delivery_tx.downgrade(),
        produces: FuturesUnordered::new(),
        waiting: Default::default(),
    };
    let (control_tx, mut control) = mpsc::unbounded_channel();
    let conn_id = broker.next_id();
    let handle = ConnectionHandle {
        id: conn_id,
        deliveries: delivery_tx,
        control: control_tx,
        persistent: plan.session_expiry > 0,
        stalled: Default::default(),
        info: Arc::new(ClientInfo {
            peer,
            protocol: connect.protocol,
            username: connect.username.clone(),
            connected_at_ms: roost_queue::now_ms(),
        }),
    };
    let previous = match broker.attach(&client_id, plan.clean_start, handle) {
        Attach::Fresh => None,
        Attach::Resumed(s) => Some(*s),
        Attach::TakingOver(rx) => match rx.await {
            Ok(Handover {
                mut session,
                delayed_will,
            }) => {
                // A session with expiry 0 ends with its network connection, which
                // the takeover just closed: nothing is left to resume.
                if plan.clean_start || !session.is_persistent() {
                    session.pending_will = delayed_will;
                    broker.discard_session(session);
                    None
                } else {
                    // Reconnecting before the will delay passed cancels the will.
                    Some(session)
                }
            }
            Err(_) => None,
        },
    };
    let session_present = previous.is_some();
    let session = previous.unwrap_or_else(|| Session::new(client_id.clone()));
    let mut conn = Connection::accept(
        *connect,
        &plan,
        session,
        session_present,
        broker.limits.clone(),
        access,
        Instant::now(),
    );
    debug!(client_id = %client_id, %peer, version = ?conn.version(), session_present, "client connected");
    // A resumed session's queue subscriptions join their groups again.
    let queue_subs: Vec<Event> = conn
        .subscriptions()
        .filter(|(raw, _)| queues::is_queue_filter(raw))
        .map(|(raw, r)| Event::Subscribe {
            filter: raw.clone(),
            options: r.options,
            identifier: r.identifier,
            existed: true,
            consumer_group: None,
        })
        .collect();
    for event in queue_subs {
        queue_subscription(broker, &conn, &qio, &event);
    }

    let mut taken_over = None;
    let mut fanout = Fanout::default();
    let outcome = loop {
        if let Err(e) = flush(broker, &mut conn, io, &mut fanout, &mut qio).await {
            break e;
        }
        if let Some(close) = conn.close_reason() {
            break close.why.clone();
        }
        let deadline = conn.next_deadline();
        let room_needed = qio.room_needed();
        tokio::select! {
            // A 3.x producer held back by a full queue is not read from meanwhile.
            read = io.read_packet(broker, Some(conn.version())), if room_needed.is_none() => match read {
                Ok(Some(packet)) => {
                    let now = Instant::now();
                    conn.handle(packet, now);
                    // Decode what else is already buffered before writing back.
                    while conn.close_reason().is_none() {
                        match codec::decode(&mut io.read_buf, Some(conn.version()), broker.limits.max_packet_size as usize) {
                            Ok(Some(p)) => {
                                run_events(broker, &mut conn, &mut fanout, &mut qio);
                                conn.handle(p, now);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                run_events(broker, &mut conn, &mut fanout, &mut qio);
                                conn.decode_error(&e);
                            }
                        }
                    }
                }
                Ok(None) => break "socket closed by client".into(),
                Err(ReadError::Io(e)) => break format!("read error: {e}"),
                Err(ReadError::Decode(e)) => conn.decode_error(&e),
            },
            // A full session queue leaves deliveries in the channel, so publishers
            // wait for this client instead of messages being dropped.
            Some(d) = deliveries.recv(), if conn.has_room() => {
                let now = Instant::now();
                conn.deliver(d, now);
                for _ in 1..DELIVERY_BATCH {
                    if !conn.has_room() {
                        break;
                    }
                    match deliveries.try_recv() {
                        Ok(d) => conn.deliver(d, now),
                        Err(_) => break,
                    }
                }
            }
            Some((token, reason)) = qio.produces.next(), if !qio.produces.is_empty() => {
                conn.resolve_ack(token, reason);
                // Produces of one commit resolve together: acknowledge them in one write.
                while let Some(Some((token, reason))) =
                    futures_util::FutureExt::now_or_never(qio.produces.next())
                {
                    conn.resolve_ack(token, reason);
                }
            }
            _ = wait_for_room(room_needed.clone()), if room_needed.is_some() => qio.start_waiting(),
            Some(request) = control.recv() => match request {
                Control::TakeOver { reply } => {
                    conn.disconnect(ReasonCode::SessionTakenOver, "session taken over", true);
                    taken_over = Some(reply);
                }
                Control::Kick => {
                    info!(client_id = %client_id, "disconnected by an administrator");
                    conn.disconnect(
                        ReasonCode::AdministrativeAction,
                        "disconnected by an administrator",
                        true,
                    );
                }
            },
            _ = sleep_until(deadline) => conn.tick(Instant::now()),
            _ = shutdown.changed() => {
                conn.disconnect(ReasonCode::ServerShuttingDown, "server shutting down", false);
            }
        }
    };
    let _ = flush(broker, &mut conn, io, &mut fanout, &mut qio).await;
    // Closing with unread input makes the kernel send RST, which can destroy the
    // DISCONNECT we just wrote before the client reads it. So when roost ends the
    // connection, it half-closes, settles the session, then reads and discards what
    // the client still sends, for a short while.
    let linger = conn.close_reason().is_some_and(|c| !c.by_client);
    let _ = io.stream.shutdown().await;
    debug!(client_id = %client_id, "disconnected: {outcome}");
    let (session, will) = conn.finish();
    Box::pin(end_session(
        broker, &client_id, conn_id, session, will, taken_over, deliveries, control,
    ))
    .await;
    if linger {
        let _ = tokio::time::timeout(LINGER, io.discard_until_eof()).await;
    }
    Ok(())
}

/// Authenticates the client of `connect` and checks its will topic against the ACL.
/// Returns the ACL the connection is held to.
async fn admit(
    broker: &Broker,
    connect: &Connect,
    client_id: &Arc<str>,
    peer: SocketAddr,
    transport_authenticated: bool,
) -> Result<Option<Arc<dyn Authorizer>>, auth::Refusal> {
    if !transport_authenticated {
        broker.auth.authenticate(connect, client_id, peer).await?;
    }
    let access = broker
        .auth
        .authorizer(connect.username.as_deref(), client_id);
    if let (Some(acl), Some(will)) = (&access, &connect.will)
        && !acl.allows(Access::Write, &will.topic)
    {
        return Err((
            ReasonCode::NotAuthorized,
            "the will topic is not writable for this client",
        ));
    }
    Ok(access)
}

/// How long a connection that roost closed keeps reading (and discarding) input.
const LINGER: Duration = Duration::from_secs(1);

/// Hands the session to the broker (stored or ended) or to the connection that took
/// the client id over.
#[allow(clippy::too_many_arguments)]
async fn end_session(
    broker: &Arc<Broker>,
    client_id: &Arc<str>,
    conn_id: u64,
    mut session: Session,
    will: Option<roost_core::LastWill>,
    taken_over: Option<tokio::sync::oneshot::Sender<Handover>>,
    mut deliveries: mpsc::Receiver<Delivery>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    // Queue messages this connection held go back to their queues now, for another
    // consumer (or this client when it returns); the session does not keep them.
    broker.queues.leave_all(client_id);
    session.drop_queue_deliveries();
    let (mut session, will, reply) = match taken_over {
        Some(reply) => (session, will, reply),
        None => match broker.detach(conn_id, session, will, &mut deliveries) {
            None => return,
            // Taken over while we were ending: the successor waits for the session.
            Some((session, will)) => loop {
                match control.recv().await {
                    Some(Control::TakeOver { reply }) => break (session, will, reply),
                    // Already ending.
                    Some(Control::Kick) => {}
                    None => {
                        broker.discard_session(session);
                        return;
                    }
                }
            },
        },
    };
    // The map no longer holds our sender: drain what was routed to us before.
    deliveries.close();
    while let Some(d) = deliveries.recv().await {
        session.enqueue_offline(d, broker.limits.max_queued);
    }
    let delay = will
        .as_ref()
        .and_then(|w| w.properties.will_delay_interval)
        .unwrap_or(0);
    let delayed_will = if delay == 0 {
        if let Some(w) = will {
            broker.publish_will_now(client_id, w);
        }
        None
    } else {
        will
    };
    if let Err(Handover {
        mut session,
        delayed_will,
    }) = reply.send(Handover {
        session,
        delayed_will,
    }) {
        // The successor gave up waiting: end the session as if it had none.
        session.pending_will = delayed_will;
        broker.discard_session(session);
    }
}

/// Carries out pending events, stores what they and the session changed, and only
/// then writes the output: nothing is acknowledged before it is stored.
async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    conn: &mut Connection,
    io: &mut Io<S>,
    fanout: &mut Fanout,
    qio: &mut QueueIo,
) -> Result<(), String> {
    run_events(broker, conn, fanout, qio);
    let mut ops = std::mem::take(&mut fanout.ops);
    // Copies into capturing queues are acknowledged only once stored.
    for capture in std::mem::take(&mut fanout.captures) {
        capture.await;
    }
    if !fanout.blocked.is_empty() {
        // Backpressure: the acknowledgements wait until slow subscribers have room.
        let blocked = std::mem::take(&mut fanout.blocked);
        ops.extend(send_blocked(blocked, broker.delivery_wait(), &broker.metrics).await);
    }
    // Routing's writes first: the session's own journal may finish what routing began.
    ops.append(&mut conn.take_store_ops());
    if !ops.is_empty() {
        let ticket = broker.store().submit(ops);
        if let Err(e) = ticket.wait().await {
            tracing::error!(client_id = %conn.client_id(), "cannot store session state: {e}");
            // The acknowledgements in the output promise what was not stored.
            let _ = conn.take_output();
            conn.disconnect(ReasonCode::UnspecifiedError, "storage failure", true);
        }
    }
    let counts = conn.take_counts();
    for (qos, n) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .zip(counts.sent)
    {
        broker.metrics.sent(qos, n);
    }
    broker
        .metrics
        .dropped(DropReason::SessionQueueFull, counts.dropped_queue_full);
    if conn.has_output() {
        let out = conn.take_output();
        io.write(&out)
            .await
            .map_err(|e| format!("write error: {e}"))?;
    }
    Ok(())
}

/// Carries out what the protocol asked of the broker.
fn run_events(broker: &Arc<Broker>, conn: &mut Connection, fanout: &mut Fanout, qio: &mut QueueIo) {
    let events: Vec<Event> = conn.take_events().collect();
    if events.is_empty() {
        return;
    }
    let now = Instant::now();
    // PUBACKs of queue deliveries that arrived together settle together: one lock, one
    // dispatch and one progress record per group instead of one each.
    let mut acks = PendingAcks::default();
    for event in events {
        if let Event::QueueSettle { queue, nack: false } = event {
            acks.push(broker, conn.client_id(), queue);
            continue;
        }
        acks.settle(broker, conn.client_id());
        match event {
            Event::Publish(msg) => {
                broker.metrics.received(msg.qos);
                broker.publish(msg, fanout)
            }
            Event::Subscribe { .. } if queue_subscription(broker, conn, qio, &event) => {}
            Event::Subscribe {
                filter,
                options,
                identifier,
                existed,
                ..
            } => {
                broker.subscribe(&filter, conn.client_id(), options, identifier);
                for d in broker.retained_for(&filter, options, identifier, existed, now) {
                    conn.deliver(d, now);
                }
            }
            Event::Unsubscribe { filter } => {
                if let Some(f) = queues::parse_filter(&filter, None) {
                    // The group of a v5 `consumer-group` subscription is not in the
                    // filter: leave every group of that queue this client is in.
                    if let Some(q) = broker.queues.get(&f.queue) {
                        q.leave_all(conn.client_id());
                    }
                } else {
                    broker.unsubscribe(&filter, conn.client_id());
                }
            }
            Event::QueuePublish { msg, ack } => {
                broker.metrics.received(msg.qos);
                queue_publish(broker, conn, qio, &msg, ack)
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
}

/// Acks of one connection for one queue and group, gathered in arrival order.
#[derive(Default)]
struct PendingAcks {
    target: Option<Arc<crate::session::QueueRef>>,
    ids: Vec<roost_queue::MessageId>,
}

impl PendingAcks {
    fn push(&mut self, broker: &Broker, client_id: &str, queue: Arc<crate::session::QueueRef>) {
        let same = self
            .target
            .as_ref()
            .is_some_and(|t| t.queue == queue.queue && t.group == queue.group);
        if !same {
            self.settle(broker, client_id);
        }
        self.ids.push(queue.id.clone());
        if !same {
            self.target = Some(queue);
        }
    }

    fn settle(&mut self, broker: &Broker, client_id: &str) {
        let Some(target) = self.target.take() else {
            return;
        };
        if let Some(q) = broker.queues.get(&target.queue) {
            drop(q.ack_many(client_id, Some(&target.group), &self.ids));
        }
        self.ids.clear();
    }
}

/// What a connection needs for `$queue/` traffic: a weak handle on its own delivery
/// channel (for the queues' sinks) and the produces whose acknowledgements wait.
struct QueueIo {
    sender: mpsc::WeakSender<Delivery>,
    /// Polled by the connection task itself: no task per produce.
    produces: FuturesUnordered<ProduceAck>,
    /// 3.x queue publishes waiting for room in a full queue, in arrival order.
    waiting: std::collections::VecDeque<WaitingProduce>,
}

/// A produce whose acknowledgement waits for its append.
type ProduceAck =
    std::pin::Pin<Box<dyn std::future::Future<Output = (AckToken, ReasonCode)> + Send>>;

struct WaitingProduce {
    queue: roost_queue::Queue,
    message: roost_queue::NewMessage,
    ack: Option<AckToken>,
}

impl QueueIo {
    /// What the front waiting produce needs room in, if any.
    fn room_needed(&self) -> Option<(roost_queue::Queue, u64)> {
        self.waiting
            .front()
            .map(|w| (w.queue.clone(), w.message.payload.len() as u64))
    }

    /// Starts the waiting produces that now fit, in order.
    fn start_waiting(&mut self) {
        while let Some(w) = self.waiting.front() {
            if !w.queue.has_room(w.message.payload.len() as u64) {
                break;
            }
            if let Some(w) = self.waiting.pop_front() {
                start_produce(self, &w.queue, w.message, w.ack, false);
            }
        }
    }
}

/// Queues the append now (so one connection's messages keep their order) and resolves
/// the acknowledgement when it is durable. A 3.x producer that loses a race for the
/// last room waits for more rather than be told nothing (it has no reason codes).
fn start_produce(
    qio: &mut QueueIo,
    queue: &roost_queue::Queue,
    message: roost_queue::NewMessage,
    ack: Option<AckToken>,
    v5: bool,
) {
    let first = queue.produce(message.clone());
    let queue = queue.clone();
    let produce = async move {
        type Attempt = std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<roost_queue::MessageId, roost_queue::ProduceError>,
                    > + Send,
            >,
        >;
        let mut attempt: Attempt = Box::pin(first);
        loop {
            match attempt.await {
                Ok(_) => return ReasonCode::Success,
                Err(roost_queue::ProduceError::QuotaExceeded { .. }) if !v5 => {
                    queue.wait_for_room(message.payload.len() as u64).await;
                    attempt = Box::pin(queue.produce(message.clone()));
                }
                Err(e) => return queues::produce_reason(&e),
            }
        }
    };
    match ack {
        Some(token) => {
            qio.produces
                .push(Box::pin(async move { (token, produce.await) }));
        }
        None => {
            tokio::spawn(produce);
        }
    }
}

/// Joins the consumer group a `$queue/` subscription names; false for other filters.
fn queue_subscription(broker: &Broker, conn: &Connection, qio: &QueueIo, event: &Event) -> bool {
    let Event::Subscribe {
        filter,
        options,
        identifier,
        consumer_group,
        ..
    } = event
    else {
        return false;
    };
    let Some(f) = queues::parse_filter(filter, consumer_group.as_deref()) else {
        return false;
    };
    let queue = if f.queue.ends_with(roost_queue::DEAD_LETTER_SUFFIX) {
        broker
            .queues
            .get(&f.queue)
            .ok_or_else(|| "no such queue".to_string())
    } else {
        broker
            .queues
            .get_or_create(&f.queue)
            .map_err(|e| e.to_string())
    };
    // v5 consumers take as many as their Receive Maximum; 3.x ones the queue's window.
    let window = if conn.version().is_v5() {
        u32::try_from(conn.send_window()).unwrap_or(u32::MAX)
    } else {
        0
    };
    let sink = Arc::new(queues::QueueSink::new(
        qio.sender.clone(),
        &f,
        options.qos,
        *identifier,
    ));
    match queue.and_then(|q| {
        q.join(&f.group, conn.client_id().clone(), window, sink)
            .map_err(|e| e.to_string())
    }) {
        Ok(()) => {
            debug!(client_id = %conn.client_id(), queue = %f.queue, group = %f.group, "joined queue group")
        }
        Err(e) => {
            info!(client_id = %conn.client_id(), queue = %f.queue, "cannot consume from queue: {e}")
        }
    }
    true
}

/// Stores a `$queue/` publish (or settles by message id) and arranges its
/// acknowledgement: resolved when the message is durable in its queue.
fn queue_publish(
    broker: &Broker,
    conn: &mut Connection,
    qio: &mut QueueIo,
    msg: &Message,
    ack: Option<AckToken>,
) {
    let resolve = |conn: &mut Connection, reason| {
        if let Some(token) = ack {
            conn.resolve_ack(token, reason);
        }
    };
    match queues::parse_topic(&msg.topic) {
        Some(QueueTopic::Settle(name, how)) => {
            let id = queues::user_property(msg, "message-id").and_then(|v| v.parse().ok());
            let settled = match (broker.queues.get(name), id) {
                (Some(q), Some(id)) => queues::settle(&q, conn.client_id(), &id, how),
                _ => false,
            };
            let reason = if settled {
                ReasonCode::Success
            } else {
                ReasonCode::UnspecifiedError
            };
            resolve(conn, reason);
        }
        Some(QueueTopic::Produce(name, rest)) => {
            let queue = match broker.queues.get_or_create(name) {
                Ok(q) => q,
                Err(e) => {
                    debug!(client_id = %conn.client_id(), queue = %name, "cannot produce: {e}");
                    return resolve(conn, e.reason_code());
                }
            };
            let message = queues::new_message(msg, rest);
            let v5 = conn.version().is_v5();
            // 3.x has no quota reason code: a full queue holds the producer back (its
            // PUBACK waits and roost stops reading from it) until there is room, and
            // its later queue publishes wait behind, in order.
            if !v5 && (!qio.waiting.is_empty() || !queue.has_room(message.payload.len() as u64)) {
                qio.waiting.push_back(WaitingProduce {
                    queue,
                    message,
                    ack,
                });
                return;
            }
            start_produce(qio, &queue, message, ack, v5);
        }
        None => resolve(conn, ReasonCode::TopicNameInvalid),
    }
}

async fn wait_for_room(needed: Option<(roost_queue::Queue, u64)>) {
    match needed {
        Some((queue, bytes)) => queue.wait_for_room(bytes).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
