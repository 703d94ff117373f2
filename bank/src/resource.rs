//! [`BankResource`]: the participant library's [`Resource`] over any
//! [`AccountStore`]. It decodes branch payloads (a payload it cannot read is
//! a recorded NO vote, never a panic) and retries decisions briefly inside,
//! as the Resource contract asks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;
use twopc_participant::{Resource, ResourceError};
use twopc_proto::{PayloadDigest, TxnId, Vote};

use crate::error::Result;
use crate::payload::BranchPayload;
use crate::store::AccountStore;

/// How many times a decision is tried against the store before the caller
/// (the coordinator or the resolver) is told to retry later.
pub const DECISION_ATTEMPTS: u32 = 3;

/// The pause before a decision's second attempt; doubled for each further one.
pub const DECISION_RETRY_PAUSE_MS: u64 = 10;

/// The bank as a twopc participant's resource.
pub struct BankResource<S> {
    store: Arc<S>,
}

impl<S: AccountStore> BankResource<S> {
    /// The resource over `store`; the Bank API may share the same store.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Runs `decide` until it succeeds, fails for good, or
    /// [`DECISION_ATTEMPTS`] transient failures in a row.
    async fn with_retries<F, Fut>(&self, txn: TxnId, what: &str, decide: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let mut pause = Duration::from_millis(DECISION_RETRY_PAUSE_MS);
        let mut attempt = 1;
        loop {
            match decide().await {
                Err(e) if e.is_retryable() && attempt < DECISION_ATTEMPTS => {
                    warn!(%txn, attempt, error = %e, "{what} failed for now; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

impl<S: AccountStore> Resource for BankResource<S> {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        let vote = match BranchPayload::decode(&payload) {
            // The digest of the bytes as sent, which the coordinator and the
            // library compare (docs/PROTOCOL.md §3.1).
            Ok(decoded) => self.store.prepare_with_digest(txn, decoded, PayloadDigest::of(&payload)).await?,
            Err(e) => {
                warn!(%txn, error = %e, "unreadable branch payload; voting NO");
                let reason = format!("malformed bank payload: {e}");
                self.store.refuse(txn, reason).await?
            }
        };
        Ok(vote)
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        let store = &self.store;
        Ok(self.with_retries(txn, "commit", || store.commit(txn)).await?)
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        let store = &self.store;
        Ok(self.with_retries(txn, "abort", || store.abort(txn)).await?)
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        Ok(self.store.prepared().await?)
    }

    async fn prepared_with_digests(&self) -> Result<Vec<(TxnId, Option<PayloadDigest>)>, ResourceError> {
        Ok(self.store.prepared_with_digests().await?)
    }
}
