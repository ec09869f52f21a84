//! Group commit: one thread writes for every log in a `Storage`.
//!
//! Appenders queue records on their log and put the log on the ready queue (once per
//! batch, not per append). The committer loop then repeats:
//!
//! 1. take every ready log;
//! 2. for each, encode all its queued appends into one reused buffer and write them
//!    with one write(2) (more only when a segment rolls); `Buffered` logs resolve
//!    their appenders right here;
//! 3. fdatasync each written `Fsync` log once, and every `Buffered` log whose sync
//!    interval has passed, in parallel on a small pool of sync threads; resolve each
//!    `Fsync` log's appenders as soon as its own sync returns; wait for all of them.
//!
//! While step 3 waits on the disk, new appends pile up in the logs' queues, so the next
//! round writes and syncs them together: the batch grows with the load, and a sync costs
//! one fdatasync per log per round however many appenders it serves.
//!
//! Any write or sync error makes that log read-only ([`crate::Error::ReadOnly`]) and
//! fails every append of the round; it never touches other logs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::Offset;
use crate::error::Result;
use crate::log::{Completion, LogInner, PendingAppend};

/// The ready queue shared between appenders and the committer thread.
pub(crate) struct CommitShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Appends queued on any log and not yet taken by the committer.
    pub(crate) queued: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    ready: Vec<Arc<LogInner>>,
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

/// Longest the committer waits for appenders to return before a sync, and how often
/// it looks while waiting. See the gather step in [`run`].
const MAX_GATHER: Duration = Duration::from_micros(500);
const GATHER_STEP: Duration = Duration::from_micros(20);

/// One fdatasync for the pool.
enum SyncJob {
    /// After a batch of an `Fsync` log: sync, then publish and resolve its appends.
    Commit(Arc<LogInner>, Vec<Completion>),
    /// The interval sync of a `Buffered` log.
    Background(Arc<LogInner>),
}

impl SyncJob {
    /// Runs the job; returns the emptied completion buffer for reuse.
    fn run(self) -> Option<Vec<Completion>> {
        match self {
            SyncJob::Commit(log, mut done) => {
                match log.sync_and_publish() {
                    Ok(()) => resolve(&mut done, Ok),
                    Err(e) => {
                        let _ = log.on_error(e);
                        fail_all(&log, &mut done, &mut Vec::new());
                    }
                }
                Some(done)
            }
            SyncJob::Background(log) => {
                if let Err(e) = log.background_sync() {
                    let _ = log.on_error(e);
                }
                None
            }
        }
    }
}

/// Worker threads for [`SyncJob`]s. The committer hands over a round's jobs and waits
/// for all of them, so a log is never written while its sync is in flight and what is
/// published after a sync is exactly what that sync covered. Workers exit when the pool
/// is dropped.
struct SyncPool {
    jobs: Option<mpsc::Sender<SyncJob>>,
    done: mpsc::Receiver<Option<Vec<Completion>>>,
}

impl SyncPool {
    fn start(threads: usize) -> SyncPool {
        let (jobs_tx, jobs_rx) = mpsc::channel::<SyncJob>();
        let (done_tx, done) = mpsc::channel();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut started = 0;
        for i in 0..threads {
            let (rx, tx) = (jobs_rx.clone(), done_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("roost-sync-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    loop {
                        let job = rx.lock().recv();
                        let Ok(job) = job else { return };
                        if tx.send(job.run()).is_err() {
                            return;
                        }
                    }
                });
            if spawned.is_ok() {
                started += 1;
            }
        }
        SyncPool {
            // Without workers every job runs on the committer thread.
            jobs: (started > 0).then_some(jobs_tx),
            done,
        }
    }

    /// Runs `jobs` and waits for all: the last on this thread, the others on the pool.
    fn run_all(&self, mut jobs: Vec<SyncJob>, spare: &mut Vec<Vec<Completion>>) {
        let inline = jobs.pop();
        let mut sent = 0;
        for job in jobs {
            let job = match &self.jobs {
                Some(tx) => match tx.send(job) {
                    Ok(()) => {
                        sent += 1;
                        continue;
                    }
                    Err(mpsc::SendError(job)) => job,
                },
                None => job,
            };
            spare.extend(job.run());
        }
        if let Some(job) = inline {
            spare.extend(job.run());
        }
        for _ in 0..sent {
            match self.done.recv() {
                Ok(done) => spare.extend(done),
                Err(_) => break,
            }
        }
    }
}

fn run(shared: &CommitShared) {
    let mut batch: Vec<Arc<LogInner>> = Vec::new();
    let mut appends: Vec<PendingAppend> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut to_sync: Vec<(Arc<LogInner>, Vec<Completion>)> = Vec::new();
    let mut spare: Vec<Vec<Completion>> = Vec::new();
    // Buffered logs written since their last sync, with when that sync is due.
    let mut dirty: Vec<(Arc<LogInner>, Instant)> = Vec::new();
    let pool = SyncPool::start(SYNC_THREADS);
    // Appends resolved by the last round's fdatasyncs, and how long those took.
    let mut last_commits = 0usize;
    let mut last_sync = Duration::ZERO;
    let mut gather_until: Option<Instant> = None;
    loop {
        {
            let mut q = shared.queue.lock();
            loop {
                if !q.ready.is_empty() {
                    // Gather: appenders resolved by the last sync are coming back; if
                    // few have yet, give them a fraction of a sync's time to, rather
                    // than spend a whole fdatasync on the first few.
                    let want = last_commits / 2;
                    if want > 0 && !q.stopping {
                        let now = Instant::now();
                        let until = *gather_until
                            .get_or_insert_with(|| now + (last_sync / 4).min(MAX_GATHER));
                        if now < until && shared.queued.load(Ordering::Relaxed) < want {
                            shared
                                .wake
                                .wait_until(&mut q, (now + GATHER_STEP).min(until));
                            continue;
                        }
                    }
                    gather_until = None;
                    std::mem::swap(&mut q.ready, &mut batch);
                    break;
                }
                if q.stopping {
                    q.stopped = true;
                    drop(q);
                    let jobs = dirty.drain(..).map(|(log, _)| SyncJob::Background(log));
                    pool.run_all(jobs.collect(), &mut spare);
                    return;
                }
                match dirty.iter().map(|d| d.1).min() {
                    Some(due) if due <= Instant::now() => break,
                    Some(due) => {
                        shared.wake.wait_until(&mut q, due);
                    }
                    None => shared.wake.wait(&mut q),
                }
            }
        }

        for log in batch.drain(..) {
            let taken = log.take_pending(&mut appends);
            shared.queued.fetch_sub(taken, Ordering::Relaxed);
            let mut done = spare.pop().unwrap_or_default();
            match log.write_appends(&mut appends, &mut buf, &mut done) {
                Ok(newly_dirty) => {
                    if log.config.durability == crate::Durability::Buffered {
                        resolve(&mut done, Ok);
                        spare.push(done);
                        if newly_dirty {
                            let due = Instant::now() + log.config.sync_interval;
                            dirty.push((log, due));
                        }
                    } else {
                        to_sync.push((log, done));
                    }
                }
                Err(e) => {
                    buf.clear();
                    let _ = log.on_error(e);
                    fail_all(&log, &mut done, &mut appends);
                    spare.push(done);
                }
            }
        }

        let due_now = Instant::now();
        let mut jobs: Vec<SyncJob> = to_sync
            .drain(..)
            .map(|(log, done)| SyncJob::Commit(log, done))
            .collect();
        let mut k = 0;
        while k < dirty.len() {
            if dirty[k].1 <= due_now {
                jobs.push(SyncJob::Background(dirty.swap_remove(k).0));
            } else {
                k += 1;
            }
        }
        last_commits = jobs
            .iter()
            .map(|j| match j {
                SyncJob::Commit(_, done) => done.len(),
                SyncJob::Background(_) => 0,
            })
            .sum();
        let started = Instant::now();
        pool.run_all(jobs, &mut spare);
        if last_commits > 0 {
            last_sync = started.elapsed();
        }
    }
}
