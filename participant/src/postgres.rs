//! [`PostgresResource`] (feature `postgres`): a [`Resource`] whose branches
//! are real PostgreSQL transactions, filled by the service's own code and
//! prepared with `PREPARE TRANSACTION` (docs/PROTOCOL.md §3, the XA way).
//!
//! The service implements [`PostgresBranch`]. For each Prepare the library
//! takes a pooled connection and runs, in order:
//!
//! 1. **Reserve** (a short transaction, committed at once): the library
//!    claims the txn's row in `twopc_branches` (state `reserved`) and calls
//!    [`PostgresBranch::reserve`], where the service may take what it must
//!    take under a short lock (funds, stock). Committing releases the row
//!    locks at once, so concurrent branches on the same rows never wait for
//!    each other's decisions.
//! 2. **Stage** (the branch transaction): the library marks its row
//!    `committed` and calls [`PostgresBranch::stage`] with the open
//!    transaction; on a YES vote it runs `PREPARE TRANSACTION 'gid'`, which
//!    PostgreSQL flushes to its WAL before answering (I3). The connection
//!    goes back to the pool: a prepared transaction lives in the server, not
//!    in a session.
//! 3. **Decide**: `COMMIT PREPARED` makes the stage's writes and the
//!    `committed` mark visible together; `ROLLBACK PREPARED` discards both.
//! 4. **Settle** (a short transaction): [`PostgresBranch::settle`] applies or
//!    releases what reserve took, in the same transaction that marks the row
//!    settled, so it happens exactly once. Settling is redone from the table
//!    after a crash, so it commits without waiting for its own fsync.
//!
//! A service whose handlers join interactive txns (docs/PROTOCOL.md §12)
//! may instead fill the branch transaction with its own SQL:
//! [`PostgresResource::prepare_with`] claims the row (no reserve step), runs
//! the service's closure in place of `stage`, and prepares, with the same
//! durability and failure contract; decisions and settling are as above.
//!
//! The gid is `twopc:<participant>:<txn id>`; gids are server-wide in
//! PostgreSQL, so participant names must be unique per PostgreSQL server.
//! Recovery ([`Resource::prepared`]) lists the gids in `pg_prepared_xacts`
//! with this participant's prefix that have a row in this schema's table.
//!
//! # The table
//!
//! `<schema>.twopc_branches (gid, state, settled, reason, updated_at_ms)`,
//! one row per txn. `reason` is the NO reason of a refused branch. A
//! branch's claim writes the hex SHA-256 of its Prepare's payload there
//! (docs/PROTOCOL.md §3.1), so a restart keeps which payload a prepared
//! branch is ([`Resource::prepared_with_digests`]) without a new column,
//! which an existing table could not take while prepared transactions hold
//! it. A committed row keeps it until collected; a refused or aborted one
//! has its reason written over it; nothing but recovery reads it:
//!
//! | state | meaning |
//! |---|---|
//! | `reserved` | claimed; prepared if the gid is in `pg_prepared_xacts`, else abandoned (treated as aborted) |
//! | `committed` | written inside the branch transaction: visible only once `COMMIT PREPARED` ran |
//! | `refused` | voted NO, with the reason |
//! | `aborted` | aborted after a YES vote (or an abandoned reserve) |
//! | `tombstone` | Abort arrived before any Prepare (I4) |
//!
//! Why the branch transaction *updates* a row claimed beforehand instead of
//! inserting one: an abort must be able to record itself while the prepared
//! transaction still exists. Here it runs `ROLLBACK PREPARED` first and then
//! marks the row `aborted`; a crash in between leaves `reserved` with no
//! prepared transaction, which every path reads as aborted. A late Prepare
//! therefore always finds a row and votes NO (I4). Finished rows are deleted
//! `finished_retention_ms` after they finish, at most `gc_batch_max` per
//! pass (I6); `reserved` rows never expire (I4).
//!
//! Every statement runs under `statement_timeout_ms` and `lock_timeout_ms`;
//! the pool holds at most `pool_max` connections and a caller waits at most
//! `pool_wait_timeout_ms` for one (then [`ResourceError::Unavailable`]).
//! At most `prepare_concurrency_max` Prepares run at once, so decisions
//! always find a connection, and a Prepare waits while `prepared_max` of
//! this participant's branches are in doubt: when decisions lag, new
//! branches slow down instead of filling the server's prepared slots.
//! The server must allow prepared transactions (`max_prepared_transactions`
//! above the number of branches in doubt at once); [`PostgresResource::open`]
//! refuses a server where it is 0.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tracing::{debug, info, warn};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, ParticipantId, PayloadDigest, TxnId, Vote};

use crate::resource::{Resource, ResourceError};

pub use deadpool_postgres;
pub use futures::future::BoxFuture;
pub use tokio_postgres;

/// The NO reason for a Prepare after the txn was aborted here (I4).
pub const ALREADY_ABORTED: &str = "txn already aborted";
/// The NO reason for a Prepare after an Abort arrived first (I4).
pub const ABORTED_BEFORE_PREPARE: &str = "aborted before prepare (tombstone)";
/// The longest schema name PostgreSQL accepts, in bytes.
pub const SCHEMA_MAX_BYTES: usize = 63;

/// How to reach the database and every limit of [`PostgresResource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string, such as
    /// `postgres://postgres@127.0.0.1:5432/test`. TLS is not supported.
    ///
    /// Default: none; always given.
    pub url: String,
    /// The schema holding `twopc_branches` (and, by convention, the
    /// service's own tables); created if missing. One participant per
    /// schema: two services sharing a database use two schemas.
    ///
    /// Default: none; always given.
    pub schema: String,
    /// The most connections the pool opens.
    ///
    /// Default: 16.
    pub pool_max: usize,
    /// The most Prepares running at once; must be below `pool_max`, so
    /// decisions, which end prepared transactions, always find a connection.
    ///
    /// Default: 8.
    pub prepare_concurrency_max: usize,
    /// The most branches of this participant prepared and undecided at once
    /// (in `pg_prepared_xacts`). A Prepare past it waits up to
    /// `pool_wait_timeout_ms` for decisions to catch up, then fails as
    /// unavailable (the txn aborts). Keep it below the server's
    /// `max_prepared_transactions`, shared by everyone on that server.
    ///
    /// Default: 128.
    pub prepared_max: usize,
    /// How long a caller waits for a pooled connection (and a Prepare for a
    /// prepare slot), in milliseconds; then the call fails with
    /// [`ResourceError::Unavailable`].
    ///
    /// Default: 5000.
    pub pool_wait_timeout_ms: u64,
    /// How long opening a connection may take, in milliseconds.
    ///
    /// Default: 5000.
    pub connect_timeout_ms: u64,
    /// PostgreSQL's `statement_timeout` on every connection, in milliseconds.
    ///
    /// Default: 5000.
    pub statement_timeout_ms: u64,
    /// PostgreSQL's `lock_timeout` on every connection, in milliseconds: a
    /// statement waiting longer for a row lock fails (and the branch with it).
    ///
    /// Default: 2000.
    pub lock_timeout_ms: u64,
    /// How long finished rows (committed, refused, aborted, tombstones) are
    /// kept after they finish, in milliseconds. Must outlive every deadline
    /// a Prepare could carry (docs/PROTOCOL.md §7.1) and the library's
    /// `tombstone_retention_ms`.
    ///
    /// Default: 600000 (10 minutes).
    pub finished_retention_ms: u64,
    /// How often expired rows are deleted, in milliseconds.
    ///
    /// Default: 1000.
    pub gc_interval_ms: u64,
    /// The most expired rows deleted in one pass; a full pass is followed
    /// by another at once, so deletion keeps up with any load.
    ///
    /// Default: 1024.
    pub gc_batch_max: usize,
}

impl PostgresConfig {
    /// A config for `url` and `schema` with every limit at its default.
    pub fn new(url: impl Into<String>, schema: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: schema.into(),
            pool_max: 16,
            prepare_concurrency_max: 8,
            prepared_max: 128,
            pool_wait_timeout_ms: 5_000,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 5_000,
            lock_timeout_ms: 2_000,
            finished_retention_ms: 600_000,
            gc_interval_ms: 1_000,
            gc_batch_max: 1024,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`ResourceError::Fatal`] naming the first field at fault and why.
    pub fn validate(&self) -> Result<(), ResourceError> {
        let fail = |why: String| Err(ResourceError::Fatal(format!("invalid postgres config: {why}")));
        if let Err(why) = check_schema(&self.schema) {
            return fail(format!("schema {:?}: {why}", self.schema));
        }
        if let Err(e) = self.url.parse::<tokio_postgres::Config>() {
            return fail(format!("url: {e}"));
        }
        let positive = [
            ("pool_max", self.pool_max as u64),
            ("prepare_concurrency_max", self.prepare_concurrency_max as u64),
            ("prepared_max", self.prepared_max as u64),
            ("pool_wait_timeout_ms", self.pool_wait_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("statement_timeout_ms", self.statement_timeout_ms),
            ("lock_timeout_ms", self.lock_timeout_ms),
            ("finished_retention_ms", self.finished_retention_ms),
            ("gc_interval_ms", self.gc_interval_ms),
            ("gc_batch_max", self.gc_batch_max as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                return fail(format!("{name} is 0; it must be at least 1"));
            }
        }
        if self.prepare_concurrency_max >= self.pool_max {
            return fail(format!(
                "prepare_concurrency_max ({}) must be below pool_max ({}), so decisions always find a connection",
                self.prepare_concurrency_max, self.pool_max
            ));
        }
        Ok(())
    }
}

/// Checks that `schema` is a plain lowercase identifier, so it can be
/// written into SQL unquoted-safe (it is quoted as well).
///
/// # Errors
/// Why it is not.
pub fn check_schema(schema: &str) -> Result<(), String> {
    if schema.is_empty() || schema.len() > SCHEMA_MAX_BYTES {
        return Err(format!("must be 1 to {SCHEMA_MAX_BYTES} bytes"));
    }
    if !schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        return Err("must start with a lowercase letter or '_'".into());
    }
    if !schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err("only lowercase letters, digits and '_' are allowed".into());
    }
    Ok(())
}

/// An open transaction on a pooled connection, handed to the service's
/// [`PostgresBranch`] methods. It dereferences to deadpool's client wrapper
/// (so `prepare_cached`, `query`, `execute` and the rest of
/// [`tokio_postgres::Client`] are there).
///
/// To ensure correctness, the service never ends the transaction itself
/// (no `COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION`, no session-level
/// settings or advisory locks): the library does.
pub struct BranchTx<'a> {
    client: &'a ClientWrapper,
}

impl std::ops::Deref for BranchTx<'_> {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        self.client
    }
}

/// The service's side of a branch on PostgreSQL: the work it does in each
/// step (see the module docs).
///
/// # Contract
///
/// To ensure correctness (I1, I3, I4, I8):
///
/// - Each method runs inside a transaction the library opened and ends; a
///   method's writes commit or roll back with it. An error rolls it back.
/// - `stage` writes the branch's effect; it becomes visible exactly when the
///   global txn commits. Its row locks are held until the decision, so it
///   should touch only rows no concurrent branch needs.
/// - `reserve` takes what must be checked under contention (funds) and is
///   committed before `stage` begins, releasing its locks. Whatever it takes
///   must be given back or applied by `settle`.
/// - `settle` runs once per txn that passed `reserve`, after the decision
///   (or after a restart, or for a reserve abandoned by a crash, with
///   [`Decision::Abort`]). It also runs for a txn staged with
///   [`PostgresResource::prepare_with`], whose reserve step never ran: it
///   must then find nothing to settle. It must take its locks in the same
///   order as `reserve` (for example by account name), so the two never
///   deadlock.
///
/// # Errors
/// A method returns [`ResourceError::Unavailable`] for a transient failure
/// (a `tokio_postgres::Error` converts with `?`, classified by its SQLSTATE)
/// and [`ResourceError::Fatal`] otherwise. A failed `reserve` or `stage`
/// leaves nothing behind: the library settles with `Abort` and forgets the
/// claim. A failed `settle` is retried by the next call for the txn.
pub trait PostgresBranch: Send + Sync + 'static {
    /// Creates the service's tables. [`PostgresResource::open`] calls it in
    /// the transaction that creates `twopc_branches`, so only when the
    /// schema is new: the tables exist together or not at all.
    fn setup(&self, tx: &BranchTx<'_>) -> impl Future<Output = Result<(), ResourceError>> + Send {
        let _ = tx;
        async { Ok(()) }
    }

    /// Step 1: takes what the branch needs under a short lock, or votes NO.
    /// The default takes nothing and votes YES.
    fn reserve(
        &self,
        tx: &BranchTx<'_>,
        txn: TxnId,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, ResourceError>> + Send {
        let _ = (tx, txn, payload);
        async { Ok(Vote::Yes) }
    }

    /// Step 2: writes the branch's effect in the branch transaction and
    /// votes. On YES the library prepares the transaction.
    fn stage(
        &self,
        tx: &BranchTx<'_>,
        txn: TxnId,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, ResourceError>> + Send;

    /// Step 4: applies ([`Decision::Commit`]) or gives back
    /// ([`Decision::Abort`]) what `reserve` took. The default does nothing.
    fn settle(
        &self,
        tx: &BranchTx<'_>,
        txn: TxnId,
        decision: Decision,
    ) -> impl Future<Output = Result<(), ResourceError>> + Send {
        let _ = (tx, txn, decision);
        async { Ok(()) }
    }
}

/// The service's own SQL for a branch, run in the open branch transaction
/// by [`PostgresResource::prepare_with`]; it returns the vote.
pub type StageWith<'a> =
    Box<dyn for<'t> FnOnce(&'t BranchTx<'t>) -> BoxFuture<'t, Result<Vote, ResourceError>> + Send + 'a>;

/// How a branch transaction is filled.
enum Staging<'a> {
    /// [`PostgresBranch::reserve`] and [`PostgresBranch::stage`] with the
    /// payload; its digest (of the bytes as sent) is kept with the branch.
    Payload(&'a [u8], PayloadDigest),
    /// The service's own SQL, with no reserve step.
    Service(StageWith<'a>),
}

/// Where a txn stands in `twopc_branches` (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BranchStatus {
    /// Claimed; `prepared` says whether its transaction is in
    /// `pg_prepared_xacts` (voted YES, no decision yet). Not prepared and
    /// not being prepared right now means abandoned, which is aborted.
    Reserved {
        /// Whether the branch transaction is prepared.
        prepared: bool,
    },
    /// `Decision::Commit` carried out; `settled` once `settle` ran.
    Committed {
        /// Whether [`PostgresBranch::settle`] has run.
        settled: bool,
    },
    /// Voted NO, with the reason.
    Refused(String),
    /// Aborted after a YES vote or an abandoned reserve.
    Aborted,
    /// Abort arrived before any Prepare (I4).
    Tombstone,
}

impl BranchStatus {
    /// The vote a repeated Prepare gets (I5), or None if the txn is
    /// reserved but not prepared (abandoned).
    fn vote(&self) -> Option<Vote> {
        match self {
            Self::Reserved { prepared: true } | Self::Committed { .. } => Some(Vote::Yes),
            Self::Reserved { prepared: false } => None,
            Self::Refused(reason) => Some(Vote::no(reason.clone())),
            Self::Aborted => Some(Vote::no(ALREADY_ABORTED)),
            Self::Tombstone => Some(Vote::no(ABORTED_BEFORE_PREPARE)),
        }
    }
}

/// How a transient failure is told from a fatal one: connection trouble,
/// serialization failures and deadlocks, resource limits, timeouts and
/// server shutdowns pass; anything else will not.
impl From<tokio_postgres::Error> for ResourceError {
    fn from(e: tokio_postgres::Error) -> Self {
        let transient = match e.code() {
            // No SQLSTATE: the connection (I/O, closed) passes; a client-side
            // error (a parameter or column of the wrong type) does not.
            None => std::error::Error::source(&e).is_some_and(|source| source.is::<std::io::Error>()),
            Some(code) => {
                let class = code.code().get(..2).unwrap_or("");
                matches!(class, "08" | "40" | "53" | "55" | "57" | "58")
            }
        };
        let why = match e.as_db_error() {
            Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
            None => format!("postgres: {e}"),
        };
        if transient || e.is_closed() { Self::Unavailable(why) } else { Self::Fatal(why) }
    }
}

/// A pooled connection that knows whether it is inside a transaction. If it
/// is dropped inside one (an error, a panic, a cancelled call), the
/// connection is taken out of the pool and closed, so the server rolls the
/// transaction back and no one else inherits it.
struct Session {
    conn: Option<Object>,
    in_txn: bool,
}

impl Session {
    fn client(&self) -> Result<&ClientWrapper, ResourceError> {
        self.conn.as_deref().ok_or_else(|| ResourceError::Fatal("postgres session already closed".into()))
    }

    /// `BEGIN`; with `sync_commit` false its `COMMIT` does not wait for the
    /// WAL flush (for writes that are redone after a crash anyway).
    async fn begin(&mut self, sync_commit: bool) -> Result<BranchTx<'_>, ResourceError> {
        let sql = if sync_commit { "BEGIN" } else { "BEGIN; SET LOCAL synchronous_commit = off" };
        self.in_txn = true;
        let client = self.conn.as_deref().ok_or_else(|| ResourceError::Fatal("postgres session closed".into()))?;
        client.batch_execute(sql).await?;
        Ok(BranchTx { client })
    }

    /// Ends the open transaction with `sql` (`COMMIT`, `ROLLBACK` or
    /// `PREPARE TRANSACTION ...`).
    async fn end(&mut self, sql: &str) -> Result<(), ResourceError> {
        self.client()?.batch_execute(sql).await?;
        self.in_txn = false;
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), ResourceError> {
        self.end("COMMIT").await
    }

    async fn rollback(&mut self) -> Result<(), ResourceError> {
        self.end("ROLLBACK").await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.in_txn
            && let Some(conn) = self.conn.take()
        {
            drop(Object::take(conn));
        }
    }
}

/// SQL text for one schema, built once.
struct Sql {
    lookup: String,
    in_doubt: String,
    claim: String,
    mark_committed: String,
    settle_commit: String,
    finish_abort: String,
    forget: String,
    record: String,
    prepared: String,
    unsettled: String,
    collect: String,
}

impl Sql {
    fn new(schema: &str) -> Self {
        let t = format!("\"{schema}\".twopc_branches");
        Self {
            lookup: format!(
                "SELECT b.state, b.settled, b.reason, EXISTS (SELECT 1 FROM pg_prepared_xacts p \
                 WHERE p.gid = $1 AND p.database = current_database()) \
                 FROM (SELECT 1) one LEFT JOIN {t} b ON b.gid = $1"
            ),
            in_doubt: format!(
                "SELECT count(*) FROM pg_prepared_xacts p JOIN {t} b ON b.gid = p.gid \
                 WHERE p.database = current_database() AND starts_with(p.gid, $1)"
            ),
            claim: format!(
                "INSERT INTO {t} (gid, state, settled, reason, updated_at_ms) \
                 VALUES ($1, 'reserved', false, $3, $2) ON CONFLICT (gid) DO NOTHING"
            ),
            mark_committed: format!(
                "UPDATE {t} SET state = 'committed', updated_at_ms = $2 WHERE gid = $1 AND state = 'reserved'"
            ),
            settle_commit: format!(
                "UPDATE {t} SET settled = true, updated_at_ms = $2 \
                 WHERE gid = $1 AND state = 'committed' AND NOT settled"
            ),
            finish_abort: format!(
                "UPDATE {t} SET state = $3, settled = true, reason = $4, updated_at_ms = $2 \
                 WHERE gid = $1 AND state = 'reserved'"
            ),
            forget: format!("DELETE FROM {t} WHERE gid = $1 AND state = 'reserved'"),
            record: format!(
                "INSERT INTO {t} (gid, state, settled, reason, updated_at_ms) \
                 VALUES ($1, $3, true, $4, $2) ON CONFLICT (gid) DO NOTHING"
            ),
            prepared: format!(
                "SELECT p.gid, b.reason FROM pg_prepared_xacts p JOIN {t} b ON b.gid = p.gid \
                 WHERE p.database = current_database() AND starts_with(p.gid, $1) ORDER BY p.prepared, p.gid"
            ),
            unsettled: format!(
                "SELECT b.gid, b.state FROM {t} b WHERE starts_with(b.gid, $1) AND NOT b.settled \
                 AND (b.state = 'committed' OR NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p \
                 WHERE p.gid = b.gid AND p.database = current_database()))"
            ),
            collect: format!(
                "DELETE FROM {t} WHERE ctid = ANY (ARRAY (SELECT ctid FROM {t} \
                 WHERE state <> 'reserved' AND settled AND updated_at_ms < $1 LIMIT $2))"
            ),
        }
    }
}

struct Inner<B> {
    pool: Pool,
    /// `prepare_concurrency_max` permits: Prepares leave room in the pool
    /// for decisions, which are what ends prepared transactions.
    prepare_slots: tokio::sync::Semaphore,
    branch: B,
    config: PostgresConfig,
    /// `twopc:<participant>:`, the prefix of every gid of this participant.
    gid_prefix: String,
    sql: Sql,
}

/// A [`Resource`] on PostgreSQL: branches are prepared transactions filled
/// by the service's [`PostgresBranch`]. See the module docs for the steps,
/// the table and the limits.
///
/// Cloning is cheap and shares the pool. The garbage collector runs while
/// any clone is alive.
pub struct PostgresResource<B> {
    inner: Arc<Inner<B>>,
    gc: Arc<GcTask>,
}

impl<B> Clone for PostgresResource<B> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner), gc: Arc::clone(&self.gc) }
    }
}

struct GcTask(JoinHandle<()>);

impl Drop for GcTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<B: PostgresBranch> PostgresResource<B> {
    /// Connects, creates the schema and `twopc_branches` if missing, lets
    /// the service create its tables ([`PostgresBranch::setup`]), settles
    /// what a crash left unsettled, and starts the garbage collector.
    /// Branches still prepared are left for [`Resource::prepared`] and the
    /// resolver.
    ///
    /// # Errors
    /// [`ResourceError::Fatal`] for an invalid config or a server with
    /// `max_prepared_transactions = 0`; [`ResourceError::Unavailable`] if the
    /// server cannot be reached.
    pub async fn open(participant: &ParticipantId, config: PostgresConfig, branch: B) -> Result<Self, ResourceError> {
        config.validate()?;
        let pool = pool(&config)?;
        let inner = Arc::new(Inner {
            pool,
            prepare_slots: tokio::sync::Semaphore::new(config.prepare_concurrency_max),
            branch,
            gid_prefix: format!("twopc:{participant}:"),
            sql: Sql::new(&config.schema),
            config,
        });
        inner.check_server().await?;
        inner.create_tables().await?;
        let settled = inner.settle_leftovers().await?;
        let gc = tokio::spawn(collect_forever(Arc::downgrade(&inner)));
        info!(
            participant = %participant,
            schema = %inner.config.schema,
            settled,
            "postgres resource open"
        );
        Ok(Self { inner, gc: Arc::new(GcTask(gc)) })
    }

    /// The connection pool, for the service's work outside branches (its
    /// reads, account creation). Bounded by `pool_max`.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The service's [`PostgresBranch`].
    pub fn branch(&self) -> &B {
        &self.inner.branch
    }

    /// The config the resource was opened with.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The gid of `txn`'s branch: `twopc:<participant>:<txn id>`.
    pub fn gid(&self, txn: TxnId) -> String {
        self.inner.gid(txn)
    }

    /// Where `txn` stands, if it has a row.
    ///
    /// # Errors
    /// [`ResourceError::Unavailable`] or [`ResourceError::Fatal`] if the
    /// table cannot be read.
    pub async fn status(&self, txn: TxnId) -> Result<Option<BranchStatus>, ResourceError> {
        let session = self.inner.session().await?;
        self.inner.lookup(&session, &self.gid(txn)).await
    }

    /// Prepares `txn`'s branch with the service's own SQL: `stage` runs in
    /// the branch transaction (after the library marks its row), and on YES
    /// the library runs `PREPARE TRANSACTION`, durable before the YES is
    /// returned (I3), exactly as for [`Resource::prepare`]. Use it with the
    /// participant's `Joiner::join_with`, so a service handler does its
    /// writes inside the branch that joins the txn:
    ///
    /// ```no_run
    /// # use twopc_participant::postgres::{PostgresBranch, PostgresResource};
    /// # use twopc_participant::{Joiner, TxnContext, Vote};
    /// # async fn handler<B: PostgresBranch>(joiner: Joiner<PostgresResource<B>>, pg: PostgresResource<B>, ctx: TxnContext)
    /// # -> twopc_participant::Result<()> {
    /// joiner
    ///     .join_with(&ctx, move |txn| async move {
    ///         pg.prepare_with(txn, |tx| {
    ///             Box::pin(async move {
    ///                 tx.execute("UPDATE stock SET reserved = reserved + 1 WHERE sku = 'x'", &[]).await?;
    ///                 Ok(Vote::Yes)
    ///             })
    ///         })
    ///         .await
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// There is no reserve step: the rows `stage` writes stay locked until
    /// the decision (the XA way), so it should touch rows no concurrent
    /// branch needs. [`PostgresBranch::settle`] still runs after the
    /// decision and must find nothing to do for such a txn. A txn that has
    /// a row already keeps its vote and `stage` is not called (I5); a NO
    /// from `stage` rolls its writes back and is recorded; an error rolls
    /// them back too, but may come after the branch was prepared (a lost
    /// reply), so the caller keeps the txn in doubt and the decision settles
    /// it, as after a failed [`Resource::prepare`].
    ///
    /// # Errors
    /// As [`Resource::prepare`], and whatever `stage` returns.
    pub async fn prepare_with<F>(&self, txn: TxnId, stage: F) -> Result<Vote, ResourceError>
    where
        F: for<'t> FnOnce(&'t BranchTx<'t>) -> BoxFuture<'t, Result<Vote, ResourceError>> + Send,
    {
        self.inner.prepare(txn, Staging::Service(Box::new(stage))).await
    }

    /// [`Resource::prepare`] of a payload whose bytes as its client sent them
    /// have `digest`, for a service that re-encodes what it was sent before
    /// staging it: the branch keeps `digest`, which a repeated Prepare's and
    /// a status recovery's are compared with after a restart
    /// ([`Resource::prepared_with_digests`], docs/PROTOCOL.md §3.1).
    ///
    /// # Errors
    /// As [`Resource::prepare`].
    pub async fn prepare_with_digest(
        &self,
        txn: TxnId,
        payload: &[u8],
        digest: PayloadDigest,
    ) -> Result<Vote, ResourceError> {
        self.inner.prepare(txn, Staging::Payload(payload, digest)).await
    }

    /// Records a NO vote with `reason` for `txn` without asking the service
    /// (for a payload the service could not read), unless the txn has a
    /// row already, whose vote is returned.
    ///
    /// # Errors
    /// As [`Resource::prepare`].
    pub async fn refuse(&self, txn: TxnId, reason: String) -> Result<Vote, ResourceError> {
        let mut session = self.inner.session().await?;
        let gid = self.gid(txn);
        if let Some(vote) = self.inner.repeat_vote(&mut session, txn, &gid).await? {
            return Ok(vote);
        }
        self.inner.record(&mut session, txn, &gid, "refused", &reason).await
    }

    /// Deletes up to `gc_batch_max` finished rows that finished before
    /// `before_unix_ms` and says how many; the collector does this every
    /// `gc_interval_ms` with the retention cutoff.
    ///
    /// # Errors
    /// [`ResourceError::Unavailable`] or [`ResourceError::Fatal`].
    pub async fn collect_garbage(&self, before_unix_ms: u64) -> Result<u64, ResourceError> {
        self.inner.collect_garbage(before_unix_ms).await
    }
}

fn pool(config: &PostgresConfig) -> Result<Pool, ResourceError> {
    let mut pg: tokio_postgres::Config =
        config.url.parse().map_err(|e| ResourceError::Fatal(format!("invalid postgres url: {e}")))?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    let mut options = pg.get_options().unwrap_or("").to_owned();
    // Bounds on every statement and on a session left idle in a transaction
    // (I6); a branch transaction never idles: it is prepared at once.
    let _ = write!(
        options,
        " -c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
        config.statement_timeout_ms,
        config.lock_timeout_ms,
        config.statement_timeout_ms.saturating_mul(4)
    );
    pg.options(options.trim());
    if pg.get_application_name().is_none() {
        pg.application_name("twopc");
    }
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let wait = Duration::from_millis(config.pool_wait_timeout_ms);
    Pool::builder(manager)
        .max_size(config.pool_max)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(Duration::from_millis(config.connect_timeout_ms)))
        .recycle_timeout(Some(wait))
        .build()
        .map_err(|e| ResourceError::Fatal(format!("building the postgres pool: {e}")))
}

impl<B: PostgresBranch> Inner<B> {
    fn gid(&self, txn: TxnId) -> String {
        format!("{}{txn}", self.gid_prefix)
    }

    fn txn_of(&self, gid: &str) -> Result<TxnId, ResourceError> {
        gid.strip_prefix(&self.gid_prefix)
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| ResourceError::Fatal(format!("gid {gid:?} is not one of this participant's")))
    }

    async fn session(&self) -> Result<Session, ResourceError> {
        let conn = self.pool.get().await.map_err(|e| {
            ResourceError::Unavailable(format!("postgres pool (pool_max {}): {e}", self.config.pool_max))
        })?;
        Ok(Session { conn: Some(conn), in_txn: false })
    }

    async fn check_server(&self) -> Result<(), ResourceError> {
        let session = self.session().await?;
        let row = session.client()?.query_one("SHOW max_prepared_transactions", &[]).await?;
        let value: String = row.get(0);
        if value.trim() == "0" {
            return Err(ResourceError::Fatal(
                "the PostgreSQL server has max_prepared_transactions = 0, so PREPARE TRANSACTION fails; \
                 set it above the number of branches in doubt at once (ALTER SYSTEM SET \
                 max_prepared_transactions = 256, then restart the server)"
                    .into(),
            ));
        }
        Ok(())
    }

    async fn create_tables(&self) -> Result<(), ResourceError> {
        let schema = &self.config.schema;
        let ddl = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS \"{schema}\".twopc_branches (
                 gid text PRIMARY KEY,
                 state text NOT NULL
                     CHECK (state IN ('reserved', 'committed', 'refused', 'aborted', 'tombstone')),
                 settled boolean NOT NULL,
                 reason text NOT NULL,
                 updated_at_ms bigint NOT NULL);
             CREATE INDEX IF NOT EXISTS twopc_branches_finished
                 ON \"{schema}\".twopc_branches (updated_at_ms) WHERE state <> 'reserved';"
        );
        let mut session = self.session().await?;
        let tx = session.begin(true).await?;
        // Two processes creating the same schema at once would race in the
        // catalog; the transaction-scoped lock serialises them.
        tx.batch_execute(&format!("SELECT pg_advisory_xact_lock(hashtext('twopc schema {schema}'))")).await?;
        // DDL on an existing table would wait for the locks that prepared
        // transactions hold on it until their decisions: touch nothing then.
        let exists = format!("SELECT to_regclass('\"{schema}\".twopc_branches') IS NOT NULL");
        let exists: bool = tx.query_one(&exists, &[]).await?.get(0);
        if !exists {
            tx.batch_execute(&ddl).await?;
            self.branch.setup(&tx).await?;
        }
        session.commit().await
    }

    /// Settles every txn a crash left unsettled: committed but not settled,
    /// and reserved without a prepared transaction (abandoned: aborted).
    async fn settle_leftovers(&self) -> Result<usize, ResourceError> {
        let mut session = self.session().await?;
        let rows = session.client()?.query(&self.sql.unsettled, &[&self.gid_prefix]).await?;
        let mut settled = 0;
        for row in rows {
            let gid: String = row.get(0);
            let state: String = row.get(1);
            let txn = self.txn_of(&gid)?;
            if state == "committed" {
                self.settle_commit(&mut session, txn, &gid).await?;
            } else {
                self.finish_abort(&mut session, txn, &gid, "aborted", "").await?;
            }
            settled += 1;
        }
        Ok(settled)
    }

    async fn lookup(&self, session: &Session, gid: &str) -> Result<Option<BranchStatus>, ResourceError> {
        let client = session.client()?;
        let statement = client.prepare_cached(&self.sql.lookup).await?;
        let row = client.query_one(&statement, &[&gid]).await?;
        let state: Option<String> = row.get(0);
        let prepared: bool = row.get(3);
        let Some(state) = state else {
            if prepared {
                return Err(ResourceError::Fatal(format!(
                    "{gid} is prepared in PostgreSQL but has no row in schema {}; is another participant \
                     using the same name on this server?",
                    self.config.schema
                )));
            }
            return Ok(None);
        };
        let settled: bool = row.get(1);
        let reason: String = row.get(2);
        let status = match state.as_str() {
            "reserved" => BranchStatus::Reserved { prepared },
            "committed" => BranchStatus::Committed { settled },
            "refused" => BranchStatus::Refused(reason),
            "aborted" => BranchStatus::Aborted,
            "tombstone" => BranchStatus::Tombstone,
            other => return Err(ResourceError::Fatal(format!("{gid} has unknown state {other:?}"))),
        };
        Ok(Some(status))
    }

    /// The recorded vote of a txn with a row, finishing an abandoned reserve
    /// as aborted first; None for a txn with no row.
    async fn repeat_vote(&self, session: &mut Session, txn: TxnId, gid: &str) -> Result<Option<Vote>, ResourceError> {
        let Some(status) = self.lookup(session, gid).await? else {
            return Ok(None);
        };
        if let Some(vote) = status.vote() {
            return Ok(Some(vote));
        }
        self.finish_abort(session, txn, gid, "aborted", "").await?;
        Ok(Some(Vote::no(ALREADY_ABORTED)))
    }

    /// Inserts a finished row (`refused` or `tombstone`), durably (I4),
    /// unless the txn has a row already, whose vote is returned.
    async fn record(
        &self,
        session: &mut Session,
        txn: TxnId,
        gid: &str,
        state: &str,
        reason: &str,
    ) -> Result<Vote, ResourceError> {
        let now = now_ms();
        let inserted = session.client()?.execute(&self.sql.record, &[&gid, &now, &state, &reason]).await?;
        if inserted == 1 {
            let status =
                if state == "tombstone" { BranchStatus::Tombstone } else { BranchStatus::Refused(reason.into()) };
            return Ok(status.vote().unwrap_or_else(|| Vote::no(reason)));
        }
        match self.lookup(session, gid).await? {
            Some(status) => match status.vote() {
                Some(vote) => Ok(vote),
                None => {
                    self.finish_abort(session, txn, gid, "aborted", "").await?;
                    Ok(Vote::no(ALREADY_ABORTED))
                }
            },
            None => Err(ResourceError::Unavailable(format!("{gid}: its row vanished while recording it; retry"))),
        }
    }

    /// Settles a committed txn: the service's `settle(Commit)` and the
    /// `settled` mark in one transaction, so it runs once.
    async fn settle_commit(&self, session: &mut Session, txn: TxnId, gid: &str) -> Result<(), ResourceError> {
        let now = now_ms();
        let tx = session.begin(false).await?;
        let claimed = tx.execute(&tx.prepare_cached(&self.sql.settle_commit).await?, &[&gid, &now]).await?;
        if claimed == 0 {
            return session.rollback().await;
        }
        self.branch.settle(&tx, txn, Decision::Commit).await?;
        session.commit().await
    }

    /// Moves a reserved row to `state` (`aborted` or `refused`) with the
    /// service's `settle(Abort)` in the same transaction. `refused` is
    /// committed durably (a NO vote is remembered); `aborted` may be redone.
    async fn finish_abort(
        &self,
        session: &mut Session,
        txn: TxnId,
        gid: &str,
        state: &str,
        reason: &str,
    ) -> Result<(), ResourceError> {
        let now = now_ms();
        let tx = session.begin(state == "refused").await?;
        let claimed =
            tx.execute(&tx.prepare_cached(&self.sql.finish_abort).await?, &[&gid, &now, &state, &reason]).await?;
        if claimed == 0 {
            return session.rollback().await;
        }
        self.branch.settle(&tx, txn, Decision::Abort).await?;
        session.commit().await
    }

    /// Undoes a reserve whose branch failed before voting: the service's
    /// `settle(Abort)` and the claim deleted, so a retried Prepare starts
    /// afresh. If this fails too, the row stays `reserved` and is read as
    /// abandoned (aborted) later.
    async fn forget(&self, txn: TxnId, gid: &str) {
        let undo = async {
            let mut session = self.session().await?;
            // A PREPARE whose answer was lost may have happened: then the
            // branch is in doubt and waits for its decision like any other.
            if matches!(self.lookup(&session, gid).await?, Some(BranchStatus::Reserved { prepared: true })) {
                return Ok(());
            }
            let tx = session.begin(false).await?;
            if tx.execute(&self.sql.forget, &[&gid]).await? == 1 {
                self.branch.settle(&tx, txn, Decision::Abort).await?;
            }
            session.commit().await
        };
        if let Err(e) = undo.await {
            warn!(%txn, error = %e, "could not undo a failed prepare; it stays reserved and counts as aborted");
        }
    }

    /// Steps 1 and 2 for a txn with no row. A branch the service stages
    /// itself has no reserve step: its row is claimed and committed alone.
    async fn prepare_new(
        &self,
        session: &mut Session,
        txn: TxnId,
        gid: &str,
        staging: Staging<'_>,
    ) -> Result<Vote, ResourceError> {
        let now = now_ms();
        let tx = session.begin(false).await?;
        // A reserved row's reason holds the payload's digest (see the table).
        let digest = match &staging {
            Staging::Payload(_, digest) => digest.to_hex(),
            Staging::Service(_) => String::new(),
        };
        let claimed = tx.execute(&tx.prepare_cached(&self.sql.claim).await?, &[&gid, &now, &digest]).await?;
        if claimed == 0 {
            session.rollback().await?;
            return self.repeat_vote(session, txn, gid).await?.ok_or_else(|| {
                ResourceError::Unavailable(format!("{gid}: its row vanished while claiming it; retry"))
            });
        }
        if let Staging::Payload(payload, _) = &staging {
            match self.branch.reserve(&tx, txn, payload).await? {
                Vote::No { reason } => {
                    session.rollback().await?;
                    return self.record(session, txn, gid, "refused", &reason).await;
                }
                Vote::Yes => {}
            }
        }
        // The reserve commits without waiting for its flush: PREPARE
        // TRANSACTION below flushes the WAL past it, and a reserve lost
        // in a crash before that was never voted on.
        session.commit().await?;

        let tx = session.begin(true).await?;
        let marked = tx.execute(&tx.prepare_cached(&self.sql.mark_committed).await?, &[&gid, &now]).await?;
        if marked != 1 {
            return Err(ResourceError::Fatal(format!("{gid}: its reserved row is gone")));
        }
        let vote = match staging {
            Staging::Payload(payload, _) => self.branch.stage(&tx, txn, payload).await?,
            Staging::Service(stage) => stage(&tx).await?,
        };
        match vote {
            Vote::No { reason } => {
                session.rollback().await?;
                self.finish_abort(session, txn, gid, "refused", &reason).await?;
                Ok(Vote::no(reason))
            }
            Vote::Yes => {
                // I3: PREPARE TRANSACTION returns only once the prepared
                // state is flushed to the WAL, whatever synchronous_commit
                // says; only then is YES returned.
                session.end(&format!("PREPARE TRANSACTION '{gid}'")).await?;
                Ok(Vote::Yes)
            }
        }
    }

    /// A Prepare: a txn with a row keeps its vote; otherwise steps 1 and 2.
    async fn prepare(&self, txn: TxnId, staging: Staging<'_>) -> Result<Vote, ResourceError> {
        let gid = self.gid(txn);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.pool_wait_timeout_ms);
        // A slot before a connection: waiting Prepares never hold the
        // connections that decisions need.
        let _slot = tokio::time::timeout_at(deadline, self.prepare_slots.acquire())
            .await
            .map_err(|_| self.busy())?
            .map_err(|_| ResourceError::Fatal("prepare slots closed".into()))?;
        let mut session = self.session().await?;
        // I5: a txn with a row keeps its vote, whatever this payload says.
        if let Some(vote) = self.repeat_vote(&mut session, txn, &gid).await? {
            return Ok(vote);
        }
        self.wait_for_room(&session, deadline).await?;
        let result = self.prepare_new(&mut session, txn, &gid, staging).await;
        if result.is_err() {
            drop(session);
            self.forget(txn, &gid).await;
        }
        result
    }

    fn busy(&self) -> ResourceError {
        ResourceError::Unavailable(format!(
            "{} prepares running (prepare_concurrency_max) or {} branches in doubt (prepared_max) for {} ms; retry",
            self.config.prepare_concurrency_max, self.config.prepared_max, self.config.pool_wait_timeout_ms
        ))
    }

    /// Waits until fewer than `prepared_max` of this participant's branches
    /// are in doubt (I6). Backpressure: while decisions lag, new Prepares
    /// wait instead of piling up prepared transactions until the server
    /// refuses every one.
    async fn wait_for_room(&self, session: &Session, deadline: tokio::time::Instant) -> Result<(), ResourceError> {
        let client = session.client()?;
        let count = client.prepare_cached(&self.sql.in_doubt).await?;
        let mut pause = Duration::from_millis(1);
        loop {
            let in_doubt: i64 = client.query_one(&count, &[&self.gid_prefix]).await?.get(0);
            if usize::try_from(in_doubt).unwrap_or(usize::MAX) < self.config.prepared_max {
                return Ok(());
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(self.busy());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    async fn collect_garbage(&self, before_unix_ms: u64) -> Result<u64, ResourceError> {
        let session = self.session().await?;
        let before = i64::try_from(before_unix_ms).unwrap_or(i64::MAX);
        let max = i64::try_from(self.config.gc_batch_max).unwrap_or(i64::MAX);
        Ok(session.client()?.execute(&self.sql.collect, &[&before, &max]).await?)
    }
}

async fn collect_forever<B: PostgresBranch>(inner: std::sync::Weak<Inner<B>>) {
    let mut full_pass = false;
    loop {
        // After a full pass more rows may be due than one pass deletes (rows
        // finish faster than gc_batch_max per interval under load): go again
        // at once, so the table stays bounded.
        if !full_pass {
            let Some(interval_ms) = inner.upgrade().map(|i| i.config.gc_interval_ms) else { return };
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
        let Some(inner) = inner.upgrade() else { return };
        let cutoff = unix_now_ms().saturating_sub(inner.config.finished_retention_ms);
        full_pass = false;
        match inner.collect_garbage(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                debug!(collected = n, "expired twopc_branches rows deleted");
                full_pass = n >= inner.config.gc_batch_max as u64;
            }
            Err(e) => warn!(error = %e, "twopc_branches garbage collection failed; retrying next interval"),
        }
    }
}

fn now_ms() -> i64 {
    i64::try_from(unix_now_ms()).unwrap_or(i64::MAX)
}

impl<B: PostgresBranch> Resource for PostgresResource<B> {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        self.inner.prepare(txn, Staging::Payload(&payload, PayloadDigest::of(&payload))).await
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        let inner = &self.inner;
        let gid = inner.gid(txn);
        let mut session = inner.session().await?;
        for _ in 0..2 {
            let Some(status) = inner.lookup(&session, &gid).await? else {
                return Err(ResourceError::NotPrepared);
            };
            match status {
                BranchStatus::Committed { settled: true } => return Ok(()),
                BranchStatus::Committed { settled: false } => {
                    return inner.settle_commit(&mut session, txn, &gid).await;
                }
                BranchStatus::Refused(_) | BranchStatus::Aborted | BranchStatus::Tombstone => {
                    return Err(ResourceError::Conflict { recorded: Decision::Abort });
                }
                BranchStatus::Reserved { prepared: false } => {
                    inner.finish_abort(&mut session, txn, &gid, "aborted", "").await?;
                    return Err(ResourceError::Conflict { recorded: Decision::Abort });
                }
                BranchStatus::Reserved { prepared: true } => {
                    match session.client()?.batch_execute(&format!("COMMIT PREPARED '{gid}'")).await {
                        Ok(()) => return inner.settle_commit(&mut session, txn, &gid).await,
                        // Finished by someone else between the lookup and now: look again.
                        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(ResourceError::Unavailable(format!("{gid} changed under a commit twice; retry")))
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        let inner = &self.inner;
        let gid = inner.gid(txn);
        let mut session = inner.session().await?;
        for _ in 0..2 {
            let Some(status) = inner.lookup(&session, &gid).await? else {
                // I4: remember the abort, durably, so a late Prepare votes NO.
                inner.record(&mut session, txn, &gid, "tombstone", "").await?;
                return Ok(());
            };
            match status {
                BranchStatus::Refused(_) | BranchStatus::Aborted | BranchStatus::Tombstone => return Ok(()),
                BranchStatus::Committed { settled } => {
                    if !settled {
                        inner.settle_commit(&mut session, txn, &gid).await?;
                    }
                    return Err(ResourceError::Conflict { recorded: Decision::Commit });
                }
                BranchStatus::Reserved { prepared: false } => {
                    return inner.finish_abort(&mut session, txn, &gid, "aborted", "").await;
                }
                BranchStatus::Reserved { prepared: true } => {
                    match session.client()?.batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).await {
                        Ok(()) => return inner.finish_abort(&mut session, txn, &gid, "aborted", "").await,
                        Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(ResourceError::Unavailable(format!("{gid} changed under an abort twice; retry")))
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        Ok(self.prepared_with_digests().await?.into_iter().map(|(txn, _)| txn).collect())
    }

    async fn prepared_with_digests(&self) -> Result<Vec<(TxnId, Option<PayloadDigest>)>, ResourceError> {
        let inner = &self.inner;
        let session = inner.session().await?;
        let rows = session.client()?.query(&inner.sql.prepared, &[&inner.gid_prefix]).await?;
        // A row reserved before digests were kept, or by a service's own
        // staging, has none.
        rows.iter()
            .map(|row| Ok((inner.txn_of(row.get::<_, &str>(0))?, PayloadDigest::from_hex(row.get::<_, &str>(1)))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Schema names go into SQL: only plain identifiers pass.
    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["twopc_bank_a", "_x", "a1"] {
            assert!(check_schema(good).is_ok(), "{good}");
        }
        for bad in ["", "Bank", "a-b", "a\"b", "1a", &"a".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad}");
        }
    }

    // I6 (bounded): a zero limit is rejected by name, and the defaults pass.
    #[test]
    fn zero_limits_are_rejected_by_name() {
        let config = PostgresConfig::new("postgres://postgres@127.0.0.1/test", "twopc_a");
        assert!(config.validate().is_ok());
        let mut zero = config.clone();
        zero.pool_max = 0;
        assert!(matches!(zero.validate(), Err(ResourceError::Fatal(why)) if why.contains("pool_max")));
        let mut bad_url = config;
        bad_url.url = "postgres://[".into();
        assert!(matches!(bad_url.validate(), Err(ResourceError::Fatal(why)) if why.contains("url")));
    }
}
