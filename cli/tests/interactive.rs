//! Interactive transactions (docs/PROTOCOL.md §12) from the application's
//! side, with real `twopc` processes (3 coordinators, 2 banks): the
//! `twopc_client::Transaction` handle calling the banks' own Debit and Credit
//! with the txn's context, `twopc transfer --interactive`, `twopc txn`
//! showing begun txns, and `twopc demo --interactive --chaos`. Each test
//! checks I1 (both branches get the one decision) and I8 (money conserved),
//! and that no hold outlives its txn (I4, I7).

// Amounts are written as units_cents (150_00 is 150.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod processes;

use std::time::Duration;

use processes::{Processes, stderr, stdout};
use tonic::transport::Channel;
use twopc_client::{Transaction, TxnInterceptor};
use twopc_proto::pb::bank_client::BankClient;
use twopc_proto::pb::{self, MoveRequest};
use twopc_proto::{Decision, TxnContext, TxnId};

const A: usize = 0;
const B: usize = 1;

async fn seed(p: &Processes) {
    for (bank, account, balance) in [("bank-a", "alice", "100.00"), ("bank-b", "bob", "50.00")] {
        let out = p.twopc(&["accounts", bank, "--create", account, "--balance", balance]).await;
        assert!(out.status.success(), "creating {account}@{bank}: {}", stderr(&out));
    }
}

/// Bank `index`'s API, every call carrying `txn`'s context.
async fn bank_in(
    p: &Processes,
    index: usize,
    txn: &Transaction,
) -> BankClient<tonic::service::interceptor::InterceptedService<Channel, TxnInterceptor>> {
    let channel = p.bank_channel(index).await.expect("the bank is up");
    BankClient::with_interceptor(channel, txn.interceptor())
}

/// Debits alice@bank-a and credits bob@bank-b `minor` under `txn`: both
/// branches prepared and joined when this returns.
async fn debit_and_credit(p: &Processes, txn: &Transaction, minor: i64) {
    bank_in(p, A, txn)
        .await
        .debit(MoveRequest { account: "alice".into(), amount_minor: minor })
        .await
        .expect("bank-a prepares and joins the debit");
    bank_in(p, B, txn)
        .await
        .credit(MoveRequest { account: "bob".into(), amount_minor: minor })
        .await
        .expect("bank-b prepares and joins the credit");
}

/// Waits until no bank holds anything, and returns the total balance.
async fn settled_total(p: &Processes) -> i64 {
    p.wait("every branch settled", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) }).await.0
}

async fn txn_info(p: &Processes, txn: &Transaction) -> pb::TransactionInfo {
    let request = pb::GetTransactionRequest { txn_id: txn.id().to_string() };
    p.cluster_client()
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.get_transaction(request).await }
        })
        .await
        .expect("the txn is known")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_between_the_joins_and_the_commit_the_retried_commit_commits_both() {
    // §12.6: the joins are in the log, so the leader elected after a SIGKILL
    // names both branches; the client's Commit, retried through the cluster
    // client, commits both exactly once (I1, I5).
    let mut p = Processes::start().await;
    seed(&p).await;
    let client = p.cluster_client();
    let txn = client.begin(Duration::from_secs(25)).await.expect("begun");
    debit_and_credit(&p, &txn, 30_00).await;

    let victim = p.wait("a leader", |p| p.leader()).await;
    p.coordinators[usize::try_from(victim - 1).expect("an index")].kill().await;
    let outcome = txn.commit().await.expect("the retried Commit is answered by the new leader");
    assert_eq!(outcome.decision, Decision::Commit, "{outcome:?}");
    p.wait("another node to lead", |p| async move { p.leader().await.filter(|l| *l != victim) }).await;
    assert!(txn.commit().await.expect("a retry").is_commit(), "a retried Commit answers the same");

    assert_eq!(settled_total(&p).await, 150_00, "money is conserved");
    assert_eq!(p.balance(A, "alice").await, Some(70_00));
    assert_eq!(p.balance(B, "bob").await, Some(80_00));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_killed_after_its_join_settles_the_commit_after_its_restart() {
    // I3 + I7: bank-b's credit is prepared (fsync'd) and joined when it is
    // SIGKILLed; the Commit is logged while it is down, and after its restart
    // the branch is committed (phase 2 or its resolver), not lost or released.
    let mut p = Processes::start().await;
    seed(&p).await;
    let client = p.cluster_client();
    let txn = client.begin(Duration::from_secs(25)).await.expect("begun");
    debit_and_credit(&p, &txn, 12_50).await;

    p.banks[B].kill().await;
    let outcome = txn.commit().await.expect("answered");
    assert_eq!(outcome.decision, Decision::Commit, "both branches joined: {outcome:?}");
    p.banks[B].restart();

    assert_eq!(settled_total(&p).await, 150_00, "money is conserved");
    assert_eq!(p.balance(A, "alice").await, Some(87_50));
    assert_eq!(p.balance(B, "bob").await, Some(62_50), "the joined credit survived the crash and committed");
    let info = txn_info(&p, &txn).await;
    let names: Vec<&str> = info.branches.iter().map(|b| b.participant.as_str()).collect();
    assert_eq!(names.len(), 2, "the record names both joined branches: {info:?}");
    assert!(info.branches.iter().all(|b| b.joined), "the decided record marks them joined: {info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_commits_is_aborted_at_the_deadline_and_every_hold_is_released() {
    // §12.5 + I4: a begun txn with two joined branches whose client goes
    // away is aborted ("timed out") by the leader at its deadline, and both
    // holds are released; `twopc txn` shows it begun with its joined branches
    // first, then the Abort and its reason.
    let p = Processes::start().await;
    seed(&p).await;
    let client = p.cluster_client();
    let txn = client.begin(Duration::from_secs(6)).await.expect("begun");
    debit_and_credit(&p, &txn, 40_00).await;
    let id = txn.id().to_string();

    let out = p.twopc(&["txn", "list", "--undecided"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out).lines().find(|l| l.contains(&id)).map(str::to_owned);
    let line = line.unwrap_or_else(|| panic!("the begun txn is listed as undecided:\n{}", stdout(&out)));
    assert!(line.contains("begun") && line.contains("2 joined") && line.contains(" in "), "{line}");
    let out = p.twopc(&["txn", "show", &id]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(shown.contains("state     begun") && shown.contains("deadline  in "), "{shown}");
    assert_eq!(shown.matches("yes (joined)").count(), 2, "both branches are marked joined:\n{shown}");
    let held = p.totals().await.expect("totals").1;
    assert_eq!(held, 80_00, "the debit's hold and the credit's incoming are staged");
    drop(txn);

    assert_eq!(settled_total(&p).await, 150_00, "money is conserved");
    assert_eq!(p.balance(A, "alice").await, Some(100_00), "the hold was released, not applied");
    assert_eq!(p.balance(B, "bob").await, Some(50_00));
    let out = p.twopc(&["txn", "show", &id, "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(shown["decision"], "abort", "{shown}");
    assert_eq!(shown["reason"], "timed out", "{shown}");
    let joined = shown["branches"].as_array().map(|b| b.iter().filter(|b| b["joined"] == true).count());
    assert_eq!(joined, Some(2), "the decided record still marks both branches joined: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_interactive_commits_rolls_back_a_refused_debit_and_runs_a_same_bank_transfer() {
    // The CLI's interactive transfer: across banks it commits (exit 0); an
    // overdraft is refused by the payer's bank, rolled back, and reported on
    // one line (exit 3) with nothing held afterwards; within one bank it runs
    // as one one-shot branch of the Commit. Calls without a proper context
    // move nothing. Money is conserved throughout (I8).
    let p = Processes::start().await;
    seed(&p).await;
    let out = p.twopc(&["accounts", "bank-a", "--create", "carol", "--balance", "10.00"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let interactive = ["transfer", "--interactive", "--amount"];
    let out = p.twopc(&[&interactive[..], &["12.50", "--from", "alice@bank-a", "--to", "bob@bank-b"]].concat()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("committed"), "{}", stdout(&out));

    let out = p.twopc(&[&interactive[..], &["1000", "--from", "bob@bank-b", "--to", "alice@bank-a"]].concat()).await;
    assert_eq!(out.status.code(), Some(3), "an overdraft aborts with exit code 3: {}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: aborted: rolled back: debit at bank-b refused"), "{err}");
    assert!(err.contains("insufficient funds"), "{err}");

    let out = p
        .twopc(&[&interactive[..], &["2.00", "--from", "alice@bank-a", "--to", "carol@bank-a", "--json"]].concat())
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!((shown["outcome"].as_str(), shown["mode"].as_str()), (Some("committed"), Some("interactive")));

    // §12.2 at the bank's API, as an application without the interceptor
    // meets it: no context is FAILED_PRECONDITION, a malformed one
    // INVALID_ARGUMENT, the context of a txn never begun is refused at Join.
    let mut bank = p.bank(A).await.expect("bank-a");
    let no_context = bank.debit(MoveRequest { account: "alice".into(), amount_minor: 1_00 }).await;
    assert_eq!(no_context.expect_err("refused").code(), tonic::Code::FailedPrecondition);
    let mut request = tonic::Request::new(MoveRequest { account: "alice".into(), amount_minor: 1_00 });
    let malformed = "not-a-txn".parse().expect("ascii");
    request.metadata_mut().insert(twopc_proto::context::TXN_CONTEXT_METADATA_KEY, malformed);
    assert_eq!(bank.debit(request).await.expect_err("refused").code(), tonic::Code::InvalidArgument);
    let deadline_unix_ms = twopc_proto::txn_id::unix_now_ms() + 10_000;
    let never_begun = p.cluster_client().transaction(TxnContext { txn_id: TxnId::new(), deadline_unix_ms });
    let refused = bank_in(&p, A, &never_begun)
        .await
        .debit(MoveRequest { account: "alice".into(), amount_minor: 1_00 })
        .await
        .expect_err("the Join is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");

    assert_eq!(settled_total(&p).await, 160_00, "money is conserved, nothing is held");
    assert_eq!(p.balance(A, "alice").await, Some(85_50));
    assert_eq!(p.balance(A, "carol").await, Some(12_00));
    assert_eq!(p.balance(B, "bob").await, Some(62_50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interactive_chaos_demo_conserves_money() {
    // I8 end to end: the demo's transfers as interactive txns while the
    // leader and a bank holding prepared branches are SIGKILLed and restarted.
    let stdout = processes::demo(
        &["--interactive", "--chaos", "--transfers", "300", "--concurrency", "8"],
        Duration::from_secs(240),
    )
    .await;
    assert!(stdout.contains("transfers run as interactive txns"), "{stdout}");
    assert!(stdout.contains("SIGKILL"), "nothing was killed:\n{stdout}");
    // Money is conserved if every cross-bank transfer aborts, too: some must have committed.
    let committed = stdout
        .split_once("ran as Begin, Debit, Credit, Commit (")
        .and_then(|(_, rest)| rest.split_once(" committed)"))
        .and_then(|(count, _)| count.parse::<u64>().ok());
    assert!(committed.is_some_and(|c| c > 0), "no transfer across banks committed:\n{stdout}");
}
