//! The one path by which Prepares and decisions reach the resource, shared by
//! the gRPC server and the resolver.
//!
//! Every operation on a txn runs under that txn's lock (one of a fixed array
//! of striped locks, so the lock table needs no cleanup) and consults the
//! outcome memory first. So a decision that arrives twice, from the
//! coordinator and from the resolver at once, is applied once (I5), and a
//! repeated Prepare is answered from memory without calling the resource.
//!
//! Each operation runs in its own task: a caller that goes away (a client
//! hanging up) never cancels a resource call half-way.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, error, info, instrument, warn};
use twopc_proto::{Decision, PayloadDigest, TxnId, Vote};

use crate::config::ParticipantConfig;
use crate::error::{Error, Result};
use crate::failpoint::{self, fired};
use crate::metrics::Metrics;
use crate::outcomes::{Outcome, Outcomes};
use crate::resource::{Resource, ResourceError};

/// The number of per-txn locks. Two txns that share a stripe merely wait for
/// each other; the table never grows.
const TXN_LOCK_STRIPES: usize = 1024;

/// The NO reason given when a Prepare arrives after its deadline (docs/PROTOCOL.md §7.1).
pub(crate) const DEADLINE_PASSED: &str = "deadline passed";
/// The NO reason given when an Abort arrived before the Prepare (I4).
pub(crate) const ABORTED_BEFORE_PREPARE: &str = "aborted before prepare (tombstone)";
/// The NO reason given to a one-shot Prepare of a branch staged for a join (§12.3).
pub(crate) const PREPARED_FOR_JOIN: &str = "this participant's branch of the txn was staged for an interactive join; a one-shot branch of the same txn is refused";
/// The NO reason a vote recovery gives for a txn it found no record of, and
/// left a tombstone for (docs/PROTOCOL.md §13.3).
pub(crate) const NEVER_PREPARED: &str = "never prepared here; a tombstone now refuses its prepare";
/// The NO reason a vote recovery gives for a branch whose prepare failed and
/// may or may not have staged it (§3.1 step 5): it never voted YES.
pub(crate) const PREPARE_FAILED: &str = "its prepare failed before voting";
/// The NO reason a vote recovery gives for a branch prepared here with
/// another payload than the staged txn's (docs/PROTOCOL.md §13.3): this
/// participant never voted YES on the staged txn's payload.
pub(crate) const STAGED_PAYLOAD_NOT_HELD: &str =
    "prepared here with another payload than the staged txn's; it never voted YES on that one";
/// The NO reason given for a Prepare repeated after the txn was aborted.
pub(crate) const ALREADY_ABORTED: &str = "txn already aborted";

/// Who delivered a decision, for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A Decide call from the coordinator.
    Coordinator,
    /// The resolver, from a Resolve answer.
    Resolver,
    /// A join the coordinator refused (§12.3): the branch aborts itself.
    JoinRefused,
}

/// The service's own code staging a branch (`Joiner::join_with`), in place
/// of [`Resource::prepare`]; it is given the txn id.
pub(crate) type ServicePrepare = Box<dyn FnOnce(TxnId) -> BoxFuture<'static, Result<Vote, ResourceError>> + Send>;

/// How a branch is staged.
pub(crate) enum Staging {
    /// [`Resource::prepare`] with this payload.
    Payload(Bytes),
    /// The service's own code.
    Service(ServicePrepare),
}

/// Who asks for a Prepare, which decides what a txn already known here means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Asker {
    /// The coordinator's Prepare: a repeat is answered from memory (I5).
    Coordinator,
    /// A service joining the txn (§12.3): one branch per participant per
    /// txn, so any record of the txn refuses the join before anything is
    /// staged.
    Joiner,
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// The resource carried it out now.
    Now,
    /// It had been carried out before; nothing changed.
    Already,
}

/// The shared core: resource, outcome memory, locks, bounds and counters.
pub(crate) struct Engine<R> {
    resource: Arc<R>,
    config: ParticipantConfig,
    outcomes: Mutex<Outcomes>,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    stripe_hasher: std::hash::RandomState,
    prepare_permits: Arc<Semaphore>,
    /// Bounds the decisions of `DecideBatch` calls applied at once (I6).
    batch_decide_permits: Arc<Semaphore>,
    metrics: Metrics,
}

impl<R: Resource> Engine<R> {
    pub(crate) fn new(resource: Arc<R>, config: ParticipantConfig, metrics: Metrics) -> Self {
        let outcomes = Outcomes::new(config.outcome_memory_max, Duration::from_millis(config.tombstone_retention_ms));
        Self {
            resource,
            prepare_permits: Arc::new(Semaphore::new(config.prepare_inflight_max)),
            batch_decide_permits: Arc::new(Semaphore::new(config.decide_batch_concurrency_max)),
            config,
            outcomes: Mutex::new(outcomes),
            stripes: (0..TXN_LOCK_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            stripe_hasher: std::hash::RandomState::new(),
            metrics,
        }
    }

    pub(crate) fn config(&self) -> &ParticipantConfig {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether `txn` still awaits a decision (voted YES, or may have staged).
    pub(crate) fn is_in_doubt(&self, txn: TxnId) -> bool {
        self.outcomes.lock().is_in_doubt(txn)
    }

    /// Up to `limit` branches in doubt at `now`, oldest first, not in `skip`.
    pub(crate) fn in_doubt(&self, now: Instant, limit: usize, skip: impl Fn(TxnId) -> bool) -> Vec<TxnId> {
        self.outcomes.lock().in_doubt(now, limit, skip)
    }

    /// Loads the branches the resource holds prepared (after a restart) into
    /// the outcome memory, due for resolution at once.
    ///
    /// # Errors
    /// The resource could not list them.
    pub(crate) async fn recover(&self) -> Result<usize> {
        let txns = self
            .resource
            .prepared_with_digests()
            .await
            .map_err(|e| Error::Fatal(format!("listing prepared branches at start-up: {e}")))?;
        let now = Instant::now();
        let mut outcomes = self.outcomes.lock();
        for (txn, digest) in &txns {
            // After a restart nobody knows which branch was staged for a join:
            // the coordinator's record settles it (§12.3). The payload's
            // digest, where the resource kept it, still refuses another
            // payload under this id (§3.1).
            outcomes.set_unbounded(*txn, Outcome::Prepared { due: now, for_join: false, digest: *digest }, now);
        }
        if outcomes.len() > self.config.outcome_memory_max {
            warn!(
                prepared = txns.len(),
                outcome_memory_max = self.config.outcome_memory_max,
                "more branches are prepared than the outcome memory holds; new prepares are \
                 refused until they are resolved"
            );
        }
        self.metrics.set_in_doubt(outcomes.prepared_len());
        Ok(txns.len())
    }

    /// Handles a Prepare: answers a repeat from memory, refuses one past its
    /// deadline or after an Abort, otherwise asks the resource to vote.
    ///
    /// # Errors
    /// [`Error::PrepareInflightFull`], [`Error::OutcomeMemoryFull`], or the
    /// resource's failure.
    pub(crate) async fn prepare(self: &Arc<Self>, txn: TxnId, payload: Bytes, deadline_unix_ms: u64) -> Result<Vote> {
        self.prepare_as(Asker::Coordinator, txn, Staging::Payload(payload), deadline_unix_ms).await
    }

    /// [`Engine::prepare`] for `asker`, staging with `staging`.
    ///
    /// # Errors
    /// As [`Engine::prepare`], and [`Error::BranchExists`] for a joiner
    /// when the txn is known here already.
    pub(crate) async fn prepare_as(
        self: &Arc<Self>,
        asker: Asker,
        txn: TxnId,
        staging: Staging,
        deadline_unix_ms: u64,
    ) -> Result<Vote> {
        let permit = Arc::clone(&self.prepare_permits)
            .try_acquire_owned()
            .map_err(|_| Error::PrepareInflightFull { max: self.config.prepare_inflight_max })?;
        self.metrics.prepare();
        let engine = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _permit = permit;
            let _txn_lock = engine.stripe(txn).lock().await;
            engine.prepare_locked(asker, txn, staging, deadline_unix_ms).await
        });
        task.await.map_err(|e| Error::Internal(format!("prepare task for txn {txn}: {e}")))?
    }

    /// Carries out `decision` for `txn` exactly once, however often and from
    /// wherever it arrives.
    ///
    /// # Errors
    /// [`Error::NotPrepared`], [`Error::Conflict`], or the resource's failure.
    pub(crate) async fn decide(self: &Arc<Self>, txn: TxnId, decision: Decision, origin: Origin) -> Result<Applied> {
        self.decide_holding(txn, decision, origin, None).await
    }

    /// [`Engine::decide`] for one decision of a `DecideBatch`: it waits for
    /// one of `decide_batch_concurrency_max` permits first, so a batch of a
    /// thousand decisions starts at most that many tasks at once (I6).
    ///
    /// # Errors
    /// As [`Engine::decide`].
    pub(crate) async fn decide_in_batch(self: &Arc<Self>, txn: TxnId, decision: Decision) -> Result<Applied> {
        let permit = Arc::clone(&self.batch_decide_permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("the batch decision permits were closed".into()))?;
        self.decide_holding(txn, decision, Origin::Coordinator, Some(permit)).await
    }

    /// Runs the decision in its own task, which holds `permit` until done:
    /// a caller that goes away frees no permit early.
    async fn decide_holding(
        self: &Arc<Self>,
        txn: TxnId,
        decision: Decision,
        origin: Origin,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<Applied> {
        let engine = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _permit = permit;
            let _txn_lock = engine.stripe(txn).lock().await;
            engine.decide_locked(txn, decision, origin).await
        });
        task.await.map_err(|e| Error::Internal(format!("decision task for txn {txn}: {e}")))?
    }

    /// The vote this participant gave for `txn`, for a coordinator settling
    /// a staged txn (docs/PROTOCOL.md §13.3). Every NO it answers is final:
    /// a txn it holds no record of gets the resource's durable tombstone
    /// first, and a branch whose Prepare failed before voting is aborted,
    /// so no later Prepare, after a restart included, votes YES.
    ///
    /// # Errors
    /// The resource's failure to record the tombstone or abort: the
    /// coordinator asks again, and decides nothing without an answer.
    pub(crate) async fn recover_vote(self: &Arc<Self>, txn: TxnId, staged: Option<PayloadDigest>) -> Result<Vote> {
        let engine = Arc::clone(self);
        let task = tokio::spawn(async move {
            let _txn_lock = engine.stripe(txn).lock().await;
            engine.recover_vote_locked(txn, staged).await
        });
        task.await.map_err(|e| Error::Internal(format!("vote recovery task for txn {txn}: {e}")))?
    }

    #[instrument(skip_all, fields(txn_id = %txn))]
    async fn recover_vote_locked(&self, txn: TxnId, staged: Option<PayloadDigest>) -> Result<Vote> {
        let known = self.outcomes.lock().get(txn).cloned();
        let vote = match &known {
            // A branch staged for a join is not the one-shot branch the
            // staged txn names (its Prepare was refused, §12.3).
            Some(Outcome::Prepared { for_join: true, .. }) => Vote::no(PREPARED_FOR_JOIN),
            // Another Submit's branch under the same id (§13.3): its YES is
            // not a vote on the staged txn's payload, and that payload can
            // never be prepared here while this branch holds the id.
            Some(Outcome::Prepared { digest: Some(held), .. }) if staged.is_some_and(|s| s != *held) => {
                // A NO voter is sent no Abort (§11): its resolver asks now
                // rather than after the in-doubt timeout.
                self.outcomes.lock().hasten(txn, Instant::now());
                Vote::no(STAGED_PAYLOAD_NOT_HELD)
            }
            Some(
                known @ (Outcome::Prepared { .. }
                | Outcome::Committed
                | Outcome::Refused { .. }
                | Outcome::Aborted
                | Outcome::Tombstone),
            ) => recorded_vote(known).unwrap_or_else(|| Vote::no(PREPARE_FAILED)),
            // No record (or one whose memory was evicted), or a Prepare that
            // failed before voting (seen only then, or if its task died):
            // the resource settles it for good. Its abort leaves a tombstone
            // for a txn never prepared, releases what a failed prepare may
            // have staged, and is refused for a txn it committed.
            None | Some(Outcome::Preparing | Outcome::MaybePrepared { .. }) => {
                if !self.abort_for_good(txn).await? {
                    return Ok(Vote::Yes);
                }
                if known.is_none() {
                    self.remember_settled(txn, Outcome::Tombstone);
                    Vote::no(NEVER_PREPARED)
                } else {
                    self.remember_settled(txn, Outcome::Aborted);
                    Vote::no(PREPARE_FAILED)
                }
            }
        };
        info!(yes = vote.is_yes(), "vote recovered for a staged txn");
        Ok(vote)
    }

    /// Has the resource abort `txn` for good, so a NO given for it stays a
    /// NO (docs/PROTOCOL.md §13.1): a durable tombstone for a txn never
    /// prepared here, a release of what a failed prepare may have staged.
    /// Returns false, remembering the commit, when the resource's own record
    /// says the branch committed (its memory here was evicted): its vote was
    /// YES. Call it under the txn's lock.
    ///
    /// # Errors
    /// The resource's failure to abort.
    async fn abort_for_good(&self, txn: TxnId) -> Result<bool> {
        match self.resource.abort(txn).await.map_err(|e| Error::from_resource(txn, Decision::Abort, e)) {
            Ok(()) => Ok(true),
            Err(Error::Conflict { recorded: Decision::Commit, .. }) => {
                self.remember_settled(txn, Outcome::Committed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Records the outcome of a txn the resource has settled, and the
    /// in-doubt gauge. The resource holds the durable record (its contract),
    /// so with the memory full a repeat is still answered correctly, by the
    /// resource, at the cost of a call.
    fn remember_settled(&self, txn: TxnId, outcome: Outcome) {
        let mut outcomes = self.outcomes.lock();
        if outcomes.set(txn, outcome, Instant::now()).is_err() {
            debug!("outcome memory full; a settled txn is not remembered");
        }
        self.metrics.set_in_doubt(outcomes.prepared_len());
    }

    fn stripe(&self, txn: TxnId) -> &tokio::sync::Mutex<()> {
        let hash = self.stripe_hasher.hash_one(txn);
        let index = usize::try_from(hash % TXN_LOCK_STRIPES as u64).unwrap_or(0);
        &self.stripes[index]
    }

    #[instrument(skip_all, fields(txn_id = %txn))]
    async fn prepare_locked(&self, asker: Asker, txn: TxnId, staging: Staging, deadline_unix_ms: u64) -> Result<Vote> {
        let known = self.outcomes.lock().get(txn).cloned();
        if asker == Asker::Joiner
            && let Some(known) = &known
        {
            // §12.3: a second join of the txn here (a second Debit at one
            // bank) must not be answered as a repeated Prepare: its work
            // would be dropped while the caller is told it is done.
            debug!(state = known.describe(), "join of a txn already known here refused");
            return Err(Error::BranchExists { txn, state: known.describe() });
        }
        if let Some(Outcome::Prepared { for_join: true, .. }) = &known {
            // §12.3: the coordinator never prepares a joined participant's
            // branch (it refuses such a Commit), so this Prepare comes from a
            // Submit or Commit reusing the txn id with a one-shot branch here.
            // Its YES would be the joined work's; and if the join is then
            // refused (the id was never begun), this branch aborts while that
            // Submit could log Commit for it (I1). Voting NO makes it abort.
            info!("one-shot prepare of a branch staged for a join; voting no");
            self.metrics.vote(false);
            return Ok(Vote::no(PREPARED_FOR_JOIN));
        }
        // §3.1: one txn id carries one set of payloads. A repeat with another
        // payload is refused, not voted on: a NO would let its sender abort a
        // txn another Submit's Commit may stand on; a YES would join two
        // Submits' branches in one Commit.
        let digest = match &staging {
            Staging::Payload(payload) => Some(PayloadDigest::of(payload)),
            Staging::Service(_) => None,
        };
        if let Some(Outcome::Prepared { digest: Some(held), .. } | Outcome::MaybePrepared { digest: Some(held), .. }) =
            &known
            && digest.is_some_and(|d| d != *held)
        {
            info!("repeated prepare with another payload refused");
            return Err(Error::PayloadMismatch { txn });
        }
        if let Some(vote) = known.as_ref().and_then(recorded_vote) {
            debug!(yes = vote.is_yes(), "repeated prepare answered from memory");
            return Ok(vote);
        }

        // docs/PROTOCOL.md §7.1: a Prepare after its deadline is refused, so a tombstone
        // need only outlive the deadline.
        if self.config.clock.unix_now_ms() > deadline_unix_ms {
            // A NO must stay a NO (docs/PROTOCOL.md §13.1): a Submit retried
            // with a later deadline must not find this txn preparable after a
            // restart or an eviction. The resource's tombstone keeps it so.
            // A late duplicate of a branch committed here (and evicted from
            // memory since) is answered with the vote the branch gave.
            if !self.abort_for_good(txn).await? {
                return Ok(Vote::Yes);
            }
            let reason = DEADLINE_PASSED.to_owned();
            // A branch that may have been staged never voted YES: the abort
            // above released what it held, and it is settled (§3.3).
            let maybe_prepared = matches!(known, Some(Outcome::MaybePrepared { .. }));
            let outcome = if maybe_prepared { Outcome::Aborted } else { Outcome::Refused { reason: reason.clone() } };
            self.remember_settled(txn, outcome);
            self.metrics.vote(false);
            info!(deadline_unix_ms, "prepare arrived after its deadline; voting no");
            return Ok(Vote::No { reason });
        }

        self.outcomes
            .lock()
            .set(txn, Outcome::Preparing, Instant::now())
            .map_err(|_| Error::OutcomeMemoryFull { max: self.config.outcome_memory_max })?;

        let staged = match staging {
            Staging::Payload(payload) => self.resource.prepare(txn, payload).await,
            Staging::Service(prepare) => prepare(txn).await,
        };
        let vote = match staged {
            Ok(vote) => vote,
            Err(e) => {
                // I7: the failure may have come after the branch was staged
                // (a lost reply to PREPARE TRANSACTION), so it may hold locks.
                // Forgetting it would leave them until a restart; instead it
                // stays in doubt and the resolver settles it (docs/PROTOCOL.md §3.3).
                let now = Instant::now();
                let maybe = Outcome::MaybePrepared { due: self.in_doubt_from(now), digest };
                self.record_prepare_outcome(txn, maybe, now);
                warn!(error = %e, "resource failed to prepare; the branch may be staged and stays in doubt");
                return Err(prepare_error(e));
            }
        };

        if vote.is_yes() && fired(failpoint::PREPARE_AFTER_DURABLE, || self.config.id.to_string()) {
            // Models a crash between the fsync and the vote, so the memory
            // goes with the process (unlike a resource error, kept in doubt).
            self.outcomes.lock().forget(txn);
            return Err(Error::Unavailable(format!("failpoint {}", failpoint::PREPARE_AFTER_DURABLE)));
        }
        // I3: the resource returns YES only once the branch is durable, so the
        // vote may be recorded and sent now.
        let now = Instant::now();
        let outcome = match &vote {
            Vote::Yes => Outcome::Prepared { due: self.in_doubt_from(now), for_join: asker == Asker::Joiner, digest },
            Vote::No { reason } => Outcome::Refused { reason: reason.clone() },
        };
        self.record_prepare_outcome(txn, outcome, now);
        self.metrics.vote(vote.is_yes());
        debug!(yes = vote.is_yes(), "voted");
        Ok(vote)
    }

    /// Makes `txn`, if it still awaits its decision, due for the resolver
    /// now (a join whose outcome the coordinator's answer left unclear).
    pub(crate) fn resolve_soon(&self, txn: TxnId) {
        self.outcomes.lock().hasten(txn, Instant::now());
    }

    /// When a branch staged at `now` and still undecided counts as in doubt.
    fn in_doubt_from(&self, now: Instant) -> Instant {
        now + Duration::from_millis(self.config.in_doubt_timeout_ms)
    }

    /// Records what a Prepare left, in the room its `Preparing` entry
    /// reserved (so it cannot be refused), and the in-doubt gauge.
    fn record_prepare_outcome(&self, txn: TxnId, outcome: Outcome, now: Instant) {
        let mut outcomes = self.outcomes.lock();
        outcomes.set_unbounded(txn, outcome, now);
        self.metrics.set_in_doubt(outcomes.prepared_len());
    }

    #[instrument(skip_all, fields(txn_id = %txn, %decision, ?origin))]
    async fn decide_locked(&self, txn: TxnId, decision: Decision, origin: Origin) -> Result<Applied> {
        let known = self.outcomes.lock().get(txn).cloned();
        match (&known, decision) {
            (Some(Outcome::Committed), Decision::Commit)
            | (Some(Outcome::Aborted | Outcome::Tombstone), Decision::Abort) => {
                debug!("repeated decision; nothing to do");
                return Ok(Applied::Already);
            }
            (Some(Outcome::Committed), Decision::Abort) => {
                return Err(self.conflict(txn, Decision::Commit, decision));
            }
            // A NO vote (`Refused`) is left to the resource, which holds the
            // durable record: the memory may have forgotten a commit and then
            // refused a late duplicate Prepare on its deadline alone, and
            // that refusal must not block the commit's re-drive (I5).
            (Some(Outcome::Aborted | Outcome::Tombstone), Decision::Commit) => {
                return Err(self.conflict(txn, Decision::Abort, decision));
            }
            _ => {}
        }

        let applied = match decision {
            Decision::Commit => self.resource.commit(txn).await,
            Decision::Abort => self.resource.abort(txn).await,
        };
        if let Err(e) = applied {
            let e = Error::from_resource(txn, decision, e);
            match &e {
                Error::Conflict { recorded, .. } => {
                    return Err(self.conflict(txn, *recorded, decision));
                }
                Error::NotPrepared { .. } => debug!("commit for a txn never prepared here"),
                _ => warn!(error = %e, "resource failed to apply the decision; the sender retries"),
            }
            return Err(e);
        }

        let outcome = match (decision, &known) {
            (Decision::Commit, _) => Outcome::Committed,
            (Decision::Abort, None | Some(Outcome::Preparing)) => Outcome::Tombstone,
            (Decision::Abort, _) => Outcome::Aborted,
        };
        self.remember_settled(txn, outcome);
        self.metrics.decision_applied(decision);
        debug!("decision applied");
        Ok(Applied::Now)
    }

    fn conflict(&self, txn: TxnId, recorded: Decision, requested: Decision) -> Error {
        error!(
            %recorded,
            %requested,
            "protocol violation: a decision contradicts the one already recorded; refused"
        );
        Error::Conflict { txn, recorded, requested }
    }
}

/// The answer to a repeated Prepare, if memory settles it.
fn recorded_vote(outcome: &Outcome) -> Option<Vote> {
    match outcome {
        // A failed Prepare may or may not have staged: the resource knows.
        Outcome::Preparing | Outcome::MaybePrepared { .. } => None,
        Outcome::Prepared { .. } | Outcome::Committed => Some(Vote::Yes),
        Outcome::Refused { reason } => Some(Vote::no(reason.clone())),
        Outcome::Aborted => Some(Vote::no(ALREADY_ABORTED)),
        Outcome::Tombstone => Some(Vote::no(ABORTED_BEFORE_PREPARE)),
    }
}

/// A failed `prepare` as the caller sees it. `prepare` has no business
/// returning decision errors; they mean the resource broke its contract.
fn prepare_error(e: ResourceError) -> Error {
    match e {
        ResourceError::Unavailable(why) => Error::Unavailable(why),
        ResourceError::Fatal(why) => Error::Fatal(why),
        other => Error::Fatal(format!("prepare returned {other}, which its contract rules out")),
    }
}
