//! The seam a service implements: [`Resource`], the store that stages, applies
//! and releases transaction branches, and its written contract.

use std::future::Future;

use bytes::Bytes;
use twopc_proto::{Decision, PayloadDigest, TxnId, Vote};

/// Why a [`Resource`] call did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// `commit` for a txn this resource never prepared (and holds no record of).
    #[error("the txn was never prepared here")]
    NotPrepared,
    /// A decision contradicting the outcome already recorded for the txn:
    /// `commit` after `abort` (or after a NO vote or a tombstone), or `abort`
    /// after `commit`.
    #[error("the txn already has decision {recorded}")]
    Conflict {
        /// The outcome already recorded.
        recorded: Decision,
    },
    /// A transient failure (storage busy, connection to the database lost).
    /// Nothing was changed, or the change is idempotent; the caller retries
    /// the same call.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
    /// A failure retrying will not fix (corrupt storage, a broken invariant).
    #[error("fatal: {0}")]
    Fatal(String),
}

/// A transactional store that takes part in two-phase commit: the part of a
/// service that the library drives (docs/PROTOCOL.md §3).
///
/// The library calls these methods from its gRPC handlers and its in-doubt
/// resolver. It serialises calls for the same txn (never two at once for one
/// txn id), filters repeats it remembers, and checks requests before they get
/// here; calls for different txns run concurrently. Still, after a restart or
/// once its bounded memory has forgotten a txn, the library passes repeats
/// through, so every method must honour the contract on its own.
///
/// # Contract
///
/// To ensure correctness (docs/PROTOCOL.md invariants I1, I3, I4, I5):
///
/// - **Prepare is durable before YES** (I3). `prepare` returns [`Vote::Yes`]
///   only after the branch's effects are staged on stable storage (fsync'd),
///   such that a crash right after returning loses nothing: after a restart
///   the branch is listed by [`Resource::prepared`] and `commit` applies it.
///   A branch that voted YES holds whatever it needs (locks, reserved funds)
///   until its decision arrives; it is never released on a timer (I4).
/// - **A NO vote is final.** It is an abort the resource chose itself: it holds
///   nothing afterwards, a later `commit` fails with
///   [`ResourceError::Conflict`] (or [`ResourceError::NotPrepared`] if NO votes
///   are not recorded), and a later `abort` succeeds.
/// - **Prepare is idempotent** (I5). A repeated `prepare` for a txn returns the
///   vote already recorded (YES stays YES, even if the payload differs) and
///   stages nothing again. (The library refuses a repeat with another
///   payload before it gets here, knowing the payload's digest from memory,
///   or after a restart from [`Resource::prepared_with_digests`], which a
///   resource should implement by keeping the digest with the branch.)
/// - **Abort leaves a tombstone** (I4). `abort` of a txn the resource has never
///   seen records a durable tombstone, so that a later `prepare` of that txn
///   votes NO. Tombstones may be forgotten once they are older than every
///   deadline a Prepare for that txn could carry (docs/PROTOCOL.md
///   §7.1); the library's `tombstone_retention_ms` is a safe lower bound.
/// - **Decisions are idempotent and do not fail for a prepared branch** (I1,
///   I5). `commit` and `abort` may be repeated, including after a restart;
///   the second time they change nothing and return `Ok`. For a branch that
///   voted YES they must succeed: retry inside on transient trouble, and only
///   if that does not help return [`ResourceError::Unavailable`], which makes
///   the caller (the coordinator, or the resolver) retry later.
/// - **Abort settles any branch a Prepare may have touched** (I4, I7). When
///   `prepare` returns an error, the library cannot tell whether the branch
///   was staged (the reply to `PREPARE TRANSACTION` may have been lost), so
///   it keeps the txn in doubt and its resolver later applies the
///   coordinator's decision, usually Abort. So `abort` must succeed after a
///   failed `prepare`, whether the branch was staged in full, in part or
///   not at all: it releases whatever was staged, or leaves a tombstone if
///   nothing was. A later `prepare` of the txn then votes NO.
/// - **Decisions never contradict.** `commit` after `abort` (or after a NO vote
///   or a tombstone) and `abort` after `commit` return
///   [`ResourceError::Conflict`] and change nothing.
///
/// The conformance suite (`conformance::run_all`, feature `testing`) checks
/// every point above that can be observed from outside; every implementation
/// should run it from its own tests.
///
/// # Errors
///
/// Every method may return [`ResourceError::Unavailable`] (transient, retried
/// by the caller) or [`ResourceError::Fatal`]; `commit` and `abort` also return
/// [`ResourceError::NotPrepared`] and [`ResourceError::Conflict`] as described
/// above.
pub trait Resource: Send + Sync + 'static {
    /// Stages the branch `payload` of `txn` durably and votes.
    ///
    /// Returns [`Vote::Yes`] only after the staged branch is on stable storage,
    /// or [`Vote::No`] with a reason a person can read (for example
    /// "insufficient funds"). A repeat returns the recorded vote; a txn with a
    /// tombstone or an earlier decision votes NO (unless it was committed,
    /// when the recorded YES may be returned).
    ///
    /// # Errors
    /// [`ResourceError::Unavailable`] when the vote could not be made durable
    /// now; [`ResourceError::Fatal`] otherwise. Either may come after the
    /// branch was staged: the library then keeps the txn in doubt and settles
    /// it with `commit` or `abort` once the coordinator answers.
    fn prepare(&self, txn: TxnId, payload: Bytes) -> impl Future<Output = Result<Vote, ResourceError>> + Send;

    /// Applies the branch of `txn`, which voted YES, and releases its holds.
    ///
    /// Idempotent: committing a committed txn returns `Ok` and changes nothing.
    ///
    /// # Errors
    /// [`ResourceError::NotPrepared`] if the txn was never prepared here;
    /// [`ResourceError::Conflict`] if it was aborted (or voted NO, or has a
    /// tombstone); [`ResourceError::Unavailable`] only for a transient failure
    /// that retrying inside did not overcome.
    fn commit(&self, txn: TxnId) -> impl Future<Output = Result<(), ResourceError>> + Send;

    /// Releases the branch of `txn` without applying it, or records a durable
    /// tombstone if the txn was never prepared here (also after a `prepare`
    /// that failed, whatever it had staged).
    ///
    /// Idempotent: aborting an aborted txn returns `Ok` and changes nothing.
    ///
    /// # Errors
    /// [`ResourceError::Conflict`] if the txn was committed;
    /// [`ResourceError::Unavailable`] only for a transient failure that
    /// retrying inside did not overcome.
    fn abort(&self, txn: TxnId) -> impl Future<Output = Result<(), ResourceError>> + Send;

    /// Every txn whose branch voted YES and has no decision yet, as found on
    /// stable storage. The library calls it once at start-up and asks the
    /// coordinator to resolve each one.
    ///
    /// # Errors
    /// [`ResourceError::Unavailable`] or [`ResourceError::Fatal`] when storage
    /// cannot be read; the library then refuses to start.
    fn prepared(&self) -> impl Future<Output = Result<Vec<TxnId>, ResourceError>> + Send;

    /// [`Resource::prepared`], each txn with the digest of the payload its
    /// branch was prepared with (`PayloadDigest::of(payload)`, of the bytes
    /// `prepare` was given), for a resource that keeps it with the branch,
    /// in the write that made the branch durable.
    ///
    /// The library holds one payload per txn id (docs/PROTOCOL.md §3.1): a
    /// repeated Prepare with another payload is refused, and a status
    /// recovery asking for another payload's vote gets NO. It keeps the
    /// digest in memory; after a restart it knows it only from here. The
    /// default knows none, and a branch recovered without one answers such a
    /// repeat with its recorded YES, as the contract's idempotence says,
    /// which lets a client that reuses one txn id with other payloads on a
    /// new leader commit parts of two transfers (§13.4). Every resource this
    /// project ships keeps the digest.
    ///
    /// # Errors
    /// As [`Resource::prepared`].
    fn prepared_with_digests(
        &self,
    ) -> impl Future<Output = Result<Vec<(TxnId, Option<PayloadDigest>)>, ResourceError>> + Send {
        async { Ok(self.prepared().await?.into_iter().map(|txn| (txn, None)).collect()) }
    }
}
