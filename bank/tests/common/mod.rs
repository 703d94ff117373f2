//! Helpers shared by the bank's integration tests.

#![allow(dead_code)]

use std::path::Path;

use twopc_bank::{AccountName, AccountStore, BranchPayload, RedbStore, StoreConfig};

/// An account name from a literal.
pub fn name(s: &str) -> AccountName {
    s.parse().expect("valid account name")
}

/// Opens (or reopens) the store at `dir`/bank.redb with default limits.
pub async fn open(dir: &Path) -> RedbStore {
    RedbStore::open(dir.join("bank.redb"), StoreConfig::default()).await.expect("open store")
}

/// Creates `account` with `minor` in `store`.
pub async fn create(store: &impl AccountStore, account: &str, minor: i64) {
    store.create_account(name(account), minor).await.expect("create account");
}

/// A one-operation debit payload.
pub fn debit(account: &str, minor: i64) -> BranchPayload {
    BranchPayload::debit(name(account), minor).expect("valid debit")
}

/// A one-operation credit payload.
pub fn credit(account: &str, minor: i64) -> BranchPayload {
    BranchPayload::credit(name(account), minor).expect("valid credit")
}

/// (balance, held, incoming) of `account`.
pub async fn row(store: &impl AccountStore, account: &str) -> (i64, i64, i64) {
    let a = store.account(name(account)).await.expect("account exists");
    (a.balance_minor, a.held_minor, a.incoming_minor)
}
