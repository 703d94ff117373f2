//! The bank store's semantics (docs/PROTOCOL.md §3, I3, I4, I5, I8): holds
//! prevent overdrafts, decisions apply or release exactly once, money is
//! conserved, holds survive a restart, finished records expire while
//! prepared ones stay, and concurrent operations share fsyncs.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{create, credit, debit, name, open, row};
use twopc_bank::{AccountStore, BankResource, BranchPayload, BranchState, Error, Operation, RedbStore};
use twopc_participant::Resource;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, Vote};

async fn temp_store() -> (tempfile::TempDir, Arc<RedbStore>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path()).await);
    (dir, store)
}

fn reason(vote: &Vote) -> &str {
    match vote {
        Vote::Yes => "",
        Vote::No { reason } => reason,
    }
}

// Holds: ten concurrent debits of 20 against a balance of 100 -> exactly five YES; never an overdraft.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_debits_never_overdraw() {
    let (_dir, store) = temp_store().await;
    create(store.as_ref(), "alice", 100).await;
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
        assert!(reason(vote).starts_with("insufficient funds in alice"), "{vote:?}");
    }
    assert_eq!(row(store.as_ref(), "alice").await, (100, 100, 0));
    for txn in yes {
        store.commit(txn).await.expect("commit");
    }
    assert_eq!(row(store.as_ref(), "alice").await, (0, 0, 0));
    let late = store.prepare(TxnId::new(), debit("alice", 1)).await.expect("prepare");
    assert!(!late.is_yes(), "debit of an empty account voted YES");
}

// §3.2: Commit applies a branch and Abort releases it; repeats change nothing (I5).
#[tokio::test]
async fn commit_applies_and_abort_releases() {
    let (_dir, store) = temp_store().await;
    create(store.as_ref(), "alice", 1000).await;
    create(store.as_ref(), "bob", 0).await;
    let (d1, c1, d2, c2) = (TxnId::new(), TxnId::new(), TxnId::new(), TxnId::new());
    assert_eq!(store.prepare(d1, debit("alice", 300)).await.expect("p"), Vote::Yes);
    assert_eq!(store.prepare(c1, credit("bob", 300)).await.expect("p"), Vote::Yes);
    assert_eq!(store.prepare(d2, debit("alice", 200)).await.expect("p"), Vote::Yes);
    assert_eq!(store.prepare(c2, credit("bob", 200)).await.expect("p"), Vote::Yes);
    assert_eq!(row(store.as_ref(), "alice").await, (1000, 500, 0));
    assert_eq!(row(store.as_ref(), "bob").await, (0, 0, 500));
    let listed = store.prepared().await.expect("list");
    assert_eq!(listed.len(), 4);

    for _ in 0..2 {
        store.commit(d1).await.expect("commit debit");
        store.commit(c1).await.expect("commit credit");
        store.abort(d2).await.expect("abort debit");
        store.abort(c2).await.expect("abort credit");
    }
    assert_eq!(row(store.as_ref(), "alice").await, (700, 0, 0));
    assert_eq!(row(store.as_ref(), "bob").await, (300, 0, 0));
    assert!(store.prepared().await.expect("list").is_empty());
    assert_eq!(store.branch_state(d1).await.expect("state"), Some(BranchState::Committed));
    assert_eq!(store.branch_state(d2).await.expect("state"), Some(BranchState::Aborted));
    assert!(matches!(store.abort(d1).await, Err(Error::Conflict { .. })));
    assert!(matches!(store.commit(d2).await, Err(Error::Conflict { .. })));
    assert!(matches!(store.commit(TxnId::new()).await, Err(Error::NotPrepared(_))));
    assert_eq!(row(store.as_ref(), "alice").await, (700, 0, 0));
}

// A staged credit is not spendable until committed.
#[tokio::test]
async fn incoming_credit_is_not_spendable() {
    let (_dir, store) = temp_store().await;
    create(store.as_ref(), "bob", 0).await;
    let c = TxnId::new();
    assert_eq!(store.prepare(c, credit("bob", 50)).await.expect("p"), Vote::Yes);
    let spend = store.prepare(TxnId::new(), debit("bob", 50)).await.expect("p");
    assert!(reason(&spend).starts_with("insufficient funds"), "{spend:?}");
    store.commit(c).await.expect("commit");
    let spend = store.prepare(TxnId::new(), debit("bob", 50)).await.expect("p");
    assert_eq!(spend, Vote::Yes);
}

// Unknown accounts vote NO with the name; a multi-operation branch stages all or nothing.
#[tokio::test]
async fn unknown_account_votes_no_and_nothing_is_staged() {
    let (_dir, store) = temp_store().await;
    create(store.as_ref(), "alice", 100).await;
    let vote = store.prepare(TxnId::new(), credit("carol", 5)).await.expect("p");
    assert_eq!(vote, Vote::no("unknown account carol"));
    let both = BranchPayload::new(vec![
        Operation::Debit { account: name("alice"), amount_minor: 40 },
        Operation::Credit { account: name("carol"), amount_minor: 40 },
    ])
    .expect("payload");
    let txn = TxnId::new();
    assert_eq!(store.prepare(txn, both).await.expect("p"), Vote::no("unknown account carol"));
    assert_eq!(row(store.as_ref(), "alice").await, (100, 0, 0), "the debit was staged");
    assert_eq!(store.branch_state(txn).await.expect("state"), Some(BranchState::Refused));
}

// A payload the bank cannot read is a recorded NO vote with the reason, never a panic (I5).
#[tokio::test]
async fn malformed_payload_votes_no_and_stays_no() {
    let (_dir, store) = temp_store().await;
    create(store.as_ref(), "alice", 100).await;
    let resource = BankResource::new(Arc::clone(&store));
    let txn = TxnId::new();
    let vote = resource.prepare(txn, Bytes::from_static(b"\xff\x00garbage")).await.expect("p");
    assert!(reason(&vote).starts_with("malformed bank payload"), "{vote:?}");
    let again = resource.prepare(txn, credit("alice", 1).encode()).await.expect("p");
    assert_eq!(again, vote, "a repeated prepare changed the NO vote");
    let vote = resource.prepare(TxnId::new(), Bytes::new()).await.expect("p");
    assert!(reason(&vote).contains("no operations"), "{vote:?}");
}

// I3, I4: holds and staged credits survive a restart; decisions after it apply once.
#[tokio::test]
async fn holds_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    create(&store, "alice", 100).await;
    create(&store, "bob", 0).await;
    let (d, c) = (TxnId::new(), TxnId::new());
    assert_eq!(store.prepare(d, debit("alice", 60)).await.expect("p"), Vote::Yes);
    assert_eq!(store.prepare(c, credit("bob", 60)).await.expect("p"), Vote::Yes);
    drop(store);
    let store = open(dir.path()).await;
    assert_eq!(row(&store, "alice").await, (100, 60, 0));
    assert_eq!(row(&store, "bob").await, (0, 0, 60));
    let mut prepared = store.prepared().await.expect("list");
    prepared.sort();
    let mut expected = vec![d, c];
    expected.sort();
    assert_eq!(prepared, expected);
    let vote = store.prepare(TxnId::new(), debit("alice", 60)).await.expect("p");
    assert!(!vote.is_yes(), "the hold was lost in the restart");
    store.commit(d).await.expect("commit");
    store.commit(c).await.expect("commit");
    drop(store);
    let store = open(dir.path()).await;
    store.commit(d).await.expect("repeat commit");
    assert_eq!(row(&store, "alice").await, (40, 0, 0));
    assert_eq!(row(&store, "bob").await, (60, 0, 0));
}

// I8: after a mix of committed and aborted transfers between two banks, and
// within one, the sum of all balances is what was minted, and nothing is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_is_conserved_across_transfers() {
    let (_a_dir, a) = temp_store().await;
    let (_b_dir, b) = temp_store().await;
    let accounts = ["alice", "bob", "carol"];
    for account in accounts {
        create(a.as_ref(), account, 10_000).await;
        create(b.as_ref(), account, 5_000).await;
    }
    let minted = 3 * 10_000 + 3 * 5_000;
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let (mut committed, mut aborted) = (0, 0);
    for round in 0..200 {
        let from = accounts[next(3) as usize];
        let to = accounts[next(3) as usize];
        let amount = 1 + next(4_000) as i64;
        let txn = TxnId::new();
        let (payer, payee) = if next(2) == 0 { (&a, &b) } else { (&b, &a) };
        let (yes, both) = if round % 5 == 0 && from != to {
            // A transfer within one bank: one branch with both operations.
            let ops = vec![
                Operation::Debit { account: name(from), amount_minor: amount },
                Operation::Credit { account: name(to), amount_minor: amount },
            ];
            let vote = payer.prepare(txn, BranchPayload::new(ops).expect("ops")).await.expect("p");
            (vote.is_yes(), false)
        } else {
            let d = payer.prepare(txn, debit(from, amount)).await.expect("p");
            let c = payee.prepare(txn, credit(to, amount)).await.expect("p");
            (d.is_yes() && c.is_yes(), true)
        };
        // One decision for every branch (I1); aborting the occasional YES too.
        let commit = yes && next(10) != 0;
        for store in if both { vec![payer, payee] } else { vec![payer] } {
            if commit {
                store.commit(txn).await.expect("commit");
            } else {
                store.abort(txn).await.expect("abort");
            }
        }
        if commit { committed += 1 } else { aborted += 1 }
    }
    assert!(committed > 50 && aborted > 10, "committed {committed}, aborted {aborted}");
    let (ta, tb) = (a.totals().await.expect("totals"), b.totals().await.expect("totals"));
    assert_eq!(ta.balance_minor + tb.balance_minor, minted, "money was created or destroyed");
    assert_eq!((ta.held_minor, tb.held_minor, ta.incoming_minor, tb.incoming_minor), (0, 0, 0, 0));
    for store in [&a, &b] {
        for account in store.list_accounts(None, 10).await.expect("list") {
            assert!(account.balance_minor >= 0, "{account:?} overdrawn");
        }
    }
}

// Group commit: many concurrent prepares share write transactions, so fewer fsyncs than operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepares_share_fsyncs() {
    let (_dir, store) = temp_store().await;
    const OPS: usize = 200;
    create(store.as_ref(), "alice", 1_000_000).await;
    let before = store.stats();
    let prepares = (0..OPS).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.prepare(TxnId::new(), debit("alice", 1)).await })
    });
    for vote in futures::future::join_all(prepares).await {
        assert_eq!(vote.expect("task").expect("prepare"), Vote::Yes);
    }
    let after = store.stats();
    let (ops, batches) = (after.write_ops - before.write_ops, after.write_batches - before.write_batches);
    assert_eq!(ops, OPS as u64);
    assert!(batches < ops, "{batches} fsync batches for {ops} prepares: no group commit");
    assert_eq!(row(store.as_ref(), "alice").await, (1_000_000, OPS as i64, 0));
}

// I4, I6: finished records and tombstones expire after the retention; prepared branches never do.
#[tokio::test]
async fn finished_records_expire_but_prepared_ones_stay() {
    let (_dir, store) = temp_store().await;
    create(store.as_ref(), "alice", 100).await;
    let (held, committed, tombstone, refused) = (TxnId::new(), TxnId::new(), TxnId::new(), TxnId::new());
    assert_eq!(store.prepare(held, debit("alice", 10)).await.expect("p"), Vote::Yes);
    assert_eq!(store.prepare(committed, debit("alice", 10)).await.expect("p"), Vote::Yes);
    store.commit(committed).await.expect("commit");
    store.abort(tombstone).await.expect("abort");
    assert!(!store.prepare(refused, debit("alice", 1_000)).await.expect("p").is_yes());

    // Nothing has expired yet.
    assert_eq!(store.collect_garbage(unix_now_ms() - 60_000).await.expect("gc"), 0);
    let late = store.prepare(tombstone, debit("alice", 1)).await.expect("p");
    assert!(!late.is_yes(), "a tombstone within retention let a late prepare through");

    let collected = store.collect_garbage(unix_now_ms() + 1).await.expect("gc");
    assert_eq!(collected, 3);
    for txn in [committed, tombstone, refused] {
        assert_eq!(store.branch_state(txn).await.expect("state"), None);
    }
    assert_eq!(store.branch_state(held).await.expect("state"), Some(BranchState::Prepared));
    assert_eq!(store.prepared().await.expect("list"), vec![held]);
    assert_eq!(row(store.as_ref(), "alice").await, (90, 10, 0));
    assert!(store.stats().records_collected >= 3);
    store.commit(held).await.expect("the held branch still commits");
}

// Accounts: a name is created once; listing pages in name order; totals add up.
#[tokio::test]
async fn accounts_are_created_once_and_listed_in_order() {
    let (_dir, store) = temp_store().await;
    for (account, minor) in [("dave", 4), ("bob", 2), ("alice", 1), ("carol", 3)] {
        create(store.as_ref(), account, minor).await;
    }
    let again = store.create_account(name("bob"), 99).await;
    assert!(matches!(again, Err(Error::AccountExists(_))), "{again:?}");
    assert_eq!(row(store.as_ref(), "bob").await, (2, 0, 0));
    assert!(matches!(store.account(name("erin")).await, Err(Error::AccountNotFound(_))));
    let first = store.list_accounts(None, 3).await.expect("list");
    let names: Vec<_> = first.iter().map(|a| a.name.to_string()).collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    let rest = store.list_accounts(Some(name("carol")), 3).await.expect("list");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].name.as_str(), "dave");
    let totals = store.totals().await.expect("totals");
    assert_eq!((totals.balance_minor, totals.accounts), (10, 4));
    assert!(matches!(store.create_account(name("erin"), -1).await, Err(Error::Invalid { .. })));
}

// I6 (bounded): collection keeps up when records finish faster than gc_batch_max per
// gc_interval_ms: after a full pass the next write batch collects again, instead of leaving the
// rest for a whole interval (under sustained load the file would grow without bound).
#[tokio::test]
async fn a_full_collection_pass_is_followed_by_another_at_the_next_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = twopc_bank::StoreConfig {
        finished_retention_ms: 1,
        gc_interval_ms: 1_000,
        gc_batch_max: 2,
        ..twopc_bank::StoreConfig::default()
    };
    let store = RedbStore::open(dir.path().join("bank.redb"), config).await.expect("open");
    create(&store, "opening", 1).await;
    for _ in 0..6 {
        store.abort(TxnId::new()).await.expect("a tombstone");
    }
    // Waiting for wall time: the 1 ms retention and the 1 s interval must pass.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    for (i, collected_after) in [2, 4, 6, 6].into_iter().enumerate() {
        create(&store, &format!("acct{i}"), 1).await;
        assert_eq!(store.stats().records_collected, collected_after, "after write {i}");
    }
}

// docs/PROTOCOL.md §14.3: a store says (and logs at every open) when its event
// stream misses part of its history: accounts opened before events were turned
// on, or a run with them off since. A store with events on from the start misses
// nothing.
#[tokio::test]
async fn a_store_says_when_its_event_stream_misses_part_of_its_history() {
    let events =
        || Some(twopc_bank::events::EventSubjects { bank: "bank-a".parse().expect("a name"), prefix: "twopc".into() });
    let open_with = |path: std::path::PathBuf, events| async move {
        let config = twopc_bank::StoreConfig { events, ..twopc_bank::StoreConfig::default() };
        RedbStore::open(path, config).await.expect("open")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (late, early) = (dir.path().join("late.redb"), dir.path().join("early.redb"));

    let store = open_with(late.clone(), None).await;
    create(&store, "alice", 100).await;
    drop(store);
    let store = open_with(late.clone(), events()).await;
    let missed = store.events_missed().expect("alice opened before events").to_owned();
    assert!(missed.contains("1 accounts and prepared branches were there before events"), "{missed}");
    drop(store);

    let store = open_with(early.clone(), events()).await;
    create(&store, "bob", 100).await;
    assert_eq!(store.events_missed(), None, "events on from the start");
    drop(store);
    drop(open_with(early.clone(), None).await);
    let store = open_with(early, events()).await;
    let missed = store.events_missed().expect("a run without events").to_owned();
    assert!(missed.contains("ran with events off after they were on"), "{missed}");
}
