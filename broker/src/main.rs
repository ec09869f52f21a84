//! roost: an MQTT 3.1 / 3.1.1 / 5.0 broker.

mod acl;
mod admin;
mod auth;
mod auth_hook;
mod broker;
mod config;
mod connection;
mod metrics;
mod passwd;
mod persist;
mod protocol;
mod queues;
mod server;
mod session;
mod tls;
mod transport;
mod websocket;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let mut cli = config::Cli::parse();
    if let Some(config::Command::Passwd(args)) = cli.command.take() {
        return passwd::run(args);
    }
    let config = match config::Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("roost: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("roost: {e:#}");
            ExitCode::FAILURE
        }
    }
}
