//! Seeded fault-injection runs over a whole twopc system in this process,
//! on real sockets, threads and time, or deterministically on one thread
//! under virtual time ([`deterministic`]; docs/TESTING.md says why this and
//! not turmoil or madsim).
//!
//! One seed is one run: a [`World`] (3 or 5 coordinators, 2 banks with
//! accounts), concurrent clients moving money between random accounts, one-shot
//! or interactively ([`interactive`], a share drawn from the seed), and a
//! fault schedule drawn from the seed ([`schedule`]). After every fault the
//! checker's safety part ([`crate::checker::check_safety`]: I1, I2) runs on
//! the state of the moment; at the end every fault heals, the system
//! settles, and the whole checker ([`crate::checker::check`]) judges the
//! final state against I1, I2, I4, I6, I7 and I8. Adversaries ([`actors`],
//! membership churn) run beside the clients. A failing seed's report prints the
//! command that replays it (exactly, in a deterministic run).
//!
//! # Layout
//! - [`world`]: the system under test, its client history, heal, settle, observe.
//! - [`interactive`]: interactive transfers (Begin, Debit, Credit, Commit or not), and their calls.
//! - [`actors`]: adversaries beside the clients: an operator deciding random txns, a stray client,
//!   a client misusing interactive txns.
//! - [`bank`]: a crashable bank over a real store.
//! - [`schedule`]: fault mixes, seeded schedules, and carrying a fault out.
//! - [`deterministic`]: the same runs on one thread under virtual time, replayed exactly.
//! - [`network`], [`pipe`]: the in-memory network deterministic runs use, with latency.

pub mod actors;
pub mod bank;
pub mod deterministic;
pub mod interactive;
pub mod network;
pub mod pipe;
pub mod schedule;
pub mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;
use twopc_coordinator::config::CommitProtocol;
use twopc_proto::TxnId;

use crate::checker::{self, AccountRef, ClientOutcome, Violation};
use schedule::{FaultMix, Step};
use world::{Teller, World, WorldConfig};

/// The environment variable that replays one seed.
pub const SEED_VAR: &str = "TWOPC_SIM_SEED";
/// The environment variable that sets how many seeds a run covers (the soak mode).
pub const SEEDS_VAR: &str = "TWOPC_SIM_SEEDS";
/// The environment variable that sets the first seed of a run.
pub const FIRST_SEED_VAR: &str = "TWOPC_SIM_FIRST_SEED";
/// The environment variable that sets how many seeds run at once.
pub const PARALLEL_VAR: &str = "TWOPC_SIM_PARALLEL";

/// How often a run notes who acts as leader (I2: one leader per term).
const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// One run's parameters; all but the seed and mix have defaults.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Picks the schedule and the workload.
    pub seed: u64,
    /// The family of faults.
    pub mix: FaultMix,
    /// The system's shape and timings.
    pub world: WorldConfig,
    /// Concurrent clients.
    pub clients: usize,
    /// Transfers each client makes, one after another.
    pub transfers_per_client: usize,
    /// Faults strike within this many milliseconds of the workload's start.
    pub window_ms: u64,
    /// The largest transfer, in minor units; large ones overdraw and vote NO.
    pub amount_max_minor: i64,
    /// The test binary whose command replays this seed.
    pub replay_test: &'static str,
    /// Adversaries run beside the clients: an operator deciding random
    /// txns, a stray client, a client misusing interactive txns
    /// ([`actors`]), and membership churn ([`schedule::churn`]).
    pub adversaries: bool,
    /// The share of the clients' transfers made interactively
    /// ([`interactive`]); the rest are one-shot Submits.
    pub interactive_share: f64,
}

/// The least and the most of a run's transfers made interactively.
pub const INTERACTIVE_SHARE: std::ops::RangeInclusive<f64> = 0.2..=0.6;

/// The share of seeds whose coordinators commit one-shot txns sequentially
/// (docs/PROTOCOL.md §5) rather than by parallel commit (§13, the default).
pub const SEQUENTIAL_COMMIT_SHARE: f64 = 0.25;

impl SimConfig {
    /// The config seed `seed` runs with: its mix cycles through
    /// [`FaultMix::ALL`]; every fifth seed runs 5 coordinators; the share
    /// of interactive transfers is drawn from [`INTERACTIVE_SHARE`]; a
    /// quarter of the seeds, drawn apart from the mix, commit sequentially
    /// ([`SEQUENTIAL_COMMIT_SHARE`]).
    pub fn for_seed(seed: u64) -> Self {
        let sequential = StdRng::seed_from_u64(seed ^ 0x5e9_c0de).random_bool(SEQUENTIAL_COMMIT_SHARE);
        let world = WorldConfig {
            coordinators: if seed % 5 == 4 { 5 } else { 3 },
            election_seed: seed,
            commit_protocol: if sequential { CommitProtocol::Sequential } else { CommitProtocol::Parallel },
            ..WorldConfig::default()
        };
        Self {
            seed,
            mix: FaultMix::for_seed(seed),
            world,
            clients: 5,
            transfers_per_client: 6,
            window_ms: 2_000,
            amount_max_minor: 450,
            replay_test: "simulation",
            adversaries: true,
            interactive_share: StdRng::seed_from_u64(seed ^ 0x1a7e_7ac7).random_range(INTERACTIVE_SHARE),
        }
    }

    /// The command that replays this seed.
    pub fn replay_command(&self) -> String {
        format!(
            "{SEED_VAR}={} cargo test -p twopc-tests --all-features --test {} -- --nocapture",
            self.seed, self.replay_test
        )
    }
}

/// What one run did and what the checker found.
#[derive(Debug, Clone)]
pub struct SeedReport {
    /// The run's config.
    pub config: SimConfig,
    /// The faults as scheduled.
    pub schedule: Vec<Step>,
    /// What each fault did when it struck (which leader, say).
    pub applied: Vec<String>,
    /// What the clients were told about their transfers.
    pub outcomes: Outcomes,
    /// How long the system took to settle after the heal, if it did.
    pub settled_after: Option<Duration>,
    /// Everything the checker found.
    pub violations: Vec<Violation>,
    /// The run's time: wall time, or virtual time in a deterministic run.
    pub elapsed: Duration,
    /// What happened: each fault as it struck, each client's txn with what
    /// it was told, who led in which term, each node's final log position,
    /// and when the system settled. Two deterministic runs of one seed have
    /// the same trace.
    pub trace: Vec<String>,
}

/// What a run's clients were told, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Told Commit.
    pub committed: usize,
    /// Told Abort.
    pub aborted: usize,
    /// Told nothing after asking to commit (or submitting).
    pub unknown: usize,
    /// Interactive txns never committed by their client: vanished, or rolled back unanswered.
    pub abandoned: usize,
    /// Of all these, the interactive ones.
    pub interactive: usize,
    /// Of the interactive ones, those told Commit.
    pub interactive_committed: usize,
}

impl Outcomes {
    fn of(history: &[checker::ClientTxn], interactive: &BTreeMap<TxnId, checker::InteractiveTxn>) -> Self {
        let count = |o| history.iter().filter(|t| t.outcome == o).count();
        Self {
            committed: count(ClientOutcome::Committed),
            aborted: count(ClientOutcome::Aborted),
            unknown: count(ClientOutcome::Unknown),
            abandoned: count(ClientOutcome::Abandoned),
            interactive: interactive.len(),
            interactive_committed: history
                .iter()
                .filter(|t| t.outcome == ClientOutcome::Committed && interactive.contains_key(&t.txn_id))
                .count(),
        }
    }

    fn add(self, other: Self) -> Self {
        Self {
            committed: self.committed + other.committed,
            aborted: self.aborted + other.aborted,
            unknown: self.unknown + other.unknown,
            abandoned: self.abandoned + other.abandoned,
            interactive: self.interactive + other.interactive,
            interactive_committed: self.interactive_committed + other.interactive_committed,
        }
    }
}

impl SeedReport {
    /// Whether the checker found nothing.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for SeedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let Outcomes { committed, aborted, unknown, abandoned, interactive, interactive_committed } = self.outcomes;
        writeln!(
            f,
            "seed {} ({:?}, {} coordinators, {:?} commit): {committed} committed, {aborted} aborted, \
             {unknown} unknown, {abandoned} abandoned ({interactive} interactive, {interactive_committed} of \
             them committed); settled after {:?}; {:?}",
            c.seed, c.mix, c.world.coordinators, c.world.commit_protocol, self.settled_after, self.elapsed
        )?;
        for (step, applied) in self.schedule.iter().zip(self.applied.iter().map(Some).chain(std::iter::repeat(None))) {
            writeln!(f, "  {step} -> {}", applied.map_or("not reached", String::as_str))?;
        }
        if !self.violations.is_empty() {
            writeln!(f, "  violations:")?;
            write!(f, "{}", checker::report(&self.violations))?;
            writeln!(f, "  replay: {}", c.replay_command())?;
        }
        Ok(())
    }
}

/// Runs one seed: start, workload under faults, heal, settle, check.
///
/// # Errors
/// The harness itself failed (a port could not be bound again, a store could
/// not be read); violations of the invariants are in the report, not errors.
pub async fn run(config: SimConfig) -> anyhow::Result<SeedReport> {
    let started = Instant::now();
    let c = &config;
    let mut schedule = schedule::schedule(c.seed, c.mix, c.world.coordinators, c.world.banks, c.window_ms);
    if c.adversaries {
        schedule = schedule::merge(schedule, schedule::churn(c.seed, c.world.coordinators, c.window_ms));
    }
    let mut world = World::start(c.world.clone()).await?;
    let accounts = world.accounts();
    let clients: Vec<_> = (0..c.clients)
        .map(|i| {
            let seed = c.seed.wrapping_mul(1_000).wrapping_add(i as u64);
            let workload = Workload {
                transfers: c.transfers_per_client,
                amount_max_minor: c.amount_max_minor,
                interactive_share: c.interactive_share,
            };
            tokio::spawn(client(world.teller.clone(), accounts.clone(), seed, workload))
        })
        .collect();
    let clients_done = Arc::new(AtomicBool::new(false));
    let mut adversaries = Vec::new();
    if c.adversaries {
        let seed = c.seed.wrapping_mul(1_000).wrapping_add(900);
        let (teller, done) = (world.teller.clone(), clients_done.clone());
        let client = actors::client(world.cluster.addrs())?;
        let retention_ms = c.world.retention_ms;
        adversaries.push(tokio::spawn(actors::run(teller, client, accounts.clone(), retention_ms, seed, done)));
    }
    let mut rng = StdRng::seed_from_u64(c.seed ^ 0x5eed);
    let mut applied = Vec::new();
    let mut mid_run = Vec::new();
    let workload_started = Instant::now();
    for step in &schedule {
        let at = workload_started + Duration::from_millis(step.at_ms);
        while Instant::now() < at {
            world.sample_leaders();
            tokio::time::sleep(SAMPLE_INTERVAL.min(at - Instant::now())).await;
        }
        let done = schedule::apply(&mut world, &step.fault, &mut rng).await?;
        world.sample_leaders();
        // Safety holds at every step, not only at the end.
        for mut v in checker::check_safety(&world.observe(None).await?) {
            v.detail = format!("after \"{done}\": {}", v.detail);
            mid_run.push(v);
        }
        applied.push(done);
    }
    let mut clients = futures::future::join_all(clients);
    loop {
        tokio::select! {
            joined = &mut clients => {
                for client in joined {
                    client?;
                }
                break;
            }
            () = tokio::time::sleep(SAMPLE_INTERVAL) => world.sample_leaders(),
        }
    }
    // The adversaries stop with the clients, before the heal: what they were
    // told is then complete when the checker reads it.
    clients_done.store(true, Ordering::Relaxed);
    let mut adversaries = futures::future::join_all(adversaries);
    let tallies = loop {
        tokio::select! {
            joined = &mut adversaries => break joined.into_iter().collect::<Result<Vec<_>, _>>()?.concat(),
            () = tokio::time::sleep(SAMPLE_INTERVAL) => world.sample_leaders(),
        }
    };
    let verdict = world.heal_and_check().await;
    let history = world.teller.history();
    let interactive = world.teller.interactive();
    let told = world.teller.told();
    let raft_trace = world.raft_trace();
    let checked_at = started.elapsed();
    world.stop().await;
    let verdict = verdict?;
    let outcomes = Outcomes::of(&history, &interactive);
    let trace = applied
        .iter()
        .map(|fault| format!("fault: {fault}"))
        .chain(history.iter().map(|t| {
            let movement = t.movement.as_ref().map_or_else(String::new, |m| {
                format!("{}@{} -> {}@{} {}", m.from.account, m.from.bank, m.to.account, m.to.bank, m.amount_minor)
            });
            let joined = interactive.get(&t.txn_id).map_or_else(String::new, |i| {
                format!(" (interactive{}, joined {:?})", if i.eager { ", eager" } else { "" }, i.joined)
            });
            format!("txn {} {movement}{joined}: {:?}", t.txn_id, t.outcome)
        }))
        .chain(told.iter().map(|t| format!("told {} {:?}: {}", t.txn_id, t.hearer, t.decision)))
        .chain(tallies)
        .chain(raft_trace)
        .chain([format!("settled after {:?}, checked {checked_at:?} into the run", verdict.settled_after)])
        .collect();
    Ok(SeedReport {
        trace,
        outcomes,
        config,
        schedule,
        applied,
        settled_after: verdict.settled_after,
        violations: mid_run.into_iter().chain(verdict.violations).collect(),
        elapsed: started.elapsed(),
    })
}

/// What one client does.
#[derive(Debug, Clone, Copy)]
struct Workload {
    /// Transfers, one after another.
    transfers: usize,
    /// The largest amount.
    amount_max_minor: i64,
    /// The share made interactively.
    interactive_share: f64,
}

/// One client: random transfers between distinct accounts, one after
/// another, with short random pauses; a share of them interactive
/// (between accounts at two banks: one branch per bank per txn).
async fn client(teller: Arc<Teller>, accounts: Vec<AccountRef>, seed: u64, workload: Workload) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..workload.transfers {
        let Some(from) = accounts.choose(&mut rng).cloned() else { return };
        let amount = rng.random_range(1..=workload.amount_max_minor);
        if rng.random_bool(workload.interactive_share) {
            let others: Vec<&AccountRef> = accounts.iter().filter(|a| a.bank != from.bank).collect();
            let Some(to) = others.choose(&mut rng).map(|a| (*a).clone()) else { return };
            let plan = interactive::Plan::draw(&mut rng, from, to, amount, teller.deadline_max_ms());
            interactive::transfer(&teller, plan).await;
        } else {
            let others: Vec<&AccountRef> = accounts.iter().filter(|a| **a != from).collect();
            let Some(to) = others.choose(&mut rng).map(|a| (*a).clone()) else { return };
            teller.transfer(&from, &to, amount).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
    }
}

/// Which seeds a test runs, from the environment: one seed to replay
/// ([`SEED_VAR`]), or `count` seeds from [`FIRST_SEED_VAR`] (default 0),
/// `count` being [`SEEDS_VAR`] or `default_count`.
pub fn seeds_from_env(default_count: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(seed) = var(SEED_VAR) {
        return vec![seed];
    }
    let first = var(FIRST_SEED_VAR).unwrap_or(0);
    let count = var(SEEDS_VAR).unwrap_or(default_count);
    (first..first.saturating_add(count)).collect()
}

/// How many seeds run at once: [`PARALLEL_VAR`] or `default`.
pub fn parallelism_from_env(default: usize) -> usize {
    std::env::var(PARALLEL_VAR).ok().and_then(|v| v.trim().parse().ok()).filter(|n| *n > 0).unwrap_or(default)
}

/// How many times a seed is started afresh when the harness loses a port.
const PORT_LOST_RETRIES: usize = 2;

/// Whether the harness failed because a node's or bank's old address was
/// taken while it was down (by another connection's ephemeral port): an
/// accident of running many systems on one loopback, not a finding.
fn port_lost(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse))
}

/// [`run`], started afresh (at most [`PORT_LOST_RETRIES`] times) when a
/// restarted node or bank finds its address taken.
pub async fn run_retrying(config: SimConfig) -> anyhow::Result<SeedReport> {
    let mut attempt = 0;
    loop {
        let result = tokio::spawn(run(config.clone())).await.map_err(anyhow::Error::from).and_then(|r| r);
        match result {
            Err(err) if attempt < PORT_LOST_RETRIES && port_lost(&err) => {
                attempt += 1;
                println!("seed {}: {err:#}; starting it afresh", config.seed);
            }
            result => return result,
        }
    }
}

/// Runs seeds 0, 1, ... of `mix` (3 coordinators, a short settle bound), each
/// config passed through `tweak`, until the checker reports a violation;
/// returns that seed and the invariants it named, or None after `seeds`.
/// The tests that show the checker bites break the protocol on purpose and
/// expect a report within their seed budget.
pub async fn first_violation(
    mix: FaultMix,
    seeds: u64,
    tweak: impl Fn(&mut SimConfig),
) -> Option<(u64, BTreeSet<checker::Invariant>)> {
    for seed in 0..seeds {
        let report = run_retrying(bite_config(mix, seed, &tweak)).await;
        if let Some(found) = violation_found(seed, report) {
            return Some(found);
        }
    }
    None
}

/// The config [`first_violation`] runs `seed` with: `mix`, 3 coordinators,
/// a short settle bound, then `tweak`.
pub fn bite_config(mix: FaultMix, seed: u64, tweak: &impl Fn(&mut SimConfig)) -> SimConfig {
    let mut config = SimConfig::for_seed(seed);
    config.mix = mix;
    config.world.coordinators = 3;
    config.world.settle_bound = Duration::from_secs(4);
    tweak(&mut config);
    config
}

/// The seed and the invariants its report names, if the checker found
/// anything (the report is printed); a harness failure is printed and
/// counts as nothing found.
pub fn violation_found(seed: u64, report: anyhow::Result<SeedReport>) -> Option<(u64, BTreeSet<checker::Invariant>)> {
    match report {
        Ok(report) if !report.passed() => {
            println!("{report}");
            Some((seed, checker::invariants(&report.violations)))
        }
        Ok(_) => None,
        Err(err) => {
            println!("seed {seed}: the harness failed: {err:#}");
            None
        }
    }
}

/// Runs `seeds` with `parallel` at a time, each through `configure`, and
/// returns every report (or the harness error) in seed order.
pub async fn run_many(
    seeds: Vec<u64>,
    parallel: usize,
    configure: impl Fn(u64) -> SimConfig,
) -> Vec<(u64, anyhow::Result<SeedReport>)> {
    let mut results: Vec<(u64, anyhow::Result<SeedReport>)> = futures::stream::iter(seeds)
        .map(|seed| {
            let config = configure(seed);
            async move { (seed, run_retrying(config).await) }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    results.sort_by_key(|(seed, _)| *seed);
    results
}

/// Totals per fault mix over a set of runs: what the clients saw and how
/// long settling took, so a CI log shows the faults did something.
pub fn summary(results: &[(u64, anyhow::Result<SeedReport>)]) -> String {
    let mut lines = vec![
        "mix            seeds  committed  aborted  unknown  abandoned  interactive (committed)  slowest settle"
            .to_owned(),
    ];
    for mix in FaultMix::ALL {
        let reports: Vec<&SeedReport> =
            results.iter().filter_map(|(_, r)| r.as_ref().ok()).filter(|r| r.config.mix == mix).collect();
        if reports.is_empty() {
            continue;
        }
        let sum = reports.iter().fold(Outcomes::default(), |sum, r| sum.add(r.outcomes));
        let slowest = reports.iter().filter_map(|r| r.settled_after).max().unwrap_or_default();
        lines.push(format!(
            "{:<14} {:>5}  {:>9}  {:>7}  {:>7}  {:>9}  {:>11} {:>11}  {:?}",
            format!("{mix:?}"),
            reports.len(),
            sum.committed,
            sum.aborted,
            sum.unknown,
            sum.abandoned,
            sum.interactive,
            format!("({})", sum.interactive_committed),
            slowest
        ));
    }
    lines.join("\n")
}

/// The fault mixes of `results` (those run on at least [`COVERAGE_SEEDS_MIN`]
/// seeds) in which no interactive txn committed or none was abandoned: a
/// smoke whose workload lost its interactive txns, or whose faults stopped
/// every one, would pass without checking them.
pub fn interactive_uncovered(results: &[(u64, anyhow::Result<SeedReport>)]) -> Vec<FaultMix> {
    FaultMix::ALL
        .into_iter()
        .filter(|mix| {
            let reports: Vec<&SeedReport> =
                results.iter().filter_map(|(_, r)| r.as_ref().ok()).filter(|r| r.config.mix == *mix).collect();
            let sum = reports.iter().fold(Outcomes::default(), |sum, r| sum.add(r.outcomes));
            reports.len() >= COVERAGE_SEEDS_MIN && (sum.interactive_committed == 0 || sum.abandoned == 0)
        })
        .collect()
}

/// How many seeds of a mix [`interactive_uncovered`] needs to judge it.
pub const COVERAGE_SEEDS_MIN: usize = 5;
