//! Subscriptions as the trie stores them, and what a match hands back.
//!
//! These stand alone because both the trie's nodes (which store and collect them) and
//! the [`Router`](crate::Router) (which walks the nodes for a match) use them; neither
//! needs the other to name them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use roost_core::SubscriptionOptions;

/// One client's subscription as stored in the trie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The subscribing client. `Arc` so a match copies a pointer, not the id.
    pub client_id: Arc<str>,
    /// QoS, no-local, retain-as-published, retain handling.
    pub options: SubscriptionOptions,
    /// The v5 subscription identifier to send with each matching PUBLISH.
    pub identifier: Option<u32>,
}

/// A shared subscription group `$share/<name>/<filter>` that matched a topic.
///
/// The broker delivers to one member: it walks [`SharedMatch::rotation`] and takes the
/// first member that is online.
#[derive(Debug, Clone)]
pub struct SharedMatch {
    /// The share name.
    pub group: Arc<str>,
    /// The filter, without its `$share/<name>/` prefix.
    pub filter: Arc<str>,
    /// Every member of the group at the time of the match.
    pub members: Vec<Subscription>,
    /// The group's round-robin position, shared with the trie so it persists from one
    /// match to the next.
    pub(crate) cursor: Arc<AtomicUsize>,
}

impl SharedMatch {
    /// Member indices in round-robin order: starting at the group's cursor and wrapping
    /// around, each index once.
    ///
    /// Each call advances the group's cursor by one, so successive publishes start with
    /// successive members even when they are matched on different connection tasks.
    pub fn rotation(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.members.len();
        let start = match n {
            0 => 0,
            _ => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
        };
        (start..n).chain(0..start)
    }
}

/// The result of [`Router::matches`](crate::Router::matches): a buffer the caller keeps
/// and reuses, so steady state matching does not allocate.
#[derive(Debug, Default)]
pub struct Matches {
    /// Plain subscriptions, one entry per matching filter: a client with two overlapping
    /// filters appears twice, and the broker merges them (max QoS, all identifiers).
    pub direct: Vec<Subscription>,
    /// Matching share groups, each once, with all of their members.
    pub shared: Vec<SharedMatch>,
}

impl Matches {
    /// Empties both lists, keeping their capacity.
    pub fn clear(&mut self) {
        self.direct.clear();
        self.shared.clear();
    }

    /// True when nothing matched.
    pub fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
    }
}
