//! The cluster's route table: which node has local subscribers for which filters
//! (and share groups). Part of the control plane's state; matched on every publish.
//!
//! It is the engine's subscription trie with nodes for clients: a node "subscribes"
//! to a filter while it has a local subscriber of it, so one match of a topic names
//! the nodes with plain subscribers and, per share group, the nodes with members
//! (in the group's round-robin order).

use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;
use roost_router::{Matches, Router, Subscription};
use serde::{Deserialize, Serialize};

/// A filter some node subscribes to, in a share group or not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// `<group>` of `$share/<group>/<filter>`, if shared.
    pub share: Option<String>,
    /// The filter proper.
    pub filter: String,
}

/// Routes of every node.
#[derive(Default)]
pub struct RouteTable {
    entries: Mutex<BTreeSet<(NodeId, Route)>>,
    router: Router,
}

/// A node's id (as [`crate::raft::types::NodeId`]; spelled out here, which the
/// control plane's types depend on).
type NodeId = u64;

/// The trie's name for a node.
fn node_key(node: NodeId) -> Arc<str> {
    node.to_string().into()
}

/// The node a match names.
pub fn node_of(s: &Subscription) -> Option<NodeId> {
    s.client_id.parse().ok()
}

impl RouteTable {
    /// `node` subscribes to `route` (no change if it did).
    pub fn add(&self, node: NodeId, route: Route) {
        let mut entries = self.entries.lock();
        if entries.insert((node, route.clone())) {
            self.router.subscribe(
                route.share.as_deref(),
                &route.filter,
                Subscription {
                    client_id: node_key(node),
                    options: Default::default(),
                    identifier: None,
                },
            );
        }
    }

    /// `node` no longer subscribes to `route`.
    pub fn remove(&self, node: NodeId, route: &Route) {
        let mut entries = self.entries.lock();
        if entries.remove(&(node, route.clone())) {
            self.router
                .unsubscribe(route.share.as_deref(), &route.filter, &node_key(node));
        }
    }

    /// `node`'s routes are exactly `keep` from now on.
    pub fn set_node(&self, node: NodeId, keep: Vec<Route>) {
        let keep: BTreeSet<Route> = keep.into_iter().collect();
        let gone: Vec<Route> = self
            .entries
            .lock()
            .iter()
            .filter(|(n, r)| *n == node && !keep.contains(r))
            .map(|(_, r)| r.clone())
            .collect();
        for r in gone {
            self.remove(node, &r);
        }
        for r in keep {
            self.add(node, r);
        }
    }

    /// Every route of every node.
    pub fn all(&self) -> Vec<(NodeId, Route)> {
        self.entries.lock().iter().cloned().collect()
    }

    /// The routes of `node`.
    pub fn of(&self, node: NodeId) -> Vec<Route> {
        self.entries
            .lock()
            .iter()
            .filter(|(n, _)| *n == node)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Replaces the whole table (a snapshot was installed).
    pub fn replace(&self, all: Vec<(NodeId, Route)>) {
        let old = self.all();
        for (n, r) in old {
            self.remove(n, &r);
        }
        for (n, r) in all {
            self.add(n, r);
        }
    }

    /// The routes matching `topic`.
    pub fn matches(&self, topic: &str, out: &mut Matches) {
        self.router.matches(topic, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(share: Option<&str>, filter: &str) -> Route {
        Route {
            share: share.map(str::to_owned),
            filter: filter.to_owned(),
        }
    }

    fn nodes(t: &RouteTable, topic: &str) -> (Vec<NodeId>, Vec<(String, Vec<NodeId>)>) {
        let mut m = Matches::default();
        t.matches(topic, &mut m);
        let mut direct: Vec<NodeId> = m.direct.iter().filter_map(node_of).collect();
        direct.sort_unstable();
        direct.dedup();
        let shared = m
            .shared
            .iter()
            .map(|g| {
                let mut n: Vec<NodeId> = g.members.iter().filter_map(node_of).collect();
                n.sort_unstable();
                (g.group.to_string(), n)
            })
            .collect();
        (direct, shared)
    }

    #[test]
    fn a_match_names_the_nodes_and_share_groups() {
        let t = RouteTable::default();
        t.add(1, route(None, "a/+"));
        t.add(2, route(None, "a/#"));
        t.add(2, route(None, "a/#")); // again: no change
        t.add(3, route(Some("g"), "a/b"));
        t.add(2, route(Some("g"), "a/b"));
        assert_eq!(
            nodes(&t, "a/b"),
            (vec![1, 2], vec![("g".into(), vec![2, 3])])
        );
        assert_eq!(nodes(&t, "a/b/c"), (vec![2], vec![]));
        t.remove(2, &route(Some("g"), "a/b"));
        assert_eq!(nodes(&t, "a/b").1, vec![("g".to_string(), vec![3])]);
        // A restarted node states its routes afresh.
        t.set_node(2, vec![route(None, "x")]);
        assert_eq!(nodes(&t, "a/b"), (vec![1], vec![("g".into(), vec![3])]));
        assert_eq!(t.of(2), vec![route(None, "x")]);
        // A snapshot replaces everything.
        t.replace(vec![(5, route(None, "#"))]);
        assert_eq!(nodes(&t, "a/b"), (vec![5], vec![]));
        assert_eq!(t.all().len(), 1);
    }
}
