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
