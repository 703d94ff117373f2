//! Observability: latency histograms of the 2PC phases and the Prometheus
//! text rendering of every counter; `twopc_proto::metrics_http` serves it.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use twopc_proto::metrics_http::{counter, gauge};

use crate::engine::EngineMetrics;
use crate::node::{NodeStatus, Role};

/// Largest latency a histogram records, in microseconds (60 s); longer ones are clamped.
const LATENCY_MAX_US: u64 = 60_000_000;

/// A latency histogram in microseconds, safe to record into from any task.
#[derive(Debug)]
pub struct Latency {
    histogram: Mutex<Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        // Three significant digits over 1 us..60 s: about 30 KiB per histogram.
        let histogram = Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("constant bounds are valid");
        Self { histogram: Mutex::new(histogram) }
    }
}

impl Latency {
    /// Records one duration.
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).clamp(1, LATENCY_MAX_US);
        self.histogram.lock().saturating_record(us);
    }

    /// (count, sum in seconds, [(quantile, seconds)]) for the exposition.
    fn summary(&self) -> (u64, f64, Vec<(f64, f64)>) {
        let h = self.histogram.lock();
        let quantiles = [0.5, 0.9, 0.99, 0.999].iter().map(|q| (*q, h.value_at_quantile(*q) as f64 / 1e6)).collect();
        (h.len(), h.mean() * h.len() as f64 / 1e6, quantiles)
    }
}

/// Latencies of each phase of a txn on the leader.
#[derive(Debug, Default)]
pub struct PhaseLatencies {
    /// Submit (or an interactive Commit) started to answered: under parallel
    /// commit the explicit decision comes later (docs/PROTOCOL.md §13.2).
    pub submit: Latency,
    /// The prepare fan-out, first Prepare sent to last vote in.
    pub prepare: Latency,
    /// Decision proposed to decision applied (the Raft round trip and fsyncs).
    pub decide: Latency,
    /// Parallel commit: Staged entry proposed to applied, in step with the
    /// prepare phase (docs/PROTOCOL.md §13.2).
    pub staged: Latency,
}

fn summary(out: &mut String, name: &str, help: &str, latency: &Latency) {
    let (count, sum, quantiles) = latency.summary();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for (q, v) in quantiles {
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}

/// Gauges read from the applied state when the metrics are rendered.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxnGauges {
    /// Decided txns some participant has not acknowledged.
    pub unacknowledged: usize,
    /// Interactive txns begun and not decided.
    pub begun: usize,
    /// One-shot txns staged under parallel commit and not decided (docs/PROTOCOL.md §13).
    pub staged: usize,
}

/// Renders the node's metrics in the Prometheus text format.
pub fn render(status: &NodeStatus, engine: &EngineMetrics, phases: &PhaseLatencies, gauges: TxnGauges) -> String {
    let mut out = String::with_capacity(4096);
    let c = |m: &std::sync::atomic::AtomicU64| m.load(Ordering::Relaxed);
    counter(&mut out, "twopc_txns_submitted_total", "Txns started by Submit on this node.", c(&engine.submitted));
    counter(&mut out, "twopc_txns_committed_total", "Txns this node decided to commit.", c(&engine.committed));
    let _ = writeln!(out, "# HELP twopc_txns_aborted_total Txns this node aborted, by cause.");
    let _ = writeln!(out, "# TYPE twopc_txns_aborted_total counter");
    for (cause, value) in [
        ("vote_no", c(&engine.aborted_vote_no)),
        ("no_answer", c(&engine.aborted_no_answer)),
        ("deadline", c(&engine.aborted_deadline)),
        ("presumed", c(&engine.presumed_aborts)),
        ("timed_out", c(&engine.timed_out)),
        ("rolled_back", c(&engine.rolled_back)),
    ] {
        let _ = writeln!(out, "twopc_txns_aborted_total{{cause=\"{cause}\"}} {value}");
    }
    counter(&mut out, "twopc_txns_begun_total", "Interactive txns begun on this node.", c(&engine.begun));
    counter(
        &mut out,
        "twopc_txns_interactive_committed_total",
        "Interactive txns whose decision, logged by this node, is Commit.",
        c(&engine.interactive_committed),
    );
    counter(
        &mut out,
        "twopc_branches_joined_total",
        "Branches joined to interactive txns on this node.",
        c(&engine.joined),
    );
    counter(
        &mut out,
        "twopc_joins_refused_total",
        "Joins refused (txn decided, past its deadline, unknown, forgotten, or full).",
        c(&engine.join_refused),
    );
    counter(
        &mut out,
        "twopc_txns_parallel_committed_total",
        "Txns this node answered Commit under parallel commit, before logging the decision.",
        c(&engine.parallel_commits),
    );
    let _ = writeln!(out, "# HELP twopc_txns_recovered_total Staged txns this node settled by status recovery.");
    let _ = writeln!(out, "# TYPE twopc_txns_recovered_total counter");
    for (decision, value) in [("commit", c(&engine.recovered_commits)), ("abort", c(&engine.recovered_aborts))] {
        let _ = writeln!(out, "twopc_txns_recovered_total{{decision=\"{decision}\"}} {value}");
    }
    counter(
        &mut out,
        "twopc_calls_waited_on_running_total",
        "Calls (Submit, Commit, Rollback, Resolve, recovery) that found their txn being driven on this node and waited.",
        c(&engine.waited_on_running),
    );
    counter(&mut out, "twopc_resolves_total", "Resolve calls answered.", c(&engine.resolved));
    counter(
        &mut out,
        "twopc_decisions_delivered_total",
        "Decisions acknowledged by participants.",
        c(&engine.delivered),
    );
    counter(
        &mut out,
        "twopc_ack_entries_total",
        "Acknowledge entries logged; decisions delivered per entry is twopc_decisions_delivered_total over this.",
        c(&engine.ack_entries),
    );
    counter(
        &mut out,
        "twopc_delivery_retries_total",
        "Decide calls that failed and will be retried.",
        c(&engine.delivery_retries),
    );
    gauge(
        &mut out,
        "twopc_txns_in_doubt",
        "Decided txns some participant has not acknowledged.",
        gauges.unacknowledged as u64,
    );
    gauge(&mut out, "twopc_txns_begun", "Interactive txns begun and not decided.", gauges.begun as u64);
    gauge(
        &mut out,
        "twopc_txns_staged",
        "One-shot txns staged under parallel commit whose decision is not logged yet.",
        gauges.staged as u64,
    );
    gauge(&mut out, "twopc_raft_term", "Current raft term.", status.term);
    gauge(&mut out, "twopc_raft_is_leader", "1 on the leader.", u64::from(status.role == Role::Leader));
    gauge(&mut out, "twopc_raft_committed_index", "Raft committed index.", status.raft_committed_index);
    gauge(&mut out, "twopc_raft_applied_index", "Applied index of the state machine.", status.applied_index);
    gauge(&mut out, "twopc_raft_first_log_index", "First index still in the log.", status.first_log_index);
    counter(&mut out, "twopc_raft_log_syncs_total", "Raft log writes fsync'd by this node.", status.log_syncs);
    summary(
        &mut out,
        "twopc_submit_seconds",
        "Submit (and interactive Commit) latency on the leader, call to answer.",
        &phases.submit,
    );
    summary(&mut out, "twopc_prepare_seconds", "Prepare phase latency.", &phases.prepare);
    summary(
        &mut out,
        "twopc_decide_seconds",
        "Decision log latency (propose to applied; under parallel commit, off the critical path, from the answer, decision_linger_ms included).",
        &phases.decide,
    );
    summary(
        &mut out,
        "twopc_staged_seconds",
        "Parallel commit: Staged entry latency (propose to applied).",
        &phases.staged,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_quantiles_in_prometheus_text() {
        let engine = EngineMetrics::default();
        engine.committed.fetch_add(3, Ordering::Relaxed);
        engine.timed_out.fetch_add(2, Ordering::Relaxed);
        engine.joined.fetch_add(5, Ordering::Relaxed);
        let phases = PhaseLatencies::default();
        phases.submit.record(Duration::from_millis(2));
        let text =
            render(&NodeStatus::default(), &engine, &phases, TxnGauges { unacknowledged: 0, begun: 4, staged: 0 });
        assert!(text.contains("twopc_txns_committed_total 3"));
        assert!(text.contains("twopc_txns_aborted_total{cause=\"timed_out\"} 2"));
        assert!(text.contains("twopc_branches_joined_total 5"));
        assert!(text.contains("twopc_txns_begun 4"));
        assert!(text.contains("twopc_submit_seconds_count 1"));
        assert!(text.contains("twopc_txns_aborted_total{cause=\"vote_no\"} 0"));
    }
}
