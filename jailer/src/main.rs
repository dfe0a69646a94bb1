//! kiln's jailer: builds the sandbox each kiln process runs in and execs kiln
//! there, with Firecracker's jailer flags. See README.md for the steps and
//! the exit codes.

use std::process::ExitCode;

use jailer::env;

fn main() -> ExitCode {
    // First of all, for --start-time-us.
    let start = env::StartTimes::now();
    match env::run(start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("jailer: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
