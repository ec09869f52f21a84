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
use roost_core::{ConnAck, Connect, DecodeError, Packet, ProtocolVersion, ReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::security::acl::{Access, Authorizer};
use crate::security::auth;
use futures_util::future::Either;
use roost_engine::auth::Grant;
use roost_engine::broker::{Broker, Control, Fanout, Handover};
use roost_engine::client::{Admitted, Client};
use roost_engine::metrics::{AuthFailure, DisconnectReason, Limit};
use roost_engine::protocol::{self, AckToken, ConnectPlan, ConnectRefusal};
use roost_engine::queues;
use roost_engine::rate::PublishBudget;
use roost_engine::scram;
use roost_engine::session::Delivery;

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
        let taken_over = serve_session(s).await;
        let ending = served.take().map(|s| Box::pin(finish(s, taken_over)));
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
    attached: Client,
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
                    DisconnectReason::ServerShutdown,
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
            let Some(limit) = broker.limits.slow_consumer_timeout() else {
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
    let wait = REFUSAL_WAIT.min(broker.limits.connect_timeout());
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

/// Reads and answers the CONNECT, authenticates, and attaches the session (resumed,
/// taken over or new). Run boxed: its state is needed once, not for the connection's
/// whole life.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Arc<Broker>,
    io: &mut Io<S>,
    peer: SocketAddr,
    peer_identity: Option<String>,
) -> Result<Client, String> {
    let timeout = broker.limits.connect_timeout();
    let first = tokio::time::timeout(timeout, io.read_packet(broker, None))
        .await
        .map_err(|_| "no CONNECT in time".to_string())?;
    // The first packet is taken apart before anything else is awaited: a packet is
    // large, and held across an await it would be part of every handshake's state.
    let mut connect = match first_connect(first) {
        Ok(connect) => connect,
        Err((why, answer)) => {
            if answer {
                // Only an unsupported protocol level is answered (3.1.1 return code 1);
                // anything else malformed in a CONNECT is closed on silently.
                let version = roost_core::ProtocolVersion::V3_1_1;
                let code = ReasonCode::UnsupportedProtocolVersion;
                Box::pin(refuse(broker, io, version, code, String::new())).await;
            }
            return Err(why);
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
            Box::pin(refuse(broker, io, connect.protocol, code, why.to_owned())).await;
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
    let (access, expires_at) = match Box::pin(admit(
        broker,
        &mut connect,
        &client_id,
        peer,
        transport_authenticated || scram_user.is_some(),
    ))
    .await
    {
        Ok(access) => access,
        Err(refusal) => {
            let code = refusal.reason_code();
            info!(client_id = %client_id, %peer, username = ?connect.username, "connection refused ({code:?}): {refusal}");
            let why = refusal.to_string();
            Box::pin(refuse(broker, io, connect.protocol, code, why)).await;
            return Err(format!("CONNECT refused ({code:?}): {refusal}"));
        }
    };
    let version = connect.protocol;
    // In a cluster the client id becomes this node's first (its session moves here
    // if another node had it); without a majority nobody can say whose it is.
    if let Some(peers) = broker.peers() {
        match peers.claim(&client_id).await {
            Ok(Some(moved)) => {
                if let Err(e) = broker.adopt(moved).await {
                    warn!(client_id = %client_id, "moved session not stored: {e}");
                }
            }
            Ok(None) => {}
            Err(_) => {
                let code = ReasonCode::ServerUnavailable;
                let why = "the cluster cannot reach a majority".to_owned();
                Box::pin(refuse(broker, io, version, code, why)).await;
                return Err("CONNECT refused: the cluster has no majority".into());
            }
        }
    }
    let admitted = Admitted {
        access,
        scram_user,
        expires_at,
    };
    match Client::attach(broker, connect, &plan, peer, admitted).await {
        Ok(client) => Ok(client),
        Err(refusal) => {
            let code = refusal.reason_code();
            Box::pin(refuse(broker, io, version, code, refusal.to_string())).await;
            Err(format!("CONNECT refused ({code:?}): {refusal}"))
        }
    }
}

/// The CONNECT a connection's first read brought, or why there is none and whether the
/// client is to be told (an unsupported protocol level).
fn first_connect(first: Result<Option<Packet>, ReadError>) -> Result<Box<Connect>, (String, bool)> {
    match first {
        Ok(Some(Packet::Connect(c))) => Ok(c),
        Ok(Some(_)) => Err(("first packet was not CONNECT".into(), false)),
        Ok(None) => Err(("closed before CONNECT".into(), false)),
        Err(ReadError::Io(e)) => Err((format!("read error: {e}"), false)),
        Err(ReadError::Decode(e)) => Err((
            format!("bad CONNECT: {e}"),
            matches!(e, DecodeError::UnsupportedProtocolVersion(_)),
        )),
    }
}

/// Answers a CONNECT with a CONNACK that refuses it, and closes. (Callers box it: a
/// refusal is rare, and its state would otherwise be part of every handshake.)
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    io: &mut Io<S>,
    version: roost_core::ProtocolVersion,
    code: ReasonCode,
    why: String,
) {
    let mut out = BytesMut::new();
    protocol::write_refusal(version, code, &why, &mut out);
    let _ = io.write(broker, &out).await;
    io.close_gracefully().await;
}

/// Serves an attached session until the connection is to end. Returns why, and the
/// successor's reply channel when the client id was taken over.
// Not an `async fn`: that would store its argument twice in every connection task.
#[allow(clippy::manual_async_fn)]
fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
    served: &mut Served<S>,
) -> impl Future<Output = Option<tokio::sync::oneshot::Sender<Handover>>> + '_ {
    async move {
        // Fields are reached through `served` (rather than bound to names of their own,
        // which the task would store besides).
        let mut budget = PublishBudget::new(
            served.broker.limits.max_publish_rate,
            served.broker.limits.max_publish_bytes_rate,
            roost_engine::clock::now(),
        )
        .map(Box::new);
        let mut outbound_full_since = None;
        // What the client sent right behind its CONNECT (a SUBSCRIBE, typically) takes
        // effect now, before the CONNACK's session record is stored: another client may
        // already be publishing what it subscribes to. (A block of its own, so the task
        // does not carry this fan-out while it waits later.)
        {
            let mut fanout = Fanout::default();
            handle_buffered(served, &mut budget, &mut fanout, roost_engine::clock::now());
            if flush(served, &mut fanout).await.is_err() {
                return None;
            }
        }
        loop {
            if served.attached.conn.close_reason().is_some() {
                break None;
            }

            // One timer serves the keep-alive, the end of a throttle, the slow-consumer
            // limit and retained messages still to send, so the idle connection's task
            // stays small (and these temporaries end before the await, so the task does
            // not carry them).
            let (deadline, held_back) = {
                let throttle = budget
                    .as_mut()
                    .and_then(|b| b.throttle(roost_engine::clock::now(), &served.broker.metrics));
                if let Some(until) = throttle {
                    served.attached.conn.hold_reads_until(until);
                }
                let client = served
                    .attached
                    .next_deadline(&served.broker, &mut outbound_full_since);
                (
                    client.into_iter().chain(throttle).min(),
                    served.attached.queues.is_held_back()
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
                let room_needed = served.attached.queues.room_needed();
                let woke = tokio::select! {
                    // A 3.x producer held back by a full queue, or a client over its publish
                    // rate, is not read from meanwhile.
                    read = served.io.read_packet(&served.broker, Some(served.attached.conn.version())), if !held_back => Woke::Read(read),
                    // A full session queue leaves deliveries in the mailbox, so publishers
                    // wait for this client instead of messages being dropped.
                    Some(d) = served.attached.mailbox.recv(), if served.attached.conn.has_room() => Woke::Delivery(d),
                    Some((token, reason)) = queues::next_produce(&mut served.attached.queues), if served.attached.queues.is_producing() => Woke::Produced(token, reason),
                    _ = queues::wait_for_room(room_needed), if held_back => Woke::Room,
                    Some(request) = served.attached.mailbox.recv_control() => Woke::Control(request),
                    _ = sleep_until(deadline) => Woke::Timer,
                };
                fanout = Fanout::default();
                let now = roost_engine::clock::now();
                match woke {
                    Woke::Read(read) => match read {
                        Ok(Some(packet)) => {
                            charge(&mut budget, &packet, now);
                            served
                                .attached
                                .handle(&served.broker, packet, now, &mut fanout);
                            // Handle what else is already buffered before writing back
                            // (a throttled client's rest waits in the buffer).
                            handle_buffered(served, &mut budget, &mut fanout, now);
                        }
                        Ok(None) => served
                            .attached
                            .conn
                            .lost(DisconnectReason::ClientClosed, "socket closed by client"),
                        Err(ReadError::Io(e)) => served
                            .attached
                            .conn
                            .lost(DisconnectReason::NetworkError, &format!("read error: {e}")),
                        Err(ReadError::Decode(e)) => {
                            served
                                .attached
                                .decode_error(&served.broker, &e, &mut fanout)
                        }
                    },
                    Woke::Delivery(d) => served.attached.deliver_batch(d, now),
                    Woke::Produced(token, reason) => served.attached.produced(token, reason),
                    Woke::Room => served.attached.queues.start_waiting(),
                    Woke::Control(request) => {
                        if let Some(reply) = served.attached.control(request) {
                            // The loop's flush is skipped: `finish` writes the
                            // DISCONNECT before the session is handed over.
                            break Some(reply);
                        }
                    }
                    Woke::Timer => {
                        served
                            .attached
                            .on_timer(&served.broker, now, &mut outbound_full_since)
                    }
                }
            }
            if flush(served, &mut fanout).await.is_err() {
                break None;
            }
        }
    }
}

/// Handles the packets already in the read buffer, each one's events carried out
/// before the next is handled. Stops early when the connection is to close, when the
/// client is over its publish rate, or when a 3.x client is at its bound of
/// unacknowledged publishes (the rest waits in the buffer).
fn handle_buffered<S>(
    served: &mut Served<S>,
    budget: &mut Option<Box<PublishBudget>>,
    fanout: &mut Fanout,
    now: Instant,
) {
    while served.attached.conn.close_reason().is_none()
        && !over_budget(budget, now)
        && !served.attached.conn.inbound_full()
    {
        match codec::decode(
            &mut served.io.read_buf,
            Some(served.attached.conn.version()),
            served.broker.limits.max_packet_size as usize,
        ) {
            Ok(Some(p)) => {
                charge(budget, &p, now);
                served.attached.handle(&served.broker, p, now, fanout);
            }
            Ok(None) => break,
            Err(e) => served.attached.decode_error(&served.broker, &e, fanout),
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
    taken_over: Option<tokio::sync::oneshot::Sender<Handover>>,
) {
    let mut fanout = Fanout::default();
    let _ = flush(&mut served, &mut fanout).await;
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
    if let Some(close) = served.attached.conn.close_reason() {
        debug!(client_id = %served.attached.conn.client_id(), reason = close.kind.label(), "disconnected: {}", close.why);
    }
    served.attached.end(&served.broker, taken_over).await;
    if linger {
        let _ = tokio::time::timeout(LINGER, served.io.discard_until_eof()).await;
    }
    // Dropping `served` gives the connection's count back.
}

/// Authenticates the client of `connect` and checks its will topic against the ACL.
/// Returns the ACL the connection is held to and when its credentials expire. A token's
/// user becomes the CONNECT's username.
async fn admit(
    broker: &Broker,
    connect: &mut Connect,
    client_id: &Arc<str>,
    peer: SocketAddr,
    transport_authenticated: bool,
) -> Result<(Option<Arc<dyn Authorizer>>, Option<Instant>), auth::Refusal> {
    let grant = if transport_authenticated {
        Grant::default()
    } else {
        match broker.auth.authenticate(connect, client_id, peer).await {
            Ok(grant) => grant,
            Err(refusal) => {
                if let Some(limit) = refusal.limit() {
                    broker.metrics.limit_tripped(limit, 1);
                }
                if let Some(failure) = refusal.auth_failure() {
                    broker.metrics.auth_failed(failure);
                }
                return Err(refusal);
            }
        }
    };
    if let Some(user) = grant.username {
        connect.username = Some(user);
    }
    let file = broker
        .auth
        .authorizer(connect.username.as_deref(), client_id);
    let access = auth::narrow(file, grant.narrowing);
    if let (Some(acl), Some(will)) = (&access, &connect.will)
        && !acl.allows(Access::Write, &will.topic)
    {
        return Err(auth::Refusal::WillNotWritable);
    }
    // The engine's clock is monotonic: the wall-clock expiry becomes a time on it.
    let expires_at = grant.expires_at.map(|at| {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        roost_engine::clock::now() + left
    });
    Ok((access, expires_at))
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
    let timeout = broker.limits.connect_timeout();
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
        scram::begin(client_first.unwrap_or(&[]), &*credentials).map_err(refusal)?;
    *user = Some(exchange.username().to_owned());
    let mut out = BytesMut::new();
    let _ = codec::encode(&Packet::Auth(server_first), ProtocolVersion::V5, &mut out);
    io.write(broker, &out)
        .await
        .map_err(|e| AuthEnd::Close(format!("write error: {e}")))?;
    let protocol_error = |why: &str| AuthEnd::Refuse(ReasonCode::ProtocolError, why.into(), None);
    match io.read_packet(broker, Some(ProtocolVersion::V5)).await {
        Ok(Some(Packet::Auth(a))) => match scram::client_final(&a) {
            Ok(data) => exchange.finish(data).map_err(refusal),
            Err(why) => Err(protocol_error(why)),
        },
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

/// Carries out pending events, stores what they and the session changed, and only
/// then writes the output: nothing is acknowledged before it is stored.
#[allow(clippy::manual_async_fn)]
fn flush<'a, S: AsyncRead + AsyncWrite + Unpin>(
    served: &'a mut Served<S>,
    fanout: &'a mut Fanout,
) -> impl Future<Output = Result<(), ()>> + 'a {
    // An async block, not an `async fn`, which would store its arguments twice; and
    // fields are reached through `served`, not bound to names the task would store.
    async move {
        served.attached.commit(&served.broker, fanout).await;
        if served.attached.conn.has_output() {
            let out = served.attached.conn.take_output();
            if let Err(e) = served.io.write(&served.broker, &out).await {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    served.broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
                    info!(client_id = %served.attached.conn.client_id(), "disconnected: slow consumer (took no data for slow_consumer_timeout_ms)");
                    served.attached.conn.lost(
                        DisconnectReason::SlowConsumer,
                        "slow consumer: the socket took no data",
                    );
                } else {
                    served
                        .attached
                        .conn
                        .lost(DisconnectReason::NetworkError, &format!("write error: {e}"));
                }
                return Err(());
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
        // (896 bytes) instead of 11. 760 once the session queue (`Pending`) was boxed
        // on first use, which also made room for the account of
        // `max_total_queued_bytes`. Growth past this is a regression.
        println!("an idle connection task: {size} bytes");
        assert!(size <= 760, "connection task is {size} bytes");
    }
}
