//! The crate's one [`Error`] and [`Result`], and the one place where errors
//! become gRPC statuses (see the status table in the crate docs).

use tonic::Status;
use twopc_proto::context::TXN_STATE_METADATA_KEY;
use twopc_proto::{Decision, ParticipantId, TxnId};

use crate::resource::ResourceError;

/// The result of the participant library's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the participant library.
///
/// Three kinds matter to callers: bad input ([`Error::Invalid`],
/// [`Error::WrongParticipant`]), protocol refusals that retrying will not fix
/// ([`Error::NotPrepared`], [`Error::Conflict`], and for joins
/// [`Error::VotedNo`], [`Error::BranchExists`], [`Error::JoinRefused`],
/// [`Error::JoinFailed`], [`Error::JoinInDoubt`]), and retryable conditions
/// ([`Error::PrepareInflightFull`], [`Error::OutcomeMemoryFull`],
/// [`Error::Unavailable`]). [`Error::is_retryable`] tells them apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{field}: {why}")]
    Invalid {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// The request names another participant than this one.
    #[error("this is participant {ours}, but the request is addressed to {theirs:?}")]
    WrongParticipant {
        /// This participant's configured id.
        ours: ParticipantId,
        /// The name the request carried.
        theirs: String,
    },
    /// `Decision::Commit` for a txn that was never prepared here.
    #[error("txn {txn} was never prepared here, so it cannot be committed")]
    NotPrepared {
        /// The txn.
        txn: TxnId,
    },
    /// A decision that contradicts the one already recorded for the txn: a
    /// protocol violation by whoever sent it.
    #[error("txn {txn} already has decision {recorded}; refusing {requested}")]
    Conflict {
        /// The txn.
        txn: TxnId,
        /// The outcome already recorded.
        recorded: Decision,
        /// The contradicting decision that was refused.
        requested: Decision,
    },
    /// A call that only makes sense inside a txn carries no `twopc-txn`
    /// context (docs/PROTOCOL.md §12.2).
    #[error(
        "{call} needs a txn context (the twopc-txn metadata entry, <txn id>;deadline=<Unix ms>): begin a txn \
         first (Coordinator.Begin) and send its context with the call"
    )]
    NoTxnContext {
        /// The call, such as `Debit`.
        call: String,
    },
    /// A join's branch voted NO (docs/PROTOCOL.md §12.3): nothing is staged
    /// and nothing joined; the reason is the resource's (or "deadline passed").
    #[error("txn {txn}: this participant refused the branch: {reason}")]
    VotedNo {
        /// The txn.
        txn: TxnId,
        /// Why, as the resource said.
        reason: String,
    },
    /// A join of a txn this participant already has a record of: one branch
    /// per participant per txn (docs/PROTOCOL.md §12.3). Nothing was staged.
    #[error(
        "txn {txn} already has a branch at this participant ({state}); a txn has one branch per \
         participant, so do all of this participant's work for the txn in one call"
    )]
    BranchExists {
        /// The txn.
        txn: TxnId,
        /// What this participant knows of it.
        state: &'static str,
    },
    /// A repeated Prepare of a txn prepared here with another payload: one
    /// txn id carries one set of payloads (docs/PROTOCOL.md §3.1). Not a
    /// vote: the branch staged first stays prepared, and its YES stands.
    #[error(
        "txn {txn} {}; a txn id carries one set of payloads, so submit other payloads under a new txn id",
        twopc_proto::payload_digest::PREPARED_WITH_ANOTHER_PAYLOAD
    )]
    PayloadMismatch {
        /// The txn.
        txn: TxnId,
    },
    /// The coordinator refused the join (`FAILED_PRECONDITION`): the txn is
    /// decided, past its deadline, unknown or forgotten (docs/PROTOCOL.md
    /// §12.3). The status carries `state` in `twopc-txn-state`.
    #[error(
        "the coordinator refused to join txn {txn} (state {state}): {message}; {}",
        if *aborted { "the branch was aborted" } else { "the branch stays prepared until the resolver learns its outcome" }
    )]
    JoinRefused {
        /// The txn.
        txn: TxnId,
        /// The txn's state as the coordinator named it, or `UNSTATED`.
        state: String,
        /// The coordinator's message.
        message: String,
        /// Whether the branch was aborted here (else the resolver settles it).
        aborted: bool,
    },
    /// The coordinator answered the join with an error other than a refusal
    /// and that retrying will not fix (this participant is not registered,
    /// or over TLS is not who it claims). The branch stays prepared; the
    /// resolver settles it by the txn's deadline.
    #[error(
        "the coordinator did not join txn {txn}: {code:?}: {message}; the branch stays prepared until the \
         resolver learns the txn's outcome (an abort, by its deadline); roll the txn back"
    )]
    JoinFailed {
        /// The txn.
        txn: TxnId,
        /// The coordinator's status code.
        code: tonic::Code,
        /// The coordinator's message.
        message: String,
    },
    /// No coordinator answered the join before the txn's deadline (or
    /// `join_retry_max_ms`). The join may or may not be logged: the branch
    /// stays prepared and in doubt, and the resolver applies the txn's
    /// outcome to it.
    #[error(
        "no coordinator answered the join of txn {txn} in time ({why}); the branch stays prepared and in \
         doubt until the resolver learns the txn's outcome; roll the txn back"
    )]
    JoinInDoubt {
        /// The txn.
        txn: TxnId,
        /// The last failure seen.
        why: String,
    },
    /// `prepare_inflight_max` Prepares are already running.
    #[error("{max} prepares are already in flight (prepare_inflight_max); retry shortly")]
    PrepareInflightFull {
        /// The configured limit.
        max: usize,
    },
    /// The outcome memory holds `outcome_memory_max` entries that cannot be
    /// evicted yet.
    #[error(
        "the outcome memory is full ({max} entries, outcome_memory_max); retry once decisions \
         arrive or finished entries expire"
    )]
    OutcomeMemoryFull {
        /// The configured limit.
        max: usize,
    },
    /// The resource reported a transient failure; the same call may be retried.
    #[error("resource unavailable: {0}")]
    Unavailable(String),
    /// The resource failed in a way retrying will not fix.
    #[error("resource failed: {0}")]
    Fatal(String),
    /// The configuration is unusable; the message names the field.
    #[error("invalid participant config: {0}")]
    Config(String),
    /// The gRPC server could not run.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A task of the library panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Converts a resource's error for `txn`, given the decision being applied.
    pub(crate) fn from_resource(txn: TxnId, requested: Decision, e: ResourceError) -> Self {
        match e {
            ResourceError::NotPrepared => Self::NotPrepared { txn },
            ResourceError::Conflict { recorded } => Self::Conflict { txn, recorded, requested },
            ResourceError::Unavailable(why) => Self::Unavailable(why),
            ResourceError::Fatal(why) => Self::Fatal(why),
        }
    }

    /// Whether the same call may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::PrepareInflightFull { .. } | Self::OutcomeMemoryFull { .. } | Self::Unavailable(_))
    }
}

/// The one mapping from library errors to gRPC statuses.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid { field, why } => twopc_proto::status::invalid(field, why),
            Error::WrongParticipant { .. }
            | Error::NotPrepared { .. }
            | Error::Conflict { .. }
            | Error::NoTxnContext { .. }
            | Error::VotedNo { .. }
            | Error::BranchExists { .. }
            | Error::PayloadMismatch { .. }
            | Error::JoinFailed { .. } => Status::failed_precondition(message),
            Error::JoinRefused { state, .. } => {
                let mut status = Status::failed_precondition(message);
                if let Ok(value) = state.parse() {
                    status.metadata_mut().insert(TXN_STATE_METADATA_KEY, value);
                }
                status
            }
            Error::JoinInDoubt { .. } => Status::unavailable(message),
            Error::PrepareInflightFull { .. } | Error::OutcomeMemoryFull { .. } => Status::resource_exhausted(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Fatal(_) | Error::Config(_) | Error::Transport(_) | Error::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn each_error_maps_to_its_documented_code() {
        let txn = TxnId::new();
        let cases = [
            (Error::Invalid { field: "txn_id", why: "empty".into() }, Code::InvalidArgument),
            (Error::NotPrepared { txn }, Code::FailedPrecondition),
            (Error::Conflict { txn, recorded: Decision::Abort, requested: Decision::Commit }, Code::FailedPrecondition),
            (Error::PrepareInflightFull { max: 1 }, Code::ResourceExhausted),
            (Error::OutcomeMemoryFull { max: 1 }, Code::ResourceExhausted),
            (Error::Unavailable("disk busy".into()), Code::Unavailable),
            (Error::Fatal("corrupt".into()), Code::Internal),
            (Error::VotedNo { txn, reason: "insufficient funds".into() }, Code::FailedPrecondition),
            (Error::BranchExists { txn, state: "prepared" }, Code::FailedPrecondition),
            (Error::PayloadMismatch { txn }, Code::FailedPrecondition),
            (
                Error::JoinRefused { txn, state: "TIMED OUT".into(), message: "late".into(), aborted: true },
                Code::FailedPrecondition,
            ),
            (Error::JoinFailed { txn, code: Code::NotFound, message: "who".into() }, Code::FailedPrecondition),
            (Error::JoinInDoubt { txn, why: "no leader".into() }, Code::Unavailable),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    // §12.3: a refused join names the txn's state in the status's metadata.
    #[test]
    fn a_refused_join_carries_the_txn_state() {
        let txn = TxnId::new();
        let status = Status::from(Error::JoinRefused {
            txn,
            state: "DECIDED ABORT".into(),
            message: "txn decided".into(),
            aborted: true,
        });
        let state = status.metadata().get(TXN_STATE_METADATA_KEY).and_then(|v| v.to_str().ok());
        assert_eq!(state, Some("DECIDED ABORT"));
        assert!(status.message().contains("the branch was aborted"), "{}", status.message());
    }
}
