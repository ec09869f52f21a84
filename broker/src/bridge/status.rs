//! What a bridge's task reports, for `/metrics` and the API, and why bridges fail.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use roost_queue::Queue;

use super::settings::BridgeConfig;

/// Why a dropped message was dropped (the `reason` of
/// `roost_bridge_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeDrop {
    /// The remote refused it (a v5 PUBACK/PUBREC reason code of 0x80 or more).
    RemoteRefused,
    /// It matched no outgoing mapping any more (the configuration changed while it was
    /// queued).
    Unmapped,
}

/// What a bridge's task reports, for `/metrics` and the API.
#[derive(Debug)]
pub struct BridgeStatus {
    /// The bridge's settings.
    pub config: BridgeConfig,
    /// Its outgoing queue.
    pub queue: Queue,
    pub(super) up: AtomicBool,
    pub(super) connected_at_ms: AtomicU64,
    pub(super) connects: AtomicU64,
    pub(super) forwarded_out: AtomicU64,
    pub(super) forwarded_in: AtomicU64,
    pub(super) remote_refused: AtomicU64,
    pub(super) unmapped: AtomicU64,
    pub(super) last_error: Mutex<Option<String>>,
}

impl BridgeStatus {
    pub(super) fn new(config: BridgeConfig, queue: Queue) -> BridgeStatus {
        BridgeStatus {
            config,
            queue,
            up: AtomicBool::new(false),
            connected_at_ms: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            forwarded_out: AtomicU64::new(0),
            forwarded_in: AtomicU64::new(0),
            remote_refused: AtomicU64::new(0),
            unmapped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub(super) fn connected(&self) {
        self.up.store(true, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.connected_at_ms
            .store(roost_queue::now_ms(), Ordering::Relaxed);
    }

    pub(super) fn lost(&self, why: &str) {
        self.up.store(false, Ordering::Relaxed);
        *self.last_error.lock() = Some(why.to_owned());
    }

    pub(super) fn dropped(&self, why: BridgeDrop) {
        match why {
            BridgeDrop::RemoteRefused => &self.remote_refused,
            BridgeDrop::Unmapped => &self.unmapped,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the connection to the remote is up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The API's view of the bridge.
    pub fn to_json(&self) -> serde_json::Value {
        let up = self.is_up();
        serde_json::json!({
            "name": self.config.name,
            "address": self.config.address,
            "protocol": self.config.protocol,
            "client_id": self.config.remote_client_id(),
            "queue": self.config.queue_name(),
            "up": up,
            "connected_at_ms": up.then(|| self.connected_at_ms.load(Ordering::Relaxed)),
            "connects": self.connects.load(Ordering::Relaxed),
            "forwarded_out": self.forwarded_out.load(Ordering::Relaxed),
            "forwarded_in": self.forwarded_in.load(Ordering::Relaxed),
            "queued": self.queue.depth(),
            "dropped": {
                "queue_full": self.queue.quota_refusals(),
                "remote_refused": self.remote_refused.load(Ordering::Relaxed),
                "unmapped": self.unmapped.load(Ordering::Relaxed),
            },
            "last_error": *self.last_error.lock(),
            "topics": self.config.topics,
        })
    }
}

/// Why the bridges cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Its outgoing queue cannot be created or updated.
    #[error("bridge {name}: its queue: {source}")]
    Queue {
        /// The bridge.
        name: String,
        /// Why.
        source: roost_queue::QueueError,
    },
    /// Its `password_file` cannot be read.
    #[error("bridge {name}: password_file {path}: {source}")]
    Password {
        /// The bridge.
        name: String,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Its TLS files cannot be used.
    #[error("bridge {name}: {why}")]
    Tls {
        /// The bridge.
        name: String,
        /// Why.
        why: String,
    },
}
