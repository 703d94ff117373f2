//! Failpoints at the coordinator's dangerous points (feature `failpoints`,
//! the `fail` crate), named `module::op::point`. Without the feature every
//! check is a constant `false` and compiles away.
//!
//! Tests arm one with `fail::cfg(NAME, "return")` (fires for everything) or
//! `fail::cfg(NAME, "return(SUBJECT)")` (fires only for that subject: a txn
//! id, a node id or a participant name, as each point says). Counts work as
//! usual: `"1*return"` fires once. The registry is process-global, so tests
//! that arm failpoints must run one at a time (tests/tests/failpoints.rs).

/// Fires after a decision entry is applied and before phase 2: the Submit
/// fails as if the leader died there (the client learns nothing) and this
/// leader does not deliver the decision. Subject: the txn id.
pub const DECIDE_AFTER_APPLIED: &str = "engine::decide::after_applied";

/// Fires in the Ready loop of a leader whose Ready carries new entries, after
/// it sent them to followers and before it persists or applies them: the raft
/// task stops with an error, as if the process died between proposing a
/// decision and applying it. Subject: the node id.
pub const READY_BEFORE_APPLY: &str = "node::ready::before_apply";

/// Fires in a phase-2 worker before it sends Decide calls: the worker stops
/// for good, as if the leader died between phase-2 sends (other
/// participants' workers carry on). Subject: the participant name.
pub const DELIVERY_BEFORE_SEND: &str = "delivery::send::before";

/// Skips the leader's check of a membership change before it is proposed
/// (removing the last voter, a non-member, or the leader itself), so that
/// what raft-rs does at apply time can be tested. Subject: the node id.
pub const MEMBERSHIP_SKIP_CHECK: &str = "node::membership::skip_check";

/// Fires before the leader proposes a batch of acknowledgements: the
/// proposal fails as an overloaded node's would, and the batch must be
/// proposed again. Subject: the batch's first txn id.
pub const ACKS_BEFORE_PROPOSE: &str = "delivery::acks::before_propose";

/// A deliberately broken protocol, for showing that the invariant checker
/// bites: the leader decides Commit whatever the votes were. Subject: the txn id.
pub const PREPARE_IGNORE_VOTES: &str = "engine::prepare::ignore_votes";

/// Brings back issue 14's operator bug, for showing that the simulation's
/// checker bites: an operator's Decide is logged at once, a Commit without
/// `force_commit` and a txn this leader is still preparing included. Subject:
/// the txn id.
pub const OPERATOR_DECIDE_UNCHECKED: &str = "engine::operator_decide::unchecked";

/// Brings back issue 14's far-future bug, for the checker's bite: txn ids from
/// the far future pass the engine's `txn_id_future_skew_ms` check and the
/// log's own refusal at apply. Subject: the txn id.
pub const FUTURE_IDS_UNCHECKED: &str = "engine::txn_id::future_unchecked";

/// Brings back issue 14's retention bug, for the checker's bite: a txn id
/// below the log's Forget horizon gets a first decision (a Resolve's presumed
/// abort, an operator's) as if it were unknown. Subject: the txn id.
pub const FORGOTTEN_UNCHECKED: &str = "engine::forgotten::unchecked";

/// Brings back issue 14's acknowledgement bug, for the checker's bite: a
/// batch of acknowledgements whose proposal failed is dropped, not proposed
/// again, so its txns stay unacknowledged while this leader leads. Subject:
/// the batch's first txn id.
pub const ACKS_DROPPED_ON_FAILURE: &str = "delivery::acks::dropped_on_failure";

/// Fires under parallel commit once the Staged entry is applied and every
/// vote is YES, before the answer (the txn is committed and nobody told):
/// the Submit fails as if the leader died there, and the staged txn is left
/// to status recovery. Subject: the txn id.
pub const PARALLEL_AFTER_STAGED: &str = "engine::parallel::after_staged";

/// Fires under parallel commit after the client is told Commit and before
/// the Decide entry is logged: the leader stops there, and only status
/// recovery can log the decision. Subject: the txn id.
pub const PARALLEL_AFTER_ANSWER: &str = "engine::parallel::after_answer";

/// Fires in status recovery after the votes are in and before the decision
/// is logged: the recovery stops, and a later one must reach the same
/// decision. Subject: the txn id.
pub const RECOVERY_BEFORE_DECIDE: &str = "engine::recovery::before_decide";

/// A deliberately broken parallel commit, for the checker's bite: Commit is
/// answered once every vote is YES, before the Staged entry is known applied
/// and the term confirmed. Subject: the txn id.
pub const PARALLEL_ANSWER_BEFORE_STAGED: &str = "engine::parallel::answer_before_staged";

/// Makes Commit's and Rollback's local read of an interactive txn find
/// nothing, as on a new leader whose applied state lags its log (§4.4):
/// the answer must then come from a read through the log. Subject: the txn id.
pub const INTERACTIVE_LOCAL_STATE_LAGS: &str = "engine::interactive::local_state_lags";

/// Makes a Submit's check find the txn not begun, as when it looked just
/// before a Begin of the id was applied: the Submit runs on a begun txn, and
/// the log must refuse its decision or Staged entry (§5 step 7). Subject:
/// the txn id.
pub const SUBMIT_RACES_BEGIN: &str = "engine::submit::races_begin";

/// Whether failpoint `name` fires for `subject` (computed only when the
/// failpoint is armed).
#[cfg(feature = "failpoints")]
pub(crate) fn fired(name: &str, subject: impl FnOnce() -> String) -> bool {
    // `fail::eval` is what `fail_point!` expands to; it is called directly so
    // that fail's crate-wide `failpoints` feature can stay off.
    fail::eval(name, |arg| arg.is_none_or(|arg| arg.is_empty() || arg == subject())).unwrap_or(false)
}

/// Whether failpoint `name` fires: never, without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn fired(_name: &str, _subject: impl FnOnce() -> String) -> bool {
    false
}
