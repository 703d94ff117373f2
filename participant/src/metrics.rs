//! [`Metrics`]: counters a service reads to watch its participant, exported
//! however the service likes (it is a plain handle, no exporter is bundled).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A cheap, cloneable handle on the participant's counters.
///
/// Get it from [`crate::Participant::metrics`]; read it with
/// [`Metrics::snapshot`]. Counters only grow; `in_doubt_now` is a gauge.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    prepares: AtomicU64,
    votes_yes: AtomicU64,
    votes_no: AtomicU64,
    commits: AtomicU64,
    aborts: AtomicU64,
    resolves: AtomicU64,
    joins: AtomicU64,
    join_refusals: AtomicU64,
    in_doubt_now: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Well-formed Prepare requests handled, repeats included.
    pub prepares: u64,
    /// YES votes cast (a repeated Prepare answered from memory is not counted again).
    pub votes_yes: u64,
    /// NO votes cast by the resource, plus Prepares refused for a passed
    /// deadline. Answers from the outcome memory (repeats, tombstones) are
    /// not counted.
    pub votes_no: u64,
    /// `Decision::Commit`s applied to the resource.
    pub commits: u64,
    /// `Decision::Abort`s applied to the resource (tombstones included).
    pub aborts: u64,
    /// In-doubt branches settled by asking the coordinator.
    pub resolves: u64,
    /// Branches joined to interactive txns (the coordinator logged the Join).
    pub joins: u64,
    /// Joins the coordinator refused (`FAILED_PRECONDITION`: the txn was
    /// decided, past its deadline, unknown or forgotten).
    pub join_refusals: u64,
    /// Branches that voted YES, or may be staged after a failed Prepare, and
    /// await their decision right now.
    pub in_doubt_now: u64,
}

impl Metrics {
    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let c = &*self.inner;
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            prepares: read(&c.prepares),
            votes_yes: read(&c.votes_yes),
            votes_no: read(&c.votes_no),
            commits: read(&c.commits),
            aborts: read(&c.aborts),
            resolves: read(&c.resolves),
            joins: read(&c.joins),
            join_refusals: read(&c.join_refusals),
            in_doubt_now: read(&c.in_doubt_now),
        }
    }

    pub(crate) fn prepare(&self) {
        self.inner.prepares.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn vote(&self, yes: bool) {
        let counter = if yes { &self.inner.votes_yes } else { &self.inner.votes_no };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn decision_applied(&self, decision: twopc_proto::Decision) {
        let counter = match decision {
            twopc_proto::Decision::Commit => &self.inner.commits,
            twopc_proto::Decision::Abort => &self.inner.aborts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn resolved(&self) {
        self.inner.resolves.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn joined(&self) {
        self.inner.joins.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn join_refused(&self) {
        self.inner.join_refusals.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_in_doubt(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.inner.in_doubt_now.store(n, Ordering::Relaxed);
    }
}
