//! The HTTP admin listener: `/health`, `/ready`, Prometheus `/metrics`, and the JSON
//! API under `/api/v1` (queues, clients, sessions).
//!
//! A deliberately small HTTP/1.1 server on tokio rather than a framework: the API is a
//! dozen routes used by operators and scrapers, so one request per connection
//! (`Connection: close`) is plenty, and hand-rolling keeps every limit visible here:
//! the request head is at most [`MAX_HEAD`] bytes, the body at most [`MAX_BODY`]
//! (`Content-Length` only; chunked bodies are refused), the whole request must arrive
//! within [`REQUEST_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once.
//! Header lines are parsed with `httparse` (already in the build through the WebSocket
//! handshake).
//!
//! With `admin_token` set, every route but `/health` and `/ready` needs
//! `Authorization: Bearer <token>` (401 otherwise): the API deletes queues and
//! disconnects clients, and `/metrics` names them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use roost_queue::{GroupKey, QueueConfig, QueueError, QueueInfo, Redrive, ResetTo};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use roost_engine::broker::Broker;
use roost_engine::metrics::{AuthFailure, DisconnectReason, DropReason, Limit, StoreRefusal};
use roost_storage::latency::{LatencySnapshot, SyncLatency};

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Time a client has to send its whole request (and to take the response).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
const MAX_HEADERS: usize = 64;

/// What the admin API serves: the broker, and the settings of the API itself.
pub struct Api {
    /// The broker it reports on and acts on.
    pub broker: Arc<Broker>,
    /// The session store's fdatasync durations (the broker holds the store only as
    /// the engine's `SessionStore`, which knows nothing of them). The queue logs' are
    /// reached through the broker's queues.
    pub state_syncs: Arc<SyncLatency>,
    /// Worker stalls of the runtime (`roost_event_loop_stalls_total`).
    pub stalls: Arc<super::stalls::StallDetector>,
    /// `admin_token`: the bearer token required on everything but `/health`, `/ready`.
    pub token: Option<String>,
    /// `queue_defaults`: the settings a queue created by `PUT` starts from.
    pub queue_defaults: QueueConfig,
    /// Session-store directories moved aside as damaged at this start (0 or 1).
    pub state_quarantined: u64,
    /// This node's cluster, when it is part of one.
    pub cluster: Option<Arc<roost_cluster::Cluster>>,
    /// The bridges, for `/api/v1/bridges` and their metrics.
    pub bridges: crate::bridge::Bridges,
}

/// Serves admin requests on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, api: Arc<Api>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        debug!(%peer, "admin connection refused: too many");
                        continue;
                    };
                    let api = api.clone();
                    requests.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        serve_one(&api, stream).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    requests.shutdown().await;
}

/// Reads one request, answers it, closes.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(api: &Api, mut stream: S) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(request)) => handle(api, &request).await,
        Ok(Err(ReadError::Http(response))) => response,
        Ok(Err(ReadError::Closed)) => return,
        Err(_) => Response::error(408, "request not received in time"),
    };
    let bytes = response.encode();
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path without the query string, still percent-encoded.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// A request head: the request without its body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    request: Request,
    content_length: usize,
    /// Bytes of the buffer the head used.
    len: usize,
}

enum ReadError {
    /// Answer with this and close.
    Http(Response),
    /// The client went away (or sent nothing).
    Closed,
}

async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let head = loop {
        if let Some(head) = parse_head(&buf).map_err(ReadError::Http)? {
            break head;
        }
        if buf.len() >= MAX_HEAD {
            return Err(ReadError::Http(Response::error(
                431,
                "request head over 16 KiB",
            )));
        }
        let mut chunk = [0u8; 4096];
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut request = head.request;
    let mut body = buf.split_off(head.len);
    if body.len() > head.content_length {
        body.truncate(head.content_length);
    }
    body.reserve(head.content_length - body.len());
    while body.len() < head.content_length {
        let mut chunk = [0u8; 8192];
        let room = (head.content_length - body.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    request.body = body;
    Ok(request)
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete,
/// `Err` with the response to give for a bad or unsupported one.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Response::error(431, "too many headers"));
        }
        Err(e) => return Err(Response::error(400, &format!("bad request: {e}"))),
    };
    if len > MAX_HEAD {
        return Err(Response::error(431, "request head over 16 KiB"));
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(Response::error(400, "bad request line"));
    };
    let mut content_length = 0usize;
    let mut authorization = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Response::error(400, "bad Content-Length"))?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(411, "send the body with a Content-Length"));
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(String::from_utf8_lossy(h.value).into_owned());
        }
    }
    if content_length > MAX_BODY {
        return Err(Response::error(413, "request body over 1 MiB"));
    }
    let path = target.split(['?', '#']).next().unwrap_or("").to_owned();
    Ok(Some(Head {
        request: Request {
            method: method.to_owned(),
            path,
            authorization,
            body: Vec::new(),
        },
        content_length,
        len,
    }))
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// Extra header lines (`Name: value`).
    pub headers: Vec<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: &Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    fn error(status: u16, message: &str) -> Response {
        Response::json(status, &json!({ "error": message }))
    }

    fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for h in &self.headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    Ready,
    Metrics,
    Queues,
    Queue(String),
    Purge(String),
    Redrive(String),
    Reset(String, String),
    Clients,
    Client(String),
    Sessions,
    Cluster,
    Members,
    Member(String),
    Bridges,
    Dashboard(super::dashboard::Asset),
}

impl Route {
    /// The route of `path`, with its segments percent-decoded; `None`: 404.
    fn parse(path: &str) -> Option<Route> {
        if let Some(asset) = super::dashboard::asset(path) {
            return Some(Route::Dashboard(asset));
        }
        let segments: Vec<String> = path
            .strip_prefix('/')?
            .split('/')
            .map(percent_decode)
            .collect::<Option<_>>()?;
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        Some(match s.as_slice() {
            ["health"] => Route::Health,
            ["ready"] => Route::Ready,
            ["metrics"] => Route::Metrics,
            ["api", "v1", "queues"] => Route::Queues,
            ["api", "v1", "queues", q] if !q.is_empty() => Route::Queue((*q).to_owned()),
            ["api", "v1", "queues", q, "purge"] => Route::Purge((*q).to_owned()),
            ["api", "v1", "queues", q, "dlq", "redrive"] => Route::Redrive((*q).to_owned()),
            ["api", "v1", "queues", q, "groups", g, "reset"] if !g.is_empty() => {
                Route::Reset((*q).to_owned(), (*g).to_owned())
            }
            ["api", "v1", "clients"] => Route::Clients,
            ["api", "v1", "bridges"] => Route::Bridges,
            ["api", "v1", "clients", c] if !c.is_empty() => Route::Client((*c).to_owned()),
            ["api", "v1", "sessions"] => Route::Sessions,
            ["api", "v1", "cluster"] => Route::Cluster,
            ["api", "v1", "cluster", "members"] => Route::Members,
            ["api", "v1", "cluster", "members", id] if !id.is_empty() => {
                Route::Member((*id).to_owned())
            }
            _ => return None,
        })
    }

    /// The methods the route answers.
    fn allows(&self) -> &'static [&'static str] {
        match self {
            Route::Health
            | Route::Ready
            | Route::Metrics
            | Route::Queues
            | Route::Clients
            | Route::Sessions
            | Route::Bridges
            | Route::Dashboard(_)
            | Route::Cluster => &["GET"],
            Route::Members => &["POST"],
            Route::Member(_) => &["DELETE"],
            Route::Queue(_) => &["GET", "PUT", "DELETE"],
            Route::Purge(_) | Route::Redrive(_) | Route::Reset(..) => &["POST"],
            Route::Client(_) => &["DELETE"],
        }
    }

    fn public(&self) -> bool {
        matches!(self, Route::Health | Route::Ready | Route::Dashboard(_))
    }
}

/// `%XX` sequences decoded; `None` for a bad escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Compares the `Authorization` header with `Bearer <token>` in time independent of
/// where they differ.
fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers one request.
async fn handle(api: &Api, request: &Request) -> Response {
    let broker = &*api.broker;
    let Some(route) = Route::parse(&request.path) else {
        return Response::error(404, "no such endpoint");
    };
    if let Some(token) = &api.token
        && !route.public()
        && !bearer_matches(request.authorization.as_deref(), token)
    {
        let mut r = Response::error(401, "missing or wrong bearer token");
        r.headers.push("WWW-Authenticate: Bearer".into());
        return r;
    }
    let allowed = route.allows();
    if !allowed.contains(&request.method.as_str()) {
        let mut r = Response::error(405, "method not allowed");
        r.headers.push(format!("Allow: {}", allowed.join(", ")));
        return r;
    }
    let body = &request.body;
    match (request.method.as_str(), route) {
        (_, Route::Health) => Response::json(200, &json!({ "status": "ok" })),
        (_, Route::Ready) => ready(broker),
        (_, Route::Metrics) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            headers: Vec::new(),
            body: {
                let mut text =
                    render_metrics(broker, &api.state_syncs, &api.stalls, api.state_quarantined);
                if let Some(c) = &api.cluster {
                    text.push_str(&render_cluster_metrics(c));
                }
                api.bridges.render_metrics(&mut text);
                text.into_bytes()
            },
        },
        (_, Route::Dashboard(asset)) => Response {
            status: 200,
            content_type: asset.content_type,
            headers: vec!["Cache-Control: no-cache".into()],
            body: asset.body.to_vec(),
        },
        (_, Route::Bridges) => {
            let list = api.bridges.list().iter().map(|b| b.to_json()).collect();
            Response::json(200, &Value::Array(list))
        }
        (_, Route::Queues) => {
            let list: Vec<Value> = broker.queues.list().iter().map(queue_json).collect();
            Response::json(200, &Value::Array(list))
        }
        ("GET", Route::Queue(name)) => match broker.queues.get(&name) {
            Some(q) => {
                let mut v = queue_json(&q.info());
                let placement = match api.cluster.as_ref() {
                    Some(c) => c.node.replicas.placement(&name).await,
                    None => None,
                };
                if let (Some(p), Some(obj)) = (placement, v.as_object_mut()) {
                    obj.insert("placement".into(), json!(p));
                }
                Response::json(200, &v)
            }
            None => not_found(&name),
        },
        ("PUT", Route::Queue(name)) => put_queue(broker, &api.queue_defaults, &name, body),
        ("DELETE", Route::Queue(name)) => match broker.queues.delete(&name) {
            Ok(()) => Response::json(200, &json!({ "deleted": name })),
            Err(e) => queue_error(&e),
        },
        (_, Route::Purge(name)) => match broker.queues.purge(&name).await {
            Ok(()) => match broker.queues.get(&name) {
                Some(q) => Response::json(200, &queue_json(&q.info())),
                None => not_found(&name),
            },
            Err(e) => queue_error(&e),
        },
        (_, Route::Redrive(name)) => {
            let Some(queue) = broker.queues.get(&name) else {
                return not_found(&name);
            };
            let which = match parse_redrive(body) {
                Ok(w) => w,
                Err(why) => return Response::error(400, &why),
            };
            match queue.redrive(which).await {
                Ok(r) => Response::json(
                    200,
                    &json!({
                        "queue": name,
                        "redriven": r.moved.len(),
                        "moved": r.moved.iter().map(|(from, to)| json!({
                            "from": from.to_string(),
                            "to": to.to_string(),
                        })).collect::<Vec<_>>(),
                        "missing": r.missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "stopped": r.stopped,
                        "dead_letters": queue.info().dead_letters,
                    }),
                ),
                Err(e) => queue_error(&e),
            }
        }
        (_, Route::Reset(name, group)) => {
            let Some(queue) = broker.queues.get(&name) else {
                return not_found(&name);
            };
            let (to, filter) = match parse_reset(body) {
                Ok(r) => r,
                Err(why) => return Response::error(400, &why),
            };
            let key = GroupKey::new(&group, filter.as_deref());
            match queue.reset(&key, to).await {
                Ok(()) => Response::json(200, &queue_json(&queue.info())),
                Err(e) => queue_error(&e),
            }
        }
        (_, Route::Clients) => {
            let clients: Vec<Value> = broker
                .sessions()
                .into_iter()
                .filter_map(|s| {
                    let c = s.connection?;
                    Some(json!({
                        "client_id": &*s.client_id,
                        "online": true,
                        "peer": c.peer.to_string(),
                        "protocol": protocol_name(c.protocol),
                        "username": c.username,
                        "connected_at_ms": c.connected_at_ms,
                    }))
                })
                .collect();
            Response::json(200, &Value::Array(clients))
        }
        (_, Route::Client(id)) => {
            if broker.kick(&id) {
                Response::json(200, &json!({ "disconnected": id }))
            } else {
                Response::error(404, &format!("no connected client {id:?}"))
            }
        }
        (_, Route::Sessions) => {
            let sessions: Vec<Value> = broker
                .sessions()
                .into_iter()
                .map(|s| {
                    json!({
                        "client_id": &*s.client_id,
                        "online": s.connection.is_some(),
                        "subscriptions": s.subscriptions,
                        "queued_messages": s.queued,
                    })
                })
                .collect();
            Response::json(200, &Value::Array(sessions))
        }
        (_, Route::Cluster) => match &api.cluster {
            Some(c) => Response::json(200, &cluster_json(&c.node.status())),
            None => Response::error(404, "this node is not part of a cluster"),
        },
        (_, Route::Members) => {
            let change =
                parse_member(body).map(|(id, addr)| roost_cluster::MemberChange::Add { id, addr });
            change_members(api, change).await
        }
        (_, Route::Member(id)) => {
            let change = id
                .parse::<u64>()
                .ok()
                .filter(|&i| i >= 1)
                .map(|id| roost_cluster::MemberChange::Remove { id })
                .ok_or_else(|| "a member id is a number >= 1".to_owned());
            change_members(api, change).await
        }
        _ => Response::error(405, "method not allowed"),
    }
}

/// Adds or removes a member (`change`, or why the request names none): 404 off a
/// cluster, 400 for a bad request, 503 when the control plane cannot commit it.
async fn change_members(
    api: &Api,
    change: Result<roost_cluster::MemberChange, String>,
) -> Response {
    let Some(c) = &api.cluster else {
        return Response::error(404, "this node is not part of a cluster");
    };
    let change = match change {
        Ok(change) => change,
        Err(why) => return Response::error(400, &why),
    };
    let what = match &change {
        roost_cluster::MemberChange::Add { id, .. } => format!("member {id} not added"),
        roost_cluster::MemberChange::Remove { id } => format!("member {id} not removed"),
    };
    match c.change_members(change).await {
        Ok(()) => Response::json(200, &cluster_json(&c.node.status())),
        Err(e) => Response::error(503, &format!("{what}: {e}")),
    }
}

/// The cluster's lines of `/metrics`.
fn render_cluster_metrics(c: &roost_cluster::Cluster) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let n = &c.node.counters;
    let status = c.node.status();
    let up = status.members.iter().filter(|m| m.up).count();
    let mut out = String::new();
    for (name, help, kind, value) in [
        (
            "roost_cluster_members",
            "Members of the cluster.",
            "gauge",
            status.members.len() as u64,
        ),
        (
            "roost_cluster_members_up",
            "Members this node has a live link to (itself included).",
            "gauge",
            up as u64,
        ),
        (
            "roost_cluster_leader",
            "The control plane's leader as this node knows it (0: none).",
            "gauge",
            status.leader.unwrap_or(0),
        ),
        (
            "roost_cluster_forwarded_total",
            "Messages sent to another node (once per node).",
            "counter",
            n.forwarded.load(Relaxed),
        ),
        (
            "roost_cluster_received_total",
            "Messages received from another node.",
            "counter",
            n.received.load(Relaxed),
        ),
        (
            "roost_cluster_forward_dropped_total",
            "Messages for another node that its link could not take (down or full).",
            "counter",
            c.node.forward_dropped(),
        ),
        (
            "roost_cluster_sessions_moved_in_total",
            "Sessions that moved here from another node.",
            "counter",
            n.sessions_in.load(Relaxed),
        ),
        (
            "roost_cluster_sessions_moved_out_total",
            "Sessions that moved from here to another node.",
            "counter",
            n.sessions_out.load(Relaxed),
        ),
        (
            "roost_cluster_claims_refused_total",
            "CONNECTs refused because no majority could be reached.",
            "counter",
            n.claims_refused.load(Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    let name = "roost_cluster_partition_fsync_seconds";
    out.push_str(&format!(
        "# HELP {name} Duration of fdatasync calls of the replicated partitions' Raft logs (one per commit round of all partitions).\n# TYPE {name} histogram\n"
    ));
    render_histogram(
        name,
        "store=\"partitions\"",
        &c.node.replicas.sync_latency().snapshot(),
        &mut out,
    );
    out
}

fn cluster_json(status: &roost_cluster::Status) -> Value {
    serde_json::to_value(status).unwrap_or(Value::Null)
}

/// The body of `POST /api/v1/cluster/members`: `{"id": N, "cluster_addr": "HOST:PORT"}`.
fn parse_member(body: &[u8]) -> Result<(u64, String), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .filter(|&i| i >= 1)
        .ok_or("\"id\" must be a number >= 1")?;
    let addr = v
        .get("cluster_addr")
        .and_then(Value::as_str)
        .filter(|a| a.contains(':'))
        .ok_or("\"cluster_addr\" must be \"HOST:PORT\"")?;
    Ok((id, addr.to_owned()))
}

fn not_found(name: &str) -> Response {
    Response::error(404, &format!("no queue named {name:?}"))
}

fn queue_error(e: &QueueError) -> Response {
    let status = match e {
        QueueError::NotFound(_) | QueueError::Deleted(_) => 404,
        QueueError::InvalidName(_)
        | QueueError::InvalidConfig(_)
        | QueueError::InvalidFilter(_) => 400,
        // The broker's state refuses it: the queue exists, or `max_queues` is reached.
        QueueError::AlreadyExists(_)
        | QueueError::TooManyQueues { .. }
        | QueueError::TooManyGroups { .. } => 409,
        _ => 500,
    };
    Response::error(status, &e.to_string())
}

/// 200 while the stores take writes; 503 naming what failed.
fn ready(broker: &Broker) -> Response {
    let mut reasons = Vec::new();
    if broker.store().is_failed() {
        reasons.push("session store write failed; it is read-only".to_owned());
    }
    if let Some(why) = broker.store().room().shortage() {
        reasons.push(format!("session store refuses new state: {why}"));
    }
    for (log, e) in broker.queues.storage().failed_logs() {
        reasons.push(format!("queue log {log} failed: {e}"));
    }
    if let Some(why) = broker.queues.storage().space_shortage() {
        reasons.push(format!("queue storage refuses writes: {why}"));
    }
    if reasons.is_empty() {
        Response::json(200, &json!({ "status": "ready" }))
    } else {
        Response::json(503, &json!({ "status": "not ready", "reasons": reasons }))
    }
}

/// Creates queue `name`, or changes its settings: the body's keys (a JSON object of
/// queue settings, possibly empty) apply over the queue's current settings, or over
/// `queue_defaults` for a new queue.
fn put_queue(broker: &Broker, defaults: &QueueConfig, name: &str, body: &[u8]) -> Response {
    let existing = broker.queues.get(name);
    let base = existing
        .as_ref()
        .map_or_else(|| defaults.clone(), |q| q.config());
    let config = match merge_config(&base, body) {
        Ok(c) => c,
        Err(why) => return Response::error(400, &why),
    };
    let (result, status) = match existing {
        Some(_) => (broker.queues.update(name, config), 200),
        None => (broker.queues.create(name, config), 201),
    };
    match result {
        Ok(q) => Response::json(status, &queue_json(&q.info())),
        Err(e) => queue_error(&e),
    }
}

/// `base` with the keys of the JSON object `body` replaced.
fn merge_config(base: &QueueConfig, body: &[u8]) -> Result<QueueConfig, String> {
    let mut merged = serde_json::to_value(base).map_err(|e| e.to_string())?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let patch: Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let (Value::Object(patch), Value::Object(target)) = (patch, &mut merged) else {
            return Err("body must be a JSON object of queue settings".into());
        };
        target.extend(patch);
    }
    serde_json::from_value(merged).map_err(|e| format!("bad queue settings: {e}"))
}

/// The body of a group reset: `{"to": "earliest"|"latest"}`, `{"offset": N}` (with
/// `"partition": P` for one partition) or `{"timestamp_ms": T}`, each with an optional
/// `"filter"` (the group's subtopic filter).
fn parse_reset(body: &[u8]) -> Result<(ResetTo, Option<String>), String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        to: Option<String>,
        offset: Option<u64>,
        partition: Option<u32>,
        timestamp_ms: Option<u64>,
        filter: Option<String>,
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| format!("bad reset body: {e}"))?;
    let to = match (b.to.as_deref(), b.offset, b.timestamp_ms, b.partition) {
        (Some("earliest"), None, None, None) => ResetTo::Earliest,
        (Some("latest"), None, None, None) => ResetTo::Latest,
        (Some(other), None, None, None) => {
            return Err(format!("\"to\": {other:?} is not earliest or latest"));
        }
        (None, Some(offset), None, None) => ResetTo::Offset(offset),
        (None, Some(offset), None, Some(partition)) => {
            ResetTo::PartitionOffset { partition, offset }
        }
        (None, None, Some(t), None) => ResetTo::Timestamp(t),
        _ => {
            return Err(
                "give exactly one of \"to\" (earliest|latest), \"offset\" (with an optional \"partition\") or \"timestamp_ms\"".into(),
            );
        }
    };
    Ok((to, b.filter))
}

/// The body of a redrive: empty or `{}` for every dead letter, `{"count": n}` for the
/// oldest n, `{"message_ids": [...]}` for those (as the dead-letter queue delivers them).
fn parse_redrive(body: &[u8]) -> Result<Redrive, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        count: Option<u64>,
        message_ids: Option<Vec<String>>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Redrive::All);
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| format!("bad redrive body: {e}"))?;
    match (b.count, b.message_ids) {
        (None, None) => Ok(Redrive::All),
        (Some(n), None) => Ok(Redrive::Count(n)),
        (None, Some(ids)) => ids
            .iter()
            .map(|i| {
                i.parse()
                    .map_err(|e: roost_queue::InvalidMessageId| e.to_string())
            })
            .collect::<Result<_, _>>()
            .map(Redrive::Ids),
        (Some(_), Some(_)) => Err("give \"count\" or \"message_ids\", not both".into()),
    }
}

fn protocol_name(v: roost_core::ProtocolVersion) -> &'static str {
    match v {
        roost_core::ProtocolVersion::V3_1 => "3.1",
        roost_core::ProtocolVersion::V3_1_1 => "3.1.1",
        roost_core::ProtocolVersion::V5 => "5.0",
    }
}

fn queue_json(info: &QueueInfo) -> Value {
    let groups: Vec<Value> = info
        .groups
        .iter()
        .map(|g| {
            json!({
                "group": &*g.key.group,
                "filter": g.key.filter.as_deref(),
                "members": g.members.iter().map(|m| &**m).collect::<Vec<_>>(),
                "windows": g.members.iter().zip(&g.windows)
                    .map(|(m, w)| (m.to_string(), json!(w)))
                    .collect::<serde_json::Map<_, _>>(),
                "lag": g.lag,
                "in_flight": g.in_flight,
                "waiting": g.waiting,
                "delayed": g.delayed,
            })
        })
        .collect();
    json!({
        "name": info.name,
        "depth": info.depth,
        "bytes": info.bytes,
        "dead_letters": info.dead_letters,
        "groups": groups,
        "config": info.config,
        "damage": info.damage.iter().map(|d| json!({
            "partition": d.partition,
            "log": if d.partition.is_some() { "partition" } else { "group progress" },
            "lost_offsets": d.lost.iter().map(|r| json!({"from": r.start, "to": r.end})).collect::<Vec<_>>(),
            "lost": d.lost.iter().map(|r| r.end - r.start).sum::<u64>(),
            "quarantined": d.quarantined.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The Prometheus text exposition of the broker's gauges and counters, and of the
/// fdatasync durations of the session store (`state_syncs`) and of the queue logs.
fn render_metrics(
    broker: &Broker,
    state_syncs: &SyncLatency,
    stalls: &super::stalls::StallDetector,
    state_quarantined: u64,
) -> String {
    let m = &broker.metrics;
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, value: usize| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "roost_connections",
        "Open client connections.",
        broker.connection_count(),
    );
    gauge(
        "roost_sessions",
        "Sessions, connected and stored.",
        broker.session_count(),
    );
    gauge(
        "roost_subscriptions",
        "Subscriptions in the router.",
        broker.subscription_count(),
    );
    gauge(
        "roost_retained_messages",
        "Retained messages.",
        broker.retained_count(),
    );
    gauge(
        "roost_retained_bytes",
        "Bytes of retained messages, as max_retained_bytes counts them.",
        usize::try_from(broker.retained_bytes()).unwrap_or(usize::MAX),
    );
    gauge(
        "roost_queued_bytes",
        "Bytes of QoS 1/2 messages in all session queues, as max_total_queued_bytes counts them.",
        usize::try_from(broker.limits.queued.held()).unwrap_or(usize::MAX),
    );
    gauge(
        "roost_offline_timers",
        "Offline sessions with a delayed will or an expiry scheduled.",
        broker.offline_timer_count(),
    );
    gauge(
        "roost_tasks",
        "Tasks alive in the broker's runtime (one per connection, plus a fixed few).",
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    );
    for (name, help, values) in [
        (
            "roost_messages_received_total",
            "PUBLISH packets received from clients.",
            m.received_by_qos(),
        ),
        (
            "roost_messages_sent_total",
            "PUBLISH packets sent to clients (resends not counted).",
            m.sent_by_qos(),
        ),
        (
            "roost_publish_bytes_received_total",
            "PUBLISH payload bytes received from clients.",
            m.received_bytes_by_qos(),
        ),
        (
            "roost_publish_bytes_sent_total",
            "PUBLISH payload bytes sent to clients (resends not counted).",
            m.sent_bytes_by_qos(),
        ),
    ] {
        counter_family(&mut out, name, help, "qos", (0..).zip(values));
    }
    counter_family(
        &mut out,
        "roost_messages_dropped_total",
        "Messages dropped for a subscriber, by reason.",
        "reason",
        DropReason::ALL.map(|r| (r.label(), m.dropped_for(r))),
    );
    counter_family(
        &mut out,
        "roost_session_store_refusals_total",
        "What roost refused because the session store was short of disk space, by what.",
        "what",
        StoreRefusal::ALL.map(|r| (r.label(), m.store_refusals(r))),
    );
    let (network_in, network_out) = m.network_bytes();
    for (name, help, value) in [
        (
            "roost_bytes_received_total",
            "Bytes read from client connections (MQTT bytes, inside TLS/WebSocket).",
            network_in,
        ),
        (
            "roost_bytes_sent_total",
            "Bytes written to client connections (MQTT bytes, inside TLS/WebSocket).",
            network_out,
        ),
        (
            "roost_connections_accepted_total",
            "Connections admitted past the connection limits.",
            m.connections_accepted(),
        ),
        (
            "roost_event_loop_stalls_total",
            "Task polls that held a worker thread over 50 ms (the longest is logged).",
            stalls.stalls(),
        ),
        (
            "roost_session_store_refused_rounds_total",
            "Rounds of session-store writes refused whole for lack of disk space (their connections closed unacknowledged).",
            broker.store().room().refusals(),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    counter_family(
        &mut out,
        "roost_disconnects_total",
        "Client connections ended (after CONNACK), by why.",
        "reason",
        DisconnectReason::ALL.map(|why| (why.label(), m.disconnects(why))),
    );
    counter_family(
        &mut out,
        "roost_auth_failures_total",
        "Clients refused at authentication, by reason.",
        "reason",
        AuthFailure::ALL.map(|why| (why.label(), m.auth_failures(why))),
    );
    counter_family(
        &mut out,
        "roost_limit_trips_total",
        "Times an overload limit refused, throttled or disconnected a client, by config key.",
        "limit",
        Limit::ALL.map(|limit| (limit.label(), m.limit_trips(limit))),
    );
    let name = "roost_storage_quarantined_total";
    let _ = writeln!(
        out,
        "# HELP {name} Damaged store files moved or copied aside into a quarantine directory (queue segments and journal files, at startup or found while reading; session store journal files, or the whole session store, at startup).\n# TYPE {name} counter\n{name} {}",
        broker.queues.storage().quarantined_total() + state_quarantined
    );
    let name = "roost_storage_fsync_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Duration of fdatasync calls: the session store (state) and the queue logs (queues).\n# TYPE {name} histogram"
    );
    for (store, latency) in [
        ("state", state_syncs),
        ("queues", broker.queues.storage().sync_latency()),
    ] {
        render_histogram(
            name,
            &format!("store=\"{store}\""),
            &latency.snapshot(),
            &mut out,
        );
    }
    render_queue_metrics(&broker.queues.list(), &mut out);
    out
}

/// A counter family with one label: its HELP and TYPE lines, then one sample per
/// label value.
fn counter_family<L: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, n) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// One labelled series of a Prometheus histogram.
fn render_histogram(name: &str, labels: &str, h: &LatencySnapshot, out: &mut String) {
    for (bound, count) in &h.buckets {
        let le = if bound.is_infinite() {
            "+Inf".to_string()
        } else {
            bound.to_string()
        };
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count());
}

/// A metric family: name, help text, and how to read its value.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

fn render_queue_metrics(queues: &[QueueInfo], out: &mut String) {
    let per_queue: [Family<QueueInfo>; 3] = [
        (
            "roost_queue_depth",
            "Messages counted against max_depth.",
            |q| q.depth,
        ),
        ("roost_queue_bytes", "Bytes the queue's logs hold.", |q| {
            q.bytes
        }),
        (
            "roost_queue_dead_letters",
            "Messages in the queue's dead-letter queue.",
            |q| q.dead_letters,
        ),
    ];
    for (name, help, value) in per_queue {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for q in queues {
            let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", escape(&q.name), value(q));
        }
    }
    let per_group: [Family<roost_queue::GroupInfo>; 2] = [
        (
            "roost_queue_lag",
            "Messages a consumer group has not settled yet.",
            |g| g.lag,
        ),
        (
            "roost_queue_inflight",
            "Messages in flight to a consumer group's members.",
            |g| g.in_flight,
        ),
    ];
    for (name, help, value) in per_group {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for q in queues {
            for g in &q.groups {
                let _ = writeln!(
                    out,
                    "{name}{{queue=\"{}\",group=\"{}\",filter=\"{}\"}} {}",
                    escape(&q.name),
                    escape(&g.key.group),
                    escape(g.key.filter.as_deref().unwrap_or("")),
                    value(g)
                );
            }
        }
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Response> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn parses_a_complete_head() {
        let h = head("PUT /api/v1/queues/x?pretty=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nAuthorization: Bearer t\r\n\r\n{\"partitions\"")
            .expect("valid")
            .expect("complete");
        assert_eq!(h.request.method, "PUT");
        assert_eq!(h.request.path, "/api/v1/queues/x");
        assert_eq!(h.request.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(h.content_length, 12);
        assert_eq!(&"PUT /api/v1/queues/x?pretty=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nAuthorization: Bearer t\r\n\r\n".len(), &h.len);
    }

    #[test]
    fn incomplete_and_bad_heads() {
        assert_eq!(head("GET /health HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(head(""), Ok(None));
        let status = |t: &str| head(t).expect_err(t).status;
        assert_eq!(
            status("GET /health HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            400
        );
        assert_eq!(status("GARBAGE\0 / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status("PUT /x HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
            413
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    #[tokio::test]
    async fn reads_body_and_refuses_oversized_heads() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"POST /api/v1/queues/q/purge HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
            .await
            .expect("write");
        let Ok(r) = read_request(&mut server).await else {
            panic!("request");
        };
        assert_eq!(r.body, b"body");
        assert_eq!(r.method, "POST");

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        client.write_all(big.as_bytes()).await.expect("write");
        match read_request(&mut server).await {
            Err(ReadError::Http(r)) => assert_eq!(r.status, 431),
            _ => panic!("oversized head accepted"),
        }
    }

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/health"), Some(Route::Health));
        assert!(matches!(Route::parse("/"), Some(Route::Dashboard(_))));
        assert!(Route::parse("/").is_some_and(|r| r.public()));
        assert_eq!(Route::parse("/api/v1/bridges"), Some(Route::Bridges));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::parse("/api/v1/queues"), Some(Route::Queues));
        assert_eq!(
            Route::parse("/api/v1/queues/orders"),
            Some(Route::Queue("orders".into()))
        );
        assert_eq!(
            Route::parse("/api/v1/queues/orders/purge"),
            Some(Route::Purge("orders".into()))
        );
        assert_eq!(
            Route::parse("/api/v1/queues/orders/dlq/redrive"),
            Some(Route::Redrive("orders".into()))
        );
        assert_eq!(parse_redrive(b""), Ok(Redrive::All));
        assert_eq!(parse_redrive(b"{\"count\": 3}"), Ok(Redrive::Count(3)));
        assert!(matches!(
            parse_redrive(b"{\"message_ids\": [\"q$dlq:0:4\"]}"),
            Ok(Redrive::Ids(ids)) if ids.len() == 1 && ids[0].offset == 4
        ));
        for bad in [
            &b"{\"count\": -1}"[..],
            b"{\"message_ids\": [\"x\"]}",
            b"{\"cnt\": 1}",
            b"[",
            b"{\"count\": 1, \"message_ids\": []}",
        ] {
            assert!(
                parse_redrive(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            Route::parse("/api/v1/queues/orders/groups/billing%2Feu/reset"),
            Some(Route::Reset("orders".into(), "billing/eu".into()))
        );
        assert_eq!(
            Route::parse("/api/v1/clients/dev%201"),
            Some(Route::Client("dev 1".into()))
        );
        assert_eq!(Route::parse("/api/v1/sessions"), Some(Route::Sessions));
        // "/" is the dashboard now.
        for bad in [
            "",
            "/api/v1/queues/",
            "/api/v2/queues",
            "/api/v1/clients/%zz",
            "/healthz",
        ] {
            assert_eq!(Route::parse(bad), None, "{bad}");
        }
        assert!(Route::Health.public() && Route::Ready.public() && !Route::Metrics.public());
        assert_eq!(Route::Queue("q".into()).allows(), &["GET", "PUT", "DELETE"]);
    }

    #[test]
    fn bearer_token() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(Some("bearer  s3cret "), "s3cret"));
        assert!(!bearer_matches(Some("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(Some("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(Some("s3cret"), "s3cret"));
        assert!(!bearer_matches(None, "s3cret"));
    }

    #[test]
    fn reset_bodies() {
        let ok = |b: &str| parse_reset(b.as_bytes()).expect(b);
        assert_eq!(ok(r#"{"to":"earliest"}"#), (ResetTo::Earliest, None));
        assert_eq!(
            ok(r#"{"to":"latest","filter":"eu/#"}"#),
            (ResetTo::Latest, Some("eu/#".into()))
        );
        assert_eq!(ok(r#"{"offset":5}"#).0, ResetTo::Offset(5));
        assert_eq!(
            ok(r#"{"offset":5,"partition":2}"#).0,
            ResetTo::PartitionOffset {
                partition: 2,
                offset: 5
            }
        );
        assert_eq!(ok(r#"{"timestamp_ms":17}"#).0, ResetTo::Timestamp(17));
        for bad in [
            "",
            "{}",
            r#"{"to":"middle"}"#,
            r#"{"to":"earliest","offset":1}"#,
            r#"{"offset":-1}"#,
            r#"{"partition":1}"#,
            r#"{"to":"earliest","extra":1}"#,
        ] {
            assert!(parse_reset(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_settings_merge_over_the_base() {
        let base = QueueConfig::default();
        let c = merge_config(&base, br#"{"partitions": 3, "max_deliveries": 2}"#).expect("ok");
        assert_eq!((c.partitions, c.max_deliveries), (3, 2));
        assert_eq!(c.ack_timeout_ms, base.ack_timeout_ms);
        assert_eq!(merge_config(&c, b"").expect("empty"), c);
        assert!(
            merge_config(&base, br#"{"partitons": 3}"#)
                .expect_err("typo")
                .contains("partitons")
        );
        assert!(merge_config(&base, b"[1]").is_err());
        assert!(merge_config(&base, b"{").is_err());
    }

    #[test]
    fn metrics_labels_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let info = QueueInfo {
            name: "q".into(),
            config: QueueConfig::default(),
            depth: 3,
            bytes: 10,
            groups: vec![roost_queue::GroupInfo {
                key: GroupKey::new("g", Some("eu/#")),
                members: Vec::new(),
                windows: Vec::new(),
                lag: 2,
                in_flight: 1,
                waiting: 0,
                delayed: 0,
            }],
            dead_letters: 0,
            damage: Vec::new(),
        };
        let mut out = String::new();
        render_queue_metrics(&[info], &mut out);
        assert!(out.contains("roost_queue_depth{queue=\"q\"} 3\n"), "{out}");
        assert!(
            out.contains("roost_queue_lag{queue=\"q\",group=\"g\",filter=\"eu/#\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("# TYPE roost_queue_inflight gauge\n"), "{out}");
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let h = roost_storage::latency::SyncLatency::new();
        h.record(Duration::from_micros(300));
        h.record(Duration::from_millis(3));
        let mut out = String::new();
        render_histogram("x_seconds", "store=\"s\"", &h.snapshot(), &mut out);
        assert!(
            out.contains("x_seconds_bucket{store=\"s\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{store=\"s\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{store=\"s\",le=\"+Inf\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{store=\"s\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_sum{store=\"s\"} 0.0033\n"), "{out}");
    }

    #[test]
    fn responses_encode() {
        let r = Response::error(404, "no");
        let text = String::from_utf8(r.encode()).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("{\n  \"error\": \"no\"\n}\n"), "{text}");
    }
}
