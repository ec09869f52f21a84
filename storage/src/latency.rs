//! A lock-free latency histogram for fdatasync calls, read by the broker's `/metrics`.
//!
//! Buckets are fixed (Prometheus style, upper bounds in seconds) so recording is one
//! relaxed atomic add per bucket hit plus the sum and count: cheap next to the
//! fdatasync it measures, and safe to call from any thread.
//!
//! Each store owns its histogram ([`crate::Storage::sync_latency`] for the logs of a
//! storage directory); there is no process-wide one, so two storages (or two tests)
//! never count into each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (a last, implicit bucket is `+Inf`).
pub const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of sync durations.
#[derive(Debug)]
pub struct SyncLatency {
    /// Per-bucket (not cumulative) counts; the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A point-in-time copy of a [`SyncLatency`].
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// `(upper bound in seconds, observations <= bound)`, cumulative, in bound order;
    /// the last entry has bound `f64::INFINITY` and holds the total count.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
}

impl LatencySnapshot {
    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |b| b.1)
    }
}

impl Default for SyncLatency {
    fn default() -> Self {
        SyncLatency::new()
    }
}

impl SyncLatency {
    /// An empty histogram.
    pub const fn new() -> Self {
        SyncLatency {
            buckets: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Cumulative bucket counts and the sum, as Prometheus exposes them.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut total = 0;
        let buckets = BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        LatencySnapshot {
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = SyncLatency::new();
        h.record(Duration::from_micros(50)); // <= 0.0001
        h.record(Duration::from_micros(2000)); // <= 0.0025
        h.record(Duration::from_secs(10)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count(), 3);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[4], (0.0025, 2));
        assert_eq!(s.buckets[BUCKETS.len() - 1], (2.5, 2));
        assert_eq!(s.buckets[BUCKETS.len()], (f64::INFINITY, 3));
        assert!((s.sum_seconds - 10.00205).abs() < 1e-9);
    }
}
