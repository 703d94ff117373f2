//! Harnesses for twopc's whole-system tests.
//!
//! # Layout
//! - [`checker`]: the invariant checker (I1, I2, I4, I7, I8) over a run's final state and client history.
//! - [`cluster`]: an in-process coordinator cluster on 127.0.0.1 ephemeral
//!   ports, with kill, restart and a shared fault filter.
//! - [`gate`]: a participant client whose calls tests can hold or fail.
//! - [`participants`]: participant servers over the in-memory resource, and a black hole.
//! - [`sim`]: seeded fault-injection runs of a whole system (coordinators, banks, clients).
//! - [`wait`]: polling a condition with a bounded deadline (never a fixed sleep).
#![deny(missing_docs)]

pub mod checker;
pub mod cluster;
pub mod gate;
pub mod participants;
pub mod sim;
pub mod wait;

/// Sends test logs to the test's output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
