//! Harnesses for twopc's whole-system tests.
//!
//! # Layout
//! - [`calls`]: the coordinator's interactive-txn calls made raw, their statuses for the test to check.
//! - [`checker`]: the invariant checker (I1, I2, I4, I6, I7, I8, membership) over a run's final state and what anyone was told.
//! - [`cluster`]: an in-process coordinator cluster on 127.0.0.1 ephemeral
//!   ports, with kill, crash (unsynced writes lost), restart and a shared fault filter.
//! - [`gate`]: a participant client whose calls tests can hold or fail.
//! - [`participants`]: participant servers over the in-memory resource, and a black hole.
//! - [`sim`]: seeded fault-injection runs of a whole system (coordinators, banks, clients).
//! - [`wait`]: polling a condition with a bounded deadline (never a fixed sleep).
//! - [`metric`]: one value read from a `/metrics` text body.
#![deny(missing_docs)]

pub mod calls;
pub mod checker;
pub mod cluster;
pub mod gate;
pub mod participants;
pub mod sim;
pub mod wait;

/// The value of unlabelled metric `name` in a Prometheus text body (a
/// coordinator's or a bank's `/metrics`).
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Sends test logs to the test's output: errors, or what `RUST_LOG` asks for.
/// raft-engine's complaint that a crashed node's log cannot be closed is the
/// simulated crash doing its job, so it is left out unless asked for.
pub fn init_tracing() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => tracing_subscriber::EnvFilter::new(directives),
        Err(_) => tracing_subscriber::EnvFilter::new("error,raft_engine::file_pipe_log::pipe=off"),
    };
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}
