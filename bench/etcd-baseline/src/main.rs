//! The etcd baseline for `twopc bench`: `--concurrency` clients each write
//! one "first writer wins" decision record at a time into an etcd cluster,
//! the work a 2PC coordinator on etcd would do per transaction: a Txn that
//! puts `decision/<txn id>` only if the key does not exist yet
//! (create_revision == 0), and otherwise reads the decision already there.
//!
//! Reports writes/s and latency percentiles from an HDR histogram, as text
//! or (`--json`) in the shape `twopc bench --baseline-json` reads.
//!
//! Usage: etcd-baseline [--endpoints URL,...] [--concurrency N] [--duration SECS]
//!                      [--warmup SECS] [--connections N] [--json]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use hdrhistogram::Histogram;
use rand::Rng as _;

struct Args {
    endpoints: Vec<String>,
    concurrency: usize,
    duration: u64,
    warmup: u64,
    connections: usize,
    json: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        endpoints: vec!["http://127.0.0.1:2379".into()],
        concurrency: 64,
        duration: 10,
        warmup: 2,
        connections: 4,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoints" => args.endpoints = value()?.split(',').map(str::to_owned).collect(),
            "--concurrency" | "-c" => args.concurrency = value()?.parse().context("--concurrency")?,
            "--duration" | "-d" => args.duration = value()?.parse().context("--duration")?,
            "--warmup" => args.warmup = value()?.parse().context("--warmup")?,
            "--connections" => args.connections = value()?.parse().context("--connections")?,
            "--json" => args.json = true,
            other => bail!("unknown argument {other}; see the usage at the top of src/main.rs"),
        }
    }
    if args.concurrency == 0 || args.connections == 0 || args.duration == 0 {
        bail!("--concurrency, --connections and --duration must be at least 1");
    }
    Ok(args)
}

/// A decision record about the size of twopc's Decide entry for a two-branch
/// transfer: the decision and each branch's vote.
const DECISION: &[u8] = b"decision=commit;bank-a=yes;bank-b=yes;reason=";

#[derive(Default)]
struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    errors: AtomicU64,
    /// Txns whose key already existed (never, with fresh random keys).
    lost_races: AtomicU64,
}

async fn worker(mut client: Client, shared: Arc<Shared>, prefix: u64) -> anyhow::Result<(Histogram<u64>, Instant)> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut last_end = Instant::now();
    let mut seq: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let measured = shared.measuring.load(Ordering::Acquire);
        seq += 1;
        let key = format!("twopc-bench/decision/{prefix:016x}{seq:016x}");
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), DECISION, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let began = Instant::now();
        let result = client.txn(txn).await;
        last_end = Instant::now();
        match result {
            Ok(response) => {
                if !response.succeeded() {
                    shared.lost_races.fetch_add(1, Ordering::Relaxed);
                }
                if measured {
                    latency.saturating_record(u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                }
            }
            Err(err) => {
                if measured {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                eprintln!("etcd txn failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok((latency, last_end))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(Client::connect(&args.endpoints, None).await.context("connecting to etcd")?);
    }
    let shared = Arc::new(Shared::default());
    let mut rng = rand::rng();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|i| tokio::spawn(worker(clients[i % clients.len()].clone(), shared.clone(), rng.random())))
        .collect();
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    shared.measuring.store(true, Ordering::Release);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut last_end = started;
    for worker in workers {
        let (h, end) = worker.await??;
        latency.add(&h)?;
        last_end = last_end.max(end);
    }
    let elapsed_s = last_end.duration_since(started).as_secs_f64().max(0.001);
    let writes = latency.len();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let per_second = writes as f64 / elapsed_s;
    if args.json {
        let report = serde_json::json!({
            "system": "etcd",
            "endpoints": args.endpoints,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "duration_s": args.duration,
            "elapsed_s": elapsed_s,
            "writes": writes,
            "errors": shared.errors.load(Ordering::Relaxed),
            "lost_races": shared.lost_races.load(Ordering::Relaxed),
            "throughput_per_s": per_second,
            "latency_ms": {
                "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p99_9": ms(0.999),
                "max": latency.max() as f64 / 1000.0, "mean": latency.mean() / 1000.0,
            },
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "etcd baseline: {} clients, {} s: {writes} decision records, {per_second:.1} writes/s, {} errors",
            args.concurrency,
            args.duration,
            shared.errors.load(Ordering::Relaxed)
        );
        println!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            latency.max() as f64 / 1000.0
        );
    }
    Ok(())
}
