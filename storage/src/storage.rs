//! `Storage`: a directory of named logs sharing one committer.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::commit::{CommitShared, Committer};
use crate::error::{Error, Result, io_err};
use crate::journal;
use crate::latency::SyncLatency;
use crate::log::{Log, LogConfig, LogInner, Recovery, stored_id};

/// A storage directory: one subdirectory per log, all logs written by one shared
/// group committer (its threads are shared by every log) and the journal of the
/// `Fsync` logs (`.journal-0`, `.journal-1`).
///
/// Dropping the `Storage` writes and syncs everything queued, then stops the committer;
/// appends on surviving [`Log`] handles fail with [`Error::Closed`] from then on.
pub struct Storage {
    dir: PathBuf,
    logs: Mutex<HashMap<String, Log>>,
    /// What opening the storage repaired in each log (journal replay), reported by the
    /// log's first [`Storage::open_log`].
    recovered: Mutex<HashMap<String, Recovery>>,
    /// Damage found in the middle of the journal files on open.
    journal_damage: Vec<JournalDamage>,
    // Declared last: dropped after the map, joining the thread that holds log references.
    committer: Committer,
}

/// Damage in a journal file, found on open: entries that could not be read, with
/// readable ones after them, or an unreadable header. The readable entries were
/// replayed; the file was copied, as it was, into `<storage dir>/quarantine/journal/`
/// first (one copy per file, however many damaged places it has). Records of a log
/// that only the damaged entries held are lost: a log whose replay stopped at a gap
/// because of it reports the quarantined copy and the gap (`Recovery::quarantined`,
/// `Recovery::journal_gap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalDamage {
    /// The journal file.
    pub file: PathBuf,
    /// Its bytes that were skipped.
    pub skipped: std::ops::Range<u64>,
    /// Its header was unreadable (`skipped` starts at 0): the epoch of its entries was
    /// taken from the first intact one, and the file was given a fresh header.
    pub header: bool,
    /// Its copy in the quarantine directory.
    pub quarantined: PathBuf,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("dir", &self.dir).finish()
    }
}

fn valid_name(name: &str) -> bool {
    name != crate::quarantine::QUARANTINE_DIR
        && !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Storage {
    /// Opens (creating if needed) the storage directory, replays its journal into the
    /// logs that lost records to a power cut, and starts the committer. Logs are opened
    /// one by one with [`Storage::open_log`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Storage> {
        Storage::open_with_journal_bytes(dir, journal::DEFAULT_FILE_BYTES)
    }

    /// [`Storage::open`], with each of the two journal files handing over to the other
    /// (and being check-pointed) once it holds about `journal_bytes`. Smaller means
    /// more frequent checkpoints; 64 MiB by default.
    pub fn open_with_journal_bytes(dir: impl AsRef<Path>, journal_bytes: u64) -> Result<Storage> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let (files, entries, damaged) = journal::open(&dir).map_err(io_err(&dir))?;
        let shared = Arc::new(CommitShared::new(files, &dir));
        let mut journal_damage: Vec<JournalDamage> = Vec::new();
        for d in damaged {
            // Copied aside (once per file) before the journal is voided below.
            let file = dir.join(d.file);
            let copied = journal_damage.iter().find(|j| j.file == file);
            let quarantined = match copied {
                Some(j) => j.quarantined.clone(),
                None => {
                    let copy = crate::quarantine::quarantine_copy(&dir, "journal", &file)
                        .map_err(io_err(&file))?;
                    shared
                        .quarantined
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    copy
                }
            };
            journal_damage.push(JournalDamage {
                file,
                skipped: d.skipped,
                header: d.header,
                quarantined,
            });
        }
        let mut recovered = HashMap::new();
        let entries_empty = entries.is_empty();
        if !entries_empty {
            for (name, entries) in journal::by_log(entries) {
                if let Some(mut recovery) = replay(&dir, &name, &entries, &shared)? {
                    if recovery.journal_gap.is_some() {
                        recovery
                            .quarantined
                            .extend(journal_damage.iter().map(|d| d.quarantined.clone()));
                    }
                    recovered.insert(name, recovery);
                }
            }
        }
        if !entries_empty || !journal_damage.is_empty() {
            // Every log holds its records durably now: void the journal (and give a
            // file whose header was damaged a fresh one, now that it is copied aside).
            shared.reset_journal().map_err(io_err(&dir))?;
        }
        let committer = Committer::start(shared, journal_bytes).map_err(io_err(&dir))?;
        Ok(Storage {
            dir,
            logs: Mutex::new(HashMap::new()),
            recovered: Mutex::new(recovered),
            journal_damage,
            committer,
        })
    }

    /// Damage found in the middle of the journal files when this storage was opened.
    pub fn journal_damage(&self) -> &[JournalDamage] {
        &self.journal_damage
    }

    /// The storage directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The durations of this storage's data-file fdatasyncs (the journal's and every
    /// log's, recovery's included), for the broker's `/metrics`.
    pub fn sync_latency(&self) -> &SyncLatency {
        &self.committer.shared().syncs
    }

    /// Names of the logs on disk, open or not, sorted.
    pub fn log_names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let is_dir = entry.file_type().map_err(io_err(entry.path()))?.is_dir();
            if let Some(name) = entry.file_name().to_str().filter(|n| valid_name(n))
                && is_dir
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Opens the log `name`, creating it if it does not exist, and recovers it: a torn
    /// or corrupt tail of the active segment is cut off and missing or malformed index
    /// files are rebuilt. The returned [`Recovery`] says exactly what was dropped or
    /// repaired, for the caller to log. Blocks on disk I/O.
    pub fn open_log(&self, name: &str, config: LogConfig) -> Result<(Log, Recovery)> {
        if !valid_name(name) {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let mut logs = self.logs.lock();
        if logs.contains_key(name) {
            return Err(Error::AlreadyOpen(name.to_owned()));
        }
        let (inner, recovery) = LogInner::open(
            name.to_owned(),
            self.dir.join(name),
            config,
            self.committer.shared().clone(),
        )?;
        let recovery = match self.recovered.lock().remove(name) {
            Some(earlier) => earlier.merge(recovery),
            None => recovery,
        };
        self.committer.shared().quarantined.fetch_add(
            recovery.quarantined.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let log = Log { inner };
        logs.insert(name.to_owned(), log.clone());
        Ok((log, recovery))
    }

    /// Damaged files that recovery, or a read that met damage while running, copied
    /// into `<dir>/quarantine/` (and then rewrote or cut) since this storage was
    /// opened: `roost_storage_quarantined_total`.
    pub fn quarantined_total(&self) -> u64 {
        self.committer
            .shared()
            .quarantined
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The open log `name`, if any.
    pub fn log(&self, name: &str) -> Option<Log> {
        self.logs.lock().get(name).cloned()
    }

    /// Closes the log `name` (its queued appends fail with [`Error::Closed`]) and deletes
    /// its directory. Deleting a log that is not open deletes it from disk.
    pub fn delete_log(&self, name: &str) -> Result<()> {
        if !valid_name(name) {
            return Err(Error::InvalidName(name.to_owned()));
        }
        let log = self.logs.lock().remove(name);
        let dir = match &log {
            Some(log) => {
                log.inner.close();
                log.inner.dir().to_path_buf()
            }
            None => self.dir.join(name),
        };
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(Error::Io {
                    path: dir,
                    source: e,
                });
            }
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    /// Logs that went read-only after an I/O error, with that error: the health check.
    pub fn failed_logs(&self) -> Vec<(String, Arc<io::Error>)> {
        let mut failed: Vec<_> = self
            .logs
            .lock()
            .values()
            .filter_map(|l| l.failure().map(|e| (l.name().to_owned(), e)))
            .collect();
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        failed
    }

    /// Why appends are being refused for lack of space, while they are (see
    /// [`crate::space`]): for readiness reports.
    pub fn space_shortage(&self) -> Option<String> {
        self.committer.shared().space.shortage()
    }

    /// Fault injection for tests of what a slow disk does to the rest of the broker:
    /// every fdatasync of the journal and of the logs waits `delay` first (on the
    /// storage's own threads, as a slow device would hold them). Zero turns it off.
    pub fn inject_sync_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.committer
            .shared()
            .sync_delay_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Fault injection for tests of what a failing disk does to the rest of the broker:
    /// from now on, every fdatasync of a log whose name `fails` accepts fails (as would
    /// the journal's for the rounds it covers), and the log turns read-only as after a
    /// real failure. Set once; false if it was set already.
    pub fn inject_sync_failure(
        &self,
        fails: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> bool {
        self.committer
            .shared()
            .sync_fault
            .set(Box::new(fails))
            .is_ok()
    }

    /// Test hook: make the next journal write fail.
    #[cfg(test)]
    pub(crate) fn inject_journal_fault(&self) {
        self.committer
            .shared()
            .journal_fault
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies every open log's retention limits (see [`Log::enforce_retention`]).
    /// Returns the number of segments deleted.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<usize> {
        let logs: Vec<Log> = self.logs.lock().values().cloned().collect();
        let mut n = 0;
        for log in logs {
            n += log.enforce_retention(now_ms)?.segments;
        }
        Ok(n)
    }
}

/// Re-appends what the journal holds for the log `name` and its segments lost. Returns
/// what that repaired, or `None` when the journal has nothing for a log that exists.
fn replay(
    dir: &Path,
    name: &str,
    entries: &[journal::Entry],
    shared: &Arc<CommitShared>,
) -> Result<Option<Recovery>> {
    let log_dir = dir.join(name);
    // A log deleted since (or deleted and created again: another incarnation id) keeps
    // nothing of what the journal held for it.
    if !valid_name(name) || !log_dir.is_dir() {
        return Ok(None);
    }
    let Some(id) = stored_id(&log_dir) else {
        return Ok(None);
    };
    let mut records: Vec<_> = entries
        .iter()
        .filter(|e| e.log_id == id)
        .flat_map(journal::frames)
        .collect();
    if records.is_empty() {
        return Ok(None);
    }
    records.sort_by_key(|r| r.0);
    records.dedup_by_key(|r| r.0);
    let (inner, mut recovery) = LogInner::open(
        name.to_owned(),
        log_dir.clone(),
        LogConfig::default(),
        shared.clone(),
    )?;
    let (added, gap) = inner.replay(&records).map_err(io_err(&log_dir))?;
    recovery.replayed = added;
    recovery.journal_gap = gap;
    Ok(Some(recovery))
}
