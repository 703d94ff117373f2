//! [`Joiner`]: how a service's own handlers join an interactive txn as a
//! branch (docs/PROTOCOL.md §12.3).
//!
//! The application begins a txn and calls the service's own API with the
//! txn's context (see [`crate::context`]); the handler hands the branch's work
//! to [`Joiner::join`] (a payload for the resource) or [`Joiner::join_with`]
//! (the service's own code), which:
//!
//! 0. refuses (`INVALID_ARGUMENT`, nothing staged) a txn id created more
//!    than `txn_id_future_skew_ms` ahead of this participant's clock: the
//!    coordinators would never log or settle it;
//! 1. prepares the branch through the same per-txn-locked path as a
//!    coordinator's Prepare (outcome memory, `prepare_inflight_max`, the
//!    deadline check against the context's deadline), except that a txn this
//!    participant already has any record of is refused before anything is
//!    staged ([`Error::BranchExists`]): one branch per participant per txn;
//! 2. on a NO vote returns [`Error::VotedNo`]; nothing is staged or joined;
//! 3. on YES, once the branch is durable (I3), calls the coordinator's
//!    `Join`, retrying at every node (following leader hints) until the
//!    txn's deadline, at most `join_retry_max_ms`;
//! 4. on a refusal (`FAILED_PRECONDITION`, the txn's state in
//!    `twopc-txn-state`) aborts the branch, which leaves a tombstone (I4),
//!    and returns [`Error::JoinRefused`]. A refusal that says the txn
//!    committed (or names no state this library knows to mean abort) may
//!    come after an earlier attempt of this very join was logged and its
//!    answer lost: then the branch is not aborted but handed to the resolver
//!    at once, which asks the coordinator for this branch's decision (§6);
//! 5. when no coordinator answers in time, leaves the branch prepared and in
//!    doubt for the resolver ([`Error::JoinInDoubt`], `UNAVAILABLE`): whether
//!    the Join was logged is the log's to say (§12.3).
//!
//! The context's deadline is not trusted (it is not a credential): the
//! coordinator checks the txn against its log, and the deadline only bounds
//! how long this participant waits. A caller that goes away mid-join (its
//! future dropped) leaves the branch as step 5 does: prepared, in doubt,
//! settled by the resolver once the txn is decided.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::{debug, info, instrument, warn};
use twopc_proto::context::{TXN_STATE_METADATA_KEY, TxnContext};
use twopc_proto::pb::{JoinRequest, JoinResponse};
use twopc_proto::status::is_forgotten;
use twopc_proto::{Decision, TxnId, Vote};

use crate::cluster::{Backoff, Cluster, NoAnswer};
use crate::engine::{Asker, Engine, Origin, Staging};
use crate::error::{Error, Result};
use crate::resource::{Resource, ResourceError};

/// The states of a refused Join (`twopc-txn-state`) that mean the txn is or
/// will be aborted, so the refused branch may abort itself (compared
/// ignoring case). Any other state, including `DECIDED COMMIT`, hands the
/// branch to the resolver instead: an earlier attempt of the same join may
/// have been logged before the decision, and then the branch is named by a
/// Commit.
pub const ABORTING_STATES: [&str; 4] = ["DECIDED ABORT", "TIMED OUT", "UNKNOWN", "FORGOTTEN"];

/// The state named in a [`Error::JoinRefused`] whose refusal carried none.
pub const UNSTATED: &str = "UNSTATED";

/// The shortest time one Join attempt is given, even when the deadline is
/// nearer (or past): one answer is better than none, since a refusal lets
/// the branch abort at once instead of waiting in doubt.
pub const JOIN_ATTEMPT_MIN_MS: u64 = 500;

/// A successful join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The txn's deadline as the coordinator logged it: the branch is
    /// decided by then.
    pub deadline_unix_ms: u64,
}

/// A cheap, cloneable handle by which the service's handlers join txns;
/// get it from [`crate::Participant::joiner`]. It works while the
/// participant serves (the resolver settles what a join leaves in doubt)
/// and shares its outcome memory, locks, limits and metrics.
pub struct Joiner<R> {
    engine: Arc<Engine<R>>,
    cluster: Arc<Cluster>,
}

impl<R> Clone for Joiner<R> {
    fn clone(&self) -> Self {
        Self { engine: Arc::clone(&self.engine), cluster: Arc::clone(&self.cluster) }
    }
}

impl<R: Resource> Joiner<R> {
    pub(crate) fn new(engine: Arc<Engine<R>>, cluster: Arc<Cluster>) -> Self {
        Self { engine, cluster }
    }

    /// Prepares this participant's branch of `ctx`'s txn with the resource's
    /// own [`Resource::prepare`] of `payload`, then joins it to the txn (see
    /// the module docs for every step).
    ///
    /// # Errors
    /// [`Error::BranchExists`] (nothing staged), [`Error::VotedNo`],
    /// [`Error::JoinRefused`], [`Error::JoinFailed`], [`Error::JoinInDoubt`],
    /// and the errors of a Prepare ([`Error::PrepareInflightFull`],
    /// [`Error::OutcomeMemoryFull`], a resource failure, after which the
    /// branch may be staged and the resolver settles it).
    pub async fn join(&self, ctx: &TxnContext, payload: Bytes) -> Result<Joined> {
        self.join_staging(ctx, Staging::Payload(payload)).await
    }

    /// [`Joiner::join`] for a branch the service stages with its own code:
    /// `prepare` is called with the txn id, under the txn's lock, in place of
    /// [`Resource::prepare`] (for example
    /// `PostgresResource::prepare_with`, which runs the service's SQL in the
    /// branch transaction before `PREPARE TRANSACTION`).
    ///
    /// To ensure correctness, `prepare` honours [`Resource::prepare`]'s
    /// contract: YES only once the branch is durable (I3), a NO leaves
    /// nothing staged, and the resource's `commit`, `abort` and `prepared`
    /// know the branch it stages (so decisions, tombstones and recovery work
    /// as for any branch). An error may come after the branch was staged:
    /// the branch then stays in doubt and the resolver settles it.
    ///
    /// # Errors
    /// As [`Joiner::join`].
    pub async fn join_with<F, Fut>(&self, ctx: &TxnContext, prepare: F) -> Result<Joined>
    where
        F: FnOnce(TxnId) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Vote, ResourceError>> + Send + 'static,
    {
        let prepare: crate::engine::ServicePrepare = Box::new(move |txn| Box::pin(prepare(txn)));
        self.join_staging(ctx, Staging::Service(prepare)).await
    }

    #[instrument(skip_all, fields(txn_id = %ctx.txn_id))]
    async fn join_staging(&self, ctx: &TxnContext, staging: Staging) -> Result<Joined> {
        let txn = ctx.txn_id;
        self.refuse_from_the_future(txn)?;
        match self.engine.prepare_as(Asker::Joiner, txn, staging, ctx.deadline_unix_ms).await? {
            Vote::No { reason } => return Err(Error::VotedNo { txn, reason }),
            Vote::Yes => {}
        }
        // I3: the branch is durable; only now may the log name it.
        let until = self.retry_until(ctx.deadline_unix_ms);
        match self.join_at_coordinator(txn, until).await {
            Ok(joined) => {
                self.engine.metrics().joined();
                debug!(deadline_unix_ms = joined.deadline_unix_ms, "branch joined");
                Ok(joined)
            }
            Err(NoAnswer::Final(status)) if status.code() == Code::FailedPrecondition => {
                self.engine.metrics().join_refused();
                Err(self.refused(txn, &status).await)
            }
            Err(NoAnswer::Final(status)) => {
                warn!(code = ?status.code(), message = status.message(), "the coordinator did not join the branch");
                Err(Error::JoinFailed { txn, code: status.code(), message: status.message().to_owned() })
            }
            Err(NoAnswer::Exhausted(last)) => {
                // §12.3: the Join may have been logged; the log decides,
                // and the resolver asks it (the deadline has passed or is
                // near, so it asks at once).
                self.engine.resolve_soon(txn);
                let why = last.map_or_else(|| "no coordinator was tried".to_owned(), |s| describe(&s));
                warn!(%why, "no coordinator answered the join; the branch stays in doubt");
                Err(Error::JoinInDoubt { txn, why })
            }
        }
    }

    /// Refuses, before anything is staged, a txn id created further ahead of
    /// this participant's clock than `txn_id_future_skew_ms`: the
    /// coordinators would refuse its Join and every Resolve of it with
    /// `INVALID_ARGUMENT` until their clocks caught up, and the branch would
    /// hold its resources all that time (§12.3).
    fn refuse_from_the_future(&self, txn: TxnId) -> Result<()> {
        let config = self.engine.config();
        let ahead_ms = txn.created_unix_ms().saturating_sub(config.clock.unix_now_ms());
        if ahead_ms > config.txn_id_future_skew_ms {
            return Err(Error::Invalid {
                field: "twopc-txn",
                why: format!(
                    "txn id {txn} was created {ahead_ms} ms after this participant's clock, more than the {} ms \
                     allowed (txn_id_future_skew_ms); begin the txn at the coordinators, whose ids follow their clocks",
                    config.txn_id_future_skew_ms
                ),
            });
        }
        Ok(())
    }

    /// When to stop retrying a Join: the context's deadline, but never later
    /// than `join_retry_max_ms` from now (the deadline is the caller's claim).
    fn retry_until(&self, deadline_unix_ms: u64) -> Instant {
        let config = self.engine.config();
        let left_ms = deadline_unix_ms.saturating_sub(config.clock.unix_now_ms()).min(config.join_retry_max_ms);
        Instant::now() + Duration::from_millis(left_ms)
    }

    /// Join rounds until one ends in an answer or `until` passes (at least
    /// one round is made).
    async fn join_at_coordinator(&self, txn: TxnId, until: Instant) -> std::result::Result<Joined, NoAnswer> {
        let config = self.engine.config();
        let mut backoff = Backoff::new(config.resolve_backoff_min_ms, config.resolve_backoff_max_ms);
        let request = JoinRequest { txn_id: txn.to_string(), participant: self.cluster.participant.clone() };
        loop {
            // Capped by the deadline, but never so short that no answer can come.
            let attempt = until
                .saturating_duration_since(Instant::now())
                .min(self.cluster.request_timeout())
                .max(Duration::from_millis(JOIN_ATTEMPT_MIN_MS));
            let round = self.cluster.round(is_final, |mut client| {
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(attempt);
                async move { client.join(request).await.map(|r| Joined::from(r.into_inner())) }
            });
            let last = match tokio::time::timeout(attempt, round).await {
                Ok(Ok(joined)) => return Ok(joined),
                Ok(Err(NoAnswer::Final(status))) => return Err(NoAnswer::Final(status)),
                Ok(Err(NoAnswer::Exhausted(last))) => last,
                Err(_) => Some(Status::deadline_exceeded(format!("no answer within {attempt:?}"))),
            };
            let now = Instant::now();
            if now >= until {
                return Err(NoAnswer::Exhausted(last));
            }
            tokio::time::sleep(backoff.next().min(until - now)).await;
        }
    }

    /// Settles a branch whose join was refused, and says how.
    async fn refused(&self, txn: TxnId, status: &Status) -> Error {
        let state = refused_state(status);
        let aborting = ABORTING_STATES.iter().any(|s| s.eq_ignore_ascii_case(&state));
        let aborted = if aborting {
            // I4: nothing stays held for a txn that is or will be aborted;
            // the abort leaves a tombstone, so a late Prepare votes NO.
            match self.engine.decide(txn, Decision::Abort, Origin::JoinRefused).await {
                Ok(_) => true,
                Err(e) => {
                    warn!(error = %e, "could not abort the refused branch; the resolver settles it");
                    self.engine.resolve_soon(txn);
                    false
                }
            }
        } else {
            info!(%state, "join refused in a state that may name this branch; the resolver asks for its decision");
            self.engine.resolve_soon(txn);
            false
        };
        Error::JoinRefused { txn, state, message: status.message().to_owned(), aborted }
    }
}

impl From<JoinResponse> for Joined {
    fn from(response: JoinResponse) -> Self {
        Self { deadline_unix_ms: response.deadline_unix_ms }
    }
}

/// Whether a Join status is the cluster's answer rather than one node's
/// trouble: everything but the codes of an unreachable, overloaded or
/// leaderless node is.
fn is_final(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// The state a refused Join names.
fn refused_state(status: &Status) -> String {
    let named = status.metadata().get(TXN_STATE_METADATA_KEY).and_then(|v| v.to_str().ok()).map(str::trim);
    match named {
        Some(state) if !state.is_empty() => state.to_owned(),
        _ if is_forgotten(status) => "FORGOTTEN".to_owned(),
        _ => UNSTATED.to_owned(),
    }
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    // §12.3: a refusal names its state; a forgotten txn is named so even
    // without the entry; a refusal naming nothing is not taken for an abort.
    #[test]
    fn the_state_of_a_refusal_is_read_from_its_metadata() {
        let mut named = Status::failed_precondition("decided");
        named.metadata_mut().insert(TXN_STATE_METADATA_KEY, "DECIDED ABORT".parse().expect("ascii"));
        assert_eq!(refused_state(&named), "DECIDED ABORT");
        assert_eq!(refused_state(&twopc_proto::status::forgotten("gone")), "FORGOTTEN");
        let bare = refused_state(&Status::failed_precondition("no"));
        assert_eq!(bare, UNSTATED);
        assert!(!ABORTING_STATES.iter().any(|s| s.eq_ignore_ascii_case(&bare)));
        assert!(!ABORTING_STATES.iter().any(|s| s.eq_ignore_ascii_case("DECIDED COMMIT")));
    }

    // A node's trouble is retried elsewhere; the cluster's answer is not.
    #[test]
    fn only_node_trouble_is_retried() {
        assert!(!is_final(&Status::unavailable("no leader")));
        assert!(!is_final(&Status::deadline_exceeded("slow")));
        for code in [Code::FailedPrecondition, Code::NotFound, Code::PermissionDenied, Code::ResourceExhausted] {
            assert!(is_final(&Status::new(code, "x")), "{code:?}");
        }
    }
}
