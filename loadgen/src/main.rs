//! roost-bench: an MQTT load generator for roost and any other MQTT broker.
//!
//! Its own lean client on roost-core's codec ([`client`]), many connections per tokio
//! task ([`worker`]), end-to-end latency from a stamp in each payload ([`stamp`]) into
//! HDR histograms, exact loss and duplicate accounting from per-publisher sequence
//! numbers ([`stats`]). See `roost-bench --help` and the README's "Load generator".
//!
//! Exit status: 0 when the run completed (whatever it measured), 1 when it could not
//! be set up (e.g. the broker refused or is not there) or hit its hard timeout, 2 for
//! bad arguments.

mod cli;
mod client;
mod connect;
mod control;
mod pacer;
mod run;
mod stamp;
mod stats;
mod summary;
mod worker;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::cli::Cli;
use crate::control::Control;
use crate::run::SetupFailed;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli
        .common
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roost-bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let limit = run::hard_timeout(&cli);
    let ctl = Arc::new(Control::new());
    let outcome =
        runtime.block_on(async { tokio::time::timeout(limit, run::run(&cli, ctl.clone())).await });
    let code = match outcome {
        Ok(Ok(summary)) => {
            let text = if cli.common.json {
                serde_json::to_string_pretty(&summary).map(|j| j + "\n")
            } else {
                Ok(summary.render())
            };
            match text {
                Ok(t) => run::print_out(&t),
                Err(e) => eprintln!("roost-bench: cannot write JSON: {e}"),
            }
            0
        }
        Ok(Err(e)) => {
            if let (true, Some(SetupFailed(summary))) =
                (cli.common.json, e.downcast_ref::<SetupFailed>())
                && let Ok(j) = serde_json::to_string_pretty(summary)
            {
                run::print_out(&(j + "\n"));
            }
            eprintln!("roost-bench: {}", e.root_cause_or_self());
            1
        }
        Err(_) => {
            eprintln!(
                "roost-bench: hard timeout: the run did not finish within {limit:?} \
                 (phase {:?}, {} connected, {} failed, {} sent, {} delivered); \
                 is the broker stalled? (--timeout raises the limit)",
                ctl.phase(),
                ctl.connected.load(std::sync::atomic::Ordering::Relaxed),
                ctl.failed.load(std::sync::atomic::Ordering::Relaxed),
                ctl.sent.load(std::sync::atomic::Ordering::Relaxed),
                ctl.delivered.load(std::sync::atomic::Ordering::Relaxed),
            );
            for (kind, n) in ctl.errors() {
                eprintln!("  {n} x {kind}");
            }
            1
        }
    };
    // Do not wait for connections still open in tasks: the report is out.
    runtime.shutdown_background();
    ExitCode::from(code)
}

/// The error's message without the `SetupFailed` context wrapper.
trait RootMessage {
    fn root_cause_or_self(&self) -> String;
}

impl RootMessage for anyhow::Error {
    fn root_cause_or_self(&self) -> String {
        if self.downcast_ref::<SetupFailed>().is_some() {
            self.root_cause().to_string()
        } else {
            format!("{self:#}")
        }
    }
}
