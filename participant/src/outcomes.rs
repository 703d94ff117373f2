//! The outcome memory: what this participant did with each recent txn, so that
//! repeats are answered without touching the resource (I5), an Abort seen
//! before its Prepare keeps the Prepare out (I4), and the resolver can find
//! branches left in doubt.
//!
//! Pure and synchronous: callers pass the time in and hold the txn's lock
//! (see `engine`) around a read and the write that follows it.
//!
//! Bounded (I6): at most `outcome_memory_max` entries. Prepared branches are
//! never evicted (their holds must wait for the decision, I4); everything else
//! is evicted `tombstone_retention_ms` after it finished, or earlier, oldest
//! first, when the memory is full. Branches that may be prepared (their
//! Prepare failed after the resource may have staged them) count as prepared.
//! Only a memory full of prepared (or preparing) branches refuses a new Prepare. Forgetting a finished txn is
//! safe because the resource keeps its own durable record (see the `Resource`
//! contract): a repeat then costs one resource call, not a wrong answer.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use twopc_proto::{PayloadDigest, TxnId};

/// What is known about one txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A Prepare is running under the txn's lock. Seen by a later caller only
    /// if that Prepare's task died, in which case it counts as unknown.
    Preparing,
    /// Voted YES; awaiting the decision. The resolver asks about it from `due` on.
    Prepared {
        /// When the branch counts as in doubt.
        due: Instant,
        /// Staged for a join (§12.3), not for the coordinator's Prepare: a
        /// one-shot Prepare of the same txn must not be answered with its YES.
        for_join: bool,
        /// The digest of the payload that voted YES; after a restart, what
        /// the resource kept (`Resource::prepared_with_digests`). None when
        /// it keeps none, or for a branch the service staged with its own code.
        digest: Option<PayloadDigest>,
    },
    /// The resource's `prepare` failed after it may have staged the branch
    /// (a lost reply to `PREPARE TRANSACTION`, a write whose fsync failed):
    /// the branch may hold locks, so it is in doubt like a prepared one and
    /// never evicted. A repeated Prepare asks the resource again; otherwise
    /// the resolver asks the coordinator from `due` on (I7).
    MaybePrepared {
        /// When the branch counts as in doubt.
        due: Instant,
        /// The digest of the payload whose Prepare failed.
        digest: Option<PayloadDigest>,
    },
    /// Voted NO, with the reason given.
    Refused {
        /// Why.
        reason: String,
    },
    /// `Decision::Commit` applied.
    Committed,
    /// `Decision::Abort` applied to a branch that had been prepared.
    Aborted,
    /// `Decision::Abort` arrived for a txn never prepared here (I4).
    Tombstone,
}

#[derive(Debug)]
struct Entry {
    outcome: Outcome,
    /// Which `put` wrote this state; tells current expiry items from stale ones.
    seq: u64,
}

/// The memory itself; see the module docs.
#[derive(Debug)]
pub(crate) struct Outcomes {
    max: usize,
    retention: Duration,
    entries: HashMap<TxnId, Entry>,
    /// Evictable entries in the order they reached their state, with the
    /// `seq` of that state. An item is stale when the entry has moved on
    /// since; stale items are skipped.
    expiry: VecDeque<(Instant, u64, TxnId)>,
    /// Prepared branches ordered by when they become in doubt.
    in_doubt: BTreeSet<(Instant, TxnId)>,
    next_seq: u64,
}

impl Outcome {
    /// Whether the branch may hold what it staged until a decision arrives.
    pub(crate) fn awaits_decision(&self) -> bool {
        matches!(self, Self::Prepared { .. } | Self::MaybePrepared { .. })
    }

    /// The state in words, for messages to callers.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Self::Preparing => "being prepared",
            Self::Prepared { .. } => "prepared",
            Self::MaybePrepared { .. } => "maybe prepared (its prepare failed; the resolver settles it)",
            Self::Refused { .. } => "voted NO",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
            Self::Tombstone => "aborted before prepare (tombstone)",
        }
    }
}

/// No room for another entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl Outcomes {
    pub(crate) fn new(max: usize, retention: Duration) -> Self {
        assert!(max > 0, "outcome_memory_max is validated to be positive");
        Self {
            max,
            retention,
            entries: HashMap::new(),
            expiry: VecDeque::new(),
            in_doubt: BTreeSet::new(),
            next_seq: 0,
        }
    }

    pub(crate) fn get(&self, txn: TxnId) -> Option<&Outcome> {
        self.entries.get(&txn).map(|e| &e.outcome)
    }

    /// Whether `txn` awaits a decision: it voted YES, or its Prepare failed
    /// after the resource may have staged it.
    pub(crate) fn is_in_doubt(&self, txn: TxnId) -> bool {
        self.get(txn).is_some_and(Outcome::awaits_decision)
    }

    /// How many branches voted YES (or may have) and await their decision.
    pub(crate) fn prepared_len(&self) -> usize {
        self.in_doubt.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records `outcome` for `txn`. An existing entry is always updated; a new
    /// one is added only if room can be made, else `Err(Full)` and nothing
    /// changes.
    pub(crate) fn set(&mut self, txn: TxnId, outcome: Outcome, now: Instant) -> Result<(), Full> {
        if !self.entries.contains_key(&txn) {
            self.make_room(now)?;
        }
        self.put(txn, outcome, now);
        Ok(())
    }

    /// Records `outcome` even past the bound: for branches found prepared at
    /// start-up, which must be tracked whatever the bound says.
    pub(crate) fn set_unbounded(&mut self, txn: TxnId, outcome: Outcome, now: Instant) {
        self.evict_expired(now);
        self.put(txn, outcome, now);
    }

    /// Makes a branch awaiting its decision due for the resolver at `now`;
    /// anything else is left alone.
    pub(crate) fn hasten(&mut self, txn: TxnId, now: Instant) {
        let hastened = match self.get(txn) {
            Some(Outcome::Prepared { due, for_join, digest }) if *due > now => {
                Outcome::Prepared { due: now, for_join: *for_join, digest: *digest }
            }
            Some(Outcome::MaybePrepared { due, digest }) if *due > now => {
                Outcome::MaybePrepared { due: now, digest: *digest }
            }
            _ => return,
        };
        self.put(txn, hastened, now);
    }

    /// Drops what is known about `txn` (a Prepare that failed).
    pub(crate) fn forget(&mut self, txn: TxnId) {
        if let Some(old) = self.entries.remove(&txn) {
            self.unindex(txn, &old.outcome);
        }
    }

    /// Up to `limit` prepared txns whose `due` time has come, oldest first,
    /// skipping those `skip` says are already being handled.
    pub(crate) fn in_doubt(&self, now: Instant, limit: usize, skip: impl Fn(TxnId) -> bool) -> Vec<TxnId> {
        self.in_doubt
            .iter()
            .take_while(|(due, _)| *due <= now)
            .map(|(_, txn)| *txn)
            .filter(|txn| !skip(*txn))
            .take(limit)
            .collect()
    }

    fn put(&mut self, txn: TxnId, outcome: Outcome, now: Instant) {
        if let Some(old) = self.entries.get(&txn) {
            let old = old.outcome.clone();
            self.unindex(txn, &old);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        match &outcome {
            Outcome::Prepared { due, .. } | Outcome::MaybePrepared { due, .. } => {
                self.in_doubt.insert((*due, txn));
            }
            _ => self.expiry.push_back((now, seq, txn)),
        }
        self.entries.insert(txn, Entry { outcome, seq });
        self.compact_expiry();
    }

    fn unindex(&mut self, txn: TxnId, outcome: &Outcome) {
        if let Outcome::Prepared { due, .. } | Outcome::MaybePrepared { due, .. } = outcome {
            let removed = self.in_doubt.remove(&(*due, txn));
            assert!(removed, "every prepared entry is indexed by its due time");
        }
    }

    fn make_room(&mut self, now: Instant) -> Result<(), Full> {
        self.evict_expired(now);
        let mut in_progress = Vec::new();
        while self.entries.len() >= self.max {
            let Some((since, seq, txn)) = self.expiry.pop_front() else { break };
            match self.entries.get(&txn) {
                Some(entry) if entry.seq == seq && entry.outcome == Outcome::Preparing => {
                    in_progress.push((since, seq, txn));
                }
                Some(entry) if entry.seq == seq => {
                    self.entries.remove(&txn);
                }
                _ => {}
            }
        }
        // Running Prepares keep their place at the front of the queue.
        for item in in_progress.into_iter().rev() {
            self.expiry.push_front(item);
        }
        if self.entries.len() < self.max { Ok(()) } else { Err(Full) }
    }

    fn evict_expired(&mut self, now: Instant) {
        while let Some(&(since, seq, txn)) = self.expiry.front() {
            if now.saturating_duration_since(since) < self.retention {
                break;
            }
            self.expiry.pop_front();
            if self.entries.get(&txn).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&txn);
            }
        }
    }

    /// Keeps the expiry queue within a constant factor of the entry count by
    /// dropping stale items once they pile up (entries that changed state
    /// several times within the retention period).
    fn compact_expiry(&mut self) {
        if self.expiry.len() <= 2 * self.max + 16 {
            return;
        }
        let entries = &self.entries;
        self.expiry.retain(|(_, seq, txn)| entries.get(txn).is_some_and(|e| e.seq == *seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETENTION: Duration = Duration::from_secs(10);

    fn prepared(now: Instant) -> Outcome {
        Outcome::Prepared { due: now, for_join: false, digest: None }
    }

    // I7: a hastened branch is due at once; a decided one is left alone.
    #[test]
    fn hastening_makes_a_prepared_branch_due_now_and_leaves_others() {
        let mut memory = Outcomes::new(8, RETENTION);
        let now = Instant::now();
        let (waiting, done) = (TxnId::new(), TxnId::new());
        assert_eq!(
            memory.set(waiting, Outcome::Prepared { due: now + RETENTION, for_join: false, digest: None }, now),
            Ok(())
        );
        assert_eq!(memory.set(done, Outcome::Committed, now), Ok(()));
        assert!(memory.in_doubt(now, 8, |_| false).is_empty());
        memory.hasten(waiting, now);
        memory.hasten(done, now);
        assert_eq!(memory.in_doubt(now, 8, |_| false), vec![waiting]);
        assert_eq!(memory.get(done), Some(&Outcome::Committed));
        assert_eq!(memory.prepared_len(), 1);
    }

    // I6 (bounded): the memory never holds more than its limit of entries;
    // when full, the oldest finished entry makes room, and only a memory full
    // of prepared or preparing branches refuses.
    #[test]
    fn when_full_evicts_the_oldest_finished_entry_and_refuses_only_when_all_are_held() {
        let now = Instant::now();
        let mut memory = Outcomes::new(2, RETENTION);
        let (a, b, c, d) = (TxnId::new(), TxnId::new(), TxnId::new(), TxnId::new());
        assert_eq!(memory.set(a, Outcome::Tombstone, now), Ok(()));
        assert_eq!(memory.set(b, prepared(now), now), Ok(()));
        assert_eq!(memory.set(c, Outcome::Preparing, now), Ok(()));
        assert_eq!(memory.get(a), None, "the finished entry made room");
        assert_eq!(memory.set(d, Outcome::Committed, now), Err(Full));
        assert_eq!(memory.get(d), None);
        // Updating an existing entry needs no room.
        assert_eq!(memory.set(b, Outcome::Committed, now), Ok(()));
        assert_eq!(memory.len(), 2);
        // The running Prepare was not evicted; the finished one goes first.
        assert_eq!(memory.set(d, Outcome::Committed, now), Ok(()));
        assert_eq!(memory.get(c), Some(&Outcome::Preparing));
        assert_eq!(memory.get(b), None);
    }

    // I4 (no hanging): prepared branches are never evicted; finished ones are, after retention.
    #[test]
    fn evicts_finished_entries_after_retention_but_never_prepared_ones() {
        let start = Instant::now();
        let mut memory = Outcomes::new(2, RETENTION);
        let (held, done, fresh) = (TxnId::new(), TxnId::new(), TxnId::new());
        assert_eq!(memory.set(held, prepared(start), start), Ok(()));
        assert_eq!(memory.set(done, Outcome::Tombstone, start), Ok(()));

        let almost = start + RETENTION - Duration::from_millis(1);
        memory.evict_expired(almost);
        assert_eq!(memory.get(done), Some(&Outcome::Tombstone), "kept within retention");

        let later = start + RETENTION;
        memory.evict_expired(later);
        assert_eq!(memory.get(done), None, "evicted after retention");
        assert_eq!(memory.set(fresh, Outcome::Tombstone, later), Ok(()));
        assert_eq!(memory.get(done), None);
        assert!(memory.is_in_doubt(held));

        let much_later = later + RETENTION * 100;
        assert_eq!(memory.set(TxnId::new(), Outcome::Committed, much_later), Ok(()));
        assert!(memory.is_in_doubt(held), "a prepared branch was evicted");
    }

    // I4: an entry's retention restarts when it changes state (prepared -> committed).
    #[test]
    fn retention_counts_from_the_last_change() {
        let start = Instant::now();
        let mut memory = Outcomes::new(1, RETENTION);
        let txn = TxnId::new();
        assert_eq!(memory.set(txn, Outcome::Preparing, start), Ok(()));
        let decided = start + RETENTION;
        memory.put(txn, Outcome::Committed, decided);
        memory.evict_expired(decided + Duration::from_millis(1));
        assert_eq!(memory.get(txn), Some(&Outcome::Committed));
        memory.evict_expired(decided + RETENTION);
        assert_eq!(memory.get(txn), None);
    }

    // I7 (liveness): the resolver sees prepared branches once due, oldest first, and no others.
    #[test]
    fn lists_due_prepared_branches_oldest_first() {
        let start = Instant::now();
        let mut memory = Outcomes::new(10, RETENTION);
        let (first, second, later, done) = (TxnId::new(), TxnId::new(), TxnId::new(), TxnId::new());
        let due = |ms| Outcome::Prepared { due: start + Duration::from_millis(ms), for_join: false, digest: None };
        assert_eq!(memory.set(second, due(20), start), Ok(()));
        assert_eq!(memory.set(first, due(10), start), Ok(()));
        assert_eq!(memory.set(later, due(1_000), start), Ok(()));
        assert_eq!(memory.set(done, due(0), start), Ok(()));
        assert_eq!(memory.set(done, Outcome::Aborted, start), Ok(()));

        let now = start + Duration::from_millis(50);
        assert_eq!(memory.in_doubt(now, 10, |_| false), vec![first, second]);
        assert_eq!(memory.in_doubt(now, 1, |_| false), vec![first]);
        assert_eq!(memory.in_doubt(now, 10, |t| t == first), vec![second]);
        assert_eq!(memory.prepared_len(), 3);
    }

    // I6 (bounded): many state changes within the retention period do not grow the queue without bound.
    #[test]
    fn expiry_queue_stays_bounded_under_churn() {
        let now = Instant::now();
        let mut memory = Outcomes::new(4, RETENTION);
        let txn = TxnId::new();
        for i in 0..1_000 {
            let outcome = if i % 2 == 0 { Outcome::Preparing } else { Outcome::Refused { reason: "x".into() } };
            assert_eq!(memory.set(txn, outcome, now), Ok(()));
        }
        assert!(memory.expiry.len() <= 2 * 4 + 17);
    }

    // I4 and I7: a branch that may be prepared is listed for the resolver like a prepared one and
    // is never evicted, however full the memory.
    #[test]
    fn maybe_prepared_branches_are_in_doubt_and_never_evicted() {
        let now = Instant::now();
        let mut memory = Outcomes::new(1, RETENTION);
        let txn = TxnId::new();
        assert_eq!(memory.set(txn, Outcome::Preparing, now), Ok(()));
        assert_eq!(memory.set(txn, Outcome::MaybePrepared { due: now, digest: None }, now), Ok(()));
        assert!(memory.is_in_doubt(txn));
        assert_eq!(memory.in_doubt(now, 10, |_| false), vec![txn]);
        assert_eq!(memory.set(TxnId::new(), Outcome::Tombstone, now + RETENTION * 10), Err(Full));
        assert!(memory.is_in_doubt(txn), "a branch that may be prepared was evicted");
        assert_eq!(memory.set(txn, Outcome::Aborted, now), Ok(()));
        assert!(!memory.is_in_doubt(txn));
        assert_eq!(memory.prepared_len(), 0);
    }

    // I4: branches found at start-up are tracked even past the bound.
    #[test]
    fn start_up_branches_are_tracked_past_the_bound() {
        let now = Instant::now();
        let mut memory = Outcomes::new(1, RETENTION);
        let (a, b) = (TxnId::new(), TxnId::new());
        memory.set_unbounded(a, prepared(now), now);
        memory.set_unbounded(b, prepared(now), now);
        assert!(memory.is_in_doubt(a) && memory.is_in_doubt(b));
        assert_eq!(memory.set(TxnId::new(), Outcome::Tombstone, now), Err(Full));
    }
}
