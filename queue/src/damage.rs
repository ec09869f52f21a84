//! What recovery could not read in a queue's logs, for the admin API.
//!
//! Storage salvages a damaged segment on open (see roost-storage's `quarantine.rs`):
//! records that check keep their offsets, lost ones read back as empty records, which
//! the dispatcher skips as undecodable (settled, never delivered). This module turns
//! the storage's per-log [`Recovery`] into what an operator asks: which partition (or
//! the group progress) lost which offsets, and where the damaged files went.

use std::ops::Range;
use std::path::PathBuf;

use roost_storage::{Log, Recovery};

/// Damage found in one of a queue's logs when it was opened, or by a read while running
/// (since the broker started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The partition, or `None` for the queue's group progress log (lost progress
    /// records mean settled messages may be delivered again).
    pub partition: Option<u32>,
    /// Offsets whose records could not be read: consumers never get them.
    pub lost: Vec<Range<u64>>,
    /// Copies of the damaged files as they were, under the storage's `quarantine/`.
    pub quarantined: Vec<PathBuf>,
}

impl Damage {
    /// The damage `recovery` reports for `log` (already opened, journal replayed), if
    /// any. A torn last record (a crash mid-write, nothing acknowledged) is not damage.
    pub(crate) fn of(partition: Option<u32>, log: &Log, recovery: &Recovery) -> Option<Damage> {
        let mut lost = recovery.lost.clone();
        if let Some(tail) = &recovery.truncated
            && !recovery.quarantined.is_empty()
            && let Some(n) = tail.records
        {
            // Records the journal restored after the cut were not lost.
            let start = tail.first_dropped_offset.max(log.next_offset());
            let end = tail.first_dropped_offset + n;
            if start < end {
                lost.push(start..end);
            }
        }
        (!lost.is_empty() || !recovery.quarantined.is_empty()).then(|| Damage {
            partition,
            lost,
            quarantined: recovery.quarantined.clone(),
        })
    }
}
