//! Participant names: how the coordinator's registry and the txn records refer
//! to a service that holds a branch.

use std::fmt;
use std::str::FromStr;

/// The longest participant name accepted, in bytes.
pub const PARTICIPANT_ID_MAX_BYTES: usize = 64;

/// A participant's name, such as `bank-a`: 1 to 64 characters of lowercase
/// ASCII letters, digits, `-`, `_` and `.`, starting with a letter or digit.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ParticipantId(String);

/// Why a string is not a valid [`ParticipantId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("participant name {name:?} is invalid: {why}")]
pub struct ParticipantIdError {
    name: String,
    why: &'static str,
}

impl ParticipantId {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ParticipantId {
    type Err = ParticipantIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |why| Err(ParticipantIdError { name: s.chars().take(80).collect(), why });
        if s.is_empty() {
            return fail("it is empty; use a name such as bank-a");
        }
        if s.len() > PARTICIPANT_ID_MAX_BYTES {
            return fail("it is longer than 64 bytes");
        }
        if !s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return fail("it must start with a lowercase letter or a digit");
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.');
        if !s.chars().all(allowed) {
            return fail("only lowercase letters, digits, '-', '_' and '.' are allowed");
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for ParticipantId {
    type Error = ParticipantIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ParticipantId> for String {
    fn from(id: ParticipantId) -> Self {
        id.0
    }
}

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParticipantId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_simple_names_and_rejects_the_rest() {
        for ok in ["bank-a", "b", "svc_1.eu"] {
            assert!(ok.parse::<ParticipantId>().is_ok(), "{ok}");
        }
        for bad in ["", "Bank", "-a", "a b", "a/b", &"x".repeat(65)] {
            assert!(bad.parse::<ParticipantId>().is_err(), "{bad}");
        }
    }
}
