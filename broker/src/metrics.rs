//! Counters for the admin listener's Prometheus `/metrics`.
//!
//! One [`Metrics`] per broker, shared by every connection task. Counters are plain
//! atomics bumped with `Relaxed` ordering: they are read only for reporting, never to
//! decide anything, so the hot path pays one uncontended add and takes no lock. Gauges
//! (connections, sessions, queue depth, ...) are not kept here: `/metrics` reads them
//! from their owners when it is scraped.

use std::sync::atomic::{AtomicU64, Ordering};

use roost_core::QoS;

/// Why a message was dropped for a subscriber (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// An offline session's queue held `max_queued_messages` already.
    OfflineQueueFull,
    /// A connected session's queue held `max_queued_messages` already.
    SessionQueueFull,
    /// The subscriber's channel stayed full past `max_delivery_wait_ms`, or it was
    /// already marked stalled.
    SlowSubscriber,
}

impl DropReason {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [DropReason; 3] = [
        DropReason::OfflineQueueFull,
        DropReason::SessionQueueFull,
        DropReason::SlowSubscriber,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::OfflineQueueFull => "offline_queue_full",
            DropReason::SessionQueueFull => "session_queue_full",
            DropReason::SlowSubscriber => "slow_subscriber",
        }
    }
}

/// The broker's counters (monotonic; reset only by a restart).
#[derive(Debug, Default)]
pub struct Metrics {
    received: [AtomicU64; 3],
    sent: [AtomicU64; 3],
    dropped: [AtomicU64; 3],
}

impl Metrics {
    /// Counts a PUBLISH received from a client.
    pub fn received(&self, qos: QoS) {
        self.received[qos as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` PUBLISH packets of `qos` sent to clients (first sends, not resends).
    pub fn sent(&self, qos: QoS, n: u64) {
        if n > 0 {
            self.sent[qos as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `n` messages dropped for a subscriber.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped[reason as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// PUBLISH packets received, by QoS 0, 1, 2.
    pub fn received_by_qos(&self) -> [u64; 3] {
        self.received.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// PUBLISH packets sent, by QoS 0, 1, 2.
    pub fn sent_by_qos(&self) -> [u64; 3] {
        self.sent.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// Messages dropped for `reason`.
    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_by_label() {
        let m = Metrics::default();
        m.received(QoS::AtLeastOnce);
        m.received(QoS::AtLeastOnce);
        m.received(QoS::ExactlyOnce);
        m.sent(QoS::AtMostOnce, 5);
        m.dropped(DropReason::SlowSubscriber, 2);
        assert_eq!(m.received_by_qos(), [0, 2, 1]);
        assert_eq!(m.sent_by_qos(), [5, 0, 0]);
        assert_eq!(m.dropped_for(DropReason::SlowSubscriber), 2);
        assert_eq!(m.dropped_for(DropReason::OfflineQueueFull), 0);
    }
}
