//! The other nodes of a cluster, as the engine sees them: a trait, so that the engine
//! knows no socket and no consensus (the `roost-cluster` crate implements it).
//!
//! A node routes each publish to its own sessions and hands it to [`Peers::forward`],
//! which sends it once to every other node with matching subscribers (through the
//! cluster's route table) and says which share groups another node took. The node's
//! router tells [`Peers`] of every subscription it gains or loses, so the route table
//! follows (the cluster counts them: a route stands while a filter has a local
//! subscriber). What a publisher must wait for
//! before its PUBACK (other nodes storing the message, a new route being known
//! cluster-wide before the SUBACK) comes back as a [`Wait`].
//!
//! A message that arrives from another node is routed here with
//! [`crate::broker::Broker::publish_from_peer`], never forwarded again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use roost_core::Message;

use crate::record::StoredSession;

/// Something a publisher (or subscriber) waits for before its acknowledgement is sent.
pub type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What [`Peers::claim`] answers.
pub type Claim = Pin<Box<dyn Future<Output = Result<Option<StoredSession>, Unavailable>> + Send>>;

/// The cluster cannot decide who owns a client id now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// A share group and filter (`$share/<group>/<filter>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShareKey {
    /// The share name.
    pub group: Arc<str>,
    /// The filter, without its `$share/<group>/` prefix.
    pub filter: Arc<str>,
}

/// What a publish on this node leaves to the other nodes.
#[derive(Default)]
pub struct Forwarded {
    /// Share groups whose turn went to another node: this node does not deliver to
    /// its own members of these groups.
    pub taken: Vec<ShareKey>,
    /// What the publisher waits for before acknowledging (the other nodes' stores).
    pub wait: Option<Wait>,
}

/// The other nodes of the cluster.
pub trait Peers: Send + Sync + 'static {
    /// Sends `msg` to every other node that has a matching subscriber (a retained
    /// message to every node, which keeps it too). `shared` are the share groups
    /// with members on this node that matched; the answer says which of them (and
    /// of the groups with members only elsewhere) another node delivers to.
    fn forward(&self, msg: &Arc<Message>, shared: &[ShareKey]) -> Forwarded;

    /// A local client subscribed to `filter` (in `share_group`). When it is the
    /// filter's first local subscriber the route table must learn it: the wait
    /// resolves once the route is known cluster-wide (or the attempt gave up, when the
    /// control plane is out of reach).
    fn subscribed(&self, share_group: Option<&str>, filter: &str) -> Option<Wait>;

    /// A local client's subscription to `filter` (in `share_group`) is gone.
    fn unsubscribed(&self, share_group: Option<&str>, filter: &str);

    /// A client connects here: it becomes this node's (client ids are unique across
    /// the cluster). The answer is its session if another node had it (moved here:
    /// that node closed the old connection), or `Err` when the cluster cannot say who
    /// owns the client id now (this node is cut off from a majority): the CONNECT is
    /// refused as server unavailable.
    fn claim(&self, client_id: &Arc<str>) -> Claim;
}
