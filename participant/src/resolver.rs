//! The in-doubt resolver: asks the coordinator cluster for the decision of
//! every branch that voted YES and heard nothing for `in_doubt_timeout_ms`,
//! and of every branch found prepared at start-up (docs/PROTOCOL.md
//! §3.3, invariant I7).
//!
//! It never decides on its own and never gives up: it asks any configured
//! node, follows leader hints (even to addresses not configured), moves to the
//! next node when one is unreachable (see [`crate::cluster`]), and after a
//! round without an answer waits a capped, jittered, exponentially growing
//! pause. A txn that is begun and not yet decided (an interactive txn before
//! its deadline, §12.5) is answered `undecided`: the resolver asks again after
//! the `retry_after_ms` it is given (at least [`UNDECIDED_RETRY_MIN_MS`], at
//! most `resolve_backoff_max_ms`), and that answer is not a failed round. The
//! decision it gets goes through the same per-txn-locked path as the
//! coordinator's Decide, so it is applied exactly once even when both arrive
//! together.
//!
//! Bounded (I6): at most `resolve_concurrency_max` txns are resolved at once;
//! the waiting ones are simply the oldest prepared entries of the outcome
//! memory, so there is no separate queue to overflow.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};
use twopc_proto::pb::{ResolveRequest, ResolveResponse};
use twopc_proto::status::is_forgotten;
use twopc_proto::{Decision, TxnId};

use crate::cluster::{Backoff, Cluster, NoAnswer};
use crate::engine::{Engine, Origin};
use crate::failpoint::{self, fired};
use crate::resource::Resource;

/// The shortest pause before asking again about an undecided txn, whatever
/// `retry_after_ms` the coordinator gives, so a coordinator answering 0
/// cannot make the resolver spin.
pub const UNDECIDED_RETRY_MIN_MS: u64 = 10;

/// Runs until dropped: finds in-doubt branches and resolves them.
pub(crate) async fn run<R: Resource>(engine: Arc<Engine<R>>, cluster: Arc<Cluster>) {
    let concurrency_max = engine.config().resolve_concurrency_max;
    let mut tick = tokio::time::interval(engine.config().in_doubt_scan_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = JoinSet::new();
    let mut active: HashMap<tokio::task::Id, TxnId> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(done) = tasks.join_next_with_id() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        warn!(error = %e, "a resolve task died; its txn is picked up again");
                        e.id()
                    }
                };
                active.remove(&id);
            }
        }
        let free = concurrency_max.saturating_sub(active.len());
        if free == 0 {
            continue;
        }
        let busy: HashSet<TxnId> = active.values().copied().collect();
        for txn in engine.in_doubt(Instant::now(), free, |txn| busy.contains(&txn)) {
            let handle = tasks.spawn(resolve(Arc::clone(&engine), Arc::clone(&cluster), txn));
            active.insert(handle.id(), txn);
        }
    }
}

/// Settles one in-doubt txn; returns once it is no longer prepared here.
#[instrument(skip_all, fields(txn_id = %txn))]
async fn resolve<R: Resource>(engine: Arc<Engine<R>>, cluster: Arc<Cluster>, txn: TxnId) {
    let config = engine.config();
    let mut backoff = Backoff::new(config.resolve_backoff_min_ms, config.resolve_backoff_max_ms);
    info!("branch in doubt; asking the coordinator");
    // Checked every round: a Decide from the coordinator may settle it first.
    while engine.is_in_doubt(txn) {
        if fired(failpoint::RESOLVE_RELEASE_ON_TIMER, || config.id.to_string()) {
            warn!("failpoint: releasing an in-doubt branch on a timer (a broken protocol, for tests)");
            let _ = engine.decide(txn, Decision::Abort, Origin::Resolver).await;
            return;
        }
        match ask(&cluster, txn).await {
            Some(Answer::Decided(decision)) => match engine.decide(txn, decision, Origin::Resolver).await {
                Ok(_) => {
                    engine.metrics().resolved();
                    info!(%decision, "in-doubt branch resolved");
                    return;
                }
                Err(e) => warn!(error = %e, "could not apply the resolved decision; retrying"),
            },
            Some(Answer::Undecided { retry_after_ms }) => {
                // §12.5: the txn is begun and its deadline has not passed;
                // nothing may be presumed. The cluster answered, so this is
                // no failed round: ask again when told, not after a backoff.
                backoff.reset();
                let pause = Duration::from_millis(retry_after_ms.max(UNDECIDED_RETRY_MIN_MS)).min(backoff.cap());
                debug!(retry_after_ms, "the txn is begun and undecided; asking again later");
                tokio::time::sleep(pause).await;
                continue;
            }
            None => {}
        }
        tokio::time::sleep(backoff.next()).await;
    }
    debug!("settled by a decision from the coordinator");
}

/// What the cluster said about a txn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Its decision for this branch.
    Decided(Decision),
    /// Begun and not decided yet (§12.5): ask again after `retry_after_ms`.
    Undecided { retry_after_ms: u64 },
}

impl Answer {
    fn from_pb(response: &ResolveResponse) -> Result<Self, tonic::Status> {
        if response.undecided {
            return Ok(Self::Undecided { retry_after_ms: response.retry_after_ms });
        }
        // Never decide on our own: an answer without a decision is no answer.
        Decision::try_from(response.decision)
            .map(Self::Decided)
            .map_err(|e| tonic::Status::internal(format!("the coordinator answered: {e}")))
    }
}

/// One round of Resolve calls; None when no node answered.
async fn ask(cluster: &Cluster, txn: TxnId) -> Option<Answer> {
    let request = ResolveRequest { txn_id: txn.to_string(), participant: cluster.participant.clone() };
    let timeout = cluster.request_timeout();
    let answered = cluster
        .round(is_forgotten, |mut client| {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(timeout);
            async move { Answer::from_pb(&client.resolve(request).await?.into_inner()) }
        })
        .await;
    match answered {
        Ok(answer) => Some(answer),
        Err(NoAnswer::Final(status)) => {
            // The coordinator forgot the txn after retention. Retention never
            // forgets a Commit that names no branch, and a branch named in a
            // kept decision acknowledged it before it could be forgotten, so a
            // branch still prepared here belongs to an aborted txn
            // (docs/PROTOCOL.md §7.2): abort it rather than ask for ever (I7).
            warn!(message = status.message(), "the coordinator forgot this txn after retention; aborting the branch");
            Some(Answer::Decided(Decision::Abort))
        }
        Err(NoAnswer::Exhausted(last)) => {
            let last = last.map(|s| format!("{:?}: {}", s.code(), s.message()));
            warn!(nodes = cluster.node_count(), ?last, "no coordinator answered this round; backing off");
            None
        }
    }
}
