//! Phase 2: carrying logged decisions to participants until each one
//! acknowledges (docs/PROTOCOL.md §5 step 5), for one leader term.
//!
//! One queue and one worker per participant, ordered by next attempt time,
//! so a participant that is down backs off alone and never slows the others.
//! A worker sends what is due in one DecideBatch call and, while it waits,
//! lets the next batch gather: under load a call carries many decisions.
//! Acknowledgements are logged in batches by one task; a batch gathers for
//! `ack_linger_ms` after its first acknowledgement (so a txn's branches, and
//! at low load several txns, share one entry), and is proposed once the
//! previous one is applied, so batches grow with load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng as _;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use twopc_proto::{Clock, Decision, ParticipantId, TxnId};

use crate::command::{Command, Proposal};
use crate::config::EngineConfig;
use crate::node::NodeHandle;
use crate::participant_client::{ParticipantClient, Target};
use crate::state_machine::TxnRecord;

/// Acknowledgements waiting for the batcher; workers wait when it is full.
const ACK_QUEUE_MAX: usize = 8192;

/// Phase-2 delivery for one leader term.
pub(super) struct Delivery<P> {
    term: u64,
    shared: Arc<Shared<P>>,
    stop: watch::Sender<bool>,
}

struct Shared<P> {
    node: NodeHandle,
    client: Arc<P>,
    queues: Mutex<HashMap<ParticipantId, Arc<Queue>>>,
    acks: mpsc::Sender<(TxnId, ParticipantId)>,
    stop: watch::Receiver<bool>,
    decide_timeout: Duration,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
    batch_max: usize,
    delivered: AtomicU64,
    retries: AtomicU64,
    ack_entries: Arc<AtomicU64>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
}

#[derive(Default)]
struct QueueState {
    /// Items by (next attempt, sequence number).
    due: BTreeMap<(Instant, u64), Item>,
    /// Txns present in `due` or being sent, so a txn is queued once.
    queued: HashSet<TxnId>,
    next_seq: u64,
}

struct Item {
    txn_id: TxnId,
    decision: Decision,
    attempts: u32,
}

impl QueueState {
    fn push(&mut self, at: Instant, item: Item) {
        self.next_seq += 1;
        self.due.insert((at, self.next_seq), item);
    }

    /// Up to `max` items due by `now`, and when the next one falls due.
    fn take_due(&mut self, now: Instant, max: usize) -> (Vec<Item>, Option<Instant>) {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(entry) = self.due.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            batch.push(entry.remove());
        }
        (batch, self.due.first_key_value().map(|((at, _), _)| *at))
    }
}

impl<P: ParticipantClient> Delivery<P> {
    /// Starts delivery for `term`: the ack batcher now, workers as queues appear.
    pub(super) fn start(term: u64, node: NodeHandle, client: Arc<P>, config: &EngineConfig) -> Arc<Self> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (acks_tx, acks_rx) = mpsc::channel(ACK_QUEUE_MAX);
        let shared = Arc::new(Shared {
            node,
            client,
            queues: Mutex::default(),
            acks: acks_tx,
            stop: stop_rx,
            decide_timeout: Duration::from_millis(config.decide_timeout_ms),
            backoff_min_ms: config.delivery_backoff_min_ms,
            backoff_max_ms: config.delivery_backoff_max_ms,
            batch_max: config.delivery_batch_max,
            delivered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ack_entries: Arc::new(AtomicU64::new(0)),
        });
        let ack_config = AckConfig {
            batch_max: config.ack_batch_max,
            linger: Duration::from_millis(config.ack_linger_ms),
            entries: Arc::clone(&shared.ack_entries),
            backoff_min_ms: config.delivery_backoff_min_ms,
            backoff_max_ms: config.delivery_backoff_max_ms,
            clock: config.clock.clone(),
        };
        tokio::spawn(log_acks(shared.node.clone(), acks_rx, shared.stop.clone(), ack_config));
        Arc::new(Self { term, shared, stop: stop_tx })
    }

    pub(super) fn term(&self) -> u64 {
        self.term
    }

    /// Stops every worker; what they were sending is re-driven by the next leader.
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// (decisions acknowledged, failed attempts, Acknowledge entries
    /// logged) since the last call.
    pub(super) fn take_delivered(&self) -> (u64, u64, u64) {
        let take = |counter: &AtomicU64| counter.swap(0, Ordering::Relaxed);
        (take(&self.shared.delivered), take(&self.shared.retries), take(&self.shared.ack_entries))
    }

    /// Queues the record's unacknowledged branches for delivery.
    pub(super) fn enqueue(&self, record: &TxnRecord) {
        let now = Instant::now();
        for branch in record.branches.iter().filter(|b| !b.acknowledged) {
            let queue = self.queue(&branch.participant);
            let mut state = queue.state.lock();
            if state.queued.insert(record.txn_id) {
                state.push(now, Item { txn_id: record.txn_id, decision: record.decision, attempts: 0 });
                drop(state);
                queue.wake.notify_one();
            }
        }
    }

    fn queue(&self, participant: &ParticipantId) -> Arc<Queue> {
        let mut queues = self.shared.queues.lock();
        if let Some(queue) = queues.get(participant) {
            return queue.clone();
        }
        let queue = Arc::new(Queue::default());
        queues.insert(participant.clone(), queue.clone());
        tokio::spawn(run_worker(self.shared.clone(), participant.clone(), queue.clone()));
        queue
    }
}

impl<P> Drop for Delivery<P> {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn run_worker<P: ParticipantClient>(shared: Arc<Shared<P>>, participant: ParticipantId, queue: Arc<Queue>) {
    let mut stop = shared.stop.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let (batch, next_due) = queue.state.lock().take_due(Instant::now(), shared.batch_max);
        if batch.is_empty() {
            let sleep_until = next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = queue.wake.notified() => {}
                () = tokio::time::sleep_until(sleep_until) => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        if crate::failpoint::fired(crate::failpoint::DELIVERY_BEFORE_SEND, || participant.to_string()) {
            return;
        }
        // The address is read at send time so a participant that moved is
        // reached at its new address.
        let addr = shared.node.local_read(|sm| sm.participant_addr(&participant).map(str::to_owned));
        let results = match addr {
            Some(addr) => {
                let target = Target { participant: participant.clone(), addr };
                let decisions: Vec<_> = batch.iter().map(|item| (item.txn_id, item.decision)).collect();
                match shared.client.decide_batch(&target, &decisions, shared.decide_timeout).await {
                    Ok(acknowledgements) => acknowledgements,
                    Err(e) => vec![Err(e.message); batch.len()],
                }
            }
            None => vec![Err(format!("participant {participant} is not registered")); batch.len()],
        };
        for (mut item, result) in batch.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    queue.state.lock().queued.remove(&item.txn_id);
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    if shared.acks.send((item.txn_id, participant.clone())).await.is_err() {
                        return;
                    }
                }
                Err(message) => {
                    item.attempts = item.attempts.saturating_add(1);
                    shared.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(txn_id = %item.txn_id, %participant, attempts = item.attempts, %message,
                        "decision not acknowledged; will retry");
                    let at = Instant::now() + backoff(shared.backoff_min_ms, shared.backoff_max_ms, item.attempts);
                    queue.state.lock().push(at, item);
                }
            }
        }
    }
}

/// Capped exponential backoff with full jitter in its upper half.
fn backoff(min_ms: u64, max_ms: u64, attempts: u32) -> Duration {
    let ceiling = min_ms.saturating_mul(1u64 << attempts.min(20)).min(max_ms);
    let floor = ceiling / 2;
    Duration::from_millis(twopc_proto::host::with_rng(|rng| rng.random_range(floor..=ceiling.max(floor))))
}

/// Logs acknowledgements in batches until the term's delivery stops.
///
/// A batch whose proposal fails is kept and proposed again after a capped
/// backoff (the delivery backoff), topped up with what arrived meanwhile
/// (docs/PROTOCOL.md §5 step 5). Dropped, its txns would stay unacknowledged
/// for the rest of the term, never forgotten and counted against
/// `unacknowledged_max`. Proposing an acknowledgement twice is harmless: the
/// second finds the branch acknowledged. The batch stays within `batch_max`,
/// so while one is retried the workers wait on the bounded queue.
async fn log_acks(
    node: NodeHandle,
    mut acks: mpsc::Receiver<(TxnId, ParticipantId)>,
    mut stop: watch::Receiver<bool>,
    config: AckConfig,
) {
    let mut batch: Vec<(TxnId, ParticipantId)> = Vec::new();
    let mut failures: u32 = 0;
    loop {
        if batch.is_empty() {
            let first = tokio::select! {
                ack = acks.recv() => match ack { Some(ack) => ack, None => return },
                _ = stop.changed() => return,
            };
            batch.push(first);
        }
        // Gather until the batch is full or the first one has lingered.
        let linger_until = Instant::now() + config.linger;
        while batch.len() < config.batch_max {
            if let Ok(ack) = acks.try_recv() {
                batch.push(ack);
                continue;
            }
            tokio::select! {
                ack = tokio::time::timeout_at(linger_until, acks.recv()) => match ack {
                    Ok(Some(ack)) => batch.push(ack),
                    Ok(None) | Err(_) => break,
                },
                _ = stop.changed() => return,
            }
        }
        let result = if crate::failpoint::fired(crate::failpoint::ACKS_BEFORE_PROPOSE, || batch[0].0.to_string()) {
            Err(crate::Error::Overloaded("failpoint delivery::acks::before_propose".into()))
        } else {
            let command = Command::Acknowledge(batch.clone());
            node.propose(&Proposal { command, proposed_unix_ms: config.clock.unix_now_ms() }).await
        };
        match result {
            Ok(_) => {
                config.entries.fetch_add(1, Ordering::Relaxed);
                batch.clear();
                failures = 0;
            }
            // The node is gone; the next leader re-drives from the log.
            Err(crate::Error::Stopped) => return,
            Err(_) if crate::failpoint::fired(crate::failpoint::ACKS_DROPPED_ON_FAILURE, || batch[0].0.to_string()) => {
                batch.clear();
            }
            Err(err) => {
                // Any other failure (NotLeader included) is retried until the
                // term's delivery stops: the engine stops it when this node
                // stops leading.
                failures = failures.saturating_add(1);
                tracing::debug!(error = %err, acks = batch.len(), failures, "acknowledgements not logged; will retry");
                let pause = backoff(config.backoff_min_ms, config.backoff_max_ms, failures);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// What the acknowledgement logger needs from the engine's config.
struct AckConfig {
    batch_max: usize,
    /// How long a batch gathers after its first acknowledgement.
    linger: Duration,
    /// Counts the Acknowledge entries logged.
    entries: Arc<AtomicU64>,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
    clock: Clock,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempts in 0..40 {
            let d = backoff(20, 2000, attempts).as_millis();
            assert!(d <= 2000, "{d}");
        }
        assert!(backoff(20, 2000, 1).as_millis() <= 40);
        assert!(backoff(20, 2000, 30).as_millis() >= 1000);
    }
}
