//! The two-phase commit driver (docs/PROTOCOL.md §5–§8): Submit, Resolve,
//! operator decisions, and the leader's background duties (phase-2 delivery,
//! retention GC), all on top of a [`NodeHandle`].
//!
//! Outcomes are always read from applied state (I2): a Submit answers with the
//! record its Decide entry produced when applied, which is the first decision
//! logged for the txn, whoever logged it.

mod delivery;
mod request;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;
use twopc_proto::{Decision, ParticipantId, TxnId, Vote};

use crate::command::{Command, DecideCmd, Proposal};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::metrics::PhaseLatencies;
use crate::node::NodeHandle;
use crate::participant_client::{ParticipantClient, Target};
use crate::state_machine::{Applied, DecideRefusal, ListFilter, TXN_ID_AHEAD_OF_PROPOSER_MAX_MS, TxnRecord};

use delivery::Delivery;
pub use request::{
    LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, LIST_PAGE_MAX_BYTES, ListRequest, OPERATOR_REASON_MAX_BYTES,
    OPERATOR_REASON_PREFIX, OperatorDecideRequest, SubmitRequest, check_not_from_the_future, parse_txn_id,
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
    /// The log holds its decision.
    Logged(TxnRecord),
}

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
    /// Decisions acknowledged by participants.
    pub delivered: AtomicU64,
    /// Failed Decide calls that will be retried.
    pub delivery_retries: AtomicU64,
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
    Forgotten(String),
    InvalidArgument(String),
    Other(String),
}

impl From<&Error> for SharedError {
    fn from(err: &Error) -> Self {
        match err {
            Error::NotLeader { leader_addr } => Self::NotLeader(leader_addr.clone()),
            Error::Timeout(m) => Self::Timeout(m.clone()),
            Error::FailedPrecondition(m) => Self::FailedPrecondition(m.clone()),
            Error::Forgotten(m) => Self::Forgotten(m.clone()),
            Error::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
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
            SharedError::Forgotten(m) => Self::Forgotten(m.clone()),
            SharedError::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
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
}

/// The answer for a txn id the log may have decided and then forgotten.
fn forgotten(txn_id: TxnId) -> Error {
    Error::Forgotten(format!(
        "txn {txn_id} is forgotten; its outcome is no longer kept (its id was created before the log's \
         retention horizon, docs/PROTOCOL.md §7.2)"
    ))
}

/// The decision a participant asking about `record` must carry out for its
/// branch (docs/PROTOCOL.md §6): the logged one, unless the record names
/// branches and not this participant. Then its branch came from a Submit of
/// the same txn id with another branch set (a client reusing the id across a
/// leader change) that was never decided: nobody will commit it, and the
/// decided record's Commit must not be applied to it (I1).
fn decision_for(record: &TxnRecord, asker: Option<&ParticipantId>) -> Decision {
    match asker {
        Some(asker) if !record.branches.is_empty() && !record.branches.iter().any(|b| &b.participant == asker) => {
            Decision::Abort
        }
        _ => record.decision,
    }
}

/// A Submit naming other participants than the txn's running or logged branches.
fn other_branches(txn_id: TxnId, known: &[ParticipantId], asked: &[ParticipantId]) -> Option<Error> {
    let sorted = |names: &[ParticipantId]| {
        let mut names: Vec<String> = names.iter().map(ToString::to_string).collect();
        names.sort();
        names
    };
    let (known, asked) = (sorted(known), sorted(asked));
    (known != asked).then(|| {
        Error::FailedPrecondition(format!(
            "txn {txn_id} has branches [{}], but this Submit names [{}]: retry with the same branches, or use \
             a new txn id for other work",
            known.join(", "),
            asked.join(", ")
        ))
    })
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
}

impl<P: ParticipantClient> Engine<P> {
    /// An engine driving `node`, calling participants through `client`. Its
    /// background duties start with [`Engine::run_leader_duties`].
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(node: NodeHandle, config: EngineConfig, client: P) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                node,
                config,
                client: Arc::new(client),
                inflight: Mutex::default(),
                delivery: Mutex::default(),
                metrics: EngineMetrics::default(),
                phases: PhaseLatencies::default(),
            }),
        })
    }

    /// The engine's counters.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// The node's metrics in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let unacknowledged = self.inner.node.local_read(|sm| sm.unacknowledged_count());
        crate::metrics::render(&self.inner.node.status(), &self.inner.metrics, &self.inner.phases, unacknowledged)
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

    fn require_leader(&self) -> Result<()> {
        self.inner.node.with_status(|status| {
            if status.role != crate::node::Role::Leader {
                return Err(Error::NotLeader { leader_addr: status.leader_addr.clone() });
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
        let txn_id = request.txn_id;
        self.require_leader()?;
        // A decided txn answers from the applied log (I5).
        let (record, forgotten) =
            self.inner.node.local_read(|sm| (sm.txn(&txn_id).cloned(), sm.may_have_forgotten(&txn_id)));
        let asked: Vec<ParticipantId> = request.branches.iter().map(|(p, _)| p.clone()).collect();
        if let Some(record) = record {
            // A presumed abort or an operator's decision logs no branches:
            // any retry of such a txn gets its outcome.
            let logged: Vec<ParticipantId> = record.branches.iter().map(|b| b.participant.clone()).collect();
            if let Some(err) = other_branches(txn_id, &logged, &asked).filter(|_| !logged.is_empty()) {
                return Err(err);
            }
            return Ok(record);
        }
        // By the log, not the local clock: a leader whose clock is behind
        // must not run again a txn another leader decided and forgot.
        if forgotten {
            return Err(Error::FailedPrecondition(format!(
                "txn id {txn_id} was created before the log's retention horizon: it may have been decided \
                 and forgotten; use a new txn id"
            )));
        }
        let accept_window_ms = self.inner.config.retention_ms - self.inner.config.deadline_max_ms;
        if self.inner.config.clock.age_ms(txn_id) > accept_window_ms {
            return Err(Error::FailedPrecondition(format!(
                "txn id {txn_id} was created {} ms ago, past the {accept_window_ms} ms window in which a txn \
                 id may be submitted; use a new txn id",
                self.inner.config.clock.age_ms(txn_id)
            )));
        }
        let targets = self.targets(&request)?;
        let participants = targets.iter().map(|(t, _)| t.participant.clone()).collect();
        let outcome = match self.join_or_register(txn_id, participants, Driver::Submit)? {
            Joined::Existing(running) => {
                if running.driver == Driver::Submit
                    && let Some(err) = other_branches(txn_id, &running.participants, &asked)
                {
                    return Err(err);
                }
                return wait_outcome(running.outcome).await;
            }
            Joined::New(outcome) => outcome,
        };
        let waiter = outcome.subscribe();
        let guard = InflightGuard { inner: self.inner.clone(), txn_id, outcome: Some(outcome) };
        self.inner.metrics.submitted.fetch_add(1, Ordering::Relaxed);
        // The txn runs in its own task: a client that disconnects mid-way must
        // not abandon it between prepare and decision.
        let engine = self.clone();
        let span = tracing::info_span!("submit", txn_id = %txn_id, branches = targets.len());
        tokio::spawn(
            async move {
                let started = Instant::now();
                let result = engine.prepare_and_decide(&request, targets).await;
                engine.inner.phases.submit.record(started.elapsed());
                guard.finish(result.as_ref());
            }
            .instrument(span),
        );
        wait_outcome(waiter).await
    }

    fn targets(&self, request: &SubmitRequest) -> Result<Vec<(Target, bytes::Bytes)>> {
        let unacknowledged = self.inner.node.local_read(|sm| sm.unacknowledged_count());
        if unacknowledged >= self.inner.config.unacknowledged_max {
            return Err(Error::Overloaded(format!(
                "{unacknowledged} decided txns wait for participants to acknowledge (unacknowledged_max); \
                 is a participant down?"
            )));
        }
        self.inner.node.local_read(|sm| {
            request
                .branches
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

    async fn prepare_and_decide(
        &self,
        request: &SubmitRequest,
        targets: Vec<(Target, bytes::Bytes)>,
    ) -> Result<TxnRecord> {
        let txn_id = request.txn_id;
        let started = Instant::now();
        let (votes, abort_reason) = self.prepare_all(request, &targets).await;
        self.inner.phases.prepare.record(started.elapsed());
        let mut decision = if abort_reason.is_none() { Decision::Commit } else { Decision::Abort };
        if failpoint::fired(failpoint::PREPARE_IGNORE_VOTES, || txn_id.to_string()) {
            decision = Decision::Commit; // A broken protocol, for tests of the invariant checker.
        }
        let branches =
            targets.iter().map(|(t, _)| (t.participant.clone(), votes.get(&t.participant).cloned())).collect();
        let cmd = DecideCmd { txn_id, decision, reason: abort_reason.unwrap_or_default(), branches };
        // I3: nothing is sent to participants before the decision is applied.
        let record = self.decide(cmd).await?;
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
        Ok(record)
    }

    /// Sends Prepare to every branch in parallel; stops at the first refusal.
    /// Returns the votes received and, if the txn must abort, why.
    async fn prepare_all(
        &self,
        request: &SubmitRequest,
        targets: &[(Target, bytes::Bytes)],
    ) -> (HashMap<ParticipantId, Vote>, Option<String>) {
        let mut votes = HashMap::new();
        let remaining_ms = request.deadline_unix_ms.saturating_sub(self.now_ms());
        if remaining_ms == 0 {
            self.inner.metrics.aborted_deadline.fetch_add(1, Ordering::Relaxed);
            return (votes, Some("the deadline passed before prepare".into()));
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
        let mut abort_reason = None;
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
        (votes, abort_reason)
    }

    /// Proposes a decision and returns the record the log holds afterwards.
    ///
    /// # Errors
    /// As [`NodeHandle::propose`]; [`Error::Forgotten`] when the log
    /// refused the first decision of a forgotten txn (§7.2),
    /// [`Error::InvalidArgument`] when it refused an id from the future (§7.4).
    async fn decide(&self, mut cmd: DecideCmd) -> Result<TxnRecord> {
        // I6: reasons come from participants and operators; the log keeps them in every snapshot.
        cmd.cap_reasons();
        let proposal = Proposal { command: Command::Decide(cmd), proposed_unix_ms: self.now_ms() };
        let started = Instant::now();
        let applied = self.inner.node.propose(&proposal).await;
        self.inner.phases.decide.record(started.elapsed());
        match applied? {
            Applied::Decided { record, .. } => Ok(record),
            Applied::DecideRefused { txn_id, refusal: DecideRefusal::Forgotten } => Err(forgotten(txn_id)),
            Applied::DecideRefused { txn_id, refusal: DecideRefusal::FromTheFuture } => {
                Err(Error::InvalidArgument(format!(
                    "txn_id: {txn_id} was created more than {TXN_ID_AHEAD_OF_PROPOSER_MAX_MS} ms after the \
                     proposing leader's clock; the log refuses it"
                )))
            }
            other => Err(Error::Corrupt(format!("a Decide entry was applied as {other:?}"))),
        }
    }

    /// Hands a decided record to the current term's phase-2 delivery, if this
    /// node is a ready leader; otherwise the next ready leader re-drives it.
    fn deliver(&self, record: &TxnRecord) {
        if let Some(delivery) = self.inner.delivery.lock().as_ref() {
            delivery.enqueue(record);
        }
    }

    /// Answers a participant's in-doubt question (docs/PROTOCOL.md §6).
    ///
    /// # Errors
    /// [`Error::NotLeader`] when the txn is unknown here and this node is not
    /// the leader; errors of [`NodeHandle::linearizable_read`] and of proposing.
    pub async fn resolve(&self, txn_id: TxnId, asker: Option<&ParticipantId>) -> Result<Decision> {
        check_not_from_the_future(txn_id, &self.inner.config)?;
        let decision = self.resolve_inner(txn_id, asker).await?;
        self.inner.metrics.resolved.fetch_add(1, Ordering::Relaxed);
        Ok(decision)
    }

    async fn resolve_inner(&self, txn_id: TxnId, asker: Option<&ParticipantId>) -> Result<Decision> {
        let (logged, was_forgotten) =
            self.inner.node.linearizable_read(|sm| (sm.txn(&txn_id).cloned(), sm.may_have_forgotten(&txn_id))).await?;
        if let Some(record) = logged {
            return Ok(decision_for(&record, asker));
        }
        // No presumed abort here: the forgotten outcome may have been Commit (I2).
        if was_forgotten && !failpoint::fired(failpoint::FORGOTTEN_UNCHECKED, || txn_id.to_string()) {
            return Err(forgotten(txn_id));
        }
        self.require_leader()?;
        let running = self.inner.inflight.lock().get(&txn_id).map(|i| i.outcome.clone());
        if let Some(outcome) = running {
            // A txn this leader is still preparing is not aborted by a Resolve.
            return wait_outcome(outcome).await.map(|record| decision_for(&record, asker));
        }
        let reason = match asker {
            Some(p) => format!("presumed abort: {p} asked and no decision was logged"),
            None => "presumed abort: no decision was logged".to_owned(),
        };
        let record = self.decide(DecideCmd { txn_id, decision: Decision::Abort, reason, branches: Vec::new() }).await?;
        if record.decision == Decision::Abort && record.branches.is_empty() {
            self.inner.metrics.presumed_aborts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(record.decision)
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
            return self.decide(DecideCmd { txn_id, decision, reason, branches: Vec::new() }).await;
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
        let guard = InflightGuard { inner: self.inner.clone(), txn_id, outcome: Some(outcome) };
        let reason = format!("{OPERATOR_REASON_PREFIX}{reason}");
        let result = self.decide(DecideCmd { txn_id, decision, reason, branches: Vec::new() }).await;
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
        let (record, was_forgotten) =
            self.inner.node.linearizable_read(|sm| (sm.txn(&txn_id).cloned(), sm.may_have_forgotten(&txn_id))).await?;
        if let Some(record) = record {
            return Ok(TxnView::Logged(record));
        }
        if let Some(running) = self.inner.inflight.lock().get(&txn_id) {
            return Ok(TxnView::Preparing { txn_id, participants: running.participants.clone() });
        }
        if was_forgotten {
            return Err(forgotten(txn_id));
        }
        Err(Error::NotFound(format!("no record of txn {txn_id} (never submitted, or not decided yet)")))
    }

    /// A page of txns.
    ///
    /// # Errors
    /// Errors of [`NodeHandle::linearizable_read`].
    pub async fn list(&self, request: &ListRequest) -> Result<Vec<TxnView>> {
        let created_before = self.now_ms().saturating_sub(request.older_than_ms);
        if request.undecided {
            let inflight = self.inner.inflight.lock();
            let mut views: Vec<TxnView> = inflight
                .iter()
                .filter(|(id, _)| id.created_unix_ms() < created_before && request.after.is_none_or(|a| **id > a))
                .map(|(id, i)| TxnView::Preparing { txn_id: *id, participants: i.participants.clone() })
                .collect();
            views.sort_by_key(|v| match v {
                TxnView::Preparing { txn_id, .. } => *txn_id,
                TxnView::Logged(r) => r.txn_id,
            });
            views.truncate(request.limit);
            return Ok(views);
        }
        let filter = if request.unacknowledged { ListFilter::Unacknowledged } else { ListFilter::All };
        self.inner
            .node
            .linearizable_read(|sm| {
                sm.list(filter, created_before, request.after, request.limit)
                    .into_iter()
                    .map(|r| TxnView::Logged(r.clone()))
                    .collect()
            })
            .await
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
    /// (§8). Also proposes retention GC.
    pub async fn run_leader_duties(self) {
        let mut status = self.inner.node.watch_status();
        let mut gc = tokio::time::interval(Duration::from_millis(self.inner.config.gc_interval_ms));
        gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (ready, term) = {
                let s = status.borrow_and_update();
                (s.leader_ready, s.term)
            };
            self.on_leadership(ready, term);
            tokio::select! {
                changed = status.changed() => if changed.is_err() { break },
                _ = gc.tick() => if ready { self.collect_garbage().await },
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
}

impl<P> InflightGuard<P> {
    fn finish(mut self, result: std::result::Result<&TxnRecord, &Error>) {
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
