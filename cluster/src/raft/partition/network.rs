//! A partition's Raft messages over the node-to-node links ([`Request::Part`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, RPCError, RaftError};

use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;

use super::lag::ReplicaLag;
use super::types::{GroupId, PartConfig, PartRpc};
use crate::link::Links;
use crate::raft::types::NodeId;
use crate::request::Request;

/// Opens a [`PartPeer`] per target.
pub struct PartNetwork {
    pub(super) links: Arc<Links>,
    pub(super) group: GroupId,
    /// Told when each replica answers (see [`ReplicaLag`]).
    pub(super) lag: Arc<ReplicaLag>,
}

/// openraft's handle to one replica of a partition.
pub struct PartPeer {
    links: Arc<Links>,
    group: GroupId,
    target: NodeId,
    lag: Arc<ReplicaLag>,
}

impl RaftNetworkFactory<PartConfig> for PartNetwork {
    type Network = PartPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> PartPeer {
        PartPeer {
            links: self.links.clone(),
            group: self.group.clone(),
            target,
            lag: self.lag.clone(),
        }
    }
}

impl PartPeer {
    async fn call<R, E>(
        &self,
        rpc: PartRpc,
        timeout: Duration,
    ) -> Result<R, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let request = Request::Part {
            group: self.group.clone(),
            rpc,
        };
        // Every failure of the link (down, its queue full, no answer, or a node that
        // has no replica of the partition yet) is "unreachable": openraft then backs
        // off instead of retrying at once, which would flood the link that the control
        // plane shares.
        crate::raft::network::call(&self.links, self.target, &request, timeout, |_| true).await
    }
}

impl RaftNetwork<PartConfig> for PartPeer {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let answer = self.call(PartRpc::Append(rpc), option.hard_ttl()).await;
        if answer.is_ok() {
            self.lag.answered(self.target, Instant::now());
        }
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<PartConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(PartRpc::Snapshot(rpc), option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(PartRpc::Vote(rpc), option.hard_ttl()).await
    }
}
