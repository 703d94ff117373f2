//! The bank on PostgreSQL (PgStore) against a real server: the participant
//! conformance suite through BankResource (I1, I3, I4, I5), holds that never
//! overdraw (I8), prepared branches that block no other transfer, and
//! concurrent transfers that neither deadlock nor lose money (I8). Skipped
//! where no server allows prepared transactions, unless
//! TWOPC_REQUIRE_POSTGRES=1.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{credit, debit, name};
use parking_lot::Mutex;
use twopc_bank::{AccountStore, BankResource, BranchPayload, Operation, PgStore};
use twopc_participant::conformance::{self, Harness};
use twopc_participant::postgres::PostgresConfig;
use twopc_participant::postgres_testing::{self, Cleanup, TestDatabase};
use twopc_participant::{ParticipantId, Resource};
use twopc_proto::{TxnId, Vote};

/// Accounts that YES payloads credit, one per txn of a case.
const SLOTS: usize = 8;
/// What each YES payload credits.
const CREDIT_MINOR: i64 = 10;

/// A fresh bank schema on the test server, cleaned up when dropped.
struct Bank {
    participant: ParticipantId,
    config: PostgresConfig,
    _cleanup: Cleanup,
}

impl Bank {
    fn new(db: &TestDatabase) -> Self {
        let participant: ParticipantId = postgres_testing::unique_name("pgbank").parse().expect("id");
        let schema = postgres_testing::unique_name("twopc_bank");
        let cleanup = Cleanup::new(&db.url);
        cleanup.schema(&schema, &format!("twopc:{participant}:"));
        Self { participant, config: PostgresConfig::new(&db.url, schema), _cleanup: cleanup }
    }

    async fn open(&self) -> PgStore {
        PgStore::open(&self.participant, self.config.clone()).await.expect("open the postgres bank")
    }
}

/// As the redb harness: each txn credits its own account, so the times its
/// effect was applied is that balance over the credit.
struct PgHarness {
    db: TestDatabase,
    banks: Mutex<Vec<Bank>>,
    slots: Mutex<HashMap<TxnId, usize>>,
}

impl PgHarness {
    fn slot(&self, txn: TxnId) -> usize {
        let mut slots = self.slots.lock();
        let next = slots.len();
        let slot = *slots.entry(txn).or_insert(next);
        assert!(slot < SLOTS, "a case used more than {SLOTS} txns");
        slot
    }
}

impl Harness for PgHarness {
    type Resource = BankResource<PgStore>;

    async fn create(&self) -> Self::Resource {
        let bank = Bank::new(&self.db);
        let store = bank.open().await;
        for slot in 0..SLOTS {
            common::create(&store, &format!("slot-{slot}"), 0).await;
        }
        common::create(&store, "poor", 0).await;
        self.banks.lock().push(bank);
        self.slots.lock().clear();
        BankResource::new(Arc::new(store))
    }

    async fn restart(&self, resource: Self::Resource) -> Self::Resource {
        let store = resource.store().resource();
        let participant = self.banks.lock().last().expect("a bank").participant.clone();
        let config = store.config().clone();
        drop(resource);
        BankResource::new(Arc::new(PgStore::open(&participant, config).await.expect("reopen")))
    }

    fn yes_payload(&self, txn: TxnId) -> Bytes {
        credit(&format!("slot-{}", self.slot(txn)), CREDIT_MINOR).encode()
    }

    fn no_payload(&self, _txn: TxnId) -> Bytes {
        debit("poor", CREDIT_MINOR).encode()
    }

    async fn applied_count(&self, resource: &Self::Resource, txn: TxnId) -> u64 {
        let Some(slot) = self.slots.lock().get(&txn).copied() else {
            return 0;
        };
        let (balance, _, _) = common::row(resource.store().as_ref(), &format!("slot-{slot}")).await;
        assert_eq!(balance % CREDIT_MINOR, 0, "a partial credit was applied");
        u64::try_from(balance / CREDIT_MINOR).expect("balance is never negative")
    }

    fn keeps_payload_digests(&self) -> bool {
        true
    }
}

// I1, I3, I4, I5: every case of the suite passes against the bank on
// PostgreSQL, across reopen, and no hold is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_bank_passes_the_conformance_suite() {
    let Some(db) = postgres_testing::database("postgres_bank_passes_the_conformance_suite").await else { return };
    let harness = PgHarness { db, banks: Mutex::default(), slots: Mutex::default() };
    conformance::run_all(&harness).await;
    let banks = std::mem::take(&mut *harness.banks.lock());
    for bank in &banks {
        let store = bank.open().await;
        assert_eq!(store.holds().await.expect("holds"), 0, "a hold was never settled");
        let totals = store.totals().await.expect("totals");
        assert_eq!((totals.held_minor, totals.incoming_minor), (0, 0));
    }
}

// I8 (holds): ten concurrent debits of 20 against a balance of 100 -> exactly
// five YES, with the embedded store's NO reason; never an overdraft.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_debits_never_overdraw() {
    let Some(db) = postgres_testing::database("concurrent_debits_never_overdraw").await else { return };
    let bank = Bank::new(&db);
    let store = Arc::new(bank.open().await);
    common::create(store.as_ref(), "alice", 100).await;
    let prepares = (0..10).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let txn = TxnId::new();
            (txn, store.prepare(txn, debit("alice", 20)).await.expect("prepare"))
        })
    });
    let votes: Vec<(TxnId, Vote)> =
        futures::future::join_all(prepares).await.into_iter().map(|r| r.expect("task")).collect();
    let yes: Vec<TxnId> = votes.iter().filter(|(_, v)| v.is_yes()).map(|(t, _)| *t).collect();
    assert_eq!(yes.len(), 5, "votes: {votes:?}");
    for (_, vote) in votes.iter().filter(|(_, v)| !v.is_yes()) {
        let Vote::No { reason } = vote else { unreachable!() };
        assert!(reason.starts_with("insufficient funds in alice: available"), "{reason}");
    }
    assert_eq!(common::row(store.as_ref(), "alice").await, (100, 100, 0));
    for txn in yes {
        store.commit(txn).await.expect("commit");
    }
    assert_eq!(common::row(store.as_ref(), "alice").await, (0, 0, 0));
    let unknown = store.prepare(TxnId::new(), debit("nobody", 1)).await.expect("prepare");
    assert_eq!(unknown, Vote::no("unknown account nobody"));
}

// No row lock outlives a Prepare: with a debit of alice prepared and
// undecided, further debits and credits of alice prepare at once instead of
// waiting for that decision (lock_timeout would fail them otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_blocks_no_other_branch_on_its_accounts() {
    let Some(db) = postgres_testing::database("a_prepared_branch_blocks_no_other_branch_on_its_accounts").await else {
        return;
    };
    let bank = Bank::new(&db);
    let mut config = bank.config.clone();
    config.lock_timeout_ms = 500;
    let store = PgStore::open(&bank.participant, config).await.expect("open");
    common::create(&store, "alice", 100).await;
    let held = TxnId::new();
    assert_eq!(store.prepare(held, debit("alice", 10)).await.expect("prepare"), Vote::Yes);
    let started = Instant::now();
    let (d, c) = (TxnId::new(), TxnId::new());
    assert_eq!(store.prepare(d, debit("alice", 10)).await.expect("prepare"), Vote::Yes);
    assert_eq!(store.prepare(c, credit("alice", 5)).await.expect("prepare"), Vote::Yes);
    store.commit(d).await.expect("commit");
    store.abort(c).await.expect("abort");
    assert!(started.elapsed() < Duration::from_millis(400), "waited {:?} behind a prepared branch", started.elapsed());
    assert_eq!(common::row(&store, "alice").await, (90, 10, 0));
    store.commit(held).await.expect("commit");
    assert_eq!(common::row(&store, "alice").await, (80, 0, 0));
}

// I8: many concurrent transfers among a few hot accounts (both directions,
// so lock orders would cross) neither deadlock nor move money out of thin
// air; whatever the decisions, the total is unchanged and no hold remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_on_hot_accounts_conserve_money() {
    let Some(db) = postgres_testing::database("concurrent_transfers_on_hot_accounts_conserve_money").await else {
        return;
    };
    let bank = Bank::new(&db);
    let store = Arc::new(bank.open().await);
    let accounts = ["a", "b", "c"];
    for account in accounts {
        common::create(store.as_ref(), account, 1_000).await;
    }
    let resource = Arc::new(BankResource::new(Arc::clone(&store)));
    let tasks = (0..120usize).map(|i| {
        let resource = Arc::clone(&resource);
        tokio::spawn(async move {
            let (from, to) = (accounts[i % 3], accounts[(i + 1 + i / 3 % 2) % 3]);
            let payload = BranchPayload::new(vec![
                Operation::Debit { account: name(from), amount_minor: 7 + (i as i64 % 50) },
                Operation::Credit { account: name(to), amount_minor: 7 + (i as i64 % 50) },
            ])
            .expect("payload");
            let txn = TxnId::new();
            let vote = resource.prepare(txn, payload.encode()).await.expect("prepare never fails");
            if vote.is_yes() && i % 4 != 0 {
                resource.commit(txn).await.expect("commit");
            } else {
                resource.abort(txn).await.expect("abort");
            }
        })
    });
    let outcome = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(tasks)).await;
    for task in outcome.expect("transfers finished (no deadlock)") {
        task.expect("transfer task");
    }
    let totals = store.totals().await.expect("totals");
    assert_eq!((totals.balance_minor, totals.held_minor, totals.incoming_minor), (3_000, 0, 0));
    assert_eq!(store.holds().await.expect("holds"), 0);
    assert!(store.prepared().await.expect("prepared").is_empty());
}

// §12.3 on PostgreSQL (the payload path through PgStore): a Debit under a txn context holds the
// funds in a prepared branch before it answers, a second move in the txn is refused, and the
// Commit takes the funds; a Debit whose join is refused releases its hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_joins_a_txn_on_postgres() {
    let Some(db) = postgres_testing::database("a_debit_joins_a_txn_on_postgres").await else { return };
    let bank = Bank::new(&db);
    let store = Arc::new(bank.open().await);
    common::create(&*store, "alice", 100).await;
    let fake = twopc_participant::fake_coordinator::FakeCoordinator::new();
    let node = fake.start().await.expect("fake coordinator");
    let serving = common::Serving::start(Arc::clone(&store), vec![node.addr().to_string()]).await;
    let mut client = serving.bank().await;

    let ctx = twopc_participant::TxnContext {
        txn_id: TxnId::new(),
        deadline_unix_ms: twopc_proto::txn_id::unix_now_ms() + 60_000,
    };
    fake.begin(ctx.txn_id, ctx.deadline_unix_ms);
    let header = ctx.header_value();
    client.debit(common::move_request(Some(&header), "alice", 30)).await.expect("debit");
    assert_eq!(common::row(&*store, "alice").await, (100, 30, 0));
    assert_eq!(store.branch_state(ctx.txn_id).await.expect("state"), Some(twopc_bank::BranchState::Prepared));
    let again = client.credit(common::move_request(Some(&header), "alice", 5)).await.expect_err("second move");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    serving.decide(ctx.txn_id, twopc_proto::pb::Decision::Commit).await;
    assert_eq!(common::row(&*store, "alice").await, (70, 0, 0));

    let unknown = twopc_participant::TxnContext { txn_id: TxnId::new(), ..ctx };
    let refused = client.debit(common::move_request(Some(&unknown.header_value()), "alice", 10)).await;
    assert_eq!(refused.expect_err("never begun").code(), tonic::Code::FailedPrecondition);
    assert_eq!(common::row(&*store, "alice").await, (70, 0, 0), "the refused debit still holds funds");
    assert_eq!(store.holds().await.expect("holds"), 0);
    serving.stop().await;
}

// The relay's count of what waits (twopc_outbox_waiting): an opened account's
// event waits until the stream has acknowledged it, then nothing does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_counts_the_events_that_wait() {
    use twopc_participant::outbox::OutboxSource as _;
    let Some(db) = postgres_testing::database("the_outbox_counts_the_events_that_wait").await else { return };
    let bank = Bank::new(&db);
    let events = twopc_bank::events::EventSubjects { bank: bank.participant.clone(), prefix: "twopc".into() };
    let store = PgStore::open_with_events(&bank.participant, bank.config.clone(), Some(events), 100)
        .await
        .expect("open the postgres bank with events");
    assert_eq!(store.waiting().await.expect("waiting"), 0);
    store.create_account(name("alice"), 100).await.expect("create alice");
    assert_eq!(store.waiting().await.expect("waiting"), 1, "AccountOpened waits");
    let ready = store.ready(10).await.expect("ready");
    store.published(ready.iter().map(|e| e.seq).collect()).await.expect("published");
    assert_eq!(store.waiting().await.expect("waiting"), 0);
}

// As the embedded store: a bank on PostgreSQL says when its event stream
// misses part of its history (an account opened and a branch prepared
// before events were turned on, a run with them off since), and a bank with events on from the start
// misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_bank_says_when_its_event_stream_misses_part_of_its_history() {
    let Some(db) =
        postgres_testing::database("a_postgres_bank_says_when_its_event_stream_misses_part_of_its_history").await
    else {
        return;
    };
    let open_with = |bank: &Bank, events_on: bool| {
        let events = events_on
            .then(|| twopc_bank::events::EventSubjects { bank: bank.participant.clone(), prefix: "twopc".into() });
        let (participant, config) = (bank.participant.clone(), bank.config.clone());
        async move { PgStore::open_with_events(&participant, config, events, 100).await.expect("open") }
    };
    let late = Bank::new(&db);
    let store = open_with(&late, false).await;
    store.create_account(name("alice"), 100).await.expect("create alice");
    let held = TxnId::new();
    assert_eq!(store.prepare(held, debit("alice", 10)).await.expect("prepare"), Vote::Yes);
    drop(store);
    let store = open_with(&late, true).await;
    let missed = store.events_missed().expect("alice opened before events").to_owned();
    assert!(missed.contains("2 accounts and prepared branches were there before events"), "{missed}");
    store.abort(held).await.expect("abort");
    drop(store);
    let store = open_with(&late, true).await;
    assert_eq!(store.events_missed(), Some(missed.as_str()), "said at every open");
    drop(store);

    let early = Bank::new(&db);
    let store = open_with(&early, true).await;
    store.create_account(name("bob"), 100).await.expect("create bob");
    assert_eq!(store.events_missed(), None, "events on from the start");
    drop(store);
    drop(open_with(&early, false).await);
    let store = open_with(&early, true).await;
    let missed = store.events_missed().expect("a run without events").to_owned();
    assert!(missed.contains("ran with events off after they were on"), "{missed}");
}
