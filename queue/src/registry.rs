//! [`Queues`]: the registry of every queue in one data directory.
//!
//! ```text
//! <dir>/queues/<name>.toml     a queue's settings (written atomically: tmp, fsync, rename)
//! <dir>/logs/                  one roost-storage directory (one committer) for all queues
//!     p<N>.<name>/             partition N's segment log
//!     g.<name>/                group progress (settle/reset/purge records, snapshots)
//!     dlq.<name>/              the dead-letter queue's single partition
//!     dlqg.<name>/             the dead-letter queue's group progress
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use roost_storage::Storage;
use tracing::warn;

use crate::config::QueueConfig;
use crate::error::QueueError;
use crate::queue::{Queue, QueueInfo, now_ms};

/// Suffix of a dead-letter queue's name: `$` cannot occur in a user queue's name.
pub const DEAD_LETTER_SUFFIX: &str = "$dlq";

/// Whether `name` is a valid queue name: 1 to 128 of `[A-Za-z0-9_.-]`.
pub fn valid_queue_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

struct Registry {
    config_dir: PathBuf,
    storage: Arc<Storage>,
    defaults: QueueConfig,
    auto_create: bool,
    /// Most queues that may exist (0: no limit); see [`Queues::set_max_queues`].
    max_queues: std::sync::atomic::AtomicUsize,
    queues: RwLock<BTreeMap<String, Queue>>,
    /// Serialises create/update/delete (which touch files).
    admin: Mutex<()>,
    /// Told of every queue created from now on, before anyone can use it.
    on_create: RwLock<Option<OnCreate>>,
}

/// What [`Queues::on_create`] calls.
pub type OnCreate = Arc<dyn Fn(&Queue) + Send + Sync>;

/// Every queue of a broker. Cheap to clone; clones share the registry.
#[derive(Clone)]
pub struct Queues {
    inner: Arc<Registry>,
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queues")
            .field("config_dir", &self.inner.config_dir)
            .finish()
    }
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |e| QueueError::ConfigFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl Queues {
    /// Opens the queue directory `dir` (created if missing) and every queue found in it,
    /// each with its persisted settings. `defaults` are the settings of auto-created
    /// queues; `auto_create` allows [`Queues::get_or_create`] to create. Returns the
    /// registry and what recovery repaired or could not read, for the caller to log.
    /// Blocks on disk I/O.
    pub fn open(
        dir: impl AsRef<Path>,
        defaults: QueueConfig,
        auto_create: bool,
    ) -> Result<(Queues, Vec<String>), QueueError> {
        defaults.validate()?;
        let dir = dir.as_ref();
        let config_dir = dir.join("queues");
        fs::create_dir_all(&config_dir).map_err(file_err(&config_dir))?;
        let storage = Arc::new(Storage::open(dir.join("logs"))?);
        let mut notes = Vec::new();
        for d in storage.journal_damage() {
            if d.header {
                warn!(
                    "queue write-ahead journal {} has a damaged header (bytes {}..{} unreadable): \
                     its entries were found by their own epoch and replayed, the file was \
                     quarantined as {} and given a fresh header; records only the unreadable \
                     bytes held are lost (the partitions that lost some report it)",
                    d.file.display(),
                    d.skipped.start,
                    d.skipped.end,
                    d.quarantined.display()
                );
                continue;
            }
            warn!(
                "queue write-ahead journal {} is damaged in bytes {}..{}: the entries after \
                 the damage were replayed, the file was quarantined as {}; records only the \
                 damaged entries held are lost (the partitions that lost some report it)",
                d.file.display(),
                d.skipped.start,
                d.skipped.end,
                d.quarantined.display()
            );
        }
        let mut queues = BTreeMap::new();
        let mut entries: Vec<PathBuf> = fs::read_dir(&config_dir)
            .map_err(file_err(&config_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for path in entries {
            let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                continue;
            };
            let Some(name) = file.strip_suffix(".toml") else {
                continue;
            };
            if !valid_queue_name(name) {
                notes.push(format!("ignored {}: not a queue name", path.display()));
                continue;
            }
            let config = match fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|s| toml::from_str::<QueueConfig>(&s).map_err(|e| e.to_string()))
                .and_then(|c| c.validate().map(|()| c).map_err(|e| e.to_string()))
            {
                Ok(c) => c,
                Err(e) => {
                    notes.push(format!(
                        "queue {name} not opened: {}: {e}; its data is kept",
                        path.display()
                    ));
                    continue;
                }
            };
            // One queue whose logs cannot be opened at all (salvage covers damaged
            // contents; this is e.g. an unreadable directory) must not keep the broker
            // and every other queue down.
            match Queue::open(storage.clone(), name, config, &mut notes) {
                Ok(queue) => {
                    queues.insert(name.to_owned(), queue);
                }
                Err(e) => notes.push(format!("queue {name} not opened: {e}; its data is kept")),
            }
        }
        // Transfers (ack-and-produce, redrive) cut short by a crash: finish them before
        // anyone can consume, so their settle and their new record are both visible.
        let find = |name: &str| match name.strip_suffix(DEAD_LETTER_SUFFIX) {
            Some(base) => queues.get(base).and_then(|q| q.dead_letters().cloned()),
            None => queues.get(name).cloned(),
        };
        for q in queues.values() {
            notes.extend(q.recover_transfers(find));
            if let Some(d) = q.dead_letters() {
                notes.extend(d.recover_transfers(find));
            }
        }
        for log in storage.log_names()? {
            let owner = log.split_once('.').map(|(_, n)| n);
            if owner.is_none_or(|n| !queues.contains_key(n)) {
                notes.push(format!(
                    "log {log} belongs to no open queue; left untouched"
                ));
            }
        }
        let registry = Registry {
            config_dir,
            storage,
            defaults,
            auto_create,
            max_queues: Default::default(),
            queues: RwLock::new(queues),
            admin: Mutex::new(()),
            on_create: RwLock::new(None),
        };
        Ok((
            Queues {
                inner: Arc::new(registry),
            },
            notes,
        ))
    }

    /// The queue `name`; `<name>$dlq` names a queue's dead-letter queue.
    pub fn get(&self, name: &str) -> Option<Queue> {
        if let Some(base) = name.strip_suffix(DEAD_LETTER_SUFFIX) {
            let q = self.inner.queues.read().get(base).cloned()?;
            return q.dead_letters().cloned();
        }
        self.inner.queues.read().get(name).cloned()
    }

    /// The queue `name`, created with the default settings if it does not exist and
    /// auto-creation is on ([`QueueError::NotFound`] otherwise).
    pub fn get_or_create(&self, name: &str) -> Result<Queue, QueueError> {
        if let Some(q) = self.get(name) {
            return Ok(q);
        }
        if !valid_queue_name(name) {
            return Err(QueueError::InvalidName(name.to_owned()));
        }
        if !self.inner.auto_create {
            return Err(QueueError::NotFound(name.to_owned()));
        }
        match self.create(name, self.inner.defaults.clone()) {
            Err(QueueError::AlreadyExists(_)) => self
                .get(name)
                .ok_or_else(|| QueueError::NotFound(name.to_owned())),
            other => other,
        }
    }

    /// Calls `f` with every queue created from now on, before it is reachable (the
    /// cluster replicates it).
    pub fn on_create(&self, f: OnCreate) {
        *self.inner.on_create.write() = Some(f);
    }

    /// Bounds the number of queues: [`Queues::create`] (and so auto-creation) fails
    /// with [`QueueError::TooManyQueues`] once `max` exist; 0 lifts the bound. Queues
    /// already open stay, however many they are.
    pub fn set_max_queues(&self, max: usize) {
        self.inner
            .max_queues
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Creates queue `name` with `config`.
    pub fn create(&self, name: &str, config: QueueConfig) -> Result<Queue, QueueError> {
        if !valid_queue_name(name) {
            return Err(QueueError::InvalidName(name.to_owned()));
        }
        config.validate()?;
        let _admin = self.inner.admin.lock();
        {
            let queues = self.inner.queues.read();
            if queues.contains_key(name) {
                return Err(QueueError::AlreadyExists(name.to_owned()));
            }
            let max = self
                .inner
                .max_queues
                .load(std::sync::atomic::Ordering::Relaxed);
            if max > 0 && queues.len() >= max {
                return Err(QueueError::TooManyQueues {
                    name: name.to_owned(),
                    max,
                });
            }
        }
        self.write_config(name, &config)?;
        let mut notes = Vec::new();
        let queue = Queue::open(self.inner.storage.clone(), name, config, &mut notes)?;
        for n in notes {
            warn!("{n}");
        }
        let on_create = self.inner.on_create.read().clone();
        if let Some(f) = on_create {
            f(&queue);
        }
        self.inner
            .queues
            .write()
            .insert(name.to_owned(), queue.clone());
        Ok(queue)
    }

    /// Replaces the settings of queue `name`. Partitions may grow, never shrink (new
    /// partitions change where a key or subtopic hashes to, so per-key order holds
    /// within each partition but not across the change); a durability change applies
    /// when the queue is next opened.
    pub fn update(&self, name: &str, config: QueueConfig) -> Result<Queue, QueueError> {
        config.validate()?;
        let _admin = self.inner.admin.lock();
        let queue = self
            .inner
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| QueueError::NotFound(name.to_owned()))?;
        if config.partitions < queue.partitions() {
            return Err(QueueError::InvalidConfig(format!(
                "partitions may only grow (queue {name} has {})",
                queue.partitions()
            )));
        }
        self.write_config(name, &config)?;
        queue.reconfigure(config)?;
        Ok(queue)
    }

    /// Deletes queue `name`, its messages, groups and dead letters.
    pub fn delete(&self, name: &str) -> Result<(), QueueError> {
        let _admin = self.inner.admin.lock();
        let queue = self
            .inner
            .queues
            .write()
            .remove(name)
            .ok_or_else(|| QueueError::NotFound(name.to_owned()))?;
        let path = self.config_path(name);
        fs::remove_file(&path).map_err(file_err(&path))?;
        sync_dir(&self.inner.config_dir)?;
        queue.destroy()
    }

    /// Deletes every message in queue `name` (not its dead letters: purge
    /// `<name>$dlq` for those).
    pub async fn purge(&self, name: &str) -> Result<(), QueueError> {
        let queue = self
            .get(name)
            .ok_or_else(|| QueueError::NotFound(name.to_owned()))?;
        queue.purge().await
    }

    /// Every queue with its counts, sorted by name.
    pub fn list(&self) -> Vec<QueueInfo> {
        let queues: Vec<Queue> = self.inner.queues.read().values().cloned().collect();
        queues.iter().map(Queue::info).collect()
    }

    /// Every queue, sorted by name (dead-letter queues are reached through theirs).
    pub fn queues(&self) -> Vec<Queue> {
        self.inner.queues.read().values().cloned().collect()
    }

    /// The queues whose capture filters match `topic` (an ordinary publish the broker
    /// also stores in them, with the whole topic as the subtopic).
    pub fn capturing(&self, topic: &str) -> Vec<Queue> {
        self.queues()
            .into_iter()
            .filter(|q| {
                q.config()
                    .capture_filters
                    .iter()
                    .any(|f| roost_core::topic::matches(f, topic))
            })
            .collect()
    }

    /// [`Queue::leave_all`] on every queue: `consumer` disconnected.
    pub fn leave_all(&self, consumer: &str) {
        for q in self.queues() {
            q.leave_all(consumer);
        }
    }

    /// [`Queue::tick`] on every queue.
    pub fn tick(&self, now: u64) {
        for q in self.queues() {
            q.tick(now);
        }
    }

    /// [`Queue::maintain`] on every queue; returns the failures (queue name, error).
    pub async fn maintain(&self, now: u64) -> Vec<(String, QueueError)> {
        let mut failed = Vec::new();
        for q in self.queues() {
            if let Err(e) = q.maintain(now).await {
                failed.push((q.name().to_owned(), e));
            }
        }
        failed
    }

    /// Spawns a task on the current tokio runtime that calls [`Queues::tick`] every
    /// `tick` and [`Queues::maintain`] every `maintain` (logging failures), until the
    /// returned handle is aborted.
    pub fn spawn_timers(&self, tick: Duration, maintain: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = std::time::Instant::now();
            loop {
                ticks.tick().await;
                this.tick(now_ms());
                if last.elapsed() >= maintain {
                    last = std::time::Instant::now();
                    for (name, e) in this.maintain(now_ms()).await {
                        warn!(queue = %name, error = %e, "queue maintenance failed");
                    }
                }
            }
        })
    }

    /// The storage all queues share (for health checks: [`Storage::failed_logs`]).
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.inner.config_dir.join(format!("{name}.toml"))
    }

    fn write_config(&self, name: &str, config: &QueueConfig) -> Result<(), QueueError> {
        let path = self.config_path(name);
        let tmp = self.inner.config_dir.join(format!("{name}.toml.tmp"));
        let text = toml::to_string(config).map_err(|e| QueueError::ConfigFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = fs::File::create(&tmp).map_err(file_err(&tmp))?;
        f.write_all(text.as_bytes()).map_err(file_err(&tmp))?;
        f.sync_all().map_err(file_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(file_err(&path))?;
        sync_dir(&self.inner.config_dir)
    }
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))
}
