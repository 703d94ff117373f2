//! twopc-bank: an account service that takes part in twopc transactions,
//! built on the participant library (docs/PROTOCOL.md section 3).
//!
//! Balances are integers in minor units (cents). A transfer is a txn with a
//! debit branch at the payer's bank and a credit branch at the payee's
//! ([`Transfer`]). Prepare of a debit places a durable hold (the available
//! funds, balance less holds, must cover it, or the bank votes NO
//! "insufficient funds"); Prepare of a credit is staged; the decision applies
//! or releases them. The embedded store is one redb file per bank, fsync'd
//! before every YES vote, with group commit: concurrent operations share one
//! write transaction and one fsync.
//!
//! Money enters only as opening balances ([`AccountStore::create_account`],
//! the Bank API's `CreateAccount`): that is the "mint". Afterwards it only
//! moves, so with no branch in doubt the sum of all balances over all banks
//! equals what was minted (I8).
//!
//! ```no_run
//! use twopc_bank::{BankConfig, server};
//!
//! # async fn start() -> Result<(), Box<dyn std::error::Error>> {
//! let config = BankConfig::new("bank-a".parse()?, vec!["127.0.0.1:7000".into()], "data/bank-a");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7100").await?;
//! server::run(listener, config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`money`]: parsing `12.50` into minor units and formatting them back.
//! - [`address`]: [`AccountName`] and [`AccountAddress`] (`alice@bank-a`).
//! - [`payload`]: [`BranchPayload`], the typed debit/credit operations a branch carries, and their encoding.
//! - [`transfer`]: [`Transfer`], a checked transfer and the branches to submit for it.
//! - [`store`]: the [`AccountStore`] seam and its contract (a PostgreSQL store slots in here).
//! - [`redb_store`]: [`RedbStore`], the embedded store: one redb file, one group-committing writer thread.
//! - [`pg_store`]: [`PgStore`], the store on PostgreSQL: branches are prepared transactions, holds as in redb.
//! - [`resource`]: [`BankResource`], the participant library's `Resource` over any store.
//! - [`service`]: [`BankService`], the gRPC `twopc.v1.Bank` API (create, balance, list, total; Debit and Credit inside interactive txns).
//! - [`events`]: the bank's events (debited, credited, opened), staged with each branch and published through the
//!   participant library's outbox to NATS JetStream ([`events::EventsConfig`]).
//! - [`server`]: [`server::run`], one port serving the Participant and Bank APIs.
//! - [`metrics`]: [`metrics::BankMetrics`], the participant's and the outbox relay's counters for `GET /metrics`.
//! - [`config`]: [`BankConfig`] and [`StoreConfig`], every setting with its default.
//! - [`error`]: the crate's [`Error`] and [`Result`], and the one mapping to gRPC statuses.
//!
//! # Status codes of the Bank API
//!
//! | Call | Condition | Code |
//! |---|---|---|
//! | all | `account` or `page_token` not a valid account name | `INVALID_ARGUMENT` |
//! | CreateAccount | `initial_balance_minor` negative | `INVALID_ARGUMENT` |
//! | CreateAccount | the name is taken | `ALREADY_EXISTS` |
//! | Balance | no such account | `NOT_FOUND` |
//! | all | the `twopc-txn` metadata entry is present but malformed | `INVALID_ARGUMENT` |
//! | Debit, Credit | no `twopc-txn` entry ("Debit needs a txn context ... begin a txn first") | `FAILED_PRECONDITION` |
//! | Debit, Credit | `account` not a valid account name, `amount_minor` not above 0 | `INVALID_ARGUMENT` |
//! | Debit, Credit | the bank votes NO: insufficient funds, unknown account, "deadline passed" (the reason in the message); nothing is held or joined | `FAILED_PRECONDITION` |
//! | Debit, Credit | this bank already has a branch of the txn (one per bank per txn); nothing more is held | `FAILED_PRECONDITION` |
//! | Debit, Credit | the coordinator refused the join (the txn decided, timed out, unknown; its state in `twopc-txn-state`); the hold is released | `FAILED_PRECONDITION` |
//! | Debit, Credit | no coordinator answered the join before the deadline; the hold stays until the resolver learns the txn's outcome | `UNAVAILABLE` |
//! | all | the store's write queue is full (`store.queue_max`) | `RESOURCE_EXHAUSTED` |
//! | all | transient storage failure, or the store reopening its file after an I/O error (a full disk); the message starts `bank store unavailable:` | `UNAVAILABLE` |
//! | all | corrupt storage | `INTERNAL` |
#![deny(missing_docs)]

pub mod address;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod money;
pub mod payload;
pub mod pg_store;
pub mod redb_store;
pub mod resource;
pub mod server;
pub mod service;
pub mod store;
pub mod transfer;

pub use address::{AccountAddress, AccountName};
pub use config::{BankConfig, StoreConfig};
pub use error::{Error, Result};
pub use money::{format_minor, parse_amount, parse_balance};
pub use payload::{BranchPayload, Operation};
pub use pg_store::PgStore;
pub use redb_store::RedbStore;
pub use resource::BankResource;
pub use service::BankService;
pub use store::{AccountBalance, AccountStore, BranchState, Totals};
pub use transfer::Transfer;
