//! The control plane's state machine: what every node agrees on.
//!
//! - who owns each client id ([`Owner`]: a node and the epoch of the claim, the log
//!   index that made it, so a later claim always fences an earlier one);
//! - the route table: which node has local subscribers for which (share group,
//!   filter) ([`crate::routes::RouteTable`]);
//! - the membership (kept by openraft, mirrored here for the snapshot).
//!
//! The node reads it locally (a publish matches the route table without asking
//! anyone); it changes only by applying committed [`Command`]s, which are also
//! reported to the node ([`Applied`]) so it can act on a claim that moved a client
//! away. The snapshot is the whole state as JSON, in one file beside the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::types::{Command, NodeId, Outcome, TypeConfig};
use crate::routes::{Route, RouteTable};

/// The owner of a client id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    /// The node.
    pub node: NodeId,
    /// The claim's epoch.
    pub epoch: u64,
    /// The claim's request id and answer, for a retried proposal.
    last: (u64, Outcome),
}

/// What the node hears of applied commands.
#[derive(Debug, Clone)]
pub enum Applied {
    /// A client id was claimed (at log `index`).
    Claimed {
        /// The client id.
        client: String,
        /// Its new owner.
        owner: NodeId,
        /// The owner before, if another node.
        previous: Option<NodeId>,
        /// The log index (the epoch).
        index: u64,
    },
    /// The membership changed.
    Membership,
    /// A queue was placed (see [`ControlState::placement`]).
    Placed(String),
}

/// The last log id applied, and the membership as of then.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

/// The state every node holds, read locally.
#[derive(Default)]
pub struct ControlState {
    /// Client id -> owner.
    pub owners: RwLock<HashMap<String, Owner>>,
    /// Which node subscribes to what.
    pub routes: RouteTable,
    /// Replicated queue -> per partition, its replicas.
    pub placements: RwLock<BTreeMap<String, Vec<Vec<NodeId>>>>,
    /// Replicated queue -> its settings where it was created.
    pub queue_configs: RwLock<BTreeMap<String, roost_queue::QueueConfig>>,
    applied: RwLock<AppliedState>,
}

impl ControlState {
    /// The last log id applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.applied.read().0
    }

    /// The membership as last applied: (id, cluster address, voter).
    pub fn members(&self) -> Vec<(NodeId, String, bool)> {
        let applied = self.applied.read();
        let membership = applied.1.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone(), voters.contains(id)))
            .collect()
    }

    /// Where the partitions of `queue` live, if it was placed.
    pub fn placement(&self, queue: &str) -> Option<Vec<Vec<NodeId>>> {
        self.placements.read().get(queue).cloned()
    }

    /// The settings `queue` was placed with, if its placement carried them.
    pub fn queue_config(&self, queue: &str) -> Option<roost_queue::QueueConfig> {
        self.queue_configs.read().get(queue).cloned()
    }

    /// The owner of `client`, if it has one.
    pub fn owner(&self, client: &str) -> Option<NodeId> {
        self.owners.read().get(client).map(|o| o.node)
    }
}

/// The snapshot's content.
#[derive(Serialize, Deserialize)]
struct Image {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    owners: HashMap<String, Owner>,
    routes: Vec<(NodeId, Route)>,
    #[serde(default)]
    placements: BTreeMap<String, Vec<Vec<NodeId>>>,
    #[serde(default)]
    queue_configs: BTreeMap<String, roost_queue::QueueConfig>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine openraft drives.
#[derive(Clone)]
pub struct StateMachine {
    state: Arc<ControlState>,
    notify: mpsc::UnboundedSender<Applied>,
    snapshot_path: PathBuf,
}

impl StateMachine {
    /// A state machine over `state`, reporting to `notify`, its snapshot at
    /// `snapshot_path`, loaded if it exists.
    pub fn open(
        state: Arc<ControlState>,
        notify: mpsc::UnboundedSender<Applied>,
        snapshot_path: PathBuf,
    ) -> Result<StateMachine, String> {
        let sm = StateMachine {
            state,
            notify,
            snapshot_path,
        };
        if let Some(stored) = sm.read_snapshot()? {
            sm.load(&stored.data)
                .map_err(|e| format!("control-plane snapshot is damaged: {e}"))?;
        }
        Ok(sm)
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, String> {
        match std::fs::read(&self.snapshot_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!(
                    "control-plane snapshot {} is damaged: {e}",
                    self.snapshot_path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", self.snapshot_path.display())),
        }
    }

    fn write_snapshot(&self, stored: &StoredSnapshot) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(stored).map_err(std::io::Error::other)?;
        let tmp = self.snapshot_path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.snapshot_path)?;
        if let Some(dir) = self.snapshot_path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn image(&self) -> Image {
        let (last_applied, membership) = self.state.applied.read().clone();
        Image {
            last_applied,
            membership,
            owners: self.state.owners.read().clone(),
            routes: self.state.routes.all(),
            placements: self.state.placements.read().clone(),
            queue_configs: self.state.queue_configs.read().clone(),
        }
    }

    fn load(&self, data: &[u8]) -> Result<(), serde_json::Error> {
        let image: Image = serde_json::from_slice(data)?;
        *self.state.applied.write() = (image.last_applied, image.membership);
        *self.state.owners.write() = image.owners;
        self.state.routes.replace(image.routes);
        let queues: Vec<String> = image.placements.keys().cloned().collect();
        *self.state.placements.write() = image.placements;
        *self.state.queue_configs.write() = image.queue_configs;
        let _ = self.notify.send(Applied::Membership);
        for q in queues {
            let _ = self.notify.send(Applied::Placed(q));
        }
        Ok(())
    }

    /// `node` takes `client` at log `index` (the claim's epoch).
    fn claim(&self, index: u64, node: NodeId, client: String, request: u64) -> Outcome {
        let mut owners = self.state.owners.write();
        if let Some(o) = owners.get(&client)
            && o.last.0 == request
        {
            return o.last.1.clone();
        }
        let previous = owners.get(&client).map(|o| o.node).filter(|&n| n != node);
        let outcome = Outcome::Claimed {
            epoch: index,
            previous,
        };
        owners.insert(
            client.clone(),
            Owner {
                node,
                epoch: index,
                last: (request, outcome.clone()),
            },
        );
        drop(owners);
        let _ = self.notify.send(Applied::Claimed {
            client,
            owner: node,
            previous,
            index,
        });
        outcome
    }

    fn apply_command(&self, index: u64, cmd: Command) -> Outcome {
        match cmd {
            Command::Claims { node, claims } => Outcome::Claims(
                claims
                    .into_iter()
                    .map(|(client, request)| self.claim(index, node, client, request))
                    .collect(),
            ),
            Command::Routes { node, changes } => {
                for (add, route) in changes {
                    if add {
                        self.state.routes.add(node, route);
                    } else {
                        self.state.routes.remove(node, &route);
                    }
                }
                Outcome::Done
            }
            Command::SetRoutes { node, keep } => {
                self.state.routes.set_node(node, keep);
                Outcome::Done
            }
            Command::Place {
                queue,
                replicas,
                config,
            } => {
                let new = {
                    let mut placements = self.state.placements.write();
                    let new = !placements.contains_key(&queue);
                    placements.entry(queue.clone()).or_insert(replicas);
                    new
                };
                if let (true, Some(config)) = (new, config) {
                    self.state
                        .queue_configs
                        .write()
                        .insert(queue.clone(), config);
                }
                if new {
                    let _ = self.notify.send(Applied::Placed(queue));
                }
                Outcome::Done
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let image = self.image();
        let data =
            serde_json::to_vec(&image).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let meta = SnapshotMeta {
            last_log_id: image.last_applied,
            last_membership: image.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                image.last_applied.map_or(0, |l| l.index),
                roost_engine::record::unix_ms()
            ),
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.write_snapshot(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        Ok(self.state.applied.read().clone())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::Done,
                EntryPayload::Normal(cmd) => self.apply_command(index, cmd),
                EntryPayload::Membership(m) => {
                    self.state.applied.write().1 = StoredMembership::new(Some(entry.log_id), m);
                    let _ = self.notify.send(Applied::Membership);
                    Outcome::Done
                }
            };
            self.state.applied.write().0 = Some(entry.log_id);
            out.push(outcome);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        self.load(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.write_snapshot(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored = self
            .read_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &std::io::Error::other(e)))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> (
        StateMachine,
        mpsc::UnboundedReceiver<Applied>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, rx) = mpsc::unbounded_channel();
        let sm = StateMachine::open(Arc::default(), tx, dir.path().join("snapshot.json"))
            .expect("opens");
        (sm, rx, dir)
    }

    fn claim(sm: &StateMachine, index: u64, node: NodeId, client: &str, request: u64) -> Outcome {
        match sm.apply_command(
            index,
            Command::Claims {
                node,
                claims: vec![(client.into(), request)],
            },
        ) {
            Outcome::Claims(mut each) => each.remove(0),
            other => panic!("{other:?}"),
        }
    }

    /// A claim names the previous owner when it was another node, fences it with a
    /// later epoch, and a retried proposal (same request id) answers as the first did.
    #[test]
    fn claims_move_owners_and_retries_repeat_their_answer() {
        let (sm, mut applied, _dir) = machine();
        let first = claim(&sm, 5, 1, "c", 100);
        assert_eq!(
            first,
            Outcome::Claimed {
                epoch: 5,
                previous: None
            }
        );
        assert_eq!(
            claim(&sm, 6, 1, "c", 101),
            Outcome::Claimed {
                epoch: 6,
                previous: None
            }
        );
        let moved = claim(&sm, 9, 2, "c", 200);
        assert_eq!(
            moved,
            Outcome::Claimed {
                epoch: 9,
                previous: Some(1)
            }
        );
        assert_eq!(
            claim(&sm, 12, 2, "c", 200),
            moved,
            "a retry is answered as before"
        );
        assert_eq!(sm.state.owner("c"), Some(2));
        let mut seen = Vec::new();
        while let Ok(Applied::Claimed { owner, index, .. }) = applied.try_recv() {
            seen.push((owner, index));
        }
        assert_eq!(seen, [(1, 5), (1, 6), (2, 9)]);
    }

    /// The snapshot holds owners and routes; a machine loaded from it has them.
    #[tokio::test]
    async fn the_snapshot_restores_owners_and_routes() {
        let (mut sm, _rx, dir) = machine();
        claim(&sm, 3, 2, "x", 1);
        sm.apply_command(
            4,
            Command::Routes {
                node: 2,
                changes: vec![(
                    true,
                    crate::routes::Route {
                        share: None,
                        filter: "a/#".into(),
                    },
                )],
            },
        );
        sm.state.applied.write().0 = Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 4));
        sm.build_snapshot().await.expect("snapshot");
        let (tx, _rx2) = mpsc::unbounded_channel();
        let back = StateMachine::open(Arc::default(), tx, dir.path().join("snapshot.json"))
            .expect("opens");
        assert_eq!(back.state.owner("x"), Some(2));
        assert_eq!(back.state.routes.of(2).len(), 1);
        assert_eq!(back.state.last_applied().map(|l| l.index), Some(4));
    }
}
