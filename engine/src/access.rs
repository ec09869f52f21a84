//! What a client may do with a topic, as the engine asks it.
//!
//! The engine holds each connection to an [`Authorizer`] (the broker's is its ACL file)
//! and asks it before routing a PUBLISH, granting a subscription and delivering.

use std::fmt;

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive a message published to this topic name.
    Read,
    /// Publish to this topic name (the will topic included).
    Write,
    /// Subscribe to this topic filter (the filter after any `$share/<group>/`).
    Subscribe,
}

/// Decides what one connected client may do. The protocol state machine asks it before
/// routing a PUBLISH, granting a subscription and delivering a message.
pub trait Authorizer: Send + Sync + fmt::Debug {
    /// True when the client may do `access` on `topic` (a name, or a filter for
    /// [`Access::Subscribe`]).
    fn allows(&self, access: Access, topic: &str) -> bool;
}
