//! [`MemoryResource`]: a [`Resource`] kept in memory, for tests, examples and
//! services whose branches need no storage of their own. It honours the whole
//! contract, with "durable" meaning "survives [`MemoryResource::restarted`]".

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use twopc_proto::{Decision, PayloadDigest, TxnId, Vote};

use crate::resource::{Resource, ResourceError};

/// The payload prefix that makes [`MemoryResource`] vote NO; the rest of the
/// payload is the reason.
pub const NO_PREFIX: &[u8] = b"no:";

/// The default bound on finished records kept (see [`MemoryResource::with_finished_max`]).
pub const FINISHED_MAX_DEFAULT: usize = 1_000_000;

/// The most txns whose call counters are kept; past it they start afresh.
pub const CALL_COUNTERS_MAX: usize = 100_000;

/// A resource held in memory whose only effect is to count commits.
///
/// Payloads: one starting with [`NO_PREFIX`] (`no:`) votes NO with the rest
/// (as UTF-8, lossily) as the reason, such as `no:insufficient funds`; any
/// other payload votes YES. Committing applies the branch's effect, which is
/// only that [`MemoryResource::commit_count`] goes up, once.
///
/// Durable state (votes, decisions, tombstones, commit counts) is shared with
/// every [`MemoryResource::restarted`] copy, as if it were on disk; volatile
/// state (call counters, the simulated outage) is per copy. Finished records
/// (committed, aborted, NO votes, tombstones) are bounded: past
/// `finished_max` the oldest is forgotten, as a store would expire tombstones
/// older than any deadline. Prepared records are kept until decided (the
/// library bounds how many there are).
#[derive(Debug)]
pub struct MemoryResource {
    durable: Arc<Mutex<Durable>>,
    volatile: Mutex<Volatile>,
}

#[derive(Debug)]
struct Durable {
    records: HashMap<TxnId, Record>,
    /// Finished txns, oldest first, with the `seq` of the state change that
    /// finished them; the bound evicts from the front.
    finished: VecDeque<(TxnId, u64)>,
    finished_max: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct Record {
    state: State,
    commits: u32,
    /// Which state change wrote `state`.
    seq: u64,
    /// The digest of the payload a YES was given on.
    digest: Option<PayloadDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Prepared,
    Refused(String),
    Committed,
    Aborted,
    Tombstone,
}

#[derive(Debug, Default)]
struct Volatile {
    calls: HashMap<TxnId, Calls>,
    unavailable: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Calls {
    prepare: u32,
    commit: u32,
    abort: u32,
}

impl Default for MemoryResource {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryResource {
    /// An empty resource keeping up to [`FINISHED_MAX_DEFAULT`] finished records.
    pub fn new() -> Self {
        Self::with_finished_max(FINISHED_MAX_DEFAULT)
    }

    /// An empty resource keeping up to `finished_max` (at least 1) finished records.
    pub fn with_finished_max(finished_max: usize) -> Self {
        let durable = Durable {
            records: HashMap::new(),
            finished: VecDeque::new(),
            finished_max: finished_max.max(1),
            next_seq: 0,
        };
        Self { durable: Arc::new(Mutex::new(durable)), volatile: Mutex::new(Volatile::default()) }
    }

    /// The same resource after a crash and restart: durable state is shared,
    /// volatile state (call counters, a simulated outage) starts afresh.
    /// Drop the old copy to complete the picture.
    pub fn restarted(&self) -> Self {
        Self { durable: Arc::clone(&self.durable), volatile: Mutex::new(Volatile::default()) }
    }

    /// How many times the effect of committing `txn` has been applied: 1 once
    /// committed, and it must never exceed 1. Durable.
    pub fn commit_count(&self, txn: TxnId) -> u32 {
        self.durable.lock().records.get(&txn).map_or(0, |r| r.commits)
    }

    /// Whether `txn` is prepared (voted YES, no decision yet). Durable.
    pub fn is_prepared(&self, txn: TxnId) -> bool {
        self.state(txn) == Some(State::Prepared)
    }

    /// Whether `txn` was aborted or has a tombstone. Durable.
    pub fn is_aborted(&self, txn: TxnId) -> bool {
        matches!(self.state(txn), Some(State::Aborted | State::Tombstone))
    }

    /// How many times `prepare` was called for `txn` on this copy.
    pub fn prepare_calls(&self, txn: TxnId) -> u32 {
        self.calls(txn).prepare
    }

    /// How many times `commit` was called for `txn` on this copy.
    pub fn commit_calls(&self, txn: TxnId) -> u32 {
        self.calls(txn).commit
    }

    /// How many times `abort` was called for `txn` on this copy.
    pub fn abort_calls(&self, txn: TxnId) -> u32 {
        self.calls(txn).abort
    }

    /// Simulates an outage of this copy: while set, every call fails with
    /// [`ResourceError::Unavailable`] and changes nothing (calls are still counted).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.volatile.lock().unavailable = unavailable;
    }

    fn state(&self, txn: TxnId) -> Option<State> {
        self.durable.lock().records.get(&txn).map(|r| r.state.clone())
    }

    fn calls(&self, txn: TxnId) -> Calls {
        self.volatile.lock().calls.get(&txn).copied().unwrap_or_default()
    }

    /// Counts the call, then fails if an outage is being simulated.
    fn enter(&self, txn: TxnId, count: impl FnOnce(&mut Calls)) -> Result<(), ResourceError> {
        let mut volatile = self.volatile.lock();
        if volatile.calls.len() >= CALL_COUNTERS_MAX && !volatile.calls.contains_key(&txn) {
            volatile.calls.clear();
        }
        count(volatile.calls.entry(txn).or_default());
        if volatile.unavailable {
            return Err(ResourceError::Unavailable("memory resource: simulated outage".into()));
        }
        Ok(())
    }
}

impl Durable {
    fn set(&mut self, txn: TxnId, state: State) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let finished = state != State::Prepared;
        let record =
            self.records.entry(txn).or_insert(Record { state: State::Prepared, commits: 0, seq, digest: None });
        record.state = state;
        record.seq = seq;
        if finished {
            self.finished.push_back((txn, seq));
            self.evict();
        }
    }

    fn evict(&mut self) {
        while self.finished.len() > self.finished_max {
            let Some((oldest, seq)) = self.finished.pop_front() else {
                return;
            };
            // A txn can finish twice (a NO vote, then an abort); only its
            // latest queue item forgets it.
            if self.records.get(&oldest).is_some_and(|r| r.seq == seq) {
                self.records.remove(&oldest);
            }
        }
    }
}

fn vote_for(payload: &[u8]) -> Vote {
    match payload.strip_prefix(NO_PREFIX) {
        Some(reason) => Vote::no(String::from_utf8_lossy(reason)),
        None => Vote::Yes,
    }
}

impl Resource for MemoryResource {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        self.enter(txn, |c| c.prepare += 1)?;
        let mut durable = self.durable.lock();
        let recorded = durable.records.get(&txn).map(|r| r.state.clone());
        let vote = match recorded {
            Some(State::Prepared | State::Committed) => return Ok(Vote::Yes),
            Some(State::Refused(reason)) => return Ok(Vote::no(reason)),
            Some(State::Aborted) => return Ok(Vote::no("txn already aborted")),
            Some(State::Tombstone) => return Ok(Vote::no("aborted before prepare (tombstone)")),
            None => vote_for(&payload),
        };
        let state = match &vote {
            Vote::Yes => State::Prepared,
            Vote::No { reason } => State::Refused(reason.clone()),
        };
        durable.set(txn, state);
        if vote.is_yes()
            && let Some(record) = durable.records.get_mut(&txn)
        {
            record.digest = Some(PayloadDigest::of(&payload));
        }
        Ok(vote)
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.enter(txn, |c| c.commit += 1)?;
        let mut durable = self.durable.lock();
        let Some(record) = durable.records.get_mut(&txn) else {
            return Err(ResourceError::NotPrepared);
        };
        match record.state {
            State::Committed => Ok(()),
            State::Prepared => {
                record.commits += 1;
                durable.set(txn, State::Committed);
                Ok(())
            }
            State::Refused(_) | State::Aborted | State::Tombstone => {
                Err(ResourceError::Conflict { recorded: Decision::Abort })
            }
        }
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.enter(txn, |c| c.abort += 1)?;
        let mut durable = self.durable.lock();
        let state = durable.records.get(&txn).map(|r| r.state.clone());
        match state {
            Some(State::Aborted | State::Tombstone) => Ok(()),
            Some(State::Committed) => Err(ResourceError::Conflict { recorded: Decision::Commit }),
            Some(State::Prepared | State::Refused(_)) => {
                durable.set(txn, State::Aborted);
                Ok(())
            }
            None => {
                // I4: remember the abort so a late Prepare votes NO.
                durable.set(txn, State::Tombstone);
                Ok(())
            }
        }
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        Ok(self.prepared_with_digests().await?.into_iter().map(|(txn, _)| txn).collect())
    }

    async fn prepared_with_digests(&self) -> Result<Vec<(TxnId, Option<PayloadDigest>)>, ResourceError> {
        let durable = self.durable.lock();
        let mut txns: Vec<(TxnId, Option<PayloadDigest>)> = durable
            .records
            .iter()
            .filter(|(_, r)| r.state == State::Prepared)
            .map(|(txn, r)| (*txn, r.digest))
            .collect();
        txns.sort_unstable();
        Ok(txns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // I6 (bounded): finished records are forgotten oldest first; prepared ones are kept.
    #[tokio::test]
    async fn finished_records_are_bounded_but_prepared_ones_kept() {
        let resource = MemoryResource::with_finished_max(2);
        let held = TxnId::new();
        assert_eq!(resource.prepare(held, Bytes::new()).await, Ok(Vote::Yes));
        let aborted: Vec<TxnId> = (0..3).map(|_| TxnId::new()).collect();
        for txn in &aborted {
            assert_eq!(resource.abort(*txn).await, Ok(()));
        }
        assert!(!resource.is_aborted(aborted[0]), "oldest tombstone kept past the bound");
        assert!(resource.is_aborted(aborted[1]) && resource.is_aborted(aborted[2]));
        assert!(resource.is_prepared(held));
    }

    #[tokio::test]
    async fn no_prefix_votes_no_with_the_reason() {
        let resource = MemoryResource::new();
        let vote = resource.prepare(TxnId::new(), Bytes::from_static(b"no:insufficient funds")).await;
        assert_eq!(vote, Ok(Vote::no("insufficient funds")));
    }

    // I5: an outage changes nothing; the same call succeeds afterwards.
    #[tokio::test]
    async fn simulated_outage_fails_calls_without_effect() {
        let resource = MemoryResource::new();
        let txn = TxnId::new();
        assert_eq!(resource.prepare(txn, Bytes::new()).await, Ok(Vote::Yes));
        resource.set_unavailable(true);
        assert!(matches!(resource.commit(txn).await, Err(ResourceError::Unavailable(_))));
        assert_eq!(resource.commit_count(txn), 0);
        resource.set_unavailable(false);
        assert_eq!(resource.commit(txn).await, Ok(()));
        assert_eq!(resource.commit_count(txn), 1);
        assert_eq!(resource.commit_calls(txn), 2);
    }
}
