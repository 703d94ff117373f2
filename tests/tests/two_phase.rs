//! Two-phase commit end to end (docs/PROTOCOL.md §5–§8): 3 coordinator
//! nodes, participant library servers over the in-memory resource, and faults
//! at the protocol's dangerous points.

use std::time::Duration;

use tonic::Code;
use twopc_client::ClusterClient;
use twopc_coordinator::config::CommitProtocol;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnId, pb};
use twopc_tests::cluster::Cluster;
use twopc_tests::participants::{BlackHole, TestParticipant};
use twopc_tests::wait;

const SETTLE: Duration = Duration::from_secs(20);

struct Setup {
    cluster: Cluster,
    a: TestParticipant,
    b: TestParticipant,
    client: ClusterClient,
}

/// A 3-node cluster with participants bank-a and bank-b registered.
async fn setup(in_doubt_timeout_ms: u64, tweak: twopc_tests::cluster::Tweak) -> anyhow::Result<Setup> {
    twopc_tests::init_tracing();
    let cluster = Cluster::start_with(3, tweak).await?;
    cluster.wait_for_leader().await?;
    let a = TestParticipant::start("bank-a", cluster.addrs(), in_doubt_timeout_ms).await?;
    let b = TestParticipant::start("bank-b", cluster.addrs(), in_doubt_timeout_ms).await?;
    cluster.register("bank-a", a.addr).await?;
    cluster.register("bank-b", b.addr).await?;
    let client = cluster.client()?;
    Ok(Setup { cluster, a, b, client })
}

fn request(txn_id: TxnId, branches: &[(&str, &str)]) -> pb::SubmitRequest {
    pb::SubmitRequest {
        txn_id: txn_id.to_string(),
        branches: branches
            .iter()
            .map(|(participant, payload)| pb::Branch {
                participant: (*participant).to_owned(),
                payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            })
            .collect(),
        deadline_unix_ms: unix_now_ms() + 10_000,
    }
}

async fn submit(client: &ClusterClient, request: pb::SubmitRequest) -> Result<pb::SubmitResponse, tonic::Status> {
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.submit(request).await }
        })
        .await
}

async fn resolve(client: &ClusterClient, txn_id: TxnId) -> Result<pb::ResolveResponse, tonic::Status> {
    let request = pb::ResolveRequest { txn_id: txn_id.to_string(), participant: "bank-a".into() };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.resolve(request).await }
        })
        .await
}

/// An operator's Decide through the admin API.
fn operator_decide<'c>(
    client: &'c ClusterClient,
    txn_id: TxnId,
    decision: pb::Decision,
    reason: &str,
    force_commit: bool,
) -> impl Future<Output = Result<pb::DecideResponse, tonic::Status>> + use<'c> {
    let request = pb::DecideRequest {
        txn_id: txn_id.to_string(),
        decision: decision.into(),
        reason: reason.into(),
        force_commit,
    };
    async move {
        client
            .admin(|mut c| {
                let request = request.clone();
                async move { c.decide(request).await }
            })
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_yes_commits_every_branch_exactly_once() -> anyhow::Result<()> {
    // I1 + I5: every branch applies Commit, once.
    let s = setup(5_000, Box::new(|_| {})).await?;
    let txn = TxnId::new();
    let response = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
    assert_eq!(response.decision, pb::Decision::Commit as i32);
    assert!(response.votes.iter().all(|v| v.vote == pb::VoteKind::Yes as i32));
    wait::finished(&s.client, txn, SETTLE).await?;
    assert_eq!(s.a.resource.commit_count(txn), 1);
    assert_eq!(s.b.resource.commit_count(txn), 1);
    // I5: a repeated Submit answers from the log and changes nothing.
    let again = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
    assert_eq!(again.decision, pb::Decision::Commit as i32);
    assert_eq!(s.a.resource.prepare_calls(txn), 1, "a decided txn is not prepared again");
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_no_vote_aborts_every_branch_and_says_which_and_why() -> anyhow::Result<()> {
    // I1: a NO anywhere means Abort everywhere; the client learns who and why.
    let s = setup(5_000, Box::new(|_| {})).await?;
    let txn = TxnId::new();
    let response = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", "no:insufficient funds")])).await?;
    assert_eq!(response.decision, pb::Decision::Abort as i32);
    assert!(
        response.reason.contains("bank-b") && response.reason.contains("insufficient funds"),
        "{}",
        response.reason
    );
    let b_vote = response.votes.iter().find(|v| v.participant == "bank-b").expect("bank-b's vote");
    assert_eq!(b_vote.vote, pb::VoteKind::No as i32);
    assert_eq!(b_vote.reason, "insufficient funds");
    wait::finished(&s.client, txn, SETTLE).await?;
    assert_eq!(s.a.resource.commit_count(txn), 0);
    assert!(!s.a.resource.is_prepared(txn), "bank-a released its branch");
    assert_eq!(s.b.resource.commit_count(txn), 0);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_answers_aborts_the_txn_after_the_prepare_timeout() -> anyhow::Result<()> {
    // §5.3: no answer is a NO, bounded by the per-branch timeout.
    let s = setup(5_000, Box::new(|c| c.engine.prepare_timeout_ms = 500)).await?;
    let hole = BlackHole::start().await?;
    s.cluster.register("bank-c", hole.addr).await?;
    let txn = TxnId::new();
    let started = tokio::time::Instant::now();
    let response = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-c", "credit")])).await?;
    assert_eq!(response.decision, pb::Decision::Abort as i32);
    assert!(response.reason.contains("bank-c"), "{}", response.reason);
    assert!(started.elapsed() < Duration::from_secs(5), "aborted after the prepare timeout, not the deadline");
    wait::resource("bank-a to release its branch", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    assert_eq!(s.a.resource.commit_count(txn), 0);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_delivers_a_decision_the_old_one_logged_but_never_sent() -> anyhow::Result<()> {
    // §8: the next ready leader re-drives every decided, unacknowledged txn.
    // The in-doubt timeout is long so only delivery, not Resolve, can settle it.
    let mut s = setup(120_000, Box::new(|_| {})).await?;
    s.cluster.gate.fail_decides(true);
    let txn = TxnId::new();
    let response = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
    assert_eq!(response.decision, pb::Decision::Commit as i32);
    // Logged: under parallel commit the explicit record follows the answer (§13.2).
    let logged =
        || async { wait::transaction(&s.client, txn).await.ok().filter(|t| t.decision == pb::Decision::Commit as i32) };
    wait::until("the decision to be logged", SETTLE, logged).await?;
    assert!(s.a.resource.is_prepared(txn) && s.b.resource.is_prepared(txn), "phase 2 has not happened");
    let leader = s.cluster.wait_for_leader().await?;
    s.cluster.kill(leader).await?;
    s.cluster.gate.fail_decides(false);
    s.cluster.wait_for_leader().await?;
    wait::resource("bank-a to commit", &s.a.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    wait::resource("bank-b to commit", &s.b.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    wait::finished(&s.client, txn, SETTLE).await?;
    // A Submit retried after the crash gets the single logged outcome.
    let retried = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
    assert_eq!(retried.decision, pb::Decision::Commit as i32);
    assert_eq!(s.a.resource.commit_count(txn), 1);
    s.cluster.stop().await
}

/// Submits straight to `addr` with no retry, in the background.
fn submit_once(
    addr: String,
    request: pb::SubmitRequest,
) -> tokio::task::JoinHandle<Result<pb::SubmitResponse, tonic::Status>> {
    tokio::spawn(async move {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client.submit(request).await.map(tonic::Response::into_inner)
    })
}

/// Submits a transfer from bank-a to bank-b to `leader` with the banks'
/// answers held back from it, and waits until both banks have prepared.
async fn submit_held(
    s: &Setup,
    leader: u64,
    txn: TxnId,
) -> anyhow::Result<(pb::SubmitRequest, tokio::task::JoinHandle<Result<pb::SubmitResponse, tonic::Status>>)> {
    s.cluster.gate.hold_after_prepare(true);
    let req = request(txn, &[("bank-a", "debit"), ("bank-b", "credit")]);
    let pending = submit_once(s.cluster.addr(leader), req.clone());
    wait::until("both branches prepared", SETTLE, || async { (s.cluster.gate.prepares_answered() >= 2).then_some(()) })
        .await?;
    Ok((req, pending))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_before_logging_leaves_participants_to_resolve_to_abort() -> anyhow::Result<()> {
    // §6 presumed abort: prepared branches whose leader died undecided are
    // aborted through Resolve, and a retried Submit gets that single outcome.
    // (§5's protocol: under parallel commit the Staged entry makes it a
    // Commit, tested below.)
    let mut s = setup(300, sequential()).await?;
    let leader = s.cluster.wait_for_leader().await?;
    let txn = TxnId::new();
    let (req, pending) = submit_held(&s, leader, txn).await?;
    s.cluster.kill(leader).await?;
    s.cluster.gate.hold_after_prepare(false);
    assert!(pending.await?.is_err(), "the dead leader answered nothing");
    wait::resource("bank-a to abort via Resolve", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    wait::resource("bank-b to abort via Resolve", &s.b.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    let retried = submit(&s.client, req).await?;
    assert_eq!(retried.decision, pb::Decision::Abort as i32);
    assert_eq!(s.a.resource.commit_count(txn) + s.b.resource.commit_count(txn), 0);
    s.cluster.stop().await
}

/// Coordinators that commit by §5 (prepare, then log the decision).
fn sequential() -> twopc_tests::cluster::Tweak {
    Box::new(|c| c.engine.commit_protocol = CommitProtocol::Sequential)
}

/// Waits until every node has applied the txn's Staged entry (§13.1).
async fn wait_staged(s: &Setup, txn: TxnId) -> anyhow::Result<()> {
    wait::until("the Staged entry on every node", SETTLE, || async {
        s.cluster.states().values().all(|sm| sm.staged(&txn).is_some() || sm.txn(&txn).is_some()).then_some(())
    })
    .await
}

#[tokio::test]
async fn a_parallel_commit_whose_leader_died_after_both_votes_is_committed_by_the_next_leader() -> anyhow::Result<()> {
    // §13.3: the Staged entry is applied and both banks voted YES, then the
    // leader dies before answering. Whoever settles the txn next (the new
    // leader's scan, or a bank's Resolve) runs status recovery: both YES, so
    // Commit, which a retried Submit also gets. A presumed abort here would
    // be wrong: the old leader might have answered Commit.
    let mut s = setup(300, Box::new(|_| {})).await?;
    let leader = s.cluster.wait_for_leader().await?;
    let txn = TxnId::new();
    let (req, pending) = submit_held(&s, leader, txn).await?;
    wait_staged(&s, txn).await?;
    s.cluster.kill(leader).await?;
    s.cluster.gate.hold_after_prepare(false);
    // An in-process node's driver outlives its raft task: whatever it
    // answers once the votes arrive must be the Commit recovery logs.
    if let Ok(answered) = pending.await? {
        assert_eq!(answered.decision, pb::Decision::Commit as i32, "{answered:?}");
    }
    wait::resource("bank-a to commit", &s.a.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    wait::resource("bank-b to commit", &s.b.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    let retried = submit(&s.client, req).await?;
    assert_eq!(retried.decision, pb::Decision::Commit as i32);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_leader_cut_off_after_the_votes_cannot_answer_commit_against_the_majority() -> anyhow::Result<()> {
    // §13.2: the leader is isolated with both YES votes in hand and its
    // Staged entry applied. The majority's new leader settles the txn by
    // status recovery, which finds both YES: whatever the old leader
    // answers must be that Commit (§13.2).
    let s = setup(300, Box::new(|_| {})).await?;
    let old_leader = s.cluster.wait_for_leader().await?;
    let txn = TxnId::new();
    let (_, pending) = submit_held(&s, old_leader, txn).await?;
    wait_staged(&s, txn).await?;
    s.cluster.faults.isolate(old_leader);
    wait::resource("bank-a to commit via recovery", &s.a.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    wait::resource("bank-b to commit via recovery", &s.b.resource, SETTLE, |r| r.commit_count(txn) == 1).await?;
    s.cluster.gate.hold_after_prepare(false);
    let outcome = pending.await?;
    assert!(
        outcome.as_ref().map_or(true, |r| r.decision == pb::Decision::Commit as i32),
        "the isolated leader reported {outcome:?}"
    );
    s.cluster.faults.heal();
    s.cluster.wait_for_leader().await?;
    wait::until("every node to hold Commit", SETTLE, || async {
        s.cluster.states().values().all(|sm| sm.txn(&txn).is_some_and(|r| r.decision == Decision::Commit)).then_some(())
    })
    .await?;
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cut_off_in_a_minority_cannot_decide() -> anyhow::Result<()> {
    // I2: a leader isolated mid-txn cannot log its decision; the majority's
    // presumed abort is the only outcome, and every node ends up agreeing.
    // (§5's protocol; the parallel one is tested below.)
    let s = setup(300, sequential()).await?;
    let old_leader = s.cluster.wait_for_leader().await?;
    let txn = TxnId::new();
    let (_, pending) = submit_held(&s, old_leader, txn).await?;
    s.cluster.faults.isolate(old_leader);
    // The majority elects a leader; the participants resolve there.
    wait::resource("bank-a to abort via Resolve", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    wait::resource("bank-b to abort via Resolve", &s.b.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    // Now let the deposed leader try to log Commit.
    s.cluster.gate.hold_after_prepare(false);
    let outcome = pending.await?;
    assert!(
        outcome.as_ref().map_or(true, |r| r.decision == pb::Decision::Abort as i32),
        "the isolated leader reported {outcome:?}"
    );
    s.cluster.faults.heal();
    s.cluster.wait_for_leader().await?;
    wait::until("every node to hold Abort", SETTLE, || async {
        s.cluster.states().values().all(|sm| sm.txn(&txn).is_some_and(|r| r.decision == Decision::Abort)).then_some(())
    })
    .await?;
    assert_eq!(s.a.resource.commit_count(txn) + s.b.resource.commit_count(txn), 0);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_an_unknown_txn_on_any_node_aborts_it_for_good() -> anyhow::Result<()> {
    // §6 + I2: presumed abort is logged, so a later Submit cannot commit the txn.
    let s = setup(5_000, Box::new(|_| {})).await?;
    for addr in s.cluster.addrs() {
        let txn = TxnId::new();
        let one_node = ClusterClient::new(vec![addr], Default::default())?;
        let request = pb::ResolveRequest { txn_id: txn.to_string(), participant: "bank-a".into() };
        let resolved = one_node
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.resolve(request).await }
            })
            .await?;
        assert_eq!(resolved.decision, pb::Decision::Abort as i32);
        let submitted = submit(&s.client, self::request(txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
        assert_eq!(submitted.decision, pb::Decision::Abort as i32);
        assert_eq!(s.a.resource.prepare_calls(txn), 0, "a decided txn is never prepared");
    }
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_submits_get_their_documented_status_codes() -> anyhow::Result<()> {
    // I6 and §10: bad input is refused with an actionable status, never run.
    let s = setup(5_000, Box::new(|c| c.engine.branches_per_txn_max = 3)).await?;
    let ok = |txn| request(txn, &[("bank-a", "x"), ("bank-b", "y")]);
    let mut cases: Vec<(&str, pb::SubmitRequest, Code)> = Vec::new();
    cases.push(("no branches", pb::SubmitRequest { branches: vec![], ..ok(TxnId::new()) }, Code::InvalidArgument));
    cases.push((
        "duplicate participant",
        request(TxnId::new(), &[("bank-a", "x"), ("bank-a", "y")]),
        Code::InvalidArgument,
    ));
    cases.push(("unknown participant", request(TxnId::new(), &[("bank-a", "x"), ("bank-z", "y")]), Code::NotFound));
    let mut oversize = ok(TxnId::new());
    oversize.branches[0].payload = vec![0u8; 64 * 1024 + 1].into();
    cases.push(("oversize payload", oversize, Code::InvalidArgument));
    cases.push((
        "malformed txn id",
        pb::SubmitRequest { txn_id: "12345".into(), ..ok(TxnId::new()) },
        Code::InvalidArgument,
    ));
    cases.push((
        "empty txn id",
        pb::SubmitRequest { txn_id: String::new(), ..ok(TxnId::new()) },
        Code::InvalidArgument,
    ));
    cases.push((
        "deadline in the past",
        pb::SubmitRequest { deadline_unix_ms: unix_now_ms() - 1_000, ..ok(TxnId::new()) },
        Code::InvalidArgument,
    ));
    cases.push((
        "too many branches",
        request(TxnId::new(), &[("bank-a", "x"), ("bank-b", "y"), ("bank-c", "z"), ("bank-d", "w")]),
        Code::InvalidArgument,
    ));
    for (what, req, code) in cases {
        let txn = req.txn_id.clone();
        let err = submit(&s.client, req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(!err.message().is_empty(), "{what}: the message says what to fix");
        if let Ok(id) = txn.parse::<TxnId>() {
            assert_eq!(s.a.resource.prepare_calls(id), 0, "{what}: nothing was prepared");
        }
    }
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_settles_an_undecided_txn_through_the_log_and_cannot_overrule_one() -> anyhow::Result<()> {
    // I2 for operators: Decide is logged (first writer wins, reason kept) and
    // refused for a txn the log already decided.
    let s = setup(120_000, Box::new(|_| {})).await?;
    let decide = |txn: TxnId, decision: pb::Decision, reason: &str| {
        operator_decide(&s.client, txn, decision, reason, decision == pb::Decision::Commit)
    };
    // An in-doubt branch whose coordinator lost the txn: the operator, having checked every
    // branch's vote, forces a Commit; without force_commit it is refused (§6.1).
    let txn = TxnId::new();
    let unforced = operator_decide(&s.client, txn, pb::Decision::Commit, "looks fine", false).await;
    let unforced = unforced.expect_err("an operator Commit must be forced");
    assert_eq!(unforced.code(), Code::InvalidArgument, "{}", unforced.message());
    assert!(unforced.message().contains("force"), "{}", unforced.message());
    let decided = decide(txn, pb::Decision::Commit, "bank-a confirmed the goods shipped").await?;
    assert_eq!(decided.decision, pb::Decision::Commit as i32);
    let info = wait::transaction(&s.client, txn).await?;
    assert!(info.reason.contains("bank-a confirmed the goods shipped"), "{}", info.reason);
    let refused = decide(txn, pb::Decision::Abort, "changed my mind").await.expect_err("already decided");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let no_reason = decide(TxnId::new(), pb::Decision::Abort, " ").await.expect_err("a reason is required");
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    let unknown_decision = s
        .client
        .admin(|mut c| async move {
            let request = pb::DecideRequest {
                txn_id: TxnId::new().to_string(),
                decision: 9,
                reason: "x".into(),
                force_commit: false,
            };
            c.decide(request).await
        })
        .await
        .expect_err("unknown enum value");
    assert_eq!(unknown_decision.code(), Code::InvalidArgument);
    // A txn the log decided by a Submit cannot be overruled either.
    let submitted = TxnId::new();
    submit(&s.client, request(submitted, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
    let overrule = decide(submitted, pb::Decision::Abort, "operator").await.expect_err("already decided");
    assert_eq!(overrule.code(), Code::FailedPrecondition);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_unacknowledged_and_undecided_txns() -> anyhow::Result<()> {
    // §5 observability: operators find txns stuck in phase 2 or in prepare.
    let s = setup(120_000, Box::new(|_| {})).await?;
    let list = |filter: pb::TxnFilter| {
        let request = pb::ListTransactionsRequest { filter: filter.into(), limit: 100, ..Default::default() };
        let client = &s.client;
        async move {
            client
                .coordinator(|mut c| {
                    let request = request.clone();
                    async move { c.list_transactions(request).await }
                })
                .await
                .map(|r| r.transactions.into_iter().map(|t| t.txn_id).collect::<Vec<_>>())
        }
    };
    let finished = TxnId::new();
    submit(&s.client, request(finished, &[("bank-a", "x"), ("bank-b", "y")])).await?;
    wait::finished(&s.client, finished, SETTLE).await?;
    s.cluster.gate.fail_decides(true);
    let stuck = TxnId::new();
    submit(&s.client, request(stuck, &[("bank-a", "x"), ("bank-b", "y")])).await?;
    // Under parallel commit the client hears Commit before the explicit
    // decision is logged (§13); the txn is unacknowledged once it is.
    let unacknowledged = wait::until("the txn to show as unacknowledged", SETTLE, || async {
        let listed = list(pb::TxnFilter::Unacknowledged).await.ok()?;
        (!listed.is_empty()).then_some(listed)
    })
    .await?;
    assert_eq!(unacknowledged, vec![stuck.to_string()]);
    let all = list(pb::TxnFilter::All).await?;
    assert!(all.contains(&finished.to_string()) && all.contains(&stuck.to_string()));
    // A txn held in its prepare phase is listed as undecided by the leader.
    s.cluster.gate.hold_after_prepare(true);
    let preparing = TxnId::new();
    let leader = s.cluster.wait_for_leader().await?;
    let pending = submit_once(s.cluster.addr(leader), request(preparing, &[("bank-a", "x"), ("bank-b", "y")]));
    let undecided = wait::until("the txn to show as undecided", SETTLE, || async {
        list(pb::TxnFilter::Undecided).await.ok().filter(|l| l.contains(&preparing.to_string()))
    })
    .await?;
    assert_eq!(undecided, vec![preparing.to_string()]);
    s.cluster.gate.hold_after_prepare(false);
    s.cluster.gate.fail_decides(false);
    assert_eq!(pending.await??.decision, pb::Decision::Commit as i32);
    wait::until("phase 2 to finish", SETTLE, || async {
        list(pb::TxnFilter::Unacknowledged).await.ok().filter(Vec::is_empty)
    })
    .await?;
    s.cluster.stop().await
}

/// A valid UUIDv7 txn id created `age_ms` ago.
fn txn_id_aged(age_ms: u64) -> TxnId {
    TxnId::created_at(unix_now_ms() - age_ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_id_past_the_retention_window_is_refused() -> anyhow::Result<()> {
    // §7.2: a txn id older than retention - deadline_max may already be
    // forgotten, so it is refused rather than decided a second time.
    let s = setup(5_000, Box::new(|_| {})).await?;
    let old = txn_id_aged(60_000);
    assert!(old.age_ms() >= 60_000);
    let err = submit(&s.client, request(old, &[("bank-a", "x"), ("bank-b", "y")])).await.expect_err("too old");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("new txn id"), "{}", err.message());
    let fresh_enough = txn_id_aged(1_000);
    let ok = submit(&s.client, request(fresh_enough, &[("bank-a", "x"), ("bank-b", "y")])).await?;
    assert_eq!(ok.decision, pb::Decision::Commit as i32);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_judge_deadlines_and_txn_id_ages_by_their_own_clocks() -> anyhow::Result<()> {
    // §7 with a clock jump: every coordinator's clock (EngineConfig::clock) stepped a minute
    // ahead sees a 10 s deadline as past and refuses the Submit before preparing anything;
    // stepped back, the same request with a new txn id commits.
    let clock = twopc_proto::Clock::system();
    let nodes_clock = clock.clone();
    let s = setup(5_000, Box::new(move |c| c.engine.clock = nodes_clock.clone())).await?;
    clock.jump_ms(60_000);
    let refused = TxnId::new();
    let err = submit(&s.client, request(refused, &[("bank-a", "x"), ("bank-b", "y")])).await.expect_err("past");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("in the past"), "{}", err.message());
    assert_eq!(s.a.resource.prepare_calls(refused), 0);
    clock.jump_ms(-60_000);
    let committed = submit(&s.client, request(TxnId::new(), &[("bank-a", "x"), ("bank-b", "y")])).await?;
    assert_eq!(committed.decision, pb::Decision::Commit as i32);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_forgotten_by_a_leader_whose_clock_ran_ahead_is_never_run_again() -> anyhow::Result<()> {
    // I2 and §7.2-§7.3: the leader's clock runs ahead past the retention window, so it forgets a
    // committed, acknowledged txn early; once its clock is back, the txn id looks young again,
    // but the log's retention horizon still refuses a retried Submit: it is not run a second time.
    let clock = twopc_proto::Clock::system();
    let nodes_clock = clock.clone();
    let s = setup(
        5_000,
        Box::new(move |c| {
            c.engine.clock = nodes_clock.clone();
            c.engine.retention_ms = 3_000;
            c.engine.deadline_max_ms = 1_000;
            c.engine.gc_interval_ms = 50;
        }),
    )
    .await?;
    let txn = TxnId::new();
    let mut first = request(txn, &[("bank-a", "x"), ("bank-b", "y")]);
    first.deadline_unix_ms = unix_now_ms() + 900;
    assert_eq!(submit(&s.client, first.clone()).await?.decision, pb::Decision::Commit as i32);
    wait::finished(&s.client, txn, SETTLE).await?;

    clock.jump_ms(60_000);
    wait::until("the leader to forget the txn", SETTLE, || async {
        let forgotten = wait::transaction(&s.client, txn).await;
        matches!(forgotten, Err(status) if status.code() == Code::FailedPrecondition).then_some(())
    })
    .await?;
    clock.jump_ms(-60_000);

    first.deadline_unix_ms = unix_now_ms() + 900;
    let err = submit(&s.client, first).await.expect_err("a forgotten txn id must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("retention horizon"), "{}", err.message());
    assert_eq!(s.a.resource.prepare_calls(txn), 1, "the txn was prepared again");
    assert_eq!(s.a.resource.commit_count(txn), 1);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cannot_commit_a_txn_the_leader_is_still_preparing() -> anyhow::Result<()> {
    // I1 and §6.1: bank-b has voted NO, but its answer has not reached the leader yet. An
    // operator's forced Commit is refused while the leader prepares the txn, so the Submit
    // answers Abort and no branch commits (it used to be accepted, the Submit answered COMMIT,
    // and bank-b never applied it).
    let s = setup(120_000, Box::new(|_| {})).await?;
    let leader = s.cluster.wait_for_leader().await?;
    s.cluster.gate.hold_after_prepare(true);
    let txn = TxnId::new();
    let pending =
        submit_once(s.cluster.addr(leader), request(txn, &[("bank-a", "debit"), ("bank-b", "no:insufficient funds")]));
    wait::until("both branches to vote", SETTLE, || async { (s.cluster.gate.prepares_answered() >= 2).then_some(()) })
        .await?;
    let refused = operator_decide(&s.client, txn, pb::Decision::Commit, "looks stuck", true).await;
    let refused = refused.expect_err("an operator cannot decide a txn the leader is preparing");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("PREPARING"), "{}", refused.message());
    let abort = operator_decide(&s.client, txn, pb::Decision::Abort, "looks stuck", false).await;
    assert_eq!(abort.expect_err("nor abort it").code(), Code::FailedPrecondition);
    s.cluster.gate.hold_after_prepare(false);
    let response = pending.await??;
    assert_eq!(response.decision, pb::Decision::Abort as i32, "{}", response.reason);
    wait::resource("bank-a to release its branch", &s.a.resource, SETTLE, |r| r.is_aborted(txn)).await?;
    assert_eq!(s.a.resource.commit_count(txn) + s.b.resource.commit_count(txn), 0);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_ids_from_the_future_are_refused_at_every_entry_point() -> anyhow::Result<()> {
    // I6 and §7.4: an id dated ten years ahead would never pass a retention horizon. Submit,
    // Resolve, Decide and GetTransaction refuse it with INVALID_ARGUMENT, on every node, and no
    // node records it (a Resolve used to log a presumed abort that stayed for good). An id
    // within txn_id_future_skew_ms of the clock is accepted.
    let s = setup(5_000, Box::new(|_| {})).await?;
    let future = TxnId::created_at(unix_now_ms() + 10 * 365 * 24 * 3600 * 1000);
    let submitted = submit(&s.client, request(future, &[("bank-a", "x"), ("bank-b", "y")])).await;
    let resolved = resolve(&s.client, future).await.map(drop);
    let decided = operator_decide(&s.client, future, pb::Decision::Abort, "clean up", false).await.map(drop);
    let got = wait::transaction(&s.client, future).await.map(drop);
    for (what, answer) in [("submit", submitted.map(drop)), ("resolve", resolved), ("decide", decided), ("get", got)] {
        let err = answer.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {}", err.message());
        assert!(err.message().contains("txn_id_future_skew_ms"), "{what}: {}", err.message());
    }
    for addr in s.cluster.addrs() {
        let one_node = ClusterClient::new(vec![addr], Default::default())?;
        let err = resolve(&one_node, future).await.expect_err("any node refuses it");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    }
    let leader = s.cluster.wait_for_leader().await?;
    let applied = s.cluster.node(leader).status().applied_index;
    s.cluster.wait_applied(applied).await?;
    assert!(s.cluster.states().values().all(|sm| sm.txn(&future).is_none()), "no node records the id");
    assert_eq!(s.a.resource.prepare_calls(future), 0);
    let near = TxnId::created_at(unix_now_ms() + 5_000);
    let ok = submit(&s.client, request(near, &[("bank-a", "x"), ("bank-b", "y")])).await?;
    assert_eq!(ok.decision, pb::Decision::Commit as i32);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_txn_gets_no_second_outcome() -> anyhow::Result<()> {
    // I2 and §7.2: once a committed txn is forgotten, Resolve, Decide, GetTransaction and a
    // retried Submit all answer FAILED_PRECONDITION ("forgotten"); none logs a decision, so the
    // log never reports Abort for a txn it once committed (a Resolve used to log a presumed
    // abort, which GetTransaction and Submit then reported).
    let s = setup(
        5_000,
        Box::new(|c| {
            c.engine.retention_ms = 3_000;
            c.engine.deadline_max_ms = 1_000;
            c.engine.gc_interval_ms = 50;
        }),
    )
    .await?;
    let txn = TxnId::new();
    let mut first = request(txn, &[("bank-a", "debit"), ("bank-b", "credit")]);
    first.deadline_unix_ms = unix_now_ms() + 900;
    assert_eq!(submit(&s.client, first.clone()).await?.decision, pb::Decision::Commit as i32);
    wait::finished(&s.client, txn, SETTLE).await?;
    wait::until("every node to forget the txn", SETTLE, || async {
        s.cluster.states().values().all(|sm| sm.txn(&txn).is_none() && sm.may_have_forgotten(&txn)).then_some(())
    })
    .await?;
    let resolved = resolve(&s.client, txn).await.map(drop);
    let decided = operator_decide(&s.client, txn, pb::Decision::Abort, "clean up", false).await.map(drop);
    let got = wait::transaction(&s.client, txn).await.map(drop);
    first.deadline_unix_ms = unix_now_ms() + 900;
    let submitted = submit(&s.client, first).await.map(drop);
    for (what, answer) in [("resolve", resolved), ("decide", decided), ("get", got), ("submit", submitted)] {
        let err = answer.expect_err(what);
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {}", err.message());
    }
    let err = resolve(&s.client, txn).await.expect_err("still forgotten");
    assert!(err.message().contains("forgotten; its outcome is no longer kept"), "{}", err.message());
    let leader = s.cluster.wait_for_leader().await?;
    s.cluster.wait_applied(s.cluster.node(leader).status().applied_index).await?;
    assert!(s.cluster.states().values().all(|sm| sm.txn(&txn).is_none()), "no second decision was logged");
    assert_eq!(s.a.resource.commit_count(txn), 1);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_are_capped_before_they_enter_the_log() -> anyhow::Result<()> {
    // I6: a NO vote's reason of any length is cut to REASON_MAX_BYTES (on a char boundary)
    // before it is logged, so the record, the answer and every snapshot stay bounded; an
    // operator's reason past OPERATOR_REASON_MAX_BYTES is refused with INVALID_ARGUMENT.
    let s = setup(120_000, Box::new(|_| {})).await?;
    let txn = TxnId::new();
    let long_no = format!("no:{}", "é".repeat(1_000));
    let response = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", &long_no)])).await?;
    assert_eq!(response.decision, pb::Decision::Abort as i32);
    let max = twopc_coordinator::command::REASON_MAX_BYTES;
    assert!(response.reason.len() <= max, "reason of {} bytes", response.reason.len());
    let b_vote = response.votes.iter().find(|v| v.participant == "bank-b").expect("bank-b's vote");
    assert_eq!(b_vote.reason, "é".repeat(max / 2), "cut on a char boundary");
    let logged = wait::transaction(&s.client, txn).await?;
    assert!(logged.reason.len() <= max && logged.branches.iter().all(|b| b.reason.len() <= max));

    let longest = twopc_coordinator::engine::OPERATOR_REASON_MAX_BYTES;
    let too_long = operator_decide(&s.client, TxnId::new(), pb::Decision::Abort, &"x".repeat(longest + 1), false);
    let err = too_long.await.expect_err("an over-long operator reason");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let fits = TxnId::new();
    operator_decide(&s.client, fits, pb::Decision::Abort, &"x".repeat(longest), false).await?;
    let info = wait::transaction(&s.client, fits).await?;
    assert_eq!(info.reason, format!("operator: {}", "x".repeat(longest)), "kept whole");
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_submit_with_other_branches_is_refused() -> anyhow::Result<()> {
    // I5 and §5 step 6: a Submit for a txn id that is running or logged with other branches is
    // refused with FAILED_PRECONDITION instead of joining it (its caller would learn an outcome
    // for work that was never prepared); a retry with the same branches still joins or answers.
    let s = setup(120_000, Box::new(|_| {})).await?;
    let leader = s.cluster.wait_for_leader().await?;
    s.cluster.gate.hold_after_prepare(true);
    let txn = TxnId::new();
    let both = request(txn, &[("bank-a", "debit"), ("bank-b", "credit")]);
    let only_a = request(txn, &[("bank-a", "debit")]);
    let pending = submit_once(s.cluster.addr(leader), both.clone());
    wait::until("both branches to vote", SETTLE, || async { (s.cluster.gate.prepares_answered() >= 2).then_some(()) })
        .await?;
    let running = tokio::time::timeout(SETTLE, submit(&s.client, only_a.clone())).await?;
    let err = running.expect_err("other branches than the running txn's");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("bank-b"), "{}", err.message());
    s.cluster.gate.hold_after_prepare(false);
    assert_eq!(pending.await??.decision, pb::Decision::Commit as i32);
    let logged = submit(&s.client, only_a).await.expect_err("other branches than the logged txn's");
    assert_eq!(logged.code(), Code::FailedPrecondition, "{}", logged.message());
    let reordered = request(txn, &[("bank-b", "credit"), ("bank-a", "debit")]);
    assert_eq!(submit(&s.client, reordered).await?.decision, pb::Decision::Commit as i32);
    assert_eq!(s.a.resource.prepare_calls(txn), 1);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_not_named_in_the_decided_record_aborts_its_branch() -> anyhow::Result<()> {
    // I1 and §6: a client reusing a txn id with another branch set across a leader change can
    // leave a branch prepared at a participant the decided record does not name. That branch
    // belongs to a Submit that was never decided: Resolve answers that participant Abort, never
    // the record's Commit; a participant the record names gets the record's decision.
    let s = setup(120_000, Box::new(|_| {})).await?;
    s.cluster.wait_for_leader().await?;
    let (only_b, both) = (TxnId::new(), TxnId::new());
    let committed = submit(&s.client, request(only_b, &[("bank-b", "credit")])).await?;
    assert_eq!(committed.decision, pb::Decision::Commit as i32);
    let committed = submit(&s.client, request(both, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
    assert_eq!(committed.decision, pb::Decision::Commit as i32);
    // Once logged: until then a Resolve is answered "undecided, ask again" (§13.2).
    wait::finished(&s.client, only_b, SETTLE).await?;
    wait::finished(&s.client, both, SETTLE).await?;
    assert_eq!(resolve(&s.client, only_b).await?.decision, pb::Decision::Abort as i32, "bank-a is not named");
    assert_eq!(resolve(&s.client, both).await?.decision, pb::Decision::Commit as i32, "bank-a is named");
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_that_arrive_while_one_lingers_share_its_entry() -> anyhow::Result<()> {
    // §5 step 5: an Acknowledge entry gathers for ack_linger_ms after its
    // first acknowledgement, so five txns committed one after another, two
    // branches each, log their ten acknowledgements in a few entries, not
    // one or two per txn.
    let s = setup(5_000, Box::new(|config| config.engine.ack_linger_ms = 1_000)).await?;
    let leader = s.cluster.wait_for_leader().await?;
    for _ in 0..5 {
        let txn = TxnId::new();
        let response = submit(&s.client, request(txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
        assert_eq!(response.decision, pb::Decision::Commit as i32);
    }
    let delivered =
        || async { (s.cluster.counter(leader, "twopc_decisions_delivered_total").ok()? >= 10).then_some(()) };
    wait::until("ten acknowledgements counted", SETTLE, delivered).await?;
    let entries = || async {
        let entries = s.cluster.counter(leader, "twopc_ack_entries_total").ok()?;
        (entries > 0).then_some(entries)
    };
    let entries = wait::until("the acknowledgements logged", SETTLE, entries).await?;
    assert!(entries <= 2, "ten acknowledgements took {entries} entries");
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_commits_at_low_load_share_one_decisions_entry() -> anyhow::Result<()> {
    // §13.2: an explicit decision that starts a Decisions entry waits
    // decision_linger_ms for others, so five parallel commits one after
    // another log five Staged entries, one Decisions entry and one
    // Acknowledge entry, where without the wait each would log its own
    // Decisions entry (eleven or more entries).
    let s = setup(
        5_000,
        Box::new(|config| {
            config.engine.decision_linger_ms = 1_000;
            config.engine.ack_linger_ms = 1_000;
        }),
    )
    .await?;
    let leader = s.cluster.wait_for_leader().await?;
    let before = s.cluster.node(leader).status().applied_index;
    let txns: Vec<TxnId> = (0..5).map(|_| TxnId::new()).collect();
    for txn in &txns {
        let response = submit(&s.client, request(*txn, &[("bank-a", "debit"), ("bank-b", "credit")])).await?;
        assert_eq!(response.decision, pb::Decision::Commit as i32);
    }
    // The leader's Submit latency is to the answer, not to the explicit
    // decision a second later: five answers, five recorded.
    let answered = s.cluster.counter(leader, "twopc_submit_seconds_count")?;
    assert_eq!(answered, 5, "Submit latencies recorded when the five clients had their answers");
    for txn in &txns {
        wait::finished(&s.client, *txn, SETTLE).await?;
    }
    let entries = s.cluster.node(leader).status().applied_index - before;
    assert!(entries <= 8, "five parallel commits took {entries} entries");
    s.cluster.stop().await
}
