//! Node-to-node links: one long-lived TCP connection per pair of nodes, carrying
//! everything between them (Raft's messages, forwarded publishes and their acks,
//! session moves), multiplexed by request id.
//!
//! The node with the lower id dials, the other accepts; a dialer retries with backoff
//! for as long as the peer is a member. Each link has one writer task that drains a
//! bounded queue of frames and writes them in batches (one write for as many frames as
//! are ready), and one reader task that hands requests and publishes to the node.
//! A link that reads nothing (not even a ping) for [`DEAD_AFTER`] is closed; every
//! request waiting on it fails at once.
//!
//! Refused with a log line, never a panic: a peer of another cluster or protocol
//! version, one claiming this node's id or the id of a node already linked, garbage.
//! The cluster port is for a trusted network: it has no authentication or TLS.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use roost_engine::peers::{ShareKey, Wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::wire::{Frame, Hello, VERSION};

/// A node's id.
type NodeId = u64;

/// A link that reads nothing for this long is taken for dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(1500);
/// An idle link sends a ping this often.
const PING_EVERY: Duration = Duration::from_millis(300);
/// Frames queued for one link at most; past it forwarded publishes are dropped
/// (counted) and requests fail.
const QUEUE: usize = 16 * 1024;

/// What the node does with what its links receive.
pub trait Handler: Send + Sync + 'static {
    /// Answers a request from `from` (JSON in, answer bytes or an error out).
    fn request(
        self: Arc<Self>,
        from: NodeId,
        body: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, String>> + Send>>;
    /// Routes a forwarded publish; acknowledges it on `link` (with `ack`) once stored.
    fn publish(self: Arc<Self>, link: Arc<Link>, ack: u64, shared: Vec<ShareKey>, message: Bytes);
}

enum Reply {
    Response { ok: bool, body: Bytes },
    Acked,
}

/// Why a request over a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No live link to that node.
    #[error("node {0} is not reachable")]
    Unreachable(NodeId),
    /// The link closed or the answer took too long.
    #[error("no answer from node {0}")]
    NoAnswer(NodeId),
    /// The link's queue is full (or it just closed).
    #[error("the link to node {0} is full")]
    Full(NodeId),
    /// The peer answered with an error.
    #[error("node {0} answered: {1}")]
    Remote(NodeId, String),
}

/// One live link to a peer.
pub struct Link {
    /// The peer.
    pub node: NodeId,
    tx: mpsc::Sender<Frame>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl Link {
    fn next(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a frame; false if the queue is full or the link closed.
    pub fn send(&self, frame: Frame) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.tx.try_send(frame).is_ok()
    }

    /// Sends a request and waits (at most `timeout`) for its answer.
    pub async fn request(&self, body: Bytes, timeout: Duration) -> Result<Bytes, LinkError> {
        let id = self.next();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        if !self.send(Frame::Request { id, body }) {
            self.pending.lock().remove(&id);
            return Err(LinkError::NoAnswer(self.node));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Reply::Response { ok: true, body })) => Ok(body),
            Ok(Ok(Reply::Response { ok: false, body })) => Err(LinkError::Remote(
                self.node,
                String::from_utf8_lossy(&body).into_owned(),
            )),
            _ => {
                self.pending.lock().remove(&id);
                Err(LinkError::NoAnswer(self.node))
            }
        }
    }

    /// Forwards a message. Without `want_ack` (QoS 0) it is dropped when the link's
    /// queue is full (`Err`, counted by the caller). With `want_ack` it is the
    /// publisher's to wait for: the returned future waits for room in the queue if
    /// there is none (back-pressure, as for a local subscriber without room), then
    /// for the peer to say it stored the message (or for the link to close).
    pub fn publish(
        &self,
        shared: Vec<ShareKey>,
        message: Bytes,
        want_ack: bool,
    ) -> Result<Option<Wait>, LinkError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(LinkError::Unreachable(self.node));
        }
        if !want_ack {
            return match self.tx.try_send(Frame::Publish {
                ack: 0,
                shared,
                message,
            }) {
                Ok(()) => Ok(None),
                Err(_) => Err(LinkError::Full(self.node)),
            };
        }
        let id = self.next();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let frame = Frame::Publish {
            ack: id,
            shared,
            message,
        };
        match self.tx.try_send(frame) {
            Ok(()) => Ok(Some(Box::pin(async move {
                let _ = rx.await;
            }))),
            Err(mpsc::error::TrySendError::Full(frame)) => {
                let queue = self.tx.clone();
                Ok(Some(Box::pin(async move {
                    if queue.send(frame).await.is_ok() {
                        let _ = rx.await;
                    }
                })))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.pending.lock().remove(&id);
                Err(LinkError::Unreachable(self.node))
            }
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.pending.lock().clear();
    }
}

/// Every link of this node.
pub struct Links {
    me: NodeId,
    cluster: String,
    bind_ip: std::net::IpAddr,
    live: RwLock<HashMap<NodeId, Arc<Link>>>,
    /// Peers' cluster addresses (from the start-up list and the membership).
    addrs: RwLock<BTreeMap<NodeId, String>>,
    dialing: Mutex<std::collections::HashSet<NodeId>>,
    handler: std::sync::OnceLock<Arc<dyn Handler>>,
    /// Forwarded publishes that could not be queued (link down or full).
    pub dropped: AtomicU64,
    /// Told the id of each peer whose link went down.
    down: std::sync::OnceLock<mpsc::UnboundedSender<NodeId>>,
}

impl Links {
    /// Links of node `me` in `cluster`, dialing from `bind_ip`.
    pub fn new(me: NodeId, cluster: String, bind_ip: std::net::IpAddr) -> Arc<Links> {
        Arc::new(Links {
            me,
            cluster,
            bind_ip,
            live: RwLock::default(),
            addrs: RwLock::default(),
            dialing: Mutex::default(),
            handler: std::sync::OnceLock::new(),
            dropped: AtomicU64::new(0),
            down: std::sync::OnceLock::new(),
        })
    }

    /// Where to hear of links that went down (once).
    pub fn on_down(&self, tx: mpsc::UnboundedSender<NodeId>) {
        let _ = self.down.set(tx);
    }

    /// Sets what handles incoming traffic (once).
    pub fn set_handler(&self, handler: Arc<dyn Handler>) {
        let _ = self.handler.set(handler);
    }

    /// The live link to `node`.
    pub fn get(&self, node: NodeId) -> Option<Arc<Link>> {
        self.live.read().get(&node).cloned()
    }

    /// Nodes with a live link.
    pub fn up(&self) -> Vec<NodeId> {
        self.live.read().keys().copied().collect()
    }

    /// True when `node` has a live link.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.live.read().contains_key(&node)
    }

    /// Sends a request to `node` and waits for the answer.
    pub async fn request(
        &self,
        node: NodeId,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, LinkError> {
        let link = self.get(node).ok_or(LinkError::Unreachable(node))?;
        link.request(body, timeout).await
    }

    /// Learns `node`'s address; dials it if it is ours to dial (a higher id).
    pub fn know(self: &Arc<Self>, node: NodeId, addr: String) {
        if node == self.me {
            return;
        }
        self.addrs.write().insert(node, addr);
        if node > self.me && self.dialing.lock().insert(node) {
            tokio::spawn(self.clone().dial_loop(node));
        }
    }

    /// Forgets `node` (no longer a member): its link closes, nobody redials it.
    pub fn forget(&self, node: NodeId) {
        self.addrs.write().remove(&node);
        if let Some(link) = self.live.write().remove(&node) {
            link.close();
        }
    }

    /// Accepts peers on `listener` for as long as the node runs.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let links = self.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(
                            Duration::from_secs(2),
                            links.greet(stream, None),
                        )
                        .await
                        {
                            Ok(Ok((stream, node, rest))) => links.run(stream, node, rest).await,
                            Ok(Err(why)) => warn!(%peer, "cluster peer refused: {why}"),
                            Err(_) => warn!(%peer, "cluster peer refused: no hello in time"),
                        }
                    });
                }
                Err(e) => {
                    warn!("cluster listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn dial_loop(self: Arc<Self>, node: NodeId) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(addr) = self.addrs.read().get(&node).cloned() else {
                self.dialing.lock().remove(&node);
                return;
            };
            if !self.is_up(node) {
                match self.dial(node, &addr).await {
                    Ok((stream, rest)) => {
                        backoff = Duration::from_millis(50);
                        self.clone().run(stream, node, rest).await;
                        continue;
                    }
                    Err(why) => {
                        debug!(node, %addr, "cannot link to cluster peer: {why}");
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    async fn dial(
        self: &Arc<Self>,
        node: NodeId,
        addr: &str,
    ) -> Result<(TcpStream, BytesMut), String> {
        let target: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to nothing"))?;
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        // From this node's own address, so that per-address rules (and a reader of
        // `ss`) see which node a connection is.
        if target.is_ipv4() == self.bind_ip.is_ipv4() && !self.bind_ip.is_unspecified() {
            let _ = socket.bind(SocketAddr::new(self.bind_ip, 0));
        }
        let stream = tokio::time::timeout(Duration::from_secs(1), socket.connect(target))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (stream, _, rest) =
            tokio::time::timeout(Duration::from_secs(2), self.greet(stream, Some(node)))
                .await
                .map_err(|_| "no hello in time".to_string())??;
        Ok((stream, rest))
    }

    /// Exchanges hellos; `expect` is the node dialed. Returns the peer's id and what
    /// it sent after its hello.
    async fn greet(
        &self,
        mut stream: TcpStream,
        expect: Option<NodeId>,
    ) -> Result<(TcpStream, NodeId, BytesMut), String> {
        let _ = stream.set_nodelay(true);
        let mut out = BytesMut::new();
        Frame::Hello(Hello {
            cluster: self.cluster.clone(),
            node: self.me,
            version: VERSION,
        })
        .encode(&mut out);
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(256);
        let hello = loop {
            match Frame::decode(&mut buf) {
                Ok(Some(Frame::Hello(h))) => break h,
                Ok(Some(_)) => return Err("first frame is not a hello".into()),
                Ok(None) => {}
                Err(e) => return Err(format!("garbage instead of a hello: {e}")),
            }
            if buf.len() > 4096 {
                return Err("hello too long".into());
            }
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed during the hello".into());
            }
        };
        if hello.cluster != self.cluster {
            return Err(format!(
                "it is of cluster {:?}, this node of {:?}",
                hello.cluster, self.cluster
            ));
        }
        if hello.version != VERSION {
            return Err(format!(
                "protocol version {} (this node speaks {VERSION})",
                hello.version
            ));
        }
        if hello.node == self.me {
            return Err(format!("it claims this node's id {}", self.me));
        }
        if let Some(expect) = expect
            && hello.node != expect
        {
            return Err(format!("it is node {}, expected node {expect}", hello.node));
        }
        if self.is_up(hello.node) {
            return Err(format!("node id {} is already linked (taken)", hello.node));
        }
        Ok((stream, hello.node, buf))
    }

    /// Serves a link until it fails.
    async fn run(self: Arc<Self>, stream: TcpStream, node: NodeId, mut buf: BytesMut) {
        let (tx, mut rx) = mpsc::channel::<Frame>(QUEUE);
        let link = Arc::new(Link {
            node,
            tx,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        {
            let mut live = self.live.write();
            if live.contains_key(&node) {
                warn!(node, "cluster peer refused: node id already linked (taken)");
                return;
            }
            live.insert(node, link.clone());
        }
        info!(node, "cluster link up");
        let (mut reader, mut writer) = stream.into_split();
        let writing = tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(64 * 1024);
            loop {
                let frame = match tokio::time::timeout(PING_EVERY, rx.recv()).await {
                    Ok(Some(f)) => f,
                    Ok(None) => return,
                    Err(_) => Frame::Ping,
                };
                frame.encode(&mut out);
                while out.len() < 1 << 20
                    && let Ok(f) = rx.try_recv()
                {
                    f.encode(&mut out);
                }
                if writer.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        });
        buf.reserve(64 * 1024);
        let why = 'read: loop {
            loop {
                match Frame::decode(&mut buf) {
                    Ok(Some(frame)) => self.dispatch(&link, frame),
                    Ok(None) => break,
                    Err(e) => break 'read format!("protocol error: {e}"),
                }
            }
            match tokio::time::timeout(DEAD_AFTER, reader.read_buf(&mut buf)).await {
                Ok(Ok(0)) => break "closed by the peer".to_string(),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => break format!("read error: {e}"),
                Err(_) => break "silent for too long".to_string(),
            }
        };
        writing.abort();
        link.close();
        {
            let mut live = self.live.write();
            if live.get(&node).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                live.remove(&node);
            }
        }
        info!(node, "cluster link down: {why}");
        if let Some(tx) = self.down.get() {
            let _ = tx.send(node);
        }
    }

    fn dispatch(&self, link: &Arc<Link>, frame: Frame) {
        // (Read per frame: a link may come up while the node is still starting.)
        let handler = self.handler.get();
        match frame {
            Frame::Request { id, body } => {
                let Some(handler) = handler.cloned() else {
                    return;
                };
                let link = link.clone();
                tokio::spawn(async move {
                    let (ok, body) = match handler.request(link.node, body).await {
                        Ok(body) => (true, body),
                        Err(e) => (false, Bytes::from(e)),
                    };
                    link.send(Frame::Response { id, ok, body });
                });
            }
            Frame::Response { id, ok, body } => {
                if let Some(tx) = link.pending.lock().remove(&id) {
                    let _ = tx.send(Reply::Response { ok, body });
                }
            }
            Frame::Publish {
                ack,
                shared,
                message,
            } => {
                if let Some(handler) = handler.cloned() {
                    handler.publish(link.clone(), ack, shared, message);
                }
            }
            Frame::Acked { id } => {
                if let Some(tx) = link.pending.lock().remove(&id) {
                    let _ = tx.send(Reply::Acked);
                }
            }
            Frame::Hello(_) | Frame::Ping => {}
        }
    }
}
