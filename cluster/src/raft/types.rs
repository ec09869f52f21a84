//! The control plane's types as openraft sees them: node ids, the commands its log
//! carries and what applying them answers.

use serde::{Deserialize, Serialize};

use crate::routes::Route;

/// A node's id (`--node-id`, at least 1).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The control plane's type configuration.
    pub TypeConfig: D = Command, R = Outcome, SnapshotData = std::io::Cursor<Vec<u8>>
);

/// A change to the control plane's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// `node` takes these client ids (CONNECTs there), each with a request id that
    /// makes a retried proposal answer as the first one did. Batched: a burst of
    /// CONNECTs is one write.
    Claims {
        /// The node the clients connected to.
        node: NodeId,
        /// (client id, request id).
        claims: Vec<(String, u64)>,
    },
    /// Routes of `node` that came or went, in order (batched: a burst of new
    /// filters is one write).
    Routes {
        /// The node.
        node: NodeId,
        /// `(true, route)`: it has a local subscriber now; `(false, route)`: no more.
        changes: Vec<(bool, Route)>,
    },
    /// Forget every route of `node` except `keep` (a node that restarted states what
    /// it has).
    SetRoutes {
        /// The node.
        node: NodeId,
        /// Its routes now.
        keep: Vec<Route>,
    },
    /// Where the partitions of a replicated queue live (the first placement of a
    /// queue stands; a later one for the same queue changes nothing).
    Place {
        /// The queue.
        queue: String,
        /// Per partition, its replicas (the first is the preferred leader).
        replicas: Vec<Vec<NodeId>>,
        /// The queue's settings where it was created: the other replicas create
        /// their copies with them (absent in entries of older versions).
        #[serde(default)]
        config: Option<roost_queue::QueueConfig>,
    },
}

/// What applying a [`Command`] answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Outcome {
    /// A batch of claims, in order: each one's outcome ([`Outcome::Claimed`]).
    Claims(Vec<Outcome>),
    /// A claim: its epoch, and the node that owned the client before, if another.
    Claimed {
        /// The claim's epoch (its log index).
        epoch: u64,
        /// The previous owner, when it was another node.
        previous: Option<NodeId>,
    },
    /// Anything else.
    Done,
}
