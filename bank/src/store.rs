//! The seam between the bank and its storage: [`AccountStore`], with its
//! written contract, and the values it returns. The embedded store
//! ([`crate::redb_store::RedbStore`]) implements it; a PostgreSQL store can
//! slot in beside it (issue 8) without touching the resource or the Bank API,
//! which are generic over it.

use std::future::Future;

use twopc_proto::{PayloadDigest, TxnId, Vote};

use crate::address::AccountName;
use crate::error::Result;
use crate::payload::BranchPayload;

/// The NO reason prefix when a debit exceeds the available funds.
pub const INSUFFICIENT_FUNDS: &str = "insufficient funds";
/// The NO reason prefix when a branch names an account the bank does not have.
pub const UNKNOWN_ACCOUNT: &str = "unknown account";
/// The NO reason prefix when events are on and the outbox holds
/// `outbox_max` entries already (NATS down for long).
pub const OUTBOX_FULL: &str = twopc_participant::outbox::event_resource::OUTBOX_FULL;
/// The NO reason for a Prepare after the txn was aborted here (I4).
pub const ALREADY_ABORTED: &str = "txn already aborted";
/// The NO reason for a Prepare after an Abort arrived first (I4).
pub const ABORTED_BEFORE_PREPARE: &str = "aborted before prepare (tombstone)";

/// One account as the store holds it, in minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountBalance {
    /// The account.
    pub name: AccountName,
    /// Committed funds.
    pub balance_minor: i64,
    /// Funds held by prepared debits; never more than `balance_minor`.
    pub held_minor: i64,
    /// Funds of prepared credits, not spendable until committed.
    pub incoming_minor: i64,
}

impl AccountBalance {
    /// What a new debit may take: the balance less the holds.
    pub fn available_minor(&self) -> i64 {
        self.balance_minor - self.held_minor
    }
}

/// Sums over every account of one bank.
///
/// With no branch in doubt anywhere, the sum of `balance_minor` over all
/// banks equals the money minted as opening balances (I8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// The sum of balances (wider than one balance, so it cannot overflow).
    pub balance_minor: i128,
    /// The sum of holds.
    pub held_minor: i128,
    /// The sum of prepared credits.
    pub incoming_minor: i128,
    /// How many accounts there are.
    pub accounts: u64,
}

/// Where a branch stands in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BranchState {
    /// Voted YES and holds its effects; no decision yet.
    Prepared,
    /// Voted NO (an abort the bank chose); holds nothing.
    Refused,
    /// `Decision::Commit` applied.
    Committed,
    /// `Decision::Abort` applied after a YES vote; holds released.
    Aborted,
    /// `Decision::Abort` arrived before any Prepare (I4).
    Tombstone,
}

/// The bank's storage: accounts, and the branches of txns staged on them.
///
/// Money enters only through [`AccountStore::create_account`] (the opening
/// balance) and afterwards only moves, through branches.
///
/// # Contract
///
/// To ensure correctness (docs/PROTOCOL.md I1, I3, I4, I5, I8), every
/// implementation:
///
/// - **Stages durably before YES** (I3): `prepare` returns [`Vote::Yes`] only
///   once the branch record and its holds are on stable storage.
/// - **Holds, never overdraws**: a prepared debit holds its amount; a debit
///   is accepted only if the balance less every hold covers it, so no
///   combination of decisions can take a balance below zero. A prepared
///   credit is staged as incoming and is not spendable until committed.
/// - **All or nothing per branch**: every operation of a payload is staged,
///   or none is (NO vote).
/// - **Votes are recorded**: `prepare` and `refuse` on a txn with a record
///   return the recorded vote and change nothing (YES stays YES whatever the
///   payload); a tombstone or an abort votes NO.
/// - **Decisions apply once**: `commit` applies a prepared branch (debit:
///   balance and hold go down; credit: balance goes up, incoming down) and
///   `abort` releases it; repeats succeed and change nothing; `abort` of an
///   unknown txn leaves a tombstone; contradicting decisions and `commit` of
///   an unknown txn are refused.
/// - **Finished records are kept** at least as long as the configured
///   retention, then may be forgotten. Prepared records are never forgotten
///   and never released on a timer (I4).
///
/// # Errors
///
/// Every method may return [`crate::Error::Unavailable`] or
/// [`crate::Error::QueueFull`] (transient: nothing changed, retry) or
/// [`crate::Error::Fatal`]. Others are listed per method.
pub trait AccountStore: Send + Sync + 'static {
    /// Opens `name` with `initial_minor` (at least 0) as its balance.
    ///
    /// # Errors
    /// [`crate::Error::AccountExists`] if the name is taken (nothing changes);
    /// [`crate::Error::Invalid`] if `initial_minor` is negative.
    fn create_account(
        &self,
        name: AccountName,
        initial_minor: i64,
    ) -> impl Future<Output = Result<AccountBalance>> + Send;

    /// One account.
    ///
    /// # Errors
    /// [`crate::Error::AccountNotFound`].
    fn account(&self, name: AccountName) -> impl Future<Output = Result<AccountBalance>> + Send;

    /// Up to `limit` accounts in name order, starting after `after`.
    fn list_accounts(
        &self,
        after: Option<AccountName>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AccountBalance>>> + Send;

    /// Sums over every account.
    fn totals(&self) -> impl Future<Output = Result<Totals>> + Send;

    /// Stages `payload` for `txn` and votes: NO "unknown account NAME" or
    /// "insufficient funds in NAME ..." (see [`UNKNOWN_ACCOUNT`],
    /// [`INSUFFICIENT_FUNDS`]), recorded; otherwise holds the debits, stages
    /// the credits, and votes YES once durable. The branch keeps the digest
    /// of the payload's encoding, as this crate's clients send it.
    fn prepare(&self, txn: TxnId, payload: BranchPayload) -> impl Future<Output = Result<Vote>> + Send {
        let digest = PayloadDigest::of(&payload.encode());
        self.prepare_with_digest(txn, payload, digest)
    }

    /// [`AccountStore::prepare`] of a payload whose bytes as sent have
    /// `digest`, which the store keeps with the prepared branch
    /// ([`AccountStore::prepared_with_digests`], docs/PROTOCOL.md §3.1).
    fn prepare_with_digest(
        &self,
        txn: TxnId,
        payload: BranchPayload,
        digest: PayloadDigest,
    ) -> impl Future<Output = Result<Vote>> + Send;

    /// Records a NO vote with `reason` for a txn whose payload could not be
    /// read, unless the txn has a record already, whose vote is returned.
    fn refuse(&self, txn: TxnId, reason: String) -> impl Future<Output = Result<Vote>> + Send;

    /// Applies the prepared branch of `txn`.
    ///
    /// # Errors
    /// [`crate::Error::NotPrepared`] if the store has no record of `txn`;
    /// [`crate::Error::Conflict`] if it was aborted, voted NO or has a tombstone.
    fn commit(&self, txn: TxnId) -> impl Future<Output = Result<()>> + Send;

    /// Releases the prepared branch of `txn`, or leaves a tombstone.
    ///
    /// # Errors
    /// [`crate::Error::Conflict`] if `txn` was committed.
    fn abort(&self, txn: TxnId) -> impl Future<Output = Result<()>> + Send;

    /// Every txn prepared and not yet decided, oldest first.
    fn prepared(&self) -> impl Future<Output = Result<Vec<TxnId>>> + Send {
        async { Ok(self.prepared_with_digests().await?.into_iter().map(|(txn, _)| txn).collect()) }
    }

    /// [`AccountStore::prepared`], each with the digest its Prepare's payload
    /// had (none for a branch prepared before digests were kept).
    fn prepared_with_digests(&self) -> impl Future<Output = Result<Vec<(TxnId, Option<PayloadDigest>)>>> + Send;

    /// Where `txn` stands, if the store has a record of it.
    fn branch_state(&self, txn: TxnId) -> impl Future<Output = Result<Option<BranchState>>> + Send;
}
