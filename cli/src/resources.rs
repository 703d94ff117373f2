//! What a local cluster's processes hold: each one's resident memory and the
//! size of its data directory, read from /proc and the file system. `twopc
//! bench --sample-every` samples them through the measurement, so a long run
//! shows whether memory and disk level off (retention, log compaction, the
//! banks' garbage collection) or keep growing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::local_cluster::LocalCluster;
use super::output::table;

/// How often the sampler checks whether the run has started or stopped.
const POLL: Duration = Duration::from_millis(100);

/// Every process of the cluster at one moment of the measurement.
pub struct Sample {
    /// Seconds since the measurement started.
    pub at_s: f64,
    /// Coordinators first, then banks, in the cluster's order.
    pub processes: Vec<ProcessSample>,
}

/// One process at one moment.
pub struct ProcessSample {
    pub name: String,
    /// None while the process is down (killed and not yet restarted).
    pub rss_kib: Option<u64>,
    /// The apparent size of every file under its data directory.
    pub disk_bytes: u64,
}

/// Samples every `every` from when `measuring` turns on until `stop` does.
/// At most one sample per `every` of the run, so the list is bounded by the
/// run's duration.
pub async fn sample_while_measuring(
    cluster: &LocalCluster,
    every: Duration,
    measuring: &AtomicBool,
    stop: &AtomicBool,
    since_start: impl Fn() -> Duration,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut next_at = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        if measuring.load(Ordering::Acquire) && since_start() >= next_at {
            samples.push(sample(cluster, since_start()).await);
            next_at += every;
        }
        tokio::time::sleep(POLL).await;
    }
    samples
}

async fn sample(cluster: &LocalCluster, at: Duration) -> Sample {
    let mut processes = Vec::new();
    for proc in cluster.coordinators.iter().chain(cluster.banks.iter()) {
        let proc = proc.lock().await;
        processes.push(ProcessSample {
            name: proc.name.clone(),
            rss_kib: proc.pid().and_then(rss_kib),
            disk_bytes: proc.data_dir().map(dir_bytes).unwrap_or_default(),
        });
    }
    Sample { at_s: at.as_secs_f64(), processes }
}

/// One row per sample: each process's RSS and data directory, in MiB.
pub fn print(samples: &[Sample]) {
    let Some(first) = samples.first() else { return };
    let headers: Vec<String> = std::iter::once("AT S".to_owned())
        .chain(first.processes.iter().map(|p| format!(" {} RSS/DATA MIB", p.name)))
        .collect();
    let rows: Vec<Vec<String>> = samples
        .iter()
        .map(|s| {
            std::iter::once(format!("{:.0}", s.at_s))
                .chain(s.processes.iter().map(|p| {
                    let rss = p.rss_kib.map_or_else(|| "-".into(), |k| format!("{:.0}", k as f64 / 1024.0));
                    format!("{rss}/{:.1}", p.disk_bytes as f64 / (1024.0 * 1024.0))
                }))
                .collect()
        })
        .collect();
    println!();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    table(&headers, &rows);
}

pub fn to_json(samples: &[Sample]) -> Value {
    json!(
        samples
            .iter()
            .map(|s| json!({
                "at_s": s.at_s,
                "processes": s.processes.iter().map(|p| json!({
                    "name": p.name, "rss_kib": p.rss_kib, "disk_bytes": p.disk_bytes,
                })).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

/// VmRSS of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The apparent size of every file under `path`.
pub fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The bench's disk figures: every file under a data dir counts once,
    // however deep, at its apparent size.
    #[test]
    fn dir_bytes_sums_every_file_below_the_dir() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a"), [0u8; 10])?;
        std::fs::create_dir_all(dir.path().join("log/sub"))?;
        std::fs::write(dir.path().join("log/b"), [0u8; 20])?;
        let sparse = std::fs::File::create(dir.path().join("log/sub/c"))?;
        sparse.set_len(4096)?;
        assert_eq!(dir_bytes(dir.path()), 10 + 20 + 4096);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
        Ok(())
    }
}
