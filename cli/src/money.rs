//! `twopc transfer`, `twopc balance` and `twopc accounts`: money through the
//! cluster (transfers) and straight from a bank (balances, accounts), the
//! bank's address read from the cluster's participant registry.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use twopc_bank::{AccountAddress, Transfer, format_minor, parse_amount, parse_balance};
use twopc_client::ClusterClient;
use twopc_proto::pb::bank_client::BankClient;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, pb};

use super::interactive;
use super::output::{json, table};
use super::{ClusterArgs, EXIT_ABORTED, EXIT_ERROR, EXIT_OK, EXIT_UNKNOWN};

#[derive(Debug, Args)]
pub struct TransferArgs {
    /// The paying account, ACCOUNT@BANK.
    #[arg(long)]
    pub from: String,
    /// The paid account, ACCOUNT@BANK.
    #[arg(long)]
    pub to: String,
    /// The amount, such as 12.50 (at most two decimals).
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
    /// Reuse a txn id to retry a transfer whose outcome was unknown (safe: same id, same outcome). With
    /// --interactive: a decided txn reports its outcome; an open one gets the calls its banks have not
    /// joined yet, then the Commit.
    #[arg(long)]
    pub txn_id: Option<String>,
    /// Give up preparing after this long (ms); at most the cluster's deadline_max_ms. With --interactive,
    /// the txn's timeout: the cluster aborts it ("timed out") if it is not committed by then.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Run it as an interactive txn (docs/PROTOCOL.md §12), the way an application would: Begin, Debit at
    /// the payer's bank and Credit at the payee's, each with the txn's context, then Commit. A refused or
    /// failed call rolls the txn back and prints why. Payer and payee at one bank (which holds one branch
    /// per txn): Begin, then Commit with one one-shot branch holding both moves.
    #[arg(long)]
    pub interactive: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// The outcome of one transfer, as the demo and the CLI report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Logged Commit.
    Committed,
    /// Logged Abort, with the reason.
    Aborted(String),
    /// The cluster gave no answer in time; the txn may or may not have been decided.
    Unknown(String),
}

/// Submits a transfer with `txn_id` and returns its logged outcome.
///
/// # Errors
/// The cluster refused the request (bad input, unknown bank).
pub async fn submit_transfer(
    client: &ClusterClient,
    transfer: &Transfer,
    txn_id: TxnId,
    timeout: Duration,
) -> Result<Outcome, tonic::Status> {
    let request = pb::SubmitRequest {
        txn_id: txn_id.to_string(),
        branches: transfer.submit_branches(),
        deadline_unix_ms: unix_now_ms() + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    submit(client, request).await
}

/// Submits a txn and returns its logged outcome.
///
/// # Errors
/// As [`submit_transfer`].
pub async fn submit(client: &ClusterClient, request: pb::SubmitRequest) -> Result<Outcome, tonic::Status> {
    let result = client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.submit(request).await }
        })
        .await;
    match result {
        Ok(response) if response.decision == pb::Decision::Commit as i32 => Ok(Outcome::Committed),
        Ok(response) => Ok(Outcome::Aborted(response.reason)),
        Err(status) if twopc_proto::status::is_retryable(&status) => Ok(Outcome::Unknown(status.message().to_owned())),
        Err(status) => Err(status),
    }
}

pub async fn transfer(args: TransferArgs) -> anyhow::Result<u8> {
    // Everything is checked before anything is sent: bad input moves no money.
    let from: AccountAddress = args.from.parse().context("--from")?;
    let to: AccountAddress = args.to.parse().context("--to")?;
    let amount = parse_amount(&args.amount).context("--amount")?;
    let transfer = Transfer::new(from, to, amount)?;
    let txn_id = match &args.txn_id {
        Some(text) => text.parse::<TxnId>().context("--txn-id")?,
        None => TxnId::new(),
    };
    let client = args.cluster.client()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let outcome = if args.interactive {
        let banks = registered(&client, &[transfer.from().bank.to_string(), transfer.to().bank.to_string()]).await?;
        let banks = interactive::Banks::new(&banks)?;
        let resume = args.txn_id.is_some();
        interactive::transfer(&client, &banks, &transfer, txn_id, timeout, interactive::Calls::Sequential, resume)
            .await?
    } else {
        submit_transfer(&client, &transfer, txn_id, timeout).await?
    };
    let (word, reason, code) = match &outcome {
        Outcome::Committed => ("committed", String::new(), EXIT_OK),
        Outcome::Aborted(reason) => ("aborted", reason.clone(), EXIT_ABORTED),
        Outcome::Unknown(reason) => ("unknown", reason.clone(), EXIT_UNKNOWN),
    };
    if args.cluster.json {
        json(&json!({
            "txn_id": txn_id.to_string(), "outcome": word, "reason": reason,
            "mode": if args.interactive { "interactive" } else { "one-shot" },
            "from": transfer.from().to_string(), "to": transfer.to().to_string(),
            "amount": format_minor(transfer.amount_minor()),
        }));
        return Ok(code);
    }
    match outcome {
        Outcome::Committed => println!("committed: {transfer} (txn {txn_id})"),
        Outcome::Aborted(reason) => eprintln!("error: aborted: {reason} (txn {txn_id}; no money moved)"),
        Outcome::Unknown(reason) => eprintln!(
            "error: outcome unknown: {reason}; check with `twopc txn show {txn_id}` or retry with --txn-id {txn_id}"
        ),
    }
    Ok(code)
}

/// The registered (name, address) of each of `wanted` (repeats once).
async fn registered(client: &ClusterClient, wanted: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let list = client.admin(|mut c| async move { c.list_participants(pb::ListParticipantsRequest {}).await }).await?;
    let mut found: Vec<(String, String)> = Vec::new();
    for bank in wanted {
        if found.iter().any(|(name, _)| name == bank) {
            continue;
        }
        let addr = list
            .participants
            .iter()
            .find(|p| &p.name == bank)
            .map(|p| p.addr.clone())
            .with_context(|| format!("no bank named {bank} is registered (see `twopc participants list`)"))?;
        found.push((bank.clone(), addr));
    }
    Ok(found)
}

/// A client of `bank`'s Bank API, at `addr` or at the address the cluster's registry holds.
async fn bank_client(cluster: &ClusterArgs, bank: &str, addr: Option<&str>) -> anyhow::Result<BankClient<Channel>> {
    let addr = match addr {
        Some(addr) => addr.to_owned(),
        None => {
            let list = cluster
                .client()?
                .admin(|mut c| async move { c.list_participants(pb::ListParticipantsRequest {}).await })
                .await?;
            list.participants
                .into_iter()
                .find(|p| p.name == bank)
                .map(|p| p.addr)
                .with_context(|| format!("no bank named {bank} is registered (see `twopc participants list`)"))?
        }
    };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("{addr} is not host:port"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    let dial = match super::certs::cli_tls()? {
        Some(tls) => Some(tls.dial(&twopc_proto::tls::Identity::participant(bank).dns_name())?),
        None => None,
    };
    let channel = twopc_proto::net::connect_with(&endpoint, dial)
        .await
        .with_context(|| format!("cannot reach bank {bank} at {addr}"))?;
    Ok(BankClient::new(channel))
}

#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// The account, ACCOUNT@BANK.
    pub account: String,
    /// The bank's address; default: ask the cluster's registry.
    #[arg(long)]
    pub bank_addr: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

fn account_row(a: &pb::Account) -> Vec<String> {
    vec![
        a.name.clone(),
        format_minor(a.balance_minor),
        format_minor(a.held_minor),
        format_minor(a.available_minor),
        format_minor(a.incoming_minor),
    ]
}

fn account_json(a: &pb::Account) -> serde_json::Value {
    json!({
        "account": a.name, "balance": format_minor(a.balance_minor), "held": format_minor(a.held_minor),
        "available": format_minor(a.available_minor), "incoming": format_minor(a.incoming_minor),
        "balance_minor": a.balance_minor, "held_minor": a.held_minor,
    })
}

const ACCOUNT_HEADERS: [&str; 5] = ["ACCOUNT", " BALANCE", " HELD", " AVAILABLE", " INCOMING"];

pub async fn balance(args: BalanceArgs) -> anyhow::Result<u8> {
    let address: AccountAddress = args.account.parse().context("account")?;
    let bank = address.bank.to_string();
    let mut client = bank_client(&args.cluster, &bank, args.bank_addr.as_deref()).await?;
    let response = client.balance(pb::BalanceRequest { account: address.account.to_string() }).await?.into_inner();
    let account = response.account.context("the bank answered without an account")?;
    if args.cluster.json {
        json(&account_json(&account));
    } else {
        table(&ACCOUNT_HEADERS, &[account_row(&account)]);
    }
    Ok(EXIT_OK)
}

#[derive(Debug, Args)]
pub struct AccountsArgs {
    /// The bank, such as bank-a.
    pub bank: String,
    /// Create this account (with --balance) instead of listing.
    #[arg(long)]
    pub create: Option<String>,
    /// The new account's opening balance, such as 100.00.
    #[arg(long, requires = "create", default_value = "0")]
    pub balance: String,
    /// The bank's address; default: ask the cluster's registry.
    #[arg(long)]
    pub bank_addr: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Accounts listed per page when walking a bank's accounts.
const ACCOUNTS_PAGE: u32 = 500;
/// The most accounts `twopc accounts` prints.
const ACCOUNTS_SHOWN_MAX: usize = 10_000;

pub async fn accounts(args: AccountsArgs) -> anyhow::Result<u8> {
    let mut client = bank_client(&args.cluster, &args.bank, args.bank_addr.as_deref()).await?;
    if let Some(name) = &args.create {
        let initial = parse_balance(&args.balance).context("--balance")?;
        let request = pb::CreateAccountRequest { account: name.clone(), initial_balance_minor: initial };
        client.create_account(request).await?;
        println!("created {name}@{} with {}", args.bank, format_minor(initial));
        return Ok(EXIT_OK);
    }
    let mut accounts = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_accounts(pb::ListAccountsRequest { page_size: ACCOUNTS_PAGE, page_token: page_token.clone() })
            .await?
            .into_inner();
        accounts.extend(page.accounts);
        if page.next_page_token.is_empty() || accounts.len() >= ACCOUNTS_SHOWN_MAX {
            break;
        }
        page_token = page.next_page_token;
    }
    let total = client.total(pb::TotalRequest {}).await?.into_inner();
    if args.cluster.json {
        json(&json!({
            "accounts": accounts.iter().map(account_json).collect::<Vec<_>>(),
            "total": format_minor(total.balance_total_minor), "held": format_minor(total.held_total_minor),
            "account_count": total.account_count,
        }));
    } else {
        let rows: Vec<Vec<String>> = accounts.iter().map(account_row).collect();
        table(&ACCOUNT_HEADERS, &rows);
        println!(
            "{} accounts, total {} ({} held)",
            total.account_count,
            format_minor(total.balance_total_minor),
            format_minor(total.held_total_minor)
        );
    }
    if accounts.len() >= ACCOUNTS_SHOWN_MAX {
        eprintln!("(showing the first {ACCOUNTS_SHOWN_MAX}; use the Bank API to page further)");
    }
    Ok(if accounts.is_empty() && total.account_count > 0 { EXIT_ERROR } else { EXIT_OK })
}
