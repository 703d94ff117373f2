//! Parallel commit (docs/PROTOCOL.md §13): a one-shot txn pays one durable
//! round. The leader proposes a Staged entry while the Prepares are out; the
//! txn is committed once that entry is applied and every participant has
//! durably voted YES, and its Decide entry follows off the critical path,
//! logged with others in one Decisions entry. Both entries gather many txns
//! under load ([`EntryBatcher`]).
//!
//! A staged txn with no decision and no driver (its leader died, or stopped
//! between answering and logging) is settled by status recovery: ask every
//! participant of the Staged entry for its vote, which leaves a tombstone
//! where there is none, and log Commit if all are YES, Abort otherwise.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use twopc_proto::{Decision, ParticipantId, TxnId, Vote};

use super::{
    Driver, Engine, InflightGuard, Joined, begun_during_submit, decided, forgotten, other_branches,
    refused_from_the_future,
};
use crate::command::{Command, DecideCmd, Proposal, StagedCmd};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::node::NodeHandle;
use crate::participant_client::{ParticipantClient, Target};
use crate::state_machine::{Applied, StagedRefusal, StagedTxn, TxnRecord};

use super::request::SubmitRequest;

impl<P: ParticipantClient> Engine<P> {
    /// Runs a one-shot txn under parallel commit and returns its outcome,
    /// telling `guard`'s waiters as soon as it is known: a Commit before its
    /// Decide entry is logged (§13.2).
    pub(super) async fn prepare_and_commit_parallel(
        &self,
        request: &SubmitRequest,
        targets: Vec<(Target, bytes::Bytes)>,
        guard: &mut InflightGuard<P>,
    ) -> Result<TxnRecord> {
        let txn_id = request.txn_id;
        let participants: Vec<ParticipantId> = targets.iter().map(|(t, _)| t.participant.clone()).collect();
        let payload_digests = super::payload_digests(&targets);
        let staged = StagedCmd {
            txn_id,
            participants: participants.clone(),
            payload_digests: payload_digests.clone(),
            deadline_unix_ms: request.deadline_unix_ms,
        };
        // Proposed at once, in a task of its own: the Staged entry's durable
        // round runs while the participants' do.
        let engine = self.clone();
        let staging = tokio::spawn(async move {
            let started = Instant::now();
            let applied = engine.inner.staging.propose(&engine.inner.node, staged).await;
            engine.inner.phases.staged.record(started.elapsed());
            applied
        });
        let started = Instant::now();
        let (votes, abort_reason, met_other_submit) = self.prepare_all(request, &targets).await;
        self.inner.phases.prepare.record(started.elapsed());
        let branches: Vec<(ParticipantId, Option<Vote>)> =
            participants.iter().map(|p| (p.clone(), votes.get(p).cloned())).collect();
        // A broken protocol, for tests of the invariant checker.
        let abort_reason =
            abort_reason.filter(|_| !failpoint::fired(failpoint::PREPARE_IGNORE_VOTES, || txn_id.to_string()));
        let staged =
            async { staging.await.unwrap_or_else(|e| Err(Error::Retryable(format!("the Staged entry's task: {e}")))) };
        if let Some(reason) = abort_reason {
            let abort = DecideCmd { txn_id, decision: Decision::Abort, reason, branches, payload_digests };
            // §13.1: the owner of the txn (whose Staged entry staged it)
            // aborts it on any missing vote; anyone else needs a NO, or
            // status recovery decides. Without a Staged entry, as §5: one
            // applied after this Abort is refused as decided; and, a
            // one-shot entry, it never aborts a txn begun meanwhile (§5 step 7).
            let command = match staged.await {
                Ok(Applied::Staged { first: true, staged }) => {
                    Command::AbortStaged { staged_log_index: staged.staged_log_index, decide: abort }
                }
                _ => Command::DecideOneShot(abort),
            };
            let aborted = self.decide_entry(command).await.map(|(record, _)| record);
            let record = self.or_recover(txn_id, aborted).await?;
            self.deliver(&record);
            // A participant holds another Submit's branch: a Commit in the
            // log is that Submit's, never this one's payloads (§3.1).
            if met_other_submit && record.decision == Decision::Commit {
                return Err(super::other_submit(txn_id));
            }
            return Ok(record);
        }
        let commit = DecideCmd { txn_id, decision: Decision::Commit, reason: String::new(), branches, payload_digests };
        let implicit = implicit_commit(&commit, self.now_ms());
        if failpoint::fired(failpoint::PARALLEL_ANSWER_BEFORE_STAGED, || txn_id.to_string()) {
            // A broken protocol, for the checker's bite: Commit told before
            // the Staged entry is known applied.
            guard.tell(Ok(&implicit));
        }
        match staged.await {
            // The owner: its entry staged the txn (§13.1).
            Ok(Applied::Staged { first: true, .. }) => {}
            // Staged by another Submit of this id (a client's retry on
            // another leader): only the owner answers before the log does.
            Ok(Applied::Staged { first: false, .. }) => return self.commit_sequentially(commit).await,
            Ok(Applied::StagedRefused { refusal, .. }) => {
                return self.staged_refused(commit, &participants, refusal).await;
            }
            Ok(other) => return Err(Error::Corrupt(format!("a Staged entry was applied as {other:?}"))),
            // Not known applied: log the decision as §5 does, which is safe
            // whatever became of the Staged entry (the first decision wins).
            Err(err) => {
                tracing::debug!(%txn_id, error = %err, "Staged entry not confirmed; logging the decision instead");
                return self.commit_sequentially(commit).await;
            }
        }
        // §13.2: committed. Every decision applied after the Staged entry
        // must be one the votes make (§13.1), and every vote is a durable YES
        // that no participant turns into a NO: Commit is the only one left.
        if failpoint::fired(failpoint::PARALLEL_AFTER_STAGED, || txn_id.to_string()) {
            return Err(Error::Retryable(format!(
                "failpoint {}: stopped after staging",
                failpoint::PARALLEL_AFTER_STAGED
            )));
        }
        self.inner.metrics.committed.fetch_add(1, Ordering::Relaxed);
        self.inner.metrics.parallel_commits.fetch_add(1, Ordering::Relaxed);
        guard.tell(Ok(&implicit));
        if failpoint::fired(failpoint::PARALLEL_AFTER_ANSWER, || txn_id.to_string()) {
            // The staged txn is left for status recovery, as if this leader died here.
            return Ok(implicit);
        }
        // Off the critical path: phase 2 waits for the explicit record, so
        // no participant forgets its vote before the log holds the decision.
        let started = Instant::now();
        let record = log_decision(&self.inner.decisions, &self.inner.node, commit).await?;
        self.inner.phases.decide.record(started.elapsed());
        self.deliver(&record);
        Ok(record)
    }

    /// The answer when the log refused the txn's Staged entry.
    async fn staged_refused(
        &self,
        commit: DecideCmd,
        participants: &[ParticipantId],
        refusal: StagedRefusal,
    ) -> Result<TxnRecord> {
        let txn_id = commit.txn_id;
        match refusal {
            // Decided first (a presumed abort, an operator): the log's record
            // answers, and a Commit proposed now changes nothing.
            StagedRefusal::Decided(_) => self.commit_sequentially(commit).await,
            // Never log a decision here: it could abort the staged txn another
            // Submit of this id committed; this txn's branches are answered
            // Abort by Resolve, as the record will not name them (§6).
            StagedRefusal::OtherBranches => {
                let known = self.inner.node.local_read(|sm| sm.staged(&txn_id).map(|s| s.participants.clone()));
                Err(other_branches(txn_id, &known.unwrap_or_default(), participants).unwrap_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "txn {txn_id} is staged with other payloads; a txn id carries one set of payloads, \
                         so submit these under a new txn id"
                    ))
                }))
            }
            StagedRefusal::Begun => Err(begun_during_submit(txn_id)),
            StagedRefusal::Forgotten => Err(forgotten(txn_id)),
            StagedRefusal::FromTheFuture => Err(refused_from_the_future(txn_id)),
        }
    }

    /// Logs `commit` as §5 does, and answers with the record. A one-shot
    /// entry: were the Staged entry refused unseen for a txn begun meanwhile,
    /// a plain Decide would commit that txn without its client (§5 step 7).
    async fn commit_sequentially(&self, commit: DecideCmd) -> Result<TxnRecord> {
        let (record, _) = self.decide_entry(Command::DecideOneShot(commit)).await?;
        if record.decision == Decision::Commit {
            self.inner.metrics.committed.fetch_add(1, Ordering::Relaxed);
        }
        self.deliver(&record);
        Ok(record)
    }

    /// Settles a staged txn that has no decision (docs/PROTOCOL.md §13.3), or
    /// waits for the driver it has on this leader.
    ///
    /// # Errors
    /// [`Error::NotLeader`]; [`Error::Retryable`] while a participant's vote
    /// cannot be had (nothing is decided without every vote but a NO).
    pub(super) async fn recover_staged(&self, staged: &StagedTxn) -> Result<TxnRecord> {
        self.require_leader()?;
        let txn_id = staged.txn_id;
        let outcome = match self.join_or_register(txn_id, staged.participants.clone(), Driver::Recovery)? {
            Joined::Existing(running) => return self.wait_running(running.outcome).await,
            Joined::New(outcome) => outcome,
        };
        let guard = InflightGuard { inner: self.inner.clone(), txn_id, outcome: Some(outcome), answer_timer: None };
        let result = self.recover_registered(txn_id).await;
        guard.finish(result.as_ref());
        result
    }

    pub(super) async fn recover_registered(&self, txn_id: TxnId) -> Result<TxnRecord> {
        // Read again as the txn's driver: it may have been decided meanwhile.
        let (record, staged) =
            self.inner.node.linearizable_read(|sm| (sm.txn(&txn_id).cloned(), sm.staged(&txn_id).cloned())).await?;
        if let Some(record) = record {
            return Ok(record);
        }
        let Some(staged) = staged else {
            return Err(Error::Retryable(format!("txn {txn_id} is neither staged nor decided here; ask again")));
        };
        let timeout = Duration::from_millis(self.inner.config.prepare_timeout_ms);
        let digests = staged.payload_digests.iter().copied().map(Some).chain(std::iter::repeat(None));
        let mut asks: FuturesUnordered<_> = staged
            .participants
            .iter()
            .zip(digests)
            .map(|(participant, digest)| {
                let client = self.inner.client.clone();
                let addr = self.inner.node.local_read(|sm| sm.participant_addr(participant).map(str::to_owned));
                let participant = participant.clone();
                async move {
                    let Some(addr) = addr else {
                        let why =
                            format!("{participant} is not registered; register it again so its vote can be recovered");
                        return (participant, Err(why));
                    };
                    let target = Target { participant: participant.clone(), addr };
                    let vote = client.recover_vote(&target, txn_id, digest, timeout).await.map_err(|e| e.to_string());
                    (participant, vote)
                }
            })
            .collect();
        let mut votes: Vec<(ParticipantId, Option<Vote>)> = Vec::with_capacity(staged.participants.len());
        let (mut no, mut unanswered) = (None, None);
        while let Some((participant, answer)) = asks.next().await {
            match answer {
                Ok(Vote::Yes) => votes.push((participant, Some(Vote::Yes))),
                Ok(Vote::No { reason }) => {
                    no.get_or_insert_with(|| format!("status recovery: {participant} did not vote YES: {reason}"));
                    votes.push((participant, Some(Vote::No { reason })));
                }
                Err(why) => {
                    unanswered.get_or_insert(why);
                    votes.push((participant, None));
                }
            }
        }
        if failpoint::fired(failpoint::RECOVERY_BEFORE_DECIDE, || txn_id.to_string()) {
            return Err(Error::Retryable(format!("failpoint {}: recovery stopped", failpoint::RECOVERY_BEFORE_DECIDE)));
        }
        let (decision, reason) = match (no, unanswered) {
            (Some(reason), _) => (Decision::Abort, reason),
            // A vote not had may be a YES the old leader answered Commit on.
            (None, Some(why)) => {
                return Err(Error::Retryable(format!(
                    "status recovery of staged txn {txn_id} needs every participant's vote: {why}; retrying"
                )));
            }
            (None, None) => (Decision::Commit, String::new()),
        };
        let counter = match decision {
            Decision::Commit => &self.inner.metrics.recovered_commits,
            Decision::Abort => &self.inner.metrics.recovered_aborts,
        };
        // The staged entry's digests stay in the record (decide_staged).
        let cmd = DecideCmd { txn_id, decision, reason, branches: votes, payload_digests: Vec::new() };
        let (record, first) = self.decide_and_deliver(cmd).await?;
        if first {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!(%txn_id, decision = %record.decision, "staged txn settled by status recovery");
        Ok(record)
    }

    /// Starts status recovery of the staged txns with no driver here, unless
    /// a scan is running (docs/PROTOCOL.md §13.3).
    pub(super) fn start_staged_scan(&self) {
        if self.inner.staged_scan_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let max = engine.inner.config.staged_recovery_max;
            let after = *engine.inner.staged_scan_cursor.lock();
            let orphans = {
                let inflight = engine.inner.inflight.lock();
                engine.inner.node.local_read(|sm| sm.staged_txns(max, after, |id| inflight.contains_key(id)))
            };
            *engine.inner.staged_scan_cursor.lock() = orphans.last().map(|s| s.txn_id);
            let mut recoveries: FuturesUnordered<_> =
                orphans.iter().map(|staged| engine.recover_staged(staged)).collect();
            while let Some(result) = recoveries.next().await {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "staged txn not settled; the next scan retries");
                }
            }
            engine.inner.staged_scan_running.store(false, Ordering::Release);
        });
    }
}

/// The record a parallel commit answers with before its Decide entry is
/// logged: what that entry will record (its log index not known yet: 0).
fn implicit_commit(commit: &DecideCmd, now_unix_ms: u64) -> TxnRecord {
    crate::state_machine::one_shot_record(commit, 0, now_unix_ms)
}

/// Gathers many txns' commands into one log entry (docs/PROTOCOL.md §13.2):
/// one entry is proposed at a time, and what arrives meanwhile goes in the
/// next, up to `batch_max`, the way acknowledgements are. At one client each
/// entry carries one txn and, without a linger, waits for nothing; under load
/// the log grows by an entry per batch, not per txn. Used for Staged entries
/// (no linger: they are on the critical path) and for the explicit decisions
/// (Decisions entries) of parallel commits, which linger
/// (`decision_linger_ms`) so that at low load several txns share one.
pub(super) struct EntryBatcher<I> {
    batch_max: usize,
    clock: twopc_proto::Clock,
    /// How long a caller that starts an entry waits for others first.
    linger: Duration,
    /// The entry for a batch of items.
    entry: fn(Vec<I>) -> Command,
    state: Mutex<BatcherState<I>>,
}

struct BatcherState<I> {
    waiting: Vec<(I, oneshot::Sender<Result<Applied>>)>,
    proposing: bool,
}

impl<I: Send + 'static> EntryBatcher<I> {
    pub(super) fn new(
        batch_max: usize,
        clock: twopc_proto::Clock,
        entry: fn(Vec<I>) -> Command,
        linger: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            batch_max,
            clock,
            linger,
            entry,
            state: Mutex::new(BatcherState { waiting: Vec::new(), proposing: false }),
        })
    }

    /// Logs `item` in the next entry and returns what it was applied as.
    /// The caller that finds no entry in flight proposes one itself, saving
    /// a task hop at one client; what arrives meanwhile is proposed by a task
    /// of its own. Callers are txn drivers, tasks nobody cancels.
    async fn propose(self: &Arc<Self>, node: &NodeHandle, item: I) -> Result<Applied> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = self.state.lock();
            state.waiting.push((item, reply));
            !std::mem::replace(&mut state.proposing, true)
        };
        if start && !self.linger.is_zero() {
            tokio::time::sleep(self.linger).await;
        }
        if start && self.propose_batch(node).await {
            tokio::spawn(Arc::clone(self).propose_until_drained(node.clone()));
        }
        answer.await.unwrap_or_else(|_| Err(Error::Retryable("the batched entry was dropped; outcome unknown".into())))
    }

    async fn propose_until_drained(self: Arc<Self>, node: NodeHandle) {
        while self.propose_batch(&node).await {}
    }

    /// Proposes the waiting items (up to `batch_max`) as one entry and
    /// answers each. Returns whether more wait; when none do, the next
    /// caller proposes.
    async fn propose_batch(&self, node: &NodeHandle) -> bool {
        let batch: Vec<(I, oneshot::Sender<Result<Applied>>)> = {
            let mut state = self.state.lock();
            if state.waiting.is_empty() {
                state.proposing = false;
                return false;
            }
            let take = state.waiting.len().min(self.batch_max);
            state.waiting.drain(..take).collect()
        };
        let (items, replies): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
        let proposal = Proposal { command: (self.entry)(items), proposed_unix_ms: self.clock.unix_now_ms() };
        match node.propose(&proposal).await {
            Ok(Applied::Many(applied)) if applied.len() == replies.len() => {
                for (applied, reply) in applied.into_iter().zip(replies) {
                    let _ = reply.send(Ok(applied));
                }
            }
            Ok(other) => {
                for reply in replies {
                    let _ = reply.send(Err(Error::Corrupt(format!("a batched entry was applied as {other:?}"))));
                }
            }
            Err(err) => {
                let message = format!("the entry was not logged: {err}; outcome unknown");
                for reply in replies {
                    let _ = reply.send(Err(Error::Retryable(message.clone())));
                }
            }
        }
        let mut state = self.state.lock();
        state.proposing = !state.waiting.is_empty();
        state.proposing
    }
}

/// Logs `cmd` through the decisions batcher and returns the txn's record.
async fn log_decision(
    batcher: &Arc<EntryBatcher<DecideCmd>>,
    node: &NodeHandle,
    mut cmd: DecideCmd,
) -> Result<TxnRecord> {
    cmd.cap_reasons();
    decided(batcher.propose(node, cmd).await?).map(|(record, _)| record)
}
