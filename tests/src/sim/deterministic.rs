//! Deterministic runs: the same seeded run as [`super::run`], with the
//! whole system on one thread under virtual time, so a seed replays
//! exactly (docs/TESTING.md, "Deterministic runs: exact replay").
//!
//! What makes a run repeatable:
//! - one thread: a current-thread tokio runtime runs every coordinator,
//!   bank and client; the coordinators' Ready loops and the banks' store
//!   writers run as its tasks, and blocking calls run in place
//!   ([`twopc_proto::host::simulate`]);
//! - virtual time: the runtime starts paused, so time moves only when
//!   every task waits, straight to the next timer; a blocking fsync takes
//!   no virtual time at all. The wall clock is virtual too: a fixed epoch
//!   plus the run's virtual time (each node's clock offset on top);
//! - an in-memory network with a latency per connection
//!   ([`super::network`]), so no socket's readiness depends on the kernel;
//! - one seed for every draw: the schedule, the workload, elections, call
//!   chaos, link-fault dice, backoff jitter and txn ids
//!   ([`twopc_proto::host::seed_this_thread`]).
//!
//! Each run's [`SeedReport::trace`] (every fault as it struck, every
//! client's txn with its id and outcome, leaders per term, each node's
//! final log position, virtual times) is compared across two runs of one
//! seed by the test that proves replay is exact.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::{Arc, Once};
use std::time::Duration;

use tokio::time::Instant;
use twopc_proto::host::{self, Simulated};

use super::network::{self, MemoryNetwork};
use super::schedule::FaultMix;
use super::{SeedReport, SimConfig};
use crate::checker::Invariant;

// tokio lets a caller seed its generator only under this cfg; without the
// seed, runs diverge on replay.
#[cfg(not(tokio_unstable))]
compile_error!(
    "the deterministic simulation needs `--cfg tokio_unstable` (set in .cargo/config.toml; a RUSTFLAGS \
     variable replaces it, so add the flag there too)"
);

/// Unix milliseconds at a run's start: 2026-01-01T00:00:00Z.
const EPOCH_UNIX_MS: u64 = 1_767_225_600_000;

thread_local! {
    /// When this thread's current run started, in its virtual time.
    static RUN_START: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The virtual wall clock: [`EPOCH_UNIX_MS`] plus the run's virtual time.
fn virtual_unix_now_ms() -> u64 {
    let since_start = RUN_START.with(Cell::get).map_or(Duration::ZERO, |start| start.elapsed());
    EPOCH_UNIX_MS.saturating_add(u64::try_from(since_start.as_millis()).unwrap_or(u64::MAX))
}

/// Makes this process a simulation (the in-memory network, the virtual
/// clock); idempotent. A test binary that calls it runs only deterministic
/// runs: real sockets are gone for its whole life.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let simulated = Simulated { network: Arc::new(MemoryNetwork), unix_now_ms: virtual_unix_now_ms };
        if let Err(why) = host::simulate(simulated) {
            panic!("installing the deterministic simulation: {why}");
        }
    });
}

/// Runs one seed deterministically on this thread (see the module docs).
///
/// # Errors
/// The harness failed (a runtime could not be built, a store could not be
/// read); violations are in the report.
pub fn run(mut config: SimConfig) -> anyhow::Result<SeedReport> {
    install();
    network::reset();
    host::seed_this_thread(config.seed);
    config.replay_test = "deterministic";
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    // tokio's own draws (which select! branch first, which watch notifier a
    // waiter parks on) come from this generator (docs/TESTING.md).
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&config.seed.to_le_bytes()));
    let runtime = builder.build()?;
    // A panic anywhere in the system (all of it runs on this thread) is the
    // seed's failure, reported with its replay command, not the end of a
    // whole smoke.
    let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            // The paused clock starts a few real microseconds past the timer
            // wheel's origin, a different amount every run. One timer's wait
            // puts it on a whole millisecond of the wheel, so every later
            // deadline rounds to the same tick in every run.
            tokio::time::sleep(Duration::from_millis(1)).await;
            RUN_START.with(|start| start.set(Some(Instant::now())));
            super::run(config).await
        })
    }))
    .unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied());
        Err(anyhow::anyhow!("the run panicked: {}", what.unwrap_or("(no message)")))
    });
    RUN_START.with(|start| start.set(None));
    // Dropping the runtime drops every task it still holds (a node's
    // channels, a bank's connections) on this thread, before the next run.
    drop(runtime);
    report
}

/// [`super::first_violation`], run deterministically: seeds 0, 1, ... of
/// `mix` until the checker reports a violation, or None after `seeds`.
pub fn first_violation(
    mix: FaultMix,
    seeds: u64,
    tweak: impl Fn(&mut SimConfig),
) -> Option<(u64, BTreeSet<Invariant>)> {
    (0..seeds).find_map(|seed| super::violation_found(seed, run(super::bite_config(mix, seed, &tweak))))
}
