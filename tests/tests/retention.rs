//! Retention (docs/PROTOCOL.md §7.2, I6): finished txns leave the state
//! machine and its snapshots once past the retention window, so memory and
//! snapshot size stay flat under sustained load.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, pb};
use twopc_tests::cluster::Cluster;
use twopc_tests::participants::TestParticipant;
use twopc_tests::wait;

const TXNS: usize = 200_000;
const CONCURRENCY: usize = 128;
const RETENTION_MS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_txns_leave_only_those_inside_the_retention_window() -> anyhow::Result<()> {
    let cluster = Cluster::start_with(
        3,
        Box::new(|c| {
            c.engine.retention_ms = RETENTION_MS;
            c.engine.deadline_max_ms = 1_000;
            c.engine.gc_interval_ms = 200;
            c.snapshot_interval_entries = 20_000;
        }),
    )
    .await?;
    cluster.wait_for_leader().await?;
    let a = TestParticipant::start("bank-a", cluster.addrs(), 5_000).await?;
    let b = TestParticipant::start("bank-b", cluster.addrs(), 5_000).await?;
    cluster.register("bank-a", a.addr).await?;
    cluster.register("bank-b", b.addr).await?;
    let client = Arc::new(cluster.client()?);
    let committed = Arc::new(AtomicUsize::new(0));
    let mut peak_records = 0;
    let mut done = 0usize;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..TXNS)
        .map(|_| {
            let client = client.clone();
            let committed = committed.clone();
            async move {
                let request = pb::SubmitRequest {
                    txn_id: TxnId::new().to_string(),
                    branches: vec![
                        pb::Branch { participant: "bank-a".into(), payload: "debit".into() },
                        pb::Branch { participant: "bank-b".into(), payload: "credit".into() },
                    ],
                    deadline_unix_ms: unix_now_ms() + 1_000,
                };
                let response = client
                    .coordinator(|mut c| {
                        let request = request.clone();
                        async move { c.submit(request).await }
                    })
                    .await?;
                if response.decision == pb::Decision::Commit as i32 {
                    committed.fetch_add(1, Ordering::Relaxed);
                } else {
                    tracing::warn!(reason = %response.reason, "aborted");
                }
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .inspect(|_| {
            done += 1;
            if done.is_multiple_of(10_000) {
                let leader = cluster.running()[0];
                peak_records = peak_records.max(cluster.node(leader).local_read(|sm| sm.txn_count()));
            }
        })
        .collect()
        .await;
    for result in results {
        result?;
    }
    assert!(committed.load(Ordering::Relaxed) > TXNS * 99 / 100, "almost every txn commits");
    // Once the last txn is older than the window, the table drains.
    let horizon_check = |records: &twopc_coordinator::state_machine::StateMachine| {
        let oldest_allowed = unix_now_ms().saturating_sub(RETENTION_MS + 2_000);
        records
            .list(twopc_coordinator::state_machine::ListFilter::All, u64::MAX, None, usize::MAX)
            .iter()
            .all(|r| r.txn_id.created_unix_ms() >= oldest_allowed)
    };
    let remaining =
        wait::until("records past retention to be forgotten on every node", Duration::from_secs(30), || async {
            let states = cluster.states();
            states
                .values()
                .all(|sm| horizon_check(sm) && sm.txn_count() < TXNS / 10)
                .then(|| states.values().map(|sm| sm.txn_count()).max().unwrap_or(0))
        })
        .await?;
    let snapshot_bytes = cluster.states().values().map(|sm| sm.to_snapshot().len()).max().unwrap_or(0);
    println!("peak records {peak_records}, remaining {remaining}, snapshot {snapshot_bytes} bytes");
    assert!(peak_records < TXNS, "records were forgotten while the load ran (peak {peak_records})");
    // Each remaining record is ~100 bytes in a snapshot; 200,000 kept would be ~20 MB.
    assert!(snapshot_bytes < TXNS * 100 / 10, "snapshot of {snapshot_bytes} bytes");
    cluster.stop().await
}
