//! How far behind its leader each replica of a partition is, in time, and so which
//! replicas are in sync (Kafka's `replica.lag.time.max.ms`).
//!
//! A replica's lag is how long ago the leader's log ended where the replica's copy
//! ends now, and no less than how long ago it last answered the leader: a replica
//! whose matched index covers the log end as it stood `t` ms ago, and which answered
//! within `t` ms, lags `t` ms. It is in sync while its lag is at most the window. A
//! replica that keeps up has a lag of about one round trip; one that stopped
//! answering lags from its last answer, even on an idle partition (whose log end does
//! not move, but whose heartbeats stop being answered); one that answers but falls
//! behind lags from the oldest entry it misses.
//!
//! The leader keeps the history of its log end for one window (one sample per
//! millisecond at most, so the history is bounded by the window in ms), plus the
//! last sample before it: a matched index below that sample's end lags by more than
//! the window. When a replica becomes leader, every replica counts as caught up at
//! that moment (the leader cannot know their lag before it led), as Kafka counts a new
//! leader's followers: one that does not answer leaves the set one window later.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::raft::types::NodeId;

/// Samples closer together than this are merged into one (the later end wins, which
/// can only make a replica look further behind, by less than this).
const SAMPLE_EVERY: Duration = Duration::from_millis(1);

/// The lag of each replica of one partition, as its leader sees it.
pub struct ReplicaLag {
    window: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// When each replica last answered an append (or heartbeat) of this node.
    answered: HashMap<NodeId, Instant>,
    /// The term this node leads in and since when; `None` while it does not lead.
    leading: Option<(u64, Instant)>,
    /// (when, log end as the next index) since leading began, oldest first; ends
    /// never decrease within a term.
    ends: VecDeque<(Instant, u64)>,
    /// The last sample dropped from `ends` (older than the window).
    before: Option<(Instant, u64)>,
}

/// One replica's lag, as [`ReplicaLag::lags`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lag {
    /// The replica.
    pub replica: NodeId,
    /// Its lag, `None` when it is more than the window (how much more is not kept).
    pub lag: Option<Duration>,
}

impl Lag {
    /// Whether the replica is in sync (its lag is within the window).
    pub fn in_sync(&self) -> bool {
        self.lag.is_some()
    }
}

impl ReplicaLag {
    /// A tracker whose replicas are in sync while they lag at most `window`.
    pub fn new(window: Duration) -> ReplicaLag {
        ReplicaLag {
            window,
            inner: Mutex::default(),
        }
    }

    /// `replica` answered an append or heartbeat at `at`.
    pub fn answered(&self, replica: NodeId, at: Instant) {
        let mut inner = self.inner.lock();
        let last = inner.answered.entry(replica).or_insert(at);
        if *last < at {
            *last = at;
        }
    }

    /// This node's Raft state at `now`: whether it leads, in which term, and its log
    /// end (the index the next entry gets).
    pub fn observe(&self, leads: bool, term: u64, end: u64, now: Instant) {
        let mut inner = self.inner.lock();
        if !leads {
            inner.leading = None;
            inner.ends.clear();
            inner.before = None;
            return;
        }
        if inner.leading.map(|(t, _)| t) != Some(term) {
            inner.leading = Some((term, now));
            inner.ends.clear();
            inner.ends.push_back((now, end));
            inner.before = None;
            return;
        }
        match inner.ends.back_mut() {
            Some((_, last)) if end <= *last => {}
            Some((at, last)) if now.saturating_duration_since(*at) < SAMPLE_EVERY => *last = end,
            _ => inner.ends.push_back((now, end)),
        }
        let horizon = now.checked_sub(self.window);
        while let (Some(h), Some(&(at, e))) = (horizon, inner.ends.front()) {
            if at >= h || inner.ends.len() == 1 {
                break;
            }
            inner.before = Some((at, e));
            inner.ends.pop_front();
        }
    }

    /// The lag of each of `matched`'s replicas at `now` (matched: the next index each
    /// has, as the leader's replication reports it), given the leader's log end `end`;
    /// `me` (the leader) lags zero. Empty when this node does not lead.
    pub fn lags(
        &self,
        me: NodeId,
        end: u64,
        matched: &BTreeMap<NodeId, u64>,
        now: Instant,
    ) -> Vec<Lag> {
        let inner = self.inner.lock();
        let Some((_, since)) = inner.leading else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(matched.len() + 1);
        for (&replica, &next) in matched {
            if replica == me {
                continue;
            }
            // When the log last ended at or before `next`: now if the replica has
            // everything, else just before the first sample past `next`.
            let covered = if next >= end {
                Some(now)
            } else if inner.before.is_some_and(|(_, e)| e > next) {
                None
            } else {
                Some(
                    inner
                        .ends
                        .iter()
                        .find(|&&(_, e)| e > next)
                        .map_or(now, |&(at, _)| at),
                )
            };
            let answered = inner
                .answered
                .get(&replica)
                .copied()
                .map_or(since, |a| a.max(since));
            let lag = covered
                .map(|c| now.saturating_duration_since(c.min(answered)))
                .filter(|&lag| lag <= self.window);
            out.push(Lag { replica, lag });
        }
        out.push(Lag {
            replica: me,
            lag: Some(Duration::ZERO),
        });
        out.sort_by_key(|l| l.replica);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(500);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn lag_of(lags: &[Lag], r: NodeId) -> Option<Duration> {
        lags.iter().find(|l| l.replica == r).and_then(|l| l.lag)
    }

    #[test]
    fn a_replica_that_keeps_up_lags_by_its_last_answer() {
        let t0 = Instant::now();
        let l = ReplicaLag::new(W);
        l.observe(true, 1, 10, t0);
        l.observe(true, 1, 20, t0 + ms(100));
        l.answered(2, t0 + ms(100));
        let lags = l.lags(1, 20, &BTreeMap::from([(1, 20), (2, 20)]), t0 + ms(130));
        assert_eq!(lag_of(&lags, 1), Some(Duration::ZERO));
        assert_eq!(lag_of(&lags, 2), Some(ms(30)));
    }

    #[test]
    fn a_replica_that_answers_but_falls_behind_lags_from_the_first_entry_it_misses() {
        let t0 = Instant::now();
        let l = ReplicaLag::new(W);
        l.observe(true, 1, 10, t0);
        l.observe(true, 1, 20, t0 + ms(100));
        l.observe(true, 1, 30, t0 + ms(200));
        l.answered(2, t0 + ms(290));
        // It has everything before 15: the log went past that at t0 + 100 ms.
        let lags = l.lags(1, 30, &BTreeMap::from([(2, 15)]), t0 + ms(300));
        assert_eq!(lag_of(&lags, 2), Some(ms(200)));
        // Past the window: out of sync.
        let lags = l.lags(1, 30, &BTreeMap::from([(2, 15)]), t0 + ms(700));
        assert_eq!(lag_of(&lags, 2), None);
        assert!(lags.iter().any(|x| x.replica == 2 && !x.in_sync()));
    }

    #[test]
    fn a_silent_replica_leaves_after_one_window_even_on_an_idle_partition() {
        let t0 = Instant::now();
        let l = ReplicaLag::new(W);
        l.observe(true, 1, 10, t0);
        l.answered(2, t0 + ms(10));
        l.answered(3, t0 + ms(10));
        l.answered(3, t0 + ms(600));
        let lags = l.lags(1, 10, &BTreeMap::from([(2, 10), (3, 10)]), t0 + ms(620));
        assert_eq!(lag_of(&lags, 2), None);
        assert_eq!(lag_of(&lags, 3), Some(ms(20)));
    }

    #[test]
    fn the_history_is_bounded_by_the_window_and_remembers_what_it_dropped() {
        let t0 = Instant::now();
        let l = ReplicaLag::new(W);
        for i in 0..2000u64 {
            l.observe(true, 1, 1 + i, t0 + ms(i));
            l.answered(2, t0 + ms(i));
        }
        assert!(l.inner.lock().ends.len() <= 502);
        let now = t0 + ms(1999);
        // Index 1000 was passed at t0 + 1000 ms: more than the window ago.
        let lags = l.lags(1, 2000, &BTreeMap::from([(2, 1000)]), now);
        assert_eq!(lag_of(&lags, 2), None);
        // Index 1900 was appended at t0 + 1900 ms.
        let lags = l.lags(1, 2000, &BTreeMap::from([(2, 1900)]), now);
        assert_eq!(lag_of(&lags, 2), Some(ms(99)));
    }

    #[test]
    fn a_new_term_counts_everyone_caught_up_at_its_start() {
        let t0 = Instant::now();
        let l = ReplicaLag::new(W);
        l.observe(true, 1, 10, t0);
        l.answered(2, t0);
        l.observe(false, 2, 10, t0 + ms(50));
        assert!(
            l.lags(1, 10, &BTreeMap::from([(2, 10)]), t0 + ms(60))
                .is_empty()
        );
        l.observe(true, 3, 12, t0 + ms(1000));
        let lags = l.lags(1, 12, &BTreeMap::from([(2, 0)]), t0 + ms(1100));
        assert_eq!(lag_of(&lags, 2), Some(ms(100)));
        let lags = l.lags(1, 12, &BTreeMap::from([(2, 0)]), t0 + ms(1600));
        assert_eq!(lag_of(&lags, 2), None);
    }

    #[test]
    fn samples_within_a_millisecond_are_merged() {
        let t0 = Instant::now();
        let l = ReplicaLag::new(W);
        l.observe(true, 1, 10, t0);
        for i in 0..100 {
            l.observe(true, 1, 11 + i, t0 + Duration::from_micros(2000 + i));
        }
        assert_eq!(l.inner.lock().ends.len(), 2);
    }
}
