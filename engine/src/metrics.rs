//! Counters for the admin listener's Prometheus `/metrics`.
//!
//! One [`Metrics`] per broker, shared by every connection task. Counters are plain
//! atomics bumped with `Relaxed` ordering: they are read only for reporting, never to
//! decide anything, so the hot path pays one uncontended add and takes no lock. Gauges
//! (connections, sessions, queue depth, ...) are not kept here: `/metrics` reads them
//! from their owners when it is scraped.

use std::sync::atomic::{AtomicU64, Ordering};

use roost_core::{QoS, ReasonCode};

/// Why a message was dropped for a subscriber (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// An offline session's queue held `max_queued_messages` already.
    OfflineQueueFull,
    /// A connected session's queue held `max_queued_messages` already.
    SessionQueueFull,
    /// The subscriber's channel stayed full past `max_delivery_wait_ms`, or it was
    /// already marked stalled.
    SlowSubscriber,
    /// A QoS 1/2 message for an offline persistent session that the session store,
    /// short of disk space, could not store.
    StoreFull,
}

impl DropReason {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [DropReason; 4] = [
        DropReason::OfflineQueueFull,
        DropReason::SessionQueueFull,
        DropReason::SlowSubscriber,
        DropReason::StoreFull,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::OfflineQueueFull => "offline_queue_full",
            DropReason::SessionQueueFull => "session_queue_full",
            DropReason::SlowSubscriber => "slow_subscriber",
            DropReason::StoreFull => "store_full",
        }
    }
}

/// What the session store, short of disk space, made roost refuse (the `what` label
/// of `roost_session_store_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRefusal {
    /// A subscription of a persistent session (SUBACK 0x97; 3.x 0x80).
    Subscription,
    /// A retained message not kept (a v5 QoS 1/2 publisher gets PUBACK 0x97).
    Retained,
}

impl StoreRefusal {
    /// Every refusal, in the order `/metrics` lists them.
    pub const ALL: [StoreRefusal; 2] = [StoreRefusal::Subscription, StoreRefusal::Retained];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            StoreRefusal::Subscription => "subscription",
            StoreRefusal::Retained => "retained",
        }
    }
}

/// Why a client's connection ended (the `reason` label of `roost_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The client closed the socket without DISCONNECT (its will is published).
    ClientClosed,
    /// The network failed: a read or write error.
    NetworkError,
    /// Nothing came from the client for 1.5 keep-alive periods.
    KeepAliveTimeout,
    /// The client broke the protocol: a malformed packet or a packet out of place.
    ProtocolError,
    /// The client sent more unacknowledged QoS 1/2 publishes than its Receive Maximum.
    ReceiveMaximumExceeded,
    /// A re-authentication failed.
    NotAuthorized,
    /// Another connection took the client id over.
    TakenOver,
    /// The server is shutting down.
    ServerShutdown,
    /// An administrator disconnected the client.
    AdminKick,
    /// The client took no data, or acknowledged nothing, for `slow_consumer_timeout_ms`.
    SlowConsumer,
    /// The session store failed: what the client was to be told is stored was not; or
    /// a queue log failed under a 3.x producer's produce (it cannot be told otherwise).
    StorageFailure,
    /// The session store, short of disk space, refused what the client was to be told
    /// is stored (v5: DISCONNECT 0x97); the store takes writes again once space returns.
    StorageFull,
    /// The token the client authenticated with expired (v5: DISCONNECT 0x87).
    TokenExpired,
}

impl DisconnectReason {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [DisconnectReason; 14] = [
        DisconnectReason::ClientDisconnect,
        DisconnectReason::ClientClosed,
        DisconnectReason::NetworkError,
        DisconnectReason::KeepAliveTimeout,
        DisconnectReason::ProtocolError,
        DisconnectReason::ReceiveMaximumExceeded,
        DisconnectReason::NotAuthorized,
        DisconnectReason::TakenOver,
        DisconnectReason::ServerShutdown,
        DisconnectReason::AdminKick,
        DisconnectReason::SlowConsumer,
        DisconnectReason::StorageFailure,
        DisconnectReason::StorageFull,
        DisconnectReason::TokenExpired,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DisconnectReason::ClientDisconnect => "client_disconnect",
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::NetworkError => "network_error",
            DisconnectReason::KeepAliveTimeout => "keep_alive_timeout",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            DisconnectReason::NotAuthorized => "not_authorized",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::AdminKick => "admin_kick",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::StorageFailure => "storage_failure",
            DisconnectReason::StorageFull => "storage_full",
            DisconnectReason::TokenExpired => "token_expired",
        }
    }

    /// Why the server ends a connection with DISCONNECT `code` for a protocol breach.
    pub fn of_failure(code: ReasonCode) -> DisconnectReason {
        match code {
            ReasonCode::KeepAliveTimeout => DisconnectReason::KeepAliveTimeout,
            ReasonCode::ReceiveMaximumExceeded => DisconnectReason::ReceiveMaximumExceeded,
            ReasonCode::NotAuthorized => DisconnectReason::NotAuthorized,
            _ => DisconnectReason::ProtocolError,
        }
    }
}

/// An overload limit (the `limit` label of `roost_limit_trips_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`: a connection refused.
    Connections,
    /// `max_connections_per_ip`: a connection refused.
    ConnectionsPerIp,
    /// `max_connect_rate`: a connection refused.
    ConnectRate,
    /// `max_publish_rate`: a client throttled (counted once per throttling).
    PublishRate,
    /// `max_publish_bytes_rate`: a client throttled (counted once per throttling).
    PublishBytesRate,
    /// `max_subscriptions_per_client`: a subscription refused.
    SubscriptionsPerClient,
    /// `max_queued_bytes`: a message dropped for a session.
    QueuedBytes,
    /// `max_total_queued_bytes`: a message dropped for a session because all sessions
    /// together hold the most they may.
    TotalQueuedBytes,
    /// `slow_consumer_timeout_ms`: a client disconnected.
    SlowConsumer,
    /// `max_auth_waiting`: a CONNECT refused with 0x89 (server busy).
    AuthWaiting,
    /// `max_sessions`: a CONNECT refused.
    Sessions,
    /// `max_retained_messages`: a retained message not retained.
    RetainedMessages,
    /// `max_retained_bytes`: a retained message not retained.
    RetainedBytes,
    /// `max_queues`: a queue not created.
    Queues,
    /// `max_consumer_groups`: a consumer group not created.
    ConsumerGroups,
    /// `max_inflight` inbound: a client sent more unacknowledged QoS 1/2 publishes than
    /// its Receive Maximum (v5: disconnected with 0x93; 3.x: not read from until
    /// acknowledgements make room).
    InboundInflight,
}

impl Limit {
    /// Every limit, in the order `/metrics` lists them.
    pub const ALL: [Limit; 16] = [
        Limit::Connections,
        Limit::ConnectionsPerIp,
        Limit::ConnectRate,
        Limit::PublishRate,
        Limit::PublishBytesRate,
        Limit::SubscriptionsPerClient,
        Limit::QueuedBytes,
        Limit::TotalQueuedBytes,
        Limit::SlowConsumer,
        Limit::AuthWaiting,
        Limit::Sessions,
        Limit::RetainedMessages,
        Limit::RetainedBytes,
        Limit::Queues,
        Limit::ConsumerGroups,
        Limit::InboundInflight,
    ];

    /// The byte limit a full session queue hit, if it was one (the message bound is
    /// not an overload limit: a queue at `max_queued_messages` is ordinary).
    pub fn of_queue_full(full: crate::session::QueueFull) -> Option<Limit> {
        match full {
            crate::session::QueueFull::Messages => None,
            crate::session::QueueFull::Bytes => Some(Limit::QueuedBytes),
            crate::session::QueueFull::Total => Some(Limit::TotalQueuedBytes),
        }
    }

    /// The label value: the config key of the limit.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::ConnectionsPerIp => "max_connections_per_ip",
            Limit::ConnectRate => "max_connect_rate",
            Limit::PublishRate => "max_publish_rate",
            Limit::PublishBytesRate => "max_publish_bytes_rate",
            Limit::SubscriptionsPerClient => "max_subscriptions_per_client",
            Limit::QueuedBytes => "max_queued_bytes",
            Limit::TotalQueuedBytes => "max_total_queued_bytes",
            Limit::SlowConsumer => "slow_consumer_timeout_ms",
            Limit::AuthWaiting => "max_auth_waiting",
            Limit::Sessions => "max_sessions",
            Limit::RetainedMessages => "max_retained_messages",
            Limit::RetainedBytes => "max_retained_bytes",
            Limit::Queues => "max_queues",
            Limit::ConsumerGroups => "max_consumer_groups",
            Limit::InboundInflight => "max_inflight",
        }
    }
}

/// Why a client failed to authenticate (the `reason` label of
/// `roost_auth_failures_total`), from the CONNACK code it was refused with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown user or wrong password (0x86 / 3.1.1 code 4).
    BadCredentials,
    /// Authenticated but not allowed, or anonymous where that is off (0x87 / code 5).
    NotAuthorized,
    /// The authentication back end (the HTTP hook) could not answer (0x88 / code 3).
    BackendUnavailable,
    /// Enhanced authentication with a method roost does not offer, or that failed.
    BadMethod,
}

impl AuthFailure {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [AuthFailure; 4] = [
        AuthFailure::BadCredentials,
        AuthFailure::NotAuthorized,
        AuthFailure::BackendUnavailable,
        AuthFailure::BadMethod,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::NotAuthorized => "not_authorized",
            AuthFailure::BackendUnavailable => "backend_unavailable",
            AuthFailure::BadMethod => "bad_method",
        }
    }

    /// The failure a CONNACK refusal code stands for.
    pub fn from_code(code: ReasonCode) -> AuthFailure {
        match code {
            ReasonCode::BadUserNameOrPassword => AuthFailure::BadCredentials,
            ReasonCode::ServerUnavailable | ReasonCode::ServerBusy => {
                AuthFailure::BackendUnavailable
            }
            ReasonCode::BadAuthenticationMethod => AuthFailure::BadMethod,
            _ => AuthFailure::NotAuthorized,
        }
    }
}

/// The broker's counters (monotonic; reset only by a restart).
#[derive(Debug, Default)]
pub struct Metrics {
    received: [AtomicU64; 3],
    sent: [AtomicU64; 3],
    received_bytes: [AtomicU64; 3],
    sent_bytes: [AtomicU64; 3],
    dropped: [AtomicU64; DropReason::ALL.len()],
    store_refusals: [AtomicU64; StoreRefusal::ALL.len()],
    network_in: AtomicU64,
    network_out: AtomicU64,
    connections_accepted: AtomicU64,
    limits: [AtomicU64; Limit::ALL.len()],
    disconnects: [AtomicU64; DisconnectReason::ALL.len()],
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
}

impl Metrics {
    /// Counts a PUBLISH received from a client, with its payload size.
    pub fn received(&self, qos: QoS, payload_bytes: usize) {
        self.received[qos as usize].fetch_add(1, Ordering::Relaxed);
        self.received_bytes[qos as usize].fetch_add(payload_bytes as u64, Ordering::Relaxed);
    }

    /// Counts `n` PUBLISH packets of `qos` sent to clients (first sends, not resends)
    /// carrying `payload_bytes` in all.
    pub fn sent(&self, qos: QoS, n: u64, payload_bytes: u64) {
        if n > 0 {
            self.sent[qos as usize].fetch_add(n, Ordering::Relaxed);
            self.sent_bytes[qos as usize].fetch_add(payload_bytes, Ordering::Relaxed);
        }
    }

    /// Counts bytes read from client sockets (after TLS and WebSocket framing).
    pub fn network_in(&self, n: usize) {
        self.network_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes written to client sockets (before TLS and WebSocket framing).
    pub fn network_out(&self, n: usize) {
        self.network_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a connection admitted past the connection limits.
    pub fn connection_accepted(&self) {
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections admitted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.connections_accepted.load(Ordering::Relaxed)
    }

    /// Counts one trip of an overload limit.
    pub fn limit_tripped(&self, limit: Limit, n: u64) {
        if n > 0 {
            self.limits[limit as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts a connection that ended, by why.
    pub fn disconnected(&self, why: DisconnectReason) {
        self.disconnects[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections ended for `why` so far.
    pub fn disconnects(&self, why: DisconnectReason) -> u64 {
        self.disconnects[why as usize].load(Ordering::Relaxed)
    }

    /// Counts a client that failed to authenticate.
    pub fn auth_failed(&self, why: AuthFailure) {
        self.auth_failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Trips of `limit` so far.
    pub fn limit_trips(&self, limit: Limit) -> u64 {
        self.limits[limit as usize].load(Ordering::Relaxed)
    }

    /// Authentication failures for `why` so far.
    pub fn auth_failures(&self, why: AuthFailure) -> u64 {
        self.auth_failures[why as usize].load(Ordering::Relaxed)
    }

    /// Bytes read from and written to client sockets.
    pub fn network_bytes(&self) -> (u64, u64) {
        (
            self.network_in.load(Ordering::Relaxed),
            self.network_out.load(Ordering::Relaxed),
        )
    }

    /// PUBLISH payload bytes received, by QoS 0, 1, 2.
    pub fn received_bytes_by_qos(&self) -> [u64; 3] {
        self.received_bytes
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed))
    }

    /// PUBLISH payload bytes sent (first sends), by QoS 0, 1, 2.
    pub fn sent_bytes_by_qos(&self) -> [u64; 3] {
        self.sent_bytes
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed))
    }

    /// Counts `n` messages dropped for a subscriber.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped[reason as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// PUBLISH packets received, by QoS 0, 1, 2.
    pub fn received_by_qos(&self) -> [u64; 3] {
        self.received.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// PUBLISH packets sent, by QoS 0, 1, 2.
    pub fn sent_by_qos(&self) -> [u64; 3] {
        self.sent.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// Messages dropped for `reason`.
    pub fn dropped_for(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts `n` things refused because the session store is short of space.
    pub fn store_refused(&self, what: StoreRefusal, n: u64) {
        if n > 0 {
            self.store_refusals[what as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Things of kind `what` refused because the session store was short of space.
    pub fn store_refusals(&self, what: StoreRefusal) -> u64 {
        self.store_refusals[what as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_by_label() {
        let m = Metrics::default();
        m.received(QoS::AtLeastOnce, 10);
        m.received(QoS::AtLeastOnce, 5);
        m.received(QoS::ExactlyOnce, 1);
        m.sent(QoS::AtMostOnce, 5, 50);
        m.sent(QoS::AtLeastOnce, 0, 0);
        m.dropped(DropReason::SlowSubscriber, 2);
        m.limit_tripped(Limit::ConnectRate, 1);
        m.auth_failed(AuthFailure::from_code(ReasonCode::BadUserNameOrPassword));
        m.network_in(7);
        assert_eq!(m.received_by_qos(), [0, 2, 1]);
        assert_eq!(m.received_bytes_by_qos(), [0, 15, 1]);
        assert_eq!(m.sent_by_qos(), [5, 0, 0]);
        assert_eq!(m.sent_bytes_by_qos(), [50, 0, 0]);
        assert_eq!(m.limit_trips(Limit::ConnectRate), 1);
        assert_eq!(m.limit_trips(Limit::Connections), 0);
        assert_eq!(m.auth_failures(AuthFailure::BadCredentials), 1);
        assert_eq!(m.network_bytes(), (7, 0));
        assert_eq!(m.dropped_for(DropReason::SlowSubscriber), 2);
        assert_eq!(m.dropped_for(DropReason::OfflineQueueFull), 0);
    }
}
