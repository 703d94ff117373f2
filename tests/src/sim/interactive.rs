//! Interactive transfers (docs/PROTOCOL.md §12), as an application makes
//! them: `Begin`, `Debit` at the payer's bank and `Credit` at the payee's
//! (another bank), each carrying the txn's context in the `twopc-txn`
//! metadata entry, then `Commit`. Some clients roll back instead, some
//! vanish after one or both calls (the deadline must end their txn and
//! release every hold), some ask again after a Commit got no answer.
//!
//! Each txn goes into the [`Teller`]'s history with what its client was
//! told and which banks it saw join ([`InteractiveTxn`]): the checker holds
//! a Commit answered COMMIT to both branches applied exactly once, an Abort
//! or a txn never committed to nothing applied, and an unknown outcome to
//! all or nothing (I1, I8). The calls themselves are public for the
//! adversaries ([`super::actors`]), which make them out of order.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::Rng as _;
use rand::rngs::StdRng;
use tonic::transport::Channel;
use tonic::{Code, Status};
use twopc_proto::context::TXN_CONTEXT_METADATA_KEY;
use twopc_proto::pb::bank_client::BankClient;
use twopc_proto::{Decision, TxnContext, TxnId, pb};

use crate::calls;
use crate::checker::{AccountRef, ClientOutcome, ClientTxn, Hearer, InteractiveTxn, Movement};
use crate::sim::world::Teller;

/// The shortest Begin timeout a client asks for: shorter than the time its
/// calls take, so its Commit meets the deadline (Abort, "timed out").
pub const TIMEOUT_MIN_MS: u64 = 50;
/// The longest Begin timeout a client asks for, and so the longest a
/// vanished client's branches are held (the settle bound allows for it).
pub const TIMEOUT_MAX_MS: u64 = 3_000;
/// One in this many txns gets a timeout under [`SHORT_TIMEOUT_MAX_MS`].
const SHORT_TIMEOUT_ONE_IN: u32 = 10;
/// The longest of the short timeouts.
const SHORT_TIMEOUT_MAX_MS: u64 = 400;
/// The shortest of the ordinary timeouts.
const TIMEOUT_ORDINARY_MIN_MS: u64 = 800;
/// How long a client waits for a bank's `Debit` or `Credit` (a durable
/// prepare plus a Join the bank may have to retry at a new leader).
pub const MOVE_TIMEOUT: Duration = Duration::from_millis(2_500);
/// The longest pause between the last call and Commit or Rollback: the
/// joined branches are held meanwhile, while faults strike.
const THINK_MAX_MS: u64 = 400;
/// How many times a retrying client asks again after a Commit got no answer.
const COMMIT_RETRIES: u32 = 4;
/// The pause before a Commit is asked again, in milliseconds.
const COMMIT_RETRY_PAUSE_MS: std::ops::Range<u64> = 100..600;

/// What a client does once its calls are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Commit if both calls were answered OK (roll back otherwise); after a
    /// Commit with no answer, ask again up to `retries` times.
    Commit {
        /// Commits asked again after one got no answer.
        retries: u32,
    },
    /// Roll back, whatever the calls were answered.
    Rollback,
    /// Stop after this many calls (1 or 2): never commit nor roll back.
    Vanish {
        /// Calls made before vanishing.
        calls: usize,
    },
}

/// One interactive transfer, drawn from a client's generator.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The payer (debited at its bank).
    pub from: AccountRef,
    /// The payee, at another bank (credited there).
    pub to: AccountRef,
    /// How much, in minor units.
    pub amount_minor: i64,
    /// The Begin timeout.
    pub timeout_ms: u64,
    /// Begin with an empty id, so the coordinator picks one.
    pub coordinator_picks_id: bool,
    /// The pause between the last call and Commit or Rollback.
    pub think_ms: u64,
    /// Commit, roll back or vanish.
    pub ending: Ending,
}

impl Plan {
    /// A plan for moving `amount_minor` from `from` to `to` (at another
    /// bank): mostly a commit (a third of those asking again after no
    /// answer), a fifth rolled back, a sixth vanishing; one timeout in ten
    /// too short for the calls.
    pub fn draw(rng: &mut StdRng, from: AccountRef, to: AccountRef, amount_minor: i64, deadline_max_ms: u64) -> Self {
        let timeout_ms = if rng.random_ratio(1, SHORT_TIMEOUT_ONE_IN) {
            rng.random_range(TIMEOUT_MIN_MS..=SHORT_TIMEOUT_MAX_MS)
        } else {
            rng.random_range(TIMEOUT_ORDINARY_MIN_MS..=TIMEOUT_MAX_MS)
        };
        let ending = match rng.random_range(0..30) {
            0..=5 => Ending::Rollback,
            6..=10 => Ending::Vanish { calls: rng.random_range(1..=2) },
            11..=17 => Ending::Commit { retries: COMMIT_RETRIES },
            _ => Ending::Commit { retries: 0 },
        };
        Self {
            from,
            to,
            amount_minor,
            timeout_ms: timeout_ms.min(deadline_max_ms),
            coordinator_picks_id: rng.random_ratio(1, 5),
            think_ms: rng.random_range(0..=THINK_MAX_MS),
            ending,
        }
    }
}

/// Which of the bank's own calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// `Bank.Debit`: a hold on the payer's account.
    Debit,
    /// `Bank.Credit`: an incoming credit on the payee's account.
    Credit,
}

/// The `twopc-txn` entries a call carries.
#[derive(Debug, Clone)]
pub enum Header {
    /// The txn's context, as `TxnContext::attach` writes it.
    Context(TxnContext),
    /// These values, each as one entry (malformed ones, or one twice).
    Raw(Vec<String>),
    /// No entry at all.
    Missing,
}

/// How a call that joins a branch was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joining {
    /// OK: the branch is prepared and the log names it.
    Joined,
    /// Refused (`FAILED_PRECONDITION`): nothing joined, nothing stays held.
    Refused,
    /// No answer: the branch may be prepared and joined, or not.
    Unknown,
}

/// Whether a status says nothing about what the server did: it was down,
/// slow, not the leader, or failing while it crashed.
pub fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
    )
}

/// `Bank.Debit` or `Bank.Credit` with `header`, waiting at most [`MOVE_TIMEOUT`].
///
/// # Errors
/// The bank's refusal, a transport failure, or `DEADLINE_EXCEEDED`.
pub async fn move_money(
    mut bank: BankClient<Channel>,
    kind: Move,
    header: &Header,
    account: &str,
    amount_minor: i64,
) -> Result<pb::MoveResponse, Status> {
    let mut request = tonic::Request::new(pb::MoveRequest { account: account.to_owned(), amount_minor });
    match header {
        Header::Context(context) => context.attach(request.metadata_mut()),
        Header::Raw(values) => {
            for value in values {
                let value = value.parse().map_err(|e| Status::internal(format!("not a metadata value: {e}")))?;
                request.metadata_mut().append(TXN_CONTEXT_METADATA_KEY, value);
            }
        }
        Header::Missing => {}
    }
    let call = async {
        match kind {
            Move::Debit => bank.debit(request).await,
            Move::Credit => bank.credit(request).await,
        }
    };
    match tokio::time::timeout(MOVE_TIMEOUT, call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {MOVE_TIMEOUT:?}"))),
    }
}

/// What a well-formed `Debit` or `Credit` under a begun txn's context was
/// answered, noting in `teller` an answer no documented outcome allows (a
/// well-formed call is never `INVALID_ARGUMENT`, `NOT_FOUND`...).
pub fn joining<T>(teller: &Teller, txn_id: TxnId, what: &str, answer: &Result<T, Status>) -> Joining {
    match answer {
        Ok(_) => Joining::Joined,
        Err(status) if status.code() == Code::FailedPrecondition => Joining::Refused,
        Err(status) if status.code() == Code::InvalidArgument && teller.ahead_of_a_bank(txn_id) => Joining::Refused,
        Err(status) if transient(status) => Joining::Unknown,
        Err(status) => {
            teller.misanswered(format!("{what}: {:?} {}", status.code(), status.message()));
            Joining::Unknown
        }
    }
}

/// Runs one interactive transfer by `plan` and records it in the teller's
/// history; returns the txn's id (None when a Begin that let the
/// coordinator pick the id got no answer) and what its client was told.
pub async fn transfer(teller: &Teller, plan: Plan) -> (Option<TxnId>, ClientOutcome) {
    let movement = Movement { from: plan.from.clone(), to: plan.to.clone(), amount_minor: plan.amount_minor };
    let asked = (!plan.coordinator_picks_id).then(TxnId::new);
    if let Some(txn_id) = asked {
        // Running from before its Begin: a stray Resolve may presume it
        // aborted first, and the Begin must then be refused.
        teller.start_running(txn_id, movement.clone());
    }
    let context = match calls::begin(teller.client(), asked, plan.timeout_ms).await {
        Ok(context) => context,
        Err(status) => {
            // Refused, or maybe begun with nothing joined: its deadline ends it.
            if status.code() == Code::InvalidArgument && !teller.clocks_off() {
                teller.misanswered(format!("Begin of a fresh txn {asked:?}: {:?} {}", status.code(), status.message()));
            }
            let Some(txn_id) = asked else { return (None, ClientOutcome::Abandoned) };
            teller.stop_running(txn_id);
            record(teller, txn_id, movement, ClientOutcome::Abandoned, BTreeSet::new());
            return (Some(txn_id), ClientOutcome::Abandoned);
        }
    };
    let txn_id = context.txn_id;
    if asked.is_some_and(|asked| asked != txn_id) {
        teller.misanswered(format!("Begin of {asked:?} answered the context of {txn_id}"));
    }
    teller.start_running(txn_id, movement.clone());
    let header = Header::Context(context);
    let mut joined = BTreeSet::new();
    let mut all_joined = true;
    let calls = [(Move::Debit, &plan.from), (Move::Credit, &plan.to)];
    for (made, (kind, account)) in calls.into_iter().enumerate() {
        if plan.ending == (Ending::Vanish { calls: made }) {
            break;
        }
        let Some(bank) = teller.bank(&account.bank) else { break };
        let answer = move_money(bank, kind, &header, &account.account, plan.amount_minor).await;
        match joining(teller, txn_id, &format!("{kind:?} in begun txn {txn_id}"), &answer) {
            Joining::Joined => {
                joined.insert(account.bank.clone());
            }
            // A polite client stops at the first call that failed.
            Joining::Refused | Joining::Unknown => {
                all_joined = false;
                break;
            }
        }
    }
    let outcome = if let Ending::Vanish { .. } = plan.ending {
        ClientOutcome::Abandoned
    } else {
        tokio::time::sleep(Duration::from_millis(plan.think_ms)).await;
        match plan.ending {
            Ending::Commit { retries } if all_joined => commit_asking_again(teller, txn_id, retries).await,
            _ => roll_back(teller, txn_id, "sim client rolls back").await,
        }
    };
    teller.stop_running(txn_id);
    record(teller, txn_id, movement, outcome, joined);
    (Some(txn_id), outcome)
}

fn record(teller: &Teller, txn_id: TxnId, movement: Movement, outcome: ClientOutcome, joined: BTreeSet<String>) {
    let txn = ClientTxn { txn_id, participants: joined.iter().cloned().collect(), movement: Some(movement), outcome };
    teller.record_interactive(txn, InteractiveTxn { joined, eager: false });
}

/// Commit, asking again up to `retries` times after no answer (a leader
/// crash): every ask gets the logged outcome (I5).
pub async fn commit_asking_again(teller: &Teller, txn_id: TxnId, retries: u32) -> ClientOutcome {
    let mut asked = 0;
    loop {
        let answer = calls::commit(teller.client(), txn_id, Vec::new()).await;
        match answer {
            Ok(r) => return committed(teller, txn_id, "Commit", r.decision),
            Err(status) if transient(&status) && asked < retries => {
                asked += 1;
                let pause = twopc_proto::host::with_rng(|rng| rng.random_range(COMMIT_RETRY_PAUSE_MS));
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            Err(status) => {
                if !transient(&status) && !excused(teller, &status, true) {
                    teller.misanswered(format!(
                        "Commit of begun txn {txn_id}: {:?} {}",
                        status.code(),
                        status.message()
                    ));
                }
                return ClientOutcome::Unknown;
            }
        }
    }
}

/// Rollback by the txn's own client: Aborted when answered Abort; else
/// nothing was decided by its word, and nobody committed it (Abandoned).
pub async fn roll_back(teller: &Teller, txn_id: TxnId, reason: &str) -> ClientOutcome {
    match calls::rollback(teller.client(), txn_id, reason).await {
        Ok(r) if r.decision == pb::Decision::Abort as i32 => ClientOutcome::Aborted,
        Ok(r) => {
            if let Ok(told) = Decision::try_from(r.decision) {
                teller.heard(txn_id, Hearer::Rollback, told);
            }
            teller.misanswered(format!("Rollback of begun txn {txn_id} answered decision {}", r.decision));
            ClientOutcome::Abandoned
        }
        // FAILED_PRECONDITION is Rollback's answer for a committed txn, which
        // the checker then finds committed without its client's word.
        Err(status) => {
            let documented =
                transient(&status) || status.code() == Code::FailedPrecondition || excused(teller, &status, true);
            if !documented {
                teller.misanswered(format!("Rollback of begun txn {txn_id}: {:?} {}", status.code(), status.message()));
            }
            ClientOutcome::Abandoned
        }
    }
}

/// What a Commit's decision tells its client.
fn committed(teller: &Teller, txn_id: TxnId, call: &str, decision: i32) -> ClientOutcome {
    match Decision::try_from(decision) {
        Ok(Decision::Commit) => ClientOutcome::Committed,
        Ok(Decision::Abort) => ClientOutcome::Aborted,
        Err(_) => {
            teller.misanswered(format!("{call} of {txn_id} answered no decision ({decision})"));
            ClientOutcome::Unknown
        }
    }
}

/// Refusals a call about a txn may get besides its documented ones: once
/// decided, a txn may be forgotten (§7.2; `known` txns only, unless a
/// coordinator's clock runs ahead); while a coordinator's clock is far off
/// ([`Teller::clocks_off`]), its id may be taken for one from the future
/// (`INVALID_ARGUMENT`) or from before the retention horizon (forgotten).
pub fn excused(teller: &Teller, status: &Status, known: bool) -> bool {
    let clocks_off = teller.clocks_off();
    let forgotten = twopc_proto::status::is_forgotten(status) && (known || clocks_off);
    forgotten || (clocks_off && status.code() == Code::InvalidArgument)
}
