//! The life of a session on the broker, in one place: attach (new, resumed or taken
//! over), the end of a connection (offline or ended, the will now or later), expiry
//! and delayed wills while offline ([`timers`]: one ordered set, one task), and the
//! restart (time spent down counts).
//!
//! A session is attached to one live connection (its state owned by that connection's
//! task) or offline in the session map (kept until it expires, its delayed will due at
//! its time). The rules of that life are here, and only here:
//! - attach: a client id with a live connection is taken over (the old connection is
//!   told to close and hands the session over, [`Broker::take_over`]); an offline
//!   session is resumed, or discarded for a clean start; else a session starts fresh;
//! - end: a session with expiry 0 ends with its connection (its will published at
//!   once); a persistent one goes offline, its will published now or after its delay,
//!   whichever comes first of that and its expiry ([`Broker::end_session`]);
//! - restart: time spent down counts against expiry and will delay; a client that was
//!   connected when roost stopped lost its connection then ([`Broker::restore`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use roost_core::{LastWill, Message};
use tokio::sync::oneshot;

pub mod timers;
pub use timers::{Deadlines, OfflineTimers};

use crate::broker::{
    Attach, Broker, ClientInfo, ConnectionHandle, Control, Fanout, Handover, Mailbox, Slot,
};
use crate::metrics::Limit;
use crate::record::StoredSession;
use crate::record::{self as persist, Loaded};
use crate::session::Session;
use crate::store::Op;
use crate::store::Ticket;

impl Broker {
    /// Brings back what the store loaded at startup: retained messages and sessions
    /// (offline, with their subscriptions, queues and in-flight messages). Time spent
    /// down counts against session expiry and will delay; a client that was connected
    /// when roost stopped lost its connection then, so its will applies.
    pub fn restore(self: &Arc<Self>, loaded: Loaded) {
        self.next_seq.store(loaded.next_seq, Ordering::Relaxed);
        {
            let mut retained = self.retained.write();
            for m in loaded.retained {
                retained.load(m);
            }
        }
        let now_ms = persist::instant_to_unix_ms(crate::clock::now());
        let mut out = Fanout::default();
        let mut ended = Vec::new();
        let mut wills = Vec::new();
        for stored in loaded.sessions {
            let mut session = stored.session;
            session.stored = true;
            // What was stored is kept even past `max_total_queued_bytes`; new messages
            // are dropped until the queues drain below it.
            session.pending.charge_to(&self.limits.queued);
            let client = session.client_id.clone();
            let down_for = if stored.connected {
                0
            } else {
                u32::try_from(now_ms.saturating_sub(stored.disconnected_at_ms) / 1000)
                    .unwrap_or(u32::MAX)
            };
            let expiry_left = match session.expiry_interval {
                u32::MAX => u32::MAX,
                e => e.saturating_sub(down_for),
            };
            let mut will = stored.will;
            let will_delay_left = will
                .as_ref()
                .and_then(|w| w.properties.will_delay_interval)
                .map_or(0, |d| d.saturating_sub(down_for));
            if expiry_left == 0 {
                session.pending_will = will.map(Box::new);
                ended.push(session);
                continue;
            }
            if will_delay_left == 0
                && let Some(w) = will.take()
            {
                wills.push((client.clone(), w));
            }
            session.pending_will = will.map(Box::new);
            for (filter, record) in session.routes() {
                // (No cluster is joined yet: `Broker::set_peers` tells it these routes.)
                drop(self.subscribe(filter, &client, record.options, record.identifier));
            }
            if stored.connected || will_delay_left == 0 {
                // Now it is disconnected as of this start (and any will is gone).
                let record =
                    persist::encode_session(&session, false, session.pending_will.as_deref());
                out.ops.push(Op::PutSession(client.clone(), record));
            }
            let generation = self.next_id();
            let key = self.key(&client);
            self.shard(key).lock().insert(
                key,
                &client,
                Slot::Offline {
                    session: Box::new(session),
                    generation,
                },
            );
            self.schedule_offline_timers(client, generation, will_delay_left, expiry_left);
        }
        self.finish_detached(out);
        for session in ended {
            self.discard_session(session);
        }
        for (client, will) in wills {
            self.publish_will_now(&client, will);
        }
    }

    /// Registers `handle` as the live connection of `client_id` and says what became
    /// of the previous session. With `clean_start` a stored session is discarded here
    /// (its subscriptions leave the router and a pending will is published). A new
    /// session past `max_sessions` is refused.
    pub fn attach(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        clean_start: bool,
        handle: ConnectionHandle,
    ) -> Attach {
        let key = self.key(client_id);
        let previous = {
            let mut shard = self.shard(key).lock();
            let max = self.limits.max_sessions;
            if max > 0 && self.session_count() >= max && shard.get(key).is_none() {
                self.metrics.limit_tripped(Limit::Sessions, 1);
                return Attach::Refused;
            }
            shard.insert(key, client_id, Slot::Online(handle))
        };
        // Connected again: an offline session's will and expiry no longer apply.
        self.timers.cancel(client_id);
        match previous {
            None => Attach::Fresh,
            Some(Slot::Online(old)) => {
                let (tx, rx) = oneshot::channel();
                if old
                    .mailbox
                    .control(Control::TakeOver { reply: tx })
                    .is_err()
                {
                    // The old task is gone without detaching: nothing to hand over.
                    return Attach::Fresh;
                }
                Attach::TakingOver(rx)
            }
            Some(Slot::Offline { session, .. }) => {
                if clean_start {
                    self.discard_session(*session);
                    Attach::Fresh
                } else {
                    Attach::Resumed(session)
                }
            }
        }
    }

    /// Ends a session for good: its subscriptions leave the router, a will still
    /// waiting for its delay is published now (the session's end ends the delay).
    pub fn discard_session(self: &Arc<Self>, mut session: Session) {
        for (filter, _) in session.routes() {
            self.unsubscribe(filter, &session.client_id);
        }
        let client_id = session.client_id.clone();
        let shared = session.take_shared();
        let mut out = Fanout {
            ops: std::mem::take(&mut session.journal),
            ..Fanout::default()
        };
        for d in shared {
            self.redeliver_shared(d, &client_id, &mut out);
        }
        if session.stored {
            out.ops.push(Op::DeleteSession(client_id.clone()));
        }
        if let Some(will) = session.pending_will.take() {
            self.publish_will(&client_id, *will, &mut out);
        }
        self.finish_detached(out);
    }

    /// Called when a connection task ends (not by takeover). Keeps the session if it
    /// has a non-zero expiry, else discards it; publishes or schedules the will.
    ///
    /// If another connection has meanwhile taken the client id, the session and will
    /// are given back: the caller hands them over (see [`Control::TakeOver`]).
    pub fn detach(
        self: &Arc<Self>,
        conn_id: u64,
        mut session: Session,
        will: Option<LastWill>,
        deliveries: &mut Mailbox,
    ) -> Option<(Session, Option<LastWill>)> {
        let client_id = session.client_id.clone();
        // Messages that came through a shared subscription go to another member now.
        let shared = session.take_shared();
        let mut will_now = None;
        let mut timers = None;
        let mut out = Fanout::default();
        {
            let key = self.key(&client_id);
            let mut shard = self.shard(key).lock();
            let ours = matches!(shard.get(key), Some(Slot::Online(h)) if h.info.id == conn_id);
            if !ours && matches!(shard.get(key), Some(Slot::Online(_))) {
                drop(shard);
                for d in shared {
                    self.redeliver_shared(d, &client_id, &mut out);
                }
                self.finish_detached(out);
                return Some((session, will));
            }
            // Under the shard lock nobody can route into our channel any more: what
            // is in it now is all there will be.
            while let Some(d) = deliveries.try_recv() {
                if d.share.is_some() {
                    // Handled below with the others, outside the lock.
                    session.pending.push_back(d, &self.limits.queued);
                } else {
                    session.enqueue_offline(d, self.limits.max_queued());
                }
            }
            if ours && session.is_persistent() {
                let will_delay = will
                    .as_ref()
                    .and_then(|w| w.properties.will_delay_interval)
                    .unwrap_or(0);
                if will_delay == 0 {
                    will_now = will;
                } else {
                    session.pending_will = will.map(Box::new);
                }
                let generation = self.next_id();
                timers = Some((generation, will_delay, session.expiry_interval));
                let late_shared = session.take_shared();
                out.ops.append(&mut session.journal);
                session.stored = true;
                let record =
                    persist::encode_session(&session, false, session.pending_will.as_deref());
                out.ops.push(Op::PutSession(client_id.clone(), record));
                shard.insert(
                    key,
                    &client_id,
                    Slot::Offline {
                        session: Box::new(session),
                        generation,
                    },
                );
                drop(shard);
                for d in shared.into_iter().chain(late_shared) {
                    self.redeliver_shared(d, &client_id, &mut out);
                }
            } else {
                if ours {
                    shard.remove(key);
                }
                drop(shard);
                for d in shared {
                    self.redeliver_shared(d, &client_id, &mut out);
                }
                // Zero expiry (or a stale slot): the session ends with the connection,
                // so any will delay is cut short.
                will_now = will;
                self.finish_detached(std::mem::take(&mut out));
                self.discard_session(session);
            }
        }
        if let Some(w) = will_now {
            self.publish_will(&client_id, w, &mut out);
        }
        self.finish_detached(out);
        if let Some((generation, will_delay, expiry)) = timers {
            self.schedule_offline_timers(client_id, generation, will_delay, expiry);
        }
        None
    }

    /// Schedules an offline session's delayed will and expiry (seconds from now) on
    /// the broker's one clock of offline sessions ([`Broker::run_offline_timers`]).
    fn schedule_offline_timers(
        &self,
        client_id: Arc<str>,
        generation: u64,
        will_delay: u32,
        expiry: u32,
    ) {
        let now = crate::clock::now();
        let after = |secs: u32| now + Duration::from_secs(u64::from(secs));
        self.timers.schedule(
            &client_id,
            Deadlines {
                generation,
                // A will delay as long as the expiry ends with the session.
                will_at: (will_delay > 0 && will_delay < expiry).then(|| after(will_delay)),
                expire_at: (expiry != u32::MAX).then(|| after(expiry)),
            },
        );
    }

    /// Serves the offline sessions' deadlines until the broker is dropped: the one
    /// task that publishes delayed wills and ends expired sessions.
    pub async fn run_offline_timers(self: Arc<Self>) {
        loop {
            let now = crate::clock::now();
            for (client, deadlines) in self.timers.take_due(now) {
                self.offline_deadline(&client, deadlines, now);
            }
            self.timers.wait().await;
        }
    }

    /// Offline sessions with a will or expiry scheduled.
    pub fn offline_timer_count(&self) -> usize {
        self.timers.len()
    }

    /// An offline session's deadline has come: its session expires, or its delayed
    /// will is published (and its expiry scheduled again). Nothing happens if the
    /// client has connected since (the session in the map is another generation).
    fn offline_deadline(self: &Arc<Self>, client: &Arc<str>, deadlines: Deadlines, now: Instant) {
        let key = self.key(client);
        let ours = |slot: Option<&Slot>| matches!(slot, Some(Slot::Offline { generation, .. }) if *generation == deadlines.generation);
        if deadlines.expire_at.is_some_and(|t| t <= now) {
            let expired = {
                let mut shard = self.shard(key).lock();
                match ours(shard.get(key)).then(|| shard.remove(key)).flatten() {
                    Some(Slot::Offline { session, .. }) => Some(session),
                    _ => None,
                }
            };
            if let Some(session) = expired {
                tracing::debug!(client_id = %client, "session expired");
                self.discard_session(*session);
            }
            return;
        }
        let mut out = Fanout::default();
        let will = {
            let mut shard = self.shard(key).lock();
            if !ours(shard.get(key)) {
                return;
            }
            match shard.get_mut(key) {
                Some(Slot::Offline { session, .. }) => {
                    let will = session.pending_will.take().map(|w| *w);
                    if will.is_some() && session.stored {
                        let record = persist::encode_session(session, false, None);
                        out.ops.push(Op::PutSession(client.clone(), record));
                    }
                    will
                }
                _ => None,
            }
        };
        self.timers.schedule(
            client,
            Deadlines {
                will_at: None,
                ..deadlines
            },
        );
        if let Some(w) = will {
            self.publish_will(client, w, &mut out);
        }
        self.finish_detached(out);
    }

    /// Publishes a will message now, as from `client_id`, storing what it queues.
    pub fn publish_will_now(&self, client_id: &Arc<str>, will: LastWill) {
        let mut out = Fanout::default();
        self.publish_will(client_id, will, &mut out);
        self.finish_detached(out);
    }

    fn publish_will(&self, client_id: &Arc<str>, will: LastWill, out: &mut Fanout) {
        tracing::debug!(client_id = %client_id, topic = %will.topic, "publishing will");
        let mut properties = will.properties;
        properties.will_delay_interval = None;
        let msg = Arc::new(Message {
            topic: will.topic,
            payload: will.payload,
            qos: will.qos,
            retain: will.retain,
            properties,
            publisher: Some(client_id.clone()),
            received_at: crate::clock::now(),
        });
        let _ = self.publish(msg, out, false);
    }

    /// What a connection that takes a client id over resumes, from the `handover` of
    /// the connection it took it from (`None` if that one went without handing over):
    /// nothing after a clean start or of a session that ended with its connection
    /// (expiry 0), else the session, its delayed will cancelled by the reconnection.
    pub fn take_over(
        self: &Arc<Self>,
        handover: Option<Handover>,
        clean_start: bool,
    ) -> Option<Session> {
        let Handover {
            mut session,
            delayed_will,
        } = handover?;
        if clean_start || !session.is_persistent() {
            session.pending_will = delayed_will.map(Box::new);
            self.discard_session(session);
            return None;
        }
        Some(session)
    }

    /// Ends a connection's hold on its session: queue deliveries it held go back to
    /// their queues; the session goes to the connection that took the client id over
    /// (`taken_over`, or one that takes it over meanwhile), else offline or ended; the
    /// will is published now, or handed on with the session when it has a delay.
    pub async fn end_session(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        conn_id: u64,
        mut session: Session,
        will: Option<LastWill>,
        taken_over: Option<oneshot::Sender<Handover>>,
        mailbox: &mut Mailbox,
    ) {
        // Queue messages this connection held go back to their queues now, for another
        // consumer (or this client when it returns); the session does not keep them.
        self.queues.leave_all(client_id);
        session.drop_queue_deliveries();
        let (mut session, will, reply) = match taken_over {
            Some(reply) => (session, will, reply),
            None => match self.detach(conn_id, session, will, mailbox) {
                None => return,
                // Taken over while we were ending: the successor waits for the session.
                Some((session, will)) => loop {
                    match mailbox.recv_control().await {
                        Some(Control::TakeOver { reply }) => break (session, will, reply),
                        // Already ending.
                        Some(Control::Kick | Control::Shutdown) => {}
                        None => {
                            self.discard_session(session);
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
                session.enqueue_offline(d, self.limits.max_queued());
            }
        }
        let delay = will
            .as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0);
        let delayed_will = if delay == 0 {
            if let Some(w) = will {
                self.publish_will_now(client_id, w);
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
            self.discard_session(session);
        }
    }

    /// Gives up this node's session of `client_id` because the client is now another
    /// node's (cluster): a live connection is taken over (closed with v5 0x8E, as by
    /// any takeover; a will without delay is published as then), an offline session
    /// is taken out of the map, and the session's routes and stored copy leave this
    /// node. Returns the session if it outlives its connection, for the new owner;
    /// a session with expiry 0 ends here.
    ///
    /// The session is taken the way a new local connection would take it (a
    /// placeholder attaches), so a connection ending at the same moment hands it over
    /// instead of losing it.
    pub async fn release(self: &Arc<Self>, client_id: &Arc<str>) -> Option<Session> {
        let (placeholder, mut mailbox) = crate::mailbox::mailbox(self.delivery_capacity());
        let info = Arc::new(ClientInfo {
            id: self.next_id(),
            persistent: true,
            stalled: Default::default(),
            overflowed: Default::default(),
            peer: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            protocol: roost_core::ProtocolVersion::V5,
            username: None,
            connected_at_ms: persist::unix_ms(),
        });
        let id = info.id;
        let found = self.attach(
            client_id,
            false,
            ConnectionHandle {
                mailbox: placeholder,
                info,
            },
        );
        let session = match found {
            Attach::Resumed(session) => Some(*session),
            Attach::TakingOver(rx) => rx.await.ok().map(|h| {
                let mut session = h.session;
                session.pending_will = h.delayed_will.map(Box::new);
                session
            }),
            Attach::Fresh | Attach::Refused => None,
        };
        // The placeholder leaves the map (unless a local connection took its place).
        let key = self.key(client_id);
        {
            let mut shard = self.shard(key).lock();
            if matches!(shard.get(key), Some(Slot::Online(h)) if h.info.id == id) {
                shard.remove(key);
            }
        }
        let mut session = session?;
        mailbox.close();
        while let Some(d) = mailbox.try_recv() {
            session.enqueue_offline(d, self.limits.max_queued());
        }
        if !session.is_persistent() {
            self.discard_session(session);
            return None;
        }
        for (filter, _) in session.routes() {
            self.unsubscribe(filter, client_id);
        }
        let mut ops = std::mem::take(&mut session.journal);
        if session.stored {
            ops.push(Op::DeleteSession(client_id.clone()));
            session.stored = false;
        }
        self.store.submit_detached(ops);
        Some(session)
    }

    /// Takes in a session that moved here from another node (see
    /// [`Broker::release`]): it is stored under this node's keys and put in the map
    /// offline, its subscriptions routed, ready for the connection that claimed it to
    /// attach. The future resolves once it is stored and its routes are known
    /// cluster-wide (so a publish anywhere after the CONNACK finds it).
    pub fn adopt(
        self: &Arc<Self>,
        stored: StoredSession,
    ) -> impl std::future::Future<Output = Result<(), crate::store::StoreError>> + Send + use<>
    {
        let mut session = stored.session;
        // Its queue counts against this broker's bound from now on.
        session.pending.charge_to(&self.limits.queued);
        let client = session.client_id.clone();
        let mut ops = Vec::new();
        let key = self.key(&client);
        let previous = self.shard(key).lock().remove(key);
        match previous {
            Some(Slot::Offline { session, .. }) => self.discard_session(*session),
            Some(Slot::Online(h)) => {
                // Cannot happen while the control plane gives a client id one owner; a
                // stale connection is closed rather than left beside the session.
                let _ = h.mailbox.control(Control::Kick);
            }
            None => {}
        }
        let seq = || self.next_seq.fetch_add(1, Ordering::Relaxed);
        for f in &mut session.inflight {
            let s = seq();
            f.delivery.seq = Some(s);
            ops.push(Op::PutEntry(
                client.clone(),
                s,
                persist::encode_entry(&f.delivery),
            ));
            ops.push(Op::PutInflight(client.clone(), s, f.packet_id, f.state));
        }
        for d in session.pending.iter_mut() {
            let s = seq();
            d.seq = Some(s);
            ops.push(Op::PutEntry(client.clone(), s, persist::encode_entry(d)));
        }
        for &id in &session.incoming_qos2 {
            ops.push(Op::PutInbound(client.clone(), id));
        }
        session.pending_will = session.pending_will.take().or(stored.will.map(Box::new));
        let record = persist::encode_session(&session, false, session.pending_will.as_deref());
        // The session record first: a store reads entries only for known sessions.
        ops.insert(0, Op::PutSession(client.clone(), record));
        session.stored = true;
        let routes: Vec<crate::peers::Wait> = session
            .routes()
            .filter_map(|(filter, record)| {
                self.subscribe(filter, &client, record.options, record.identifier)
            })
            .collect();
        let generation = self.next_id();
        self.shard(key).lock().insert(
            key,
            &client,
            Slot::Offline {
                session: Box::new(session),
                generation,
            },
        );
        let ticket: Ticket = self.store.submit(ops);
        async move {
            for route in routes {
                route.await;
            }
            ticket.wait().await
        }
    }
}
