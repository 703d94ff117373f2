//! The invariant checker (docs/PROTOCOL.md §9, docs/TESTING.md): given what a
//! run left behind (every coordinator's applied state machine, every
//! participant's branches, accounts and totals) and what anyone was told
//! (clients, one-shot and interactive (§12), an operator, a stray client's
//! Resolves), it lists every violation of I1, I2, I4, I6, I7 and I8 it can
//! see, membership changes that had to be refused and were not, and calls
//! answered otherwise than PROTOCOL.md documents.
//!
//! It reads final states only, so it is meant for quiescence: after every
//! fault healed and the harness waited for in-doubt branches to settle. The
//! time that settling took is I7's input ([`Liveness`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use twopc_coordinator::state_machine::StateMachine;
use twopc_proto::{Decision, TxnId};

/// The invariants the checker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// Atomicity: every branch of a txn applied the same decision, the log's.
    I1,
    /// One decision: nodes agree on every txn's decision and on their applied
    /// states; clients were told what the log holds; one leader per term.
    I2,
    /// No hanging: no branch is left prepared, no hold left, at quiescence.
    I4,
    /// Bounded: no state machine records a txn id created further ahead of
    /// its decision than the log accepts (such a record is never forgotten).
    I6,
    /// Liveness: in-doubt branches were resolved within the bound after the
    /// last fault healed, and every decision reached every branch.
    I7,
    /// Money: the sum of balances is what was minted, every balance is its
    /// opening plus the committed branches, and acknowledged transfers were
    /// applied exactly once (aborted ones never).
    I8,
    /// Membership (docs/PROTOCOL.md §4.6): a change that cannot succeed
    /// (removing a non-member, the leader itself, the last voter) is refused
    /// before it is logged.
    Membership,
    /// Documented answers (docs/PROTOCOL.md §12): a call that must be
    /// refused with a given status (a Join of a decided txn, a Commit of an
    /// unknown id, a malformed `twopc-txn` header...) got another answer
    /// than that status or a transient failure.
    Status,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::I1 => "I1 atomicity",
            Self::I2 => "I2 one decision",
            Self::I4 => "I4 no hanging",
            Self::I6 => "I6 bounded",
            Self::I7 => "I7 liveness",
            Self::I8 => "I8 money",
            Self::Membership => "membership (§4.6)",
            Self::Status => "documented status (§12)",
        };
        f.write_str(name)
    }
}

/// One broken invariant, with what the checker saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// The txn concerned, if one is.
    pub txn_id: Option<TxnId>,
    /// What was seen, for a person.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.txn_id {
            Some(txn) => write!(f, "{}: txn {txn}: {}", self.invariant, self.detail),
            None => write!(f, "{}: {}", self.invariant, self.detail),
        }
    }
}

/// Where one participant's branch of a txn stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchView {
    /// Voted YES; no decision yet (holds its effects).
    Prepared,
    /// Voted NO.
    Refused,
    /// Applied `Decision::Commit`.
    Committed,
    /// Applied `Decision::Abort` after voting YES.
    Aborted,
    /// Saw Abort before any Prepare.
    Tombstone,
}

impl BranchView {
    fn is_abort(self) -> bool {
        matches!(self, Self::Refused | Self::Aborted | Self::Tombstone)
    }
}

impl From<twopc_bank::BranchState> for BranchView {
    fn from(state: twopc_bank::BranchState) -> Self {
        use twopc_bank::BranchState as S;
        match state {
            S::Prepared => Self::Prepared,
            S::Refused => Self::Refused,
            S::Committed => Self::Committed,
            S::Aborted => Self::Aborted,
            S::Tombstone => Self::Tombstone,
        }
    }
}

/// One account at quiescence, in minor units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountView {
    /// Committed funds.
    pub balance_minor: i64,
    /// Held by prepared debits.
    pub held_minor: i64,
    /// Staged by prepared credits.
    pub incoming_minor: i64,
}

/// What one participant holds at the end of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParticipantView {
    /// Its branch of each txn it has a record of.
    pub branches: BTreeMap<TxnId, BranchView>,
    /// How many times a committed branch's effect was applied, where the
    /// resource counts it (the in-memory resource does; the bank's ledger is
    /// checked through balances instead).
    pub commit_counts: BTreeMap<TxnId, u32>,
    /// Its accounts by name (banks only).
    pub accounts: BTreeMap<String, AccountView>,
    /// For each committed txn that was also submitted with other amounts
    /// ([`Observation::resubmits`]): the amounts of its committed branch's
    /// operations here (banks only), by which the checker tells whose
    /// payloads were applied.
    pub committed_amounts: BTreeMap<TxnId, BTreeSet<i64>>,
    /// What its `Bank.Total` RPC answered once the system settled (banks
    /// only; None when not asked, as mid-run), or why it did not answer.
    pub totals: Option<Result<BankTotals, String>>,
}

/// A bank's `Total` answer: sums over all its accounts, in minor units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BankTotals {
    /// Committed funds.
    pub balance_minor: i64,
    /// Held by prepared debits.
    pub held_minor: i64,
    /// Staged by prepared credits.
    pub incoming_minor: i64,
}

/// What a client was told about a txn it submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Submit answered `Decision::Commit`.
    Committed,
    /// Submit answered `Decision::Abort`.
    Aborted,
    /// No answer (timeout, unavailable, leader change): it may have gone either way.
    Unknown,
    /// An interactive txn (docs/PROTOCOL.md §12) its client never asked to
    /// commit: it rolled back without being answered Abort, or vanished
    /// after a join or two. Nothing may apply; its deadline ends it.
    Abandoned,
}

/// How an interactive txn (docs/PROTOCOL.md §12) went, beside its
/// [`ClientTxn`]: which branches its client saw join.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InteractiveTxn {
    /// Banks whose `Debit` or `Credit` in this txn was answered OK: the
    /// branch is prepared and joined, so the decided record names it (§12.3,
    /// §12.4), whatever leader decides and whenever.
    pub joined: BTreeSet<String>,
    /// Its client sent Commit before every call was answered (an adversary
    /// racing a join): a branch whose Join lost the race is refused and
    /// aborts while the others commit, so the movement may apply on one side
    /// only. Money is then created or destroyed by the client's own doing.
    pub eager: bool,
}

/// One end of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountRef {
    /// The bank's participant name.
    pub bank: String,
    /// The account's name at that bank.
    pub account: String,
}

/// Money a txn moves, if it is a bank transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    /// The paying account.
    pub from: AccountRef,
    /// The paid account.
    pub to: AccountRef,
    /// How much, in minor units.
    pub amount_minor: i64,
}

/// One txn as its client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTxn {
    /// The txn.
    pub txn_id: TxnId,
    /// The participants it has branches at.
    pub participants: Vec<String>,
    /// The money it moves, for bank transfers.
    pub movement: Option<Movement>,
    /// What the client was told.
    pub outcome: ClientOutcome,
}

/// Who was told a decision, besides the clients of [`ClientTxn`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hearer {
    /// An operator, answered by `Admin.Decide`.
    Operator,
    /// A client asking `Resolve` about ids it did not submit (old, forgotten, its own).
    Resolver,
    /// A client retrying a txn's Submit with other branches, or reusing a begun txn's id.
    Retrier,
    /// A client rolling back an interactive txn: Rollback's answer.
    Rollback,
}

/// A Submit of a txn's id by another client, with the txn's movement at
/// another amount: one id, two sets of payloads (docs/PROTOCOL.md §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resubmit {
    /// The txn whose id was reused.
    pub txn_id: TxnId,
    /// The amount this Submit asked for.
    pub amount_minor: i64,
    /// What it was told, if anything.
    pub told: Option<Decision>,
}

/// One decision someone other than the txn's own client was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Told {
    /// The txn.
    pub txn_id: TxnId,
    /// Who heard it.
    pub hearer: Hearer,
    /// What they heard.
    pub decision: Decision,
}

/// How long the system took to settle after the last fault healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// From the heal to quiescence (no prepared branch, every decision
    /// acknowledged); None if quiescence was not reached within `bound`.
    pub settled_after: Option<Duration>,
    /// I7's bound: in-doubt timeout + resolve backoff cap + an election and
    /// slack for a loaded machine.
    pub bound: Duration,
}

/// Everything the checker looks at.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Every running coordinator's applied state, by node id.
    pub coordinators: BTreeMap<u64, StateMachine>,
    /// Every participant's view, by name.
    pub participants: BTreeMap<String, ParticipantView>,
    /// The client-side history.
    pub history: Vec<ClientTxn>,
    /// Opening balances (the only money minted), for I8.
    pub openings: BTreeMap<AccountRef, i64>,
    /// Settling time after the last heal, for I7.
    pub liveness: Option<Liveness>,
    /// Every node seen acting as leader, by raft term (sampled during the run), for I2.
    pub leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// Decisions read through the cluster's API (GetTransaction), for runs
    /// whose state machines cannot be copied out (real processes).
    pub reported: BTreeMap<TxnId, Decision>,
    /// Every decision told to someone other than the txn's client (I2 holds
    /// each to the log, and every answer about one txn to every other).
    pub told: Vec<Told>,
    /// Membership changes that had to be refused and were applied instead.
    pub membership_accepted: Vec<String>,
    /// The interactive txns among the history's, by id.
    pub interactive: BTreeMap<TxnId, InteractiveTxn>,
    /// Submits of history txns' ids with other amounts (I8 then takes the
    /// amount the banks applied, which must be one Submit's whole).
    pub resubmits: Vec<Resubmit>,
    /// Calls answered otherwise than documented, each with what was asked
    /// and answered.
    pub misanswered: Vec<String>,
    /// A txn still begun whose deadline is before this (Unix ms) is
    /// hanging (I4). One whose deadline is later is rightly begun: a Begin
    /// whose caller gave up can still be applied after the system settled.
    /// 0 judges none.
    pub begun_overdue_before_unix_ms: u64,
}

/// Checks every invariant on a quiescent system and returns the violations
/// found (empty: all hold).
pub fn check(obs: &Observation) -> Vec<Violation> {
    let mut out = Vec::new();
    let log = check_i2(obs, Moment::Quiescent, &mut out);
    check_i1(obs, &log, Moment::Quiescent, &mut out);
    check_i4(obs, &mut out);
    check_i6(obs, &mut out);
    check_i7(obs, &mut out);
    check_i8(obs, &log, &mut out);
    check_membership(obs, &mut out);
    check_statuses(obs, &mut out);
    out
}

/// Checks what must hold at every moment, mid-run included: nodes agree on
/// every decision they hold and on their states at equal indexes, one leader
/// per term, nobody was told two decisions for one txn (I2); no branch
/// contradicts another or the logged decision, and the decided record names
/// every branch that was seen to join (I1). Calls answered otherwise than
/// documented are reported as soon as they are seen.
/// What only holds at quiescence (delivery done, holds released, clients'
/// answers in every node's log, balances) is left to [`check`].
pub fn check_safety(obs: &Observation) -> Vec<Violation> {
    let mut out = Vec::new();
    let log = check_i2(obs, Moment::Running, &mut out);
    check_i1(obs, &log, Moment::Running, &mut out);
    check_statuses(obs, &mut out);
    out
}

/// When an observation was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// Mid-run: faults may be active, decisions on their way.
    Running,
    /// After the heal, once the system settled.
    Quiescent,
}

/// The invariants a list of violations names.
pub fn invariants(violations: &[Violation]) -> BTreeSet<Invariant> {
    violations.iter().map(|v| v.invariant).collect()
}

/// The violations as lines, for a failure message.
pub fn report(violations: &[Violation]) -> String {
    violations.iter().map(|v| format!("  - {v}\n")).collect()
}

fn violation(out: &mut Vec<Violation>, invariant: Invariant, txn_id: Option<TxnId>, detail: String) {
    out.push(Violation { invariant, txn_id, detail });
}

/// I2: every node holding a txn holds the same decision at the same log
/// index; nodes at the same applied index hold identical states; clients were
/// told what the log holds; one leader per term. Returns the log's decisions.
fn check_i2(obs: &Observation, moment: Moment, out: &mut Vec<Violation>) -> BTreeMap<TxnId, (Decision, u64)> {
    let mut log: BTreeMap<TxnId, (Decision, u64, u64)> = BTreeMap::new();
    for (node, sm) in &obs.coordinators {
        for record in sm.list(twopc_coordinator::state_machine::ListFilter::All, u64::MAX, None, usize::MAX) {
            let here = (record.decision, record.decision_log_index);
            match log.get(&record.txn_id) {
                Some(&(decision, index, first_node)) if (decision, index) != here => violation(
                    out,
                    Invariant::I2,
                    Some(record.txn_id),
                    format!(
                        "node {first_node} holds {decision} at log index {index}, node {node} holds {} at {}",
                        here.0, here.1
                    ),
                ),
                Some(_) => {}
                None => {
                    log.insert(record.txn_id, (here.0, here.1, *node));
                }
            }
        }
    }
    for (txn, reported) in &obs.reported {
        match log.get(txn) {
            Some(&(decision, _, node)) if decision != *reported => violation(
                out,
                Invariant::I2,
                Some(*txn),
                format!("the cluster reports {reported}; node {node} holds {decision}"),
            ),
            Some(_) => {}
            None => {
                log.insert(*txn, (*reported, 0, 0));
            }
        }
    }
    for (term, leaders) in obs.leaders.iter().filter(|(_, l)| l.len() > 1) {
        violation(out, Invariant::I2, None, format!("nodes {leaders:?} all acted as leader in term {term}"));
    }
    let nodes: Vec<(&u64, &StateMachine)> = obs.coordinators.iter().collect();
    for (i, (a, sa)) in nodes.iter().enumerate() {
        for (b, sb) in &nodes[i + 1..] {
            if sa.applied_index() == sb.applied_index() && sa != sb {
                violation(
                    out,
                    Invariant::I2,
                    None,
                    format!(
                        "nodes {a} and {b} both applied up to index {} but hold different states",
                        sa.applied_index()
                    ),
                );
            }
        }
    }
    // Mid-run, a decision a client heard may not be applied on any running
    // node yet (its leader just crashed), so this waits for quiescence.
    for txn in obs.history.iter().filter(|_| moment == Moment::Quiescent) {
        let logged = log.get(&txn.txn_id).map(|(d, _, _)| *d);
        let told = match txn.outcome {
            ClientOutcome::Committed => Decision::Commit,
            ClientOutcome::Aborted => Decision::Abort,
            ClientOutcome::Unknown | ClientOutcome::Abandoned => continue,
        };
        if logged.is_none() && forgotten(obs, &txn.txn_id) {
            continue;
        }
        if logged != Some(told) {
            let logged = logged.map_or("no decision".to_owned(), |d| d.to_string());
            violation(
                out,
                Invariant::I2,
                Some(txn.txn_id),
                format!("the client was told {told}; the log holds {logged}"),
            );
        }
    }
    let log: BTreeMap<TxnId, (Decision, u64)> =
        log.into_iter().map(|(txn, (decision, index, _))| (txn, (decision, index))).collect();
    check_told(obs, &log, moment, out);
    log
}

/// Everyone told a decision for a txn: its client (when it was told one) and
/// every [`Told`], each with who heard it.
fn tellings(obs: &Observation) -> BTreeMap<TxnId, Vec<(String, Decision)>> {
    let mut all: BTreeMap<TxnId, Vec<(String, Decision)>> = BTreeMap::new();
    for txn in &obs.history {
        let decision = match txn.outcome {
            ClientOutcome::Committed => Decision::Commit,
            ClientOutcome::Aborted => Decision::Abort,
            ClientOutcome::Unknown | ClientOutcome::Abandoned => continue,
        };
        all.entry(txn.txn_id).or_default().push(("its client".to_owned(), decision));
    }
    for told in &obs.told {
        all.entry(told.txn_id).or_default().push((format!("the {:?}", told.hearer).to_lowercase(), told.decision));
    }
    all
}

/// I2 over everything anyone other than a txn's client was told: every
/// answer about one txn agrees with every other (at every moment), and with
/// the log's decision at quiescence; for a txn the log may have forgotten,
/// with its branches (a Commit heard while a branch aborted, or the reverse).
/// The clients' own answers are held to the log by [`check_i2`].
fn check_told(obs: &Observation, log: &BTreeMap<TxnId, (Decision, u64)>, moment: Moment, out: &mut Vec<Violation>) {
    for (txn, heard) in tellings(obs) {
        let Some((first_hearer, first)) = heard.first().cloned() else { continue };
        if let Some((hearer, other)) = heard.iter().find(|(_, d)| *d != first) {
            violation(
                out,
                Invariant::I2,
                Some(txn),
                format!("{first_hearer} was told {first}, {hearer} was told {other}"),
            );
            continue;
        }
        if moment == Moment::Running || !obs.told.iter().any(|t| t.txn_id == txn) {
            continue;
        }
        match log.get(&txn).map(|(d, _)| *d) {
            Some(logged) if logged != first => violation(
                out,
                Invariant::I2,
                Some(txn),
                format!("{first_hearer} was told {first}; the log holds {logged}"),
            ),
            Some(_) => {}
            None if forgotten(obs, &txn) => {
                // A branch outside the record's scope (a call refused after
                // the decision) aborted whatever the decision was.
                let (named, _) = scope(obs, &txn);
                let contradicting: Vec<&String> = obs
                    .participants
                    .iter()
                    .filter(|(p, _)| named.as_ref().is_none_or(|n| n.contains(*p)))
                    .filter(|(_, v)| {
                        v.branches.get(&txn).is_some_and(|b| match first {
                            Decision::Commit => b.is_abort(),
                            Decision::Abort => *b == BranchView::Committed,
                        })
                    })
                    .map(|(p, _)| p)
                    .collect();
                if !contradicting.is_empty() {
                    violation(
                        out,
                        Invariant::I2,
                        Some(txn),
                        format!(
                            "{first_hearer} was told {first} of a forgotten txn; its branches at {contradicting:?} say otherwise"
                        ),
                    );
                }
            }
            None => violation(
                out,
                Invariant::I2,
                Some(txn),
                format!("{first_hearer} was told {first}; the log holds no decision"),
            ),
        }
    }
}

/// How far after its decision was proposed a txn id's creation time may lie
/// before a record of it is a violation: the log's own refusal bound
/// (`state_machine::TXN_ID_AHEAD_OF_PROPOSER_MAX_MS`, 10 minutes). Clients
/// make their ids at most a few seconds apart from any coordinator's clock
/// (clock jumps included), so only an id made far ahead gets near it.
pub const TXN_ID_AHEAD_OF_DECISION_MAX_MS: u64 = 10 * 60 * 1000;

/// I6: no node records a txn whose id was created further ahead of its
/// decision than [`TXN_ID_AHEAD_OF_DECISION_MAX_MS`]: no retention horizon
/// would ever reach it, so it would be kept for good.
fn check_i6(obs: &Observation, out: &mut Vec<Violation>) {
    let mut seen = BTreeSet::new();
    for (node, sm) in &obs.coordinators {
        for record in sm.list(twopc_coordinator::state_machine::ListFilter::All, u64::MAX, None, usize::MAX) {
            let ahead_ms = record.txn_id.created_unix_ms().saturating_sub(record.decided_unix_ms);
            if ahead_ms > TXN_ID_AHEAD_OF_DECISION_MAX_MS && seen.insert(record.txn_id) {
                violation(
                    out,
                    Invariant::I6,
                    Some(record.txn_id),
                    format!("node {node} records a txn created {ahead_ms} ms after its decision was proposed"),
                );
            }
        }
    }
}

/// Membership changes that had to be refused and were not (§4.6).
fn check_membership(obs: &Observation, out: &mut Vec<Violation>) {
    for accepted in &obs.membership_accepted {
        violation(out, Invariant::Membership, None, accepted.clone());
    }
}

/// Calls answered otherwise than documented (§12).
fn check_statuses(obs: &Observation, out: &mut Vec<Violation>) {
    for what in &obs.misanswered {
        violation(out, Invariant::Status, None, what.clone());
    }
}

/// Whether the log may have decided `txn` and forgotten it since: a node
/// applied a retention horizon above its creation time (docs/PROTOCOL.md
/// §7.2; a leader whose clock runs ahead forgets early). Only finished txns
/// are forgotten, so what the banks' branches say is then the whole record:
/// I1 still holds them to one outcome, I8 to what the client was told.
fn forgotten(obs: &Observation, txn: &TxnId) -> bool {
    obs.coordinators.values().any(|sm| sm.may_have_forgotten(txn))
}

/// The participants the decided record of `txn` names, from the most
/// advanced node holding it; None when no node holds it (undecided,
/// forgotten) or the decisions came from an API that does not say
/// ([`Observation::reported`]).
fn named_branches(obs: &Observation, txn: &TxnId) -> Option<BTreeSet<String>> {
    let record = obs.coordinators.values().filter_map(|sm| sm.txn(txn)).next()?;
    Some(record.branches.iter().map(|b| b.participant.to_string()).collect())
}

/// The participants whose branches must carry out `txn`'s decision: those
/// its decided record names; with no record left (forgotten), the banks its
/// movement touches, or for an eager client's txn those it saw join; None
/// when nothing says. And whether a branch outside them is known to be
/// left out of the record (not for a forgotten eager txn: a Join whose
/// answer was lost may have been named).
fn scope(obs: &Observation, txn: &TxnId) -> (Option<BTreeSet<String>>, bool) {
    if let Some(named) = named_branches(obs, txn) {
        return (Some(named), true);
    }
    if let Some(eager) = obs.interactive.get(txn).filter(|i| i.eager) {
        return (Some(eager.joined.clone()), false);
    }
    let moved = obs.history.iter().find(|t| t.txn_id == *txn).and_then(|t| t.movement.as_ref());
    (moved.map(|m| [m.from.bank.clone(), m.to.bank.clone()].into()), true)
}

/// I1: the branches a txn's decided record names all applied its decision
/// (none committed without one); a branch the record does not name never
/// commits; and every branch seen to join an interactive txn is named.
///
/// A branch the record does not name comes from a call refused after the
/// decision: a Debit under a decided txn's context, or a Join that lost
/// its race with Commit (§12.3); the bank aborts it. When no record is
/// left (forgotten, §7.2) the movement's banks stand for the record.
fn check_i1(obs: &Observation, log: &BTreeMap<TxnId, (Decision, u64)>, moment: Moment, out: &mut Vec<Violation>) {
    let mut txns: BTreeSet<TxnId> = log.keys().copied().collect();
    for view in obs.participants.values() {
        txns.extend(view.branches.keys().copied());
    }
    for txn in txns {
        let (named, outside_known) = scope(obs, &txn);
        let in_record = |p: &String| named.as_ref().is_none_or(|n| n.contains(p));
        let branches: Vec<(&String, BranchView)> =
            obs.participants.iter().filter_map(|(p, v)| v.branches.get(&txn).map(|b| (p, *b))).collect();
        for (p, _) in branches.iter().filter(|(p, b)| outside_known && !in_record(p) && *b == BranchView::Committed) {
            violation(
                out,
                Invariant::I1,
                Some(txn),
                format!("{p} committed a branch its decided record does not name"),
            );
        }
        let branches: Vec<(&String, BranchView)> = branches.into_iter().filter(|(p, _)| in_record(p)).collect();
        let committed: Vec<&String> =
            branches.iter().filter(|(_, b)| *b == BranchView::Committed).map(|(p, _)| *p).collect();
        let aborted: Vec<&String> = branches.iter().filter(|(_, b)| b.is_abort()).map(|(p, _)| *p).collect();
        if !committed.is_empty() && !aborted.is_empty() {
            violation(out, Invariant::I1, Some(txn), format!("committed at {committed:?} but aborted at {aborted:?}"));
        }
        match log.get(&txn).map(|(d, _)| *d) {
            Some(Decision::Commit) => {
                for (p, b) in branches.iter().filter(|(_, b)| b.is_abort()) {
                    violation(out, Invariant::I1, Some(txn), format!("the log holds Commit but {p}'s branch is {b:?}"));
                }
            }
            Some(Decision::Abort) => {
                for p in &committed {
                    violation(out, Invariant::I1, Some(txn), format!("the log holds Abort but {p} committed"));
                }
            }
            // Mid-run, the entry may be committed in raft but applied on no running node yet.
            None if moment == Moment::Running => {}
            None if forgotten(obs, &txn) => {}
            None => {
                for p in &committed {
                    violation(out, Invariant::I1, Some(txn), format!("{p} committed a txn with no logged decision"));
                }
            }
        }
    }
    for (txn, interactive) in &obs.interactive {
        let Some(named) = named_branches(obs, txn) else { continue };
        for p in interactive.joined.iter().filter(|p| !named.contains(*p)) {
            violation(
                out,
                Invariant::I1,
                Some(*txn),
                format!("{p} answered its call in the txn (joined), but the decided record names only {named:?}"),
            );
        }
    }
}

/// I4: nothing is left prepared or held, by the store's accounts and by
/// the bank's own `Total` RPC; and no txn is left begun and undecided past
/// its deadline, as every begun txn ends then at the latest (§12.5).
fn check_i4(obs: &Observation, out: &mut Vec<Violation>) {
    let mut seen = BTreeSet::new();
    for (node, sm) in &obs.coordinators {
        let begun = sm.list_begun(u64::MAX, None, usize::MAX);
        for begun in begun.into_iter().filter(|b| b.deadline_unix_ms < obs.begun_overdue_before_unix_ms) {
            if seen.insert(begun.txn_id) {
                violation(
                    out,
                    Invariant::I4,
                    Some(begun.txn_id),
                    format!(
                        "node {node} holds it begun and undecided at quiescence (deadline {}, joined {:?})",
                        begun.deadline_unix_ms,
                        begun.joined.iter().map(ToString::to_string).collect::<Vec<_>>()
                    ),
                );
            }
        }
    }
    for (p, view) in &obs.participants {
        for (txn, _) in view.branches.iter().filter(|(_, b)| **b == BranchView::Prepared) {
            violation(out, Invariant::I4, Some(*txn), format!("{p} still holds its branch prepared"));
        }
        match &view.totals {
            Some(Ok(t)) if t.held_minor != 0 || t.incoming_minor != 0 => violation(
                out,
                Invariant::I4,
                None,
                format!("{p}'s Total answers {} held and {} incoming once settled", t.held_minor, t.incoming_minor),
            ),
            Some(Err(why)) => {
                violation(out, Invariant::I7, None, format!("{p}'s Total did not answer once settled: {why}"));
            }
            Some(Ok(_)) | None => {}
        }
        for (name, account) in &view.accounts {
            if account.held_minor != 0 || account.incoming_minor != 0 {
                violation(
                    out,
                    Invariant::I4,
                    None,
                    format!(
                        "{name}@{p} still holds {} and stages {} incoming",
                        account.held_minor, account.incoming_minor
                    ),
                );
            }
        }
    }
}

/// I7: settled within the bound, and the most advanced node's log shows
/// every decision acknowledged by every branch.
fn check_i7(obs: &Observation, out: &mut Vec<Violation>) {
    let Some(liveness) = obs.liveness else {
        return;
    };
    match liveness.settled_after {
        None => {
            violation(out, Invariant::I7, None, format!("not settled within {:?} of the last heal", liveness.bound))
        }
        Some(took) if took > liveness.bound => violation(
            out,
            Invariant::I7,
            None,
            format!("settled {took:?} after the last heal, over the {:?} bound", liveness.bound),
        ),
        Some(_) => {}
    }
    let Some(log) = obs.coordinators.values().max_by_key(|sm| sm.applied_index()) else {
        return;
    };
    for record in log.unacknowledged() {
        let waiting: Vec<String> =
            record.branches.iter().filter(|b| !b.acknowledged).map(|b| b.participant.to_string()).collect();
        violation(
            out,
            Invariant::I7,
            Some(record.txn_id),
            format!("{} never acknowledged by {waiting:?}", record.decision),
        );
    }
}

/// I8: money is conserved and every balance is explained by the committed
/// branches; acknowledged transfers applied exactly once, aborted and
/// abandoned ones never.
fn check_i8(obs: &Observation, log: &BTreeMap<TxnId, (Decision, u64)>, out: &mut Vec<Violation>) {
    for (p, view) in &obs.participants {
        for (txn, count) in view.commit_counts.iter().filter(|(_, c)| **c > 1) {
            violation(out, Invariant::I8, Some(*txn), format!("{p} applied the commit {count} times"));
        }
    }
    let committed_at = |bank: &str, txn: &TxnId| {
        obs.participants.get(bank).and_then(|v| v.branches.get(txn)) == Some(&BranchView::Committed)
    };
    for txn in &obs.history {
        for p in &txn.participants {
            let committed = committed_at(p, &txn.txn_id);
            match txn.outcome {
                ClientOutcome::Committed if !committed => violation(
                    out,
                    Invariant::I8,
                    Some(txn.txn_id),
                    format!("acknowledged as committed but not applied at {p}"),
                ),
                ClientOutcome::Aborted if committed => violation(
                    out,
                    Invariant::I8,
                    Some(txn.txn_id),
                    format!("acknowledged as aborted but applied at {p}"),
                ),
                _ => {}
            }
        }
        if txn.outcome == ClientOutcome::Abandoned {
            check_abandoned(obs, log, txn, out);
        }
    }
    if obs.openings.is_empty() {
        return;
    }
    let mut expected: BTreeMap<AccountRef, i64> = obs.openings.clone();
    // Money a client's own eager Commit made or destroyed: one side of its
    // movement applied alone, which the protocol allows (InteractiveTxn::eager).
    let mut made_by_eager_clients: i128 = 0;
    for txn in &obs.history {
        let Some(m) = &txn.movement else { continue };
        let (debited, credited) = (committed_at(&m.from.bank, &txn.txn_id), committed_at(&m.to.bank, &txn.txn_id));
        let amount_minor = applied_amount(obs, txn, m, out);
        if debited {
            *expected.entry(m.from.clone()).or_default() -= amount_minor;
        }
        if credited {
            *expected.entry(m.to.clone()).or_default() += amount_minor;
        }
        if debited != credited && obs.interactive.get(&txn.txn_id).is_some_and(|i| i.eager) {
            made_by_eager_clients += i128::from(if credited { m.amount_minor } else { -m.amount_minor });
        }
    }
    let mut actual: BTreeMap<AccountRef, i64> = BTreeMap::new();
    for (bank, view) in &obs.participants {
        for (account, a) in &view.accounts {
            actual.insert(AccountRef { bank: bank.clone(), account: account.clone() }, a.balance_minor);
        }
    }
    let minted: i128 = obs.openings.values().map(|v| i128::from(*v)).sum::<i128>() + made_by_eager_clients;
    let total: i128 = actual.values().map(|v| i128::from(*v)).sum();
    let eager = if made_by_eager_clients == 0 {
        String::new()
    } else {
        format!(" ({made_by_eager_clients:+} by eager clients' half-applied txns)")
    };
    if minted != total {
        violation(out, Invariant::I8, None, format!("the balances sum to {total}, but {minted} was minted{eager}"));
    }
    let reported: Option<i128> = obs
        .participants
        .values()
        .map(|v| match &v.totals {
            Some(Ok(t)) => Some(i128::from(t.balance_minor)),
            _ => None,
        })
        .sum();
    if let Some(reported) = reported.filter(|r| *r != minted) {
        violation(
            out,
            Invariant::I8,
            None,
            format!("the banks' Total RPCs sum to {reported}, but {minted} was minted{eager}"),
        );
    }
    let accounts: BTreeSet<&AccountRef> = expected.keys().chain(actual.keys()).collect();
    for account in accounts {
        let want = expected.get(account).copied().unwrap_or(0);
        let have = actual.get(account).copied();
        if have != Some(want) {
            violation(
                out,
                Invariant::I8,
                None,
                format!(
                    "{}@{} holds {have:?}, but its opening plus the committed branches make {want}",
                    account.account, account.bank
                ),
            );
        }
    }
}

/// The amount `txn`'s movement `m` applied with: its own, unless another
/// Submit of its id asked for another ([`Observation::resubmits`]). Then the
/// banks' committed branches say which, and it must be one Submit's whole
/// (never a debit of one and a credit of another), and no Submit may have
/// been told Commit for an amount that did not move.
fn applied_amount(obs: &Observation, txn: &ClientTxn, m: &Movement, out: &mut Vec<Violation>) -> i64 {
    let resubmits: Vec<&Resubmit> = obs.resubmits.iter().filter(|r| r.txn_id == txn.txn_id).collect();
    if resubmits.is_empty() {
        return m.amount_minor;
    }
    let applied: BTreeSet<i64> = [&m.from.bank, &m.to.bank]
        .into_iter()
        .filter_map(|bank| obs.participants.get(bank.as_str())?.committed_amounts.get(&txn.txn_id))
        .flatten()
        .copied()
        .collect();
    let asked: BTreeSet<i64> = resubmits.iter().map(|r| r.amount_minor).chain([m.amount_minor]).collect();
    let id = Some(txn.txn_id);
    if applied.len() > 1 || !applied.is_subset(&asked) {
        let why = format!("its Submits asked for {asked:?}, and the banks applied {applied:?}: parts of two transfers");
        violation(out, Invariant::I8, id, why);
    }
    let Some(&amount_minor) = applied.first() else { return m.amount_minor };
    let told_commit = |asked: i64| format!("a Submit was told Commit for {asked}, but {amount_minor} moved");
    if txn.outcome == ClientOutcome::Committed && amount_minor != m.amount_minor {
        violation(out, Invariant::I8, id, told_commit(m.amount_minor));
    }
    for r in resubmits.iter().filter(|r| r.told == Some(Decision::Commit) && r.amount_minor != amount_minor) {
        violation(out, Invariant::I8, id, told_commit(r.amount_minor));
    }
    amount_minor
}

/// I8 for a txn its client never committed (rolled back unanswered, or
/// vanished): nobody asked for Commit, so the log never holds it and no
/// branch applies it.
fn check_abandoned(
    obs: &Observation,
    log: &BTreeMap<TxnId, (Decision, u64)>,
    txn: &ClientTxn,
    out: &mut Vec<Violation>,
) {
    if log.get(&txn.txn_id).is_some_and(|(d, _)| *d == Decision::Commit) {
        violation(out, Invariant::I8, Some(txn.txn_id), "its client never committed it; the log holds Commit".into());
    }
    for (p, view) in &obs.participants {
        if view.branches.get(&txn.txn_id) == Some(&BranchView::Committed) {
            violation(out, Invariant::I8, Some(txn.txn_id), format!("its client never committed it; {p} applied it"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use twopc_coordinator::command::{Command, DecideCmd, Proposal};
    use twopc_proto::Vote;

    use super::*;

    fn acct(bank: &str, account: &str) -> AccountRef {
        AccountRef { bank: bank.into(), account: account.into() }
    }

    fn bank(branches: &[(TxnId, BranchView)], accounts: &[(&str, i64)]) -> ParticipantView {
        ParticipantView {
            branches: branches.iter().copied().collect(),
            commit_counts: BTreeMap::new(),
            accounts: accounts
                .iter()
                .map(|(n, b)| ((*n).to_owned(), AccountView { balance_minor: *b, ..AccountView::default() }))
                .collect(),
            committed_amounts: BTreeMap::new(),
            totals: None,
        }
    }

    fn transfer(txn_id: TxnId, amount_minor: i64, outcome: ClientOutcome) -> ClientTxn {
        ClientTxn {
            txn_id,
            participants: vec!["bank-a".into(), "bank-b".into()],
            movement: Some(Movement { from: acct("bank-a", "alice"), to: acct("bank-b", "bob"), amount_minor }),
            outcome,
        }
    }

    /// One node's log holding `decision` for every txn of `history`, acknowledged by both banks.
    fn log(history: &[ClientTxn], decision: Decision) -> BTreeMap<u64, StateMachine> {
        let mut sm = StateMachine::new(BTreeMap::new());
        for (index, txn) in (1..).zip(history) {
            let branches = txn.participants.iter().map(|p| (p.parse().expect("name"), Some(Vote::Yes))).collect();
            let cmd = DecideCmd {
                txn_id: txn.txn_id,
                decision,
                reason: String::new(),
                branches,
                payload_digests: Vec::new(),
            };
            // The proposer's time must be near the ids' creation: the log refuses ids from its future.
            let proposed_unix_ms = twopc_proto::txn_id::unix_now_ms();
            sm.apply(index, &Proposal { command: Command::Decide(cmd), proposed_unix_ms });
        }
        let acks =
            history.iter().flat_map(|t| t.participants.iter().map(|p| (t.txn_id, p.parse().expect("name")))).collect();
        let next = u64::try_from(history.len()).expect("small") + 1;
        sm.apply(next, &Proposal { command: Command::Acknowledge(acks), proposed_unix_ms: 2 });
        [(1, sm)].into_iter().collect()
    }

    fn observation(a: ParticipantView, b: ParticipantView, history: Vec<ClientTxn>) -> Observation {
        Observation {
            coordinators: log(&history, Decision::Commit),
            participants: [("bank-a".to_owned(), a), ("bank-b".to_owned(), b)].into_iter().collect(),
            history,
            openings: [(acct("bank-a", "alice"), 100), (acct("bank-b", "bob"), 100)].into_iter().collect(),
            liveness: None,
            leaders: BTreeMap::new(),
            reported: BTreeMap::new(),
            told: Vec::new(),
            membership_accepted: Vec::new(),
            interactive: BTreeMap::new(),
            misanswered: Vec::new(),
            begun_overdue_before_unix_ms: u64::MAX,
            resubmits: Vec::new(),
        }
    }

    // I8 with one id submitted twice, for 30 and for 50 (§3.1): the banks may
    // apply either Submit's transfer whole, and only its Submit may be told
    // Commit; a debit of one and a credit of the other is caught even when
    // the balances happen to match the books.
    #[test]
    fn a_resubmitted_txn_applies_one_submits_payloads_whole() {
        let t = TxnId::new();
        let run = |debit: i64, credit: i64, client: ClientOutcome, resubmit_told: Option<Decision>| {
            let mut a = bank(&[(t, BranchView::Committed)], &[("alice", 100 - debit)]);
            let mut b = bank(&[(t, BranchView::Committed)], &[("bob", 100 + credit)]);
            a.committed_amounts.insert(t, [debit].into());
            b.committed_amounts.insert(t, [credit].into());
            let mut obs = observation(a, b, vec![transfer(t, 30, client)]);
            obs.resubmits.push(Resubmit { txn_id: t, amount_minor: 50, told: resubmit_told });
            invariants(&check(&obs))
        };
        let none = BTreeSet::new();
        assert_eq!(run(50, 50, ClientOutcome::Unknown, Some(Decision::Commit)), none, "the retry's payloads won");
        assert_eq!(run(30, 30, ClientOutcome::Committed, None), none, "the first Submit's payloads won");
        let i8: BTreeSet<Invariant> = [Invariant::I8].into();
        assert_eq!(run(30, 50, ClientOutcome::Unknown, None), i8, "a debit of one, a credit of the other");
        assert_eq!(run(50, 50, ClientOutcome::Committed, None), i8, "told Commit for 30 while 50 moved");
        assert_eq!(
            run(30, 30, ClientOutcome::Unknown, Some(Decision::Commit)),
            i8,
            "told Commit for 50 while 30 moved"
        );
    }

    // The checker passes a run whose committed transfer explains every balance.
    #[test]
    fn a_consistent_run_has_no_violations() {
        let t = TxnId::new();
        let obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            vec![transfer(t, 30, ClientOutcome::Unknown)],
        );
        assert_eq!(check(&obs), vec![]);
    }

    // I1 and I8: half a transfer applied is reported under both.
    #[test]
    fn half_a_transfer_is_an_atomicity_and_money_violation() {
        let t = TxnId::new();
        let obs = observation(
            bank(&[(t, BranchView::Aborted)], &[("alice", 100)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            vec![transfer(t, 30, ClientOutcome::Committed)],
        );
        let found = invariants(&check(&obs));
        assert!(found.contains(&Invariant::I1) && found.contains(&Invariant::I8), "{found:?}");
    }

    // I8: a commit applied twice shows in the balance even when every branch agrees.
    #[test]
    fn a_commit_applied_twice_breaks_the_ledger() {
        let t = TxnId::new();
        let obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 40)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 160)]),
            vec![transfer(t, 30, ClientOutcome::Committed)],
        );
        let violations = check(&obs);
        assert_eq!(invariants(&violations), [Invariant::I8].into_iter().collect(), "{violations:?}");
    }

    // I4: a prepared branch and a hold left at quiescence are reported.
    #[test]
    fn a_branch_left_prepared_is_hanging() {
        let t = TxnId::new();
        let mut a = bank(&[(t, BranchView::Prepared)], &[("alice", 100)]);
        a.accounts.get_mut("alice").expect("alice").held_minor = 30;
        let obs = observation(a, bank(&[], &[("bob", 100)]), vec![transfer(t, 30, ClientOutcome::Unknown)]);
        let violations = check(&obs);
        assert_eq!(violations.iter().filter(|v| v.invariant == Invariant::I4).count(), 2, "{violations:?}");
    }

    // I2: two leaders in one term, or two nodes disagreeing on a decision.
    #[test]
    fn two_leaders_in_a_term_or_two_decisions_are_reported() {
        let t = TxnId::new();
        let history = vec![transfer(t, 30, ClientOutcome::Unknown)];
        let mut obs = observation(bank(&[], &[("alice", 100)]), bank(&[], &[("bob", 100)]), history.clone());
        obs.leaders.insert(7, [1, 2].into_iter().collect());
        let aborted = log(&history, Decision::Abort).remove(&1).expect("node 1");
        obs.coordinators.insert(2, aborted);
        let violations = check(&obs);
        let i2 = violations.iter().filter(|v| v.invariant == Invariant::I2).count();
        assert_eq!(i2, 3, "two leaders, two decisions, two states at one index: {violations:?}");
    }

    // I1, I2 across a retention horizon: a finished txn the log forgot is
    // judged by its branches alone (no "the log holds no decision"), and a
    // half-applied one is still an atomicity and money violation.
    #[test]
    fn a_forgotten_txn_is_judged_by_its_branches() {
        let t = TxnId::new();
        let history = vec![transfer(t, 30, ClientOutcome::Committed)];
        let forget = |obs: &mut Observation| {
            for sm in obs.coordinators.values_mut() {
                let command = Command::Forget { horizon_unix_ms: t.created_unix_ms() + 1 };
                sm.apply(sm.applied_index() + 1, &Proposal { command, proposed_unix_ms: 3 });
            }
        };
        let mut whole = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            history.clone(),
        );
        forget(&mut whole);
        assert_eq!(check(&whole), vec![]);
        let mut half = observation(
            bank(&[(t, BranchView::Aborted)], &[("alice", 100)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            history,
        );
        forget(&mut half);
        let found = invariants(&check(&half));
        assert!(found.contains(&Invariant::I1) && found.contains(&Invariant::I8), "{found:?}");
    }

    // I2 over everyone told: an operator, a Resolve or a retried Submit told
    // another decision than the txn's client is reported at once (mid-run
    // too), and one told what the log does not hold at quiescence.
    #[test]
    fn anyone_told_another_decision_than_the_log_is_reported() {
        let t = TxnId::new();
        let history = vec![transfer(t, 30, ClientOutcome::Committed)];
        let mut obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            history,
        );
        obs.told.push(Told { txn_id: t, hearer: Hearer::Operator, decision: Decision::Commit });
        assert_eq!(check(&obs), vec![]);
        obs.told.push(Told { txn_id: t, hearer: Hearer::Resolver, decision: Decision::Abort });
        let violations = check_safety(&obs);
        assert_eq!(invariants(&violations), [Invariant::I2].into_iter().collect(), "{violations:?}");
        let u = TxnId::new();
        obs.told = vec![Told { txn_id: u, hearer: Hearer::Resolver, decision: Decision::Commit }];
        let violations = check(&obs);
        assert!(violations.iter().any(|v| v.txn_id == Some(u) && v.invariant == Invariant::I2), "{violations:?}");
    }

    // I2 across a retention horizon: a Resolve answered Abort for a forgotten
    // txn whose branches committed is a second, contradicting outcome.
    #[test]
    fn an_abort_told_of_a_forgotten_committed_txn_is_reported() {
        let t = TxnId::new();
        let mut obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            vec![transfer(t, 30, ClientOutcome::Unknown)],
        );
        for sm in obs.coordinators.values_mut() {
            let command = Command::Forget { horizon_unix_ms: t.created_unix_ms() + 1 };
            sm.apply(sm.applied_index() + 1, &Proposal { command, proposed_unix_ms: 3 });
        }
        obs.told.push(Told { txn_id: t, hearer: Hearer::Resolver, decision: Decision::Commit });
        assert_eq!(check(&obs), vec![]);
        obs.told[0].decision = Decision::Abort;
        let violations = check(&obs);
        assert_eq!(invariants(&violations), [Invariant::I2].into_iter().collect(), "{violations:?}");
    }

    // Membership: a change that had to be refused and was accepted is reported.
    #[test]
    fn an_accepted_change_that_had_to_be_refused_is_reported() {
        let mut obs = observation(bank(&[], &[("alice", 100)]), bank(&[], &[("bob", 100)]), vec![]);
        obs.membership_accepted.push("removing node 9 was accepted".into());
        assert_eq!(invariants(&check(&obs)), [Invariant::Membership].into_iter().collect());
    }

    // I1 over interactive txns (§12.4): a bank that answered its Debit or
    // Credit (so joined) must be named by the decided record; a record that
    // leaves it out, while the bank aborts its branch as an unnamed one
    // (§6), is an atomicity violation, not a quirk of the interleaving.
    #[test]
    fn a_joined_branch_the_decided_record_leaves_out_is_an_atomicity_violation() {
        let t = TxnId::new();
        let mut named_a_only = transfer(t, 30, ClientOutcome::Committed);
        named_a_only.participants = vec!["bank-a".into()];
        let mut obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Aborted)], &[("bob", 100)]),
            vec![named_a_only],
        );
        obs.history[0].participants = vec!["bank-a".into(), "bank-b".into()];
        let joined = ["bank-a".to_owned(), "bank-b".to_owned()].into_iter().collect();
        obs.interactive.insert(t, InteractiveTxn { joined, eager: false });
        let violations = check_safety(&obs);
        assert!(
            violations.iter().any(|v| v.invariant == Invariant::I1 && v.detail.contains("bank-b answered")),
            "{violations:?}"
        );
    }

    // I1 and I8 over an eager client (§12.3): its Credit lost the race with
    // its Commit, was refused, and bank-b aborted the branch the record does
    // not name. One side alone applied, by the client's doing: no violation.
    // The same half-applied movement from a client that waited is I8.
    #[test]
    fn a_refused_join_after_an_eager_commit_is_no_violation() {
        let t = TxnId::new();
        let mut history = vec![transfer(t, 30, ClientOutcome::Committed)];
        history[0].participants = vec!["bank-a".into()];
        let mut obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Tombstone)], &[("bob", 100)]),
            history,
        );
        obs.interactive.insert(t, InteractiveTxn { joined: ["bank-a".to_owned()].into_iter().collect(), eager: true });
        assert_eq!(check(&obs), vec![]);
        // Forgotten by retention: the branches it saw join stand for the record.
        let mut forgotten = obs.clone();
        for sm in forgotten.coordinators.values_mut() {
            let command = Command::Forget { horizon_unix_ms: t.created_unix_ms() + 1 };
            sm.apply(sm.applied_index() + 1, &Proposal { command, proposed_unix_ms: 3 });
        }
        assert_eq!(check(&forgotten), vec![]);
        obs.interactive.get_mut(&t).expect("t").eager = false;
        let violations = check(&obs);
        assert_eq!(invariants(&violations), [Invariant::I8].into_iter().collect(), "{violations:?}");
    }

    // I1 and I2 (§12.3): a Debit under a decided txn's context at a bank its
    // record does not name is refused and its branch aborted; that is no
    // atomicity violation, with the record or after retention forgot it,
    // and no contradiction of the Commit anyone was told. Such a branch that
    // commits is one.
    #[test]
    fn a_branch_refused_after_the_decision_is_outside_the_txn() {
        let t = TxnId::new();
        let mut within_a = transfer(t, 30, ClientOutcome::Committed);
        within_a.participants = vec!["bank-a".into()];
        within_a.movement =
            Some(Movement { from: acct("bank-a", "alice"), to: acct("bank-a", "carol"), amount_minor: 30 });
        let mut obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70), ("carol", 130)]),
            bank(&[(t, BranchView::Tombstone)], &[("bob", 100)]),
            vec![within_a],
        );
        obs.openings.insert(acct("bank-a", "carol"), 100);
        obs.told.push(Told { txn_id: t, hearer: Hearer::Resolver, decision: Decision::Commit });
        assert_eq!(check(&obs), vec![]);
        let mut forgotten = obs.clone();
        for sm in forgotten.coordinators.values_mut() {
            let command = Command::Forget { horizon_unix_ms: t.created_unix_ms() + 1 };
            sm.apply(sm.applied_index() + 1, &Proposal { command, proposed_unix_ms: 3 });
        }
        assert_eq!(check(&forgotten), vec![]);
        obs.participants.get_mut("bank-b").expect("bank-b").branches.insert(t, BranchView::Committed);
        let violations = check_safety(&obs);
        assert!(violations.iter().any(|v| v.detail.contains("does not name")), "{violations:?}");
    }

    // I8: a txn whose client never committed (vanished, or rolled back
    // without an answer) must apply nothing, whatever the log holds.
    #[test]
    fn an_abandoned_txn_that_commits_is_a_money_violation() {
        let t = TxnId::new();
        let obs = observation(
            bank(&[(t, BranchView::Committed)], &[("alice", 70)]),
            bank(&[(t, BranchView::Committed)], &[("bob", 130)]),
            vec![transfer(t, 30, ClientOutcome::Abandoned)],
        );
        let violations = check(&obs);
        assert_eq!(invariants(&violations), [Invariant::I8].into_iter().collect(), "{violations:?}");
        assert_eq!(violations.len(), 3, "the log's Commit and both banks: {violations:?}");
    }

    // I4 and I8 through the banks' own Total RPC: a hold or staged credit
    // left, or totals that do not add up to the money minted; I7 when a
    // settled bank does not answer.
    #[test]
    fn a_hold_or_a_sum_off_in_a_banks_total_is_reported() {
        let t = TxnId::new();
        let mut a = bank(&[(t, BranchView::Committed)], &[("alice", 70)]);
        let mut b = bank(&[(t, BranchView::Committed)], &[("bob", 130)]);
        a.totals = Some(Ok(BankTotals { balance_minor: 70, held_minor: 0, incoming_minor: 0 }));
        b.totals = Some(Ok(BankTotals { balance_minor: 130, held_minor: 0, incoming_minor: 0 }));
        let history = vec![transfer(t, 30, ClientOutcome::Committed)];
        assert_eq!(check(&observation(a.clone(), b.clone(), history.clone())), vec![]);
        b.totals = Some(Ok(BankTotals { balance_minor: 130, held_minor: 5, incoming_minor: 7 }));
        let violations = check(&observation(a.clone(), b.clone(), history.clone()));
        assert_eq!(invariants(&violations), [Invariant::I4].into_iter().collect(), "{violations:?}");
        b.totals = Some(Ok(BankTotals { balance_minor: 131, held_minor: 0, incoming_minor: 0 }));
        let violations = check(&observation(a.clone(), b.clone(), history.clone()));
        assert_eq!(invariants(&violations), [Invariant::I8].into_iter().collect(), "{violations:?}");
        b.totals = Some(Err("unavailable".into()));
        let violations = check(&observation(a, b, history));
        assert_eq!(invariants(&violations), [Invariant::I7].into_iter().collect(), "{violations:?}");
    }

    // I4 (§12.5): a txn left begun and undecided at quiescence is hanging,
    // whatever its branches (a deadline that never ended it).
    #[test]
    fn a_txn_left_begun_at_quiescence_is_hanging() {
        let t = TxnId::new();
        let mut obs = observation(bank(&[], &[("alice", 100)]), bank(&[], &[("bob", 100)]), vec![]);
        assert_eq!(check(&obs), vec![]);
        let begin = Command::Begin { txn_id: t, deadline_unix_ms: t.created_unix_ms() + 1_000 };
        for sm in obs.coordinators.values_mut() {
            let proposed_unix_ms = t.created_unix_ms();
            sm.apply(sm.applied_index() + 1, &Proposal { command: begin.clone(), proposed_unix_ms });
        }
        let violations = check(&obs);
        assert_eq!(invariants(&violations), [Invariant::I4].into_iter().collect(), "{violations:?}");
        assert_eq!(violations[0].txn_id, Some(t));
        // Before its deadline it is rightly begun (a late Begin applied after the settle).
        obs.begun_overdue_before_unix_ms = t.created_unix_ms() + 1_000;
        assert_eq!(check(&obs), vec![]);
    }

    // Documented statuses: a call answered otherwise is reported at once.
    #[test]
    fn a_call_answered_otherwise_than_documented_is_reported() {
        let mut obs = observation(bank(&[], &[("alice", 100)]), bank(&[], &[("bob", 100)]), vec![]);
        obs.misanswered.push("Join of a decided txn answered OK".into());
        assert_eq!(invariants(&check_safety(&obs)), [Invariant::Status].into_iter().collect());
    }

    // I7: not settling within the bound is a liveness violation.
    #[test]
    fn not_settling_is_a_liveness_violation() {
        let mut obs = observation(bank(&[], &[("alice", 100)]), bank(&[], &[("bob", 100)]), vec![]);
        obs.liveness = Some(Liveness { settled_after: None, bound: Duration::from_secs(1) });
        assert_eq!(invariants(&check(&obs)), [Invariant::I7].into_iter().collect());
    }
}
