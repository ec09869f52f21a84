//! The requests one node makes of another over their link (JSON in a REQUEST frame).

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};

use crate::raft::types::{Command, NodeId, TypeConfig};

/// A request to a peer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Raft: append entries (and heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft: a vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: a snapshot chunk.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// To the leader: commit this command (answer: the JSON [`crate::raft::types::Outcome`]).
    Propose(Command),
    /// To the leader: change the membership.
    Members(MemberChange),
    /// Every retained message the peer holds (answer: each as a u32 BE length and
    /// `roost_engine::record::encode_retained`'s bytes), for a node catching up.
    Retained,
    /// A replicated queue partition's Raft traffic.
    Part {
        /// Which partition.
        group: crate::raft::partition::types::GroupId,
        /// The message.
        rpc: crate::raft::partition::types::PartRpc,
    },
    /// Consumers of a replicated queue on another node.
    Queue(crate::queue_wire::QueueMsg),
    /// To a client's previous owner: hand over its session, claimed at `epoch`
    /// (answer: the session's bytes, empty when there is none).
    TakeSession {
        /// The client id.
        client: String,
        /// The claim's epoch.
        epoch: u64,
    },
}

/// A change of the cluster's members.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add a voting member.
    Add {
        /// Its node id.
        id: NodeId,
        /// Its cluster address.
        addr: String,
    },
    /// Remove a member.
    Remove {
        /// Its node id.
        id: NodeId,
    },
}
