//! The participant library: what a service links in to take part in twopc
//! transactions (docs/PROTOCOL.md §3).
//!
//! The service implements [`Resource`] (stage a branch durably, apply it,
//! release it, list what it holds prepared) and calls [`run`]. The library
//! owns the gRPC server, the outcome memory that makes every call idempotent
//! (I5) and keeps tombstones (I4), the in-doubt resolver (I7), the bounds
//! (I6) and the [`Metrics`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use twopc_participant::{MemoryResource, Participant, ParticipantConfig};
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ParticipantConfig::new("bank-a".parse()?, vec!["10.0.0.1:7000".into()]);
//! let participant = Participant::new(Arc::new(MemoryResource::new()), config)?;
//! let metrics = participant.metrics(); // read metrics.snapshot() from anywhere
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:7100").await?;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! participant.serve(listener, shutdown).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`resource`]: the [`Resource`] trait a service implements, and its contract.
//! - [`server`]: [`run`] and [`Participant`]: the gRPC Participant service plus the resolver.
//! - [`join`]: [`Joiner`], how the service's own handlers join interactive txns (docs/PROTOCOL.md §12).
//! - [`context`]: reading a txn's context in the service's handlers (a tonic interceptor and helpers).
//! - [`config`]: [`ParticipantConfig`], every limit and timeout with its default.
//! - [`error`]: the crate's [`Error`] and [`Result`], and the one mapping to gRPC statuses.
//! - [`metrics`]: [`Metrics`], counters readable through a handle.
//! - [`memory`]: [`MemoryResource`], an in-memory resource that honours the contract.
//! - [`failpoint`]: names of the test failpoints (feature `failpoints`) at the protocol's dangerous points.
//! - `engine`: the per-txn-locked path shared by the server and the resolver.
//! - `outcomes`: the bounded outcome memory (votes, decisions, tombstones).
//! - `resolver`: asks the coordinator cluster about branches left in doubt.
//! - `cluster`: the coordinator nodes as the resolver and the joiner call them (leader hints, lazy channels).
//! - `conformance` (feature `testing`): the suite every [`Resource`] implementation runs.
//! - `fake_coordinator` (feature `testing`): a scriptable coordinator (Resolve, Begin, Join, Commit, Rollback).
//! - [`postgres`] (feature `postgres`): [`postgres::PostgresResource`], branches as PostgreSQL prepared transactions.
//! - `postgres_testing` (features `postgres` and `testing`): a test server or a reason to skip, throwaway schemas.
//! - [`outbox`] (feature `events`): the transactional outbox: events staged with a branch, published to NATS
//!   JetStream iff it commits (the relay), shared redb tables, and `EventResource`, a participant that only publishes.
//! - `nats_testing` (features `events` and `testing`): a test NATS server or a reason to skip, unique stream names.
//!
//! # Status codes
//!
//! | Call | Condition | Code |
//! |---|---|---|
//! | both | `txn_id` empty, not a UUID, or not a UUIDv7 | `INVALID_ARGUMENT` |
//! | both | `participant` non-empty and not this participant's id | `FAILED_PRECONDITION` |
//! | Prepare | payload longer than `payload_max_bytes` (the message says the limit) | `INVALID_ARGUMENT` |
//! | Prepare | `deadline_unix_ms` is 0 | `INVALID_ARGUMENT` |
//! | Prepare | the deadline has passed | OK, vote NO "deadline passed" (remembered, and the resource keeps a tombstone) |
//! | Prepare | an Abort for the txn came first (tombstone, I4) | OK, vote NO |
//! | Prepare | repeated | OK, the recorded vote; the resource is not called again (I5) |
//! | Prepare | `prepare_inflight_max` Prepares already running | `RESOURCE_EXHAUSTED` |
//! | Prepare | outcome memory full of entries it may not evict (`outcome_memory_max`) | `RESOURCE_EXHAUSTED` |
//! | Decide | `decision` unspecified or unknown | `INVALID_ARGUMENT` |
//! | Decide | Commit for a txn never prepared here | `FAILED_PRECONDITION` |
//! | Decide | contradicts the recorded decision or a NO vote (logged as a protocol violation) | `FAILED_PRECONDITION` |
//! | Decide | repeated | OK, nothing changes (I5) |
//! | Decide | Abort for a txn never prepared here | OK, a tombstone is kept (I4) |
//! | RecoverVote | the branch is prepared or committed here | OK, vote YES (docs/PROTOCOL.md §13.3) |
//! | RecoverVote | voted NO, aborted, or staged for a join | OK, vote NO |
//! | RecoverVote | no record of the txn, or its prepare failed before voting | OK, vote NO, once the resource aborted it (a durable tombstone: no later Prepare votes YES) |
//! | RecoverVote | the resource failed to abort it | `UNAVAILABLE` or `INTERNAL`; ask again |
//! | PrepareBatch, DecideBatch | no items, or more than `prepare_batch_max` / `decide_batch_max` | `INVALID_ARGUMENT` |
//! | PrepareBatch, DecideBatch | `participant` non-empty and not this participant's id | `FAILED_PRECONDITION` |
//! | PrepareBatch, DecideBatch | otherwise | OK, one result per item: the code its own Prepare or Decide would return (0 for OK, with the vote) |
//! | Prepare | the resource failed (either code below); the branch may be staged, so it stays in doubt and the resolver settles it | `UNAVAILABLE` or `INTERNAL` |
//! | both | the resource reports a transient failure (retry the same call) | `UNAVAILABLE` |
//! | both | the resource fails otherwise | `INTERNAL` |
//!
//!
//! A service's own calls that join interactive txns (docs/PROTOCOL.md §12),
//! through [`context`] and [`Joiner`]:
//!
//! | Call | Condition | Code |
//! |---|---|---|
//! | any, behind [`context::read_txn_context`] | the `twopc-txn` entry is malformed, repeated or not ASCII | `INVALID_ARGUMENT` |
//! | [`context::require_txn_context`] | no `twopc-txn` entry: begin a txn first | `FAILED_PRECONDITION` |
//! | join | the txn id was created more than `txn_id_future_skew_ms` after this participant's clock (the coordinators would never settle it); nothing staged | `INVALID_ARGUMENT` |
//! | join | this participant already has a record of the txn (one branch per participant per txn); nothing staged | `FAILED_PRECONDITION` |
//! | join | the branch voted NO (the resource's reason, or "deadline passed"); nothing staged or joined | `FAILED_PRECONDITION` |
//! | join | the coordinator refused the Join (the txn decided, timed out, unknown, forgotten; its state in `twopc-txn-state`); the branch is aborted, or if the state may name it, left to the resolver | `FAILED_PRECONDITION` |
//! | join | the coordinator answered with another error retrying will not fix (not registered, not the caller over TLS, `branches_per_txn_max`); the branch stays prepared for the resolver | `FAILED_PRECONDITION` |
//! | join | no coordinator answered by the deadline (at most `join_retry_max_ms`); the branch stays prepared and in doubt for the resolver | `UNAVAILABLE` |
//! | join | as a Prepare: `prepare_inflight_max`, `outcome_memory_max`, a resource failure | as for Prepare above |
//!
//! The mapping lives in one place, `impl From<Error> for tonic::Status`.
#![deny(missing_docs)]

mod cluster;
pub mod config;
pub mod context;
mod engine;
pub mod error;
pub mod failpoint;
pub mod join;
pub mod memory;
pub mod metrics;
mod outcomes;
mod resolver;
pub mod resource;
pub mod server;

#[cfg(feature = "testing")]
pub mod conformance;
#[cfg(feature = "testing")]
pub mod fake_coordinator;
#[cfg(all(feature = "events", feature = "testing"))]
pub mod nats_testing;
#[cfg(feature = "events")]
pub mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(all(feature = "postgres", feature = "testing"))]
pub mod postgres_testing;

pub use config::ParticipantConfig;
pub use error::{Error, Result};
pub use join::{Joined, Joiner};
pub use memory::MemoryResource;
pub use metrics::{Metrics, MetricsSnapshot};
pub use resource::{Resource, ResourceError};
pub use server::{Participant, run};
pub use twopc_proto::context::TxnContext;
pub use twopc_proto::{Decision, ParticipantId, TxnId, Vote};
