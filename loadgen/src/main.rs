//! roost-bench: the MQTT load generator (to be written; see README "Status").

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "roost-bench: not implemented yet; the load generator is planned work (README, Status)"
    );
    ExitCode::from(2)
}
