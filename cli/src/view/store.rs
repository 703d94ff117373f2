//! [`ViewStore`]: the view's read model in its own redb file. Applying a
//! batch records the applied event ids in the same durable write as the
//! balances and history, so an event delivered again is skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use prost::Message as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tracing::warn;
use twopc_bank::AccountAddress;
use twopc_proto::pb::{self, bank_event};

/// The store file inside the view's directory.
pub const STORE_FILE: &str = "view.redb";
/// The most malformed messages the store remembers (oldest dropped first).
pub const SKIPPED_KEPT_MAX: u64 = 10_000;
/// The longest event id accepted; a longer one is malformed.
const EVENT_ID_LEN_MAX: usize = 512;

/// Event id -> the stream sequence it was applied from.
const APPLIED: TableDefinition<&str, u64> = TableDefinition::new("view_applied");
/// The same ids by stream sequence, oldest first: the order in which ids are
/// forgotten past `applied_ids_max`.
const APPLIED_BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("view_applied_by_seq");
/// Ids forgotten per batch beyond the ones the batch adds, so a lowered
/// `applied_ids_max` is reached over a few batches rather than in one write.
const FORGET_EXTRA_PER_BATCH: u64 = 4096;
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
/// [`BINDING`] key: when that stream was created (Unix nanoseconds), so a
/// stream deleted and created again under its name is told apart.
const BOUND_CREATED: &str = "stream_created";

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
        index_applied_ids(&init)?;
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

    /// Records when the bound stream was created (`created`, Unix
    /// nanoseconds, from the server) and says whether a different time was
    /// recorded before (the record is then replaced).
    ///
    /// # Errors
    /// The store fails.
    pub fn record_stream_created(&self, created: i128) -> anyhow::Result<bool> {
        let created = created.to_string();
        // Read first: the usual answer is "unchanged", which needs no write.
        let recorded = {
            let read = self.db.begin_read()?;
            read.open_table(BINDING)?.get(BOUND_CREATED)?.map(|v| v.value().to_owned())
        };
        if recorded.as_deref() == Some(created.as_str()) {
            return Ok(false);
        }
        let write = self.db.begin_write()?;
        write.open_table(BINDING)?.insert(BOUND_CREATED, created.as_str())?;
        write.commit()?;
        Ok(recorded.is_some())
    }

    /// Applies `batch` in one durable write transaction: each event whose id
    /// is not yet recorded changes its account and is recorded; the rest are
    /// counted as duplicates; malformed messages are recorded as skipped.
    /// Keeps each account's newest `history_max` events, and the ids of the
    /// newest `applied_ids_max` events applied (by stream sequence): an event
    /// delivered again after that many newer ones is applied again.
    ///
    /// To ensure correctness, acknowledge the batch only after this returns
    /// Ok: then a message is never lost, and one delivered again is skipped.
    ///
    /// # Errors
    /// The store fails; nothing of the batch is then applied.
    pub fn apply(&self, batch: &[Delivered], history_max: u64, applied_ids_max: u64) -> anyhow::Result<BatchOutcome> {
        assert!(history_max > 0 && applied_ids_max > 0, "history_max and applied_ids_max are validated above 0");
        let mut outcome = BatchOutcome::default();
        let mut write = self.db.begin_write()?;
        // Persist before acknowledging (docs/PROTOCOL.md §14): this commit is
        // what makes the acks that follow safe.
        write.set_durability(Durability::Immediate)?;
        {
            let mut applied = write.open_table(APPLIED)?;
            let mut applied_by_seq = write.open_table(APPLIED_BY_SEQ)?;
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
                applied_by_seq.insert(message.stream_seq, event.id.as_str())?;
                outcome.applied += 1;
            }
            let mut forget = outcome.applied + FORGET_EXTRA_PER_BATCH;
            while forget > 0 && applied_by_seq.len()? > applied_ids_max {
                let Some((_, id)) = applied_by_seq.pop_first()? else { break };
                applied.remove(id.value())?;
                forget -= 1;
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

/// Opens the applied-id tables, indexing by stream sequence any id applied
/// by a store made before the index existed, so every id can be forgotten.
fn index_applied_ids(write: &redb::WriteTransaction) -> anyhow::Result<()> {
    let applied = write.open_table(APPLIED)?;
    let mut applied_by_seq = write.open_table(APPLIED_BY_SEQ)?;
    if applied_by_seq.len()? != applied.len()? {
        for entry in applied.iter()? {
            let (id, seq) = entry?;
            applied_by_seq.insert(seq.value(), id.value())?;
        }
    }
    Ok(())
}

fn add(counters: &mut redb::Table<'_, &'static str, u64>, name: &str, n: u64) -> Result<(), redb::StorageError> {
    let total = counters.get(name)?.map_or(0, |v| v.value()) + n;
    counters.insert(name, total)?;
    Ok(())
}

// ----------------------------------------------------------------- syncing

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
        assert_eq!(store.apply(&batch, 10, 100).unwrap(), BatchOutcome { applied: 2, duplicates: 1, skipped: 0 });
        assert_eq!(store.apply(&batch[..2], 10, 100).unwrap(), BatchOutcome { applied: 0, duplicates: 2, skipped: 0 });
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
        assert_eq!(store.apply(&batch, 10, 100).unwrap(), BatchOutcome { applied: 1, duplicates: 0, skipped: 1 });
        assert_eq!(store.apply(&[junk], 10, 100).unwrap(), BatchOutcome { applied: 0, duplicates: 1, skipped: 0 });
        assert_eq!(store.balances().unwrap(), vec![("alice@bank-a".to_owned(), 100)]);
        assert_eq!(store.last_stream_seq().unwrap(), 8);
    }

    // I6: the applied-id set keeps the newest applied_ids_max ids, oldest forgotten first, and ids
    // a store applied before the index existed are indexed on open and forgotten in turn.
    #[test]
    fn applied_ids_are_bounded_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        // As a store made before the index: an applied id with no index entry.
        let write = store.db.begin_write().unwrap();
        write.open_table(APPLIED).unwrap().insert("e0", 0).unwrap();
        write.delete_table(APPLIED_BY_SEQ).unwrap();
        write.commit().unwrap();
        drop(store);
        let store = ViewStore::open(dir.path()).unwrap();

        let batch: Vec<Delivered> = (1..=4).map(|n| credit(&format!("e{n}"), "alice", 1, n)).collect();
        assert_eq!(store.apply(&batch, 10, 3).unwrap().applied, 4);
        let read = store.db.begin_read().unwrap();
        let kept: Vec<String> =
            read.open_table(APPLIED_BY_SEQ).unwrap().iter().unwrap().map(|e| e.unwrap().1.value().to_owned()).collect();
        assert_eq!(kept, ["e2", "e3", "e4"]);
        assert_eq!(read.open_table(APPLIED).unwrap().len().unwrap(), 3);
        drop(read);
        // A forgotten id is applied again; a kept one is still a duplicate.
        let again = [credit("e1", "alice", 1, 5), credit("e4", "alice", 1, 6)];
        assert_eq!(store.apply(&again, 10, 3).unwrap(), BatchOutcome { applied: 1, duplicates: 1, skipped: 0 });
    }

    #[test]
    fn history_keeps_the_newest_history_max_events_and_balances_keep_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = ViewStore::open(dir.path()).unwrap();
        let batch: Vec<Delivered> = (1..=5).map(|n| credit(&format!("e{n}"), "alice", 100, n)).collect();
        store.apply(&batch, 3, 100).unwrap();
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
