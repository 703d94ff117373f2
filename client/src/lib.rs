//! The application's side of twopc: what a program that starts transactions
//! links, without the coordinator's Raft machinery.
//!
//! # Layout
//! - [`cluster`]: [`ClusterClient`], a leader-following client of the cluster's APIs.
#![deny(missing_docs)]

pub mod cluster;

pub use cluster::{ClientConfig, ClusterClient};
