//! Replicated proposals per second on a 3-node loopback cluster (issue 3's
//! benchmark). Each proposal is a "first writer wins" decision record, the
//! same work a 3-member etcd cluster does for a `Txn` put-if-absent.
//!
//! Run: `cargo bench -p twopc-tests --bench raft_propose [-- SECONDS [CONCURRENCY...]]`
//! (defaults: 5 seconds at concurrency 1 and 64). Every fsync is on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use twopc_coordinator::command::{Command, DecideCmd, Proposal};
use twopc_coordinator::node::NodeHandle;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnId};
use twopc_tests::cluster::Cluster;

fn proposal() -> Proposal {
    let cmd = DecideCmd {
        txn_id: TxnId::new(),
        decision: Decision::Commit,
        reason: String::new(),
        branches: Vec::new(),
        payload_digests: Vec::new(),
    };
    Proposal { command: Command::Decide(cmd), proposed_unix_ms: unix_now_ms() }
}

/// Runs `concurrency` proposers for `duration`; returns every latency seen.
async fn run(leader: &NodeHandle, concurrency: usize, duration: Duration) -> anyhow::Result<Vec<Duration>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let leader = leader.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                leader.propose(&proposal()).await?;
                latencies.push(started.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await??);
    }
    all.sort_unstable();
    Ok(all)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(rank).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let seconds: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let levels: Vec<usize> =
        if args.len() > 1 { args[1..].iter().map(|s| s.parse()).collect::<Result<_, _>>()? } else { vec![1, 64] };
    // Production timings (100 ms ticks), not the test suite's fast ones.
    let cluster = Cluster::start_with(
        3,
        Box::new(|c| {
            c.tick_interval_ms = 100;
            c.request_timeout_ms = 10_000;
        }),
    )
    .await?;
    let leader = cluster.wait_for_leader().await?;
    let handle = cluster.node(leader).clone();
    println!("3-node loopback cluster, leader {leader}, {seconds} s per level, fsync on");
    println!(
        "{:>11} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "concurrency", "proposals/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for concurrency in levels {
        run(&handle, concurrency, Duration::from_secs(1)).await?; // warm-up
        let latencies = run(&handle, concurrency, Duration::from_secs(seconds)).await?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:>11} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            concurrency,
            latencies.len() as f64 / seconds as f64,
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.90)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        );
    }
    cluster.stop().await
}
