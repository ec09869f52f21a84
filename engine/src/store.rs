//! What the engine asks to make durable, and the trait of the store that does it.
//!
//! The engine describes changes to durable state as [`Op`]s (a session record, a
//! queued or in-flight message, an inbound QoS 2 id, a retained message) and hands them
//! to a [`SessionStore`], which stores them in order and resolves a [`Ticket`] once
//! they are durable. Nothing is acknowledged to a client before its ticket resolves.
//! The records' bytes are [`crate::record`]'s; where they go is the store's business
//! (the broker's is an embedded LSM store; tests use [`MemoryStore`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use roost_core::PacketId;
use thiserror::Error;
use tokio::sync::oneshot;

/// A store failure. After one, the store accepts no more writes, except after
/// [`StoreError::NoSpace`], which refused one round and leaves the store writable.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The embedded database reported an error.
    #[error("storage error: {0}")]
    Database(String),
    /// An earlier write or sync failed; the store is read-only.
    #[error("storage failed earlier and is read-only")]
    Failed,
    /// The file system has too little space: the round was not written (nothing of
    /// it), and the store takes writes again once space returns.
    #[error("session store refused the write: {0}")]
    NoSpace(String),
}

/// Whether the store has room for more state, as the store last found it; read by
/// the engine without a lock before it takes on state that would grow the store.
///
/// Two levels (see the broker's session store): *short* means new state (a stored
/// subscription, a message queued for an offline session, a retained message) is
/// refused before anything changes, while small bookkeeping writes (session records,
/// deletions) still go through; a round the store cannot take even so is refused
/// whole and counted in [`StoreRoom::refusals`].
#[derive(Debug, Default)]
pub struct StoreRoom {
    short: AtomicBool,
    /// Why, while short.
    why: Mutex<Option<String>>,
    refusals: AtomicU64,
}

impl StoreRoom {
    /// True unless the store is short of space.
    pub fn has_room(&self) -> bool {
        !self.short.load(Ordering::Acquire)
    }

    /// Why the store is short of space, while it is.
    pub fn shortage(&self) -> Option<String> {
        if self.has_room() {
            return None;
        }
        self.why.lock().clone()
    }

    /// Rounds refused for lack of space so far.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Acquire)
    }

    /// The store found itself short of space (`Some(why)`) or with room (`None`).
    pub fn set_short(&self, why: Option<String>) {
        let short = why.is_some();
        *self.why.lock() = why;
        self.short.store(short, Ordering::Release);
    }

    /// The store refused a round for lack of space (call before its tickets resolve,
    /// so that a later [`Op::Barrier`] sees it).
    pub fn refused(&self) {
        self.refusals.fetch_add(1, Ordering::AcqRel);
    }
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace a session record.
    PutSession(Arc<str>, Vec<u8>),
    /// Delete a session and everything it has stored.
    DeleteSession(Arc<str>),
    /// Store a queued message for a session.
    PutEntry(Arc<str>, u64, Vec<u8>),
    /// Record that an entry was sent with a packet id (and how far its flow got).
    PutInflight(Arc<str>, u64, PacketId, InflightState),
    /// Delete an entry (delivered, expired or dropped).
    DeleteEntry(Arc<str>, u64),
    /// Record an incoming QoS 2 packet id awaiting PUBREL.
    PutInbound(Arc<str>, PacketId),
    /// Forget an incoming QoS 2 packet id.
    DeleteInbound(Arc<str>, PacketId),
    /// Store a retained message.
    PutRetained(String, Vec<u8>),
    /// Clear a retained message.
    DeleteRetained(String),
    /// Nothing to write: a ticket for it resolves once everything queued before it
    /// is stored. It carries [`StoreRoom::refusals`] as read before the writes it
    /// stands behind were queued: if a round was refused since, one of them may be
    /// among the refused, and the ticket fails with [`StoreError::NoSpace`].
    Barrier(u64),
}

/// Resolves when the ops it was given for are stored.
#[derive(Debug)]
pub struct Ticket(Option<oneshot::Receiver<Result<(), StoreError>>>);

impl Ticket {
    /// A ticket resolved by whatever sends on the other end of `done`: `Err` if it is
    /// dropped unsent.
    pub fn new(done: oneshot::Receiver<Result<(), StoreError>>) -> Ticket {
        Ticket(Some(done))
    }

    /// A ticket for nothing: resolves at once.
    pub fn ready() -> Ticket {
        Ticket(None)
    }

    /// Waits until the ops are stored.
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.await.unwrap_or(Err(StoreError::Failed)),
        }
    }
}

/// Where an outgoing QoS 1/2 message stands (stored with it once it is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// Where the engine's [`Op`]s are made durable, in the order they are submitted.
pub trait SessionStore: Send + Sync + 'static {
    /// Queues `ops`; the ticket resolves once they (and everything queued before them)
    /// are stored.
    fn submit(&self, ops: Vec<Op>) -> Ticket;

    /// Queues `ops` that nobody waits for (timers, cleanup); they keep their order.
    fn submit_detached(&self, ops: Vec<Op>);

    /// True once a write failed: the store takes no more.
    fn is_failed(&self) -> bool;

    /// Whether the store has room for more state (shared; the store keeps it current).
    fn room(&self) -> Arc<StoreRoom>;
}

/// A store that keeps nothing but the ops it was given, in order, and resolves every
/// ticket at once: for tests of the engine without a disk.
#[derive(Debug, Default)]
pub struct MemoryStore {
    ops: Mutex<Vec<Op>>,
    failed: AtomicBool,
    room: Arc<StoreRoom>,
}

impl MemoryStore {
    /// Everything submitted so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().clone()
    }

    /// Makes every later submit fail, as a store whose disk broke.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Makes the store short of space (`true`: new state is refused, as a store on a
    /// full disk) or gives space back.
    pub fn set_full(&self, full: bool) {
        self.room
            .set_short(full.then(|| "no space left (test)".to_owned()));
    }
}

impl SessionStore for MemoryStore {
    fn submit(&self, ops: Vec<Op>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let result = if self.is_failed() {
            Err(StoreError::Failed)
        } else {
            self.ops.lock().extend(ops);
            Ok(())
        };
        let _ = tx.send(result);
        Ticket::new(rx)
    }

    fn submit_detached(&self, ops: Vec<Op>) {
        if !self.is_failed() {
            self.ops.lock().extend(ops);
        }
    }

    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn room(&self) -> Arc<StoreRoom> {
        self.room.clone()
    }
}

impl SessionStore for Arc<dyn SessionStore> {
    fn submit(&self, ops: Vec<Op>) -> Ticket {
        (**self).submit(ops)
    }

    fn submit_detached(&self, ops: Vec<Op>) {
        (**self).submit_detached(ops)
    }

    fn is_failed(&self) -> bool {
        (**self).is_failed()
    }

    fn room(&self) -> Arc<StoreRoom> {
        (**self).room()
    }
}
