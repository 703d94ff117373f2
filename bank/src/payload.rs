//! The bank's branch payload: the typed operations one bank carries out for
//! a txn (debit or credit an account by an amount), and their encoding, a
//! prost message opaque to twopc.
//!
//! A transfer between two banks has one branch at each: a debit at the
//! payer's bank and a credit at the payee's. A transfer between two accounts
//! of the same bank is one branch with both operations, because a txn has at
//! most one branch per participant. See [`crate::transfer`].
//!
//! Decoding checks everything (known kind, valid account name, positive
//! amount, bounded count); the resource turns a decode error into a NO vote
//! with the reason, never a panic.

use bytes::Bytes;
use prost::Message as _;

use crate::address::{AccountName, AccountNameError};
use crate::money::format_minor;

/// The most operations one branch payload may carry.
pub const OPS_PER_BRANCH_MAX: usize = 64;

/// One change to one account, staged at Prepare and applied at Commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Take `amount_minor` from `account`: Prepare holds it, Commit removes it.
    Debit {
        /// The account paying.
        account: AccountName,
        /// How much, in minor units; positive.
        amount_minor: i64,
    },
    /// Give `amount_minor` to `account`: Prepare stages it, Commit adds it.
    Credit {
        /// The account paid.
        account: AccountName,
        /// How much, in minor units; positive.
        amount_minor: i64,
    },
}

impl Operation {
    /// The account the operation changes.
    pub fn account(&self) -> &AccountName {
        match self {
            Self::Debit { account, .. } | Self::Credit { account, .. } => account,
        }
    }

    /// The amount in minor units (always positive).
    pub fn amount_minor(&self) -> i64 {
        match self {
            Self::Debit { amount_minor, .. } | Self::Credit { amount_minor, .. } => *amount_minor,
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Debit { account, amount_minor } => write!(f, "debit {account} {}", format_minor(*amount_minor)),
            Self::Credit { account, amount_minor } => write!(f, "credit {account} {}", format_minor(*amount_minor)),
        }
    }
}

/// Why bytes or operations are not a valid [`BranchPayload`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not a protobuf encoding of the payload message.
    #[error("not a bank branch payload: {0}")]
    Decode(String),
    /// No operations.
    #[error("the branch has no operations")]
    Empty,
    /// More than [`OPS_PER_BRANCH_MAX`] operations.
    #[error("the branch has {count} operations; at most {OPS_PER_BRANCH_MAX} are allowed")]
    TooManyOps {
        /// How many were given.
        count: usize,
    },
    /// An operation kind this bank does not know.
    #[error("operation {index}: unknown kind {kind}; expected debit (1) or credit (2)")]
    UnknownKind {
        /// Which operation (from 0).
        index: usize,
        /// The kind on the wire.
        kind: i32,
    },
    /// An invalid account name.
    #[error("operation {index}: {source}")]
    Account {
        /// Which operation (from 0).
        index: usize,
        /// What is wrong with the name.
        source: AccountNameError,
    },
    /// A zero or negative amount.
    #[error("operation {index}: amount {amount_minor} minor units is not positive")]
    NotPositive {
        /// Which operation (from 0).
        index: usize,
        /// The amount given.
        amount_minor: i64,
    },
}

/// What one bank does for one txn: 1 to [`OPS_PER_BRANCH_MAX`] operations,
/// staged and applied all together or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchPayload {
    ops: Vec<Operation>,
}

impl BranchPayload {
    /// A payload of `ops`, checked as [`BranchPayload::decode`] checks them.
    ///
    /// # Errors
    /// [`PayloadError`] if there are no operations, too many, or an amount is
    /// not positive.
    pub fn new(ops: Vec<Operation>) -> Result<Self, PayloadError> {
        if ops.is_empty() {
            return Err(PayloadError::Empty);
        }
        if ops.len() > OPS_PER_BRANCH_MAX {
            return Err(PayloadError::TooManyOps { count: ops.len() });
        }
        if let Some((index, op)) = ops.iter().enumerate().find(|(_, op)| op.amount_minor() <= 0) {
            return Err(PayloadError::NotPositive { index, amount_minor: op.amount_minor() });
        }
        Ok(Self { ops })
    }

    /// A payload debiting `account` by `amount_minor`.
    ///
    /// # Errors
    /// [`PayloadError::NotPositive`] unless `amount_minor` > 0.
    pub fn debit(account: AccountName, amount_minor: i64) -> Result<Self, PayloadError> {
        Self::new(vec![Operation::Debit { account, amount_minor }])
    }

    /// A payload crediting `account` by `amount_minor`.
    ///
    /// # Errors
    /// [`PayloadError::NotPositive`] unless `amount_minor` > 0.
    pub fn credit(account: AccountName, amount_minor: i64) -> Result<Self, PayloadError> {
        Self::new(vec![Operation::Credit { account, amount_minor }])
    }

    /// The operations, in the order they are staged.
    pub fn ops(&self) -> &[Operation] {
        &self.ops
    }

    /// The bytes that travel as the branch's payload.
    pub fn encode(&self) -> Bytes {
        let wire = PayloadPb {
            ops: self
                .ops
                .iter()
                .map(|op| {
                    let kind = match op {
                        Operation::Debit { .. } => OpKind::Debit,
                        Operation::Credit { .. } => OpKind::Credit,
                    };
                    OpPb { kind: kind as i32, account: op.account().to_string(), amount_minor: op.amount_minor() }
                })
                .collect(),
        };
        Bytes::from(wire.encode_to_vec())
    }

    /// Decodes and checks a payload made by [`BranchPayload::encode`].
    ///
    /// # Errors
    /// [`PayloadError`] naming what is wrong; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let wire = PayloadPb::decode(bytes).map_err(|e| PayloadError::Decode(e.to_string()))?;
        if wire.ops.len() > OPS_PER_BRANCH_MAX {
            return Err(PayloadError::TooManyOps { count: wire.ops.len() });
        }
        let ops = wire
            .ops
            .into_iter()
            .enumerate()
            .map(|(index, op)| {
                let account = op.account.parse().map_err(|source| PayloadError::Account { index, source })?;
                let amount_minor = op.amount_minor;
                match OpKind::try_from(op.kind) {
                    Ok(OpKind::Debit) => Ok(Operation::Debit { account, amount_minor }),
                    Ok(OpKind::Credit) => Ok(Operation::Credit { account, amount_minor }),
                    Ok(OpKind::Unspecified) | Err(_) => Err(PayloadError::UnknownKind { index, kind: op.kind }),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(ops)
    }
}

impl std::fmt::Display for BranchPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, op) in self.ops.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{op}")?;
        }
        Ok(())
    }
}

/// The wire form of a payload. Defined here with prost's derive: the payload
/// is the bank's own business, so it is not part of twopc's .proto files.
#[derive(Clone, PartialEq, prost::Message)]
struct PayloadPb {
    #[prost(message, repeated, tag = "1")]
    ops: Vec<OpPb>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OpPb {
    #[prost(enumeration = "OpKind", tag = "1")]
    kind: i32,
    #[prost(string, tag = "2")]
    account: String,
    #[prost(int64, tag = "3")]
    amount_minor: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
enum OpKind {
    Unspecified = 0,
    Debit = 1,
    Credit = 2,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AccountName {
        s.parse().expect("valid name")
    }

    // A payload survives the wire unchanged.
    #[test]
    fn round_trips() {
        let payload = BranchPayload::new(vec![
            Operation::Debit { account: name("alice"), amount_minor: 1250 },
            Operation::Credit { account: name("bob"), amount_minor: 1250 },
        ])
        .expect("valid");
        assert_eq!(BranchPayload::decode(&payload.encode()), Ok(payload.clone()));
        assert_eq!(payload.to_string(), "debit alice 12.50, credit bob 12.50");
    }

    // Garbage and invalid payloads are errors with a reason, never a panic.
    #[test]
    fn bad_payloads_are_errors_not_panics() {
        assert!(matches!(BranchPayload::decode(b"\xff\xff\xff"), Err(PayloadError::Decode(_))));
        assert_eq!(BranchPayload::decode(b""), Err(PayloadError::Empty));
        let wire = |kind: i32, account: &str, amount_minor: i64| {
            PayloadPb { ops: vec![OpPb { kind, account: account.into(), amount_minor }] }.encode_to_vec()
        };
        assert!(matches!(
            BranchPayload::decode(&wire(7, "alice", 5)),
            Err(PayloadError::UnknownKind { index: 0, kind: 7 })
        ));
        assert!(matches!(BranchPayload::decode(&wire(0, "alice", 5)), Err(PayloadError::UnknownKind { .. })));
        assert!(matches!(BranchPayload::decode(&wire(1, "Alice", 5)), Err(PayloadError::Account { index: 0, .. })));
        for amount in [0, -5, i64::MIN] {
            assert!(matches!(BranchPayload::decode(&wire(2, "alice", amount)), Err(PayloadError::NotPositive { .. })));
        }
        let too_many =
            PayloadPb { ops: vec![OpPb { kind: 1, account: "a".into(), amount_minor: 1 }; OPS_PER_BRANCH_MAX + 1] };
        assert!(matches!(BranchPayload::decode(&too_many.encode_to_vec()), Err(PayloadError::TooManyOps { .. })));
        // Arbitrary bytes: whatever they decode to, no panic.
        for seed in 0u8..=255 {
            let bytes: Vec<u8> =
                (0..32u8).map(|i| seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(seed | 1))).collect();
            let _ = BranchPayload::decode(&bytes);
        }
    }
}
