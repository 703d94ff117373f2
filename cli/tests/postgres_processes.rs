//! The bank on PostgreSQL as a user meets it: real `twopc` processes (3
//! coordinators, bank-a on the embedded store, bank-b with `--store
//! postgres://...`), driven through the command line, with the server's
//! pg_prepared_xacts read directly. Skipped where no server allows prepared
//! transactions, unless TWOPC_REQUIRE_POSTGRES=1.

// Amounts are written as units_cents (150_00 is 150.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod processes;

use std::net::TcpListener;
use std::sync::Arc;

use bytes::Bytes;
use processes::{Processes, stderr, stdout};
use twopc_bank::BranchPayload;
use twopc_participant::postgres_testing::{self, Cleanup, TestDatabase};
use twopc_participant::{Participant, ParticipantConfig, Resource, ResourceError};
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, Vote, pb};

/// bank-b's gids on the server.
const GID_PREFIX: &str = "twopc:bank-b:";

/// The cluster with bank-b on PostgreSQL in a schema of its own, seeded
/// with alice@bank-a 100.00 and bob@bank-b 50.00.
struct PgCluster {
    p: Processes,
    db: TestDatabase,
    schema: String,
    _cleanup: Cleanup,
}

async fn start(test: &str) -> Option<PgCluster> {
    let db = postgres_testing::database(test).await?;
    let schema = postgres_testing::unique_name("twopc_mp");
    let cleanup = Cleanup::new(&db.url);
    cleanup.schema(&schema, GID_PREFIX);
    let args = vec!["--store".into(), db.url.clone(), "--pg-schema".into(), schema.clone()];
    let p = Processes::start_with(args).await;
    for (bank, account, balance) in [("bank-a", "alice", "100.00"), ("bank-b", "bob", "50.00")] {
        let out = p.twopc(&["accounts", bank, "--create", account, "--balance", balance]).await;
        assert!(out.status.success(), "creating {account}@{bank}: {}", stderr(&out));
    }
    Some(PgCluster { p, db, schema, _cleanup: cleanup })
}

impl PgCluster {
    async fn prepared(&self, txn: TxnId) -> bool {
        postgres_testing::prepared_gids(&self.db.url, &format!("{GID_PREFIX}{txn}")).await.len() == 1
    }

    /// The state and settled flag of `txn`'s row in bank-b's twopc_branches.
    async fn row(&self, txn: TxnId) -> Option<(String, bool)> {
        let (client, connection) = tokio_postgres_connect(&self.db.url).await.expect("connect to the test server");
        let sql = format!("SELECT state, settled FROM \"{}\".twopc_branches WHERE gid = $1", self.schema);
        let row = client.query_opt(&sql, &[&format!("{GID_PREFIX}{txn}")]).await.expect("read twopc_branches");
        drop(client);
        let _ = connection.await;
        row.map(|r| (r.get(0), r.get(1)))
    }

    /// How many of bank-b's rows are reserved (prepared or abandoned) or not settled.
    async fn unsettled(&self) -> i64 {
        let (client, connection) = tokio_postgres_connect(&self.db.url).await.expect("connect to the test server");
        let sql =
            format!("SELECT count(*) FROM \"{}\".twopc_branches WHERE state = 'reserved' OR NOT settled", self.schema);
        let n = client.query_one(&sql, &[]).await.expect("read twopc_branches").get(0);
        drop(client);
        let _ = connection.await;
        n
    }

    /// Submits `branches` in the background; the task returns the outcome.
    fn submit(&self, txn: TxnId, branches: Vec<pb::Branch>) -> tokio::task::JoinHandle<pb::SubmitResponse> {
        let request = pb::SubmitRequest { txn_id: txn.to_string(), branches, deadline_unix_ms: unix_now_ms() + 20_000 };
        let addrs = self.p.coordinator_addrs.clone();
        tokio::spawn(async move {
            let client = twopc_client::ClusterClient::new(addrs, Default::default()).expect("client");
            client
                .coordinator(|mut c: CoordinatorClient<_>| {
                    let request = request.clone();
                    async move { c.submit(request).await }
                })
                .await
                .expect("the cluster answers")
        })
    }
}

async fn tokio_postgres_connect(
    url: &str,
) -> Result<
    (twopc_participant::postgres::tokio_postgres::Client, tokio::task::JoinHandle<()>),
    twopc_participant::postgres::tokio_postgres::Error,
> {
    use twopc_participant::postgres::tokio_postgres;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    Ok((client, tokio::spawn(async move { drop(connection.await) })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_between_an_embedded_and_a_postgres_bank_commit_and_overdrafts_abort() {
    // I1 + I8 across store kinds: a transfer from the redb bank to the
    // PostgreSQL bank commits at both; an overdraft at the PostgreSQL bank
    // aborts with its reason; the total never changes.
    let Some(c) = start("transfers_between_an_embedded_and_a_postgres_bank_commit_and_overdrafts_abort").await else {
        return;
    };
    let p = &c.p;
    let out = p.twopc(&["transfer", "--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "12.50"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("committed"), "{}", stdout(&out));

    let out = p.twopc(&["transfer", "--from", "bob@bank-b", "--to", "alice@bank-a", "--amount", "1000"]).await;
    assert_eq!(out.status.code(), Some(3), "an overdraft aborts with exit code 3: {}", stderr(&out));
    assert!(stderr(&out).contains("insufficient funds in bob"), "{}", stderr(&out));

    let out = p.twopc(&["transfer", "--from", "bob@bank-b", "--to", "alice@bank-a", "--amount", "2.50"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let settled =
        p.wait("decisions delivered", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) }).await;
    assert_eq!(settled.0, 150_00, "the total is unchanged");
    assert_eq!(p.balance(0, "alice").await, Some(90_00));
    assert_eq!(p.balance(1, "bob").await, Some(60_00));
    assert_eq!(c.unsettled().await, 0, "bank-b holds branches that are not settled");
}

/// A participant whose Prepare waits until the test opens the gate, then
/// votes YES: it keeps a txn in its prepare phase for as long as the test needs.
struct Gate(tokio::sync::Semaphore);

impl Resource for Gate {
    async fn prepare(&self, _txn: TxnId, _payload: Bytes) -> Result<Vote, ResourceError> {
        self.0.acquire().await.map_err(|e| ResourceError::Fatal(e.to_string()))?.forget();
        Ok(Vote::Yes)
    }
    async fn commit(&self, _txn: TxnId) -> Result<(), ResourceError> {
        Ok(())
    }
    async fn abort(&self, _txn: TxnId) -> Result<(), ResourceError> {
        Ok(())
    }
    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_bank_killed_after_prepare_transaction_commits_its_branch_after_restart() {
    // I1 + I4 + I7: bank-b dies holding a prepared transaction; the txn is
    // decided Commit while it is down; the prepared transaction stays in
    // pg_prepared_xacts (nothing is released on a timer) until the restarted
    // bank settles it through the cluster with COMMIT PREPARED, and the
    // credit is applied exactly once.
    let Some(mut c) = start("a_postgres_bank_killed_after_prepare_transaction_commits_its_branch_after_restart").await
    else {
        return;
    };
    let gate = Arc::new(Gate(tokio::sync::Semaphore::new(0)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let gate_addr = listener.local_addr().expect("its address").to_string();
    let config = ParticipantConfig::new("gate".parse().expect("id"), c.p.coordinator_addrs.clone());
    let participant = Participant::new(Arc::clone(&gate), config).expect("participant");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(participant.serve(listener, async move { drop(stopped.await) }));
    let out = c.p.twopc(&["participants", "register", "gate", &gate_addr]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let txn = TxnId::new();
    let credit = BranchPayload::credit("bob".parse().expect("name"), 25_00).expect("payload");
    let submit = c.submit(
        txn,
        vec![
            pb::Branch { participant: "bank-b".into(), payload: credit.encode() },
            pb::Branch { participant: "gate".into(), payload: Bytes::from_static(b"x") },
        ],
    );
    c.p.wait("bank-b's PREPARE TRANSACTION", |_| async { c.prepared(txn).await.then_some(()) }).await;
    c.p.banks[1].kill().await;
    gate.0.add_permits(1);
    let outcome = submit.await.expect("submit task");
    assert_eq!(outcome.decision, pb::Decision::Commit as i32, "both voted YES");
    assert!(c.prepared(txn).await, "the prepared transaction was released while its bank was down");
    assert_eq!(c.row(txn).await, Some(("reserved".into(), false)), "visible as committed before COMMIT PREPARED");

    c.p.banks[1].restart();
    c.p.wait("bank-b to commit the prepared transaction", |_| async { (!c.prepared(txn).await).then_some(()) }).await;
    let settled =
        c.p.wait("bank-b's branch settled", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) })
            .await;
    assert_eq!(settled.0, 175_00, "25.00 minted by the gate's side of the txn, credited once");
    assert_eq!(c.p.balance(1, "bob").await, Some(75_00));
    assert_eq!(c.row(txn).await, Some(("committed".into(), true)));
    let _ = stop.send(());
    let _ = served.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_bank_killed_after_prepare_transaction_rolls_its_branch_back_after_restart() {
    // I4 + I7: bank-b dies holding a prepared debit; the txn aborts (the
    // other participant never votes); after the restart the bank resolves
    // the branch through the cluster, ROLLBACK PREPARED removes the gid, and
    // the hold is released, not applied.
    let Some(mut c) =
        start("a_postgres_bank_killed_after_prepare_transaction_rolls_its_branch_back_after_restart").await
    else {
        return;
    };
    // A participant that accepts connections and never answers.
    let hole = TcpListener::bind("127.0.0.1:0").expect("a port");
    let hole_addr = hole.local_addr().expect("its address").to_string();
    let out = c.p.twopc(&["participants", "register", "bank-hole", &hole_addr]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let txn = TxnId::new();
    let debit = BranchPayload::debit("bob".parse().expect("name"), 30_00).expect("payload");
    let submit = c.submit(
        txn,
        vec![
            pb::Branch { participant: "bank-b".into(), payload: debit.encode() },
            pb::Branch { participant: "bank-hole".into(), payload: Bytes::from_static(b"x") },
        ],
    );
    c.p.wait("bank-b's PREPARE TRANSACTION", |_| async { c.prepared(txn).await.then_some(()) }).await;
    c.p.banks[1].kill().await;
    let outcome = submit.await.expect("submit task");
    assert_eq!(outcome.decision, pb::Decision::Abort as i32, "bank-hole never voted");
    assert!(c.prepared(txn).await, "the prepared transaction was released while its bank was down");

    c.p.banks[1].restart();
    c.p.wait("bank-b to roll the prepared transaction back", |_| async { (!c.prepared(txn).await).then_some(()) })
        .await;
    let settled =
        c.p.wait("bank-b's hold released", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) })
            .await;
    assert_eq!(settled.0, 150_00, "the total is unchanged");
    assert_eq!(c.p.balance(1, "bob").await, Some(50_00), "the aborted debit was released, not applied");
    assert_eq!(c.row(txn).await, Some(("aborted".into(), true)));
    drop(hole);
}
