//! The applied state: the txn table, the participant registry and the
//! coordinator members' addresses. Pure: it takes log entries and returns
//! results, with no I/O and no clock of its own (times come from the entry), so
//! every node that applies the same log holds the same state (I2).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use prost::Message;
use twopc_proto::{Decision, ParticipantId, PayloadDigest, TxnId, Vote};

use crate::command::{
    Command, DecideCmd, Proposal, StagedCmd, decision_from_wire, digest_from_wire, digests_from_wire, digests_to_wire,
    participant_from_wire, txn_id_from_wire, vote_from_wire, vote_to_wire,
};
use crate::error::{Error, Result};

/// What the log says about one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnRecord {
    /// The transaction.
    pub txn_id: TxnId,
    /// The logged 2PC decision.
    pub decision: Decision,
    /// Why it aborted (empty on commit).
    pub reason: String,
    /// Each branch, its vote, and whether it acknowledged the decision.
    pub branches: Vec<BranchRecord>,
    /// The proposing leader's clock when the decision was proposed.
    pub decided_unix_ms: u64,
    /// The log index of the decision entry.
    pub decision_log_index: u64,
    /// When the last branch acknowledged (proposer's clock), if all have.
    pub finished_unix_ms: Option<u64>,
    /// The deadline of a txn that was begun interactively (docs/PROTOCOL.md
    /// §12); None for a one-shot txn (Submit, a presumed abort, an operator's
    /// decision of a txn never begun).
    pub deadline_unix_ms: Option<u64>,
}

impl TxnRecord {
    /// Whether every branch has acknowledged the decision.
    pub fn is_finished(&self) -> bool {
        self.finished_unix_ms.is_some()
    }

    /// A Commit of a txn never begun that names no branch: only an
    /// operator's forced Commit (docs/PROTOCOL.md §6.1). Retention never
    /// forgets one, so every forgotten txn is one that no in-doubt branch can
    /// belong to unless it aborted (§7.2): its participant may abort the
    /// branch. An interactive record is not one, even when it names no branch:
    /// every branch of a begun txn is named by its record (joined before the
    /// decision, or one-shot), and a participant it does not name is answered
    /// Abort (§6, §12.5). So retention forgets it, and a client cannot grow
    /// the table with Begin and an empty Commit (§12.6).
    pub fn is_branchless_commit(&self) -> bool {
        self.decision == Decision::Commit && self.branches.is_empty() && self.deadline_unix_ms.is_none()
    }

    /// Whether the record names `participant`'s branch.
    pub fn names(&self, participant: &ParticipantId) -> bool {
        self.branches.iter().any(|b| &b.participant == participant)
    }
}

/// One branch of a logged txn.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchRecord {
    /// Who holds the branch.
    pub participant: ParticipantId,
    /// Its vote; None if it never answered.
    pub vote: Option<Vote>,
    /// Whether it acknowledged carrying out the decision.
    pub acknowledged: bool,
    /// Whether it joined a begun txn (docs/PROTOCOL.md §12.3) rather than
    /// being prepared by the coordinator as a one-shot branch.
    pub joined: bool,
    /// The digest of the payload it was prepared with, for a txn decided
    /// after a Staged entry that named it (§13.1); None otherwise. A Submit
    /// of the id with other payloads is never answered this record's Commit.
    pub payload_digest: Option<PayloadDigest>,
}

/// An interactive txn that is begun and not decided (docs/PROTOCOL.md §12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BegunTxn {
    /// The transaction.
    pub txn_id: TxnId,
    /// Unix milliseconds from which it is over: no branch joins it, a Commit
    /// proposed then is applied as Abort, and the leader logs its timeout.
    pub deadline_unix_ms: u64,
    /// The proposer's clock when the Begin entry was proposed.
    pub begun_unix_ms: u64,
    /// The log index of the Begin entry.
    pub begun_log_index: u64,
    /// The participants that joined, in the order their Join entries were applied.
    pub joined: Vec<ParticipantId>,
}

impl BegunTxn {
    /// Whether the txn is past its deadline at `now_unix_ms`.
    pub fn is_expired(&self, now_unix_ms: u64) -> bool {
        now_unix_ms >= self.deadline_unix_ms
    }
}

/// A one-shot txn staged under parallel commit and not decided
/// (docs/PROTOCOL.md §13). It is committed if every participant named
/// durably voted YES; status recovery settles it by asking them (§13.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedTxn {
    /// The transaction.
    pub txn_id: TxnId,
    /// Every branch's participant.
    pub participants: Vec<ParticipantId>,
    /// Each branch's payload digest, in `participants`' order (empty if
    /// staged by an entry from before digests): what status recovery asks
    /// each participant's vote on (§13.3).
    pub payload_digests: Vec<PayloadDigest>,
    /// The txn's deadline, Unix milliseconds.
    pub deadline_unix_ms: u64,
    /// The proposer's clock when the Staged entry was proposed.
    pub staged_unix_ms: u64,
    /// The log index of the Staged entry that staged it: its proposer owns
    /// the txn (§13.1), and only it may answer Commit before the Decide entry.
    pub staged_log_index: u64,
}

/// The record a Decide entry makes for a one-shot txn (never begun): its
/// branches and votes as the entry gives them, applied at `index`, `now`.
pub(crate) fn one_shot_record(cmd: &DecideCmd, index: u64, now: u64) -> TxnRecord {
    let digests = cmd.payload_digests.iter().copied().map(Some).chain(std::iter::repeat(None));
    let branches = cmd
        .branches
        .iter()
        .zip(digests)
        .map(|((participant, vote), payload_digest)| BranchRecord {
            participant: participant.clone(),
            vote: vote.clone(),
            // A branch that voted NO holds nothing and already knows the
            // outcome: there is nothing to deliver to it.
            acknowledged: matches!(vote, Some(Vote::No { .. })),
            joined: false,
            payload_digest,
        })
        .collect();
    TxnRecord {
        txn_id: cmd.txn_id,
        decision: cmd.decision,
        reason: cmd.reason.clone(),
        branches,
        decided_unix_ms: now,
        decision_log_index: index,
        finished_unix_ms: None,
        deadline_unix_ms: None,
    }
}

/// A page of a table keyed by txn id: ids after `after`, created before the
/// given time, at most `limit` (ids sort by creation time).
fn page<V>(table: &BTreeMap<TxnId, V>, created_before_unix_ms: u64, after: Option<TxnId>, limit: usize) -> Vec<&V> {
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    table
        .range((start, Bound::Unbounded))
        .take_while(|(id, _)| id.created_unix_ms() < created_before_unix_ms)
        .map(|(_, value)| value)
        .take(limit)
        .collect()
}

/// Whether two participant lists name the same set, in any order.
fn same_participants(a: &[ParticipantId], b: &[ParticipantId]) -> bool {
    let (a, b): (BTreeSet<&ParticipantId>, BTreeSet<&ParticipantId>) = (a.iter().collect(), b.iter().collect());
    a == b
}

/// Whether a Staged entry repeats the staged txn: the same participants,
/// any order, and, where both carry them, the same payload for each.
fn same_branches(staged: &StagedTxn, cmd: &StagedCmd) -> bool {
    if !same_participants(&staged.participants, &cmd.participants) {
        return false;
    }
    if staged.payload_digests.is_empty() || cmd.payload_digests.is_empty() {
        return true;
    }
    branch_digests(&staged.participants, &staged.payload_digests)
        == branch_digests(&cmd.participants, &cmd.payload_digests)
}

/// Each branch's participant with its payload digest, in no order.
pub(crate) fn branch_digests(
    participants: &[ParticipantId],
    digests: &[PayloadDigest],
) -> BTreeSet<(ParticipantId, PayloadDigest)> {
    participants.iter().cloned().zip(digests.iter().copied()).collect()
}

/// The result of applying one entry, handed back to its proposer.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The txn's record after the Decide entry: `first` tells whether this
    /// entry made the decision or an earlier one had (I2: the first wins).
    Decided {
        /// The record as the log now holds it.
        record: TxnRecord,
        /// Whether this entry was the deciding one.
        first: bool,
    },
    /// Acknowledgements recorded; `finished` txns became fully acknowledged.
    Acknowledged {
        /// How many txns became finished.
        finished: usize,
    },
    /// Finished txns removed by retention.
    Forgotten {
        /// How many records were removed.
        removed: usize,
    },
    /// The participant registry changed (or a removal named an unknown one).
    Registry {
        /// Whether the name existed before this entry.
        existed: bool,
    },
    /// A Decide entry that would have made a first decision was refused and
    /// changed nothing (docs/PROTOCOL.md §7.2, §7.4).
    DecideRefused {
        /// The txn named by the entry.
        txn_id: TxnId,
        /// Why.
        refusal: DecideRefusal,
    },
    /// The txn is begun: by this entry (`first`) or an earlier one, whose
    /// deadline stands (first writer wins, docs/PROTOCOL.md §12.1).
    Begun {
        /// The txn as the log now holds it.
        begun: BegunTxn,
        /// Whether this entry began it.
        first: bool,
    },
    /// The txn is staged: by this entry (`first`) or an earlier one naming
    /// the same participants (docs/PROTOCOL.md §13.1).
    Staged {
        /// The txn as the log now holds it.
        staged: StagedTxn,
        /// Whether this entry staged it.
        first: bool,
    },
    /// A Staged entry was refused and changed nothing.
    StagedRefused {
        /// The txn named by the entry.
        txn_id: TxnId,
        /// Why.
        refusal: StagedRefusal,
    },
    /// What each txn of a Staged or Decisions entry was applied as, in order.
    Many(Vec<Applied>),
    /// A Begin entry was refused and changed nothing.
    BeginRefused {
        /// The txn named by the entry.
        txn_id: TxnId,
        /// Why.
        refusal: BeginRefusal,
    },
    /// The participant's branch is part of the txn: joined by this entry
    /// (`first`), or named already (an earlier Join, or the decided record).
    Joined {
        /// The txn's deadline (for a decided one-shot record that names the
        /// participant, its decision time: it is decided by then).
        deadline_unix_ms: u64,
        /// Whether this entry joined it.
        first: bool,
    },
    /// A Join entry was refused and changed nothing: the participant must
    /// abort its branch (docs/PROTOCOL.md §12.3).
    JoinRefused {
        /// The txn named by the entry.
        txn_id: TxnId,
        /// Why.
        refusal: JoinRefusal,
    },
}

/// Why the state machine refused a Staged entry (docs/PROTOCOL.md §13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagedRefusal {
    /// The log has already decided the txn.
    Decided(Decision),
    /// The txn is begun (interactive, §12).
    Begun,
    /// The txn is staged already, with other participants.
    OtherBranches,
    /// The id was created before the log's retention horizon (§7.2).
    Forgotten,
    /// The id was created more than [`TXN_ID_AHEAD_OF_PROPOSER_MAX_MS`] after
    /// the proposer's clock (§7.4).
    FromTheFuture,
}

/// Why the state machine refused a Begin entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeginRefusal {
    /// The txn is staged under parallel commit (a one-shot Submit used the id, §13).
    Staged,
    /// The log has already decided the txn (a presumed abort or a one-shot
    /// Submit used the id; or it was begun and is over).
    Decided(Decision),
    /// The id was created before the log's retention horizon (§7.2).
    Forgotten,
    /// The id was created more than [`TXN_ID_AHEAD_OF_PROPOSER_MAX_MS`] after
    /// the proposer's clock (§7.4).
    FromTheFuture,
}

/// What a Join entry would be applied as ([`StateMachine::join_verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinVerdict {
    /// The txn's record, or its joined list, names the participant already: a repeat.
    Named {
        /// The txn's deadline (a decided one-shot record's decision time).
        deadline_unix_ms: u64,
    },
    /// The txn is begun and open: the entry joins the branch.
    Joinable {
        /// The txn's deadline.
        deadline_unix_ms: u64,
        /// How many branches joined it so far.
        joined: usize,
    },
    /// The entry is refused and changes nothing.
    Refused(JoinRefusal),
}

/// Why the state machine refused a Join entry (docs/PROTOCOL.md §12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// The txn is decided and its record does not name the participant.
    Decided(Decision),
    /// The txn is begun, but the entry's proposer time is at or past its deadline.
    PastDeadline,
    /// The log holds no Begin for the txn.
    Unknown,
    /// The id was created before the log's retention horizon (§7.2).
    Forgotten,
    /// The txn already holds [`JOINED_BRANCHES_MAX`] joined branches.
    TooManyBranches,
}

impl JoinRefusal {
    /// The state a refused Join names in the `twopc-txn-state` metadata entry.
    pub fn state(&self) -> &'static str {
        match self {
            Self::Decided(Decision::Commit) => TXN_STATE_DECIDED_COMMIT,
            Self::Decided(Decision::Abort) => TXN_STATE_DECIDED_ABORT,
            Self::PastDeadline => TXN_STATE_TIMED_OUT,
            Self::Unknown => TXN_STATE_UNKNOWN,
            Self::Forgotten => TXN_STATE_FORGOTTEN,
            Self::TooManyBranches => TXN_STATE_BEGUN,
        }
    }
}

/// `twopc-txn-state` of a txn that is begun and open.
pub const TXN_STATE_BEGUN: &str = "BEGUN";
/// `twopc-txn-state` of a txn whose logged decision is Commit.
pub const TXN_STATE_DECIDED_COMMIT: &str = "DECIDED COMMIT";
/// `twopc-txn-state` of a txn whose logged decision is Abort.
pub const TXN_STATE_DECIDED_ABORT: &str = "DECIDED ABORT";
/// `twopc-txn-state` of a begun txn past its deadline (its Abort may not be logged yet).
pub const TXN_STATE_TIMED_OUT: &str = "TIMED OUT";
/// `twopc-txn-state` of a txn the log never began.
pub const TXN_STATE_UNKNOWN: &str = "UNKNOWN";
/// The state of a staged txn (parallel commit, docs/PROTOCOL.md §13) whose
/// Decide entry was refused: status recovery decides it.
pub const TXN_STATE_STAGED: &str = "STAGED";
/// `twopc-txn-state` of a txn id created before the log's retention horizon.
pub const TXN_STATE_FORGOTTEN: &str = "FORGOTTEN";

/// The reason logged with the Abort of a begun txn that reached its deadline
/// undecided, and with a Commit the log applies as Abort because its
/// proposer time was past the deadline (docs/PROTOCOL.md §12.4, §12.5).
pub const TIMED_OUT_REASON: &str = "timed out";

/// The most branches the log lets join one txn: its own guard (I6), whatever
/// a proposer checked. The engine's `branches_per_txn_max` must not exceed it
/// (checked at start-up); concurrent Joins that each passed the engine's
/// check are stopped here.
pub const JOINED_BRANCHES_MAX: usize = 256;

/// Why the state machine refused a first decision for a txn id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecideRefusal {
    /// The id was created before the log's retention horizon: the txn may have
    /// been decided and forgotten, so a new decision could contradict it (I2).
    Forgotten,
    /// The id was created more than [`TXN_ID_AHEAD_OF_PROPOSER_MAX_MS`] after
    /// the proposer's clock: it would never pass the retention horizon (I6).
    FromTheFuture,
    /// The txn is staged (§13) and the entry names other branches than the
    /// Staged entry: its record would drop a participant that may have voted
    /// YES to a txn already answered Commit (I1).
    OtherBranches,
    /// The txn is staged (§13.1) and the entry is not a decision its votes
    /// make: Commit without every vote YES, or Abort without a NO (a presumed
    /// abort, an operator's decision, an Abort for a missing vote). Status
    /// recovery decides it instead.
    Staged,
    /// A one-shot Submit's decision ([`Command::DecideOneShot`]) for a txn
    /// begun interactively since the Submit looked: only the begun txn's own
    /// Commit, Rollback or timeout decides it (§12.4).
    Begun,
}

/// How far a txn id's creation time may lie ahead of a Decide entry's
/// `proposed_unix_ms` for the entry to be applied; beyond it the entry is
/// refused ([`DecideRefusal::FromTheFuture`]). Far above the engine's
/// `txn_id_future_skew_ms`, which refuses such ids before they are proposed:
/// this is the log's own guard against a buggy or old proposer, and it only
/// compares two numbers in the entry, so every replica decides alike.
pub const TXN_ID_AHEAD_OF_PROPOSER_MAX_MS: u64 = 10 * 60 * 1000;

/// Which txns a listing returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFilter {
    /// Every recorded txn.
    All,
    /// Decided but not acknowledged by every branch.
    Unacknowledged,
}

/// The replicated state machine.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StateMachine {
    applied_index: u64,
    txns: BTreeMap<TxnId, TxnRecord>,
    unacknowledged: BTreeSet<TxnId>,
    participants: BTreeMap<ParticipantId, String>,
    members: BTreeMap<u64, String>,
    /// The highest horizon a `Forget` entry applied: txns created before it
    /// may have been decided and forgotten (docs/PROTOCOL.md §7.2).
    forgotten_before_unix_ms: u64,
    /// Begun, undecided txns (docs/PROTOCOL.md §12). A txn is here or in
    /// `txns`, never both.
    begun: BTreeMap<TxnId, BegunTxn>,
    /// `begun` by deadline, so the leader finds expired txns without a scan.
    begun_by_deadline: BTreeSet<(u64, TxnId)>,
    /// Staged, undecided txns (docs/PROTOCOL.md §13). A txn is here, in
    /// `begun` or in `txns`, never in two.
    staged: BTreeMap<TxnId, StagedTxn>,
}

impl StateMachine {
    /// An empty state machine whose coordinator members are `members`.
    pub fn new(members: BTreeMap<u64, String>) -> Self {
        Self { members, ..Self::default() }
    }

    /// The state a static cluster starts from: `members`, as if applied up to
    /// `index` (the storage's bootstrap snapshot index).
    pub fn bootstrap(members: BTreeMap<u64, String>, index: u64) -> Self {
        Self { members, applied_index: index, ..Self::default() }
    }

    /// The index of the last entry applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// Records that an entry with no command (a leader's empty entry, a conf
    /// change) was applied at `index`.
    pub fn skip(&mut self, index: u64) {
        self.advance(index);
    }

    fn advance(&mut self, index: u64) {
        // Entries are applied in log order exactly once; anything else is a bug
        // in the Ready loop, not bad input.
        assert!(index > self.applied_index, "entry {index} applied after {}", self.applied_index);
        self.applied_index = index;
    }

    /// Applies one decoded entry at `index`.
    pub fn apply(&mut self, index: u64, proposal: &Proposal) -> Applied {
        self.advance(index);
        let now = proposal.proposed_unix_ms;
        match &proposal.command {
            Command::Decide(cmd) => self.decide(index, now, cmd, None),
            // A begun txn is its own client's to decide (§5 step 7, §12.4).
            Command::DecideOneShot(cmd) if self.begun.contains_key(&cmd.txn_id) => {
                Applied::DecideRefused { txn_id: cmd.txn_id, refusal: DecideRefusal::Begun }
            }
            Command::DecideOneShot(cmd) => self.decide(index, now, cmd, None),
            Command::Decisions(cmds) => Applied::Many(cmds.iter().map(|c| self.decide(index, now, c, None)).collect()),
            Command::AbortStaged { staged_log_index, decide } if decide.decision == Decision::Abort => {
                self.decide(index, now, decide, Some(*staged_log_index))
            }
            // Only ever an Abort; a Commit in one is a proposer's bug, refused.
            Command::AbortStaged { decide, .. } => {
                Applied::DecideRefused { txn_id: decide.txn_id, refusal: DecideRefusal::Staged }
            }
            Command::Staged(cmds) => Applied::Many(cmds.iter().map(|c| self.stage(index, now, c)).collect()),
            Command::Acknowledge(acks) => self.acknowledge(now, acks),
            Command::Forget { horizon_unix_ms } => self.forget(*horizon_unix_ms),
            Command::RegisterParticipant { name, addr } => {
                let existed = self.participants.insert(name.clone(), addr.clone()).is_some();
                Applied::Registry { existed }
            }
            Command::RemoveParticipant { name } => {
                Applied::Registry { existed: self.participants.remove(name).is_some() }
            }
            Command::Begin { txn_id, deadline_unix_ms } => self.begin(index, now, *txn_id, *deadline_unix_ms),
            Command::Join { txn_id, participant } => self.join(now, *txn_id, participant),
        }
    }

    fn stage(&mut self, index: u64, now: u64, cmd: &StagedCmd) -> Applied {
        let txn_id = cmd.txn_id;
        let refused = |refusal| Applied::StagedRefused { txn_id, refusal };
        if let Some(record) = self.txns.get(&txn_id) {
            return refused(StagedRefusal::Decided(record.decision));
        }
        if self.begun.contains_key(&txn_id) {
            return refused(StagedRefusal::Begun);
        }
        // First writer wins: a repeat (a retried Submit) stages nothing new.
        if let Some(staged) = self.staged.get(&txn_id) {
            // Another Submit of the id, with other branches or other payloads
            // (§13.1): its Prepares are not the staged txn's.
            if !same_branches(staged, cmd) {
                return refused(StagedRefusal::OtherBranches);
            }
            return Applied::Staged { staged: staged.clone(), first: false };
        }
        // As for a Decide (§7.2, §7.4).
        if self.may_have_forgotten(&txn_id) {
            return refused(StagedRefusal::Forgotten);
        }
        if txn_id.created_unix_ms() > now.saturating_add(TXN_ID_AHEAD_OF_PROPOSER_MAX_MS) {
            return refused(StagedRefusal::FromTheFuture);
        }
        let staged = StagedTxn {
            txn_id,
            participants: cmd.participants.clone(),
            payload_digests: cmd.payload_digests.clone(),
            deadline_unix_ms: cmd.deadline_unix_ms,
            staged_unix_ms: now,
            staged_log_index: index,
        };
        self.staged.insert(txn_id, staged.clone());
        Applied::Staged { staged, first: true }
    }

    fn begin(&mut self, index: u64, now: u64, txn_id: TxnId, deadline_unix_ms: u64) -> Applied {
        if let Some(record) = self.txns.get(&txn_id) {
            return Applied::BeginRefused { txn_id, refusal: BeginRefusal::Decided(record.decision) };
        }
        if self.staged.contains_key(&txn_id) {
            return Applied::BeginRefused { txn_id, refusal: BeginRefusal::Staged };
        }
        // First writer wins: a repeat answers the logged deadline (I5).
        if let Some(begun) = self.begun.get(&txn_id) {
            return Applied::Begun { begun: begun.clone(), first: false };
        }
        // As for a Decide (§7.2, §7.4): a begun record outlives no horizon it
        // should not, and an id that may have been decided is never begun.
        if self.may_have_forgotten(&txn_id) {
            return Applied::BeginRefused { txn_id, refusal: BeginRefusal::Forgotten };
        }
        if txn_id.created_unix_ms() > now.saturating_add(TXN_ID_AHEAD_OF_PROPOSER_MAX_MS) {
            return Applied::BeginRefused { txn_id, refusal: BeginRefusal::FromTheFuture };
        }
        let begun =
            BegunTxn { txn_id, deadline_unix_ms, begun_unix_ms: now, begun_log_index: index, joined: Vec::new() };
        self.begun_by_deadline.insert((deadline_unix_ms, txn_id));
        self.begun.insert(txn_id, begun.clone());
        Applied::Begun { begun, first: true }
    }

    fn join(&mut self, now: u64, txn_id: TxnId, participant: &ParticipantId) -> Applied {
        match self.join_verdict(now, txn_id, participant) {
            JoinVerdict::Named { deadline_unix_ms } => Applied::Joined { deadline_unix_ms, first: false },
            JoinVerdict::Refused(refusal) => Applied::JoinRefused { txn_id, refusal },
            JoinVerdict::Joinable { deadline_unix_ms, .. } => {
                if let Some(begun) = self.begun.get_mut(&txn_id) {
                    begun.joined.push(participant.clone());
                }
                Applied::Joined { deadline_unix_ms, first: true }
            }
        }
    }

    /// What a Join entry of `participant` for `txn_id`, proposed at
    /// `now_unix_ms`, is applied as in this state (docs/PROTOCOL.md §12.3).
    /// The leader asks it first, to answer a repeat or refuse without a log entry.
    pub fn join_verdict(&self, now_unix_ms: u64, txn_id: TxnId, participant: &ParticipantId) -> JoinVerdict {
        if let Some(record) = self.txns.get(&txn_id) {
            // A participant the decided record names already is part of the
            // txn (its Join was applied before the decision, and this is a
            // retry): it must carry out the record's decision, never abort on
            // its own (I1, I5).
            if record.names(participant) {
                return JoinVerdict::Named {
                    deadline_unix_ms: record.deadline_unix_ms.unwrap_or(record.decided_unix_ms),
                };
            }
            return JoinVerdict::Refused(JoinRefusal::Decided(record.decision));
        }
        let Some(begun) = self.begun.get(&txn_id) else {
            let forgotten = self.may_have_forgotten(&txn_id);
            return JoinVerdict::Refused(if forgotten { JoinRefusal::Forgotten } else { JoinRefusal::Unknown });
        };
        if begun.joined.contains(participant) {
            return JoinVerdict::Named { deadline_unix_ms: begun.deadline_unix_ms };
        }
        // By the entry's proposer time, so every replica agrees (§7.3).
        if begun.is_expired(now_unix_ms) {
            return JoinVerdict::Refused(JoinRefusal::PastDeadline);
        }
        if begun.joined.len() >= JOINED_BRANCHES_MAX {
            return JoinVerdict::Refused(JoinRefusal::TooManyBranches);
        }
        JoinVerdict::Joinable { deadline_unix_ms: begun.deadline_unix_ms, joined: begun.joined.len() }
    }

    /// `owner`: the log index of the Staged entry whose proposer logs this
    /// Abort (a [`Command::AbortStaged`]).
    fn decide(&mut self, index: u64, now: u64, cmd: &DecideCmd, owner: Option<u64>) -> Applied {
        // I2: the first decision entry for a txn id wins; later ones are ignored.
        if let Some(record) = self.txns.get(&cmd.txn_id) {
            return Applied::Decided { record: record.clone(), first: false };
        }
        if let Some(begun) = self.begun.remove(&cmd.txn_id) {
            self.begun_by_deadline.remove(&(begun.deadline_unix_ms, begun.txn_id));
            return self.decide_begun(index, now, cmd, begun);
        }
        if let Some(staged) = self.staged.get(&cmd.txn_id) {
            // No horizon or future check: the Staged entry passed them.
            let owned = owner == Some(staged.staged_log_index);
            return self.decide_staged(index, now, cmd, staged.clone(), owned);
        }
        // Decided here, from the entry and the applied state alone, so no
        // proposer (a leader whose clock is behind, a Resolve, an operator)
        // can give a forgotten txn a second, contradicting outcome (§7.2).
        let unchecked = |name| crate::failpoint::fired(name, || cmd.txn_id.to_string());
        if self.may_have_forgotten(&cmd.txn_id) && !unchecked(crate::failpoint::FORGOTTEN_UNCHECKED) {
            return Applied::DecideRefused { txn_id: cmd.txn_id, refusal: DecideRefusal::Forgotten };
        }
        if cmd.txn_id.created_unix_ms() > now.saturating_add(TXN_ID_AHEAD_OF_PROPOSER_MAX_MS)
            && !unchecked(crate::failpoint::FUTURE_IDS_UNCHECKED)
        {
            return Applied::DecideRefused { txn_id: cmd.txn_id, refusal: DecideRefusal::FromTheFuture };
        }
        self.record_first(one_shot_record(cmd, index, now))
    }

    /// The first decision of a begun txn (docs/PROTOCOL.md §12.4). No horizon
    /// or future check: the begun record proves the log still knows the txn.
    /// Its branches are fixed here, from the log alone: the entry's one-shot
    /// branches and every branch joined before it (each voted YES by joining);
    /// a Join applied later is refused, so no joined branch is missed (I1).
    fn decide_begun(&mut self, index: u64, now: u64, cmd: &DecideCmd, begun: BegunTxn) -> Applied {
        let mut branches: Vec<BranchRecord> = Vec::with_capacity(cmd.branches.len() + begun.joined.len());
        for (participant, vote) in &cmd.branches {
            if branches.iter().any(|b| &b.participant == participant) {
                continue;
            }
            let joined = begun.joined.contains(participant);
            branches.push(BranchRecord {
                participant: participant.clone(),
                vote: vote.clone(),
                // A branch that also joined holds a prepared branch whatever
                // its one-shot vote says: it must be told the decision.
                acknowledged: !joined && matches!(vote, Some(Vote::No { .. })),
                joined,
                payload_digest: None,
            });
        }
        let expired = begun.is_expired(now);
        for participant in begun.joined {
            if !branches.iter().any(|b| b.participant == participant) {
                branches.push(BranchRecord {
                    participant,
                    vote: Some(Vote::Yes),
                    acknowledged: false,
                    joined: true,
                    payload_digest: None,
                });
            }
        }
        // The deadline binds by the log: a Commit proposed at or after it
        // loses to the timeout whoever proposed it.
        let (decision, reason) = if cmd.decision == Decision::Commit && expired {
            (Decision::Abort, TIMED_OUT_REASON.to_owned())
        } else {
            (cmd.decision, cmd.reason.clone())
        };
        self.record_first(TxnRecord {
            txn_id: cmd.txn_id,
            decision,
            reason,
            branches,
            decided_unix_ms: now,
            decision_log_index: index,
            finished_unix_ms: None,
            deadline_unix_ms: Some(begun.deadline_unix_ms),
        })
    }

    /// The first decision of a staged txn (docs/PROTOCOL.md §13.1). A staged
    /// txn is decided by its votes: the entry must name exactly the Staged
    /// entry's participants, and give Commit only with every vote YES, Abort
    /// only with a NO among them, or from the txn's owner (`owned`: the
    /// proposer of its Staged entry, the only one that answers Commit before
    /// the Decide entry, and which never did for this txn). Anything else (a
    /// presumed abort, an operator's decision, another driver's Abort for a
    /// vote that never came) is refused: the owner may have answered Commit
    /// on every participant's YES, and only a NO, which no participant ever
    /// turns into a YES, rules that out.
    fn decide_staged(&mut self, index: u64, now: u64, cmd: &DecideCmd, staged: StagedTxn, owned: bool) -> Applied {
        let named: Vec<ParticipantId> = cmd.branches.iter().map(|(p, _)| p.clone()).collect();
        if !cmd.branches.is_empty() && !same_participants(&named, &staged.participants) {
            return Applied::DecideRefused { txn_id: cmd.txn_id, refusal: DecideRefusal::OtherBranches };
        }
        let votes = cmd.branches.iter().map(|(_, vote)| vote);
        let decided_by_votes = match cmd.decision {
            Decision::Commit => !cmd.branches.is_empty() && votes.clone().all(|v| matches!(v, Some(Vote::Yes))),
            Decision::Abort => owned || votes.clone().any(|v| matches!(v, Some(Vote::No { .. }))),
        };
        if !decided_by_votes {
            return Applied::DecideRefused { txn_id: cmd.txn_id, refusal: DecideRefusal::Staged };
        }
        self.staged.remove(&cmd.txn_id);
        let mut record = one_shot_record(cmd, index, now);
        // The record says whose payloads it decided (§13.1).
        for branch in &mut record.branches {
            let position = staged.participants.iter().position(|p| *p == branch.participant);
            branch.payload_digest = position.and_then(|i| staged.payload_digests.get(i).copied());
        }
        self.record_first(record)
    }

    /// Stores a txn's first decision (I2).
    fn record_first(&mut self, mut record: TxnRecord) -> Applied {
        if record.branches.iter().all(|b| b.acknowledged) {
            record.finished_unix_ms = Some(record.decided_unix_ms);
        } else {
            self.unacknowledged.insert(record.txn_id);
        }
        self.txns.insert(record.txn_id, record.clone());
        Applied::Decided { record, first: true }
    }

    fn acknowledge(&mut self, now: u64, acks: &[(TxnId, ParticipantId)]) -> Applied {
        let mut finished = 0;
        for (txn_id, participant) in acks {
            let Some(record) = self.txns.get_mut(txn_id) else {
                continue;
            };
            for branch in record.branches.iter_mut().filter(|b| &b.participant == participant) {
                branch.acknowledged = true;
            }
            if record.finished_unix_ms.is_none() && record.branches.iter().all(|b| b.acknowledged) {
                record.finished_unix_ms = Some(now);
                self.unacknowledged.remove(txn_id);
                finished += 1;
            }
        }
        Applied::Acknowledged { finished }
    }

    fn forget(&mut self, horizon_unix_ms: u64) -> Applied {
        let doomed: Vec<TxnId> = self.forgettable(horizon_unix_ms).map(|r| r.txn_id).collect();
        for txn_id in &doomed {
            self.txns.remove(txn_id);
        }
        self.forgotten_before_unix_ms = self.forgotten_before_unix_ms.max(horizon_unix_ms);
        Applied::Forgotten { removed: doomed.len() }
    }

    /// Whether a txn with this id may have been decided and then forgotten
    /// (created before a horizon the log has applied): such an id must never
    /// be run again, whatever the local clock says (docs/PROTOCOL.md §7.2).
    pub fn may_have_forgotten(&self, txn_id: &TxnId) -> bool {
        txn_id.created_unix_ms() < self.forgotten_before_unix_ms
    }

    /// Finished records a `Forget` with this horizon removes. Ids sort by
    /// creation time, so the scan ends at the first id not past the horizon,
    /// and an unfinished txn only keeps itself, never the ones after it.
    fn forgettable(&self, horizon_unix_ms: u64) -> impl Iterator<Item = &TxnRecord> {
        self.txns
            .values()
            .take_while(move |r| r.txn_id.created_unix_ms() < horizon_unix_ms)
            .filter(|r| r.is_finished() && !r.is_branchless_commit())
    }

    /// Whether a [`Command::Forget`] with this horizon would remove anything.
    pub fn has_forgettable(&self, horizon_unix_ms: u64) -> bool {
        self.forgettable(horizon_unix_ms).next().is_some()
    }

    /// How many decided txns wait for acknowledgements.
    pub fn unacknowledged_count(&self) -> usize {
        self.unacknowledged.len()
    }

    /// Records a coordinator member's address (applied with its conf change).
    pub fn set_member(&mut self, id: u64, addr: String) {
        self.members.insert(id, addr);
    }

    /// Forgets a removed coordinator member.
    pub fn remove_member(&mut self, id: u64) {
        self.members.remove(&id);
    }

    /// Coordinator members and their addresses.
    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    /// What the log says about a txn.
    pub fn txn(&self, txn_id: &TxnId) -> Option<&TxnRecord> {
        self.txns.get(txn_id)
    }

    /// How many txn records are held.
    pub fn txn_count(&self) -> usize {
        self.txns.len()
    }

    /// Decided txns not yet acknowledged by every branch, oldest first.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &TxnRecord> {
        self.unacknowledged.iter().filter_map(|id| self.txns.get(id))
    }

    /// A page of txns in id (creation) order after `after`, created before
    /// `created_before_unix_ms`.
    pub fn list(
        &self,
        filter: ListFilter,
        created_before_unix_ms: u64,
        after: Option<TxnId>,
        limit: usize,
    ) -> Vec<&TxnRecord> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let ids: Box<dyn Iterator<Item = &TxnId>> = match filter {
            ListFilter::All => Box::new(self.txns.range((start, Bound::Unbounded)).map(|(id, _)| id)),
            ListFilter::Unacknowledged => Box::new(self.unacknowledged.range((start, Bound::Unbounded))),
        };
        ids.take_while(|id| id.created_unix_ms() < created_before_unix_ms)
            .filter_map(|id| self.txns.get(id))
            .take(limit)
            .collect()
    }

    /// A begun, undecided txn.
    pub fn begun(&self, txn_id: &TxnId) -> Option<&BegunTxn> {
        self.begun.get(txn_id)
    }

    /// A staged, undecided txn (docs/PROTOCOL.md §13).
    pub fn staged(&self, txn_id: &TxnId) -> Option<&StagedTxn> {
        self.staged.get(txn_id)
    }

    /// How many txns are staged and undecided.
    pub fn staged_count(&self) -> usize {
        self.staged.len()
    }

    /// Up to `max` staged, undecided txns not in `skip`, in id order from
    /// just after `after` and round to the start: those a leader settles by
    /// status recovery (§13.3), each scan going on where the last stopped.
    pub fn staged_txns(&self, max: usize, after: Option<TxnId>, skip: impl Fn(&TxnId) -> bool) -> Vec<StagedTxn> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let from_cursor = self.staged.range((start, Bound::Unbounded));
        let wrapped = self.staged.range((Bound::Unbounded, after.map_or(Bound::Unbounded, Bound::Included)));
        let wrapped = wrapped.take_while(move |_| after.is_some());
        from_cursor.chain(wrapped).map(|(_, s)| s).filter(|s| !skip(&s.txn_id)).take(max).cloned().collect()
    }

    /// Staged txns in id order after `after`, created before the given time, at most `limit`.
    pub fn list_staged(&self, created_before_unix_ms: u64, after: Option<TxnId>, limit: usize) -> Vec<&StagedTxn> {
        page(&self.staged, created_before_unix_ms, after, limit)
    }

    /// Whether a txn is begun and undecided (one map lookup: Submit's check).
    pub fn is_begun(&self, txn_id: &TxnId) -> bool {
        self.begun.contains_key(txn_id)
    }

    /// How many txns are begun and undecided.
    pub fn begun_count(&self) -> usize {
        self.begun.len()
    }

    /// Up to `max` begun txns whose deadline is at or before `now_unix_ms`,
    /// earliest deadline first (the leader's timeout scan, §12.5).
    pub fn expired_begun(&self, now_unix_ms: u64, max: usize) -> Vec<TxnId> {
        self.begun_by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now_unix_ms)
            .take(max)
            .map(|(_, id)| *id)
            .collect()
    }

    /// A page of begun txns in id (creation) order after `after`, created
    /// before `created_before_unix_ms`.
    pub fn list_begun(&self, created_before_unix_ms: u64, after: Option<TxnId>, limit: usize) -> Vec<&BegunTxn> {
        page(&self.begun, created_before_unix_ms, after, limit)
    }

    /// A participant's registered address.
    pub fn participant_addr(&self, name: &ParticipantId) -> Option<&str> {
        self.participants.get(name).map(String::as_str)
    }

    /// The participant registry.
    pub fn participants(&self) -> &BTreeMap<ParticipantId, String> {
        &self.participants
    }

    /// Serializes the whole state for a raft snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        let snap = wire::Snapshot {
            applied_index: self.applied_index,
            txns: self.txns.values().map(wire::Txn::from).collect(),
            participants: self
                .participants
                .iter()
                .map(|(name, addr)| crate::command::wire::Participant { name: name.to_string(), addr: addr.clone() })
                .collect(),
            members: self.members.iter().map(|(id, addr)| wire::Member { id: *id, addr: addr.clone() }).collect(),
            forgotten_before_unix_ms: self.forgotten_before_unix_ms,
            begun: self.begun.values().map(wire::Begun::from).collect(),
            staged: self.staged.values().map(wire::Staged::from).collect(),
        };
        snap.encode_to_vec()
    }

    /// Rebuilds the state from [`StateMachine::to_snapshot`]'s bytes.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the bytes are not a valid snapshot.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self> {
        let snap = wire::Snapshot::decode(bytes).map_err(|e| Error::Corrupt(format!("snapshot: {e}")))?;
        let mut sm = Self {
            applied_index: snap.applied_index,
            forgotten_before_unix_ms: snap.forgotten_before_unix_ms,
            ..Self::default()
        };
        for txn in snap.txns {
            let record = TxnRecord::try_from(txn)?;
            // A snapshot we wrote holds each txn once; two records of one txn
            // (bad bytes that still parse) must not merge into a third state.
            if sm.txns.contains_key(&record.txn_id) {
                return Err(Error::Corrupt(format!("snapshot: txn {} recorded twice", record.txn_id)));
            }
            if !record.is_finished() {
                sm.unacknowledged.insert(record.txn_id);
            }
            sm.txns.insert(record.txn_id, record);
        }
        for begun in snap.begun {
            let begun = BegunTxn::try_from(begun)?;
            // A txn is begun or decided, never both, and begun once.
            if sm.txns.contains_key(&begun.txn_id) || sm.begun.contains_key(&begun.txn_id) {
                return Err(Error::Corrupt(format!(
                    "snapshot: txn {} is begun twice or begun and decided",
                    begun.txn_id
                )));
            }
            sm.begun_by_deadline.insert((begun.deadline_unix_ms, begun.txn_id));
            sm.begun.insert(begun.txn_id, begun);
        }
        for staged in snap.staged {
            let staged = StagedTxn::try_from(staged)?;
            let id = staged.txn_id;
            if sm.txns.contains_key(&id) || sm.begun.contains_key(&id) || sm.staged.contains_key(&id) {
                return Err(Error::Corrupt(format!(
                    "snapshot: txn {id} is staged twice, or staged and begun or decided"
                )));
            }
            sm.staged.insert(id, staged);
        }
        for p in snap.participants {
            sm.participants.insert(participant_from_wire(&p.name)?, p.addr);
        }
        sm.members = snap.members.into_iter().map(|m| (m.id, m.addr)).collect();
        Ok(sm)
    }
}

mod wire {
    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    pub struct Snapshot {
        #[prost(uint64, tag = "1")]
        pub applied_index: u64,
        #[prost(message, repeated, tag = "2")]
        pub txns: Vec<Txn>,
        #[prost(message, repeated, tag = "3")]
        pub participants: Vec<crate::command::wire::Participant>,
        #[prost(message, repeated, tag = "4")]
        pub members: Vec<Member>,
        #[prost(uint64, tag = "5")]
        pub forgotten_before_unix_ms: u64,
        #[prost(message, repeated, tag = "6")]
        pub begun: Vec<Begun>,
        #[prost(message, repeated, tag = "7")]
        pub staged: Vec<Staged>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Staged {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(string, repeated, tag = "2")]
        pub participants: Vec<String>,
        #[prost(uint64, tag = "3")]
        pub deadline_unix_ms: u64,
        #[prost(uint64, tag = "4")]
        pub staged_unix_ms: u64,
        #[prost(uint64, tag = "5")]
        pub staged_log_index: u64,
        #[prost(bytes = "vec", repeated, tag = "6")]
        pub payload_digests: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Begun {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(uint64, tag = "2")]
        pub deadline_unix_ms: u64,
        #[prost(uint64, tag = "3")]
        pub begun_unix_ms: u64,
        #[prost(uint64, tag = "4")]
        pub begun_log_index: u64,
        #[prost(string, repeated, tag = "5")]
        pub joined: Vec<String>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Txn {
        #[prost(bytes = "vec", tag = "1")]
        pub txn_id: Vec<u8>,
        #[prost(int32, tag = "2")]
        pub decision: i32,
        #[prost(string, tag = "3")]
        pub reason: String,
        #[prost(message, repeated, tag = "4")]
        pub branches: Vec<Branch>,
        #[prost(uint64, tag = "5")]
        pub decided_unix_ms: u64,
        #[prost(uint64, tag = "6")]
        pub decision_log_index: u64,
        #[prost(uint64, optional, tag = "7")]
        pub finished_unix_ms: Option<u64>,
        #[prost(uint64, optional, tag = "8")]
        pub deadline_unix_ms: Option<u64>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Branch {
        #[prost(string, tag = "1")]
        pub participant: String,
        #[prost(int32, tag = "2")]
        pub vote: i32,
        #[prost(string, tag = "3")]
        pub reason: String,
        #[prost(bool, tag = "4")]
        pub acknowledged: bool,
        #[prost(bool, tag = "5")]
        pub joined: bool,
        #[prost(bytes = "vec", tag = "6")]
        pub payload_digest: Vec<u8>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct Member {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(string, tag = "2")]
        pub addr: String,
    }
}

impl From<&TxnRecord> for wire::Txn {
    fn from(r: &TxnRecord) -> Self {
        Self {
            txn_id: r.txn_id.to_bytes().to_vec(),
            decision: r.decision.into(),
            reason: r.reason.clone(),
            branches: r
                .branches
                .iter()
                .map(|b| {
                    let (vote, reason) = vote_to_wire(b.vote.as_ref());
                    wire::Branch {
                        participant: b.participant.to_string(),
                        vote,
                        reason,
                        acknowledged: b.acknowledged,
                        joined: b.joined,
                        payload_digest: b.payload_digest.map(|d| d.as_bytes().to_vec()).unwrap_or_default(),
                    }
                })
                .collect(),
            decided_unix_ms: r.decided_unix_ms,
            decision_log_index: r.decision_log_index,
            finished_unix_ms: r.finished_unix_ms,
            deadline_unix_ms: r.deadline_unix_ms,
        }
    }
}

impl From<&BegunTxn> for wire::Begun {
    fn from(b: &BegunTxn) -> Self {
        Self {
            txn_id: b.txn_id.to_bytes().to_vec(),
            deadline_unix_ms: b.deadline_unix_ms,
            begun_unix_ms: b.begun_unix_ms,
            begun_log_index: b.begun_log_index,
            joined: b.joined.iter().map(ToString::to_string).collect(),
        }
    }
}

impl From<&StagedTxn> for wire::Staged {
    fn from(s: &StagedTxn) -> Self {
        Self {
            txn_id: s.txn_id.to_bytes().to_vec(),
            participants: s.participants.iter().map(ToString::to_string).collect(),
            deadline_unix_ms: s.deadline_unix_ms,
            staged_unix_ms: s.staged_unix_ms,
            staged_log_index: s.staged_log_index,
            payload_digests: digests_to_wire(&s.payload_digests),
        }
    }
}

impl TryFrom<wire::Staged> for StagedTxn {
    type Error = Error;

    fn try_from(s: wire::Staged) -> Result<Self> {
        Ok(Self {
            txn_id: txn_id_from_wire(&s.txn_id)?,
            participants: s.participants.iter().map(|p| participant_from_wire(p)).collect::<Result<_>>()?,
            payload_digests: digests_from_wire(&s.payload_digests, s.participants.len())?,
            deadline_unix_ms: s.deadline_unix_ms,
            staged_unix_ms: s.staged_unix_ms,
            staged_log_index: s.staged_log_index,
        })
    }
}

impl TryFrom<wire::Begun> for BegunTxn {
    type Error = Error;

    fn try_from(b: wire::Begun) -> Result<Self> {
        let txn_id = txn_id_from_wire(&b.txn_id)?;
        let joined: Vec<ParticipantId> = b.joined.iter().map(|p| participant_from_wire(p)).collect::<Result<_>>()?;
        // The log joins a participant once and at most JOINED_BRANCHES_MAX.
        let distinct: BTreeSet<&ParticipantId> = joined.iter().collect();
        if distinct.len() != joined.len() || joined.len() > JOINED_BRANCHES_MAX {
            return Err(Error::Corrupt(format!("snapshot: begun txn {txn_id} has a bad joined list")));
        }
        Ok(Self {
            txn_id,
            deadline_unix_ms: b.deadline_unix_ms,
            begun_unix_ms: b.begun_unix_ms,
            begun_log_index: b.begun_log_index,
            joined,
        })
    }
}

impl TryFrom<wire::Txn> for TxnRecord {
    type Error = Error;

    fn try_from(t: wire::Txn) -> Result<Self> {
        Ok(Self {
            txn_id: txn_id_from_wire(&t.txn_id)?,
            decision: decision_from_wire(t.decision)?,
            reason: t.reason,
            branches: t
                .branches
                .into_iter()
                .map(|b| {
                    Ok(BranchRecord {
                        participant: participant_from_wire(&b.participant)?,
                        vote: vote_from_wire(b.vote, &b.reason)?,
                        acknowledged: b.acknowledged,
                        joined: b.joined,
                        payload_digest: (!b.payload_digest.is_empty())
                            .then(|| digest_from_wire(&b.payload_digest))
                            .transpose()?,
                    })
                })
                .collect::<Result<_>>()?,
            decided_unix_ms: t.decided_unix_ms,
            decision_log_index: t.decision_log_index,
            finished_unix_ms: t.finished_unix_ms,
            deadline_unix_ms: t.deadline_unix_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use twopc_proto::txn_id::unix_now_ms;

    use super::*;

    fn pid(s: &str) -> ParticipantId {
        s.parse().expect("valid name")
    }

    fn decide(txn_id: TxnId, decision: Decision, branches: &[&str]) -> Proposal {
        Proposal {
            command: Command::Decide(DecideCmd {
                txn_id,
                decision,
                reason: String::new(),
                branches: branches.iter().map(|b| (pid(b), Some(Vote::Yes))).collect(),
                payload_digests: Vec::new(),
            }),
            proposed_unix_ms: unix_now_ms(),
        }
    }

    fn decide_at(txn_id: TxnId, proposed_unix_ms: u64) -> Proposal {
        Proposal { proposed_unix_ms, ..decide(txn_id, Decision::Abort, &[]) }
    }

    // I2 across a retention horizon, by the log alone: once a Forget is applied, no entry (a
    // Resolve's presumed abort, an operator's decision, a leader whose clock is behind) can give
    // an id created before its horizon a first decision, so a forgotten Commit cannot become an
    // Abort. The refusal changes nothing, and a decision logged before the horizon still answers.
    #[test]
    fn no_first_decision_is_recorded_for_an_id_below_the_forget_horizon() {
        let mut sm = StateMachine::default();
        let kept = TxnId::new();
        sm.apply(1, &decide(kept, Decision::Commit, &["a"]));
        let forgotten = TxnId::created_at(kept.created_unix_ms() - 10);
        let horizon = kept.created_unix_ms();
        sm.apply(2, &Proposal { command: Command::Forget { horizon_unix_ms: horizon }, proposed_unix_ms: horizon });
        let before = sm.clone();
        let refused = sm.apply(3, &decide(forgotten, Decision::Abort, &[]));
        assert_eq!(refused, Applied::DecideRefused { txn_id: forgotten, refusal: DecideRefusal::Forgotten });
        assert!(sm.txn(&forgotten).is_none());
        assert_eq!(StateMachine { applied_index: 2, ..sm.clone() }, before, "a refused entry changes nothing");
        let again = sm.apply(4, &decide(kept, Decision::Abort, &[]));
        assert!(matches!(again, Applied::Decided { first: false, ref record } if record.decision == Decision::Commit));
    }

    // I6: one record cannot hold up retention GC. An unacknowledged txn stays (its decision must
    // still be delivered), but the finished txns created after it, and before the horizon, go.
    #[test]
    fn an_unacknowledged_txn_keeps_only_itself_from_being_forgotten() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let (stuck, done, young) = (TxnId::created_at(now - 30), TxnId::created_at(now - 20), TxnId::created_at(now));
        sm.apply(1, &decide(stuck, Decision::Commit, &["a"]));
        sm.apply(2, &decide(done, Decision::Commit, &["a"]));
        sm.apply(3, &decide(young, Decision::Commit, &["a"]));
        let acks = Command::Acknowledge(vec![(done, pid("a")), (young, pid("a"))]);
        sm.apply(4, &Proposal { command: acks, proposed_unix_ms: now });
        let horizon = now - 10;
        assert!(sm.has_forgettable(horizon));
        let forgot =
            sm.apply(5, &Proposal { command: Command::Forget { horizon_unix_ms: horizon }, proposed_unix_ms: now });
        assert_eq!(forgot, Applied::Forgotten { removed: 1 });
        assert!(sm.txn(&stuck).is_some() && sm.txn(&done).is_none() && sm.txn(&young).is_some());
    }

    // I1 across retention (§7.2): a forgotten txn's in-doubt branch may be aborted by its
    // participant only because retention never forgets a Commit that names no branch (an
    // operator's forced Commit); branchless Aborts (presumed aborts) and finished txns go.
    #[test]
    fn retention_keeps_an_operators_branchless_commit() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let (forced, presumed) = (TxnId::created_at(now - 30), TxnId::created_at(now - 20));
        sm.apply(1, &decide(forced, Decision::Commit, &[]));
        sm.apply(2, &decide(presumed, Decision::Abort, &[]));
        let forget = Proposal { command: Command::Forget { horizon_unix_ms: now }, proposed_unix_ms: now };
        assert_eq!(sm.apply(3, &forget), Applied::Forgotten { removed: 1 });
        assert!(sm.txn(&forced).is_some(), "the forced Commit is kept");
        assert!(sm.txn(&presumed).is_none(), "the presumed abort is forgotten");
        assert!(!sm.has_forgettable(now));
    }

    // I6: a Decide entry for an id created more than TXN_ID_AHEAD_OF_PROPOSER_MAX_MS after its
    // proposer's clock is refused at apply, judged from the entry alone (so every replica agrees),
    // and leaves no record that no retention horizon would ever reach; up to the limit it is kept.
    #[test]
    fn a_decide_for_an_id_from_the_future_is_refused_and_leaves_no_record() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let far = TxnId::created_at(now + TXN_ID_AHEAD_OF_PROPOSER_MAX_MS + 1);
        let refused = sm.apply(1, &decide_at(far, now));
        assert_eq!(refused, Applied::DecideRefused { txn_id: far, refusal: DecideRefusal::FromTheFuture });
        assert_eq!(sm.txn_count(), 0);
        let near = TxnId::created_at(now + TXN_ID_AHEAD_OF_PROPOSER_MAX_MS);
        assert!(matches!(sm.apply(2, &decide_at(near, now)), Applied::Decided { first: true, .. }));
    }

    #[test]
    fn i2_first_decision_wins_and_later_ones_change_nothing() {
        let mut sm = StateMachine::default();
        let txn = TxnId::new();
        let first = sm.apply(1, &decide(txn, Decision::Commit, &["a", "b"]));
        assert!(matches!(first, Applied::Decided { first: true, ref record } if record.decision == Decision::Commit));
        let second = sm.apply(2, &decide(txn, Decision::Abort, &[]));
        assert!(matches!(second, Applied::Decided { first: false, ref record } if record.decision == Decision::Commit));
        assert_eq!(sm.txn(&txn).map(|r| r.decision_log_index), Some(1));
    }

    #[test]
    fn acknowledgements_finish_a_txn_and_forget_removes_only_finished_old_ones() {
        let mut sm = StateMachine::default();
        let done = TxnId::new();
        let pending = TxnId::new();
        sm.apply(1, &decide(done, Decision::Commit, &["a", "b"]));
        sm.apply(2, &decide(pending, Decision::Commit, &["a"]));
        let acks = Command::Acknowledge(vec![(done, pid("a")), (done, pid("b"))]);
        let applied = sm.apply(3, &Proposal { command: acks, proposed_unix_ms: 5 });
        assert_eq!(applied, Applied::Acknowledged { finished: 1 });
        assert_eq!(sm.unacknowledged().map(|r| r.txn_id).collect::<Vec<_>>(), vec![pending]);
        let horizon = pending.created_unix_ms() + 1;
        let forgot =
            sm.apply(4, &Proposal { command: Command::Forget { horizon_unix_ms: horizon }, proposed_unix_ms: 6 });
        assert_eq!(forgot, Applied::Forgotten { removed: 1 });
        assert!(sm.txn(&done).is_none());
        assert!(sm.txn(&pending).is_some(), "an unacknowledged txn is never forgotten");
    }

    // I2 across a retention horizon: once a Forget is applied, every id created before its
    // horizon counts as possibly forgotten (a Submit for it is refused), by the log alone, and
    // the horizon survives a snapshot.
    #[test]
    fn a_forget_horizon_marks_every_older_id_as_possibly_forgotten() {
        let mut sm = StateMachine::default();
        let older = TxnId::new();
        assert!(!sm.may_have_forgotten(&older));
        let horizon = older.created_unix_ms() + 1;
        sm.apply(1, &Proposal { command: Command::Forget { horizon_unix_ms: horizon }, proposed_unix_ms: 2 });
        assert!(sm.may_have_forgotten(&older));
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("snapshot");
        assert!(restored.may_have_forgotten(&older));
        let lower = horizon - 1;
        sm.apply(2, &Proposal { command: Command::Forget { horizon_unix_ms: lower }, proposed_unix_ms: 3 });
        assert!(sm.may_have_forgotten(&older), "a later, lower horizon never lowers it");
    }

    fn at(command: Command, proposed_unix_ms: u64) -> Proposal {
        Proposal { command, proposed_unix_ms }
    }

    fn begin(txn_id: TxnId, deadline_unix_ms: u64, now: u64) -> Proposal {
        at(Command::Begin { txn_id, deadline_unix_ms }, now)
    }

    fn join(txn_id: TxnId, participant: &str, now: u64) -> Proposal {
        at(Command::Join { txn_id, participant: pid(participant) }, now)
    }

    fn decide_with(txn_id: TxnId, decision: Decision, one_shot: &[(&str, Option<Vote>)], now: u64) -> Proposal {
        let branches = one_shot.iter().map(|(p, v)| (pid(p), v.clone())).collect();
        at(
            Command::Decide(DecideCmd {
                txn_id,
                decision,
                reason: String::new(),
                branches,
                payload_digests: Vec::new(),
            }),
            now,
        )
    }

    fn record(applied: Applied) -> TxnRecord {
        match applied {
            Applied::Decided { record, first: true } => record,
            other => panic!("expected a first decision, got {other:?}"),
        }
    }

    // §12.1, I5: the first Begin wins; a repeat (another deadline) answers the logged one.
    #[test]
    fn the_first_begin_wins_and_a_repeat_answers_its_deadline() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now);
        let first = sm.apply(1, &begin(txn, now + 1000, now));
        assert!(matches!(first, Applied::Begun { first: true, ref begun } if begun.deadline_unix_ms == now + 1000));
        let again = sm.apply(2, &begin(txn, now + 5000, now + 1));
        let Applied::Begun { begun, first: false } = again else { panic!("{again:?}") };
        assert_eq!((begun.deadline_unix_ms, begun.begun_log_index, begun.begun_unix_ms), (now + 1000, 1, now));
        assert_eq!(sm.begun_count(), 1);
    }

    // §12.1: a txn the log decided (a presumed abort got there first, a Submit used the id), an id
    // below the retention horizon, or one from the future is never begun, and the entry changes nothing.
    #[test]
    fn a_begin_is_refused_for_a_decided_forgotten_or_future_txn() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let decided = TxnId::created_at(now);
        sm.apply(1, &decide_at(decided, now));
        let forgotten = TxnId::created_at(now - 100);
        sm.apply(2, &at(Command::Forget { horizon_unix_ms: now - 50 }, now));
        let future = TxnId::created_at(now + TXN_ID_AHEAD_OF_PROPOSER_MAX_MS + 1);
        let before = sm.clone();
        let cases = [
            (decided, BeginRefusal::Decided(Decision::Abort)),
            (forgotten, BeginRefusal::Forgotten),
            (future, BeginRefusal::FromTheFuture),
        ];
        for (index, (txn_id, refusal)) in (3..).zip(cases) {
            assert_eq!(sm.apply(index, &begin(txn_id, now + 1000, now)), Applied::BeginRefused { txn_id, refusal });
        }
        assert_eq!(StateMachine { applied_index: 2, ..sm.clone() }, before, "refused entries change nothing");
    }

    // §5 step 7, §12.4: a one-shot Submit's decision never decides a txn begun after the Submit
    // looked (the Begin applied between its check and its entry), Commit or Abort: the entry is
    // refused and changes nothing, and the begun txn is left to its own client's Commit. For a
    // txn the log holds nothing of, the entry decides as a Decide does.
    #[test]
    fn a_one_shot_decision_never_decides_a_begun_txn() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let (begun, fresh) = (TxnId::created_at(now), TxnId::created_at(now));
        sm.apply(1, &begin(begun, now + 1000, now));
        sm.apply(2, &join(begun, "c", now));
        let before = sm.clone();
        let one_shot = |txn_id, decision| {
            let Command::Decide(cmd) = decide_with(txn_id, decision, &[("a", Some(Vote::Yes))], now).command else {
                unreachable!("decide_with makes a Decide");
            };
            at(Command::DecideOneShot(cmd), now)
        };
        for (index, decision) in (3..).zip([Decision::Commit, Decision::Abort]) {
            let refused = sm.apply(index, &one_shot(begun, decision));
            assert_eq!(refused, Applied::DecideRefused { txn_id: begun, refusal: DecideRefusal::Begun });
        }
        assert_eq!(StateMachine { applied_index: 2, ..sm.clone() }, before, "refused entries change nothing");
        let committed = record(sm.apply(5, &decide_with(begun, Decision::Commit, &[], now)));
        assert_eq!(committed.branches.iter().map(|b| b.participant.as_str()).collect::<Vec<_>>(), ["c"]);
        let decided = record(sm.apply(6, &one_shot(fresh, Decision::Commit)));
        assert_eq!((decided.decision, decided.deadline_unix_ms, decided.branches.len()), (Decision::Commit, None, 1));
        let repeat = sm.apply(7, &one_shot(begun, Decision::Abort));
        assert!(matches!(repeat, Applied::Decided { first: false, ref record } if record.decision == Decision::Commit));
    }

    // §12.3, I5: a Join joins a begun txn once, in log order; a repeat succeeds and changes nothing.
    #[test]
    fn a_join_joins_a_begun_txn_once() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now);
        sm.apply(1, &begin(txn, now + 1000, now));
        assert_eq!(sm.apply(2, &join(txn, "b", now)), Applied::Joined { deadline_unix_ms: now + 1000, first: true });
        assert_eq!(sm.apply(3, &join(txn, "a", now)), Applied::Joined { deadline_unix_ms: now + 1000, first: true });
        assert_eq!(sm.apply(4, &join(txn, "b", now)), Applied::Joined { deadline_unix_ms: now + 1000, first: false });
        assert_eq!(sm.begun(&txn).map(|b| b.joined.clone()), Some(vec![pid("b"), pid("a")]));
    }

    // §12.3: a Join is refused, changing nothing, when the txn is decided without the branch, past
    // its deadline by the entry's proposer time, never begun, or below the retention horizon, and
    // when the txn already holds JOINED_BRANCHES_MAX joined branches (the log's own bound, I6).
    #[test]
    fn a_join_is_refused_with_the_txns_state() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let (decided, expired, full) = (TxnId::created_at(now), TxnId::created_at(now), TxnId::created_at(now));
        sm.apply(1, &decide(decided, Decision::Commit, &["a"]));
        sm.apply(2, &begin(expired, now + 10, now));
        sm.apply(3, &begin(full, now + 1000, now));
        let mut index = 4;
        for i in 0..JOINED_BRANCHES_MAX {
            assert!(matches!(sm.apply(index, &join(full, &format!("p{i}"), now)), Applied::Joined { first: true, .. }));
            index += 1;
        }
        sm.apply(index, &at(Command::Forget { horizon_unix_ms: now - 50 }, now));
        let before = sm.clone();
        let never = TxnId::created_at(now);
        let forgotten = TxnId::created_at(now - 100);
        let cases = [
            (join(decided, "b", now), decided, JoinRefusal::Decided(Decision::Commit), TXN_STATE_DECIDED_COMMIT),
            (join(expired, "b", now + 10), expired, JoinRefusal::PastDeadline, TXN_STATE_TIMED_OUT),
            (join(never, "b", now), never, JoinRefusal::Unknown, TXN_STATE_UNKNOWN),
            (join(forgotten, "b", now), forgotten, JoinRefusal::Forgotten, TXN_STATE_FORGOTTEN),
            (join(full, "one-more", now), full, JoinRefusal::TooManyBranches, TXN_STATE_BEGUN),
        ];
        for (proposal, txn_id, refusal, state) in cases {
            index += 1;
            assert_eq!(sm.apply(index, &proposal), Applied::JoinRefused { txn_id, refusal });
            assert_eq!(refusal.state(), state);
        }
        assert_eq!(StateMachine { applied_index: before.applied_index, ..sm.clone() }, before);
        // Just before the deadline, by the proposer's clock, the branch joins.
        let late = join(expired, "c", now + 9);
        assert!(matches!(sm.apply(index + 1, &late), Applied::Joined { first: true, .. }));
    }

    // I1, I5: a Join retried after the decision, by a participant the record names (its first
    // Join was applied before the Decide), succeeds: refusing it would make the participant abort
    // a branch the record commits.
    #[test]
    fn a_join_retried_after_the_decision_by_a_named_branch_succeeds() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now);
        sm.apply(1, &begin(txn, now + 1000, now));
        sm.apply(2, &join(txn, "a", now));
        sm.apply(3, &decide_with(txn, Decision::Commit, &[], now));
        assert_eq!(sm.apply(4, &join(txn, "a", now)), Applied::Joined { deadline_unix_ms: now + 1000, first: false });
        let refused = sm.apply(5, &join(txn, "b", now));
        assert_eq!(refused, Applied::JoinRefused { txn_id: txn, refusal: JoinRefusal::Decided(Decision::Commit) });
    }

    // §12.4, I1: the decision of a begun txn names the entry's one-shot branches and every branch
    // joined before it (vote YES, joined, to be delivered), each once; the txn leaves the begun table.
    #[test]
    fn the_decision_of_a_begun_txn_names_its_joined_and_one_shot_branches() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now);
        sm.apply(1, &begin(txn, now + 1000, now));
        sm.apply(2, &join(txn, "a", now));
        sm.apply(3, &join(txn, "both", now));
        let one_shot = [("c", Some(Vote::Yes)), ("both", Some(Vote::no("x")))];
        let r = record(sm.apply(4, &decide_with(txn, Decision::Abort, &one_shot, now)));
        let summary: Vec<(String, Option<Vote>, bool, bool)> =
            r.branches.iter().map(|b| (b.participant.to_string(), b.vote.clone(), b.joined, b.acknowledged)).collect();
        assert_eq!(
            summary,
            vec![
                ("c".into(), Some(Vote::Yes), false, false),
                // It joined, so it holds a prepared branch whatever its one-shot vote: Abort is delivered.
                ("both".into(), Some(Vote::no("x")), true, false),
                ("a".into(), Some(Vote::Yes), true, false),
            ]
        );
        assert_eq!(r.deadline_unix_ms, Some(now + 1000));
        assert!(!sm.is_begun(&txn) && sm.expired_begun(u64::MAX, 10).is_empty(), "decided: no longer begun");
        assert_eq!(sm.unacknowledged().count(), 1);
    }

    // §12.4: a Join racing the decision: the record names the branch iff the Join entry was
    // applied first; a Join applied after it is refused (so the participant aborts, I1).
    #[test]
    fn a_join_racing_the_decision_is_named_iff_applied_first() {
        let now = unix_now_ms();
        for join_first in [true, false] {
            let mut sm = StateMachine::default();
            let txn = TxnId::created_at(now);
            sm.apply(1, &begin(txn, now + 1000, now));
            sm.apply(2, &join(txn, "a", now));
            let (commit, late_join) = (decide_with(txn, Decision::Commit, &[], now), join(txn, "b", now));
            let (second, third) = if join_first { (&late_join, &commit) } else { (&commit, &late_join) };
            let applied = [sm.apply(3, second), sm.apply(4, third)];
            let r = sm.txn(&txn).cloned().expect("decided");
            assert_eq!(r.decision, Decision::Commit);
            assert_eq!(r.names(&pid("b")), join_first, "{applied:?}");
            let join_applied = if join_first { &applied[0] } else { &applied[1] };
            assert_eq!(matches!(join_applied, Applied::Joined { .. }), join_first, "{join_applied:?}");
        }
    }

    // §12.4: the deadline binds by the log: a Commit proposed at or after it is applied as Abort
    // ("timed out"); one proposed before it commits.
    #[test]
    fn a_commit_proposed_past_the_deadline_is_applied_as_a_timeout_abort() {
        let now = unix_now_ms();
        for (proposed, expect) in [(now + 999, Decision::Commit), (now + 1000, Decision::Abort)] {
            let mut sm = StateMachine::default();
            let txn = TxnId::created_at(now);
            sm.apply(1, &begin(txn, now + 1000, now));
            sm.apply(2, &join(txn, "a", now));
            let r = record(sm.apply(3, &decide_with(txn, Decision::Commit, &[], proposed)));
            assert_eq!(r.decision, expect);
            let reason = if expect == Decision::Abort { TIMED_OUT_REASON } else { "" };
            assert_eq!(r.reason, reason);
            assert_eq!(r.branches.len(), 1, "the joined branch is told the outcome either way");
        }
    }

    // §12.6: a begun txn is never forgotten while undecided, and its decision is applied even
    // after the horizon passed its id: the begun record proves the log still knows it.
    #[test]
    fn a_begun_txn_outlives_the_horizon_until_decided() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now - 100);
        sm.apply(1, &begin(txn, now, now - 100));
        sm.apply(2, &at(Command::Forget { horizon_unix_ms: now }, now));
        assert!(sm.is_begun(&txn) && sm.may_have_forgotten(&txn));
        let r = record(sm.apply(3, &decide_with(txn, Decision::Abort, &[], now)));
        assert_eq!(r.deadline_unix_ms, Some(now));
    }

    // §7.2, §12.6: an interactive Commit that names no branch is not a branchless (operator's)
    // Commit: retention forgets it, so Begin and empty Commits cannot grow the table for good.
    #[test]
    fn retention_forgets_an_interactive_commit_without_branches() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now - 30);
        sm.apply(1, &begin(txn, now, now - 30));
        let r = record(sm.apply(2, &decide_with(txn, Decision::Commit, &[], now - 20)));
        assert!(r.is_finished() && !r.is_branchless_commit());
        assert_eq!(sm.apply(3, &at(Command::Forget { horizon_unix_ms: now }, now)), Applied::Forgotten { removed: 1 });
    }

    // §12.5: the leader finds expired begun txns from the deadline index, earliest first, bounded.
    #[test]
    fn expired_begun_txns_are_found_by_deadline_and_bounded() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let ids: Vec<TxnId> = (0..4).map(|_| TxnId::created_at(now)).collect();
        for (i, (index, txn)) in (1..).zip(&ids).enumerate() {
            sm.apply(index, &begin(*txn, now + 40 - 10 * i as u64, now));
        }
        assert_eq!(sm.expired_begun(now + 20, 10), vec![ids[3], ids[2]]);
        assert_eq!(sm.expired_begun(now + 40, 1), vec![ids[3]]);
        assert!(sm.expired_begun(now, 10).is_empty());
        assert_eq!(sm.list_begun(u64::MAX, None, 10).len(), 4);
    }

    #[test]
    fn a_snapshot_keeps_begun_txns_their_joins_and_interactive_records() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let (open, done) = (TxnId::created_at(now), TxnId::created_at(now));
        sm.apply(1, &begin(open, now + 1000, now));
        sm.apply(2, &join(open, "a", now));
        sm.apply(3, &begin(done, now + 1000, now));
        sm.apply(4, &join(done, "b", now));
        sm.apply(5, &decide_with(done, Decision::Commit, &[("c", Some(Vote::Yes))], now));
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes");
        assert_eq!(restored, sm);
        assert_eq!(restored.expired_begun(now + 1000, 10), vec![open], "the deadline index is rebuilt");
        let r = restored.txn(&done).expect("kept");
        assert_eq!(r.deadline_unix_ms, Some(now + 1000));
        assert!(r.branches.iter().any(|b| b.participant == pid("b") && b.joined));
    }

    // A snapshot holding a txn both begun and decided (bad bytes that parse) is refused.
    #[test]
    fn a_snapshot_with_a_txn_begun_and_decided_is_corrupt() {
        let mut sm = StateMachine::default();
        let now = unix_now_ms();
        let txn = TxnId::created_at(now);
        sm.apply(1, &begin(txn, now + 1000, now));
        let mut bytes = sm.to_snapshot();
        let mut decided = StateMachine::default();
        decided.apply(1, &decide_at(txn, now));
        bytes.extend(decided.to_snapshot());
        assert!(matches!(StateMachine::from_snapshot(&bytes), Err(Error::Corrupt(_))));
    }

    #[test]
    fn snapshot_round_trips_the_whole_state() {
        let mut sm = StateMachine::new(BTreeMap::from([(1, "127.0.0.1:1".to_owned())]));
        sm.apply(1, &decide(TxnId::new(), Decision::Commit, &["a"]));
        sm.apply(
            2,
            &Proposal {
                command: Command::RegisterParticipant { name: pid("a"), addr: "127.0.0.1:9".into() },
                proposed_unix_ms: 1,
            },
        );
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes");
        assert_eq!(restored, sm);
    }

    fn staged_entry(txn_id: TxnId) -> Proposal {
        Proposal {
            command: Command::Staged(vec![crate::command::StagedCmd {
                txn_id,
                participants: vec![pid("a"), pid("b")],
                payload_digests: vec![PayloadDigest::of(b"a's payload"), PayloadDigest::of(b"b's payload")],
                deadline_unix_ms: u64::MAX,
            }]),
            proposed_unix_ms: unix_now_ms(),
        }
    }

    /// The one result of a one-txn Staged entry.
    fn stage(sm: &mut StateMachine, index: u64, txn_id: TxnId) -> Applied {
        match sm.apply(index, &staged_entry(txn_id)) {
            Applied::Many(mut applied) if applied.len() == 1 => applied.remove(0),
            other => panic!("a one-txn Staged entry was applied as {other:?}"),
        }
    }

    fn decide_votes(txn_id: TxnId, decision: Decision, votes: Vec<(&str, Option<Vote>)>) -> Proposal {
        let branches = votes.into_iter().map(|(p, v)| (pid(p), v)).collect();
        Proposal {
            command: Command::Decide(DecideCmd {
                txn_id,
                decision,
                reason: "r".into(),
                branches,
                payload_digests: Vec::new(),
            }),
            proposed_unix_ms: unix_now_ms(),
        }
    }

    // §13.1: a staged txn is decided by its votes alone. A presumed abort, an
    // operator's decision, an Abort for a vote that never came, a Commit
    // without every YES and a decision naming other branches are refused and
    // change nothing; an Abort with a NO, or a Commit with every YES, decides it.
    // §13.1: a Staged entry for a staged txn id with other payloads (another
    // Submit of the id) is refused; one without digests (logged before them)
    // or with the same payloads in another order repeats it; the staged
    // digests survive a snapshot.
    #[test]
    fn a_staged_entry_with_other_payloads_is_refused() {
        let mut sm = StateMachine::default();
        let txn = TxnId::new();
        assert!(matches!(stage(&mut sm, 1, txn), Applied::Staged { first: true, .. }));
        let entry = |participants: Vec<&str>, payloads: Vec<&[u8]>| Proposal {
            command: Command::Staged(vec![StagedCmd {
                txn_id: txn,
                participants: participants.into_iter().map(pid).collect(),
                payload_digests: payloads.into_iter().map(PayloadDigest::of).collect(),
                deadline_unix_ms: 9,
            }]),
            proposed_unix_ms: 1,
        };
        let one = |applied: Applied| match applied {
            Applied::Many(mut applied) if applied.len() == 1 => applied.remove(0),
            other => panic!("a one-txn Staged entry was applied as {other:?}"),
        };
        let other = entry(vec!["a", "b"], vec![b"a's payload", b"b's other payload"]);
        let refusal = Applied::StagedRefused { txn_id: txn, refusal: StagedRefusal::OtherBranches };
        assert_eq!(one(sm.apply(2, &other)), refusal);
        let reordered = entry(vec!["b", "a"], vec![b"b's payload", b"a's payload"]);
        assert!(matches!(one(sm.apply(3, &reordered)), Applied::Staged { first: false, .. }));
        let undigested = entry(vec!["a", "b"], vec![]);
        assert!(matches!(one(sm.apply(4, &undigested)), Applied::Staged { first: false, .. }));
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes");
        assert_eq!(restored.staged(&txn).map(|s| s.payload_digests.len()), Some(2));
    }

    // §3.1, §5: a one-shot Decide entry's payload digests stay in the record,
    // by branch, and survive a snapshot; an entry without them records none.
    #[test]
    fn a_one_shot_decision_records_each_branch_payload_digest() {
        let mut sm = StateMachine::default();
        let (txn, bare) = (TxnId::new(), TxnId::new());
        let digests = vec![PayloadDigest::of(b"debit"), PayloadDigest::of(b"credit")];
        let mut cmd = DecideCmd {
            txn_id: txn,
            decision: Decision::Commit,
            reason: String::new(),
            branches: vec![(pid("a"), Some(Vote::Yes)), (pid("b"), Some(Vote::Yes))],
            payload_digests: digests.clone(),
        };
        sm.apply(1, &Proposal { command: Command::Decide(cmd.clone()), proposed_unix_ms: unix_now_ms() });
        cmd.txn_id = bare;
        cmd.payload_digests.clear();
        sm.apply(2, &Proposal { command: Command::Decide(cmd), proposed_unix_ms: unix_now_ms() });
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes");
        for sm in [&sm, &restored] {
            let recorded = |id| sm.txn(id).map(|r| r.branches.iter().map(|b| b.payload_digest).collect::<Vec<_>>());
            assert_eq!(recorded(&txn), Some(digests.iter().copied().map(Some).collect()));
            assert_eq!(recorded(&bare), Some(vec![None, None]));
        }
    }

    #[test]
    fn a_staged_txn_is_decided_only_by_its_votes() {
        let mut sm = StateMachine::default();
        let txn = TxnId::new();
        assert!(matches!(stage(&mut sm, 1, txn), Applied::Staged { first: true, .. }));
        assert!(matches!(stage(&mut sm, 2, txn), Applied::Staged { first: false, .. }));
        let refused = |refusal| Applied::DecideRefused { txn_id: txn, refusal };
        let staged = DecideRefusal::Staged;
        assert_eq!(sm.apply(3, &decide_votes(txn, Decision::Abort, vec![])), refused(staged));
        assert_eq!(sm.apply(4, &decide_votes(txn, Decision::Commit, vec![])), refused(staged));
        let missing = vec![("a", Some(Vote::Yes)), ("b", None)];
        assert_eq!(sm.apply(5, &decide_votes(txn, Decision::Abort, missing.clone())), refused(staged));
        assert_eq!(sm.apply(6, &decide_votes(txn, Decision::Commit, missing)), refused(staged));
        let other = vec![("a", Some(Vote::Yes)), ("c", Some(Vote::Yes))];
        assert_eq!(sm.apply(7, &decide_votes(txn, Decision::Commit, other)), refused(DecideRefusal::OtherBranches));
        assert!(sm.staged(&txn).is_some() && sm.txn(&txn).is_none(), "nothing changed");
        let no = vec![("a", Some(Vote::Yes)), ("b", Some(Vote::no("insufficient funds")))];
        assert!(matches!(sm.apply(8, &decide_votes(txn, Decision::Abort, no)), Applied::Decided { first: true, .. }));
        assert!(sm.staged(&txn).is_none());
        assert!(matches!(stage(&mut sm, 9, txn), Applied::StagedRefused { .. }), "decided: never staged again");

        let committed = TxnId::new();
        stage(&mut sm, 10, committed);
        let yes = vec![("b", Some(Vote::Yes)), ("a", Some(Vote::Yes))];
        let applied = sm.apply(11, &decide_votes(committed, Decision::Commit, yes));
        assert!(matches!(applied, Applied::Decided { first: true, ref record } if record.decision == Decision::Commit));
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes");
        assert_eq!(restored, sm);
    }

    // §13.1: the txn's owner (the proposer of the Staged entry that staged
    // it) aborts it for a vote that never came; an Abort naming another
    // Staged entry is anyone else's and needs a NO.
    #[test]
    fn only_the_owner_of_a_staged_txn_aborts_it_without_a_no() {
        let mut sm = StateMachine::default();
        let txn = TxnId::new();
        assert!(
            matches!(stage(&mut sm, 5, txn), Applied::Staged { first: true, ref staged } if staged.staged_log_index == 5)
        );
        let missing = DecideCmd {
            txn_id: txn,
            decision: Decision::Abort,
            reason: "b did not vote".into(),
            branches: vec![(pid("a"), Some(Vote::Yes)), (pid("b"), None)],
            payload_digests: Vec::new(),
        };
        let abort = |staged_log_index| Proposal {
            command: Command::AbortStaged { staged_log_index, decide: missing.clone() },
            proposed_unix_ms: unix_now_ms(),
        };
        assert_eq!(sm.apply(6, &abort(4)), Applied::DecideRefused { txn_id: txn, refusal: DecideRefusal::Staged });
        let applied = sm.apply(7, &abort(5));
        assert!(matches!(applied, Applied::Decided { first: true, ref record } if record.decision == Decision::Abort));
    }

    // §13.3: each status-recovery scan goes on after the last txn the
    // previous one took, and round to the start, so stuck txns cannot keep
    // the rest from ever being scanned.
    #[test]
    fn staged_scans_go_round_from_a_cursor() {
        let mut sm = StateMachine::default();
        let ids: Vec<TxnId> = (1..=5).map(|ms| TxnId::from_parts(ms, [0; 10])).collect();
        for (i, id) in ids.iter().enumerate() {
            stage(&mut sm, i as u64 + 1, *id);
        }
        let scan = |after, skip: &[TxnId]| -> Vec<TxnId> {
            sm.staged_txns(2, after, |id| skip.contains(id)).into_iter().map(|s| s.txn_id).collect()
        };
        assert_eq!(scan(None, &[]), ids[..2]);
        assert_eq!(scan(Some(ids[1]), &[]), ids[2..4]);
        assert_eq!(scan(Some(ids[3]), &[]), vec![ids[4], ids[0]]);
        assert_eq!(scan(Some(ids[4]), &[ids[0]]), ids[1..3]);
    }

    #[test]
    fn a_staged_txn_survives_a_snapshot_and_blocks_a_begin() {
        let mut sm = StateMachine::default();
        let txn = TxnId::new();
        stage(&mut sm, 1, txn);
        let restored = StateMachine::from_snapshot(&sm.to_snapshot()).expect("decodes");
        assert_eq!(restored.staged(&txn), sm.staged(&txn));
        let begin =
            Proposal { command: Command::Begin { txn_id: txn, deadline_unix_ms: u64::MAX }, proposed_unix_ms: 1 };
        assert!(matches!(sm.apply(2, &begin), Applied::BeginRefused { refusal: BeginRefusal::Staged, .. }));
    }
}
