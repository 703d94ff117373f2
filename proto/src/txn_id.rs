//! Transaction ids: UUIDv7, chosen by the client, carrying their creation time.
//!
//! The creation time lets a coordinator refuse ids older than its retention
//! horizon (docs/PROTOCOL.md §7.2) without keeping every id forever.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A transaction id: a 128-bit, time-ordered UUIDv7.
///
/// Ordering follows creation time (milliseconds), then the random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(Uuid);

/// Why a string or byte string is not a valid [`TxnId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnIdError {
    /// Nothing was given.
    #[error("txn id is empty; expected a UUIDv7 such as 019a2b3c-4d5e-7f60-8a1b-2c3d4e5f6a7b")]
    Empty,
    /// The text is not a UUID at all.
    #[error("txn id {0:?} is not a UUID; expected a UUIDv7 such as 019a2b3c-4d5e-7f60-8a1b-2c3d4e5f6a7b")]
    Malformed(String),
    /// A UUID, but not version 7, so it carries no creation time.
    #[error("txn id {id} is a version {version} UUID; twopc needs a time-ordered UUIDv7")]
    WrongVersion {
        /// The id as given.
        id: String,
        /// Its UUID version.
        version: usize,
    },
}

impl TxnId {
    /// A fresh id stamped with the current time. In a simulation
    /// ([`crate::host`]) its time is the simulated clock's and its random
    /// bits come from the seeded generator, so a seed replays the same ids.
    pub fn new() -> Self {
        if crate::host::is_simulated() {
            let random: [u8; 10] = crate::host::with_rng(rand::Rng::random);
            Self::from_parts(crate::host::unix_now_ms(), random)
        } else {
            Self(Uuid::now_v7())
        }
    }

    /// An id stamped `created_unix_ms` instead of now, with random bits drawn
    /// as [`TxnId::new`] draws them (seeded in a simulation): an id of a given
    /// age, for tests and for a simulation's adversaries.
    pub fn created_at(created_unix_ms: u64) -> Self {
        let random: [u8; 10] =
            if crate::host::is_simulated() { crate::host::with_rng(rand::Rng::random) } else { rand::random() };
        Self::from_parts(created_unix_ms, random)
    }

    /// The UUIDv7 with this creation time (its low 48 bits) and these random
    /// bits (less the version and variant bits it sets).
    pub fn from_parts(created_unix_ms: u64, random: [u8; 10]) -> Self {
        Self(uuid::Builder::from_unix_timestamp_millis(created_unix_ms, &random).into_uuid())
    }

    /// The raw 16 bytes, big-endian (the order that sorts by time).
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// Rebuilds an id from [`TxnId::to_bytes`], checking the version.
    ///
    /// # Errors
    /// [`TxnIdError::WrongVersion`] if the bytes are not a UUIDv7.
    pub fn from_bytes(bytes: [u8; 16]) -> Result<Self, TxnIdError> {
        Self::checked(Uuid::from_bytes(bytes))
    }

    /// The creation time encoded in the id, in Unix milliseconds.
    pub fn created_unix_ms(self) -> u64 {
        let b = self.0.as_bytes();
        b[..6].iter().fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte))
    }

    /// Milliseconds since this id was created, by the local clock (0 if in the future).
    pub fn age_ms(self) -> u64 {
        unix_now_ms().saturating_sub(self.created_unix_ms())
    }

    fn checked(uuid: Uuid) -> Result<Self, TxnIdError> {
        match uuid.get_version_num() {
            7 => Ok(Self(uuid)),
            version => Err(TxnIdError::WrongVersion { id: uuid.to_string(), version }),
        }
    }
}

impl Default for TxnId {
    fn default() -> Self {
        Self::new()
    }
}

impl FromStr for TxnId {
    type Err = TxnIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(TxnIdError::Empty);
        }
        let uuid = Uuid::try_parse(s).map_err(|_| TxnIdError::Malformed(s.chars().take(64).collect()))?;
        Self::checked(uuid)
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxnId({})", self.0.hyphenated())
    }
}

impl serde::Serialize for TxnId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TxnId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

pub use crate::host::unix_now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text_and_bytes() {
        let id = TxnId::new();
        assert_eq!(id.to_string().parse::<TxnId>(), Ok(id));
        assert_eq!(TxnId::from_bytes(id.to_bytes()), Ok(id));
    }

    #[test]
    fn creation_time_is_readable_and_recent() {
        let before = unix_now_ms();
        let id = TxnId::new();
        let after = unix_now_ms();
        assert!((before..=after).contains(&id.created_unix_ms()));
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let a = TxnId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = TxnId::new();
        assert!(a < b);
    }

    #[test]
    fn rejects_empty_malformed_and_other_versions() {
        assert_eq!("".parse::<TxnId>(), Err(TxnIdError::Empty));
        assert!(matches!("not-a-uuid".parse::<TxnId>(), Err(TxnIdError::Malformed(_))));
        let v4 = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert!(matches!(v4.parse::<TxnId>(), Err(TxnIdError::WrongVersion { version: 4, .. })));
    }
}
