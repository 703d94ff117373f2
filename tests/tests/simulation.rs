//! Seeded fault-injection runs (docs/TESTING.md): every seed starts a whole
//! system, moves money under a fault schedule drawn from the seed, heals,
//! settles, and checks I1, I2, I4, I7 and I8 on the final state.
//!
//! - CI smoke: 210 seeds (30 per fault mix), a few at a time.
//! - Replay one seed: `TWOPC_SIM_SEED=17 cargo test -p twopc-tests --test simulation -- --nocapture`.
//! - Soak: `TWOPC_SIM_SEEDS=5000 [TWOPC_SIM_FIRST_SEED=...] [TWOPC_SIM_PARALLEL=...] cargo test -p
//!   twopc-tests --release --test simulation -- --nocapture`.

use twopc_tests::checker::Invariant;
use twopc_tests::sim::schedule::FaultMix;
use twopc_tests::sim::{self, SimConfig};

/// Seeds the smoke covers: 30 for each of the 7 fault mixes.
const SMOKE_SEEDS: u64 = 210;
/// Seeds run at once on a 2-core machine: most of a run is waiting.
const PARALLEL: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules_keep_every_invariant() {
    twopc_tests::init_tracing();
    let seeds = sim::seeds_from_env(SMOKE_SEEDS);
    let parallel = sim::parallelism_from_env(PARALLEL);
    let verbose = std::env::var_os("TWOPC_SIM_VERBOSE").is_some();
    let started = std::time::Instant::now();
    let results = sim::run_many(seeds.clone(), parallel, SimConfig::for_seed).await;
    let mut failed = Vec::new();
    for (seed, result) in &results {
        match result {
            Ok(report) if report.passed() => {
                if seeds.len() == 1 || verbose {
                    println!("{report}");
                }
            }
            Ok(report) => {
                println!("{report}");
                failed.push(*seed);
            }
            Err(err) => {
                println!(
                    "seed {seed}: the harness failed: {err:#}\n  replay: {}",
                    SimConfig::for_seed(*seed).replay_command()
                );
                failed.push(*seed);
            }
        }
    }
    println!("{}", sim::summary(&results));
    println!("{} seeds ({} at a time) in {:?}; failed: {failed:?}", seeds.len(), parallel, started.elapsed());
    assert!(failed.is_empty(), "seeds {failed:?} failed; their reports and replay commands are printed above");
    let uncovered = sim::interactive_uncovered(&results);
    assert!(uncovered.is_empty(), "no interactive txn committed, or none abandoned, under {uncovered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_banks_that_answer_before_their_fsync() {
    // The checker bites through the crash model (I3 broken, seen as I8):
    // banks whose store skips its fsync vote YES and acknowledge decisions
    // that are not durable, and a bank crash, which takes back every unsynced
    // write, loses money the log says moved.
    twopc_tests::init_tracing();
    let found = sim::first_violation(FaultMix::Crashes, 30, |config| config.world.banks_skip_fsync = true).await;
    let (seed, invariants) = found.expect("the simulation reports the broken store within 30 seeds");
    assert!(invariants.contains(&Invariant::I8), "seed {seed} named {invariants:?}");
}
