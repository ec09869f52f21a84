//! Opening connections: TCP connect (optionally from a chosen source address), then
//! CONNECT/CONNACK and, for subscribers, SUBSCRIBE/SUBACK, all under one timeout.
//!
//! Handshakes run as short-lived tasks at a bounded rate and concurrency; each
//! established connection is handed to a worker, which drives it from then on.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::client::{Client, State, Tally};
use crate::control::Control;
use crate::worker::Conn;

/// Handshakes in progress at once.
const MAX_CONCURRENT_HANDSHAKES: usize = 512;

/// How far a failed handshake got, for the timeout message.
#[derive(Debug, Clone, Copy)]
enum Stage {
    Tcp,
    ConnAck,
    SubAck,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// Broker address.
    pub addr: SocketAddr,
    /// Local addresses to bind, round-robin; empty: let the kernel choose.
    pub source_ips: Vec<IpAddr>,
    /// Limit for TCP connect plus handshake.
    pub timeout: Duration,
}

/// Opens `clients` at `rate` per second (0: unlimited), dealing the established ones
/// round-robin to `workers`. Returns once every handshake has finished or failed; with
/// `stop_on_error`, no new handshake starts after the first failure.
pub async fn open_all(
    clients: Vec<Client>,
    first_index: usize,
    target: &Target,
    rate: f64,
    workers: &[mpsc::UnboundedSender<Conn>],
    ctl: &Arc<Control>,
    stop_on_error: bool,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let failed = Arc::new(AtomicBool::new(false));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, client) in clients.into_iter().enumerate() {
        if stop_on_error && failed.load(Relaxed) {
            break;
        }
        if rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let index = first_index + i;
        let source = (!target.source_ips.is_empty())
            .then(|| target.source_ips[index % target.source_ips.len()]);
        let (addr, timeout) = (target.addr, target.timeout);
        let worker = workers[index % workers.len()].clone();
        let ctl = ctl.clone();
        let failed = failed.clone();
        tasks.spawn(async move {
            match establish(client, addr, source, timeout, &ctl).await {
                Ok(conn) => {
                    ctl.connected.fetch_add(1, Relaxed);
                    // A worker only goes away at the end of the run.
                    let _ = worker.send(conn);
                }
                Err(kind) => {
                    ctl.failed.fetch_add(1, Relaxed);
                    ctl.add_error(kind, 1);
                    failed.store(true, Relaxed);
                }
            }
            drop(permit);
        });
        // Reap finished handshakes as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Connects one client; on failure returns the error kind to count.
async fn establish(
    mut client: Client,
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    ctl: &Control,
) -> Result<Conn, String> {
    let mut stage = Stage::Tcp;
    let handshake = async {
        let stream = tcp_connect(addr, source).await?;
        stage = Stage::ConnAck;
        let mut tally = Tally::for_handshake();
        client.start();
        let mut stream = stream;
        while client.state != State::Ready {
            if !client.wbuf.is_empty() {
                stream
                    .write_all(&client.wbuf)
                    .await
                    .map_err(|e| format!("i/o error during handshake: {}", e.kind()))?;
                client.wbuf.clear();
                client.last_write_ns = ctl.now_ns();
            }
            if client.state == State::AwaitSubAck {
                stage = Stage::SubAck;
            }
            client.rbuf.reserve(512);
            let n = stream
                .read_buf(&mut client.rbuf)
                .await
                .map_err(|e| format!("i/o error during handshake: {}", e.kind()))?;
            if n == 0 {
                return Err(match stage {
                    Stage::SubAck => "connection closed by broker before SUBACK".to_string(),
                    _ => "connection closed by broker before CONNACK".to_string(),
                });
            }
            client
                .process(ctl.now_ns(), &mut tally, true)
                .map_err(|e| e.kind())?;
        }
        if !client.wbuf.is_empty() {
            stream
                .write_all(&client.wbuf)
                .await
                .map_err(|e| format!("i/o error during handshake: {}", e.kind()))?;
            client.wbuf.clear();
        }
        Ok(stream)
    };
    let result = tokio::time::timeout(timeout, handshake).await;
    match result {
        Ok(Ok(stream)) => Ok(Conn {
            client,
            stream: Some(stream),
        }),
        Ok(Err(kind)) => Err(kind),
        Err(_) => Err(match stage {
            Stage::Tcp => format!("timeout: no TCP connection to {addr} within {timeout:?}"),
            Stage::ConnAck => format!("timeout: no CONNACK within {timeout:?}"),
            Stage::SubAck => format!("timeout: no SUBACK within {timeout:?}"),
        }),
    }
}

async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, String> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {}", e.kind()))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind to source address {ip}: {}", e.kind()))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("tcp connect to {addr}: {}", e.kind()))?;
    // Latency is the point; and small acks must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
