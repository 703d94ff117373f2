//! twopc's coordinator node: a Raft-replicated decision log and, on the
//! leader, the two-phase commit driver.
//!
//! # Layout
//! - [`storage`]: raft-rs `Storage` on raft-engine (entries, hard state) plus state-machine snapshots.
//! - [`transport`]: the peer gRPC service and per-peer outbound streams; a fault filter for tests.
#![deny(missing_docs)]

pub mod storage;
pub mod transport;
