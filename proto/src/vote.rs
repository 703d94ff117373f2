//! The protocol's two answers: a participant's [`Vote`] and the coordinator's
//! [`Decision`], with their conversions to and from the wire enums.

use std::fmt;

use crate::pb;

/// A participant's answer to Prepare.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Vote {
    /// Staged durably; the branch can be committed.
    Yes,
    /// Cannot be committed, with a reason a person can read.
    No {
        /// For example "insufficient funds".
        reason: String,
    },
}

impl Vote {
    /// A NO vote with the given reason.
    pub fn no(reason: impl Into<String>) -> Self {
        Self::No { reason: reason.into() }
    }

    /// Whether this is a YES vote.
    pub fn is_yes(&self) -> bool {
        matches!(self, Self::Yes)
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::PrepareResponse {
        match self {
            Self::Yes => pb::PrepareResponse { vote: pb::VoteKind::Yes.into(), reason: String::new() },
            Self::No { reason } => pb::PrepareResponse { vote: pb::VoteKind::No.into(), reason: reason.clone() },
        }
    }

    /// Reads a vote from its wire form.
    ///
    /// # Errors
    /// An unspecified or unknown vote kind.
    pub fn from_pb(kind: i32, reason: &str) -> Result<Self, WireEnumError> {
        match pb::VoteKind::try_from(kind) {
            Ok(pb::VoteKind::Yes) => Ok(Self::Yes),
            Ok(pb::VoteKind::No) => Ok(Self::no(reason)),
            _ => Err(WireEnumError { field: "vote", value: kind }),
        }
    }
}

/// The two-phase commit outcome of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Decision {
    /// Every branch voted YES and the decision entry is applied.
    Commit,
    /// Some branch voted NO, timed out, or the txn was presumed aborted.
    Abort,
}

impl Decision {
    /// The wire enum value.
    pub fn to_pb(self) -> pb::Decision {
        match self {
            Self::Commit => pb::Decision::Commit,
            Self::Abort => pb::Decision::Abort,
        }
    }
}

impl From<Decision> for i32 {
    fn from(d: Decision) -> Self {
        d.to_pb().into()
    }
}

impl TryFrom<i32> for Decision {
    type Error = WireEnumError;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match pb::Decision::try_from(value) {
            Ok(pb::Decision::Commit) => Ok(Self::Commit),
            Ok(pb::Decision::Abort) => Ok(Self::Abort),
            _ => Err(WireEnumError { field: "decision", value }),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Commit => "commit",
            Self::Abort => "abort",
        })
    }
}

/// A wire enum field held an unspecified or unknown value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} has value {value}, which is unspecified or unknown to this server")]
pub struct WireEnumError {
    /// The field's name.
    pub field: &'static str,
    /// The value received.
    pub value: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip_and_unknown_values_are_rejected() {
        for d in [Decision::Commit, Decision::Abort] {
            assert_eq!(Decision::try_from(i32::from(d)), Ok(d));
        }
        assert!(Decision::try_from(0).is_err());
        assert!(Decision::try_from(99).is_err());
    }

    #[test]
    fn votes_round_trip() {
        for v in [Vote::Yes, Vote::no("insufficient funds")] {
            let wire = v.to_pb();
            assert_eq!(Vote::from_pb(wire.vote, &wire.reason), Ok(v));
        }
        assert!(Vote::from_pb(7, "").is_err());
    }
}
