//! openraft's network: its messages go over the node-to-node links as requests.

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

use super::types::{NodeId, TypeConfig};
use crate::link::{LinkError, Links};
use crate::request::Request;

/// Opens a [`Peer`] per target.
pub struct Network {
    pub(super) links: Arc<Links>,
}

/// openraft's handle to one peer.
pub struct Peer {
    links: Arc<Links>,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        // A member (or learner) being replicated to: link to it if it is ours to dial.
        self.links.know(target, node.addr.clone());
        Peer {
            links: self.links.clone(),
            target,
        }
    }
}

impl Peer {
    async fn call<R, E>(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<R, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        call(&self.links, self.target, &request, timeout, |e| {
            matches!(e, LinkError::Unreachable(_))
        })
        .await
    }
}

/// Sends a Raft message (of the control plane or of a partition) to `target` and
/// reads openraft's answer; a link failure for which `unreachable` holds is reported
/// as [`Unreachable`] (openraft backs off), any other as a network error.
pub(crate) async fn call<R, E>(
    links: &Links,
    target: NodeId,
    request: &Request,
    timeout: Duration,
    unreachable: impl Fn(&LinkError) -> bool,
) -> Result<R, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
where
    R: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let body = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    let answer = links
        .request(target, Bytes::from(body), timeout)
        .await
        .map_err(|e| {
            if unreachable(&e) {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
    let result: Result<R, RaftError<NodeId, E>> =
        serde_json::from_slice(&answer).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    result.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Request::Append(rpc), option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Request::Snapshot(rpc), option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Request::Vote(rpc), option.hard_ttl()).await
    }
}
