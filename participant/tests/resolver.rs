//! I7 (liveness) and I1/I5 for the in-doubt resolver, against the fake
//! coordinator: branches left prepared are settled by asking the cluster,
//! following leader hints and retrying through outages, and the decision is
//! applied exactly once even when the coordinator's own Decide races it.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{
    FailAt, FailingPrepares, GatedResource, Running, config, dead_addr, prepare_request, start, vote, wait_until,
    within,
};
use twopc_participant::fake_coordinator::{FakeCoordinator, RunningFake};
use twopc_participant::{Decision, MemoryResource, Resource, TxnId, Vote};

/// A resource holding YES votes for `txns`, as found after a crash: the
/// returned copy shares the durable state, the original is dropped.
async fn restarted_with_prepared(txns: &[TxnId]) -> anyhow::Result<MemoryResource> {
    let before_crash = MemoryResource::new();
    for txn in txns {
        let vote = before_crash.prepare(*txn, Bytes::from_static(b"ok")).await?;
        anyhow::ensure!(vote == Vote::Yes, "setup: {txn} voted {vote:?}");
    }
    Ok(before_crash.restarted())
}

// I7 and I1: a participant restarted with prepared branches asks the cluster: a dead node is
// skipped, a follower's leader hint is followed to a node not in the config, the leader's
// outage is waited out with backoff, and each returned decision (including a presumed abort)
// is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_participant_resolves_through_hint_and_outage() -> anyhow::Result<()> {
    let (to_commit, to_abort, unknown) = (TxnId::new(), TxnId::new(), TxnId::new());
    let resource = Arc::new(restarted_with_prepared(&[to_commit, to_abort, unknown]).await?);

    let leader = FakeCoordinator::new();
    leader.set_decision(to_commit, Decision::Commit);
    leader.set_decision(to_abort, Decision::Abort);
    let outage_calls = 5;
    leader.fail_next(outage_calls);
    let leader_node = leader.start().await?;
    let follower = FakeCoordinator::new();
    let leader_addr = leader_node.addr().to_string();
    follower.set_follower(Some(&leader_addr));
    let follower_node = follower.start().await?;

    // The leader is deliberately not configured: only its hint leads there.
    let coordinators = vec![dead_addr().await?, follower_node.addr().to_string()];
    let p = start(Arc::clone(&resource), config(coordinators)).await?;

    let all = [to_commit, to_abort, unknown];
    wait_until("every recovered branch is decided", || all.iter().all(|t| !resource.is_prepared(*t))).await?;

    assert_eq!(resource.commit_count(to_commit), 1);
    assert_eq!(resource.commit_calls(to_commit), 1);
    assert!(resource.is_aborted(to_abort));
    assert!(resource.is_aborted(unknown), "presumed abort not applied");
    assert_eq!(leader.decision(unknown), Some(Decision::Abort));
    assert!(follower.calls(to_commit) >= 1, "the follower was never asked");
    assert!(leader.total_calls() >= u64::from(outage_calls) + 3, "the leader answered before its outage ended?");
    for txn in all {
        assert_eq!(resource.commit_calls(txn) + resource.abort_calls(txn), 1, "{txn}");
    }
    wait_until("the resolves are counted", || p.metrics.snapshot().resolves == 3).await?;
    assert_eq!(p.metrics.snapshot().in_doubt_now, 0);
    p.stop().await
}

// I7 and "never decides on its own": while no coordinator can answer, the resolver keeps
// asking and the branch stays prepared, untouched.
#[tokio::test]
async fn resolver_keeps_asking_and_never_decides_alone() -> anyhow::Result<()> {
    let txn = TxnId::new();
    let resource = Arc::new(restarted_with_prepared(&[txn]).await?);
    let coordinator = FakeCoordinator::new();
    coordinator.fail_next(u32::MAX);
    let node = coordinator.start().await?;
    let p = start(Arc::clone(&resource), config(vec![node.addr().to_string()])).await?;

    wait_until("several resolve rounds failed", || coordinator.calls(txn) >= 5).await?;
    assert!(resource.is_prepared(txn), "the branch was released without a decision");
    assert_eq!(resource.commit_calls(txn) + resource.abort_calls(txn), 0);
    assert_eq!(p.metrics.snapshot().in_doubt_now, 1);

    coordinator.fail_next(0);
    coordinator.set_decision(txn, Decision::Commit);
    wait_until("the branch is committed", || resource.commit_count(txn) == 1).await?;
    p.stop().await
}

// I7: a branch that voted YES and heard nothing for in_doubt_timeout_ms is resolved; one
// decided before its timeout is never asked about.
#[tokio::test]
async fn prepared_branch_past_the_in_doubt_timeout_is_resolved() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let coordinator = FakeCoordinator::new();
    let node = coordinator.start().await?;
    let (decided, forgotten) = (TxnId::new(), TxnId::new());
    coordinator.set_decision(forgotten, Decision::Commit);
    let mut config = config(vec![node.addr().to_string()]);
    config.in_doubt_timeout_ms = 50;
    let p = start(Arc::clone(&resource), config).await?;

    assert_eq!(vote(&p.prepare(decided, b"ok").await?)?, Vote::Yes);
    p.decide(decided, Decision::Commit).await?;
    assert_eq!(vote(&p.prepare(forgotten, b"ok").await?)?, Vote::Yes);
    let prepared_at = tokio::time::Instant::now();

    wait_until("the forgotten branch is committed", || resource.commit_count(forgotten) == 1).await?;
    assert!(prepared_at.elapsed().as_millis() >= 50, "asked before the in-doubt timeout");
    assert_eq!(coordinator.calls(decided), 0, "asked about a decided branch");
    assert!(coordinator.calls(forgotten) >= 1);
    p.stop().await
}

// I7 across retention (§7.2): a branch still prepared here for a txn the coordinator has
// forgotten belongs to an aborted txn (retention keeps every branchless Commit, and a named
// branch acknowledged before it could be forgotten): the resolver aborts it instead of asking
// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_of_a_txn_the_coordinator_forgot_is_aborted() -> anyhow::Result<()> {
    let forgotten = TxnId::new();
    let resource = Arc::new(restarted_with_prepared(&[forgotten]).await?);
    let coordinator = FakeCoordinator::new();
    coordinator.set_forgotten(forgotten);
    let node = coordinator.start().await?;
    let p = start(Arc::clone(&resource), config(vec![node.addr().to_string()])).await?;

    wait_until("the branch of the forgotten txn is aborted", || resource.is_aborted(forgotten)).await?;
    assert_eq!(resource.commit_count(forgotten), 0);
    assert!(coordinator.calls(forgotten) >= 1);
    p.stop().await
}

// I5 and I1: the resolver applies the coordinator's answer while the coordinator's own Decide
// arrives: the decision reaches the resource once, and the Decide succeeds as a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decide_racing_the_resolver_applies_once() -> anyhow::Result<()> {
    let txn = TxnId::new();
    let resource = Arc::new(GatedResource::new(restarted_with_prepared(&[txn]).await?));
    let coordinator = FakeCoordinator::new();
    coordinator.set_decision(txn, Decision::Commit);
    let node = coordinator.start().await?;

    resource.hold_commits();
    let p = Arc::new(start(Arc::clone(&resource), config(vec![node.addr().to_string()])).await?);
    wait_until("the resolver is applying its answer", || resource.commits_held() == 1).await?;
    let racing = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.decide(txn, Decision::Commit).await })
    };
    resource.release_commits();
    within("the racing decide", racing).await???;

    assert_eq!(resource.inner.commit_calls(txn), 1);
    assert_eq!(resource.inner.commit_count(txn), 1);
    assert_eq!(resource.commits_held(), 1, "the racing decide reached the resource");
    Ok(())
}

// I5 and I1, the other order: the coordinator's Decide is being applied when the resolver gets
// its answer; the resolver's application is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_racing_a_decide_applies_once() -> anyhow::Result<()> {
    let txn = TxnId::new();
    let resource = Arc::new(GatedResource::new(restarted_with_prepared(&[txn]).await?));
    let coordinator = FakeCoordinator::new();
    coordinator.set_decision(txn, Decision::Commit);
    // A follower with no leader: the resolver keeps asking, getting nowhere.
    coordinator.set_follower(None);
    let node = coordinator.start().await?;

    resource.hold_commits();
    let p = Arc::new(start(Arc::clone(&resource), config(vec![node.addr().to_string()])).await?);
    let deciding = {
        let p = Arc::clone(&p);
        tokio::spawn(async move { p.decide(txn, Decision::Commit).await })
    };
    wait_until("the decide is being applied", || resource.commits_held() == 1).await?;

    // Now the resolver gets its answer while the Decide holds the txn.
    let asked_before = coordinator.calls(txn);
    coordinator.set_leader();
    wait_until("the resolver got an answer", || coordinator.calls(txn) > asked_before).await?;
    resource.release_commits();
    within("the decide", deciding).await???;
    wait_until("the resolver is done", || p.metrics.snapshot().resolves == 1 || !resource.inner.is_prepared(txn))
        .await?;

    assert_eq!(resource.inner.commit_count(txn), 1);
    assert_eq!(resource.commits_held(), 1, "the resolver's answer reached the resource");
    assert_eq!(resource.inner.commit_calls(txn), 1);
    Ok(())
}

/// A participant whose resource fails its first Prepare (at `at`), with a
/// 50 ms in-doubt timeout, asking a fake coordinator that holds Abort for `txn`.
struct Failing {
    resource: Arc<FailingPrepares<MemoryResource>>,
    coordinator: FakeCoordinator,
    node: RunningFake,
    p: Running,
    txn: TxnId,
}

async fn failing_prepare_of_an_aborted_txn(at: FailAt) -> anyhow::Result<Failing> {
    let resource = Arc::new(FailingPrepares::new(MemoryResource::new(), at, 1));
    let coordinator = FakeCoordinator::new();
    let node = coordinator.start().await?;
    let txn = TxnId::new();
    coordinator.set_decision(txn, Decision::Abort);
    let mut config = config(vec![node.addr().to_string()]);
    config.in_doubt_timeout_ms = 50;
    let p = start(Arc::clone(&resource), config).await?;
    Ok(Failing { resource, coordinator, node, p, txn })
}

// I7 and I4: a Prepare whose resource failed after staging the branch (the reply to PREPARE
// TRANSACTION lost) leaves the txn in doubt, not forgotten: the resolver asks the coordinator
// and applies its Abort, which releases the branch without a restart; a late Prepare votes NO.
#[tokio::test]
async fn prepare_failing_after_staging_is_resolved_and_released() -> anyhow::Result<()> {
    let Failing { resource, coordinator, node: _node, p, txn } =
        failing_prepare_of_an_aborted_txn(FailAt::AfterStaging).await?;

    let failed = p.prepare(txn, b"ok").await;
    assert_eq!(failed.map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::Unavailable));
    assert!(resource.inner.is_prepared(txn), "setup: the branch was staged before the failure");
    assert_eq!(p.metrics.snapshot().in_doubt_now, 1, "the branch is not counted in doubt");

    wait_until("the staged branch is aborted", || resource.inner.is_aborted(txn)).await?;
    assert!(coordinator.calls(txn) >= 1, "released without asking the coordinator");
    assert_eq!(resource.inner.commit_count(txn), 0);
    wait_until("nothing is in doubt", || p.metrics.snapshot().in_doubt_now == 0).await?;
    assert!(!vote(&p.prepare(txn, b"ok").await?)?.is_yes(), "a late prepare after the abort voted YES");
    p.stop().await
}

// I7 and I5: after a failed Prepare the coordinator's retry is asked of the resource again,
// whose recorded YES now stands; the branch is then decided as any other, once.
#[tokio::test]
async fn prepare_retried_after_a_failure_after_staging_returns_the_staged_vote() -> anyhow::Result<()> {
    let resource = Arc::new(FailingPrepares::new(MemoryResource::new(), FailAt::AfterStaging, 1));
    let coordinator = FakeCoordinator::new();
    let node = coordinator.start().await?;
    let p = start(Arc::clone(&resource), config(vec![node.addr().to_string()])).await?;
    let txn = TxnId::new();

    assert!(p.prepare(txn, b"ok").await.is_err(), "setup: the first prepare fails");
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::Yes);
    assert_eq!(resource.inner.prepare_calls(txn), 2, "the retry was not asked of the resource");
    p.decide(txn, Decision::Commit).await?;
    assert_eq!(resource.inner.commit_count(txn), 1);
    assert_eq!(p.metrics.snapshot().in_doubt_now, 0);
    p.stop().await
}

// I7 and I4: a Prepare that failed before staging anything is also settled (the library cannot
// tell the two apart): the coordinator's Abort leaves a tombstone, and a retried Prepare then
// votes NO instead of staging a branch nobody will decide.
#[tokio::test]
async fn prepare_failing_before_staging_is_settled_by_a_tombstone() -> anyhow::Result<()> {
    let Failing { resource, coordinator: _, node: _node, p, txn } =
        failing_prepare_of_an_aborted_txn(FailAt::BeforeStaging).await?;

    assert!(p.prepare(txn, b"ok").await.is_err(), "setup: the prepare fails");
    wait_until("the txn has a tombstone", || resource.inner.is_aborted(txn)).await?;
    wait_until("nothing is in doubt", || p.metrics.snapshot().in_doubt_now == 0).await?;
    assert!(!vote(&p.prepare(txn, b"ok").await?)?.is_yes(), "a prepare after the abort voted YES");
    assert!(!resource.inner.is_prepared(txn));
    p.stop().await
}

// I7, §7.1 and §13.1: a Prepare repeated past its deadline after a failure after staging votes
// NO without staging anything, and the branch that may be staged is aborted in the resource then
// and there: it never voted YES, and the NO must stay a NO (a later Prepare with a later deadline
// must not find it preparable). Nothing is left in doubt.
#[tokio::test]
async fn late_prepare_after_a_failure_after_staging_aborts_the_branch() -> anyhow::Result<()> {
    let Failing { resource, coordinator, node: _node, p, txn } =
        failing_prepare_of_an_aborted_txn(FailAt::AfterStaging).await?;
    coordinator.fail_next(u32::MAX);

    assert!(p.prepare(txn, b"ok").await.is_err(), "setup: the prepare fails");
    let mut late = prepare_request(txn, b"ok");
    late.deadline_unix_ms = 1;
    let late = p.client.clone().prepare(late).await?.into_inner();
    assert!(!vote(&late)?.is_yes(), "a prepare past its deadline voted YES");
    assert_eq!(resource.inner.prepare_calls(txn), 1, "the late prepare reached the resource");
    assert!(resource.inner.is_aborted(txn), "the maybe-staged branch was not released");
    assert_eq!(p.metrics.snapshot().in_doubt_now, 0, "the settled branch is still counted in doubt");
    let again = p.client.clone().prepare(prepare_request(txn, b"ok")).await?.into_inner();
    assert!(!vote(&again)?.is_yes(), "a later Prepare with a live deadline voted YES after the NO");
    p.stop().await
}
