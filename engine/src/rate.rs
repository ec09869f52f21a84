//! Token buckets for the overload limits that are rates (connects per second,
//! publishes and bytes per second per client).
//!
//! A bucket holds at most one second's worth of tokens and refills continuously, so a
//! client may burst up to its rate and then sustain it. Time is passed in, never read,
//! so the arithmetic is testable without sleeping.

use std::time::{Duration, Instant};

use crate::metrics::{Limit, Metrics};

/// A refilling allowance of `rate` units per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` units per second (`rate` must be positive).
    pub fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.max(1.0),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        self.last = now;
    }

    /// Takes `n` units if the bucket holds them; false (nothing taken) otherwise.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` units even if that leaves the bucket in debt (for work already done,
    /// such as a packet already read).
    pub fn spend(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// When the bucket is out of debt again, if it is in debt at `now`.
    pub fn in_debt_until(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        (self.tokens < 0.0).then(|| now + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// A client's publish allowance: packets and payload bytes per second, either or both.
#[derive(Debug, Clone)]
pub struct PublishBudget {
    packets: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    /// Whether the client was throttled when last asked (to count each throttling once).
    throttled: bool,
}

/// Which publish limit a throttled client ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// `max_publish_rate`.
    Packets,
    /// `max_publish_bytes_rate`.
    Bytes,
}

impl PublishBudget {
    /// The budget for these limits (0: no limit); `None` when neither is set.
    pub fn new(packets_per_sec: u32, bytes_per_sec: u64, now: Instant) -> Option<PublishBudget> {
        let bucket = |rate: f64| (rate > 0.0).then(|| TokenBucket::new(rate, now));
        let budget = PublishBudget {
            packets: bucket(f64::from(packets_per_sec)),
            bytes: bucket(bytes_per_sec as f64),
            throttled: false,
        };
        (budget.packets.is_some() || budget.bytes.is_some()).then_some(budget)
    }

    /// Charges one PUBLISH carrying `payload` bytes.
    pub fn spend(&mut self, payload: usize, now: Instant) {
        if let Some(b) = &mut self.packets {
            b.spend(1.0, now);
        }
        if let Some(b) = &mut self.bytes {
            b.spend(payload as f64, now);
        }
    }

    /// Until when the client must not be read from, as of `now`; each time a client
    /// becomes throttled, the limit that holds it back is counted in `metrics`.
    pub fn throttle(&mut self, now: Instant, metrics: &Metrics) -> Option<Instant> {
        let throttle = self.throttled_until(now);
        if let Some((_, which)) = throttle
            && !self.throttled
        {
            metrics.limit_tripped(
                match which {
                    Throttled::Packets => Limit::PublishRate,
                    Throttled::Bytes => Limit::PublishBytesRate,
                },
                1,
            );
        }
        self.throttled = throttle.is_some();
        throttle.map(|t| t.0)
    }

    /// Until when the client must not be read from, as of `now`, and which limit
    /// holds it back.
    pub fn throttled_until(&mut self, now: Instant) -> Option<(Instant, Throttled)> {
        let packets = self
            .packets
            .as_mut()
            .and_then(|b| b.in_debt_until(now))
            .map(|t| (t, Throttled::Packets));
        let bytes = self
            .bytes
            .as_mut()
            .and_then(|b| b.in_debt_until(now))
            .map(|t| (t, Throttled::Bytes));
        packets.into_iter().chain(bytes).max_by_key(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_one_second_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        for _ in 0..10 {
            assert!(b.try_take(1.0, t0));
        }
        assert!(!b.try_take(1.0, t0));
        // 100 ms buys one more, not more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.try_take(1.0, t1));
        assert!(!b.try_take(1.0, t1));
        // A long pause refills to one second's worth only.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(b.try_take(1.0, t2));
        }
        assert!(!b.try_take(1.0, t2));
    }

    #[test]
    fn debt_tells_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        assert_eq!(b.in_debt_until(t0), None);
        b.spend(15.0, t0);
        // 5 in debt at 10/s: half a second.
        let until = b.in_debt_until(t0).expect("in debt");
        assert_eq!(until.duration_since(t0), Duration::from_millis(500));
        // Halfway there, the rest of the wait is what is left.
        let mid = t0 + Duration::from_millis(250);
        assert_eq!(b.in_debt_until(mid), Some(until));
        assert_eq!(b.in_debt_until(until), None);
    }

    #[test]
    fn a_rate_below_one_still_admits_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.5, t0);
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0 + Duration::from_secs(1)));
        assert!(b.try_take(1.0, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn publish_budget_reports_the_limit_that_binds_longest() {
        let t0 = Instant::now();
        assert!(PublishBudget::new(0, 0, t0).is_none());
        let mut p = PublishBudget::new(100, 1000, t0).expect("limited");
        p.spend(10, t0);
        assert_eq!(p.throttled_until(t0), None);
        // 2000 bytes more: 1010 in debt on the byte bucket (~1 s), packets fine.
        p.spend(2000, t0);
        let (until, which) = p.throttled_until(t0).expect("throttled");
        assert_eq!(which, Throttled::Bytes);
        assert!(until.duration_since(t0) > Duration::from_millis(1000));
        let mut q = PublishBudget::new(2, 0, t0).expect("limited");
        q.spend(0, t0);
        q.spend(0, t0);
        assert_eq!(q.throttled_until(t0), None);
        q.spend(0, t0);
        assert_eq!(q.throttled_until(t0).map(|t| t.1), Some(Throttled::Packets));
    }

    #[test]
    fn each_throttling_is_counted_once() {
        let t0 = Instant::now();
        let m = Metrics::default();
        let mut p = PublishBudget::new(1, 0, t0).expect("limited");
        p.spend(0, t0);
        assert_eq!(p.throttle(t0, &m), None);
        p.spend(0, t0);
        assert!(p.throttle(t0, &m).is_some());
        assert!(p.throttle(t0, &m).is_some());
        assert_eq!(m.limit_trips(Limit::PublishRate), 1);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(p.throttle(later, &m), None);
        p.spend(0, later);
        p.spend(0, later);
        assert!(p.throttle(later, &m).is_some());
        assert_eq!(m.limit_trips(Limit::PublishRate), 2);
    }
}
