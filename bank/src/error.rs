//! The crate's one [`Error`] and [`Result`], and the one place where errors
//! become gRPC statuses (`impl From<Error> for Status`) or the participant
//! library's [`ResourceError`].

use tonic::Status;
use twopc_participant::ResourceError;
use twopc_proto::{Decision, TxnId};

use crate::address::AccountName;

/// The result of the bank's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the bank.
///
/// Kinds that matter to callers: bad input ([`Error::Invalid`]), answers
/// about accounts ([`Error::AccountNotFound`], [`Error::AccountExists`]),
/// protocol refusals ([`Error::NotPrepared`], [`Error::Conflict`]), retryable
/// conditions ([`Error::QueueFull`], [`Error::Unavailable`]) and fatal ones.
/// [`Error::is_retryable`] tells them apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field or argument is missing or malformed.
    #[error("{field}: {why}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// No account by this name.
    #[error("unknown account {0}")]
    AccountNotFound(AccountName),
    /// An account by this name exists already.
    #[error("account {0} already exists")]
    AccountExists(AccountName),
    /// A Commit for a txn never prepared here.
    #[error("txn {0} was never prepared here")]
    NotPrepared(TxnId),
    /// A decision contradicting the one recorded for the txn.
    #[error("txn {txn} already has decision {recorded}")]
    Conflict {
        /// The txn.
        txn: TxnId,
        /// The outcome already recorded.
        recorded: Decision,
    },
    /// The store's write queue holds `queue_max` operations already.
    #[error("the store's write queue is full ({max} operations, store.queue_max); retry shortly")]
    QueueFull {
        /// The configured limit.
        max: usize,
    },
    /// A transient storage failure; nothing was changed, retry the call.
    #[error("bank store unavailable: {0}")]
    Unavailable(String),
    /// A failure retrying will not fix: corrupt storage or a broken invariant.
    #[error("bank store failed: {0}")]
    Fatal(String),
    /// The configuration is unusable; the message names the field.
    #[error("invalid bank config: {0}")]
    Config(String),
    /// The participant library failed (config, start-up or serving).
    #[error(transparent)]
    Participant(#[from] twopc_participant::Error),
}

impl Error {
    /// Whether the same call may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::QueueFull { .. } | Self::Unavailable(_) => true,
            Self::Participant(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// What went wrong, without the "bank store ..." prefix, to quote
    /// inside another message.
    pub(crate) fn cause(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Unavailable(why) | Self::Fatal(why) => why.as_str().into(),
            other => other.to_string().into(),
        }
    }

    /// A copy of a storage failure, to answer every operation of a failed
    /// write batch with it.
    pub(crate) fn for_each_in_batch(&self) -> Self {
        match self {
            Self::Unavailable(why) => Self::Unavailable(why.clone()),
            other => Self::Fatal(other.to_string()),
        }
    }
}

/// I/O trouble may pass (a full disk is freed); anything else about the
/// file means it cannot be trusted.
impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(io) => Self::Unavailable(format!("storage I/O: {io}")),
            // The writer reopens the file once writes succeed again (see RedbStore).
            redb::Error::PreviousIo => {
                Self::Unavailable("an earlier I/O error left the store file unusable until it is reopened".into())
            }
            redb::Error::DatabaseAlreadyOpen => {
                Self::Unavailable("the store file is open in another process or handle; stop it first".into())
            }
            other => Self::Fatal(format!("storage: {other}")),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Self::from(redb::Error::from(e))
            }
        }
    )*};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The one mapping from bank errors to gRPC statuses.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid { field, why } => twopc_proto::status::invalid(field, why),
            Error::AccountNotFound(_) => Status::not_found(message),
            Error::AccountExists(_) => Status::already_exists(message),
            Error::NotPrepared(_) | Error::Conflict { .. } => Status::failed_precondition(message),
            Error::QueueFull { .. } => Status::resource_exhausted(message),
            Error::Unavailable(_) => Status::unavailable(message),
            Error::Fatal(_) | Error::Config(_) => Status::internal(message),
            Error::Participant(e) => Status::from(e),
        }
    }
}

/// How the participant library sees a store failure on a branch.
impl From<Error> for ResourceError {
    fn from(e: Error) -> Self {
        match e {
            Error::NotPrepared(_) => Self::NotPrepared,
            Error::Conflict { recorded, .. } => Self::Conflict { recorded },
            e if e.is_retryable() => Self::Unavailable(e.to_string()),
            e => Self::Fatal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    // Each error reaches clients as its documented status code.
    #[test]
    fn each_error_maps_to_its_documented_code() {
        let name: AccountName = "alice".parse().expect("valid");
        let txn = TxnId::new();
        let cases = [
            (Error::Invalid { field: "account", why: "empty".into() }, Code::InvalidArgument),
            (Error::AccountNotFound(name.clone()), Code::NotFound),
            (Error::AccountExists(name), Code::AlreadyExists),
            (Error::NotPrepared(txn), Code::FailedPrecondition),
            (Error::QueueFull { max: 1 }, Code::ResourceExhausted),
            (Error::Unavailable("disk".into()), Code::Unavailable),
            (Error::Fatal("corrupt".into()), Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }

    // The participant library retries what is transient and refuses what is not.
    #[test]
    fn resource_errors_keep_their_kind() {
        let txn = TxnId::new();
        assert_eq!(ResourceError::from(Error::NotPrepared(txn)), ResourceError::NotPrepared);
        assert_eq!(
            ResourceError::from(Error::Conflict { txn, recorded: Decision::Commit }),
            ResourceError::Conflict { recorded: Decision::Commit }
        );
        assert!(matches!(ResourceError::from(Error::QueueFull { max: 1 }), ResourceError::Unavailable(_)));
        assert!(matches!(ResourceError::from(Error::Fatal("x".into())), ResourceError::Fatal(_)));
    }
}
