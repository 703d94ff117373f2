//! The application's side of twopc: what a program that starts transactions
//! links, without the coordinator's Raft machinery.
//!
//! # Layout
//! - [`cluster`]: [`ClusterClient`], a leader-following client of the cluster's APIs.
//! - [`transaction`]: [`Transaction`], an interactive txn (docs/PROTOCOL.md §12):
//!   begin, call services with its context ([`TxnInterceptor`]), commit or roll back.
//!
//! # An interactive transfer
//!
//! Begin, call each service's own API with the txn's context attached, then
//! commit. A service that refuses its part (here, insufficient funds) has not
//! joined; roll back so the other's hold is released now rather than at the
//! deadline.
//!
//! ```no_run
//! # async fn transfer() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use twopc_client::{ClientConfig, ClusterClient};
//! use twopc_proto::pb::{MoveRequest, bank_client::BankClient};
//!
//! let cluster = ClusterClient::new(vec!["127.0.0.1:7001".into()], ClientConfig::default())?;
//! let txn = cluster.begin(Duration::from_secs(10)).await?;
//!
//! let bank_a = tonic::transport::Channel::from_static("http://127.0.0.1:7101").connect().await?;
//! let bank_b = tonic::transport::Channel::from_static("http://127.0.0.1:7102").connect().await?;
//! let debit = BankClient::with_interceptor(bank_a, txn.interceptor())
//!     .debit(MoveRequest { account: "alice".into(), amount_minor: 1250 })
//!     .await;
//! let credit = match debit {
//!     Ok(_) => BankClient::with_interceptor(bank_b, txn.interceptor())
//!         .credit(MoveRequest { account: "bob".into(), amount_minor: 1250 })
//!         .await
//!         .map(drop),
//!     Err(refused) => Err(refused),
//! };
//! let outcome = match credit {
//!     Ok(()) => txn.commit().await?,
//!     Err(refused) => txn.rollback(refused.message()).await?,
//! };
//! println!("{}: {} {}", txn.id(), outcome.decision, outcome.reason);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod cluster;
pub mod transaction;

pub use cluster::{ClientConfig, ClusterClient};
pub use transaction::{Outcome, Transaction, TxnInterceptor};
