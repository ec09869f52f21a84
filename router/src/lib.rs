//! roost-router: the subscription trie.
//!
//! One trie node per filter level. A node keeps its literal children in a hash map keyed
//! by the level, its `+` child apart, and two sets of subscribers: those whose filter
//! ends at this node (`a/b`) and those whose filter is this node followed by `#`
//! (`a/b/#`). Plain subscriptions and `$share/<group>/` memberships sit side by side in
//! those sets.
//!
//! # Concurrency
//!
//! Every connection task matches publishes through one shared `Arc<Router>` while others
//! subscribe and unsubscribe, so the trie is built for many readers and short writers:
//!
//! - each node has its own [`parking_lot::RwLock`]. A match read-locks one node at a
//!   time, copies out what it needs (matching subscribers, and `Arc`s to the children it
//!   will visit next) and lets go before descending. No lock is held across levels, so a
//!   writer never waits for a whole match, and a match never waits for more than one
//!   node's update;
//! - a subscribe or unsubscribe write-locks only the nodes it changes, one at a time
//!   (two, parent then child, when pruning). Nothing is copied but the new subscription,
//!   so a subscribe costs the same with 100 or 100,000 subscriptions stored;
//! - nodes left empty by an unsubscribe are unlinked so memory returns. A node is marked
//!   `detached` as it is unlinked, and a writer that finds its node detached starts over
//!   from the root, so a subscribe racing a prune of the same path is never lost.
//!
//! A match sees each node as of the moment it visits it: a publish racing a subscribe
//! may or may not reach the new subscriber, as in any broker, but it never sees a
//! half-made change.
//!
//! # Matching rules (MQTT 3.1.1 and 5.0 §4.7)
//!
//! `+` matches exactly one level, `#` matches its parent level and every level below
//! (`a/#` matches `a`), empty levels are levels (`a//b`, `/a`), and a filter starting
//! with a wildcard does not match a topic starting with `$`.
#![deny(missing_docs)]

mod node;
mod router;
mod subscription;

pub use roost_core::SubscriptionOptions;
pub use router::Router;
pub use subscription::{Matches, SharedMatch, Subscription};

#[cfg(test)]
mod tests;
