//! Fixed-rate pacing for one publisher.
//!
//! Message `k` (from 0) is due at `start + k / rate`. A publisher asks how many are due
//! now and sends them; when the load generator falls behind (a stalled task, a full
//! socket) it catches up in bursts of at most `max_burst`, so the long-run rate is kept
//! without a flood after a stall. The schedule is absolute, so rounding never drifts.

/// The schedule of one paced publisher.
#[derive(Debug, Clone)]
pub struct Pacer {
    start_ns: u64,
    per_sec: f64,
    issued: u64,
    max_burst: u64,
}

impl Pacer {
    /// A schedule of `per_sec` messages per second starting at `start_ns`.
    pub fn new(start_ns: u64, per_sec: f64, max_burst: u64) -> Pacer {
        Pacer {
            start_ns,
            per_sec: per_sec.max(1e-9),
            issued: 0,
            max_burst: max_burst.max(1),
        }
    }

    /// Messages due at `now_ns` and not yet issued, at most `max_burst`.
    pub fn due(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns {
            return 0;
        }
        let elapsed = (now_ns - self.start_ns) as f64 / 1e9;
        let scheduled = (elapsed * self.per_sec).floor() as u64 + 1;
        scheduled.saturating_sub(self.issued).min(self.max_burst)
    }

    /// Notes that `n` messages were sent.
    pub fn issued(&mut self, n: u64) {
        self.issued += n;
    }

    /// When the next message is due.
    pub fn next_due_ns(&self) -> u64 {
        self.start_ns + (self.issued as f64 / self.per_sec * 1e9) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn follows_the_rate() {
        let mut p = Pacer::new(5 * MS, 1000.0, 100);
        assert_eq!(p.due(0), 0, "nothing before the start");
        assert_eq!(p.due(5 * MS), 1, "the first message is due at the start");
        p.issued(1);
        assert_eq!(p.due(5 * MS), 0);
        assert_eq!(p.next_due_ns(), 6 * MS);
        assert_eq!(p.due(15 * MS), 10, "10 ms later: 10 more at 1000/s");
        p.issued(10);
        assert_eq!(p.next_due_ns(), 16 * MS);
    }

    #[test]
    fn long_run_rate_is_exact_and_catch_up_is_bounded() {
        let mut p = Pacer::new(0, 20_000.0, 50);
        let mut sent = 0;
        // Poll every 1 ms for 1 s, like the 1 ms timer of a worker task.
        for ms in 0..=1000 {
            let n = p.due(ms * MS);
            p.issued(n);
            sent += n;
        }
        assert_eq!(sent, 20_001, "20K/s for 1 s, counting the one at t=0");
        // A 100 ms stall: 2000 are owed, but they come 50 at a time.
        assert_eq!(p.due(1100 * MS), 50);
    }

    #[test]
    fn slow_rates_wait() {
        let mut p = Pacer::new(0, 0.5, 10);
        p.issued(p.due(0));
        assert_eq!(p.due(1999 * MS), 0);
        assert_eq!(p.due(2000 * MS), 1);
        assert_eq!(p.next_due_ns(), 2000 * MS);
    }
}
