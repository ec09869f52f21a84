//! A worker task: one tokio task driving many connections.
//!
//! A task per connection would cost a task, two wakers and a stack-allocated future per
//! client; for 20,000 idle connections or 100 subscribers that is most of the load
//! generator's own CPU. Instead each worker owns a `Vec` of connections and one timer,
//! and its future polls them all: it reads what each socket has (registering for
//! readiness when it has nothing), feeds the bytes to the connection's sans-I/O
//! [`Client`], lets publishers write what their pacer or window allows, and writes out
//! what is buffered. The timer fires at the next paced publish or every housekeeping
//! period (keep-alive pings, flushing counters to [`Control`], noticing the phase).
//!
//! A worker ends at [`Phase::Stop`]: it sends DISCONNECT on every live connection and
//! returns its connections' final state and its tally.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Sleep;

use crate::client::{Client, ClientError, Tally};
use crate::control::{Control, Phase};
use crate::pacer::Pacer;

/// Stop topping up a publisher's write buffer past this many bytes.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Largest read size a busy connection grows to.
const MAX_READ_CHUNK: usize = 256 * 1024;
/// Reads per connection per poll before giving the others a turn.
const READS_PER_POLL: usize = 4;

/// A connected client and its socket (`None` once closed).
#[derive(Debug)]
pub struct Conn {
    /// Protocol state.
    pub client: Client,
    /// The socket while the connection lives.
    pub stream: Option<TcpStream>,
}

/// What a worker hands back at the end.
#[derive(Debug)]
pub struct WorkerReport {
    /// Counters and histograms.
    pub tally: Tally,
    /// Every connection's final protocol state (publisher counts, subscriber trackers).
    pub clients: Vec<Client>,
}

/// Why one connection's I/O step ended it.
enum ConnEnd {
    Protocol(ClientError),
    Io(io::Error),
}

impl ConnEnd {
    fn kind(&self) -> String {
        match self {
            ConnEnd::Protocol(e) => e.kind(),
            ConnEnd::Io(e) => format!("i/o error: {}", e.kind()),
        }
    }
}

/// One worker's state.
pub struct Worker {
    ctl: Arc<Control>,
    rx: mpsc::UnboundedReceiver<Conn>,
    conns: Vec<Conn>,
    tally: Tally,
    tick: Pin<Box<Sleep>>,
    housekeeping: Duration,
    next_housekeeping_ns: u64,
    flushed: [u64; 3],
}

impl Worker {
    /// A worker that takes new connections from `rx`.
    pub fn new(
        ctl: Arc<Control>,
        rx: mpsc::UnboundedReceiver<Conn>,
        housekeeping: Duration,
        timed: bool,
    ) -> Worker {
        Worker {
            tick: Box::pin(tokio::time::sleep(housekeeping)),
            ctl,
            rx,
            conns: Vec::new(),
            tally: Tally {
                timed,
                ..Tally::new()
            },
            housekeeping,
            next_housekeeping_ns: 0,
            flushed: [0; 3],
        }
    }

    /// Drives the connections until [`Phase::Stop`].
    pub async fn run(mut self) -> WorkerReport {
        poll_fn(|cx| self.poll(cx)).await;
        self.flush();
        WorkerReport {
            tally: self.tally,
            clients: self.conns.into_iter().map(|c| c.client).collect(),
        }
    }

    /// Adds this worker's counter increments to the shared totals.
    fn flush(&mut self) {
        let t = &self.tally;
        let now = [t.sent, t.acked, t.delivered];
        let totals = [&self.ctl.sent, &self.ctl.acked, &self.ctl.delivered];
        for ((total, now), flushed) in totals.iter().zip(now).zip(&mut self.flushed) {
            total.fetch_add(now - *flushed, Relaxed);
            *flushed = now;
        }
        for (kind, n) in std::mem::take(&mut self.tally.errors) {
            self.ctl.add_error(kind, n);
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while let Poll::Ready(Some(conn)) = self.rx.poll_recv(cx) {
            self.conns.push(conn);
        }
        let now = self.ctl.now_ns();
        let phase = self.ctl.phase();
        self.tally.window = self.ctl.window();
        let housekeeping = now >= self.next_housekeeping_ns;
        if housekeeping {
            self.next_housekeeping_ns = now + self.housekeeping.as_nanos() as u64;
            self.flush();
        }
        if phase == Phase::Stop {
            self.close_all();
            return Poll::Ready(());
        }
        let publishing = phase == Phase::Run;
        let run_start = self.ctl.run_start_ns.load(Relaxed);
        let mut again = false;
        let mut next_wake = self.next_housekeeping_ns;
        for conn in &mut self.conns {
            let Some(stream) = &conn.stream else {
                continue;
            };
            let c = &mut conn.client;
            let step = drive(
                stream,
                c,
                cx,
                now,
                publishing,
                run_start,
                housekeeping,
                &mut self.tally,
            );
            match step {
                Ok(d) => {
                    again |= d.again;
                    next_wake = next_wake.min(d.next_due_ns);
                }
                Err(end) => {
                    if phase < Phase::Stop {
                        self.tally.error(end.kind());
                        self.ctl.dropped.fetch_add(1, Relaxed);
                    }
                    conn.stream = None;
                }
            }
        }
        let deadline = self.ctl.instant_at(next_wake.max(now));
        if self.tick.deadline() != deadline {
            self.tick.as_mut().reset(deadline);
        }
        if self.tick.as_mut().poll(cx).is_ready() {
            again = true;
        }
        if again {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Sends DISCONNECT on every live connection (best effort) and closes it.
    fn close_all(&mut self) {
        for conn in &mut self.conns {
            if let Some(stream) = conn.stream.take() {
                conn.client.wbuf.clear();
                conn.client.disconnect();
                let _ = stream.try_write(&conn.client.wbuf);
                conn.client.wbuf.clear();
            }
        }
    }
}

/// What one connection's step asks of the worker.
struct Drive {
    /// Poll again soon: this connection has more to read or could publish more.
    again: bool,
    /// When its pacer next has a message due.
    next_due_ns: u64,
}

/// One I/O step of one connection: read, process, publish, keep alive, write.
#[allow(clippy::too_many_arguments)]
fn drive(
    stream: &TcpStream,
    c: &mut Client,
    cx: &mut Context<'_>,
    now: u64,
    publishing: bool,
    run_start: u64,
    housekeeping: bool,
    tally: &mut Tally,
) -> Result<Drive, ConnEnd> {
    let mut d = Drive {
        again: false,
        next_due_ns: u64::MAX,
    };
    // Read until the socket has nothing (which registers for readiness) or the budget
    // is spent (then poll again without waiting for a wake-up).
    let mut reads = 0;
    loop {
        if reads == READS_PER_POLL {
            d.again = true;
            break;
        }
        match stream.poll_read_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(Err(e)) => return Err(ConnEnd::Io(e)),
            Poll::Ready(Ok(())) => {}
        }
        if c.rbuf.capacity() - c.rbuf.len() < c.read_chunk {
            c.rbuf.reserve(c.read_chunk);
        }
        let spare = c.rbuf.capacity() - c.rbuf.len();
        match stream.try_read_buf(&mut c.rbuf) {
            Ok(0) => return Err(ConnEnd::Protocol(ClientError::Closed)),
            Ok(n) => {
                reads += 1;
                if n == spare && c.read_chunk < MAX_READ_CHUNK {
                    c.read_chunk *= 2;
                }
                c.process(now, tally, false).map_err(ConnEnd::Protocol)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ConnEnd::Io(e)),
        }
    }

    if publishing {
        publish(c, now, run_start, tally, &mut d);
    }
    if housekeeping && c.keep_alive > 0 && c.wbuf.is_empty() {
        let idle = now.saturating_sub(c.last_write_ns);
        if idle > u64::from(c.keep_alive) * 750_000_000 {
            c.ping();
        }
    }

    while !c.wbuf.is_empty() {
        match stream.poll_write_ready(cx) {
            Poll::Pending => break,
            Poll::Ready(Err(e)) => return Err(ConnEnd::Io(e)),
            Poll::Ready(Ok(())) => {}
        }
        match stream.try_write(&c.wbuf) {
            Ok(n) => {
                c.wbuf.advance(n);
                c.last_write_ns = now;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ConnEnd::Io(e)),
        }
    }
    // An unbounded publisher whose buffer went out and whose window has room can go on.
    if publishing
        && c.wbuf.is_empty()
        && c.publisher()
            .is_some_and(|p| p.pacer.is_none() && p.room() > 0)
    {
        d.again = true;
    }
    Ok(d)
}

/// Lets a publisher write what its pacer (or, unbounded, its window and buffer) allows.
fn publish(c: &mut Client, now: u64, run_start: u64, tally: &mut Tally, d: &mut Drive) {
    let buffered = c.wbuf.len();
    let Some(p) = c.publisher() else {
        return;
    };
    if p.done() {
        return;
    }
    match p.rate {
        None => {
            let space = WRITE_HIGH_WATER.saturating_sub(buffered);
            if space > 0 {
                let n = space.div_ceil(p.approx_packet_len()) as u64;
                c.publish(n, now, tally);
            }
        }
        Some(rate) => {
            if p.pacer.is_none() {
                // Spread publishers' schedules over one interval so they do not all
                // fire on the same timer tick.
                let offset = (f64::from(p.id % 1000) / 1000.0 / rate * 1e9) as u64;
                let burst = (rate / 100.0).max(4.0) as u64;
                p.pacer = Some(Pacer::new(run_start + offset, rate, burst));
            }
            let due = p.pacer.as_ref().map_or(0, |pc| pc.due(now));
            let n = if due > 0 {
                c.publish(due, now, tally)
            } else {
                0
            };
            if let Some(pc) = c.publisher().and_then(|p| p.pacer.as_mut()) {
                pc.issued(n);
                // Held back by a full window (or the count): an ack wakes us, not the
                // timer, which would otherwise spin on a deadline in the past.
                d.next_due_ns = if n < due { u64::MAX } else { pc.next_due_ns() };
            }
        }
    }
}
