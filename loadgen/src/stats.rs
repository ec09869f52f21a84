//! Statistics: which messages arrived (loss, duplicates) and how late (latency).
//!
//! Loss and duplicates are counted from sequence numbers, never from totals, so a
//! duplicate cannot hide a loss. A [`SeqTracker`] remembers exactly which sequence
//! numbers of one publisher one subscriber has seen: every number below `base` is
//! seen, and a bitmap covers the numbers from `base` on. Brokers deliver a publisher's
//! messages in order, so the bitmap's full leading words are dropped as they fill and it
//! stays a few words long; only a subscriber that sees a sparse subset (a member of a
//! shared group) keeps a bitmap as long as the run. A shared group's members are
//! merged with [`union_unique`] at the end.

use std::collections::VecDeque;

use hdrhistogram::Histogram;
use serde::Serialize;

/// How far ahead of `base` a sequence number may be before it is treated as garbage
/// rather than grown into (2^32 bits = 512 MiB would be absurd; 2^30 = 128 MiB).
const MAX_SPAN_BITS: u64 = 1 << 30;

/// What recording one sequence number found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time this number arrived.
    New,
    /// It had arrived before.
    Duplicate,
    /// Too far ahead of anything seen to be a real sequence number.
    Implausible,
}

/// The sequence numbers of one publisher seen by one subscriber.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Every sequence number below `base` has been seen; a multiple of 64.
    base: u64,
    /// Bit `i` of word `k` is sequence number `base + 64 k + i`.
    words: VecDeque<u64>,
    /// Deliveries, duplicates included.
    pub received: u64,
    /// Distinct sequence numbers seen.
    pub unique: u64,
    /// Deliveries of a number already seen.
    pub duplicates: u64,
    /// New numbers that arrived after a higher one.
    pub out_of_order: u64,
    /// Highest number seen plus one (0 when none).
    pub end: u64,
}

impl SeqTracker {
    /// Records one delivery of `seq`.
    pub fn record(&mut self, seq: u64) -> Seen {
        if seq >= self.base + MAX_SPAN_BITS {
            return Seen::Implausible;
        }
        self.received += 1;
        if seq < self.base {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        let off = seq - self.base;
        let word = (off / 64) as usize;
        let bit = 1u64 << (off % 64);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & bit != 0 {
            self.duplicates += 1;
            return Seen::Duplicate;
        }
        self.words[word] |= bit;
        self.unique += 1;
        if seq + 1 < self.end {
            self.out_of_order += 1;
        } else {
            self.end = seq + 1;
        }
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
        }
        Seen::New
    }

    /// Numbers below the highest seen that have not arrived: loss as far as this
    /// subscriber alone can tell (it cannot know about messages after the last one).
    pub fn gaps(&self) -> u64 {
        self.end - self.unique
    }

    /// Whether `seq` has been seen.
    #[cfg(test)]
    pub fn contains(&self, seq: u64) -> bool {
        if seq < self.base {
            return true;
        }
        let off = seq - self.base;
        self.words
            .get((off / 64) as usize)
            .is_some_and(|w| w & (1 << (off % 64)) != 0)
    }

    /// Word `k` of the absolute bitmap (bit `i` = sequence number `64 k + i`).
    fn absolute_word(&self, k: u64) -> u64 {
        let base_word = self.base / 64;
        if k < base_word {
            u64::MAX
        } else {
            self.words
                .get((k - base_word) as usize)
                .copied()
                .unwrap_or(0)
        }
    }
}

/// Distinct sequence numbers seen by any of `trackers` (members of one shared group
/// that all hear the same publisher).
pub fn union_unique(trackers: &[&SeqTracker]) -> u64 {
    let Some(end) = trackers.iter().map(|t| t.end).max() else {
        return 0;
    };
    let common = trackers.iter().map(|t| t.base).min().unwrap_or(0) / 64;
    let mut total = common * 64;
    for k in common..end.div_ceil(64) {
        let w = trackers
            .iter()
            .fold(0u64, |acc, t| acc | t.absolute_word(k));
        total += u64::from(w.count_ones());
    }
    total
}

/// Loss and duplicates of one audience (a subscriber, or a shared group) for one
/// publisher that sent `sent` messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Messages expected: what the publisher sent.
    pub expected: u64,
    /// Distinct messages the audience received.
    pub unique: u64,
    /// Deliveries beyond the first of each message, within and across members.
    pub duplicates: u64,
    /// Messages never received.
    pub lost: u64,
    /// Messages received after a later one from the same publisher, per member.
    pub out_of_order: u64,
}

impl Delivery {
    /// Accounts `members`' trackers of one publisher against what it sent.
    pub fn of(sent: u64, members: &[&SeqTracker]) -> Delivery {
        let unique = union_unique(members);
        let member_unique: u64 = members.iter().map(|t| t.unique).sum();
        let within: u64 = members.iter().map(|t| t.duplicates).sum();
        Delivery {
            expected: sent,
            unique,
            duplicates: within + (member_unique - unique),
            lost: sent.saturating_sub(unique),
            out_of_order: members.iter().map(|t| t.out_of_order).sum(),
        }
    }

    /// Adds another audience's or publisher's numbers.
    pub fn add(&mut self, o: Delivery) {
        self.expected += o.expected;
        self.unique += o.unique;
        self.duplicates += o.duplicates;
        self.lost += o.lost;
        self.out_of_order += o.out_of_order;
    }
}

/// A new latency histogram in nanoseconds: 1 ns to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 low,
    // sigfig <= 5), so this cannot fail; fall back to an auto-resizing one regardless.
    Histogram::new_with_bounds(1, 600_000_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
}

/// The percentiles a run reports, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Smallest sample.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    /// Largest sample.
    pub max: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds; `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<LatencySummary> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(LatencySummary {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_delivery_keeps_the_bitmap_short() {
        let mut t = SeqTracker::default();
        for s in 0..100_000 {
            assert_eq!(t.record(s), Seen::New);
        }
        assert_eq!((t.unique, t.duplicates, t.gaps()), (100_000, 0, 0));
        assert!(
            t.words.len() <= 1,
            "full words are dropped: {}",
            t.words.len()
        );
        assert_eq!(t.base, 99_968);
    }

    #[test]
    fn out_of_order_and_repeated_numbers() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 5, 3, 2, 5, 0, 4, 9] {
            t.record(s);
        }
        assert_eq!(t.received, 9);
        assert_eq!(t.unique, 7, "0 1 2 3 4 5 9");
        assert_eq!(t.duplicates, 2, "5 and 0 again");
        assert_eq!(t.out_of_order, 3, "3, 2 and 4 arrived after 5");
        assert_eq!(t.gaps(), 3, "6 7 8 missing below 9");
        assert!(t.contains(4) && !t.contains(6) && !t.contains(10));
        // A duplicate of a number already compacted below base is still a duplicate.
        for s in 6..200 {
            t.record(s);
        }
        assert!(t.base >= 128);
        assert_eq!(t.record(1), Seen::Duplicate);
        assert_eq!(t.record(u64::from(u32::MAX) << 8), Seen::Implausible);
    }

    #[test]
    fn delivery_of_one_subscriber() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 1, 3, 2, 7] {
            t.record(s);
        }
        let d = Delivery::of(10, &[&t]);
        assert_eq!(
            d,
            Delivery {
                expected: 10,
                unique: 5,
                duplicates: 1,
                lost: 5,
                out_of_order: 1
            }
        );
        // Nothing received at all: everything is lost.
        assert_eq!(Delivery::of(4, &[]).lost, 4);
    }

    #[test]
    fn shared_group_members_are_merged() {
        // Two members split 0..300 between them, and both got 10 and 250 (a redelivery).
        let (mut a, mut b) = (SeqTracker::default(), SeqTracker::default());
        for s in 0..300u64 {
            if s % 3 == 0 { &mut a } else { &mut b }.record(s);
        }
        a.record(250);
        b.record(10);
        b.record(10);
        assert_eq!(union_unique(&[&a, &b]), 300);
        let d = Delivery::of(302, &[&a, &b]);
        assert_eq!(d.unique, 300);
        assert_eq!(d.lost, 2, "300 and 301 never arrived");
        assert_eq!(
            d.duplicates, 3,
            "250 and 10 across members, 10 again within b"
        );
    }

    #[test]
    fn union_with_compacted_members() {
        let (mut a, mut b) = (SeqTracker::default(), SeqTracker::default());
        for s in 0..1000 {
            a.record(s);
        }
        b.record(1500);
        assert!(a.base > 0);
        assert_eq!(union_unique(&[&a, &b]), 1001);
        assert_eq!(union_unique(&[&b, &a]), 1001);
    }

    #[test]
    fn latency_summary_percentiles() {
        let mut h = new_histogram();
        assert_eq!(LatencySummary::of(&h), None);
        // 1..=1000 microseconds, once each.
        for us in 1..=1000u64 {
            h.record(us * 1000).expect("in range");
        }
        let s = LatencySummary::of(&h).expect("not empty");
        assert_eq!(s.count, 1000);
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.001;
        assert!(near(s.min, 1.0), "{s:?}");
        assert!(near(s.p50, 500.0), "{s:?}");
        assert!(near(s.p90, 900.0), "{s:?}");
        assert!(near(s.p99, 990.0), "{s:?}");
        assert!(near(s.p99_9, 999.0), "{s:?}");
        assert!(near(s.max, 1000.0), "{s:?}");
        assert!(near(s.mean, 500.5), "{s:?}");
        let json = serde_json::to_value(s).expect("serialises");
        assert!(json.get("p99.9").is_some(), "{json}");
    }
}
