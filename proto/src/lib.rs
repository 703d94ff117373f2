//! twopc's wire protocol and the domain types checked at its boundary.
//!
//! Generated code stays in [`pb`]; everything else in twopc works with the
//! domain types below, converted (and validated) first thing in every handler.
//!
//! # Layout
//! - [`pb`]: generated messages and tonic clients/servers for package `twopc.v1`.
//!   `proto/bank.proto` is the account service's own API (`Bank`), used by twopc-bank.
//! - [`txn_id`]: [`TxnId`], a time-ordered UUIDv7 whose creation time can be read back.
//! - [`participant_id`]: [`ParticipantId`], a validated participant name.
//! - [`vote`]: [`Vote`] and [`Decision`], the two answers of the protocol.
//! - [`payload_digest`]: [`PayloadDigest`], the SHA-256 tying a branch's Prepare to its txn's Submit.
//! - [`context`]: [`TxnContext`], an interactive txn's id and deadline in the `twopc-txn` metadata entry.
//! - [`status`]: building and reading gRPC statuses: invalid arguments, leader hints.
//! - [`clock`]: [`Clock`], the wall clock a node reads (tests step one node's clock).
//! - [`host`]: what twopc takes from the machine (network, wall clock, randomness,
//!   threads), which a deterministic simulation replaces.
//! - [`net`]: listening and dialing through the host's network, plaintext or mutual TLS.
//! - [`tls`]: identities, the CA/certificate/key files, and rustls configs from them.
//! - [`auth`]: which role may call which method, checked per call from the peer certificate.
//! - [`certs`]: making a CA and certificates (`twopc certs init`, tests).
//! - [`metrics_http`]: the `GET /metrics` endpoint and the Prometheus text lines.
#![deny(missing_docs)]

pub mod auth;
pub mod certs;
pub mod clock;
pub mod context;
pub mod host;
pub mod metrics_http;
pub mod net;
pub mod participant_id;
pub mod payload_digest;
pub mod status;
pub mod tls;
pub mod txn_id;
pub mod vote;

pub use clock::Clock;
pub use context::TxnContext;
pub use participant_id::ParticipantId;
pub use payload_digest::PayloadDigest;
pub use txn_id::TxnId;
pub use vote::{Decision, Vote};

/// Generated protobuf messages and tonic services, package `twopc.v1`.
///
/// Handlers convert these into domain types before doing anything else.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/twopc.v1.rs"));
}

/// The largest gRPC message any twopc server decodes or encodes, in bytes.
///
/// Servers and clients set this explicitly so a limit is never implicit.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
