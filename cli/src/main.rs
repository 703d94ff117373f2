//! The `twopc` command line: run coordinator nodes and banks, move money,
//! inspect and settle transactions, and the one-command demo.
//!
//! Exit codes: 0 success (a transfer committed), 1 an error (one line on
//! stderr says why), 2 a usage error, 3 a transfer aborted, 4 a transfer
//! whose outcome is unknown (ask `twopc txn show ID` later).
//!
//! # Layout
//! - `main.rs`: the argument tree, dispatch, exit codes, error lines.
//! - [`output`]: tables for people, JSON for scripts.
//! - [`servers`]: `twopc coordinator` and `twopc bank`: run a node in the foreground.
//! - [`admin`]: `cluster`, `participants` and `txn`: inspect and settle through the cluster.
//! - [`money`]: `transfer`, `balance`, `accounts`.
//! - [`interactive`]: interactive transfers (Begin, Debit and Credit with the txn's context, Commit) for
//!   `transfer --interactive`, `demo --interactive` and `bench --mode interactive`.
//! - [`demo`]: `twopc demo`: a local cluster of child processes, random transfers, the conservation check.
//! - [`local_cluster`]: coordinators and banks as child processes on loopback, for `demo` and `bench --local`.
//! - [`bench`]: `twopc bench`: a load generator; throughput, latency percentiles, a per-second timeline.
//! - [`resources`]: the local cluster's processes' memory and data directories, sampled during a bench.
//! - [`certs`]: `twopc certs init` and `show`; and the process's TLS settings (`--tls-dir`, `--insecure`).
//! - [`view`]: `twopc view`: a materialized view of the banks' event stream, each event applied once.
//! - [`nats`]: the NATS connection flags (TLS, credentials) of `bank --events-nats` and `view sync`.

mod admin;
mod bench;
mod certs;
mod demo;
mod interactive;
mod local_cluster;
mod money;
mod nats;
mod output;
mod resources;
mod servers;
mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use twopc_client::{ClientConfig, ClusterClient};

/// Success; for `transfer`, committed.
pub const EXIT_OK: u8 = 0;
/// An error; stderr has one line saying why.
pub const EXIT_ERROR: u8 = 1;
/// `transfer`: the transfer aborted (the reason is printed).
pub const EXIT_ABORTED: u8 = 3;
/// `transfer`: the outcome is unknown; ask `twopc txn show ID` later.
pub const EXIT_UNKNOWN: u8 = 4;

/// twopc: atomic transactions across services, with a Raft-replicated decision log.
#[derive(Debug, Parser)]
#[command(name = "twopc", version, about, long_about = None, after_help = "Start with: twopc demo")]
pub struct Cli {
    /// More log output (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten)]
    pub tls: certs::TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the coordinator cluster is.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Coordinator addresses (any or all nodes), comma-separated host:port.
    #[arg(long, env = "TWOPC_COORDINATORS", value_delimiter = ',', default_value = "127.0.0.1:7001")]
    pub coordinators: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ClusterArgs {
    fn client(&self) -> anyhow::Result<ClusterClient> {
        let config = ClientConfig { retry_budget_ms: 10_000, tls: certs::cli_tls()?, ..ClientConfig::default() };
        Ok(ClusterClient::new(self.coordinators.clone(), config)?)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one coordinator node in the foreground.
    #[command(after_help = "Example (node 1 of 3):\n  twopc coordinator --id 1 \
        --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data-dir data/c1")]
    Coordinator(servers::CoordinatorArgs),
    /// Run one bank (an account service taking part in transfers) in the foreground.
    #[command(after_help = "Example:\n  twopc bank --name bank-a --listen 127.0.0.1:7101 --data-dir data/bank-a \
        --coordinators 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 --register")]
    Bank(servers::BankArgs),
    /// Move money between two accounts, atomically.
    #[command(after_help = "Examples:\n  twopc transfer --from alice@bank-a --to bob@bank-b --amount 12.50\n  \
        twopc transfer --interactive --from alice@bank-a --to bob@bank-b --amount 12.50\n\n\
        Exit code: 0 committed, 3 aborted (the reason is printed), 4 outcome unknown, 1 error.")]
    Transfer(money::TransferArgs),
    /// Show one account's balance.
    #[command(after_help = "Example:\n  twopc balance alice@bank-a")]
    Balance(money::BalanceArgs),
    /// List a bank's accounts (or create one).
    #[command(
        after_help = "Examples:\n  twopc accounts bank-a\n  twopc accounts bank-a --create alice --balance 100.00"
    )]
    Accounts(money::AccountsArgs),
    /// Inspect and settle transactions.
    #[command(subcommand)]
    Txn(admin::TxnCommand),
    /// The coordinator cluster: status and membership.
    #[command(subcommand)]
    Cluster(admin::ClusterCommand),
    /// The participant registry: which name is at which address.
    #[command(subcommand)]
    Participants(admin::ParticipantsCommand),
    /// Start a local cluster (3 coordinators, 2 banks), run random transfers, check that money is conserved.
    #[command(after_help = "Examples:\n  twopc demo\n  twopc demo --tls\n  twopc demo --chaos --transfers 2000\n  \
        twopc demo --interactive --chaos")]
    Demo(demo::DemoArgs),
    /// Load-test a cluster (or a local one): throughput, latency percentiles, a per-second timeline.
    #[command(after_help = "Examples:\n  twopc bench --local --concurrency 64 --duration 10\n  \
        twopc bench --local --kill-leader-at 5 --duration 15\n  \
        twopc bench --local --mode interactive --concurrency 64\n  \
        twopc bench --coordinators 127.0.0.1:7001 --json")]
    Bench(bench::BenchArgs),
    /// Make and inspect the certificates of a mutual-TLS cluster (docs/SECURITY.md).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// A materialized view of the banks' event stream (NATS JetStream): sync it, read balances and history.
    #[command(subcommand)]
    View(view::ViewCommand),
}

/// Sets up logging to stderr: warnings by default, `-v` info, `-vv` debug;
/// the servers log at info by default.
pub fn init_tracing(cli: &Cli) {
    let server = matches!(cli.command, Command::Coordinator(_) | Command::Bank(_));
    let level = match (cli.verbose, server) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},raft=warn")));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Runs a parsed command; returns the exit code.
///
/// # Errors
/// Anything that ends the command with exit code 1.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    certs::set_tls_args(cli.tls.clone());
    match cli.command {
        Command::Coordinator(args) => servers::coordinator(args).await,
        Command::Bank(args) => servers::bank(args).await,
        Command::Transfer(args) => money::transfer(args).await,
        Command::Balance(args) => money::balance(args).await,
        Command::Accounts(args) => money::accounts(args).await,
        Command::Txn(cmd) => admin::txn(cmd).await,
        Command::Cluster(cmd) => admin::cluster(cmd).await,
        Command::Participants(cmd) => admin::participants(cmd).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Certs(cmd) => certs::run(cmd),
        Command::View(cmd) => view::run(cmd).await,
    }
}

/// An error as one line: a gRPC status as its message (and code), anything
/// else as its chain of causes.
pub fn one_line(err: &anyhow::Error) -> String {
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        return status_line(status);
    }
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        line.push_str(": ");
        line.push_str(&cause.to_string());
    }
    line.replace('\n', " ")
}

fn status_line(status: &tonic::Status) -> String {
    let message = status.message().replace('\n', " ");
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            format!("the cluster did not answer ({message}); is it running? (--coordinators / TWOPC_COORDINATORS)")
        }
        code => format!("{message} ({code:?})"),
    }
}

/// A directory path argument.
fn dir_arg(text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("give a directory".into());
    }
    Ok(PathBuf::from(text))
}

/// glibc's malloc spent about a fifth of a loaded node's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Cli::parse();
    init_tracing(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(EXIT_ERROR)
        }
    }
}
