//! Interactive transactions end to end (docs/PROTOCOL.md §12): 3 coordinator
//! nodes and participant library servers over the in-memory resource. A
//! branch joins as a participant's own handler would: it is prepared at the
//! participant (its Prepare RPC, durable before the YES), then `Join` is
//! called at the coordinator cluster.

use std::time::Duration;

use tonic::{Code, Status};
use twopc_client::ClusterClient;
use twopc_proto::context::TXN_STATE_METADATA_KEY;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::{TxnContext, TxnId, pb};
use twopc_tests::calls;
use twopc_tests::cluster::{Cluster, Tweak};
use twopc_tests::participants::TestParticipant;
use twopc_tests::wait;

const SETTLE: Duration = Duration::from_secs(20);

/// An in-doubt timeout no test reaches: only phase 2 (or the test) settles a branch.
const NO_RESOLVER_MS: u64 = 120_000;

struct Setup {
    cluster: Cluster,
    a: TestParticipant,
    b: TestParticipant,
    client: ClusterClient,
}

/// A 3-node cluster with participants bank-a and bank-b registered.
async fn setup(tweak: Tweak) -> anyhow::Result<Setup> {
    twopc_tests::init_tracing();
    let cluster = Cluster::start_with(3, tweak).await?;
    cluster.wait_for_leader().await?;
    let a = TestParticipant::start("bank-a", cluster.addrs(), NO_RESOLVER_MS).await?;
    let b = TestParticipant::start("bank-b", cluster.addrs(), NO_RESOLVER_MS).await?;
    cluster.register("bank-a", a.addr).await?;
    cluster.register("bank-b", b.addr).await?;
    let client = cluster.client()?;
    Ok(Setup { cluster, a, b, client })
}

/// Prepares `participant`'s branch of the txn at the participant (durable before its YES).
async fn prepare_at(participant: &TestParticipant, context: &TxnContext, payload: &str) -> anyhow::Result<()> {
    let mut client = ParticipantClient::connect(format!("http://{}", participant.addr)).await?;
    let vote = client
        .prepare(pb::PrepareRequest {
            txn_id: context.txn_id.to_string(),
            participant: participant.name.clone(),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            deadline_unix_ms: context.deadline_unix_ms,
        })
        .await?
        .into_inner();
    anyhow::ensure!(vote.vote == pb::VoteKind::Yes as i32, "{} voted {vote:?}", participant.name);
    Ok(())
}

/// What a participant's handler does: prepare the branch, then join it.
async fn prepare_and_join(
    client: &ClusterClient,
    participant: &TestParticipant,
    context: &TxnContext,
) -> anyhow::Result<Result<pb::JoinResponse, Status>> {
    prepare_at(participant, context, "debit").await?;
    Ok(calls::join(client, &context.txn_id.to_string(), &participant.name).await)
}

fn one_shot(branches: &[(&str, &str)]) -> Vec<pb::Branch> {
    branches
        .iter()
        .map(|(participant, payload)| pb::Branch {
            participant: (*participant).to_owned(),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        })
        .collect()
}

/// `Commit` with the one-shot branches given as (participant, payload).
async fn commit(
    client: &ClusterClient,
    txn_id: TxnId,
    branches: &[(&str, &str)],
) -> Result<pb::SubmitResponse, Status> {
    calls::commit(client, txn_id, one_shot(branches)).await
}

async fn resolve(client: &ClusterClient, txn_id: TxnId, participant: &str) -> Result<pb::ResolveResponse, Status> {
    let request = pb::ResolveRequest { txn_id: txn_id.to_string(), participant: participant.to_owned() };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.resolve(request).await }
        })
        .await
}

async fn submit(
    client: &ClusterClient,
    txn_id: TxnId,
    branches: &[(&str, &str)],
) -> Result<pb::SubmitResponse, Status> {
    let request = pb::SubmitRequest {
        txn_id: txn_id.to_string(),
        branches: one_shot(branches),
        deadline_unix_ms: twopc_proto::txn_id::unix_now_ms() + 10_000,
    };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.submit(request).await }
        })
        .await
}

async fn list(client: &ClusterClient, filter: pb::TxnFilter) -> Result<Vec<pb::TransactionInfo>, Status> {
    let request = pb::ListTransactionsRequest { filter: filter.into(), ..Default::default() };
    let response = client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.list_transactions(request).await }
        })
        .await?;
    Ok(response.transactions)
}

/// The code of a call that must be refused.
fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    result.expect_err("refused").code()
}

/// The `twopc-txn-state` a refused call names.
fn txn_state(status: &Status) -> Option<&str> {
    status.metadata().get(TXN_STATE_METADATA_KEY).and_then(|v| v.to_str().ok())
}

fn branch_names(info: &pb::TransactionInfo) -> Vec<String> {
    let mut names: Vec<String> = info.branches.iter().map(|b| b.participant.clone()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_joined_branches_commit_exactly_once_each() -> anyhow::Result<()> {
    // §12.3-§12.4, I1, I5: branches that joined are named by the Commit's record (vote YES),
    // phase 2 commits each once, and a retried Commit or Join answers the logged outcome.
    let s = setup(Box::new(|_| {})).await?;
    let context = calls::begin(&s.client, None, 10_000).await?;
    let txn = context.txn_id;
    for participant in [&s.a, &s.b] {
        let joined = prepare_and_join(&s.client, participant, &context).await??;
        assert_eq!(joined.deadline_unix_ms, context.deadline_unix_ms);
    }
    let begun = wait::transaction(&s.client, txn).await?;
    assert_eq!(begun.state, pb::TxnState::Begun as i32);
    assert_eq!(begun.deadline_unix_ms, context.deadline_unix_ms);
    assert_eq!(branch_names(&begun), ["bank-a", "bank-b"]);
    assert!(begun.branches.iter().all(|b| b.vote == pb::VoteKind::Yes as i32));
    let undecided = list(&s.client, pb::TxnFilter::Undecided).await?;
    assert!(undecided.iter().any(|t| t.txn_id == context.txn_id.to_string() && t.state == pb::TxnState::Begun as i32));
    assert!(list(&s.client, pb::TxnFilter::All).await?.iter().any(|t| t.txn_id == context.txn_id.to_string()));

    let committed = commit(&s.client, txn, &[]).await?;
    assert_eq!(committed.decision, pb::Decision::Commit as i32, "{}", committed.reason);
    let mut voted: Vec<&str> = committed.votes.iter().map(|v| v.participant.as_str()).collect();
    voted.sort_unstable();
    assert_eq!(voted, ["bank-a", "bank-b"]);
    let finished = wait::finished(&s.client, txn, SETTLE).await?;
    assert_eq!(finished.deadline_unix_ms, context.deadline_unix_ms, "a decided interactive record keeps its deadline");
    assert_eq!(s.a.resource.commit_count(txn), 1);
    assert_eq!(s.b.resource.commit_count(txn), 1);

    // I5: a retried Commit answers from the log; a retried Join of a named branch succeeds.
    assert_eq!(commit(&s.client, txn, &[]).await?.decision, pb::Decision::Commit as i32);
    calls::join(&s.client, &context.txn_id.to_string(), "bank-a").await?;
    assert_eq!(s.a.resource.commit_count(txn), 1);
    assert_eq!(s.b.resource.commit_count(txn), 1);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_prepares_one_shot_branches_beside_the_joined_ones() -> anyhow::Result<()> {
    // §12.4: one-shot branches given to Commit are prepared as Submit prepares them; a NO among
    // them aborts the txn, and the joined branch is told Abort too (I1).
    let s = setup(Box::new(|_| {})).await?;
    for (payload, expect) in [("credit", pb::Decision::Commit), ("no:account closed", pb::Decision::Abort)] {
        let context = calls::begin(&s.client, None, 10_000).await?;
        let txn = context.txn_id;
        prepare_and_join(&s.client, &s.a, &context).await??;
        let response = commit(&s.client, txn, &[("bank-b", payload)]).await?;
        assert_eq!(response.decision, expect as i32, "{}", response.reason);
        assert_eq!(response.votes.len(), 2, "{response:?}");
        wait::finished(&s.client, txn, SETTLE).await?;
        let committed = u32::from(expect == pb::Decision::Commit);
        assert_eq!(s.a.resource.commit_count(txn), committed);
        assert_eq!(s.b.resource.commit_count(txn), committed);
        if expect == pb::Decision::Abort {
            assert!(response.reason.contains("account closed"), "{}", response.reason);
            assert!(s.a.resource.is_aborted(txn), "the joined branch is released");
        }
    }
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_releases_both_joined_branches_and_refuses_later_joins() -> anyhow::Result<()> {
    // §12.4: Rollback logs Abort, delivered to every joined branch; it is idempotent, a Commit
    // after it answers the Abort, and a Join after it is refused naming the state (§12.3).
    let s = setup(Box::new(|_| {})).await?;
    let context = calls::begin(&s.client, None, 10_000).await?;
    let txn = context.txn_id;
    prepare_and_join(&s.client, &s.a, &context).await??;
    let other = calls::begin(&s.client, None, 10_000).await?;
    prepare_and_join(&s.client, &s.b, &other).await??;
    prepare_and_join(&s.client, &s.a, &other).await??;
    let rolled = calls::rollback(&s.client, other.txn_id, "the customer cancelled").await?;
    assert_eq!(rolled.decision, pb::Decision::Abort as i32);
    assert_eq!(rolled.reason, "rolled back: the customer cancelled");
    wait::resource("bank-a to release", &s.a.resource, SETTLE, |r| r.is_aborted(other.txn_id)).await?;
    wait::resource("bank-b to release", &s.b.resource, SETTLE, |r| r.is_aborted(other.txn_id)).await?;
    wait::finished(&s.client, other.txn_id, SETTLE).await?;

    // The first txn: rolled back with bank-a joined, then bank-b's Join is refused.
    assert_eq!(calls::rollback(&s.client, txn, "").await?.reason, "rolled back");
    assert_eq!(calls::rollback(&s.client, txn, "again").await?.reason, "rolled back", "I5: the logged outcome");
    assert_eq!(commit(&s.client, txn, &[]).await?.decision, pb::Decision::Abort as i32);
    let refused = prepare_and_join(&s.client, &s.b, &context).await?.expect_err("a Join after Rollback");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(txn_state(&refused), Some("DECIDED ABORT"), "{refused:?}");
    // The refused branch is in no record: its resolver is told Abort (§6).
    let answer = resolve(&s.client, txn, "bank-b").await?;
    assert_eq!(answer.decision, pb::Decision::Abort as i32);
    wait::resource("bank-a to release", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    assert_eq!(s.a.resource.commit_count(txn), 0);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_never_committed_is_aborted_at_its_deadline() -> anyhow::Result<()> {
    // §12.5, I4, I7: the leader logs Abort ("timed out") for a begun txn past its deadline and
    // phase 2 releases every joined branch; a Join afterwards is refused.
    let s = setup(Box::new(|c| c.engine.begun_scan_interval_ms = 50)).await?;
    let context = calls::begin(&s.client, None, 1_500).await?;
    let txn = context.txn_id;
    prepare_and_join(&s.client, &s.a, &context).await??;
    prepare_and_join(&s.client, &s.b, &context).await??;
    let decided = wait::until("the timeout to be logged", SETTLE, || async {
        wait::transaction(&s.client, txn).await.ok().filter(|t| t.state != pb::TxnState::Begun as i32)
    })
    .await?;
    assert_eq!(decided.decision, pb::Decision::Abort as i32);
    assert_eq!(decided.reason, "timed out");
    assert!(decided.decided_unix_ms >= context.deadline_unix_ms, "not before the deadline");
    assert_eq!(branch_names(&decided), ["bank-a", "bank-b"]);
    wait::resource("bank-a to release", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    wait::resource("bank-b to release", &s.b.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    wait::finished(&s.client, txn, SETTLE).await?;
    // The client that comes back too late learns the logged Abort.
    let late = commit(&s.client, txn, &[]).await?;
    assert_eq!((late.decision, late.reason.as_str()), (pb::Decision::Abort as i32, "timed out"));
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_deadline_joins_are_refused_and_resolve_or_commit_log_the_timeout() -> anyhow::Result<()> {
    // §12.3, §12.5: with the leader's scan too slow to have run, a Join past the deadline is
    // refused as TIMED OUT, and a Resolve (or a late Commit) logs the timeout Abort itself.
    let s = setup(Box::new(|c| c.engine.begun_scan_interval_ms = 3_600_000)).await?;
    for late_call in ["resolve", "commit"] {
        let context = calls::begin(&s.client, None, 300).await?;
        let txn = context.txn_id;
        prepare_and_join(&s.client, &s.a, &context).await??;
        wait::until("the deadline to pass", SETTLE, || async {
            (twopc_proto::txn_id::unix_now_ms() > context.deadline_unix_ms).then_some(())
        })
        .await?;
        let refused =
            calls::join(&s.client, &context.txn_id.to_string(), "bank-b").await.expect_err("a Join past the deadline");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(txn_state(&refused), Some("TIMED OUT"), "{refused:?}");
        let (decision, reason) = if late_call == "resolve" {
            let answer = resolve(&s.client, txn, "bank-a").await?;
            assert!(!answer.undecided);
            (answer.decision, wait::transaction(&s.client, txn).await?.reason)
        } else {
            let answer = commit(&s.client, txn, &[]).await?;
            (answer.decision, answer.reason)
        };
        assert_eq!((decision, reason.as_str()), (pb::Decision::Abort as i32, "timed out"), "{late_call}");
        wait::resource("bank-a to release", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    }
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_before_the_deadline_answers_undecided_and_aborts_nothing() -> anyhow::Result<()> {
    // §12.5: no presumed abort for a begun txn before its deadline: "ask again later".
    let s = setup(Box::new(|_| {})).await?;
    let context = calls::begin(&s.client, None, 10_000).await?;
    let txn = context.txn_id;
    prepare_and_join(&s.client, &s.a, &context).await??;
    for asker in ["bank-a", "bank-b"] {
        let answer = resolve(&s.client, txn, asker).await?;
        assert!(answer.undecided, "{answer:?}");
        assert_eq!(answer.decision, pb::Decision::Unspecified as i32);
        assert!((1..=1000).contains(&answer.retry_after_ms), "{answer:?}");
    }
    assert_eq!(wait::transaction(&s.client, txn).await?.state, pb::TxnState::Begun as i32);
    assert_eq!(commit(&s.client, txn, &[]).await?.decision, pb::Decision::Commit as i32);
    wait::resource("bank-a to commit", &s.a.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    // Decided: the joined branch learns Commit, a participant it does not name Abort.
    assert_eq!(resolve(&s.client, txn, "bank-a").await?.decision, pb::Decision::Commit as i32);
    assert_eq!(resolve(&s.client, txn, "bank-b").await?.decision, pb::Decision::Abort as i32);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_commit_commits_both_joined_branches_through_a_new_leader() -> anyhow::Result<()> {
    // §12.6: begun and joined state is in the log (and in snapshots: one is taken every few
    // entries here), so after the leader stops between the joins and the Commit, the client's
    // Commit with the same id commits both branches through the next leader.
    let mut s = setup(Box::new(|c| c.snapshot_interval_entries = 3)).await?;
    let context = calls::begin(&s.client, None, 15_000).await?;
    let txn = context.txn_id;
    prepare_and_join(&s.client, &s.a, &context).await??;
    prepare_and_join(&s.client, &s.b, &context).await??;
    let old = s.cluster.wait_for_leader().await?;
    s.cluster.kill(old).await?;
    let new = s.cluster.wait_for_leader().await?;
    assert_ne!(new, old);
    assert_eq!(wait::transaction(&s.client, txn).await?.state, pb::TxnState::Begun as i32);
    let committed = commit(&s.client, txn, &[]).await?;
    assert_eq!(committed.decision, pb::Decision::Commit as i32, "{}", committed.reason);
    wait::finished(&s.client, txn, SETTLE).await?;
    assert_eq!(s.a.resource.commit_count(txn), 1);
    assert_eq!(s.b.resource.commit_count(txn), 1);
    // The stopped node comes back and catches up to the same state.
    s.cluster.restart(old).await?;
    let applied = s.cluster.node(new).status().applied_index;
    s.cluster.wait_applied(applied).await?;
    let states = s.cluster.states();
    let record = states[&old].txn(&txn).cloned().expect("the restarted node knows the decision");
    assert_eq!(Some(&record), states[&new].txn(&txn));
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_call_gets_its_documented_code() -> anyhow::Result<()> {
    // §12.1-§12.4: every refusal has its documented status; none changes the log.
    let s = setup(Box::new(|c| c.engine.branches_per_txn_max = 1)).await?;
    let max = s.cluster.config(1).engine.deadline_max_ms;

    // Begin: the timeout's bounds, a decided id, an id past the Submit window; a repeat answers
    // the first deadline (I5).
    assert_eq!(code(calls::begin(&s.client, None, 0).await), Code::InvalidArgument);
    assert_eq!(code(calls::begin(&s.client, None, max + 1).await), Code::InvalidArgument);
    let decided = TxnId::new();
    submit(&s.client, decided, &[("bank-a", "debit")]).await?;
    assert_eq!(code(calls::begin(&s.client, Some(decided), 1_000).await), Code::FailedPrecondition);
    let old = TxnId::created_at(twopc_proto::txn_id::unix_now_ms() - 10 * 60 * 1000);
    assert_eq!(code(calls::begin(&s.client, Some(old), 1_000).await), Code::FailedPrecondition);
    let chosen = TxnId::new();
    let first = calls::begin(&s.client, Some(chosen), 10_000).await?;
    let again = calls::begin(&s.client, Some(chosen), 20_000).await?;
    assert_eq!((first.txn_id, again.deadline_unix_ms), (chosen, first.deadline_unix_ms));

    // Submit of a begun id; Commit and Rollback of an id never begun.
    assert_eq!(code(submit(&s.client, chosen, &[("bank-a", "debit")]).await), Code::FailedPrecondition);
    assert_eq!(code(commit(&s.client, TxnId::new(), &[]).await), Code::NotFound);
    assert_eq!(code(calls::rollback(&s.client, TxnId::new(), "").await), Code::NotFound);
    assert_eq!(code(commit(&s.client, decided, &[]).await), Code::NotFound, "a one-shot txn was never begun");
    // Submit of a decided interactive txn's id: one committed with nothing joined names no
    // branches, and its record must not tell a Submit Commit for payloads nobody saw (I8).
    let empty = calls::begin(&s.client, None, 10_000).await?;
    assert_eq!(commit(&s.client, empty.txn_id, &[]).await?.decision, pb::Decision::Commit as i32);
    let reused = submit(&s.client, empty.txn_id, &[("bank-a", "debit")]).await;
    assert_eq!(code(reused), Code::FailedPrecondition, "a Submit reusing a decided interactive txn's id");

    // Join: malformed, unregistered, unknown, decided, over branches_per_txn_max.
    assert_eq!(code(calls::join(&s.client, "not-a-txn", "bank-a").await), Code::InvalidArgument);
    assert_eq!(code(calls::join(&s.client, &first.txn_id.to_string(), "bank-z").await), Code::NotFound);
    let unknown = calls::join(&s.client, &TxnId::new().to_string(), "bank-a").await.expect_err("unknown");
    assert_eq!((unknown.code(), txn_state(&unknown)), (Code::FailedPrecondition, Some("UNKNOWN")));
    let not_named = calls::join(&s.client, &decided.to_string(), "bank-b").await.expect_err("decided");
    assert_eq!((not_named.code(), txn_state(&not_named)), (Code::FailedPrecondition, Some("DECIDED COMMIT")));
    prepare_and_join(&s.client, &s.a, &first).await??;
    // Called at the leader directly: the cluster client retries RESOURCE_EXHAUSTED.
    let leader = s.cluster.addr(s.cluster.wait_for_leader().await?);
    let mut at_leader = CoordinatorClient::connect(format!("http://{leader}")).await?;
    let request = pb::JoinRequest { txn_id: first.txn_id.to_string(), participant: "bank-b".into() };
    assert_eq!(code(at_leader.join(request).await), Code::ResourceExhausted);

    // Commit: a joined participant named as a one-shot branch; then a retry naming other
    // one-shot branches than the record's; Rollback of a committed txn.
    assert_eq!(code(commit(&s.client, chosen, &[("bank-a", "credit")]).await), Code::InvalidArgument);
    assert_eq!(commit(&s.client, chosen, &[("bank-b", "credit")]).await?.decision, pb::Decision::Commit as i32);
    assert_eq!(code(commit(&s.client, chosen, &[]).await), Code::FailedPrecondition);
    assert_eq!(code(calls::rollback(&s.client, chosen, "too late").await), Code::FailedPrecondition);
    wait::finished(&s.client, chosen, SETTLE).await?;
    assert_eq!(s.a.resource.commit_count(chosen), 1);
    assert_eq!(s.b.resource.commit_count(chosen), 1);
    s.cluster.stop().await
}
