//! A coordinator node's configuration: every field documented with its
//! default and checked by [`NodeConfig::validate`] at start-up.

use std::collections::BTreeMap;
use std::path::PathBuf;

use twopc_proto::Clock;

use crate::error::{Error, Result};
use crate::storage::StorageConfig;
use crate::transport::TransportConfig;

/// Configuration of one coordinator node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's raft id; non-zero and unique in the cluster.
    pub id: u64,
    /// The initial voters (this node included) and the `host:port` each one's
    /// gRPC server listens on. Used to bootstrap a fresh data dir; afterwards the
    /// membership lives in the log.
    pub peers: BTreeMap<u64, String>,
    /// Start without bootstrapping: the node was added with AddNode and learns
    /// the membership from the leader's snapshot. Default: false.
    pub join: bool,
    /// Where the raft log and snapshots live.
    pub data_dir: PathBuf,
    /// Raft tick period. Default: 100 ms.
    pub tick_interval_ms: u64,
    /// Ticks without a heartbeat before a follower campaigns (randomised up to
    /// twice this). Default: 10 (1 s with the default tick).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats. Default: 2.
    pub heartbeat_ticks: usize,
    /// Seeds the randomised election timeouts, so a simulation can replay a
    /// node's elections; `None` leaves the draws to raft-rs (its thread
    /// random generator). Give every node of a cluster its own seed.
    /// Default: None.
    pub election_seed: Option<u64>,
    /// Append messages in flight to one follower. Default: 256.
    pub max_inflight_msgs: usize,
    /// Largest append message raft builds, in bytes. Default: 1 MiB.
    pub max_size_per_msg_bytes: u64,
    /// Requests (proposals, reads, admin) queued for the raft task. Default: 8192.
    pub request_queue_max: usize,
    /// Raft messages from peers queued for the raft task; more are dropped
    /// (raft retransmits). Default: 16384.
    pub inbound_queue_max: usize,
    /// Proposals appended but not yet applied; more get ResourceExhausted.
    /// Default: 65536.
    pub pending_proposals_max: usize,
    /// Applied entries between state-machine snapshots (after which the log is
    /// compacted). Default: 20000.
    pub snapshot_interval_entries: u64,
    /// How long a linearizable read or a proposal may wait. Default: 5000 ms.
    pub request_timeout_ms: u64,
    /// The log store.
    pub storage: StorageConfig,
    /// The peer transport.
    pub transport: TransportConfig,
    /// The 2PC driver's limits and timings.
    pub engine: EngineConfig,
    /// Mutual TLS on every connection this node serves or opens, as identity
    /// `node:<id>` (docs/SECURITY.md); `None` is plaintext, for loopback.
    /// Default: None.
    pub tls: Option<twopc_proto::tls::Tls>,
}

impl NodeConfig {
    /// A config with every default, for node `id` of the cluster `peers`.
    pub fn new(id: u64, peers: BTreeMap<u64, String>, data_dir: PathBuf) -> Self {
        Self {
            id,
            peers,
            join: false,
            data_dir,
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            election_seed: None,
            max_inflight_msgs: 256,
            max_size_per_msg_bytes: 1024 * 1024,
            request_queue_max: 8192,
            inbound_queue_max: 16384,
            pending_proposals_max: 65536,
            snapshot_interval_entries: 20_000,
            request_timeout_ms: 5000,
            storage: StorageConfig::default(),
            transport: TransportConfig::default(),
            engine: EngineConfig::default(),
            tls: None,
        }
    }

    /// Checks the config before anything starts.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.id == 0 {
            return bad("node id must be non-zero".into());
        }
        if !self.join && !self.peers.contains_key(&self.id) {
            return bad(format!("--peers must include this node's own id {} with its address", self.id));
        }
        if self.peers.keys().any(|id| *id == 0) {
            return bad("peer ids must be non-zero".into());
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return bad("election_ticks must be greater than heartbeat_ticks, which must be at least 1".into());
        }
        let positive = [
            ("tick_interval_ms", self.tick_interval_ms),
            ("max_inflight_msgs", self.max_inflight_msgs as u64),
            ("max_size_per_msg_bytes", self.max_size_per_msg_bytes),
            ("request_queue_max", self.request_queue_max as u64),
            ("inbound_queue_max", self.inbound_queue_max as u64),
            ("pending_proposals_max", self.pending_proposals_max as u64),
            ("snapshot_interval_entries", self.snapshot_interval_entries),
            ("request_timeout_ms", self.request_timeout_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be greater than zero"));
        }
        self.engine.validate()
    }
}

/// Limits and timings of the 2PC driver.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Txns being prepared at once on the leader; more get ResourceExhausted.
    /// Default: 10000.
    pub txn_inflight_max: usize,
    /// Branches in one txn: a Submit's, a Commit's one-shot branches, and the
    /// branches that may join an interactive txn (each; at most
    /// `state_machine::JOINED_BRANCHES_MAX`, 256). Default: 16.
    pub branches_per_txn_max: usize,
    /// Payload bytes of one branch. Default: 65536.
    pub payload_max_bytes: usize,
    /// Furthest a Submit's deadline may lie in the future. Default: 30000 ms.
    pub deadline_max_ms: u64,
    /// Longest wait for one Prepare answer (the deadline may cut it shorter).
    /// Default: 5000 ms.
    pub prepare_timeout_ms: u64,
    /// Prepares in one PrepareBatch call to a participant. Keep it at or
    /// below the participants' `prepare_batch_max`. Default: 256.
    pub prepare_batch_max: usize,
    /// Prepare calls in flight to one participant; Prepares that arrive
    /// while this many are out wait and go together in the next call, so
    /// under load a call carries many (docs/PROTOCOL.md §11). Default: 4.
    pub prepare_calls_per_participant_max: usize,
    /// Longest wait for one Decide acknowledgement. Default: 5000 ms.
    pub decide_timeout_ms: u64,
    /// Phase-2 retry backoff, first step (also for re-proposing a batch of
    /// acknowledgements whose proposal failed). Default: 20 ms.
    pub delivery_backoff_min_ms: u64,
    /// Phase-2 retry backoff cap. Default: 2000 ms.
    pub delivery_backoff_max_ms: u64,
    /// Decisions in one DecideBatch call to a participant; one call is in
    /// flight per participant, and what falls due meanwhile goes in the next.
    /// Keep it at or below the participants' `decide_batch_max`. Default: 256.
    pub delivery_batch_max: usize,
    /// Acknowledgements in one Acknowledge entry (more wait for the next one,
    /// which is proposed as soon as the previous is applied). Default: 1024.
    pub ack_batch_max: usize,
    /// How long the first acknowledgement of an entry waits for others
    /// before the entry is proposed (at most 1 000; 0 proposes at once).
    /// Off the critical path: a txn's branches, and at low load several
    /// txns, share one entry instead of one each. Default: 5 ms.
    pub ack_linger_ms: u64,
    /// How long a txn id stays usable and a finished txn stays in the state
    /// machine, from the id's creation time. Must exceed `deadline_max_ms`.
    /// Default: 60000 ms.
    pub retention_ms: u64,
    /// How often the leader proposes forgetting expired txns. Default: 1000 ms.
    pub gc_interval_ms: u64,
    /// How far a txn id's creation time may lie ahead of this node's clock:
    /// Submit, Resolve, Decide and GetTransaction refuse an id created later
    /// than that with InvalidArgument, since its record would outlive every
    /// retention horizon (docs/PROTOCOL.md §7.4). Must stay below the log's own
    /// limit, `state_machine::TXN_ID_AHEAD_OF_PROPOSER_MAX_MS` (10 min).
    /// Default: 60000 ms.
    pub txn_id_future_skew_ms: u64,
    /// Decided txns not yet acknowledged by every branch; past it new Submits
    /// get ResourceExhausted until participants catch up. Default: 100000.
    pub unacknowledged_max: usize,
    /// Connect timeout for participant channels. Default: 1000 ms.
    pub participant_connect_timeout_ms: u64,
    /// Interactive txns (docs/PROTOCOL.md §12) begun and not decided at once;
    /// past it Begin gets ResourceExhausted. Each is a record in the state
    /// machine and every snapshot until it is decided, which its deadline
    /// (at most `deadline_max_ms` away) guarantees. Default: 10000.
    pub begun_max: usize,
    /// How often the leader looks for begun txns past their deadline and logs
    /// their Abort ("timed out", §12.5); a txn outlives its deadline by up to
    /// this long plus one log round trip. Default: 100 ms.
    pub begun_scan_interval_ms: u64,
    /// How a one-shot txn commits (docs/PROTOCOL.md §13): `Parallel` logs a
    /// Staged entry while the Prepares are out and answers Commit once both
    /// are durable; `Sequential` logs the decision after the votes (§5).
    /// Default: Parallel.
    pub commit_protocol: CommitProtocol,
    /// Txns in one Staged entry, and explicit decisions of staged txns in
    /// one Decisions entry (more wait for the next, proposed as soon as the
    /// previous is applied, §13.2). Default: 1024.
    pub decision_batch_max: usize,
    /// Under parallel commit, how long the first explicit decision of a
    /// Decisions entry waits for others before the entry is proposed (at
    /// most 1 000; 0 proposes at once). Off the critical path (the client
    /// has its answer): the entries, and the Decide calls and acknowledgements
    /// that follow them, stop competing with the next txns' Staged entries at
    /// low load; a txn's participants hear its decision up to this much
    /// later. Default: 10 ms.
    pub decision_linger_ms: u64,
    /// Staged txns the leader settles by status recovery at once (§13.3);
    /// more wait for the next scan. Default: 64.
    pub staged_recovery_max: usize,
    /// The wall clock read for deadlines, txn-id ages and retention.
    /// Default: the system clock (tests step one node's clock to model a
    /// clock jump).
    pub clock: Clock,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            txn_inflight_max: 10_000,
            branches_per_txn_max: 16,
            payload_max_bytes: 64 * 1024,
            deadline_max_ms: 30_000,
            prepare_timeout_ms: 5_000,
            prepare_batch_max: 256,
            prepare_calls_per_participant_max: 4,
            decide_timeout_ms: 5_000,
            delivery_backoff_min_ms: 20,
            delivery_backoff_max_ms: 2_000,
            delivery_batch_max: 256,
            ack_batch_max: 1024,
            ack_linger_ms: 5,
            retention_ms: 60_000,
            gc_interval_ms: 1_000,
            txn_id_future_skew_ms: 60_000,
            unacknowledged_max: 100_000,
            participant_connect_timeout_ms: 1_000,
            begun_max: 10_000,
            begun_scan_interval_ms: 100,
            commit_protocol: CommitProtocol::Parallel,
            decision_batch_max: 1024,
            decision_linger_ms: 10,
            staged_recovery_max: 64,
            clock: Clock::system(),
        }
    }
}

/// How a one-shot txn commits (docs/PROTOCOL.md §5, §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitProtocol {
    /// Prepare, then log the decision: two durable rounds one after the other (§5).
    Sequential,
    /// Log a Staged entry while the Prepares are out: one durable round (§13).
    #[default]
    Parallel,
}

impl CommitProtocol {
    /// Its name in flags, metrics and `twopc bench` output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::Parallel => "parallel",
        }
    }
}

impl std::fmt::Display for CommitProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CommitProtocol {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sequential" => Ok(Self::Sequential),
            "parallel" => Ok(Self::Parallel),
            other => {
                Err(Error::InvalidArgument(format!("commit protocol {other:?} is unknown; use sequential or parallel")))
            }
        }
    }
}

impl EngineConfig {
    /// How the gRPC participant client gathers Prepares.
    pub fn prepare_batching(&self) -> crate::prepare_batch::PrepareBatching {
        crate::prepare_batch::PrepareBatching {
            batch_max: self.prepare_batch_max,
            calls_max: self.prepare_calls_per_participant_max,
        }
    }

    /// Checks the config before anything starts.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        let positive = [
            ("txn_inflight_max", self.txn_inflight_max as u64),
            ("branches_per_txn_max", self.branches_per_txn_max as u64),
            ("payload_max_bytes", self.payload_max_bytes as u64),
            ("deadline_max_ms", self.deadline_max_ms),
            ("prepare_timeout_ms", self.prepare_timeout_ms),
            ("prepare_batch_max", self.prepare_batch_max as u64),
            ("prepare_calls_per_participant_max", self.prepare_calls_per_participant_max as u64),
            ("decide_timeout_ms", self.decide_timeout_ms),
            ("delivery_backoff_min_ms", self.delivery_backoff_min_ms),
            ("delivery_batch_max", self.delivery_batch_max as u64),
            ("ack_batch_max", self.ack_batch_max as u64),
            ("gc_interval_ms", self.gc_interval_ms),
            ("txn_id_future_skew_ms", self.txn_id_future_skew_ms),
            ("unacknowledged_max", self.unacknowledged_max as u64),
            ("participant_connect_timeout_ms", self.participant_connect_timeout_ms),
            ("begun_max", self.begun_max as u64),
            ("begun_scan_interval_ms", self.begun_scan_interval_ms),
            ("decision_batch_max", self.decision_batch_max as u64),
            ("staged_recovery_max", self.staged_recovery_max as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be greater than zero"));
        }
        let lingers = [("decision_linger_ms", self.decision_linger_ms), ("ack_linger_ms", self.ack_linger_ms)];
        if let Some((name, ms)) = lingers.iter().find(|(_, ms)| *ms > 1_000) {
            return bad(format!("{name} ({ms}) must be at most 1000"));
        }
        if self.delivery_backoff_max_ms < self.delivery_backoff_min_ms {
            return bad("delivery_backoff_max_ms must be at least delivery_backoff_min_ms".into());
        }
        if self.retention_ms <= self.deadline_max_ms {
            return bad(format!(
                "retention_ms ({}) must exceed deadline_max_ms ({}): a txn must be remembered past its deadline",
                self.retention_ms, self.deadline_max_ms
            ));
        }
        let log_limit_ms = crate::state_machine::TXN_ID_AHEAD_OF_PROPOSER_MAX_MS;
        if self.txn_id_future_skew_ms >= log_limit_ms {
            return bad(format!(
                "txn_id_future_skew_ms ({}) must be below {log_limit_ms} ms, the furthest ahead of its proposer \
                 the log accepts a txn id",
                self.txn_id_future_skew_ms
            ));
        }
        let joined_max = crate::state_machine::JOINED_BRANCHES_MAX;
        if self.branches_per_txn_max > joined_max {
            return bad(format!(
                "branches_per_txn_max ({}) must be at most {joined_max}, the most branches the log lets join one txn",
                self.branches_per_txn_max
            ));
        }
        if self.payload_max_bytes * self.branches_per_txn_max >= twopc_proto::MAX_MESSAGE_BYTES {
            return bad(format!(
                "payload_max_bytes x branches_per_txn_max must stay under the {} byte message limit",
                twopc_proto::MAX_MESSAGE_BYTES
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The lingers hold off-path entries back; past a second they would hold
    // every participant's decision, or its acknowledgement, that long.
    #[test]
    fn lingers_are_bounded() {
        assert!(EngineConfig::default().validate().is_ok());
        for set in [|c: &mut EngineConfig| c.decision_linger_ms = 1_001, |c: &mut EngineConfig| c.ack_linger_ms = 1_001]
        {
            let mut config = EngineConfig::default();
            set(&mut config);
            let why = config.validate().expect_err("a linger past a second").to_string();
            assert!(why.contains("linger_ms (1001) must be at most 1000"), "{why}");
        }
        let zero = EngineConfig { decision_linger_ms: 0, ack_linger_ms: 0, ..EngineConfig::default() };
        assert!(zero.validate().is_ok(), "0 proposes at once");
    }
}
