//! roost-cluster: several roost nodes serving as one broker.
//!
//! - [`raft`]: the control plane, one openraft group over all nodes (membership,
//!   session owners, the route table), behind the roost-owned [`consensus::Consensus`];
//! - [`link`]: one multiplexed TCP link per pair of nodes ([`wire`] frames);
//! - [`node`]: the engine's [`roost_engine::peers::Peers`] (publishes routed to the
//!   nodes with subscribers, once per node; shared subscriptions across nodes;
//!   sessions that move to the node a client connects to) and the handler of what
//!   links bring in.
//!
//! - [`replicas`], [`consumers`]: replicated `$queue/` partitions (one openraft group
//!   per partition in [`raft::partition`]), produce and consume through any node.
//!
//! Not replicated: a node's persistent sessions live on its disk only (a client whose
//! node died starts a new session elsewhere).
#![deny(missing_docs)]

pub mod consensus;
pub mod consumers;
pub mod link;
pub mod node;
pub mod outbox;
pub mod queue_wire;
pub mod raft;
pub mod replicas;
pub mod request;
pub mod routes;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use roost_engine::broker::Broker;
use tokio::net::TcpListener;

pub use consensus::Unavailable;
pub use node::{Node, Status};
pub use raft::{DEFAULT_IN_SYNC_LAG_MS, Timing};
pub use request::MemberChange;

/// How this node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id (at least 1).
    pub node_id: u64,
    /// The node-to-node listener.
    pub bind: SocketAddr,
    /// The initial members (id -> cluster address), this node included; the same list
    /// on every node.
    pub peers: BTreeMap<u64, String>,
    /// The cluster's name: nodes of different names refuse each other.
    pub name: String,
    /// A node that joins a running cluster (added through the admin API) does not
    /// form one with `peers`; it waits to be added.
    pub join: bool,
    /// Election timing.
    pub timing: Timing,
}

impl ClusterConfig {
    /// Parses `ID@HOST:PORT,ID@HOST:PORT,...`.
    pub fn parse_peers(list: &str) -> Result<BTreeMap<u64, String>, String> {
        let mut peers = BTreeMap::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, addr) = item
                .split_once('@')
                .ok_or_else(|| format!("peer {item:?} is not ID@HOST:PORT"))?;
            let id: u64 = id
                .parse()
                .ok()
                .filter(|&id| id >= 1)
                .ok_or_else(|| format!("peer {item:?}: the id must be a number >= 1"))?;
            if !addr.contains(':') {
                return Err(format!("peer {item:?}: the address needs a port"));
            }
            if peers.insert(id, addr.to_owned()).is_some() {
                return Err(format!("node id {id} is listed twice"));
            }
        }
        Ok(peers)
    }
}

/// A running cluster node.
pub struct Cluster {
    /// The node.
    pub node: Arc<Node>,
    /// The address its cluster listener is bound to.
    pub bind: SocketAddr,
}

impl Cluster {
    /// Starts this node's part of the cluster over `broker` (data in `dir`): the
    /// control plane, the links, and the broker's peers. Call before serving clients.
    pub async fn start(
        config: ClusterConfig,
        dir: &Path,
        broker: Arc<Broker>,
    ) -> Result<Cluster, String> {
        if config.node_id == 0 {
            return Err("node ids start at 1".into());
        }
        if !config.join && !config.peers.is_empty() && !config.peers.contains_key(&config.node_id) {
            return Err(format!(
                "the peer list does not name this node ({})",
                config.node_id
            ));
        }
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|e| format!("cannot listen for cluster peers on {}: {e}", config.bind))?;
        let bind = listener.local_addr().map_err(|e| e.to_string())?;
        let links = link::Links::new(config.node_id, config.name.clone(), bind.ip());
        let (notify, applied) = tokio::sync::mpsc::unbounded_channel();
        let initial = (!config.join).then_some(&config.peers);
        let raft = raft::RaftNode::start(
            config.node_id,
            &config.name,
            dir,
            initial,
            links.clone(),
            config.timing,
            notify,
        )
        .await?;
        let start_index = raft.start_index();
        let consensus: Arc<dyn consensus::Consensus> = Arc::new(raft);
        let replicas = replicas::Replicas::open(
            config.node_id,
            &dir.join("partitions"),
            links.clone(),
            consensus.clone(),
            broker.queues.clone(),
            raft::partition::PartTiming {
                heartbeat_ms: config.timing.heartbeat_ms,
                election_ms: config.timing.partition_election_ms(),
                in_sync_lag: std::time::Duration::from_millis(config.timing.in_sync_lag_ms),
            },
        )?;
        let node = Node::new(
            config.node_id,
            consensus,
            links.clone(),
            broker.clone(),
            start_index,
            replicas.clone(),
        );
        links.set_handler(node.clone());
        let (down_tx, down_rx) = tokio::sync::mpsc::unbounded_channel();
        links.on_down(down_tx);
        tokio::spawn(node.clone().watch_leader(down_rx));
        for (id, addr) in &config.peers {
            links.know(*id, addr.clone());
        }
        tokio::spawn(links.serve(listener));
        tokio::spawn(node.clone().follow(applied));
        if !broker.set_peers(node.clone()) {
            return Err("this broker is already part of a cluster".into());
        }
        tokio::spawn(node.clone().catch_up());
        replicas.attach();
        Ok(Cluster { node, bind })
    }

    /// Adds or removes a member.
    pub async fn change_members(&self, change: MemberChange) -> Result<(), Unavailable> {
        self.node.consensus.change_members(change).await
    }

    /// Leaves the control plane (at shutdown).
    pub async fn shut_down(&self) {
        self.node.replicas.shut_down().await;
        self.node.consensus.shut_down().await;
    }
}
