//! roost-queue: durable partitioned `$queue/` queues.
//!
//! Empty until the queue issue lands: today a publish to `$queue/...` is an ordinary
//! MQTT publish, and README.md says so.
#![deny(missing_docs)]
