//! gRPC statuses that carry meaning across twopc: bad input, and "not the
//! leader, try there".
//!
//! A node that is not the leader answers `UNAVAILABLE` with the leader's
//! address (when known) in the [`LEADER_METADATA_KEY`] metadata entry. Clients
//! read it with [`leader_hint`] and retry there with the same txn id.

use tonic::{Code, Status};

/// The metadata key holding the current leader's `host:port`.
pub const LEADER_METADATA_KEY: &str = "twopc-leader";

/// The metadata key that marks a [`forgotten`] status.
pub const FORGOTTEN_METADATA_KEY: &str = "twopc-forgotten";

/// `FAILED_PRECONDITION` for a txn id the coordinator may have decided and
/// then forgotten after retention (docs/PROTOCOL.md §7.2). Marked so a
/// participant can tell it from other refusals ([`is_forgotten`]).
pub fn forgotten(message: impl Into<String>) -> Status {
    let mut status = Status::failed_precondition(message);
    status.metadata_mut().insert(FORGOTTEN_METADATA_KEY, tonic::metadata::MetadataValue::from_static("1"));
    status
}

/// Whether a status is a coordinator's [`forgotten`] answer.
pub fn is_forgotten(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition && status.metadata().contains_key(FORGOTTEN_METADATA_KEY)
}

/// `INVALID_ARGUMENT` naming the field and what is wrong with it.
pub fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// `UNAVAILABLE` from a node that is not the leader, with a hint if it knows one.
pub fn not_leader(leader_addr: Option<&str>) -> Status {
    let Some(addr) = leader_addr.filter(|a| !a.is_empty()) else {
        return Status::unavailable("not the leader and no leader is known yet; retry shortly");
    };
    let mut status = Status::unavailable(format!("not the leader; retry at {addr}"));
    if let Ok(value) = addr.parse() {
        status.metadata_mut().insert(LEADER_METADATA_KEY, value);
    }
    status
}

/// The leader address carried by a [`not_leader`] status, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let value = status.metadata().get(LEADER_METADATA_KEY)?;
    value.to_str().ok().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Whether a call that failed with this status may be retried unchanged
/// (possibly at another node): the server did not get to act, or the act is
/// idempotent by txn id.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted | Code::Unknown
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_hint_round_trips() {
        let status = not_leader(Some("127.0.0.1:7001"));
        assert_eq!(leader_hint(&status).as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(leader_hint(&not_leader(None)), None);
        assert_eq!(leader_hint(&Status::internal("x")), None);
    }

    #[test]
    fn forgotten_is_told_apart_from_other_refusals() {
        assert!(is_forgotten(&forgotten("txn x is forgotten")));
        assert!(!is_forgotten(&Status::failed_precondition("txn x is forgotten")));
    }
}
