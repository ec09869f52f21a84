//! The application message as the broker holds it after receipt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::packet::QoS;
use crate::properties::Properties;

/// One application message, shared (`Arc<Message>`) by every subscriber it is fanned
/// out to: topic, payload and properties are never copied per subscriber.
///
/// `properties` holds what is forwarded unchanged (payload format, content type,
/// response topic, correlation data, user properties in order); the inbound topic
/// alias and subscription identifiers are removed on receipt, and the message expiry
/// interval is kept as received and counted down from `received_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic name (never an alias).
    pub topic: String,
    /// Application payload.
    pub payload: Bytes,
    /// QoS the message was published with.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// Forwarded properties (see above).
    pub properties: Properties,
    /// Client id of the publisher, for no-local.
    pub publisher: Option<Arc<str>>,
    /// When the broker received it; start of the expiry countdown.
    pub received_at: Instant,
}

impl Message {
    /// Seconds of life left at `now`: `None` without an expiry, `Some(0)` when expired.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let interval = self.properties.message_expiry_interval?;
        let elapsed = now.saturating_duration_since(self.received_at);
        let total = Duration::from_secs(u64::from(interval));
        match total.checked_sub(elapsed) {
            // Round up: a message with 0.4 s left still has life, and the spec wants
            // the remaining interval, never an interval longer than what is left + 1 s.
            Some(left) if !left.is_zero() => Some(
                u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0))
                    .unwrap_or(u32::MAX),
            ),
            _ => Some(0),
        }
    }

    /// What holding the message costs, roughly, in bytes: the struct itself (its
    /// properties are inline: a few hundred bytes), its topic, payload and the
    /// variable-size properties (each user property with the two strings' bookkeeping).
    /// Byte bounds count this rather than the payload alone, so neither a message of
    /// empty payload and a megabyte of user properties, nor a million small retained
    /// messages, is taken for free.
    pub fn weight(&self) -> usize {
        let p = &self.properties;
        let strings = [&p.content_type, &p.response_topic]
            .into_iter()
            .flatten()
            .map(String::len)
            .sum::<usize>();
        let user: usize = p
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * std::mem::size_of::<String>())
            .sum();
        std::mem::size_of::<Message>()
            + self.topic.len()
            + self.payload.len()
            + strings
            + p.correlation_data.as_ref().map_or(0, Bytes::len)
            + user
    }

    /// True when the message's expiry interval has passed at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.remaining_expiry(now) == Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_counts_down() {
        let t0 = Instant::now();
        let mut m = Message {
            topic: "a".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
            publisher: None,
            received_at: t0,
        };
        assert_eq!(m.remaining_expiry(t0), None);
        assert!(!m.is_expired(t0 + Duration::from_secs(1000)));
        m.properties.message_expiry_interval = Some(10);
        assert_eq!(m.remaining_expiry(t0), Some(10));
        assert_eq!(
            m.remaining_expiry(t0 + Duration::from_millis(2500)),
            Some(8)
        );
        assert!(m.is_expired(t0 + Duration::from_secs(10)));
    }
}
