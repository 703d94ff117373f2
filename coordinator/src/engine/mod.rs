//! The two-phase commit driver (docs/PROTOCOL.md §5–§8, §12, §13): Submit,
//! Resolve, operator decisions, interactive txns (Begin, Join, Commit,
//! Rollback), and the leader's background duties (phase-2 delivery, retention
//! GC, timing out begun txns), all on top of a [`NodeHandle`].
//!
//! Outcomes are read from applied state (I2): a Submit answers with the
//! record its Decide entry produced when applied, which is the first decision
//! logged for the txn, whoever logged it. The one exception is a parallel
//! commit's owner (`parallel`, §13.2), which answers Commit once its Staged
//! entry is applied and every vote is YES: the only decision left to log.
//!
//! Modules: `delivery` (phase 2), `interactive` (§12), `parallel` (§13:
//! Staged entries, status recovery, the entry batcher), `request` (validated
//! requests).

mod delivery;
mod interactive;
mod parallel;
mod request;

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;
use twopc_proto::{Decision, ParticipantId, PayloadDigest, TxnId, Vote};

use crate::command::{Command, DecideCmd, Proposal};
use crate::config::{CommitProtocol, EngineConfig};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::metrics::PhaseLatencies;
use crate::node::NodeHandle;
use crate::participant_client::{ParticipantClient, Target};
use crate::state_machine::{
    Applied, BegunTxn, DecideRefusal, ListFilter, TIMED_OUT_REASON, TXN_ID_AHEAD_OF_PROPOSER_MAX_MS, TXN_STATE_STAGED,
    TxnRecord,
};

use delivery::Delivery;
use parallel::EntryBatcher;
pub use request::{
    BeginRequest, CommitRequest, JoinRequest, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, LIST_PAGE_MAX_BYTES, ListRequest,
    OPERATOR_REASON_MAX_BYTES, OPERATOR_REASON_PREFIX, OperatorDecideRequest, ROLLBACK_REASON_DEFAULT,
    ROLLBACK_REASON_MAX_BYTES, ROLLBACK_REASON_PREFIX, RollbackRequest, SubmitRequest, check_not_from_the_future,
    parse_txn_id,
};

/// What a caller learns about a txn.
#[derive(Debug, Clone, PartialEq)]
pub enum TxnView {
    /// This leader is collecting votes; nothing is logged.
    Preparing {
        /// The txn.
        txn_id: TxnId,
        /// Its branches' participants.
        participants: Vec<ParticipantId>,
    },
    /// Begun interactively and not decided (docs/PROTOCOL.md §12): the log
    /// holds its deadline and the branches joined so far.
    Begun(BegunTxn),
    /// The log holds its decision.
    Logged(TxnRecord),
}

impl TxnView {
    /// The txn it is about.
    pub fn txn_id(&self) -> TxnId {
        match self {
            Self::Preparing { txn_id, .. } => *txn_id,
            Self::Begun(begun) => begun.txn_id,
            Self::Logged(record) => record.txn_id,
        }
    }
}

/// What Resolve answers (docs/PROTOCOL.md §6, §12.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The decision the asker must carry out.
    Decided(Decision),
    /// The txn is begun, undecided and before its deadline: nothing is
    /// presumed; ask again after this long.
    Undecided {
        /// At most the time to the deadline, and at most [`RESOLVE_RETRY_AFTER_MAX_MS`].
        retry_after_ms: u64,
    },
}

/// The longest `retry_after_ms` an undecided Resolve answers (§12.5): a
/// participant asks again at least this often, so it learns a decision soon
/// after it is logged even if phase 2 does not reach it.
pub const RESOLVE_RETRY_AFTER_MAX_MS: u64 = 1000;

/// Counters for the admin endpoint and the logs.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Submits that started a new txn.
    pub submitted: AtomicU64,
    /// Txns this leader decided to commit.
    pub committed: AtomicU64,
    /// Txns aborted because a branch voted NO.
    pub aborted_vote_no: AtomicU64,
    /// Txns aborted because a branch did not answer (unreachable, timeout, error).
    pub aborted_no_answer: AtomicU64,
    /// Txns aborted because the deadline passed before every vote was in.
    pub aborted_deadline: AtomicU64,
    /// Resolve calls answered.
    pub resolved: AtomicU64,
    /// Txns aborted by Resolve finding no record (presumed abort).
    pub presumed_aborts: AtomicU64,
    /// Acknowledge entries logged (a batch of acknowledgements each).
    pub ack_entries: AtomicU64,
    /// Decisions acknowledged by participants.
    pub delivered: AtomicU64,
    /// Failed Decide calls that will be retried.
    pub delivery_retries: AtomicU64,
    /// Interactive txns begun (Begin entries that began a txn).
    pub begun: AtomicU64,
    /// Branches joined to begun txns (Join entries that joined one).
    pub joined: AtomicU64,
    /// Joins refused (decided, past the deadline, unknown, forgotten, too many).
    pub join_refused: AtomicU64,
    /// Begun txns aborted at their deadline ("timed out").
    pub timed_out: AtomicU64,
    /// Begun txns aborted by Rollback.
    pub rolled_back: AtomicU64,
    /// Begun txns whose logged decision is Commit.
    pub interactive_committed: AtomicU64,
    /// Txns answered Commit under parallel commit, before their Decide entry (§13).
    pub parallel_commits: AtomicU64,
    /// Staged txns status recovery logged Commit for (§13.3).
    pub recovered_commits: AtomicU64,
    /// Staged txns status recovery logged Abort for (§13.3).
    pub recovered_aborts: AtomicU64,
    /// Calls (Submit, Commit, Rollback, Resolve, a status recovery) that
    /// found their txn being driven on this leader and waited for that
    /// outcome instead of driving it again.
    pub waited_on_running: AtomicU64,
}

/// The outcome a running Submit shares with Submits and Resolves that joined it.
type SharedOutcome = Option<std::result::Result<TxnRecord, SharedError>>;

/// A Submit's failure as its waiters see it: where to retry, or why not.
#[derive(Debug, Clone)]
enum SharedError {
    NotLeader(Option<String>),
    Timeout(String),
    /// The log refused the decision: every waiter gets the same answer.
    FailedPrecondition(String),
    TxnState(&'static str, String),
    Forgotten(String),
    InvalidArgument(String),
    NotFound(String),
    Other(String),
}

impl From<&Error> for SharedError {
    fn from(err: &Error) -> Self {
        match err {
            Error::NotLeader { leader_addr } => Self::NotLeader(leader_addr.clone()),
            Error::Timeout(m) => Self::Timeout(m.clone()),
            Error::FailedPrecondition(m) => Self::FailedPrecondition(m.clone()),
            Error::TxnState { state, message } => Self::TxnState(state, message.clone()),
            Error::Forgotten(m) => Self::Forgotten(m.clone()),
            Error::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
            Error::NotFound(m) => Self::NotFound(m.clone()),
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<&SharedError> for Error {
    fn from(err: &SharedError) -> Self {
        match err {
            SharedError::NotLeader(leader_addr) => Self::NotLeader { leader_addr: leader_addr.clone() },
            SharedError::Timeout(m) => Self::Timeout(m.clone()),
            SharedError::FailedPrecondition(m) => Self::FailedPrecondition(m.clone()),
            SharedError::TxnState(state, message) => Self::TxnState { state, message: message.clone() },
            SharedError::Forgotten(m) => Self::Forgotten(m.clone()),
            SharedError::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
            SharedError::NotFound(m) => Self::NotFound(m.clone()),
            SharedError::Other(m) => Self::Retryable(format!("{m}; outcome unknown")),
        }
    }
}

struct Inflight {
    outcome: watch::Receiver<SharedOutcome>,
    participants: Vec<ParticipantId>,
    driver: Driver,
}

/// Who drives a txn in the in-flight table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    /// A Submit preparing its branches.
    Submit,
    /// An operator's Decide being logged: a Submit that arrives meanwhile
    /// waits for that decision instead of preparing (docs/PROTOCOL.md §6.1).
    Operator,
    /// A Commit of a begun txn preparing its one-shot branches and logging
    /// its decision (§12.4).
    Commit,
    /// A Rollback of a begun txn logging its Abort (§12.4).
    Rollback,
    /// The leader logging the Abort of a begun txn past its deadline (§12.5).
    Timeout,
    /// Status recovery settling a staged txn (§13.3).
    Recovery,
}

/// The answer for a txn id the log may have decided and then forgotten.
fn forgotten(txn_id: TxnId) -> Error {
    Error::Forgotten(format!(
        "txn {txn_id} is forgotten; its outcome is no longer kept (its id was created before the log's \
         retention horizon, docs/PROTOCOL.md §7.2)"
    ))
}

/// The answer when the log refused an entry for a txn id created too far
/// ahead of its proposer's clock (docs/PROTOCOL.md §7.4).
fn refused_from_the_future(txn_id: TxnId) -> Error {
    Error::InvalidArgument(format!(
        "txn_id: {txn_id} was created more than {TXN_ID_AHEAD_OF_PROPOSER_MAX_MS} ms after the proposing leader's \
         clock; the log refuses it"
    ))
}

/// The decision a participant asking about `record` must carry out for its
/// branch (docs/PROTOCOL.md §6): the logged one, unless the record names
/// branches and not this participant. Then its branch came from a Submit of
/// the same txn id with another branch set (a client reusing the id across a
/// leader change) that was never decided: nobody will commit it, and the
/// decided record's Commit must not be applied to it (I1).
///
/// A record of a begun txn names every branch of the txn (joined before the
/// decision, or one-shot), so a participant it does not name is answered
/// Abort even when it names none: its Join was refused or never applied
/// (§12.5).
fn decision_for(record: &TxnRecord, asker: Option<&ParticipantId>) -> Decision {
    match asker {
        Some(asker) if (record.deadline_unix_ms.is_some() || !record.branches.is_empty()) && !record.names(asker) => {
            Decision::Abort
        }
        _ => record.decision,
    }
}

/// The Resolve answer for the outcome a driver shared. A parallel commit's
/// Commit, told before its Decide entry is applied (docs/PROTOCOL.md §13.2),
/// is for its client only: a participant carries out only a logged decision
/// (phase 2 waits for it too), or, were the leader to die before logging it,
/// the participant could commit and then forget its vote before status
/// recovery asks. So the participant is told to ask again shortly.
fn logged_resolution(record: &TxnRecord, asker: Option<&ParticipantId>) -> Resolution {
    if record.decision_log_index == 0 {
        return Resolution::Undecided { retry_after_ms: IMPLICIT_COMMIT_RETRY_AFTER_MS };
    }
    Resolution::Decided(decision_for(record, asker))
}

/// How soon a participant asks again about a txn committed but not yet logged (§13.2).
const IMPLICIT_COMMIT_RETRY_AFTER_MS: u64 = 100;

/// What a decision applied as (from a Decide, AbortStaged or Decisions
/// entry) tells its proposer: the txn's record and whether this decision was
/// the first, or why the log refused it.
fn decided(applied: Applied) -> Result<(TxnRecord, bool)> {
    match applied {
        Applied::Decided { record, first } => Ok((record, first)),
        Applied::DecideRefused { txn_id, refusal: DecideRefusal::Forgotten } => Err(forgotten(txn_id)),
        Applied::DecideRefused { txn_id, refusal: DecideRefusal::FromTheFuture } => {
            Err(refused_from_the_future(txn_id))
        }
        Applied::DecideRefused { txn_id, refusal: DecideRefusal::Staged } => Err(Error::TxnState {
            state: TXN_STATE_STAGED,
            message: format!(
                "txn {txn_id} is staged under parallel commit (docs/PROTOCOL.md §13.1): only its votes decide \
                 it, and status recovery asks its participants for them"
            ),
        }),
        Applied::DecideRefused { txn_id, refusal: DecideRefusal::Begun } => Err(begun_during_submit(txn_id)),
        Applied::DecideRefused { txn_id, refusal: DecideRefusal::OtherBranches } => {
            Err(Error::FailedPrecondition(format!(
                "txn {txn_id} is staged (docs/PROTOCOL.md §13) with other branches than this decision names; \
                 retry with the same branches, or use a new txn id for other work"
            )))
        }
        other => Err(Error::Corrupt(format!("a Decide entry was applied as {other:?}"))),
    }
}

/// A Submit for a txn begun interactively.
fn begun_not_submit(txn_id: TxnId) -> Error {
    Error::FailedPrecondition(format!(
        "txn {txn_id} is begun (interactive, docs/PROTOCOL.md §12): finish it with Commit or Rollback, not Submit"
    ))
}

/// A Submit whose decision (or Staged entry) the log refused because a Begin
/// of the id was applied while it ran: the begun txn is its own client's
/// (§12.4). No decision names this Submit's branches, so each is settled by
/// that txn's: Abort for every participant it does not name (§6).
pub(super) fn begun_during_submit(txn_id: TxnId) -> Error {
    Error::FailedPrecondition(format!(
        "txn {txn_id} was begun (interactive, docs/PROTOCOL.md §12) while this Submit ran, so the log did not \
         decide the Submit; its prepared branches are settled when that txn is decided. Submit under a new txn id"
    ))
}

/// A new txn (Submit, Begin) for an id created before the log's retention
/// horizon: it may have been decided and forgotten (§7.2).
fn past_horizon(txn_id: TxnId) -> Error {
    Error::FailedPrecondition(format!(
        "txn id {txn_id} was created before the log's retention horizon: it may have been decided and forgotten; \
         use a new txn id"
    ))
}

/// A Submit (or a Commit, of its one-shot branches) naming other participants than the txn's running or logged ones.
fn other_branches(txn_id: TxnId, known: &[ParticipantId], asked: &[ParticipantId]) -> Option<Error> {
    let sorted = |names: &[ParticipantId]| {
        let mut names: Vec<String> = names.iter().map(ToString::to_string).collect();
        names.sort();
        names
    };
    let (known, asked) = (sorted(known), sorted(asked));
    (known != asked).then(|| {
        Error::FailedPrecondition(format!(
            "txn {txn_id} has branches [{}], but this call names [{}]: retry with the same branches, or use \
             a new txn id for other work",
            known.join(", "),
            asked.join(", ")
        ))
    })
}

/// The refusal of a Submit whose payloads are not the staged txn's (§3.1,
/// §13.1): another Submit of the id staged it, and the staged txn's outcome
/// is not this call's. None for the same payloads, or a Staged entry logged
/// before digests.
fn other_payloads(staged: &crate::state_machine::StagedTxn, asked: &[(ParticipantId, bytes::Bytes)]) -> Option<Error> {
    if staged.payload_digests.is_empty() {
        return None;
    }
    let staged_pairs = crate::state_machine::branch_digests(&staged.participants, &staged.payload_digests);
    (staged_pairs != digests_of(asked)).then(|| other_submit(staged.txn_id))
}

/// Each branch's participant and payload digest.
fn digests_of(branches: &[(ParticipantId, bytes::Bytes)]) -> BTreeSet<(ParticipantId, PayloadDigest)> {
    branches.iter().map(|(p, payload)| (p.clone(), PayloadDigest::of(payload))).collect()
}

/// The digest of each target's payload, in order: what a one-shot txn's
/// Staged and Decide entries log (§3.1).
fn payload_digests(targets: &[(Target, bytes::Bytes)]) -> Vec<PayloadDigest> {
    targets.iter().map(|(_, payload)| PayloadDigest::of(payload)).collect()
}

/// The answer to a Submit whose payloads cannot be the ones its txn id
/// commits: another Submit of the id holds it (§3.1).
pub(super) fn other_submit(txn_id: TxnId) -> Error {
    Error::FailedPrecondition(format!(
        "txn {txn_id} belongs to another Submit of the same id with other payloads; its outcome is not this \
         call's: retry with the same payloads, or submit these under a new txn id"
    ))
}

/// The 2PC driver of one coordinator node. Cheap to clone.
pub struct Engine<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for Engine<P> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct Inner<P> {
    node: NodeHandle,
    config: EngineConfig,
    client: Arc<P>,
    inflight: Mutex<HashMap<TxnId, Inflight>>,
    /// Phase-2 delivery of the current leader term; None when not a ready leader.
    delivery: Mutex<Option<Arc<Delivery<P>>>>,
    metrics: EngineMetrics,
    phases: PhaseLatencies,
    /// Set while a scan for begun txns past their deadline runs, so scans never overlap.
    timeout_scan_running: std::sync::atomic::AtomicBool,
    /// Set while a status-recovery scan of staged txns runs (§13.3).
    staged_scan_running: std::sync::atomic::AtomicBool,
    /// Where the next status-recovery scan starts: after the last txn the
    /// previous one took, so txns whose votes cannot be had (a participant
    /// down) do not keep the rest from being scanned.
    staged_scan_cursor: Mutex<Option<TxnId>>,
    /// Logs parallel commits' Staged entries in batches (§13.2).
    staging: Arc<EntryBatcher<crate::command::StagedCmd>>,
    /// Logs parallel commits' explicit decisions in batches (§13.2).
    decisions: Arc<EntryBatcher<DecideCmd>>,
}

impl<P: ParticipantClient> Engine<P> {
    /// An engine driving `node`, calling participants through `client`. Its
    /// background duties start with [`Engine::run_leader_duties`].
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(node: NodeHandle, config: EngineConfig, client: P) -> Result<Self> {
        config.validate()?;
        let batch_max = config.decision_batch_max;
        let staging = EntryBatcher::new(batch_max, config.clock.clone(), Command::Staged, Duration::ZERO);
        let linger = Duration::from_millis(config.decision_linger_ms);
        let decisions = EntryBatcher::new(batch_max, config.clock.clone(), Command::Decisions, linger);
        Ok(Self {
            inner: Arc::new(Inner {
                node,
                config,
                client: Arc::new(client),
                inflight: Mutex::default(),
                delivery: Mutex::default(),
                metrics: EngineMetrics::default(),
                phases: PhaseLatencies::default(),
                timeout_scan_running: std::sync::atomic::AtomicBool::new(false),
                staged_scan_running: std::sync::atomic::AtomicBool::new(false),
                staged_scan_cursor: Mutex::default(),
                staging,
                decisions,
            }),
        })
    }

    /// The engine's counters.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// The node's metrics in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let (unacknowledged, begun, staged) =
            self.inner.node.local_read(|sm| (sm.unacknowledged_count(), sm.begun_count(), sm.staged_count()));
        let gauges = crate::metrics::TxnGauges { unacknowledged, begun, staged };
        crate::metrics::render(&self.inner.node.status(), &self.inner.metrics, &self.inner.phases, gauges)
    }

    /// The node this engine drives.
    pub fn node(&self) -> &NodeHandle {
        &self.inner.node
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Now, by this node's clock.
    fn now_ms(&self) -> u64 {
        self.inner.config.clock.unix_now_ms()
    }

    /// This node leads and is ready (docs/PROTOCOL.md §4.4): its applied
    /// state holds every entry committed before its term, which the calls
    /// that read it to decide what to do (a Submit finding its txn begun,
    /// staged or decided) rely on. A leader elected a moment ago answers
    /// `UNAVAILABLE` until the empty entry of its term is applied.
    fn require_leader(&self) -> Result<()> {
        self.inner.node.with_status(|status| {
            if status.role != crate::node::Role::Leader {
                return Err(Error::NotLeader { leader_addr: status.leader_addr.clone() });
            }
            if !status.leader_ready {
                return Err(Error::Retryable(format!(
                    "node {} was elected leader of term {} and is still applying its log",
                    status.id, status.term
                )));
            }
            Ok(())
        })
    }

    /// Runs a txn (docs/PROTOCOL.md §5) and returns the applied record.
    ///
    /// # Errors
    /// [`Error::NotLeader`]; [`Error::FailedPrecondition`] for a txn id past
    /// the retention horizon; [`Error::NotFound`] for an unregistered
    /// participant; [`Error::Overloaded`] past a bound; [`Error::Retryable`]
    /// when leadership changed mid-way (retry with the same txn id).
    pub async fn submit(&self, request: SubmitRequest) -> Result<TxnRecord> {
        let (txn_id, asked) = (request.txn_id, digests_of(&request.branches));
        let record = self.submit_unchecked(request).await?;
        // An interactive txn's record answers its own Commit, never a Submit:
        // one naming no branches (nothing joined) would tell this client
        // Commit for payloads no participant ever saw (I8). Whatever path
        // answered: the log, or the txn's Commit, Rollback or timeout this
        // Submit joined, a Begin of the id applied after it looked (§5 step 7).
        if record.deadline_unix_ms.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "txn {txn_id} is an interactive txn (docs/PROTOCOL.md §12), decided {}; a Submit cannot reuse its \
                 id: submit under a new txn id",
                record.decision
            )));
        }
        // Whatever path answered (the log, a recovery, another Submit's
        // driver), a Commit that names payloads is this Submit's only if
        // they are its own (§3.1): another Submit of the id may have won.
        let committed: BTreeSet<(ParticipantId, PayloadDigest)> =
            record.branches.iter().filter_map(|b| b.payload_digest.map(|d| (b.participant.clone(), d))).collect();
        if record.decision == Decision::Commit && !committed.is_empty() && committed != asked {
            return Err(other_submit(txn_id));
        }
        Ok(record)
    }

    async fn submit_unchecked(&self, request: SubmitRequest) -> Result<TxnRecord> {
        let txn_id = request.txn_id;
        self.require_leader()?;
        // A decided txn answers from the applied log (I5).
        let (record, forgotten, begun, staged) = self.inner.node.local_read(|sm| {
            let staged = sm.staged(&txn_id).cloned();
            (sm.txn(&txn_id).cloned(), sm.may_have_forgotten(&txn_id), sm.is_begun(&txn_id), staged)
        });
        let asked: Vec<ParticipantId> = request.branches.iter().map(|(p, _)| p.clone()).collect();
        if let Some(record) = record {
            // An interactive txn's record is refused by `submit`.
            if record.deadline_unix_ms.is_some() {
                return Ok(record);
            }
            // A presumed abort or an operator's decision logs no branches:
            // any retry of such a txn gets its outcome.
            let logged: Vec<ParticipantId> = record.branches.iter().map(|b| b.participant.clone()).collect();
            if let Some(err) = other_branches(txn_id, &logged, &asked).filter(|_| !logged.is_empty()) {
                return Err(err);
            }
            return Ok(record);
        }
        if begun && !failpoint::fired(failpoint::SUBMIT_RACES_BEGIN, || txn_id.to_string()) {
            return Err(begun_not_submit(txn_id));
        }
        // A staged txn is settled by its own votes (§13.3): joined if its
        // driver runs here, else by status recovery. It is never prepared
        // again with this call's payloads, which nothing ties to the staged
        // ones: a participant that had not yet seen the txn would stage them,
        // one that had would answer its recorded YES, and a Commit would apply
        // a mix of two transfers (I1, I8). Other participants are refused.
        // A staged txn is live whatever its id's age, so no id-age check.
        if let Some(staged) = &staged {
            if let Some(err) = other_branches(txn_id, &staged.participants, &asked) {
                return Err(err);
            }
            if let Some(err) = other_payloads(staged, &request.branches) {
                return Err(err);
            }
            return self.recover_staged(staged).await;
        }
        self.check_new_txn_id(txn_id, forgotten)?;
        let targets = self.targets(&request.branches)?;
        let participants = targets.iter().map(|(t, _)| t.participant.clone()).collect();
        let outcome = match self.join_or_register(txn_id, participants, Driver::Submit)? {
            Joined::Existing(running) => {
                if running.driver == Driver::Submit
                    && let Some(err) = other_branches(txn_id, &running.participants, &asked)
                {
                    return Err(err);
                }
                return self.wait_running(running.outcome).await;
            }
            Joined::New(outcome) => outcome,
        };
        let waiter = outcome.subscribe();
        let mut guard = InflightGuard {
            inner: self.inner.clone(),
            txn_id,
            outcome: Some(outcome),
            answer_timer: Some(Instant::now()),
        };
        self.inner.metrics.submitted.fetch_add(1, Ordering::Relaxed);
        // The txn runs in its own task: a client that disconnects mid-way must
        // not abandon it between prepare and decision.
        let engine = self.clone();
        let span = tracing::info_span!("submit", txn_id = %txn_id, branches = targets.len());
        tokio::spawn(
            async move {
                let result = match engine.inner.config.commit_protocol {
                    CommitProtocol::Sequential => {
                        engine.prepare_and_decide(&request, targets, Command::DecideOneShot).await
                    }
                    CommitProtocol::Parallel => engine.prepare_and_commit_parallel(&request, targets, &mut guard).await,
                };
                guard.finish(result.as_ref());
            }
            .instrument(span),
        );
        wait_outcome(waiter).await
    }

    /// Whether a txn id the log holds nothing for may start a txn (docs/PROTOCOL.md
    /// §5 step 6, §7.2): Submit's check, and Begin's.
    fn check_new_txn_id(&self, txn_id: TxnId, forgotten: bool) -> Result<()> {
        // By the log, not the local clock: a leader whose clock is behind
        // must not run again a txn another leader decided and forgot.
        if forgotten {
            return Err(past_horizon(txn_id));
        }
        let accept_window_ms = self.inner.config.retention_ms - self.inner.config.deadline_max_ms;
        if self.inner.config.clock.age_ms(txn_id) > accept_window_ms {
            return Err(Error::FailedPrecondition(format!(
                "txn id {txn_id} was created {} ms ago, past the {accept_window_ms} ms window in which a txn \
                 id may be used; use a new txn id",
                self.inner.config.clock.age_ms(txn_id)
            )));
        }
        Ok(())
    }

    fn targets(&self, branches: &[(ParticipantId, bytes::Bytes)]) -> Result<Vec<(Target, bytes::Bytes)>> {
        // A staged txn is a decision waiting to be logged or recovered.
        let unacknowledged = self.inner.node.local_read(|sm| sm.unacknowledged_count() + sm.staged_count());
        if unacknowledged >= self.inner.config.unacknowledged_max {
            return Err(Error::Overloaded(format!(
                "{unacknowledged} decided or staged txns wait for participants (unacknowledged_max); \
                 is a participant down?"
            )));
        }
        self.inner.node.local_read(|sm| {
            branches
                .iter()
                .map(|(participant, payload)| {
                    let addr = sm.participant_addr(participant).ok_or_else(|| {
                        Error::NotFound(format!(
                            "participant {participant} is not registered; register it first \
                             (twopc participants register {participant} HOST:PORT)"
                        ))
                    })?;
                    Ok((Target { participant: participant.clone(), addr: addr.to_owned() }, payload.clone()))
                })
                .collect()
        })
    }

    /// Waits for the outcome of a txn another call drives on this leader,
    /// counting the wait (`twopc_calls_waited_on_running_total`).
    async fn wait_running(&self, outcome: watch::Receiver<SharedOutcome>) -> Result<TxnRecord> {
        self.inner.metrics.waited_on_running.fetch_add(1, Ordering::Relaxed);
        wait_outcome(outcome).await
    }

    fn join_or_register(&self, txn_id: TxnId, participants: Vec<ParticipantId>, driver: Driver) -> Result<Joined> {
        let mut inflight = self.inner.inflight.lock();
        let len = inflight.len();
        match inflight.entry(txn_id) {
            Entry::Occupied(running) => {
                let running = running.get();
                Ok(Joined::Existing(Inflight {
                    outcome: running.outcome.clone(),
                    participants: running.participants.clone(),
                    driver: running.driver,
                }))
            }
            Entry::Vacant(slot) => {
                if len >= self.inner.config.txn_inflight_max {
                    return Err(Error::Overloaded(format!(
                        "{len} txns are being prepared (txn_inflight_max); retry shortly"
                    )));
                }
                let (tx, rx) = watch::channel(None);
                slot.insert(Inflight { outcome: rx, participants, driver });
                Ok(Joined::New(tx))
            }
        }
    }

    /// Prepares every branch, then logs the decision in the entry `entry`
    /// makes of it: a one-shot Submit's [`Command::DecideOneShot`], which the
    /// log refuses for a txn begun meanwhile, or an interactive Commit's
    /// [`Command::Decide`].
    async fn prepare_and_decide(
        &self,
        request: &SubmitRequest,
        targets: Vec<(Target, bytes::Bytes)>,
        entry: fn(DecideCmd) -> Command,
    ) -> Result<TxnRecord> {
        let txn_id = request.txn_id;
        let started = Instant::now();
        let (votes, abort_reason, met_other_submit) = self.prepare_all(request, &targets).await;
        self.inner.phases.prepare.record(started.elapsed());
        let mut decision = if abort_reason.is_none() { Decision::Commit } else { Decision::Abort };
        if failpoint::fired(failpoint::PREPARE_IGNORE_VOTES, || txn_id.to_string()) {
            decision = Decision::Commit; // A broken protocol, for tests of the invariant checker.
        }
        let branches =
            targets.iter().map(|(t, _)| (t.participant.clone(), votes.get(&t.participant).cloned())).collect();
        let reason = abort_reason.unwrap_or_default();
        let cmd = DecideCmd { txn_id, decision, reason, branches, payload_digests: payload_digests(&targets) };
        // I3: nothing is sent to participants before the decision is applied.
        let decided = self.decide_entry(entry(cmd)).await.map(|(record, _)| record);
        let record = self.or_recover(txn_id, decided).await?;
        if failpoint::fired(failpoint::DECIDE_AFTER_APPLIED, || txn_id.to_string()) {
            return Err(Error::Retryable(format!(
                "failpoint {}: stopped before phase 2",
                failpoint::DECIDE_AFTER_APPLIED
            )));
        }
        if record.decision == Decision::Commit {
            self.inner.metrics.committed.fetch_add(1, Ordering::Relaxed);
        }
        self.deliver(&record);
        // A participant holds another Submit's branch: a Commit in the log
        // is that Submit's, never this one's payloads (§3.1).
        if met_other_submit && record.decision == Decision::Commit {
            return Err(other_submit(txn_id));
        }
        Ok(record)
    }

    /// Sends Prepare to every branch in parallel; stops at the first refusal.
    /// Returns the votes received, if the txn must abort why, and whether a
    /// participant refused the Prepare for holding another Submit's branch of
    /// the id (then no Commit of the id is this Submit's, §3.1).
    async fn prepare_all(
        &self,
        request: &SubmitRequest,
        targets: &[(Target, bytes::Bytes)],
    ) -> (HashMap<ParticipantId, Vote>, Option<String>, bool) {
        let mut votes = HashMap::new();
        let remaining_ms = request.deadline_unix_ms.saturating_sub(self.now_ms());
        if remaining_ms == 0 {
            self.inner.metrics.aborted_deadline.fetch_add(1, Ordering::Relaxed);
            return (votes, Some("the deadline passed before prepare".into()), false);
        }
        let timeout = Duration::from_millis(remaining_ms.min(self.inner.config.prepare_timeout_ms));
        let mut pending: FuturesUnordered<_> = targets
            .iter()
            .map(|(target, payload)| {
                let client = self.inner.client.clone();
                let (target, payload) = (target.clone(), payload.clone());
                let (txn_id, deadline) = (request.txn_id, request.deadline_unix_ms);
                async move {
                    let vote = client.prepare(&target, txn_id, payload, deadline, timeout).await;
                    (target.participant, vote)
                }
            })
            .collect();
        let (mut abort_reason, mut met_other_submit) = (None, false);
        while let Some((participant, answer)) = pending.next().await {
            match answer {
                Ok(Vote::Yes) => {
                    votes.insert(participant, Vote::Yes);
                }
                Ok(Vote::No { reason }) => {
                    self.inner.metrics.aborted_vote_no.fetch_add(1, Ordering::Relaxed);
                    abort_reason = Some(format!("{participant} voted NO: {reason}"));
                    votes.insert(participant, Vote::No { reason });
                    break;
                }
                Err(err) => {
                    let past_deadline = self.now_ms() >= request.deadline_unix_ms;
                    let counter = if past_deadline {
                        &self.inner.metrics.aborted_deadline
                    } else {
                        &self.inner.metrics.aborted_no_answer
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    met_other_submit = err.message.contains(twopc_proto::payload_digest::PREPARED_WITH_ANOTHER_PAYLOAD);
                    abort_reason = Some(format!("{participant} did not vote: {}", err.message));
                    break;
                }
            }
        }
        if !pending.is_empty() {
            // The txn aborts without these votes. Let the calls finish rather
            // than reset their streams: a burst of resets makes an HTTP/2
            // server close the whole connection (rapid-reset protection).
            tokio::spawn(async move { while pending.next().await.is_some() {} });
        }
        (votes, abort_reason, met_other_submit)
    }

    /// Proposes a decision and returns the record the log holds afterwards.
    ///
    /// # Errors
    /// As [`NodeHandle::propose`]; [`Error::Forgotten`] when the log
    /// refused the first decision of a forgotten txn (§7.2),
    /// [`Error::InvalidArgument`] when it refused an id from the future (§7.4).
    async fn decide(&self, cmd: DecideCmd) -> Result<TxnRecord> {
        self.decide_first(cmd).await.map(|(record, _)| record)
    }

    /// [`Engine::decide`], telling whether this entry made the decision.
    async fn decide_first(&self, cmd: DecideCmd) -> Result<(TxnRecord, bool)> {
        self.decide_entry(Command::Decide(cmd)).await
    }

    /// [`Engine::decide_first`] for a Decide, DecideOneShot or AbortStaged entry.
    async fn decide_entry(&self, mut command: Command) -> Result<(TxnRecord, bool)> {
        // I6: reasons come from participants and operators; the log keeps them in every snapshot.
        if let Command::Decide(cmd) | Command::DecideOneShot(cmd) | Command::AbortStaged { decide: cmd, .. } =
            &mut command
        {
            cmd.cap_reasons();
        }
        let proposal = Proposal { command, proposed_unix_ms: self.now_ms() };
        let started = Instant::now();
        let applied = self.inner.node.propose(&proposal).await;
        self.inner.phases.decide.record(started.elapsed());
        let (record, first) = decided(applied?)?;
        if first {
            self.count_interactive_decision(&record);
        }
        Ok((record, first))
    }

    /// `decided`, unless the log refused it because the txn is staged
    /// (docs/PROTOCOL.md §13.1): then the txn's votes decide it, through
    /// status recovery run by the caller, which drives the txn already.
    async fn or_recover(&self, txn_id: TxnId, decided: Result<TxnRecord>) -> Result<TxnRecord> {
        match decided {
            Err(Error::TxnState { state: TXN_STATE_STAGED, .. }) => self.recover_registered(txn_id).await,
            other => other,
        }
    }

    /// Counts the first decision of a begun txn by how it ended.
    fn count_interactive_decision(&self, record: &TxnRecord) {
        if record.deadline_unix_ms.is_none() {
            return;
        }
        let metrics = &self.inner.metrics;
        let counter = match record.decision {
            Decision::Commit => &metrics.interactive_committed,
            Decision::Abort if record.reason == TIMED_OUT_REASON => &metrics.timed_out,
            Decision::Abort
                if record.reason == ROLLBACK_REASON_DEFAULT || record.reason.starts_with(ROLLBACK_REASON_PREFIX) =>
            {
                &metrics.rolled_back
            }
            Decision::Abort => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs a decision and hands it to phase 2 in a task of its own, so a
    /// caller that goes away between the two cannot leave the decision
    /// undelivered until the next leader re-drives it.
    async fn decide_and_deliver(&self, cmd: DecideCmd) -> Result<(TxnRecord, bool)> {
        let engine = self.clone();
        let task = tokio::spawn(async move {
            let (record, first) = engine.decide_first(cmd).await?;
            engine.deliver(&record);
            Ok((record, first))
        });
        task.await
            .unwrap_or_else(|e| Err(Error::Retryable(format!("the decision's task failed: {e}; outcome unknown"))))
    }

    /// Hands a decided record to the current term's phase-2 delivery, if this
    /// node is a ready leader; otherwise the next ready leader re-drives it.
    fn deliver(&self, record: &TxnRecord) {
        if let Some(delivery) = self.inner.delivery.lock().as_ref() {
            delivery.enqueue(record);
        }
    }

    /// Answers a participant's in-doubt question (docs/PROTOCOL.md §6,
    /// §12.5): the decision for its branch, or, for a begun txn before its
    /// deadline, "undecided, ask again later".
    ///
    /// # Errors
    /// [`Error::NotLeader`] when the txn is unknown here (or begun and past
    /// its deadline) and this node is not the leader; errors of
    /// [`NodeHandle::linearizable_read`] and of proposing.
    pub async fn resolve(&self, txn_id: TxnId, asker: Option<&ParticipantId>) -> Result<Resolution> {
        check_not_from_the_future(txn_id, &self.inner.config)?;
        let resolution = self.resolve_inner(txn_id, asker).await?;
        self.inner.metrics.resolved.fetch_add(1, Ordering::Relaxed);
        Ok(resolution)
    }

    async fn resolve_inner(&self, txn_id: TxnId, asker: Option<&ParticipantId>) -> Result<Resolution> {
        let (logged, begun_deadline, was_forgotten, staged) = self
            .inner
            .node
            .linearizable_read(|sm| {
                let begun_deadline = sm.begun(&txn_id).map(|b| b.deadline_unix_ms);
                (sm.txn(&txn_id).cloned(), begun_deadline, sm.may_have_forgotten(&txn_id), sm.staged(&txn_id).cloned())
            })
            .await?;
        if let Some(record) = logged {
            return Ok(Resolution::Decided(decision_for(&record, asker)));
        }
        if let Some(staged) = staged {
            // No presumed abort: the txn may be committed (§13.3). Waits for
            // its driver here, if it has one.
            let record = self.recover_staged(&staged).await?;
            return Ok(logged_resolution(&record, asker));
        }
        if let Some(deadline) = begun_deadline {
            // Nothing is presumed of a begun txn before its deadline: its
            // application may still commit it (§12.5).
            let now = self.now_ms();
            if now < deadline {
                return Ok(Resolution::Undecided { retry_after_ms: (deadline - now).min(RESOLVE_RETRY_AFTER_MAX_MS) });
            }
        } else if was_forgotten && !failpoint::fired(failpoint::FORGOTTEN_UNCHECKED, || txn_id.to_string()) {
            // No presumed abort here: the forgotten outcome may have been Commit (I2).
            return Err(forgotten(txn_id));
        }
        self.require_leader()?;
        let running = self.inner.inflight.lock().get(&txn_id).map(|i| i.outcome.clone());
        if let Some(outcome) = running {
            // A txn this leader is still preparing is not aborted by a Resolve.
            return self.wait_running(outcome).await.map(|record| logged_resolution(&record, asker));
        }
        if begun_deadline.is_some() {
            // Past its deadline: the timeout the leader's scan would log (§12.5).
            let cmd = DecideCmd::without_branches(txn_id, Decision::Abort, TIMED_OUT_REASON.to_owned());
            let (record, _) = self.decide_and_deliver(cmd).await?;
            return Ok(Resolution::Decided(decision_for(&record, asker)));
        }
        let reason = match asker {
            Some(p) => format!("presumed abort: {p} asked and no decision was logged"),
            None => "presumed abort: no decision was logged".to_owned(),
        };
        // A txn staged since the read above is not presumed aborted (§13.1).
        let presumed = self
            .decide_and_deliver(DecideCmd::without_branches(txn_id, Decision::Abort, reason))
            .await
            .map(|(record, _)| record);
        let record = self.or_recover(txn_id, presumed).await?;
        if record.decision == Decision::Abort && record.branches.is_empty() {
            self.inner.metrics.presumed_aborts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Resolution::Decided(decision_for(&record, asker)))
    }

    /// An operator's decision for an undecided txn (first writer wins,
    /// docs/PROTOCOL.md §6.1).
    ///
    /// # Errors
    /// [`Error::FailedPrecondition`] if the log already holds another
    /// decision or this leader is still preparing the txn; [`Error::Forgotten`]
    /// if the txn is forgotten. (An id from the future is refused by
    /// [`OperatorDecideRequest::from_pb`], as Submit's by [`SubmitRequest::from_pb`].)
    pub async fn operator_decide(&self, request: OperatorDecideRequest) -> Result<TxnRecord> {
        let OperatorDecideRequest { txn_id, decision, reason } = request;
        self.require_leader()?;
        if failpoint::fired(failpoint::OPERATOR_DECIDE_UNCHECKED, || txn_id.to_string()) {
            let reason = format!("{OPERATOR_REASON_PREFIX}{reason}");
            return self.decide(DecideCmd::without_branches(txn_id, decision, reason)).await;
        }
        // I1: while this leader collects votes, a branch may yet vote NO;
        // an operator's Commit now would be applied there by nobody.
        let outcome = match self.join_or_register(txn_id, Vec::new(), Driver::Operator)? {
            Joined::Existing(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "txn {txn_id} is PREPARING: this leader is collecting its votes and will log its decision; \
                     wait for it (twopc txn show {txn_id})"
                )));
            }
            Joined::New(outcome) => outcome,
        };
        // Registered as the txn's driver, so a Submit arriving meanwhile
        // waits for this decision instead of preparing.
        let guard = InflightGuard { inner: self.inner.clone(), txn_id, outcome: Some(outcome), answer_timer: None };
        let reason = format!("{OPERATOR_REASON_PREFIX}{reason}");
        // Delivered: a begun txn's record names the branches that joined it.
        // A staged txn is decided by its votes (§13.1): the operator's
        // decision stands only if they make the same one.
        let decided = self.decide_and_deliver(DecideCmd::without_branches(txn_id, decision, reason)).await;
        let result = self.or_recover(txn_id, decided.map(|(record, _)| record)).await;
        guard.finish(result.as_ref());
        let record = result?;
        if record.decision != decision || !record.reason.starts_with(OPERATOR_REASON_PREFIX) {
            return Err(Error::FailedPrecondition(format!(
                "txn {txn_id} is already decided: {} ({})",
                record.decision, record.reason
            )));
        }
        Ok(record)
    }

    /// What the log (or, for a txn being prepared, this leader) says about a txn.
    ///
    /// # Errors
    /// [`Error::NotFound`] when neither knows it.
    pub async fn transaction(&self, txn_id: TxnId) -> Result<TxnView> {
        check_not_from_the_future(txn_id, &self.inner.config)?;
        let (record, begun, was_forgotten) = self
            .inner
            .node
            .linearizable_read(|sm| {
                (sm.txn(&txn_id).cloned(), sm.begun(&txn_id).cloned(), sm.may_have_forgotten(&txn_id))
            })
            .await?;
        if let Some(record) = record {
            return Ok(TxnView::Logged(record));
        }
        if let Some(begun) = begun {
            return Ok(TxnView::Begun(begun));
        }
        if let Some(staged) = self.inner.node.local_read(|sm| sm.staged(&txn_id).cloned()) {
            // Committed or not, status recovery tells (§13.3); until then it is undecided.
            return Ok(TxnView::Preparing { txn_id, participants: staged.participants });
        }
        if let Some(running) = self.inner.inflight.lock().get(&txn_id) {
            return Ok(TxnView::Preparing { txn_id, participants: running.participants.clone() });
        }
        if was_forgotten {
            return Err(forgotten(txn_id));
        }
        Err(Error::NotFound(format!("no record of txn {txn_id} (never submitted or begun, or not decided yet)")))
    }

    /// A page of txns in id order: decided and begun ones, or the undecided
    /// (begun, and being prepared by this leader), or the unacknowledged.
    ///
    /// # Errors
    /// Errors of [`NodeHandle::linearizable_read`].
    pub async fn list(&self, request: &ListRequest) -> Result<Vec<TxnView>> {
        let created_before = self.now_ms().saturating_sub(request.older_than_ms);
        let (after, limit) = (request.after, request.limit);
        let mut views: Vec<TxnView> = if request.undecided {
            // Staged txns (§13) are undecided until their Decide entry: listed as preparing.
            let begun: Vec<TxnView> = self
                .inner
                .node
                .linearizable_read(|sm| {
                    let begun =
                        sm.list_begun(created_before, after, limit).into_iter().map(|b| TxnView::Begun(b.clone()));
                    let staged = sm
                        .list_staged(created_before, after, limit)
                        .into_iter()
                        .map(|s| TxnView::Preparing { txn_id: s.txn_id, participants: s.participants.clone() });
                    begun.chain(staged).collect()
                })
                .await?;
            let running: Vec<(TxnId, Vec<ParticipantId>)> = self
                .inner
                .inflight
                .lock()
                .iter()
                .filter(|(id, _)| id.created_unix_ms() < created_before && after.is_none_or(|a| **id > a))
                .map(|(id, i)| (*id, i.participants.clone()))
                .collect();
            // A begun txn being committed is listed once, as begun.
            let preparing: Vec<TxnView> = self.inner.node.local_read(|sm| {
                running
                    .into_iter()
                    .filter(|(id, _)| !sm.is_begun(id) && !begun.iter().any(|b| b.txn_id() == *id))
                    .map(|(txn_id, participants)| TxnView::Preparing { txn_id, participants })
                    .collect()
            });
            begun.into_iter().chain(preparing).collect()
        } else {
            let filter = if request.unacknowledged { ListFilter::Unacknowledged } else { ListFilter::All };
            self.inner
                .node
                .linearizable_read(|sm| {
                    let decided =
                        sm.list(filter, created_before, after, limit).into_iter().map(|r| TxnView::Logged(r.clone()));
                    if filter == ListFilter::Unacknowledged {
                        return decided.collect();
                    }
                    let begun =
                        sm.list_begun(created_before, after, limit).into_iter().map(|b| TxnView::Begun(b.clone()));
                    decided.chain(begun).collect()
                })
                .await?
        };
        views.sort_by_key(TxnView::txn_id);
        views.truncate(limit);
        Ok(views)
    }

    /// Names (or moves) a participant.
    ///
    /// # Errors
    /// As [`NodeHandle::propose`].
    pub async fn register_participant(&self, name: ParticipantId, addr: String) -> Result<()> {
        self.propose(Command::RegisterParticipant { name, addr }).await.map(drop)
    }

    /// Removes a participant from the registry.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown name; as [`NodeHandle::propose`].
    pub async fn remove_participant(&self, name: ParticipantId) -> Result<()> {
        match self.propose(Command::RemoveParticipant { name: name.clone() }).await? {
            Applied::Registry { existed: false } => {
                Err(Error::NotFound(format!("participant {name} is not registered")))
            }
            _ => Ok(()),
        }
    }

    /// The registry, read linearizably.
    ///
    /// # Errors
    /// As [`NodeHandle::linearizable_read`].
    pub async fn participants(&self) -> Result<Vec<(ParticipantId, String)>> {
        self.inner
            .node
            .linearizable_read(|sm| sm.participants().iter().map(|(n, a)| (n.clone(), a.clone())).collect())
            .await
    }

    async fn propose(&self, command: Command) -> Result<Applied> {
        self.inner.node.propose(&Proposal { command, proposed_unix_ms: self.now_ms() }).await
    }

    /// The leader's background duties, for as long as the node runs: on
    /// becoming a ready leader (docs/PROTOCOL.md §4.4), re-drive every decided
    /// txn not fully acknowledged and keep delivering; on stepping down, stop
    /// (§8). Also proposes retention GC, and the Abort of begun txns past
    /// their deadline (§12.5).
    pub async fn run_leader_duties(self) {
        let mut status = self.inner.node.watch_status();
        let mut gc = tokio::time::interval(Duration::from_millis(self.inner.config.gc_interval_ms));
        gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut begun_scan = tokio::time::interval(Duration::from_millis(self.inner.config.begun_scan_interval_ms));
        begun_scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (ready, term) = {
                let s = status.borrow_and_update();
                (s.leader_ready, s.term)
            };
            self.on_leadership(ready, term);
            tokio::select! {
                changed = status.changed() => if changed.is_err() { break },
                _ = gc.tick() => if ready { self.collect_garbage().await },
                _ = begun_scan.tick() => if ready {
                    self.start_timeout_scan();
                    self.start_staged_scan();
                },
            }
        }
        self.on_leadership(false, 0);
    }

    fn on_leadership(&self, ready: bool, term: u64) {
        let mut current = self.inner.delivery.lock();
        match (&*current, ready) {
            (Some(d), true) if d.term() == term => {}
            (None, false) => {}
            (_, false) => {
                if let Some(old) = current.take() {
                    old.stop();
                }
            }
            (_, true) => {
                if let Some(old) = current.take() {
                    old.stop();
                }
                let delivery =
                    Delivery::start(term, self.inner.node.clone(), self.inner.client.clone(), &self.inner.config);
                // Re-drive under the lock: a Submit deciding concurrently either
                // sees this delivery or is already in the applied state scanned here.
                let redrive: Vec<TxnRecord> = self.inner.node.local_read(|sm| sm.unacknowledged().cloned().collect());
                tracing::info!(term, txns = redrive.len(), "leader ready; re-driving unacknowledged decisions");
                for record in &redrive {
                    delivery.enqueue(record);
                }
                *current = Some(delivery);
            }
        }
        if let Some(d) = current.as_ref() {
            let delivered = d.take_delivered();
            self.inner.metrics.delivered.fetch_add(delivered.0, Ordering::Relaxed);
            self.inner.metrics.delivery_retries.fetch_add(delivered.1, Ordering::Relaxed);
            self.inner.metrics.ack_entries.fetch_add(delivered.2, Ordering::Relaxed);
        }
    }

    async fn collect_garbage(&self) {
        let horizon = self.now_ms().saturating_sub(self.inner.config.retention_ms);
        if !self.inner.node.local_read(|sm| sm.has_forgettable(horizon)) {
            return;
        }
        match self.propose(Command::Forget { horizon_unix_ms: horizon }).await {
            Ok(Applied::Forgotten { removed }) => {
                tracing::debug!(removed, "forgot txns past retention")
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "retention GC not proposed"),
        }
    }
}

enum Joined {
    Existing(Inflight),
    New(watch::Sender<SharedOutcome>),
}

async fn wait_outcome(mut outcome: watch::Receiver<SharedOutcome>) -> Result<TxnRecord> {
    let result = outcome.wait_for(Option::is_some).await;
    match result.as_deref() {
        Ok(Some(Ok(record))) => Ok(record.clone()),
        Ok(Some(Err(shared))) => Err(shared.into()),
        Ok(None) | Err(_) => Err(Error::Retryable("the txn's driver stopped; outcome unknown".into())),
    }
}

/// Removes a txn from the in-flight table however its Submit ends (even if
/// the caller goes away), telling every joined waiter.
struct InflightGuard<P> {
    inner: Arc<Inner<P>>,
    txn_id: TxnId,
    outcome: Option<watch::Sender<SharedOutcome>>,
    /// For a Submit or an interactive Commit: when the call came, to record
    /// its latency (`twopc_submit_seconds`) when the outcome is told, not
    /// when the driver ends: a parallel commit answers before its explicit
    /// decision is logged (§13.2). Told even with no one left waiting, so a
    /// call its client gave up on still counts.
    answer_timer: Option<Instant>,
}

impl<P> InflightGuard<P> {
    fn finish(mut self, result: std::result::Result<&TxnRecord, &Error>) {
        self.tell(result);
    }

    /// Tells every waiter the outcome now, while the driver keeps the txn
    /// (a parallel commit answers before logging its decision, §13.2). Only
    /// the first outcome told counts.
    fn tell(&mut self, result: std::result::Result<&TxnRecord, &Error>) {
        if let Some(started) = self.answer_timer.take() {
            self.inner.phases.submit.record(started.elapsed());
        }
        if let Some(tx) = self.outcome.take() {
            let shared = match result {
                Ok(record) => Ok(record.clone()),
                Err(err) => Err(SharedError::from(err)),
            };
            tx.send_replace(Some(shared));
        }
    }
}

impl<P> Drop for InflightGuard<P> {
    fn drop(&mut self) {
        self.inner.inflight.lock().remove(&self.txn_id);
        if let Some(tx) = self.outcome.take() {
            tx.send_replace(Some(Err(SharedError::Other("the txn's driver stopped".into()))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // §13.2: a participant's Resolve that joined a parallel commit's driver is
    // not told the Commit its client was told until the Decide entry is
    // applied: it asks again; a logged record answers as usual.
    #[test]
    fn a_resolve_is_answered_only_from_a_logged_decision() {
        let cmd = DecideCmd {
            txn_id: TxnId::new(),
            decision: Decision::Commit,
            reason: String::new(),
            branches: vec![("a".parse().expect("a name"), Some(Vote::Yes))],
            payload_digests: Vec::new(),
        };
        let asker: ParticipantId = "a".parse().expect("a name");
        let implicit = crate::state_machine::one_shot_record(&cmd, 0, 1);
        assert!(matches!(logged_resolution(&implicit, Some(&asker)), Resolution::Undecided { .. }));
        let logged = crate::state_machine::one_shot_record(&cmd, 7, 1);
        assert_eq!(logged_resolution(&logged, Some(&asker)), Resolution::Decided(Decision::Commit));
    }
}
