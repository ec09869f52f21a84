//! Group commit: one thread writes for every log in a `Storage`; a small pool syncs.
//!
//! Appenders queue records on their log and put the log on the ready queue (once per
//! batch, not per append). The committer loop then repeats:
//!
//! 1. take every ready log;
//! 2. for each log that is not being synced, encode all its queued appends into one
//!    reused buffer and write them with one write(2) (more only when a segment rolls);
//!    `Buffered` logs resolve their appenders right here;
//! 3. hand each written `Fsync` log, and every `Buffered` log whose sync interval has
//!    passed, to a pool of sync threads, which fdatasync it, resolve its appenders,
//!    and put it back on the ready queue if appends arrived meanwhile.
//!
//! Each log is its own pipeline: while its sync waits on the disk, new appends pile up
//! in its queue (a log is never written while its sync is in flight, so what a sync
//! publishes is exactly what it covered), and the next write and sync carry them all
//! together: the batch grows with the load, one fdatasync per log per batch. Logs do
//! not wait for each other: a slow sync of one log (fdatasync times here have a long
//! tail) holds back only that log's appenders, and the committer keeps writing the
//! others meanwhile.
//!
//! Any write or sync error makes that log read-only ([`crate::Error::ReadOnly`]) and
//! fails every append of the batch; it never touches other logs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::Offset;
use crate::error::Result;
use crate::log::{Completion, LogInner, PendingAppend};

/// The ready queue shared between appenders, the committer and the sync threads.
pub(crate) struct CommitShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Appends queued on any log and not yet taken by the committer.
    pub(crate) queued: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    ready: Vec<Arc<LogInner>>,
    /// Sync jobs handed to the pool and not finished yet.
    syncing: usize,
    stopping: bool,
    stopped: bool,
}

impl CommitShared {
    /// Puts `log` on the ready queue; false once the committer has stopped.
    pub(crate) fn schedule(&self, log: Arc<LogInner>) -> bool {
        let mut q = self.queue.lock();
        if q.stopped {
            return false;
        }
        q.ready.push(log);
        drop(q);
        self.wake.notify_one();
        true
    }

    /// A sync job finished (after it rescheduled its log if that had appends waiting).
    fn sync_done(&self) {
        let mut q = self.queue.lock();
        q.syncing -= 1;
        let last = q.syncing == 0;
        drop(q);
        if last {
            self.wake.notify_one();
        }
    }
}

/// Owns the committer thread; dropping it drains queued appends, syncs, and joins.
pub(crate) struct Committer {
    shared: Arc<CommitShared>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    pub(crate) fn start() -> std::io::Result<Committer> {
        let shared = Arc::new(CommitShared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            queued: AtomicUsize::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("roost-commit".into())
            .spawn(move || run(&s))?;
        Ok(Committer {
            shared,
            thread: Some(thread),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<CommitShared> {
        &self.shared
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.queue.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn resolve(done: &mut Vec<Completion>, result: impl Fn(Offset) -> Result<Offset>) {
    for (tx, offset) in done.drain(..) {
        let _ = tx.send(result(offset));
    }
}

fn fail_all(log: &LogInner, done: &mut Vec<Completion>, rest: &mut Vec<PendingAppend>) {
    for (tx, _) in done.drain(..) {
        let _ = tx.send(Err(log.write_error()));
    }
    for a in rest.drain(..) {
        let _ = a.tx.send(Err(log.write_error()));
    }
}

/// Threads that fdatasync different logs at once: the file system folds concurrent
/// syncs into shared journal commits (measured here: 64 files synced 4x faster by 16
/// threads than one after another). They sleep in the kernel, not on the CPU.
const SYNC_THREADS: usize = 16;

/// One fdatasync for the pool.
enum SyncJob {
    /// After a batch of an `Fsync` log: sync, then publish and resolve its appends.
    Commit(Arc<LogInner>, Vec<Completion>),
    /// The interval sync of a `Buffered` log.
    Background(Arc<LogInner>),
}

impl SyncJob {
    /// Runs the job, then lets the log be written again (rescheduling it if appends
    /// wait) and tells the committer it is done.
    fn run(self, shared: &CommitShared) {
        let log = match self {
            SyncJob::Commit(log, mut done) => {
                match log.sync_and_publish() {
                    Ok(()) => resolve(&mut done, Ok),
                    Err(e) => {
                        let _ = log.on_error(e);
                        fail_all(&log, &mut done, &mut Vec::new());
                    }
                }
                log
            }
            SyncJob::Background(log) => {
                if let Err(e) = log.background_sync() {
                    let _ = log.on_error(e);
                }
                log
            }
        };
        if log.end_sync() && !shared.schedule(log.clone()) {
            log.fail_stranded();
        }
        shared.sync_done();
    }
}

/// Worker threads for [`SyncJob`]s. Workers exit when the pool is dropped.
struct SyncPool {
    jobs: Option<mpsc::Sender<SyncJob>>,
}

impl SyncPool {
    fn start(threads: usize, shared: &Arc<CommitShared>) -> SyncPool {
        let (jobs_tx, jobs_rx) = mpsc::channel::<SyncJob>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut started = 0;
        for i in 0..threads {
            let (rx, shared) = (jobs_rx.clone(), shared.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("roost-sync-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        job.run(&shared);
                    }
                });
            if spawned.is_ok() {
                started += 1;
            }
        }
        SyncPool {
            // Without workers every job runs on the committer thread.
            jobs: (started > 0).then_some(jobs_tx),
        }
    }

    /// Starts `job` (counted in `syncing` by the caller); runs it here if the pool is
    /// gone.
    fn submit(&self, job: SyncJob, shared: &CommitShared) {
        let job = match &self.jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        job.run(shared);
    }
}

fn run(shared: &Arc<CommitShared>) {
    let mut batch: Vec<Arc<LogInner>> = Vec::new();
    let mut appends: Vec<PendingAppend> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut jobs: Vec<SyncJob> = Vec::new();
    // Buffered logs written since their last sync, with when that sync is due.
    let mut dirty: Vec<(Arc<LogInner>, Instant)> = Vec::new();
    let pool = SyncPool::start(SYNC_THREADS, shared);
    loop {
        {
            let mut q = shared.queue.lock();
            loop {
                if !q.ready.is_empty() {
                    std::mem::swap(&mut q.ready, &mut batch);
                    break;
                }
                if q.stopping && q.syncing == 0 {
                    if dirty.is_empty() {
                        q.stopped = true;
                        return;
                    }
                    // The last interval syncs; the loop comes back here when done.
                    for (log, _) in dirty.drain(..) {
                        if log.begin_sync() {
                            jobs.push(SyncJob::Background(log));
                        }
                    }
                    break;
                }
                let now = Instant::now();
                match dirty.iter().map(|d| d.1).min() {
                    Some(due) if due <= now && !q.stopping => break,
                    Some(due) if !q.stopping => {
                        shared.wake.wait_until(&mut q, due);
                    }
                    _ => shared.wake.wait(&mut q),
                }
            }
        }

        for log in batch.drain(..) {
            let taken = log.take_pending(&mut appends);
            if taken == 0 {
                // Being synced: its sync puts it back on the ready queue.
                continue;
            }
            shared.queued.fetch_sub(taken, Ordering::Relaxed);
            let mut done = Vec::with_capacity(taken);
            match log.write_appends(&mut appends, &mut buf, &mut done) {
                Ok(newly_dirty) => {
                    if log.config.durability == crate::Durability::Buffered {
                        resolve(&mut done, Ok);
                        if newly_dirty {
                            let due = Instant::now() + log.config.sync_interval;
                            dirty.push((log, due));
                        }
                    } else {
                        jobs.push(SyncJob::Commit(log, done));
                    }
                }
                Err(e) => {
                    buf.clear();
                    let _ = log.on_error(e);
                    fail_all(&log, &mut done, &mut appends);
                    // Later appends fail at once in write_appends; let them come.
                    if log.end_sync() && !shared.schedule(log.clone()) {
                        log.fail_stranded();
                    }
                }
            }
        }

        let now = Instant::now();
        let mut k = 0;
        while k < dirty.len() {
            if dirty[k].1 <= now {
                let (log, _) = dirty.swap_remove(k);
                // A log being written right now is synced at its next due time.
                if log.begin_sync() {
                    jobs.push(SyncJob::Background(log));
                } else {
                    // Not reached (a `Buffered` log is busy only while synced), but
                    // never lose track of a dirty log.
                    let due = now + log.config.sync_interval;
                    dirty.push((log, due));
                }
            } else {
                k += 1;
            }
        }
        if !jobs.is_empty() {
            shared.queue.lock().syncing += jobs.len();
            for job in jobs.drain(..) {
                pool.submit(job, shared);
            }
        }
    }
}
