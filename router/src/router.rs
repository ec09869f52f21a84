//! [`Router`]: subscribe, unsubscribe and match over the trie of `node`s.
//!
//! The crate's top comment gives the locking rules this file follows. The router has a
//! file of its own so that lib.rs only declares and re-exports: the router uses the
//! nodes, the nodes use the types in `subscription`, and nothing points back up.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::node::Node;
use crate::subscription::{Matches, Subscription};

/// A node still to visit during a match, with where in the topic it stands.
struct Pending {
    node: Arc<Node>,
    /// Byte offset of the topic's remaining levels, or `None` when every level was used.
    /// An offset rather than a `&str` so the scratch stack can outlive one topic.
    rest: Option<usize>,
}

thread_local! {
    /// The match traversal's stack, reused so matching does not allocate and so a topic
    /// with thousands of levels cannot overflow the thread's stack through recursion.
    static SCRATCH: Cell<Vec<Pending>> = const { Cell::new(Vec::new()) };
}

/// The subscription trie, shared as `Arc<Router>` by every connection task.
#[derive(Debug)]
pub struct Router {
    /// Never detached: pruning stops at the root.
    root: Arc<Node>,
    /// Stored subscriptions, plain plus shared memberships.
    len: AtomicUsize,
    /// Live nodes including the root, to show that pruning returns memory.
    nodes: AtomicUsize,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            root: Arc::new(Node::default()),
            len: AtomicUsize::new(0),
            nodes: AtomicUsize::new(1),
        }
    }

    /// Adds a subscription, or replaces the one with the same client, share group and
    /// filter. Returns true when it replaced one (v5 retain handling 1 needs to know).
    ///
    /// `share_group` is `None` for a plain filter. `filter` is already valid and has no
    /// `$share/` prefix (see [`roost_core::topic::parse_filter`]).
    pub fn subscribe(&self, share_group: Option<&str>, filter: &str, sub: Subscription) -> bool {
        let (path, multi) = split_filter(filter);
        loop {
            let Some(node) = self.descend_creating(path) else {
                continue;
            };
            let mut inner = node.inner.write();
            if inner.detached {
                // Pruned between the walk and this lock; the path must be rebuilt.
                continue;
            }
            let replaced = inner.endpoint_mut(multi).upsert(share_group, filter, sub);
            if !replaced {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
            return replaced;
        }
    }

    /// Removes the client's subscription to `filter` (in `share_group`, if given).
    /// Returns true when it existed. Nodes left empty are unlinked.
    pub fn unsubscribe(&self, share_group: Option<&str>, filter: &str, client_id: &str) -> bool {
        let (path, multi) = split_filter(filter);
        // The nodes above the target and the level leading down from each, for pruning.
        let mut trail: Vec<(Arc<Node>, &str)> = Vec::new();
        let mut node = Arc::clone(&self.root);
        for level in path.into_iter().flat_map(|p| p.split('/')) {
            let child = node.inner.read().child(level).cloned();
            let Some(child) = child else {
                return false;
            };
            trail.push((node, level));
            node = child;
        }
        let mut inner = node.inner.write();
        if !inner.endpoint_mut(multi).remove(share_group, client_id) {
            return false;
        }
        self.len.fetch_sub(1, Ordering::Relaxed);
        let now_empty = inner.is_empty();
        drop(inner);
        if now_empty {
            self.prune(node, trail);
        }
        true
    }

    /// Appends every subscription matching topic name `topic` to `out`, which is not
    /// cleared first: plain subscriptions to `out.direct`, one entry per matching filter,
    /// and each matching share group once to `out.shared`.
    ///
    /// Allocates only to grow `out` (and to copy each matching group's member list).
    pub fn matches(&self, topic: &str, out: &mut Matches) {
        let mut stack = SCRATCH.take();
        stack.clear();
        // Wildcards at the first level never match `$` topics ($SYS, $queue, ...).
        self.visit(
            &self.root,
            topic,
            Some(0),
            !topic.starts_with('$'),
            &mut stack,
            out,
        );
        while let Some(Pending { node, rest }) = stack.pop() {
            self.visit(&node, topic, rest, true, &mut stack, out);
        }
        SCRATCH.set(stack);
    }

    /// Number of stored subscriptions: plain ones plus share group memberships.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when no subscription is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of trie nodes, the root included; 1 when empty. For metrics, and to show
    /// that unsubscribing gives memory back.
    pub fn node_count(&self) -> usize {
        self.nodes.load(Ordering::Relaxed)
    }

    /// Collects what matches at `node`, where `rest` is what is left of the topic, and
    /// queues the children that can match further.
    fn visit(
        &self,
        node: &Node,
        topic: &str,
        rest: Option<usize>,
        wildcards: bool,
        stack: &mut Vec<Pending>,
        out: &mut Matches,
    ) {
        let inner = node.inner.read();
        if wildcards {
            // `x/#` matches `x` itself and everything below it.
            inner.multi.collect(out);
        }
        let Some(start) = rest else {
            inner.exact.collect(out);
            return;
        };
        let Some(remaining) = topic.get(start..) else {
            return;
        };
        let (level, next) = match remaining.split_once('/') {
            Some((level, _)) => (level, Some(start + level.len() + 1)),
            None => (remaining, None),
        };
        if let Some(child) = inner.children.get(level) {
            stack.push(Pending {
                node: Arc::clone(child),
                rest: next,
            });
        }
        match &inner.plus {
            Some(child) if wildcards => stack.push(Pending {
                node: Arc::clone(child),
                rest: next,
            }),
            _ => {}
        }
    }

    /// The node for `path`, creating missing levels. `None` when it ran into a node that
    /// was being pruned; the caller starts over.
    fn descend_creating(&self, path: Option<&str>) -> Option<Arc<Node>> {
        let mut node = Arc::clone(&self.root);
        for level in path.into_iter().flat_map(|p| p.split('/')) {
            let existing = {
                let inner = node.inner.read();
                if inner.detached {
                    return None;
                }
                inner.child(level).cloned()
            };
            let child = match existing {
                Some(child) => child,
                None => {
                    let mut inner = node.inner.write();
                    if inner.detached {
                        return None;
                    }
                    let (child, created) = inner.child_or_insert(level);
                    if created {
                        self.nodes.fetch_add(1, Ordering::Relaxed);
                    }
                    child
                }
            };
            node = child;
        }
        Some(node)
    }

    /// Unlinks `node` and then each ancestor that is left empty, bottom up.
    ///
    /// Locks parent then child, like every other writer, and re-checks under both locks
    /// that the child is still this parent's and still empty: a subscribe may have
    /// refilled it, or another unsubscribe pruned it, since the caller let go.
    fn prune(&self, mut node: Arc<Node>, mut trail: Vec<(Arc<Node>, &str)>) {
        while let Some((parent, level)) = trail.pop() {
            let mut parent_inner = parent.inner.write();
            if parent_inner.detached {
                return;
            }
            match parent_inner.child(level) {
                Some(child) if Arc::ptr_eq(child, &node) => {}
                _ => return,
            }
            {
                let mut inner = node.inner.write();
                if inner.detached || !inner.is_empty() {
                    return;
                }
                inner.detached = true;
            }
            parent_inner.remove_child(level);
            self.nodes.fetch_sub(1, Ordering::Relaxed);
            if !parent_inner.is_empty() {
                return;
            }
            drop(parent_inner);
            node = parent;
        }
    }
}

impl Drop for Router {
    /// Tears the trie down level by level: the default drop would recurse once per
    /// level, and a client may subscribe to a filter thousands of levels deep.
    fn drop(&mut self) {
        let mut stack = vec![Arc::clone(&self.root)];
        while let Some(node) = stack.pop() {
            let mut inner = node.inner.write();
            stack.extend(inner.children.drain().map(|(_, child)| child));
            stack.extend(inner.plus.take());
        }
    }
}

/// Splits a filter into the levels leading to its node and whether it ends in `#`.
///
/// `#` alone has no levels (the root's multi-level set); `a/#` is node `a`; `/#` is the
/// node for one empty level.
fn split_filter(filter: &str) -> (Option<&str>, bool) {
    if filter == "#" {
        (None, true)
    } else if let Some(path) = filter.strip_suffix("/#") {
        (Some(path), true)
    } else {
        (Some(filter), false)
    }
}
