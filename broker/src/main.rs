//! roost: an MQTT 3.1 / 3.1.1 / 5.0 broker (the binary; the broker is the
//! `roost_broker` library).

use std::process::ExitCode;

use clap::Parser;
use roost_broker::{config, server};

/// jemalloc, not glibc's malloc: a message is allocated on a tokio worker and freed on
/// the journal thread or the other worker, and glibc handles those frees under its
/// arena locks, with free-list consolidation on top. On the default queue bench
/// jemalloc gave 35% more messages a second for a third less CPU per message
/// (BENCHMARKS.md section 2), and less RSS per idle connection.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let mut cli = config::Cli::parse();
    match cli.command.take() {
        Some(config::Command::Passwd(args)) => return roost_broker::run_passwd(args),
        Some(config::Command::Queues(args)) => return roost_broker::run_queues(args),
        None => {}
    }
    // The library's errors carry their causes in their messages: `{e}` says it all.
    let config = match config::Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("roost: {e}");
            return ExitCode::from(2);
        }
    };
    // The embedded store's own info lines (segment and ingestion bookkeeping) are noise
    // at roost's info level; a full tracing directive in log_level overrides this.
    let directives = if config.log_level.contains('=') {
        config.log_level.clone()
    } else {
        format!(
            "{},fjall=warn,lsm_tree=warn,openraft=warn",
            config.log_level
        )
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        config::LogFormat::Json => logs.json().init(),
        config::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    // Tasks woken by one poll of the sockets run in the order their sockets became ready.
    // tokio's LIFO slot would run the last one first: a PUBLISH that arrived just after
    // another client's SUBSCRIBE was routed before the subscription existed whenever a
    // worker woke to both at once (a client sending both without yielding its CPU).
    // The knob is behind tokio's `tokio_unstable` cfg, set in .cargo/config.toml.
    #[cfg(tokio_unstable)]
    runtime.disable_lifo_slot();
    #[cfg(not(tokio_unstable))]
    tracing::warn!(
        "built without --cfg tokio_unstable (RUSTFLAGS replaces .cargo/config.toml): \
         a PUBLISH may be routed before a SUBSCRIBE that reached roost just before it"
    );
    let stalls =
        match roost_broker::StallDetector::install(&mut runtime, roost_broker::STALL_THRESHOLD) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("roost: cannot start the stall detector: {e}");
                return ExitCode::FAILURE;
            }
        };
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(config, stalls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("roost: {e}");
            ExitCode::FAILURE
        }
    }
}
