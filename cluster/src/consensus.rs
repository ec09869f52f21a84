//! The control plane as the rest of roost uses it: a roost-owned trait, so that
//! openraft's API (which changes between releases) is named in `raft/` only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::raft::state::ControlState;
use crate::raft::types::{Command, NodeId, Outcome};
use crate::request::{MemberChange, Request};

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the control plane could not do something.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Unavailable {
    /// No leader could commit it in time (this node is cut off from a majority, or
    /// an election is under way).
    #[error("the control plane has no quorum")]
    NoQuorum,
    /// The request was refused (says why).
    #[error("refused: {0}")]
    Refused(String),
}

/// Consensus over the cluster's shared state.
pub trait Consensus: Send + Sync + 'static {
    /// Commits `cmd` (through the leader, wherever it is) and returns what applying
    /// it answered; fails if no majority commits it within the write timeout.
    fn propose(&self, cmd: Command) -> BoxFuture<'_, Result<Outcome, Unavailable>>;
    /// Adds or removes a member (through the leader).
    fn change_members(&self, change: MemberChange) -> BoxFuture<'_, Result<(), Unavailable>>;
    /// The current leader, as this node knows it.
    fn leader(&self) -> Option<NodeId>;
    /// The state as applied on this node.
    fn state(&self) -> &Arc<ControlState>;
    /// The index of the last entry this node has applied.
    fn applied_index(&self) -> u64;
    /// Answers a consensus request from a peer (Raft's messages, proposals and
    /// membership changes forwarded to the leader).
    fn answer(&self, request: Request) -> BoxFuture<'_, Result<Bytes, String>>;
    /// Stands for election now (the leader is known to be gone).
    fn elect(&self) -> BoxFuture<'_, ()>;
    /// How long after its last word a leader's lease lasts: votes for another node are
    /// refused until then.
    fn lease(&self) -> std::time::Duration;
    /// The voting members.
    fn voters(&self) -> Vec<NodeId>;
    /// Stops taking part.
    fn shut_down(&self) -> BoxFuture<'_, ()>;
}
