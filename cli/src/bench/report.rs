//! The report of a `twopc bench` run: throughput, latency percentiles, the
//! per-second timeline, failover after a leader kill, the processes'
//! resources and the ratio to a baseline, as a table or as JSON.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{BenchArgs, Contention, ProcessInfo, Run, SLOT, SLOTS_PER_SECOND, Slot};
use crate::output::table;
use crate::resources;

/// Another system's figures: its name and writes per second.
pub(super) struct Baseline {
    system: String,
    per_second: f64,
    raw: Value,
}

pub(super) fn read_baseline(path: &Path) -> anyhow::Result<Baseline> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let per_second = raw["throughput_per_s"]
        .as_f64()
        .with_context(|| format!("{} has no numeric throughput_per_s", path.display()))?;
    let system = raw["system"].as_str().unwrap_or("baseline").to_owned();
    Ok(Baseline { system, per_second, raw })
}

/// Percentiles in milliseconds.
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    fn to_json(&self) -> Value {
        json!({ "p50": self.p50, "p90": self.p90, "p99": self.p99, "p99_9": self.p999, "max": self.max,
                "mean": self.mean })
    }
}

struct Second {
    committed: u64,
    aborted: u64,
    other: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// How throughput behaved around a leader kill.
struct Failover {
    killed_at_s: f64,
    before_per_s: f64,
    /// Seconds from the kill to the end of the first 1 s window with at least
    /// half the earlier rate.
    recovered_after_s: Option<f64>,
}

pub(super) struct Report {
    title: String,
    pub(super) committed: u64,
    totals: Slot,
    elapsed_s: f64,
    per_second: f64,
    latency: Percentiles,
    timeline: Vec<Second>,
    events: Vec<(Duration, String)>,
    failover: Option<Failover>,
    reasons: Vec<(String, u64)>,
    processes: Option<Vec<ProcessInfo>>,
    samples: Vec<resources::Sample>,
    baseline: Option<Baseline>,
    config: Value,
}

impl Report {
    pub(super) fn new(
        args: &BenchArgs,
        banks: &[(String, String)],
        run: &Run,
        processes: Option<Vec<ProcessInfo>>,
        samples: Vec<resources::Sample>,
        baseline: Option<Baseline>,
    ) -> Self {
        let recorder = run.recorder.lock();
        let started = run.started.lock().unwrap_or_else(Instant::now);
        // Until the last measured transfer ended: in-flight ones count, and so does their time.
        let elapsed_s = recorder.last_end.map_or(0.0, |end| end.duration_since(started).as_secs_f64()).max(0.001);
        let timeline = recorder
            .slots
            .chunks(SLOTS_PER_SECOND)
            .enumerate()
            .map(|(second, slots)| {
                let sum = |f: fn(&Slot) -> u64| slots.iter().map(f).sum::<u64>();
                let latency = recorder.per_second.get(second);
                Second {
                    committed: sum(|s| s.committed),
                    aborted: sum(|s| s.aborted),
                    other: sum(|s| s.unknown + s.errors),
                    p50_ms: latency.map_or(0.0, |h| h.value_at_quantile(0.5) as f64 / 1000.0),
                    p99_ms: latency.map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0),
                }
            })
            .collect();
        let events = run.events.lock().clone();
        let failover =
            events.iter().find(|(_, what)| what.starts_with("SIGKILL")).map(|(at, _)| failover(&recorder.slots, *at));
        let contention = match args.contention {
            Contention::Uniform => "uniform".to_owned(),
            Contention::Hot => format!("hot ({} accounts per bank)", args.hot_accounts),
        };
        // --local starts the coordinators with it; a running cluster's own setting is not known here.
        let commit_protocol = match args.commit_protocol {
            Some(protocol) => protocol.to_string(),
            None if args.local => twopc_coordinator::config::CommitProtocol::default().to_string(),
            None => "the cluster's".to_owned(),
        };
        let with_events = if args.events { ", events to NATS" } else { "" };
        let title = format!(
            "{} transfers ({commit_protocol} commit{with_events}), {} banks, {} branches per transfer, {} clients, {}, {} accounts per bank, {contention}",
            args.mode.name(),
            banks.len(),
            args.branches,
            args.concurrency,
            match args.count {
                Some(count) => format!("{count} transfers"),
                None => format!("{} s (after {} s warm-up)", args.duration, args.warmup),
            },
            args.accounts,
        );
        let config = json!({
            "mode": args.mode.name(), "local": args.local, "commit_protocol": commit_protocol, "events": args.events,
            "coordinators": if args.local { json!(args.coordinators_count) } else { json!(args.cluster.coordinators) },
            "banks": banks.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
            "branches": args.branches, "concurrency": args.concurrency, "duration_s": args.duration,
            "count": args.count, "warmup_s": args.warmup, "accounts_per_bank": args.accounts,
            "contention": format!("{:?}", args.contention).to_lowercase(), "hot_accounts": args.hot_accounts,
            "connections": args.connections, "kill_leader_at_s": args.kill_leader_at,
            "release_build": !cfg!(debug_assertions),
            "bank_retention_ms": args.bank_retention_ms, "sample_every_s": args.sample_every,
        });
        Self {
            title,
            committed: recorder.totals.committed,
            totals: recorder.totals,
            elapsed_s,
            per_second: recorder.totals.committed as f64 / elapsed_s,
            latency: Percentiles::of(&recorder.latency),
            timeline,
            events,
            failover,
            reasons: recorder.reasons.clone(),
            processes,
            samples,
            baseline,
            config,
        }
    }

    fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().filter(|b| b.per_second > 0.0).map(|b| self.per_second / b.per_second)
    }

    pub(super) fn print(&self) {
        println!("\ntwopc bench: {}", self.title);
        println!(
            "committed {}  aborted {}  unknown {}  errors {}  in {:.2} s",
            self.totals.committed, self.totals.aborted, self.totals.unknown, self.totals.errors, self.elapsed_s
        );
        println!("throughput {:.1} committed transfers/s", self.per_second);
        let l = &self.latency;
        println!(
            "latency ms (committed): p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        for (reason, count) in &self.reasons {
            println!("  {count} x {reason}");
        }
        println!();
        let mut events = self.events.iter().peekable();
        let mut rows = Vec::new();
        for (second, s) in self.timeline.iter().enumerate() {
            let mut note = Vec::new();
            while let Some((at, what)) = events.next_if(|(at, _)| at.as_secs() as usize <= second) {
                note.push(format!("{:.2}s {what}", at.as_secs_f64()));
            }
            rows.push(vec![
                format!("{second}-{}", second + 1),
                s.committed.to_string(),
                s.aborted.to_string(),
                s.other.to_string(),
                format!("{:.2}", s.p50_ms),
                format!("{:.2}", s.p99_ms),
                note.join("; "),
            ]);
        }
        table(&["SECOND", " COMMITTED", " ABORTED", " UNKNOWN+ERR", " P50 MS", " P99 MS", "EVENT"], &rows);
        if let Some(f) = &self.failover {
            match f.recovered_after_s {
                Some(after) => println!(
                    "\nfailover: leader killed at {:.2} s; {:.0} committed/s before; a full second at half that \
                     or more ended {:.2} s after the kill",
                    f.killed_at_s, f.before_per_s, after
                ),
                None => println!(
                    "\nfailover: leader killed at {:.2} s; {:.0} committed/s before; never back to half within the run",
                    f.killed_at_s, f.before_per_s
                ),
            }
        }
        if let Some(processes) = &self.processes {
            println!();
            let per_transfer_us = |cpu_s: f64| cpu_s * 1e6 / self.committed.max(1) as f64;
            let mut rows: Vec<Vec<String>> = processes
                .iter()
                .map(|p| {
                    vec![
                        format!("{}{}", p.name, if p.leader { " (leader)" } else { "" }),
                        p.rss_kib.map_or_else(|| "-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
                        format!("{:.1}", p.disk_bytes as f64 / (1024.0 * 1024.0)),
                        p.cpu_s.map_or_else(|| "-".into(), |s| format!("{s:.2}")),
                        p.cpu_s.map_or_else(|| "-".into(), |s| format!("{:.0}", per_transfer_us(s))),
                    ]
                })
                .collect();
            let cpu_total: f64 = processes.iter().filter_map(|p| p.cpu_s).sum();
            rows.push(vec![
                "all".into(),
                String::new(),
                String::new(),
                format!("{cpu_total:.2}"),
                format!("{:.0}", per_transfer_us(cpu_total)),
            ]);
            table(&["PROCESS", " RSS MIB", " DATA MIB", " CPU S", " CPU US/TRANSFER"], &rows);
        }
        resources::print(&self.samples);
        if let (Some(baseline), Some(ratio)) = (&self.baseline, self.ratio()) {
            println!(
                "\nbaseline {}: {:.1} writes/s; ratio twopc/{} = {ratio:.2}",
                baseline.system, baseline.per_second, baseline.system
            );
        }
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "system": "twopc",
            "config": self.config,
            "committed": self.totals.committed,
            "aborted": self.totals.aborted,
            "unknown": self.totals.unknown,
            "errors": self.totals.errors,
            "elapsed_s": self.elapsed_s,
            "throughput_per_s": self.per_second,
            "latency_ms": self.latency.to_json(),
            "reasons": self.reasons.iter().map(|(r, n)| json!({ "reason": r, "count": n })).collect::<Vec<_>>(),
            "timeline": self.timeline.iter().enumerate().map(|(second, s)| json!({
                "second": second, "committed": s.committed, "aborted": s.aborted, "unknown_or_error": s.other,
                "p50_ms": s.p50_ms, "p99_ms": s.p99_ms,
            })).collect::<Vec<_>>(),
            "events": self.events.iter().map(|(at, what)| json!({ "at_s": at.as_secs_f64(), "event": what }))
                .collect::<Vec<_>>(),
            "failover": self.failover.as_ref().map(|f| json!({
                "killed_at_s": f.killed_at_s, "before_per_s": f.before_per_s,
                "recovered_after_s": f.recovered_after_s,
            })),
            "processes": self.processes.as_ref().map(|ps| ps.iter().map(|p| json!({
                "name": p.name, "leader": p.leader, "rss_kib": p.rss_kib, "disk_bytes": p.disk_bytes,
                "cpu_s": p.cpu_s,
            })).collect::<Vec<_>>()),
            "cpu_us_per_transfer": self.processes.as_ref().map(|ps| {
                ps.iter().filter_map(|p| p.cpu_s).sum::<f64>() * 1e6 / self.committed.max(1) as f64
            }),
            "samples": resources::to_json(&self.samples),
            "baseline": self.baseline.as_ref().map(|b| b.raw.clone()),
            "ratio": self.ratio(),
        })
    }
}

/// The committed rate before `killed` and how soon after it a full second
/// reached half that rate again.
fn failover(slots: &[Slot], killed: Duration) -> Failover {
    let kill_slot = usize::try_from(killed.as_nanos() / SLOT.as_nanos()).unwrap_or(usize::MAX).min(slots.len());
    let before: u64 = slots[..kill_slot].iter().map(|s| s.committed).sum();
    let before_per_s = if kill_slot == 0 { 0.0 } else { before as f64 / (kill_slot as f64 * SLOT.as_secs_f64()) };
    let half_per_window = before_per_s / 2.0;
    let recovered_after_s = (kill_slot..slots.len().saturating_sub(SLOTS_PER_SECOND - 1))
        .find(|&start| {
            let window: u64 = slots[start..start + SLOTS_PER_SECOND].iter().map(|s| s.committed).sum();
            window as f64 >= half_per_window
        })
        .map(|start| (start + SLOTS_PER_SECOND) as f64 * SLOT.as_secs_f64() - killed.as_secs_f64());
    Failover { killed_at_s: killed.as_secs_f64(), before_per_s, recovered_after_s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(per_100ms: &[u64]) -> Vec<Slot> {
        per_100ms.iter().map(|&committed| Slot { committed, ..Slot::default() }).collect()
    }

    // The recovery time counts from the kill to the end of the first full second back at half the rate.
    #[test]
    fn failover_finds_the_first_second_back_at_half_rate() {
        let mut counts = vec![100; 20]; // 1000/s for 2 s
        counts.extend([0; 15]); // 1.5 s of nothing
        counts.extend([100; 20]);
        let f = failover(&slots(&counts), Duration::from_secs(2));
        assert!((f.before_per_s - 1000.0).abs() < 1e-9);
        // The window 3.0..4.0 s holds 500 (half): recovered 2.0 s after the kill.
        let after = f.recovered_after_s.expect("recovered");
        assert!((after - 2.0).abs() < 1e-9, "{after}");
        let never = failover(&slots(&[100, 100, 0, 0, 0]), Duration::from_millis(200));
        assert_eq!(never.recovered_after_s, None);
    }
}
