//! Adversaries: callers that are not the polite clients of the workload.
//! They run beside the clients in every fault mix, each drawing from its own
//! seeded generator, and note every decision they are told in the
//! [`Teller`], where the checker holds it to the log (I2).
//!
//! - [`operator`]: `Admin.Decide` for random txns: ones a client is running
//!   right now, decided ones, and fresh ids.
//! - [`stray`]: `Resolve` and `Submit` for ids that are old, from before the
//!   retention horizon, running, from the far future or malformed, Submits
//!   of finished txns again with other branches, and a bank's `RecoverVote`
//!   (status recovery, docs/PROTOCOL.md §13.3) for running txns and fresh
//!   ids, as if some leader recovered them.
//! - [`misuse`]: interactive txns (docs/PROTOCOL.md §12) used out of order:
//!   Joins of decided, unknown and future ids and after a Rollback, Commit
//!   and Rollback of unknown ids, a Commit racing a Rollback or a Join,
//!   Begins with bad timeouts, a Submit reusing a begun id, a Begin racing
//!   a Submit of one id, a Resolve before the deadline, malformed
//!   `twopc-txn` headers and a second call at one bank in one txn. Each call must get its documented status; one that
//!   does not is noted for the checker ([`Teller::misanswered`]).
//!
//! Membership churn needs the world itself (a restart), so it is a fault of
//! the schedule ([`super::schedule::Fault::RefusedMembership`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tonic::{Code, Status};
use twopc_bank::Transfer;
use twopc_client::{ClientConfig, ClusterClient};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnContext, TxnId, pb};

use crate::calls;
use crate::checker::{AccountRef, ClientOutcome, ClientTxn, Hearer, InteractiveTxn, Movement, Resubmit};
use crate::sim::interactive::{self, Header, Joining, Move};
use crate::sim::world::Teller;

/// A pause between two of an adversary's calls, in milliseconds.
const PAUSE_MS: std::ops::Range<u64> = 3..30;

/// How many times an adversary looks for a running txn before it gives up.
const RUNNING_LOOKS_MAX: usize = 20;

/// How far ahead of now a far-future id is made: a day to about three years.
const FUTURE_MS: std::ops::RangeInclusive<u64> = 86_400_000..=100_000_000_000;

/// Ids that are not UUIDv7s: empty, garbage, a UUIDv4, the nil UUID, far too long.
const MALFORMED: [&str; 5] =
    ["", "not-a-txn-id", "6ba7b810-9dad-41d1-80b4-00c04fd430c8", "00000000-0000-0000-0000-000000000000", "x"];

/// A client for adversaries: a short retry budget, so a call with no
/// leader to reach gives up in well under a second.
///
/// # Errors
/// An address is malformed.
pub fn client(addrs: Vec<String>) -> Result<ClusterClient, Status> {
    let config = ClientConfig {
        retry_budget_ms: 400,
        attempt_timeout_ms: 600,
        connect_timeout_ms: 300,
        backoff_min_ms: 10,
        backoff_max_ms: 100,
        // The simulation runs plaintext (docs/SECURITY.md).
        ..ClientConfig::default()
    };
    ClusterClient::new(addrs, config)
}

/// What an adversary's calls were answered, by kind of call, for the trace.
#[derive(Debug, Default)]
pub struct Tally(BTreeMap<String, BTreeMap<String, usize>>);

impl Tally {
    fn note<T>(&mut self, call: &str, answer: &Result<T, Status>) {
        let key = match answer {
            Ok(_) => "ok".to_owned(),
            Err(status) if status.message().contains("forgotten") => format!("{:?} (forgotten)", status.code()),
            Err(status) => format!("{:?}", status.code()),
        };
        self.note_as(call, key);
    }

    fn note_as(&mut self, call: &str, key: String) {
        *self.0.entry(call.to_owned()).or_default().entry(key).or_default() += 1;
    }

    /// One line: each call with its answers.
    pub fn line(&self, who: &str) -> String {
        let mut line = format!("{who}:");
        for (call, answers) in &self.0 {
            let _ = write!(line, " {call} {answers:?};");
        }
        line
    }
}

fn decision_of(answer: i32) -> Option<Decision> {
    Decision::try_from(answer).ok()
}

/// A txn a client is submitting, waiting a few milliseconds for one if
/// none is (the clients pause between transfers).
async fn running_txn(teller: &Teller, rng: &mut StdRng) -> Option<TxnId> {
    for _ in 0..RUNNING_LOOKS_MAX {
        if let Some((id, _)) = teller.running().choose(rng) {
            return Some(*id);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..=3))).await;
    }
    None
}

async fn pause(rng: &mut StdRng) {
    tokio::time::sleep(Duration::from_millis(rng.random_range(PAUSE_MS))).await;
}

/// The adversaries until `done`: an [`operator_step`], a [`stray_step`] or
/// a [`misuse_step`] at a time, drawn from the seed, with a short pause
/// before each. One task and one step at a time: two adversaries with calls
/// in flight at once made runs diverge on replay while tokio's `select!`
/// polled from an unseeded start (docs/TESTING.md), each alone did not. (A misuse
/// step that races two calls joins them with `tokio::join!`, which polls in
/// a fixed order.) Returns a tally line for each.
pub async fn run(
    teller: Arc<Teller>,
    client: ClusterClient,
    accounts: Vec<AccountRef>,
    retention_ms: u64,
    seed: u64,
    done: Arc<AtomicBool>,
) -> [String; 3] {
    let mut turns = StdRng::seed_from_u64(seed);
    let (mut operator_rng, mut stray_rng) = (StdRng::seed_from_u64(seed ^ 1), StdRng::seed_from_u64(seed ^ 2));
    let mut misuse_rng = StdRng::seed_from_u64(seed ^ 3);
    let (mut operator, mut stray, mut misuse) = (Tally::default(), Tally::default(), Tally::default());
    let retention_ms = retention_ms.max(1);
    while !done.load(Ordering::Relaxed) {
        pause(&mut turns).await;
        match turns.random_range(0..3) {
            0 => operator_step(&teller, &client, &mut operator_rng, &mut operator).await,
            1 => stray_step(&teller, &client, &accounts, retention_ms, &mut stray_rng, &mut stray).await,
            _ => misuse_step(&teller, &client, &accounts, &mut misuse_rng, &mut misuse).await,
        }
    }
    [operator.line("operator"), stray.line("stray client"), misuse.line("interactive misuser")]
}

/// An operator's call: `Admin.Decide` for a random txn: one
/// a client runs right now (Abort, or Commit without `force_commit`, which
/// must be refused), a decided one (same), or a fresh id (Abort, or a forced
/// Commit). It never forces a Commit of a txn that has branches: a forced
/// Commit is the operator's word that every branch voted YES, and the
/// operator here has no way to know (docs/PROTOCOL.md §6.1).
async fn operator_step(teller: &Teller, client: &ClusterClient, rng: &mut StdRng, tally: &mut Tally) {
    let decided: Vec<TxnId> =
        teller.history().iter().filter(|t| t.outcome != ClientOutcome::Unknown).map(|t| t.txn_id).collect();
    let (kind, txn_id) = match rng.random_range(0..10) {
        0..=4 => ("running", running_txn(teller, rng).await),
        5..=6 => ("decided", decided.choose(rng).copied()),
        _ => ("fresh", Some(TxnId::new())),
    };
    let Some(txn_id) = txn_id else { return };
    let commit = rng.random_bool(0.5);
    let force_commit = commit && kind == "fresh";
    let decision = if commit { pb::Decision::Commit } else { pb::Decision::Abort };
    let request = pb::DecideRequest {
        txn_id: txn_id.to_string(),
        decision: decision as i32,
        reason: format!("sim operator ({kind})"),
        force_commit,
    };
    let answer = client
        .admin(|mut c| {
            let request = request.clone();
            async move { c.decide(request).await }
        })
        .await;
    let call = format!(
        "decide {kind} {}{}",
        if commit { "commit" } else { "abort" },
        if force_commit { " forced" } else { "" }
    );
    tally.note(&call, &answer);
    if let Some(told) = answer.ok().and_then(|r| decision_of(r.decision)) {
        teller.heard(txn_id, Hearer::Operator, told);
    }
}

/// A stray client's call, one a polite client would not make:
/// Resolve for ids from the history, from before the retention horizon, of
/// txns running now, and fresh ones; Resolve and Submit for ids from the far
/// future and for malformed ids (both must be refused with
/// `INVALID_ARGUMENT`); Submits of finished txns again with another
/// branch set (refused, or answered with the logged decision); Submits of
/// running txns again with the same banks and another amount (one id, two
/// sets of payloads, §3.1: either may win, whole, and only the winner may be
/// told Commit); and RecoverVote at banks, some with a digest no branch has.
async fn stray_step(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    retention_ms: u64,
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let history = teller.history();
    match rng.random_range(0..14) {
        12 => recover_vote(teller, tally, rng).await,
        13 => resubmit_running_with_another_amount(teller, client, tally, rng).await,
        0..=2 => {
            if let Some(old) = history.choose(rng) {
                resolve(teller, client, tally, "resolve old", old.txn_id).await;
            }
        }
        3 => {
            let before = unix_now_ms().saturating_sub(retention_ms + rng.random_range(1_000..600_000));
            resolve(teller, client, tally, "resolve before retention", TxnId::created_at(before)).await;
        }
        4 => {
            if let Some(running) = running_txn(teller, rng).await {
                resolve(teller, client, tally, "resolve running", running).await;
            }
        }
        5 => resolve(teller, client, tally, "resolve fresh", TxnId::new()).await,
        6 => {
            let future = TxnId::created_at(unix_now_ms().saturating_add(rng.random_range(FUTURE_MS)));
            resolve(teller, client, tally, "resolve far future", future).await;
        }
        7 => {
            // Through the teller, so money moved by a Submit that should
            // have been refused is in the history the checker balances.
            let future = TxnId::created_at(unix_now_ms().saturating_add(rng.random_range(FUTURE_MS)));
            let Some((from, to)) = two_accounts(accounts, rng) else { return };
            let answer = teller.transfer_refused(future, &from, &to, rng.random_range(1..=100)).await;
            let answer = answer.and_then(|outcome| match outcome {
                ClientOutcome::Unknown => Err(Status::unknown("no answer")),
                told => Ok(told),
            });
            tally.note("submit far future", &answer);
        }
        8..=9 => malformed(client, tally, rng, teller.deadline_ms()).await,
        _ => {
            // Told a decision: an abandoned interactive txn's id may never
            // have been begun, and a Submit of it is then a new txn of this
            // client's, which the checker would book as the abandoned one's.
            let finished: Vec<_> = history
                .iter()
                .filter(|t| matches!(t.outcome, ClientOutcome::Committed | ClientOutcome::Aborted))
                .collect();
            let Some(txn) = finished.choose(rng) else { return };
            let Some(movement) = &txn.movement else { return };
            let Some(other) = other_branches(movement, accounts, rng) else { return };
            let Ok(transfer) = Transfer::new(address(&other.from), address(&other.to), other.amount_minor) else {
                return;
            };
            let request = pb::SubmitRequest {
                txn_id: txn.txn_id.to_string(),
                branches: transfer.submit_branches(),
                deadline_unix_ms: unix_now_ms() + teller.deadline_ms(),
            };
            let answer = submit_call(client, request).await;
            tally.note("submit again with other branches", &answer);
            if let Some(told) = answer.ok().and_then(|r| decision_of(r.decision)) {
                teller.heard(txn.txn_id, Hearer::Retrier, told);
            }
        }
    }
}

/// A Submit of a running one-shot txn's id with the same banks and another amount:
/// a client that retries with other payloads (docs/PROTOCOL.md §3.1), sent
/// to whichever node leads, which may not be the txn's own leader. The
/// checker takes the amount the banks applied, which must be one Submit's
/// whole, and holds every Submit told Commit to it (I8).
async fn resubmit_running_with_another_amount(
    teller: &Teller,
    client: &ClusterClient,
    tally: &mut Tally,
    rng: &mut StdRng,
) {
    // One-shot txns only: an interactive txn's id submitted before its Begin
    // is applied is a one-shot txn of this client's, whose Commit the
    // interactive client (its Begin then refused) never asked for.
    let Some((txn_id, movement)) = teller.submitting().choose(rng).cloned() else { return };
    let amount_minor = movement.amount_minor + rng.random_range(1..=50);
    let Ok(transfer) = Transfer::new(address(&movement.from), address(&movement.to), amount_minor) else { return };
    let request = pb::SubmitRequest {
        txn_id: txn_id.to_string(),
        branches: transfer.submit_branches(),
        deadline_unix_ms: unix_now_ms() + teller.deadline_ms(),
    };
    let answer = submit_call(client, request).await;
    tally.note("submit a running txn again with another amount", &answer);
    let told = answer.ok().and_then(|r| decision_of(r.decision));
    teller.resubmitted(Resubmit { txn_id, amount_minor, told });
}

/// A `RecoverVote` at a bank (docs/PROTOCOL.md §13.3) from a caller that is
/// no recovering leader: for a txn a client runs right now (the bank then
/// refuses its Prepare if it has not voted yet, and the txn aborts), or for
/// a fresh id. Whatever it does to running txns, every invariant must hold.
async fn recover_vote(teller: &Teller, tally: &mut Tally, rng: &mut StdRng) {
    let Some(bank) = teller.bank_names().choose(rng).cloned() else { return };
    let Some(mut participant) = teller.bank_participant(&bank) else { return };
    let (txn_id, call) = match running_txn(teller, rng).await {
        Some(running) if rng.random_bool(0.7) => (running, "recover vote of a running txn"),
        _ => (TxnId::new(), "recover vote of a fresh id"),
    };
    // Sometimes with a digest no branch has: a participant must not change
    // anything for it, only answer.
    let payload_digest = if rng.random_bool(0.3) { rng.random::<[u8; 32]>().to_vec() } else { Vec::new() };
    let request =
        pb::RecoverVoteRequest { txn_id: txn_id.to_string(), participant: bank, payload_digest: payload_digest.into() };
    let answer = participant.recover_vote(request).await;
    tally.note(call, &answer);
}

async fn resolve(teller: &Teller, client: &ClusterClient, tally: &mut Tally, call: &str, txn_id: TxnId) {
    let request = pb::ResolveRequest { txn_id: txn_id.to_string(), participant: String::new() };
    let answer = resolve_call(client, request).await;
    note_resolve(teller, tally, call, txn_id, &answer);
}

/// Tallies a Resolve's answer and notes the decision it told, if any; an
/// `undecided` answer (a begun txn before its deadline, §12.5) must carry
/// no decision and a retry hint of at most a second.
fn note_resolve(
    teller: &Teller,
    tally: &mut Tally,
    call: &str,
    txn_id: TxnId,
    answer: &Result<pb::ResolveResponse, Status>,
) {
    match answer {
        Ok(r) if r.undecided => {
            tally.note_as(call, "undecided".into());
            if r.decision != pb::Decision::Unspecified as i32 || r.retry_after_ms > UNDECIDED_RETRY_AFTER_MAX_MS {
                teller.misanswered(format!(
                    "{call} {txn_id}: undecided with decision {} and retry_after_ms {}",
                    r.decision, r.retry_after_ms
                ));
            }
        }
        answer => tally.note(call, answer),
    }
    if let Some(told) = answer.as_ref().ok().and_then(|r| decision_of(r.decision)) {
        teller.heard(txn_id, Hearer::Resolver, told);
    }
}

/// The longest retry hint an `undecided` Resolve may give (§12.5).
const UNDECIDED_RETRY_AFTER_MAX_MS: u64 = 1_000;

/// Resolve, Submit or Decide with an id that is no UUIDv7; anything but
/// `INVALID_ARGUMENT` is tallied as what it was.
async fn malformed(client: &ClusterClient, tally: &mut Tally, rng: &mut StdRng, deadline_ms: u64) {
    let Some(id) = MALFORMED.choose(rng) else { return };
    let id = if *id == "x" { "x".repeat(10_000) } else { (*id).to_owned() };
    match rng.random_range(0..3) {
        0 => {
            let request = pb::ResolveRequest { txn_id: id, participant: String::new() };
            let answer = resolve_call(client, request).await;
            tally.note("resolve malformed", &answer);
        }
        1 => {
            let request =
                pb::SubmitRequest { txn_id: id, branches: Vec::new(), deadline_unix_ms: unix_now_ms() + deadline_ms };
            let answer = submit_call(client, request).await;
            tally.note("submit malformed", &answer);
        }
        _ => {
            let request = pb::DecideRequest {
                txn_id: id,
                decision: pb::Decision::Abort as i32,
                reason: "sim operator (malformed)".into(),
                ..pb::DecideRequest::default()
            };
            let answer = client
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.decide(request).await }
                })
                .await;
            tally.note("decide malformed", &answer);
        }
    }
}

fn address(a: &AccountRef) -> twopc_bank::AccountAddress {
    format!("{}@{}", a.account, a.bank).parse().expect("a valid account address")
}

fn two_accounts(accounts: &[AccountRef], rng: &mut StdRng) -> Option<(AccountRef, AccountRef)> {
    let from = accounts.choose(rng)?.clone();
    let others: Vec<&AccountRef> = accounts.iter().filter(|a| **a != from).collect();
    let to = (*others.choose(rng)?).clone();
    Some((from, to))
}

/// A movement from the same account whose branches are at other banks: to
/// an account at the other bank when `movement` stays within one, within the
/// payer's bank when it spans two.
fn other_branches(movement: &Movement, accounts: &[AccountRef], rng: &mut StdRng) -> Option<Movement> {
    let one_bank = movement.from.bank == movement.to.bank;
    let candidates: Vec<&AccountRef> =
        accounts.iter().filter(|a| **a != movement.from && (a.bank == movement.from.bank) != one_bank).collect();
    let to = (*candidates.choose(rng)?).clone();
    Some(Movement { from: movement.from.clone(), to, amount_minor: movement.amount_minor })
}

/// One Submit through the leader-following client.
async fn submit_call(client: &ClusterClient, request: pb::SubmitRequest) -> Result<pb::SubmitResponse, Status> {
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.submit(request).await }
        })
        .await
}

/// One Resolve through the leader-following client.
async fn resolve_call(client: &ClusterClient, request: pb::ResolveRequest) -> Result<pb::ResolveResponse, Status> {
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.resolve(request).await }
        })
        .await
}

/// How long the misuser's own txns may stay open: long enough for its
/// calls, short enough that those it leaves end soon.
const MISUSE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1_500..=3_000;

/// The largest amount the misuser moves.
const MISUSE_AMOUNT_MAX_MINOR: i64 = 100;

/// A participant name no coordinator has registered.
const UNREGISTERED: &str = "bank-zz";

/// Holds an answer to the statuses PROTOCOL.md documents for the call:
/// OK when `ok`, a refusal with one of `codes`, or a transient failure
/// (no leader, a bank down); a call about a `known` txn may also find it
/// forgotten, and with a coordinator's clock far off an id may be judged
/// otherwise ([`interactive::excused`]). Anything else is noted for the
/// checker. The answer is tallied either way.
fn expect<T>(
    teller: &Teller,
    tally: &mut Tally,
    call: &str,
    answer: &Result<T, Status>,
    ok: bool,
    codes: &[Code],
    known: bool,
) {
    tally.note(call, answer);
    let documented = match answer {
        Ok(_) => ok,
        Err(status) => {
            codes.contains(&status.code())
                || interactive::transient(status)
                || interactive::excused(teller, status, known)
        }
    };
    if !documented {
        let answered = match answer {
            Ok(_) => "OK".to_owned(),
            Err(status) => format!("{:?} {}", status.code(), status.message()),
        };
        teller.misanswered(format!(
            "{call}: answered {answered}; documented: {codes:?}{}",
            if ok { " or OK" } else { "" }
        ));
    }
}

/// `codes`, and `INVALID_ARGUMENT` too when a bank's clock may take
/// `txn_id` for an id from the future and refuse to stage its branch
/// (docs/PROTOCOL.md §12.3, [`Teller::ahead_of_a_bank`]).
fn at_a_bank(teller: &Teller, txn_id: TxnId, codes: &[Code]) -> Vec<Code> {
    let mut codes = codes.to_vec();
    if teller.ahead_of_a_bank(txn_id) {
        codes.push(Code::InvalidArgument);
    }
    codes
}

/// A misuse of interactive txns (see the module doc), drawn from `rng`.
/// The misuser's own txns move real money between real accounts and go
/// into the history, so the checker balances them like any client's.
async fn misuse_step(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let banks = teller.bank_names();
    let Some(bank) = banks.choose(rng).cloned() else { return };
    // Decided txns, each with the banks its record may name.
    let decided: Vec<(TxnId, Vec<String>)> = teller
        .history()
        .iter()
        .filter(|t| matches!(t.outcome, ClientOutcome::Committed | ClientOutcome::Aborted))
        .map(|t| {
            (t.txn_id, t.movement.as_ref().map_or_else(Vec::new, |m| vec![m.from.bank.clone(), m.to.bank.clone()]))
        })
        .collect();
    let future = || TxnId::created_at(unix_now_ms().saturating_add(FUTURE_MS.start().saturating_mul(2)));
    let fp = [Code::FailedPrecondition];
    match rng.random_range(0..16) {
        0 => {
            let Some((txn, banks)) = decided.choose(rng) else { return };
            let answer = calls::join(client, &txn.to_string(), &bank).await;
            // A participant the decided record names joins again as a repeat
            // would (I5: it must carry out the record's decision); any other
            // is refused.
            let may_be_named = banks.contains(&bank);
            expect(teller, tally, "join decided", &answer, may_be_named, &fp, true);
        }
        1 => {
            let answer = calls::join(client, &TxnId::new().to_string(), &bank).await;
            expect(teller, tally, "join unknown", &answer, false, &fp, false);
        }
        2 => {
            let answer = calls::join(client, &future().to_string(), &bank).await;
            let codes = [Code::FailedPrecondition, Code::InvalidArgument];
            expect(teller, tally, "join far future", &answer, false, &codes, false);
        }
        3 => {
            let txn = decided.choose(rng).map_or_else(TxnId::new, |(txn, _)| *txn);
            let answer = calls::join(client, &txn.to_string(), UNREGISTERED).await;
            let codes = [Code::NotFound, Code::FailedPrecondition];
            expect(teller, tally, "join unregistered", &answer, false, &codes, true);
        }
        4 => join_after_rollback(teller, client, accounts, rng, tally).await,
        5 => {
            let txn = TxnId::new();
            let answer = calls::commit(client, txn, Vec::new()).await;
            expect(teller, tally, "commit unknown", &answer, false, &[Code::NotFound], false);
            let answer = calls::rollback(client, txn, "sim misuser").await;
            expect(teller, tally, "rollback unknown", &answer, false, &[Code::NotFound], false);
        }
        6 => commit_racing_rollback(teller, client, accounts, rng, tally).await,
        7 => {
            let max = teller.deadline_max_ms();
            let timeout_ms = match rng.random_range(0..3) {
                0 => 0,
                1 => rng.random_range(max + 1..=max.saturating_mul(10)),
                _ => u64::MAX,
            };
            let txn = rng.random_bool(0.5).then(TxnId::new);
            let answer = calls::begin(client, txn, timeout_ms).await;
            expect(teller, tally, "begin bad timeout", &answer, false, &[Code::InvalidArgument], false);
        }
        8 => submit_reusing_a_begun_id(teller, client, accounts, rng, tally).await,
        9 => resolve_before_the_deadline(teller, client, rng, tally).await,
        10 => malformed_header(teller, &bank, accounts, rng, tally).await,
        11 => second_call_at_one_bank(teller, client, accounts, rng, tally).await,
        12 => commit_racing_a_join(teller, client, accounts, rng, tally).await,
        14 => begin_racing_a_submit(teller, client, accounts, rng, tally).await,
        13 => {
            let Some((txn, banks)) = decided.choose(rng) else { return };
            let answer = move_under(teller, *txn, &bank, accounts, rng).await;
            // Refused: the bank holds a record of the txn already (one branch
            // per txn), or its Join finds the txn decided. A bank the record
            // names but that never prepared (its vote lost in a crash: the
            // txn aborted) joins as a repeat, and the Abort reaches it.
            let may_be_named = banks.contains(&bank);
            let codes = at_a_bank(teller, *txn, &fp);
            expect(teller, tally, "debit under a decided txn", &answer, may_be_named, &codes, true);
        }
        _ => {
            let (txn, call, codes) = if rng.random_bool(0.5) {
                let txn = TxnId::new();
                (txn, "debit under an unknown txn", at_a_bank(teller, txn, &fp))
            } else {
                (future(), "debit under a far-future txn", vec![Code::InvalidArgument])
            };
            let answer = move_under(teller, txn, &bank, accounts, rng).await;
            expect(teller, tally, call, &answer, false, &codes, false);
        }
    }
}

/// A Debit at `bank` under a context naming `txn_id`, which the misuser never began.
async fn move_under(
    teller: &Teller,
    txn_id: TxnId,
    bank: &str,
    accounts: &[AccountRef],
    rng: &mut StdRng,
) -> Result<pb::MoveResponse, Status> {
    let at_bank: Vec<&AccountRef> = accounts.iter().filter(|a| a.bank == bank).collect();
    let (Some(account), Some(client)) = (at_bank.choose(rng), teller.bank(bank)) else {
        return Err(Status::not_found(format!("no account at {bank}")));
    };
    let context = TxnContext { txn_id, deadline_unix_ms: unix_now_ms() + teller.deadline_ms() };
    let amount = rng.random_range(1..=MISUSE_AMOUNT_MAX_MINOR);
    interactive::move_money(client, Move::Debit, &Header::Context(context), &account.account, amount).await
}

/// Two accounts at two banks (payer first) and an amount.
fn cross_bank(accounts: &[AccountRef], rng: &mut StdRng) -> Option<Movement> {
    let from = accounts.choose(rng)?.clone();
    let others: Vec<&AccountRef> = accounts.iter().filter(|a| a.bank != from.bank).collect();
    let to = (*others.choose(rng)?).clone();
    Some(Movement { from, to, amount_minor: rng.random_range(1..=MISUSE_AMOUNT_MAX_MINOR) })
}

/// Begins a txn of the misuser's own; None (tallied) when Begin failed.
async fn begin_own(
    teller: &Teller,
    client: &ClusterClient,
    rng: &mut StdRng,
    tally: &mut Tally,
    call: &str,
) -> Option<TxnContext> {
    let timeout_ms = rng.random_range(MISUSE_TIMEOUT_MS).min(teller.deadline_max_ms());
    let answer = calls::begin(client, Some(TxnId::new()), timeout_ms).await;
    // A fresh id is refused only when older than the Submit window by the
    // leader's clock (§12.1: a slow Begin under a short retention) or, with
    // a clock far off, as from the future.
    expect(teller, tally, &format!("{call}: begin"), &answer, true, &[Code::FailedPrecondition], false);
    answer.ok()
}

/// One leg of a misuser's txn at the movement's payer (`Debit`) or payee (`Credit`).
async fn leg(
    teller: &Teller,
    context: TxnContext,
    movement: &Movement,
    kind: Move,
) -> Result<pb::MoveResponse, Status> {
    let account = if kind == Move::Debit { &movement.from } else { &movement.to };
    let Some(bank) = teller.bank(&account.bank) else {
        return Err(Status::not_found(format!("no bank {}", account.bank)));
    };
    interactive::move_money(bank, kind, &Header::Context(context), &account.account, movement.amount_minor).await
}

/// Records a misuser's txn in the history.
fn record(
    teller: &Teller,
    txn_id: TxnId,
    movement: Option<Movement>,
    outcome: ClientOutcome,
    interactive: InteractiveTxn,
) {
    let participants = interactive.joined.iter().cloned().collect();
    teller.record_interactive(ClientTxn { txn_id, participants, movement, outcome }, interactive);
}

/// What a misuser's Commit tells it (a Commit of its own begun txn is
/// answered a decision, a transient failure, or forgotten).
fn commit_outcome(
    teller: &Teller,
    tally: &mut Tally,
    call: &str,
    answer: &Result<pb::SubmitResponse, Status>,
) -> ClientOutcome {
    expect(teller, tally, call, answer, true, &[], true);
    match answer.as_ref().map(|r| decision_of(r.decision)) {
        Ok(Some(Decision::Commit)) => ClientOutcome::Committed,
        Ok(Some(Decision::Abort)) => ClientOutcome::Aborted,
        Ok(None) | Err(_) => ClientOutcome::Unknown,
    }
}

/// Rolls back a misuser's own txn; Aborted when answered so.
async fn roll_back_own(
    teller: &Teller,
    client: &ClusterClient,
    tally: &mut Tally,
    call: &str,
    txn_id: TxnId,
) -> ClientOutcome {
    let answer = calls::rollback(client, txn_id, "sim misuser").await;
    expect(teller, tally, call, &answer, true, &[], true);
    match answer.map(|r| decision_of(r.decision)) {
        Ok(Some(Decision::Abort)) => ClientOutcome::Aborted,
        Ok(Some(Decision::Commit)) => {
            teller.heard(txn_id, Hearer::Rollback, Decision::Commit);
            teller.misanswered(format!("{call} of {txn_id}: answered Commit"));
            ClientOutcome::Abandoned
        }
        Ok(None) | Err(_) => ClientOutcome::Abandoned,
    }
}

/// Begin, Rollback, then a Join of the rolled-back txn: straight to the
/// coordinator, or through a bank's Debit (which prepares, is refused the
/// Join, and must abort its branch: nothing stays held).
async fn join_after_rollback(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let Some(movement) = cross_bank(accounts, rng) else { return };
    let Some(context) = begin_own(teller, client, rng, tally, "join after rollback").await else { return };
    let txn_id = context.txn_id;
    let outcome = roll_back_own(teller, client, tally, "join after rollback: rollback", txn_id).await;
    let mut joined = BTreeSet::new();
    if rng.random_bool(0.5) {
        let answer = calls::join(client, &txn_id.to_string(), &movement.from.bank).await;
        // Refused if the Rollback was logged; with no answer to it, the Join may come first.
        let ok = outcome == ClientOutcome::Abandoned;
        expect(teller, tally, "join after rollback", &answer, ok, &[Code::FailedPrecondition], true);
        if answer.is_ok() {
            joined.insert(movement.from.bank.clone());
        }
        record(teller, txn_id, None, outcome, InteractiveTxn { joined, eager: false });
    } else {
        let answer = leg(teller, context, &movement, Move::Debit).await;
        let ok = outcome == ClientOutcome::Abandoned;
        let codes = at_a_bank(teller, txn_id, &[Code::FailedPrecondition]);
        expect(teller, tally, "debit after rollback", &answer, ok, &codes, true);
        if answer.is_ok() {
            joined.insert(movement.from.bank.clone());
        }
        record(teller, txn_id, Some(movement), outcome, InteractiveTxn { joined, eager: false });
    }
}

/// Begin, Debit, Credit, then Commit and Rollback at once: exactly one
/// wins, and both answers say which (Commit's decision; Rollback's Abort,
/// or `FAILED_PRECONDITION` for a committed txn).
async fn commit_racing_rollback(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let Some(movement) = cross_bank(accounts, rng) else { return };
    let Some(context) = begin_own(teller, client, rng, tally, "commit racing rollback").await else { return };
    let txn_id = context.txn_id;
    let Some(joined) = both_legs(teller, context, &movement, tally, "commit racing rollback").await else {
        let outcome = roll_back_own(teller, client, tally, "commit racing rollback: rollback", txn_id).await;
        let joined = BTreeSet::new();
        return record(teller, txn_id, Some(movement), outcome, InteractiveTxn { joined, eager: false });
    };
    let (committed, rolled_back) =
        tokio::join!(calls::commit(client, txn_id, Vec::new()), calls::rollback(client, txn_id, "sim misuser races"));
    let outcome = commit_outcome(teller, tally, "commit racing rollback: commit", &committed);
    expect(teller, tally, "commit racing rollback: rollback", &rolled_back, true, &[Code::FailedPrecondition], true);
    if let Some(told) = rolled_back.as_ref().ok().and_then(|r| decision_of(r.decision)) {
        teller.heard(txn_id, Hearer::Rollback, told);
    }
    record(teller, txn_id, Some(movement), outcome, InteractiveTxn { joined, eager: false });
}

/// Debit then Credit of `movement` under `context`; the banks that joined
/// when both did, None (after tallying the answers) when either did not.
async fn both_legs(
    teller: &Teller,
    context: TxnContext,
    movement: &Movement,
    tally: &mut Tally,
    call: &str,
) -> Option<BTreeSet<String>> {
    for kind in [Move::Debit, Move::Credit] {
        let answer = leg(teller, context, movement, kind).await;
        tally.note(&format!("{call}: {kind:?}"), &answer);
        if interactive::joining(teller, context.txn_id, &format!("{call}: {kind:?} in {}", context.txn_id), &answer)
            != Joining::Joined
        {
            return None;
        }
    }
    Some([movement.from.bank.clone(), movement.to.bank.clone()].into())
}

/// Begin, then a one-shot Submit with the begun txn's id: refused with
/// `FAILED_PRECONDITION` (commit it instead), or, were the txn decided
/// meanwhile, answered its logged Abort. Then a Rollback, or nothing.
async fn submit_reusing_a_begun_id(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let Some((from, to)) = two_accounts(accounts, rng) else { return };
    let movement = Movement { from, to, amount_minor: rng.random_range(1..=MISUSE_AMOUNT_MAX_MINOR) };
    let Ok(transfer) = Transfer::new(address(&movement.from), address(&movement.to), movement.amount_minor) else {
        return;
    };
    let Some(context) = begin_own(teller, client, rng, tally, "submit reusing a begun id").await else { return };
    let txn_id = context.txn_id;
    let request = pb::SubmitRequest {
        txn_id: txn_id.to_string(),
        branches: transfer.submit_branches(),
        deadline_unix_ms: unix_now_ms() + teller.deadline_ms(),
    };
    let answer = submit_call(client, request).await;
    let told = answer.as_ref().ok().and_then(|r| decision_of(r.decision));
    expect(
        teller,
        tally,
        "submit reusing a begun id",
        &answer,
        told == Some(Decision::Abort),
        &[Code::FailedPrecondition],
        true,
    );
    if let Some(told) = told {
        teller.heard(txn_id, Hearer::Retrier, told);
    }
    let outcome = if rng.random_bool(0.5) {
        roll_back_own(teller, client, tally, "submit reusing a begun id: rollback", txn_id).await
    } else {
        ClientOutcome::Abandoned
    };
    record(teller, txn_id, Some(movement), outcome, InteractiveTxn::default());
}

/// A one-shot Submit and a Begin of one fresh id at once (docs/PROTOCOL.md
/// §5 step 7): one of them gets the id. A Begin answered OK while the Submit
/// was told a decision means the Submit decided a txn begun for another
/// client: noted for the checker. The Submit goes into the history as a
/// client's does; a begun txn is then committed with no branch of its own,
/// rolled back, or left to time out, and the checker holds the Submit's
/// prepared branches to that txn's record, which names none (I1).
async fn begin_racing_a_submit(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let Some((from, to)) = two_accounts(accounts, rng) else { return };
    let (txn_id, amount_minor) = (TxnId::new(), rng.random_range(1..=MISUSE_AMOUNT_MAX_MINOR));
    let timeout_ms = rng.random_range(MISUSE_TIMEOUT_MS).min(teller.deadline_max_ms());
    let (submitted, begun) = tokio::join!(
        teller.transfer_as(txn_id, &from, &to, amount_minor),
        calls::begin(client, Some(txn_id), timeout_ms),
    );
    let call = "begin racing a submit";
    expect(teller, tally, &format!("{call}: begin"), &begun, true, &[Code::FailedPrecondition], false);
    if begun.is_err() {
        return;
    }
    if matches!(submitted, ClientOutcome::Committed | ClientOutcome::Aborted) {
        teller.misanswered(format!(
            "{call}: {txn_id} was begun (OK) and its Submit was told {submitted:?}: a one-shot decision decided a \
             begun txn"
        ));
    }
    match rng.random_range(0..3) {
        0 => {
            let answer = calls::commit(client, txn_id, Vec::new()).await;
            commit_outcome(teller, tally, &format!("{call}: commit"), &answer);
        }
        1 => {
            roll_back_own(teller, client, tally, &format!("{call}: rollback"), txn_id).await;
        }
        _ => {}
    }
}

/// Begin, then Resolve before the deadline: `undecided` with a retry hint
/// (§12.5), not a presumed abort, while the deadline is more than the
/// longest hint away by the coordinators' clocks. Then a Rollback, or nothing.
async fn resolve_before_the_deadline(teller: &Teller, client: &ClusterClient, rng: &mut StdRng, tally: &mut Tally) {
    let Some(context) = begin_own(teller, client, rng, tally, "resolve before the deadline").await else { return };
    let txn_id = context.txn_id;
    let participant =
        if rng.random_bool(0.5) { teller.bank_names().choose(rng).cloned().unwrap_or_default() } else { String::new() };
    let request = pb::ResolveRequest { txn_id: txn_id.to_string(), participant };
    let answer = resolve_call(client, request).await;
    note_resolve(teller, tally, "resolve before the deadline", txn_id, &answer);
    let time_left_ms = context.deadline_unix_ms.saturating_sub(unix_now_ms());
    if let Ok(r) = &answer
        && !r.undecided
        && time_left_ms > UNDECIDED_RETRY_AFTER_MAX_MS
        && !teller.clocks_off()
    {
        teller.misanswered(format!(
            "resolve of begun txn {txn_id} {time_left_ms} ms before its deadline: decision {} instead of undecided",
            r.decision
        ));
    }
    let outcome = if rng.random_bool(0.5) {
        roll_back_own(teller, client, tally, "resolve before the deadline: rollback", txn_id).await
    } else {
        ClientOutcome::Abandoned
    };
    record(teller, txn_id, None, outcome, InteractiveTxn::default());
}

/// A Debit or Credit at `bank` whose `twopc-txn` entry is malformed
/// (`INVALID_ARGUMENT`: garbage, a UUIDv4, no deadline, a deadline of 0 or
/// not a number, far too long, the entry twice) or missing
/// (`FAILED_PRECONDITION`).
async fn malformed_header(teller: &Teller, bank: &str, accounts: &[AccountRef], rng: &mut StdRng, tally: &mut Tally) {
    let at_bank: Vec<&AccountRef> = accounts.iter().filter(|a| a.bank == bank).collect();
    let (Some(account), Some(client)) = (at_bank.choose(rng), teller.bank(bank)) else { return };
    let id = TxnId::new();
    let deadline = unix_now_ms() + teller.deadline_ms();
    let (header, what) = match rng.random_range(0..8) {
        0 => (Header::Raw(vec!["garbage".into()]), "garbage"),
        1 => (Header::Raw(vec![format!("6ba7b810-9dad-41d1-80b4-00c04fd430c8;deadline={deadline}")]), "a UUIDv4"),
        2 => (Header::Raw(vec![id.to_string()]), "no deadline"),
        3 => (Header::Raw(vec![format!("{id};deadline=0")]), "deadline 0"),
        4 => (Header::Raw(vec![format!("{id};deadline=soon")]), "deadline not a number"),
        5 => (Header::Raw(vec![format!("{id};deadline={}", "9".repeat(200))]), "too long"),
        6 => {
            let twice = format!("{id};deadline={deadline}");
            (Header::Raw(vec![twice.clone(), twice]), "twice")
        }
        _ => (Header::Missing, "missing"),
    };
    let kind = if rng.random_bool(0.5) { Move::Debit } else { Move::Credit };
    let answer = interactive::move_money(client, kind, &header, &account.account, rng.random_range(1..=100)).await;
    let code = if matches!(header, Header::Missing) { Code::FailedPrecondition } else { Code::InvalidArgument };
    expect(teller, tally, &format!("{kind:?} with header {what}"), &answer, false, &[code], false);
}

/// Begin, Debit at the payer's bank, then a second Debit or a Credit at the
/// same bank in the same txn (refused before anything is staged: one branch
/// per bank per txn), then the Credit at the payee's bank and Commit. The
/// checker's balances show any second movement staged.
async fn second_call_at_one_bank(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let Some(movement) = cross_bank(accounts, rng) else { return };
    let Some(context) = begin_own(teller, client, rng, tally, "second call at one bank").await else { return };
    let txn_id = context.txn_id;
    let mut joined = BTreeSet::new();
    let debit = leg(teller, context, &movement, Move::Debit).await;
    tally.note("second call at one bank: first debit", &debit);
    let mut all_joined =
        interactive::joining(teller, txn_id, &format!("first Debit in {txn_id}"), &debit) == Joining::Joined;
    if all_joined {
        joined.insert(movement.from.bank.clone());
        let same_bank: Vec<&AccountRef> = accounts.iter().filter(|a| a.bank == movement.from.bank).collect();
        let kind = if rng.random_bool(0.5) { Move::Debit } else { Move::Credit };
        if let (Some(account), Some(bank)) = (same_bank.choose(rng), teller.bank(&movement.from.bank)) {
            let amount = rng.random_range(1..=MISUSE_AMOUNT_MAX_MINOR);
            let again = interactive::move_money(bank, kind, &Header::Context(context), &account.account, amount).await;
            let call = format!("second call at one bank: {kind:?}");
            let codes = at_a_bank(teller, txn_id, &[Code::FailedPrecondition]);
            expect(teller, tally, &call, &again, false, &codes, true);
        }
        let credit = leg(teller, context, &movement, Move::Credit).await;
        tally.note("second call at one bank: credit", &credit);
        all_joined = interactive::joining(teller, txn_id, &format!("Credit in {txn_id}"), &credit) == Joining::Joined;
        if all_joined {
            joined.insert(movement.to.bank.clone());
        }
    }
    let outcome = if all_joined {
        let answer = calls::commit(client, txn_id, Vec::new()).await;
        commit_outcome(teller, tally, "second call at one bank: commit", &answer)
    } else {
        roll_back_own(teller, client, tally, "second call at one bank: rollback", txn_id).await
    };
    record(teller, txn_id, Some(movement), outcome, InteractiveTxn { joined, eager: false });
}

/// Begin and Debit, then the Credit and the Commit at once: the Credit's
/// Join lands before the Commit's decision in the log (its branch commits
/// with the debit) or after it (refused: the bank aborts its branch, and
/// the debit commits alone, by this client's doing). Either way the
/// record names exactly the branches joined before it (§12.4).
async fn commit_racing_a_join(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let Some(movement) = cross_bank(accounts, rng) else { return };
    let Some(context) = begin_own(teller, client, rng, tally, "commit racing a join").await else { return };
    let txn_id = context.txn_id;
    let debit = leg(teller, context, &movement, Move::Debit).await;
    tally.note("commit racing a join: debit", &debit);
    if interactive::joining(teller, txn_id, &format!("Debit in {txn_id}"), &debit) != Joining::Joined {
        let outcome = roll_back_own(teller, client, tally, "commit racing a join: rollback", txn_id).await;
        return record(teller, txn_id, Some(movement), outcome, InteractiveTxn::default());
    }
    let mut joined: BTreeSet<String> = [movement.from.bank.clone()].into();
    let (credit, committed) =
        tokio::join!(leg(teller, context, &movement, Move::Credit), calls::commit(client, txn_id, Vec::new()));
    tally.note("commit racing a join: credit", &credit);
    if interactive::joining(teller, txn_id, &format!("Credit racing Commit in {txn_id}"), &credit) == Joining::Joined {
        joined.insert(movement.to.bank.clone());
    }
    let outcome = commit_outcome(teller, tally, "commit racing a join: commit", &committed);
    record(teller, txn_id, Some(movement), outcome, InteractiveTxn { joined, eager: true });
}
