//! I7 (liveness) and I1/I5 for the in-doubt resolver, against the fake
//! coordinator: branches left prepared are settled by asking the cluster,
//! following leader hints and retrying through outages, and the decision is
//! applied exactly once even when the coordinator's own Decide races it.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{GatedResource, config, dead_addr, start, vote, wait_until, within};
use twopc_participant::fake_coordinator::FakeCoordinator;
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
