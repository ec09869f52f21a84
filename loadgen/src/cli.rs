//! Command line: one subcommand per scenario, connection and run-bounding options
//! shared by all of them.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use roost_core::{ProtocolVersion, QoS};

/// MQTT load generator: connections, publish/subscribe throughput, end-to-end latency,
/// loss and duplicates, against any MQTT 3.1.1 / 5.0 broker.
///
/// Latency is measured end to end from a send timestamp in the first 16 bytes of each
/// payload (with the publisher id and its sequence number, for loss and duplicate
/// counts); publishers and subscribers of a run live in this one process.
#[derive(Debug, Parser)]
#[command(name = "roost-bench", version, about, long_about)]
#[command(after_help = "Examples:
  roost-bench pubsub --mode p2p -p 10 -s 10 --qos 1 --duration 10s
  roost-bench pubsub --mode fan-out -s 100 --rate 500 --qos 0 --warmup 2s
  roost-bench conn -n 10000 --rate 2000 --broker-pid $(pidof roost) --duration 10s
  roost-bench pub -p 4 --qos 1 --count 100000 --json")]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Options every scenario shares.
    #[command(flatten)]
    pub common: Common,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Open N idle connections at a given rate and hold them; with --broker-pid, report
    /// the broker's resident memory per connection (from /proc/PID/status).
    Conn(ConnArgs),
    /// Publishers only: publish throughput, and PUBACK/PUBCOMP latency at QoS 1/2.
    Pub(PubArgs),
    /// Subscribers only, to messages from elsewhere (e.g. `roost-bench pub` in another
    /// process): delivered throughput, duplicates and sequence gaps. No latency: send
    /// times from another process share no clock base with this one.
    Sub(SubArgs),
    /// Publishers and subscribers in one process: throughput, end-to-end latency, loss.
    Pubsub(PubSubArgs),
    /// Work-queue traffic: produce to `$queue/<name>`, consume with
    /// `$share/<group>/$queue/<name>`, acknowledging with PUBACK (QoS >= 1).
    ///
    /// This is plain MQTT: roost stores `$queue/` publishes durably in partitioned
    /// queues (PUBACK once stored) and delivers to the group's members; a broker without
    /// queues treats `$queue/<name>` as an ordinary topic and the consumers as a shared
    /// subscription (mosquitto 2.0 accepts the subscription but delivers nothing to
    /// `$share/<g>/$queue/...`).
    ///
    /// Without --keyed every producer publishes to `$queue/<name>`, which roost spreads
    /// round-robin over the partitions, so "out of order" counts are expected there.
    Queue(QueueArgs),
}

/// Broker address, client settings and run bounds, for every scenario.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Broker host name or address.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT port.
    #[arg(long, global = true, default_value_t = 1883)]
    pub port: u16,
    /// Brokers the subscribers connect to instead of --host/--port (comma separated
    /// HOST:PORT), each taking an equal share of them in order: publishers on one node
    /// of a cluster, subscribers on the others.
    #[arg(long, global = true, value_delimiter = ',')]
    pub sub_broker: Vec<String>,
    /// Local addresses to bind client sockets to, round-robin (comma separated).
    /// Each address has its own ~28K ephemeral ports towards one broker address, so
    /// 127.0.0.1,127.0.0.2,127.0.0.3 allows ~84K connections to a loopback broker.
    #[arg(long, global = true, value_delimiter = ',')]
    pub source_ip: Vec<IpAddr>,
    /// MQTT protocol version: 3.1, 3.1.1 or 5.
    #[arg(long, global = true, default_value = "3.1.1", value_parser = parse_version)]
    pub mqtt_version: ProtocolVersion,
    /// Keep-alive in seconds sent in CONNECT (PINGREQ when a connection is idle).
    #[arg(long, global = true, default_value_t = 60)]
    pub keepalive: u16,
    /// Client identifier prefix; a role and an index are appended.
    #[arg(long, global = true)]
    pub client_prefix: Option<String>,
    /// Time allowed for TCP connect plus CONNACK (and SUBACK).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Measurement time, after the warm-up (default 10s unless --count is given).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Traffic before measuring starts: not counted in rates or latency (loss still is)
    /// (default 1s, or 0 with --count).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Stop after this many messages published in total (pub, pubsub, queue) or
    /// received (sub); --duration still applies when given.
    #[arg(long, global = true)]
    pub count: Option<u64>,
    /// After publishing stops, wait this long at most for outstanding deliveries and
    /// acknowledgements before counting what is missing as lost.
    #[arg(long, global = true, default_value = "3s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Hard limit on the whole run; past it roost-bench reports what it was doing and
    /// exits with an error (default: connect time + warm-up + duration + drain + 30s).
    #[arg(long, global = true, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Print one JSON summary on stdout at the end (progress goes to stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Progress report period.
    #[arg(long, global = true, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Runtime worker threads (default: available CPUs).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Worker tasks; each drives a share of the connections (default: 2 per thread).
    #[arg(long, global = true)]
    pub tasks: Option<usize>,
}

/// `conn`.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: usize,
    /// New connections per second (0: as fast as possible).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Process id of the broker, to read its VmRSS/VmHWM before, during and after.
    #[arg(long)]
    pub broker_pid: Option<u32>,
}

/// Message traffic options of the publishing and subscribing scenarios.
#[derive(Debug, Args, Clone)]
pub struct Traffic {
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value = "0", value_parser = parse_qos)]
    pub qos: QoS,
    /// Payload size in bytes (at least 16: the timestamp, publisher id and sequence).
    #[arg(long, default_value_t = 64, value_parser = parse_size)]
    pub size: usize,
    /// Total publish rate in messages per second over all publishers (unbounded if
    /// not given).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unacknowledged QoS 1/2 publishes per publisher (also capped by the broker's v5
    /// Receive Maximum).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Topic root (default: roost-bench/<process id>).
    #[arg(long)]
    pub topic: Option<String>,
}

/// `pub`.
#[derive(Debug, Args, Clone)]
pub struct PubArgs {
    /// Publishers.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub publishers: usize,
    /// Traffic shape.
    #[command(flatten)]
    pub traffic: Traffic,
}

/// `sub`.
#[derive(Debug, Args, Clone)]
pub struct SubArgs {
    /// Subscribers.
    #[arg(short = 's', long, default_value_t = 1)]
    pub subscribers: usize,
    /// Subscription QoS.
    #[arg(long, default_value = "0", value_parser = parse_qos)]
    pub qos: QoS,
    /// Topic filter (default: roost-bench/#).
    #[arg(long)]
    pub filter: Option<String>,
    /// Subscribe as members of this shared group (`$share/<group>/<filter>`).
    #[arg(long)]
    pub group: Option<String>,
}

/// How publishers and subscribers of `pubsub` are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Many publishers to one topic, every subscriber gets every message
    /// (defaults: 10 publishers, 1 subscriber).
    FanIn,
    /// Publishers to one topic with many subscribers (defaults: 1 publisher, 100
    /// subscribers).
    FanOut,
    /// Pairs: publisher i to topic i, subscriber i on topic i (default 10 pairs).
    P2p,
    /// Many publishers to one topic, consumed by a shared subscription
    /// `$share/<group>/<topic>`: each message once per group (defaults: 10 publishers,
    /// 4 subscribers, 1 group).
    Shared,
}

/// `pubsub`.
#[derive(Debug, Args, Clone)]
pub struct PubSubArgs {
    /// Topology.
    #[arg(long, value_enum, default_value = "fan-in")]
    pub mode: Mode,
    /// Publishers (default depends on --mode).
    #[arg(short = 'p', long)]
    pub publishers: Option<usize>,
    /// Subscribers (default depends on --mode).
    #[arg(short = 's', long)]
    pub subscribers: Option<usize>,
    /// Shared groups (--mode shared); subscribers are dealt round-robin into them.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Traffic shape.
    #[command(flatten)]
    pub traffic: Traffic,
}

/// `queue`.
#[derive(Debug, Args, Clone)]
pub struct QueueArgs {
    /// Queue name: producers publish to `$queue/<name>`.
    #[arg(long, default_value = "bench")]
    pub name: String,
    /// Producers.
    #[arg(short = 'p', long, default_value_t = 4)]
    pub producers: usize,
    /// Consumers, dealt round-robin into the groups.
    #[arg(short = 'c', long, default_value_t = 4)]
    pub consumers: usize,
    /// Consumer groups; consumers subscribe to `$share/g<i>/$queue/<name>`.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// QoS of produce and consume (a queue delivers at least QoS 1).
    #[arg(long, default_value = "1", value_parser = parse_qos)]
    pub qos: QoS,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 64, value_parser = parse_size)]
    pub size: usize,
    /// Total produce rate in messages per second (unbounded if not given).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unacknowledged publishes per producer.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Producer i publishes to `$queue/<name>/p<i>`: roost keeps one source topic in
    /// one partition, in order, so "out of order" then counts ordering violations (with
    /// fewer producers than partitions, some partitions stay idle).
    #[arg(long)]
    pub keyed: bool,
}

/// Parses `3.1`, `3.1.1` (or `4`) and `5` (or `5.0`).
pub fn parse_version(s: &str) -> Result<ProtocolVersion, String> {
    match s {
        "3.1" | "3" => Ok(ProtocolVersion::V3_1),
        "3.1.1" | "4" => Ok(ProtocolVersion::V3_1_1),
        "5" | "5.0" => Ok(ProtocolVersion::V5),
        _ => Err(format!("unknown MQTT version {s:?}: use 3.1, 3.1.1 or 5")),
    }
}

/// Parses a QoS of 0, 1 or 2.
pub fn parse_qos(s: &str) -> Result<QoS, String> {
    s.parse::<u8>()
        .ok()
        .and_then(QoS::from_u8)
        .ok_or_else(|| format!("QoS must be 0, 1 or 2, not {s:?}"))
}

/// Parses a payload size that leaves room for the stamp.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("not a size: {s:?}"))?;
    if n < crate::stamp::STAMP_LEN {
        return Err(format!(
            "payload must be at least {} bytes (timestamp, publisher id, sequence number)",
            crate::stamp::STAMP_LEN
        ));
    }
    if n > 256 * 1024 * 1024 {
        return Err("payload over 256 MiB".into());
    }
    Ok(n)
}

/// Parses `500ms`, `10s`, `2m`, `1h` or a bare number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (e.g. 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}: use ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("not a duration: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("roost-bench").chain(args.iter().copied()))
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn pubsub_with_everything() {
        let cli = parse(&[
            "pubsub",
            "--mode",
            "p2p",
            "-p",
            "10",
            "-s",
            "10",
            "--qos",
            "1",
            "--size",
            "128",
            "--rate",
            "20000",
            "--mqtt-version",
            "5",
            "--port",
            "1999",
            "--source-ip",
            "127.0.0.1,127.0.0.2",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
            "--json",
        ])
        .expect("parses");
        let Scenario::Pubsub(a) = cli.scenario else {
            panic!("not pubsub: {:?}", cli.scenario)
        };
        assert_eq!(a.mode, Mode::P2p);
        assert_eq!((a.publishers, a.subscribers), (Some(10), Some(10)));
        assert_eq!(a.traffic.qos, QoS::AtLeastOnce);
        assert_eq!(a.traffic.size, 128);
        assert_eq!(a.traffic.rate, Some(20000.0));
        assert_eq!(cli.common.mqtt_version, ProtocolVersion::V5);
        assert_eq!(cli.common.port, 1999);
        assert_eq!(cli.common.source_ip.len(), 2);
        assert_eq!(cli.common.duration, Some(Duration::from_secs(2)));
        assert_eq!(cli.common.warmup, Some(Duration::from_millis(500)));
        assert!(cli.common.json);
    }

    #[test]
    fn defaults() {
        let cli = parse(&["pubsub"]).expect("parses");
        let Scenario::Pubsub(a) = cli.scenario else {
            panic!("not pubsub")
        };
        assert_eq!(a.mode, Mode::FanIn);
        assert_eq!(a.traffic.qos, QoS::AtMostOnce);
        assert_eq!(a.traffic.size, 64);
        assert_eq!(a.traffic.rate, None);
        assert_eq!(cli.common.mqtt_version, ProtocolVersion::V3_1_1);
        assert_eq!(
            (cli.common.host.as_str(), cli.common.port),
            ("127.0.0.1", 1883)
        );
        assert_eq!(cli.common.duration, None);
        assert!(!cli.common.json);
    }

    #[test]
    fn conn_and_queue() {
        let cli =
            parse(&["conn", "-n", "5000", "--rate", "2000", "--broker-pid", "42"]).expect("parses");
        let Scenario::Conn(c) = cli.scenario else {
            panic!("not conn")
        };
        assert_eq!(
            (c.connections, c.rate, c.broker_pid),
            (5000, 2000.0, Some(42))
        );
        let cli = parse(&["queue", "--name", "jobs", "-c", "3", "--groups", "2"]).expect("parses");
        let Scenario::Queue(q) = cli.scenario else {
            panic!("not queue")
        };
        assert_eq!((q.name.as_str(), q.consumers, q.groups), ("jobs", 3, 2));
        assert_eq!(q.qos, QoS::AtLeastOnce, "queues default to QoS 1");
        assert!(!q.keyed, "round-robin over partitions unless --keyed");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["pubsub", "--qos", "3"]).is_err());
        assert!(
            parse(&["pubsub", "--size", "8"]).is_err(),
            "no room for the stamp"
        );
        assert!(parse(&["pubsub", "--mqtt-version", "6"]).is_err());
        assert!(parse(&["pubsub", "--mode", "star"]).is_err());
        assert!(parse(&["pubsub", "--inflight", "0"]).is_err());
        assert!(parse(&["pubsub", "--source-ip", "localhost"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        assert_eq!(parse_version("3.1"), Ok(ProtocolVersion::V3_1));
    }
}
