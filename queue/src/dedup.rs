//! [`Dedup`]: the `dedup-id`s a queue has stored within its `dedup_window_ms`.
//!
//! The ids themselves are durable in the message records (the queue header's dedup
//! field), so this table is only an index: [`crate::Queue`] rebuilds it on open by
//! reading every partition from `now - dedup_window_ms` on. Invariants:
//! - an id is `Stored` only once its record is durable, `Pending` while its append is
//!   in flight (a second produce with that id waits for the first's outcome instead of
//!   appending too), and absent after the append failed or the window passed;
//! - `order` lists stored ids by the time they were stored (oldest first), so expiry
//!   and the `dedup_max_ids` bound pop from its front.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tokio::sync::watch;

use crate::format::MessageId;

/// The outcome a waiting duplicate learns: the first produce's id, or `None` if it
/// failed (the waiter then produces itself).
pub(crate) type Outcome = Option<Option<MessageId>>;

enum Entry {
    Stored { id: MessageId, at: u64 },
    Pending(watch::Receiver<Outcome>),
}

/// What [`Dedup::claim`] found.
pub(crate) enum Claim {
    /// Stored already, as this message: acknowledge, store nothing.
    Stored(MessageId),
    /// Another produce with this id is being appended: wait for its outcome.
    Pending(watch::Receiver<Outcome>),
    /// New: the caller appends and reports with [`Dedup::finish`] through this sender.
    Claimed(watch::Sender<Outcome>),
}

/// The dedup index of one queue.
#[derive(Default)]
pub(crate) struct Dedup {
    ids: HashMap<Bytes, Entry>,
    order: VecDeque<(u64, Bytes)>,
}

impl Dedup {
    /// Looks `id` up at time `now`, claiming it if new.
    pub fn claim(&mut self, id: &Bytes, now: u64, window_ms: u64, max_ids: u64) -> Claim {
        self.expire(now, window_ms, max_ids);
        match self.ids.get(id) {
            Some(Entry::Stored { id, .. }) => Claim::Stored(id.clone()),
            Some(Entry::Pending(rx)) => Claim::Pending(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                self.ids.insert(id.clone(), Entry::Pending(rx));
                Claim::Claimed(tx)
            }
        }
    }

    /// The message stored with `id` within the window, if any (claims nothing).
    pub fn stored(
        &mut self,
        id: &Bytes,
        now: u64,
        window_ms: u64,
        max_ids: u64,
    ) -> Option<MessageId> {
        self.expire(now, window_ms, max_ids);
        match self.ids.get(id) {
            Some(Entry::Stored { id, .. }) => Some(id.clone()),
            _ => None,
        }
    }

    /// The append of the produce that claimed `id` is done: stored as `stored` at
    /// `at`, or (`None`) failed and the id is free again.
    pub fn finish(&mut self, id: &Bytes, stored: Option<MessageId>, at: u64) {
        match stored {
            Some(mid) => self.insert(id.clone(), mid, at),
            None => {
                if matches!(self.ids.get(id), Some(Entry::Pending(_))) {
                    self.ids.remove(id);
                }
            }
        }
    }

    /// Records a stored id (also used when rebuilding on open).
    pub fn insert(&mut self, id: Bytes, mid: MessageId, at: u64) {
        self.order.push_back((at, id.clone()));
        self.ids.insert(id, Entry::Stored { id: mid, at });
    }

    /// Ids stored and pending.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    fn expire(&mut self, now: u64, window_ms: u64, max_ids: u64) {
        let max = usize::try_from(max_ids).unwrap_or(usize::MAX);
        while let Some((at, id)) = self.order.front() {
            let old = at.saturating_add(window_ms) <= now;
            if !old && self.order.len() <= max {
                break;
            }
            // Only the entry this stamp belongs to (an id stored again later has a
            // newer stamp further back in `order`).
            if let Some(Entry::Stored { at: stored_at, .. }) = self.ids.get(id)
                && stored_at == at
            {
                self.ids.remove(id);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn mid(o: u64) -> MessageId {
        MessageId {
            queue: Arc::from("q"),
            partition: 0,
            offset: o,
        }
    }

    #[test]
    fn claims_waits_and_expires() {
        let mut d = Dedup::default();
        let a = Bytes::from_static(b"a");
        let Claim::Claimed(tx) = d.claim(&a, 1000, 100, 10) else {
            panic!("first claim of a new id must be Claimed");
        };
        let Claim::Pending(mut rx) = d.claim(&a, 1001, 100, 10) else {
            panic!("second claim while the first is in flight must wait");
        };
        let _ = tx.send(Some(Some(mid(4))));
        d.finish(&a, Some(mid(4)), 1002);
        assert_eq!(*rx.borrow_and_update(), Some(Some(mid(4))));
        assert!(matches!(d.claim(&a, 1050, 100, 10), Claim::Stored(m) if m == mid(4)));
        // The window has passed: the id is new again.
        assert!(matches!(d.claim(&a, 1102, 100, 10), Claim::Claimed(_)));
        // A failed append frees the id.
        d.finish(&a, None, 1103);
        assert!(matches!(d.claim(&a, 1104, 100, 10), Claim::Claimed(_)));
    }

    #[test]
    fn max_ids_bounds_the_table() {
        let mut d = Dedup::default();
        for i in 0..50u64 {
            d.insert(Bytes::from(i.to_string()), mid(i), 1000);
        }
        let _ = d.claim(&Bytes::from_static(b"x"), 1000, 1_000_000, 10);
        assert!(d.len() <= 11, "{}", d.len());
        assert!(matches!(
            d.claim(&Bytes::from_static(b"49"), 1000, 1_000_000, 10),
            Claim::Stored(_)
        ));
        assert!(matches!(
            d.claim(&Bytes::from_static(b"0"), 1000, 1_000_000, 10),
            Claim::Claimed(_)
        ));
    }
}
