//! Deterministic simulation (docs/TESTING.md): the seeded fault-injection
//! runs of `simulation.rs`, with the whole system on one thread under
//! virtual time and an in-memory network, so a seed replays exactly.
//!
//! - CI smoke: 210 seeds (30 per fault mix), two threads each running one seed at a time.
//! - Replay one seed (exactly, with its trace): `TWOPC_SIM_SEED=17 cargo test -p twopc-tests --all-features
//!   --test deterministic -- --nocapture`.
//! - Check every seed's replay: `TWOPC_SIM_REPLAY_ALL=1` (runs each seed twice).
//! - Soak: `TWOPC_SIM_SEEDS=5000 [TWOPC_SIM_FIRST_SEED=...] [TWOPC_SIM_PARALLEL=...] cargo test -p
//!   twopc-tests --all-features --release --test deterministic -- --nocapture`.

use std::sync::{Mutex, MutexGuard, PoisonError};

use twopc_tests::checker::Invariant;
use twopc_tests::sim::schedule::FaultMix;
use twopc_tests::sim::{self, SeedReport, SimConfig, deterministic};

/// Seeds the smoke covers: 30 for each of the 7 fault mixes.
const SMOKE_SEEDS: u64 = 210;
/// Threads running seeds: a deterministic run keeps one core busy.
const PARALLEL: usize = 2;
/// Set, the smoke runs every seed twice and fails a seed whose two traces differ.
const REPLAY_ALL_VAR: &str = "TWOPC_SIM_REPLAY_ALL";
/// Seeds whose replay is compared: two per fault mix, both cluster sizes.
const REPLAY_SEEDS: [u64; 14] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13];

/// One test at a time: the bite tests break the protocol for the whole
/// process (a failpoint, a broken store), which no other run may see.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// Replay is exact: running a seed again gives the same trace, line for
// line (every fault as it struck, every txn id and what its client was
// told, leaders per term, each node's final log position, the virtual
// times the system settled and was checked at).
#[test]
fn a_seed_replays_exactly() {
    let _serial = one_at_a_time();
    twopc_tests::init_tracing();
    for seed in REPLAY_SEEDS {
        let first = deterministic::run(SimConfig::for_seed(seed)).expect("the harness runs");
        let again = deterministic::run(SimConfig::for_seed(seed)).expect("the harness runs");
        assert!(first.trace.len() > 3, "seed {seed} did something: {:?}", first.trace);
        if let Some(divergence) = divergence(&first, &again) {
            panic!("{divergence}\n{first}");
        }
        println!("seed {seed} ({:?}): {} trace lines, identical twice", first.config.mix, first.trace.len());
    }
}

#[test]
fn seeded_fault_schedules_keep_every_invariant_deterministically() {
    let _serial = one_at_a_time();
    twopc_tests::init_tracing();
    let seeds = sim::seeds_from_env(SMOKE_SEEDS);
    let parallel = sim::parallelism_from_env(PARALLEL);
    let verbose = std::env::var_os("TWOPC_SIM_VERBOSE").is_some();
    let replay_all = std::env::var_os(REPLAY_ALL_VAR).is_some();
    let started = std::time::Instant::now();
    let queue = Mutex::new(seeds.clone().into_iter());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| {
                while let Some(seed) = queue.lock().map(|mut q| q.next()).ok().flatten() {
                    let mut result = deterministic::run(SimConfig::for_seed(seed));
                    if replay_all && let Ok(first) = &result {
                        let again = deterministic::run(SimConfig::for_seed(seed));
                        if let Some(divergence) = again.as_ref().ok().and_then(|again| divergence(first, again)) {
                            result = Err(anyhow::anyhow!(divergence));
                        }
                    }
                    if let Ok(mut results) = results.lock() {
                        results.push((seed, result));
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().expect("no runner panicked");
    results.sort_by_key(|(seed, _)| *seed);
    let mut failed = Vec::new();
    for (seed, result) in &results {
        match result {
            Ok(report) if report.passed() => {
                if seeds.len() == 1 || verbose {
                    print_with_trace(report);
                }
            }
            Ok(report) => {
                print_with_trace(report);
                failed.push(*seed);
            }
            Err(err) => {
                let mut config = SimConfig::for_seed(*seed);
                config.replay_test = "deterministic";
                println!("seed {seed}: the harness failed: {err:#}\n  replay: {}", config.replay_command());
                failed.push(*seed);
            }
        }
    }
    println!("{}", sim::summary(&results));
    println!("{} seeds ({} threads) in {:?}; failed: {failed:?}", seeds.len(), parallel, started.elapsed());
    assert!(failed.is_empty(), "seeds {failed:?} failed; their reports and replay commands are printed above");
    let uncovered = sim::interactive_uncovered(&results);
    assert!(uncovered.is_empty(), "no interactive txn committed, or none abandoned, under {uncovered:?}");
}

/// A retention short enough that txns are forgotten in the middle of a run.
const SHORT_RETENTION_MS: u64 = 1_000;

// I2 across retention horizons, with the adversaries: a run whose
// coordinators forget finished txns after a second, while the stray client
// resolves old ids and the operator decides decided ones, keeps every
// invariant (the control for the forgotten-txn bite below).
#[test]
fn forgetting_txns_mid_run_keeps_every_invariant_deterministically() {
    let _serial = one_at_a_time();
    twopc_tests::init_tracing();
    let mut failed = Vec::new();
    for seed in REPLAY_SEEDS {
        let mut config = SimConfig::for_seed(seed);
        config.world.retention_ms = SHORT_RETENTION_MS;
        let report = deterministic::run(config).expect("the harness runs");
        let tallies = report.trace.iter().filter(|l| l.starts_with("operator:") || l.starts_with("stray client:"));
        println!("{report}  {}", tallies.cloned().collect::<Vec<_>>().join("\n  "));
        if !report.passed() {
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "seeds {failed:?} failed; their reports are printed above");
}

#[test]
fn the_checker_catches_banks_that_answer_before_their_fsync_deterministically() {
    // The checker bites under virtual time too (I3 broken, seen as I8):
    // banks whose store skips its fsync acknowledge what a crash takes back.
    let _serial = one_at_a_time();
    twopc_tests::init_tracing();
    let found = deterministic::first_violation(FaultMix::Crashes, 30, |c| c.world.banks_skip_fsync = true);
    let (seed, invariants) = found.expect("the simulation reports the broken store within 30 seeds");
    assert!(invariants.contains(&Invariant::I8), "seed {seed} named {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_a_leader_that_ignores_no_votes_deterministically() {
    // The checker bites (I1 or I2, and I8): a leader that ignores NO votes
    // commits the other branch of overdrawn transfers (§5), or, under
    // parallel commit, tells the client Commit while the log, which refuses a
    // Commit carrying a NO (§13.1), ends with Abort.
    let (seed, invariants) =
        first_violation_with(twopc_coordinator::failpoint::PREPARE_IGNORE_VOTES, FaultMix::Calm, 5, |_| {});
    let wrong_outcome = invariants.contains(&Invariant::I1) || invariants.contains(&Invariant::I2);
    assert!(wrong_outcome && invariants.contains(&Invariant::I8), "seed {seed}: {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_a_parallel_commit_answered_before_its_staged_entry_deterministically() {
    // The checker bites (I2 as the client heard it): a leader that answers
    // Commit once the votes are in, before its Staged entry is applied and
    // its term confirmed (docs/PROTOCOL.md §13.2), tells clients Commit for
    // txns a partitioned-off leader never staged and the majority presumes aborted.
    let (seed, invariants) = first_violation_with(
        twopc_coordinator::failpoint::PARALLEL_ANSWER_BEFORE_STAGED,
        FaultMix::Partitions,
        40,
        |c| c.world.commit_protocol = twopc_coordinator::config::CommitProtocol::Parallel,
    );
    assert!(invariants.contains(&Invariant::I2) || invariants.contains(&Invariant::I8), "seed {seed}: {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_a_bank_that_releases_holds_on_a_timer_deterministically() {
    // The checker bites (I4 broken, seen as I1): banks that abort in-doubt
    // branches on their own disagree with the logged Commit when phase 2 is slow.
    let (seed, invariants) = first_violation_with(
        twopc_participant::failpoint::RESOLVE_RELEASE_ON_TIMER,
        FaultMix::Participants,
        30,
        |_| {},
    );
    assert!(invariants.contains(&Invariant::I1), "seed {seed} named {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_a_bank_that_releases_joined_branches_on_a_timer_deterministically() {
    // The checker bites on interactive txns (I1, docs/PROTOCOL.md §12.5): a
    // bank that aborts an in-doubt branch on its own, instead of asking,
    // releases a joined branch while its client still thinks before its
    // Commit, which the log then holds. No faults and no adversaries: only
    // the interactive clients keep a branch undecided that long, and the
    // same seed with every transfer one-shot passes.
    use twopc_participant::failpoint::RESOLVE_RELEASE_ON_TIMER;
    let _serial = one_at_a_time();
    let _scenario = fail::FailScenario::setup();
    twopc_tests::init_tracing();
    fail::cfg(RESOLVE_RELEASE_ON_TIMER, "return").expect("a valid action");
    let config = |seed, share| {
        sim::bite_config(FaultMix::Calm, seed, &|c: &mut SimConfig| {
            c.adversaries = false;
            c.interactive_share = share;
        })
    };
    let (seed, invariants) = (0..5)
        .find_map(|seed| sim::violation_found(seed, deterministic::run(config(seed, INTERACTIVE_BITE_SHARE))))
        .expect("the simulation reports joined branches released on a timer within 5 seeds");
    assert!(invariants.contains(&Invariant::I1), "seed {seed} named {invariants:?}");
    let one_shot = deterministic::run(config(seed, 0.0)).expect("the harness runs");
    assert!(one_shot.passed(), "seed {seed} with one-shot transfers only:\n{one_shot}");
}

/// The share of interactive transfers in the bite tests that need them.
#[cfg(feature = "failpoints")]
const INTERACTIVE_BITE_SHARE: f64 = 0.5;

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_an_operator_commit_of_a_txn_still_preparing_deterministically() {
    // The checker bites on issue 14's operator bug (I1): an operator's
    // Commit, unforced, logged while the leader still collects the votes of
    // a transfer whose debit is then refused. The adversary operator commits
    // running txns without force_commit, which the fixed coordinator refuses.
    // Running txns include interactive ones (§12): an unforced Commit logged
    // for a begun txn whose client then rolls back or vanishes is I8 (its
    // client never committed it), or I1 when a branch is refused.
    let (seed, invariants) =
        first_violation_with(twopc_coordinator::failpoint::OPERATOR_DECIDE_UNCHECKED, FaultMix::Calm, 60, |_| {});
    assert!(
        invariants.contains(&Invariant::I1) || invariants.contains(&Invariant::I8),
        "seed {seed} named {invariants:?}"
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_txn_ids_from_the_far_future_deterministically() {
    // The checker bites on issue 14's far-future bug (I6): ids created years
    // ahead, which the stray client resolves and submits, are recorded by the
    // log, past every retention horizon.
    let (seed, invariants) =
        first_violation_with(twopc_coordinator::failpoint::FUTURE_IDS_UNCHECKED, FaultMix::Calm, 30, |_| {});
    assert!(invariants.contains(&Invariant::I6), "seed {seed} named {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_a_second_outcome_for_a_forgotten_txn_deterministically() {
    // The checker bites on issue 14's retention bug (I2): with txns forgotten
    // a second after they were made, the stray client's Resolve of an old
    // committed txn is presumed aborted (or an operator's Abort logged), a
    // second outcome contradicting what its client was told.
    let (seed, invariants) =
        first_violation_with(twopc_coordinator::failpoint::FORGOTTEN_UNCHECKED, FaultMix::Calm, 30, |c| {
            c.world.retention_ms = SHORT_RETENTION_MS;
        });
    assert!(invariants.contains(&Invariant::I2), "seed {seed} named {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_a_leader_that_logs_membership_changes_it_must_refuse_deterministically() {
    // The checker bites on the membership churn: with the leader's check
    // skipped, a removal of a non-member or of the leader itself is logged
    // and applied, where the cluster must refuse it (docs/PROTOCOL.md §4.6).
    let (seed, invariants) =
        first_violation_with(twopc_coordinator::failpoint::MEMBERSHIP_SKIP_CHECK, FaultMix::Calm, 5, |_| {});
    assert!(invariants.contains(&Invariant::Membership), "seed {seed} named {invariants:?}");
}

#[cfg(feature = "failpoints")]
#[test]
fn the_checker_catches_acknowledgements_dropped_when_their_proposal_fails_deterministically() {
    // The checker bites on issue 14's acknowledgement bug (I7): the first
    // acknowledgement batches of each run fail to be proposed (as an
    // overloaded leader's would) and are dropped instead of proposed again,
    // so their txns wait for acknowledgements as long as the leader leads.
    // Without the adversaries' churn, which restarts the leader (a new term
    // drives every decision again). The same seed with the failures and
    // without the drop passes: it is the drop the checker sees.
    use twopc_coordinator::failpoint::{ACKS_BEFORE_PROPOSE, ACKS_DROPPED_ON_FAILURE};
    let _serial = one_at_a_time();
    let _scenario = fail::FailScenario::setup();
    twopc_tests::init_tracing();
    let config = |seed| sim::bite_config(FaultMix::Calm, seed, &|c: &mut SimConfig| c.adversaries = false);
    let run = |seed| {
        fail::cfg(ACKS_BEFORE_PROPOSE, "3*return").expect("a valid action");
        deterministic::run(config(seed))
    };
    fail::cfg(ACKS_DROPPED_ON_FAILURE, "return").expect("a valid action");
    let (seed, invariants) = (0..5)
        .find_map(|seed| sim::violation_found(seed, run(seed)))
        .expect("the simulation reports the dropped acknowledgements within 5 seeds");
    assert!(invariants.contains(&Invariant::I7), "seed {seed} named {invariants:?}");
    fail::remove(ACKS_DROPPED_ON_FAILURE);
    let fixed = run(seed).expect("the harness runs");
    assert!(fixed.passed(), "seed {seed} with failed proposals proposed again:\n{fixed}");
}

/// The first of `seeds` seeds of `mix` (each config passed through `tweak`)
/// whose run reports a violation, with `failpoint` returning early (breaking
/// the protocol) for the whole search, and the invariants it named.
///
/// # Panics
/// When none does: the checker missed the broken protocol.
#[cfg(feature = "failpoints")]
fn first_violation_with(
    failpoint: &str,
    mix: FaultMix,
    seeds: u64,
    tweak: impl Fn(&mut SimConfig),
) -> (u64, std::collections::BTreeSet<Invariant>) {
    let _serial = one_at_a_time();
    let _scenario = fail::FailScenario::setup();
    twopc_tests::init_tracing();
    fail::cfg(failpoint, "return").expect("a valid action");
    deterministic::first_violation(mix, seeds, tweak)
        .unwrap_or_else(|| panic!("the simulation reports the broken protocol within {seeds} seeds"))
}

/// Where two runs of one seed first differ, if they do.
fn divergence(first: &SeedReport, again: &SeedReport) -> Option<String> {
    let line = (0..first.trace.len().max(again.trace.len())).find(|i| first.trace.get(*i) != again.trace.get(*i))?;
    Some(format!(
        "seed {} diverged at trace line {line}:\n  first: {:?}\n  again: {:?}",
        first.config.seed,
        first.trace.get(line),
        again.trace.get(line)
    ))
}

fn print_with_trace(report: &SeedReport) {
    println!("{report}");
    for line in &report.trace {
        println!("    {line}");
    }
}
