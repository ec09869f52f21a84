//! roost-storage: durable segment logs and the session/retained store.
//!
//! Empty until the storage issue lands: the broker keeps sessions and retained
//! messages in memory only, and says so in README.md.
#![deny(missing_docs)]
