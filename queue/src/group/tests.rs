use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const S: Settings = Settings {
    ack_timeout_ms: 1000,
    max_deliveries: 3,
    backoff_initial_ms: 100,
    backoff_max_ms: 1000,
};

fn id(s: &str) -> ConsumerId {
    Arc::from(s)
}

/// Delivers everything `pick` offers on partition `p` and returns (consumer, offset, count).
fn drain(g: &mut Group, p: usize, end: u64, now: u64) -> Vec<(String, u64, u32)> {
    let mut out = Vec::new();
    while let Some(pick) = g.pick(p, end, now, &S) {
        g.delivered(p, &pick, now, S.ack_timeout_ms);
        out.push((pick.consumer.to_string(), pick.offset, pick.count + 1));
    }
    out
}

#[test]
fn first_delivery_in_offset_order_within_window() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(3));
    let got = drain(&mut g, 0, 10, 0);
    assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(g.inflight_of("a"), 3);
    assert_eq!(g.pick(0, 10, 0, &S), None, "window full");
    assert_eq!(g.ack(0, 1, "a", 0), Settle::Settled);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(0), "0 still out");
    assert_eq!(
        drain(&mut g, 0, 10, 0)
            .iter()
            .map(|d| d.1)
            .collect::<Vec<_>>(),
        [3]
    );
    assert_eq!(g.ack(0, 0, "a", 0), Settle::Settled);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(2));
    assert_eq!(
        g.ack(0, 0, "a", 0),
        Settle::Ignored,
        "second ack is a no-op"
    );
}

#[test]
fn nothing_past_the_end_and_no_owner_no_delivery() {
    let mut g = Group::new(&[5, 0]);
    assert_eq!(g.pick(0, 10, 0, &S), None, "no members");
    g.join(id("a"), Window::Fixed(10));
    assert_eq!(drain(&mut g, 0, 7, 0).len(), 2, "offsets 5 and 6");
    assert_eq!(g.pick(0, 7, 0, &S), None);
}

#[test]
fn nack_backs_off_exponentially_then_dead_letters() {
    assert_eq!(S.backoff(1), 100);
    assert_eq!(S.backoff(2), 200);
    assert_eq!(S.backoff(3), 400);
    assert_eq!(S.backoff(5), 1000, "capped");
    assert_eq!(S.backoff(u32::MAX), 1000);
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(1));
    let mut now = 0;
    for n in 1..=2u32 {
        let d = drain(&mut g, 0, 1, now);
        assert_eq!(d, [("a".to_string(), 0, n)]);
        let due = now + S.backoff(n);
        assert_eq!(g.nack(0, 0, "a", now, &S), Nack::Retry { due, count: n });
        assert!(
            drain(&mut g, 0, 1, due - 1).is_empty(),
            "not before the backoff"
        );
        now = due;
    }
    assert_eq!(drain(&mut g, 0, 1, now), [("a".to_string(), 0, 3)]);
    assert_eq!(g.nack(0, 0, "a", now, &S), Nack::DeadLetter { count: 3 });
    assert!(
        drain(&mut g, 0, 1, now + 10_000).is_empty(),
        "dying: not delivered"
    );
    assert!(
        !g.is_settled(0, 0),
        "not settled until the dead letter is durable"
    );
    assert!(g.dead_lettered(0, 0));
    assert!(g.is_settled(0, 0));
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(1));
}

#[test]
fn failed_dead_letter_stays_for_redelivery() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(1));
    drain(&mut g, 0, 1, 0);
    assert_eq!(g.reject(0, 0, "a"), Some(1));
    g.dead_letter_failed(0, 0, 5);
    assert_eq!(drain(&mut g, 0, 1, 5), [("a".to_string(), 0, 2)]);
    assert!(!g.dead_lettered(0, 0), "no longer dying");
}

#[test]
fn ack_timeout_redelivers_with_rising_count_then_dead_letters() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(5));
    drain(&mut g, 0, 2, 0);
    assert_eq!(g.ack(0, 1, "a", 0), Settle::Settled);
    assert!(g.expire(999, &S).is_empty());
    assert_eq!(g.inflight_of("a"), 1);
    assert!(g.expire(1000, &S).is_empty());
    assert_eq!(g.inflight_of("a"), 0);
    assert_eq!(drain(&mut g, 0, 2, 1000), [("a".to_string(), 0, 2)]);
    g.expire(2000, &S);
    assert_eq!(drain(&mut g, 0, 2, 2000), [("a".to_string(), 0, 3)]);
    let dead = g.expire(3000, &S);
    assert_eq!(
        dead,
        [DeadLetter {
            partition: 0,
            offset: 0,
            count: 3
        }]
    );
    assert!(g.dead_lettered(0, 0));
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(2));
}

#[test]
fn late_ack_after_timeout_still_counts_but_not_for_another_holder() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(5));
    g.join(id("b"), Window::Fixed(5));
    // Partition 0 belongs to "a" (sorted first).
    drain(&mut g, 0, 1, 0);
    g.expire(1000, &S);
    assert_eq!(
        g.ack(0, 0, "a", 0),
        Settle::Settled,
        "waiting for redelivery: ack saves it"
    );
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(5));
    drain(&mut g, 0, 1, 0);
    assert_eq!(g.ack(0, 0, "b", 0), Settle::Ignored, "held by a");
    assert_eq!(g.nack(0, 0, "b", 0, &S), Nack::Ignored);
    assert_eq!(g.reject(0, 0, "b"), None);
}

#[test]
fn round_robin_assignment_is_stable_and_sorted() {
    let mut g = Group::new(&[0; 5]);
    g.join(id("c"), Window::Fixed(1));
    g.join(id("a"), Window::Fixed(1));
    g.join(id("b"), Window::Fixed(1));
    let owners: Vec<_> = (0..5).map(|p| g.owner(p).map(|o| o.to_string())).collect();
    let want = ["a", "b", "c", "a", "b"].map(|s| Some(s.to_string()));
    assert_eq!(owners, want);
    assert!(
        !g.join(id("a"), Window::Fixed(7)),
        "rejoin updates the window only"
    );
    g.leave("b", 0);
    let owners: Vec<_> = (0..5).map(|p| g.owner(p).map(|o| o.to_string())).collect();
    assert_eq!(
        owners,
        ["a", "c", "a", "c", "a"].map(|s| Some(s.to_string()))
    );
}

#[test]
fn leave_redelivers_to_the_new_owner_with_count_kept() {
    let mut g = Group::new(&[0, 0]);
    g.join(id("a"), Window::Fixed(10));
    assert_eq!(drain(&mut g, 0, 3, 0).len(), 3);
    assert_eq!(drain(&mut g, 1, 2, 0).len(), 2);
    g.ack(0, 0, "a", 0);
    g.join(id("b"), Window::Fixed(10));
    // b now owns partition 1; a keeps what it already holds there.
    assert_eq!(g.owner(1).map(|o| &**o), Some("b"));
    assert_eq!(g.inflight_of("a"), 4);
    assert!(g.leave("a", 50));
    assert_eq!(g.inflight_of("a"), 0);
    let p0 = drain(&mut g, 0, 3, 50);
    assert_eq!(p0, [("b".into(), 1, 2), ("b".into(), 2, 2)]);
    let p1 = drain(&mut g, 1, 2, 50);
    assert_eq!(p1, [("b".into(), 0, 2), ("b".into(), 1, 2)]);
    assert!(!g.leave("a", 50));
}

#[test]
fn last_member_leaving_keeps_work_for_the_next() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(2));
    drain(&mut g, 0, 4, 0);
    g.leave("a", 0);
    assert_eq!(g.pick(0, 4, 0, &S), None);
    g.join(id("z"), Window::Fixed(10));
    let got = drain(&mut g, 0, 4, 0);
    assert_eq!(
        got.iter().map(|d| (d.1, d.2)).collect::<Vec<_>>(),
        [(0, 2), (1, 2), (2, 1), (3, 1)]
    );
}

#[test]
fn skip_settles_unmatched_offsets() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(10));
    let pick = g.pick(0, 3, 0, &S);
    assert_eq!(pick.as_ref().map(|p| p.offset), Some(0));
    g.skip(0, 0);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(1));
    let pick = g.pick(0, 3, 0, &S).map(|p| p.offset);
    assert_eq!(pick, Some(1));
    drain(&mut g, 0, 2, 0);
    g.skip(0, 2);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(1), "1 in flight");
    g.ack(0, 1, "a", 0);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(3));
}

#[test]
fn reset_moves_the_cursor_and_frees_windows() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(2));
    drain(&mut g, 0, 10, 0);
    g.ack(0, 0, "a", 0);
    g.reset(0, 7);
    assert_eq!(g.inflight_of("a"), 0);
    assert_eq!(
        g.ack(0, 1, "a", 0),
        Settle::Ignored,
        "forgotten by the reset"
    );
    let got: Vec<u64> = drain(&mut g, 0, 10, 0).iter().map(|d| d.1).collect();
    assert_eq!(got, [7, 8]);
    g.reset(0, 0);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(0));
    let got: Vec<u64> = drain(&mut g, 0, 10, 0).iter().map(|d| d.1).collect();
    assert_eq!(got, [0, 1], "replay from the start (window 2)");
}

#[test]
fn restore_skips_acked_offsets() {
    let c = Cursor::restored(3, [5, 6, 9, 1]);
    assert_eq!(c.committed(), 3);
    assert_eq!(c.acked().collect::<Vec<_>>(), [5, 6, 9]);
    assert_eq!(c.lag(10), 4);
    let mut g = Group::from_cursors(vec![c]);
    g.join(id("a"), Window::Fixed(10));
    let got: Vec<u64> = drain(&mut g, 0, 11, 0).iter().map(|d| d.1).collect();
    assert_eq!(got, [3, 4, 7, 8, 10]);
    let c = Cursor::restored(3, [3, 4]);
    assert_eq!(c.committed(), 5);
}

#[test]
fn clamp_start_and_end() {
    let mut g = Group::from_cursors(vec![Cursor::restored(2, [4, 8])]);
    g.clamp_start(0, 4);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(5));
    g.clamp_start(0, 1);
    assert_eq!(
        g.cursor(0).map(Cursor::committed),
        Some(5),
        "never backwards"
    );
    g.clamp_end(0, 7);
    assert_eq!(g.cursor(0).map(|c| c.acked().count()), Some(0));
    g.clamp_end(0, 3);
    assert_eq!(g.cursor(0).map(Cursor::committed), Some(3));
}

#[test]
fn add_partitions_rebalances() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(1));
    g.join(id("b"), Window::Fixed(1));
    g.add_partitions(&[0, 0]);
    assert_eq!(g.partitions(), 3);
    assert_eq!(g.owner(2).map(|o| &**o), Some("a"));
}

/// One step of the random schedule.
#[derive(Debug, Clone)]
enum Op {
    Deliver(usize),
    Ack(usize),
    Nack(usize),
    Reject(usize),
    Tick(u64),
    Join(u8, u32),
    Leave(u8),
    DeadLetterResult(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..4usize).prop_map(Op::Deliver),
        4 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Nack),
        1 => any::<usize>().prop_map(Op::Reject),
        2 => (0..3000u64).prop_map(Op::Tick),
        1 => (0..4u8, 1..4u32).prop_map(|(c, w)| Op::Join(c, w)),
        1 => (0..4u8).prop_map(Op::Leave),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::DeadLetterResult(i, ok)),
    ]
}

/// The harness plays the consumers and the dead-letter queue.
struct Sim {
    g: Group,
    ends: Vec<u64>,
    now: u64,
    windows: BTreeMap<String, u32>,
    /// (partition, offset) -> consumer holding it, as the consumers see it.
    held: BTreeMap<(usize, u64), String>,
    dying: Vec<(usize, u64)>,
    settled: BTreeSet<(usize, u64)>,
}

impl Sim {
    fn settle(&mut self, key: (usize, u64)) {
        assert!(self.settled.insert(key), "{key:?} settled twice");
    }

    fn check(&self) {
        for c in self.windows.keys() {
            let held = self.held.values().filter(|h| *h == c).count() as u32;
            assert_eq!(
                self.g.inflight_of(c),
                held,
                "{c}: group and consumer disagree"
            );
        }
    }

    fn deliver(&mut self, p: usize) {
        while let Some(pick) = self.g.pick(p, self.ends[p], self.now, &S) {
            assert!(
                !self.settled.contains(&(p, pick.offset)),
                "settled message delivered"
            );
            // A window may shrink on rejoin below what is already out; it must never
            // be exceeded by a new delivery.
            let w = self.windows.get(&*pick.consumer).copied().unwrap_or(0);
            assert!(self.g.inflight_of(&pick.consumer) < w, "over the window");
            self.g.delivered(p, &pick, self.now, S.ack_timeout_ms);
            self.held
                .insert((p, pick.offset), pick.consumer.to_string());
        }
    }

    fn nth_held(&self, i: usize) -> Option<((usize, u64), String)> {
        let n = self.held.len();
        (n > 0).then(|| {
            let (k, c) = self.held.iter().nth(i % n).map(|(k, c)| (*k, c.clone()))?;
            Some((k, c))
        })?
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Deliver(p) => self.deliver(p % self.ends.len()),
            Op::Ack(i) => {
                if let Some((key, c)) = self.nth_held(i) {
                    self.held.remove(&key);
                    if self.g.ack(key.0, key.1, &c, 0) == Settle::Settled {
                        self.settle(key);
                    }
                }
            }
            Op::Nack(i) => {
                if let Some((key, c)) = self.nth_held(i) {
                    self.held.remove(&key);
                    if let Nack::DeadLetter { .. } = self.g.nack(key.0, key.1, &c, self.now, &S) {
                        self.dying.push(key);
                    }
                }
            }
            Op::Reject(i) => {
                if let Some((key, c)) = self.nth_held(i) {
                    self.held.remove(&key);
                    if self.g.reject(key.0, key.1, &c).is_some() {
                        self.dying.push(key);
                    }
                }
            }
            Op::Tick(dt) => {
                self.now += dt;
                for d in self.g.expire(self.now, &S) {
                    self.dying.push((d.partition, d.offset));
                }
                // A consumer whose delivery timed out may still hold it; it is no
                // longer in flight to it, so drop what the group no longer counts.
                let g = &self.g;
                self.held
                    .retain(|&(p, o), _| g.cursors()[p].inflight.contains_key(&o));
            }
            Op::Join(c, w) => {
                let name = format!("c{c}");
                self.g.join(id(&name), Window::Fixed(w));
                self.windows.insert(name, w.max(1));
            }
            Op::Leave(c) => {
                let name = format!("c{c}");
                self.g.leave(&name, self.now);
                self.windows.remove(&name);
                self.held.retain(|_, h| *h != name);
            }
            Op::DeadLetterResult(i, ok) => {
                if !self.dying.is_empty() {
                    let key = self.dying.remove(i % self.dying.len());
                    if ok {
                        if self.g.dead_lettered(key.0, key.1) {
                            self.settle(key);
                        }
                    } else {
                        self.g.dead_letter_failed(key.0, key.1, self.now);
                    }
                }
            }
        }
        self.check();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any interleaving of deliveries, acks, nacks, rejects, timeouts, joins and leaves
    /// settles every message exactly once, never exceeds a window, and loses nothing:
    /// once the consumers only ack, everything drains.
    #[test]
    fn every_message_settles_exactly_once(
        ends in proptest::collection::vec(0..12u64, 1..4),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut sim = Sim {
            g: Group::new(&vec![0; ends.len()]),
            ends: ends.clone(),
            now: 0,
            windows: BTreeMap::new(),
            held: BTreeMap::new(),
            dying: Vec::new(),
            settled: BTreeSet::new(),
        };
        for op in ops {
            sim.apply(op);
        }
        // Drain: one steady consumer acks everything; dead letters succeed.
        sim.apply(Op::Join(9, 3));
        for _ in 0..10_000 {
            for key in std::mem::take(&mut sim.dying) {
                if sim.g.dead_lettered(key.0, key.1) {
                    sim.settle(key);
                }
            }
            for p in 0..ends.len() {
                sim.deliver(p);
            }
            let held: Vec<_> = std::mem::take(&mut sim.held).into_iter().collect();
            for (key, c) in held {
                if sim.g.ack(key.0, key.1, &c, 0) == Settle::Settled {
                    sim.settle(key);
                }
            }
            sim.apply(Op::Tick(S.backoff_max_ms + S.ack_timeout_ms));
            if sim.settled.len() as u64 == ends.iter().sum::<u64>() {
                break;
            }
        }
        let want: BTreeSet<(usize, u64)> = ends
            .iter()
            .enumerate()
            .flat_map(|(p, &e)| (0..e).map(move |o| (p, o)))
            .collect();
        prop_assert_eq!(&sim.settled, &want);
        for (p, &e) in ends.iter().enumerate() {
            prop_assert_eq!(sim.g.cursor(p).map(Cursor::committed), Some(e));
        }
        prop_assert_eq!(sim.g.inflight(), 0);
    }
}

#[test]
fn restored_counts_go_on_from_where_they_were_and_stop_at_the_bound() {
    // Before the crash: offsets 0..4 handed out; 1 settled; 0 delivered twice, 2 three
    // times (the bound), 3 once. After it the cursor is rebuilt from that progress.
    let mut g = Group::from_cursors(vec![Cursor::restored(0, [1])]);
    g.replay_delivered(0, 0, 2);
    g.replay_delivered(0, 2, 3);
    g.replay_delivered(0, 3, 1);
    g.replay_delivered(0, 1, 4); // settled: a stale count changes nothing
    g.join(id("a"), Window::Fixed(10));
    // 2 has had its deliveries: it is not handed out, and the next sweep dead-letters it.
    let got = drain(&mut g, 0, 6, 0);
    assert_eq!(
        got,
        [
            ("a".into(), 0, 3),
            ("a".into(), 3, 2),
            ("a".into(), 4, 1),
            ("a".into(), 5, 1)
        ]
    );
    let dead = g.expire(0, &S);
    assert_eq!(
        dead,
        [DeadLetter {
            partition: 0,
            offset: 2,
            count: 3
        }]
    );
    assert!(g.dead_lettered(0, 2));
    // Offsets are never handed out twice: 3 and 0 are in flight, not new.
    assert_eq!(g.pick(0, 6, 0, &S), None);
}

#[test]
fn a_consumer_leaving_with_a_message_at_the_bound_sends_it_to_dead_letters() {
    let mut g = Group::new(&[0]);
    g.join(id("a"), Window::Fixed(10));
    for now in [0, 200, 600] {
        drain(&mut g, 0, 1, now);
        if now < 600 {
            assert!(matches!(g.nack(0, 0, "a", now, &S), Nack::Retry { .. }));
        }
    }
    // Third delivery in flight; the consumer goes away.
    assert!(g.leave("a", 700));
    g.join(id("b"), Window::Fixed(10));
    assert_eq!(g.pick(0, 1, 700, &S), None, "not a fourth delivery");
    assert_eq!(g.expire(700, &S).len(), 1);
}

/// Acks everything `consumer` holds on partition `p` at `now`.
fn ack_all(g: &mut Group, p: usize, consumer: &str, now: u64) -> usize {
    let held: Vec<u64> = g.cursors()[p]
        .inflight
        .iter()
        .filter(|(_, f)| &*f.consumer == consumer)
        .map(|(&o, _)| o)
        .collect();
    for &o in &held {
        assert_eq!(g.ack(p, o, consumer, now), Settle::Settled);
    }
    held.len()
}

#[test]
fn adaptive_window_grows_for_a_consumer_that_keeps_up() {
    let mut g = Group::new(&[0]);
    g.join(id("fast"), Window::Adaptive { max: 256 });
    assert_eq!(g.window_of("fast"), ADAPTIVE_START);
    let mut now = 0;
    // Each round the consumer takes a full window and answers 2 ms later.
    for _ in 0..20 {
        drain(&mut g, 0, u64::MAX, now);
        now += 2;
        ack_all(&mut g, 0, "fast", now);
    }
    assert_eq!(g.window_of("fast"), 256, "doubled up to the bound");
    // A consumer that is fast but never fills its window has no reason to grow.
    let mut g = Group::new(&[0]);
    g.join(id("light"), Window::Adaptive { max: 256 });
    for round in 0..50 {
        drain(&mut g, 0, round * 4 + 4, now);
        now += 1;
        ack_all(&mut g, 0, "light", now);
    }
    assert_eq!(g.window_of("light"), ADAPTIVE_START);
}

#[test]
fn adaptive_window_keeps_a_slow_consumer_from_hoarding() {
    // Two consumers share a group of two partitions: "fast" answers at once, "slow"
    // works through one message a second. Each owns a partition.
    let mut g = Group::new(&[0, 0]);
    g.join(id("fast"), Window::Adaptive { max: 256 });
    g.join(id("slow"), Window::Adaptive { max: 256 });
    let (pf, ps) = (0, 1);
    assert_eq!(g.owner(pf).map(|c| &**c), Some("fast"));
    assert_eq!(g.owner(ps).map(|c| &**c), Some("slow"));
    let end = 1_000_000;
    let mut now = 0;
    let mut held_max_late = 0;
    for second in 0..120u64 {
        // The slow one finishes its oldest message each second; the fast one
        // answers everything every 10 ms.
        drain(&mut g, ps, end, now);
        if let Some((&o, _)) = g.cursors()[ps].inflight.iter().next() {
            assert_eq!(g.ack(ps, o, "slow", now), Settle::Settled);
        }
        drain(&mut g, ps, end, now);
        for _ in 0..100 {
            drain(&mut g, pf, end, now);
            now += 10;
            ack_all(&mut g, pf, "fast", now);
        }
        if second >= 60 {
            held_max_late = held_max_late.max(g.inflight_of("slow"));
        }
    }
    assert_eq!(g.window_of("fast"), 256);
    assert_eq!(g.window_of("slow"), ADAPTIVE_FLOOR);
    assert!(held_max_late <= ADAPTIVE_FLOOR, "slow held {held_max_late}");
    // With a fixed window of 32 it would hold 32 s of its work; adapted, when it goes
    // away only the few it held come again, and the rest of its partition goes to the
    // new owner as first deliveries.
    let held = g.inflight_of("slow");
    g.leave("slow", now);
    let again = drain(&mut g, ps, end, now);
    assert_eq!(again.iter().filter(|d| d.2 > 1).count() as u32, held);
    assert!(again.iter().all(|d| d.0 == "fast"));
}

#[test]
fn a_timeout_drops_an_adaptive_window_to_its_floor_and_a_fixed_one_stays() {
    let mut g = Group::new(&[0, 0]);
    g.join(id("a"), Window::Adaptive { max: 64 });
    g.join(id("b"), Window::Fixed(16));
    drain(&mut g, 0, 100, 0);
    drain(&mut g, 1, 100, 0);
    assert_eq!(g.inflight_of("a"), 32);
    assert_eq!(g.inflight_of("b"), 16);
    g.expire(S.ack_timeout_ms, &S);
    assert_eq!(g.window_of("a"), ADAPTIVE_FLOOR);
    assert_eq!(g.window_of("b"), 16);
    // Rejoining keeps what the adaptive window learnt, within the new bound.
    g.join(id("a"), Window::Adaptive { max: 2 });
    assert_eq!(g.window_of("a"), 2);
}

#[test]
fn a_partition_that_changes_hands_waits_for_what_the_old_owner_holds() {
    // "a" owns both partitions and holds 0..3 of partition 1; "b" joins and gets
    // partition 1 (p % 2 of the members sorted by id).
    let mut g = Group::new(&[0, 0]);
    g.join(id("a"), Window::Fixed(3));
    assert_eq!(drain(&mut g, 1, 10, 0).len(), 3);
    g.join(id("b"), Window::Fixed(10));
    assert_eq!(g.owner(1).map(|o| &**o), Some("b"));
    assert!(g.in_handover(1));
    assert!(!g.in_handover(0), "partition 0 stayed with a");
    assert!(
        drain(&mut g, 1, 10, 0).is_empty(),
        "3 waits until a has answered 0..3"
    );
    assert_eq!(g.ack(1, 0, "a", 0), Settle::Settled);
    assert_eq!(g.ack(1, 1, "a", 0), Settle::Settled);
    assert!(drain(&mut g, 1, 10, 0).is_empty(), "2 is still with a");
    // A nack takes it back: redelivered to the new owner first, then the new offsets.
    assert!(matches!(g.nack(1, 2, "a", 0, &S), Nack::Retry { .. }));
    assert!(!g.in_handover(1));
    let got = drain(&mut g, 1, 10, 1000);
    assert_eq!(got.first(), Some(&("b".to_string(), 2, 2)));
    assert_eq!(
        got[1..]
            .iter()
            .map(|d| (d.0.as_str(), d.1))
            .collect::<Vec<_>>(),
        (3..10).map(|o| ("b", o)).collect::<Vec<_>>()
    );
}

#[test]
fn a_handover_ends_when_the_old_owner_leaves_or_times_out() {
    let mut g = Group::new(&[0, 0]);
    g.join(id("a"), Window::Fixed(2));
    assert_eq!(drain(&mut g, 1, 10, 0).len(), 2);
    g.join(id("b"), Window::Fixed(10));
    assert!(drain(&mut g, 1, 10, 0).is_empty());
    assert!(g.leave("a", 5));
    assert!(!g.in_handover(1));
    let got = drain(&mut g, 1, 10, 5);
    assert_eq!(
        got.iter().map(|d| d.1).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
}

#[test]
fn a_replica_keeps_the_counts_and_backoffs_its_leader_made_and_honours_them_when_it_leads() {
    // What the leader did: offset 0 delivered twice and nacked (due at 500), offset 1
    // delivered once, offset 2 settled.
    let mut g = Group::new(&[0]);
    g.learn_delivered(0, 0, 2, 500);
    g.learn_delivered(0, 1, 1, 0);
    g.learn_delivered(0, 1, 1, 0);
    g.replay_settled(0, 2);
    // A count or a due time learned later never lowers them.
    g.learn_delivered(0, 0, 1, 100);
    // This replica leads now and a consumer joins.
    g.join(id("a"), Window::Fixed(10));
    assert_eq!(
        drain(&mut g, 0, 4, 499),
        [("a".to_string(), 1, 2), ("a".to_string(), 3, 1)],
        "offset 0 waits for its backoff; 2 was settled"
    );
    assert_eq!(drain(&mut g, 0, 4, 500), [("a".to_string(), 0, 3)]);
}
