//! A service joining interactive txns with its own SQL on PostgreSQL
//! (docs/PROTOCOL.md §12.3): `Joiner::join_with` around
//! `PostgresResource::prepare_with` runs the handler's SQL inside the
//! branch transaction, prepares it (durable before the YES, I3) and only
//! then joins; a refused join rolls it back and leaves a tombstone (I4); a
//! NO or a failure of the service's SQL leaves nothing prepared; a second
//! join of the txn never runs the SQL. Skipped where no server allows
//! prepared transactions, unless TWOPC_REQUIRE_POSTGRES=1.

#![cfg(feature = "postgres")]

mod common;
mod postgres_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{ID, Running, config, start_with, vote, wait_until};
use postgres_common::Notes;
use tonic::Code;
use twopc_participant::fake_coordinator::{FakeCoordinator, RunningFake};
use twopc_participant::postgres::{BranchStatus, PostgresConfig};
use twopc_participant::postgres_testing::{self, Cleanup, TestDatabase};
use twopc_participant::{Decision, Error, Joined, Joiner, ParticipantId, ResourceError, TxnContext, TxnId, Vote};
use twopc_proto::txn_id::unix_now_ms;

struct Setup {
    db: TestDatabase,
    gid_prefix: String,
    resource: Notes,
    fake: FakeCoordinator,
    _node: RunningFake,
    joiner: Joiner<Notes>,
    p: Running,
    _cleanup: Cleanup,
}

async fn setup(test: &str) -> Option<Setup> {
    let db = postgres_testing::database(test).await?;
    // The helpers' Prepare and Decide are addressed to `ID`; gids stay apart
    // from other tests' because recovery and clean-up are scoped by schema.
    let participant: ParticipantId = ID.parse().expect("participant id");
    let schema = postgres_testing::unique_name("twopc_join");
    let gid_prefix = format!("twopc:{participant}:");
    let cleanup = Cleanup::new(&db.url);
    cleanup.schema(&schema, &gid_prefix);
    let resource = postgres_common::open_notes(&participant, PostgresConfig::new(&db.url, schema)).await;
    let fake = FakeCoordinator::new();
    let node = fake.start().await.expect("fake coordinator");
    let mut config = config(vec![node.addr().to_string()]);
    config.in_doubt_timeout_ms = 50;
    let mut joiner = None;
    let p = start_with(Arc::new(resource.clone()), config, |participant| {
        joiner = Some(participant.joiner());
        tonic::service::Routes::default()
    })
    .await
    .expect("start the participant");
    let joiner = joiner.expect("the joiner");
    Some(Setup { db, gid_prefix, resource, fake, _node: node, joiner, p, _cleanup: cleanup })
}

impl Setup {
    fn begun(&self, timeout_ms: u64) -> TxnContext {
        let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() + timeout_ms };
        self.fake.begin(ctx.txn_id, ctx.deadline_unix_ms);
        ctx
    }

    /// The handler's side: writes `note` in the branch, then answers
    /// `outcome` (a vote, or a failure); counts how often the SQL ran in `runs`.
    async fn write_note(
        &self,
        ctx: &TxnContext,
        note: &str,
        outcome: Result<Vote, ResourceError>,
        runs: &Arc<AtomicU32>,
    ) -> twopc_participant::Result<Joined> {
        let (pg, note, runs) = (self.resource.clone(), note.to_owned(), Arc::clone(runs));
        let insert = format!("INSERT INTO {} (txn, note) VALUES ($1, $2)", self.resource.branch().notes);
        self.joiner
            .join_with(ctx, move |txn| async move {
                pg.prepare_with(txn, move |tx| {
                    Box::pin(async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tx.execute(&insert, &[&txn.to_string(), &note]).await?;
                        outcome
                    })
                })
                .await
            })
            .await
    }

    async fn gids(&self) -> Vec<String> {
        postgres_testing::prepared_gids(&self.db.url, &self.gid_prefix).await
    }
}

// I3 then I1: the handler's SQL runs in the branch, which is a prepared transaction before the
// Join names it; the Commit makes the SQL's write visible, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_sql_is_prepared_joined_and_committed() {
    let Some(s) = setup("the_services_sql_is_prepared_joined_and_committed").await else { return };
    let runs = Arc::new(AtomicU32::new(0));
    let ctx = s.begun(60_000);

    let joined = s.write_note(&ctx, "hello", Ok(Vote::Yes), &runs).await.expect("joined");
    assert_eq!(joined.deadline_unix_ms, ctx.deadline_unix_ms);
    assert_eq!(s.gids().await, vec![s.resource.gid(ctx.txn_id)], "joined without a prepared transaction");
    assert_eq!(s.fake.joined(ctx.txn_id).len(), 1);
    assert_eq!(postgres_common::note(&s.resource, ctx.txn_id).await, None, "visible before the decision");

    s.p.decide(ctx.txn_id, Decision::Commit).await.expect("commit");
    assert_eq!(postgres_common::note(&s.resource, ctx.txn_id).await.as_deref(), Some("hello"));
    assert!(s.gids().await.is_empty());
    assert_eq!(s.resource.status(ctx.txn_id).await.expect("status"), Some(BranchStatus::Committed { settled: true }));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// I4: a join the coordinator refuses rolls the prepared SQL back and leaves a tombstone; a later
// Prepare of the txn votes NO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_join_rolls_the_services_sql_back() {
    let Some(s) = setup("a_refused_join_rolls_the_services_sql_back").await else { return };
    let runs = Arc::new(AtomicU32::new(0));
    let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() + 60_000 };

    let refused = s.write_note(&ctx, "never", Ok(Vote::Yes), &runs).await.expect_err("never begun");
    assert!(matches!(refused, Error::JoinRefused { aborted: true, .. }), "{refused}");
    assert!(s.gids().await.is_empty(), "the refused branch is still prepared");
    assert_eq!(s.resource.status(ctx.txn_id).await.expect("status"), Some(BranchStatus::Aborted));
    assert_eq!(postgres_common::note(&s.resource, ctx.txn_id).await, None);
    let late = s.p.prepare(ctx.txn_id, b"anything").await.expect("a vote");
    assert!(!vote(&late).expect("vote").is_yes());
}

// §12.3: a NO from the handler's SQL rolls its writes back, is remembered, and is not joined;
// a second join of the txn is refused before the SQL runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_from_the_services_sql_is_not_joined_and_not_run_twice() {
    let Some(s) = setup("a_no_from_the_services_sql_is_not_joined_and_not_run_twice").await else { return };
    let runs = Arc::new(AtomicU32::new(0));
    let ctx = s.begun(60_000);

    let no = s.write_note(&ctx, "x", Ok(Vote::no("out of stock")), &runs).await.expect_err("votes NO");
    assert!(matches!(&no, Error::VotedNo { reason, .. } if reason == "out of stock"), "{no}");
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);
    assert!(s.gids().await.is_empty());
    assert_eq!(
        s.resource.status(ctx.txn_id).await.expect("status"),
        Some(BranchStatus::Refused("out of stock".into()))
    );
    assert_eq!(postgres_common::note(&s.resource, ctx.txn_id).await, None);

    let second = s.write_note(&ctx, "y", Ok(Vote::Yes), &runs).await.expect_err("one branch per txn");
    assert!(matches!(second, Error::BranchExists { .. }), "{second}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the second join ran the service's SQL");
}

// I7 and I4: a failure of the handler's SQL leaves nothing prepared, but the library cannot tell
// it from a lost reply to PREPARE, so the txn stays in doubt; once it times out the resolver
// aborts it, which leaves a tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_services_sql_is_settled_by_the_resolver() {
    let Some(s) = setup("a_failing_services_sql_is_settled_by_the_resolver").await else { return };
    let runs = Arc::new(AtomicU32::new(0));
    let ctx = s.begun(300);

    let failed = s
        .write_note(&ctx, "x", Err(ResourceError::Unavailable("the service's database call failed".into())), &runs)
        .await
        .expect_err("fails");
    assert_eq!(tonic::Status::from(failed).code(), Code::Unavailable);
    assert!(s.gids().await.is_empty(), "a failed branch stayed prepared");
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);
    assert_eq!(s.p.metrics.snapshot().in_doubt_now, 1, "the failed branch is not in doubt");

    let resource = s.resource.clone();
    let mut status = None;
    let deadline = tokio::time::Instant::now() + common::WAIT_MAX;
    while status != Some(BranchStatus::Tombstone) && tokio::time::Instant::now() < deadline {
        status = resource.status(ctx.txn_id).await.expect("status");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, Some(BranchStatus::Tombstone), "the resolver did not settle the failed branch");
    wait_until("nothing is in doubt", || s.p.metrics.snapshot().in_doubt_now == 0).await.expect("settled");
    assert_eq!(s.fake.decision(ctx.txn_id), Some(Decision::Abort));
}
