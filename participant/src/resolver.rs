//! The in-doubt resolver: asks the coordinator cluster for the decision of
//! every branch that voted YES and heard nothing for `in_doubt_timeout_ms`,
//! and of every branch found prepared at start-up (docs/PROTOCOL.md
//! §3.3, invariant I7).
//!
//! It never decides on its own and never gives up: it asks any configured
//! node, follows leader hints (even to addresses not configured), moves to the
//! next node when one is unreachable, and after a round without an answer
//! waits a capped, jittered, exponentially growing pause. The decision it gets
//! goes through the same per-txn-locked path as the coordinator's Decide, so
//! it is applied exactly once even when both arrive together.
//!
//! Bounded (I6): at most `resolve_concurrency_max` txns are resolved at once;
//! the waiting ones are simply the oldest prepared entries of the outcome
//! memory, so there is no separate queue to overflow. Channels are created
//! lazily and cached, at most [`CHANNEL_CACHE_MAX`] of them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, instrument, warn};
use twopc_proto::pb::ResolveRequest;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::status::{is_forgotten, leader_hint};
use twopc_proto::{Decision, MAX_MESSAGE_BYTES, TxnId};

use crate::config::endpoint_uri;
use crate::engine::{Engine, Origin};
use crate::failpoint::{self, fired};
use crate::resource::Resource;

/// The most coordinator channels kept; past it the cache starts afresh.
pub const CHANNEL_CACHE_MAX: usize = 64;

/// How many leader hints one round may follow beyond the configured nodes,
/// so nodes pointing at each other cannot keep a round going for ever.
const HINTS_PER_ROUND_MAX: usize = 4;

/// Runs until dropped: finds in-doubt branches and resolves them.
pub(crate) async fn run<R: Resource>(engine: Arc<Engine<R>>) {
    let cluster = Arc::new(Cluster::new(&engine));
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
        if let Some(decision) = cluster.resolve_round(txn).await {
            match engine.decide(txn, decision, Origin::Resolver).await {
                Ok(_) => {
                    engine.metrics().resolved();
                    info!(%decision, "in-doubt branch resolved");
                    return;
                }
                Err(e) => warn!(error = %e, "could not apply the resolved decision; retrying"),
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
    debug!("settled by a decision from the coordinator");
}

/// Capped exponential backoff with jitter: each pause is drawn from the upper
/// half of the current step, and the step doubles up to the cap.
struct Backoff {
    min_ms: u64,
    max_ms: u64,
    step_ms: u64,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Self {
        assert!(min_ms <= max_ms, "validated by ParticipantConfig::validate");
        Self { min_ms, max_ms, step_ms: min_ms }
    }

    fn next(&mut self) -> Duration {
        let low = (self.step_ms / 2).max(self.min_ms);
        let pause_ms = twopc_proto::host::with_rng(|rng| rng.random_range(low..=self.step_ms.max(low)));
        self.step_ms = self.step_ms.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(pause_ms)
    }
}

/// The coordinator nodes, a cached guess at the leader, and lazy channels.
struct Cluster {
    participant: String,
    nodes: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    leader: Mutex<Option<String>>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Cluster {
    fn new<R: Resource>(engine: &Engine<R>) -> Self {
        let config = engine.config();
        Self {
            participant: config.id.to_string(),
            nodes: config.coordinators.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            request_timeout: Duration::from_millis(config.resolve_timeout_ms),
            leader: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// One pass over the cluster: the believed leader first, then every
    /// configured node, each hint followed as soon as it is given.
    async fn resolve_round(&self, txn: TxnId) -> Option<Decision> {
        let leader = self.leader.lock().clone();
        let mut queue: VecDeque<String> = leader.into_iter().chain(self.nodes.clone()).collect();
        let mut tried = HashSet::new();
        let mut hints_followed = 0;
        while let Some(addr) = queue.pop_front() {
            if !tried.insert(addr.clone()) {
                continue;
            }
            match self.ask(&addr, txn).await {
                Ok(decision) => {
                    *self.leader.lock() = Some(addr);
                    return Some(decision);
                }
                Err(status) if is_forgotten(&status) => {
                    // The coordinator forgot the txn after retention. Retention never
                    // forgets a Commit that names no branch, and a branch named in a
                    // kept decision acknowledged it before it could be forgotten, so a
                    // branch still prepared here belongs to an aborted txn
                    // (docs/PROTOCOL.md §7.2): abort it rather than ask for ever (I7).
                    warn!(%addr, "the coordinator forgot this txn after retention; aborting the branch");
                    return Some(Decision::Abort);
                }
                Err(status) => {
                    self.forget_leader(&addr);
                    let hint = leader_hint(&status).filter(|h| !tried.contains(h));
                    debug!(%addr, code = ?status.code(), message = status.message(), ?hint, "resolve failed");
                    if let Some(hint) = hint
                        && hints_followed < HINTS_PER_ROUND_MAX
                    {
                        hints_followed += 1;
                        queue.push_front(hint);
                    }
                }
            }
        }
        warn!(nodes = tried.len(), "no coordinator answered this round; backing off");
        None
    }

    async fn ask(&self, addr: &str, txn: TxnId) -> Result<Decision, tonic::Status> {
        let channel = self.channel(addr)?;
        let mut client = CoordinatorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut request =
            tonic::Request::new(ResolveRequest { txn_id: txn.to_string(), participant: self.participant.clone() });
        request.set_timeout(self.request_timeout);
        let response = client.resolve(request).await?.into_inner();
        // Never decide on our own: an answer without a decision is no answer.
        Decision::try_from(response.decision)
            .map_err(|e| tonic::Status::internal(format!("coordinator at {addr} answered: {e}")))
    }

    fn forget_leader(&self, addr: &str) {
        let mut leader = self.leader.lock();
        if leader.as_deref() == Some(addr) {
            *leader = None;
        }
    }

    /// A lazily connecting channel to `addr`; nothing is dialled until a call.
    fn channel(&self, addr: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let uri = endpoint_uri(addr).map_err(tonic::Status::invalid_argument)?;
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| tonic::Status::invalid_argument(format!("{addr}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout);
        let channel = twopc_proto::net::lazy_channel(&endpoint);
        if channels.len() >= CHANNEL_CACHE_MAX {
            channels.clear();
        }
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // I7 (liveness) and I6 (bounded retry): pauses stay within [min, max] and grow to the cap.
    #[test]
    fn backoff_grows_to_the_cap_and_stays_within_bounds() {
        let mut backoff = Backoff::new(10, 200);
        let pauses: Vec<u64> = (0..20).map(|_| u64::try_from(backoff.next().as_millis()).unwrap_or(u64::MAX)).collect();
        assert!(pauses.iter().all(|p| (10..=200).contains(p)), "{pauses:?}");
        assert!(pauses[..2].iter().all(|p| *p <= 20), "{pauses:?}");
        assert!(pauses[10..].iter().all(|p| *p >= 100), "{pauses:?}");
    }

    #[test]
    fn backoff_with_equal_bounds_is_constant() {
        let mut backoff = Backoff::new(50, 50);
        assert!((0..5).all(|_| backoff.next() == Duration::from_millis(50)));
    }
}
