//! One level of the subscription trie.
//!
//! Invariants, all maintained under the node's own write lock:
//! - a node is reachable from its parent (by its level) exactly while `detached` is false;
//!   it is detached only when empty and only while the parent's write lock is also held;
//! - nothing is ever added to a detached node: every writer checks `detached` under the
//!   node's write lock and, if set, starts again from the root. So a subscription can
//!   never be stranded on a pruned branch, even with pruning and subscribing racing on
//!   the same path;
//! - locks are taken parent before child, and a writer holds at most one parent and one
//!   child at a time, so writers cannot deadlock with each other or with readers (which
//!   hold one node at a time).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use parking_lot::RwLock;

use crate::subscription::{Matches, SharedMatch, Subscription};

/// A trie node: the subscriptions whose filter ends here, and the next levels.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub(crate) inner: RwLock<NodeInner>,
}

/// The lock-protected state of a [`Node`].
#[derive(Debug, Default)]
pub(crate) struct NodeInner {
    /// Literal next levels. Keyed by `Box<str>` so lookups take the topic's `&str`
    /// level directly, with no allocation on the match path.
    pub(crate) children: HashMap<Box<str>, Arc<Node>>,
    /// The `+` child, kept apart so matching does not hash a wildcard at every level.
    pub(crate) plus: Option<Arc<Node>>,
    /// Subscriptions whose filter ends exactly at this node (`a/b` at node `a/b`).
    pub(crate) exact: Endpoint,
    /// Subscriptions whose filter is this node followed by `#` (`a/b/#` at node `a/b`).
    /// `#` is always the last level, so it needs no node of its own; keeping it here
    /// means the match path collects it under the lock it already holds.
    pub(crate) multi: Endpoint,
    /// Set when the node has been unlinked from its parent (see the module invariants).
    pub(crate) detached: bool,
}

impl NodeInner {
    /// The child for a filter level, if present.
    pub(crate) fn child(&self, level: &str) -> Option<&Arc<Node>> {
        match level {
            "+" => self.plus.as_ref(),
            _ => self.children.get(level),
        }
    }

    /// The child for a filter level, created if missing. The flag says whether it was created.
    pub(crate) fn child_or_insert(&mut self, level: &str) -> (Arc<Node>, bool) {
        if level == "+" {
            if let Some(child) = &self.plus {
                return (Arc::clone(child), false);
            }
            let child = Arc::new(Node::default());
            self.plus = Some(Arc::clone(&child));
            return (child, true);
        }
        if let Some(child) = self.children.get(level) {
            return (Arc::clone(child), false);
        }
        let child = Arc::new(Node::default());
        self.children.insert(level.into(), Arc::clone(&child));
        (child, true)
    }

    /// Unlinks the child for a filter level.
    pub(crate) fn remove_child(&mut self, level: &str) {
        if level == "+" {
            self.plus = None;
        } else {
            self.children.remove(level);
        }
    }

    /// The subscriptions for a filter ending here, either exactly or with a trailing `#`.
    pub(crate) fn endpoint_mut(&mut self, multi: bool) -> &mut Endpoint {
        if multi {
            &mut self.multi
        } else {
            &mut self.exact
        }
    }

    /// True when the node holds nothing and may be pruned.
    pub(crate) fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }
}

/// Everything subscribed to one filter: plain subscribers and share groups.
#[derive(Debug, Default)]
pub(crate) struct Endpoint {
    subs: SubscriberSet,
    /// Few groups per filter in practice, so a `Vec` searched by name.
    groups: Vec<ShareGroup>,
}

impl Endpoint {
    /// Adds or replaces; true when it replaced.
    pub(crate) fn upsert(&mut self, group: Option<&str>, filter: &str, sub: Subscription) -> bool {
        let Some(name) = group else {
            return self.subs.upsert(sub);
        };
        if let Some(g) = self.groups.iter_mut().find(|g| &*g.name == name) {
            return g.members.upsert(sub);
        }
        let mut members = SubscriberSet::default();
        members.upsert(sub);
        self.groups.push(ShareGroup {
            name: name.into(),
            filter: filter.into(),
            members,
            cursor: Arc::new(AtomicUsize::new(0)),
        });
        false
    }

    /// Removes; true when it existed. A group left with no member goes away.
    pub(crate) fn remove(&mut self, group: Option<&str>, client_id: &str) -> bool {
        let Some(name) = group else {
            return self.subs.remove(client_id);
        };
        let Some(i) = self.groups.iter().position(|g| &*g.name == name) else {
            return false;
        };
        let Some(g) = self.groups.get_mut(i) else {
            return false;
        };
        let removed = g.members.remove(client_id);
        if g.members.is_empty() {
            self.groups.swap_remove(i);
        }
        removed
    }

    /// Appends this filter's subscribers to a match result.
    pub(crate) fn collect(&self, out: &mut Matches) {
        out.direct.extend_from_slice(self.subs.as_slice());
        for g in &self.groups {
            out.shared.push(SharedMatch {
                group: Arc::clone(&g.name),
                filter: Arc::clone(&g.filter),
                members: g.members.as_slice().to_vec(),
                cursor: Arc::clone(&g.cursor),
            });
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subs.is_empty() && self.groups.is_empty()
    }
}

/// The members of one share group at one filter.
#[derive(Debug)]
struct ShareGroup {
    name: Arc<str>,
    /// The filter without its `$share/<name>/` prefix, kept to hand out in matches.
    filter: Arc<str>,
    members: SubscriberSet,
    /// Round-robin position, shared with every [`SharedMatch`] handed out so the
    /// rotation carries on from one publish to the next.
    cursor: Arc<AtomicUsize>,
}

/// Subscriptions at one filter, at most one per client.
///
/// A `Vec` so matching copies out of contiguous memory, plus an index by client id so
/// subscribe and unsubscribe stay O(1) when a filter has many thousands of subscribers
/// (a fan-out topic would otherwise make building it quadratic).
#[derive(Debug, Default)]
struct SubscriberSet {
    list: Vec<Subscription>,
    index: HashMap<Arc<str>, usize>,
}

impl SubscriberSet {
    /// Adds or replaces the client's subscription; true when it replaced one.
    fn upsert(&mut self, sub: Subscription) -> bool {
        let existing = self.index.get(&sub.client_id).copied();
        if let Some(slot) = existing.and_then(|i| self.list.get_mut(i)) {
            *slot = sub;
            return true;
        }
        self.index
            .insert(Arc::clone(&sub.client_id), self.list.len());
        self.list.push(sub);
        false
    }

    /// Removes the client's subscription; true when it existed.
    fn remove(&mut self, client_id: &str) -> bool {
        let Some(i) = self.index.remove(client_id) else {
            return false;
        };
        if i >= self.list.len() {
            return false;
        }
        self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.index.insert(Arc::clone(&moved.client_id), i);
        }
        true
    }

    fn as_slice(&self) -> &[Subscription] {
        &self.list
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
