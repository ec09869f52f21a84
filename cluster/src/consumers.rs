//! Consumers of replicated queues across nodes: a consumer is served by the node it
//! is connected to, and the leaders of the partitions its group owns may be other
//! nodes. Its node tells every other node of the join ([`QueueMsg::Join`]); there a
//! proxy member (`<client id>@<node>`) joins the same group, and its deliveries go
//! over the link, in order, batched ([`QueueMsg::Deliver`]). Settles of those
//! deliveries go back to the node that made them ([`QueueMsg::Settle`]), which
//! settles its proxy's delivery and commits the settle to the partition's log.
//!
//! A node whose link goes down loses its proxies elsewhere (what they held is
//! delivered again), and the deliveries it had from that node are forgotten (their
//! settles could not reach the leader). Joins are stated again on every new link.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use roost_queue::{DeliverySink, GroupKey, MessageId, QueueDelivery, Queues, SettleHow};
use tokio::sync::mpsc;
use tracing::debug;

use crate::link::{Link, Links};
use crate::queue_wire::{QueueMsg, WireDelivery, WireKey};
use crate::raft::types::NodeId;
use crate::request::Request;

/// How long a batch of deliveries may take to cross.
const DELIVER_WAIT: Duration = Duration::from_secs(5);
/// Most deliveries in one batch.
const DELIVER_BATCH: usize = 512;

fn wire_key(k: &GroupKey) -> WireKey {
    (k.group.to_string(), k.filter.as_deref().map(str::to_owned))
}

fn group_key(k: &WireKey) -> GroupKey {
    GroupKey::new(&k.0, k.1.as_deref())
}

/// A consumer of this node in a replicated queue's group.
type LocalMember = (String, WireKey, String);

/// The cross-node consumer state of this node.
pub struct Consumers {
    links: Arc<Links>,
    queues: Queues,
    /// This node's consumers of replicated queues, with their windows.
    local: Mutex<HashMap<LocalMember, u32>>,
    /// Deliveries other nodes made to this node's consumers: (consumer, id) -> node.
    inflight: Mutex<HashMap<(String, MessageId), NodeId>>,
    /// Proxies this node hosts, per node they stand for: (queue, proxy id).
    hosted: Mutex<HashMap<NodeId, HashSet<(String, String)>>>,
    /// The link each node last heard this node's joins on.
    joined_on: Mutex<HashMap<NodeId, Arc<Link>>>,
    /// Per destination node, its ordered delivery sender.
    senders: Mutex<HashMap<NodeId, mpsc::UnboundedSender<(String, WireDelivery)>>>,
}

impl Consumers {
    /// The consumer state of node `me`.
    pub fn new(links: Arc<Links>, queues: Queues) -> Arc<Consumers> {
        let c = Arc::new(Consumers {
            links,
            queues,
            local: Mutex::default(),
            inflight: Mutex::default(),
            hosted: Mutex::default(),
            joined_on: Mutex::default(),
            senders: Mutex::default(),
        });
        tokio::spawn(c.clone().restate_joins());
        c
    }

    fn send(self: &Arc<Self>, node: NodeId, msg: QueueMsg) {
        let me = self.clone();
        tokio::spawn(async move {
            let join = matches!(msg, QueueMsg::Join { .. });
            let Ok(body) = serde_json::to_vec(&Request::Queue(msg)) else {
                return;
            };
            if let Err(e) = me
                .links
                .request(node, Bytes::from(body), DELIVER_WAIT)
                .await
            {
                debug!(node, "queue consumer message not taken: {e}");
                if join {
                    // Stated again, with every other join, on the next round (the
                    // queue may not be known there yet).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    me.joined_on.lock().remove(&node);
                }
            }
        });
    }

    /// A consumer of this node joined group `key` of replicated `queue`.
    pub fn joined(self: &Arc<Self>, queue: &str, key: &GroupKey, consumer: &str, window: u32) {
        let member = (queue.to_owned(), wire_key(key), consumer.to_owned());
        self.local.lock().insert(member, window);
        for node in self.links.up() {
            self.send(
                node,
                QueueMsg::Join {
                    queue: queue.to_owned(),
                    key: wire_key(key),
                    consumer: consumer.to_owned(),
                    window,
                },
            );
        }
    }

    /// A consumer of this node left group `key` (every group when `None`).
    pub fn left(self: &Arc<Self>, queue: &str, key: Option<&GroupKey>, consumer: &str) {
        let key = key.map(wire_key);
        let mut removed = false;
        self.local.lock().retain(|(q, k, c), _| {
            let gone = q == queue && c == consumer && key.as_ref().is_none_or(|key| key == k);
            removed |= gone;
            !gone
        });
        if !removed {
            return;
        }
        for node in self.links.up() {
            self.send(
                node,
                QueueMsg::Leave {
                    queue: queue.to_owned(),
                    key: key.clone(),
                    consumer: consumer.to_owned(),
                },
            );
        }
    }

    /// Passes a settle of a delivery another node made on to that node.
    pub fn settle_elsewhere(
        self: &Arc<Self>,
        how: SettleHow,
        consumer: &str,
        key: Option<&GroupKey>,
        id: &MessageId,
    ) -> bool {
        let Some(node) = self
            .inflight
            .lock()
            .remove(&(consumer.to_owned(), id.clone()))
        else {
            return false;
        };
        self.send(
            node,
            QueueMsg::Settle {
                queue: id.queue.to_string(),
                key: key.map(wire_key),
                consumer: consumer.to_owned(),
                how,
                partition: id.partition,
                offset: id.offset,
            },
        );
        true
    }

    /// The link to `node` is down.
    pub fn node_down(&self, node: NodeId) {
        self.joined_on.lock().remove(&node);
        self.inflight.lock().retain(|_, n| *n != node);
        let hosted = self.hosted.lock().remove(&node).unwrap_or_default();
        for (queue, proxy) in hosted {
            if let Some(q) = self.queues.get(&queue) {
                q.leave_proxy(None, &proxy);
            }
        }
    }

    /// States this node's joins on every link that has not heard them yet (a new or
    /// re-established one), and notices links that went down.
    async fn restate_joins(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let down: Vec<NodeId> = self
                .joined_on
                .lock()
                .iter()
                .filter(|(n, l)| self.links.get(**n).is_none_or(|now| !Arc::ptr_eq(&now, l)))
                .map(|(n, _)| *n)
                .collect();
            for n in down {
                self.node_down(n);
            }
            for node in self.links.up() {
                let Some(link) = self.links.get(node) else {
                    continue;
                };
                if self.joined_on.lock().contains_key(&node) {
                    continue;
                }
                self.joined_on.lock().insert(node, link);
                let members: Vec<(LocalMember, u32)> = self
                    .local
                    .lock()
                    .iter()
                    .map(|(m, w)| (m.clone(), *w))
                    .collect();
                for ((queue, key, consumer), window) in members {
                    self.send(
                        node,
                        QueueMsg::Join {
                            queue,
                            key,
                            consumer,
                            window,
                        },
                    );
                }
            }
        }
    }

    fn proxy_id(consumer: &str, node: NodeId) -> String {
        format!("{consumer}@node{node}")
    }

    /// Queues a delivery to a consumer of `node`, in order.
    fn deliver(self: &Arc<Self>, node: NodeId, queue: String, d: WireDelivery) -> bool {
        if !self.links.is_up(node) {
            return false;
        }
        let mut senders = self.senders.lock();
        let tx = senders.entry(node).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.clone().send_deliveries(node, rx));
            tx
        });
        tx.send((queue, d)).is_ok()
    }

    /// Sends the deliveries to `node` in order, as many per request as are waiting;
    /// one the consumer's node could not take is nacked here (delivered again).
    async fn send_deliveries(
        self: Arc<Self>,
        node: NodeId,
        mut rx: mpsc::UnboundedReceiver<(String, WireDelivery)>,
    ) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < DELIVER_BATCH
                && let Ok(more) = rx.try_recv()
            {
                batch.push(more);
            }
            // One request per queue, in order.
            let mut i = 0;
            while i < batch.len() {
                let queue = batch[i].0.clone();
                let mut items = Vec::new();
                while i < batch.len() && batch[i].0 == queue {
                    items.push(batch[i].1.clone());
                    i += 1;
                }
                let taken = self.send_batch(node, &queue, items.clone()).await;
                for (d, ok) in items
                    .iter()
                    .zip(taken.iter().copied().chain(std::iter::repeat(false)))
                {
                    if ok {
                        continue;
                    }
                    if let Some(q) = self.queues.get(&queue) {
                        let id = MessageId {
                            queue: Arc::from(queue.as_str()),
                            partition: d.partition,
                            offset: d.offset,
                        };
                        let key = group_key(&d.key);
                        q.nack(&Self::proxy_id(&d.consumer, node), Some(&key), &id);
                    }
                }
            }
        }
    }

    async fn send_batch(&self, node: NodeId, queue: &str, items: Vec<WireDelivery>) -> Vec<bool> {
        let msg = Request::Queue(QueueMsg::Deliver {
            queue: queue.to_owned(),
            items,
        });
        let Ok(body) = serde_json::to_vec(&msg) else {
            return Vec::new();
        };
        match self
            .links
            .request(node, Bytes::from(body), DELIVER_WAIT)
            .await
        {
            Ok(answer) => serde_json::from_slice(&answer).unwrap_or_default(),
            Err(e) => {
                debug!(node, "deliveries not taken: {e}");
                Vec::new()
            }
        }
    }

    /// Answers another node's consumer traffic.
    pub fn answer(self: &Arc<Self>, from: NodeId, msg: QueueMsg) -> Result<Bytes, String> {
        match msg {
            QueueMsg::Join {
                queue,
                key,
                consumer,
                window,
            } => {
                let q = self
                    .queues
                    .get(&queue)
                    .ok_or_else(|| format!("no queue {queue} here"))?;
                let proxy = Self::proxy_id(&consumer, from);
                let sink = Arc::new(LinkSink {
                    consumers: Arc::downgrade(self),
                    node: from,
                    queue: queue.clone(),
                    consumer,
                });
                q.join_proxy(&group_key(&key), Arc::from(proxy.as_str()), window, sink)
                    .map_err(|e| e.to_string())?;
                self.hosted
                    .lock()
                    .entry(from)
                    .or_default()
                    .insert((queue, proxy));
                Ok(Bytes::new())
            }
            QueueMsg::Leave {
                queue,
                key,
                consumer,
            } => {
                if let Some(q) = self.queues.get(&queue) {
                    let proxy = Self::proxy_id(&consumer, from);
                    q.leave_proxy(key.as_ref().map(group_key).as_ref(), &proxy);
                    if key.is_none()
                        && let Some(h) = self.hosted.lock().get_mut(&from)
                    {
                        h.remove(&(queue, proxy));
                    }
                }
                Ok(Bytes::new())
            }
            QueueMsg::Deliver { queue, items } => {
                let q = self.queues.get(&queue);
                let name: Arc<str> = Arc::from(queue.as_str());
                let mut taken = Vec::with_capacity(items.len());
                for d in items {
                    let Some(q) = &q else {
                        taken.push(false);
                        continue;
                    };
                    let id = MessageId {
                        queue: name.clone(),
                        partition: d.partition,
                        offset: d.offset,
                    };
                    let key = group_key(&d.key);
                    self.inflight
                        .lock()
                        .insert((d.consumer.clone(), id.clone()), from);
                    let delivery = QueueDelivery {
                        id: id.clone(),
                        group: key.clone(),
                        delivery_count: d.count,
                        subtopic: d.subtopic,
                        headers: Bytes::from(d.headers),
                        payload: Bytes::from(d.payload),
                        timestamp_ms: d.timestamp_ms,
                        dead_letter: None,
                    };
                    let ok = q.offer_from_leader(&key, &d.consumer, delivery);
                    if !ok {
                        self.inflight.lock().remove(&(d.consumer, id));
                    }
                    taken.push(ok);
                }
                serde_json::to_vec(&taken)
                    .map(Bytes::from)
                    .map_err(|e| e.to_string())
            }
            QueueMsg::Settle {
                queue,
                key,
                consumer,
                how,
                partition,
                offset,
            } => {
                let q = self
                    .queues
                    .get(&queue)
                    .ok_or_else(|| format!("no queue {queue} here"))?;
                let proxy = Self::proxy_id(&consumer, from);
                let key = key.as_ref().map(group_key);
                let id = MessageId {
                    queue: Arc::from(queue.as_str()),
                    partition,
                    offset,
                };
                match how {
                    SettleHow::Ack => drop(q.ack(&proxy, key.as_ref(), &id)),
                    SettleHow::Nack => {
                        q.nack(&proxy, key.as_ref(), &id);
                    }
                    SettleHow::Reject => {
                        q.reject(&proxy, key.as_ref(), &id);
                    }
                }
                Ok(Bytes::new())
            }
        }
    }
}

/// Passes a leader's deliveries to a proxy on to the consumer's node.
struct LinkSink {
    consumers: std::sync::Weak<Consumers>,
    node: NodeId,
    queue: String,
    consumer: String,
}

impl DeliverySink for LinkSink {
    fn offer(&self, d: QueueDelivery) -> bool {
        let Some(c) = self.consumers.upgrade() else {
            return false;
        };
        let wire = WireDelivery {
            consumer: self.consumer.clone(),
            key: wire_key(&d.group),
            partition: d.id.partition,
            offset: d.id.offset,
            count: d.delivery_count,
            subtopic: d.subtopic,
            headers: d.headers.to_vec(),
            payload: d.payload.to_vec(),
            timestamp_ms: d.timestamp_ms,
        };
        c.deliver(self.node, self.queue.clone(), wire)
    }
}
