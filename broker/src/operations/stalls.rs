//! The stall detector: counts task polls that hold a tokio worker thread longer than a
//! threshold (50 ms), the `roost_event_loop_stalls_total` of `/metrics`, and logs the
//! longest. A worker held that long delays every connection whose task waits behind it
//! (a blocking fsync or a CPU-bound loop in a task, say), which no other metric shows.
//!
//! How: tokio's poll hooks (`on_before_task_poll` / `on_after_task_poll`, behind
//! `tokio_unstable`) bump a counter in the worker's slot as each poll begins and ends
//! (odd while polling). A watchdog thread looks every [`TICK`]: a slot showing the same
//! odd count on looks more than the threshold apart is one poll that ran that long; it
//! is counted once (while it still runs: a worker stuck for good is counted too) and
//! measured until it ends. The hooks cost one relaxed atomic add each and read no
//! clock; a watchdog that is itself descheduled only sees fewer stalls, never false
//! ones (the count names one poll, whatever the clock did meanwhile).
//!
//! Invariants: a slot's count is odd exactly while its thread is in a poll; a poll is
//! counted at most once.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How often the watchdog looks: stalls are measured to within it.
pub const TICK: Duration = Duration::from_millis(5);

/// Polls longer than this are stalls.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(50);

/// Worker threads followed; a runtime with more (unusual) leaves the rest unwatched.
const SLOTS: usize = 64;

/// How often, at most, the longest recent stall is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts worker stalls of one runtime (see the module documentation).
#[derive(Debug)]
pub struct StallDetector {
    /// Per worker thread: polls begun plus polls ended (odd while polling).
    slots: Box<[AtomicU64]>,
    next_slot: AtomicUsize,
    stalls: AtomicU64,
    /// The longest stall that ended, in milliseconds.
    longest_ms: AtomicU64,
    threshold: Duration,
}

thread_local! {
    /// The slot of this worker thread, assigned at its first poll (an index, not a
    /// result: the counts live in the detector).
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

impl StallDetector {
    /// Hooks a detector into the runtime `builder` will build and starts its watchdog
    /// thread. Polls longer than `threshold` are stalls.
    pub fn install(
        builder: &mut tokio::runtime::Builder,
        threshold: Duration,
    ) -> std::io::Result<Arc<StallDetector>> {
        let d = Arc::new(StallDetector {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            next_slot: AtomicUsize::new(0),
            stalls: AtomicU64::new(0),
            longest_ms: AtomicU64::new(0),
            threshold,
        });
        let watched = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name("roost-stalls".into())
            .spawn(move || watch(watched))?;
        #[cfg(tokio_unstable)]
        {
            let before = d.clone();
            let after = d.clone();
            builder
                .on_before_task_poll(move |_| before.bump())
                .on_after_task_poll(move |_| after.bump());
        }
        #[cfg(not(tokio_unstable))]
        let _ = builder;
        Ok(d)
    }

    /// Stalls seen since start (`roost_event_loop_stalls_total`).
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// The longest stall that has ended.
    pub fn longest(&self) -> Duration {
        Duration::from_millis(self.longest_ms.load(Ordering::Relaxed))
    }

    /// A poll begins or ends on this thread.
    fn bump(&self) {
        let i = SLOT.with(|s| match s.get() {
            Some(i) => i,
            None => {
                let i = self.next_slot.fetch_add(1, Ordering::Relaxed);
                s.set(Some(i));
                i
            }
        });
        if let Some(slot) = self.slots.get(i) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The poll the watchdog saw running in a slot: its count, when first seen, and
/// whether it was counted as a stall.
#[derive(Clone, Copy)]
struct Seen {
    count: u64,
    since: Instant,
    stalled: bool,
}

/// The watchdog: counts and measures stalls, logs the longest of each [`LOG_EVERY`].
/// Ends when the detector is dropped.
fn watch(detector: std::sync::Weak<StallDetector>) {
    let mut seen: [Option<Seen>; SLOTS] = [None; SLOTS];
    let mut window_longest = Duration::ZERO;
    let mut window_stalls = 0u64;
    let mut logged_at = Instant::now();
    loop {
        std::thread::sleep(TICK);
        let Some(d) = detector.upgrade() else {
            return;
        };
        let now = Instant::now();
        for (slot, seen) in d.slots.iter().zip(seen.iter_mut()) {
            let count = slot.load(Ordering::Relaxed);
            if let Some(s) = *seen
                && s.count != count
            {
                if s.stalled {
                    // Ended since the last look.
                    let took = now.duration_since(s.since);
                    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                    d.longest_ms.fetch_max(ms, Ordering::Relaxed);
                    window_longest = window_longest.max(took);
                }
                *seen = None;
            }
            if count % 2 == 0 {
                continue;
            }
            let s = seen.get_or_insert(Seen {
                count,
                since: now,
                stalled: false,
            });
            if !s.stalled && now.duration_since(s.since) > d.threshold {
                s.stalled = true;
                d.stalls.fetch_add(1, Ordering::Relaxed);
                window_stalls += 1;
            }
        }
        if window_stalls > 0 && logged_at.elapsed() >= LOG_EVERY {
            tracing::warn!(
                stalls = window_stalls,
                longest_ms = window_longest.as_millis() as u64,
                "event loop stalled: a task held a worker thread for over {} ms",
                STALL_THRESHOLD.as_millis()
            );
            window_stalls = 0;
            window_longest = Duration::ZERO;
            logged_at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> (tokio::runtime::Runtime, Arc<StallDetector>) {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2).enable_all();
        let d = StallDetector::install(&mut b, STALL_THRESHOLD).expect("watchdog");
        (b.build().expect("runtime"), d)
    }

    #[test]
    fn a_blocking_poll_is_one_stall_and_its_length_is_measured() {
        let (rt, d) = runtime();
        rt.block_on(async {
            tokio::spawn(async { std::thread::sleep(Duration::from_millis(150)) })
                .await
                .expect("task");
        });
        std::thread::sleep(TICK * 4);
        assert_eq!(d.stalls(), 1);
        let longest = d.longest();
        assert!(
            longest >= Duration::from_millis(100) && longest <= Duration::from_millis(300),
            "{longest:?}"
        );
    }

    #[test]
    fn tasks_that_await_are_not_stalls() {
        let (rt, d) = runtime();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..50 {
                tasks.push(tokio::spawn(async {
                    for _ in 0..20 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        });
        assert_eq!(d.stalls(), 0);
    }
}
