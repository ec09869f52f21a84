//! Free space: a round of appends is written only if the file system keeps
//! [`RESERVE`] bytes free after it.
//!
//! Why check instead of waiting for ENOSPC: a write that runs out of space midway leaves
//! part of a round in a segment or the journal, and a journal write error must fail
//! every `Fsync` log after it (what the journal holds is unknown). Refused before
//! anything is written, the round's appenders get [`Error::NoSpace`], every log stays
//! writable, and appends go through again by themselves once space returns: the next
//! round checks again. Another writer on the same file system can still fill it between
//! the check and the write; that case falls back to the write-error path. The reserve
//! also leaves room for segment rolls, index files and the session store.
//!
//! The broker's session store (fjall, `data/state`) uses the same guard with reserves
//! of its own (see the broker's `persistence::session_store`).

use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::Error;

/// Bytes that must stay free after a round is written.
pub const RESERVE: u64 = 4 * 1024 * 1024;

/// Space a round needed (reserve included) and what the file system had.
#[derive(Debug, Clone, Copy)]
pub struct Shortage {
    needed: u64,
    available: u64,
}

/// What one commit round has learnt of the free space: what the file system said at
/// its first check, and what the round's appends let through since.
#[derive(Debug, Default)]
pub(crate) struct Round {
    free: Option<u64>,
    taken: u64,
}

/// The free-space check of one storage directory, and the last refusal while space is
/// short (for readiness reports).
#[derive(Debug)]
pub struct SpaceGuard {
    dir: PathBuf,
    /// Bytes that must stay free after a write.
    reserve: u64,
    /// The bytes of the last refused round, and why it was refused.
    short: Mutex<Option<(u64, String)>>,
}

impl SpaceGuard {
    /// A guard of `dir` that keeps [`RESERVE`] free.
    pub fn new(dir: &Path) -> SpaceGuard {
        SpaceGuard::with_reserve(dir, RESERVE)
    }

    /// A guard of `dir` that keeps `reserve` bytes free.
    pub fn with_reserve(dir: &Path, reserve: u64) -> SpaceGuard {
        SpaceGuard {
            dir: dir.to_path_buf(),
            reserve,
            short: Mutex::new(None),
        }
    }

    /// `None` if `bytes` can be written and the reserve stay free (also when the file
    /// system cannot be asked: the write itself will say), else what is short.
    pub fn check(&self, bytes: u64) -> Option<Shortage> {
        self.check_in(bytes, &mut Round::default())
    }

    /// [`SpaceGuard::check`] for one log's appends within a commit `round`: the file
    /// system is asked once per round, and each log's appends count against what it
    /// said (a round writes hundreds of logs when a queue has 1,000 partitions, and a
    /// `statvfs` walks the path each time).
    pub(crate) fn check_in(&self, bytes: u64, round: &mut Round) -> Option<Shortage> {
        let free = match round.free {
            Some(free) => free,
            None => {
                let free = rustix::fs::statvfs(&self.dir)
                    .map_or(u64::MAX, |st| st.f_bavail.saturating_mul(st.f_frsize));
                round.free = Some(free);
                free
            }
        };
        let available = free.saturating_sub(round.taken);
        let needed = bytes.saturating_add(self.reserve);
        let mut short = self.short.lock();
        if available >= needed {
            round.taken = round.taken.saturating_add(bytes);
            *short = None;
            return None;
        }
        let s = Shortage { needed, available };
        *short = Some((bytes, self.error(s).to_string()));
        Some(s)
    }

    /// The error an append refused for `s` gets.
    pub fn error(&self, s: Shortage) -> Error {
        Error::NoSpace {
            path: self.dir.clone(),
            needed: s.needed,
            available: s.available,
        }
    }

    /// Why the last round was refused, while space is still short (looked at again
    /// now: space may have returned with no round since).
    pub fn shortage(&self) -> Option<String> {
        let bytes = self.short.lock().as_ref()?.0;
        self.check(bytes)?;
        self.short.lock().as_ref().map(|s| s.1.clone())
    }
}
