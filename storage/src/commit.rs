//! Group commit: `Fsync` logs go through one journal thread, `Buffered` logs through
//! one committer thread, and a small pool of threads runs the syncs that can wait.
//!
//! Appenders queue records on their log and schedule the log (once per batch, not per
//! append):
//!
//! - An `Fsync` log goes to the journal thread. Each round it takes every scheduled
//!   log's queued appends, writes each log's records to its segment (one write(2) per
//!   log, more only when a segment rolls) and the same frames into one journal write,
//!   fdatasyncs the journal once, then publishes every log of the round and resolves
//!   its appenders (see `journal.rs`). While a sync waits on the disk, new appends pile
//!   up, so the next round carries them all: the batch grows with the load, at one
//!   fdatasync per round for every log. Under sustained load rounds start at most once
//!   per [`SYNC_GAP`].
//! - When a journal file is full the thread moves on to the other one and the pool
//!   runs the full one's checkpoint: an fdatasync of every log written during its lap,
//!   then a new epoch that voids its entries.
//! - A `Buffered` log goes to the committer thread, which writes it and resolves its
//!   appenders at once, and hands it to the pool for an fdatasync once its sync interval
//!   has passed (the log is not written while that sync runs).
//!
//! A log is written by one thread at a time and never while its sync is in flight, so
//! what a sync publishes is exactly what it covered. A write error makes that log
//! read-only ([`crate::Error::ReadOnly`]) and fails every append of its batch; a journal
//! write or sync error does so for every log of the round, and then for every `Fsync`
//! log that comes after (what the journal holds can no longer be trusted).

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::Result;
use crate::journal::{self, JournalFile};
use crate::latency::SyncLatency;
use crate::log::{CommitQueue, Completion, LogInner, PendingAppend};
use crate::space::{self, SpaceGuard};
use crate::{Durability, Offset};

/// Which logs' fdatasyncs fail (see [`crate::Storage::inject_sync_failure`]).
pub(crate) type SyncFault = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// What appenders, the committer, the journal thread and the sync pool share.
pub(crate) struct CommitShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    journal: Mutex<Queue>,
    journal_wake: Condvar,
    pool: Mutex<PoolQueue>,
    pool_wake: Condvar,
    /// Which journal files are free to be written (their checkpoint is done).
    laps: Mutex<Laps>,
    laps_wake: Condvar,
    /// Every data-file fdatasync of this storage: the journal's and each log's.
    pub(crate) syncs: SyncLatency,
    /// Test hook: the next journal write fails.
    #[cfg(test)]
    pub(crate) journal_fault: std::sync::atomic::AtomicBool,
    /// Fault injection (a slow disk): milliseconds every data-file fdatasync waits
    /// first. 0 in normal operation; see [`crate::Storage::inject_sync_delay`].
    pub(crate) sync_delay_ms: std::sync::atomic::AtomicU64,
    /// Fault injection (a failing disk): the logs whose fdatasync fails; see
    /// [`crate::Storage::inject_sync_failure`]. Unset in normal operation.
    pub(crate) sync_fault: std::sync::OnceLock<SyncFault>,
    /// Whether the file system has room for a round (see `space.rs`).
    pub(crate) space: SpaceGuard,
    /// Damaged files copied into the quarantine directory since open (on open or while
    /// reading): `roost_storage_quarantined_total`.
    pub(crate) quarantined: AtomicU64,
}

/// A ready queue: the committer's (`Buffered` logs) or the journal thread's (`Fsync`).
#[derive(Default)]
struct Queue {
    ready: Vec<Arc<LogInner>>,
    stopping: bool,
    stopped: bool,
}

/// The sync pool's queue.
#[derive(Default)]
struct PoolQueue {
    jobs: VecDeque<Job>,
    /// Jobs queued or running.
    active: usize,
    /// Threads waiting for a job.
    idle: usize,
    /// No more jobs are accepted.
    stopped: bool,
}

/// Work for a pool thread.
enum Job {
    /// The interval sync of a `Buffered` log.
    Background(Arc<LogInner>),
    /// A full journal file's checkpoint.
    Checkpoint(Box<Checkpoint>),
}

/// A journal file to void once the logs written during its lap are synced.
struct Checkpoint {
    index: usize,
    file: JournalFile,
    logs: Vec<Arc<LogInner>>,
}

struct Laps {
    /// The journal files free to be written next; a file is out of here while the
    /// journal thread writes it and while its checkpoint runs.
    files: [Option<JournalFile>; 2],
    /// The first error of a checkpoint: its file cannot be voided, so the journal stops.
    failed: Option<Arc<io::Error>>,
}

impl CommitShared {
    pub(crate) fn new(files: Vec<JournalFile>, dir: &std::path::Path) -> CommitShared {
        let mut files = files.into_iter();
        CommitShared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            journal: Mutex::new(Queue::default()),
            journal_wake: Condvar::new(),
            pool: Mutex::new(PoolQueue::default()),
            pool_wake: Condvar::new(),
            laps: Mutex::new(Laps {
                files: [files.next(), files.next()],
                failed: None,
            }),
            laps_wake: Condvar::new(),
            syncs: SyncLatency::new(),
            #[cfg(test)]
            journal_fault: std::sync::atomic::AtomicBool::new(false),
            sync_delay_ms: std::sync::atomic::AtomicU64::new(0),
            sync_fault: std::sync::OnceLock::new(),
            space: SpaceGuard::new(dir),
            quarantined: AtomicU64::new(0),
        }
    }

    /// Voids both journal files (after recovery replayed them).
    pub(crate) fn reset_journal(&self) -> io::Result<()> {
        let mut laps = self.laps.lock();
        for file in laps.files.iter_mut().flatten() {
            file.reset()?;
        }
        Ok(())
    }

    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        let mut p = self.pool.lock();
        if p.stopped {
            return Err(job);
        }
        p.jobs.push_back(job);
        p.active += 1;
        let wake = p.idle > 0;
        drop(p);
        if wake {
            self.pool_wake.notify_one();
        }
        Ok(())
    }

    /// The next job, or `None` when the pool has stopped and nothing is left.
    fn next_job(&self) -> Option<Job> {
        let mut p = self.pool.lock();
        loop {
            if let Some(job) = p.jobs.pop_front() {
                return Some(job);
            }
            if p.stopped {
                return None;
            }
            p.idle += 1;
            self.pool_wake.wait(&mut p);
            p.idle -= 1;
        }
    }

    fn job_done(&self) {
        self.pool.lock().active -= 1;
    }
}

impl CommitQueue for CommitShared {
    fn syncs(&self) -> &SyncLatency {
        &self.syncs
    }

    fn before_sync(&self) {
        let ms = self.sync_delay_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    fn sync_fails(&self, log: &str) -> bool {
        self.sync_fault.get().is_some_and(|fails| fails(log))
    }

    fn quarantined(&self) -> &AtomicU64 {
        &self.quarantined
    }

    fn schedule(&self, log: Arc<LogInner>) -> bool {
        let (queue, wake) = if log.config.durability == Durability::Fsync {
            (&self.journal, &self.journal_wake)
        } else {
            (&self.queue, &self.wake)
        };
        let mut q = queue.lock();
        if q.stopped {
            return false;
        }
        q.ready.push(log);
        drop(q);
        wake.notify_one();
        true
    }
}

/// Owns the committer and journal threads; dropping it drains queued appends, syncs,
/// and joins.
pub(crate) struct Committer {
    shared: Arc<CommitShared>,
    journal: Option<JoinHandle<()>>,
    commit: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the threads on `shared` (built by [`CommitShared::new`] with both journal
    /// files, already voided by recovery). The journal is sized `journal_bytes` per file.
    pub(crate) fn start(shared: Arc<CommitShared>, journal_bytes: u64) -> io::Result<Committer> {
        let mut started = 0;
        let mut first_error = None;
        for i in 0..SYNC_THREADS {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name(format!("roost-sync-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || pool_thread(&s))
            {
                Ok(_) => started += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if started == 0 {
            return Err(first_error.unwrap_or_else(|| io::Error::other("no sync threads")));
        }
        let s = shared.clone();
        let journal = match std::thread::Builder::new()
            .name("roost-journal".into())
            .spawn(move || journal_thread(&s, journal_bytes))
        {
            Ok(t) => t,
            Err(e) => {
                stop_pool(&shared);
                return Err(e);
            }
        };
        let mut committer = Committer {
            shared: shared.clone(),
            journal: Some(journal),
            commit: None,
        };
        let s = shared.clone();
        match std::thread::Builder::new()
            .name("roost-commit".into())
            .spawn(move || run(&s))
        {
            Ok(t) => committer.commit = Some(t),
            Err(e) => {
                committer.stop_journal();
                stop_pool(&shared);
                return Err(e);
            }
        }
        Ok(committer)
    }

    pub(crate) fn shared(&self) -> &Arc<CommitShared> {
        &self.shared
    }

    fn stop_journal(&mut self) {
        self.shared.journal.lock().stopping = true;
        self.shared.journal_wake.notify_one();
        if let Some(t) = self.journal.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // The journal first: its last checkpoint runs on its own thread, the pool
        // stays up for the committer's final interval syncs.
        self.stop_journal();
        self.shared.queue.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.commit.take() {
            let _ = t.join();
        }
    }
}

fn stop_pool(shared: &CommitShared) {
    shared.pool.lock().stopped = true;
    shared.pool_wake.notify_all();
}

fn resolve(done: &mut Vec<Completion>, result: impl Fn(Offset) -> Result<Offset>) {
    for (tx, offset) in done.drain(..) {
        let _ = tx.send(result(offset));
    }
}

/// Refuses `appends` of a round that does not fit on the disk; the log stays writable.
fn refuse_no_space(
    shared: &CommitShared,
    appends: &mut Vec<PendingAppend>,
    round: &mut space::Round,
) -> bool {
    let bytes: u64 = appends.iter().map(PendingAppend::framed_bytes).sum();
    // Segment and journal both take the bytes of an `Fsync` round.
    let Some(short) = shared.space.check_in(bytes.saturating_mul(2), round) else {
        return false;
    };
    for a in appends.drain(..) {
        let _ = a.tx.send(Err(shared.space.error(short)));
    }
    true
}

fn fail_all(log: &LogInner, done: &mut Vec<Completion>, rest: &mut Vec<PendingAppend>) {
    for (tx, _) in done.drain(..) {
        let _ = tx.send(Err(log.write_error()));
    }
    for a in rest.drain(..) {
        let _ = a.tx.send(Err(log.write_error()));
    }
}

/// Threads for the syncs that can wait: `Buffered` interval syncs and journal
/// checkpoints (which sync many logs: the file system folds concurrent syncs into
/// shared device flushes). They mostly sleep in the kernel.
const SYNC_THREADS: usize = 8;

/// Under sustained load journal rounds start at least this far apart, unless
/// [`FULL_BATCH`] appends are waiting already. Every fdatasync has a fixed cost (here,
/// in a VM: ~3 device requests and ~75 us of CPU), so syncing as fast as the disk
/// answers spends more syncs on smaller rounds; this caps it at 2,000 rounds a second
/// (at most ~15% of a core in syncs, reached only under a load that fills each round
/// with hundreds of appends) and adds at most this much latency when the disk is
/// faster. 1 ms measured 10-25% fewer queue messages a second end to end at 256 in
/// flight (latency-bound) for the same CPU per message. A round after an idle spell
/// starts at once.
const SYNC_GAP: Duration = Duration::from_micros(500);

/// Appends that make a round worth syncing without waiting out [`SYNC_GAP`].
const FULL_BATCH: usize = 512;

/// How often a stopping committer looks whether the pool has finished.
const STOP_POLL: Duration = Duration::from_millis(2);

fn pool_thread(shared: &CommitShared) {
    while let Some(job) = shared.next_job() {
        match job {
            Job::Background(log) => {
                if let Err(e) = log.background_sync() {
                    let _ = log.on_error(e);
                }
                if log.end_sync() && !shared.schedule(log.clone()) {
                    log.fail_stranded();
                }
            }
            Job::Checkpoint(c) => checkpoint(shared, *c),
        }
        shared.job_done();
    }
}

/// Syncs the logs of a full journal file's lap, then voids the file and frees it.
fn checkpoint(shared: &CommitShared, c: Checkpoint) {
    let Checkpoint {
        index,
        mut file,
        logs,
    } = c;
    let mut result = Ok(());
    for log in &logs {
        if let Err(e) = log.checkpoint_sync() {
            // The log's records are in the page cache and this journal file only: keep
            // the file (never voided now) and stop the journal.
            result = Err(log.fail(io::Error::new(e.kind(), format!("checkpoint: {e}"))));
            break;
        }
    }
    if result.is_ok() {
        result = file.reset().map_err(Arc::new);
    }
    let mut laps = shared.laps.lock();
    match result {
        Ok(()) => laps.files[index] = Some(file),
        Err(e) => {
            laps.failed.get_or_insert(e);
        }
    }
    drop(laps);
    shared.laps_wake.notify_all();
}

/// The journal thread's state between rounds.
struct Journal {
    /// The file being written (its `JournalFile` is taken out of `Laps` while in use).
    active: usize,
    file: Option<JournalFile>,
    /// Where the next round goes in it.
    pos: u64,
    capacity: u64,
    /// Counts laps; `LogInner::journal_lap` holds 1 + the lap a log was last written in.
    lap: u64,
    /// Logs written during this lap: the checkpoint syncs them.
    lap_logs: Vec<Arc<LogInner>>,
    /// After a journal write or sync error nothing more is trusted to it.
    failed: Option<Arc<io::Error>>,
}

impl Journal {
    /// Takes a free file to write, waiting for its checkpoint if it is still running.
    fn take_file(&mut self, shared: &CommitShared, index: usize) {
        let mut laps = shared.laps.lock();
        loop {
            if let Some(e) = &laps.failed {
                self.failed.get_or_insert(e.clone());
                return;
            }
            if let Some(f) = laps.files[index].take() {
                self.file = Some(f);
                self.active = index;
                self.pos = journal::HEADER;
                return;
            }
            shared.laps_wake.wait(&mut laps);
        }
    }

    /// Hands the full file to a checkpoint and moves to the other one.
    fn switch(&mut self, shared: &CommitShared) {
        let full = self.active;
        if let Some(file) = self.file.take() {
            let job = Job::Checkpoint(Box::new(Checkpoint {
                index: full,
                file,
                logs: std::mem::take(&mut self.lap_logs),
            }));
            self.lap += 1;
            if let Err(Job::Checkpoint(c)) = shared.submit(job) {
                checkpoint(shared, *c);
            }
        }
        self.take_file(shared, 1 - full);
    }

    /// Writes a sealed round at the current position and syncs it.
    fn write(&mut self, shared: &CommitShared, buf: &mut [u8]) -> io::Result<()> {
        if let Some(e) = &self.failed {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        #[cfg(test)]
        if shared.journal_fault.swap(false, Ordering::SeqCst) {
            let e = io::Error::other("journal fdatasync or write: injected failure");
            self.failed = Some(Arc::new(io::Error::other(e.to_string())));
            return Err(e);
        }
        let Some(file) = &self.file else {
            return Err(io::Error::other("no journal file"));
        };
        journal::seal(buf, file.epoch);
        let r = file.file.write_all_at(buf, self.pos).and_then(|()| {
            let started = Instant::now();
            shared.before_sync();
            let r = file.file.sync_data();
            shared.syncs.record(started.elapsed());
            r
        });
        match r {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let e = io::Error::new(e.kind(), format!("journal fdatasync or write: {e}"));
                self.failed = Some(Arc::new(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    /// Remembers that `log` was written during this lap.
    fn note(&mut self, log: &Arc<LogInner>) {
        let mark = self.lap + 1;
        if log.journal_lap.swap(mark, Ordering::Relaxed) != mark {
            self.lap_logs.push(log.clone());
        }
    }

    /// The final checkpoint when storage stops: nothing is left for recovery to replay.
    fn finish(&mut self, shared: &CommitShared) {
        if self.failed.is_some() {
            return;
        }
        // The other file's checkpoint (if one runs) first: it covers older records.
        let other = 1 - self.active;
        let mut laps = shared.laps.lock();
        while laps.files[other].is_none() && laps.failed.is_none() {
            shared.laps_wake.wait(&mut laps);
        }
        drop(laps);
        if let Some(file) = self.file.take() {
            checkpoint(
                shared,
                Checkpoint {
                    index: self.active,
                    file,
                    logs: std::mem::take(&mut self.lap_logs),
                },
            );
        }
    }
}

fn journal_thread(shared: &CommitShared, capacity: u64) {
    let mut j = Journal {
        active: 0,
        file: None,
        pos: journal::HEADER,
        capacity: capacity.max(journal::HEADER * 2),
        lap: 0,
        lap_logs: Vec::new(),
        failed: None,
    };
    j.take_file(shared, 0);
    let mut batch: Vec<Arc<LogInner>> = Vec::new();
    let mut appends: Vec<PendingAppend> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut jbuf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut done: Vec<Completion> = Vec::new();
    // Each written log with the end of its completions in `done`.
    let mut written: Vec<(Arc<LogInner>, usize)> = Vec::new();
    let mut last_start: Option<Instant> = None;
    loop {
        let waiting = {
            let mut q = shared.journal.lock();
            while q.ready.is_empty() && !q.stopping {
                shared.journal_wake.wait(&mut q);
            }
            if q.ready.is_empty() {
                q.stopped = true;
                break;
            }
            // Counted here, once a round, rather than by every append on a counter
            // that the workers and this thread would pass back and forth. (A log's
            // pending lock is never held while this queue's is taken.)
            q.ready
                .iter()
                .map(|log| log.pending_appends())
                .sum::<usize>()
        };
        if let Some(start) = last_start {
            let due = start + SYNC_GAP;
            let now = Instant::now();
            if now < due && waiting < FULL_BATCH {
                std::thread::sleep(due - now);
            }
        }
        std::mem::swap(&mut shared.journal.lock().ready, &mut batch);
        last_start = Some(Instant::now());
        jbuf.clear();
        let mut round = space::Round::default();
        for log in batch.drain(..) {
            if log.take_pending(&mut appends) == 0 {
                continue;
            }
            if refuse_no_space(shared, &mut appends, &mut round) {
                continue;
            }
            if let Some(e) = &j.failed {
                log.fail(io::Error::new(e.kind(), e.to_string()));
                fail_all(&log, &mut Vec::new(), &mut appends);
                continue;
            }
            let from = done.len();
            match log.write_appends(&mut appends, &mut buf, &mut done, Some(&mut jbuf)) {
                Ok(_) => written.push((log, done.len())),
                Err(e) => {
                    buf.clear();
                    let _ = log.on_error(e);
                    let mut mine = done.split_off(from);
                    fail_all(&log, &mut mine, &mut appends);
                }
            }
        }
        if written.is_empty() {
            continue;
        }
        // A round larger than a whole journal file syncs its segments directly.
        let direct = jbuf.len() as u64 > j.capacity - journal::HEADER;
        let synced = if direct {
            Ok(())
        } else {
            if j.pos + jbuf.len() as u64 > j.capacity {
                j.switch(shared);
            }
            j.write(shared, &mut jbuf)
        };
        let mut from = 0;
        for (log, end) in written.drain(..) {
            let mine = done.drain(..end - from);
            from = end;
            let result = synced
                .as_ref()
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))
                .and_then(|()| log.publish_durable(direct));
            let ok = match result {
                Ok(()) => {
                    if !direct {
                        j.note(&log);
                    }
                    true
                }
                Err(e) => {
                    let _ = log.on_error(e);
                    false
                }
            };
            for (tx, offset) in mine {
                let _ = tx.send(if ok {
                    Ok(offset)
                } else {
                    Err(log.write_error())
                });
            }
        }
    }
    j.finish(shared);
}

fn run(shared: &CommitShared) {
    let mut batch: Vec<Arc<LogInner>> = Vec::new();
    let mut appends: Vec<PendingAppend> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut done: Vec<Completion> = Vec::new();
    // Buffered logs written since their last sync, with when that sync is due.
    let mut dirty: Vec<(Arc<LogInner>, Instant)> = Vec::new();
    loop {
        let mut final_syncs = false;
        {
            let mut q = shared.queue.lock();
            loop {
                if !q.ready.is_empty() {
                    std::mem::swap(&mut q.ready, &mut batch);
                    break;
                }
                let now = Instant::now();
                if q.stopping {
                    // Done once the pool has nothing left; the last interval syncs go
                    // through the pool too, so look again after them.
                    let idle = shared.pool.lock().active == 0;
                    if idle && dirty.is_empty() {
                        q.stopped = true;
                        drop(q);
                        stop_pool(shared);
                        return;
                    }
                    if idle {
                        final_syncs = true;
                        break;
                    }
                    shared.wake.wait_until(&mut q, now + STOP_POLL);
                    continue;
                }
                match dirty.iter().map(|d| d.1).min() {
                    Some(due) if due <= now => break,
                    Some(due) => {
                        shared.wake.wait_until(&mut q, due);
                    }
                    None => shared.wake.wait(&mut q),
                }
            }
        }

        let mut round = space::Round::default();
        for log in batch.drain(..) {
            if log.take_pending(&mut appends) == 0 {
                // Being interval-synced: that sync puts it back on the ready queue.
                continue;
            }
            if refuse_no_space(shared, &mut appends, &mut round) {
                continue;
            }
            match log.write_appends(&mut appends, &mut buf, &mut done, None) {
                Ok(newly_dirty) => {
                    resolve(&mut done, Ok);
                    if newly_dirty {
                        let due = Instant::now() + log.config.sync_interval;
                        dirty.push((log, due));
                    }
                }
                Err(e) => {
                    buf.clear();
                    let _ = log.on_error(e);
                    fail_all(&log, &mut done, &mut appends);
                }
            }
        }

        let now = Instant::now();
        let mut k = 0;
        while k < dirty.len() {
            if final_syncs || dirty[k].1 <= now {
                let (log, due) = dirty.swap_remove(k);
                // A log is busy here only if its interval sync is still running (not
                // reached: it is rescheduled, not redirtied, until that ends); look again
                // at its next due time rather than lose it.
                if !log.begin_sync() {
                    let due = due.max(now) + log.config.sync_interval;
                    dirty.push((log, due));
                } else if shared.submit(Job::Background(log.clone())).is_err() {
                    log.end_sync();
                }
            } else {
                k += 1;
            }
        }
    }
}
