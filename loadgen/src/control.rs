//! What the run's coordinator and its worker tasks share: the clock base, the phase,
//! the measured window, and totals for the progress line.
//!
//! Workers keep their own counters and add them here every few tens of milliseconds,
//! so the hot path touches no shared cache line; the totals here are for progress and
//! drain decisions only. Final numbers come from the workers' own reports.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Where the run is. Workers publish only in `Run`, and close everything at `Stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connecting and subscribing.
    Setup = 0,
    /// Publishing (warm-up, then measuring).
    Run = 1,
    /// Publishing stopped; waiting for outstanding deliveries and acks.
    Drain = 2,
    /// Disconnect and report.
    Stop = 3,
}

/// State shared by the coordinator and every worker.
#[derive(Debug)]
pub struct Control {
    base: Instant,
    phase: AtomicU8,
    /// When `Run` began (ns since base): the start of every publisher's schedule.
    pub run_start_ns: AtomicU64,
    /// The measured window `[start, end)`: only messages sent in it are timed.
    pub window_start_ns: AtomicU64,
    /// End of the measured window (`u64::MAX` while it is open).
    pub window_end_ns: AtomicU64,
    /// Publishes written (flushed periodically by workers).
    pub sent: AtomicU64,
    /// Publishes acknowledged.
    pub acked: AtomicU64,
    /// Deliveries to subscribers.
    pub delivered: AtomicU64,
    /// Connections whose handshake completed.
    pub connected: AtomicU64,
    /// Connections that failed to connect.
    pub failed: AtomicU64,
    /// Established connections that were lost.
    pub dropped: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Control {
    /// A control block in `Setup` whose clock starts now.
    pub fn new() -> Control {
        Control {
            base: Instant::now(),
            phase: AtomicU8::new(Phase::Setup as u8),
            run_start_ns: AtomicU64::new(0),
            window_start_ns: AtomicU64::new(u64::MAX),
            window_end_ns: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Nanoseconds since the run's base instant: the clock of every stamp.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The tokio instant of a time on the run's clock.
    pub fn instant_at(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.base + Duration::from_nanos(ns))
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Relaxed) {
            0 => Phase::Setup,
            1 => Phase::Run,
            2 => Phase::Drain,
            _ => Phase::Stop,
        }
    }

    /// Moves to `p`.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Relaxed);
    }

    /// The measured window as (start, end).
    pub fn window(&self) -> (u64, u64) {
        (
            self.window_start_ns.load(Relaxed),
            self.window_end_ns.load(Relaxed),
        )
    }

    /// Adds `n` errors of `kind`.
    pub fn add_error(&self, kind: String, n: u64) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(kind).or_insert(0) += n;
        }
    }

    /// Errors so far, by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Total errors so far.
    pub fn error_count(&self) -> u64 {
        self.errors
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or_default()
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new()
    }
}
