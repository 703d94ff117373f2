//! Joining interactive txns (docs/PROTOCOL.md §12.3) against the fake
//! coordinator: a branch is joined only after it is durably prepared (I3),
//! a refused join aborts its branch and leaves a tombstone (I4), a
//! participant has one branch per txn, a join whose outcome is unknown stays
//! in doubt until the resolver learns the txn's outcome (I7), and the
//! resolver waits out an undecided txn without deciding anything. A small
//! service with the context interceptor shows the handler's side.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{ID, Running, config, start_joining, vote, wait_until, within};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use twopc_participant::context::TXN_CONTEXT_METADATA_KEY;
use twopc_participant::fake_coordinator::{FakeCoordinator, JoinAnswer, RunningFake};
use twopc_participant::{Decision, Error, Joiner, MemoryResource, ParticipantConfig, TxnContext, TxnId};
use twopc_proto::context::TXN_STATE_METADATA_KEY;
use twopc_proto::pb::bank_client::BankClient;
use twopc_proto::pb::{MoveRequest, MoveResponse};
use twopc_proto::txn_id::unix_now_ms;

/// A participant on a [`MemoryResource`] serving the test service below,
/// with a fake coordinator and a joiner.
struct Setup {
    resource: Arc<MemoryResource>,
    fake: FakeCoordinator,
    _node: RunningFake,
    joiner: Joiner<MemoryResource>,
    p: Running,
}

async fn setup_with(tune: impl FnOnce(&mut ParticipantConfig)) -> anyhow::Result<Setup> {
    let resource = Arc::new(MemoryResource::new());
    let fake = FakeCoordinator::new();
    let node = fake.start().await?;
    let mut config = config(vec![node.addr().to_string()]);
    tune(&mut config);
    let (p, joiner) = start_joining(Arc::clone(&resource), config).await?;
    Ok(Setup { resource, fake, _node: node, joiner, p })
}

async fn setup() -> anyhow::Result<Setup> {
    setup_with(|_| {}).await
}

/// A txn begun at the fake, `timeout_ms` from now.
fn begun(fake: &FakeCoordinator, timeout_ms: u64) -> TxnContext {
    let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() + timeout_ms };
    fake.begin(ctx.txn_id, ctx.deadline_unix_ms);
    ctx
}

fn state_of(status: &Status) -> Option<&str> {
    status.metadata().get(TXN_STATE_METADATA_KEY).and_then(|v| v.to_str().ok())
}

// I3 and I1: a joined branch is prepared before the log names it, and the decision then
// applies it once; the Join carries this participant's name.
#[tokio::test]
async fn a_joined_branch_is_prepared_and_then_committed_by_the_decision() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = begun(&s.fake, 60_000);

    let joined = s.joiner.join(&ctx, Bytes::from_static(b"ok")).await?;
    assert_eq!(joined.deadline_unix_ms, ctx.deadline_unix_ms);
    assert!(s.resource.is_prepared(ctx.txn_id), "joined without a prepared branch");
    assert_eq!(s.fake.joined(ctx.txn_id), vec![ID.to_owned()]);
    assert_eq!(s.p.metrics.snapshot().joins, 1);

    s.p.decide(ctx.txn_id, Decision::Commit).await?;
    assert_eq!(s.resource.commit_count(ctx.txn_id), 1);
    s.p.stop().await
}

// I4: a join the coordinator refuses (here: the txn was never begun) aborts the branch it
// prepared and names the state; the tombstone makes a later Prepare of the txn vote NO.
#[tokio::test]
async fn a_refused_join_aborts_its_branch_and_leaves_a_tombstone() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() + 60_000 };

    let refused = s.joiner.join(&ctx, Bytes::from_static(b"ok")).await.expect_err("never begun");
    assert!(matches!(refused, Error::JoinRefused { aborted: true, .. }), "{refused}");
    let status = Status::from(refused);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(state_of(&status), Some("UNKNOWN"));
    assert!(s.resource.is_aborted(ctx.txn_id), "the refused branch still holds its work");
    assert_eq!(s.resource.commit_count(ctx.txn_id), 0);
    assert_eq!(s.p.metrics.snapshot().join_refusals, 1);
    assert_eq!(s.p.metrics.snapshot().in_doubt_now, 0);

    let late = s.p.prepare(ctx.txn_id, b"ok").await?;
    assert!(!vote(&late)?.is_yes(), "a Prepare after the refused join voted YES");
    s.p.stop().await
}

// I1: a refusal saying the txn committed may follow an earlier attempt of the same join that
// was logged (its answer lost) before the Commit: the branch is named by the Commit, so it must
// not abort itself; the resolver asks and commits it.
#[tokio::test]
async fn a_join_refused_as_committed_is_not_aborted_but_resolved() -> anyhow::Result<()> {
    let s = setup_with(|c| c.in_doubt_timeout_ms = 60_000).await?;
    let ctx = begun(&s.fake, 60_000);
    s.fake.set_join_answer(JoinAnswer::LogThenUnavailable);

    let joining = {
        let (joiner, ctx) = (s.joiner.clone(), ctx);
        tokio::spawn(async move { joiner.join(&ctx, Bytes::from_static(b"ok")).await })
    };
    wait_until("the join is logged", || s.fake.joined(ctx.txn_id) == vec![ID.to_owned()]).await?;
    s.fake.set_decision(ctx.txn_id, Decision::Commit);
    s.fake.set_join_answer(JoinAnswer::AsLeader);

    let refused = within("the join", joining).await??.expect_err("decided before the retry");
    assert!(matches!(&refused, Error::JoinRefused { aborted: false, state, .. } if state == "DECIDED COMMIT"));
    wait_until("the resolver commits the branch", || s.resource.commit_count(ctx.txn_id) == 1).await?;
    assert_eq!(s.resource.abort_calls(ctx.txn_id), 0, "the branch named by the Commit was aborted");
    s.p.stop().await
}

// §12.3, one branch per participant per txn: a second join of the txn here is refused before
// anything is staged, instead of being answered as a repeated Prepare (its work would be lost
// while the caller is told it is done).
#[tokio::test]
async fn a_second_join_of_the_same_txn_is_refused_without_staging() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = begun(&s.fake, 60_000);
    s.joiner.join(&ctx, Bytes::from_static(b"first")).await?;

    let second = s.joiner.join(&ctx, Bytes::from_static(b"second")).await.expect_err("one branch per txn");
    assert!(matches!(second, Error::BranchExists { .. }), "{second}");
    assert_eq!(Status::from(second).code(), Code::FailedPrecondition);
    assert_eq!(s.resource.prepare_calls(ctx.txn_id), 1, "the second join reached the resource");
    assert_eq!(s.fake.join_calls(ctx.txn_id), 1, "the second join was sent to the coordinator");
    assert!(s.resource.is_prepared(ctx.txn_id), "the first branch was disturbed");

    // Also after a NO vote and after a decision: any record refuses.
    let refused = begun(&s.fake, 60_000);
    assert!(s.joiner.join(&refused, Bytes::from_static(b"no:broke")).await.is_err());
    let again = s.joiner.join(&refused, Bytes::from_static(b"ok")).await.expect_err("voted NO before");
    assert!(matches!(again, Error::BranchExists { .. }), "{again}");
    s.p.stop().await
}

// §12.3: a branch the resource refuses is neither staged nor joined; the error carries the
// resource's reason.
#[tokio::test]
async fn a_no_vote_is_not_joined() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = begun(&s.fake, 60_000);

    let no = s.joiner.join(&ctx, Bytes::from_static(b"no:insufficient funds")).await.expect_err("votes NO");
    assert!(matches!(&no, Error::VotedNo { reason, .. } if reason == "insufficient funds"), "{no}");
    let status = Status::from(no);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("insufficient funds"), "{}", status.message());
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);
    assert!(s.fake.joined(ctx.txn_id).is_empty());
    assert!(!s.resource.is_prepared(ctx.txn_id));
    assert_eq!(s.p.metrics.snapshot().in_doubt_now, 0);
    s.p.stop().await
}

// §7.1 for joins: past the context's deadline nothing is staged or joined.
#[tokio::test]
async fn a_join_past_its_deadline_is_refused_before_staging() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() - 1_000 };
    s.fake.begin(ctx.txn_id, ctx.deadline_unix_ms);

    let late = s.joiner.join(&ctx, Bytes::from_static(b"ok")).await.expect_err("past the deadline");
    assert!(matches!(&late, Error::VotedNo { reason, .. } if reason.contains("deadline")), "{late}");
    assert_eq!(s.resource.prepare_calls(ctx.txn_id), 0);
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);
    s.p.stop().await
}

// I4 and §12.3: a context whose txn id was created far ahead of this participant's clock is
// refused before anything is staged. The coordinators refuse such an id's Join and every
// Resolve of it (INVALID_ARGUMENT, §7.4), so a branch staged for it would hold its resources
// until their clocks caught up: a caller could lock accounts up with a context from next year.
#[tokio::test]
async fn a_join_of_a_txn_id_from_the_far_future_is_refused_before_staging() -> anyhow::Result<()> {
    let s = setup().await?;
    let next_year = unix_now_ms() + 365 * 24 * 3_600_000;
    let ctx = TxnContext { txn_id: TxnId::created_at(next_year), deadline_unix_ms: next_year + 60_000 };
    s.fake.begin(ctx.txn_id, ctx.deadline_unix_ms);

    let refused = s.joiner.join(&ctx, Bytes::from_static(b"ok")).await.expect_err("an id from the future");
    assert!(matches!(&refused, Error::Invalid { .. }), "{refused}");
    assert!(refused.to_string().contains("txn_id_future_skew_ms"), "{refused}");
    assert_eq!(Status::from(refused).code(), Code::InvalidArgument);
    assert_eq!(s.resource.prepare_calls(ctx.txn_id), 0);
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);

    // Within the skew an id ahead of the clock joins as any other.
    let ahead = unix_now_ms() + 30_000;
    let near = TxnContext { txn_id: TxnId::created_at(ahead), deadline_unix_ms: ahead + 60_000 };
    s.fake.begin(near.txn_id, near.deadline_unix_ms);
    s.joiner.join(&near, Bytes::from_static(b"ok")).await?;
    assert!(s.resource.is_prepared(near.txn_id));
    s.p.stop().await
}

// I7 and I4: when no coordinator answers the join by the deadline, the branch stays prepared
// and in doubt (UNAVAILABLE saying so); once the cluster answers, the resolver learns the txn
// timed out and aborts it.
#[tokio::test]
async fn an_unanswered_join_stays_in_doubt_and_the_resolver_aborts_it() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = begun(&s.fake, 300);
    s.fake.set_join_answer(JoinAnswer::Unavailable);
    s.fake.fail_next(u32::MAX);

    let unanswered = s.joiner.join(&ctx, Bytes::from_static(b"ok")).await.expect_err("no coordinator answers");
    assert!(matches!(unanswered, Error::JoinInDoubt { .. }), "{unanswered}");
    let status = Status::from(unanswered);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("in doubt"), "{}", status.message());
    assert!(s.fake.join_calls(ctx.txn_id) >= 2, "the join was not retried");
    assert!(s.resource.is_prepared(ctx.txn_id), "the branch was released without a decision");
    assert_eq!(s.p.metrics.snapshot().in_doubt_now, 1);

    s.fake.fail_next(0);
    wait_until("the resolver aborts the timed-out branch", || s.resource.is_aborted(ctx.txn_id)).await?;
    assert_eq!(s.fake.decision(ctx.txn_id), Some(Decision::Abort));
    assert_eq!(s.resource.commit_count(ctx.txn_id), 0);
    s.p.stop().await
}

// I1: a one-shot Prepare of a txn whose branch here was staged for a join (a Submit
// reusing an id that was never begun) votes NO, not the joined work's YES: that join
// is refused as unknown and aborts, so a Commit the Submit logged would reach an
// aborted branch.
#[tokio::test]
async fn a_one_shot_prepare_of_a_branch_staged_for_a_join_votes_no() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = begun(&s.fake, 5_000);
    s.fake.set_join_answer(JoinAnswer::Unavailable);
    s.fake.fail_next(u32::MAX);
    s.joiner.join(&ctx, Bytes::from_static(b"ok")).await.expect_err("no coordinator answers");
    assert!(s.resource.is_prepared(ctx.txn_id));

    let answer = s.p.prepare(ctx.txn_id, b"ok").await?;
    assert!(!vote(&answer)?.is_yes(), "a one-shot Prepare got the joined branch's YES: {answer:?}");
    assert!(answer.reason.contains("staged for an interactive join"), "{}", answer.reason);
    assert!(s.resource.is_prepared(ctx.txn_id), "the NO must not release the joined branch");
    s.p.stop().await
}

// I1 and I7: a join logged whose answer never came is named by the Commit the application
// then logged before the deadline; the resolver learns that and commits the branch (nothing
// local decided it either way).
#[tokio::test]
async fn a_logged_join_whose_answer_was_lost_is_committed_by_the_resolver() -> anyhow::Result<()> {
    let s = setup().await?;
    let ctx = begun(&s.fake, 300);
    s.fake.set_join_answer(JoinAnswer::LogThenUnavailable);
    s.fake.fail_next(u32::MAX);

    let joining = {
        let (joiner, ctx) = (s.joiner.clone(), ctx);
        tokio::spawn(async move { joiner.join(&ctx, Bytes::from_static(b"ok")).await })
    };
    wait_until("the join is logged", || s.fake.joined(ctx.txn_id) == vec![ID.to_owned()]).await?;
    // No answer comes any more; meanwhile the application commits.
    s.fake.set_join_answer(JoinAnswer::Unavailable);
    s.fake.set_decision(ctx.txn_id, Decision::Commit);

    let lost = within("the join", joining).await??.expect_err("every answer is lost");
    assert!(matches!(lost, Error::JoinInDoubt { .. }), "{lost}");
    assert!(s.resource.is_prepared(ctx.txn_id));
    s.fake.fail_next(0);
    wait_until("the resolver commits the branch", || s.resource.commit_count(ctx.txn_id) == 1).await?;
    assert_eq!(s.resource.abort_calls(ctx.txn_id), 0);
    s.p.stop().await
}

// §12.5 and "never decides on its own": while the txn is begun and undecided the resolver is
// answered `undecided` and asks again after retry_after_ms (not after a backoff, which here is a
// minute), and it settles the branch only once the txn is decided.
#[tokio::test]
async fn the_resolver_waits_out_an_undecided_txn_and_settles_it_once_decided() -> anyhow::Result<()> {
    let s = setup_with(|c| {
        c.in_doubt_timeout_ms = 20;
        c.resolve_backoff_min_ms = 60_000;
        c.resolve_backoff_max_ms = 60_000;
    })
    .await?;
    s.fake.set_undecided_retry_ms(10);
    let ctx = begun(&s.fake, 60_000);
    s.joiner.join(&ctx, Bytes::from_static(b"ok")).await?;

    wait_until("the resolver asked three times", || s.fake.calls(ctx.txn_id) >= 3).await?;
    assert!(s.resource.is_prepared(ctx.txn_id), "the resolver settled an undecided txn");
    assert_eq!(s.resource.abort_calls(ctx.txn_id) + s.resource.commit_calls(ctx.txn_id), 0);
    assert_eq!(s.fake.decision(ctx.txn_id), None, "an undecided answer was taken for a decision");

    s.fake.set_decision(ctx.txn_id, Decision::Commit);
    wait_until("the branch is committed", || s.resource.commit_count(ctx.txn_id) == 1).await?;
    wait_until("the resolve is counted", || s.p.metrics.snapshot().resolves == 1).await?;
    s.p.stop().await
}

async fn debit(client: &mut BankClient<Channel>, header: Option<&str>, account: &str) -> Result<MoveResponse, Status> {
    let mut request = Request::new(MoveRequest { account: account.into(), amount_minor: 1 });
    if let Some(value) = header {
        request.metadata_mut().insert(TXN_CONTEXT_METADATA_KEY, value.parse().map_err(|_| Status::internal("ascii"))?);
    }
    client.debit(request).await.map(Response::into_inner)
}

// §12.2 over gRPC: the interceptor refuses a malformed context with INVALID_ARGUMENT before
// the handler runs (nothing staged), a call without one gets FAILED_PRECONDITION, and a
// well-formed one reaches the handler, which joins.
#[tokio::test]
async fn the_context_interceptor_checks_every_call() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut client = BankClient::connect(format!("http://{}", s.p.addr)).await?;
    let ctx = begun(&s.fake, 60_000);

    for bad in ["soon", "x;deadline=1", &format!("{};deadline=0", ctx.txn_id), &format!("{};5", ctx.txn_id)] {
        let status = debit(&mut client, Some(bad), "ok").await.expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {}", status.message());
    }
    let none = debit(&mut client, None, "ok").await.expect_err("no context");
    assert_eq!(none.code(), Code::FailedPrecondition);
    assert!(none.message().contains("begin a txn first"), "{}", none.message());
    assert_eq!(s.resource.prepare_calls(ctx.txn_id), 0);

    let answer = debit(&mut client, Some(&ctx.header_value()), "ok").await?;
    assert_eq!(answer.deadline_unix_ms, ctx.deadline_unix_ms);
    assert!(s.resource.is_prepared(ctx.txn_id));
    let twice = debit(&mut client, Some(&ctx.header_value()), "ok").await.expect_err("second debit");
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let refused = begun(&s.fake, 60_000);
    let no = debit(&mut client, Some(&refused.header_value()), "no:insufficient funds").await.expect_err("NO");
    assert_eq!(no.code(), Code::FailedPrecondition);
    assert!(no.message().contains("insufficient funds"), "{}", no.message());
    s.p.stop().await
}
