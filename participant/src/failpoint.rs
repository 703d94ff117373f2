//! Failpoints at the participant's dangerous points (feature `failpoints`,
//! the `fail` crate), named `module::op::point`. Without the feature every
//! check is a constant `false` and compiles away.
//!
//! Tests arm one with `fail::cfg(NAME, "return")` (every participant in the
//! process) or `fail::cfg(NAME, "return(NAME)")` (only the participant with
//! that name). The registry is process-global, so tests that arm failpoints
//! must run one at a time.

/// Fires after the resource staged a branch durably and voted YES, before
/// the vote is recorded or sent: the Prepare fails as if the process died
/// between its fsync and its reply. The branch stays prepared in the
/// resource. Subject: the participant name.
pub const PREPARE_AFTER_DURABLE: &str = "participant::prepare::after_durable";

/// A deliberately broken protocol, for showing that the invariant checker
/// bites: an in-doubt branch is aborted locally (its hold released on a
/// timer) instead of being resolved through the coordinator, breaking I4.
/// Subject: the participant name.
pub const RESOLVE_RELEASE_ON_TIMER: &str = "resolver::resolve::release_on_timer";

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
