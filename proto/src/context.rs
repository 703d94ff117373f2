//! The context of an interactive transaction as it travels between services
//! (docs/PROTOCOL.md §12): the gRPC metadata entry [`TXN_CONTEXT_METADATA_KEY`]
//! holding `<txn id>;deadline=<Unix ms>`.
//!
//! The application attaches it to every call it makes inside the txn; a
//! service reads it in its handler ([`TxnContext::from_metadata`]) and joins
//! the txn as a branch. The format is plain ASCII so a service in any
//! language can read and write it (coordinator.proto, message `TxnContext`).

use std::fmt;
use std::str::FromStr;

use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::TxnId;

/// The gRPC metadata key carrying a [`TxnContext`].
pub const TXN_CONTEXT_METADATA_KEY: &str = "twopc-txn";

/// The metadata key with which a refused Join names the txn's state
/// (`BEGUN`, `DECIDED COMMIT`, `TIMED OUT`, `UNKNOWN`, `FORGOTTEN`…), for logs and tests.
pub const TXN_STATE_METADATA_KEY: &str = "twopc-txn-state";

/// The longest header value accepted: a hyphenated UUID, the separator and
/// a 20-digit number, with room to spare. Longer input is refused unread.
const HEADER_VALUE_MAX_BYTES: usize = 128;

/// An interactive txn's id and deadline: what a service needs to join it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxnContext {
    /// The txn.
    pub txn_id: TxnId,
    /// Unix milliseconds after which the txn is aborted; the branch must be
    /// prepared and joined before it.
    pub deadline_unix_ms: u64,
}

/// Why a `twopc-txn` value is not a [`TxnContext`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{TXN_CONTEXT_METADATA_KEY} metadata {value:?} is malformed ({why}); expected \
     <txn id>;deadline=<Unix ms>, e.g. 019a2b3c-4d5e-7f60-8a1b-2c3d4e5f6a7b;deadline=1764786000000"
)]
pub struct TxnContextError {
    /// The value as received (cut to a readable length).
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

impl TxnContext {
    /// The header value: `<txn id>;deadline=<Unix ms>`.
    pub fn header_value(&self) -> String {
        self.to_string()
    }

    /// Puts this context into outgoing metadata, replacing any other.
    pub fn attach(&self, metadata: &mut MetadataMap) {
        // A UUID and digits are always valid ASCII metadata.
        if let Ok(value) = MetadataValue::try_from(self.header_value()) {
            metadata.insert(TXN_CONTEXT_METADATA_KEY, value);
        }
    }

    /// The context carried by incoming metadata: `Ok(None)` when there is none.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` saying what is wrong when the entry is present but
    /// malformed (not ASCII, repeated, not `<txn id>;deadline=<ms>`).
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Option<Self>, Status> {
        let mut values = metadata.get_all(TXN_CONTEXT_METADATA_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Status::invalid_argument(format!(
                "{TXN_CONTEXT_METADATA_KEY} metadata appears more than once; a call belongs to one txn"
            )));
        }
        let text = value.to_str().map_err(|_| {
            Status::invalid_argument(format!("{TXN_CONTEXT_METADATA_KEY} metadata is not printable ASCII"))
        })?;
        text.parse().map(Some).map_err(|e: TxnContextError| Status::invalid_argument(e.to_string()))
    }
}

impl fmt::Display for TxnContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{};deadline={}", self.txn_id, self.deadline_unix_ms)
    }
}

impl FromStr for TxnContext {
    type Err = TxnContextError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| {
            let mut value = text.to_owned();
            value.truncate(value.floor_char_boundary(HEADER_VALUE_MAX_BYTES));
            TxnContextError { value, why }
        };
        if text.len() > HEADER_VALUE_MAX_BYTES {
            return Err(fail(format!("{} bytes, more than {HEADER_VALUE_MAX_BYTES}", text.len())));
        }
        let (id, rest) = text.split_once(';').ok_or_else(|| fail("no ';deadline=' part".into()))?;
        let txn_id: TxnId = id.trim().parse().map_err(|e| fail(format!("{e}")))?;
        let deadline = rest.trim().strip_prefix("deadline=").ok_or_else(|| fail("no 'deadline=' after ';'".into()))?;
        let deadline_unix_ms: u64 =
            deadline.parse().map_err(|_| fail(format!("deadline {deadline:?} is not a number of milliseconds")))?;
        if deadline_unix_ms == 0 {
            return Err(fail("deadline is 0".into()));
        }
        Ok(Self { txn_id, deadline_unix_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_round_trips_through_metadata() {
        let context = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: 1_764_786_000_000 };
        let mut metadata = MetadataMap::new();
        assert_eq!(TxnContext::from_metadata(&metadata).expect("absent is fine"), None);
        context.attach(&mut metadata);
        assert_eq!(TxnContext::from_metadata(&metadata).expect("parses"), Some(context));
    }

    #[test]
    fn malformed_contexts_are_invalid_arguments_that_say_why() {
        let id = TxnId::new();
        for (value, why) in [
            ("", "no ';deadline=' part"),
            ("not-a-uuid;deadline=5", "not a UUID"),
            (&format!("{id}"), "no ';deadline=' part"),
            (&format!("{id};5"), "no 'deadline=' after ';'"),
            (&format!("{id};deadline=soon"), "is not a number"),
            (&format!("{id};deadline=0"), "deadline is 0"),
            (&format!("{id};deadline={}", "9".repeat(200)), "more than 128"),
            ("0192f1a2-7c4e-4a10-8f3e-2b1c9d0e4f55;deadline=5", "version 4"),
        ] {
            let mut metadata = MetadataMap::new();
            metadata.insert(TXN_CONTEXT_METADATA_KEY, value.parse().expect("ascii"));
            let status = TxnContext::from_metadata(&metadata).expect_err(value);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{value}");
            assert!(status.message().contains(why), "{value}: {}", status.message());
        }
        let mut twice = MetadataMap::new();
        let value: MetadataValue<_> = format!("{id};deadline=5").parse().expect("ascii");
        twice.append(TXN_CONTEXT_METADATA_KEY, value.clone());
        twice.append(TXN_CONTEXT_METADATA_KEY, value);
        assert_eq!(TxnContext::from_metadata(&twice).expect_err("twice").code(), tonic::Code::InvalidArgument);
    }
}
