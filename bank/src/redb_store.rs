//! [`RedbStore`]: the embedded [`AccountStore`], one redb file per bank.
//!
//! Every write (account creation, Prepare, Commit, Abort, garbage
//! collection) goes through one writer thread (a `std::thread`, so no fsync
//! ever blocks the async runtime). It takes everything queued, up to
//! `batch_max` operations, applies them in order in one redb write
//! transaction, commits it with `Durability::Immediate` (one fsync for the
//! whole batch: group commit), and only then answers each caller through its
//! oneshot. Operations in a batch see each other's effects, so two debits of
//! one account never both take the same funds; operations on different
//! accounts share the fsync and nothing else. Reads run on the blocking pool
//! against the last committed state (redb's MVCC readers never wait for the
//! writer).
//!
//! A write that fails for an I/O reason (a full disk, a failed fsync) fails
//! its batch, and redb then refuses every later operation on that handle.
//! The store heals itself instead of waiting for a restart: the writer
//! closes the file, answers every operation at once with
//! [`Error::Unavailable`] naming the store, and reopens the file after
//! `reopen_backoff_min_ms`, doubling up to `reopen_backoff_max_ms`, until
//! the reopened file takes a probe write. What was durable before the fault
//! (accounts, prepared branches, tombstones) is read back from the file; a
//! batch whose commit failed is either wholly there or wholly absent, and
//! the participant library keeps such Prepares in doubt (docs/PROTOCOL.md
//! §3.1). A store opened on a single [`redb::StorageBackend`] value cannot
//! be reopened and keeps refusing until restarted.
//!
//! Tables:
//! - `accounts`: name -> (balance, held, incoming), in minor units.
//! - `branches`: txn id -> branch record (state, payload, NO reason, time,
//!   and while prepared the digest of the Prepare's payload, docs/PROTOCOL.md §3.1).
//! - `prepared`: txn id -> (), the branches voted YES and not yet decided.
//! - `finished`: (finished at, txn id) -> (), the retention index the garbage
//!   collector walks oldest first.
//! - the participant library's outbox tables (`outbox_staged`,
//!   `outbox_ready`): with events on (`StoreConfig::events`), a Prepare
//!   stages its branch's events in its own write, a Commit readies them, an
//!   Abort drops them, an account's creation enqueues its opening; the
//!   relay reads them and removes what the stream acknowledged
//!   ([`OutboxSource`]).

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata as _, Table,
    TableDefinition, WriteTransaction,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, trace, warn};
use twopc_participant::ResourceError;
use twopc_participant::outbox::{self, OutboxSource, OutboxTables, ReadyEvent, RelayWake};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, PayloadDigest, TxnId, Vote};

use crate::address::AccountName;
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::events::EventHistory;
use crate::money::format_minor;
use crate::payload::{BranchPayload, Operation};
use crate::store::{
    ABORTED_BEFORE_PREPARE, ALREADY_ABORTED, AccountBalance, AccountStore, BranchState, INSUFFICIENT_FUNDS,
    OUTBOX_FULL, Totals, UNKNOWN_ACCOUNT,
};

/// (balance, held, incoming) in minor units.
type AccountRow = (i64, i64, i64);

const ACCOUNTS: TableDefinition<&str, AccountRow> = TableDefinition::new("accounts");
const BRANCHES: TableDefinition<u128, &[u8]> = TableDefinition::new("branches");
const PREPARED: TableDefinition<u128, ()> = TableDefinition::new("prepared");
const FINISHED: TableDefinition<(u64, u128), ()> = TableDefinition::new("finished");
/// The store's event history ([`EventHistory`]'s facts by name).
const EVENT_HISTORY: TableDefinition<&str, u64> = TableDefinition::new("event_history");

/// The embedded store: a redb file written by one group-committing thread.
///
/// Dropping it stops the writer after its current batch and closes the file
/// (the drop waits for that batch, a few milliseconds at most).
pub struct RedbStore {
    db: Arc<DbSlot>,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    queue_max: usize,
    path: PathBuf,
    wake: RelayWake,
    /// With events on: what the event stream misses of this bank's history.
    events_missed: Option<String>,
}

/// What the writer has done since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed, each one fsync.
    pub write_batches: u64,
    /// Operations those transactions carried.
    pub write_ops: u64,
    /// Expired branch records removed.
    pub records_collected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    collected: AtomicU64,
}

/// The open database, shared by the writer and the readers; empty while the
/// writer reopens the file after an I/O failure (redb allows one open handle
/// per file, so the old one must be gone first).
#[derive(Default)]
struct DbSlot(RwLock<Option<Arc<Database>>>);

impl DbSlot {
    fn get(&self) -> Result<Arc<Database>> {
        let db = self.0.read().unwrap_or_else(PoisonError::into_inner).clone();
        db.ok_or_else(|| {
            Error::Unavailable("the store file is being reopened after an I/O error; retry shortly".into())
        })
    }

    fn set(&self, db: Option<Arc<Database>>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = db;
    }
}

/// Opens the store's file again after an I/O failure.
type Reopen = Box<dyn Fn() -> Result<Database> + Send + Sync>;

impl RedbStore {
    /// Opens (or creates) the store file at `path`, on the blocking pool.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid `config`; [`Error::Unavailable`] if
    /// the file is in use or cannot be read; [`Error::Fatal`] if it is corrupt.
    pub async fn open(path: impl Into<PathBuf>, config: StoreConfig) -> Result<Self> {
        let path = path.into();
        twopc_proto::host::run_blocking(move || Self::open_blocking(&path, config))
            .await
            .map_err(|e| Error::Fatal(format!("opening the store: {e}")))?
    }

    /// [`RedbStore::open`] for callers outside an async runtime.
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    pub fn open_blocking(path: &Path, config: StoreConfig) -> Result<Self> {
        config.validate()?;
        let cache_max_bytes = config.cache_max_bytes;
        let file = path.to_owned();
        let reopen: Reopen = Box::new(move || Ok(Database::builder().set_cache_size(cache_max_bytes).create(&file)?));
        Self::start(reopen()?, path, config, Some(reopen))
    }

    /// Opens (or creates) the store on a storage backend of redb's other
    /// than the file at a path: crash tests give it a disk that loses what
    /// was never synced. `label` names it in logs and [`RedbStore::path`].
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    pub fn open_backend_blocking(
        backend: impl redb::StorageBackend,
        label: &Path,
        config: StoreConfig,
    ) -> Result<Self> {
        config.validate()?;
        let db = Database::builder().set_cache_size(config.cache_max_bytes).create_with_backend(backend)?;
        Self::start(db, label, config, None)
    }

    /// Opens (or creates) the store on a storage backend that `backend`
    /// makes, called again to reopen the store after an I/O failure (each
    /// call must give a fresh handle on the same storage): tests use it to
    /// give the store a disk that fails on command. `label` names it in logs
    /// and [`RedbStore::path`].
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    pub fn open_reopenable_backend_blocking<B: redb::StorageBackend>(
        backend: impl Fn() -> std::io::Result<B> + Send + Sync + 'static,
        label: &Path,
        config: StoreConfig,
    ) -> Result<Self> {
        config.validate()?;
        let cache_max_bytes = config.cache_max_bytes;
        let reopen: Reopen = Box::new(move || {
            let backend = backend().map_err(|e| Error::Unavailable(format!("opening the storage: {e}")))?;
            Ok(Database::builder().set_cache_size(cache_max_bytes).create_with_backend(backend)?)
        });
        Self::start(reopen()?, label, config, Some(reopen))
    }

    fn start(db: Database, path: &Path, config: StoreConfig, reopen: Option<Reopen>) -> Result<Self> {
        let init = db.begin_write()?;
        init.open_table(ACCOUNTS)?;
        init.open_table(BRANCHES)?;
        init.open_table(PREPARED)?;
        init.open_table(FINISHED)?;
        outbox::tables::create(&init)?;
        let events_missed = record_event_history(&init, config.events.is_some())?;
        init.commit()?;
        if let Some(missed) = &events_missed {
            warn!(path = %path.display(), "{missed}");
        }
        let db = Arc::new(DbSlot(RwLock::new(Some(Arc::new(db)))));
        let (jobs, queue) = mpsc::channel(config.queue_max);
        let counters = Arc::new(Counters::default());
        let wake = RelayWake::new();
        let writer = Writer {
            wake: wake.clone(),
            db: Arc::clone(&db),
            queue,
            counters: Arc::clone(&counters),
            next_gc_unix_ms: 0,
            config: config.clone(),
            reopen,
            healing: None,
        };
        let writer = if twopc_proto::host::is_simulated() {
            // One thread runs the whole simulation.
            tokio::spawn(writer.run());
            None
        } else {
            // Its own thread, so no fsync ever blocks the service's runtime;
            // a runtime of its own only for the reopen timer.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| Error::Fatal(format!("starting the store writer's runtime: {e}")))?;
            let thread = std::thread::Builder::new()
                .name("bank-store-writer".into())
                .spawn(move || runtime.block_on(writer.run()))
                .map_err(|e| Error::Fatal(format!("starting the store's writer thread: {e}")))?;
            Some(thread)
        };
        info!(path = %path.display(), "bank store open");
        Ok(Self {
            db,
            jobs: Some(jobs),
            writer,
            counters,
            queue_max: config.queue_max,
            path: path.to_owned(),
            wake,
            events_missed,
        })
    }

    /// What the writer tells after a commit that readied events: give it to
    /// the [`twopc_participant::outbox::Relay`] publishing this store's outbox.
    pub fn relay_wake(&self) -> RelayWake {
        self.wake.clone()
    }

    /// The payload `txn`'s branch was prepared with, while the store keeps
    /// its record (prepared or committed; none for a NO vote or a
    /// tombstone): what a test reads to tell whose payloads a txn applied.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn branch_payload(&self, txn: TxnId) -> Result<Option<BranchPayload>> {
        self.read(move |read| {
            let branches = read.open_table(BRANCHES)?;
            let record = branches.get(key_of(txn))?;
            Ok(record.map(|bytes| Record::decode(txn, bytes.value())).transpose()?.and_then(|r| r.payload))
        })
        .await
    }

    /// With events on, what the event stream is missing of this bank's
    /// history, if anything: accounts and branches from before events were
    /// turned on, or a run with them off since (docs/PROTOCOL.md §14.3).
    /// Logged as a warning at every open.
    pub fn events_missed(&self) -> Option<&str> {
        self.events_missed.as_deref()
    }

    /// Entries waiting in the outbox: branches with staged events plus
    /// events the stream has not acknowledged.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn outbox_waiting(&self) -> Result<u64> {
        self.read(|txn| Ok(outbox::tables::read_waiting(txn)?)).await
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters of the writer's work: batches (fsyncs) and operations.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            write_batches: self.counters.batches.load(Ordering::Relaxed),
            write_ops: self.counters.ops.load(Ordering::Relaxed),
            records_collected: self.counters.collected.load(Ordering::Relaxed),
        }
    }

    /// Removes finished branch records (and tombstones) that finished before
    /// `before_unix_ms`, up to `gc_batch_max` of them, and says how many. The
    /// writer does this on its own every `gc_interval_ms` with the retention
    /// cutoff; this is for tests and operators.
    ///
    /// # Errors
    /// As any write.
    pub async fn collect_garbage(&self, before_unix_ms: u64) -> Result<usize> {
        match self.submit(Op::CollectGarbage { before_unix_ms }).await? {
            Done::Collected(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    async fn submit(&self, op: Op) -> Result<Done> {
        let stopped = || Error::Fatal("the store's writer has stopped".into());
        let jobs = self.jobs.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        jobs.try_send(Job { op, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::QueueFull { max: self.queue_max },
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs `read` against the last committed state, on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&ReadTransaction) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.get()?;
        twopc_proto::host::run_blocking(move || {
            let txn = db.begin_read()?;
            read(&txn)
        })
        .await
        .map_err(|e| Error::Fatal(format!("store reader: {e}")))?
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop after its current batch.
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            error!("the bank store's writer thread panicked");
        }
    }
}

fn unexpected(done: &Done) -> Error {
    Error::Fatal(format!("the store's writer answered {done:?} out of turn"))
}

impl AccountStore for RedbStore {
    async fn create_account(&self, name: AccountName, initial_minor: i64) -> Result<AccountBalance> {
        if initial_minor < 0 {
            return Err(Error::Invalid {
                field: "initial_balance",
                why: format!("{} is negative", format_minor(initial_minor)),
            });
        }
        match self.submit(Op::CreateAccount { name, initial_minor }).await? {
            Done::Account(account) => Ok(account),
            other => Err(unexpected(&other)),
        }
    }

    async fn account(&self, name: AccountName) -> Result<AccountBalance> {
        self.read(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            let row = accounts.get(name.as_str())?.map(|row| row.value());
            match row {
                Some(row) => Ok(balance_of(name, row)),
                None => Err(Error::AccountNotFound(name)),
            }
        })
        .await
    }

    async fn list_accounts(&self, after: Option<AccountName>, limit: usize) -> Result<Vec<AccountBalance>> {
        self.read(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            let start = after.as_ref().map_or(Bound::Unbounded, |name| Bound::Excluded(name.as_str()));
            let mut page = Vec::with_capacity(limit.min(1024));
            for entry in accounts.range::<&str>((start, Bound::Unbounded))?.take(limit) {
                let (name, row) = entry?;
                page.push(balance_of(stored_name(name.value())?, row.value()));
            }
            Ok(page)
        })
        .await
    }

    async fn totals(&self) -> Result<Totals> {
        self.read(|txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            let mut totals = Totals::default();
            for entry in accounts.iter()? {
                let (balance, held, incoming) = entry?.1.value();
                totals.balance_minor += i128::from(balance);
                totals.held_minor += i128::from(held);
                totals.incoming_minor += i128::from(incoming);
                totals.accounts += 1;
            }
            Ok(totals)
        })
        .await
    }

    async fn prepare_with_digest(&self, txn: TxnId, payload: BranchPayload, digest: PayloadDigest) -> Result<Vote> {
        match self.submit(Op::Prepare { txn, payload, digest }).await? {
            Done::Vote(vote) => Ok(vote),
            other => Err(unexpected(&other)),
        }
    }

    async fn refuse(&self, txn: TxnId, reason: String) -> Result<Vote> {
        match self.submit(Op::Refuse { txn, reason }).await? {
            Done::Vote(vote) => Ok(vote),
            other => Err(unexpected(&other)),
        }
    }

    async fn commit(&self, txn: TxnId) -> Result<()> {
        match self.submit(Op::Commit { txn }).await? {
            Done::Decided => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn abort(&self, txn: TxnId) -> Result<()> {
        match self.submit(Op::Abort { txn }).await? {
            Done::Decided => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn prepared_with_digests(&self) -> Result<Vec<(TxnId, Option<PayloadDigest>)>> {
        self.read(|read| {
            let prepared = read.open_table(PREPARED)?;
            let branches = read.open_table(BRANCHES)?;
            let mut txns = Vec::new();
            for entry in prepared.iter()? {
                let key = entry?.0.value();
                let txn = txn_of_key(key)?;
                let record = branches.get(key)?.map(|b| Record::decode(txn, b.value())).transpose()?;
                txns.push((txn, record.and_then(|r| r.payload_digest)));
            }
            Ok(txns)
        })
        .await
    }

    async fn branch_state(&self, txn: TxnId) -> Result<Option<BranchState>> {
        self.read(move |read| {
            let branches = read.open_table(BRANCHES)?;
            let record = branches.get(key_of(txn))?;
            record.map(|bytes| Record::decode(txn, bytes.value()).map(|r| r.state)).transpose()
        })
        .await
    }
}

impl OutboxSource for RedbStore {
    async fn ready(&self, max: usize) -> std::result::Result<Vec<ReadyEvent>, ResourceError> {
        self.read(move |txn| Ok(outbox::tables::read_ready(txn, max)?)).await.map_err(ResourceError::from)
    }

    async fn published(&self, seqs: Vec<u64>) -> std::result::Result<(), ResourceError> {
        // Through the writer, sharing a batch's fsync; a removal lost in a
        // crash only republishes events the stream drops as duplicates.
        match self.submit(Op::Published { seqs }).await {
            Ok(Done::Decided) => Ok(()),
            Ok(other) => Err(ResourceError::from(unexpected(&other))),
            Err(e) => Err(ResourceError::from(e)),
        }
    }

    async fn waiting(&self) -> std::result::Result<u64, ResourceError> {
        self.outbox_waiting().await.map_err(ResourceError::from)
    }
}

fn balance_of(name: AccountName, (balance_minor, held_minor, incoming_minor): AccountRow) -> AccountBalance {
    AccountBalance { name, balance_minor, held_minor, incoming_minor }
}

fn stored_name(name: &str) -> Result<AccountName> {
    name.parse().map_err(|e| Error::Fatal(format!("corrupt account table: {e}")))
}

/// Notes in the store when events were turned on or off, and says what the
/// event stream is missing, if anything ([`EventHistory`]).
fn record_event_history(init: &WriteTransaction, events_on: bool) -> Result<Option<String>> {
    let mut table = init.open_table(EVENT_HISTORY)?;
    let mut stored = Vec::new();
    for name in EventHistory::FACTS {
        if let Some(value) = table.get(name)? {
            stored.push((name, value.value()));
        }
    }
    let mut history = EventHistory::from_facts(stored);
    let held_now = if history.turns_on_late(events_on) {
        init.open_table(ACCOUNTS)?.len()? + init.open_table(PREPARED)?.len()?
    } else {
        0
    };
    history.record_opening(events_on, held_now);
    for (name, value) in history.facts() {
        table.insert(name, value)?;
    }
    Ok(history.missed(events_on))
}

/// Txn ids are stored big-endian, so keys sort by creation time.
fn key_of(txn: TxnId) -> u128 {
    u128::from_be_bytes(txn.to_bytes())
}

fn txn_of_key(key: u128) -> Result<TxnId> {
    TxnId::from_bytes(key.to_be_bytes()).map_err(|e| Error::Fatal(format!("corrupt branch table: {e}")))
}

/// One operation for the writer, and where its answer goes.
struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

#[derive(Debug)]
enum Op {
    CreateAccount { name: AccountName, initial_minor: i64 },
    Prepare { txn: TxnId, payload: BranchPayload, digest: PayloadDigest },
    Refuse { txn: TxnId, reason: String },
    Commit { txn: TxnId },
    Abort { txn: TxnId },
    CollectGarbage { before_unix_ms: u64 },
    Published { seqs: Vec<u64> },
}

#[derive(Debug)]
enum Done {
    Account(AccountBalance),
    Vote(Vote),
    Decided,
    Collected(usize),
}

/// The answer to one operation: an outcome the caller gets (including
/// refusals such as an existing account), as opposed to a storage failure,
/// which fails the whole batch.
type Answer = Result<Done>;

/// The writer thread's state.
struct Writer {
    db: Arc<DbSlot>,
    queue: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
    next_gc_unix_ms: u64,
    config: StoreConfig,
    /// How to reopen the file after an I/O failure; None if it cannot be.
    reopen: Option<Reopen>,
    /// Set while the file is closed after an I/O failure.
    healing: Option<Healing>,
    /// Told after a batch that readied events.
    wake: RelayWake,
}

/// The writer's state between an I/O failure and a successful reopen.
struct Healing {
    since: Instant,
    next_attempt_at: Instant,
    backoff: Duration,
    last_error: String,
}

impl Writer {
    /// Takes batches until the store is dropped; while healing, also wakes
    /// to reopen the file.
    async fn run(mut self) {
        loop {
            let job = match self.healing.as_ref().map(|h| h.next_attempt_at) {
                None => self.queue.recv().await,
                Some(at) => {
                    tokio::select! {
                        biased;
                        () = tokio::time::sleep_until(at) => {
                            self.try_reopen();
                            continue;
                        }
                        job = self.queue.recv() => job,
                    }
                }
            };
            let Some(first) = job else { break };
            let batch = self.batch_from(first);
            match &self.healing {
                None => self.write(batch),
                Some(healing) => healing.refuse(batch),
            }
        }
        debug!("bank store writer stopped");
    }

    /// After a batch failed with `error`: a storage I/O failure leaves the
    /// redb handle refusing everything, so close it and reopen it later.
    fn start_healing(&mut self, error: &Error) {
        if self.reopen.is_none() || !matches!(error, Error::Unavailable(_)) || self.healing.is_some() {
            return;
        }
        // Readers lose the handle at once; the file closes once the last
        // reader still holding it finishes.
        self.db.set(None);
        let backoff = Duration::from_millis(self.config.reopen_backoff_min_ms);
        let now = Instant::now();
        warn!(error = %error, retry_in_ms = backoff.as_millis(), "bank store: closing the store file to reopen it");
        self.healing = Some(Healing {
            since: now,
            next_attempt_at: now + backoff,
            backoff,
            last_error: error.cause().into_owned(),
        });
    }

    /// Reopens the file and probes it with a durable write; on failure
    /// schedules the next attempt, the pause doubling up to its cap.
    fn try_reopen(&mut self) {
        let (Some(reopen), Some(healing)) = (&self.reopen, &mut self.healing) else { return };
        let reopened = reopen().and_then(|db| {
            // I3: a probe commit, fsync'd, so the store is declared healed
            // only once writes reach the disk again.
            let mut probe = db.begin_write()?;
            probe.set_durability(Durability::Immediate)?;
            probe.commit()?;
            Ok(db)
        });
        match reopened {
            Ok(db) => {
                info!(unavailable_ms = healing.since.elapsed().as_millis(), "bank store: store file reopened");
                self.db.set(Some(Arc::new(db)));
                self.healing = None;
            }
            Err(e) => {
                let max = Duration::from_millis(self.config.reopen_backoff_max_ms);
                healing.backoff = (healing.backoff * 2).min(max);
                healing.next_attempt_at = Instant::now() + healing.backoff;
                healing.last_error = e.cause().into_owned();
                warn!(error = %e, retry_in_ms = healing.backoff.as_millis(), "bank store: reopening failed");
            }
        }
    }

    /// `first` and whatever else is queued, up to `batch_max` jobs: one fsync for all.
    fn batch_from(&mut self, first: Job) -> Vec<Job> {
        let mut batch = Vec::with_capacity(self.config.batch_max.min(64));
        batch.push(first);
        while batch.len() < self.config.batch_max {
            match self.queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch
    }

    /// Applies `batch` in one write transaction and answers every job once
    /// it is durable; if the transaction fails, every job gets the failure
    /// and nothing of the batch is applied.
    fn write(&mut self, batch: Vec<Job>) {
        let now_unix_ms = unix_now_ms();
        let collect_before = (now_unix_ms >= self.next_gc_unix_ms)
            .then(|| now_unix_ms.saturating_sub(self.config.finished_retention_ms));
        if collect_before.is_some() {
            self.next_gc_unix_ms = now_unix_ms.saturating_add(self.config.gc_interval_ms);
        }
        let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|j| (j.op, j.reply)).unzip();
        match self.commit_batch(&ops, now_unix_ms, collect_before) {
            Ok((answers, collected, readied)) => {
                if readied {
                    self.wake.wake();
                }
                if collect_before.is_some() && collected >= self.config.gc_batch_max as u64 {
                    // A full pass: more may have expired than one pass takes
                    // (records finish faster than gc_batch_max per interval
                    // under load), so the next batch collects again rather
                    // than a whole interval later. The file stays bounded.
                    self.next_gc_unix_ms = now_unix_ms;
                }
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                self.counters.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
                self.counters.collected.fetch_add(collected, Ordering::Relaxed);
                trace!(ops = ops.len(), collected, "store batch committed");
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                error!(ops = ops.len(), error = %e, "store batch failed; nothing of it was applied");
                for reply in replies {
                    let _ = reply.send(Err(e.for_each_in_batch()));
                }
                self.start_healing(&e);
            }
        }
    }

    /// Applies `ops` in one durable write; returns each one's answer, the
    /// records collected, and whether events became ready to publish.
    fn commit_batch(
        &self,
        ops: &[Op],
        now_unix_ms: u64,
        collect_before: Option<u64>,
    ) -> Result<(Vec<Answer>, u64, bool)> {
        let mut txn: WriteTransaction = self.db.get()?.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut collected = 0;
        let readied;
        let answers = {
            let mut tables = Tables::open(&txn, now_unix_ms, &self.config)?;
            if let Some(before) = collect_before {
                collected += tables.collect_garbage(before, self.config.gc_batch_max)?;
            }
            let mut answers = Vec::with_capacity(ops.len());
            for op in ops {
                let answer = match op {
                    Op::CollectGarbage { before_unix_ms } => {
                        let n = tables.collect_garbage(*before_unix_ms, self.config.gc_batch_max)?;
                        collected += n;
                        Ok(Done::Collected(n as usize))
                    }
                    op => tables.apply(op)?,
                };
                answers.push(answer);
            }
            readied = tables.readied;
            answers
        };
        // I3: one fsync for the whole batch, before any caller hears a vote
        // or an acknowledgement (Durability::Immediate).
        txn.commit()?;
        Ok((answers, collected, readied))
    }
}

impl Healing {
    /// Answers every job of `batch` at once: the file is closed.
    fn refuse(&self, batch: Vec<Job>) {
        let why = format!(
            "the store file is being reopened after an I/O error {} ms ago ({}); next attempt in {} ms; retry",
            self.since.elapsed().as_millis(),
            self.last_error,
            self.next_attempt_at.saturating_duration_since(Instant::now()).as_millis()
        );
        for job in batch {
            let _ = job.reply.send(Err(Error::Unavailable(why.clone())));
        }
    }
}

/// The tables open in one write transaction.
struct Tables<'t> {
    accounts: Table<'t, &'static str, AccountRow>,
    branches: Table<'t, u128, &'static [u8]>,
    prepared: Table<'t, u128, ()>,
    finished: Table<'t, (u64, u128), ()>,
    outbox: OutboxTables<'t>,
    /// Events on: how to build them, and how many may wait.
    events: Option<(&'t crate::events::EventSubjects, u64)>,
    /// Whether this batch readied events for the relay.
    readied: bool,
    now_unix_ms: u64,
}

/// An account's row while a branch is worked out, before it is written.
#[derive(Debug, Clone, Copy)]
struct Row {
    balance: i64,
    held: i64,
    incoming: i64,
}

/// How working out a branch's effect on its accounts went.
enum Effect {
    /// The rows to write.
    Rows(Vec<(AccountName, Row)>),
    /// The branch names an account that does not exist.
    Missing(AccountName),
    /// The branch cannot be staged; the reason.
    Refused(String),
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction, now_unix_ms: u64, config: &'t StoreConfig) -> Result<Self> {
        Ok(Self {
            accounts: txn.open_table(ACCOUNTS)?,
            branches: txn.open_table(BRANCHES)?,
            prepared: txn.open_table(PREPARED)?,
            finished: txn.open_table(FINISHED)?,
            outbox: OutboxTables::open(txn)?,
            events: config.events.as_ref().map(|events| (events, config.outbox_max)),
            readied: false,
            now_unix_ms,
        })
    }

    /// Applies one operation. `Err` is a storage failure (the batch fails);
    /// `Ok(Err(..))` is a refusal the caller gets, with nothing written.
    fn apply(&mut self, op: &Op) -> Result<Answer> {
        match op {
            Op::CreateAccount { name, initial_minor } => self.create_account(name, *initial_minor),
            Op::Prepare { txn, payload, digest } => self.prepare(*txn, payload, *digest),
            Op::Refuse { txn, reason } => self.refuse(*txn, reason),
            Op::Commit { txn } => self.commit(*txn),
            Op::Abort { txn } => self.abort(*txn),
            Op::CollectGarbage { .. } => Err(Error::Fatal("garbage collection is not a branch operation".into())),
            Op::Published { seqs } => {
                self.outbox.remove_published(seqs)?;
                Ok(Ok(Done::Decided))
            }
        }
    }

    fn create_account(&mut self, name: &AccountName, initial_minor: i64) -> Result<Answer> {
        if self.accounts.get(name.as_str())?.is_some() {
            return Ok(Err(Error::AccountExists(name.clone())));
        }
        let row = (initial_minor, 0, 0);
        self.accounts.insert(name.as_str(), row)?;
        if let Some((events, _)) = self.events {
            // The opening is published like a branch's events, so a
            // consumer can rebuild balances from the stream alone.
            let (id, event) = events.opened(name, initial_minor);
            self.outbox.enqueue(&id, &event)?;
            self.readied = true;
        }
        Ok(Ok(Done::Account(balance_of(name.clone(), row))))
    }

    fn prepare(&mut self, txn: TxnId, payload: &BranchPayload, digest: PayloadDigest) -> Result<Answer> {
        // I5: a txn with a record keeps its vote, whatever this payload says.
        if let Some(record) = self.record(txn)? {
            return Ok(Ok(Done::Vote(record.vote())));
        }
        if let Some((_, outbox_max)) = self.events {
            let waiting = self.outbox.waiting()?;
            if waiting >= outbox_max {
                // Past the bound the bank refuses new work rather than drop
                // or block events of branches it has committed.
                let why = format!(
                    "{OUTBOX_FULL}: {waiting} entries wait for NATS (store.outbox_max {outbox_max}); \
                     the bank takes transfers again once the relay catches up"
                );
                return Ok(Ok(Done::Vote(self.record_refusal(txn, why)?)));
            }
        }
        let vote = match self.effect(payload, stage)? {
            Effect::Rows(rows) => {
                self.write_rows(rows)?;
                if let Some((events, _)) = self.events {
                    self.outbox.stage(txn, events.bank.as_str(), &events.for_branch(txn, payload))?;
                }
                let record = Record {
                    payload_digest: Some(digest),
                    ..Record::new(BranchState::Prepared, Some(payload), "", self.now_unix_ms)
                };
                self.branches.insert(key_of(txn), record.encode().as_slice())?;
                self.prepared.insert(key_of(txn), ())?;
                Vote::Yes
            }
            Effect::Missing(name) => self.record_refusal(txn, format!("{UNKNOWN_ACCOUNT} {name}"))?,
            Effect::Refused(reason) => self.record_refusal(txn, reason)?,
        };
        Ok(Ok(Done::Vote(vote)))
    }

    fn refuse(&mut self, txn: TxnId, reason: &str) -> Result<Answer> {
        if let Some(record) = self.record(txn)? {
            return Ok(Ok(Done::Vote(record.vote())));
        }
        Ok(Ok(Done::Vote(self.record_refusal(txn, reason.to_owned())?)))
    }

    /// A NO vote is final, so it is recorded: a repeated Prepare, even with
    /// a payload that would pass now, gets the same NO.
    fn record_refusal(&mut self, txn: TxnId, reason: String) -> Result<Vote> {
        let record = Record::new(BranchState::Refused, None, &reason, self.now_unix_ms);
        self.finish(txn, &record)?;
        Ok(Vote::no(reason))
    }

    fn commit(&mut self, txn: TxnId) -> Result<Answer> {
        let Some(record) = self.record(txn)? else {
            return Ok(Err(Error::NotPrepared(txn)));
        };
        match record.state {
            BranchState::Committed => Ok(Ok(Done::Decided)),
            BranchState::Refused | BranchState::Aborted | BranchState::Tombstone => {
                Ok(Err(Error::Conflict { txn, recorded: Decision::Abort }))
            }
            BranchState::Prepared => self.decide(txn, record, BranchState::Committed, apply),
        }
    }

    fn abort(&mut self, txn: TxnId) -> Result<Answer> {
        let Some(record) = self.record(txn)? else {
            // I4: remember the abort so that a late Prepare votes NO.
            let tombstone = Record::new(BranchState::Tombstone, None, "", self.now_unix_ms);
            self.finish(txn, &tombstone)?;
            return Ok(Ok(Done::Decided));
        };
        match record.state {
            BranchState::Refused | BranchState::Aborted | BranchState::Tombstone => Ok(Ok(Done::Decided)),
            BranchState::Committed => Ok(Err(Error::Conflict { txn, recorded: Decision::Commit })),
            BranchState::Prepared => self.decide(txn, record, BranchState::Aborted, release),
        }
    }

    /// Carries out a decision on a prepared branch: `change` each account,
    /// then record the branch as `outcome`.
    fn decide(
        &mut self,
        txn: TxnId,
        record: Record,
        outcome: BranchState,
        change: fn(&Operation, &mut Row) -> std::result::Result<(), String>,
    ) -> Result<Answer> {
        let Some(payload) = record.payload else {
            return Ok(Err(Error::Fatal(format!("prepared branch {txn} has no payload on record"))));
        };
        let rows = match self.effect(&payload, change)? {
            Effect::Rows(rows) => rows,
            Effect::Missing(name) => {
                return Ok(Err(Error::Fatal(format!(
                    "prepared branch {txn} names account {name}, which no longer exists"
                ))));
            }
            Effect::Refused(why) => {
                return Ok(Err(Error::Fatal(format!("prepared branch {txn} cannot be decided: {why}"))));
            }
        };
        self.write_rows(rows)?;
        // The branch's events go with its decision, in the same write.
        if outcome == BranchState::Committed {
            self.readied |= self.outbox.commit(txn)? > 0;
        } else {
            self.outbox.abort(txn)?;
        }
        let decided = Record::new(outcome, Some(&payload), "", self.now_unix_ms);
        self.finish(txn, &decided)?;
        Ok(Ok(Done::Decided))
    }

    /// Works out what `change` does to every account `payload` names, without
    /// writing anything.
    fn effect(
        &self,
        payload: &BranchPayload,
        change: fn(&Operation, &mut Row) -> std::result::Result<(), String>,
    ) -> Result<Effect> {
        let mut rows: Vec<(AccountName, Row)> = Vec::with_capacity(payload.ops().len());
        for op in payload.ops() {
            let name = op.account();
            let index = match rows.iter().position(|(n, _)| n == name) {
                Some(index) => index,
                None => {
                    let Some(row) = self.accounts.get(name.as_str())?.map(|r| r.value()) else {
                        return Ok(Effect::Missing(name.clone()));
                    };
                    let (balance, held, incoming) = row;
                    rows.push((name.clone(), Row { balance, held, incoming }));
                    rows.len() - 1
                }
            };
            if let Err(why) = change(op, &mut rows[index].1) {
                return Ok(Effect::Refused(why));
            }
        }
        Ok(Effect::Rows(rows))
    }

    fn write_rows(&mut self, rows: Vec<(AccountName, Row)>) -> Result<()> {
        for (name, row) in rows {
            self.accounts.insert(name.as_str(), (row.balance, row.held, row.incoming))?;
        }
        Ok(())
    }

    fn record(&self, txn: TxnId) -> Result<Option<Record>> {
        let bytes = self.branches.get(key_of(txn))?;
        bytes.map(|b| Record::decode(txn, b.value())).transpose()
    }

    /// Records a finished branch and indexes it for garbage collection.
    fn finish(&mut self, txn: TxnId, record: &Record) -> Result<()> {
        let key = key_of(txn);
        self.branches.insert(key, record.encode().as_slice())?;
        self.prepared.remove(key)?;
        self.finished.insert((record.updated_unix_ms, key), ())?;
        Ok(())
    }

    /// Removes up to `max` finished records that finished before `before`.
    /// Prepared records are not in the index, so they are never removed (I4).
    fn collect_garbage(&mut self, before_unix_ms: u64, max: usize) -> Result<u64> {
        let mut expired = Vec::new();
        for entry in self.finished.range(..(before_unix_ms, 0u128))?.take(max) {
            expired.push(entry?.0.value());
        }
        for (finished_unix_ms, key) in &expired {
            self.finished.remove((*finished_unix_ms, *key))?;
            self.branches.remove(*key)?;
        }
        Ok(expired.len() as u64)
    }
}

/// Prepare: hold a debit's amount, stage a credit's.
fn stage(op: &Operation, row: &mut Row) -> std::result::Result<(), String> {
    let amount = op.amount_minor();
    match op {
        Operation::Debit { account, .. } => {
            // Holds never exceed the balance, so this cannot overflow.
            let available = row.balance - row.held;
            if available < amount {
                return Err(format!(
                    "{INSUFFICIENT_FUNDS} in {account}: available {}, needed {}",
                    format_minor(available),
                    format_minor(amount)
                ));
            }
            row.held += amount;
        }
        Operation::Credit { account, .. } => {
            // Every staged credit must fit once committed, so Commit never
            // fails. The balance is never negative, so if the sum fits, so
            // does the new incoming amount.
            let fits = row.balance.checked_add(row.incoming).and_then(|sum| sum.checked_add(amount)).is_some();
            if !fits {
                return Err(format!("a credit of {} would overflow the balance of {account}", format_minor(amount)));
            }
            row.incoming += amount;
        }
    }
    Ok(())
}

/// Commit: a debit takes the held amount from the balance; a credit adds the
/// staged amount to it.
fn apply(op: &Operation, row: &mut Row) -> std::result::Result<(), String> {
    let amount = op.amount_minor();
    match op {
        Operation::Debit { .. } => {
            row.held -= amount;
            row.balance -= amount;
        }
        Operation::Credit { .. } => {
            row.incoming -= amount;
            row.balance += amount;
        }
    }
    check_row(op, row)
}

/// Abort: release what Prepare held or staged.
fn release(op: &Operation, row: &mut Row) -> std::result::Result<(), String> {
    match op {
        Operation::Debit { .. } => row.held -= op.amount_minor(),
        Operation::Credit { .. } => row.incoming -= op.amount_minor(),
    }
    check_row(op, row)
}

/// The invariants of a row after a decision; a breach means the store is
/// corrupt, and the decision is refused rather than written.
fn check_row(op: &Operation, row: &Row) -> std::result::Result<(), String> {
    if row.held < 0 || row.incoming < 0 || row.held > row.balance {
        return Err(format!(
            "{op} leaves {} with balance {}, held {}, incoming {}",
            op.account(),
            row.balance,
            row.held,
            row.incoming
        ));
    }
    Ok(())
}

/// A branch record as stored.
#[derive(Debug, Clone)]
struct Record {
    state: BranchState,
    payload: Option<BranchPayload>,
    reason: String,
    updated_unix_ms: u64,
    /// While prepared: the digest of the Prepare's payload as sent (none in
    /// a record written before digests were kept).
    payload_digest: Option<PayloadDigest>,
}

impl Record {
    fn new(state: BranchState, payload: Option<&BranchPayload>, reason: &str, updated_unix_ms: u64) -> Self {
        Self { state, payload: payload.cloned(), reason: reason.to_owned(), updated_unix_ms, payload_digest: None }
    }

    /// The vote a repeated Prepare gets (I5).
    fn vote(&self) -> Vote {
        match self.state {
            BranchState::Prepared | BranchState::Committed => Vote::Yes,
            BranchState::Refused => Vote::no(self.reason.clone()),
            BranchState::Aborted => Vote::no(ALREADY_ABORTED),
            BranchState::Tombstone => Vote::no(ABORTED_BEFORE_PREPARE),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let state = match self.state {
            BranchState::Prepared => StatePb::Prepared,
            BranchState::Refused => StatePb::Refused,
            BranchState::Committed => StatePb::Committed,
            BranchState::Aborted => StatePb::Aborted,
            BranchState::Tombstone => StatePb::Tombstone,
        };
        RecordPb {
            state: state as i32,
            payload: self.payload.as_ref().map_or_else(Bytes::new, BranchPayload::encode),
            reason: self.reason.clone(),
            updated_unix_ms: self.updated_unix_ms,
            payload_digest: self.payload_digest.map(|d| d.as_bytes().to_vec()).unwrap_or_default(),
        }
        .encode_to_vec()
    }

    fn decode(txn: TxnId, bytes: &[u8]) -> Result<Self> {
        let corrupt = |why: String| Error::Fatal(format!("branch record of txn {txn} is corrupt: {why}"));
        let wire = RecordPb::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        let state = match StatePb::try_from(wire.state) {
            Ok(StatePb::Prepared) => BranchState::Prepared,
            Ok(StatePb::Refused) => BranchState::Refused,
            Ok(StatePb::Committed) => BranchState::Committed,
            Ok(StatePb::Aborted) => BranchState::Aborted,
            Ok(StatePb::Tombstone) => BranchState::Tombstone,
            Ok(StatePb::Unspecified) | Err(_) => {
                return Err(corrupt(format!("unknown state {}", wire.state)));
            }
        };
        let payload = if wire.payload.is_empty() {
            None
        } else {
            Some(BranchPayload::decode(&wire.payload).map_err(|e| corrupt(e.to_string()))?)
        };
        let payload_digest = match wire.payload_digest.as_slice() {
            [] => None,
            bytes => Some(PayloadDigest::from_slice(bytes).ok_or_else(|| corrupt("a bad payload digest".into()))?),
        };
        Ok(Self { state, payload, reason: wire.reason, updated_unix_ms: wire.updated_unix_ms, payload_digest })
    }
}

/// The stored form of a branch record.
#[derive(Clone, PartialEq, prost::Message)]
struct RecordPb {
    #[prost(enumeration = "StatePb", tag = "1")]
    state: i32,
    /// The encoded [`BranchPayload`]; empty for NO votes and tombstones.
    #[prost(bytes = "bytes", tag = "2")]
    payload: Bytes,
    #[prost(string, tag = "3")]
    reason: String,
    #[prost(uint64, tag = "4")]
    updated_unix_ms: u64,
    /// The digest of the Prepare's payload while prepared; empty otherwise.
    #[prost(bytes = "vec", tag = "5")]
    payload_digest: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
enum StatePb {
    Unspecified = 0,
    Prepared = 1,
    Refused = 2,
    Committed = 3,
    Aborted = 4,
    Tombstone = 5,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose writer never runs: its queue only fills.
    fn stalled_store(dir: &Path, queue_max: usize) -> (RedbStore, mpsc::Receiver<Job>) {
        let db = Database::create(dir.join("stalled.redb")).expect("create");
        let (jobs, queue) = mpsc::channel(queue_max);
        let store = RedbStore {
            db: Arc::new(DbSlot(RwLock::new(Some(Arc::new(db))))),
            jobs: Some(jobs),
            writer: None,
            counters: Arc::default(),
            queue_max,
            path: dir.join("stalled.redb"),
            wake: RelayWake::new(),
            events_missed: None,
        };
        (store, queue)
    }

    // I6 (bounded): a full write queue refuses at once with a clear, retryable error.
    #[tokio::test]
    async fn full_queue_is_a_clear_retryable_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _queue) = stalled_store(dir.path(), 1);
        let (reply, _answer) = oneshot::channel();
        let fill = Job { op: Op::Abort { txn: TxnId::new() }, reply };
        let jobs = store.jobs.as_ref().expect("open");
        assert!(jobs.try_send(fill).is_ok(), "room for one job");
        let refused = store.abort(TxnId::new()).await.expect_err("the queue is full");
        assert!(matches!(refused, Error::QueueFull { max: 1 }), "{refused:?}");
        assert!(refused.is_retryable());
        assert!(refused.to_string().contains("store.queue_max"));
    }

    // A stored record reads back the same, and a corrupt one is an error, not a panic.
    #[test]
    fn records_round_trip_and_corruption_is_an_error() {
        let payload = BranchPayload::debit("alice".parse().expect("name"), 5).expect("payload");
        let txn = TxnId::new();
        let record = Record::new(BranchState::Prepared, Some(&payload), "", 42);
        let back = Record::decode(txn, &record.encode()).expect("decodes");
        assert_eq!(back.state, BranchState::Prepared);
        assert_eq!(back.payload, Some(payload));
        assert_eq!(back.updated_unix_ms, 42);
        assert!(matches!(Record::decode(txn, b"\x08\x63"), Err(Error::Fatal(_))));
    }
}
