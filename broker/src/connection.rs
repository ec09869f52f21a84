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
use roost_core::{Auth, ConnAck, Connect, DecodeError, Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::acl::{Access, Authorizer};
use crate::auth;
use crate::broker::{
    Attach, Broker, ClientInfo, ConnectionHandle, Control, Fanout, Handover, send_blocked,
};
use crate::metrics::{AuthFailure, DropReason, Limit};
use crate::protocol::{self, AckToken, ConnectPlan, ConnectRefusal, Connection, Event};
use crate::queues::{self, QueueTopic};
use crate::rate::{PublishBudget, Throttled};
use crate::scram;
use crate::session::{Delivery, Session};
use roost_core::Message;
use tokio::task::JoinSet;

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
    if let Err(limit) = broker.try_add_connection(peer.ip()) {
        broker.metrics.limit_tripped(limit, 1);
        Box::pin(refuse_over_limit(&broker, &mut io, limit)).await;
        return;
    }
    broker.metrics.connection_accepted();
    if let Err(why) = run(&broker, &mut io, peer, peer_identity, shutdown).await {
        debug!(%peer, "connection ended: {why}");
    }
    broker.remove_connection(peer.ip());
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
                Ok(n) => broker.metrics.network_in(n),
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

    /// Writes all of `bytes`. A client that takes no byte for the broker's
    /// `slow_consumer_timeout` fails the write with [`std::io::ErrorKind::TimedOut`]:
    /// a peer that stopped reading must not hold its connection task forever.
    async fn write(&mut self, broker: &Broker, bytes: &[u8]) -> std::io::Result<()> {
        let stall = broker.slow_consumer_timeout();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = with_stall_limit(stall, self.stream.write(rest)).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            broker.metrics.network_out(n);
            rest = &rest[n..];
        }
        with_stall_limit(stall, self.stream.flush()).await
    }
}

/// Runs one write step, failing it with `TimedOut` if it makes no progress in `stall`.
async fn with_stall_limit<T>(
    stall: Option<Duration>,
    step: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match stall {
        Some(limit) => tokio::time::timeout(limit, step)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
        None => step.await,
    }
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
    let (delivery_tx, mut deliveries) = mpsc::channel::<Delivery>(broker.delivery_capacity());
    let mut qio = QueueIo {
        sender: delivery_tx.downgrade(),
        produces: JoinSet::new(),
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

    let mut taken_over = None;
    let mut fanout = Fanout::default();
    let mut budget = PublishBudget::new(
        broker.config.max_publish_rate,
        broker.config.max_publish_bytes_rate,
        Instant::now(),
    );
    let mut throttled = false;
    let mut outbound_full_since = None;
    let outcome = loop {
        if let Err(e) = flush(broker, &mut conn, io, &mut fanout, &mut qio).await {
            break e;
        }
        if let Some(close) = conn.close_reason() {
            break close.why.clone();
        }
        let throttle = budget
            .as_mut()
            .and_then(|b| b.throttled_until(Instant::now()));
        if let Some((until, limit)) = throttle {
            if !throttled {
                let limit = match limit {
                    Throttled::Packets => Limit::PublishRate,
                    Throttled::Bytes => Limit::PublishBytesRate,
                };
                broker.metrics.limit_tripped(limit, 1);
                debug!(client_id = %client_id, "publishing too fast ({}): throttled", limit.label());
            }
            conn.hold_reads_until(until);
        }
        throttled = throttle.is_some();
        let slow = slow_consumer_deadline(broker, &conn, &mut outbound_full_since);
        // One timer serves the keep-alive, the end of a throttle and the slow-consumer
        // limit, so the idle connection's task stays small.
        let deadline = [conn.next_deadline(), throttle.map(|t| t.0), slow]
            .into_iter()
            .flatten()
            .min();
        let room_needed = qio.room_needed();
        tokio::select! {
            // A 3.x producer held back by a full queue, or a client over its publish
            // rate, is not read from meanwhile.
            read = io.read_packet(broker, Some(conn.version())), if room_needed.is_none() && throttle.is_none() => match read {
                Ok(Some(packet)) => {
                    let now = Instant::now();
                    charge(&mut budget, &packet, now);
                    conn.handle(packet, now);
                    // Decode what else is already buffered before writing back (a
                    // throttled client's rest waits in the buffer).
                    while conn.close_reason().is_none() && !over_budget(&mut budget, now) {
                        match codec::decode(&mut io.read_buf, Some(conn.version()), broker.limits.max_packet_size as usize) {
                            Ok(Some(p)) => {
                                run_events(broker, &mut conn, &mut fanout, &mut qio);
                                charge(&mut budget, &p, now);
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
            Some(Ok((token, reason))) = qio.produces.join_next(), if !qio.produces.is_empty() => {
                conn.resolve_ack(token, reason);
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
            _ = sleep_until(deadline) => {
                let now = Instant::now();
                if slow.is_some_and(|t| now >= t) {
                    broker.metrics.limit_tripped(Limit::SlowConsumer, 1);
                    info!(client_id = %client_id, "disconnected: slow consumer (outbound buffer full for slow_consumer_timeout_ms)");
                    conn.disconnect(
                        ReasonCode::QuotaExceeded,
                        "slow consumer: outbound buffer full",
                        true,
                    );
                }
                conn.tick(now);
            }
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

/// Carries out what the protocol asked of the broker.
fn run_events(broker: &Arc<Broker>, conn: &mut Connection, fanout: &mut Fanout, qio: &mut QueueIo) {
    let events: Vec<Event> = conn.take_events().collect();
    if events.is_empty() {
        return;
    }
    let now = Instant::now();
    for event in events {
        match event {
            Event::Publish(msg) => {
                broker.metrics.received(msg.qos, msg.payload.len());
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
}

/// What a connection needs for `$queue/` traffic: a weak handle on its own delivery
/// channel (for the queues' sinks) and the produces whose acknowledgements wait.
struct QueueIo {
    sender: mpsc::WeakSender<Delivery>,
    produces: JoinSet<(AckToken, ReasonCode)>,
    /// 3.x queue publishes waiting for room in a full queue, in arrival order.
    waiting: std::collections::VecDeque<WaitingProduce>,
}

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
            qio.produces.spawn(async move { (token, produce.await) });
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

/// Charges a PUBLISH read from the client against its publish budget.
fn charge(budget: &mut Option<PublishBudget>, packet: &Packet, now: Instant) {
    if let (Some(b), Packet::Publish(p)) = (budget, packet) {
        b.spend(p.payload.len(), now);
    }
}

/// True when the client has published past its rate and must wait.
fn over_budget(budget: &mut Option<PublishBudget>, now: Instant) -> bool {
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
