//! I4 (tombstones) and I5 (idempotency) at the gRPC server: repeats are
//! answered from the outcome memory without calling the resource again, and
//! an Abort seen before its Prepare keeps the Prepare out.

mod common;

use std::sync::Arc;

use common::{config, dead_addr, prepare_request, start, vote, within};
use twopc_participant::{Decision, MemoryResource, TxnId, Vote};

// I4: Abort before Prepare leaves a tombstone; the late Prepare votes NO, and the library
// answers it from its own memory (the resource is not asked, and holds nothing).
#[tokio::test]
async fn abort_before_prepare_makes_the_late_prepare_vote_no() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    p.decide(txn, Decision::Abort).await?;
    assert!(resource.is_aborted(txn), "the resource keeps a durable tombstone");

    let late = vote(&p.prepare(txn, b"ok").await?)?;
    assert!(!late.is_yes(), "a prepare after abort voted YES");
    assert_eq!(resource.prepare_calls(txn), 0, "the tombstone in the outcome memory should answer the late prepare");
    assert!(!resource.is_prepared(txn));

    let status = p.decide(txn, Decision::Commit).await;
    assert_eq!(status.map_err(|s| s.code()), Err(tonic::Code::FailedPrecondition));
    p.stop().await
}

// I4: the tombstone outlives a participant restart (outcome memory lost): the late Prepare
// still votes NO, now from the resource's durable tombstone.
#[tokio::test]
async fn tombstone_survives_a_participant_restart() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    p.decide(txn, Decision::Abort).await?;
    p.stop().await?;

    let restarted = Arc::new(resource.restarted());
    drop(resource);
    let p = start(Arc::clone(&restarted), config(vec![dead_addr().await?])).await?;
    let late = vote(&p.prepare(txn, b"ok").await?)?;
    assert!(!late.is_yes(), "a prepare after abort and restart voted YES");
    assert!(!restarted.is_prepared(txn));
    p.stop().await
}

// I5: a repeated Prepare returns the recorded vote (YES or NO with its reason) and does not
// call the resource again.
#[tokio::test]
async fn repeated_prepare_returns_the_recorded_vote_without_calling_the_resource() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let (yes, no) = (TxnId::new(), TxnId::new());
    for _ in 0..3 {
        assert_eq!(vote(&p.prepare(yes, b"ok").await?)?, Vote::Yes);
        assert_eq!(vote(&p.prepare(no, b"no:insufficient funds").await?)?, Vote::no("insufficient funds"));
    }
    // A repeat of a refused branch with another payload gets the recorded NO.
    assert_eq!(vote(&p.prepare(no, b"ok").await?)?, Vote::no("insufficient funds"));
    assert_eq!(resource.prepare_calls(yes), 1);
    assert_eq!(resource.prepare_calls(no), 1);
    let m = p.metrics.snapshot();
    assert_eq!((m.prepares, m.votes_yes, m.votes_no), (7, 1, 1));
    assert_eq!(m.in_doubt_now, 1);
    p.stop().await
}

// §3.1: one txn id carries one set of payloads. A repeated Prepare of a prepared branch with
// another payload is refused (FAILED_PRECONDITION, not a vote) and changes nothing: the branch
// stays prepared and its YES stands, for its own payload. Status recovery (§13.3) asking about
// another payload gets NO, about its own or any payload YES. Before this, the repeat got the
// recorded YES, which joined two Submits' branches in one Commit.
#[tokio::test]
async fn a_repeated_prepare_with_another_payload_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::Yes);
    let refused =
        p.prepare(txn, b"ok, but another amount").await.map(|_| ()).map_err(|s| (s.code(), s.message().to_owned()));
    let Err((code, message)) = refused else { anyhow::bail!("a repeat with another payload got a vote") };
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(message.contains("another payload") && message.contains("new txn id"), "{message}");
    assert_eq!(resource.prepare_calls(txn), 1);
    assert!(resource.is_prepared(txn));
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::Yes, "the branch's own payload still gets its YES");
    assert!(!p.recover_vote(txn, Some(b"ok, but another amount")).await?.is_yes());
    assert!(resource.is_prepared(txn), "a vote recovery for another payload changed nothing");
    assert_eq!(p.recover_vote(txn, Some(b"ok")).await?, Vote::Yes);
    assert_eq!(p.recover_vote(txn, None).await?, Vote::Yes);
    p.stop().await
}

// §3.1 across a restart: the payload's digest comes back from the resource with the prepared
// branch (Resource::prepared_with_digests), so another payload is still refused and a status
// recovery about it still gets NO. Before, a restarted participant answered both with the
// recorded YES (§13.4's open limit).
#[tokio::test]
async fn another_payload_is_refused_after_a_participant_restart() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::Yes);
    p.stop().await?;

    let restarted = Arc::new(resource.restarted());
    drop(resource);
    let p = start(Arc::clone(&restarted), config(vec![dead_addr().await?])).await?;
    let refused = p.prepare(txn, b"ok, but another amount").await.map(|_| ()).map_err(|s| s.code());
    assert_eq!(refused, Err(tonic::Code::FailedPrecondition), "a restart forgot which payload was prepared");
    assert!(!p.recover_vote(txn, Some(b"ok, but another amount")).await?.is_yes());
    assert!(restarted.is_prepared(txn), "nothing changed");
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::Yes);
    assert_eq!(p.recover_vote(txn, Some(b"ok")).await?, Vote::Yes);
    p.stop().await
}

// I5: a repeated Decide is a no-op success: the decision reaches the resource once, and its
// effect is applied once, for Commit and for Abort.
#[tokio::test]
async fn repeated_decide_is_a_no_op() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let (committed, aborted, tombstoned) = (TxnId::new(), TxnId::new(), TxnId::new());
    p.prepare(committed, b"ok").await?;
    p.prepare(aborted, b"ok").await?;
    for _ in 0..3 {
        p.decide(committed, Decision::Commit).await?;
        p.decide(aborted, Decision::Abort).await?;
        p.decide(tombstoned, Decision::Abort).await?;
    }
    assert_eq!(resource.commit_calls(committed), 1);
    assert_eq!(resource.commit_count(committed), 1);
    assert_eq!(resource.abort_calls(aborted), 1);
    assert_eq!(resource.abort_calls(tombstoned), 1);
    let m = p.metrics.snapshot();
    assert_eq!((m.commits, m.aborts, m.in_doubt_now), (1, 2, 0));
    p.stop().await
}

// I5 under concurrency: many identical Decides at once reach the resource once (per-txn lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_decides_apply_once() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = Arc::new(start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?);
    let txns: Vec<TxnId> = (0..8).map(|_| TxnId::new()).collect();
    for txn in &txns {
        p.prepare(*txn, b"ok").await?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for txn in &txns {
        for _ in 0..8 {
            let (p, txn) = (Arc::clone(&p), *txn);
            tasks.spawn(async move { p.decide(txn, Decision::Commit).await });
        }
    }
    while let Some(done) = within("concurrent decides", tasks.join_next()).await? {
        done??;
    }
    for txn in &txns {
        assert_eq!(resource.commit_calls(*txn), 1, "txn {txn}");
        assert_eq!(resource.commit_count(*txn), 1, "txn {txn}");
    }
    Ok(())
}

// I5 after a restart: a Decide repeated after the participant restarted (outcome memory lost)
// is still a no-op, because the resource's own record answers it.
#[tokio::test]
async fn repeated_decide_after_restart_applies_nothing_again() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    p.prepare(txn, b"ok").await?;
    p.decide(txn, Decision::Commit).await?;
    p.stop().await?;

    let restarted = Arc::new(resource.restarted());
    let p = start(Arc::clone(&restarted), config(vec![dead_addr().await?])).await?;
    p.decide(txn, Decision::Commit).await?;
    assert_eq!(restarted.commit_count(txn), 1);
    p.stop().await
}

// I1: a transient resource failure during Decide is UNAVAILABLE and changes nothing; the
// coordinator's retry then applies the decision once.
#[tokio::test]
async fn transient_resource_failure_is_unavailable_and_the_retry_applies_once() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let txn = TxnId::new();
    p.prepare(txn, b"ok").await?;
    resource.set_unavailable(true);
    let status = p.decide(txn, Decision::Commit).await;
    assert_eq!(status.map_err(|s| s.code()), Err(tonic::Code::Unavailable));
    assert_eq!(resource.commit_count(txn), 0);
    assert!(resource.is_prepared(txn), "a failed decision released the branch");

    resource.set_unavailable(false);
    p.decide(txn, Decision::Commit).await?;
    p.decide(txn, Decision::Commit).await?;
    assert_eq!(resource.commit_count(txn), 1);
    p.stop().await
}

// I5: a decision repeated inside one DecideBatch, and the batch repeated, is carried out once;
// every copy is acknowledged.
#[tokio::test]
async fn a_decision_repeated_in_and_across_batches_is_applied_once() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let p = start(Arc::clone(&resource), config(vec![dead_addr().await?])).await?;
    let (committed, aborted) = (TxnId::new(), TxnId::new());
    p.prepare(committed, b"ok").await?;
    p.prepare(aborted, b"ok").await?;
    let commit = (committed.to_string(), i32::from(Decision::Commit));
    let abort = (aborted.to_string(), i32::from(Decision::Abort));
    let batch = [commit.clone(), abort.clone(), commit, abort];
    for _ in 0..2 {
        let results = within("a batch", p.decide_batch(&batch)).await??;
        assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    }
    assert_eq!(resource.commit_count(committed), 1);
    assert!(resource.is_aborted(aborted));
    assert!(!resource.is_prepared(committed) && !resource.is_prepared(aborted));
    p.stop().await
}

// I5 and I1: a committed txn forgotten by the outcome memory, then asked again by a late
// duplicate Prepare past its deadline, still takes its re-driven Commit. The late Prepare has
// the resource record its refusal (docs/PROTOCOL.md §13.1: every NO is final), and the
// resource's durable record of the commit answers: YES, the vote the branch gave.
#[tokio::test]
async fn redriven_commit_after_a_late_refused_prepare_of_a_forgotten_commit_succeeds() -> anyhow::Result<()> {
    let resource = Arc::new(MemoryResource::new());
    let mut config = config(vec![dead_addr().await?]);
    config.outcome_memory_max = 2;
    let p = start(Arc::clone(&resource), config).await?;
    let txn = TxnId::new();
    assert_eq!(vote(&p.prepare(txn, b"ok").await?)?, Vote::Yes);
    p.decide(txn, Decision::Commit).await?;
    // Two newer finished entries push the committed one out of the memory.
    for other in [TxnId::new(), TxnId::new()] {
        p.decide(other, Decision::Abort).await?;
    }

    let mut late = prepare_request(txn, b"ok");
    late.deadline_unix_ms = 1;
    let late = p.client.clone().prepare(late).await?.into_inner();
    assert!(vote(&late)?.is_yes(), "the late prepare is answered with the committed branch's vote");

    p.decide(txn, Decision::Commit).await?;
    assert_eq!(resource.commit_count(txn), 1, "the re-driven commit applied the branch again");
    p.stop().await
}
