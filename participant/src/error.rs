//! The crate's one [`Error`] and [`Result`], and the one place where errors
//! become gRPC statuses (see the status table in the crate docs).

use tonic::Status;
use twopc_proto::{Decision, ParticipantId, TxnId};

use crate::resource::ResourceError;

/// The result of the participant library's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the participant library.
///
/// Three kinds matter to callers: bad input ([`Error::Invalid`],
/// [`Error::WrongParticipant`]), protocol refusals that retrying will not fix
/// ([`Error::NotPrepared`], [`Error::Conflict`]), and retryable conditions
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
            Error::WrongParticipant { .. } | Error::NotPrepared { .. } | Error::Conflict { .. } => {
                Status::failed_precondition(message)
            }
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
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }
}
