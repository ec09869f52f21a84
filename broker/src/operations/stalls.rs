//! The stall detector: counts task polls that hold a tokio worker thread longer than a
//! threshold (50 ms), the `roost_event_loop_stalls_total` of `/metrics`, and logs the
//! longest. A worker held that long delays every connection whose task waits behind it
//! (a blocking fsync or a CPU-bound loop in a task, say), which no other metric shows.
//!
//! How: tokio's poll hooks (`on_before_task_poll` / `on_after_task_poll`, behind
//! `tokio_unstable`) mark in the worker's slot when its current poll began, in ticks of
//! a coarse clock that a watchdog thread advances every [`TICK`]; the watchdog sees a
//! slot whose poll began more than the threshold ago, counts it once (while it still
//! runs: a worker stuck for good is counted too), and measures it until it ends. The
//! hooks cost two relaxed atomic operations per poll, no clock read.
//!
//! Invariants: a slot is 0 while its thread is not polling, else 1 + the tick its poll
//! began; a poll is counted at most once.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The coarse clock's resolution: stalls are measured to within it.
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
    /// Ticks of [`TICK`] since the detector started, advanced by the watchdog.
    now: AtomicU64,
    slots: Box<[AtomicU64]>,
    next_slot: AtomicUsize,
    stalls: AtomicU64,
    /// The longest stall that ended, in milliseconds.
    longest_ms: AtomicU64,
    threshold_ticks: u64,
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
        let ticks = (threshold.as_millis() / TICK.as_millis()).max(1) as u64;
        let d = Arc::new(StallDetector {
            now: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            next_slot: AtomicUsize::new(0),
            stalls: AtomicU64::new(0),
            longest_ms: AtomicU64::new(0),
            threshold_ticks: ticks,
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
                .on_before_task_poll(move |_| before.poll_started())
                .on_after_task_poll(move |_| after.poll_ended());
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

    fn slot(&self) -> Option<&AtomicU64> {
        let i = SLOT.with(|s| match s.get() {
            Some(i) => i,
            None => {
                let i = self.next_slot.fetch_add(1, Ordering::Relaxed);
                s.set(Some(i));
                i
            }
        });
        self.slots.get(i)
    }

    fn poll_started(&self) {
        if let Some(slot) = self.slot() {
            slot.store(self.now.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
    }

    fn poll_ended(&self) {
        if let Some(slot) = self.slot() {
            slot.store(0, Ordering::Relaxed);
        }
    }
}

/// A stall the watchdog is following: the slot's value when it was counted, and its
/// length so far.
#[derive(Clone, Copy, Default)]
struct Seen {
    mark: u64,
    ticks: u64,
}

/// The watchdog: advances the clock, counts and measures stalls, logs the longest of
/// each [`LOG_EVERY`]. Ends when the detector is dropped.
fn watch(detector: std::sync::Weak<StallDetector>) {
    let start = Instant::now();
    let mut seen = [Seen::default(); SLOTS];
    let mut window_longest = 0u64;
    let mut window_stalls = 0u64;
    let mut logged_at = Instant::now();
    loop {
        std::thread::sleep(TICK);
        let Some(d) = detector.upgrade() else {
            return;
        };
        let now = (start.elapsed().as_millis() / TICK.as_millis()) as u64;
        d.now.store(now, Ordering::Relaxed);
        for (slot, seen) in d.slots.iter().zip(seen.iter_mut()) {
            let mark = slot.load(Ordering::Relaxed);
            if seen.mark != 0 && seen.mark != mark {
                // The stall we followed ended (at most a tick ago).
                let ms = seen.ticks * TICK.as_millis() as u64;
                d.longest_ms.fetch_max(ms, Ordering::Relaxed);
                window_longest = window_longest.max(ms);
                *seen = Seen::default();
            }
            if mark == 0 {
                continue;
            }
            let ticks = now.saturating_sub(mark - 1);
            if ticks > d.threshold_ticks {
                if seen.mark != mark {
                    d.stalls.fetch_add(1, Ordering::Relaxed);
                    window_stalls += 1;
                }
                *seen = Seen { mark, ticks };
            }
        }
        if window_stalls > 0 && logged_at.elapsed() >= LOG_EVERY {
            tracing::warn!(
                stalls = window_stalls,
                longest_ms = window_longest,
                "event loop stalled: a task held a worker thread for over {} ms",
                STALL_THRESHOLD.as_millis()
            );
            window_stalls = 0;
            window_longest = 0;
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
