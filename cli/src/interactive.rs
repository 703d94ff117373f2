//! Interactive transfers (docs/PROTOCOL.md §12), the way an application
//! makes them: Begin at the cluster, `Debit` at the payer's bank and `Credit`
//! at the payee's, each carrying the txn's context (the `twopc-txn` metadata
//! entry, through [`twopc_client::TxnInterceptor`]), then Commit. A refused or
//! failed call rolls the txn back with the reason. `transfer --interactive`,
//! `demo --interactive` and `bench --mode interactive` all run through here.
//!
//! A bank holds one branch per txn, so a transfer within one bank cannot be
//! a Debit and a Credit there: it is begun and committed with one one-shot
//! branch holding both moves (`Commit { branches }`, §12.4).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use twopc_bank::Transfer;
use twopc_client::{ClusterClient, Transaction, TxnInterceptor};
use twopc_proto::pb::bank_client::BankClient;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, MAX_MESSAGE_BYTES, TxnId, pb, status};

use super::money::Outcome;

/// How long a bank may take to connect before a Debit or Credit counts as failed.
const BANK_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Lazily connected channels to the banks' Bank API, by bank name.
#[derive(Clone)]
pub struct Banks {
    channels: HashMap<String, Channel>,
}

impl Banks {
    /// Channels to `banks` (name, `host:port`), over mutual TLS when the
    /// command runs with it. Connects on first use.
    pub fn new(banks: &[(String, String)]) -> anyhow::Result<Self> {
        let tls = super::certs::cli_tls()?;
        let mut channels = HashMap::new();
        for (name, addr) in banks {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .with_context(|| format!("{name}'s address {addr} is not host:port"))?
                .connect_timeout(BANK_CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            let dial = match &tls {
                Some(tls) => Some(tls.dial(&twopc_proto::tls::Identity::participant(name).dns_name())?),
                None => None,
            };
            channels.insert(name.clone(), twopc_proto::net::lazy_channel_with(&endpoint, dial));
        }
        Ok(Self { channels })
    }

    /// The Bank API of `bank`, every call carrying `txn`'s context.
    fn within(
        &self,
        bank: &str,
        txn: &Transaction,
    ) -> Result<BankClient<InterceptedService<Channel, TxnInterceptor>>, Status> {
        let channel = self.channels.get(bank).ok_or_else(|| {
            Status::not_found(format!("no bank named {bank} is known (see `twopc participants list`)"))
        })?;
        Ok(BankClient::with_interceptor(channel.clone(), txn.interceptor())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// Whether a transfer's Debit and Credit are made one after the other (what
/// an application usually does: no Credit once the Debit is refused) or at
/// once (the bench, for latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    Sequential,
    Concurrent,
}

/// How a transfer was run, for the demo's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Begin, Debit and Credit at two banks, Commit.
    Joined,
    /// Payer and payee at one bank: Begin, then Commit with one one-shot branch.
    OneShotBranch,
}

impl Shape {
    pub fn of(transfer: &Transfer) -> Self {
        if transfer.from().bank == transfer.to().bank { Self::OneShotBranch } else { Self::Joined }
    }
}

/// Runs `transfer` as the interactive txn `txn_id` and returns its logged outcome.
///
/// `resume`: the txn may have been begun by an earlier run with this id
/// (`transfer --txn-id`): a decided one answers its outcome, and an open one
/// gets only the calls whose bank has not joined yet before the Commit.
///
/// # Errors
/// A status the cluster refused with (bad input, unknown or forgotten txn).
/// A bank's refusal is not an error: the txn is rolled back and the outcome
/// is that Abort.
pub async fn transfer(
    client: &ClusterClient,
    banks: &Banks,
    transfer: &Transfer,
    txn_id: TxnId,
    timeout: Duration,
    calls: Calls,
    resume: bool,
) -> Result<Outcome, Status> {
    let txn = match client.begin_with_id(txn_id, timeout).await {
        Ok(txn) => txn,
        Err(refused) if status::is_retryable(&refused) => {
            // Nothing was called at a bank: if the Begin was logged, the txn times out with nothing held.
            return Ok(Outcome::Unknown(format!("Begin not answered: {}", refused.message())));
        }
        Err(refused) if resume && refused.code() == Code::FailedPrecondition => {
            return logged_outcome(client, txn_id).await?.ok_or(refused);
        }
        Err(refused) => return Err(refused),
    };
    if Shape::of(transfer) == Shape::OneShotBranch {
        return finish(txn.commit_with(transfer.submit_branches()).await);
    }
    let joined = if resume { joined_banks(client, txn_id).await? } else { Vec::new() };
    let moves = [
        Move::debit(&transfer.from().bank.to_string(), transfer.from().account.as_str(), transfer.amount_minor()),
        Move::credit(&transfer.to().bank.to_string(), transfer.to().account.as_str(), transfer.amount_minor()),
    ];
    let moves: Vec<Move> = moves.into_iter().filter(|m| !joined.contains(&m.bank)).collect();
    run(&txn, banks, &moves, calls).await
}

/// Begins a fresh txn, makes `moves` under it (each at a different bank) and
/// commits, or rolls back if a call is refused or fails.
///
/// # Errors
/// As [`transfer`].
pub async fn begin_and_run(
    client: &ClusterClient,
    banks: &Banks,
    moves: &[Move],
    timeout: Duration,
    calls: Calls,
) -> Result<Outcome, Status> {
    match client.begin(timeout).await {
        Ok(txn) => run(&txn, banks, moves, calls).await,
        Err(refused) if status::is_retryable(&refused) => {
            Ok(Outcome::Unknown(format!("Begin not answered: {}", refused.message())))
        }
        Err(refused) => Err(refused),
    }
}

/// Makes `moves` under `txn`, then commits; on a refused or failed call, rolls back with its reason.
async fn run(txn: &Transaction, banks: &Banks, moves: &[Move], calls: Calls) -> Result<Outcome, Status> {
    let called = match calls {
        Calls::Sequential => {
            let mut called = Ok(());
            for one in moves {
                called = one.call(banks, txn).await;
                if called.is_err() {
                    break;
                }
            }
            called
        }
        Calls::Concurrent => {
            let all = futures::future::join_all(moves.iter().map(|one| one.call(banks, txn))).await;
            all.into_iter().collect::<Result<Vec<()>, String>>().map(drop)
        }
    };
    match called {
        Ok(()) => finish(txn.commit().await),
        // The branch may or may not be prepared and joined (a lost answer):
        // the rollback decides Abort either way, and the bank learns it from
        // phase 2 or its resolver.
        Err(reason) => match txn.rollback(&reason).await {
            Ok(outcome) => Ok(Outcome::Aborted(outcome.reason)),
            Err(refused) if status::is_retryable(&refused) => Ok(Outcome::Unknown(format!(
                "{reason}; the rollback was not answered ({}), so the txn aborts at its deadline unless committed",
                refused.message()
            ))),
            Err(refused) => Err(refused),
        },
    }
}

/// A Commit's answer as a transfer's outcome: a lost answer is an unknown outcome.
fn finish(committed: Result<twopc_client::Outcome, Status>) -> Result<Outcome, Status> {
    match committed {
        Ok(outcome) if outcome.is_commit() => Ok(Outcome::Committed),
        Ok(outcome) => Ok(Outcome::Aborted(outcome.reason)),
        Err(refused) if status::is_retryable(&refused) => Ok(Outcome::Unknown(refused.message().to_owned())),
        Err(refused) => Err(refused),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Debit,
    Credit,
}

/// One Debit or Credit at a bank, made under a txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub side: Side,
    pub bank: String,
    pub account: String,
    pub amount_minor: i64,
}

impl Move {
    pub fn debit(bank: &str, account: &str, amount_minor: i64) -> Self {
        Self { side: Side::Debit, bank: bank.to_owned(), account: account.to_owned(), amount_minor }
    }

    pub fn credit(bank: &str, account: &str, amount_minor: i64) -> Self {
        Self { side: Side::Credit, bank: bank.to_owned(), account: account.to_owned(), amount_minor }
    }

    /// Makes the call under `txn`; `Err` is the reason to roll back with.
    async fn call(&self, banks: &Banks, txn: &Transaction) -> Result<(), String> {
        let word = match self.side {
            Side::Debit => "debit",
            Side::Credit => "credit",
        };
        let bank = &self.bank;
        let mut bank_api = banks.within(bank, txn).map_err(|e| format!("{word} at {bank}: {}", e.message()))?;
        let mut request =
            tonic::Request::new(pb::MoveRequest { account: self.account.clone(), amount_minor: self.amount_minor });
        // The branch must be joined by the deadline; waiting longer is pointless.
        let left_ms = txn.deadline_unix_ms().saturating_sub(unix_now_ms()).max(1);
        request.set_timeout(Duration::from_millis(left_ms));
        let answered = match self.side {
            Side::Debit => bank_api.debit(request).await,
            Side::Credit => bank_api.credit(request).await,
        };
        answered.map(drop).map_err(|refused| {
            let how = if refused.code() == Code::FailedPrecondition { "refused" } else { "failed" };
            format!("{word} at {bank} {how}: {}", refused.message())
        })
    }
}

/// The banks that joined the open txn `txn_id` (every branch of a begun txn joined).
async fn joined_banks(client: &ClusterClient, txn_id: TxnId) -> Result<Vec<String>, Status> {
    Ok(get(client, txn_id).await?.branches.into_iter().map(|b| b.participant).collect())
}

/// The logged outcome of a decided txn, or `None` when it is not decided.
async fn logged_outcome(client: &ClusterClient, txn_id: TxnId) -> Result<Option<Outcome>, Status> {
    let info = get(client, txn_id).await?;
    Ok(match Decision::try_from(info.decision) {
        Ok(Decision::Commit) => Some(Outcome::Committed),
        Ok(Decision::Abort) => Some(Outcome::Aborted(info.reason)),
        Err(_) => None,
    })
}

async fn get(client: &ClusterClient, txn_id: TxnId) -> Result<pb::TransactionInfo, Status> {
    let request = pb::GetTransactionRequest { txn_id: txn_id.to_string() };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.get_transaction(request).await }
        })
        .await
}
