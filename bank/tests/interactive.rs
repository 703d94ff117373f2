//! The bank's Debit and Credit inside interactive txns (docs/PROTOCOL.md
//! §12), over gRPC against the fake coordinator: each documented status,
//! a successful Debit holding the funds (I3: held before the answer) and a
//! Credit staging them until the decision, a refusal holding nothing, and
//! one branch per bank per txn.

mod common;

use std::sync::Arc;

use common::{Serving, move_request};
use tonic::Code;
use twopc_bank::{AccountStore, RedbStore};
use twopc_participant::TxnContext;
use twopc_participant::fake_coordinator::{FakeCoordinator, RunningFake};
use twopc_proto::context::TXN_STATE_METADATA_KEY;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, pb};

struct Setup {
    store: Arc<RedbStore>,
    fake: FakeCoordinator,
    _node: RunningFake,
    bank: Serving,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(common::open(dir.path()).await);
    common::create(&*store, "alice", 100).await;
    common::create(&*store, "bob", 0).await;
    let fake = FakeCoordinator::new();
    let node = fake.start().await.expect("fake coordinator");
    let bank = Serving::start(Arc::clone(&store), vec![node.addr().to_string()]).await;
    Setup { store, fake, _node: node, bank, _dir: dir }
}

impl Setup {
    fn begun(&self) -> TxnContext {
        let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() + 60_000 };
        self.fake.begin(ctx.txn_id, ctx.deadline_unix_ms);
        ctx
    }
}

// §12.2: without a context Debit and Credit are FAILED_PRECONDITION telling the caller to begin
// a txn; a malformed context is INVALID_ARGUMENT; bad accounts and amounts are INVALID_ARGUMENT
// naming the field; none of them holds anything or reaches the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_get_their_documented_codes_and_hold_nothing() {
    let s = setup().await;
    let mut bank = s.bank.bank().await;
    let ctx = s.begun();
    let header = ctx.header_value();

    let none = bank.debit(move_request(None, "alice", 10)).await.expect_err("no context");
    assert_eq!(none.code(), Code::FailedPrecondition);
    assert!(none.message().starts_with("Debit needs a txn context"), "{}", none.message());
    assert!(none.message().contains("begin a txn first"), "{}", none.message());
    let none = bank.credit(move_request(None, "bob", 10)).await.expect_err("no context");
    assert!(none.message().starts_with("Credit needs a txn context"), "{}", none.message());

    for bad in ["soon", "x;deadline=5", &format!("{};deadline=0", ctx.txn_id), &format!("{};5", ctx.txn_id)] {
        let status = bank.debit(move_request(Some(bad), "alice", 10)).await.expect_err(bad);
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {}", status.message());
        assert!(status.message().contains("twopc-txn"), "{}", status.message());
    }
    // The interceptor guards every Bank call, not only the moves.
    let mut balance = tonic::Request::new(pb::BalanceRequest { account: "alice".into() });
    balance.metadata_mut().insert("twopc-txn", "soon".parse().expect("ascii"));
    assert_eq!(bank.balance(balance).await.expect_err("malformed").code(), Code::InvalidArgument);

    for amount in [0, -1, i64::MIN] {
        let status = bank.debit(move_request(Some(&header), "alice", amount)).await.expect_err("bad amount");
        assert_eq!(status.code(), Code::InvalidArgument, "{amount}");
        assert!(status.message().starts_with("amount_minor:"), "{}", status.message());
    }
    for account in ["", "Alice", "alice@bank-a"] {
        let status = bank.credit(move_request(Some(&header), account, 5)).await.expect_err("bad account");
        assert_eq!(status.code(), Code::InvalidArgument, "{account:?}");
        assert!(status.message().starts_with("account:"), "{}", status.message());
    }

    assert_eq!(common::row(&*s.store, "alice").await, (100, 0, 0));
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);
    assert!(s.store.branch_state(ctx.txn_id).await.expect("state").is_none(), "a bad call staged a branch");
    s.bank.stop().await;
}

// §12.3: a Debit the bank refuses (insufficient funds, unknown account) is FAILED_PRECONDITION
// with the reason; nothing is held and nothing joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_debit_holds_nothing_and_is_not_joined() {
    let s = setup().await;
    let mut bank = s.bank.bank().await;

    let ctx = s.begun();
    let poor = bank.debit(move_request(Some(&ctx.header_value()), "alice", 101)).await.expect_err("overdraft");
    assert_eq!(poor.code(), Code::FailedPrecondition);
    assert!(poor.message().contains("insufficient funds"), "{}", poor.message());
    assert_eq!(common::row(&*s.store, "alice").await, (100, 0, 0));
    assert_eq!(s.fake.join_calls(ctx.txn_id), 0);

    let other = s.begun();
    let unknown = bank.credit(move_request(Some(&other.header_value()), "zoe", 5)).await.expect_err("unknown");
    assert_eq!(unknown.code(), Code::FailedPrecondition);
    assert!(unknown.message().contains("unknown account zoe"), "{}", unknown.message());
    assert!(s.fake.joined(other.txn_id).is_empty());
    s.bank.stop().await;
}

// I3 then I1: a Debit answers once the hold is durable and the branch joined (the answer carries
// the txn's deadline); the Commit then takes the funds. A Credit in another txn is staged as
// incoming and applied by its Commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_holds_the_funds_until_the_decision() {
    let s = setup().await;
    let mut bank = s.bank.bank().await;

    let ctx = s.begun();
    let answer = bank.debit(move_request(Some(&ctx.header_value()), "alice", 30)).await.expect("debit").into_inner();
    assert_eq!(answer.deadline_unix_ms, ctx.deadline_unix_ms);
    assert_eq!(common::row(&*s.store, "alice").await, (100, 30, 0), "the funds are not held");
    assert_eq!(s.fake.joined(ctx.txn_id), vec!["bank-a".to_owned()]);
    let alice = bank.balance(pb::BalanceRequest { account: "alice".into() }).await.expect("balance").into_inner();
    assert_eq!(alice.account.expect("account").available_minor, 70);
    s.bank.decide(ctx.txn_id, pb::Decision::Commit).await;
    assert_eq!(common::row(&*s.store, "alice").await, (70, 0, 0));

    let credit = s.begun();
    bank.credit(move_request(Some(&credit.header_value()), "bob", 30)).await.expect("credit");
    assert_eq!(common::row(&*s.store, "bob").await, (0, 0, 30));
    s.bank.decide(credit.txn_id, pb::Decision::Commit).await;
    assert_eq!(common::row(&*s.store, "bob").await, (30, 0, 0));
    s.bank.stop().await;
}

// §12.3, one branch per bank per txn: a second Debit (or a Credit) at this bank in the same txn
// is refused before anything more is held, instead of being answered as the first one's repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_move_in_the_same_txn_is_refused() {
    let s = setup().await;
    let mut bank = s.bank.bank().await;
    let ctx = s.begun();
    let header = ctx.header_value();
    bank.debit(move_request(Some(&header), "alice", 30)).await.expect("first debit");

    let again = bank.debit(move_request(Some(&header), "alice", 50)).await.expect_err("one branch per txn");
    let credit = bank.credit(move_request(Some(&header), "bob", 5)).await.expect_err("one branch per txn");
    for status in [again, credit] {
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("one branch per"), "{}", status.message());
    }
    assert_eq!(common::row(&*s.store, "alice").await, (100, 30, 0), "a second hold was placed or the first lost");
    assert_eq!(common::row(&*s.store, "bob").await, (0, 0, 0));
    assert_eq!(s.fake.join_calls(ctx.txn_id), 1);
    s.bank.stop().await;
}

// I4: a Debit in a txn the coordinator does not know (never begun, or already decided) is
// refused naming the state, and the hold it placed is released at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_the_coordinator_refuses_releases_its_hold() {
    let s = setup().await;
    let mut bank = s.bank.bank().await;
    let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: unix_now_ms() + 60_000 };

    let refused = bank.debit(move_request(Some(&ctx.header_value()), "alice", 30)).await.expect_err("unknown txn");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let state = refused.metadata().get(TXN_STATE_METADATA_KEY).and_then(|v| v.to_str().ok());
    assert_eq!(state, Some("UNKNOWN"));
    assert_eq!(common::row(&*s.store, "alice").await, (100, 0, 0), "the refused debit still holds funds");
    s.bank.stop().await;
}
