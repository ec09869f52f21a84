//! A run from start to summary: build the clients a scenario needs, start the workers,
//! open the connections (subscribers first, so no early message is missed), then
//! warm up, measure, drain and stop, printing progress on the way.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use roost_core::{ProtocolVersion, QoS};
use tokio::sync::mpsc;

use crate::cli::{Cli, Common, Mode, Scenario, Traffic};
use crate::client::{Client, Publisher, Role, Subscriber};
use crate::connect::{Target, open_all};
use crate::control::{Control, Phase};
use crate::stats::{LatencySummary, new_histogram};
use crate::summary::{BrokerMemory, Connections, Summary, account};
use crate::worker::{Worker, WorkerReport};

/// The clients of a scenario and what their traffic should produce.
struct Plan {
    scenario: &'static str,
    mode: Option<&'static str>,
    subscribers: Vec<Client>,
    /// Publishers, or idle connections for `conn`.
    others: Vec<Client>,
    /// (audience, publisher id) pairs: each audience owes one delivery per publish.
    expect: Vec<(usize, u32)>,
    /// Deliveries per publish (for the drain decision).
    fan: u64,
    qos: Option<QoS>,
    size: Option<usize>,
    rate: Option<f64>,
    publishers: usize,
    connect_rate: f64,
    broker_pid: Option<u32>,
}

fn version_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5",
    }
}

/// Topic or filter of the i-th client.
type Name = Box<dyn Fn(usize) -> String>;
/// Audience of the i-th subscriber.
type Audience = Box<dyn Fn(usize) -> usize>;

struct Names {
    prefix: String,
    version: ProtocolVersion,
    keep_alive: u16,
}

impl Names {
    fn client(&self, role_name: &str, i: usize, role: Role) -> Client {
        let id = format!("{}{role_name}{i}", self.prefix);
        Client::new(self.version, id, self.keep_alive, role)
    }
}

/// Splits `total` into `n` nearly equal shares.
fn share(total: u64, n: usize, i: usize) -> u64 {
    let n = n as u64;
    total / n + u64::from((i as u64) < total % n)
}

#[allow(clippy::too_many_arguments)]
fn publishers(
    names: &Names,
    n: usize,
    topic: impl Fn(usize) -> String,
    qos: QoS,
    size: usize,
    rate: Option<f64>,
    inflight: u16,
    count: Option<u64>,
) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let mut p = Publisher::new(i as u32, topic(i), qos, size, inflight);
            p.rate = rate.map(|r| r / n as f64);
            p.limit = count.map(|c| share(c, n, i));
            names.client("pub", i, Role::Publisher(Box::new(p)))
        })
        .collect()
}

fn plan(cli: &Cli) -> Result<Plan> {
    let c = &cli.common;
    let names = Names {
        prefix: c
            .client_prefix
            .clone()
            .unwrap_or_else(|| format!("rb{}-", std::process::id())),
        version: c.mqtt_version,
        keep_alive: c.keepalive,
    };
    let default_root = format!("roost-bench/{}", std::process::id());
    let pubsub = |mode: Mode,
                  pubs: usize,
                  subs: usize,
                  groups: usize,
                  t: &Traffic,
                  scenario: &'static str|
     -> Result<Plan> {
        let root = t.topic.clone().unwrap_or_else(|| default_root.clone());
        let (mode_name, filter_of, topic_of, audience_of, fan): (_, Name, Name, Audience, _) =
            match mode {
                Mode::FanIn | Mode::FanOut => {
                    let (r1, r2) = (root.clone(), root.clone());
                    (
                        if mode == Mode::FanIn {
                            "fan-in"
                        } else {
                            "fan-out"
                        },
                        Box::new(move |_| r1.clone()),
                        Box::new(move |_| r2.clone()),
                        Box::new(|i| i),
                        subs as u64,
                    )
                }
                Mode::P2p => {
                    if subs > 0 && pubs != subs {
                        bail!(
                            "--mode p2p pairs publishers with subscribers: -p and -s must be equal"
                        );
                    }
                    let (r1, r2) = (root.clone(), root.clone());
                    (
                        "p2p",
                        Box::new(move |i| format!("{r1}/{i}")),
                        Box::new(move |i| format!("{r2}/{i}")),
                        Box::new(|i| i),
                        u64::from(subs > 0),
                    )
                }
                Mode::Shared => {
                    if groups == 0 || subs < groups {
                        bail!("--mode shared needs at least one subscriber per group");
                    }
                    let (r1, r2) = (root.clone(), root.clone());
                    (
                        "shared",
                        Box::new(move |i| format!("$share/g{}/{r1}", i % groups)),
                        Box::new(move |_| r2.clone()),
                        Box::new(move |i| i % groups),
                        groups as u64,
                    )
                }
            };
        let subscribers: Vec<Client> = (0..subs)
            .map(|i| {
                let s = Subscriber::new(filter_of(i), t.qos, audience_of(i));
                names.client("sub", i, Role::Subscriber(Box::new(s)))
            })
            .collect();
        let mut expect = Vec::new();
        for p in 0..pubs as u32 {
            let mut audiences: Vec<usize> = match mode {
                Mode::P2p => (subs > 0).then_some(p as usize).into_iter().collect(),
                _ => (0..subs).map(&audience_of).collect(),
            };
            audiences.sort_unstable();
            audiences.dedup();
            expect.extend(audiences.into_iter().map(|a| (a, p)));
        }
        Ok(Plan {
            scenario,
            mode: (scenario == "pubsub").then_some(mode_name),
            subscribers,
            others: publishers(
                &names, pubs, topic_of, t.qos, t.size, t.rate, t.inflight, c.count,
            ),
            expect,
            fan,
            qos: Some(t.qos),
            size: Some(t.size),
            rate: t.rate,
            publishers: pubs,
            connect_rate: 0.0,
            broker_pid: None,
        })
    };
    match &cli.scenario {
        Scenario::Conn(a) => Ok(Plan {
            scenario: "conn",
            mode: None,
            subscribers: Vec::new(),
            others: (0..a.connections)
                .map(|i| names.client("conn", i, Role::Idle))
                .collect(),
            expect: Vec::new(),
            fan: 0,
            qos: None,
            size: None,
            rate: None,
            publishers: 0,
            connect_rate: a.rate,
            broker_pid: a.broker_pid,
        }),
        Scenario::Pub(a) => pubsub(Mode::FanIn, a.publishers, 0, 1, &a.traffic, "pub"),
        Scenario::Sub(a) => {
            let filter = a.filter.clone().unwrap_or_else(|| "roost-bench/#".into());
            let filter = match &a.group {
                Some(g) => format!("$share/{g}/{filter}"),
                None => filter,
            };
            let subscribers = (0..a.subscribers)
                .map(|i| {
                    let s = Subscriber::new(filter.clone(), a.qos, 0);
                    names.client("sub", i, Role::Subscriber(Box::new(s)))
                })
                .collect();
            Ok(Plan {
                scenario: "sub",
                mode: None,
                subscribers,
                others: Vec::new(),
                expect: Vec::new(),
                fan: 0,
                qos: Some(a.qos),
                size: None,
                rate: None,
                publishers: 0,
                connect_rate: 0.0,
                broker_pid: None,
            })
        }
        Scenario::Pubsub(a) => {
            let (dp, ds) = match a.mode {
                Mode::FanIn => (10, 1),
                Mode::FanOut => (1, 100),
                Mode::P2p => (10, 10),
                Mode::Shared => (10, 4),
            };
            let p = a.publishers.unwrap_or(if a.mode == Mode::P2p {
                a.subscribers.unwrap_or(dp)
            } else {
                dp
            });
            let s = a
                .subscribers
                .unwrap_or(if a.mode == Mode::P2p { p } else { ds });
            pubsub(a.mode, p, s, a.groups, &a.traffic, "pubsub")
        }
        Scenario::Queue(a) => {
            let t = Traffic {
                qos: a.qos,
                size: a.size,
                rate: a.rate,
                inflight: a.inflight,
                topic: Some(format!("$queue/{}", a.name)),
            };
            let mut queue_plan = pubsub(
                Mode::Shared,
                a.producers,
                a.consumers,
                a.groups,
                &t,
                "queue",
            )?;
            if a.keyed {
                for (i, c) in queue_plan.others.iter_mut().enumerate() {
                    if let Role::Publisher(p) = &mut c.role {
                        p.topic = format!("$queue/{}/p{i}", a.name);
                    }
                }
            }
            Ok(queue_plan)
        }
    }
}

/// Reads a `Vm...:  N kB` line of /proc/PID/status.
pub fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&status, key)
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Writes to stdout, ignoring a closed pipe (`roost-bench ... | head`).
pub(crate) fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// The progress display: an indicatif spinner line on a terminal, plain lines when
/// piped (to stderr with --json, so stdout carries only the JSON).
struct Progress {
    bar: Option<ProgressBar>,
    to_stderr: bool,
    last: (f64, u64, u64),
}

impl Progress {
    fn new(json: bool) -> Progress {
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                b.set_style(style);
            }
            b
        });
        Progress {
            bar,
            to_stderr: json,
            last: (0.0, 0, 0),
        }
    }

    fn show(&mut self, ctl: &Control, label: &str, t: f64) {
        let (sent, delivered) = (ctl.sent.load(Relaxed), ctl.delivered.load(Relaxed));
        let dt = (t - self.last.0).max(1e-3);
        let line = format!(
            "[{t:6.1}s] {label:<10} sent {:>9.0}/s  delivered {:>9.0}/s  conns {} (failed {}, dropped {})  errors {}",
            (sent - self.last.1) as f64 / dt,
            (delivered - self.last.2) as f64 / dt,
            ctl.connected.load(Relaxed),
            ctl.failed.load(Relaxed),
            ctl.dropped.load(Relaxed),
            ctl.error_count(),
        );
        self.last = (t, sent, delivered);
        match &self.bar {
            Some(b) => b.set_message(line),
            None if self.to_stderr => eprintln!("{line}"),
            None => print_out(&(line + "\n")),
        }
    }

    fn tick(&self) {
        if let Some(b) = &self.bar {
            b.tick();
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Sleeps until `ctl`-time `until_ns` or until `done()` holds, showing progress every
/// `interval`.
async fn wait(
    ctl: &Control,
    progress: &mut Progress,
    label: &str,
    until_ns: u64,
    interval: Duration,
    mut done: impl FnMut() -> bool,
) {
    let mut next_show = ctl.now_ns() + interval.as_nanos() as u64;
    loop {
        let now = ctl.now_ns();
        if now >= until_ns || done() {
            return;
        }
        if now >= next_show {
            progress.show(ctl, label, now as f64 / 1e9);
            next_show = now + interval.as_nanos() as u64;
        }
        progress.tick();
        let step = (until_ns - now).min(20_000_000);
        tokio::time::sleep(Duration::from_nanos(step)).await;
    }
}

/// How long the run may take at most, given its options.
pub fn hard_timeout(cli: &Cli) -> Duration {
    let c = &cli.common;
    if let Some(t) = c.timeout {
        return t;
    }
    let conns = match &cli.scenario {
        Scenario::Conn(a) if a.rate > 0.0 => Duration::from_secs_f64(a.connections as f64 / a.rate),
        _ => Duration::ZERO,
    };
    let measure = c.duration.unwrap_or(if c.count.is_some() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(10)
    });
    conns
        + c.connect_timeout
        + c.warmup.unwrap_or_default()
        + Duration::from_secs(1)
        + measure
        + c.drain
        + Duration::from_secs(30)
}

/// Runs the scenario of `cli`; `Err` only when it could not run at all.
pub async fn run(cli: &Cli, ctl: Arc<Control>) -> Result<Summary> {
    let c: &Common = &cli.common;
    let addr: SocketAddr = tokio::net::lookup_host((c.host.as_str(), c.port))
        .await
        .with_context(|| format!("cannot resolve broker host {:?}", c.host))?
        .next()
        .with_context(|| format!("broker host {:?} has no address", c.host))?;
    let mut plan = plan(cli)?;
    let target = Target {
        addr,
        source_ips: c.source_ip.clone(),
        timeout: c.connect_timeout,
    };
    let mut sub_targets = Vec::new();
    for b in &c.sub_broker {
        let addr: SocketAddr = tokio::net::lookup_host(b.as_str())
            .await
            .with_context(|| format!("cannot resolve subscriber broker {b:?}"))?
            .next()
            .with_context(|| format!("subscriber broker {b:?} has no address"))?;
        sub_targets.push(Target {
            addr,
            ..target.clone()
        });
    }
    if sub_targets.is_empty() {
        sub_targets.push(target.clone());
    }
    let total_conns = plan.subscribers.len() + plan.others.len();
    if total_conns == 0 {
        bail!("nothing to do: no connections in this scenario");
    }
    let threads = c
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let n_workers = c.tasks.unwrap_or(threads * 2).clamp(1, total_conns);
    let housekeeping = if plan.scenario == "conn" {
        Duration::from_millis(500)
    } else {
        Duration::from_millis(50)
    };
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..n_workers {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.push(tx);
        handles.push(tokio::spawn(
            Worker::new(ctl.clone(), rx, housekeeping, plan.scenario != "sub").run(),
        ));
    }
    let mut progress = Progress::new(c.json);
    let interval = c.interval.max(Duration::from_millis(100));
    let is_conn = plan.scenario == "conn";
    let pid = plan.broker_pid;
    let rss_before = pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    if pid.is_some() && rss_before.is_none() {
        bail!(
            "cannot read /proc/{}/status: is --broker-pid right?",
            pid.unwrap_or(0)
        );
    }

    // Setup: subscribers, then everyone else.
    let n_subs = plan.subscribers.len();
    let subs = std::mem::take(&mut plan.subscribers);
    let others = std::mem::take(&mut plan.others);
    let connect = {
        let (ctl, senders, target) = (ctl.clone(), senders.clone(), target.clone());
        let rate = plan.connect_rate;
        tokio::spawn(async move {
            // Subscribers in equal shares over their brokers, in order.
            let share = n_subs.div_ceil(sub_targets.len()).max(1);
            let mut subs = subs.into_iter();
            for (j, sub_target) in sub_targets.iter().enumerate() {
                let part: Vec<_> = subs.by_ref().take(share).collect();
                open_all(part, j * share, sub_target, 0.0, &senders, &ctl, !is_conn).await;
            }
            if ctl.failed.load(Relaxed) == 0 || is_conn {
                open_all(others, n_subs, &target, rate, &senders, &ctl, !is_conn).await;
            }
        })
    };
    wait(
        &ctl,
        &mut progress,
        "connecting",
        u64::MAX,
        interval,
        || connect.is_finished(),
    )
    .await;
    let _ = connect.await;
    let established = ctl.connected.load(Relaxed);
    let failed = ctl.failed.load(Relaxed);
    let setup_failed = if is_conn {
        established == 0
    } else {
        failed > 0
    };

    let mut summary = Summary {
        scenario: plan.scenario.into(),
        mode: plan.mode.map(String::from),
        broker: format!("{}:{}", c.host, c.port),
        mqtt_version: version_name(c.mqtt_version).into(),
        qos: plan.qos.map(|q| q as u8),
        payload_bytes: plan.size,
        rate_target: plan.rate,
        publishers: plan.publishers,
        subscribers: n_subs,
        warmup_s: 0.0,
        ..Default::default()
    };
    let mut memory = None;
    if setup_failed {
        ctl.set_phase(Phase::Stop);
    } else if is_conn {
        // Let the broker settle after the last handshake before reading its RSS.
        let settle = ctl.now_ns() + 1_000_000_000;
        wait(&ctl, &mut progress, "settling", settle, interval, || false).await;
        let connected_rss = pid.and_then(|p| proc_status_kib(p, "VmRSS"));
        let start = ctl.now_ns();
        let hold = c.duration.unwrap_or(Duration::from_secs(10));
        ctl.set_phase(Phase::Run);
        wait(
            &ctl,
            &mut progress,
            "holding",
            start + hold.as_nanos() as u64,
            interval,
            || false,
        )
        .await;
        summary.measured_s = (ctl.now_ns() - start) as f64 / 1e9;
        if let (Some(p), Some(before), Some(connected)) = (pid, rss_before, connected_rss) {
            memory = Some(BrokerMemory {
                pid: p,
                rss_before_kib: before,
                rss_connected_kib: connected,
                bytes_per_connection: (established > 0)
                    .then(|| (connected as f64 - before as f64) * 1024.0 / established as f64),
                ..Default::default()
            });
        }
        ctl.set_phase(Phase::Stop);
    } else {
        // Warm-up, measure, drain.
        let t0 = ctl.now_ns();
        ctl.run_start_ns.store(t0, Relaxed);
        ctl.set_phase(Phase::Run);
        let count = c.count;
        let counted = || match count {
            Some(n) if plan.scenario == "sub" => ctl.delivered.load(Relaxed) >= n,
            Some(n) => ctl.sent.load(Relaxed) >= n,
            None => false,
        };
        let warmup = c.warmup.unwrap_or(if count.is_some() {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        });
        let warm_end = t0 + warmup.as_nanos() as u64;
        wait(&ctl, &mut progress, "warm-up", warm_end, interval, counted).await;
        let w0 = ctl.now_ns();
        ctl.window_start_ns.store(w0, Relaxed);
        let measure = c.duration.or(if count.is_some() {
            None
        } else {
            Some(Duration::from_secs(10))
        });
        let end = measure.map_or(u64::MAX, |d| w0 + d.as_nanos() as u64);
        wait(&ctl, &mut progress, "measuring", end, interval, counted).await;
        let w1 = ctl.now_ns();
        ctl.window_end_ns.store(w1, Relaxed);
        ctl.set_phase(Phase::Drain);
        summary.warmup_s = (w0 - t0) as f64 / 1e9;
        summary.measured_s = (w1 - w0) as f64 / 1e9;
        let fan = plan.fan;
        let acks = plan.qos.is_some_and(|q| q != QoS::AtMostOnce) && plan.publishers > 0;
        let drained = || {
            let sent = ctl.sent.load(Relaxed);
            ctl.delivered.load(Relaxed) >= sent * fan && (!acks || ctl.acked.load(Relaxed) >= sent)
        };
        if plan.scenario != "sub" {
            // Give workers one housekeeping period to flush before judging.
            let flush = ctl.now_ns() + 2 * housekeeping.as_nanos() as u64;
            wait(&ctl, &mut progress, "draining", flush, interval, || false).await;
            let drain_end = ctl.now_ns() + c.drain.as_nanos() as u64;
            wait(
                &ctl,
                &mut progress,
                "draining",
                drain_end,
                interval,
                drained,
            )
            .await;
        }
        ctl.set_phase(Phase::Stop);
    }

    // Collect the workers' reports.
    let mut reports: Vec<WorkerReport> = Vec::new();
    drop(senders);
    for h in handles {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => bail!("a worker task failed: {e}"),
            Err(_) => bail!("a worker task did not stop within 10 s"),
        }
    }
    progress.finish();
    if let (Some(p), Some(m)) = (pid, memory.as_mut()) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        m.rss_after_close_kib = proc_status_kib(p, "VmRSS");
        m.hwm_kib = proc_status_kib(p, "VmHWM").unwrap_or(0);
    }
    summary.broker_memory = memory;
    summary.connections = Connections {
        attempted: total_conns as u64,
        established,
        failed,
        dropped: ctl.dropped.load(Relaxed),
    };
    summarise(&mut summary, &plan, &reports);
    summary.errors = ctl.errors();
    if setup_failed {
        let mut msg = format!(
            "could not set up the run: connections to {addr} failed \
             ({failed} failed, {established} established, {total_conns} planned)"
        );
        for (kind, n) in &summary.errors {
            msg.push_str(&format!("\n  {n} x {kind}"));
        }
        if summary.errors.keys().any(|k| k.contains("refused")) {
            msg.push_str("\n(is the broker running and listening there?)");
        }
        return Err(anyhow::anyhow!(msg).context(SetupFailed(Box::new(summary))));
    }
    Ok(summary)
}

/// The summary of a run that could not be set up, carried inside the error so --json
/// can still print it.
#[derive(Debug)]
pub struct SetupFailed(pub Box<Summary>);

impl std::fmt::Display for SetupFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "setup failed")
    }
}

/// Fills the traffic numbers of `s` from the workers' reports.
fn summarise(s: &mut Summary, plan: &Plan, reports: &[WorkerReport]) {
    let mut latency = new_histogram();
    let mut ack_latency = new_histogram();
    let mut sent_by = HashMap::new();
    let mut subscribers = Vec::new();
    for r in reports {
        let t = &r.tally;
        s.sent += t.measured_sent;
        s.acked += t.measured_acked;
        s.delivered += t.measured_delivered;
        s.total_sent += t.sent;
        s.total_delivered += t.delivered;
        let _ = latency.add(&t.latency);
        let _ = ack_latency.add(&t.ack_latency);
        for c in &r.clients {
            match &c.role {
                Role::Publisher(p) => {
                    sent_by.insert(p.id, p.sent);
                    if p.qos != QoS::AtMostOnce {
                        s.unacked += u64::from(p.inflight);
                    }
                }
                Role::Subscriber(sub) => subscribers.push(sub.as_ref()),
                Role::Idle => {}
            }
        }
    }
    if s.measured_s > 0.0 {
        s.sent_per_s = s.sent as f64 / s.measured_s;
        s.delivered_per_s = s.delivered as f64 / s.measured_s;
    }
    s.latency_us = LatencySummary::of(&latency);
    s.ack_latency_us = LatencySummary::of(&ack_latency);
    s.foreign = subscribers.iter().map(|x| x.foreign).sum();
    if plan.scenario == "sub" {
        let trackers = subscribers.iter().flat_map(|x| x.trackers.iter());
        let (mut gaps, mut dups, mut ooo) = (0, 0, 0);
        for t in trackers {
            gaps += t.gaps();
            dups += t.duplicates;
            ooo += t.out_of_order;
        }
        s.gaps = Some(gaps);
        s.duplicates = dups;
        s.out_of_order = ooo;
    } else if !subscribers.is_empty() || plan.fan > 0 {
        let acc = account(&plan.expect, &sent_by, &subscribers);
        s.expected = acc.delivery.expected;
        s.loss = Some(acc.delivery.lost);
        s.duplicates = acc.delivery.duplicates;
        s.out_of_order = acc.delivery.out_of_order;
        s.misrouted = acc.misrouted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn plan_of(args: &[&str]) -> Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("roost-bench").chain(args.iter().copied()))
            .expect("parses");
        plan(&cli)
    }

    #[test]
    fn topologies() {
        let p = plan_of(&["pubsub", "--mode", "fan-out", "-s", "5"]).expect("plan");
        assert_eq!((p.others.len(), p.subscribers.len(), p.fan), (1, 5, 5));
        assert_eq!(p.expect.len(), 5);
        let p = plan_of(&["pubsub", "--mode", "p2p", "-p", "3"]).expect("plan");
        assert_eq!((p.others.len(), p.subscribers.len(), p.fan), (3, 3, 1));
        assert_eq!(p.expect, vec![(0, 0), (1, 1), (2, 2)]);
        assert!(plan_of(&["pubsub", "--mode", "p2p", "-p", "3", "-s", "2"]).is_err());
        let p = plan_of(&[
            "pubsub", "--mode", "shared", "-p", "2", "-s", "4", "--groups", "2",
        ])
        .expect("plan");
        assert_eq!(p.fan, 2);
        assert_eq!(p.expect, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        let Role::Subscriber(s) = &p.subscribers[3].role else {
            panic!("subscriber")
        };
        assert!(s.filter.starts_with("$share/g1/"), "{}", s.filter);
        let p = plan_of(&["queue", "--name", "jobs"]).expect("plan");
        let Role::Subscriber(s) = &p.subscribers[0].role else {
            panic!("subscriber")
        };
        assert_eq!(s.filter, "$share/g0/$queue/jobs");
        let Role::Publisher(pb) = &p.others[0].role else {
            panic!("publisher")
        };
        assert_eq!(pb.topic, "$queue/jobs");
        let p = plan_of(&["queue", "--name", "jobs", "-p", "2", "--keyed"]).expect("plan");
        let topics: Vec<_> = p
            .others
            .iter()
            .map(|c| match &c.role {
                Role::Publisher(p) => p.topic.clone(),
                _ => panic!("publisher"),
            })
            .collect();
        assert_eq!(topics, vec!["$queue/jobs/p0", "$queue/jobs/p1"]);
        let Role::Subscriber(s) = &p.subscribers[0].role else {
            panic!("subscriber")
        };
        assert_eq!(
            s.filter, "$share/g0/$queue/jobs",
            "--keyed changes producers only"
        );
    }

    #[test]
    fn count_and_rate_are_shared_out() {
        let p = plan_of(&["pub", "-p", "3", "--count", "10", "--rate", "300"]).expect("plan");
        let limits: Vec<_> = p
            .others
            .iter()
            .map(|c| match &c.role {
                Role::Publisher(p) => (p.limit, p.rate),
                _ => panic!("publisher"),
            })
            .collect();
        assert_eq!(
            limits,
            vec![
                (Some(4), Some(100.0)),
                (Some(3), Some(100.0)),
                (Some(3), Some(100.0))
            ]
        );
    }

    #[test]
    fn proc_status_lines() {
        let status = "Name:\troost\nVmHWM:\t   12345 kB\nVmRSS:\t    9876 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(9876));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(12345));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        assert!(proc_status_kib(std::process::id(), "VmRSS").is_some());
    }
}
