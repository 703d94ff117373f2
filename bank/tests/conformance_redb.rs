//! I1, I3, I4, I5: the bank's resource over the redb store honours the
//! participant Resource contract, checked by the conformance suite every
//! implementation runs; "restart" closes the redb file and reopens it.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tempfile::TempDir;
use twopc_bank::{AccountStore, BankResource, RedbStore};
use twopc_participant::TxnId;
use twopc_participant::conformance::{self, Harness};

/// Accounts that YES payloads credit, one per txn of a case.
const SLOTS: usize = 8;
/// What each YES payload credits.
const CREDIT_MINOR: i64 = 10;

/// Each txn a case prepares gets its own account to credit, so the number of
/// times its effect was applied is that account's balance over the credit.
#[derive(Default)]
struct RedbHarness {
    dirs: Mutex<Vec<TempDir>>,
    slots: Mutex<HashMap<TxnId, usize>>,
}

impl RedbHarness {
    fn slot(&self, txn: TxnId) -> usize {
        let mut slots = self.slots.lock();
        let next = slots.len();
        let slot = *slots.entry(txn).or_insert(next);
        assert!(slot < SLOTS, "a case used more than {SLOTS} txns");
        slot
    }
}

impl Harness for RedbHarness {
    type Resource = BankResource<RedbStore>;

    async fn create(&self) -> Self::Resource {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = common::open(dir.path()).await;
        for slot in 0..SLOTS {
            common::create(&store, &format!("slot-{slot}"), 0).await;
        }
        common::create(&store, "poor", 0).await;
        self.dirs.lock().push(dir);
        self.slots.lock().clear();
        BankResource::new(Arc::new(store))
    }

    async fn restart(&self, resource: Self::Resource) -> Self::Resource {
        let path = resource.store().path().to_owned();
        // Dropping the last handle stops the writer and closes the file.
        drop(resource);
        let dir = path.parent().expect("store dir");
        BankResource::new(Arc::new(common::open(dir).await))
    }

    fn yes_payload(&self, txn: TxnId) -> Bytes {
        common::credit(&format!("slot-{}", self.slot(txn)), CREDIT_MINOR).encode()
    }

    fn no_payload(&self, _txn: TxnId) -> Bytes {
        common::debit("poor", CREDIT_MINOR).encode()
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

// I1, I3, I4, I5: every case of the suite passes against the redb store, across reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_store_passes_the_conformance_suite() {
    conformance::run_all(&RedbHarness::default()).await;
}

// A NO from the conformance harness is a real bank refusal with its reason.
#[tokio::test]
async fn no_payload_is_an_insufficient_funds_refusal() {
    let harness = RedbHarness::default();
    let resource = harness.create().await;
    let txn = TxnId::new();
    let vote = twopc_participant::Resource::prepare(&resource, txn, harness.no_payload(txn)).await.expect("prepare");
    let twopc_participant::Vote::No { reason } = vote else {
        panic!("voted YES on an empty account");
    };
    assert!(reason.starts_with("insufficient funds"), "{reason}");
    assert!(resource.store().prepared().await.expect("list").is_empty());
}
