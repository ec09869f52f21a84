//! A replicated queue partition's types as openraft sees them.

use std::fmt;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::{Deserialize, Serialize};

use crate::raft::types::NodeId;

openraft::declare_raft_types!(
    /// The type configuration of a partition's Raft group.
    pub PartConfig: D = Op, R = OpOutcome, SnapshotData = std::io::Cursor<Vec<u8>>
);

/// A replicated partition: queue name and partition number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId {
    /// The queue.
    pub queue: String,
    /// The partition.
    pub partition: u32,
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.queue, self.partition)
    }
}

/// A change to a partition, as its log carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Store a message (the fields of `roost_queue::NewMessage`).
    Produce {
        /// Subtopic.
        subtopic: String,
        /// `partition-key`.
        key: Option<Vec<u8>>,
        /// Encoded MQTT properties.
        headers: Vec<u8>,
        /// Body.
        payload: Vec<u8>,
        /// `dedup-id`.
        dedup_id: Option<Vec<u8>>,
        /// Delivery time.
        deliver_at: Option<u64>,
        /// Set under `ack_mode = "leader"`: a request id, and the proposal is answered
        /// once the leader's own log has the entry on disk instead of once a majority
        /// has it (absent in entries of older versions).
        #[serde(default)]
        early: Option<u64>,
    },
    /// Group (`group`, `filter`) settled these offsets.
    Settle {
        /// The group's name.
        group: String,
        /// The group's filter.
        filter: Option<String>,
        /// The offsets.
        offsets: Vec<u64>,
    },
    /// Group (`group`, `filter`) delivered these offsets, each for the given time.
    Delivered {
        /// The group's name.
        group: String,
        /// The group's filter.
        filter: Option<String>,
        /// (offset, delivery count).
        counts: Vec<(u64, u32)>,
    },
}

/// What applying an [`Op`] answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpOutcome {
    /// The message's offset.
    Produced(u64),
    /// Anything else.
    Done,
}

/// A partition's Raft message, or a proposal forwarded to its leader.
#[derive(Debug, Serialize, Deserialize)]
pub enum PartRpc {
    /// Append entries (and heartbeats).
    Append(AppendEntriesRequest<PartConfig>),
    /// A vote.
    Vote(VoteRequest<NodeId>),
    /// A snapshot chunk (refused: partitions take no snapshots).
    Snapshot(InstallSnapshotRequest<PartConfig>),
    /// To the leader: commit this (answer: the JSON [`OpOutcome`]).
    Propose(Op),
    /// To the leader: how far behind each replica is (answer: the JSON list of
    /// [`super::lag::Lag`]; empty from a replica that does not lead).
    Lags,
}
