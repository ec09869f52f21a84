//! The clock of offline sessions: when a stored session's will is due and when the
//! session expires, in one ordered set, served by one task.
//!
//! Invariants: a client id has at most one entry (scheduling again replaces it, and
//! attaching a connection cancels it), so the set holds at most one entry per offline
//! session whatever the number of connect/disconnect cycles; an entry's deadline is
//! the earlier of its will and expiry times. The entry carries the generation of the
//! offline session it was scheduled for: the broker acts on it only if the session in
//! the map is still that one (see `Broker::offline_deadline`).
//!
//! Models: mini-redis `db.rs` (an ordered set of expirations and one purge task woken
//! when an earlier one is added) and mosquitto's `will_delay.c` / `session_expiry.c`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// What is scheduled for one offline session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The offline session this was scheduled for.
    pub generation: u64,
    /// When the will is to be published, if the session has a delayed will.
    pub will_at: Option<Instant>,
    /// When the session expires, unless it never does.
    pub expire_at: Option<Instant>,
}

impl Deadlines {
    fn next(&self) -> Option<Instant> {
        match (self.will_at, self.expire_at) {
            (Some(w), Some(e)) => Some(w.min(e)),
            (w, e) => w.or(e),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    by_time: BTreeMap<(Instant, Arc<str>), Deadlines>,
    by_client: HashMap<Arc<str>, Instant>,
}

/// The offline sessions' deadlines; one per broker.
#[derive(Debug, Default)]
pub struct OfflineTimers {
    state: Mutex<State>,
    /// Woken when an entry earlier than all others is added, so the task sleeps less.
    earlier: Notify,
}

impl OfflineTimers {
    /// Schedules `client`'s deadlines, replacing any it had. Nothing is kept for a
    /// session with no will delay and no expiry.
    pub fn schedule(&self, client: &Arc<str>, deadlines: Deadlines) {
        let mut st = self.state.lock();
        if let Some(at) = st.by_client.remove(client) {
            st.by_time.remove(&(at, client.clone()));
        }
        let Some(at) = deadlines.next() else {
            return;
        };
        let first = st.by_time.keys().next().is_none_or(|(t, _)| at < *t);
        st.by_client.insert(client.clone(), at);
        st.by_time.insert((at, client.clone()), deadlines);
        drop(st);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Forgets `client`'s deadlines (it connected again, or its session ended).
    pub fn cancel(&self, client: &str) {
        let mut st = self.state.lock();
        if let Some((client, at)) = st.by_client.remove_entry(client) {
            st.by_time.remove(&(at, client));
        }
    }

    /// Takes the entries whose deadline has come by `now`, earliest first.
    pub fn take_due(&self, now: Instant) -> Vec<(Arc<str>, Deadlines)> {
        let mut st = self.state.lock();
        let mut due = Vec::new();
        while let Some(entry) = st.by_time.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, client), deadlines) = entry.remove_entry();
            st.by_client.remove(&client);
            due.push((client, deadlines));
        }
        due
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.state.lock().by_time.keys().next().map(|(t, _)| *t)
    }

    /// Number of offline sessions with a deadline.
    pub fn len(&self) -> usize {
        self.state.lock().by_client.len()
    }

    /// True when no offline session has a deadline.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the next deadline has come (or an earlier one was scheduled, which
    /// the caller finds out by looking again).
    pub async fn wait(&self) {
        let notified = self.earlier.notified();
        match self.next() {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, secs: u64) -> Option<Instant> {
        Some(t0 + Duration::from_secs(secs))
    }

    #[test]
    fn one_entry_per_client_however_often_it_is_scheduled() {
        let timers = OfflineTimers::default();
        let t0 = Instant::now();
        let client: Arc<str> = "c".into();
        for generation in 0..100_000 {
            timers.schedule(
                &client,
                Deadlines {
                    generation,
                    will_at: None,
                    expire_at: at(t0, u64::from(u32::MAX - 1)),
                },
            );
        }
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.state.lock().by_time.len(), 1);
        timers.cancel(&client);
        assert_eq!(timers.len(), 0);
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn entries_come_due_in_order_of_their_earlier_deadline() {
        let timers = OfflineTimers::default();
        let t0 = Instant::now();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        let d = |generation, will, expire| Deadlines {
            generation,
            will_at: will,
            expire_at: expire,
        };
        timers.schedule(&a, d(1, None, at(t0, 30)));
        timers.schedule(&b, d(2, at(t0, 5), at(t0, 60)));
        timers.schedule(&c, d(3, None, None));
        assert_eq!(
            timers.len(),
            2,
            "nothing is kept for a session that never ends"
        );
        assert_eq!(timers.next(), at(t0, 5));
        assert!(timers.take_due(t0 + Duration::from_secs(4)).is_empty());
        let due = timers.take_due(t0 + Duration::from_secs(30));
        let names: Vec<&str> = due.iter().map(|(c, _)| &**c).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(due[0].1, d(2, at(t0, 5), at(t0, 60)));
        assert_eq!(timers.len(), 0);
    }

    #[tokio::test]
    async fn the_wait_ends_early_for_an_earlier_deadline() {
        let timers = Arc::new(OfflineTimers::default());
        let far: Arc<str> = "far".into();
        let t0 = Instant::now();
        timers.schedule(
            &far,
            Deadlines {
                generation: 1,
                will_at: None,
                expire_at: at(t0, 3600),
            },
        );
        let waiter = {
            let timers = timers.clone();
            tokio::spawn(async move { timers.wait().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let near: Arc<str> = "near".into();
        timers.schedule(
            &near,
            Deadlines {
                generation: 2,
                will_at: Some(Instant::now()),
                expire_at: None,
            },
        );
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the earlier deadline")
            .expect("no panic");
    }
}
