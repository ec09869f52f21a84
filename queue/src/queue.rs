//! [`Queue`]: one durable partitioned queue on storage logs, with its consumer groups.
//!
//! The group logic lives in [`crate::group`] (sans-I/O); this shell adds the logs, the
//! sinks and the clock. One small mutex guards a queue's group state; it is held while
//! a dispatch reads records (page-cache `pread`s) and offers them to sinks, never across
//! an `await`. Producers do not take it: they only append and then *kick* a dispatch.
//! A kick that finds the lock busy sets a flag the holder re-checks before it leaves, so
//! no wake-up is lost and concurrent producers coalesce into one dispatch.
//!
//! Durability of group progress: every settle (ack, or dead-letter once its copy is
//! durable) appends a record to the queue's progress log (`g.<queue>`), which goes
//! through the same group commit as the messages. [`Queue::maintain`] writes a snapshot
//! of all cursors when something changed, then deletes progress segments before it and
//! partition segments every group (and any purge) has passed. On open the progress log is
//! replayed; anything delivered but not durably settled is delivered again, with its
//! delivery count starting over at 1 (in-flight state and counts are not persisted).

pub(crate) mod replica;
pub(crate) mod transfer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use roost_storage::{Append, Log, LogConfig, ReadLimit, Record, Storage};
use tracing::{debug, warn};

pub use crate::message::NewMessage;

use crate::config::QueueConfig;
use crate::dedup::{Claim, Dedup, Outcome};
use crate::error::{ProduceError, QueueError};
use crate::format::{
    self, DeadReason, MAX_META_BYTES, MAX_SUBTOPIC, MessageId, Meta, Origin, Progress, Snapshot,
    decode_message,
};
use crate::group::{ConsumerId, Group, GroupKey, Nack, Settings, Settle, Window};
use crate::ledger::{Ledger, Recovered};
use crate::replication::SettleHow;

/// Milliseconds since the Unix epoch: the clock of timestamps, deadlines and backoffs.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDelivery {
    /// Where the message lives; its `Display` is the `message-id` property.
    pub id: MessageId,
    /// The group it is delivered for (pass it back to settle precisely).
    pub group: GroupKey,
    /// 1 for the first delivery, rising with every redelivery.
    pub delivery_count: u32,
    /// As produced.
    pub subtopic: String,
    /// As produced.
    pub headers: Bytes,
    /// As produced.
    pub payload: Bytes,
    /// When the message was stored, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// For a message in a dead-letter queue: where it came from and why.
    pub dead_letter: Option<Origin>,
}

/// How a queue pushes a delivery to a consumer's connection.
pub trait DeliverySink: Send + Sync {
    /// Takes `delivery` if the connection can accept it now (a non-blocking send to its
    /// outbound queue); returns false otherwise, and the queue offers it again on the
    /// next dispatch (a produce, a settle, a join, [`Queue::tick`] or
    /// [`Queue::wake`]). Called with the queue's lock held: it must not call back into
    /// the queue.
    fn offer(&self, delivery: QueueDelivery) -> bool;
}

/// Where [`Queue::reset`] moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The oldest message still held, in every partition.
    Earliest,
    /// Past the newest message, in every partition: only new messages are delivered.
    Latest,
    /// This offset in every partition (clamped to what each holds).
    Offset(u64),
    /// This offset in one partition; the others are untouched.
    PartitionOffset {
        /// The partition.
        partition: u32,
        /// The offset (clamped to what the partition holds).
        offset: u64,
    },
    /// The first message stored at or after this time (ms since the epoch), per partition.
    Timestamp(u64),
}

/// Counts for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub key: GroupKey,
    /// Current members, sorted.
    pub members: Vec<ConsumerId>,
    /// Each member's in-flight window now (same order as `members`): its Receive
    /// Maximum, or where its adaptive window stands.
    pub windows: Vec<u32>,
    /// Messages not yet settled by this group.
    pub lag: u64,
    /// Messages in flight to its members.
    pub in_flight: u64,
    /// Messages waiting for a redelivery backoff.
    pub waiting: u64,
    /// Messages held back for their `deliver_at` (`delay-ms`).
    pub delayed: u64,
}

/// A queue's state for the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Its settings.
    pub config: QueueConfig,
    /// Messages counted against `max_depth`.
    pub depth: u64,
    /// Bytes its partition logs hold.
    pub bytes: u64,
    /// Its groups, sorted by key.
    pub groups: Vec<GroupInfo>,
    /// Messages in its dead-letter queue.
    pub dead_letters: u64,
    /// What recovery could not read in its logs when it was opened (its dead-letter
    /// queue's damage is in that queue's info).
    pub damage: Vec<crate::Damage>,
}

/// The future of a settle: resolves once the settle is durable. The settle itself took
/// effect in memory when it was called (the consumer's window is free at once).
#[derive(Debug)]
#[must_use = "the settle happened already; await this to learn when it is durable"]
pub struct Settled {
    found: bool,
    append: Option<Append>,
}

impl Future for Settled {
    /// `Ok(true)` when the message was outstanding in some group and is now durably
    /// settled there, `Ok(false)` when nothing matched.
    type Output = Result<bool, QueueError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let found = self.found;
        match &mut self.append {
            None => Poll::Ready(Ok(found)),
            Some(a) => Pin::new(a)
                .poll(cx)
                .map(|r| r.map(|_| found).map_err(QueueError::from)),
        }
    }
}

/// A message on its way to the dead-letter queue.
#[derive(Debug, Clone)]
struct DeadItem {
    key: GroupKey,
    partition: usize,
    offset: u64,
    count: u32,
    reason: DeadReason,
}

/// What a dispatch settles without delivering, on one partition.
struct Skip<'a> {
    /// Offsets delivered to no group (see `State::dropped`).
    dropped: &'a BTreeSet<u64>,
    /// In a last-value queue: partition key -> newest offset.
    newest: Option<&'a HashMap<Bytes, u64>>,
}

impl Skip<'_> {
    fn skips(&self, offset: u64, key: Option<&Bytes>) -> bool {
        self.dropped.contains(&offset)
            || key
                .zip(self.newest)
                .and_then(|(k, newest)| newest.get(k))
                .is_some_and(|&o| o > offset)
    }
}

/// One group with its members' sinks.
struct Slot {
    group: Group,
    sinks: BTreeMap<ConsumerId, Arc<dyn DeliverySink>>,
    /// Partitions whose last dispatch stopped at their owner's full window: what an
    /// ack by that owner may let go on. An ack dispatches only these (see
    /// [`Queue::dispatch_freed`]), so its cost does not grow with the partitions and
    /// groups of the queue; everything else is offered by the dispatch of the produce
    /// that stored it, a join or leave, or the timer.
    blocked: BTreeSet<usize>,
    /// Partitions whose last dispatch waited for a handover (see
    /// [`crate::group::Group::in_handover`]): what an ack by their previous owner may
    /// let go on.
    handovers: BTreeSet<usize>,
}

/// What produces have stored that no dispatch has offered yet. A produce kicks a
/// dispatch of its own partition only, so the work of storing a message does not grow
/// with the partitions of the queue (at 1,000 partitions, a dispatch of them all per
/// commit round cost more than the messages).
#[derive(Default)]
struct Fresh {
    /// Per partition: the log's end as the last dispatch of that partition saw it. A
    /// produce whose offset is below it needs no dispatch of its own: that dispatch
    /// offered it already (or stopped at a full window or a missing owner, whose change
    /// kicks again).
    dispatched_end: Vec<u64>,
    /// Partitions with records at or past their `dispatched_end`, each listed once.
    partitions: Vec<usize>,
    listed: Vec<bool>,
}

impl Fresh {
    /// Lists partition `p`, whose record `offset` is durable; false if no dispatch is
    /// needed for it (one offered it already, or one is listed).
    fn list(&mut self, p: usize, offset: u64) -> bool {
        if self.dispatched_end.get(p).is_some_and(|&end| end > offset) {
            return false;
        }
        if self.listed.len() <= p {
            self.listed.resize(p + 1, false);
        }
        !std::mem::replace(&mut self.listed[p], true) && {
            self.partitions.push(p);
            true
        }
    }

    /// Takes the listed partitions (into `into`, cleared first).
    fn take(&mut self, into: &mut Vec<usize>) {
        into.clear();
        for &p in &self.partitions {
            if let Some(l) = self.listed.get_mut(p) {
                *l = false;
            }
        }
        into.append(&mut self.partitions);
    }

    /// A dispatch of partition `p` offered everything below `end`.
    fn dispatched(&mut self, p: usize, end: u64) {
        if self.dispatched_end.len() <= p {
            self.dispatched_end.resize(p + 1, 0);
        }
        self.dispatched_end[p] = end;
    }
}

/// Everything the queue's lock guards.
struct State {
    settings: Settings,
    /// Per partition: nothing below is delivered to any group (purge).
    floors: Vec<u64>,
    groups: BTreeMap<GroupKey, Slot>,
    /// Progress changed since the last snapshot.
    dirty: bool,
    /// Per partition: what the last durable snapshot says every group has passed.
    truncatable: Vec<u64>,
    /// Rotates the partition a dispatch starts with, for fairness within a window.
    rotate: usize,
    /// Scratch for a dispatch's log ends, kept so a dispatch does not allocate.
    ends: Vec<u64>,
    /// Per partition: the depth floor [`Queue::refresh_floor`] last computed, so a
    /// settle recomputes only the partitions it touched.
    floor_of: Vec<u64>,
    /// Scratch for the partitions an ack touched.
    touched: Vec<usize>,
    /// Scratch for the partitions a dispatch takes from [`Fresh`].
    listed: Vec<usize>,
    /// Scratch for one group's deliveries of a dispatch (partition, offset, count):
    /// grown from empty each time, it was reallocated several times per dispatch
    /// (past 1 KiB each time glibc consolidates its free lists first); its record
    /// takes an exact copy.
    delivered: Vec<(u32, u64, u32)>,
    /// Per partition: offsets above `floors` delivered to no group, present or future
    /// (dead letters a redrive moved back). Offsets reaching the floor raise it.
    dropped: Vec<BTreeSet<u64>>,
}

pub(crate) struct Inner {
    name: Arc<str>,
    stem: String,
    is_dead_letter_queue: bool,
    storage: Arc<Storage>,
    config: RwLock<QueueConfig>,
    logs: RwLock<Arc<[Log]>>,
    progress: Log,
    state: Mutex<State>,
    kick: AtomicBool,
    /// Set with a partition listed in `fresh`: a dispatch of the listed partitions only.
    kick_fresh: AtomicBool,
    /// Produced records not offered yet, by partition (see [`Fresh`]).
    fresh: Mutex<Fresh>,
    /// The dispatch's read buffer (see [`Queue::dispatch`]).
    read_ahead: Mutex<Vec<roost_storage::LogRecord>>,
    /// A sink refused an offer (its connection's channel was full) since the last full
    /// dispatch. Nothing tells the queue when that channel has room again, so until a
    /// dispatch gets through, every produce dispatches, as acks and the timer do.
    refused: AtomicBool,
    /// Produces refused at `max_depth` or `max_bytes` since the queue was opened.
    quota_refusals: AtomicU64,
    round_robin: AtomicU64,
    /// Messages stored (sum of next offsets) and their floor sum: depth = the difference.
    stored: AtomicU64,
    floor_sum: AtomicU64,
    /// Produces being appended: counted against the limits.
    reserved: AtomicU64,
    reserved_bytes: AtomicU64,
    stored_bytes: AtomicU64,
    room: tokio::sync::Notify,
    deleted: AtomicBool,
    dead_letters: Option<Queue>,
    /// The `dedup-id`s stored within the window.
    dedup: Mutex<Dedup>,
    /// Per partition of a last-value queue (empty otherwise): partition key -> the
    /// newest offset stored with it.
    last_values: Mutex<Vec<HashMap<Bytes, u64>>>,
    /// Transfers out of this queue in progress, and those replay found unfinished.
    ledger: Mutex<Ledger>,
    /// What recovery could not read in this queue's logs when it was opened, and what
    /// reads found damaged since (see [`Queue::collect_damage`]).
    damage: Mutex<Vec<crate::Damage>>,
    /// Set when a cluster replicates the queue's partitions.
    replica: crate::replication::ReplicaState,
}

/// One durable queue. Cheap to clone; clones share the queue.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// Log names: `p<N>.<queue>` partitions, `g.<queue>` progress, `dlq.<queue>` and
/// `dlqg.<queue>` for the dead-letter queue. The kind prefix holds no '.', so the name
/// after the first '.' is the queue's and no two queues' logs can collide.
pub(crate) fn partition_log_name(stem: &str, dlq: bool, p: usize) -> String {
    if dlq {
        format!("dlq.{stem}")
    } else {
        format!("p{p}.{stem}")
    }
}

/// True if `log` is the name of one of the partition logs of queue `queue` (not its
/// progress or dead-letter logs); for fault injection by name.
pub fn is_partition_log_of(log: &str, queue: &str) -> bool {
    log.split_once('.').is_some_and(|(kind, stem)| {
        stem == queue
            && kind
                .strip_prefix('p')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

pub(crate) fn progress_log_name(stem: &str, dlq: bool) -> String {
    if dlq {
        format!("dlqg.{stem}")
    } else {
        format!("g.{stem}")
    }
}

fn progress_log_config(config: &QueueConfig) -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        retention: Default::default(),
        ..config.log_config()
    }
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a: stable across builds and restarts, so a key keeps its partition.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Counts a produce against the limits until dropped.
struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.inner.reserved.fetch_sub(1, Ordering::SeqCst);
        self.inner
            .reserved_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A produce whose append is queued: the partition, the append, its reservation
/// against the limits, its framed size, and its partition key if the queue keeps last
/// values.
type Started = (usize, Append, Reservation, u64, Option<Bytes>);

/// The future of [`Queue::produce`]: the message's id once it is durable. A plain
/// produce waits here on its append alone, unboxed and small (the broker boxes one per
/// publish; a future several times this size cost a copy and a large allocation each).
#[must_use = "the append is queued already; await this to learn whether it is stored"]
pub struct Produce(ProduceState);

enum ProduceState {
    Done(Option<Result<MessageId, ProduceError>>),
    Appending(Queue, Started),
    /// With a `dedup-id`, or through a replicated partition's log.
    Boxed(Pin<Box<dyn Future<Output = Result<MessageId, ProduceError>> + Send>>),
}

impl std::fmt::Debug for Produce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Produce").finish_non_exhaustive()
    }
}

impl Future for Produce {
    type Output = Result<MessageId, ProduceError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let state = &mut self.0;
        let result = match state {
            ProduceState::Done(r) => r.take(),
            ProduceState::Boxed(f) => return f.as_mut().poll(cx),
            ProduceState::Appending(_, started) => match Pin::new(&mut started.1).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => match std::mem::replace(state, ProduceState::Done(None)) {
                    ProduceState::Appending(queue, started) => Some(queue.produced(started, r)),
                    _ => None,
                },
            },
        };
        Poll::Ready(result.unwrap_or_else(|| Err(roost_storage::Error::Closed.into())))
    }
}

/// How a produce began (see [`Queue::produce`]).
enum Begun {
    /// Its `dedup-id` was stored already, as this message.
    Duplicate(MessageId),
    /// A produce with its `dedup-id` is in flight: wait for that one's outcome.
    Wait(tokio::sync::watch::Receiver<Outcome>, NewMessage),
    /// Appending; with the claimed `dedup-id` to report the outcome for.
    Started(
        Result<Started, ProduceError>,
        Option<(Bytes, tokio::sync::watch::Sender<Outcome>)>,
    ),
}

impl Queue {
    /// Opens (creating if needed) the logs of queue `name` and replays its progress.
    /// `notes` collects what recovery repaired, for the caller to log.
    pub(crate) fn open(
        storage: Arc<Storage>,
        name: &str,
        config: QueueConfig,
        notes: &mut Vec<String>,
    ) -> Result<Queue, QueueError> {
        let dlq_config = config.dead_letter_config();
        let dead_letters = Queue::open_one(storage.clone(), name, true, dlq_config, None, notes)?;
        Queue::open_one(storage, name, false, config, Some(dead_letters), notes)
    }

    fn open_one(
        storage: Arc<Storage>,
        stem: &str,
        dlq: bool,
        config: QueueConfig,
        dead_letters: Option<Queue>,
        notes: &mut Vec<String>,
    ) -> Result<Queue, QueueError> {
        let name: Arc<str> = if dlq {
            format!("{stem}$dlq").into()
        } else {
            stem.into()
        };
        let mut logs = Vec::new();
        let mut damage = Vec::new();
        for p in 0..config.partitions as usize {
            let log_name = partition_log_name(stem, dlq, p);
            let (log, recovery) = storage.open_log(&log_name, config.log_config())?;
            if !recovery.is_clean() {
                notes.push(format!(
                    "queue {name} partition {p} recovered: {recovery:?}"
                ));
            }
            damage.extend(crate::Damage::of(Some(p as u32), &log, &recovery));
            logs.push(log);
        }
        let (progress, recovery) =
            storage.open_log(&progress_log_name(stem, dlq), progress_log_config(&config))?;
        if !recovery.is_clean() {
            notes.push(format!(
                "queue {name} group progress recovered: {recovery:?}"
            ));
        }
        damage.extend(crate::Damage::of(None, &progress, &recovery));
        for d in &damage {
            let what = d
                .partition
                .map_or_else(|| "group progress".to_owned(), |p| format!("partition {p}"));
            for file in &d.quarantined {
                notes.push(format!(
                    "queue {name} {what}: damaged file quarantined as {} (lost offsets {:?})",
                    file.display(),
                    d.lost
                ));
            }
        }
        let mut settings = config.settings();
        if dlq {
            // Dead letters are never dead-lettered again.
            settings.max_deliveries = 0;
        }
        let mut state = State {
            settings,
            floors: vec![0; logs.len()],
            groups: BTreeMap::new(),
            dirty: false,
            truncatable: vec![0; logs.len()],
            rotate: 0,
            ends: Vec::new(),
            floor_of: Vec::new(),
            touched: Vec::new(),
            listed: Vec::new(),
            delivered: Vec::new(),
            dropped: vec![BTreeSet::new(); logs.len()],
        };
        let mut ledger = Ledger::default();
        replay(&name, &progress, &logs, &mut state, &mut ledger, notes);
        let (dedup, last_values) = rebuild_indexes(&name, dlq, &logs, &config, &state, notes);
        let stored = logs.iter().map(Log::next_offset).sum();
        let stored_bytes = logs.iter().map(Log::size_bytes).sum();
        let queue = Queue {
            inner: Arc::new(Inner {
                name,
                stem: stem.to_owned(),
                is_dead_letter_queue: dlq,
                storage,
                config: RwLock::new(config),
                logs: RwLock::new(logs.into()),
                progress,
                state: Mutex::new(state),
                kick: AtomicBool::new(false),
                kick_fresh: AtomicBool::new(false),
                fresh: Mutex::new(Fresh::default()),
                read_ahead: Mutex::new(Vec::new()),
                refused: AtomicBool::new(false),
                quota_refusals: AtomicU64::new(0),
                round_robin: AtomicU64::new(0),
                stored: AtomicU64::new(stored),
                floor_sum: AtomicU64::new(0),
                reserved: AtomicU64::new(0),
                reserved_bytes: AtomicU64::new(0),
                stored_bytes: AtomicU64::new(stored_bytes),
                room: tokio::sync::Notify::new(),
                deleted: AtomicBool::new(false),
                dead_letters,
                dedup: Mutex::new(dedup),
                last_values: Mutex::new(last_values),
                ledger: Mutex::new(ledger),
                damage: Mutex::new(damage),
                replica: Default::default(),
            }),
        };
        {
            let mut st = queue.inner.state.lock();
            queue.refresh_floor(&mut st);
        }
        Ok(queue)
    }

    /// The queue's name (`<name>$dlq` for a dead-letter queue).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The queue's settings.
    pub fn config(&self) -> QueueConfig {
        self.inner.config.read().clone()
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.logs().len() as u32
    }

    /// The dead-letter queue (`$queue/<name>/$dlq`), consumable like any queue; `None`
    /// for a dead-letter queue itself.
    pub fn dead_letters(&self) -> Option<&Queue> {
        self.inner.dead_letters.as_ref()
    }

    fn logs(&self) -> Arc<[Log]> {
        self.inner.logs.read().clone()
    }

    /// Takes the damage that reads of this queue's logs found while running (a sealed
    /// segment that failed its CRC, quarantined and salvaged by storage, see
    /// [`Log::take_found_damage`]) into the queue's damage report, with a warn line per
    /// damaged file as on open. The lost offsets read back as lost records, which the
    /// dispatcher skips like any undecodable record.
    fn collect_damage(&self) {
        let logs = self.logs();
        let partitions = logs.iter().enumerate().map(|(p, l)| (Some(p as u32), l));
        for (partition, log) in partitions.chain([(None, &self.inner.progress)]) {
            let Some(found) = log.take_found_damage() else {
                continue;
            };
            let Some(d) = crate::Damage::of(partition, log, &found) else {
                continue;
            };
            let what =
                partition.map_or_else(|| "group progress".to_owned(), |p| format!("partition {p}"));
            for file in &d.quarantined {
                warn!(
                    "queue {} {what}: damage found while reading: damaged file quarantined as {} (lost offsets {:?})",
                    self.inner.name,
                    file.display(),
                    d.lost
                );
            }
            self.inner.damage.lock().push(d);
        }
    }

    /// Produces refused at `max_depth` or `max_bytes` since the queue was opened (what
    /// its producers were told no, or what a capture could not keep).
    pub fn quota_refusals(&self) -> u64 {
        self.inner.quota_refusals.load(Ordering::Relaxed)
    }

    /// Messages counted against `max_depth`: per partition, everything from the oldest
    /// message some group has not settled (its committed offset) on, so messages acked
    /// out of order above it still count; while the queue has no group, everything held.
    pub fn depth(&self) -> u64 {
        let stored = self.inner.stored.load(Ordering::SeqCst);
        stored.saturating_sub(self.inner.floor_sum.load(Ordering::SeqCst))
    }

    /// Bytes the partition logs hold (settled messages count until their segment is
    /// deleted by [`Queue::maintain`]).
    pub fn bytes(&self) -> u64 {
        self.inner.stored_bytes.load(Ordering::SeqCst)
    }

    fn check_deleted(&self) -> Result<(), QueueError> {
        if self.inner.deleted.load(Ordering::SeqCst) {
            return Err(QueueError::Deleted(self.inner.name.to_string()));
        }
        Ok(())
    }

    /// Whether a produce of `bytes` would fit under the limits now.
    pub fn has_room(&self, bytes: u64) -> bool {
        let cfg = self.inner.config.read();
        let n = self.inner.reserved.load(Ordering::SeqCst);
        let b = self.inner.reserved_bytes.load(Ordering::SeqCst);
        self.depth() + n < cfg.max_depth && self.bytes() + b + bytes <= cfg.max_bytes
    }

    /// Waits until a produce of `bytes` would fit: a 3.1.1 producer's backpressure
    /// (its PUBACK waits). Woken when messages are settled, purged or deleted.
    pub async fn wait_for_room(&self, bytes: u64) {
        loop {
            let notified = self.inner.room.notified();
            if self.has_room(bytes) || self.inner.deleted.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    fn reserve(&self, bytes: u64) -> Result<Reservation, ProduceError> {
        let inner = &self.inner;
        let r = self.reserve_any(bytes);
        let n = inner.reserved.load(Ordering::SeqCst);
        let b = inner.reserved_bytes.load(Ordering::SeqCst);
        let cfg = inner.config.read();
        let full = |what| {
            inner.quota_refusals.fetch_add(1, Ordering::Relaxed);
            ProduceError::QuotaExceeded {
                queue: inner.name.to_string(),
                what,
            }
        };
        if self.depth() + n > cfg.max_depth {
            return Err(full("max_depth"));
        }
        if self.bytes() + b > cfg.max_bytes {
            return Err(full("max_bytes"));
        }
        Ok(r)
    }

    /// Counts `bytes` being appended, whatever the limits say.
    fn reserve_any(&self, bytes: u64) -> Reservation {
        let inner = &self.inner;
        inner.reserved.fetch_add(1, Ordering::SeqCst);
        inner.reserved_bytes.fetch_add(bytes, Ordering::SeqCst);
        Reservation {
            inner: inner.clone(),
            bytes,
        }
    }

    fn pick_partition(&self, msg: &NewMessage, partitions: usize) -> usize {
        let n = partitions.max(1) as u64;
        let p = match (&msg.partition_key, msg.subtopic.is_empty()) {
            (Some(key), _) => hash(key) % n,
            (None, false) => hash(msg.subtopic.as_bytes()) % n,
            (None, true) => self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        };
        p as usize
    }

    /// Stores `msg`. The partition is a hash of the partition key if there is one, else
    /// of the subtopic if it is not empty, else round-robin. The append is queued before
    /// this returns, so produces issued one after another keep their order; the future
    /// resolves with the message's id once it is durable under the queue's durability.
    /// Fails with [`ProduceError::QuotaExceeded`] at `max_depth` or `max_bytes`.
    ///
    /// A message with a `dedup_id` the queue stored within `dedup_window_ms` is not
    /// stored again: the future resolves with the id of the stored one. While one with
    /// that id is being appended, another waits for its outcome.
    pub fn produce(&self, msg: NewMessage) -> Produce {
        if let Some(r) = self.replicator() {
            return Produce(ProduceState::Boxed(self.produce_replicated(r, msg)));
        }
        let begun = self.begin_produce(msg);
        let state = match begun {
            Begun::Duplicate(id) => ProduceState::Done(Some(Ok(id))),
            Begun::Started(Err(e), None) => ProduceState::Done(Some(Err(e))),
            Begun::Started(Ok(started), None) => ProduceState::Appending(self.clone(), started),
            // With a `dedup-id`: rare, so boxed.
            begun => ProduceState::Boxed(Box::pin(self.clone().produce_dedup(begun))),
        };
        Produce(state)
    }

    /// The rest of a produce with a `dedup-id` (see [`Queue::produce`]).
    async fn produce_dedup(self, mut begun: Begun) -> Result<MessageId, ProduceError> {
        loop {
            match begun {
                Begun::Duplicate(id) => return Ok(id),
                Begun::Wait(mut rx, msg) => {
                    let first = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|o| o.clone())
                        .flatten();
                    match first {
                        Some(id) => return Ok(id),
                        // The first failed: this one is a first attempt now.
                        None => begun = self.begin_produce(msg),
                    }
                }
                Begun::Started(started, claim) => {
                    let result = match started {
                        Ok(s) => self.finish_produce(s).await,
                        Err(e) => Err(e),
                    };
                    if let Some((id, tx)) = claim {
                        let stored = result.as_ref().ok().cloned();
                        self.inner
                            .dedup
                            .lock()
                            .finish(&id, stored.clone(), now_ms());
                        let _ = tx.send(Some(stored));
                    }
                    return result;
                }
            }
        }
    }

    /// The synchronous half of a produce: the dedup check, then the append is queued.
    fn begin_produce(&self, msg: NewMessage) -> Begun {
        let Some(id) = msg.dedup_id.clone() else {
            return Begun::Started(self.start_produce(msg, None), None);
        };
        if id.len() > MAX_META_BYTES {
            return Begun::Started(
                Err(ProduceError::InvalidProperty("dedup-id too long")),
                None,
            );
        }
        let (window, max) = {
            let c = self.inner.config.read();
            (c.dedup_window_ms, c.dedup_max_ids)
        };
        let claim = self.inner.dedup.lock().claim(&id, now_ms(), window, max);
        match claim {
            Claim::Stored(mid) => Begun::Duplicate(mid),
            Claim::Pending(rx) => Begun::Wait(rx, msg),
            Claim::Claimed(tx) => {
                let started = self.start_produce(msg, None);
                if started.is_err() {
                    self.inner.dedup.lock().finish(&id, None, now_ms());
                    let _ = tx.send(Some(None));
                    return Begun::Started(started, None);
                }
                Begun::Started(started, Some((id, tx)))
            }
        }
    }

    async fn finish_produce(&self, mut started: Started) -> Result<MessageId, ProduceError> {
        let result = (&mut started.1).await;
        self.produced(started, result)
    }

    /// A started produce's append resolved with `result`.
    fn produced(
        &self,
        started: Started,
        result: Result<u64, roost_storage::Error>,
    ) -> Result<MessageId, ProduceError> {
        let (partition, _append, reservation, size, key) = started;
        drop(reservation);
        let offset = result?;
        self.stored(partition, offset, size, key.as_ref());
        Ok(MessageId {
            queue: self.inner.name.clone(),
            partition: partition as u32,
            offset,
        })
    }

    /// A record of `size` bytes (partition key `key`, for a last-value queue) is
    /// durable at `offset` of `partition`: count it and offer it.
    fn stored(&self, partition: usize, offset: u64, size: u64, key: Option<&Bytes>) {
        self.inner.stored.fetch_add(1, Ordering::SeqCst);
        self.inner.stored_bytes.fetch_add(size, Ordering::SeqCst);
        if let Some(key) = key
            && let Some(newest) = self.inner.last_values.lock().get_mut(partition)
        {
            let o = newest.entry(key.clone()).or_insert(offset);
            *o = (*o).max(offset);
        }
        // The records of one commit resolve together: the first produce's dispatch
        // offers them all, the others skip theirs.
        if self.inner.refused.load(Ordering::SeqCst) {
            self.kick();
        } else if self.inner.fresh.lock().list(partition, offset) {
            self.inner.kick_fresh.store(true, Ordering::SeqCst);
            self.drain_kicks();
        }
    }

    /// The queue header of a new message: its dedup id, delivery time, and (in a
    /// last-value queue) its partition key.
    fn meta_of(&self, msg: &NewMessage) -> Result<Meta, ProduceError> {
        let last_value = self.inner.config.read().last_value;
        let key = msg.partition_key.clone().filter(|_| last_value);
        if key.as_ref().is_some_and(|k| k.len() > MAX_META_BYTES) {
            return Err(ProduceError::InvalidProperty("partition-key too long"));
        }
        if msg
            .dedup_id
            .as_ref()
            .is_some_and(|k| k.len() > MAX_META_BYTES)
        {
            return Err(ProduceError::InvalidProperty("dedup-id too long"));
        }
        Ok(Meta {
            dedup_id: msg.dedup_id.clone(),
            deliver_at: msg.deliver_at,
            key,
            transfer: None,
        })
    }

    fn start_produce(
        &self,
        msg: NewMessage,
        origin: Option<(Origin, u64)>,
    ) -> Result<Started, ProduceError> {
        self.start_produce_at(msg, origin, None)
    }

    /// [`Queue::start_produce`] into partition `at` when given (a replicated produce
    /// the partition's log committed: no limit applies), else the one it picks.
    fn start_produce_at(
        &self,
        msg: NewMessage,
        origin: Option<(Origin, u64)>,
        at: Option<usize>,
    ) -> Result<Started, ProduceError> {
        if self.inner.deleted.load(Ordering::SeqCst) {
            return Err(ProduceError::Deleted(self.inner.name.to_string()));
        }
        if msg.subtopic.len() > MAX_SUBTOPIC {
            return Err(ProduceError::SubtopicTooLong(msg.subtopic.len()));
        }
        let meta = self.meta_of(&msg)?;
        let headers = format::encode_message(
            &msg.subtopic,
            origin.as_ref().map(|o| &o.0),
            &meta,
            &msg.headers,
        );
        // The record as framed by storage: 29 bytes of overhead.
        let size = (29 + headers.len() + msg.payload.len()) as u64;
        let reservation = match at {
            Some(_) => self.reserve_any(size),
            None => self.reserve(size)?,
        };
        let logs = self.logs();
        let partition = at.unwrap_or_else(|| self.pick_partition(&msg, logs.len()));
        let log = logs
            .get(partition)
            .ok_or_else(|| ProduceError::Deleted(self.inner.name.to_string()))?;
        let record = match origin {
            Some((_, timestamp)) => Record {
                timestamp,
                headers,
                payload: msg.payload,
            },
            None => Record::now(headers, msg.payload),
        };
        let append = log.append_one(record);
        Ok((partition, append, reservation, size, meta.key))
    }

    /// Runs `f` on the locked state, then any dispatch kicked meanwhile.
    fn with_state<R>(&self, f: impl FnOnce(&Queue, &mut State) -> R) -> R {
        let r = {
            let mut st = self.inner.state.lock();
            let r = f(self, &mut st);
            self.refresh_floor(&mut st);
            r
        };
        self.drain_kicks();
        r
    }

    /// Asks for a dispatch of every group and partition (coalesced with any running).
    fn kick(&self) {
        self.inner.kick.store(true, Ordering::SeqCst);
        self.drain_kicks();
    }

    fn drain_kicks(&self) {
        loop {
            let Some(mut st) = self.inner.state.try_lock() else {
                // The holder re-checks the flag after it lets go.
                return;
            };
            let mut changed = false;
            loop {
                if self.inner.kick.swap(false, Ordering::SeqCst) {
                    changed |= self.dispatch_all(&mut st, now_ms());
                } else if self.inner.kick_fresh.swap(false, Ordering::SeqCst) {
                    changed |= self.dispatch_fresh(&mut st, now_ms());
                } else {
                    break;
                }
            }
            // Only settles, skips and purges move the floor; a dispatch that changed no
            // progress leaves it where it was.
            if changed {
                self.refresh_floor(&mut st);
            }
            drop(st);
            if !self.inner.kick.load(Ordering::SeqCst)
                && !self.inner.kick_fresh.load(Ordering::SeqCst)
            {
                return;
            }
        }
    }

    /// Offers pending messages again: the broker calls this when a consumer whose
    /// sink refused a delivery can take more.
    pub fn wake(&self) {
        self.kick();
    }

    /// Recomputes the depth floor of every partition (see [`Queue::depth`]).
    fn refresh_floor(&self, st: &mut State) {
        let logs = self.logs();
        st.floor_of.resize(logs.len(), 0);
        for (p, log) in logs.iter().enumerate() {
            st.floor_of[p] = partition_floor(st, p, log);
        }
        self.publish_floor(st);
    }

    /// [`Queue::refresh_floor`] for the partitions in `touched` only: a settle that
    /// skipped nothing moves no other partition's floor (produces never move one, and
    /// everything else that does, such as joins, resets, purges and retention, refreshes
    /// them all).
    fn refresh_floor_of(&self, st: &mut State, touched: &[usize]) {
        let logs = self.logs();
        if st.floor_of.len() != logs.len() {
            return self.refresh_floor(st);
        }
        for &p in touched {
            if let Some(log) = logs.get(p) {
                st.floor_of[p] = partition_floor(st, p, log);
            }
        }
        self.publish_floor(st);
    }

    fn publish_floor(&self, st: &State) {
        let sum = st.floor_of.iter().sum();
        let old = self.inner.floor_sum.swap(sum, Ordering::SeqCst);
        if sum > old {
            self.inner.room.notify_waiters();
        }
    }

    /// Offers what every group has ready; returns true if progress changed.
    fn dispatch_all(&self, st: &mut State, now: u64) -> bool {
        let logs = self.logs();
        let n = logs.len();
        if n == 0 {
            return false;
        }
        self.inner.refused.store(false, Ordering::SeqCst);
        // This dispatch covers whatever produces listed so far.
        let mut listed = std::mem::take(&mut st.listed);
        self.inner.fresh.lock().take(&mut listed);
        st.listed = listed;
        // Read before dispatching: every record below these ends is offered below.
        let mut ends = std::mem::take(&mut st.ends);
        ends.clear();
        ends.extend(logs.iter().map(Log::next_offset));
        st.rotate = st.rotate.wrapping_add(1);
        let start = st.rotate % n;
        let settings = st.settings;
        let mut dirty = false;
        let newest = self.inner.last_values.lock();
        let no_drops = BTreeSet::new();
        let mut counts = Vec::new();
        let mut delivered = std::mem::take(&mut st.delivered);
        for (key, slot) in st.groups.iter_mut() {
            delivered.clear();
            for i in 0..n {
                let p = (start + i) % n;
                if !self.is_led(p) {
                    continue;
                }
                let skip = Skip {
                    dropped: st.dropped.get(p).unwrap_or(&no_drops),
                    newest: newest.get(p),
                };
                dirty |= self.dispatch(
                    key,
                    slot,
                    p,
                    &logs[p],
                    ends[p],
                    now,
                    (&settings, &skip),
                    &mut delivered,
                );
            }
            if !delivered.is_empty() {
                counts.push(Progress::Delivered(key.clone(), delivered.to_vec()));
            }
        }
        st.delivered = delivered;
        if !counts.is_empty() {
            self.record_delivered(counts);
        }
        drop(newest);
        st.dirty |= dirty;
        {
            let mut fresh = self.inner.fresh.lock();
            for (p, &end) in ends.iter().enumerate() {
                fresh.dispatched(p, end);
            }
        }
        st.ends = ends;
        dirty
    }

    /// Offers what every group has ready on the partitions produces listed (see
    /// [`Fresh`]); returns true if progress changed.
    fn dispatch_fresh(&self, st: &mut State, now: u64) -> bool {
        let mut parts = std::mem::take(&mut st.listed);
        self.inner.fresh.lock().take(&mut parts);
        let logs = self.logs();
        // Read before dispatching: every record below these ends is offered below.
        let mut ends = std::mem::take(&mut st.ends);
        ends.clear();
        ends.extend(
            parts
                .iter()
                .map(|&p| logs.get(p).map_or(0, Log::next_offset)),
        );
        let settings = st.settings;
        let mut dirty = false;
        let newest = self.inner.last_values.lock();
        let no_drops = BTreeSet::new();
        let mut counts = Vec::new();
        let mut delivered = std::mem::take(&mut st.delivered);
        for (key, slot) in st.groups.iter_mut() {
            delivered.clear();
            for (&p, &end) in parts.iter().zip(&ends) {
                let Some(log) = logs.get(p).filter(|_| self.is_led(p)) else {
                    continue;
                };
                let skip = Skip {
                    dropped: st.dropped.get(p).unwrap_or(&no_drops),
                    newest: newest.get(p),
                };
                dirty |= self.dispatch(
                    key,
                    slot,
                    p,
                    log,
                    end,
                    now,
                    (&settings, &skip),
                    &mut delivered,
                );
            }
            if !delivered.is_empty() {
                counts.push(Progress::Delivered(key.clone(), delivered.to_vec()));
            }
        }
        st.delivered = delivered;
        if !counts.is_empty() {
            self.record_delivered(counts);
        }
        drop(newest);
        st.dirty |= dirty;
        {
            let mut fresh = self.inner.fresh.lock();
            for (&p, &end) in parts.iter().zip(&ends) {
                fresh.dispatched(p, end);
            }
        }
        st.ends = ends;
        st.listed = parts;
        dirty
    }

    /// Offers what group `key` has ready on partition `p`, adding each delivery's
    /// `(partition, offset, count)` to `delivered`. Returns true if progress changed
    /// (offsets skipped by the filter, or retention clamped the cursor).
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        key: &GroupKey,
        slot: &mut Slot,
        p: usize,
        log: &Log,
        end: u64,
        now: u64,
        (settings, skip): (&crate::group::Settings, &Skip<'_>),
        delivered: &mut Vec<(u32, u64, u32)>,
    ) -> bool {
        let mut changed = false;
        slot.blocked.remove(&p);
        // Records read ahead for the next picks, taken from `ahead[at..]`: one buffer
        // kept for every dispatch (under the state lock, so never contended), not one
        // allocated per read.
        let mut ahead = self.inner.read_ahead.lock();
        ahead.clear();
        let mut at = 0;
        while let Some(pick) = slot.group.pick(p, end, now, settings) {
            let record = match ahead.get_mut(at) {
                Some(r) if !pick.retry && r.offset == pick.offset => {
                    at += 1;
                    take_record(r)
                }
                _ => {
                    let max_records = if pick.retry {
                        1
                    } else {
                        slot.group.room_of(&pick.consumer).clamp(1, 256) as usize
                    };
                    let limit = ReadLimit {
                        max_records,
                        max_bytes: 1 << 20,
                    };
                    match log.read_into(pick.offset, limit, &mut ahead) {
                        Ok(()) => {
                            if log.has_found_damage() {
                                self.collect_damage();
                            }
                        }
                        Err(roost_storage::Error::OffsetOutOfRange { start, .. })
                            if pick.offset < start =>
                        {
                            // Retention deleted it: nothing left to deliver below start.
                            slot.group.clamp_start(p, start);
                            changed = true;
                            continue;
                        }
                        Err(e) => {
                            warn!(queue = %self.inner.name, partition = p, offset = pick.offset,
                                  error = %e, "queue read failed");
                            break;
                        }
                    }
                    match ahead.first_mut() {
                        Some(r) if r.offset == pick.offset => {
                            at = 1;
                            take_record(r)
                        }
                        _ => break,
                    }
                }
            };
            let header = decode_message(&record.headers);
            let subtopic = header
                .as_ref()
                .and_then(|h| std::str::from_utf8(&h.subtopic).ok());
            let (Some(h), Some(subtopic)) = (header.as_ref(), subtopic) else {
                warn!(queue = %self.inner.name, partition = p, offset = pick.offset,
                      "undecodable queue record skipped");
                if pick.retry {
                    slot.group.replay_settled(p, pick.offset);
                } else {
                    slot.group.skip(p, pick.offset);
                }
                changed = true;
                continue;
            };
            if skip.skips(pick.offset, h.meta.key.as_ref()) {
                // Redriven out of this dead-letter queue, or not the newest value of
                // its key: settled without a delivery.
                if pick.retry {
                    slot.group.replay_settled(p, pick.offset);
                } else {
                    slot.group.skip(p, pick.offset);
                }
                changed = true;
                continue;
            }
            if !pick.retry && !key.matches(subtopic) {
                slot.group.skip(p, pick.offset);
                changed = true;
                continue;
            }
            if !pick.retry
                && let Some(due) = h.meta.deliver_at
                && due > now
            {
                slot.group.defer(p, pick.offset, due);
                continue;
            }
            let Some(sink) = slot.sinks.get(&pick.consumer) else {
                break;
            };
            let delivery = QueueDelivery {
                id: MessageId {
                    queue: self.inner.name.clone(),
                    partition: p as u32,
                    offset: pick.offset,
                },
                group: key.clone(),
                delivery_count: pick.count + 1,
                subtopic: subtopic.to_owned(),
                headers: h.headers.clone(),
                payload: record.payload.clone(),
                timestamp_ms: record.timestamp,
                dead_letter: h.origin,
            };
            if !sink.offer(delivery) {
                self.inner.refused.store(true, Ordering::SeqCst);
                break;
            }
            slot.group.delivered(p, &pick, now, settings.ack_timeout_ms);
            delivered.push((p as u32, pick.offset, pick.count + 1));
        }
        // What was read ahead and not delivered holds the log's buffers: let go now.
        ahead.clear();
        drop(ahead);
        if let Some(owner) = slot.group.owner(p)
            && slot.group.room_of(owner) == 0
        {
            slot.blocked.insert(p);
        }
        if slot.group.in_handover(p) {
            slot.handovers.insert(p);
        } else {
            slot.handovers.remove(&p);
        }
        changed
    }

    /// What an ack by `consumer` in group `key` can let go on: the partitions where
    /// that group's dispatch stopped at `consumer`'s full window. Unlike
    /// [`Queue::dispatch_all`] this leaves `dispatched_end` alone (other groups and
    /// partitions were not offered anything). Returns true if progress changed.
    fn dispatch_freed(&self, st: &mut State, now: u64, key: &GroupKey, consumer: &str) -> bool {
        let Some(slot) = st.groups.get_mut(key) else {
            return false;
        };
        let mut freed: Vec<usize> = Vec::new();
        if slot.group.room_of(consumer) > 0 {
            freed.extend(
                slot.blocked
                    .iter()
                    .copied()
                    .filter(|&p| slot.group.owner(p).is_some_and(|o| &**o == consumer)),
            );
        }
        // Handovers this ack may have ended.
        freed.extend(
            slot.handovers
                .iter()
                .copied()
                .filter(|&p| !slot.group.in_handover(p)),
        );
        if freed.is_empty() {
            return false;
        }
        let logs = self.logs();
        let settings = st.settings;
        let newest = self.inner.last_values.lock();
        let no_drops = BTreeSet::new();
        let mut dirty = false;
        let mut delivered = Vec::new();
        for p in freed {
            let Some(log) = logs.get(p) else {
                continue;
            };
            let skip = Skip {
                dropped: st.dropped.get(p).unwrap_or(&no_drops),
                newest: newest.get(p),
            };
            dirty |= self.dispatch(
                key,
                slot,
                p,
                log,
                log.next_offset(),
                now,
                (&settings, &skip),
                &mut delivered,
            );
        }
        drop(newest);
        if !delivered.is_empty() {
            self.record_delivered(vec![Progress::Delivered(key.clone(), delivered)]);
        }
        st.dirty |= dirty;
        dirty
    }

    /// Adds `consumer` to group `key` (created on first use, starting at the oldest
    /// message held) with an in-flight `window` (a number: exactly that many, 0: an
    /// adaptive window; an adaptive window never exceeds `consumer_window`), and
    /// rebalances the group's partitions. Joining again updates the window and sink but
    /// keeps what is in flight to that consumer id: on disconnect or session takeover the
    /// broker calls [`Queue::leave`] / [`Queue::leave_all`] first, so that what the old
    /// connection held is redelivered at once rather than after the ack timeout.
    pub fn join(
        &self,
        key: &GroupKey,
        consumer: ConsumerId,
        window: impl Into<Window>,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<(), QueueError> {
        self.check_deleted()?;
        if let Some(f) = key.filter.as_deref()
            && (roost_core::topic::validate_filter(f).is_err() || f.starts_with("$share/"))
        {
            return Err(QueueError::InvalidFilter(f.to_owned()));
        }
        let consumer_window = self.inner.config.read().consumer_window;
        let window = match window.into() {
            Window::Adaptive { max } => Window::Adaptive {
                max: max.min(consumer_window),
            },
            fixed => fixed,
        };
        // What the other nodes' proxy members of this consumer are told: a number, 0 for
        // a window that adapts within `consumer_window` (a v5 Receive Maximum below it
        // goes as that number).
        let window_asked = match window {
            Window::Fixed(n) => n,
            Window::Adaptive { max } if max < consumer_window => max,
            Window::Adaptive { .. } => 0,
        };
        let max_groups = self.inner.config.read().max_consumer_groups;
        self.with_state(|q, st| {
            if max_groups > 0
                && st.groups.len() >= max_groups as usize
                && !st.groups.contains_key(key)
            {
                return Err(QueueError::TooManyGroups {
                    queue: q.inner.name.to_string(),
                    group: key.to_string(),
                    max: max_groups,
                });
            }
            q.ensure_group(st, key);
            if let Some(slot) = st.groups.get_mut(key) {
                slot.sinks.insert(consumer.clone(), sink);
                slot.group.join(consumer.clone(), window);
                debug!(queue = %q.inner.name, group = %key, consumer = %consumer, "joined");
            }
            q.dispatch_all(st, now_ms());
            Ok(())
        })?;
        self.tell_joined(key, &consumer, window_asked);
        Ok(())
    }

    fn ensure_group(&self, st: &mut State, key: &GroupKey) {
        if st.groups.contains_key(key) {
            return;
        }
        let logs = self.logs();
        let starts: Vec<u64> = logs
            .iter()
            .enumerate()
            .map(|(p, l)| l.start_offset().max(st.floors.get(p).copied().unwrap_or(0)))
            .collect();
        st.groups.insert(
            key.clone(),
            Slot {
                group: Group::new(&starts),
                sinks: BTreeMap::new(),
                blocked: BTreeSet::new(),
                handovers: BTreeSet::new(),
            },
        );
        st.dirty = true;
        let _queued = self.append_progress(vec![Progress::Declare(key.clone())]);
    }

    /// Records a dispatch's delivery counts (`Progress::Delivered`): passed to the
    /// replicator, if any, and appended to the progress log, not awaited: the counts
    /// reach the disk with the next commit round, so `max_deliveries` holds across
    /// restarts except for deliveries made in the last round before a crash (see the
    /// crate documentation).
    fn record_delivered(&self, counts: Vec<Progress>) {
        self.replicate_delivered(&counts);
        let _queued = self.append_progress(counts);
    }

    fn append_progress(&self, changes: Vec<Progress>) -> Append {
        // One clock reading for the batch: its records are written in one go.
        self.append_progress_at(changes, now_ms())
    }

    /// [`Queue::append_progress`] stamped `timestamp` (a caller that read the clock).
    fn append_progress_at(&self, changes: Vec<Progress>, timestamp: u64) -> Append {
        let records = changes
            .iter()
            .map(|c| Record {
                timestamp,
                headers: Bytes::new(),
                payload: c.encode(),
            })
            .collect();
        self.inner.progress.append(records)
    }

    /// Removes `consumer` from group `key` and rebalances; what it had in flight is
    /// delivered again (to the partition's new owner) with its delivery count kept.
    pub fn leave(&self, key: &GroupKey, consumer: &str) {
        self.tell_left(Some(key), consumer);
        self.with_state(|q, st| {
            if let Some(slot) = st.groups.get_mut(key) {
                slot.sinks.remove(consumer);
                if slot.group.leave(consumer, now_ms()) {
                    debug!(queue = %q.inner.name, group = %key, consumer, "left");
                }
            }
            q.dispatch_all(st, now_ms());
        });
    }

    /// [`Queue::leave`] for every group of this queue and of its dead-letter queue: the
    /// consumer disconnected.
    pub fn leave_all(&self, consumer: &str) {
        self.tell_left(None, consumer);
        self.with_state(|q, st| {
            for slot in st.groups.values_mut() {
                slot.sinks.remove(consumer);
                slot.group.leave(consumer, now_ms());
            }
            q.dispatch_all(st, now_ms());
        });
        if let Some(d) = &self.inner.dead_letters {
            d.leave_all(consumer);
        }
    }

    /// The groups a settle by `consumer` applies to: `key` if given, else every group
    /// it is a member of or holds the message in.
    fn settle_targets(
        st: &State,
        key: Option<&GroupKey>,
        consumer: &str,
        p: usize,
        o: u64,
    ) -> Vec<GroupKey> {
        match key {
            Some(k) => st
                .groups
                .contains_key(k)
                .then(|| k.clone())
                .into_iter()
                .collect(),
            None => st
                .groups
                .iter()
                .filter(|(_, s)| s.group.is_member(consumer) || s.group.holds(p, o, consumer))
                .map(|(k, _)| k.clone())
                .collect(),
        }
    }

    fn locate(&self, id: &MessageId) -> Option<(usize, u64)> {
        (*id.queue == *self.inner.name && id.partition < self.partitions())
            .then_some((id.partition as usize, id.offset))
    }

    /// Acknowledges `id` for `consumer` in group `key` (or, with `None`, in every group
    /// where it counts: see [`GroupKey`]). An ack counts when the message is in flight
    /// to that consumer or waiting for redelivery. It takes effect at once (the window
    /// frees, the next message is offered); the returned future says when it is durable.
    /// If the progress log cannot be written (it turned read-only after an I/O error),
    /// the future fails and the ack holds only until a restart, after which the message
    /// is delivered again: a duplicate, never a loss.
    pub fn ack(&self, consumer: &str, key: Option<&GroupKey>, id: &MessageId) -> Settled {
        self.ack_many(consumer, key, std::slice::from_ref(id))
    }

    /// [`Queue::ack`] for several messages at once (a consumer's PUBACKs that arrived
    /// together): one lock, one dispatch, and one progress record per group. `found` is
    /// true if any of them counted.
    pub fn ack_many(&self, consumer: &str, key: Option<&GroupKey>, ids: &[MessageId]) -> Settled {
        let here: Vec<MessageId>;
        let ids = if self.is_replicated() {
            here = ids
                .iter()
                .filter(|id| !self.settled_elsewhere(SettleHow::Ack, consumer, key, id))
                .cloned()
                .collect();
            &here[..]
        } else {
            ids
        };
        let partitions = self.partitions();
        let locate = |id: &MessageId| {
            (*id.queue == *self.inner.name && id.partition < partitions)
                .then_some((id.partition as usize, id.offset))
        };
        let now = now_ms();
        let changes = {
            let mut st = self.inner.state.lock();
            let mut changes = Vec::new();
            // The partitions whose depth floor this ack may move, when known.
            let mut floor_moves = None;
            match key {
                // A PUBACK names its group: no search and no per-message list of targets.
                Some(k) => {
                    let st = &mut *st;
                    if let Some(slot) = st.groups.get_mut(k) {
                        let mut offsets = Vec::with_capacity(ids.len());
                        let mut moves = Vec::new();
                        for (p, o) in ids.iter().filter_map(locate) {
                            // The floor is the least committed offset of all groups: an
                            // ack by a group above it leaves it where it is (with 100
                            // groups, recomputing it on every ack was a tenth of the work).
                            let at_floor = slot.group.cursor(p).is_none_or(|c| {
                                st.floor_of.get(p).is_none_or(|&f| c.committed() <= f)
                            });
                            if slot.group.ack(p, o, consumer, now) == Settle::Settled {
                                offsets.push((p as u32, o));
                                if at_floor && !moves.contains(&p) {
                                    moves.push(p);
                                }
                            }
                        }
                        if !offsets.is_empty() {
                            changes.push(Progress::Settle(k.clone(), offsets));
                        }
                        floor_moves = Some(moves);
                    }
                }
                None => {
                    let mut settled: BTreeMap<GroupKey, Vec<(u32, u64)>> = BTreeMap::new();
                    for (p, o) in ids.iter().filter_map(locate) {
                        for k in Queue::settle_targets(&st, None, consumer, p, o) {
                            if let Some(slot) = st.groups.get_mut(&k)
                                && slot.group.ack(p, o, consumer, now) == Settle::Settled
                            {
                                settled.entry(k).or_default().push((p as u32, o));
                            }
                        }
                    }
                    changes.extend(
                        settled
                            .into_iter()
                            .map(|(k, offsets)| Progress::Settle(k, offsets)),
                    );
                }
            }
            if !changes.is_empty() {
                st.dirty = true;
                let mut skipped = false;
                for change in &changes {
                    if let Progress::Settle(k, _) = change {
                        skipped |= self.dispatch_freed(&mut st, now, k, consumer);
                    }
                }
                if skipped {
                    self.refresh_floor(&mut st);
                } else if let Some(moves) = floor_moves {
                    if !moves.is_empty() {
                        self.refresh_floor_of(&mut st, &moves);
                    }
                } else {
                    let mut touched = std::mem::take(&mut st.touched);
                    touched.clear();
                    for change in &changes {
                        if let Progress::Settle(_, offsets) = change {
                            for &(p, _) in offsets {
                                if !touched.contains(&(p as usize)) {
                                    touched.push(p as usize);
                                }
                            }
                        }
                    }
                    self.refresh_floor_of(&mut st, &touched);
                    st.touched = touched;
                }
            }
            changes
        };
        self.drain_kicks();
        if let Some(r) = self.replicator() {
            for change in &changes {
                if let Progress::Settle(k, offsets) = change {
                    r.settled(k, offsets);
                }
            }
        }
        Settled {
            found: !changes.is_empty(),
            append: (!changes.is_empty()).then(|| self.append_progress_at(changes, now)),
        }
    }

    /// Negative acknowledgement: redeliver after the backoff
    /// (`backoff_initial_ms * 2^(n-1)`, capped, n = deliveries so far), or dead-letter
    /// it once it has had `max_deliveries`. Returns whether it was in flight to
    /// `consumer`.
    pub fn nack(&self, consumer: &str, key: Option<&GroupKey>, id: &MessageId) -> bool {
        if self.settled_elsewhere(SettleHow::Nack, consumer, key, id) {
            return true;
        }
        let Some((p, o)) = self.locate(id) else {
            return false;
        };
        let now = now_ms();
        let (found, dead, retries) = self.with_state(|q, st| {
            let settings = st.settings;
            let (mut found, mut dead, mut retries) = (false, Vec::new(), Vec::new());
            for k in Queue::settle_targets(st, key, consumer, p, o) {
                let Some(slot) = st.groups.get_mut(&k) else {
                    continue;
                };
                match slot.group.nack(p, o, consumer, now, &settings) {
                    Nack::Ignored => {}
                    Nack::Retry { due, count } => {
                        found = true;
                        retries.push((k, due, count));
                    }
                    Nack::DeadLetter { count } => {
                        found = true;
                        dead.push(DeadItem {
                            key: k,
                            partition: p,
                            offset: o,
                            count,
                            reason: DeadReason::MaxDeliveries,
                        });
                    }
                }
            }
            if found {
                q.dispatch_all(st, now);
            }
            (found, dead, retries)
        });
        if let Some(r) = self.replicator() {
            for (k, due, count) in retries {
                r.nacked(&k, &[(p as u32, o, count, due)]);
            }
        }
        self.dead_letter(dead);
        found
    }

    /// Sends `id` straight to the dead-letter queue (in a dead-letter queue: discards
    /// it). Returns whether it was outstanding for `consumer`.
    pub fn reject(&self, consumer: &str, key: Option<&GroupKey>, id: &MessageId) -> bool {
        if self.settled_elsewhere(SettleHow::Reject, consumer, key, id) {
            return true;
        }
        let Some((p, o)) = self.locate(id) else {
            return false;
        };
        if self.inner.dead_letters.is_none() {
            let settled = self.ack(consumer, key, id);
            return settled.found;
        }
        let dead = self.with_state(|_, st| {
            let mut dead = Vec::new();
            for k in Queue::settle_targets(st, key, consumer, p, o) {
                if let Some(slot) = st.groups.get_mut(&k)
                    && let Some(count) = slot.group.reject(p, o, consumer)
                {
                    dead.push(DeadItem {
                        key: k,
                        partition: p,
                        offset: o,
                        count,
                        reason: DeadReason::Rejected,
                    });
                }
            }
            dead
        });
        let found = !dead.is_empty();
        self.dead_letter(dead);
        found
    }

    /// Copies each item to the dead-letter queue; the group settles it only once that
    /// copy is durable, and keeps it for redelivery if the copy fails.
    fn dead_letter(&self, items: Vec<DeadItem>) {
        let Some(dlq) = self.inner.dead_letters.clone() else {
            return;
        };
        let logs = self.logs();
        for item in items {
            let Some(log) = logs.get(item.partition) else {
                continue;
            };
            let read = log.read(
                item.offset,
                ReadLimit {
                    max_records: 1,
                    max_bytes: 1,
                },
            );
            let record = match read {
                Ok(mut records) if !records.is_empty() => records.swap_remove(0),
                Err(roost_storage::Error::OffsetOutOfRange { start, .. })
                    if item.offset < start =>
                {
                    // Retention took it already: nothing to copy, nothing to redeliver.
                    self.dead_letter_done(&item, true);
                    continue;
                }
                other => {
                    warn!(queue = %self.inner.name, partition = item.partition,
                          offset = item.offset, result = ?other.err(),
                          "cannot read message to dead-letter it; it stays for redelivery");
                    self.dead_letter_done(&item, false);
                    continue;
                }
            };
            let Some(h) = decode_message(&record.headers) else {
                self.dead_letter_done(&item, true);
                continue;
            };
            let origin = Origin {
                partition: item.partition as u32,
                offset: item.offset,
                delivery_count: item.count,
                reason: item.reason,
            };
            let msg = NewMessage {
                subtopic: String::from_utf8_lossy(&h.subtopic).into_owned(),
                partition_key: None,
                headers: h.headers,
                payload: record.payload,
                ..NewMessage::default()
            };
            let started = dlq.start_produce(msg, Some((origin, record.timestamp)));
            let handle = tokio::runtime::Handle::try_current();
            match (started, handle) {
                (Ok((_, append, reservation, size, _)), Ok(handle)) => {
                    let this = self.clone();
                    let dlq = dlq.clone();
                    handle.spawn(async move {
                        let result = append.await;
                        drop(reservation);
                        match result {
                            Ok(_) => {
                                dlq.inner.stored.fetch_add(1, Ordering::SeqCst);
                                dlq.inner.stored_bytes.fetch_add(size, Ordering::SeqCst);
                                this.dead_letter_done(&item, true);
                                dlq.kick();
                            }
                            Err(e) => {
                                warn!(queue = %this.inner.name, error = %e,
                                      "dead-letter append failed; message stays for redelivery");
                                this.dead_letter_done(&item, false);
                            }
                        }
                    });
                }
                (Err(e), _) => {
                    warn!(queue = %self.inner.name, error = %e,
                          "cannot dead-letter message; it stays for redelivery");
                    self.dead_letter_done(&item, false);
                }
                (Ok(_), Err(_)) => self.dead_letter_done(&item, false),
            }
        }
    }

    fn dead_letter_done(&self, item: &DeadItem, ok: bool) {
        let now = now_ms();
        let change = self.with_state(|q, st| {
            let backoff = st.settings.backoff(item.count);
            let slot = st.groups.get_mut(&item.key)?;
            let change = if ok {
                slot.group
                    .dead_lettered(item.partition, item.offset)
                    .then(|| {
                        Progress::Settle(
                            item.key.clone(),
                            vec![(item.partition as u32, item.offset)],
                        )
                    })
            } else {
                slot.group
                    .dead_letter_failed(item.partition, item.offset, now + backoff);
                None
            };
            st.dirty |= change.is_some();
            q.dispatch_all(st, now);
            change
        });
        if let Some(change) = change {
            // Every replica learns that the message left the group (else a new leader
            // would dead-letter it again).
            if let (Some(r), Progress::Settle(k, offsets)) = (self.replicator(), &change) {
                r.settled(k, offsets);
            }
            let _queued = self.append_progress(vec![change]);
        }
    }

    /// Timers: deliveries past their ack timeout are redelivered (or dead-lettered after
    /// `max_deliveries`), redeliveries whose backoff has passed are offered, refused
    /// offers are retried. `now` is milliseconds since the epoch. Cheap; the broker
    /// calls it every few hundred milliseconds (or see [`crate::Queues::spawn_timers`]).
    pub fn tick(&self, now: u64) {
        let dead = self.with_state(|q, st| {
            let settings = st.settings;
            let mut dead = Vec::new();
            for (k, slot) in st.groups.iter_mut() {
                for d in slot.group.expire_where(now, &settings, |p| q.is_led(p)) {
                    dead.push(DeadItem {
                        key: k.clone(),
                        partition: d.partition,
                        offset: d.offset,
                        count: d.count,
                        reason: DeadReason::MaxDeliveries,
                    });
                }
            }
            q.dispatch_all(st, now);
            dead
        });
        self.dead_letter(dead);
        if let Some(d) = &self.inner.dead_letters {
            d.tick(now);
        }
    }

    /// Housekeeping, every second or so: [`Queue::tick`], then a durable snapshot of the
    /// groups' progress if it changed, then deleting progress segments before that
    /// snapshot and partition segments every group has passed (and any purge), then
    /// retention by age and size (`retention_ms`, `retention_bytes`), which deletes
    /// segments whether or not groups have consumed them.
    pub async fn maintain(&self, now: u64) -> Result<(), QueueError> {
        self.tick(now);
        self.maintain_one(now).await?;
        if let Some(d) = &self.inner.dead_letters {
            d.maintain_one(now).await?;
        }
        Ok(())
    }

    async fn maintain_one(&self, now: u64) -> Result<(), QueueError> {
        self.check_deleted()?;
        let snapshot = {
            let mut st = self.inner.state.lock();
            std::mem::take(&mut st.dirty).then(|| {
                let snap = snapshot_of(&st);
                let truncatable = truncatable_of(&snap, self.logs().len());
                // Appended under the lock: no settle or delivery record can land
                // between the state the snapshot shows and the snapshot itself (a
                // replay would let the snapshot undo it). The dropped offsets and the
                // delivery counts of what is outstanding follow it, as the snapshot
                // does not hold them.
                let mut records = vec![Progress::Snapshot(snap)];
                records.extend(drops_of(&st));
                records.extend(delivery_counts_of(&st));
                (truncatable, self.append_progress(records))
            })
        };
        if let Some((truncatable, appended)) = snapshot {
            match appended.await {
                Ok(offset) => {
                    // An unfinished transfer's record stays until its target is stored.
                    let keep = self.inner.ledger.lock().keep_from();
                    let progress = self.inner.progress.clone();
                    off_the_workers(move || {
                        progress
                            .truncate_before(keep.map_or(offset, |k| k.min(offset)))
                            .map(drop)
                    })
                    .await?;
                    self.inner.state.lock().truncatable = truncatable;
                }
                Err(e) => {
                    self.inner.state.lock().dirty = true;
                    return Err(e.into());
                }
            }
        }
        let truncatable = self.inner.state.lock().truncatable.clone();
        let logs = self.logs();
        let retention = self.inner.config.read().retention();
        let deleting = logs.clone();
        off_the_workers(move || {
            for (p, log) in deleting.iter().enumerate() {
                if let Some(&t) = truncatable.get(p) {
                    log.truncate_before(t)?;
                }
                log.set_retention(retention);
                log.enforce_retention(now)?;
            }
            Ok(())
        })
        .await?;
        self.inner
            .stored_bytes
            .store(logs.iter().map(Log::size_bytes).sum(), Ordering::SeqCst);
        self.with_state(|_, st| {
            for (p, log) in logs.iter().enumerate() {
                let start = log.start_offset();
                for slot in st.groups.values_mut() {
                    slot.group.clamp_start(p, start);
                }
            }
        });
        self.inner.room.notify_waiters();
        Ok(())
    }

    /// Moves group `key` (created if new) to `to` in every partition; what follows is
    /// delivered again. Outstanding deliveries are forgotten. Resolves once durable.
    pub async fn reset(&self, key: &GroupKey, to: ResetTo) -> Result<(), QueueError> {
        self.check_deleted()?;
        let logs = self.logs();
        let mut targets = Vec::new();
        for (p, log) in logs.iter().enumerate() {
            let (start, end) = (log.start_offset(), log.next_offset());
            let target = match to {
                ResetTo::Earliest => start,
                ResetTo::Latest => end,
                ResetTo::Offset(o) => o,
                ResetTo::PartitionOffset { partition, offset } if partition as usize == p => offset,
                ResetTo::PartitionOffset { .. } => continue,
                ResetTo::Timestamp(t) => log.offset_for_timestamp(t)?,
            };
            targets.push((p, target.clamp(start, end)));
        }
        let append = self.with_state(|q, st| {
            q.ensure_group(st, key);
            let floors = st.floors.clone();
            let slot = st.groups.get_mut(key)?;
            let mut changes = Vec::new();
            for &(p, t) in &targets {
                let t = t.max(floors.get(p).copied().unwrap_or(0));
                slot.group.reset(p, t);
                changes.push(Progress::Reset(key.clone(), p as u32, t));
            }
            st.dirty = true;
            q.dispatch_all(st, now_ms());
            Some(q.append_progress(changes))
        });
        if let Some(a) = append {
            a.await?;
        }
        Ok(())
    }

    /// Forgets group `key`: its progress and members (whose sinks get nothing more).
    pub async fn delete_group(&self, key: &GroupKey) -> Result<bool, QueueError> {
        let removed = self.with_state(|_, st| {
            let removed = st.groups.remove(key).is_some();
            st.dirty |= removed;
            removed
        });
        if removed {
            self.append_progress(vec![Progress::Delete(key.clone())])
                .await?;
        }
        Ok(removed)
    }

    /// Deletes every message now in the queue, for every group (present and future);
    /// in-flight deliveries may still be settled. Resolves once durable; the segments
    /// go at the next [`Queue::maintain`].
    pub async fn purge(&self) -> Result<(), QueueError> {
        self.check_deleted()?;
        let logs = self.logs();
        let append = self.with_state(|q, st| {
            let mut changes = Vec::new();
            for (p, log) in logs.iter().enumerate() {
                let end = log.next_offset();
                if let Some(f) = st.floors.get_mut(p) {
                    *f = (*f).max(end);
                }
                for slot in st.groups.values_mut() {
                    slot.group.clamp_start(p, end);
                }
                changes.push(Progress::Purge(p as u32, end));
            }
            st.dirty = true;
            q.append_progress(changes)
        });
        append.await?;
        self.inner.room.notify_waiters();
        Ok(())
    }

    /// Counts for the admin API.
    pub fn info(&self) -> QueueInfo {
        let logs = self.logs();
        let groups = {
            let st = self.inner.state.lock();
            st.groups
                .iter()
                .map(|(k, s)| GroupInfo {
                    key: k.clone(),
                    members: s.group.members().cloned().collect(),
                    windows: s.group.members().map(|m| s.group.window_of(m)).collect(),
                    lag: logs
                        .iter()
                        .enumerate()
                        .filter_map(|(p, l)| s.group.cursor(p).map(|c| c.lag(l.next_offset())))
                        .sum(),
                    in_flight: s.group.inflight(),
                    waiting: s.group.waiting(),
                    delayed: s.group.delayed(),
                })
                .collect()
        };
        QueueInfo {
            name: self.inner.name.to_string(),
            config: self.config(),
            depth: self.depth(),
            bytes: self.bytes(),
            groups,
            dead_letters: self.inner.dead_letters.as_ref().map_or(0, Queue::depth),
            damage: {
                self.collect_damage();
                self.inner.damage.lock().clone()
            },
        }
    }

    /// Applies new settings (partitions may only grow; a durability change applies
    /// when the queue is next opened).
    pub(crate) fn reconfigure(&self, config: QueueConfig) -> Result<(), QueueError> {
        let old = self.logs();
        let want = config.partitions as usize;
        if !self.inner.is_dead_letter_queue && want > old.len() {
            let mut logs: Vec<Log> = old.to_vec();
            for p in old.len()..want {
                let name = partition_log_name(&self.inner.stem, false, p);
                let (log, _) = self.inner.storage.open_log(&name, config.log_config())?;
                logs.push(log);
            }
            let added: Vec<u64> = logs[old.len()..].iter().map(Log::start_offset).collect();
            {
                let mut st = self.inner.state.lock();
                *self.inner.logs.write() = logs.into();
                st.floors.resize(want, 0);
                st.truncatable.resize(want, 0);
                st.dropped.resize(want, BTreeSet::new());
                for slot in st.groups.values_mut() {
                    slot.group.add_partitions(&added);
                }
                st.dirty = true;
            }
        }
        let mut settings = config.settings();
        if self.inner.is_dead_letter_queue {
            settings.max_deliveries = 0;
        }
        for log in self.logs().iter() {
            log.set_retention(config.retention());
        }
        {
            // Turning last-value on applies to messages stored from now on (only they
            // carry their key in the queue header).
            let mut newest = self.inner.last_values.lock();
            if config.last_value && !self.inner.is_dead_letter_queue {
                newest.resize(self.logs().len(), HashMap::new());
            } else {
                newest.clear();
            }
        }
        self.inner.state.lock().settings = settings;
        let mut cfg = config;
        if self.inner.is_dead_letter_queue {
            cfg.partitions = 1;
        }
        *self.inner.config.write() = cfg.clone();
        if let Some(d) = &self.inner.dead_letters {
            d.reconfigure(cfg.dead_letter_config())?;
        }
        self.kick();
        Ok(())
    }

    /// Marks the queue deleted and deletes its logs (and its dead-letter queue's).
    pub(crate) fn destroy(&self) -> Result<(), QueueError> {
        self.inner.deleted.store(true, Ordering::SeqCst);
        self.inner.state.lock().groups.clear();
        self.inner.room.notify_waiters();
        let dlq = self.inner.is_dead_letter_queue;
        for p in 0..self.logs().len() {
            self.inner
                .storage
                .delete_log(&partition_log_name(&self.inner.stem, dlq, p))?;
        }
        self.inner
            .storage
            .delete_log(&progress_log_name(&self.inner.stem, dlq))?;
        if let Some(d) = &self.inner.dead_letters {
            d.destroy()?;
        }
        Ok(())
    }
}

/// Where partition `p`'s depth starts: the oldest message some group has not settled,
/// or, with no group, the oldest held (never below a purge or the log's start).
/// Moves a record out of a read buffer, leaving an empty one (no allocation).
fn take_record(r: &mut roost_storage::LogRecord) -> roost_storage::LogRecord {
    std::mem::replace(
        r,
        roost_storage::LogRecord {
            offset: r.offset,
            timestamp: 0,
            headers: Bytes::new(),
            payload: Bytes::new(),
        },
    )
}

fn partition_floor(st: &State, p: usize, log: &Log) -> u64 {
    let held = st
        .floors
        .get(p)
        .copied()
        .unwrap_or(0)
        .max(log.start_offset());
    let floor = st
        .groups
        .values()
        .filter_map(|s| s.group.cursor(p).map(|c| c.committed()))
        .min()
        .unwrap_or(held);
    floor.max(held).min(log.next_offset())
}

/// Offsets `offsets` of partition `p` (whose log starts at `start`) go to no group,
/// present or future: settled in every group, remembered for groups made later, and
/// the floor raised over those that reach it.
fn apply_drop(st: &mut State, p: usize, offsets: &[u64], start: u64) {
    let (Some(dropped), Some(floor)) = (st.dropped.get_mut(p), st.floors.get_mut(p)) else {
        return;
    };
    dropped.extend(offsets.iter().copied());
    let mut f = (*floor).max(start);
    while dropped.remove(&f) {
        f += 1;
    }
    if f > *floor {
        *floor = f;
    }
    *dropped = dropped.split_off(floor);
    for slot in st.groups.values_mut() {
        for &o in offsets {
            slot.group.replay_settled(p, o);
        }
    }
}

/// The dropped offsets as progress records (written after a snapshot, which lacks them).
fn drops_of(st: &State) -> Vec<Progress> {
    st.dropped
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.is_empty())
        .map(|(p, d)| Progress::Drop(p as u32, d.iter().copied().collect()))
        .collect()
}

/// Reads what the in-memory indexes need back from the partitions: the `dedup-id`s
/// stored within `dedup_window_ms`, and for a last-value queue the newest offset of
/// each partition key among the messages some group may still get.
fn rebuild_indexes(
    name: &str,
    dlq: bool,
    logs: &[Log],
    config: &QueueConfig,
    st: &State,
    notes: &mut Vec<String>,
) -> (Dedup, Vec<HashMap<Bytes, u64>>) {
    let mut dedup = Dedup::default();
    let last_value = config.last_value && !dlq;
    let mut newest = if last_value {
        vec![HashMap::new(); logs.len()]
    } else {
        Vec::new()
    };
    let since = now_ms().saturating_sub(config.dedup_window_ms);
    let queue: Arc<str> = Arc::from(name);
    for (p, log) in logs.iter().enumerate() {
        let dedup_from = match log.offset_for_timestamp(since) {
            Ok(o) => o,
            Err(e) => {
                notes.push(format!(
                    "queue {name} partition {p}: dedup ids not read back ({e})"
                ));
                log.next_offset()
            }
        };
        let mut from = if last_value {
            let floor = st.floors.get(p).copied().unwrap_or(0);
            log.start_offset().max(floor)
        } else {
            dedup_from
        };
        while from < log.next_offset() {
            let batch = match log.read(from, ReadLimit::bytes(1 << 20)) {
                Ok(b) if !b.is_empty() => b,
                Ok(_) => break,
                Err(e) => {
                    notes.push(format!(
                        "queue {name} partition {p}: unreadable from offset {from} ({e}); \
                         dedup ids and last values after it are not known"
                    ));
                    break;
                }
            };
            for rec in batch {
                from = rec.offset + 1;
                let Some(h) = decode_message(&rec.headers) else {
                    continue;
                };
                if let Some(id) = h.meta.dedup_id
                    && rec.offset >= dedup_from
                {
                    let mid = MessageId {
                        queue: queue.clone(),
                        partition: p as u32,
                        offset: rec.offset,
                    };
                    dedup.insert(id, mid, rec.timestamp);
                }
                if let (Some(k), Some(m)) = (h.meta.key, newest.get_mut(p)) {
                    m.insert(k, rec.offset);
                }
            }
        }
    }
    (dedup, newest)
}

/// Runs segment deletion (unlinks and a directory fdatasync) on tokio's blocking
/// threads: on a worker, unlinking 16 MiB segments whose pages were still cached held
/// it, and every connection it served, for about 100 ms once a second under load.
async fn off_the_workers(
    work: impl FnOnce() -> roost_storage::Result<()> + Send + 'static,
) -> roost_storage::Result<()> {
    // A join error means the runtime is shutting down (the closure does not panic).
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or(Err(roost_storage::Error::Closed))
}

fn snapshot_of(st: &State) -> Snapshot {
    Snapshot {
        floors: st.floors.clone(),
        groups: st
            .groups
            .iter()
            .map(|(k, s)| {
                let parts = s
                    .group
                    .cursors()
                    .iter()
                    .map(|c| (c.committed(), c.acked().collect()))
                    .collect();
                (k.clone(), parts)
            })
            .collect(),
    }
}

/// Per partition, the offset below which every group (and any purge) is past, as
/// `snap` records it: the segments before it may go.
fn truncatable_of(snap: &Snapshot, partitions: usize) -> Vec<u64> {
    (0..partitions)
        .map(|p| {
            let floor = snap.floors.get(p).copied().unwrap_or(0);
            snap.groups
                .iter()
                .filter_map(|(_, parts)| parts.get(p).map(|c| c.0))
                .min()
                .map_or(floor, |m| m.max(floor))
        })
        .collect()
}

/// The delivery counts of every group's outstanding messages, one record per group.
fn delivery_counts_of(st: &State) -> Vec<Progress> {
    st.groups
        .iter()
        .filter_map(|(k, s)| {
            let items: Vec<(u32, u64, u32)> = s
                .group
                .cursors()
                .iter()
                .enumerate()
                .flat_map(|(p, c)| c.delivery_counts().map(move |(o, n)| (p as u32, o, n)))
                .collect();
            (!items.is_empty()).then(|| Progress::Delivered(k.clone(), items))
        })
        .collect()
}

/// Rebuilds the groups from the progress log.
fn replay(
    name: &str,
    progress: &Log,
    logs: &[Log],
    st: &mut State,
    ledger: &mut Ledger,
    notes: &mut Vec<String>,
) {
    let n = logs.len();
    let starts = |floors: &[u64]| -> Vec<u64> {
        logs.iter()
            .enumerate()
            .map(|(p, l)| l.start_offset().max(floors.get(p).copied().unwrap_or(0)))
            .collect()
    };
    let mut from = progress.start_offset();
    let mut bad = 0u64;
    'read: loop {
        let batch = match progress.read(from, ReadLimit::bytes(1 << 20)) {
            Ok(b) if b.is_empty() => break,
            Ok(b) => b,
            Err(e) => {
                notes.push(format!(
                    "queue {name}: group progress unreadable from offset {from} ({e}); \
                     messages settled after that may be delivered again"
                ));
                break 'read;
            }
        };
        for rec in batch {
            from = rec.offset + 1;
            let Some(change) = Progress::decode(&rec.payload) else {
                bad += 1;
                continue;
            };
            match change {
                Progress::Declare(k) => {
                    if !st.groups.contains_key(&k) {
                        let g = Group::new(&starts(&st.floors));
                        st.groups.insert(
                            k,
                            Slot {
                                group: g,
                                sinks: BTreeMap::new(),
                                blocked: BTreeSet::new(),
                                handovers: BTreeSet::new(),
                            },
                        );
                    }
                }
                Progress::Settle(k, ids) => {
                    if let Some(slot) = st.groups.get_mut(&k) {
                        for (p, o) in ids {
                            slot.group.replay_settled(p as usize, o);
                        }
                    }
                }
                Progress::Delivered(k, items) => {
                    if let Some(slot) = st.groups.get_mut(&k) {
                        for (p, o, count) in items {
                            slot.group.replay_delivered(p as usize, o, count);
                        }
                    }
                }
                Progress::Reset(k, p, o) => {
                    if let Some(slot) = st.groups.get_mut(&k) {
                        slot.group.reset(p as usize, o);
                    }
                }
                Progress::Delete(k) => {
                    st.groups.remove(&k);
                }
                Progress::Purge(p, o) => {
                    if let Some(f) = st.floors.get_mut(p as usize) {
                        *f = (*f).max(o);
                    }
                    for slot in st.groups.values_mut() {
                        slot.group.clamp_start(p as usize, o);
                    }
                }
                Progress::Transfer(t) => {
                    let p = t.partition as usize;
                    if t.drop {
                        let start = logs.get(p).map_or(0, Log::start_offset);
                        apply_drop(st, p, &[t.offset], start);
                    } else {
                        for k in &t.keys {
                            if let Some(slot) = st.groups.get_mut(k) {
                                slot.group.replay_settled(p, t.offset);
                            }
                        }
                    }
                    ledger.saw_txn(t.txn);
                    ledger.recovered.insert(
                        t.txn,
                        Recovered {
                            timestamp: rec.timestamp,
                            transfer: t,
                        },
                    );
                }
                Progress::TransferDone(txn) => {
                    ledger.saw_txn(txn);
                    ledger.recovered.remove(&txn);
                }
                Progress::Drop(p, offsets) => {
                    let start = logs.get(p as usize).map_or(0, Log::start_offset);
                    apply_drop(st, p as usize, &offsets, start);
                }
                Progress::Snapshot(s) => {
                    st.floors = s.floors;
                    st.floors.resize(n, 0);
                    st.groups.clear();
                    for (k, parts) in s.groups {
                        let mut cursors: Vec<_> = parts
                            .into_iter()
                            .take(n)
                            .map(|(c, acked)| crate::group::Cursor::restored(c, acked))
                            .collect();
                        let have = cursors.len();
                        let mut g = Group::from_cursors(std::mem::take(&mut cursors));
                        if have < n {
                            g.add_partitions(&vec![0; n - have]);
                        }
                        st.groups.insert(
                            k,
                            Slot {
                                group: g,
                                sinks: BTreeMap::new(),
                                blocked: BTreeSet::new(),
                                handovers: BTreeSet::new(),
                            },
                        );
                    }
                }
            }
        }
    }
    if bad > 0 {
        notes.push(format!(
            "queue {name}: {bad} undecodable group progress records skipped"
        ));
    }
    st.floors.resize(n, 0);
    st.dropped.resize(n, BTreeSet::new());
    for slot in st.groups.values_mut() {
        if slot.group.partitions() < n {
            let missing = n - slot.group.partitions();
            slot.group.add_partitions(&vec![0; missing]);
        }
        for (p, log) in logs.iter().enumerate() {
            slot.group
                .clamp_start(p, log.start_offset().max(st.floors[p]));
            slot.group.clamp_end(p, log.next_offset());
        }
    }
    st.truncatable = st
        .floors
        .iter()
        .enumerate()
        .map(|(p, &f)| {
            st.groups
                .values()
                .filter_map(|s| s.group.cursor(p).map(|c| c.committed()))
                .min()
                .map_or(f, |m| m.max(f))
        })
        .collect();
}
