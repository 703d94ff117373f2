//! The `twopc` command line: run coordinator nodes and banks, move money,
//! inspect and settle transactions, and the one-command demo.
//!
//! Exit codes: 0 success (a transfer committed), 1 an error (one line on
//! stderr says why), 2 a usage error, 3 a transfer aborted, 4 a transfer
//! whose outcome is unknown (ask `twopc txn show ID` later).

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

/// glibc's malloc spent about a fifth of a loaded node's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {}", cli::one_line(&err));
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
