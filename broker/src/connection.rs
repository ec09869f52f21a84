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
use std::sync::atomic::Ordering;
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
use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, StreamExt};
use roost_core::Message;
use roost_engine::broker::{
    Attach, Broker, ClientInfo, ConnectionHandle, Control, Fanout, Handover, Mailbox, Waits,
    send_blocked,
};
use roost_engine::mailbox;
use roost_engine::metrics::{AuthFailure, DropReason, Limit};
use roost_engine::protocol::{self, AckToken, ConnectPlan, ConnectRefusal, Connection, Event};
use roost_engine::queues::{self, QueueTopic};
use roost_engine::rate::PublishBudget;
use roost_engine::scram;
use roost_engine::session::{Delivery, Session};

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
    // only what serving its session needs. `then` keeps the boxed start and the served
    // connection in one place (an async block would keep both, side by side).
    let start = Box::pin(start(broker, stream, peer, peer_identity, shutdown));
    futures_util::FutureExt::then(start, |mut served| async move {
        // Used in place: moving it out would store it twice.
        let Some(s) = served.as_mut() else {
            return;
        };
        let (outcome, taken_over) = serve_session(s).await;
        let ending = served
            .take()
            .map(|s| Box::pin(finish(s, outcome, taken_over)));
        if let Some(ending) = ending {
            ending.await;
        }
    })
}

/// An attached connection: what its task holds while it serves the session.
///
/// It holds the connection's count (see [`Broker::try_add_connection`]): dropping it
/// gives the count back, however the task ends, a panic or an abort included. (The
/// count lives here rather than in a guard of its own, which would add its bytes to
/// every idle connection's task.)
struct Served<S> {
    broker: Arc<Broker>,
    io: Io<S>,
    attached: Attached,
}

impl<S> Drop for Served<S> {
    fn drop(&mut self) {
        self.broker.remove_connection(self.attached.info.peer.ip());
    }
}

/// A connection counted by [`Broker::try_add_connection`] before it is [`Served`]:
/// dropping it gives the count back, so a handshake that fails, times out or panics
/// never keeps a `max_connections` (or per-address) slot.
struct Counted<'a> {
    broker: &'a Broker,
    ip: std::net::IpAddr,
}

impl Counted<'_> {
    /// The count passes to the [`Served`] connection.
    fn into_served(self) {
        std::mem::forget(self);
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.broker.remove_connection(self.ip);
    }
}

/// Counts the connection and runs the handshake; `None` when the connection is over.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    peer_identity: Option<String>,
    shutdown: watch::Receiver<bool>,
) -> Option<Served<S>> {
    let mut io = Io {
        stream,
        read_buf: BytesMut::new(),
    };
    if let Err(limit) = broker.try_add_connection(peer.ip()) {
        broker.metrics.limit_tripped(limit, 1);
        refuse_over_limit(&broker, &mut io, limit).await;
        return None;
    }
    let counted = Counted {
        broker: &broker,
        ip: peer.ip(),
    };
    broker.metrics.connection_accepted();
    match handshake(&broker, &mut io, peer, peer_identity).await {
        Ok(mut attached) => {
            counted.into_served();
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
            Some(Served {
                broker,
                io,
                attached,
            })
        }
        Err(why) => {
            debug!(%peer, "connection ended: {why}");
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
    ///
    /// A plain function around a poll (like the other futures an idle connection waits
    /// on): an `async fn` would store its arguments twice in every idle task.
    fn read_packet<'a>(
        &'a mut self,
        broker: &'a Broker,
        version: Option<roost_core::ProtocolVersion>,
    ) -> impl Future<Output = Result<Option<Packet>, ReadError>> + 'a {
        std::future::poll_fn(move |cx| self.poll_read_packet(cx, broker, version))
    }

    fn poll_read_packet(
        &mut self,
        cx: &mut std::task::Context<'_>,
        broker: &Broker,
        version: Option<roost_core::ProtocolVersion>,
    ) -> Poll<Result<Option<Packet>, ReadError>> {
        loop {
            let max = broker.limits.max_packet_size as usize;
            if let Some(p) =
                codec::decode(&mut self.read_buf, version, max).map_err(ReadError::Decode)?
            {
                return Poll::Ready(Ok(Some(p)));
            }
            let read = if self.read_buf.is_empty() {
                // Nothing pending: wait without a buffer of our own (dropping the one
                // the last packets were decoded from, whose payloads keep their part).
                self.read_buf = BytesMut::new();
                std::task::ready!(self.poll_read_fresh(cx))
            } else {
                // The rest of a packet: read straight into the buffer that holds its
                // start.
                if self.read_buf.capacity() - self.read_buf.len() < 512 {
                    self.read_buf.reserve(4096);
                }
                // The read_buf future keeps no state between polls.
                let read = self.stream.read_buf(&mut self.read_buf);
                std::task::ready!(std::pin::pin!(read).poll(cx))
            };
            match read {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(n) => broker.metrics.network_in(n),
                Err(e) => return Poll::Ready(Err(ReadError::Io(e))),
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
        self.shut_down().await;
        let _ = tokio::time::timeout(LINGER, self.discard_until_eof()).await;
    }

    /// Half-closes the stream, waiting at most [`LINGER`] for the transport to do so.
    async fn shut_down(&mut self) {
        let _ = tokio::time::timeout(LINGER, self.stream.shutdown()).await;
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

    /// Writes all of `bytes`. A client that does not take the next [`WRITE_PROGRESS`]
    /// bytes within the broker's `slow_consumer_timeout` fails the write with
    /// [`std::io::ErrorKind::TimedOut`]: a peer that stopped reading, or reads a few
    /// bytes now and then to look alive, must not hold its connection task (which
    /// meanwhile answers no takeover) for ever.
    ///
    /// One poll function rather than an `async fn` (which would store its arguments
    /// twice): this future is part of every connection task's size. The socket usually
    /// takes it all at once; only a write that has to wait pays for a timer, boxed.
    /// (`bytes` is a `BytesMut` by reference: 8 bytes in the waiting task, a slice 16.)
    fn write<'a>(
        &'a mut self,
        broker: &'a Broker,
        bytes: &'a BytesMut,
    ) -> impl Future<Output = std::io::Result<()>> + 'a {
        let mut written = 0;
        let mut stall_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(move |cx| {
            let before = written;
            if let Poll::Ready(done) = self.poll_write_all(cx, broker, bytes, &mut written) {
                return Poll::Ready(done);
            }
            if written / WRITE_PROGRESS != before / WRITE_PROGRESS {
                // Another WRITE_PROGRESS bytes taken: the stall clock starts again.
                stall_timer = None;
            }
            let Some(limit) = broker.slow_consumer_timeout() else {
                return Poll::Pending;
            };
            let timer = stall_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    /// Writes as much of `bytes[*written..]` as the socket takes now, then flushes.
    fn poll_write_all(
        &mut self,
        cx: &mut std::task::Context<'_>,
        broker: &Broker,
        bytes: &[u8],
        written: &mut usize,
    ) -> Poll<std::io::Result<()>> {
        while *written < bytes.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    broker.metrics.network_out(n);
                    *written += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.stream).poll_flush(cx)
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

/// Longest wait for the CONNECT of a connection that is refused anyway (it needs the
/// CONNECT's protocol version to be told why, in a CONNACK it can read).
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Refused connections waiting for their CONNECT at once; past it, further ones are
/// closed without a CONNACK. Refused connections are not counted by
/// `max_connections`, so this is what bounds the sockets and tasks a flood of them holds.
const REFUSALS_IN_PROGRESS: usize = 256;

/// Reads the CONNECT of a connection over a connection limit, refuses it, and closes
/// at once: a refused connection costs a task and a socket for at most
/// [`REFUSAL_WAIT`], and at most [`REFUSALS_IN_PROGRESS`] of them at a time.
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
    let Some(_refusing) = broker.start_refusal(REFUSALS_IN_PROGRESS) else {
        debug!("connection closed unanswered: {} reached", limit.label());
        return;
    };
    let wait = REFUSAL_WAIT.min(Duration::from_secs(u64::from(
        broker.limits.connect_timeout,
    )));
    if let Ok(Ok(Some(Packet::Connect(c)))) =
        tokio::time::timeout(wait, io.read_packet(broker, None)).await
    {
        let mut out = BytesMut::new();
        protocol::write_refusal(c.protocol, code, why, &mut out);
        let _ = tokio::time::timeout(wait, io.write(broker, &out)).await;
        io.shut_down().await;
    }
    debug!("connection refused: {} reached", limit.label());
}

/// A client past its CONNECT: what the connection task serves until it ends.
struct Attached {
    conn: Connection,
    mailbox: Mailbox,
    qio: QueueIo,
    /// The connection's id and peer address, among others.
    info: Arc<ClientInfo>,
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
    let timeout = Duration::from_secs(u64::from(broker.limits.connect_timeout));
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
    let qio = QueueIo::new(mailbox_tx.downgrade());
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
    let handle = ConnectionHandle {
        mailbox: mailbox_tx,
        info: info.clone(),
    };
    let previous = match broker.attach(&client_id, plan.clean_start, handle) {
        Attach::Refused => {
            info!(client_id = %client_id, %peer, "connection refused: max_sessions reached");
            let mut out = BytesMut::new();
            let why = "too many sessions";
            protocol::write_refusal(connect.protocol, ReasonCode::QuotaExceeded, why, &mut out);
            let _ = io.write(broker, &out).await;
            io.close_gracefully().await;
            return Err(format!("CONNECT refused: {why}"));
        }
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
            held: None,
        })
        .collect();
    for event in queue_subs {
        queue_subscription(broker, &mut conn, &qio, &event);
    }

    Ok(Attached {
        conn,
        mailbox,
        qio,
        info,
    })
}

/// Serves an attached session until the connection is to end. Returns why, and the
/// successor's reply channel when the client id was taken over.
// Not an `async fn`: that would store its argument twice in every connection task.
#[allow(clippy::manual_async_fn)]
fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
    served: &mut Served<S>,
) -> impl Future<Output = (String, Option<tokio::sync::oneshot::Sender<Handover>>)> + '_ {
    async move {
        // Fields are reached through `served` (rather than bound to names of their own,
        // which the task would store besides).
        let mut budget = PublishBudget::new(
            served.broker.limits.max_publish_rate,
            served.broker.limits.max_publish_bytes_rate,
            Instant::now(),
        )
        .map(Box::new);
        let mut outbound_full_since = None;
        if let Err(e) = flush(served, &mut Fanout::default()).await {
            return (e, None);
        }
        loop {
            if let Some(close) = served.attached.conn.close_reason() {
                break (close.why.clone(), None);
            }

            // One timer serves the keep-alive, the end of a throttle and the slow-consumer
            // limit, so the idle connection's task stays small (and these temporaries end
            // before the await, so the task does not carry them).
            let (deadline, held_back) = {
                let throttle = budget
                    .as_mut()
                    .and_then(|b| b.throttle(Instant::now(), &served.broker.metrics));
                if let Some(until) = throttle {
                    served.attached.conn.hold_reads_until(until);
                }
                let slow = slow_consumer_deadline(
                    &served.broker,
                    &served.attached.conn,
                    &mut outbound_full_since,
                );
                // Retained messages still to send for a new subscription: at once.
                let retained = served.attached.conn.wants_retained().then(Instant::now);
                let deadline = [
                    served.attached.conn.next_deadline(),
                    throttle,
                    slow,
                    retained,
                ]
                .into_iter()
                .flatten()
                .min();
                (
                    deadline,
                    served.attached.qio.is_held_back()
                        || throttle.is_some()
                        || served.attached.conn.inbound_full(),
                )
            };
            // What woke the task is handled after the wait, so that what handling it needs
            // (the fan-out of a publish) is not carried by the waiting task.
            // Set only after the wait, so the waiting task does not carry it; and what
            // woke the task is in a block of its own, gone before the flush.
            let mut fanout;
            {
                let room_needed = served.attached.qio.room_needed();
                let woke = tokio::select! {
                    // A 3.x producer held back by a full queue, or a client over its publish
                    // rate, is not read from meanwhile.
                    read = served.io.read_packet(&served.broker, Some(served.attached.conn.version())), if !held_back => Woke::Read(read),
                    // A full session queue leaves deliveries in the mailbox, so publishers
                    // wait for this client instead of messages being dropped.
                    Some(d) = served.attached.mailbox.recv(), if served.attached.conn.has_room() => Woke::Delivery(d),
                    Some((token, reason)) = next_produce(&mut served.attached.qio), if served.attached.qio.is_producing() => Woke::Produced(token, reason),
                    _ = wait_for_room(room_needed), if held_back => Woke::Room,
                    Some(request) = served.attached.mailbox.recv_control() => Woke::Control(request),
                    _ = sleep_until(deadline) => Woke::Timer,
                };
                fanout = Fanout::default();
                match woke {
                    Woke::Read(read) => match read {
                        Ok(Some(packet)) => {
                            let now = Instant::now();
                            charge(&mut budget, &packet, now);
                            served.attached.conn.handle(packet, now);
                            // Decode what else is already buffered before writing back (a
                            // throttled client's rest waits in the buffer).
                            while served.attached.conn.close_reason().is_none()
                                && !over_budget(&mut budget, now)
                                && !served.attached.conn.inbound_full()
                            {
                                match codec::decode(
                                    &mut served.io.read_buf,
                                    Some(served.attached.conn.version()),
                                    served.broker.limits.max_packet_size as usize,
                                ) {
                                    Ok(Some(p)) => {
                                        run_attached(
                                            &served.broker,
                                            &mut served.attached,
                                            &mut fanout,
                                        );
                                        charge(&mut budget, &p, now);
                                        served.attached.conn.handle(p, now);
                                    }
                                    Ok(None) => break,
                                    Err(e) => {
                                        run_attached(
                                            &served.broker,
                                            &mut served.attached,
                                            &mut fanout,
                                        );
                                        served.attached.conn.decode_error(&e);
                                    }
                                }
                            }
                            run_attached(&served.broker, &mut served.attached, &mut fanout);
                        }
                        Ok(None) => break ("socket closed by client".into(), None),
                        Err(ReadError::Io(e)) => break (format!("read error: {e}"), None),
                        Err(ReadError::Decode(e)) => served.attached.conn.decode_error(&e),
                    },
                    Woke::Delivery(d) => {
                        let now = Instant::now();
                        served.attached.conn.deliver(d, now);
                        for _ in 1..DELIVERY_BATCH {
                            if !served.attached.conn.has_room()
                                || served.attached.conn.output_len() >= DELIVERY_BATCH_BYTES
                            {
                                break;
                            }
                            match served.attached.mailbox.try_recv() {
                                Some(d) => served.attached.conn.deliver(d, now),
                                None => break,
                            }
                        }
                    }
                    Woke::Produced(token, reason) => {
                        served.attached.conn.resolve_ack(token, reason);
                        // Produces of one commit resolve together: acknowledge them in one write.
                        while let Some((token, reason)) = served.attached.qio.next_produced() {
                            served.attached.conn.resolve_ack(token, reason);
                        }
                        served.attached.qio.tidy();
                    }
                    Woke::Room => served.attached.qio.start_waiting(),
                    Woke::Control(request) => match request {
                        Control::TakeOver { reply } => {
                            served.attached.conn.disconnect(
                                ReasonCode::SessionTakenOver,
                                "session taken over",
                                true,
                            );
                            // The loop's flush is skipped: `finish` writes the
                            // DISCONNECT before the session is handed over.
                            break ("session taken over".into(), Some(reply));
                        }
                        Control::Shutdown => {
                            served.attached.conn.disconnect(
                                ReasonCode::ServerShuttingDown,
                                "server shutting down",
                                false,
                            );
                        }
                        Control::Kick => {
                            info!(client_id = %served.attached.conn.client_id(), "disconnected by an administrator");
                            served.attached.conn.disconnect(
                                ReasonCode::AdministrativeAction,
                                "disconnected by an administrator",
                                true,
                            );
                        }
                    },
                    Woke::Timer => {
                        let now = Instant::now();
                        if slow_consumer_deadline(
                            &served.broker,
                            &served.attached.conn,
                            &mut outbound_full_since,
                        )
                        .is_some_and(|t| now >= t)
                        {
                            served.broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
                            info!(client_id = %served.attached.conn.client_id(), "disconnected: slow consumer (outbound buffer full for slow_consumer_timeout_ms)");
                            served.attached.conn.disconnect(
                                ReasonCode::QuotaExceeded,
                                "slow consumer: outbound buffer full",
                                true,
                            );
                        }
                        served.attached.conn.tick(now);
                        read_retained(&served.broker, &mut served.attached.conn, now);
                    }
                }
            }
            if let Err(e) = flush(served, &mut fanout).await {
                break (e, None);
            }
        }
    }
}

/// What ended a connection task's wait. Short-lived (handled right after the wait,
/// never held across one), so its size costs nothing and boxing a packet would.
#[allow(clippy::large_enum_variant)]
enum Woke {
    Read(Result<Option<Packet>, ReadError>),
    Delivery(Delivery),
    Produced(AckToken, ReasonCode),
    Room,
    Control(Control),
    Timer,
}

/// Flushes what is left, hands the session on, closes the socket, and (dropping
/// `served`) uncounts the connection.
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    mut served: Served<S>,
    outcome: String,
    taken_over: Option<tokio::sync::oneshot::Sender<Handover>>,
) {
    let mut fanout = Fanout::default();
    let _ = flush(&mut served, &mut fanout).await;
    let client_id = served.attached.conn.client_id().clone();
    // Closing with unread input makes the kernel send RST, which can destroy the
    // DISCONNECT we just wrote before the client reads it. So when roost ends the
    // connection, it half-closes, settles the session, then reads and discards what
    // the client still sends, for a short while.
    let linger = served
        .attached
        .conn
        .close_reason()
        .is_some_and(|c| !c.by_client);
    served.io.shut_down().await;
    debug!(client_id = %client_id, "disconnected: {outcome}");
    if served
        .attached
        .conn
        .close_reason()
        .is_some_and(|c| c.reason == ReasonCode::ReceiveMaximumExceeded)
    {
        served
            .broker
            .metrics
            .limit_tripped(Limit::InboundInflight, 1);
    }
    let (session, will) = served.attached.conn.finish();
    end_session(
        &served.broker,
        &client_id,
        served.attached.info.id,
        session,
        will,
        taken_over,
        &mut served.attached.mailbox,
    )
    .await;
    if linger {
        let _ = tokio::time::timeout(LINGER, served.io.discard_until_eof()).await;
    }
    // Dropping `served` gives the connection's count back.
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
        if code == ReasonCode::ServerBusy {
            broker.metrics.limit_tripped(Limit::AuthWaiting, 1);
        } else {
            broker.metrics.auth_failed(AuthFailure::from_code(code));
        }
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
    let timeout = Duration::from_secs(u64::from(broker.limits.connect_timeout));
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

/// How long a connection that roost closed keeps reading (and discarding) input; also
/// the longest wait for a transport's own close (a TLS close_notify or a WebSocket
/// close frame to a peer that reads nothing would wait for ever).
const LINGER: Duration = Duration::from_secs(1);

/// Bytes a client must take within `slow_consumer_timeout` to count as progressing.
const WRITE_PROGRESS: usize = 16 * 1024;

/// Output past which a batch of deliveries stops, to be written before more are taken:
/// 256 deliveries of large messages would otherwise be encoded at once.
const DELIVERY_BATCH_BYTES: usize = 256 * 1024;

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
    mailbox: &mut Mailbox,
) {
    // Queue messages this connection held go back to their queues now, for another
    // consumer (or this client when it returns); the session does not keep them.
    broker.queues.leave_all(client_id);
    session.drop_queue_deliveries();
    let (mut session, will, reply) = match taken_over {
        Some(reply) => (session, will, reply),
        None => match broker.detach(conn_id, session, will, mailbox) {
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
        // Queue deliveries went back to their queues above (and were built for this
        // connection's protocol version): the session does not keep them.
        if d.queue.is_none() {
            session.enqueue_offline(d, broker.limits.max_queued());
        }
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
#[allow(clippy::manual_async_fn)]
fn flush<'a, S: AsyncRead + AsyncWrite + Unpin>(
    served: &'a mut Served<S>,
    fanout: &'a mut Fanout,
) -> impl Future<Output = Result<(), String>> + 'a {
    // An async block, not an `async fn`, which would store its arguments twice; and
    // fields are reached through `served`, not bound to names the task would store.
    async move {
        run_attached(&served.broker, &mut served.attached, fanout);
        // (A block of its own, so the writes' list is gone while the output is written.)
        {
            let mut ops = std::mem::take(&mut fanout.ops);
            if let Some(waits) = fanout.waits.take() {
                // Boxed: rare, and its state would otherwise enlarge every connection's
                // task. Copies into capturing queues are acknowledged only once stored;
                // with slow subscribers, the acknowledgements wait until they have room.
                let broker = &served.broker;
                ops.extend(
                    Box::pin(async move {
                        let Waits {
                            blocked, captures, ..
                        } = *waits;
                        for capture in captures {
                            capture.await;
                        }
                        if blocked.is_empty() {
                            return Vec::new();
                        }
                        send_blocked(blocked, broker.delivery_wait(), &broker.metrics).await
                    })
                    .await,
                );
            }
            // Routing's writes first: the session's own journal may finish what routing began.
            ops.append(&mut served.attached.conn.take_store_ops());
            if !ops.is_empty() {
                let ticket = served.broker.store().submit(ops);
                if let Err(e) = ticket.wait().await {
                    tracing::error!(client_id = %served.attached.conn.client_id(), "cannot store session state: {e}");
                    // The acknowledgements in the output promise what was not stored.
                    let _ = served.attached.conn.take_output();
                    served.attached.conn.disconnect(
                        ReasonCode::UnspecifiedError,
                        "storage failure",
                        true,
                    );
                }
            }
        }
        let counts = served.attached.conn.take_counts();
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            served
                .broker
                .metrics
                .sent(qos, u64::from(counts.sent[i]), counts.sent_bytes[i]);
        }
        let m = &served.broker.metrics;
        m.dropped(
            DropReason::SessionQueueFull,
            u64::from(counts.dropped_queue_full),
        );
        m.limit_tripped(Limit::QueuedBytes, u64::from(counts.dropped_over_bytes));
        m.limit_tripped(
            Limit::SubscriptionsPerClient,
            u64::from(counts.subscriptions_refused),
        );

        if served.attached.conn.has_output() {
            let out = served.attached.conn.take_output();
            if let Err(e) = served.io.write(&served.broker, &out).await {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    served.broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
                    info!(client_id = %served.attached.conn.client_id(), "disconnected: slow consumer (took no data for slow_consumer_timeout_ms)");
                    return Err("slow consumer: the socket took no data".into());
                }
                return Err(format!("write error: {e}"));
            }
        }
        // QoS 0 was dropped for a full mailbox: let the subscribers these publishes
        // woke run before reading more. A client that writes faster than roost routes
        // would otherwise keep its worker for a whole coop budget (128 reads, tens of
        // thousands of publishes) while its subscribers wait to be scheduled, and most
        // of what it sends would be dropped. The publisher waits for nothing but its
        // next turn. (The flag is the yield's only state: no bytes in the task.)
        let info = &served.attached.info;
        std::future::poll_fn(|cx| {
            if info.overflowed.swap(false, Ordering::Relaxed) {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        Ok(())
    }
}

/// [`run_events`] for an attached session, noting in its `ClientInfo` that a publish
/// overflowed a subscriber's mailbox (the flush then yields).
fn run_attached(broker: &Arc<Broker>, attached: &mut Attached, fanout: &mut Fanout) {
    if run_events(broker, &mut attached.conn, fanout, &mut attached.qio) {
        attached.info.overflowed.store(true, Ordering::Relaxed);
    }
}

/// Carries out what the protocol asked of the broker. True when a publish overflowed
/// a subscriber's mailbox (see [`Broker::publish`]).
fn run_events(
    broker: &Arc<Broker>,
    conn: &mut Connection,
    fanout: &mut Fanout,
    qio: &mut QueueIo,
) -> bool {
    let mut events = conn.take_event_buffer();
    if events.is_empty() {
        conn.recycle_events(events);
        return false;
    }
    let mut overflowed = false;
    let now = Instant::now();
    // PUBACKs of queue deliveries that arrived together settle together: one lock, one
    // dispatch and one progress record per group instead of one each.
    let mut acks = PendingAcks::default();
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
            Event::Subscribe { .. } if queue_subscription(broker, conn, qio, &event) => {}
            Event::Subscribe {
                filter,
                options,
                identifier,
                existed,
                ..
            } => {
                broker.subscribe(&filter, conn.client_id(), options, identifier);
                if let Some(scan) = broker.retained_to_send(&filter, options, existed) {
                    conn.read_retained(scan, options, identifier);
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
    conn.recycle_events(events);
    // The first step of new subscriptions' retained messages goes out with their SUBACK.
    read_retained(broker, conn, now);
    overflowed
}

/// Takes one step of the oldest unfinished reading of retained messages, if the
/// connection has room for more; the serving loop comes back for the next step once
/// this one is written (see [`Connection::retained_wanted`]).
fn read_retained(broker: &Broker, conn: &mut Connection, now: Instant) {
    let Some((scan, max)) = conn.retained_wanted() else {
        return;
    };
    let mut found = Vec::new();
    let done = broker.read_retained(scan, max, now, &mut found);
    conn.deliver_retained(found, done, now);
}

/// Acks of one connection for one queue and group, gathered in arrival order.
#[derive(Default)]
struct PendingAcks {
    target: Option<Arc<roost_engine::session::QueueRef>>,
    ids: Vec<roost_queue::MessageId>,
}

impl PendingAcks {
    fn push(
        &mut self,
        broker: &Broker,
        client_id: &str,
        queue: Arc<roost_engine::session::QueueRef>,
    ) {
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
    /// Created on the first produce and dropped when none is left (boxed: most
    /// connections never produce to a queue, and an idle one carries 8 bytes).
    work: Option<Box<QueueWork>>,
}

/// A connection's queue produces in progress.
#[derive(Default)]
struct QueueWork {
    /// Polled by the connection task itself (no task per produce).
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
    fn new(sender: mailbox::WeakSender<Delivery, Control>) -> Self {
        QueueIo { sender, work: None }
    }

    fn work(&mut self) -> &mut QueueWork {
        self.work.get_or_insert_with(Default::default)
    }

    /// A 3.x produce waits for room: the client is not read from meanwhile.
    fn is_held_back(&self) -> bool {
        self.work.as_ref().is_some_and(|w| !w.waiting.is_empty())
    }

    /// Some produce waits for its acknowledgement.
    fn is_producing(&self) -> bool {
        self.work.as_ref().is_some_and(|w| !w.produces.is_empty())
    }

    /// An acknowledgement that is ready now, if any.
    fn next_produced(&mut self) -> Option<(AckToken, ReasonCode)> {
        let work = self.work.as_mut()?;
        futures_util::FutureExt::now_or_never(work.produces.next()).flatten()
    }

    /// Gives the produce state back once nothing is in progress.
    fn tidy(&mut self) {
        if self
            .work
            .as_ref()
            .is_some_and(|w| w.produces.is_empty() && w.waiting.is_empty())
        {
            self.work = None;
        }
    }

    /// What the front waiting produce needs room in, if any.
    fn room_needed(&self) -> Option<(roost_queue::Queue, u64)> {
        self.work
            .as_ref()?
            .waiting
            .front()
            .map(|w| (w.queue.clone(), w.message.payload.len() as u64))
    }

    /// Starts the waiting produces that now fit, in order.
    fn start_waiting(&mut self) {
        while let Some(w) = self.work.as_ref().and_then(|w| w.waiting.front()) {
            if !w.queue.has_room(w.message.payload.len() as u64) {
                break;
            }
            if let Some(w) = self.work.as_mut().and_then(|w| w.waiting.pop_front()) {
                start_produce(self, &w.queue, w.message, w.ack, false);
            }
        }
        self.tidy();
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
    // Only a 3.x producer tries again, so only it keeps a copy (cheap: shared bytes).
    let again = (!v5).then(|| (queue.clone(), message.clone()));
    let first = queue.produce(message);
    let produce = async move {
        let mut result = first.await;
        if let Some((queue, message)) = again {
            while let Err(roost_queue::ProduceError::QuotaExceeded { .. }) = result {
                queue.wait_for_room(message.payload.len() as u64).await;
                // Boxed: rare, and inline it would enlarge every produce's future.
                result = Box::pin(queue.produce(message.clone())).await;
            }
        }
        match result {
            Ok(_) => ReasonCode::Success,
            Err(e) => queues::produce_reason(&e),
        }
    };
    match ack {
        Some(token) => {
            qio.work()
                .produces
                .push(Box::pin(async move { (token, produce.await) }));
        }
        None => {
            tokio::spawn(produce);
        }
    }
}

/// Joins the consumer group a `$queue/` subscription names, and settles its place in
/// the SUBACK with the outcome; false for other filters.
fn queue_subscription(
    broker: &Broker,
    conn: &mut Connection,
    qio: &QueueIo,
    event: &Event,
) -> bool {
    let Event::Subscribe {
        filter,
        options,
        identifier,
        consumer_group,
        existed,
        held,
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
            .ok_or_else(|| roost_queue::QueueError::NotFound(f.queue.clone()))
    } else {
        broker.queues.get_or_create(&f.queue)
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
        conn.version(),
    ));
    let joined = queue.and_then(|q| q.join(&f.group, conn.client_id().clone(), window, sink));
    let outcome = match joined {
        Ok(()) => {
            debug!(client_id = %conn.client_id(), queue = %f.queue, group = %f.group, "joined queue group");
            Ok(())
        }
        Err(e) => {
            info!(client_id = %conn.client_id(), queue = %f.queue, "cannot consume from queue: {e}");
            let limit = match e {
                roost_queue::QueueError::TooManyQueues { .. } => Some(Limit::Queues),
                roost_queue::QueueError::TooManyGroups { .. } => Some(Limit::ConsumerGroups),
                _ => None,
            };
            if let Some(limit) = limit {
                broker.metrics.limit_tripped(limit, 1);
            }
            Err(queues::subscribe_reason(&e))
        }
    };
    if let Some(slot) = held {
        conn.settle_subscription(*slot, filter, *existed, outcome);
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
                    if matches!(e, roost_queue::QueueError::TooManyQueues { .. }) {
                        broker.metrics.limit_tripped(Limit::Queues, 1);
                    }
                    return resolve(conn, e.reason_code());
                }
            };
            let message = queues::new_message(msg, rest);
            let v5 = conn.version().is_v5();
            // 3.x has no quota reason code: a full queue holds the producer back (its
            // PUBACK waits and roost stops reading from it) until there is room, and
            // its later queue publishes wait behind, in order.
            if !v5 && (qio.is_held_back() || !queue.has_room(message.payload.len() as u64)) {
                qio.work().waiting.push_back(WaitingProduce {
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

// The futures a connection task waits on are built by plain functions, not `async fn`s
// (which would store their arguments twice): they are part of every idle task.

fn wait_for_room(needed: Option<(roost_queue::Queue, u64)>) -> impl Future<Output = ()> {
    match needed {
        // Boxed: only a held-back 3.x producer waits here.
        Some((queue, bytes)) => Either::Left(Box::pin(async move {
            queue.wait_for_room(bytes).await;
        })),
        None => Either::Right(std::future::pending()),
    }
}

fn next_produce(qio: &mut QueueIo) -> impl Future<Output = Option<(AckToken, ReasonCode)>> + '_ {
    std::future::poll_fn(move |cx| match qio.work.as_mut() {
        Some(w) => w.produces.poll_next_unpin(cx),
        None => Poll::Pending,
    })
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

fn sleep_until(deadline: Option<Instant>) -> impl Future<Output = ()> {
    match deadline {
        Some(d) => Either::Left(tokio::time::sleep_until(d.into())),
        None => Either::Right(std::future::pending()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_engine::auth::AllowAll;
    use roost_engine::store::MemoryStore;
    use roost_queue::Queues;

    fn broker(dir: &std::path::Path) -> Arc<Broker> {
        let (queues, _) =
            Queues::open(dir.join("queues"), Default::default(), true).expect("queues");
        Broker::new(
            Default::default(),
            Arc::new(MemoryStore::default()),
            Arc::new(AllowAll),
            queues,
        )
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
        // 1,168 bytes after they were boxed, 1,264 once the overload limits and SCRAM
        // re-authentication state joined; 784 once the futures it waits on stored
        // their arguments once (and reached the connection's fields through one
        // pointer), the fan-out and what woke the task were no longer carried across
        // the wait, and the protocol state shrank. tokio allocates the task (with 112
        // bytes of its own) in 128-byte lines: up to 784 bytes keeps it in 7 lines
        // (896 bytes) instead of 11. Growth past this is a regression.
        assert!(size <= 784, "connection task is {size} bytes");
    }
}
