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
//! [`SKIPPED_KEPT_MAX`] malformed messages are kept. The set of applied
//! event ids grows by one key per event applied: it is what makes
//! re-delivery harmless.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream::{self, consumer::PullConsumer};
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use prost::Message as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::json;
use tracing::warn;
use twopc_bank::{AccountAddress, format_minor};
use twopc_proto::pb::{self, bank_event};

use super::output::{ago, json, table};
use super::{EXIT_OK, dir_arg};

/// The store file inside the view's directory.
pub const STORE_FILE: &str = "view.redb";
/// The most malformed messages the store remembers (oldest dropped first).
pub const SKIPPED_KEPT_MAX: u64 = 10_000;
/// The largest `batch_max`.
pub const BATCH_MAX_LIMIT: usize = 10_000;
/// The longest event id accepted; a longer one is malformed.
const EVENT_ID_LEN_MAX: usize = 512;
/// How long one pull waits for the next message before asking again.
const PULL_WAIT: Duration = Duration::from_secs(1);
/// The longest pause between attempts to reach NATS while following.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);
/// How often a long sync prints a progress line.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);
/// The most accounts `view accounts` prints (the totals count them all).
const ACCOUNTS_SHOWN_MAX: usize = 10_000;

/// Event id -> the stream sequence it was applied from.
const APPLIED: TableDefinition<&str, u64> = TableDefinition::new("view_applied");
/// ACCOUNT@BANK -> [`StoredAccount`].
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("view_accounts");
/// (ACCOUNT@BANK, n) -> [`StoredEntry`], n counting up from 0 per account.
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("view_history");
/// Stream sequence of a malformed message -> why it was skipped.
const SKIPPED: TableDefinition<u64, &str> = TableDefinition::new("view_skipped");
/// Counters: [`APPLIED_TOTAL`], [`DUPLICATES_TOTAL`], [`SKIPPED_TOTAL`], [`LAST_STREAM_SEQ`].
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("view_counters");
/// [`BOUND_STREAM`] -> the stream this store was built from.
const BINDING: TableDefinition<&str, &str> = TableDefinition::new("view_binding");

const APPLIED_TOTAL: &str = "applied";
const DUPLICATES_TOTAL: &str = "duplicates";
const SKIPPED_TOTAL: &str = "skipped";
/// The highest stream sequence applied, skipped or found a duplicate.
const LAST_STREAM_SEQ: &str = "last_stream_seq";
const BOUND_STREAM: &str = "stream";

// ---------------------------------------------------------------- the store

/// What an event did to its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The account was opened with an opening balance.
    Opened,
    /// Funds left the account (a committed transfer's debit).
    Debit,
    /// Funds arrived (a committed transfer's credit).
    Credit,
}

impl EventKind {
    /// `opened`, `debit` or `credit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "opened",
            Self::Debit => "debit",
            Self::Credit => "credit",
        }
    }

    fn from_i32(kind: i32) -> Self {
        match kind {
            1 => Self::Debit,
            2 => Self::Credit,
            _ => Self::Opened,
        }
    }

    fn to_i32(self) -> i32 {
        match self {
            Self::Opened => 0,
            Self::Debit => 1,
            Self::Credit => 2,
        }
    }
}

/// One event in an account's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The event's id.
    pub id: String,
    /// The transfer's txn id; empty for an opening.
    pub txn_id: String,
    /// Opened, debit or credit.
    pub kind: EventKind,
    /// The amount (the opening balance for an opening), above 0 for a debit or credit.
    pub amount_minor: i64,
    /// Its sequence number in the stream.
    pub stream_seq: u64,
    /// When the stream received it (Unix milliseconds).
    pub published_unix_ms: u64,
}

/// One account as the view holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    /// ACCOUNT@BANK.
    pub account: String,
    /// Opening balance plus credits minus debits.
    pub balance_minor: i64,
    /// Debits applied.
    pub debit_count: u64,
    /// Credits applied.
    pub credit_count: u64,
    /// The last event applied.
    pub last: Option<HistoryEntry>,
}

/// The whole view at a glance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Accounts with at least one event.
    pub account_count: u64,
    /// The sum of their balances.
    pub balance_minor: i64,
    /// Events applied, ever.
    pub applied: u64,
    /// Deliveries skipped because their event id (or malformed message) was already recorded.
    pub duplicates: u64,
    /// Malformed messages skipped.
    pub skipped: u64,
}

/// One message as delivered from the stream.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Its stream sequence number.
    pub stream_seq: u64,
    /// When the stream received it (Unix milliseconds).
    pub published_unix_ms: u64,
    /// A [`pb::BankEvent`], or not (then it is skipped as malformed).
    pub payload: bytes::Bytes,
}

/// What applying one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events applied.
    pub applied: u64,
    /// Deliveries of events (or malformed messages) already recorded.
    pub duplicates: u64,
    /// Malformed messages, now recorded and skipped.
    pub skipped: u64,
}

/// An account as stored.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredAccount {
    #[prost(int64, tag = "1")]
    balance_minor: i64,
    #[prost(uint64, tag = "2")]
    debit_count: u64,
    #[prost(uint64, tag = "3")]
    credit_count: u64,
    #[prost(bool, tag = "4")]
    opened: bool,
    /// The key of its oldest kept history entry.
    #[prost(uint64, tag = "5")]
    history_first: u64,
    /// The key its next history entry gets.
    #[prost(uint64, tag = "6")]
    history_next: u64,
    #[prost(message, optional, tag = "7")]
    last: Option<StoredEntry>,
}

/// A history entry as stored.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredEntry {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    txn_id: String,
    #[prost(int32, tag = "3")]
    kind: i32,
    #[prost(int64, tag = "4")]
    amount_minor: i64,
    #[prost(uint64, tag = "5")]
    stream_seq: u64,
    #[prost(uint64, tag = "6")]
    published_unix_ms: u64,
}

impl StoredEntry {
    fn entry(&self) -> HistoryEntry {
        HistoryEntry {
            id: self.id.clone(),
            txn_id: self.txn_id.clone(),
            kind: EventKind::from_i32(self.kind),
            amount_minor: self.amount_minor,
            stream_seq: self.stream_seq,
            published_unix_ms: self.published_unix_ms,
        }
    }
}

/// A well-formed event, checked and in domain terms.
struct Event {
    id: String,
    account: String,
    kind: EventKind,
    txn_id: String,
    amount_minor: i64,
}

/// The event in `payload`, or why it is malformed.
fn decode(payload: &[u8]) -> Result<Event, String> {
    let event = pb::BankEvent::decode(payload).map_err(|e| format!("not a BankEvent: {e}"))?;
    if event.id.is_empty() || event.id.len() > EVENT_ID_LEN_MAX {
        return Err(format!("the event id must be 1 to {EVENT_ID_LEN_MAX} bytes"));
    }
    let (kind, txn_id, bank, account, amount_minor) = match event.event {
        Some(bank_event::Event::Debited(d)) => (EventKind::Debit, d.txn_id, d.bank, d.account, d.amount_minor),
        Some(bank_event::Event::Credited(c)) => (EventKind::Credit, c.txn_id, c.bank, c.account, c.amount_minor),
        Some(bank_event::Event::Opened(o)) => (EventKind::Opened, String::new(), o.bank, o.account, o.initial_minor),
        None => return Err(format!("event {} has no debit, credit or opening", event.id)),
    };
    let address: AccountAddress =
        format!("{account}@{bank}").parse().map_err(|e| format!("event {}: {e}", event.id))?;
    let amount_ok = if kind == EventKind::Opened { amount_minor >= 0 } else { amount_minor > 0 };
    if !amount_ok {
        return Err(format!("event {}: amount {amount_minor} is out of range", event.id));
    }
    if kind != EventKind::Opened && txn_id.is_empty() {
        return Err(format!("event {}: no txn id", event.id));
    }
    Ok(Event { id: event.id, account: address.to_string(), kind, txn_id, amount_minor })
}

/// The view's redb store: the read model and the ids of the events in it.
/// One process at a time has it open; cloning shares the open store.
#[derive(Clone)]
pub struct ViewStore {
    db: Arc<Database>,
    dir: PathBuf,
}

fn in_use(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "the view store {} is in use by another `twopc view` (a running `view sync --follow`?)",
        dir.display()
    )
}

impl ViewStore {
    /// Opens the store in `dir`, creating both on first use.
    ///
    /// # Errors
    /// The store is open in another process, or cannot be created or read.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let db = match Database::create(dir.join(STORE_FILE)) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(in_use(dir)),
            Err(e) => return Err(e).with_context(|| format!("cannot open the view store {}", dir.display())),
        };
        let init = db.begin_write()?;
        init.open_table(APPLIED)?;
        init.open_table(ACCOUNTS)?;
        init.open_table(HISTORY)?;
        init.open_table(SKIPPED)?;
        init.open_table(COUNTERS)?;
        init.open_table(BINDING)?;
        init.commit()?;
        Ok(Self { db: Arc::new(db), dir: dir.to_owned() })
    }

    /// Opens the existing store in `dir`, for reading.
    ///
    /// # Errors
    /// There is none (sync first), or as [`ViewStore::open`].
    pub fn open_existing(dir: &Path) -> anyhow::Result<Self> {
        if !dir.join(STORE_FILE).exists() {
            bail!("there is no view in {}; build one with `twopc view sync --data {0}`", dir.display());
        }
        Self::open(dir)
    }

    /// Records that this store is built from `stream`.
    ///
    /// # Errors
    /// It was built from another stream, or the store fails.
    pub fn bind(&self, stream: &str) -> anyhow::Result<()> {
        let write = self.db.begin_write()?;
        {
            let mut binding = write.open_table(BINDING)?;
            let bound = binding.get(BOUND_STREAM)?.map(|v| v.value().to_owned());
            match bound {
                Some(bound) if bound != stream => bail!(
                    "the view store {} was built from stream {bound}, not {stream}; give --stream {bound} or another --data",
                    self.dir.display()
                ),
                Some(_) => {}
                None => {
                    binding.insert(BOUND_STREAM, stream)?;
                }
            }
        }
        write.commit()?;
        Ok(())
    }

    /// Applies `batch` in one durable write transaction: each event whose id
    /// is not yet recorded changes its account and is recorded; the rest are
    /// counted as duplicates; malformed messages are recorded as skipped.
    /// Keeps each account's newest `history_max` events.
    ///
    /// To ensure correctness, acknowledge the batch only after this returns
    /// Ok: then a message is never lost, and one delivered again is skipped.
    ///
    /// # Errors
    /// The store fails; nothing of the batch is then applied.
    pub fn apply(&self, batch: &[Delivered], history_max: u64) -> anyhow::Result<BatchOutcome> {
        assert!(history_max > 0, "history_max is validated above 0");
        let mut outcome = BatchOutcome::default();
        let mut write = self.db.begin_write()?;
        // Persist before acknowledging (docs/PROTOCOL.md §14): this commit is
        // what makes the acks that follow safe.
        write.set_durability(Durability::Immediate)?;
        {
            let mut applied = write.open_table(APPLIED)?;
            let mut accounts = write.open_table(ACCOUNTS)?;
            let mut history = write.open_table(HISTORY)?;
            let mut skipped = write.open_table(SKIPPED)?;
            let mut counters = write.open_table(COUNTERS)?;
            let mut last_seq = counters.get(LAST_STREAM_SEQ)?.map_or(0, |v| v.value());
            for message in batch {
                last_seq = last_seq.max(message.stream_seq);
                if skipped.get(message.stream_seq)?.is_some() {
                    outcome.duplicates += 1; // a malformed message delivered again
                    continue;
                }
                let event = match decode(&message.payload) {
                    Ok(event) if applied.get(event.id.as_str())?.is_some() => {
                        outcome.duplicates += 1;
                        continue;
                    }
                    Ok(event) => event,
                    Err(why) => {
                        warn!(stream_seq = message.stream_seq, %why, "view: skipping a malformed message");
                        skipped.insert(message.stream_seq, why.as_str())?;
                        if skipped.len()? > SKIPPED_KEPT_MAX {
                            skipped.pop_first()?;
                        }
                        outcome.skipped += 1;
                        continue;
                    }
                };
                let mut account = accounts
                    .get(event.account.as_str())?
                    .map(|v| StoredAccount::decode(v.value()))
                    .transpose()
                    .context("a corrupt account record")?
                    .unwrap_or_default();
                let entry = StoredEntry {
                    id: event.id.clone(),
                    txn_id: event.txn_id.clone(),
                    kind: event.kind.to_i32(),
                    amount_minor: event.amount_minor,
                    stream_seq: message.stream_seq,
                    published_unix_ms: message.published_unix_ms,
                };
                if let Err(why) = change(&mut account, &event, entry.clone()) {
                    warn!(stream_seq = message.stream_seq, id = %event.id, %why, "view: skipping an event");
                    skipped.insert(message.stream_seq, why.as_str())?;
                    outcome.skipped += 1;
                    continue;
                }
                let n = account.history_next - 1;
                history.insert((event.account.as_str(), n), entry.encode_to_vec().as_slice())?;
                while account.history_next - account.history_first > history_max {
                    history.remove((event.account.as_str(), account.history_first))?;
                    account.history_first += 1;
                }
                accounts.insert(event.account.as_str(), account.encode_to_vec().as_slice())?;
                applied.insert(event.id.as_str(), message.stream_seq)?;
                outcome.applied += 1;
            }
            add(&mut counters, APPLIED_TOTAL, outcome.applied)?;
            add(&mut counters, DUPLICATES_TOTAL, outcome.duplicates)?;
            add(&mut counters, SKIPPED_TOTAL, outcome.skipped)?;
            counters.insert(LAST_STREAM_SEQ, last_seq)?;
        }
        write.commit()?;
        Ok(outcome)
    }

    /// The highest stream sequence this store has processed (0 for none).
    ///
    /// # Errors
    /// The store fails.
    pub fn last_stream_seq(&self) -> anyhow::Result<u64> {
        let read = self.db.begin_read()?;
        Ok(read.open_table(COUNTERS)?.get(LAST_STREAM_SEQ)?.map_or(0, |v| v.value()))
    }

    /// Every account, ordered by ACCOUNT@BANK.
    ///
    /// # Errors
    /// The store fails.
    pub fn accounts(&self) -> anyhow::Result<Vec<AccountView>> {
        let read = self.db.begin_read()?;
        let table = read.open_table(ACCOUNTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let stored = StoredAccount::decode(value.value()).context("a corrupt account record")?;
            out.push(AccountView {
                account: key.value().to_owned(),
                balance_minor: stored.balance_minor,
                debit_count: stored.debit_count,
                credit_count: stored.credit_count,
                last: stored.last.as_ref().map(StoredEntry::entry),
            });
        }
        Ok(out)
    }

    /// Every account's balance: (ACCOUNT@BANK, balance in minor units).
    ///
    /// # Errors
    /// The store fails.
    pub fn balances(&self) -> anyhow::Result<Vec<(String, i64)>> {
        Ok(self.accounts()?.into_iter().map(|a| (a.account, a.balance_minor)).collect())
    }

    /// The totals and counters.
    ///
    /// # Errors
    /// The store fails, or the balances' sum does not fit in an i64.
    pub fn totals(&self) -> anyhow::Result<Totals> {
        let accounts = self.accounts()?;
        let sum: i128 = accounts.iter().map(|a| i128::from(a.balance_minor)).sum();
        let read = self.db.begin_read()?;
        let counters = read.open_table(COUNTERS)?;
        let counter = |name: &str| -> anyhow::Result<u64> { Ok(counters.get(name)?.map_or(0, |v| v.value())) };
        Ok(Totals {
            account_count: accounts.len() as u64,
            balance_minor: i64::try_from(sum).context("the balances' sum does not fit in 64 bits")?,
            applied: counter(APPLIED_TOTAL)?,
            duplicates: counter(DUPLICATES_TOTAL)?,
            skipped: counter(SKIPPED_TOTAL)?,
        })
    }

    /// `account`'s newest `limit` kept events, newest first.
    ///
    /// # Errors
    /// The store fails.
    pub fn history(&self, account: &AccountAddress, limit: usize) -> anyhow::Result<Vec<HistoryEntry>> {
        let key = account.to_string();
        let read = self.db.begin_read()?;
        let table = read.open_table(HISTORY)?;
        let mut out = Vec::new();
        for row in table.range((key.as_str(), 0)..=(key.as_str(), u64::MAX))?.rev().take(limit) {
            let (_, value) = row?;
            out.push(StoredEntry::decode(value.value()).context("a corrupt history record")?.entry());
        }
        Ok(out)
    }
}

/// Applies `event` to `account`, or says why it cannot be (then nothing changed).
fn change(account: &mut StoredAccount, event: &Event, entry: StoredEntry) -> Result<(), String> {
    let overflow = || format!("event {}: the balance of {} would overflow", event.id, event.account);
    match event.kind {
        EventKind::Opened if account.opened => {
            return Err(format!("event {}: {} was already opened", event.id, event.account));
        }
        EventKind::Opened => {
            account.balance_minor = account.balance_minor.checked_add(event.amount_minor).ok_or_else(overflow)?;
            account.opened = true;
        }
        EventKind::Debit => {
            account.balance_minor = account.balance_minor.checked_sub(event.amount_minor).ok_or_else(overflow)?;
            account.debit_count += 1;
        }
        EventKind::Credit => {
            account.balance_minor = account.balance_minor.checked_add(event.amount_minor).ok_or_else(overflow)?;
            account.credit_count += 1;
        }
    }
    account.history_next += 1;
    account.last = Some(entry);
    Ok(())
}

fn add(counters: &mut redb::Table<'_, &'static str, u64>, name: &str, n: u64) -> Result<(), redb::StorageError> {
    let total = counters.get(name)?.map_or(0, |v| v.value()) + n;
    counters.insert(name, total)?;
    Ok(())
}

// ----------------------------------------------------------------- syncing

/// How [`sync`] reads the stream.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The view's directory; its store is `DIR/view.redb`.
    pub data_dir: PathBuf,
    /// The NATS server. Default: `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// The JetStream stream the banks publish to. Default: `TWOPC`.
    pub stream: String,
    /// The durable consumer's name; one per view store. Default: `twopc-view`.
    pub consumer: String,
    /// The most messages fetched and applied at once. Default: 256.
    pub batch_max: usize,
    /// How long the server waits for an ack before delivering a message
    /// again; must exceed the time to apply a batch. Default: 30000.
    pub ack_wait_ms: u64,
    /// The most events kept in each account's history. Default: 1000.
    pub history_max: u64,
    /// Print a progress line to stderr every few seconds. Default: false.
    pub progress: bool,
    /// Test hook: exit the process with code 9 once this run has applied at
    /// least this many events, after the apply and before the acks.
    /// Default: None.
    pub exit_after_applied: Option<u64>,
}

impl SyncConfig {
    /// The defaults, with the view in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            stream: "TWOPC".into(),
            consumer: "twopc-view".into(),
            batch_max: 256,
            ack_wait_ms: 30_000,
            history_max: 1000,
            progress: false,
            exit_after_applied: None,
        }
    }

    /// Checks the limits.
    ///
    /// # Errors
    /// A limit is out of range, or a name is empty.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=BATCH_MAX_LIMIT).contains(&self.batch_max) {
            bail!("--batch-max must be 1 to {BATCH_MAX_LIMIT}");
        }
        if self.ack_wait_ms < 100 {
            bail!("--ack-wait-ms must be at least 100");
        }
        if self.history_max == 0 {
            bail!("--history-max must be at least 1");
        }
        if self.stream.is_empty() || self.consumer.is_empty() {
            bail!("--stream and --consumer must not be empty");
        }
        Ok(())
    }

    /// The consumer's bound on delivered, unacknowledged messages: room for
    /// this run's batch while a crashed run's batch still waits to be
    /// delivered again.
    fn ack_pending_max(&self) -> i64 {
        i64::try_from(2 * self.batch_max).unwrap_or(i64::MAX)
    }
}

/// What one [`sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Events applied.
    pub applied: u64,
    /// Deliveries skipped because they were already applied (or recorded as malformed).
    pub duplicates: u64,
    /// Malformed messages skipped.
    pub skipped: u64,
}

/// Applies the stream's events to the view in `config.data_dir`: until
/// nothing is pending (or `shutdown` resolves), or with `follow` until
/// `shutdown` resolves.
///
/// # Errors
/// The store is in use or fails; the stream is missing; NATS is unreachable
/// (only without `follow`; with it, retried).
pub async fn sync(config: &SyncConfig, follow: bool, shutdown: impl Future<Output = ()>) -> anyhow::Result<SyncReport> {
    config.validate()?;
    let store = ViewStore::open(&config.data_dir)?;
    let mut shutdown = pin!(shutdown);
    let mut report = SyncReport::default();
    let consumer = tokio::select! {
        () = &mut shutdown => return Ok(report),
        consumer = connect(config, &store, follow) => consumer?,
    };
    store.bind(&config.stream)?;
    let mut progress = Progress { enabled: config.progress, last: Instant::now() };
    let mut retry = RetryDelay::default();
    loop {
        let messages = tokio::select! {
            () = &mut shutdown => break,
            messages = next_batch(&consumer, config.batch_max, follow) => messages,
        };
        let messages = match messages {
            Ok(Some(messages)) => messages,
            Ok(None) => break,
            Err(e) if follow => {
                warn!(error = %format!("{e:#}"), "view: reading the stream failed; retrying");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = retry.wait() => continue,
                }
            }
            Err(e) => return Err(e),
        };
        retry = RetryDelay::default();
        let mut batch = Vec::with_capacity(messages.len());
        let mut pending = 0;
        for message in &messages {
            let info = message.info().map_err(|e| anyhow::anyhow!("a message without JetStream metadata: {e}"))?;
            pending = info.pending;
            let published_ms = info.published.unix_timestamp_nanos() / 1_000_000;
            batch.push(Delivered {
                stream_seq: info.stream_sequence,
                published_unix_ms: u64::try_from(published_ms).unwrap_or(0),
                payload: message.payload.clone(),
            });
        }
        let applier = store.clone();
        let history_max = config.history_max;
        let outcome = twopc_proto::host::run_blocking(move || applier.apply(&batch, history_max))
            .await
            .context("the view's apply task failed")??;
        report.applied += outcome.applied;
        report.duplicates += outcome.duplicates;
        report.skipped += outcome.skipped;
        // The crash point the tests use: applied durably, not yet acked, so
        // the next run gets this batch again and must skip all of it.
        if config.exit_after_applied.is_some_and(|n| report.applied >= n) {
            std::process::exit(9);
        }
        // Only now, with the batch durable, ack it (docs/PROTOCOL.md §14). A
        // failed ack only means the message comes again and is skipped.
        let acks = futures::future::join_all(messages.iter().map(|m| m.double_ack())).await;
        if let Some(Err(e)) = acks.into_iter().find(Result::is_err) {
            warn!(error = %e, "view: an ack failed; the message will be delivered again and skipped");
        }
        progress.tick(&report, pending);
    }
    Ok(report)
}

/// Why [`try_connect`] failed: an outage, retried while following, or not.
enum ConnectError {
    Unreachable(anyhow::Error),
    Fatal(anyhow::Error),
}

/// Connects to NATS and opens the durable consumer; while following,
/// retries until NATS answers.
async fn connect(config: &SyncConfig, store: &ViewStore, follow: bool) -> anyhow::Result<PullConsumer> {
    let mut retry = RetryDelay::default();
    loop {
        match try_connect(config, store).await {
            Ok(consumer) => return Ok(consumer),
            Err(ConnectError::Unreachable(e)) if follow => {
                warn!(error = %format!("{e:#}"), "view: NATS is unreachable; retrying");
                retry.wait().await;
            }
            Err(ConnectError::Unreachable(e) | ConnectError::Fatal(e)) => return Err(e),
        }
    }
}

fn unreachable(what: String, e: impl std::fmt::Display) -> ConnectError {
    ConnectError::Unreachable(anyhow::anyhow!("{what}: {e}"))
}

async fn try_connect(config: &SyncConfig, store: &ViewStore) -> Result<PullConsumer, ConnectError> {
    let url = &config.nats_url;
    let client = async_nats::ConnectOptions::new()
        .name("twopc-view")
        .connection_timeout(Duration::from_secs(3))
        .connect(url.as_str())
        .await
        .map_err(|e| unreachable(format!("cannot reach NATS at {url} (--nats / TWOPC_NATS_URL)"), e))?;
    let jetstream = jetstream::new(client);
    let stream = match jetstream.get_stream(&config.stream).await {
        Ok(stream) => stream,
        Err(e) => {
            if let jetstream::context::GetStreamErrorKind::JetStream(js) = e.kind()
                && js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            {
                // Not retried, even when following: a setting, not an outage.
                return Err(ConnectError::Fatal(anyhow::anyhow!(
                    "there is no stream {0} at {url}; banks started with events on create it \
                     (`twopc bank --events-nats {url} --events-stream {0} ...`), or give --stream",
                    config.stream
                )));
            }
            return Err(unreachable(format!("cannot read stream {} at {url}", config.stream), e));
        }
    };
    // The consumer acks only what the store holds, so one that has acked
    // past the store's last sequence belongs to a store since deleted or
    // restored: replay the stream from the start; the ids make that safe.
    let applied_through = store.last_stream_seq().map_err(ConnectError::Fatal)?;
    match stream.consumer_info(&config.consumer).await {
        Ok(info) if info.ack_floor.stream_sequence > applied_through => {
            warn!(
                consumer = %config.consumer,
                acked_through = info.ack_floor.stream_sequence,
                applied_through,
                "view: the consumer is ahead of this store; replaying the stream from the start"
            );
            stream
                .delete_consumer(&config.consumer)
                .await
                .map_err(|e| unreachable(format!("cannot delete consumer {}", config.consumer), e))?;
        }
        Ok(_) => {}
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {}
        Err(e) => return Err(unreachable(format!("cannot read consumer {}", config.consumer), e)),
    }
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(config.consumer.clone()),
            description: Some("twopc view: a materialized view of the bank events".into()),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_millis(config.ack_wait_ms),
            max_ack_pending: config.ack_pending_max(),
            ..Default::default()
        })
        .await
        .map_err(|e| unreachable(format!("cannot create consumer {} on stream {}", config.consumer, config.stream), e))
}

/// The next batch, waiting for one while following; None once caught up
/// (nothing pending and nothing delivered but unacknowledged) without
/// `follow`.
async fn next_batch(
    consumer: &PullConsumer,
    batch_max: usize,
    follow: bool,
) -> anyhow::Result<Option<Vec<jetstream::Message>>> {
    loop {
        let ready = collect(consumer.fetch().max_messages(batch_max).messages().await).await?;
        if !ready.is_empty() {
            return Ok(Some(ready));
        }
        if !follow {
            let info = consumer.get_info().await.context("reading the consumer's state")?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(None);
            }
        }
        // Wait for the next message (a new one, or one a crashed run left
        // unacknowledged, delivered again after ack_wait), then take what
        // is behind it.
        let mut first = collect(consumer.batch().max_messages(1).expires(PULL_WAIT).messages().await).await?;
        if first.is_empty() {
            continue;
        }
        if batch_max > 1 {
            first.extend(collect(consumer.fetch().max_messages(batch_max - 1).messages().await).await?);
        }
        return Ok(Some(first));
    }
}

async fn collect(
    batch: Result<jetstream::consumer::pull::Batch, jetstream::consumer::pull::BatchError>,
) -> anyhow::Result<Vec<jetstream::Message>> {
    let mut batch = batch.context("pulling from the stream")?;
    let mut messages = Vec::new();
    while let Some(message) = batch.next().await {
        messages.push(message.map_err(|e| anyhow::anyhow!("pulling from the stream: {e}"))?);
    }
    Ok(messages)
}

/// A doubling pause between attempts, up to [`RETRY_DELAY_MAX`].
#[derive(Default)]
struct RetryDelay {
    next: Duration,
}

impl RetryDelay {
    async fn wait(&mut self) {
        let delay = self.next.max(Duration::from_millis(100));
        tokio::time::sleep(delay).await;
        self.next = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

/// A progress line every [`PROGRESS_INTERVAL`] on long syncs.
struct Progress {
    enabled: bool,
    last: Instant,
}

impl Progress {
    fn tick(&mut self, report: &SyncReport, pending: u64) {
        if !self.enabled || self.last.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        self.last = Instant::now();
        eprintln!(
            "view: applied {} events ({} duplicates, {} malformed skipped), {pending} pending",
            report.applied, report.duplicates, report.skipped
        );
    }
}

// --------------------------------------------------------------- commands

#[derive(Debug, Subcommand)]
pub enum ViewCommand {
    /// Apply the stream's new events to the view, then exit (or keep following with --follow).
    #[command(after_help = "Examples:\n  twopc view sync --data data/view\n  \
        twopc view sync --data data/view --follow --nats nats://127.0.0.1:4222\n\n\
        Each fetched batch is applied in one durable write that records the events' ids, and acked only \
        after it: an event is applied once however often it is delivered. Limits: --batch-max messages \
        per fetch, twice that delivered and unacked (the consumer's max_ack_pending), --history-max events \
        kept per account, the last 10000 malformed messages remembered; the set of applied ids grows by one \
        key per event. One consumer (--consumer) per view directory.")]
    Sync(SyncArgs),
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
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// Test hook: exit with code 9 right after the durable apply of the batch that brings this run's applied
    /// count to at least N, before acking it (the crash point of cli/tests/view.rs).
    #[arg(long, hide = true)]
    pub exit_after_applied: Option<u64>,
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
        ViewCommand::Sync(args) => sync_command(args).await,
        ViewCommand::Accounts(args) => accounts(&args),
        ViewCommand::History(args) => history(&args),
    }
}

async fn sync_command(args: SyncArgs) -> anyhow::Result<u8> {
    let config = SyncConfig {
        nats_url: args.nats,
        stream: args.stream,
        consumer: args.consumer,
        batch_max: args.batch_max,
        ack_wait_ms: args.ack_wait_ms,
        history_max: args.history_max,
        progress: !args.json,
        exit_after_applied: args.exit_after_applied,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn credit(id: &str, account: &str, amount_minor: i64, stream_seq: u64) -> Delivered {
        let event = pb::BankEvent {
            id: id.into(),
            event: Some(bank_event::Event::Credited(pb::TransferCredited {
                txn_id: format!("txn-{id}"),
                bank: "bank-a".into(),
                account: account.into(),
                amount_minor,
            })),
        };
        Delivered { stream_seq, published_unix_ms: 0, payload: event.encode_to_vec().into() }
    }

    #[test]
    fn an_event_delivered_again_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let batch = [credit("e1", "alice", 500, 1), credit("e2", "alice", 250, 2), credit("e1", "alice", 500, 3)];
        assert_eq!(store.apply(&batch, 10).unwrap(), BatchOutcome { applied: 2, duplicates: 1, skipped: 0 });
        assert_eq!(store.apply(&batch[..2], 10).unwrap(), BatchOutcome { applied: 0, duplicates: 2, skipped: 0 });
        assert_eq!(store.balances().unwrap(), vec![("alice@bank-a".to_owned(), 750)]);
        let totals = store.totals().unwrap();
        assert_eq!((totals.applied, totals.duplicates, totals.balance_minor), (2, 3, 750));
    }

    #[test]
    fn a_malformed_message_is_recorded_once_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let junk = Delivered { stream_seq: 7, published_unix_ms: 0, payload: bytes::Bytes::from_static(b"\xff\xff") };
        let batch = [junk.clone(), credit("e1", "alice", 100, 8)];
        assert_eq!(store.apply(&batch, 10).unwrap(), BatchOutcome { applied: 1, duplicates: 0, skipped: 1 });
        assert_eq!(store.apply(&[junk], 10).unwrap(), BatchOutcome { applied: 0, duplicates: 1, skipped: 0 });
        assert_eq!(store.balances().unwrap(), vec![("alice@bank-a".to_owned(), 100)]);
        assert_eq!(store.last_stream_seq().unwrap(), 8);
    }

    #[test]
    fn history_keeps_the_newest_history_max_events_and_balances_keep_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let batch: Vec<Delivered> = (1..=5).map(|n| credit(&format!("e{n}"), "alice", 100, n)).collect();
        store.apply(&batch, 3).unwrap();
        let alice: AccountAddress = "alice@bank-a".parse().unwrap();
        let ids: Vec<String> = store.history(&alice, 10).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["e5", "e4", "e3"]);
        assert_eq!(store.accounts().unwrap()[0].credit_count, 5);
        assert_eq!(store.balances().unwrap(), vec![("alice@bank-a".to_owned(), 500)]);
    }

    #[test]
    fn a_second_opener_of_the_store_is_told_it_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = ViewStore::open(dir.path()).unwrap();
        let err = ViewStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("is in use by another `twopc view`"), "{err}");
    }
}
