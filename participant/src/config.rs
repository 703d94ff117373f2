//! [`ParticipantConfig`]: every limit and timeout of the participant library,
//! documented with its default and checked by [`ParticipantConfig::validate`].

use std::time::Duration;

use twopc_proto::{Clock, ParticipantId};

use crate::error::{Error, Result};

/// How a participant serves, remembers and resolves (docs/PROTOCOL.md
/// invariant I6: every bound is here, with a default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantConfig {
    /// This participant's name, as registered with the coordinator. Requests
    /// addressed to another name are refused with `FAILED_PRECONDITION`.
    ///
    /// Default: none, required.
    pub id: ParticipantId,
    /// Coordinator nodes (`host:port` or `http://host:port`) the resolver asks
    /// about in-doubt txns. Any node will do: followers answer with a leader
    /// hint, which is followed even to an address not in this list.
    ///
    /// Default: none, at least one required.
    pub coordinators: Vec<String>,
    /// How long a branch that voted YES waits for its decision before the
    /// resolver asks the coordinator. Branches found prepared at start-up are
    /// asked about at once. The resolver looks for such branches every
    /// `in_doubt_timeout_ms / 2`, clamped to between 5 ms and 1 s.
    ///
    /// Default: 5000.
    pub in_doubt_timeout_ms: u64,
    /// The first pause after a round in which no coordinator answered; it
    /// doubles every round up to `resolve_backoff_max_ms`, with jitter.
    ///
    /// Default: 100.
    pub resolve_backoff_min_ms: u64,
    /// The longest pause between two resolve rounds for one txn. The resolver
    /// never gives up, so this bounds how long a healed cluster waits (I7).
    ///
    /// Default: 5000.
    pub resolve_backoff_max_ms: u64,
    /// The most txns being resolved at once; others wait their turn.
    ///
    /// Default: 16.
    pub resolve_concurrency_max: usize,
    /// The deadline of one Resolve call. The leader holds a Resolve for a txn
    /// it is still preparing until that txn is decided, so this should exceed
    /// the coordinator's prepare timeout.
    ///
    /// Default: 10000.
    pub resolve_timeout_ms: u64,
    /// The longest a join ([`crate::join::Joiner`]) keeps retrying the
    /// coordinator's Join, whatever deadline the txn's context claims (the
    /// context is not a credential). Within it, retries stop at the
    /// context's deadline. Keep it at or above the coordinators'
    /// `deadline_max_ms`.
    ///
    /// Default: 30000.
    pub join_retry_max_ms: u64,
    /// How far ahead of this participant's clock a txn id may have been
    /// created for a join to stage its branch. The coordinators refuse ids
    /// past their own `txn_id_future_skew_ms` and never log anything for
    /// them, so a branch staged for one could never be settled until the
    /// clocks caught up: a join is refused before anything is staged
    /// (docs/PROTOCOL.md §12.3). Keep it at the coordinators' value.
    ///
    /// Default: 60000.
    pub txn_id_future_skew_ms: u64,
    /// How long to wait for a TCP connection to a coordinator node.
    ///
    /// Default: 1000.
    pub connect_timeout_ms: u64,
    /// The most Prepares handled at once; more get `RESOURCE_EXHAUSTED`.
    ///
    /// Default: 1024.
    pub prepare_inflight_max: usize,
    /// The largest branch payload accepted, in bytes; a larger one gets
    /// `INVALID_ARGUMENT`. At most `twopc_proto::MAX_MESSAGE_BYTES` minus 64 KiB.
    ///
    /// Default: 65536.
    pub payload_max_bytes: usize,
    /// The most txns the outcome memory holds (prepared branches, recorded
    /// votes, decisions and tombstones). Prepared branches are never evicted;
    /// when no room can be made a new Prepare gets `RESOURCE_EXHAUSTED`.
    ///
    /// Default: 100000.
    pub outcome_memory_max: usize,
    /// How long finished txns (decided, voted NO, tombstones) stay in the
    /// outcome memory. Keep it longer than any txn's deadline is in the future
    /// when its Prepare is sent (docs/PROTOCOL.md §7.1); the resource's
    /// own durable tombstones cover a restart.
    ///
    /// Default: 600000 (10 minutes).
    pub tombstone_retention_ms: u64,
    /// The most decisions one `DecideBatch` call may carry; a larger batch
    /// gets `INVALID_ARGUMENT`. Keep it at or above the coordinators'
    /// `delivery_batch_max`.
    ///
    /// Default: 1024.
    pub decide_batch_max: usize,
    /// The most decisions from `DecideBatch` calls applied at once, across
    /// all calls; the rest of a batch waits its turn, so a burst of large
    /// batches never starts a task per decision. A batch's answer comes once
    /// all its decisions are applied.
    ///
    /// Default: 256.
    pub decide_batch_concurrency_max: usize,
    /// The most Prepares one `PrepareBatch` call may carry; a larger batch
    /// gets `INVALID_ARGUMENT`. Each Prepare of a batch also counts against
    /// `prepare_inflight_max`. Keep it at or above the coordinators'
    /// `prepare_batch_max`.
    ///
    /// Default: 1024.
    pub prepare_batch_max: usize,
    /// The wall clock a Prepare's deadline is checked against (docs/PROTOCOL.md §7.1).
    ///
    /// Default: the system clock (tests step it to model a clock jump).
    pub clock: Clock,
    /// Mutual TLS on the participant's server and its calls to the
    /// coordinators, as identity `participant:<id>` (docs/SECURITY.md);
    /// `None` is plaintext, for loopback.
    ///
    /// Default: None.
    pub tls: Option<twopc_proto::tls::Tls>,
}

/// The largest allowed `payload_max_bytes`: room is left for the rest of the
/// Prepare message.
pub const PAYLOAD_MAX_BYTES_LIMIT: usize = twopc_proto::MAX_MESSAGE_BYTES - 64 * 1024;

impl ParticipantConfig {
    /// A config with every limit at its default.
    pub fn new(id: ParticipantId, coordinators: Vec<String>) -> Self {
        Self {
            id,
            coordinators,
            in_doubt_timeout_ms: 5_000,
            resolve_backoff_min_ms: 100,
            resolve_backoff_max_ms: 5_000,
            resolve_concurrency_max: 16,
            resolve_timeout_ms: 10_000,
            join_retry_max_ms: 30_000,
            txn_id_future_skew_ms: 60_000,
            connect_timeout_ms: 1_000,
            prepare_inflight_max: 1024,
            payload_max_bytes: 64 * 1024,
            outcome_memory_max: 100_000,
            tombstone_retention_ms: 600_000,
            decide_batch_max: 1024,
            decide_batch_concurrency_max: 256,
            prepare_batch_max: 1024,
            clock: Clock::system(),
            tls: None,
        }
    }

    /// Checks that every field makes sense; [`crate::run`] calls it first.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first field at fault and why.
    pub fn validate(&self) -> Result<()> {
        let fail = |why: String| Err(Error::Config(why));
        if self.coordinators.is_empty() {
            return fail("coordinators is empty; give at least one coordinator host:port".into());
        }
        for addr in &self.coordinators {
            if let Err(why) = endpoint_uri(addr) {
                return fail(format!("coordinators: {why}"));
            }
        }
        let positive_ms = [
            ("in_doubt_timeout_ms", self.in_doubt_timeout_ms),
            ("resolve_backoff_min_ms", self.resolve_backoff_min_ms),
            ("resolve_backoff_max_ms", self.resolve_backoff_max_ms),
            ("resolve_timeout_ms", self.resolve_timeout_ms),
            ("join_retry_max_ms", self.join_retry_max_ms),
            ("txn_id_future_skew_ms", self.txn_id_future_skew_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("tombstone_retention_ms", self.tombstone_retention_ms),
        ];
        let positive_counts = [
            ("resolve_concurrency_max", self.resolve_concurrency_max),
            ("prepare_inflight_max", self.prepare_inflight_max),
            ("payload_max_bytes", self.payload_max_bytes),
            ("outcome_memory_max", self.outcome_memory_max),
            ("decide_batch_max", self.decide_batch_max),
            ("decide_batch_concurrency_max", self.decide_batch_concurrency_max),
            ("prepare_batch_max", self.prepare_batch_max),
        ];
        for (name, value) in positive_ms {
            if value == 0 {
                return fail(format!("{name} is 0; it must be at least 1"));
            }
        }
        for (name, value) in positive_counts {
            if value == 0 {
                return fail(format!("{name} is 0; it must be at least 1"));
            }
        }
        if self.resolve_backoff_min_ms > self.resolve_backoff_max_ms {
            return fail(format!(
                "resolve_backoff_min_ms ({}) is greater than resolve_backoff_max_ms ({})",
                self.resolve_backoff_min_ms, self.resolve_backoff_max_ms
            ));
        }
        if self.payload_max_bytes > PAYLOAD_MAX_BYTES_LIMIT {
            return fail(format!(
                "payload_max_bytes ({}) exceeds {PAYLOAD_MAX_BYTES_LIMIT}, the gRPC message limit \
                 less room for the rest of the request",
                self.payload_max_bytes
            ));
        }
        Ok(())
    }

    /// How often the resolver looks for in-doubt branches.
    pub(crate) fn in_doubt_scan_interval(&self) -> Duration {
        Duration::from_millis((self.in_doubt_timeout_ms / 2).clamp(5, 1_000))
    }
}

/// The URI a tonic endpoint needs for a configured coordinator address.
pub(crate) fn endpoint_uri(addr: &str) -> std::result::Result<String, String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err("an address is empty; use host:port such as 127.0.0.1:7000".into());
    }
    let uri = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    match uri.parse::<tonic::transport::Uri>() {
        Ok(parsed) if parsed.host().is_some() => Ok(uri),
        _ => Err(format!("{addr:?} is not a valid address; use host:port such as 127.0.0.1:7000")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ParticipantConfig {
        let id = "bank-a".parse().expect("valid id");
        ParticipantConfig::new(id, vec!["127.0.0.1:7000".into()])
    }

    fn rejected_mentioning(config: &ParticipantConfig, field: &str) -> bool {
        match config.validate() {
            Err(Error::Config(why)) => why.contains(field),
            _ => false,
        }
    }

    // I6 (bounded): the defaults are a usable config.
    #[test]
    fn defaults_are_valid() {
        assert!(config().validate().is_ok());
    }

    // I6 (bounded): a zero limit would disable a bound or the service; each is rejected by name.
    #[test]
    fn zero_limits_are_rejected() {
        type Zero = fn(&mut ParticipantConfig);
        let zeroes: [(&str, Zero); 15] = [
            ("in_doubt_timeout_ms", |c| c.in_doubt_timeout_ms = 0),
            ("resolve_backoff_min_ms", |c| c.resolve_backoff_min_ms = 0),
            ("resolve_backoff_max_ms", |c| c.resolve_backoff_max_ms = 0),
            ("resolve_timeout_ms", |c| c.resolve_timeout_ms = 0),
            ("join_retry_max_ms", |c| c.join_retry_max_ms = 0),
            ("txn_id_future_skew_ms", |c| c.txn_id_future_skew_ms = 0),
            ("connect_timeout_ms", |c| c.connect_timeout_ms = 0),
            ("tombstone_retention_ms", |c| c.tombstone_retention_ms = 0),
            ("resolve_concurrency_max", |c| c.resolve_concurrency_max = 0),
            ("prepare_inflight_max", |c| c.prepare_inflight_max = 0),
            ("payload_max_bytes", |c| c.payload_max_bytes = 0),
            ("outcome_memory_max", |c| c.outcome_memory_max = 0),
            ("decide_batch_max", |c| c.decide_batch_max = 0),
            ("decide_batch_concurrency_max", |c| c.decide_batch_concurrency_max = 0),
            ("prepare_batch_max", |c| c.prepare_batch_max = 0),
        ];
        for (field, zero) in zeroes {
            let mut c = config();
            zero(&mut c);
            assert!(rejected_mentioning(&c, field), "{field} = 0 was accepted");
        }
    }

    // I6 (bounded): backoff bounds must be ordered, or the cap would be meaningless.
    #[test]
    fn min_backoff_above_max_is_rejected() {
        let mut c = config();
        c.resolve_backoff_min_ms = 6_000;
        c.resolve_backoff_max_ms = 5_000;
        assert!(rejected_mentioning(&c, "resolve_backoff_min_ms"));
        c.resolve_backoff_max_ms = 6_000;
        assert!(c.validate().is_ok());
    }

    // I7 (liveness): without a reachable coordinator address nothing in doubt is ever resolved.
    #[test]
    fn missing_or_malformed_coordinators_are_rejected() {
        let mut c = config();
        c.coordinators.clear();
        assert!(rejected_mentioning(&c, "coordinators"));
        for bad in ["", "  ", "not a uri"] {
            c.coordinators = vec![bad.into()];
            assert!(rejected_mentioning(&c, "coordinators"), "{bad:?} accepted");
        }
        c.coordinators = vec!["http://10.0.0.1:7000".into(), "coord-2:7000".into()];
        assert!(c.validate().is_ok());
    }

    // I6 (bounded): a payload limit beyond the message limit could never be reached.
    #[test]
    fn payload_limit_above_message_limit_is_rejected() {
        let mut c = config();
        c.payload_max_bytes = twopc_proto::MAX_MESSAGE_BYTES;
        assert!(rejected_mentioning(&c, "payload_max_bytes"));
    }
}
