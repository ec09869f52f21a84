//! Broker configuration: command-line flags over an optional TOML file over defaults.
//!
//! Every key of the TOML file is also a flag (`max_inflight` is `--max-inflight`); a
//! flag given on the command line wins over the file. Unknown keys and bad values are
//! errors that name the key, never silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

use crate::persist::Durability;

/// The broker's settings after merging defaults, file and flags.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP listeners for MQTT (all protocol versions on each).
    pub bind: Vec<SocketAddr>,
    /// Directory for roost's data; created when missing and locked while running.
    pub data_dir: PathBuf,
    /// Log filter: error, warn, info, debug or trace (or a tracing directive).
    pub log_level: String,
    /// Largest MQTT packet accepted, in bytes, fixed header included. Announced to
    /// v5 clients as Maximum Packet Size.
    pub max_packet_size: u32,
    /// Unacknowledged QoS 1/2 messages allowed in each direction per client: the
    /// Receive Maximum announced to v5 clients, and the cap of the outbound window.
    pub max_inflight: u16,
    /// QoS 1/2 messages held per session while it is offline or its window is full;
    /// past this, new messages for that session are dropped (and counted in the log).
    pub max_queued_messages: usize,
    /// Most levels a topic name or filter may have.
    pub max_topic_levels: usize,
    /// Most simultaneous client connections; further CONNECTs are refused.
    pub max_connections: usize,
    /// Topic aliases a v5 client may use towards the broker (0 disables them).
    pub topic_alias_maximum: u16,
    /// Longest keep-alive accepted, in seconds; a v5 client asking for more (or for 0)
    /// is told the Server Keep Alive. 0 means no limit.
    pub max_keep_alive: u16,
    /// Longest session expiry granted, in seconds (4294967295 = sessions never expire).
    /// Also applies to MQTT 3.x persistent sessions (clean session = 0).
    pub session_expiry_max: u32,
    /// Seconds a new connection has to send its CONNECT.
    pub connect_timeout: u16,
    /// Durable storage (the `[storage]` table).
    pub storage: StorageConfig,
}

/// The `[storage]` table: how durable stored state is.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
            bind: vec![SocketAddr::from(([0, 0, 0, 0], 1883))],
            data_dir: PathBuf::from("./data"),
            log_level: "info".into(),
            max_packet_size: 1024 * 1024,
            max_inflight: 1024,
            max_queued_messages: 1000,
            max_topic_levels: 128,
            max_connections: 100_000,
            topic_alias_maximum: 32,
            max_keep_alive: 65535,
            session_expiry_max: u32::MAX,
            connect_timeout: 10,
            storage: StorageConfig::default(),
        }
    }
}

/// roost: an MQTT 3.1 / 3.1.1 / 5.0 broker.
///
/// Every flag can also be set in the TOML file given with --config, under the same name
/// with underscores (e.g. `max_inflight = 64`); flags win over the file.
#[derive(Debug, Parser)]
#[command(name = "roost", version)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen for MQTT on ADDR:PORT; repeat for several listeners [default: 0.0.0.0:1883].
    #[arg(long, value_name = "ADDR:PORT")]
    pub bind: Vec<SocketAddr>,
    /// Data directory [default: ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Largest packet accepted, in bytes [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub max_packet_size: Option<u32>,
    /// Unacknowledged QoS 1/2 messages per client and direction [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u16>,
    /// QoS 1/2 messages queued per session before new ones are dropped [default: 1000].
    #[arg(long, value_name = "N")]
    pub max_queued_messages: Option<usize>,
    /// Most levels in a topic name or filter [default: 128].
    #[arg(long, value_name = "N")]
    pub max_topic_levels: Option<usize>,
    /// Most simultaneous connections [default: 100000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Topic aliases a v5 client may use towards the broker; 0 disables [default: 32].
    #[arg(long, value_name = "N")]
    pub topic_alias_maximum: Option<u16>,
    /// Longest keep-alive in seconds; 0 means no limit [default: 65535].
    #[arg(long, value_name = "SECONDS")]
    pub max_keep_alive: Option<u16>,
    /// Longest session expiry in seconds [default: 4294967295, never].
    #[arg(long, value_name = "SECONDS")]
    pub session_expiry_max: Option<u32>,
    /// Seconds a new connection has to send CONNECT [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub connect_timeout: Option<u16>,
    /// storage.durability: fsync (ack after fdatasync) or buffered (ack after write) [default: fsync].
    #[arg(long, value_name = "MODE", value_parser = parse_durability)]
    pub storage_durability: Option<Durability>,
    /// storage.sync_interval_ms: sync interval of buffered durability [default: 1000].
    #[arg(long, value_name = "MS")]
    pub storage_sync_interval_ms: Option<u64>,
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "buffered" => Ok(Durability::Buffered),
        other => Err(format!("{other:?} is not fsync or buffered")),
    }
}

impl Config {
    /// Builds the configuration from parsed flags, reading `--config` if given.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Config> {
        let mut config = match &cli.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if !cli.bind.is_empty() {
            config.bind = cli.bind;
        }
        macro_rules! flag {
            ($($name:ident),*) => { $( if let Some(v) = cli.$name { config.$name = v; } )* };
        }
        flag!(
            data_dir,
            log_level,
            max_packet_size,
            max_inflight,
            max_queued_messages,
            max_topic_levels,
            max_connections,
            topic_alias_maximum,
            max_keep_alive,
            session_expiry_max,
            connect_timeout
        );
        if let Some(d) = cli.storage_durability {
            config.storage.durability = d;
        }
        if let Some(ms) = cli.storage_sync_interval_ms {
            config.storage.sync_interval_ms = ms;
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Config::from_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses TOML text (keys as in [`Config`]).
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense; the error names the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.bind.is_empty() {
            bail!("bind: at least one listen address is needed");
        }
        // The smallest useful packet: a CONNECT with a short client id is ~14 bytes.
        if self.max_packet_size < 64 || self.max_packet_size > 268_435_460 {
            bail!(
                "max_packet_size: {} is outside 64..=268435460",
                self.max_packet_size
            );
        }
        if self.max_inflight == 0 {
            bail!("max_inflight: must be at least 1");
        }
        if self.max_topic_levels == 0 {
            bail!("max_topic_levels: must be at least 1");
        }
        if self.max_connections == 0 {
            bail!("max_connections: must be at least 1");
        }
        if self.storage.sync_interval_ms == 0 {
            bail!("storage.sync_interval_ms: must be at least 1");
        }
        if self.connect_timeout == 0 {
            bail!("connect_timeout: must be at least 1 second");
        }
        let level = self.log_level.trim();
        let simple = ["error", "warn", "info", "debug", "trace", "off"];
        if level.is_empty()
            || (!level.contains('=') && !simple.contains(&level.to_ascii_lowercase().as_str()))
        {
            bail!(
                "log_level: {:?} is not one of error, warn, info, debug, trace, off",
                self.log_level
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.max_inflight, 7);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("max_infligth = 3\n").expect_err("unknown key");
        assert!(format!("{e:#}").contains("max_infligth"), "{e:#}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = Config::from_toml("max_inflight = \"many\"\n").expect_err("bad type");
        assert!(format!("{e:#}").contains("max_inflight"), "{e:#}");
        let e = Config::from_toml("max_inflight = 0\n").expect_err("zero");
        assert!(format!("{e:#}").contains("max_inflight"), "{e:#}");
        let e = Config::from_toml("bind = [\"nowhere\"]\n").expect_err("bad addr");
        assert!(format!("{e:#}").contains("bind"), "{e:#}");
        let e = Config::from_toml("log_level = \"loud\"\n").expect_err("bad level");
        assert!(format!("{e:#}").contains("log_level"), "{e:#}");
    }

    #[test]
    fn storage_table() {
        let c = Config::from_toml("[storage]\ndurability = \"buffered\"\nsync_interval_ms = 250\n")
            .expect("valid");
        assert_eq!(c.storage.durability, Durability::Buffered);
        assert_eq!(c.storage.sync_interval_ms, 250);
        let e = Config::from_toml("[storage]\ndurability = \"sometimes\"\n").expect_err("bad mode");
        assert!(format!("{e:#}").contains("durability"), "{e:#}");
        let e = Config::from_toml("[storage]\nfsync = true\n").expect_err("unknown key");
        assert!(format!("{e:#}").contains("fsync"), "{e:#}");
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
        assert_eq!(c.max_inflight, 6);
        assert_eq!(c.max_queued_messages, 9);
        assert_eq!(c.bind, vec![SocketAddr::from(([127, 0, 0, 1], 1))]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
