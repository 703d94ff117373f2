//! Client requests checked at the boundary: wire messages become domain
//! requests here, or an `InvalidArgument` that says what to fix.

use std::collections::HashSet;

use bytes::Bytes;
use twopc_proto::{Decision, ParticipantId, TxnId, pb};

use crate::command::REASON_MAX_BYTES;
use crate::config::EngineConfig;
use crate::error::{Error, Result};

/// A validated Submit.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// The txn.
    pub txn_id: TxnId,
    /// Each branch: its participant (distinct) and opaque payload.
    pub branches: Vec<(ParticipantId, Bytes)>,
    /// Unix milliseconds after which no Prepare is sent or accepted.
    pub deadline_unix_ms: u64,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Parses a wire txn id.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the problem.
pub fn parse_txn_id(text: &str) -> Result<TxnId> {
    text.parse().map_err(|e| invalid(format!("txn_id: {e}")))
}

/// Refuses a txn id created further ahead of this node's clock than
/// `txn_id_future_skew_ms`: its record would never pass a retention horizon
/// (docs/PROTOCOL.md §7.4).
///
/// # Errors
/// [`Error::InvalidArgument`] saying how far ahead the id is.
pub fn check_not_from_the_future(txn_id: TxnId, limits: &EngineConfig) -> Result<()> {
    if crate::failpoint::fired(crate::failpoint::FUTURE_IDS_UNCHECKED, || txn_id.to_string()) {
        return Ok(());
    }
    let now = limits.clock.unix_now_ms();
    let ahead_ms = txn_id.created_unix_ms().saturating_sub(now);
    if ahead_ms > limits.txn_id_future_skew_ms {
        return Err(invalid(format!(
            "txn_id: {txn_id} was created {ahead_ms} ms after this coordinator's clock, more than the {} ms \
             allowed (txn_id_future_skew_ms); create txn ids with a clock in sync with the coordinators'",
            limits.txn_id_future_skew_ms
        )));
    }
    Ok(())
}

/// The longest reason an operator may give, in bytes: with the `operator: `
/// prefix the log adds, it fits [`REASON_MAX_BYTES`] uncut.
pub const OPERATOR_REASON_MAX_BYTES: usize = REASON_MAX_BYTES - OPERATOR_REASON_PREFIX.len();

/// What the log's reason for an operator's decision starts with.
pub const OPERATOR_REASON_PREFIX: &str = "operator: ";

impl SubmitRequest {
    /// Checks a wire Submit against the engine's limits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no branches, too many, a bad or repeated
    /// participant name, an oversize payload, a malformed txn id or one from
    /// the future (past `txn_id_future_skew_ms`), or a deadline that is missing, past, or too far ahead.
    pub fn from_pb(request: pb::SubmitRequest, limits: &EngineConfig) -> Result<Self> {
        let txn_id = parse_txn_id(&request.txn_id)?;
        check_not_from_the_future(txn_id, limits)?;
        if request.branches.is_empty() {
            return Err(invalid("branches: a txn needs at least one branch".into()));
        }
        let branches = branches_from_pb(request.branches, limits)?;
        let now = limits.clock.unix_now_ms();
        let deadline = request.deadline_unix_ms;
        if deadline == 0 {
            return Err(invalid("deadline_unix_ms: required (Unix time in milliseconds)".into()));
        }
        if deadline <= now {
            return Err(invalid(format!("deadline_unix_ms: {deadline} is {} ms in the past", now - deadline)));
        }
        if deadline - now > limits.deadline_max_ms {
            return Err(invalid(format!(
                "deadline_unix_ms: {} ms ahead, more than the limit of {} ms (deadline_max_ms)",
                deadline - now,
                limits.deadline_max_ms
            )));
        }
        Ok(Self { txn_id, branches, deadline_unix_ms: deadline })
    }
}

/// Checks a request's branches: at most `branches_per_txn_max`, each a valid
/// participant name named once, with a payload within `payload_max_bytes`.
fn branches_from_pb(branches: Vec<pb::Branch>, limits: &EngineConfig) -> Result<Vec<(ParticipantId, Bytes)>> {
    if branches.len() > limits.branches_per_txn_max {
        return Err(invalid(format!(
            "branches: {} branches, more than the limit of {} (branches_per_txn_max)",
            branches.len(),
            limits.branches_per_txn_max
        )));
    }
    let mut seen = HashSet::new();
    let mut checked = Vec::with_capacity(branches.len());
    for (i, branch) in branches.into_iter().enumerate() {
        let participant: ParticipantId =
            branch.participant.parse().map_err(|e| invalid(format!("branches[{i}].participant: {e}")))?;
        if !seen.insert(participant.clone()) {
            return Err(invalid(format!(
                "branches[{i}].participant: {participant} appears twice; merge its work into one branch"
            )));
        }
        if branch.payload.len() > limits.payload_max_bytes {
            return Err(invalid(format!(
                "branches[{i}].payload: {} bytes, more than the limit of {} (payload_max_bytes)",
                branch.payload.len(),
                limits.payload_max_bytes
            )));
        }
        checked.push((participant, branch.payload));
    }
    Ok(checked)
}

/// A validated Begin (docs/PROTOCOL.md §12.1).
#[derive(Debug, Clone)]
pub struct BeginRequest {
    /// The client's txn id; None to let the coordinator choose one.
    pub txn_id: Option<TxnId>,
    /// How long the txn may stay open, from the leader's clock.
    pub timeout_ms: u64,
}

impl BeginRequest {
    /// Checks a wire Begin.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed txn id or one from the
    /// future, or a timeout of 0 or over `deadline_max_ms`.
    pub fn from_pb(request: &pb::BeginRequest, limits: &EngineConfig) -> Result<Self> {
        let txn_id = match request.txn_id.as_str() {
            "" => None,
            text => {
                let txn_id = parse_txn_id(text)?;
                check_not_from_the_future(txn_id, limits)?;
                Some(txn_id)
            }
        };
        if request.timeout_ms == 0 {
            return Err(invalid(format!(
                "timeout_ms: required: how long the txn may stay open, 1 to {} ms (deadline_max_ms)",
                limits.deadline_max_ms
            )));
        }
        if request.timeout_ms > limits.deadline_max_ms {
            return Err(invalid(format!(
                "timeout_ms: {} ms, more than the limit of {} ms (deadline_max_ms)",
                request.timeout_ms, limits.deadline_max_ms
            )));
        }
        Ok(Self { txn_id, timeout_ms: request.timeout_ms })
    }
}

/// A validated Join (docs/PROTOCOL.md §12.3).
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The begun txn.
    pub txn_id: TxnId,
    /// The participant whose prepared branch joins.
    pub participant: ParticipantId,
}

impl JoinRequest {
    /// Checks a wire Join.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed txn id or one from the
    /// future, or a bad participant name.
    pub fn from_pb(request: &pb::JoinRequest, limits: &EngineConfig) -> Result<Self> {
        let txn_id = parse_txn_id(&request.txn_id)?;
        check_not_from_the_future(txn_id, limits)?;
        let participant = request.participant.parse().map_err(|e| invalid(format!("participant: {e}")))?;
        Ok(Self { txn_id, participant })
    }
}

/// A validated Commit (docs/PROTOCOL.md §12.4).
#[derive(Debug, Clone)]
pub struct CommitRequest {
    /// The begun txn.
    pub txn_id: TxnId,
    /// One-shot branches to prepare now, as Submit does; may be empty.
    pub branches: Vec<(ParticipantId, Bytes)>,
}

impl CommitRequest {
    /// Checks a wire Commit.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed txn id or one from the
    /// future, or branches a Submit would refuse (too many, a bad or repeated
    /// participant name, an oversize payload).
    pub fn from_pb(request: pb::CommitRequest, limits: &EngineConfig) -> Result<Self> {
        let txn_id = parse_txn_id(&request.txn_id)?;
        check_not_from_the_future(txn_id, limits)?;
        let branches = branches_from_pb(request.branches, limits)?;
        Ok(Self { txn_id, branches })
    }
}

/// What the log's reason for a Rollback starts with.
pub const ROLLBACK_REASON_PREFIX: &str = "rolled back: ";

/// The log's reason for a Rollback that gives none.
pub const ROLLBACK_REASON_DEFAULT: &str = "rolled back";

/// The longest reason a Rollback may give, in bytes: with
/// [`ROLLBACK_REASON_PREFIX`] it fits [`REASON_MAX_BYTES`] uncut.
pub const ROLLBACK_REASON_MAX_BYTES: usize = REASON_MAX_BYTES - ROLLBACK_REASON_PREFIX.len();

/// A validated Rollback (docs/PROTOCOL.md §12.4).
#[derive(Debug, Clone)]
pub struct RollbackRequest {
    /// The begun txn.
    pub txn_id: TxnId,
    /// The reason as the log keeps it (`rolled back: <reason>`).
    pub reason: String,
}

impl RollbackRequest {
    /// Checks a wire Rollback.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed txn id or one from the
    /// future, or a reason over [`ROLLBACK_REASON_MAX_BYTES`].
    pub fn from_pb(request: &pb::RollbackRequest, limits: &EngineConfig) -> Result<Self> {
        let txn_id = parse_txn_id(&request.txn_id)?;
        check_not_from_the_future(txn_id, limits)?;
        if request.reason.len() > ROLLBACK_REASON_MAX_BYTES {
            return Err(invalid(format!(
                "reason: {} bytes, more than the limit of {ROLLBACK_REASON_MAX_BYTES}; the log keeps it in every \
                 snapshot, so say it shorter",
                request.reason.len()
            )));
        }
        let reason = match request.reason.trim() {
            "" => ROLLBACK_REASON_DEFAULT.to_owned(),
            _ => format!("{ROLLBACK_REASON_PREFIX}{}", request.reason),
        };
        Ok(Self { txn_id, reason })
    }
}

/// A validated operator Decide (`twopc.v1.Admin`).
#[derive(Debug, Clone)]
pub struct OperatorDecideRequest {
    /// The txn.
    pub txn_id: TxnId,
    /// The operator's decision; a Commit only with `force_commit` set.
    pub decision: Decision,
    /// Why, in the operator's words (without the log's prefix).
    pub reason: String,
}

impl OperatorDecideRequest {
    /// Checks a wire Decide.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed or future txn id, an unknown
    /// decision, a missing or over-long reason, or a Commit without
    /// `force_commit` (docs/PROTOCOL.md §6.1).
    pub fn from_pb(request: pb::DecideRequest, limits: &EngineConfig) -> Result<Self> {
        let txn_id = parse_txn_id(&request.txn_id)?;
        check_not_from_the_future(txn_id, limits)?;
        let decision = Decision::try_from(request.decision).map_err(|e| invalid(e.to_string()))?;
        if request.reason.trim().is_empty() {
            return Err(invalid("reason: say why the operator decides; it is kept in the log".into()));
        }
        if request.reason.len() > OPERATOR_REASON_MAX_BYTES {
            return Err(invalid(format!(
                "reason: {} bytes, more than the limit of {OPERATOR_REASON_MAX_BYTES}; the log keeps it in every \
                 snapshot, so say it shorter",
                request.reason.len()
            )));
        }
        let unchecked = || crate::failpoint::fired(crate::failpoint::OPERATOR_DECIDE_UNCHECKED, || txn_id.to_string());
        if decision == Decision::Commit && !request.force_commit && !unchecked() {
            return Err(invalid(
                "force_commit: an operator Commit must be forced (twopc txn decide ID commit --force): the log \
                 holds no votes for an undecided txn, and committing one whose branch voted NO applies it at some \
                 participants and not others (I1); check every participant's vote first, or decide abort"
                    .into(),
            ));
        }
        Ok(Self { txn_id, decision, reason: request.reason })
    }
}

/// A validated ListTransactions.
#[derive(Debug, Clone)]
pub struct ListRequest {
    /// Only txns this leader is preparing (not yet logged).
    pub undecided: bool,
    /// Only decided txns not acknowledged by every branch.
    pub unacknowledged: bool,
    /// Only txns created at least this long ago.
    pub older_than_ms: u64,
    /// Page after this id.
    pub after: Option<TxnId>,
    /// Page size.
    pub limit: usize,
}

/// Page size when the request names none, and the largest accepted.
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// The largest page a ListTransactions returns.
pub const LIST_LIMIT_MAX: usize = 1000;
/// The most bytes of txns one ListTransactions page carries; a page that
/// would grow past it ends early, with a cursor to the rest. Well under the
/// 4 MiB message limit (`MAX_MESSAGE_BYTES`): 1000 txns of 16 branches with
/// reasons at `REASON_MAX_BYTES` would be about 9 MiB.
pub const LIST_PAGE_MAX_BYTES: usize = 1024 * 1024;

impl ListRequest {
    /// Checks a wire ListTransactions.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown filter, a malformed cursor or an oversize page.
    pub fn from_pb(request: &pb::ListTransactionsRequest) -> Result<Self> {
        let filter = pb::TxnFilter::try_from(request.filter)
            .map_err(|_| invalid(format!("filter: unknown value {}", request.filter)))?;
        let after = match request.after_txn_id.as_str() {
            "" => None,
            text => Some(text.parse().map_err(|e| invalid(format!("after_txn_id: {e}")))?),
        };
        let limit = match request.limit as usize {
            0 => LIST_LIMIT_DEFAULT,
            n if n > LIST_LIMIT_MAX => {
                return Err(invalid(format!("limit: {n} is more than the maximum page of {LIST_LIMIT_MAX}")));
            }
            n => n,
        };
        Ok(Self {
            undecided: filter == pb::TxnFilter::Undecided,
            unacknowledged: filter == pb::TxnFilter::Unacknowledged,
            older_than_ms: request.older_than_ms,
            after,
            limit,
        })
    }
}
