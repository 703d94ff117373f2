//! twopc's coordinator node: a Raft-replicated decision log and, on the
//! leader, the two-phase commit driver.
//!
//! # Layout
//! - [`config`]: [`config::NodeConfig`], every knob with its default.
//! - [`error`]: the crate's [`Error`], and its one mapping to `tonic::Status`.
//! - [`command`]: what the log holds ([`command::Command`]) and its binary encoding.
//! - [`state_machine`]: the applied state: txn table, participant registry, members. Pure.
//! - [`engine`]: the 2PC driver: Submit (sequential, or parallel commit with status recovery,
//!   docs/PROTOCOL.md §13), Resolve, operator decisions, phase-2 delivery, retention GC.
//! - [`failpoint`]: names of the test failpoints (feature `failpoints`) at the protocol's dangerous points.
//! - [`participant_client`]: the seam to participants and its gRPC implementation.
//! - [`prepare_batch`]: Prepares to one participant gathered into `PrepareBatch` calls under load.
//! - [`metrics`]: phase latency histograms, the Prometheus rendering and its HTTP endpoint.
//! - `election_timeout`: seeded election timeouts in place of raft-rs's thread-random ones (replayable elections).
//! - [`node`]: the task owning raft-rs's `RawNode` (the Ready loop) and its [`node::NodeHandle`].
//! - [`raft_log`]: raft-rs's slog output routed into tracing.
//! - [`service`]: gRPC handlers for the client and admin APIs.
//! - [`server`]: one tonic server per node carrying peer, client and admin services.
//! - [`storage`]: raft-rs `Storage` on raft-engine (entries, hard state) plus state-machine snapshots.
//! - `lossy_disk` (feature `testing`): a disk whose crash takes back every write not yet synced, for crash tests.
//! - [`transport`]: the peer gRPC service and per-peer outbound streams; a fault filter for tests.
#![deny(missing_docs)]

pub mod command;
pub mod config;
mod election_timeout;
pub mod engine;
pub mod error;
pub mod failpoint;
#[cfg(feature = "testing")]
pub mod lossy_disk;
pub mod metrics;
pub mod node;
pub mod participant_client;
pub mod prepare_batch;
pub mod raft_log;
pub mod server;
pub mod service;
pub mod state_machine;
pub mod storage;
pub mod transport;

pub use error::{Error, Result};
