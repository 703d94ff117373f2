//! [`PayloadDigest`]: what ties a branch's Prepare to the txn's Submit.
//!
//! One txn id carries one set of payloads (docs/PROTOCOL.md §3.1, §13.1). A
//! participant keeps the digest of the payload it voted YES on and refuses
//! a repeated Prepare of the txn with another payload; a Staged entry logs
//! each branch's digest, and status recovery asks each participant for its
//! vote on exactly that payload. So a Commit never joins branches of two
//! Submits that reused one id with different payloads.

use sha2::{Digest as _, Sha256};

/// Words in the `FAILED_PRECONDITION` a participant answers to a repeated
/// Prepare with another payload, by which the coordinator knows a Submit met
/// another Submit's branch of the same id (docs/PROTOCOL.md §3.1).
pub const PREPARED_WITH_ANOTHER_PAYLOAD: &str = "is prepared here with another payload";

/// SHA-256 of one branch's Prepare payload.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PayloadDigest([u8; 32]);

impl PayloadDigest {
    /// The digest of `payload`.
    pub fn of(payload: &[u8]) -> Self {
        Self(Sha256::digest(payload).into())
    }

    /// The digest's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// From its bytes on the wire or in the log: `None` for anything but 32
    /// bytes (an empty field means "no digest").
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// Its 64 lowercase hex digits, for a store that keeps text.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// From [`PayloadDigest::to_hex`]'s form: `None` for anything but 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(bytes))
    }
}

impl std::fmt::Debug for PayloadDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_payloads_have_equal_digests_and_only_32_bytes_decode() {
        assert_eq!(PayloadDigest::of(b"debit 100"), PayloadDigest::of(b"debit 100"));
        assert_ne!(PayloadDigest::of(b"debit 100"), PayloadDigest::of(b"debit 250"));
        let digest = PayloadDigest::of(b"x");
        assert_eq!(PayloadDigest::from_slice(digest.as_bytes()), Some(digest));
        assert_eq!(PayloadDigest::from_slice(&[]), None);
        assert_eq!(PayloadDigest::from_slice(&[0; 31]), None);
        assert_eq!(PayloadDigest::from_hex(&digest.to_hex()), Some(digest));
        for bad in ["", "insufficient funds", &"g".repeat(64), &"a".repeat(63), &"é".repeat(32)] {
            assert_eq!(PayloadDigest::from_hex(bad), None, "{bad}");
        }
    }
}
