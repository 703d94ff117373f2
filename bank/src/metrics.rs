//! [`BankMetrics`]: what a bank's `GET /metrics` shows (`twopc bank
//! --metrics-listen`): its participant's counters (prepares, votes,
//! decisions, in-doubt branches) and, with events on, its outbox relay's
//! (events published and waiting, failures, whether the last attempt
//! succeeded).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use twopc_participant::Metrics;
use twopc_participant::outbox::RelayStats;
use twopc_proto::metrics_http::{counter, gauge};

/// The handles a bank's metrics are read from.
#[derive(Debug, Clone)]
pub struct BankMetrics {
    /// The participant's counters.
    pub participant: Metrics,
    /// The outbox relay's, when events are on.
    pub relay: Option<Arc<RelayStats>>,
}

impl BankMetrics {
    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let p = self.participant.snapshot();
        let counters = [
            ("twopc_bank_prepares_total", "Prepare requests handled, repeats included.", p.prepares),
            ("twopc_bank_votes_yes_total", "YES votes cast.", p.votes_yes),
            ("twopc_bank_votes_no_total", "NO votes cast (insufficient funds, outbox full, ...).", p.votes_no),
            ("twopc_bank_commits_total", "Commit decisions applied.", p.commits),
            ("twopc_bank_aborts_total", "Abort decisions applied, tombstones included.", p.aborts),
            ("twopc_bank_resolves_total", "In-doubt branches settled by asking the coordinators.", p.resolves),
            ("twopc_bank_joins_total", "Branches joined to interactive txns.", p.joins),
            ("twopc_bank_join_refusals_total", "Joins the coordinators refused.", p.join_refusals),
        ];
        for (name, help, value) in counters {
            counter(&mut out, name, help, value);
        }
        gauge(&mut out, "twopc_bank_in_doubt", "Branches that voted YES and await their decision.", p.in_doubt_now);
        if let Some(relay) = &self.relay {
            let c = |m: &std::sync::atomic::AtomicU64| m.load(Ordering::Relaxed);
            let counters = [
                ("twopc_outbox_published_total", "Events the stream acknowledged as new.", c(&relay.published)),
                (
                    "twopc_outbox_duplicates_total",
                    "Events the stream acknowledged as repeats (dropped by de-duplication).",
                    c(&relay.duplicates),
                ),
                (
                    "twopc_outbox_batches_total",
                    "Batches of events published (at least one acknowledged).",
                    c(&relay.batches),
                ),
                (
                    "twopc_outbox_failures_total",
                    "Relay attempts that failed (NATS unreachable, no PubAck, the store) and were retried.",
                    c(&relay.failures),
                ),
            ];
            for (name, help, value) in counters {
                counter(&mut out, name, help, value);
            }
            gauge(
                &mut out,
                "twopc_outbox_waiting",
                "Outbox entries waiting for NATS (events not yet acknowledged, branches with staged events); \
                 past outbox_max the bank votes NO.",
                c(&relay.waiting),
            );
            let healthy = u64::from(relay.healthy.load(Ordering::Relaxed));
            gauge(&mut out, "twopc_outbox_healthy", "1 when the relay's last attempt succeeded, else 0.", healthy);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Participant counters always; the relay's only with events on.
    #[test]
    fn renders_the_participant_and_the_relays_counters() {
        let relay = Arc::new(RelayStats::default());
        relay.published.fetch_add(7, Ordering::Relaxed);
        relay.healthy.store(true, Ordering::Relaxed);
        relay.waiting.store(3, Ordering::Relaxed);
        let metrics = BankMetrics { participant: Metrics::default(), relay: Some(relay) };
        let text = metrics.render();
        assert!(text.contains("twopc_bank_prepares_total 0"), "{text}");
        assert!(text.contains("twopc_outbox_published_total 7"), "{text}");
        assert!(text.contains("twopc_outbox_healthy 1"), "{text}");
        assert!(text.contains("twopc_outbox_waiting 3"), "{text}");
        let without = BankMetrics { relay: None, ..metrics }.render();
        assert!(without.contains("twopc_bank_in_doubt 0") && !without.contains("twopc_outbox"), "{without}");
    }
}
