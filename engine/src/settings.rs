//! The engine's settings: every limit a client meets, in one list.
//!
//! [`for_each_setting!`] is the one source of each setting: its name (the TOML key, and
//! the flag `--name-with-dashes`), type, default, the placeholder of its flag, and its
//! documentation. The engine builds [`Settings`] from it; the broker builds its
//! command-line flags from the same list (the engine itself knows no command line), so
//! a setting is written once. The README's configuration table is checked against the
//! keys by a test of the broker.

/// Calls `$callback! { $( #[doc = ...] name: Type = default, "VALUE"; )* }` with every
/// engine setting, in the order the README lists them.
#[macro_export]
macro_rules! for_each_setting {
    ($callback:ident) => {
        $callback! {
            /// Largest MQTT packet accepted, in bytes, fixed header included (refused from
            /// its fixed header, before it is buffered). Announced to v5 clients as Maximum
            /// Packet Size. Default 1048576.
            max_packet_size: u32 = 1024 * 1024, "BYTES";
            /// Unacknowledged QoS 1/2 messages allowed in each direction per client: the
            /// Receive Maximum announced to v5 clients, and the cap of the outbound window.
            /// Default 1024.
            max_inflight: u16 = 1024, "N";
            /// QoS 1/2 messages held per session while it is offline or its window is
            /// full; past this, new messages for that session are dropped (and counted).
            /// Default 1000.
            max_queued_messages: usize = 1000, "N";
            /// Most levels a topic name or filter may have. Default 128.
            max_topic_levels: usize = 128, "N";
            /// Most simultaneous client connections; further CONNECTs are refused (0x97,
            /// 3.x return code 3). Default 100000.
            max_connections: usize = 100_000, "N";
            /// Most simultaneous connections from one source IP address; further CONNECTs
            /// from it are refused (0x97 / 3.x code 3). 0: no limit, the default, because
            /// whole fleets often reach a broker through one NAT address.
            max_connections_per_ip: usize = 0, "N";
            /// New connections accepted per second across all listeners, with bursts of
            /// up to one second's worth; past it CONNECT is refused with 0x9F (3.x: code
            /// 3), which spreads out a reconnect storm. 0: no limit (the default).
            max_connect_rate: u32 = 0, "PER_SECOND";
            /// PUBLISH packets per second one client may send, with bursts of up to one
            /// second's worth. A client over it is throttled: roost stops reading from its
            /// socket until it is back under, so nothing is dropped. 0: no limit (the
            /// default).
            max_publish_rate: u32 = 0, "PER_SECOND";
            /// PUBLISH payload bytes per second one client may send; throttled like
            /// `max_publish_rate`. 0: no limit (the default).
            max_publish_bytes_rate: u64 = 0, "BYTES_PER_SECOND";
            /// Subscriptions one client may hold; further new filters are refused (SUBACK
            /// 0x97 / 3.x 0x80). 0: no limit. Default 10000.
            max_subscriptions_per_client: usize = 10_000, "N";
            /// Memory of QoS 1/2 messages held per session (each its topic, payload,
            /// properties and the message itself: `Message::weight`), beside
            /// `max_queued_messages`; past it, new messages for that session are dropped
            /// and counted. 0: no byte bound. Default 67108864 (64 MiB).
            max_queued_bytes: u64 = 64 * 1024 * 1024, "BYTES";
            /// Memory of QoS 1/2 messages held in the queues of all sessions together
            /// (`Message::weight` of each, as `max_queued_bytes` counts them), so that
            /// thousands of persistent sessions that never read cannot take the machine.
            /// Past it, new messages for any session's queue are dropped and counted;
            /// publishers are not held up. 0: no bound. Default 1073741824 (1 GiB).
            max_total_queued_bytes: u64 = 1024 * 1024 * 1024, "BYTES";
            /// A client whose outbound buffer stays full this long with no progress (its
            /// socket takes less than 16 KiB, or its session queue stays at its bound
            /// because it acknowledges nothing) is disconnected (v5: DISCONNECT 0x97). Its
            /// session, if persistent, keeps queueing. 0: never. Default 60000.
            slow_consumer_timeout_ms: u64 = 60_000, "MS";
            /// How long, in milliseconds, a QoS 1/2 publish waits for room at a subscriber
            /// whose queue is full before the message is dropped for that subscriber (and
            /// the subscriber is treated as stalled until it has room again). Publishers
            /// are slowed to the pace of their subscribers instead of losing messages.
            /// Default 5000.
            max_delivery_wait_ms: u64 = 5000, "MS";
            /// Sessions held, connected or stored (a persistent session stays after its
            /// client leaves, until it expires); a CONNECT that would create one more is
            /// refused with CONNACK 0x97 (3.x: return code 3). 0: no limit. Default
            /// 1000000.
            max_sessions: usize = 1_000_000, "N";
            /// Retained messages held; a retained publish to a new topic past it is not
            /// retained (v5 QoS 1/2: refused with PUBACK/PUBREC 0x97, not routed). 0: no
            /// limit. Default 1000000.
            max_retained_messages: usize = 1_000_000, "N";
            /// Memory of all retained messages together (`Message::weight` of each); past
            /// it as `max_retained_messages`. 0: no limit. Default 268435456 (256 MiB).
            max_retained_bytes: u64 = 256 * 1024 * 1024, "BYTES";
            /// Topic aliases a v5 client may use towards the broker (0 disables them),
            /// and most the broker uses towards a client. Default 32.
            topic_alias_maximum: u16 = 32, "N";
            /// Longest keep-alive accepted, in seconds; a v5 client asking for more (or for
            /// 0) is told the Server Keep Alive. 0 means no limit. Default 65535.
            max_keep_alive: u16 = 65535, "SECONDS";
            /// Longest session expiry granted, in seconds (4294967295 = sessions never
            /// expire). Also applies to MQTT 3.x persistent sessions (clean session 0).
            session_expiry_max: u32 = u32::MAX, "SECONDS";
            /// Seconds a new connection has to send its CONNECT (and to finish its TLS or
            /// WebSocket handshake); again for a SCRAM exchange after CONNECT. Default 10.
            connect_timeout: u16 = 10, "SECONDS";
        }
    };
}

use std::sync::Arc;

use crate::session::{QueueBound, QueuedBytes};

macro_rules! define_settings {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, $value:literal; )*) => {
        /// The limits every client meets, with their defaults (see
        /// [`for_each_setting!`]). The TOML keys are the field names.
        #[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Settings { $( $name: $default, )* }
            }
        }

        impl Settings {
            /// Every key, in the order of [`for_each_setting!`].
            pub const KEYS: &[&str] = &[$( stringify!($name) ),*];
        }
    };
}

for_each_setting!(define_settings);

impl Settings {
    /// Checks values that parse but make no sense; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        // The smallest useful packet: a CONNECT with a short client id is ~14 bytes.
        if !(64..=268_435_460).contains(&self.max_packet_size) {
            return Err(format!(
                "max_packet_size: {} is outside 64..=268435460",
                self.max_packet_size
            ));
        }
        for (key, zero) in [
            ("max_inflight", self.max_inflight == 0),
            ("max_topic_levels", self.max_topic_levels == 0),
            ("max_connections", self.max_connections == 0),
            ("connect_timeout", self.connect_timeout == 0),
        ] {
            if zero {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        Ok(())
    }

    /// How long a client's outbound buffer may stay full (`None`: no limit).
    pub fn slow_consumer_timeout(&self) -> Option<std::time::Duration> {
        let ms = self.slow_consumer_timeout_ms;
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }

    /// How long a publisher waits for room at a full subscriber.
    pub fn delivery_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.max_delivery_wait_ms)
    }

    /// How long a new connection has for its handshake and CONNECT.
    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.connect_timeout))
    }
}

/// The limits a broker and its connections enforce: the [`Settings`], and the
/// broker-wide account some of them bound ([`QueuedBytes`] for
/// `max_total_queued_bytes`). One per broker, shared by every connection.
#[derive(Debug)]
pub struct Limits {
    settings: Settings,
    /// Bytes queued in all sessions (`max_total_queued_bytes`).
    pub queued: Arc<QueuedBytes>,
    /// Whether the session store has room for more state (a full disk refuses new
    /// stored subscriptions, see [`crate::store::StoreRoom`]).
    pub store_room: Arc<crate::store::StoreRoom>,
}

impl Limits {
    /// The limits of `settings`, with empty accounts and a store that has room.
    pub fn new(settings: Settings) -> Limits {
        let queued = Arc::new(QueuedBytes::new(settings.max_total_queued_bytes));
        Limits {
            settings,
            queued,
            store_room: Arc::default(),
        }
    }

    /// These limits, reading the session store's room from `room`.
    pub fn with_store_room(self, room: Arc<crate::store::StoreRoom>) -> Limits {
        Limits {
            store_room: room,
            ..self
        }
    }

    /// The bound of each session's queue (`max_queued_messages`, `max_queued_bytes`,
    /// and the broker-wide `max_total_queued_bytes`).
    pub fn max_queued(&self) -> QueueBound<'_> {
        QueueBound {
            messages: self.settings.max_queued_messages,
            bytes: self.settings.max_queued_bytes,
            total: &self.queued,
        }
    }
}

impl std::ops::Deref for Limits {
    type Target = Settings;
    fn deref(&self) -> &Settings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_fields_and_defaults_validate() {
        assert_eq!(Settings::KEYS.len(), 21);
        assert!(Settings::KEYS.contains(&"max_inflight"));
        Settings::default().validate().expect("defaults are valid");
        let bad = Settings {
            max_inflight: 0,
            ..Settings::default()
        };
        assert_eq!(
            bad.validate(),
            Err("max_inflight: must be at least 1".into())
        );
    }
}
