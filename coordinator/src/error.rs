//! The coordinator's one error type, and its single mapping to `tonic::Status`.
//!
//! Three kinds matter to callers: "not leader" (retry at the hint), retryable
//! (retry here, same txn id), and fatal (a bug or a broken disk: stop).

use tonic::Status;
use tonic::metadata::MetadataValue;
use twopc_proto::context::TXN_STATE_METADATA_KEY;

use crate::state_machine::TXN_STATE_FORGOTTEN;
use crate::storage::StorageError;

/// Result with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside a coordinator node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This node is not the leader; `leader_addr` is where to retry, if known.
    #[error("not the leader (leader: {})", leader_addr.as_deref().unwrap_or("unknown"))]
    NotLeader {
        /// The current leader's client address, if known.
        leader_addr: Option<String>,
    },
    /// The request may be retried unchanged: the outcome of a proposal is not
    /// known (leadership changed, the entry was overwritten) or a bound was hit
    /// for a moment.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The call did not finish before its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A bounded queue or table is full.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Bad input from the caller, with an actionable message.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A valid request that the current state refuses.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The txn id may have been decided and forgotten after retention
    /// (docs/PROTOCOL.md §7.2): its outcome is no longer kept.
    #[error("forgotten: {0}")]
    Forgotten(String),
    /// A valid request that the txn's state refuses, naming the state (the
    /// `twopc-txn-state` metadata entry, docs/PROTOCOL.md §12.3): a refused Join.
    #[error("failed precondition ({state}): {message}")]
    TxnState {
        /// `DECIDED COMMIT`, `DECIDED ABORT`, `TIMED OUT`, `UNKNOWN`.
        state: &'static str,
        /// What happened and what to do.
        message: String,
    },
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The raft node has stopped (shutdown or a fatal error).
    #[error("the raft node has stopped")]
    Stopped,
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The log store failed; the node cannot continue safely.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A log entry or snapshot could not be decoded: corruption or a version mismatch.
    #[error("corrupt log data: {0}")]
    Corrupt(String),
    /// A socket or file operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the same request may be sent again (here or at the leader).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::NotLeader { .. } | Self::Retryable(_) | Self::Timeout(_) | Self::Overloaded(_))
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::NotLeader { leader_addr } => twopc_proto::status::not_leader(leader_addr.as_deref()),
            Error::Retryable(msg) => Status::unavailable(format!("{msg}; retry with the same txn id")),
            Error::Timeout(msg) => Status::deadline_exceeded(msg),
            Error::Overloaded(msg) => Status::resource_exhausted(msg),
            Error::InvalidArgument(msg) => Status::invalid_argument(msg),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::TxnState { state, message } => {
                let mut status = Status::failed_precondition(message);
                status.metadata_mut().insert(TXN_STATE_METADATA_KEY, MetadataValue::from_static(state));
                status
            }
            Error::Forgotten(msg) => {
                let mut status = twopc_proto::status::forgotten(msg);
                status.metadata_mut().insert(TXN_STATE_METADATA_KEY, MetadataValue::from_static(TXN_STATE_FORGOTTEN));
                status
            }
            Error::NotFound(msg) => Status::not_found(msg),
            Error::Stopped => Status::unavailable("this coordinator node is shutting down; try another"),
            other @ (Error::Raft(_) | Error::Storage(_) | Error::Corrupt(_) | Error::Io(_)) => {
                Status::internal(other.to_string())
            }
        }
    }
}
