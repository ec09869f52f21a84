//! A message as a producer hands it to a queue.

use bytes::Bytes;

/// A message to produce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// The part of the source topic after `$queue/<name>/` (or the whole topic for a
    /// captured publish); may be empty. Stored with the message.
    pub subtopic: String,
    /// The `partition-key` user property, if the producer sent one.
    pub partition_key: Option<Bytes>,
    /// Opaque to the queue: the broker's encoded MQTT properties.
    pub headers: Bytes,
    /// The message body.
    pub payload: Bytes,
    /// The `dedup-id` user property: stored once per queue within `dedup_window_ms`.
    pub dedup_id: Option<Bytes>,
    /// From `delay-ms` or `deliver-at`: no group gets the message before this time
    /// (ms since the epoch); later messages go ahead of it.
    pub deliver_at: Option<u64>,
}
