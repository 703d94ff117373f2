//! PostgresResource against a real server, beyond the conformance suite:
//! the gid's life in pg_prepared_xacts (I3, I1), recovery scoped to this
//! participant and schema, a reserve abandoned by a crash (I4), bounded
//! retention and a bounded pool (I6). Skipped where no server allows
//! prepared transactions, unless TWOPC_REQUIRE_POSTGRES=1.

#![cfg(feature = "postgres")]

mod common;
mod postgres_common;

use std::sync::Arc;

use bytes::Bytes;
use postgres_common::Counting;
use twopc_participant::fake_coordinator::FakeCoordinator;
use twopc_participant::postgres::{BranchStatus, PostgresConfig};
use twopc_participant::postgres_testing::{self, Cleanup, TestDatabase};
use twopc_participant::{Decision, ParticipantId, Resource, ResourceError, TxnId, Vote};
use twopc_proto::txn_id::unix_now_ms;

struct Setup {
    db: TestDatabase,
    participant: ParticipantId,
    config: PostgresConfig,
    _cleanup: Cleanup,
}

async fn setup(test: &str) -> Option<Setup> {
    let db = postgres_testing::database(test).await?;
    let participant: ParticipantId = postgres_testing::unique_name("pgres").parse().expect("participant id");
    let schema = postgres_testing::unique_name("twopc_res");
    let cleanup = Cleanup::new(&db.url);
    cleanup.schema(&schema, &format!("twopc:{participant}:"));
    let config = PostgresConfig::new(&db.url, schema);
    Some(Setup { db, participant, config, _cleanup: cleanup })
}

impl Setup {
    async fn open(&self) -> Counting {
        postgres_common::open(&self.participant, self.config.clone()).await
    }

    async fn gids(&self) -> Vec<String> {
        postgres_testing::prepared_gids(&self.db.url, &format!("twopc:{}:", self.participant)).await
    }
}

// I3 + I1: a YES vote is a prepared transaction named twopc:<participant>:<txn>;
// COMMIT PREPARED makes its effect visible, ROLLBACK PREPARED discards it, and
// either way the gid leaves pg_prepared_xacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yes_vote_is_a_prepared_transaction_until_its_decision() {
    let Some(s) = setup("a_yes_vote_is_a_prepared_transaction_until_its_decision").await else { return };
    let r = s.open().await;
    let (committed, aborted) = (TxnId::new(), TxnId::new());
    for txn in [committed, aborted] {
        assert_eq!(r.prepare(txn, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    }
    let mut expected = vec![r.gid(committed), r.gid(aborted)];
    expected.sort();
    assert_eq!(s.gids().await, expected);
    assert_eq!(r.gid(committed), format!("twopc:{}:{committed}", s.participant));
    assert_eq!(postgres_common::effects(&r, committed).await, 0, "visible before COMMIT PREPARED");
    r.commit(committed).await.expect("commit");
    r.abort(aborted).await.expect("abort");
    assert!(s.gids().await.is_empty(), "gids left after their decisions: {:?}", s.gids().await);
    assert_eq!(postgres_common::effects(&r, committed).await, 1);
    assert_eq!(postgres_common::effects(&r, aborted).await, 0);
    assert_eq!(r.status(committed).await.expect("status"), Some(BranchStatus::Committed { settled: true }));
    assert_eq!(r.status(aborted).await.expect("status"), Some(BranchStatus::Aborted));
    assert_eq!(postgres_common::reservations(&r).await, 0, "a reservation was not settled");
}

// Recovery lists only this participant's gids with a row in this schema: a
// second participant's prepared branch on the same server is not ours to settle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_lists_only_this_participants_branches() {
    let Some(s) = setup("recovery_lists_only_this_participants_branches").await else { return };
    let Some(other) = setup("recovery_lists_only_this_participants_branches").await else { return };
    let (ours, theirs) = (s.open().await, other.open().await);
    let (a, b) = (TxnId::new(), TxnId::new());
    assert_eq!(ours.prepare(a, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    assert_eq!(theirs.prepare(b, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    drop(ours);
    let ours = s.open().await;
    assert_eq!(ours.prepared().await.expect("prepared"), vec![a]);
    assert_eq!(theirs.prepared().await.expect("prepared"), vec![b]);
    ours.commit(a).await.expect("commit");
    theirs.abort(b).await.expect("abort");
}

// I4: a reserve committed just before a crash, with no PREPARE TRANSACTION
// after it (so no vote was sent), is settled as aborted when the resource
// opens again; a late Prepare of that txn votes NO and a Commit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_abandoned_by_a_crash_is_aborted_at_open() {
    let Some(s) = setup("a_reserve_abandoned_by_a_crash_is_aborted_at_open").await else { return };
    let r = s.open().await;
    let txn = TxnId::new();
    // What step 1 leaves behind when the process dies before step 2.
    let schema = &s.config.schema;
    let gid = r.gid(txn);
    postgres_testing::execute(
        &s.db.url,
        &format!(
            "INSERT INTO \"{schema}\".twopc_branches (gid, state, settled, reason, updated_at_ms) \
             VALUES ('{gid}', 'reserved', false, '', 0); \
             INSERT INTO \"{schema}\".reservations (txn) VALUES ('{txn}')"
        ),
    )
    .await;
    drop(r);
    let r = s.open().await;
    assert_eq!(postgres_common::reservations(&r).await, 0, "the abandoned reservation was not released");
    assert_eq!(r.status(txn).await.expect("status"), Some(BranchStatus::Aborted));
    let vote = r.prepare(txn, Bytes::from_static(b"effect")).await.expect("prepare");
    assert!(!vote.is_yes(), "a late prepare after an abandoned reserve voted YES");
    assert_eq!(r.commit(txn).await, Err(ResourceError::Conflict { recorded: twopc_participant::Decision::Abort }));
    assert!(r.prepared().await.expect("prepared").is_empty());
}

// I6 + I4: finished rows are deleted past their retention, at most
// gc_batch_max per pass; a prepared branch's row is never deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_rows_expire_in_bounded_passes_but_prepared_ones_stay() {
    let Some(mut s) = setup("finished_rows_expire_in_bounded_passes_but_prepared_ones_stay").await else { return };
    s.config.gc_batch_max = 2;
    s.config.gc_interval_ms = 3_600_000;
    let r = s.open().await;
    let held = TxnId::new();
    assert_eq!(r.prepare(held, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    let tombstones: Vec<TxnId> = (0..3).map(|_| TxnId::new()).collect();
    for txn in &tombstones {
        r.abort(*txn).await.expect("abort");
    }
    let later = unix_now_ms() + 1;
    assert_eq!(r.collect_garbage(later).await, Ok(2));
    assert_eq!(r.collect_garbage(later).await, Ok(1));
    assert_eq!(r.collect_garbage(later).await, Ok(0));
    for txn in &tombstones {
        assert_eq!(r.status(*txn).await.expect("status"), None);
    }
    assert_eq!(r.status(held).await.expect("status"), Some(BranchStatus::Reserved { prepared: true }));
    r.commit(held).await.expect("commit");
}

// I6: with every pooled connection taken, a call waits pool_wait_timeout_ms
// and fails as retryable (UNAVAILABLE), changing nothing; with prepared_max
// branches in doubt, a further Prepare waits, then fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_a_retryable_error() {
    let Some(mut s) = setup("an_exhausted_pool_is_a_retryable_error").await else { return };
    s.config.pool_max = 2;
    s.config.prepare_concurrency_max = 1;
    s.config.pool_wait_timeout_ms = 100;
    let r = s.open().await;
    let taken = [r.pool().get().await.expect("a connection"), r.pool().get().await.expect("the other")];
    let txn = TxnId::new();
    let started = std::time::Instant::now();
    let refused = r.prepare(txn, Bytes::from_static(b"effect")).await;
    assert!(matches!(refused, Err(ResourceError::Unavailable(ref why)) if why.contains("pool_max")), "{refused:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    drop(taken);
    assert_eq!(r.prepare(txn, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    r.abort(txn).await.expect("abort");

    let mut s = s;
    s.config.prepared_max = 1;
    drop(r);
    let r = s.open().await;
    let (held, next) = (TxnId::new(), TxnId::new());
    assert_eq!(r.prepare(held, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    let refused = r.prepare(next, Bytes::from_static(b"effect")).await;
    assert!(matches!(refused, Err(ResourceError::Unavailable(ref why)) if why.contains("prepared_max")), "{refused:?}");
    assert_eq!(r.status(next).await.expect("status"), None, "the refused prepare left a row");
    r.commit(held).await.expect("commit");
    assert_eq!(r.prepare(next, Bytes::from_static(b"effect")).await, Ok(Vote::Yes));
    r.commit(next).await.expect("commit");
}

// I7 and I4: a PREPARE TRANSACTION whose reply was lost leaves a prepared transaction on the
// server; the participant keeps the txn in doubt instead of forgetting it, so the resolver asks
// the coordinator and its Abort runs ROLLBACK PREPARED: the gid leaves pg_prepared_xacts and the
// reservation is settled, with no participant restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_whose_reply_was_lost_is_rolled_back_by_the_resolver() {
    let Some(s) = setup("a_prepare_whose_reply_was_lost_is_rolled_back_by_the_resolver").await else { return };
    let resource = Arc::new(common::FailingPrepares::new(s.open().await, common::FailAt::AfterStaging, 1));
    let coordinator = FakeCoordinator::new();
    let node = coordinator.start().await.expect("fake coordinator");
    let txn = TxnId::new();
    coordinator.set_decision(txn, Decision::Abort);
    let mut config = common::config(vec![node.addr().to_string()]);
    config.id = s.participant.clone();
    config.in_doubt_timeout_ms = 50;
    let p = common::start(Arc::clone(&resource), config).await.expect("participant");

    let mut request = common::prepare_request(txn, b"effect");
    request.participant = s.participant.to_string();
    let lost = p.client.clone().prepare(request).await;
    assert_eq!(lost.map(|_| ()).map_err(|e| e.code()), Err(tonic::Code::Unavailable));
    assert_eq!(s.gids().await, vec![resource.inner.gid(txn)], "setup: PREPARE TRANSACTION ran");

    let deadline = tokio::time::Instant::now() + common::WAIT_MAX;
    while !s.gids().await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the prepared transaction was never rolled back");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(resource.inner.status(txn).await.expect("status"), Some(BranchStatus::Aborted));
    assert_eq!(postgres_common::reservations(&resource.inner).await, 0, "the reservation was not settled");
    assert!(coordinator.calls(txn) >= 1, "rolled back without asking the coordinator");
    p.stop().await.expect("stop");
}
