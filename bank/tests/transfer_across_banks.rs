//! I1, I8 end to end: transfers between two banks through an in-process
//! 3-node coordinator cluster commit at both banks or at neither; an
//! overdraft aborts with its reason; the total is unchanged. Also as
//! interactive txns (docs/PROTOCOL.md §12): Begin, Debit at one bank and
//! Credit at the other under the txn's context, then Commit or Rollback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use twopc_bank::{AccountStore, RedbStore, Transfer, server};
use twopc_client::ClusterClient;
use twopc_participant::ParticipantConfig;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, pb};
use twopc_tests::cluster::Cluster;
use twopc_tests::wait;

struct Bank {
    store: Arc<RedbStore>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<twopc_bank::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Bank {
    async fn start(name: &str, cluster: &Cluster) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(common::open(dir.path()).await);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = ParticipantConfig::new(name.parse()?, cluster.addrs());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, Arc::clone(&store), config, async move {
            let _ = stopped.await;
        }));
        cluster.register(name, addr).await?;
        Ok(Self { store, addr, stop: Some(stop), task, _dir: dir })
    }

    async fn balance(&self, account: &str) -> i64 {
        self.store.account(common::name(account)).await.expect("account").balance_minor
    }
}

impl Drop for Bank {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn transfer(client: &ClusterClient, from: &str, to: &str, minor: i64) -> anyhow::Result<pb::SubmitResponse> {
    let transfer = Transfer::new(from.parse()?, to.parse()?, minor)?;
    let request = pb::SubmitRequest {
        txn_id: TxnId::new().to_string(),
        branches: transfer.submit_branches(),
        deadline_unix_ms: unix_now_ms() + 10_000,
    };
    Ok(client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.submit(request).await }
        })
        .await?)
}

/// A 3-node cluster with bank-a (alice, 100.00) and bank-b (bob, 5.00), and a client of it.
async fn two_banks() -> anyhow::Result<(Cluster, Bank, Bank, ClusterClient)> {
    let cluster = Cluster::start(3).await?;
    cluster.wait_for_leader().await?;
    let a = Bank::start("bank-a", &cluster).await?;
    let b = Bank::start("bank-b", &cluster).await?;
    common::create(a.store.as_ref(), "alice", 10_000).await;
    common::create(b.store.as_ref(), "bob", 500).await;
    let client = cluster.client()?;
    Ok((cluster, a, b, client))
}

// I1 + I8: committed transfers move money between banks, an overdraft aborts with "insufficient funds", the total holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_across_two_banks() -> anyhow::Result<()> {
    let (cluster, a, b, client) = two_banks().await?;

    let done = transfer(&client, "alice@bank-a", "bob@bank-b", 1_250).await?;
    assert_eq!(done.decision, pb::Decision::Commit as i32, "{done:?}");
    // Phase 2 reaches bank-b after the client's answer: bob spends the credit
    // only once it is applied, or the next debit is rightly refused.
    wait::until("bob's credit applied at bank-b", Duration::from_secs(20), || async {
        (b.balance("bob").await == 500 + 1_250).then_some(())
    })
    .await?;
    let done = transfer(&client, "bob@bank-b", "alice@bank-a", 1_750).await?;
    assert_eq!(done.decision, pb::Decision::Commit as i32, "{done:?}");

    let overdraft = transfer(&client, "bob@bank-b", "alice@bank-a", 1_000_000).await?;
    assert_eq!(overdraft.decision, pb::Decision::Abort as i32);
    assert!(overdraft.reason.contains("insufficient funds"), "{overdraft:?}");

    // Decisions reach the banks after the client's answer; wait until nothing is held.
    wait::until("every branch decided at both banks", Duration::from_secs(20), || async {
        let idle = a.store.prepared().await.ok()?.is_empty() && b.store.prepared().await.ok()?.is_empty();
        idle.then_some(())
    })
    .await?;
    assert_eq!(a.balance("alice").await, 10_000 - 1_250 + 1_750);
    assert_eq!(b.balance("bob").await, 500 + 1_250 - 1_750);
    let total = a.store.totals().await?.balance_minor + b.store.totals().await?.balance_minor;
    assert_eq!(total, 10_500, "I8: money was created or destroyed");
    let _ = (a.addr, b.addr);
    drop((a, b));
    cluster.stop().await
}

async fn begin(client: &ClusterClient, timeout_ms: u64) -> anyhow::Result<twopc_participant::TxnContext> {
    let begun = client
        .coordinator(|mut c| async move { c.begin(pb::BeginRequest { txn_id: String::new(), timeout_ms }).await })
        .await?;
    let ctx = begun.context.ok_or_else(|| anyhow::anyhow!("Begin answered no context"))?;
    Ok(twopc_participant::TxnContext { txn_id: ctx.txn_id.parse()?, deadline_unix_ms: ctx.deadline_unix_ms })
}

// I1 + I8 + I3 for interactive txns: the banks' own Debit and Credit join the begun txn (holding
// the funds before they answer); Commit applies both branches, Rollback releases both, and a
// Debit the bank refuses is not joined, so the txn can only be rolled back; the total holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_transfers_across_two_banks() -> anyhow::Result<()> {
    let (cluster, a, b, client) = two_banks().await?;
    let mut bank_a = pb::bank_client::BankClient::connect(format!("http://{}", a.addr)).await?;
    let mut bank_b = pb::bank_client::BankClient::connect(format!("http://{}", b.addr)).await?;

    let ctx = begin(&client, 10_000).await?;
    bank_a.debit(common::move_request(Some(&ctx.header_value()), "alice", 1_250)).await?;
    bank_b.credit(common::move_request(Some(&ctx.header_value()), "bob", 1_250)).await?;
    assert_eq!(common::row(a.store.as_ref(), "alice").await, (10_000, 1_250, 0), "the debit holds nothing");
    let txn_id = ctx.txn_id.to_string();
    let done = client
        .coordinator(|mut c| {
            let txn_id = txn_id.clone();
            async move { c.commit(pb::CommitRequest { txn_id, branches: Vec::new() }).await }
        })
        .await?;
    assert_eq!(done.decision, pb::Decision::Commit as i32, "{done:?}");

    let rolled = begin(&client, 10_000).await?;
    bank_a.debit(common::move_request(Some(&rolled.header_value()), "alice", 100)).await?;
    let poor = bank_b.debit(common::move_request(Some(&rolled.header_value()), "bob", 1_000_000)).await;
    assert_eq!(poor.expect_err("overdraft").code(), tonic::Code::FailedPrecondition);
    let txn_id = rolled.txn_id.to_string();
    client
        .coordinator(|mut c| {
            let txn_id = txn_id.clone();
            async move { c.rollback(pb::RollbackRequest { txn_id, reason: "bob is short".into() }).await }
        })
        .await?;

    wait::until("every branch decided at both banks", Duration::from_secs(20), || async {
        let idle = a.store.prepared().await.ok()?.is_empty() && b.store.prepared().await.ok()?.is_empty();
        idle.then_some(())
    })
    .await?;
    assert_eq!(common::row(a.store.as_ref(), "alice").await, (10_000 - 1_250, 0, 0));
    assert_eq!(common::row(b.store.as_ref(), "bob").await, (500 + 1_250, 0, 0));
    let total = a.store.totals().await?.balance_minor + b.store.totals().await?.balance_minor;
    assert_eq!(total, 10_500, "I8: money was created or destroyed");
    drop((a, b));
    cluster.stop().await
}
