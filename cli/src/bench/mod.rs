//! `twopc bench`: a closed-loop load generator. `--concurrency` clients each
//! submit one cross-bank transfer at a time (a debit branch at one bank and a
//! credit branch at each of `--branches - 1` others) against a running
//! cluster, or against a local one of child processes (`--local`). It
//! reports committed and aborted counts, throughput, latency percentiles from
//! an HDR histogram, a per-second timeline, and with `--local` the processes'
//! memory and disk at the end (and every `--sample-every` seconds).
//! `--mode interactive` makes each transfer an interactive txn instead of a
//! one-shot Submit (docs/PROTOCOL.md §12): Begin, the Debit and the Credits at
//! their banks at once with the txn's context, Commit.
//! `--kill-leader-at` SIGKILLs the coordinator leader mid-run to show
//! failover in the timeline; `--baseline-json` reads another system's figures
//! (bench/etcd.sh) and prints the ratio.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use twopc_bank::{AccountName, BranchPayload, parse_balance};
use twopc_client::{ClientConfig, ClusterClient};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, pb};

mod report;

use super::interactive::{self, Banks, Calls, Move};
use super::local_cluster::{LocalCluster, Spec, bank_client, leader, wait_until};
use super::money::{Outcome, submit};
use super::output::json;
use super::resources;
use super::servers::BANK_RETENTION_MIN_MS;
use super::{ClusterArgs, EXIT_ERROR, EXIT_OK};
use report::{Report, read_baseline};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Start a local cluster of child processes (coordinators and banks on loopback) and bench it.
    #[arg(long)]
    pub local: bool,
    /// With --local: mutual TLS on every connection, with certificates made in the cluster's directory.
    #[arg(long, requires = "local")]
    pub tls: bool,
    /// With --local: how many coordinators to start.
    #[arg(long, default_value_t = 3, requires = "local")]
    pub coordinators_count: u64,
    /// With --local: how many banks to start (default: --branches, at least 2).
    #[arg(long, requires = "local")]
    pub banks: Option<usize>,
    /// Without --local: the banks to use, comma-separated (default: every registered participant).
    #[arg(long, value_delimiter = ',', conflicts_with = "local")]
    pub bank_names: Vec<String>,
    /// Clients, each with one transfer in flight.
    #[arg(short, long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds to measure (after the warm-up).
    #[arg(short, long, default_value_t = 10)]
    pub duration: u64,
    /// Measure this many transfers instead of a duration.
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Accounts per bank (created if missing).
    #[arg(long, default_value_t = 1_000)]
    pub accounts: u32,
    /// Which accounts transfers touch: all of them evenly, or only the first --hot-accounts of each bank.
    #[arg(long, value_enum, default_value_t = Contention::Uniform)]
    pub contention: Contention,
    /// With --contention hot: how many accounts per bank take every transfer.
    #[arg(long, default_value_t = 4)]
    pub hot_accounts: u32,
    /// Banks per transfer: one debit branch and branches-1 credit branches, each at a different bank.
    #[arg(long, default_value_t = 2)]
    pub branches: usize,
    /// How each transfer runs: one Submit with every branch (one-shot), or an interactive txn: Begin, the
    /// Debit and the Credits at their banks at once with the txn's context, then Commit.
    #[arg(long, value_enum, default_value_t = Mode::OneShot)]
    pub mode: Mode,
    /// With --local: the banks publish an event per committed branch to NATS JetStream (docs/PROTOCOL.md §14),
    /// on a stream of this run's own (TWOPC_BENCH_<pid>, subjects bench<pid>.>), deleted at the end.
    #[arg(long, requires = "local")]
    pub events: bool,
    /// The NATS server for --events.
    #[arg(long, env = "TWOPC_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// TLS and credentials for --events, for the banks and for deleting the run's stream.
    #[command(flatten)]
    pub nats_connect: crate::nats::NatsArgs,
    /// With --local: how the coordinators commit one-shot txns, parallel (one durable round) or sequential
    /// (two, one after the other); the report names it. Against a running cluster, its own setting applies.
    #[arg(long, requires = "local", value_parser = crate::servers::parse_commit_protocol)]
    pub commit_protocol: Option<twopc_coordinator::config::CommitProtocol>,
    /// Each account's opening balance; large, so that no transfer aborts for lack of funds unless asked.
    #[arg(long, default_value = "1000000000.00")]
    pub opening_balance: String,
    /// The amount each credit branch receives (the debit branch pays it branches-1 times).
    #[arg(long, default_value = "0.01")]
    pub amount: String,
    /// HTTP/2 connections the clients share (round robin).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Each transfer's deadline (ms).
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// With --local: SIGKILL the coordinator leader this many seconds into the measurement.
    #[arg(long, requires = "local")]
    pub kill_leader_at: Option<f64>,
    /// Another system's result (bench/etcd.sh writes one): print the ratio of committed transfers/s to its writes/s.
    #[arg(long)]
    pub baseline_json: Option<PathBuf>,
    /// With --local: keep data and logs here (default: a temporary directory, removed at the end).
    #[arg(long, requires = "local")]
    pub dir: Option<PathBuf>,
    /// With --local: the banks' --finished-retention-ms (how long finished branches are kept, at least
    /// 60000 and longer than --timeout-ms), so a run can span many retention windows and show whether the
    /// bank files level off.
    #[arg(long, requires = "local",
          value_parser = clap::value_parser!(u64).range(BANK_RETENTION_MIN_MS..=twopc_bank::config::FINISHED_RETENTION_MAX_MS))]
    pub bank_retention_ms: Option<u64>,
    /// With --local: every this many seconds of the measurement, record each process's RSS and the
    /// size of its data directory (printed as a table; "samples" in --json).
    #[arg(long, requires = "local", value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_every: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One Submit per transfer, naming every branch and its payload.
    OneShot,
    /// Begin, Debit and Credit calls at the banks (each prepares and joins), Commit.
    Interactive,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::OneShot => "one-shot",
            Self::Interactive => "interactive",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Contention {
    /// Every account equally likely.
    Uniform,
    /// Only the first --hot-accounts accounts of each bank.
    Hot,
}

/// Latencies are recorded in microseconds, up to this.
const LATENCY_MAX_US: u64 = 600_000_000;
/// Resolution of the timeline's counters (the printed timeline sums them per second).
const SLOT: Duration = Duration::from_millis(100);
const SLOTS_PER_SECOND: usize = 10;
/// Accounts created at once while seeding.
const SEED_CONCURRENCY: usize = 32;
/// A restarted leader waits this long after the new leader is known.
const RESTART_AFTER: Duration = Duration::from_secs(2);
/// Distinct abort reasons and errors kept for the report.
const REASONS_MAX: usize = 5;

pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.branches >= 2, "--branches must be at least 2 (a transfer pays from one bank to another)");
    anyhow::ensure!(args.accounts >= 1, "--accounts must be at least 1");
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(args.count.is_none_or(|c| c >= 1), "--count must be at least 1");
    anyhow::ensure!(
        args.contention == Contention::Uniform || (1..=args.accounts).contains(&args.hot_accounts),
        "--hot-accounts must be between 1 and --accounts"
    );
    if !args.local {
        return run_against(&args, args.cluster.coordinators.clone(), None).await;
    }
    anyhow::ensure!(
        args.bank_retention_ms.is_none_or(|ms| ms > args.timeout_ms),
        "--bank-retention-ms must exceed --timeout-ms ({}): a tombstone must outlive the transfer's deadline",
        args.timeout_ms
    );
    let banks = args.banks.unwrap_or(args.branches).max(2);
    anyhow::ensure!(banks >= args.branches, "--banks ({banks}) must be at least --branches ({})", args.branches);
    anyhow::ensure!(args.coordinators_count >= 1, "--coordinators-count must be at least 1");
    // Checked before anything starts: the banks would refuse these settings too.
    let events_nats = args.events.then(|| args.nats_connect.connect(&args.nats)).transpose()?;
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    let spec = Spec {
        coordinators: args.coordinators_count,
        banks: (0..banks).map(bank_name).collect(),
        coordinator_args: args
            .commit_protocol
            .iter()
            .flat_map(|protocol| ["--commit-protocol".to_owned(), protocol.to_string()])
            .collect(),
        bank_args: args
            .bank_retention_ms
            .map(|ms| vec!["--finished-retention-ms".to_owned(), ms.to_string()])
            .into_iter()
            .flatten()
            .chain(bench_events(&args))
            .collect(),
        bank_env: if args.events { args.nats_connect.child_env() } else { Vec::new() },
        tls: args.tls,
    };
    let cluster = LocalCluster::build(&dir, &spec)?;
    if !args.cluster.json {
        println!(
            "starting {} coordinators and {banks} banks in {} ({})",
            args.coordinators_count,
            dir.display(),
            if cfg!(debug_assertions) { "debug build: figures are not representative" } else { "release build" }
        );
    }
    let result = tokio::select! {
        result = async {
            cluster.start_all().await?;
            run_against(&args, cluster.coordinator_addrs.clone(), Some(&cluster)).await
        } => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; stopping the cluster");
            Ok(EXIT_ERROR)
        }
    };
    cluster.stop_all().await;
    if let Some(nats) = &events_nats {
        delete_bench_stream(nats).await;
    }
    if args.dir.is_some() && !args.cluster.json {
        println!("data and logs kept in {}", dir.display());
    }
    drop(temp);
    result
}

/// The banks' events flags for `--events`: a stream and subject prefix of
/// this run's own, so runs never share (or grow) one stream.
fn bench_events(args: &BenchArgs) -> Vec<String> {
    let pid = std::process::id();
    let events = crate::servers::EventsArgs::for_local_run(&args.nats, bench_stream(), format!("bench{pid}"));
    if args.events { events.to_args() } else { Vec::new() }
}

/// This run's stream for `--events`.
fn bench_stream() -> String {
    format!("TWOPC_BENCH_{}", std::process::id())
}

/// Removes this run's stream (what the banks had not published is gone
/// with their data directories).
async fn delete_bench_stream(nats: &twopc_participant::outbox::NatsConnect) {
    let stream = bench_stream();
    if let Err(e) = crate::servers::delete_event_stream(nats, &stream).await {
        eprintln!("warning: could not delete the bench's stream {stream} at {}: {e}", nats.shown_url());
    }
}

/// bank-a, bank-b, ..., bank-z, bank-27, ...
fn bank_name(index: usize) -> String {
    match u8::try_from(index) {
        Ok(i) if i < 26 => format!("bank-{}", char::from(b'a' + i)),
        _ => format!("bank-{}", index + 1),
    }
}

/// Sets up the banks and accounts, runs the load, and reports.
async fn run_against(args: &BenchArgs, coordinators: Vec<String>, local: Option<&LocalCluster>) -> anyhow::Result<u8> {
    let admin = ClusterClient::new(
        coordinators.clone(),
        ClientConfig { retry_budget_ms: 30_000, tls: crate::certs::cli_tls()?, ..Default::default() },
    )?;
    let banks: Vec<(String, String)> = match local {
        Some(cluster) => {
            wait_until("a coordinator leader", || leader(&admin)).await?;
            cluster.register_banks(&admin).await?;
            cluster.bank_names.iter().cloned().zip(cluster.bank_addrs.iter().cloned()).collect()
        }
        None => registered_banks(&admin, &args.bank_names).await?,
    };
    anyhow::ensure!(
        banks.len() >= args.branches,
        "--branches {} needs as many banks; the cluster has {} ({})",
        args.branches,
        banks.len(),
        banks.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
    );
    let opening = parse_balance(&args.opening_balance).context("--opening-balance")?;
    let amount = parse_balance(&args.amount).context("--amount")?;
    anyhow::ensure!(amount > 0, "--amount must be positive");
    let workload = Arc::new(Workload::new(args, &banks, amount)?);
    seed(&banks, &workload.account_names, opening).await?;

    let tls = crate::certs::cli_tls()?;
    let clients: Vec<Arc<ClusterClient>> = (0..args.connections)
        .map(|_| {
            let config = ClientConfig {
                retry_budget_ms: args.timeout_ms.max(15_000),
                tls: tls.clone(),
                ..ClientConfig::default()
            };
            ClusterClient::new(coordinators.clone(), config).map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    // Interactive transfers call the banks too, over as many connections to each.
    let bank_channels: Vec<Arc<Banks>> = match args.mode {
        Mode::OneShot => Vec::new(),
        Mode::Interactive => {
            (0..args.connections).map(|_| Banks::new(&banks).map(Arc::new)).collect::<Result<_, _>>()?
        }
    };
    let run = Arc::new(Run::new(args));
    let bar = progress_bar(args);
    let load = drive(args, &run, &clients, &bank_channels, &workload, &bar);
    let chaos = async {
        match (args.kill_leader_at, local) {
            (Some(at), Some(cluster)) => kill_leader(&run, cluster, &admin, at, &bar).await,
            _ => Ok(()),
        }
    };
    let cpu_start = async {
        while !run.measuring.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match local {
            Some(cluster) => cpu_snapshot(cluster).await,
            None => Vec::new(),
        }
    };
    let samples = async {
        match (args.sample_every, local) {
            (Some(every_s), Some(cluster)) => {
                resources::sample_while_measuring(
                    cluster,
                    Duration::from_secs(every_s),
                    &run.measuring,
                    &run.stop,
                    || run.since_start(),
                )
                .await
            }
            _ => Vec::new(),
        }
    };
    let (_, chaos, cpu_start, samples) = tokio::join!(load, chaos, cpu_start, samples);
    bar.finish_and_clear();
    chaos?;
    let processes = match local {
        Some(cluster) => Some(processes(cluster, &admin, &cpu_start).await),
        None => None,
    };
    let baseline = match &args.baseline_json {
        Some(path) => Some(read_baseline(path)?),
        None => None,
    };
    let report = Report::new(args, &banks, &run, processes, samples, baseline);
    if args.cluster.json {
        json(&report.to_json());
    } else {
        report.print();
    }
    Ok(if report.committed > 0 { EXIT_OK } else { EXIT_ERROR })
}

async fn registered_banks(client: &ClusterClient, wanted: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let list = client.admin(|mut c| async move { c.list_participants(pb::ListParticipantsRequest {}).await }).await?;
    let registered: Vec<(String, String)> = list.participants.into_iter().map(|p| (p.name, p.addr)).collect();
    if wanted.is_empty() {
        return Ok(registered);
    }
    wanted
        .iter()
        .map(|name| {
            registered
                .iter()
                .find(|(n, _)| n == name)
                .cloned()
                .with_context(|| format!("no bank named {name} is registered (see `twopc participants list`)"))
        })
        .collect()
}

/// Creates every account with the opening balance (an existing one is kept as it is).
async fn seed(banks: &[(String, String)], accounts: &[AccountName], opening: i64) -> anyhow::Result<()> {
    for (bank, addr) in banks {
        let client = wait_until(&format!("{bank} to start"), || async { bank_client(bank, addr).await.ok() }).await?;
        let created: Vec<anyhow::Result<()>> = futures::stream::iter(accounts)
            .map(|name| {
                let mut client = client.clone();
                async move {
                    let request =
                        pb::CreateAccountRequest { account: name.to_string(), initial_balance_minor: opening };
                    match client.create_account(request).await {
                        Ok(_) => Ok(()),
                        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
                        Err(status) => Err(anyhow::Error::new(status).context(format!("creating {name}@{bank}"))),
                    }
                }
            })
            .buffer_unordered(SEED_CONCURRENCY)
            .collect()
            .await;
        created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    }
    Ok(())
}

/// The transfers the clients draw from, with every branch payload encoded once.
struct Workload {
    banks: Vec<String>,
    account_names: Vec<AccountName>,
    /// Accounts a transfer picks from (all, or the hot ones).
    pick_from: usize,
    /// `debits[a]`: account a pays (branches-1) x amount.
    debits: Vec<Bytes>,
    /// `credits[a]`: account a receives amount.
    credits: Vec<Bytes>,
    /// The minor units a credit moves, and a debit (branches-1 credits).
    amount_minor: i64,
    debit_minor: i64,
    branches: usize,
    timeout_ms: u64,
}

impl Workload {
    fn new(args: &BenchArgs, banks: &[(String, String)], amount: i64) -> anyhow::Result<Self> {
        let account_names: Vec<AccountName> =
            (1..=args.accounts).map(|i| format!("bench-{i}").parse()).collect::<Result<_, _>>()?;
        let debit_amount = amount.checked_mul(i64::try_from(args.branches - 1)?).context("--amount is too large")?;
        let encode = |payload: Result<BranchPayload, _>| payload.map(|p: BranchPayload| p.encode());
        Ok(Self {
            banks: banks.iter().map(|(name, _)| name.clone()).collect(),
            debits: account_names
                .iter()
                .map(|a| encode(BranchPayload::debit(a.clone(), debit_amount)))
                .collect::<Result<_, _>>()?,
            credits: account_names
                .iter()
                .map(|a| encode(BranchPayload::credit(a.clone(), amount)))
                .collect::<Result<_, _>>()?,
            pick_from: match args.contention {
                Contention::Uniform => account_names.len(),
                Contention::Hot => args.hot_accounts as usize,
            },
            account_names,
            amount_minor: amount,
            debit_minor: debit_amount,
            branches: args.branches,
            timeout_ms: args.timeout_ms,
        })
    }

    /// A random transfer's (bank, account) pairs: `branches` distinct banks, the first pays, the others receive.
    fn pick(&self, rng: &mut SmallRng) -> Vec<(usize, usize)> {
        let banks = rand::seq::index::sample(rng, self.banks.len(), self.branches);
        banks.iter().map(|bank| (bank, rng.random_range(0..self.pick_from))).collect()
    }

    /// A random transfer as one Submit.
    fn request(&self, rng: &mut SmallRng) -> pb::SubmitRequest {
        let branches = self
            .pick(rng)
            .into_iter()
            .enumerate()
            .map(|(i, (bank, account))| {
                let payload = if i == 0 { &self.debits[account] } else { &self.credits[account] };
                pb::Branch { participant: self.banks[bank].clone(), payload: payload.clone() }
            })
            .collect();
        pb::SubmitRequest {
            txn_id: TxnId::new().to_string(),
            branches,
            deadline_unix_ms: unix_now_ms() + self.timeout_ms,
        }
    }

    /// A random transfer as the Debit and Credit calls of an interactive txn.
    fn moves(&self, rng: &mut SmallRng) -> Vec<Move> {
        self.pick(rng)
            .into_iter()
            .enumerate()
            .map(|(i, (bank, account))| {
                let (bank, account) = (&self.banks[bank], self.account_names[account].as_str());
                if i == 0 {
                    Move::debit(bank, account, self.debit_minor)
                } else {
                    Move::credit(bank, account, self.amount_minor)
                }
            })
            .collect()
    }
}

/// How one transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Committed,
    Aborted,
    /// The cluster gave no answer within the client's retry budget.
    Unknown,
    /// A non-retryable error status.
    Error,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    committed: u64,
    aborted: u64,
    unknown: u64,
    errors: u64,
}

/// Everything measured; shared by the clients behind one lock (a few
/// thousand short critical sections a second).
struct Recorder {
    /// Committed transfers' latency, microseconds.
    latency: Histogram<u64>,
    /// Per second of the measurement: committed transfers' latency.
    per_second: Vec<Histogram<u64>>,
    slots: Vec<Slot>,
    totals: Slot,
    /// When the last measured transfer ended.
    last_end: Option<Instant>,
    reasons: Vec<(String, u64)>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            latency: latency_histogram(3),
            per_second: Vec::new(),
            slots: Vec::new(),
            totals: Slot::default(),
            last_end: None,
            reasons: Vec::new(),
        }
    }

    fn record(&mut self, since_start: Duration, latency: Duration, ended: Ended, reason: Option<&str>) {
        let slot = usize::try_from(since_start.as_nanos() / SLOT.as_nanos()).unwrap_or(usize::MAX);
        if self.slots.len() <= slot {
            self.slots.resize(slot + 1, Slot::default());
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        for counts in [&mut self.slots[slot], &mut self.totals] {
            match ended {
                Ended::Committed => counts.committed += 1,
                Ended::Aborted => counts.aborted += 1,
                Ended::Unknown => counts.unknown += 1,
                Ended::Error => counts.errors += 1,
            }
        }
        if ended == Ended::Committed {
            self.latency.saturating_record(micros);
            let second = slot / SLOTS_PER_SECOND;
            while self.per_second.len() <= second {
                self.per_second.push(latency_histogram(2));
            }
            self.per_second[second].saturating_record(micros);
        }
        if let Some(reason) = reason {
            let full = self.reasons.len() >= REASONS_MAX;
            match self.reasons.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += 1,
                None if !full => self.reasons.push((reason.to_owned(), 1)),
                None => {}
            }
        }
    }
}

fn latency_histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, sigfig).expect("static histogram bounds are valid")
}

/// One measured run: its clock, its phase and what it recorded.
struct Run {
    /// Set when the warm-up ends; transfers started before it are not recorded.
    measuring: AtomicBool,
    started: Mutex<Option<Instant>>,
    stop: AtomicBool,
    /// Count mode: transfers still to start.
    tickets: Option<AtomicU64>,
    recorder: Mutex<Recorder>,
    events: Mutex<Vec<(Duration, String)>>,
}

impl Run {
    fn new(args: &BenchArgs) -> Self {
        Self {
            measuring: AtomicBool::new(false),
            started: Mutex::new(None),
            stop: AtomicBool::new(false),
            tickets: args.count.map(AtomicU64::new),
            recorder: Mutex::new(Recorder::new()),
            events: Mutex::default(),
        }
    }

    fn start_measuring(&self) {
        *self.started.lock() = Some(Instant::now());
        self.measuring.store(true, Ordering::Release);
    }

    fn since_start(&self) -> Duration {
        self.started.lock().map(|s| s.elapsed()).unwrap_or_default()
    }

    fn note(&self, bar: &ProgressBar, what: String) {
        let at = self.since_start();
        bar.println(format!("  [{:>6.2}s] {what}", at.as_secs_f64()));
        self.events.lock().push((at, what));
    }

    /// Whether a client may start another transfer, and whether it is measured.
    fn next(&self) -> Option<bool> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        if !self.measuring.load(Ordering::Acquire) {
            return Some(false);
        }
        if let Some(tickets) = &self.tickets {
            tickets.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1)).ok()?;
        }
        Some(true)
    }

    fn committed(&self) -> u64 {
        self.recorder.lock().totals.committed
    }
}

fn progress_bar(args: &BenchArgs) -> ProgressBar {
    let (len, unit) = match args.count {
        Some(count) => (count, "transfers"),
        None => (args.warmup + args.duration, "s"),
    };
    let bar = if args.cluster.json { ProgressBar::hidden() } else { ProgressBar::new(len) };
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit}  {{msg}}");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// Runs the clients through the warm-up and the measurement.
async fn drive(
    args: &BenchArgs,
    run: &Arc<Run>,
    clients: &[Arc<ClusterClient>],
    bank_channels: &[Arc<Banks>],
    workload: &Arc<Workload>,
    bar: &ProgressBar,
) {
    let workers: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let banks = bank_channels.get(i % clients.len()).cloned();
            tokio::spawn(client_loop(run.clone(), clients[i % clients.len()].clone(), banks, workload.clone()))
        })
        .collect();
    bar.set_message("warming up");
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let warmup_until = Instant::now() + Duration::from_secs(args.warmup);
    while Instant::now() < warmup_until {
        ticker.tick().await;
        if args.count.is_none() {
            bar.set_position(args.warmup - (warmup_until.saturating_duration_since(Instant::now()).as_secs()));
        }
    }
    run.start_measuring();
    let measure_until = Instant::now() + Duration::from_secs(args.duration);
    loop {
        ticker.tick().await;
        let recorded = {
            let recorder = run.recorder.lock();
            recorder.totals.committed + recorder.totals.aborted + recorder.totals.unknown + recorder.totals.errors
        };
        let elapsed = run.since_start().as_secs_f64();
        let committed = run.committed();
        bar.set_message(format!("committed {committed}  {:.0}/s", committed as f64 / elapsed.max(0.001)));
        match args.count {
            Some(count) => {
                bar.set_position(recorded);
                if recorded >= count {
                    break;
                }
            }
            None => {
                bar.set_position(args.warmup + run.since_start().as_secs());
                if Instant::now() >= measure_until {
                    break;
                }
            }
        }
    }
    run.stop.store(true, Ordering::Relaxed);
    bar.set_message("waiting for transfers in flight");
    for worker in workers {
        let _ = worker.await;
    }
}

/// One client: a transfer at a time, until told to stop. With `banks`,
/// each transfer is an interactive txn; otherwise one Submit.
async fn client_loop(run: Arc<Run>, client: Arc<ClusterClient>, banks: Option<Arc<Banks>>, workload: Arc<Workload>) {
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let timeout = Duration::from_millis(workload.timeout_ms);
    while let Some(measured) = run.next() {
        let began;
        let result = match &banks {
            None => {
                let request = workload.request(&mut rng);
                began = Instant::now();
                submit(&client, request).await
            }
            Some(banks) => {
                let moves = workload.moves(&mut rng);
                began = Instant::now();
                interactive::begin_and_run(&client, banks, &moves, timeout, Calls::Concurrent).await
            }
        };
        let latency = began.elapsed();
        let (ended, reason) = match &result {
            Ok(Outcome::Committed) => (Ended::Committed, None),
            Ok(Outcome::Aborted(reason)) => (Ended::Aborted, Some(format!("aborted: {reason}"))),
            Ok(Outcome::Unknown(reason)) => (Ended::Unknown, Some(format!("outcome unknown: {reason}"))),
            Err(status) => (Ended::Error, Some(format!("error: {} ({:?})", status.message(), status.code()))),
        };
        if ended == Ended::Error {
            // A refused request (a misconfigured bench) would otherwise spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !measured {
            continue;
        }
        let since_start = run.since_start();
        let mut recorder = run.recorder.lock();
        recorder.record(since_start, latency, ended, reason.as_deref().map(generic_reason));
        recorder.last_end = Some(Instant::now());
    }
}

/// A reason with its txn id removed, so equal reasons count together.
fn generic_reason(reason: &str) -> &str {
    reason.split(" (txn ").next().unwrap_or(reason)
}

/// SIGKILLs the leader `at` seconds into the measurement; restarts it once a
/// new leader is known.
async fn kill_leader(
    run: &Run,
    cluster: &LocalCluster,
    client: &ClusterClient,
    at: f64,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    while !run.measuring.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wait = Duration::from_secs_f64(at.max(0.0)).saturating_sub(run.since_start());
    tokio::time::sleep(wait).await;
    if run.stop.load(Ordering::Relaxed) {
        return Ok(());
    }
    let victim = wait_until("a leader to kill", || leader(client)).await?;
    let proc =
        cluster.coordinators.get(usize::try_from(victim - 1)?).with_context(|| format!("no coordinator {victim}"))?;
    proc.lock().await.kill().await;
    run.note(bar, format!("SIGKILL coordinator {victim} (the leader)"));
    let new_leader = wait_until("a new leader", || async { leader(client).await.filter(|l| *l != victim) }).await?;
    run.note(bar, format!("coordinator {new_leader} leads"));
    tokio::time::sleep(RESTART_AFTER).await;
    proc.lock().await.start(&cluster.exe)?;
    run.note(bar, format!("coordinator {victim} restarted"));
    Ok(())
}

/// What a process holds at the end of the run, and the CPU it spent while measured.
struct ProcessInfo {
    name: String,
    leader: bool,
    rss_kib: Option<u64>,
    disk_bytes: u64,
    cpu_s: Option<f64>,
}

/// (name, pid, CPU ticks) of every local process and of this one.
async fn cpu_snapshot(cluster: &LocalCluster) -> Vec<(String, u32, u64)> {
    let mut snapshot = Vec::new();
    for proc in cluster.coordinators.iter().chain(cluster.banks.iter()) {
        let proc = proc.lock().await;
        if let Some((pid, ticks)) = proc.pid().and_then(|pid| cpu_ticks(&pid.to_string()).map(|t| (pid, t))) {
            snapshot.push((proc.name.clone(), pid, ticks));
        }
    }
    snapshot.push((BENCH_PROCESS.into(), std::process::id(), cpu_ticks("self").unwrap_or_default()));
    snapshot
}

const BENCH_PROCESS: &str = "bench (this process)";

async fn processes(
    cluster: &LocalCluster,
    client: &ClusterClient,
    cpu_start: &[(String, u32, u64)],
) -> Vec<ProcessInfo> {
    let leader_id = leader(client).await;
    let cpu_end = cpu_snapshot(cluster).await;
    // CPU since the measurement started; a process restarted since counts from its restart.
    let cpu_s = |name: &str| {
        let (_, pid, end) = cpu_end.iter().find(|(n, _, _)| n == name)?;
        let start = cpu_start.iter().find(|(n, p, _)| n == name && p == pid).map_or(0, |(_, _, t)| *t);
        Some(end.saturating_sub(start) as f64 / CLOCK_TICKS_PER_S)
    };
    let mut infos = Vec::new();
    for (i, proc) in cluster.coordinators.iter().chain(cluster.banks.iter()).enumerate() {
        let proc = proc.lock().await;
        infos.push(ProcessInfo {
            name: proc.name.clone(),
            leader: leader_id.is_some_and(|id| usize::try_from(id).is_ok_and(|id| id == i + 1))
                && i < cluster.coordinators.len(),
            rss_kib: proc.pid().and_then(resources::rss_kib),
            disk_bytes: proc.data_dir().map(resources::dir_bytes).unwrap_or_default(),
            cpu_s: cpu_s(&proc.name),
        });
    }
    infos.push(ProcessInfo {
        name: BENCH_PROCESS.into(),
        leader: false,
        rss_kib: resources::rss_kib(std::process::id()),
        disk_bytes: 0,
        cpu_s: cpu_s(BENCH_PROCESS),
    });
    infos
}

/// Linux reports CPU times in /proc in units of USER_HZ, 100 a second.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User plus system CPU time of a process (a pid, or "self"), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bank_names_run_through_the_alphabet() {
        assert_eq!(bank_name(0), "bank-a");
        assert_eq!(bank_name(25), "bank-z");
        assert_eq!(bank_name(26), "bank-27");
    }
}
