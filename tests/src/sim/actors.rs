//! Adversaries: callers that are not the polite clients of the workload.
//! They run beside the clients in every fault mix, each drawing from its own
//! seeded generator, and note every decision they are told in the
//! [`Teller`], where the checker holds it to the log (I2).
//!
//! - [`operator`]: `Admin.Decide` for random txns: ones a client is running
//!   right now, decided ones, and fresh ids.
//! - [`stray`]: `Resolve` and `Submit` for ids that are old, from before the
//!   retention horizon, running, from the far future or malformed, and
//!   Submits of finished txns again with other branches.
//!
//! Membership churn needs the world itself (a restart), so it is a fault of
//! the schedule ([`super::schedule::Fault::RefusedMembership`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tonic::Status;
use twopc_bank::Transfer;
use twopc_client::{ClientConfig, ClusterClient};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnId, pb};

use crate::checker::{AccountRef, ClientOutcome, Hearer, Movement};
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

/// The adversaries until `done`: an [`operator_step`] or a [`stray_step`]
/// at a time, drawn from the seed, with a short pause before each. One task
/// and one call at a time: two adversaries with calls in flight at once made
/// runs diverge on replay (tokio's `select!` polls from an unseeded start,
/// docs/TESTING.md), each alone did not. Returns a tally line for each.
pub async fn run(
    teller: Arc<Teller>,
    client: ClusterClient,
    accounts: Vec<AccountRef>,
    retention_ms: u64,
    seed: u64,
    done: Arc<AtomicBool>,
) -> [String; 2] {
    let mut turns = StdRng::seed_from_u64(seed);
    let (mut operator_rng, mut stray_rng) = (StdRng::seed_from_u64(seed ^ 1), StdRng::seed_from_u64(seed ^ 2));
    let (mut operator, mut stray) = (Tally::default(), Tally::default());
    let retention_ms = retention_ms.max(1);
    while !done.load(Ordering::Relaxed) {
        pause(&mut turns).await;
        if turns.random_bool(0.5) {
            operator_step(&teller, &client, &mut operator_rng, &mut operator).await;
        } else {
            stray_step(&teller, &client, &accounts, retention_ms, &mut stray_rng, &mut stray).await;
        }
    }
    [operator.line("operator"), stray.line("stray client")]
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
/// `INVALID_ARGUMENT`); and Submits of finished txns again with another
/// branch set (refused, or answered with the logged decision).
async fn stray_step(
    teller: &Teller,
    client: &ClusterClient,
    accounts: &[AccountRef],
    retention_ms: u64,
    rng: &mut StdRng,
    tally: &mut Tally,
) {
    let history = teller.history();
    match rng.random_range(0..12) {
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
            let finished: Vec<_> = history.iter().filter(|t| t.outcome != ClientOutcome::Unknown).collect();
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

async fn resolve(teller: &Teller, client: &ClusterClient, tally: &mut Tally, call: &str, txn_id: TxnId) {
    let request = pb::ResolveRequest { txn_id: txn_id.to_string(), participant: String::new() };
    let answer = resolve_call(client, request).await;
    tally.note(call, &answer);
    if let Some(told) = answer.ok().and_then(|r| decision_of(r.decision)) {
        teller.heard(txn_id, Hearer::Resolver, told);
    }
}

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
