//! One task per client connection: the thin I/O shell around [`protocol::Connection`].
//!
//! The task owns the socket and the session state while the client is connected. It
//! reads and decodes packets, feeds them to the state machine, carries out the
//! machine's [`Event`]s on the shared [`Broker`], takes deliveries from its bounded
//! mailbox, and writes what the machine produced in one syscall per batch. Reads land
//! in a per-thread scratch buffer, so an idle connection holds no buffer of its own.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use roost_core::codec;
use roost_core::{Auth, ConnAck, Connect, DecodeError, Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::acl::{Access, Authorizer};
use crate::auth;
use crate::broker::{
    Attach, Broker, ClientInfo, ConnectionHandle, Control, Fanout, Handover, Mailbox, send_blocked,
};
use crate::mailbox;
use crate::metrics::{AuthFailure, DropReason, Limit};
use crate::protocol::{self, AckToken, ConnectPlan, ConnectRefusal, Connection, Event};
use crate::queues::{self, QueueTopic};
use crate::rate::PublishBudget;
use crate::scram;
use crate::session::{Delivery, Session};
use futures_util::stream::{FuturesUnordered, StreamExt};
use roost_core::Message;

/// Most deliveries taken from the mailbox before the output is flushed, so a busy
/// subscriber still reads its socket and answers pings.
const DELIVERY_BATCH: usize = 256;

/// Serves one accepted socket until it closes.
///
/// `peer_identity` is who the transport proved the client to be (the Common Name of a
/// verified TLS client certificate with `tls_use_cn_as_username`); when present it
/// replaces the username of the CONNECT, before authentication sees it.
pub fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    peer_identity: Option<String>,
    shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Every task is as large as the largest state its future can be in, for as long as
    // it lives. Everything up to an attached session (arguments included) runs boxed
    // and is freed once done, and so is the ending: an idle connection's task holds
    // only what serving its session needs.
    let start = Box::pin(start(broker, stream, peer, peer_identity, shutdown));
    let ip = peer.ip();
    async move {
        let Some((broker, mut io, mut attached)) = start.await else {
            return;
        };
        let (outcome, taken_over) = serve_session(&broker, &mut io, &mut attached).await;
        Box::pin(finish(&broker, &mut io, attached, outcome, taken_over)).await;
        broker.remove_connection(ip);
    }
}

/// Counts the connection and runs the handshake; `None` when the connection is over.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    peer_identity: Option<String>,
    shutdown: watch::Receiver<bool>,
) -> Option<(Arc<Broker>, Io<S>, Attached)> {
    let mut io = Io {
        stream,
        read_buf: BytesMut::new(),
    };
    if let Err(limit) = broker.try_add_connection(peer.ip()) {
        broker.metrics.limit_tripped(limit, 1);
        refuse_over_limit(&broker, &mut io, limit).await;
        return None;
    }
    broker.metrics.connection_accepted();
    match handshake(&broker, &mut io, peer, peer_identity).await {
        Ok(mut attached) => {
            // Shutdown reaches attached connections through their mailboxes; one that
            // was signalled before this session was in the map ends here.
            if *shutdown.borrow() {
                let conn = &mut attached.conn;
                conn.disconnect(
                    ReasonCode::ServerShuttingDown,
                    "server shutting down",
                    false,
                );
            }
            Some((broker, io, attached))
        }
        Err(why) => {
            debug!(%peer, "connection ended: {why}");
            broker.remove_connection(peer.ip());
            None
        }
    }
}

struct Io<S> {
    stream: S,
    /// Input not decoded yet: only ever the start of a packet still arriving. Empty
    /// (and holding no allocation) between packets, so an idle connection keeps no
    /// read buffer; reads land in the worker thread's [`SCRATCH`] first.
    read_buf: BytesMut,
}

/// Bytes a read into [`SCRATCH`] asks for.
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by all its connections: a read lands
    /// here and only the bytes that came are copied into the connection's buffer.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
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
            let read = if self.read_buf.is_empty() {
                // Nothing pending: wait without a buffer of our own (dropping the one
                // the last packets were decoded from, whose payloads keep their part).
                self.read_buf = BytesMut::new();
                std::future::poll_fn(|cx| self.poll_read_fresh(cx)).await
            } else {
                // The rest of a packet: read straight into the buffer that holds its
                // start.
                if self.read_buf.capacity() - self.read_buf.len() < 512 {
                    self.read_buf.reserve(4096);
                }
                self.stream.read_buf(&mut self.read_buf).await
            };
            match read {
                Ok(0) => return Ok(None),
                Ok(n) => broker.metrics.network_in(n),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Reads what has arrived into the scratch buffer and keeps a copy of just that.
    fn poll_read_fresh(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        let read_buf = &mut self.read_buf;
        poll_read_scratch(&mut self.stream, cx, |bytes| {
            read_buf.extend_from_slice(bytes)
        })
    }

    /// Half-closes and lingers briefly so the last bytes written reach the client.
    async fn close_gracefully(&mut self) {
        let _ = self.stream.shutdown().await;
        let _ = tokio::time::timeout(LINGER, self.discard_until_eof()).await;
    }

    /// Reads and drops input until the peer closes (bounded by the caller's timeout).
    async fn discard_until_eof(&mut self) {
        let stream = &mut self.stream;
        while let Ok(n) = std::future::poll_fn(|cx| poll_read_scratch(stream, cx, |_| {})).await {
            if n == 0 {
                break;
            }
        }
    }

    /// Writes all of `bytes`. A client that takes no byte for the broker's
    /// `slow_consumer_timeout` fails the write with [`std::io::ErrorKind::TimedOut`]:
    /// a peer that stopped reading must not hold its connection task forever.
    async fn write(&mut self, broker: &Broker, bytes: &[u8]) -> std::io::Result<()> {
        let stall = broker.slow_consumer_timeout();
        let stream = &mut self.stream;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n =
                with_stall_limit(stall, |cx| Pin::new(&mut *stream).poll_write(cx, rest)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            broker.metrics.network_out(n);
            rest = &rest[n..];
        }
        with_stall_limit(stall, |cx| Pin::new(&mut *stream).poll_flush(cx)).await
    }
}

/// Runs one write step, failing it with `TimedOut` if it makes no progress in `stall`.
/// The socket usually takes the bytes at once; only a step that has to wait pays for a
/// timer, boxed so that the idle task does not carry one.
async fn with_stall_limit<T>(
    stall: Option<Duration>,
    mut step: impl FnMut(&mut std::task::Context<'_>) -> Poll<std::io::Result<T>>,
) -> std::io::Result<T> {
    if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(step(cx))).await {
        return done;
    }
    let waiting = std::future::poll_fn(step);
    match stall {
        Some(limit) => Box::pin(tokio::time::timeout(limit, waiting))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
        None => waiting.await,
    }
}

/// Reads from `stream` into the thread's [`SCRATCH`] buffer and hands what came to
/// `take`; ready with the number of bytes read (0 at end of stream).
fn poll_read_scratch<S: AsyncRead + Unpin>(
    stream: &mut S,
    cx: &mut std::task::Context<'_>,
    take: impl FnOnce(&[u8]),
) -> Poll<std::io::Result<usize>> {
    let poll_into = |scratch: &mut [u8]| {
        let mut buf = tokio::io::ReadBuf::new(scratch);
        match Pin::new(stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                take(buf.filled());
                Poll::Ready(Ok(buf.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    };
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => poll_into(&mut scratch),
        // Only if a transport's read re-entered this function on the same thread.
        Err(_) => poll_into(&mut vec![0; 4096]),
    })
}

enum ReadError {
    Decode(DecodeError),
    Io(std::io::Error),
}

/// Reads the CONNECT of a connection over a connection limit and refuses it.
async fn refuse_over_limit<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    io: &mut Io<S>,
    limit: Limit,
) {
    let (code, why) = match limit {
        Limit::ConnectRate => (
            ReasonCode::ConnectionRateExceeded,
            "connection rate exceeded",
        ),
        Limit::ConnectionsPerIp => (
            ReasonCode::QuotaExceeded,
            "too many connections from this address",
        ),
        _ => (ReasonCode::QuotaExceeded, "too many connections"),
    };
    let timeout = Duration::from_secs(u64::from(broker.config.connect_timeout));
    if let Ok(Ok(Some(Packet::Connect(c)))) =
        tokio::time::timeout(timeout, io.read_packet(broker, None)).await
    {
        let mut out = BytesMut::new();
        protocol::write_refusal(c.protocol, code, why, &mut out);
        let _ = io.write(broker, &out).await;
        io.close_gracefully().await;
    }
    debug!("connection refused: {} reached", limit.label());
}

/// A client past its CONNECT: what the connection task serves until it ends.
struct Attached {
    conn: Connection,
    mailbox: Mailbox,
    qio: QueueIo,
    conn_id: u64,
}

/// Reads and answers the CONNECT, authenticates, and attaches the session (resumed,
/// taken over or new). Run boxed: its state is needed once, not for the connection's
/// whole life.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    io: &mut Io<S>,
    peer: SocketAddr,
    peer_identity: Option<String>,
) -> Result<Attached, String> {
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
                let _ = io.write(broker, &out).await;
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
    let mut plan = match plan {
        Ok(plan) => plan,
        Err(ConnectRefusal::Code(code, why)) => {
            if code == ReasonCode::BadAuthenticationMethod {
                broker.metrics.auth_failed(AuthFailure::BadMethod);
            }
            let mut out = BytesMut::new();
            protocol::write_refusal(connect.protocol, code, why, &mut out);
            let _ = io.write(broker, &out).await;
            io.close_gracefully().await;
            return Err(format!("CONNECT refused ({code:?}): {why}"));
        }
        Err(ConnectRefusal::Close(why)) => return Err(format!("CONNECT refused: {why}")),
    };
    let client_id = plan.client_id.clone();
    let scram_user = Box::pin(enhanced_authentication(
        broker,
        io,
        &mut connect,
        &mut plan,
        peer,
    ))
    .await?;
    // Rare, one-off paths are boxed so their state does not enlarge every idle
    // connection's task for its whole life.
    let access = match Box::pin(admit(
        broker,
        &connect,
        &client_id,
        peer,
        transport_authenticated || scram_user.is_some(),
    ))
    .await
    {
        Ok(access) => access,
        Err((code, why)) => {
            info!(client_id = %client_id, %peer, username = ?connect.username, "connection refused ({code:?}): {why}");
            let mut out = BytesMut::new();
            protocol::write_refusal(connect.protocol, code, why, &mut out);
            let _ = io.write(broker, &out).await;
            io.close_gracefully().await;
            return Err(format!("CONNECT refused ({code:?}): {why}"));
        }
    };
    let (mailbox_tx, mailbox) = mailbox::mailbox(broker.delivery_capacity());
    let qio = QueueIo {
        sender: mailbox_tx.downgrade(),
        produces: None,
        waiting: Default::default(),
    };
    let conn_id = broker.next_id();
    let handle = ConnectionHandle {
        id: conn_id,
        mailbox: mailbox_tx,
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
                    session.pending_will = delayed_will.map(Box::new);
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
    if let Some(user) = scram_user {
        conn.enable_reauthentication(user, broker.auth.scram());
    }
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

    Ok(Attached {
        conn,
        mailbox,
        qio,
        conn_id,
    })
}

/// Serves an attached session until the connection is to end. Returns why, and the
/// successor's reply channel when the client id was taken over.
async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    io: &mut Io<S>,
    attached: &mut Attached,
) -> (String, Option<tokio::sync::oneshot::Sender<Handover>>) {
    let mut taken_over = None;
    let mut fanout = Fanout::default();
    let mut budget = PublishBudget::new(
        broker.config.max_publish_rate,
        broker.config.max_publish_bytes_rate,
        Instant::now(),
    )
    .map(Box::new);
    let mut outbound_full_since = None;
    let outcome = loop {
        if let Err(e) = flush(
            broker,
            &mut attached.conn,
            io,
            &mut fanout,
            &mut attached.qio,
        )
        .await
        {
            break e;
        }
        if let Some(close) = attached.conn.close_reason() {
            break close.why.clone();
        }
        let room_needed = attached.qio.room_needed();
        // One timer serves the keep-alive, the end of a throttle and the slow-consumer
        // limit, so the idle connection's task stays small (and these temporaries end
        // before the await, so the task does not carry them).
        let (deadline, held_back) = {
            let throttle = budget
                .as_mut()
                .and_then(|b| b.throttle(Instant::now(), &broker.metrics));
            if let Some(until) = throttle {
                attached.conn.hold_reads_until(until);
            }
            let slow = slow_consumer_deadline(broker, &attached.conn, &mut outbound_full_since);
            let deadline = [attached.conn.next_deadline(), throttle, slow]
                .into_iter()
                .flatten()
                .min();
            (deadline, room_needed.is_some() || throttle.is_some())
        };
        // Set when the publishes read overflowed a subscriber's mailbox.
        let mut overflowed = false;
        tokio::select! {
            // A 3.x producer held back by a full queue, or a client over its publish
            // rate, is not read from meanwhile.
            read = io.read_packet(broker, Some(attached.conn.version())), if !held_back => match read {
                Ok(Some(packet)) => {
                    let now = Instant::now();
                    charge(&mut budget, &packet, now);
                    attached.conn.handle(packet, now);
                    // Decode what else is already buffered before writing back (a
                    // throttled client's rest waits in the buffer).
                    while attached.conn.close_reason().is_none() && !over_budget(&mut budget, now) {
                        match codec::decode(&mut io.read_buf, Some(attached.conn.version()), broker.limits.max_packet_size as usize) {
                            Ok(Some(p)) => {
                                overflowed |= run_events(broker, &mut attached.conn, &mut fanout, &mut attached.qio);
                                charge(&mut budget, &p, now);
                                attached.conn.handle(p, now);
                            }
                            Ok(None) => break,
                            Err(e) => {
                                overflowed |= run_events(broker, &mut attached.conn, &mut fanout, &mut attached.qio);
                                attached.conn.decode_error(&e);
                            }
                        }
                    }
                    overflowed |= run_events(broker, &mut attached.conn, &mut fanout, &mut attached.qio);
                }
                Ok(None) => break "socket closed by client".into(),
                Err(ReadError::Io(e)) => break format!("read error: {e}"),
                Err(ReadError::Decode(e)) => attached.conn.decode_error(&e),
            },
            // A full session queue leaves deliveries in the mailbox, so publishers
            // wait for this client instead of messages being dropped.
            Some(d) = attached.mailbox.recv(), if attached.conn.has_room() => {
                let now = Instant::now();
                attached.conn.deliver(d, now);
                for _ in 1..DELIVERY_BATCH {
                    if !attached.conn.has_room() {
                        break;
                    }
                    match attached.mailbox.try_recv() {
                        Some(d) => attached.conn.deliver(d, now),
                        None => break,
                    }
                }
            }
            Some((token, reason)) = next_produce(&mut attached.qio.produces), if attached.qio.produces.is_some() => {
                attached.conn.resolve_ack(token, reason);
                if let Some(produces) = attached.qio.produces.as_mut() {
                    // Produces of one commit resolve together: acknowledge them in one write.
                    while let Some(Some((token, reason))) =
                        futures_util::FutureExt::now_or_never(produces.next())
                    {
                        attached.conn.resolve_ack(token, reason);
                    }
                }
                if attached.qio.produces.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    attached.qio.produces = None;
                }
            }
            _ = wait_for_room(room_needed), if held_back => attached.qio.start_waiting(),
            Some(request) = attached.mailbox.recv_control() => match request {
                Control::TakeOver { reply } => {
                    attached.conn.disconnect(ReasonCode::SessionTakenOver, "session taken over", true);
                    taken_over = Some(reply);
                }
                Control::Shutdown => {
                    attached.conn.disconnect(ReasonCode::ServerShuttingDown, "server shutting down", false);
                }
                Control::Kick => {
                    info!(client_id = %attached.conn.client_id(), "disconnected by an administrator");
                    attached.conn.disconnect(
                        ReasonCode::AdministrativeAction,
                        "disconnected by an administrator",
                        true,
                    );
                }
            },
            _ = sleep_until(deadline) => {
                let now = Instant::now();
                if slow_consumer_deadline(broker, &attached.conn, &mut outbound_full_since)
                    .is_some_and(|t| now >= t)
                {
                    broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
                    info!(client_id = %attached.conn.client_id(), "disconnected: slow consumer (outbound buffer full for slow_consumer_timeout_ms)");
                    attached.conn.disconnect(
                        ReasonCode::QuotaExceeded,
                        "slow consumer: outbound buffer full",
                        true,
                    );
                }
                attached.conn.tick(now);
            }
        }
        if overflowed {
            // QoS 0 was dropped for a full mailbox: let the subscribers these publishes
            // woke run before reading more. A client that writes faster than roost
            // routes would otherwise keep its worker for a whole coop budget (128 reads,
            // tens of thousands of publishes) while its subscribers wait to be
            // scheduled, and most of what it sends would be dropped. The publisher
            // waits for nothing but its next turn.
            tokio::task::yield_now().await;
        }
    };
    (outcome, taken_over)
}

/// Flushes what is left, hands the session on, and closes the socket.
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    io: &mut Io<S>,
    attached: Attached,
    outcome: String,
    taken_over: Option<tokio::sync::oneshot::Sender<Handover>>,
) {
    let Attached {
        mut conn,
        mailbox,
        mut qio,
        conn_id,
    } = attached;
    let client_id = conn.client_id().clone();
    let mut fanout = Fanout::default();
    let _ = flush(broker, &mut conn, io, &mut fanout, &mut qio).await;
    // Closing with unread input makes the kernel send RST, which can destroy the
    // DISCONNECT we just wrote before the client reads it. So when roost ends the
    // connection, it half-closes, settles the session, then reads and discards what
    // the client still sends, for a short while.
    let linger = conn.close_reason().is_some_and(|c| !c.by_client);
    let _ = io.stream.shutdown().await;
    debug!(client_id = %client_id, "disconnected: {outcome}");
    let (session, will) = conn.finish();
    end_session(
        broker, &client_id, conn_id, session, will, taken_over, mailbox,
    )
    .await;
    if linger {
        let _ = tokio::time::timeout(LINGER, io.discard_until_eof()).await;
    }
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
    if !transport_authenticated
        && let Err((code, why)) = broker.auth.authenticate(connect, client_id, peer).await
    {
        broker.metrics.auth_failed(AuthFailure::from_code(code));
        return Err((code, why));
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

/// Runs the enhanced authentication a v5 CONNECT asks for with its Authentication Method
/// (SCRAM-SHA-256: `plan_connect` refused other methods), bounded by `connect_timeout`.
/// Returns the user the client proved to be (`None` when it asked for no method), who
/// then becomes the CONNECT's username, and puts the server-final-message in `plan` for
/// the CONNACK. On failure the refusal is written and the connection closed.
async fn enhanced_authentication<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    io: &mut Io<S>,
    connect: &mut Connect,
    plan: &mut ConnectPlan,
    peer: SocketAddr,
) -> Result<Option<String>, String> {
    if !connect.protocol.is_v5() || connect.properties.authentication_method.is_none() {
        return Ok(None);
    }
    let timeout = Duration::from_secs(u64::from(broker.config.connect_timeout));
    let mut scram_user = None;
    let exchange = scram_exchange(broker, io, connect, &mut scram_user);
    let outcome = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(AuthEnd::Refuse(
                ReasonCode::NotAuthorized,
                "authentication not completed within connect_timeout".into(),
                None,
            ))
        })
        .and_then(|done| match connect.username.as_deref() {
            // The CONNECT's username (or the certificate's identity) must be the SCRAM user.
            Some(u) if u != done.username => Err(AuthEnd::Refuse(
                ReasonCode::NotAuthorized,
                "the CONNECT username is not the SCRAM user".into(),
                None,
            )),
            _ => Ok(done),
        });
    let (code, why, server_error) = match outcome {
        Ok(done) => {
            connect.username = Some(done.username.clone());
            plan.authentication_data = Some(done.server_final.into());
            return Ok(Some(done.username));
        }
        Err(AuthEnd::Close(why)) => return Err(why),
        Err(AuthEnd::Refuse(code, why, server_error)) => (code, why, server_error),
    };
    let username = scram_user.as_ref().or(connect.username.as_ref());
    info!(client_id = %plan.client_id, %peer, ?username, "connection refused ({code:?}): {why}");
    broker.metrics.auth_failed(AuthFailure::from_code(code));
    let mut ack = ConnAck {
        code,
        ..ConnAck::default()
    };
    ack.properties.reason_string = Some(why.clone());
    if let Some(e) = server_error {
        // RFC 5802's server-error, for a SCRAM client library to report.
        ack.properties.authentication_method = Some(scram::METHOD.to_owned());
        ack.properties.authentication_data = Some(format!("e={e}").into_bytes().into());
    }
    let mut out = BytesMut::new();
    let _ = codec::encode(&Packet::ConnAck(ack), ProtocolVersion::V5, &mut out);
    let _ = io.write(broker, &out).await;
    io.close_gracefully().await;
    Err(format!("CONNECT refused ({code:?}): {why}"))
}

/// How an enhanced authentication failed.
enum AuthEnd {
    /// Refuse with this CONNACK code, reason string and SCRAM server-error.
    Refuse(ReasonCode, String, Option<&'static str>),
    /// Close without a word (the client left, or the socket failed).
    Close(String),
}

/// The SCRAM-SHA-256 exchange between CONNECT and CONNACK: AUTH 0x18 with the
/// server-first-message, then the client's AUTH 0x18 with its client-final-message.
/// `user` learns the username the client claims, for the log.
async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    io: &mut Io<S>,
    connect: &Connect,
    user: &mut Option<String>,
) -> Result<scram::Success, AuthEnd> {
    let refusal = |e: scram::ScramError| {
        AuthEnd::Refuse(e.reason_code(), e.to_string(), Some(e.server_error()))
    };
    let credentials = broker.auth.scram();
    let client_first = connect.properties.authentication_data.as_deref();
    let (exchange, server_first) =
        scram::Exchange::start(client_first.unwrap_or(&[]), &*credentials).map_err(refusal)?;
    *user = Some(exchange.username().to_owned());
    let mut auth = Auth {
        reason: ReasonCode::ContinueAuthentication,
        ..Auth::default()
    };
    auth.properties.authentication_method = Some(scram::METHOD.to_owned());
    auth.properties.authentication_data = Some(server_first.into());
    let mut out = BytesMut::new();
    let _ = codec::encode(&Packet::Auth(auth), ProtocolVersion::V5, &mut out);
    io.write(broker, &out)
        .await
        .map_err(|e| AuthEnd::Close(format!("write error: {e}")))?;
    let protocol_error = |why: &str| AuthEnd::Refuse(ReasonCode::ProtocolError, why.into(), None);
    match io.read_packet(broker, Some(ProtocolVersion::V5)).await {
        Ok(Some(Packet::Auth(a)))
            if a.reason == ReasonCode::ContinueAuthentication
                && a.properties.authentication_method.as_deref() == Some(scram::METHOD) =>
        {
            let client_final = a.properties.authentication_data.as_deref();
            exchange
                .finish(client_final.unwrap_or(&[]))
                .map_err(refusal)
        }
        Ok(Some(Packet::Auth(_))) => Err(protocol_error(
            "AUTH out of sequence or with another authentication method",
        )),
        Ok(Some(Packet::Disconnect(_)) | None) => {
            Err(AuthEnd::Close("client left during authentication".into()))
        }
        Ok(Some(_)) => Err(protocol_error("only AUTH may answer AUTH before CONNACK")),
        Err(ReadError::Decode(e)) => Err(AuthEnd::Refuse(e.reason_code(), e.to_string(), None)),
        Err(ReadError::Io(e)) => Err(AuthEnd::Close(format!("read error: {e}"))),
    }
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
    mut mailbox: Mailbox,
) {
    // Queue messages this connection held go back to their queues now, for another
    // consumer (or this client when it returns); the session does not keep them.
    broker.queues.leave_all(client_id);
    session.drop_queue_deliveries();
    let (mut session, will, reply) = match taken_over {
        Some(reply) => (session, will, reply),
        None => match broker.detach(conn_id, session, will, &mut mailbox) {
            None => return,
            // Taken over while we were ending: the successor waits for the session.
            Some((session, will)) => loop {
                match mailbox.recv_control().await {
                    Some(Control::TakeOver { reply }) => break (session, will, reply),
                    // Already ending.
                    Some(Control::Kick | Control::Shutdown) => {}
                    None => {
                        broker.discard_session(session);
                        return;
                    }
                }
            },
        },
    };
    // The map no longer holds our sender: drain what was routed to us before.
    mailbox.close();
    while let Some(d) = mailbox.recv().await {
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
        session.pending_will = delayed_will.map(Box::new);
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
        // Boxed: rare, and its state would otherwise enlarge every connection's task.
        ops.extend(
            Box::pin(send_blocked(
                blocked,
                broker.delivery_wait(),
                &broker.metrics,
            ))
            .await,
        );
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
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        broker
            .metrics
            .sent(qos, counts.sent[i], counts.sent_bytes[i]);
    }
    let m = &broker.metrics;
    m.dropped(DropReason::SessionQueueFull, counts.dropped_queue_full);
    m.limit_tripped(Limit::QueuedBytes, counts.dropped_over_bytes);
    m.limit_tripped(Limit::SubscriptionsPerClient, counts.subscriptions_refused);
    if conn.has_output() {
        let out = conn.take_output();
        if let Err(e) = io.write(broker, &out).await {
            if e.kind() == std::io::ErrorKind::TimedOut {
                broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
                info!(client_id = %conn.client_id(), "disconnected: slow consumer (took no data for slow_consumer_timeout_ms)");
                return Err("slow consumer: the socket took no data".into());
            }
            return Err(format!("write error: {e}"));
        }
    }
    Ok(())
}

/// Carries out what the protocol asked of the broker. True when a publish overflowed
/// a subscriber's mailbox (see [`Broker::publish`]).
fn run_events(
    broker: &Arc<Broker>,
    conn: &mut Connection,
    fanout: &mut Fanout,
    qio: &mut QueueIo,
) -> bool {
    let events: Vec<Event> = conn.take_events().collect();
    if events.is_empty() {
        return false;
    }
    let mut overflowed = false;
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
                broker.metrics.received(msg.qos, msg.payload.len());
                overflowed |= broker.publish(msg, fanout);
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
                broker.metrics.received(msg.qos, msg.payload.len());
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
    overflowed
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

/// What a connection needs for `$queue/` traffic: a weak handle on its own mailbox
/// (for the queues' sinks) and the produces whose acknowledgements wait.
struct QueueIo {
    sender: mailbox::WeakSender<Delivery, Control>,
    /// Polled by the connection task itself (no task per produce); created on the
    /// first produce and dropped when none is left, so a connection that does not
    /// produce to queues holds none.
    produces: Option<FuturesUnordered<ProduceAck>>,
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
                .get_or_insert_with(FuturesUnordered::new)
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
        // Boxed: only a held-back 3.x producer waits here.
        Some((queue, bytes)) => Box::pin(queue.wait_for_room(bytes)).await,
        None => std::future::pending().await,
    }
}

async fn next_produce(
    produces: &mut Option<FuturesUnordered<ProduceAck>>,
) -> Option<(AckToken, ReasonCode)> {
    match produces {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}

/// Charges a PUBLISH read from the client against its publish budget.
fn charge(budget: &mut Option<Box<PublishBudget>>, packet: &Packet, now: Instant) {
    if let (Some(b), Packet::Publish(p)) = (budget, packet) {
        b.spend(p.payload.len(), now);
    }
}

/// True when the client has published past its rate and must wait.
fn over_budget(budget: &mut Option<Box<PublishBudget>>, now: Instant) -> bool {
    budget
        .as_mut()
        .is_some_and(|b| b.throttled_until(now).is_some())
}

/// When the client is to be disconnected as a slow consumer, if its outbound buffer
/// is full now: its session queue is at its bound because it does not acknowledge
/// what is in flight, so it takes no more deliveries and publishers wait on it or drop
/// for it. Any progress (an acknowledgement that makes room) restarts the clock.
fn slow_consumer_deadline(
    broker: &Broker,
    conn: &Connection,
    full_since: &mut Option<Instant>,
) -> Option<Instant> {
    let limit = broker.slow_consumer_timeout()?;
    if conn.has_room() {
        *full_since = None;
        return None;
    }
    Some(*full_since.get_or_insert_with(Instant::now) + limit)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::persist::Store;
    use roost_queue::Queues;

    fn broker(dir: &std::path::Path) -> Arc<Broker> {
        let config = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        let (store, _) = Store::open(
            &dir.join("state"),
            config.storage.durability,
            Duration::from_millis(config.storage.sync_interval_ms),
        )
        .expect("store opens");
        let (queues, _) =
            Queues::open(dir.join("queues"), config.queue_defaults.clone(), true).expect("queues");
        let auth = crate::auth::Auth::from_config(&config).expect("auth");
        Broker::new(config, store, auth, queues)
    }

    /// An idle client costs its task's future (plus small heap state): what is only
    /// needed for the handshake, a takeover or a slow subscriber is boxed while used,
    /// not carried for the connection's whole life.
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = broker(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (_tx, shutdown) = watch::channel(false);
        let task = serve(broker, stream, addr, None, shutdown);
        let size = std::mem::size_of_val(&task);
        // Was 4.5 KB with the CONNECT handshake, wills and slow-path futures inline;
        // 1,168 bytes after they were boxed, 1,264 once the overload limits (publish
        // budget, slow-consumer clock, peer address for the per-address count) and
        // SCRAM re-authentication state joined. Growth past this is a regression.
        assert!(size <= 1264, "connection task is {size} bytes");
    }
}
