//! Listeners, the data directory, and orderly shutdown.
//!
//! On SIGINT or SIGTERM the listeners stop accepting, every connection is told to end
//! (v5 clients get DISCONNECT 0x8B, server shutting down), and the process exits 0
//! once they are closed or a grace period has passed.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::net::tls::TlsContext;
use crate::net::transport::{self, Transport};
use crate::persistence::session_store::Store;
use crate::security::auth::Auth;
use roost_engine::broker::Broker;
use roost_engine::store::StoreError;
use roost_queue::{QueueError, Queues};

pub use crate::net::tls::TlsError;
pub use crate::security::acl::AclError;
pub use crate::security::auth::AuthSetupError;
pub use crate::security::passwd::PasswdError;

/// Why the broker could not start: what failed (the data directory, a listener, the
/// TLS or authentication files, the session store, the queues) and where.
///
/// Like every error of this crate, its message already ends with its cause (which is
/// also its `source`): print it with `{}`. A printer of source chains (anyhow's `{:#}`)
/// would repeat the cause.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be created.
    #[error("cannot create data directory {}: {source}", dir.display())]
    CreateDataDir {
        /// The directory (`data_dir`).
        dir: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The data directory's lock file cannot be opened.
    #[error("cannot open {}: {source}", path.display())]
    OpenLockFile {
        /// The lock file, `roost.lock` in the data directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Another roost process holds the data directory's lock.
    #[error("data directory {} is in use by another roost process", dir.display())]
    DataDirInUse {
        /// The directory (`data_dir`).
        dir: PathBuf,
    },
    /// The data directory's lock file cannot be locked.
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The TLS certificate, key or CA files.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The password file, the ACL file or the auth hook.
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    /// A bridge cannot start (its queue, password file or TLS files).
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    /// An MQTT listener cannot listen (`bind`, `tls_bind`, `ws_bind`, `wss_bind`).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// An admin API listener cannot listen (`admin_bind`).
    #[error("admin_bind: cannot listen on {addr}: {source}")]
    AdminListen {
        /// The address.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The session store cannot be opened.
    #[error(
        "cannot open the session store in {}: {source}. If this directory was not written by roost, or is damaged beyond repair, move it away to start empty",
        dir.display()
    )]
    SessionStore {
        /// Its directory, `state` in the data directory.
        dir: PathBuf,
        /// What the store said.
        source: StoreError,
    },
    /// The queues cannot be opened.
    #[error(
        "cannot open the queues in {}: {source}. If this directory was not written by roost, move it away to start without queues",
        dir.display()
    )]
    Queues {
        /// Their directory, `queues` in the data directory.
        dir: PathBuf,
        /// What the queues said.
        source: QueueError,
    },
    /// The cluster (`[cluster]`) cannot start: its listener, its control-plane data.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A queue declared in the file (`[queues.<name>]`) cannot be created or updated.
    #[error("queues.{name}: {source}")]
    DeclaredQueue {
        /// The queue's name.
        name: String,
        /// What the queues said.
        source: QueueError,
    },
}

/// How long connections get to close after shutdown is signalled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the broker until SIGINT/SIGTERM. `stalls` follows the runtime it runs on
/// (installed when the runtime was built), for `/metrics`.
pub async fn run(
    config: Config,
    stalls: Arc<crate::operations::stalls::StallDetector>,
) -> Result<(), StartError> {
    // Installed before anything listens: a SIGTERM that follows the first connection
    // must shut down cleanly, not kill the process with the default action.
    let signal = shutdown_signal();
    let _lock = lock_data_dir(&config.data_dir)?;
    let tls = TlsContext::from_config(&config)?;
    let auth = Arc::new(Auth::from_config(&config)?);
    let mut listeners = Vec::new();
    for (transport, addrs) in [
        (Transport::Tcp, &config.bind),
        (Transport::Tls, &config.tls_bind),
        (Transport::Ws, &config.ws_bind),
        (Transport::Wss, &config.wss_bind),
    ] {
        for addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen {
                    addr: *addr,
                    source,
                })?;
            info!(
                "listening for {} on {}",
                transport.describe(),
                listener.local_addr().unwrap_or(*addr)
            );
            listeners.push((transport, listener));
        }
    }
    let mut admin_listeners = Vec::new();
    for addr in &config.admin_bind {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::AdminListen {
                addr: *addr,
                source,
            })?;
        info!(
            "admin API on http://{}",
            listener.local_addr().unwrap_or(*addr)
        );
        admin_listeners.push(listener);
    }
    let state_dir = config.data_dir.join("state");
    // Fault injection for tests, never set in normal operation: the session store's
    // free-space reserves in bytes, so that it writes until the disk is really full.
    let state_reserve = std::env::var("ROOST_TEST_STATE_RESERVE_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(bytes) = state_reserve {
        warn!(
            "ROOST_TEST_STATE_RESERVE_BYTES: the session store's reserves are {bytes} bytes (fault injection)"
        );
    }
    let (store, loaded) = Store::open_with_reserve(
        &state_dir,
        config.storage.durability,
        Duration::from_millis(config.storage.sync_interval_ms),
        state_reserve,
    )
    .map_err(|source| StartError::SessionStore {
        dir: state_dir.clone(),
        source,
    })?;
    for line in &loaded.dropped {
        warn!("dropped from the session store: {line}");
    }
    info!(
        sessions = loaded.sessions.len(),
        retained = loaded.retained.len(),
        durability = ?config.storage.durability,
        "session store opened in {}",
        state_dir.display()
    );
    let queue_dir = config.data_dir.join("queues");
    let (queues, notes) = Queues::open(
        &queue_dir,
        config.queue_defaults.clone(),
        config.queue_auto_create,
    )
    .map_err(|source| StartError::Queues {
        dir: queue_dir.clone(),
        source,
    })?;
    for note in &notes {
        warn!("queue recovery: {note}");
    }
    // Fault injection for the slow-disk test (integration/test_faults.py): every queue
    // fdatasync waits this long first. Not a setting: no deployment wants it.
    if let Some(ms) = std::env::var("ROOST_TEST_SLOW_FSYNC_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        warn!(
            delay_ms = ms,
            "ROOST_TEST_SLOW_FSYNC_MS: every queue fdatasync is slowed down (fault injection)"
        );
        queues
            .storage()
            .inject_sync_delay(Duration::from_millis(ms));
    }
    // Fault injection for the failing-disk test (integration/test_faults.py): every
    // fdatasync of the partition logs of queue ROOST_TEST_FAIL_FSYNC_QUEUE fails, from
    // when the file ROOST_TEST_FAIL_FSYNC_WHEN exists (from the start without it). Not a
    // setting: no deployment wants it.
    if let Ok(queue) = std::env::var("ROOST_TEST_FAIL_FSYNC_QUEUE") {
        let when = std::env::var_os("ROOST_TEST_FAIL_FSYNC_WHEN").map(std::path::PathBuf::from);
        warn!(
            queue = %queue,
            when = ?when,
            "ROOST_TEST_FAIL_FSYNC_QUEUE: fdatasyncs of this queue's partition logs fail (fault injection)"
        );
        queues.storage().inject_sync_failure(move |log| {
            roost_queue::is_partition_log_of(log, &queue)
                && when.as_deref().is_none_or(std::path::Path::exists)
        });
    }
    for (name, queue_config) in &config.queues {
        let declared = match queues.get(name) {
            Some(_) => queues.update(name, queue_config.clone()),
            None => queues.create(name, queue_config.clone()),
        };
        declared.map_err(|source| StartError::DeclaredQueue {
            name: name.clone(),
            source,
        })?;
    }
    let bridges = crate::bridge::Bridges::prepare(&queues, &config.bridge)?;
    // After the declared queues: the bound is for what clients and the API create.
    queues.set_max_queues(config.max_queues);
    let queue_timers = queues.spawn_timers(Duration::from_millis(100), Duration::from_secs(1));
    let state_syncs = store.sync_latency();
    let state_quarantined = store.quarantined().len() as u64;
    let broker = Broker::new(config.engine.clone(), Arc::new(store), auth.clone(), queues);
    broker.restore(loaded);
    let cluster = match &config.cluster {
        Some(table) => {
            let cluster_config = table
                .to_cluster_config()
                .map_err(|e| StartError::Cluster(e.to_string()))?;
            let dir = config.data_dir.join("cluster");
            let cluster = roost_cluster::Cluster::start(cluster_config, &dir, broker.clone())
                .await
                .map_err(StartError::Cluster)?;
            info!(
                node_id = table.node_id,
                "cluster node listening for peers on {}", cluster.bind
            );
            Some(Arc::new(cluster))
        }
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let sys_topics = (config.sys_interval > 0).then(|| {
        tokio::spawn(crate::operations::sys::publish_periodically(
            broker.clone(),
            Duration::from_secs(config.sys_interval),
            std::time::Instant::now(),
            shutdown_rx.clone(),
        ))
    });
    let memory = tokio::spawn(crate::operations::memory::release_after_disconnects(
        broker.clone(),
    ));
    let offline_timers = tokio::spawn(broker.clone().run_offline_timers());
    let mut bridge_tasks = bridges.start(&broker, &shutdown_rx)?;
    let mut connections = JoinSet::new();
    let mut acceptors = JoinSet::new();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
    for (transport, listener) in listeners {
        let conn_tx = conn_tx.clone();
        let mut stop = shutdown_rx.clone();
        acceptors.spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => { let _ = conn_tx.send((stream, peer, transport)); }
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    _ = stop.changed() => break,
                }
            }
        });
    }
    drop(conn_tx);
    let reload = reload_signal();
    if let Some(tls) = &tls {
        acceptors.spawn(reload_tls(tls.clone(), reload.clone()));
    }
    acceptors.spawn(reload_auth(auth.clone(), reload.clone()));
    let admin = Arc::new(crate::operations::admin::Api {
        broker: broker.clone(),
        state_syncs,
        stalls,
        token: config.admin_token.clone(),
        queue_defaults: config.queue_defaults.clone(),
        state_quarantined,
        cluster: cluster.clone(),
        bridges: bridges.clone(),
    });
    for listener in admin_listeners {
        acceptors.spawn(crate::operations::admin::serve(
            listener,
            admin.clone(),
            shutdown_rx.clone(),
        ));
    }
    tokio::pin!(signal);
    loop {
        tokio::select! {
            Some((stream, peer, transport)) = conn_rx.recv() => {
                connections.spawn(transport::serve(
                    transport,
                    broker.clone(),
                    stream,
                    peer,
                    tls.clone(),
                    shutdown_rx.clone(),
                ));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            name = &mut signal => {
                info!("{name} received, shutting down");
                break;
            }
        }
    }
    let _ = shutdown_tx.send(true);
    // After the flag: a connection attaching meanwhile either is reached here or sees it.
    broker.shut_down_connections();
    acceptors.shutdown().await;
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("{} connections did not close in time", connections.len());
        connections.shutdown().await;
    }
    if let Some(cluster) = &cluster {
        cluster.shut_down().await;
    }
    // Bridges send their DISCONNECT on the flag; give them a moment to.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while bridge_tasks.join_next().await.is_some() {}
    })
    .await;
    bridge_tasks.shutdown().await;
    queue_timers.abort();
    offline_timers.abort();
    memory.abort();
    if let Some(sys) = sys_topics {
        sys.abort();
    }
    debug!(
        sessions = broker.session_count(),
        retained = broker.retained_count(),
        "broker stopped"
    );
    info!("stopped");
    Ok(())
}

/// Creates the data directory and takes an exclusive lock on it, so two brokers
/// never share one directory.
fn lock_data_dir(dir: &Path) -> Result<File, StartError> {
    std::fs::create_dir_all(dir).map_err(|source| StartError::CreateDataDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("roost.lock");
    let file = match File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(source) => return Err(StartError::OpenLockFile { path, source }),
    };
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::DataDirInUse {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(StartError::Lock { path, source }),
    }
}

/// A counter bumped on every SIGHUP: whatever reloads its files on SIGHUP (TLS
/// certificates, ...) waits for it to change.
fn reload_signal() -> watch::Receiver<u64> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(0u64);
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    info!("SIGHUP received, reloading");
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        Err(e) => warn!("cannot install the SIGHUP handler; no reload: {e}"),
    }
    rx
}

/// Swaps in freshly read TLS certificates on each SIGHUP; new handshakes use them,
/// established connections keep theirs. A failed reload keeps the previous ones.
async fn reload_tls(tls: std::sync::Arc<TlsContext>, mut reload: watch::Receiver<u64>) {
    while reload.changed().await.is_ok() {
        match tls.reload() {
            Ok(()) => info!("TLS certificates reloaded"),
            Err(e) => warn!("TLS reload failed, keeping the previous certificates: {e}"),
        }
    }
}

/// Reads the password and ACL files again on each SIGHUP; connections stay up. A file
/// that fails to load keeps its previous version in force.
async fn reload_auth(auth: Arc<Auth>, mut reload: watch::Receiver<u64>) {
    while reload.changed().await.is_ok() {
        let a = auth.clone();
        match tokio::task::spawn_blocking(move || a.reload()).await {
            Ok(errors) => {
                for e in errors {
                    warn!("reload failed, keeping the previous version: {e}");
                }
            }
            Err(e) => warn!("auth reload failed: {e}"),
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers now (not when first polled) and returns
/// the future that resolves with the name of the first of them to arrive.
fn shutdown_signal() -> impl std::future::Future<Output = &'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            warn!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two brokers never share a data directory: the second is told who holds it.
    #[test]
    fn a_locked_data_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        let _held = lock_data_dir(&data).expect("first lock");
        let e = lock_data_dir(&data).expect_err("second lock");
        assert!(matches!(e, StartError::DataDirInUse { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "data directory {} is in use by another roost process",
                data.display()
            )
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "x").expect("write");
        let e = lock_data_dir(&file).expect_err("not a directory");
        assert!(
            e.to_string().starts_with(&format!(
                "cannot create data directory {}: ",
                file.display()
            )),
            "{e}"
        );
    }
}
