//! `twopc view`: a materialized view over the banks' event stream (issue 18):
//! balances, debit and credit counts and each account's recent history,
//! rebuilt from NATS JetStream alone into the view's own redb store.
//!
//! [`sync`] reads the stream with a durable pull consumer and applies each
//! fetched batch in one durable redb write transaction that also records the
//! applied event ids; only then are the messages acknowledged. A crash
//! between the two gets them redelivered, and their ids, already recorded,
//! are skipped as duplicates: an event is applied once, however often it is
//! delivered or published (docs/PROTOCOL.md §14). [`ViewStore`] is the read
//! model, for `view accounts`, `view history` and in-process callers.
//!
//! Limits: a fetch takes at most `batch_max` messages; at most twice that are
//! delivered and not yet acknowledged (the consumer's max_ack_pending); each
//! account keeps its newest `history_max` events (older ones are dropped, its
//! balance and counts still include them); the most recent
//! [`SKIPPED_KEPT_MAX`] malformed messages are kept; the ids of the newest
//! `applied_ids_max` events applied (by stream sequence) are kept, which is
//! what makes re-delivery harmless: a message delivered again, or an event
//! republished past the stream's de-duplication window, is skipped if its
//! id is among them.
//!
//! # Layout
//! - this file: the `twopc view` commands (`sync`, `accounts`, `history`) and their output.
//! - [`store`]: [`ViewStore`], the read model in its own redb file, each event applied once by its id.
//! - [`sync`]: [`sync()`], the durable JetStream consumer that applies and then acknowledges.

mod store;
mod sync;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use twopc_bank::{AccountAddress, format_minor};

use crate::output::{ago, json, table};
use crate::{EXIT_OK, dir_arg};

pub use store::{EventKind, HistoryEntry, ViewStore};
pub use sync::{SyncConfig, sync};

/// The most accounts `view accounts` prints (the totals count them all).
const ACCOUNTS_SHOWN_MAX: usize = 10_000;

#[derive(Debug, Subcommand)]
pub enum ViewCommand {
    /// Apply the stream's new events to the view, then exit (or keep following with --follow).
    #[command(after_help = "Examples:\n  twopc view sync --data data/view\n  \
        twopc view sync --data data/view --follow --nats nats://127.0.0.1:4222\n\n\
        Each fetched batch is applied in one durable write that records the events' ids, and acked only \
        after it: an event is applied once however often it is delivered. Limits: --batch-max messages \
        per fetch, twice that delivered and unacked (the consumer's max_ack_pending), --history-max events \
        kept per account, the last 10000 malformed messages remembered, the ids of the newest \
        --applied-ids-max events applied (an event delivered again after that many newer ones would be \
        applied again). One consumer (--consumer) per view directory.")]
    Sync(Box<SyncArgs>),
    /// Every account in the view: balance, debits, credits and last event; and the totals.
    #[command(after_help = "Example:\n  twopc view accounts --data data/view")]
    Accounts(ReadArgs),
    /// One account's events in the view, newest first.
    #[command(after_help = "Example:\n  twopc view history alice@bank-a --data data/view --limit 5")]
    History(HistoryArgs),
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The view's directory (its store is DIR/view.redb).
    #[arg(long, value_parser = dir_arg)]
    pub data: PathBuf,
    /// The NATS server.
    #[arg(long, env = "TWOPC_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    #[command(flatten)]
    pub nats_connect: crate::nats::NatsArgs,
    /// The JetStream stream the banks publish to (`twopc bank --events-stream`).
    #[arg(long, default_value = "TWOPC")]
    pub stream: String,
    /// The durable consumer's name; use one per view directory.
    #[arg(long, default_value = "twopc-view")]
    pub consumer: String,
    /// Keep applying new events until Ctrl-C or SIGTERM; NATS being down is retried.
    #[arg(long)]
    pub follow: bool,
    /// The most messages fetched and applied at once (1 to 10000).
    #[arg(long, default_value_t = 256)]
    pub batch_max: usize,
    /// How long NATS waits for the ack of a delivered message before delivering it again (ms); must exceed
    /// the time to apply a batch.
    #[arg(long, default_value_t = 30_000)]
    pub ack_wait_ms: u64,
    /// The most events kept in each account's history; older ones are dropped (balances still count them).
    #[arg(long, default_value_t = 1000)]
    pub history_max: u64,
    /// The most applied event ids remembered (newest kept): an event delivered or republished again after this
    /// many newer ones would be applied again.
    #[arg(long, default_value_t = sync::APPLIED_IDS_MAX_DEFAULT)]
    pub applied_ids_max: u64,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// Test hook: exit with code 9 right after the durable apply of the batch that brings this run's applied
    /// count to at least N, before acking it (the crash point of cli/tests/view.rs).
    #[arg(long, hide = true)]
    pub exit_after_applied: Option<u64>,
    /// Test hook: exit with code 9 right after the first batch is fetched, before it is applied or acked.
    #[arg(long, hide = true)]
    pub exit_after_fetched: bool,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// The view's directory.
    #[arg(long, value_parser = dir_arg)]
    pub data: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The account, ACCOUNT@BANK.
    pub account: String,
    /// Show at most this many events.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[command(flatten)]
    pub read: ReadArgs,
}

pub async fn run(cmd: ViewCommand) -> anyhow::Result<u8> {
    match cmd {
        ViewCommand::Sync(args) => sync_command(*args).await,
        ViewCommand::Accounts(args) => accounts(&args),
        ViewCommand::History(args) => history(&args),
    }
}

async fn sync_command(args: SyncArgs) -> anyhow::Result<u8> {
    let config = SyncConfig {
        nats: args.nats_connect.connect(&args.nats)?,
        stream: args.stream,
        consumer: args.consumer,
        batch_max: args.batch_max,
        ack_wait_ms: args.ack_wait_ms,
        history_max: args.history_max,
        applied_ids_max: args.applied_ids_max,
        progress: !args.json,
        exit_after_applied: args.exit_after_applied,
        exit_after_fetched: args.exit_after_fetched,
        ..SyncConfig::new(&args.data)
    };
    let report = sync(&config, args.follow, super::servers::stop_signal()).await?;
    let totals = ViewStore::open(&args.data)?.totals()?;
    if args.json {
        json(&json!({
            "applied": report.applied, "duplicates": report.duplicates, "skipped": report.skipped,
            "account_count": totals.account_count, "total": format_minor(totals.balance_minor),
            "total_minor": totals.balance_minor,
        }));
    } else {
        println!(
            "applied {} events, skipped {} duplicates and {} malformed; the view holds {} accounts, total {}",
            report.applied,
            report.duplicates,
            report.skipped,
            totals.account_count,
            format_minor(totals.balance_minor)
        );
    }
    Ok(EXIT_OK)
}

fn entry_json(e: &HistoryEntry) -> serde_json::Value {
    json!({
        "id": e.id, "txn_id": e.txn_id, "kind": e.kind.as_str(), "amount": format_minor(e.amount_minor),
        "amount_minor": e.amount_minor, "stream_seq": e.stream_seq, "published_unix_ms": e.published_unix_ms,
    })
}

/// An entry as "credit 12.50 (txn ID)" or "opened 100.00".
fn entry_text(e: &HistoryEntry) -> String {
    match e.kind {
        EventKind::Opened => format!("opened {}", format_minor(e.amount_minor)),
        kind => format!("{} {} (txn {})", kind.as_str(), format_minor(e.amount_minor), e.txn_id),
    }
}

fn accounts(args: &ReadArgs) -> anyhow::Result<u8> {
    let store = ViewStore::open_existing(&args.data)?;
    let mut accounts = store.accounts()?;
    let totals = store.totals()?;
    let shown_all = accounts.len() <= ACCOUNTS_SHOWN_MAX;
    accounts.truncate(ACCOUNTS_SHOWN_MAX);
    if args.json {
        let rows: Vec<serde_json::Value> = accounts
            .iter()
            .map(|a| {
                json!({
                    "account": a.account, "balance": format_minor(a.balance_minor), "balance_minor": a.balance_minor,
                    "debits": a.debit_count, "credits": a.credit_count, "last_event": a.last.as_ref().map(entry_json),
                })
            })
            .collect();
        json(&json!({
            "accounts": rows, "account_count": totals.account_count, "total": format_minor(totals.balance_minor),
            "total_minor": totals.balance_minor, "events_applied": totals.applied, "duplicates": totals.duplicates,
            "skipped": totals.skipped,
        }));
    } else {
        let rows: Vec<Vec<String>> = accounts
            .iter()
            .map(|a| {
                vec![
                    a.account.clone(),
                    format_minor(a.balance_minor),
                    a.debit_count.to_string(),
                    a.credit_count.to_string(),
                    a.last.as_ref().map_or_else(|| "-".into(), entry_text),
                ]
            })
            .collect();
        table(&["ACCOUNT", " BALANCE", " DEBITS", " CREDITS", "LAST EVENT"], &rows);
        println!(
            "{} accounts, total {}; {} events applied ({} duplicates and {} malformed skipped)",
            totals.account_count,
            format_minor(totals.balance_minor),
            totals.applied,
            totals.duplicates,
            totals.skipped
        );
    }
    if !shown_all {
        eprintln!("(showing the first {ACCOUNTS_SHOWN_MAX})");
    }
    Ok(EXIT_OK)
}

fn history(args: &HistoryArgs) -> anyhow::Result<u8> {
    let address: AccountAddress = args.account.parse().context("account")?;
    let store = ViewStore::open_existing(&args.read.data)?;
    let entries = store.history(&address, args.limit)?;
    if entries.is_empty() {
        bail!("the view has no events of {address}");
    }
    if args.read.json {
        json(&json!({ "account": address.to_string(), "events": entries.iter().map(entry_json).collect::<Vec<_>>() }));
        return Ok(EXIT_OK);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let signed = if e.kind == EventKind::Debit {
                format!("-{}", format_minor(e.amount_minor))
            } else {
                format_minor(e.amount_minor)
            };
            vec![ago(e.published_unix_ms), e.kind.as_str().to_owned(), signed, e.txn_id.clone(), e.id.clone()]
        })
        .collect();
    table(&["PUBLISHED", "KIND", " AMOUNT", "TXN", "EVENT"], &rows);
    Ok(EXIT_OK)
}
