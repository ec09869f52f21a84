//! [`Ledger`]: a queue's bookkeeping of transfers (atomic ack-and-produce, dead-letter
//! redrive) whose progress record is durable but whose target record may not be.
//!
//! Invariants: a txn is in `open` from the moment its transfer record is durable until
//! its target record is (then a done record follows in the progress log); maintenance
//! never deletes the progress log from an open txn's record on, so a crash in between
//! finds the record on replay. `recovered` holds what replay found without its done
//! record; `Queues::open` finishes those before any client connects.

use std::collections::{BTreeMap, BTreeSet};

use crate::format::Transfer;

/// A transfer found on replay without its done record.
#[derive(Debug, Clone)]
pub(crate) struct Recovered {
    /// When its record was written: the target record, if it exists, is not older.
    pub timestamp: u64,
    /// The transfer.
    pub transfer: Transfer,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Larger than every txn used so far (also those replayed).
    next_txn: u64,
    /// txn -> offset of its transfer record in the progress log.
    pub open: BTreeMap<u64, u64>,
    /// txn -> the transfer, replayed without its done record.
    pub recovered: BTreeMap<u64, Recovered>,
    /// Messages of this queue a transfer is moving now (partition, offset): a second
    /// redrive of the same dead letter skips them.
    pub moving: BTreeSet<(u32, u64)>,
}

impl Ledger {
    /// A new txn id: above every one used, and time-based so that ids stay unique
    /// across restarts even after the records naming old ones are gone.
    pub fn next_txn(&mut self, now_ms: u64) -> u64 {
        let txn = self.next_txn.max(now_ms.saturating_mul(1 << 20));
        self.next_txn = txn + 1;
        txn
    }

    /// A txn seen on replay.
    pub fn saw_txn(&mut self, txn: u64) {
        self.next_txn = self.next_txn.max(txn.saturating_add(1));
    }

    /// Where the progress log must be kept from: the oldest open txn's record.
    pub fn keep_from(&self) -> Option<u64> {
        self.open.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txns_rise_past_replayed_ones_and_the_clock() {
        let mut l = Ledger::default();
        l.saw_txn(u64::MAX - 5);
        assert_eq!(l.next_txn(1), u64::MAX - 4);
        let mut l = Ledger::default();
        let a = l.next_txn(10);
        let b = l.next_txn(10);
        let c = l.next_txn(9);
        assert!(a < b && b < c, "{a} {b} {c}");
        l.open.insert(a, 7);
        l.open.insert(b, 3);
        assert_eq!(l.keep_from(), Some(3));
    }
}
