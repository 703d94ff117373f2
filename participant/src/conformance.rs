//! The conformance suite for [`Resource`] implementations (feature `testing`):
//! every point of the trait's contract that can be observed from outside,
//! each case named by what it proves.
//!
//! An implementation runs it from its own tests through a small [`Harness`]:
//!
//! ```no_run
//! use bytes::Bytes;
//! use twopc_participant::conformance::{Harness, run_all};
//! use twopc_participant::{MemoryResource, TxnId};
//!
//! struct MemoryHarness;
//!
//! impl Harness for MemoryHarness {
//!     type Resource = MemoryResource;
//!     async fn create(&self) -> MemoryResource {
//!         MemoryResource::new()
//!     }
//!     async fn restart(&self, resource: MemoryResource) -> MemoryResource {
//!         resource.restarted() // a store on disk would close and reopen it
//!     }
//!     fn yes_payload(&self, _txn: TxnId) -> Bytes {
//!         Bytes::from_static(b"credit 10")
//!     }
//!     fn no_payload(&self, _txn: TxnId) -> Bytes {
//!         Bytes::from_static(b"no:insufficient funds")
//!     }
//!     async fn applied_count(&self, resource: &MemoryResource, txn: TxnId) -> u64 {
//!         u64::from(resource.commit_count(txn))
//!     }
//! }
//!
//! # async fn conformance_test() {
//! // In the implementation's tests, under #[tokio::test]:
//! run_all(&MemoryHarness).await;
//! # }
//! ```
//!
//! Cases panic with the case name and what went wrong; each starts from a
//! fresh resource made by [`Harness::create`].

use std::future::Future;

use bytes::Bytes;
use twopc_proto::{Decision, PayloadDigest, TxnId, Vote};

use crate::resource::{Resource, ResourceError};

/// How the suite creates, restarts and inspects the resource under test.
pub trait Harness: Send + Sync {
    /// The implementation under test.
    type Resource: Resource;

    /// A fresh resource with no records (for example on a new temporary
    /// directory, or a fresh database schema).
    fn create(&self) -> impl Future<Output = Self::Resource> + Send;

    /// Simulates a crash and restart: drop `resource` (losing everything it
    /// held only in memory) and reopen it from its durable storage.
    fn restart(&self, resource: Self::Resource) -> impl Future<Output = Self::Resource> + Send;

    /// A payload for `txn` that the resource votes YES on.
    fn yes_payload(&self, txn: TxnId) -> Bytes;

    /// A payload for `txn` that the resource votes NO on.
    fn no_payload(&self, txn: TxnId) -> Bytes;

    /// How many times the effect of the YES payload of `txn` has been applied
    /// (0 before commit, 1 after, never more).
    fn applied_count(&self, resource: &Self::Resource, txn: TxnId) -> impl Future<Output = u64> + Send;

    /// Whether the resource keeps each prepared branch's payload digest
    /// ([`Resource::prepared_with_digests`]); if so the suite requires it
    /// after a restart. Default: false, when the suite only requires that a
    /// digest reported is the right one.
    fn keeps_payload_digests(&self) -> bool {
        false
    }
}

/// Runs every case, each on a fresh resource.
///
/// # Panics
/// Naming the first case that fails and why.
pub async fn run_all<H: Harness>(h: &H) {
    yes_vote_survives_restart(h).await;
    prepare_is_idempotent(h).await;
    no_vote_is_final(h).await;
    commit_is_idempotent(h).await;
    abort_is_idempotent(h).await;
    abort_before_prepare_leaves_tombstone(h).await;
    abort_settles_whatever_prepare_did(h).await;
    tombstone_survives_restart(h).await;
    decisions_apply_after_restart(h).await;
    commit_of_unprepared_txn_is_not_prepared(h).await;
    conflicting_decision_is_refused(h).await;
    recovered_votes_survive_restart(h).await;
    payload_digests_survive_restart(h).await;
}

async fn prepare<H: Harness>(r: &H::Resource, txn: TxnId, payload: Bytes, case: &str) -> Vote {
    r.prepare(txn, payload).await.unwrap_or_else(|e| panic!("{case}: prepare failed: {e}"))
}

async fn decide<H: Harness>(r: &H::Resource, txn: TxnId, d: Decision, case: &str) {
    let result = match d {
        Decision::Commit => r.commit(txn).await,
        Decision::Abort => r.abort(txn).await,
    };
    result.unwrap_or_else(|e| panic!("{case}: {d} failed: {e}"));
}

async fn listed<H: Harness>(r: &H::Resource, txn: TxnId, case: &str) -> bool {
    r.prepared().await.unwrap_or_else(|e| panic!("{case}: prepared() failed: {e}")).contains(&txn)
}

async fn expect_applied<H: Harness>(h: &H, r: &H::Resource, txn: TxnId, n: u64, case: &str) {
    let applied = h.applied_count(r, txn).await;
    assert_eq!(applied, n, "{case}: the effect of txn {txn} was applied {applied} times, expected {n}");
}

/// I3: a YES vote is durable. After a restart the branch is listed by
/// `prepared()`, nothing is applied yet, and `commit` applies it once.
pub async fn yes_vote_survives_restart<H: Harness>(h: &H) {
    const CASE: &str = "yes_vote_survives_restart";
    let r = h.create().await;
    let txn = TxnId::new();
    assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    let r = h.restart(r).await;
    assert!(listed::<H>(&r, txn, CASE).await, "{CASE}: prepared() lost the branch");
    expect_applied(h, &r, txn, 0, CASE).await;
    decide::<H>(&r, txn, Decision::Commit, CASE).await;
    expect_applied(h, &r, txn, 1, CASE).await;
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: still listed after commit");
    let r = h.restart(r).await;
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: listed again after restart");
    expect_applied(h, &r, txn, 1, CASE).await;
}

/// §3.1: after a restart, `prepared_with_digests()` lists each prepared
/// branch with the digest of the payload it was prepared with (or none, for
/// a resource that does not keep it), and a decided branch no more.
pub async fn payload_digests_survive_restart<H: Harness>(h: &H) {
    const CASE: &str = "payload_digests_survive_restart";
    let r = h.create().await;
    let (held, decided) = (TxnId::new(), TxnId::new());
    for txn in [held, decided] {
        assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    }
    decide::<H>(&r, decided, Decision::Commit, CASE).await;
    let r = h.restart(r).await;
    let listed = r.prepared_with_digests().await.unwrap_or_else(|e| panic!("{CASE}: prepared_with_digests(): {e}"));
    let digest = |txn| listed.iter().find(|(t, _)| *t == txn).map(|(_, d)| *d);
    let expected = PayloadDigest::of(&h.yes_payload(held));
    match digest(held) {
        Some(Some(d)) => assert_eq!(d, expected, "{CASE}: another payload's digest"),
        Some(None) => assert!(!h.keeps_payload_digests(), "{CASE}: the digest was lost in the restart"),
        None => panic!("{CASE}: prepared_with_digests() lost the branch"),
    }
    assert_eq!(digest(decided), None, "{CASE}: a committed branch is listed");
    decide::<H>(&r, held, Decision::Abort, CASE).await;
}

/// I5: a repeated prepare returns the recorded vote and stages nothing again,
/// also after a restart and also with a different payload.
pub async fn prepare_is_idempotent<H: Harness>(h: &H) {
    const CASE: &str = "prepare_is_idempotent";
    let r = h.create().await;
    let txn = TxnId::new();
    for _ in 0..2 {
        assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    }
    let r = h.restart(r).await;
    let again = prepare::<H>(&r, txn, h.no_payload(txn), CASE).await;
    assert_eq!(again, Vote::Yes, "{CASE}: a repeated prepare changed the YES vote");
    let listed_times = r
        .prepared()
        .await
        .unwrap_or_else(|e| panic!("{CASE}: prepared() failed: {e}"))
        .iter()
        .filter(|t| **t == txn)
        .count();
    assert_eq!(listed_times, 1, "{CASE}: prepared() lists the txn {listed_times} times");
    decide::<H>(&r, txn, Decision::Commit, CASE).await;
    expect_applied(h, &r, txn, 1, CASE).await;
}

/// A NO vote is an abort the resource chose: repeated, it stays NO; nothing is
/// held; `commit` is refused and `abort` succeeds.
pub async fn no_vote_is_final<H: Harness>(h: &H) {
    const CASE: &str = "no_vote_is_final";
    let r = h.create().await;
    let txn = TxnId::new();
    for _ in 0..2 {
        let vote = prepare::<H>(&r, txn, h.no_payload(txn), CASE).await;
        assert!(!vote.is_yes(), "{CASE}: the NO payload voted YES");
    }
    let vote = prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await;
    assert!(!vote.is_yes(), "{CASE}: a repeated prepare turned NO into YES");
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: a NO branch is listed as prepared");
    let commit = r.commit(txn).await;
    assert!(
        matches!(commit, Err(ResourceError::Conflict { recorded: Decision::Abort } | ResourceError::NotPrepared)),
        "{CASE}: commit after a NO vote gave {commit:?}"
    );
    decide::<H>(&r, txn, Decision::Abort, CASE).await;
    expect_applied(h, &r, txn, 0, CASE).await;
}

/// I5: `commit` repeated, including after a restart, applies the effect once.
pub async fn commit_is_idempotent<H: Harness>(h: &H) {
    const CASE: &str = "commit_is_idempotent";
    let r = h.create().await;
    let txn = TxnId::new();
    assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    decide::<H>(&r, txn, Decision::Commit, CASE).await;
    decide::<H>(&r, txn, Decision::Commit, CASE).await;
    expect_applied(h, &r, txn, 1, CASE).await;
    let r = h.restart(r).await;
    decide::<H>(&r, txn, Decision::Commit, CASE).await;
    expect_applied(h, &r, txn, 1, CASE).await;
}

/// I5: `abort` repeated, including after a restart, succeeds and applies nothing.
pub async fn abort_is_idempotent<H: Harness>(h: &H) {
    const CASE: &str = "abort_is_idempotent";
    let r = h.create().await;
    let txn = TxnId::new();
    assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    decide::<H>(&r, txn, Decision::Abort, CASE).await;
    decide::<H>(&r, txn, Decision::Abort, CASE).await;
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: still listed after abort");
    let r = h.restart(r).await;
    decide::<H>(&r, txn, Decision::Abort, CASE).await;
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: listed again after restart");
    expect_applied(h, &r, txn, 0, CASE).await;
}

/// I4: `abort` of a txn never seen leaves a tombstone; a late prepare votes NO
/// and holds nothing, and a later commit is refused.
pub async fn abort_before_prepare_leaves_tombstone<H: Harness>(h: &H) {
    const CASE: &str = "abort_before_prepare_leaves_tombstone";
    let r = h.create().await;
    let txn = TxnId::new();
    decide::<H>(&r, txn, Decision::Abort, CASE).await;
    let vote = prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await;
    assert!(!vote.is_yes(), "{CASE}: prepare after abort voted YES");
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: the late prepare holds a branch");
    let commit = r.commit(txn).await;
    assert_eq!(commit, Err(ResourceError::Conflict { recorded: Decision::Abort }), "{CASE}: commit after a tombstone");
    expect_applied(h, &r, txn, 0, CASE).await;
}

/// I4, I7: `abort` settles a txn whatever `prepare` did before it (nothing,
/// a YES vote, a NO vote), as the resolver needs after a failed Prepare it
/// cannot see into: it succeeds, also repeated after a restart, holds and
/// applies nothing, and a Prepare after it votes NO.
pub async fn abort_settles_whatever_prepare_did<H: Harness>(h: &H) {
    const CASE: &str = "abort_settles_whatever_prepare_did";
    let r = h.create().await;
    let (never, staged, refused) = (TxnId::new(), TxnId::new(), TxnId::new());
    assert_eq!(prepare::<H>(&r, staged, h.yes_payload(staged), CASE).await, Vote::Yes, "{CASE}");
    let vote = prepare::<H>(&r, refused, h.no_payload(refused), CASE).await;
    assert!(!vote.is_yes(), "{CASE}: the NO payload voted YES");
    for txn in [never, staged, refused] {
        decide::<H>(&r, txn, Decision::Abort, CASE).await;
    }
    let r = h.restart(r).await;
    for txn in [never, staged, refused] {
        decide::<H>(&r, txn, Decision::Abort, CASE).await;
        assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: {txn} is listed after abort");
        let vote = prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await;
        assert!(!vote.is_yes(), "{CASE}: prepare of {txn} after its abort voted YES");
        expect_applied(h, &r, txn, 0, CASE).await;
    }
}

/// I4: the tombstone is durable: after a restart a late prepare still votes NO.
pub async fn tombstone_survives_restart<H: Harness>(h: &H) {
    const CASE: &str = "tombstone_survives_restart";
    let r = h.create().await;
    let txn = TxnId::new();
    decide::<H>(&r, txn, Decision::Abort, CASE).await;
    let r = h.restart(r).await;
    let vote = prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await;
    assert!(!vote.is_yes(), "{CASE}: prepare after abort and restart voted YES");
    assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: the late prepare holds a branch");
}

/// I1, I3: branches prepared before a restart take either decision after it,
/// and the outcome survives a further restart.
pub async fn decisions_apply_after_restart<H: Harness>(h: &H) {
    const CASE: &str = "decisions_apply_after_restart";
    let r = h.create().await;
    let (to_commit, to_abort) = (TxnId::new(), TxnId::new());
    for txn in [to_commit, to_abort] {
        assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    }
    let r = h.restart(r).await;
    decide::<H>(&r, to_commit, Decision::Commit, CASE).await;
    decide::<H>(&r, to_abort, Decision::Abort, CASE).await;
    let r = h.restart(r).await;
    for txn in [to_commit, to_abort] {
        assert!(!listed::<H>(&r, txn, CASE).await, "{CASE}: decided branch listed");
    }
    expect_applied(h, &r, to_commit, 1, CASE).await;
    expect_applied(h, &r, to_abort, 0, CASE).await;
    let vote = prepare::<H>(&r, to_abort, h.yes_payload(to_abort), CASE).await;
    assert!(!vote.is_yes(), "{CASE}: prepare after abort voted YES");
}

/// `commit` of a txn this resource never saw is refused with `NotPrepared`
/// and applies nothing.
pub async fn commit_of_unprepared_txn_is_not_prepared<H: Harness>(h: &H) {
    const CASE: &str = "commit_of_unprepared_txn_is_not_prepared";
    let r = h.create().await;
    let txn = TxnId::new();
    let commit = r.commit(txn).await;
    assert_eq!(commit, Err(ResourceError::NotPrepared), "{CASE}");
    expect_applied(h, &r, txn, 0, CASE).await;
}

/// I1, I2: a decision contradicting the recorded one is refused with
/// `Conflict` and changes nothing, in both directions and after a restart.
pub async fn conflicting_decision_is_refused<H: Harness>(h: &H) {
    const CASE: &str = "conflicting_decision_is_refused";
    let r = h.create().await;
    let (committed, aborted) = (TxnId::new(), TxnId::new());
    for txn in [committed, aborted] {
        assert_eq!(prepare::<H>(&r, txn, h.yes_payload(txn), CASE).await, Vote::Yes, "{CASE}");
    }
    decide::<H>(&r, committed, Decision::Commit, CASE).await;
    decide::<H>(&r, aborted, Decision::Abort, CASE).await;
    let refuse = |result: Result<(), ResourceError>, recorded: Decision, what: &str| {
        assert_eq!(result, Err(ResourceError::Conflict { recorded }), "{CASE}: {what}");
    };
    refuse(r.abort(committed).await, Decision::Commit, "abort after commit");
    refuse(r.commit(aborted).await, Decision::Abort, "commit after abort");
    let r = h.restart(r).await;
    refuse(r.abort(committed).await, Decision::Commit, "abort after commit and restart");
    refuse(r.commit(aborted).await, Decision::Abort, "commit after abort and restart");
    expect_applied(h, &r, committed, 1, CASE).await;
    expect_applied(h, &r, aborted, 0, CASE).await;
}

/// docs/PROTOCOL.md §13.3, through the participant library over this
/// resource: after a restart, status recovery (`RecoverVote`) answers YES for
/// a branch the resource holds prepared and NO for one it voted NO on; a txn
/// never prepared here is answered NO and tombstoned in the resource, so its
/// Prepare, arriving later and after another restart, votes NO and stages
/// nothing (§13.1: every NO is final).
pub async fn recovered_votes_survive_restart<H: Harness>(h: &H)
where
    H::Resource: 'static,
{
    use std::sync::Arc;

    const CASE: &str = "recovered_votes_survive_restart";
    let engine_over = |r: &Arc<H::Resource>| {
        let id: twopc_proto::ParticipantId = "conformance".parse().expect("a valid participant name");
        let config = crate::config::ParticipantConfig::new(id, vec!["127.0.0.1:1".into()]);
        Arc::new(crate::engine::Engine::new(Arc::clone(r), config, crate::metrics::Metrics::default()))
    };
    let r = h.create().await;
    let (yes, no, never) = (TxnId::new(), TxnId::new(), TxnId::new());
    assert_eq!(prepare::<H>(&r, yes, h.yes_payload(yes), CASE).await, Vote::Yes, "{CASE}");
    assert!(!prepare::<H>(&r, no, h.no_payload(no), CASE).await.is_yes(), "{CASE}");
    let r = Arc::new(h.restart(r).await);
    let engine = engine_over(&r);
    engine.recover().await.unwrap_or_else(|e| panic!("{CASE}: loading prepared branches failed: {e}"));
    let recovered = |engine: &Arc<crate::engine::Engine<H::Resource>>, txn| {
        let engine = Arc::clone(engine);
        async move { engine.recover_vote(txn, None).await.unwrap_or_else(|e| panic!("{CASE}: RecoverVote failed: {e}")) }
    };
    assert_eq!(recovered(&engine, yes).await, Vote::Yes, "{CASE}: the prepared branch's YES was not recovered");
    assert!(!recovered(&engine, no).await.is_yes(), "{CASE}: a NO vote was recovered as YES");
    assert!(!recovered(&engine, never).await.is_yes(), "{CASE}: a txn never prepared was recovered as YES");
    assert_eq!(recovered(&engine, yes).await, Vote::Yes, "{CASE}: a repeated RecoverVote changed its answer");
    drop(engine);
    let r = Arc::into_inner(r).unwrap_or_else(|| panic!("{CASE}: the resource is still shared"));
    let r = Arc::new(h.restart(r).await);
    let engine = engine_over(&r);
    engine.recover().await.unwrap_or_else(|e| panic!("{CASE}: loading prepared branches failed: {e}"));
    let deadline = twopc_proto::txn_id::unix_now_ms() + 60_000;
    let late = engine
        .prepare(never, h.yes_payload(never), deadline)
        .await
        .unwrap_or_else(|e| panic!("{CASE}: prepare after recovery failed: {e}"));
    assert!(!late.is_yes(), "{CASE}: a Prepare after RecoverVote's NO and a restart voted YES");
    assert!(!listed::<H>(r.as_ref(), never, CASE).await, "{CASE}: the tombstoned txn was staged");
    expect_applied(h, r.as_ref(), never, 0, CASE).await;
    assert!(!recovered(&engine, never).await.is_yes(), "{CASE}: the NO changed after a restart");
    decide::<H>(r.as_ref(), yes, Decision::Abort, CASE).await;
}
