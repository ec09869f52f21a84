//! A partition's Raft messages over the node-to-node links ([`Request::Part`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};

use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;

use super::types::{GroupId, PartConfig, PartRpc};
use crate::link::{LinkError, Links};
use crate::raft::types::NodeId;
use crate::request::Request;

/// Opens a [`PartPeer`] per target.
pub struct PartNetwork {
    pub(super) links: Arc<Links>,
    pub(super) group: GroupId,
}

/// openraft's handle to one replica of a partition.
pub struct PartPeer {
    links: Arc<Links>,
    group: GroupId,
    target: NodeId,
}

impl RaftNetworkFactory<PartConfig> for PartNetwork {
    type Network = PartPeer;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> PartPeer {
        PartPeer {
            links: self.links.clone(),
            group: self.group.clone(),
            target,
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
        let body =
            serde_json::to_vec(&request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = self
            .links
            .request(self.target, Bytes::from(body), timeout)
            .await
            // Every failure of the link (down, its queue full, no answer, or a node
            // that has no replica of the partition yet) is "unreachable": openraft then
            // backs off instead of retrying at once, which would flood the link that
            // the control plane shares.
            .map_err(|e: LinkError| RPCError::Unreachable(Unreachable::new(&e)))?;
        let result: Result<R, RaftError<NodeId, E>> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
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
        self.call(PartRpc::Append(rpc), option.hard_ttl()).await
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
