//! Broker configuration: command-line flags over an optional TOML file over defaults.
//!
//! Every key of the TOML file is also a flag (`max_inflight` is `--max-inflight`); a
//! flag given on the command line wins over the file. Unknown keys and bad values are
//! errors that name the key, never silently ignored.
//!
//! Each part owns its settings: the engine's limits are [`Settings`] (one list,
//! `roost_engine::for_each_setting!`, from which the flags below are made too), the
//! queues' are `roost_queue::QueueConfig`, and what only the shell needs (listeners,
//! TLS, authentication, storage, logging) is here. In the file they are all top-level
//! keys (and `[storage]`, `[auth_hook]`, `[queue_defaults]`, `[queues.<name>]` tables).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::persistence::session_store::Durability;
pub use crate::security::auth_hook::{AuthHookConfig, HookErrorPolicy};
use crate::security::jwt::{JwtSettings, KeySource};
use roost_engine::Settings;

macro_rules! engine_flags {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, $value:literal; )*) => {
        /// The flags of the engine's settings: `--max-inflight N` for `max_inflight`.
        #[derive(Debug, Default, clap::Args)]
        pub struct EngineFlags {
            $(
                $(#[doc = $doc])*
                #[arg(long, value_name = $value)]
                pub $name: Option<$ty>,
            )*
        }

        impl EngineFlags {
            /// Sets each setting given on the command line.
            pub fn apply(self, settings: &mut Settings) {
                $( if let Some(v) = self.$name { settings.$name = v; } )*
            }
        }
    };
}

roost_engine::for_each_setting!(engine_flags);

/// The broker's settings after merging defaults, file and flags.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The limits every client meets: top-level keys of the file like the others, read
    /// into the engine's own settings (see [`Config::from_toml`]).
    #[serde(skip)]
    pub engine: Settings,
    /// TCP listeners for MQTT (all protocol versions on each).
    pub bind: Vec<SocketAddr>,
    /// Directory for roost's data; created when missing and locked while running.
    pub data_dir: PathBuf,
    /// Log filter: error, warn, info, debug or trace (or a tracing directive).
    pub log_level: String,
    /// Log line format: `text` (human-readable) or `json` (one JSON object per line,
    /// with the structured fields such as `client_id`, for log collectors).
    pub log_format: LogFormat,
    /// Seconds between updates of the `$SYS/broker/...` status topics; 0 turns them off.
    pub sys_interval: u64,
    /// Password checks (argon2, ~19 MiB and tens of milliseconds each) run at once.
    /// Default: one per CPU core.
    pub max_auth_checks: usize,
    /// CONNECTs that may wait for a password check (or an auth hook answer) while the
    /// checks are busy, one source address holding at most an eighth of the places;
    /// past it a client is refused with CONNACK 0x89 server busy (3.x: return code 3)
    /// at once. Default 64.
    pub max_auth_waiting: usize,
    /// `$queue/` queues that clients and the admin API may create; a publish or
    /// subscribe that would create one more is refused (PUBACK 0x97, SUBACK 0x97 /
    /// 3.x 0x80). Queues declared in the file are always created. 0: no limit.
    /// Default 1000.
    pub max_queues: usize,
    /// Listeners for MQTT over TLS (needs `tls_cert` and `tls_key`).
    pub tls_bind: Vec<SocketAddr>,
    /// Listeners for MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`).
    pub ws_bind: Vec<SocketAddr>,
    /// Listeners for MQTT over WebSocket with TLS (same certificate as `tls_bind`).
    pub wss_bind: Vec<SocketAddr>,
    /// Listeners for the HTTP admin API (`/metrics`, `/health`, `/ready`,
    /// `/api/v1/...`). Empty by default: the API can delete queues and disconnect
    /// clients, so it is served only where the operator asks for it.
    pub admin_bind: Vec<SocketAddr>,
    /// Bearer token the admin API requires (`Authorization: Bearer <token>`) on
    /// everything but `/health` and `/ready`. Required when an `admin_bind` address is
    /// not loopback.
    pub admin_token: Option<String>,
    /// PEM certificate chain of the TLS listeners, server certificate first.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; when set, TLS clients must present a certificate they issued.
    pub tls_client_ca: Option<PathBuf>,
    /// Use the Common Name of the client certificate as the MQTT username (needs
    /// `tls_client_ca`); it replaces any username the client sends in CONNECT.
    pub tls_use_cn_as_username: bool,
    /// Password file (`username:argon2id-hash` lines, managed with `roost passwd`);
    /// re-read on SIGHUP.
    pub password_file: Option<PathBuf>,
    /// ACL file (see the README); re-read on SIGHUP. Unset: clients may use any topic.
    pub acl_file: Option<PathBuf>,
    /// Let clients without a username connect. Unset: false when `password_file` or
    /// `[auth_hook]` is configured, else true.
    pub allow_anonymous: Option<bool>,
    /// HTTP authentication hook (the `[auth_hook]` table).
    pub auth_hook: Option<AuthHookConfig>,
    /// HMAC secret (HS256/384/512) that signs the JWTs clients give as their CONNECT
    /// password; re-read on SIGHUP.
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM RSA or EC public key, or a JWKS file, that verifies the JWTs clients give as
    /// their CONNECT password (RS*, PS*, ES256/384); re-read on SIGHUP.
    pub jwt_public_key_file: Option<PathBuf>,
    /// The JWT claim that names the user (it becomes the client's username).
    pub jwt_username_claim: String,
    /// The `aud` a JWT must name; unset: not checked.
    pub jwt_audience: Option<String>,
    /// The `iss` a JWT must have; unset: not checked.
    pub jwt_issuer: Option<String>,
    /// Durable storage (the `[storage]` table).
    pub storage: StorageConfig,
    /// Settings of `$queue/` queues created on first use (the `[queue_defaults]`
    /// table: partitions, durability, ack_timeout_ms, max_deliveries, ...).
    pub queue_defaults: roost_queue::QueueConfig,
    /// Create a queue on the first publish or subscribe to `$queue/<name>`; when false,
    /// only existing queues can be used.
    pub queue_auto_create: bool,
    /// Bridges to other brokers (`[[bridge]]` tables; see the README).
    pub bridge: Vec<crate::bridge::BridgeConfig>,
    /// Queues declared in the file (`[queues.<name>]` tables with the keys of
    /// `queue_defaults`, e.g. `capture_filters = ["sensors/#"]`); created at startup
    /// or updated to these settings.
    pub queues: std::collections::BTreeMap<String, roost_queue::QueueConfig>,
    /// This node's part in a cluster (the `[cluster]` table); unset: a single node.
    pub cluster: Option<ClusterTable>,
}

/// The `[cluster]` table (flags `--node-id`, `--cluster-bind`, `--cluster-peers`,
/// `--cluster-name`, `--cluster-join`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTable {
    /// This node's id, at least 1, unique in the cluster.
    pub node_id: u64,
    /// The node-to-node listener (trusted network only: no TLS or authentication).
    pub bind: SocketAddr,
    /// The initial members as `"ID@HOST:PORT"`, this node included; the same list on
    /// every node.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The cluster's name: nodes with different names refuse each other. Default `roost`.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// A node joining a running cluster: it waits to be added through the admin API
    /// instead of forming a cluster with `peers`.
    #[serde(default)]
    pub join: bool,
    /// A replica of a queue partition is in sync (`in_sync` in the queue's placement)
    /// while it lags the partition's leader by at most this many milliseconds: it has
    /// every entry the leader had that long ago and answered the leader within it.
    /// At least twice the partitions' heartbeat interval (100 ms).
    #[serde(default = "default_in_sync_lag_ms")]
    pub in_sync_lag_ms: u64,
}

fn default_cluster_name() -> String {
    "roost".into()
}

fn default_in_sync_lag_ms() -> u64 {
    roost_cluster::DEFAULT_IN_SYNC_LAG_MS
}

impl ClusterTable {
    /// The engine-free settings of `roost-cluster`, checked.
    pub fn to_cluster_config(&self) -> Result<roost_cluster::ClusterConfig, ConfigError> {
        let peers = roost_cluster::ClusterConfig::parse_peers(&self.peers.join(","))
            .map_err(|why| invalid("cluster.peers", why))?;
        if self.node_id == 0 {
            return Err(invalid("cluster.node_id", "must be at least 1"));
        }
        if !self.join && !peers.is_empty() && !peers.contains_key(&self.node_id) {
            return Err(invalid(
                "cluster.peers",
                format!("does not name this node (node_id {})", self.node_id),
            ));
        }
        let timing = roost_cluster::Timing::default();
        if self.in_sync_lag_ms < 2 * timing.heartbeat_ms {
            return Err(invalid(
                "cluster.in_sync_lag_ms",
                format!(
                    "must be at least {} (twice the heartbeat interval: an idle replica answers once per heartbeat)",
                    2 * timing.heartbeat_ms
                ),
            ));
        }
        Ok(roost_cluster::ClusterConfig {
            node_id: self.node_id,
            bind: self.bind,
            peers,
            name: self.name.clone(),
            join: self.join,
            timing: roost_cluster::Timing {
                in_sync_lag_ms: self.in_sync_lag_ms,
                ..timing
            },
        })
    }
}

/// The `[storage]` table: how durable stored state is.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `fsync`: acknowledge after fdatasync (survives power loss); `buffered`:
    /// acknowledge after write(2) (survives a crash of roost), sync on an interval.
    pub durability: Durability,
    /// Sync interval of `buffered` durability, in milliseconds.
    pub sync_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            durability: Durability::Fsync,
            sync_interval_ms: 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            engine: Settings::default(),
            bind: vec![SocketAddr::from(([0, 0, 0, 0], 1883))],
            data_dir: PathBuf::from("./data"),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            sys_interval: 10,
            max_auth_checks: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_auth_waiting: 64,
            max_queues: 1000,
            tls_bind: Vec::new(),
            ws_bind: Vec::new(),
            wss_bind: Vec::new(),
            admin_bind: Vec::new(),
            admin_token: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_use_cn_as_username: false,
            password_file: None,
            acl_file: None,
            allow_anonymous: None,
            auth_hook: None,
            jwt_secret_file: None,
            jwt_public_key_file: None,
            jwt_username_claim: "sub".into(),
            jwt_audience: None,
            jwt_issuer: None,
            storage: StorageConfig::default(),
            queue_defaults: roost_queue::QueueConfig::default(),
            queue_auto_create: true,
            bridge: Vec::new(),
            queues: Default::default(),
            cluster: None,
        }
    }
}

/// What `roost --version` prints: the crate's version and the git commit it was built
/// from (`unknown` when built without git; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ROOST_GIT_COMMIT"),
    ")"
);

/// roost: an MQTT 3.1 / 3.1.1 / 5.0 broker.
///
/// Every flag can also be set in the TOML file given with --config, under the same name
/// with underscores (e.g. `max_inflight = 64`); flags win over the file.
#[derive(Debug, Parser)]
#[command(name = "roost", version = VERSION)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The engine's settings (the limits every client meets), one flag each.
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Listen for MQTT on ADDR:PORT; repeat for several listeners [default: 0.0.0.0:1883].
    #[arg(long, value_name = "ADDR:PORT")]
    pub bind: Vec<SocketAddr>,
    /// Data directory [default: ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// Seconds between `$SYS/broker/...` status updates; 0 turns them off [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub sys_interval: Option<u64>,
    /// Password checks run at once [default: one per CPU core].
    #[arg(long, value_name = "N")]
    pub max_auth_checks: Option<usize>,
    /// CONNECTs waiting for a password check before more get CONNACK 0x89 [default: 64].
    #[arg(long, value_name = "N")]
    pub max_auth_waiting: Option<usize>,
    /// `$queue/` queues clients and the admin API may create; 0: no limit [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_queues: Option<usize>,
    /// Listen for MQTT over TLS on ADDR:PORT; repeatable (needs --tls-cert, --tls-key).
    #[arg(long, value_name = "ADDR:PORT")]
    pub tls_bind: Vec<SocketAddr>,
    /// Listen for MQTT over WebSocket (path /mqtt) on ADDR:PORT; repeatable.
    #[arg(long, value_name = "ADDR:PORT")]
    pub ws_bind: Vec<SocketAddr>,
    /// Listen for MQTT over WebSocket with TLS on ADDR:PORT; repeatable (uses --tls-cert, --tls-key).
    #[arg(long, value_name = "ADDR:PORT")]
    pub wss_bind: Vec<SocketAddr>,
    /// Serve the HTTP admin API (/metrics, /health, /ready, /api/v1) on ADDR:PORT;
    /// repeatable [default: off].
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_bind: Vec<SocketAddr>,
    /// Bearer token for the admin API; required when --admin-bind is not loopback.
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,
    /// PEM certificate chain for the TLS listeners; re-read on SIGHUP.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert; re-read on SIGHUP.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: require TLS clients to present a certificate they issued.
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Use the client certificate's Common Name as the MQTT username [default: false].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub tls_use_cn_as_username: Option<bool>,
    /// Password file (create it with `roost passwd`); re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// ACL file; re-read on SIGHUP [default: none, any topic allowed].
    #[arg(long, value_name = "FILE")]
    pub acl_file: Option<PathBuf>,
    /// Let clients without a username connect [default: false with a password file or
    /// auth hook, else true].
    #[arg(long, value_name = "true|false", action = clap::ArgAction::Set)]
    pub allow_anonymous: Option<bool>,
    /// auth_hook.url: http:// URL asked whether a client may connect.
    #[arg(long, value_name = "URL")]
    pub auth_hook_url: Option<String>,
    /// auth_hook.timeout_ms: longest wait for the hook [default: 2000].
    #[arg(long, value_name = "MS")]
    pub auth_hook_timeout_ms: Option<u64>,
    /// auth_hook.cache_seconds: reuse of an allow/deny answer; 0 disables [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub auth_hook_cache_seconds: Option<u64>,
    /// auth_hook.on_error: deny (CONNACK 0x86 / 4) or unavailable (0x88 / 3) when the hook
    /// cannot answer [default: unavailable].
    #[arg(long, value_name = "POLICY", value_parser = parse_hook_error)]
    pub auth_hook_on_error: Option<HookErrorPolicy>,
    /// HMAC secret (HS256/384/512) of the JWTs clients give as their password.
    #[arg(long, value_name = "FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key or JWKS file of the JWTs clients give as their password.
    #[arg(long, value_name = "FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWT claim that names the user [default: sub].
    #[arg(long, value_name = "CLAIM")]
    pub jwt_username_claim: Option<String>,
    /// `aud` a JWT must name [default: not checked].
    #[arg(long, value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// `iss` a JWT must have [default: not checked].
    #[arg(long, value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,
    /// `roost passwd`: manage a password file (run `roost passwd --help`).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// storage.durability: fsync (ack after fdatasync) or buffered (ack after write) [default: fsync].
    #[arg(long, value_name = "MODE", value_parser = parse_durability)]
    pub storage_durability: Option<Durability>,
    /// storage.sync_interval_ms: sync interval of buffered durability [default: 1000].
    #[arg(long, value_name = "MS")]
    pub storage_sync_interval_ms: Option<u64>,
    /// `cluster.node_id`: this node's id in a cluster (at least 1).
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,
    /// `cluster.bind`: the node-to-node listener.
    #[arg(long, value_name = "ADDR:PORT")]
    pub cluster_bind: Option<SocketAddr>,
    /// `cluster.peers`: the initial members, `ID@HOST:PORT,ID@HOST:PORT,...`.
    #[arg(long, value_name = "LIST")]
    pub cluster_peers: Option<String>,
    /// `cluster.name`: nodes of different clusters refuse each other.
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// `cluster.join`: join a running cluster (wait to be added) instead of forming one.
    #[arg(long)]
    pub cluster_join: bool,
}

/// Subcommands of `roost` (without one, roost runs the broker).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Add, change (-b or prompt) or delete (-D) a user in a password file.
    Passwd(crate::security::passwd::PasswdArgs),
    /// List and manage the queues of a running roost through its admin API.
    Queues(crate::operations::queues_command::QueuesArgs),
}

fn parse_hook_error(s: &str) -> Result<HookErrorPolicy, String> {
    match s {
        "deny" => Ok(HookErrorPolicy::Deny),
        "unavailable" => Ok(HookErrorPolicy::Unavailable),
        other => Err(format!("{other:?} is not deny or unavailable")),
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("{other:?} is not text or json")),
    }
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "buffered" => Ok(Durability::Buffered),
        other => Err(format!("{other:?} is not fsync or buffered")),
    }
}

/// Why the configuration cannot be used. Every message names the key at fault (or the
/// file, then the key), as the user wrote it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The `--config` file holds an error (the key's, in `source`).
    #[error("in config file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong in it.
        source: Box<ConfigError>,
    },
    /// Not TOML, or a key that is unknown or has a value of the wrong type (the toml
    /// parser's message names the key).
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// A value that parses but makes no sense, or keys that need one another.
    #[error("{key}: {why}")]
    Invalid {
        /// The key (or keys) at fault, as in the file.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
    /// One of the engine's settings is out of range (the message starts with its key).
    #[error("{0}")]
    Settings(String),
}

/// A [`ConfigError::Invalid`].
fn invalid(key: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        why: why.into(),
    }
}

impl Config {
    /// Builds the configuration from parsed flags, reading `--config` if given.
    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if !cli.bind.is_empty() {
            config.bind = cli.bind;
        }
        for (flag, key) in [
            (cli.tls_bind, &mut config.tls_bind),
            (cli.ws_bind, &mut config.ws_bind),
            (cli.wss_bind, &mut config.wss_bind),
            (cli.admin_bind, &mut config.admin_bind),
        ] {
            if !flag.is_empty() {
                *key = flag;
            }
        }
        for (flag, key) in [
            (cli.tls_cert, &mut config.tls_cert),
            (cli.tls_key, &mut config.tls_key),
            (cli.tls_client_ca, &mut config.tls_client_ca),
        ] {
            if flag.is_some() {
                *key = flag;
            }
        }
        if let Some(v) = cli.tls_use_cn_as_username {
            config.tls_use_cn_as_username = v;
        }
        if cli.admin_token.is_some() {
            config.admin_token = cli.admin_token;
        }
        for (flag, key) in [
            (cli.jwt_secret_file, &mut config.jwt_secret_file),
            (cli.jwt_public_key_file, &mut config.jwt_public_key_file),
        ] {
            if flag.is_some() {
                *key = flag;
            }
        }
        for (flag, key) in [
            (cli.jwt_audience, &mut config.jwt_audience),
            (cli.jwt_issuer, &mut config.jwt_issuer),
        ] {
            if flag.is_some() {
                *key = flag;
            }
        }
        if let Some(claim) = cli.jwt_username_claim {
            config.jwt_username_claim = claim;
        }
        macro_rules! flag {
            ($($name:ident),*) => { $( if let Some(v) = cli.$name { config.$name = v; } )* };
        }
        flag!(
            data_dir,
            log_level,
            log_format,
            sys_interval,
            max_auth_checks,
            max_auth_waiting,
            max_queues
        );
        cli.engine.apply(&mut config.engine);
        if let Some(d) = cli.storage_durability {
            config.storage.durability = d;
        }
        if let Some(ms) = cli.storage_sync_interval_ms {
            config.storage.sync_interval_ms = ms;
        }
        if cli.node_id.is_some()
            || cli.cluster_bind.is_some()
            || cli.cluster_peers.is_some()
            || cli.cluster_name.is_some()
            || cli.cluster_join
        {
            let table = config.cluster.get_or_insert_with(|| ClusterTable {
                node_id: 0,
                bind: SocketAddr::from(([127, 0, 0, 1], 7883)),
                peers: Vec::new(),
                name: default_cluster_name(),
                join: false,
                in_sync_lag_ms: default_in_sync_lag_ms(),
            });
            if let Some(id) = cli.node_id {
                table.node_id = id;
            }
            if let Some(bind) = cli.cluster_bind {
                table.bind = bind;
            }
            if let Some(peers) = cli.cluster_peers {
                table.peers = peers.split(',').map(str::to_owned).collect();
            }
            if let Some(name) = cli.cluster_name {
                table.name = name;
            }
            table.join |= cli.cluster_join;
        }
        config.apply_auth_flags(
            cli.password_file,
            cli.acl_file,
            cli.allow_anonymous,
            AuthHookFlags {
                url: cli.auth_hook_url,
                timeout_ms: cli.auth_hook_timeout_ms,
                cache_seconds: cli.auth_hook_cache_seconds,
                on_error: cli.auth_hook_on_error,
            },
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Parses TOML text: the engine's keys (see [`Settings::KEYS`]) into
    /// [`Config::engine`], the others into the rest of [`Config`]; a key that is
    /// neither is an error that names it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text)?;
        let mut engine = toml::Table::new();
        for key in Settings::KEYS {
            if let Some(v) = table.remove(*key) {
                engine.insert((*key).to_owned(), v);
            }
        }
        let mut config: Config = table.try_into()?;
        config.engine = engine.try_into()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.is_empty()
            && self.tls_bind.is_empty()
            && self.ws_bind.is_empty()
            && self.wss_bind.is_empty()
        {
            return Err(invalid(
                "bind",
                "at least one listen address is needed (bind, tls_bind, ws_bind or wss_bind)",
            ));
        }
        self.validate_tls()?;
        self.validate_auth()?;
        self.validate_bridges()?;
        self.validate_admin()?;
        if let Some(cluster) = &self.cluster {
            cluster.to_cluster_config()?;
        }
        self.engine.validate().map_err(ConfigError::Settings)?;
        if self.max_auth_checks == 0 {
            return Err(invalid("max_auth_checks", "must be at least 1"));
        }
        if self.storage.sync_interval_ms == 0 {
            return Err(invalid("storage.sync_interval_ms", "must be at least 1"));
        }
        let level = self.log_level.trim();
        let simple = ["error", "warn", "info", "debug", "trace", "off"];
        if level.is_empty()
            || (!level.contains('=') && !simple.contains(&level.to_ascii_lowercase().as_str()))
        {
            return Err(invalid(
                "log_level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace, off",
                    self.log_level
                ),
            ));
        }
        Ok(())
    }

    /// TLS keys must come together: a TLS listener needs a certificate and key, and the
    /// client-certificate keys need a TLS listener to apply to.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let tls_listener = !self.tls_bind.is_empty() || !self.wss_bind.is_empty();
        for (key, listeners) in [("tls_bind", &self.tls_bind), ("wss_bind", &self.wss_bind)] {
            if !listeners.is_empty() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
                return Err(invalid(
                    key,
                    "a TLS listener needs both tls_cert and tls_key",
                ));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid("tls_cert and tls_key", "set both or neither"));
        }
        if !tls_listener {
            for (key, set) in [
                ("tls_cert", self.tls_cert.is_some()),
                ("tls_client_ca", self.tls_client_ca.is_some()),
                ("tls_use_cn_as_username", self.tls_use_cn_as_username),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "set, but there is no tls_bind or wss_bind listener to use it",
                    ));
                }
            }
        }
        if self.tls_use_cn_as_username && self.tls_client_ca.is_none() {
            return Err(invalid(
                "tls_use_cn_as_username",
                "needs tls_client_ca (client certificates are only verified with it)",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Each bridge's settings make sense, and names are unique.
    fn validate_bridges(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for b in &self.bridge {
            b.validate()
                .map_err(|why| invalid("bridge", format!("{:?}: {why}", b.name)))?;
            if !names.insert(&b.name) {
                return Err(invalid(
                    "bridge",
                    format!("two bridges are named {:?}", b.name),
                ));
            }
        }
        Ok(())
    }

    /// The admin API controls queues and clients: beyond loopback it needs a token.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        if let Some(token) = &self.admin_token {
            if token.trim().is_empty() || token.chars().any(|c| c.is_ascii_control()) {
                return Err(invalid("admin_token", "must be non-empty printable text"));
            }
            if self.admin_bind.is_empty() {
                return Err(invalid(
                    "admin_token",
                    "set, but there is no admin_bind listener to use it",
                ));
            }
        } else if let Some(addr) = self.admin_bind.iter().find(|a| !a.ip().is_loopback()) {
            return Err(invalid(
                "admin_bind",
                format!(
                    "{addr} is not a loopback address, so admin_token is required (the admin API can delete queues and disconnect clients)"
                ),
            ));
        }
        Ok(())
    }
}

/// The `--auth-hook-*` flags, applied over the `[auth_hook]` table.
pub struct AuthHookFlags {
    url: Option<String>,
    timeout_ms: Option<u64>,
    cache_seconds: Option<u64>,
    on_error: Option<HookErrorPolicy>,
}

impl Config {
    /// Whether clients without a username may connect, after the default applies.
    pub fn allow_anonymous_in_force(&self) -> bool {
        self.allow_anonymous.unwrap_or(
            self.password_file.is_none() && self.auth_hook.is_none() && self.jwt().is_none(),
        )
    }

    /// The JWT settings, when a key file is configured.
    pub fn jwt(&self) -> Option<JwtSettings> {
        let key = match (&self.jwt_secret_file, &self.jwt_public_key_file) {
            (Some(p), _) => KeySource::Secret(p.clone()),
            (None, Some(p)) => KeySource::PublicKey(p.clone()),
            (None, None) => return None,
        };
        Some(JwtSettings {
            key,
            username_claim: self.jwt_username_claim.clone(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        })
    }

    fn apply_auth_flags(
        &mut self,
        password_file: Option<PathBuf>,
        acl_file: Option<PathBuf>,
        allow_anonymous: Option<bool>,
        hook: AuthHookFlags,
    ) -> Result<(), ConfigError> {
        if password_file.is_some() {
            self.password_file = password_file;
        }
        if acl_file.is_some() {
            self.acl_file = acl_file;
        }
        if allow_anonymous.is_some() {
            self.allow_anonymous = allow_anonymous;
        }
        if let Some(url) = hook.url {
            match &mut self.auth_hook {
                Some(h) => h.url = url,
                None => {
                    self.auth_hook = Some(AuthHookConfig {
                        url,
                        timeout_ms: AuthHookConfig::default_timeout_ms(),
                        cache_seconds: AuthHookConfig::default_cache_seconds(),
                        on_error: HookErrorPolicy::default(),
                    })
                }
            }
        }
        let set = [
            ("auth_hook.timeout_ms", hook.timeout_ms.is_some()),
            ("auth_hook.cache_seconds", hook.cache_seconds.is_some()),
            ("auth_hook.on_error", hook.on_error.is_some()),
        ];
        let Some(h) = &mut self.auth_hook else {
            if let Some((key, _)) = set.iter().find(|(_, s)| *s) {
                return Err(invalid(
                    key,
                    "set, but there is no auth_hook.url (--auth-hook-url)",
                ));
            }
            return Ok(());
        };
        if let Some(v) = hook.timeout_ms {
            h.timeout_ms = v;
        }
        if let Some(v) = hook.cache_seconds {
            h.cache_seconds = v;
        }
        if let Some(v) = hook.on_error {
            h.on_error = v;
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        if self.jwt_secret_file.is_some() && self.jwt_public_key_file.is_some() {
            return Err(invalid(
                "jwt_secret_file and jwt_public_key_file",
                "set one or the other",
            ));
        }
        if self.jwt_username_claim.is_empty() {
            return Err(invalid("jwt_username_claim", "must not be empty"));
        }
        if self.jwt().is_none() {
            for (key, set) in [
                ("jwt_audience", self.jwt_audience.is_some()),
                ("jwt_issuer", self.jwt_issuer.is_some()),
                ("jwt_username_claim", self.jwt_username_claim != "sub"),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "set, but there is no jwt_secret_file or jwt_public_key_file",
                    ));
                }
            }
        }
        if let Some(h) = &self.auth_hook {
            crate::security::auth_hook::HookUrl::parse(&h.url)
                .map_err(|why| invalid("auth_hook.url", why))?;
            if h.timeout_ms == 0 || h.timeout_ms > 60_000 {
                return Err(invalid(
                    "auth_hook.timeout_ms",
                    format!("{} is outside 1..=60000", h.timeout_ms),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of a value serialized to JSON; nested tables as `table.key`.
    fn keys(value: serde_json::Value, prefix: &str) -> Vec<String> {
        match value {
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(k, _)| format!("{prefix}{k}"))
                .collect(),
            other => panic!("not a table: {other}"),
        }
    }

    /// Every key roost reads, from each part's settings struct (the engine's
    /// `Settings`, the shell's `Config` with its `[storage]` and `[auth_hook]` tables);
    /// tables of their own (`queue_defaults`, `queues`) by their name.
    fn every_key() -> std::collections::BTreeSet<String> {
        let config = Config::default();
        let mut real: std::collections::BTreeSet<String> =
            Settings::KEYS.iter().map(|k| (*k).to_owned()).collect();
        for key in keys(serde_json::to_value(&config).expect("json"), "") {
            match key.as_str() {
                "storage" => real.extend(keys(
                    serde_json::to_value(&config.storage).expect("json"),
                    "storage.",
                )),
                "auth_hook" => real.extend(keys(
                    serde_json::to_value(AuthHookConfig {
                        url: "http://h/".into(),
                        timeout_ms: 1,
                        cache_seconds: 1,
                        on_error: HookErrorPolicy::Deny,
                    })
                    .expect("json"),
                    "auth_hook.",
                )),
                "cluster" => real.extend(keys(
                    serde_json::to_value(ClusterTable {
                        node_id: 1,
                        bind: SocketAddr::from(([127, 0, 0, 1], 7883)),
                        peers: Vec::new(),
                        name: default_cluster_name(),
                        join: false,
                        in_sync_lag_ms: default_in_sync_lag_ms(),
                    })
                    .expect("json"),
                    "cluster.",
                )),
                _ => {
                    real.insert(key);
                }
            }
        }
        real
    }

    /// dist/roost.toml, the example operators install, parses as it is, and names every
    /// key roost reads (set, or commented out) and every `[queue_defaults]` key.
    #[test]
    fn the_dist_example_parses_and_names_every_key() {
        let text = include_str!("../../dist/roost.toml");
        let config = Config::from_toml(text).expect("dist/roost.toml parses");
        assert_eq!(config.jwt_username_claim, "sub");
        let mut named = std::collections::BTreeSet::new();
        let mut table = String::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(header) = line.strip_prefix("[[").or(line.strip_prefix('[')) {
                let header = header.split(']').next().unwrap_or_default();
                table = header.split('.').next().unwrap_or_default().to_owned();
                if matches!(table.as_str(), "queue_defaults" | "queues" | "bridge") {
                    named.insert(table.clone());
                }
                continue;
            }
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.contains(' ') {
                continue;
            }
            if table == "bridge" {
                // The `[[bridge]]` keys are checked by the bridge's own tests.
                continue;
            }
            named.insert(match table.as_str() {
                "" => key.to_owned(),
                "queue_defaults" | "queues" => format!("queue_defaults.{key}"),
                t => format!("{t}.{key}"),
            });
        }
        let mut wanted = every_key();
        wanted.extend(keys(
            serde_json::to_value(roost_queue::QueueConfig::default()).expect("json"),
            "queue_defaults.",
        ));
        let missing: Vec<_> = wanted.difference(&named).collect();
        let unknown: Vec<_> = named.difference(&wanted).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "dist/roost.toml lacks {missing:?} and names keys roost does not read: {unknown:?}"
        );
    }

    /// The README's configuration table lists every key roost reads, and no other:
    /// each part's settings struct is the truth (the engine's `Settings`, the shell's
    /// `Config` with its `[storage]` and `[auth_hook]` tables), and the example of
    /// `[queue_defaults]` in the Queues section names every queue setting.
    #[test]
    fn the_readme_documents_every_key_and_no_other() {
        let readme = include_str!("../../README.md");
        let table = &readme[readme.find("## Configuration").expect("section")
            ..readme.find("## Secure deployment").expect("next section")];
        let documented: std::collections::BTreeSet<String> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_owned)
            .collect();
        let real = every_key();
        let missing: Vec<_> = real.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&real).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "README table lacks {missing:?} and names keys roost does not read: {unknown:?}"
        );

        let queues = &readme[readme.find("\n[queue_defaults]\n").expect("example") + 1..];
        let example: std::collections::BTreeSet<String> = queues
            .lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("```"))
            .filter_map(|l| l.trim_start_matches("# ").split_once(" = "))
            .map(|(k, _)| k.trim().to_owned())
            .collect();
        let queue_keys: std::collections::BTreeSet<String> = keys(
            serde_json::to_value(roost_queue::QueueConfig::default()).expect("json"),
            "",
        )
        .into_iter()
        .filter(|k| k != "capture_filters")
        .collect();
        assert_eq!(
            example, queue_keys,
            "the [queue_defaults] example in the README"
        );
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults");
        assert_eq!(
            Config::from_toml("").expect("empty file"),
            Config::default()
        );
    }

    #[test]
    fn file_keys() {
        let c = Config::from_toml(
            "bind = [\"127.0.0.1:1999\", \"[::1]:1999\"]\nmax_inflight = 7\ndata_dir = \"/tmp/x\"\n",
        )
        .expect("valid");
        assert_eq!(c.bind.len(), 2);
        assert_eq!(c.engine.max_inflight, 7);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("max_infligth = 3\n").expect_err("unknown key");
        assert!(e.to_string().contains("max_infligth"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = Config::from_toml("max_inflight = \"many\"\n").expect_err("bad type");
        assert!(e.to_string().contains("max_inflight"), "{e}");
        let e = Config::from_toml("max_inflight = 0\n").expect_err("zero");
        assert!(e.to_string().contains("max_inflight"), "{e}");
        let e = Config::from_toml("bind = [\"nowhere\"]\n").expect_err("bad addr");
        assert!(e.to_string().contains("bind"), "{e}");
        let e = Config::from_toml("log_level = \"loud\"\n").expect_err("bad level");
        assert!(e.to_string().contains("log_level"), "{e}");
    }

    #[test]
    fn listener_keys() {
        let c = Config::from_toml(
            "bind = []\ntls_bind = [\"127.0.0.1:8883\"]\nws_bind = [\"127.0.0.1:8080\"]\n\
             wss_bind = [\"[::1]:8443\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
             tls_client_ca = \"ca.pem\"\ntls_use_cn_as_username = true\n",
        )
        .expect("valid");
        assert!(c.bind.is_empty());
        assert_eq!(c.tls_bind, vec![SocketAddr::from(([127, 0, 0, 1], 8883))]);
        assert_eq!(c.ws_bind.len(), 1);
        assert_eq!(c.wss_bind.len(), 1);
        assert_eq!(c.tls_client_ca, Some(PathBuf::from("ca.pem")));
        assert!(c.tls_use_cn_as_username);
        // Plain WebSocket alone is a complete set of listeners.
        Config::from_toml("bind = []\nws_bind = [\"127.0.0.1:8080\"]\n").expect("ws only");
    }

    #[test]
    fn tls_keys_must_come_together() {
        for (text, names) in [
            (
                "tls_bind = [\"127.0.0.1:8883\"]\n",
                &["tls_bind", "tls_cert", "tls_key"][..],
            ),
            (
                "wss_bind = [\"127.0.0.1:8443\"]\ntls_cert = \"c.pem\"\n",
                &["wss_bind", "tls_key"],
            ),
            (
                "tls_bind = [\"127.0.0.1:8883\"]\ntls_key = \"k.pem\"\n",
                &["tls_bind", "tls_cert"],
            ),
            (
                "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
                &["tls_cert", "tls_bind"],
            ),
            ("tls_client_ca = \"ca.pem\"\n", &["tls_client_ca"]),
            (
                "tls_bind = [\"127.0.0.1:8883\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
                 tls_use_cn_as_username = true\n",
                &["tls_use_cn_as_username", "tls_client_ca"],
            ),
            ("bind = []\n", &["bind"]),
        ] {
            let e = Config::from_toml(text).expect_err(text);
            for name in names {
                assert!(e.to_string().contains(name), "{text}: {e}");
            }
        }
    }

    #[test]
    fn tls_flags() {
        let cli = Cli::parse_from([
            "roost",
            "--tls-bind",
            "127.0.0.1:8883",
            "--wss-bind",
            "127.0.0.1:8443",
            "--ws-bind",
            "127.0.0.1:8080",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
            "--tls-use-cn-as-username",
            "true",
        ]);
        let c = Config::from_cli(cli).expect("valid");
        assert_eq!(c.tls_bind, vec![SocketAddr::from(([127, 0, 0, 1], 8883))]);
        assert_eq!(c.wss_bind, vec![SocketAddr::from(([127, 0, 0, 1], 8443))]);
        assert_eq!(c.ws_bind, vec![SocketAddr::from(([127, 0, 0, 1], 8080))]);
        assert_eq!(c.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(c.tls_key, Some(PathBuf::from("k.pem")));
        assert!(c.tls_use_cn_as_username);
        let cli = Cli::parse_from(["roost", "--tls-bind", "127.0.0.1:8883"]);
        let e = Config::from_cli(cli).expect_err("no cert");
        assert!(e.to_string().contains("tls_cert"), "{e}");
    }

    #[test]
    fn auth_keys_and_flags() {
        let c = Config::from_toml(
            "password_file = \"/etc/roost/passwd\"\nacl_file = \"/etc/roost/acl\"\n\
             [auth_hook]\nurl = \"http://127.0.0.1:9000/auth\"\non_error = \"deny\"\n",
        )
        .expect("valid");
        assert_eq!(c.password_file, Some(PathBuf::from("/etc/roost/passwd")));
        assert_eq!(c.acl_file, Some(PathBuf::from("/etc/roost/acl")));
        let hook = c.auth_hook.clone().expect("hook");
        assert_eq!((hook.timeout_ms, hook.cache_seconds), (2000, 60));
        assert_eq!(hook.on_error, HookErrorPolicy::Deny);
        assert!(
            !c.allow_anonymous_in_force(),
            "closed once users are configured"
        );
        assert!(Config::default().allow_anonymous_in_force());
        let c =
            Config::from_toml("password_file = \"p\"\nallow_anonymous = true\n").expect("valid");
        assert!(c.allow_anonymous_in_force());

        let cli = Cli::parse_from([
            "roost",
            "--password-file",
            "p",
            "--acl-file",
            "a",
            "--allow-anonymous",
            "true",
            "--auth-hook-url",
            "http://localhost:1/x",
            "--auth-hook-timeout-ms",
            "300",
            "--auth-hook-cache-seconds",
            "0",
            "--auth-hook-on-error",
            "unavailable",
        ]);
        let c = Config::from_cli(cli).expect("valid");
        assert_eq!(c.acl_file, Some(PathBuf::from("a")));
        assert_eq!(c.allow_anonymous, Some(true));
        let hook = c.auth_hook.expect("hook");
        assert_eq!((hook.timeout_ms, hook.cache_seconds), (300, 0));
        assert_eq!(hook.on_error, HookErrorPolicy::Unavailable);
    }

    #[test]
    fn auth_errors_name_the_key() {
        for (text, key) in [
            ("[auth_hook]\ntimeout_ms = 5\n", "url"),
            ("[auth_hook]\nurl = \"https://x/\"\n", "auth_hook.url"),
            (
                "[auth_hook]\nurl = \"http://x/\"\ntimeout_ms = 0\n",
                "auth_hook.timeout_ms",
            ),
            (
                "[auth_hook]\nurl = \"http://x/\"\non_error = \"shrug\"\n",
                "on_error",
            ),
            ("[auth_hook]\nurl = \"http://x/\"\nretries = 3\n", "retries"),
            ("allow_anonymous = \"maybe\"\n", "allow_anonymous"),
        ] {
            let e = Config::from_toml(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        let cli = Cli::parse_from(["roost", "--auth-hook-timeout-ms", "5"]);
        let e = Config::from_cli(cli).expect_err("no url");
        assert!(e.to_string().contains("auth_hook.timeout_ms"), "{e}");
        assert!(Cli::try_parse_from(["roost", "--allow-anonymous", "perhaps"]).is_err());
    }

    #[test]
    fn admin_keys_and_flags() {
        assert!(Config::default().admin_bind.is_empty(), "off by default");
        let c = Config::from_toml("admin_bind = [\"127.0.0.1:8081\", \"[::1]:8081\"]\n")
            .expect("loopback needs no token");
        assert_eq!(c.admin_bind.len(), 2);
        assert_eq!(c.admin_token, None);
        let c = Config::from_toml("admin_bind = [\"0.0.0.0:8081\"]\nadmin_token = \"s3cret\"\n")
            .expect("token given");
        assert_eq!(c.admin_token.as_deref(), Some("s3cret"));
        for (text, names) in [
            (
                "admin_bind = [\"0.0.0.0:8081\"]\n",
                &["admin_bind", "admin_token"][..],
            ),
            (
                "admin_bind = [\"127.0.0.1:8081\", \"10.0.0.1:8081\"]\n",
                &["admin_bind", "admin_token", "10.0.0.1"],
            ),
            ("admin_token = \"t\"\n", &["admin_token", "admin_bind"]),
            (
                "admin_bind = [\"127.0.0.1:8081\"]\nadmin_token = \" \"\n",
                &["admin_token"],
            ),
            ("admin_bind = [\"nowhere\"]\n", &["admin_bind"]),
        ] {
            let e = Config::from_toml(text).expect_err(text);
            for name in names {
                assert!(e.to_string().contains(name), "{text}: {e}");
            }
        }
        let cli = Cli::parse_from([
            "roost",
            "--admin-bind",
            "127.0.0.1:8081",
            "--admin-bind",
            "0.0.0.0:8082",
            "--admin-token",
            "t",
        ]);
        let c = Config::from_cli(cli).expect("valid");
        assert_eq!(c.admin_bind.len(), 2);
        assert_eq!(c.admin_token.as_deref(), Some("t"));
        let cli = Cli::parse_from(["roost", "--admin-bind", "0.0.0.0:8081"]);
        let e = Config::from_cli(cli).expect_err("no token");
        assert!(e.to_string().contains("admin_token"), "{e}");
    }

    #[test]
    fn passwd_subcommand() {
        let cli = Cli::parse_from(["roost", "passwd", "-b", "f", "alice", "pw"]);
        let Some(Command::Passwd(args)) = cli.command else {
            panic!("passwd subcommand");
        };
        assert!(args.batch && !args.delete);
        assert_eq!(args.password.as_deref(), Some("pw"));
        let cli = Cli::parse_from(["roost", "passwd", "-D", "f", "alice"]);
        assert!(matches!(cli.command, Some(Command::Passwd(a)) if a.delete));
        assert!(Cli::try_parse_from(["roost", "passwd", "-b", "-D", "f", "alice"]).is_err());
    }

    #[test]
    fn storage_table() {
        let c = Config::from_toml("[storage]\ndurability = \"buffered\"\nsync_interval_ms = 250\n")
            .expect("valid");
        assert_eq!(c.storage.durability, Durability::Buffered);
        assert_eq!(c.storage.sync_interval_ms, 250);
        let e = Config::from_toml("[storage]\ndurability = \"sometimes\"\n").expect_err("bad mode");
        assert!(e.to_string().contains("durability"), "{e}");
        let e = Config::from_toml("[storage]\nfsync = true\n").expect_err("unknown key");
        assert!(e.to_string().contains("fsync"), "{e}");
    }

    #[test]
    fn file_errors_name_the_file_then_the_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("roost.toml");
        let e = Config::from_file(&file).expect_err("missing");
        assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read config file {}: ", file.display())),
            "{e}"
        );
        std::fs::write(&file, "max_auth_checks = 0\n").expect("write");
        let e = Config::from_file(&file).expect_err("invalid");
        assert_eq!(
            e.to_string(),
            format!(
                "in config file {}: max_auth_checks: must be at least 1",
                file.display()
            )
        );
    }

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("roost-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("roost.toml");
        std::fs::write(&file, "max_inflight = 5\nmax_queued_messages = 9\n").expect("write");
        let cli = Cli::parse_from([
            "roost",
            "--config",
            file.to_str().expect("utf8"),
            "--max-inflight",
            "6",
            "--bind",
            "127.0.0.1:1",
        ]);
        let c = Config::from_cli(cli).expect("valid");
        assert_eq!(c.engine.max_inflight, 6);
        assert_eq!(c.engine.max_queued_messages, 9);
        assert_eq!(c.bind, vec![SocketAddr::from(([127, 0, 0, 1], 1))]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// `in_sync_lag_ms` reaches the cluster's timing; below twice the heartbeat it is
    /// refused (every idle replica would flap in and out of sync).
    #[test]
    fn cluster_in_sync_lag_is_checked_and_passed_on() {
        let base = "[cluster]\nnode_id = 1\nbind = \"127.0.0.1:7000\"\n";
        let c = Config::from_toml(base).expect("parses");
        let timing = c
            .cluster
            .expect("cluster")
            .to_cluster_config()
            .expect("valid")
            .timing;
        assert_eq!(timing.in_sync_lag_ms, roost_cluster::DEFAULT_IN_SYNC_LAG_MS);
        let c = Config::from_toml(&format!("{base}in_sync_lag_ms = 250\n")).expect("parses");
        let timing = c
            .cluster
            .expect("cluster")
            .to_cluster_config()
            .expect("valid")
            .timing;
        assert_eq!(timing.in_sync_lag_ms, 250);
        for bad in ["0", "99"] {
            let e =
                Config::from_toml(&format!("{base}in_sync_lag_ms = {bad}\n")).expect_err("refused");
            assert!(e.to_string().contains("cluster.in_sync_lag_ms"), "{e}");
        }
        assert!(Config::from_toml(&format!("{base}in_sync_lag_ms = -1\n")).is_err());
    }
}
