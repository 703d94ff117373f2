//! Interactive transactions on the leader (docs/PROTOCOL.md §12): Begin,
//! Join, Commit and Rollback, and the Abort of begun txns past their deadline.
//!
//! What a begun txn is, which branches it holds and whether its deadline has
//! passed are decided by the log when each entry is applied (the state
//! machine); the engine checks what it can from applied state first, so a
//! repeat is answered without a log entry, and a refusal it gives itself
//! leaves the branch out of every record (safe whatever the log holds).

use std::sync::atomic::Ordering;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tracing::Instrument as _;
use twopc_proto::{Decision, ParticipantId, TxnContext, TxnId};

use super::{
    CommitRequest, Driver, Engine, InflightGuard, JoinRequest, Joined, RollbackRequest, SubmitRequest, forgotten,
    other_branches, past_horizon, refused_from_the_future, wait_outcome,
};
use crate::command::{Command, DecideCmd};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::participant_client::ParticipantClient;
use crate::state_machine::{
    Applied, BeginRefusal, BegunTxn, JoinRefusal, JoinVerdict, StateMachine, TIMED_OUT_REASON, TxnRecord,
};

/// Begun txns past their deadline that one scan logs the Abort of, at most;
/// the rest wait for the next scan (I6). Their entries are proposed at once,
/// so they share the Ready and the fsync of one turn of the raft loop.
pub(super) const TIMEOUT_SCAN_MAX: usize = 1024;

impl<P: ParticipantClient> Engine<P> {
    /// Begins an interactive txn (docs/PROTOCOL.md §12.1) and returns its
    /// context as the log holds it: a repeat answers the first Begin's deadline.
    ///
    /// # Errors
    /// [`Error::NotLeader`]; [`Error::FailedPrecondition`] when the log has
    /// decided the txn, the id is past the retention window or a Submit is
    /// running it; [`Error::Overloaded`] past `begun_max`; as proposing.
    pub async fn begin(&self, request: super::BeginRequest) -> Result<TxnContext> {
        self.require_leader()?;
        let now = self.now_ms();
        let txn_id = request.txn_id.unwrap_or_else(|| TxnId::created_at(now));
        let (record, begun, forgotten, begun_count) = self.inner.node.local_read(|sm| {
            let begun = sm.begun(&txn_id).map(|b| b.deadline_unix_ms);
            (
                sm.txn(&txn_id).map(|r| (r.decision, r.reason.clone())),
                begun,
                sm.may_have_forgotten(&txn_id),
                sm.begun_count(),
            )
        });
        if let Some(deadline_unix_ms) = begun {
            return Ok(TxnContext { txn_id, deadline_unix_ms });
        }
        if let Some((decision, reason)) = record {
            return Err(decided_before_begin(txn_id, decision, &reason));
        }
        self.check_new_txn_id(txn_id, forgotten)?;
        // The check narrows the race with a Submit; the log closes it, refusing
        // the Submit's decision of a txn begun meanwhile (§5 step 7).
        if self.inner.inflight.lock().contains_key(&txn_id) {
            return Err(Error::FailedPrecondition(format!(
                "txn {txn_id} is being run by a one-shot Submit; use a new txn id for an interactive txn"
            )));
        }
        if begun_count >= self.inner.config.begun_max {
            return Err(Error::Overloaded(format!(
                "{begun_count} interactive txns are begun and undecided (begun_max); commit or roll back some, \
                 or retry shortly"
            )));
        }
        let deadline_unix_ms = now.saturating_add(request.timeout_ms);
        match self.propose(Command::Begin { txn_id, deadline_unix_ms }).await? {
            Applied::Begun { begun, first } => {
                if first {
                    self.inner.metrics.begun.fetch_add(1, Ordering::Relaxed);
                }
                Ok(TxnContext { txn_id, deadline_unix_ms: begun.deadline_unix_ms })
            }
            Applied::BeginRefused { refusal: BeginRefusal::Decided(decision), .. } => {
                let reason = self.inner.node.local_read(|sm| sm.txn(&txn_id).map(|r| r.reason.clone()));
                Err(decided_before_begin(txn_id, decision, &reason.unwrap_or_default()))
            }
            Applied::BeginRefused { refusal: BeginRefusal::Forgotten, .. } => Err(past_horizon(txn_id)),
            Applied::BeginRefused { refusal: BeginRefusal::Staged, .. } => Err(Error::FailedPrecondition(format!(
                "txn {txn_id} is a one-shot txn staged by a Submit (docs/PROTOCOL.md §13); use a new txn id for an \
                 interactive txn"
            ))),
            Applied::BeginRefused { refusal: BeginRefusal::FromTheFuture, .. } => Err(refused_from_the_future(txn_id)),
            other => Err(Error::Corrupt(format!("a Begin entry was applied as {other:?}"))),
        }
    }

    /// Joins a participant's durably prepared branch to a begun txn
    /// (docs/PROTOCOL.md §12.3) and returns the txn's deadline. Answers once
    /// the log holds the branch (or held it already: I5).
    ///
    /// # Errors
    /// [`Error::NotLeader`]; [`Error::NotFound`] for an unregistered
    /// participant; [`Error::TxnState`] when the txn is decided, past its
    /// deadline or unknown; [`Error::Forgotten`]; [`Error::Overloaded`] past
    /// `branches_per_txn_max` joined branches; as proposing.
    pub async fn join(&self, request: JoinRequest) -> Result<u64> {
        let JoinRequest { txn_id, participant } = request;
        self.require_leader()?;
        let now = self.now_ms();
        let local = self.inner.node.local_read(|sm| {
            if sm.participant_addr(&participant).is_none() {
                return Err(Error::NotFound(format!(
                    "participant {participant} is not registered; register it first \
                     (twopc participants register {participant} HOST:PORT)"
                )));
            }
            Ok(match sm.join_verdict(now, txn_id, &participant) {
                // A repeat, answered from applied state (I5).
                JoinVerdict::Named { deadline_unix_ms } => Some(Applied::Joined { deadline_unix_ms, first: false }),
                // The log decides: the Begin may be applied there and not here
                // yet. So for the deadline: an earlier attempt of this very
                // Join may be logged before the deadline and not applied here
                // yet (a new leader, a slow apply), and a Commit after it then
                // names this branch; a refusal from this node's clock would
                // make the participant abort it (I1). The entry's own time
                // decides, after every earlier entry.
                JoinVerdict::Refused(JoinRefusal::Unknown | JoinRefusal::Forgotten | JoinRefusal::PastDeadline) => None,
                JoinVerdict::Refused(refusal) => Some(Applied::JoinRefused { txn_id, refusal }),
                JoinVerdict::Joinable { joined, .. } if joined >= self.inner.config.branches_per_txn_max => {
                    return Err(Error::Overloaded(format!(
                        "txn {txn_id} already holds {joined} joined branches (branches_per_txn_max)"
                    )));
                }
                JoinVerdict::Joinable { .. } => None,
            })
        })?;
        let applied = match local {
            Some(applied) => applied,
            // I3 at the coordinator: the branch is in the log before the participant hears "joined".
            None => self.propose(Command::Join { txn_id, participant: participant.clone() }).await?,
        };
        self.join_outcome(txn_id, &participant, applied)
    }

    fn join_outcome(&self, txn_id: TxnId, participant: &ParticipantId, applied: Applied) -> Result<u64> {
        let metrics = &self.inner.metrics;
        let refusal = match applied {
            Applied::Joined { deadline_unix_ms, first } => {
                if first {
                    metrics.joined.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(deadline_unix_ms);
            }
            Applied::JoinRefused { refusal, .. } => refusal,
            other => return Err(Error::Corrupt(format!("a Join entry was applied as {other:?}"))),
        };
        metrics.join_refused.fetch_add(1, Ordering::Relaxed);
        let abort = format!("{participant} must abort its branch; the application may retry the work in a new txn");
        let message = match refusal {
            JoinRefusal::Decided(decision) => format!("txn {txn_id} is already decided ({decision}): {abort}"),
            JoinRefusal::PastDeadline => format!("txn {txn_id} is past its deadline: {abort}"),
            JoinRefusal::Unknown => {
                format!("txn {txn_id} was never begun (or its Begin failed): {abort}")
            }
            JoinRefusal::Forgotten => return Err(forgotten(txn_id)),
            JoinRefusal::TooManyBranches => {
                return Err(Error::Overloaded(format!(
                    "txn {txn_id} holds the most joined branches the log allows ({})",
                    crate::state_machine::JOINED_BRANCHES_MAX
                )));
            }
        };
        Err(Error::TxnState { state: refusal.state(), message })
    }

    /// Commits a begun txn (docs/PROTOCOL.md §12.4): prepares the one-shot
    /// branches given, as Submit does, under the txn's deadline, then logs
    /// Commit (every joined branch voted YES by joining) or Abort, and answers
    /// from the applied record. Phase 2 reaches joined and one-shot branches.
    ///
    /// # Errors
    /// [`Error::NotLeader`]; [`Error::NotFound`] for a txn never begun or an
    /// unregistered participant; [`Error::Forgotten`];
    /// [`Error::InvalidArgument`] naming a joined participant as a one-shot
    /// branch; [`Error::FailedPrecondition`] for a retry naming other one-shot
    /// branches than the record's; [`Error::Overloaded`]; [`Error::Retryable`]
    /// when leadership changed mid-way (retry with the same txn id).
    pub async fn commit(&self, request: CommitRequest) -> Result<TxnRecord> {
        let txn_id = request.txn_id;
        self.require_leader()?;
        let asked: Vec<ParticipantId> = request.branches.iter().map(|(p, _)| p.clone()).collect();
        let (record, begun, was_forgotten) = self.interactive_state(txn_id).await?;
        if let Some(record) = record {
            return commit_answer(txn_id, record, &asked);
        }
        let Some(begun) = begun else {
            return Err(if was_forgotten { forgotten(txn_id) } else { never_begun(txn_id) });
        };
        if let Some(both) = asked.iter().find(|p| begun.joined.contains(p)) {
            return Err(Error::InvalidArgument(format!(
                "branches: {both} joined txn {txn_id} already; a participant has one branch per txn, so name \
                 only participants that did not join"
            )));
        }
        let targets = self.targets(&request.branches)?;
        let outcome = match self.join_or_register(txn_id, asked.clone(), Driver::Commit)? {
            Joined::Existing(running) => {
                if running.driver == Driver::Submit {
                    return Err(after_a_racing_submit(txn_id, self.wait_running(running.outcome).await, "Commit"));
                }
                if running.driver == Driver::Commit
                    && let Some(err) = other_branches(txn_id, &running.participants, &asked)
                {
                    return Err(err);
                }
                let record = self.wait_running(running.outcome).await?;
                return commit_answer(txn_id, record, &asked);
            }
            Joined::New(outcome) => outcome,
        };
        let waiter = outcome.subscribe();
        let guard = InflightGuard {
            inner: self.inner.clone(),
            txn_id,
            outcome: Some(outcome),
            answer_timer: Some(Instant::now()),
        };
        // Its own task, as a Submit's: a client that goes away must not
        // abandon the txn between prepare and decision.
        let engine = self.clone();
        let submit = SubmitRequest { txn_id, branches: request.branches, deadline_unix_ms: begun.deadline_unix_ms };
        let span =
            tracing::info_span!("commit", txn_id = %txn_id, branches = targets.len(), joined = begun.joined.len());
        tokio::spawn(
            async move {
                let result = engine.prepare_and_commit(&submit, targets).await;
                guard.finish(result.as_ref());
            }
            .instrument(span),
        );
        let record = wait_outcome(waiter).await?;
        commit_answer(txn_id, record, &asked)
    }

    async fn prepare_and_commit(
        &self,
        request: &SubmitRequest,
        targets: Vec<(crate::participant_client::Target, bytes::Bytes)>,
    ) -> Result<TxnRecord> {
        let txn_id = request.txn_id;
        // Decided since the caller looked (a Commit that just finished, the
        // timeout): nothing to prepare.
        if let Some(record) = self.inner.node.local_read(|sm| sm.txn(&txn_id).cloned()) {
            return Ok(record);
        }
        if self.now_ms() >= request.deadline_unix_ms {
            // No Prepare is sent past the deadline (§7.1); the log would
            // apply a Commit as Abort anyway.
            let cmd = DecideCmd::without_branches(txn_id, Decision::Abort, TIMED_OUT_REASON.to_owned());
            let (record, _) = self.decide_first(cmd).await?;
            self.deliver(&record);
            return Ok(record);
        }
        // With no one-shot branch this logs Commit at once: every joined
        // branch voted YES by joining, and the log adds them (§12.4).
        self.prepare_and_decide(request, targets, Command::Decide).await
    }

    /// Rolls back a begun txn (docs/PROTOCOL.md §12.4): logs Abort, which
    /// phase 2 delivers to every joined branch. Idempotent.
    ///
    /// # Errors
    /// [`Error::NotLeader`]; [`Error::NotFound`] for a txn never begun;
    /// [`Error::Forgotten`]; [`Error::FailedPrecondition`] when it is
    /// committed; as proposing.
    pub async fn rollback(&self, request: RollbackRequest) -> Result<TxnRecord> {
        let RollbackRequest { txn_id, reason } = request;
        self.require_leader()?;
        let (record, begun, was_forgotten) = self.interactive_state(txn_id).await?;
        if let Some(record) = record {
            return rollback_answer(txn_id, record);
        }
        if begun.is_none() {
            return Err(if was_forgotten { forgotten(txn_id) } else { never_begun(txn_id) });
        }
        let outcome = match self.join_or_register(txn_id, Vec::new(), Driver::Rollback)? {
            Joined::Existing(running) if running.driver == Driver::Submit => {
                return Err(after_a_racing_submit(txn_id, self.wait_running(running.outcome).await, "Rollback"));
            }
            // A Commit preparing the txn's one-shot branches: its outcome is the answer (§12.4).
            Joined::Existing(running) => return rollback_answer(txn_id, self.wait_running(running.outcome).await?),
            Joined::New(outcome) => outcome,
        };
        let guard = InflightGuard { inner: self.inner.clone(), txn_id, outcome: Some(outcome), answer_timer: None };
        let cmd = DecideCmd::without_branches(txn_id, Decision::Abort, reason);
        let result = self.decide_and_deliver(cmd).await;
        guard.finish(result.as_ref().map(|(record, _)| record));
        rollback_answer(txn_id, result?.0)
    }

    /// A txn's record, its begun state, and whether the log may have
    /// forgotten it, for Commit and Rollback. Read locally, and again through
    /// the log before the local state's "neither a record nor a Begin" is
    /// answered `NOT_FOUND`: the local state may lag a Begin another leader
    /// answered (this node cut off and still believing it leads; a new
    /// leader not yet ready, §4.4). A simulation seed met it as a Rollback of
    /// a begun txn answered "never begun" (failpoints.rs
    /// `commit_and_rollback_confirm_never_begun_through_the_log`).
    async fn interactive_state(&self, txn_id: TxnId) -> Result<(Option<TxnRecord>, Option<BegunTxn>, bool)> {
        let read =
            |sm: &StateMachine| (sm.txn(&txn_id).cloned(), sm.begun(&txn_id).cloned(), sm.may_have_forgotten(&txn_id));
        let lags = failpoint::fired(failpoint::INTERACTIVE_LOCAL_STATE_LAGS, || txn_id.to_string());
        let local = if lags { (None, None, false) } else { self.inner.node.local_read(read) };
        if local.0.is_some() || local.1.is_some() {
            return Ok(local);
        }
        self.inner.node.linearizable_read(read).await
    }

    /// Starts a scan for begun txns past their deadline, unless one is running.
    pub(super) fn start_timeout_scan(&self) {
        if self.inner.timeout_scan_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            engine.time_out_expired().await;
            engine.inner.timeout_scan_running.store(false, Ordering::Release);
        });
    }

    /// Logs Abort ("timed out") for the begun txns past their deadline by
    /// this leader's clock, up to [`TIMEOUT_SCAN_MAX`], all proposed at once,
    /// and hands each to phase 2 (docs/PROTOCOL.md §12.5).
    async fn time_out_expired(&self) {
        let now = self.now_ms();
        let expired = self.inner.node.local_read(|sm| sm.expired_begun(now, TIMEOUT_SCAN_MAX));
        let mut decisions = FuturesUnordered::new();
        for txn_id in expired {
            // A txn with a driver (a Commit, a Rollback, an earlier scan's
            // Abort) is left to it: its decision comes through the log too.
            let Ok(Joined::New(outcome)) = self.join_or_register(txn_id, Vec::new(), Driver::Timeout) else {
                continue;
            };
            let guard = InflightGuard { inner: self.inner.clone(), txn_id, outcome: Some(outcome), answer_timer: None };
            let cmd = DecideCmd::without_branches(txn_id, Decision::Abort, TIMED_OUT_REASON.to_owned());
            decisions.push(async move {
                let result = self.decide_first(cmd).await;
                guard.finish(result.as_ref().map(|(record, _)| record));
                (txn_id, result)
            });
        }
        while let Some((txn_id, result)) = decisions.next().await {
            match result {
                Ok((record, _)) => self.deliver(&record),
                Err(err) => tracing::debug!(%txn_id, error = %err, "timeout not logged; the next scan retries"),
            }
        }
    }
}

/// A Commit of a txn the log holds no Begin for.
fn never_begun(txn_id: TxnId) -> Error {
    Error::NotFound(format!(
        "txn {txn_id} was never begun: Commit and Rollback finish a txn started with Begin (one-shot txns use \
         Submit)"
    ))
}

/// What a Commit or Rollback of a begun txn is answered when it found a
/// one-shot Submit of the id running on this leader, one whose check passed
/// before the Begin was applied (§5 step 7), given how that Submit ended
/// (the log refuses its decision of the begun txn): "retry", as the txn is
/// still its client's to decide and the next try finds the leader free.
fn after_a_racing_submit(txn_id: TxnId, submit: Result<TxnRecord>, call: &str) -> Error {
    let ended = match submit {
        Ok(record) => format!("with {}", record.decision),
        Err(_) => "refused".to_owned(),
    };
    Error::Retryable(format!(
        "a one-shot Submit of txn {txn_id} was running on this leader (it ended {ended}); retry the {call} with the \
         same txn id"
    ))
}

/// A Begin for a txn the log has already decided.
fn decided_before_begin(txn_id: TxnId, decision: Decision, reason: &str) -> Error {
    let why = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
    Error::FailedPrecondition(format!(
        "txn {txn_id} is already decided: {decision}{why}; begin a new txn with a new txn id"
    ))
}

/// A Commit's answer from the applied record (I2), or why it is not this Commit's.
fn commit_answer(txn_id: TxnId, record: TxnRecord, asked: &[ParticipantId]) -> Result<TxnRecord> {
    if record.deadline_unix_ms.is_none() {
        return Err(never_begun(txn_id));
    }
    let one_shot: Vec<ParticipantId> =
        record.branches.iter().filter(|b| !b.joined).map(|b| b.participant.clone()).collect();
    // An Abort logged before any one-shot branch was prepared (a Rollback, the
    // timeout) answers a retry whatever branches it names: none committed.
    let any_branches_ok = record.decision == Decision::Abort && one_shot.is_empty();
    if !any_branches_ok && let Some(err) = other_branches(txn_id, &one_shot, asked) {
        return Err(err);
    }
    Ok(record)
}

/// A Rollback's answer from the applied record.
fn rollback_answer(txn_id: TxnId, record: TxnRecord) -> Result<TxnRecord> {
    if record.deadline_unix_ms.is_none() {
        return Err(never_begun(txn_id));
    }
    if record.decision == Decision::Commit {
        return Err(Error::FailedPrecondition(format!(
            "txn {txn_id} is committed; a committed txn cannot be rolled back"
        )));
    }
    Ok(record)
}
