//! [`PgStore`]: the bank's [`AccountStore`] on PostgreSQL, over the
//! participant library's [`PostgresResource`]: each branch is a real
//! PostgreSQL transaction, prepared with `PREPARE TRANSACTION`.
//!
//! # Holds, and why no row lock outlives a Prepare
//!
//! A prepared transaction keeps its row locks until `COMMIT PREPARED`, a
//! whole decision round away. Had the branch transaction debited the account
//! row itself, every other transfer touching that account would wait for
//! that decision (hot accounts would run one transfer per round trip), and
//! two PostgreSQL banks could wait on each other in a cycle that no
//! deadlock detector sees. So the bank keeps the embedded store's hold
//! model, split across the library's steps:
//!
//! 1. **reserve** (a short transaction, committed at once): for each account
//!    of the payload, in name order, one `UPDATE` checks the funds and adds
//!    to `held_minor` (debits) or `incoming_minor` (credits), and a `holds`
//!    row records what was taken. The row lock lasts only this transaction.
//! 2. **stage** (the branch transaction, then `PREPARE TRANSACTION`): marks
//!    the branch's `holds` rows `applied`. Those rows belong to this txn
//!    alone, so the prepared transaction locks nothing anyone else needs.
//! 3. `COMMIT PREPARED` makes `applied` visible; `ROLLBACK PREPARED` drops it.
//! 4. **settle** (a short transaction): deletes the branch's `holds` rows and
//!    applies them to the accounts (Commit: balance and hold or incoming
//!    move) or releases them (Abort), in name order again, so reserves and
//!    settles never deadlock. `applied` must agree with the decision, or the
//!    store is corrupt and nothing is written.
//!
//! Available funds are `balance - held`, so no combination of decisions can
//! take a balance below zero; table constraints check the same (I8).
//!
//! # Events
//!
//! With events on ([`PgStore::open_with_events`]), **stage** also inserts
//! the branch's events into `outbox` in the branch transaction, so they are
//! prepared with it: `COMMIT PREPARED` makes them visible (ready) and
//! `ROLLBACK PREPARED` drops them (docs/PROTOCOL.md §14). An account's
//! opening inserts its event in the same transaction as the account. The
//! relay ([`OutboxSource`]) reads `outbox` oldest first and deletes what the
//! stream acknowledged. **reserve** votes NO once `outbox_max` rows wait
//! (counted up to the bound, so the check costs at most that many index
//! entries, and only while NATS is away).
//!
//! Tables, in the bank's own schema (one per bank, so two banks can share a
//! database): `accounts (name, balance_minor, held_minor, incoming_minor)`,
//! `holds (txn, account, debit_minor, credit_minor, applied)`,
//! `outbox (seq, id, subject, payload)`, `event_history (fact, value)` (when
//! events were on and off: [`PgStore::events_missed`]), and the library's
//! `twopc_branches`.

use std::collections::BTreeMap;

use tracing::warn;

use twopc_participant::Resource as _;
use twopc_participant::ResourceError;
use twopc_participant::outbox::{OutboxSource, ReadyEvent, RelayWake};
use twopc_participant::postgres::deadpool_postgres::Object;
use twopc_participant::postgres::tokio_postgres::Row;
use twopc_participant::postgres::{BranchStatus, BranchTx, PostgresBranch, PostgresConfig, PostgresResource};
use twopc_proto::{Decision, ParticipantId, PayloadDigest, TxnId, Vote};

use crate::address::AccountName;
use crate::error::{Error, Result};
use crate::events::{EventHistory, EventSubjects};
use crate::money::format_minor;
use crate::payload::{BranchPayload, Operation};
use crate::store::{
    AccountBalance, AccountStore, BranchState, INSUFFICIENT_FUNDS, OUTBOX_FULL, Totals, UNKNOWN_ACCOUNT,
};

/// The schema a bank named `bank` uses unless told otherwise:
/// `twopc_<bank>` with `-` and `.` as `_`.
///
/// # Errors
/// [`Error::Config`] if the result is longer than PostgreSQL allows (give a
/// schema explicitly then).
pub fn default_schema(bank: &ParticipantId) -> Result<String> {
    let schema = format!("twopc_{}", bank.as_str().replace(['-', '.'], "_"));
    twopc_participant::postgres::check_schema(&schema)
        .map_err(|why| Error::Config(format!("schema {schema:?} for bank {bank}: {why}; give one explicitly")))?;
    Ok(schema)
}

/// The bank's work in each step of a PostgreSQL branch (see the module docs).
pub struct BankBranch {
    accounts: String,
    holds: String,
    outbox: String,
    event_history: String,
    /// Events on: how to build them, and how many may wait.
    events: Option<(EventSubjects, u64)>,
}

impl BankBranch {
    fn new(schema: &str, events: Option<(EventSubjects, u64)>) -> Self {
        Self {
            accounts: format!("\"{schema}\".accounts"),
            holds: format!("\"{schema}\".holds"),
            outbox: format!("\"{schema}\".outbox"),
            event_history: format!("\"{schema}\".event_history"),
            events,
        }
    }

    /// The outbox table; created with the schema, or by [`PgStore::open`]
    /// in a schema made before events existed.
    fn outbox_ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                 seq bigserial PRIMARY KEY,
                 id text NOT NULL,
                 subject text NOT NULL,
                 payload bytea NOT NULL)",
            self.outbox
        )
    }

    /// One event into the outbox: `$1` its id, `$2` its subject, `$3` its payload.
    fn insert_event_sql(&self) -> String {
        format!("INSERT INTO {} (id, subject, payload) VALUES ($1, $2, $3)", self.outbox)
    }

    /// Inserts `events` with their ids into the outbox, in `tx`.
    async fn insert_events(
        &self,
        tx: &BranchTx<'_>,
        events: &[(String, twopc_participant::outbox::OutboxEvent)],
    ) -> std::result::Result<(), ResourceError> {
        let insert = tx.prepare_cached(&self.insert_event_sql()).await?;
        for (id, event) in events {
            tx.execute(&insert, &[id, &event.subject, &event.payload.as_ref()]).await?;
        }
        Ok(())
    }
}

/// What one branch takes from one account: (debits, credits) in minor units.
type Take = (i64, i64);

/// The payload's operations summed per account, in name order (the lock order).
fn takes(payload: &BranchPayload) -> std::result::Result<BTreeMap<String, Take>, String> {
    let mut takes: BTreeMap<String, Take> = BTreeMap::new();
    for op in payload.ops() {
        let take = takes.entry(op.account().to_string()).or_default();
        let sum = match op {
            Operation::Debit { amount_minor, .. } => take.0.checked_add(*amount_minor).map(|d| take.0 = d),
            Operation::Credit { amount_minor, .. } => take.1.checked_add(*amount_minor).map(|c| take.1 = c),
        };
        if sum.is_none() {
            return Err(format!("the operations on {} overflow", op.account()));
        }
    }
    Ok(takes)
}

impl PostgresBranch for BankBranch {
    async fn setup(&self, tx: &BranchTx<'_>) -> std::result::Result<(), ResourceError> {
        let ddl = format!(
            "CREATE TABLE {accounts} (
                 name text COLLATE \"C\" PRIMARY KEY,
                 balance_minor bigint NOT NULL,
                 held_minor bigint NOT NULL DEFAULT 0,
                 incoming_minor bigint NOT NULL DEFAULT 0,
                 CHECK (held_minor >= 0 AND incoming_minor >= 0 AND held_minor <= balance_minor));
             CREATE TABLE {holds} (
                 txn text NOT NULL,
                 account text COLLATE \"C\" NOT NULL,
                 debit_minor bigint NOT NULL,
                 credit_minor bigint NOT NULL,
                 applied boolean NOT NULL DEFAULT false,
                 PRIMARY KEY (txn, account));",
            accounts = self.accounts,
            holds = self.holds
        );
        tx.batch_execute(&ddl).await?;
        tx.batch_execute(&self.outbox_ddl()).await?;
        Ok(())
    }

    async fn reserve(&self, tx: &BranchTx<'_>, txn: TxnId, payload: &[u8]) -> std::result::Result<Vote, ResourceError> {
        let payload = match BranchPayload::decode(payload) {
            Ok(payload) => payload,
            Err(e) => return Ok(Vote::no(format!("malformed bank payload: {e}"))),
        };
        let takes = match takes(&payload) {
            Ok(takes) => takes,
            Err(why) => return Ok(Vote::no(why)),
        };
        if let Some((_, outbox_max)) = &self.events {
            // Counted up to the bound only: cheap while NATS keeps up.
            let sql = format!("SELECT count(*) FROM (SELECT 1 FROM {} LIMIT $1) AS waiting", self.outbox);
            let limit = i64::try_from(*outbox_max).unwrap_or(i64::MAX);
            let waiting: i64 = tx.query_one(&sql, &[&limit]).await?.get(0);
            if waiting >= limit {
                return Ok(Vote::no(format!(
                    "{OUTBOX_FULL}: {waiting} events wait for NATS (store.outbox_max {outbox_max}); \
                     the bank takes transfers again once the relay catches up"
                )));
            }
        }
        let hold = tx
            .prepare_cached(&format!(
                "UPDATE {} SET held_minor = held_minor + $2::bigint, incoming_minor = incoming_minor + $3::bigint \
                 WHERE name = $1 AND balance_minor - held_minor >= $2::bigint \
                 AND balance_minor::numeric + incoming_minor + $3::bigint <= 9223372036854775807",
                self.accounts
            ))
            .await?;
        let record = tx
            .prepare_cached(&format!(
                "INSERT INTO {} (txn, account, debit_minor, credit_minor) VALUES ($1, $2, $3, $4)",
                self.holds
            ))
            .await?;
        let id = txn.to_string();
        for (account, (debit, credit)) in &takes {
            if tx.execute(&hold, &[account, debit, credit]).await? != 1 {
                // Look again under the row lock: settles change the funds
                // between two statements, and the reason must be true.
                if let Some(why) = self.why_not(tx, account, *debit, *credit).await? {
                    // The library rolls this transaction back: no hold stays.
                    return Ok(Vote::no(why));
                }
                if tx.execute(&hold, &[account, debit, credit]).await? != 1 {
                    return Err(ResourceError::Fatal(format!("the hold on {account} fails under its own row lock")));
                }
            }
            tx.execute(&record, &[&id, account, debit, credit]).await?;
        }
        Ok(Vote::Yes)
    }

    async fn stage(&self, tx: &BranchTx<'_>, txn: TxnId, payload: &[u8]) -> std::result::Result<Vote, ResourceError> {
        let mark = tx.prepare_cached(&format!("UPDATE {} SET applied = true WHERE txn = $1", self.holds)).await?;
        if tx.execute(&mark, &[&txn.to_string()]).await? == 0 {
            return Err(ResourceError::Fatal(format!("txn {txn} staged with no holds reserved")));
        }
        if let Some((subjects, _)) = &self.events {
            // Prepared with the branch: visible only once it commits.
            let payload = BranchPayload::decode(payload)
                .map_err(|e| ResourceError::Fatal(format!("txn {txn}: a reserved payload no longer decodes: {e}")))?;
            let events: Vec<_> = subjects
                .for_branch(txn, &payload)
                .into_iter()
                .enumerate()
                .map(|(index, event)| (twopc_participant::outbox::event_id(txn, subjects.bank.as_str(), index), event))
                .collect();
            self.insert_events(tx, &events).await?;
        }
        Ok(Vote::Yes)
    }

    async fn settle(
        &self,
        tx: &BranchTx<'_>,
        txn: TxnId,
        decision: Decision,
    ) -> std::result::Result<(), ResourceError> {
        let take = tx
            .prepare_cached(&format!(
                "DELETE FROM {} WHERE txn = $1 RETURNING account, debit_minor, credit_minor, applied",
                self.holds
            ))
            .await?;
        let mut rows = tx.query(&take, &[&txn.to_string()]).await?;
        rows.sort_by(|a, b| a.get::<_, &str>(0).cmp(b.get::<_, &str>(0)));
        let sql = match decision {
            Decision::Commit => format!(
                "UPDATE {} SET balance_minor = balance_minor - $2 + $3, held_minor = held_minor - $2, \
                 incoming_minor = incoming_minor - $3 WHERE name = $1",
                self.accounts
            ),
            Decision::Abort => format!(
                "UPDATE {} SET held_minor = held_minor - $2, incoming_minor = incoming_minor - $3 WHERE name = $1",
                self.accounts
            ),
        };
        let apply = tx.prepare_cached(&sql).await?;
        for row in rows {
            let (account, debit, credit, applied): (&str, i64, i64, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if applied != (decision == Decision::Commit) {
                return Err(ResourceError::Fatal(format!(
                    "txn {txn}: {decision} of a hold on {account} marked applied = {applied}"
                )));
            }
            if tx.execute(&apply, &[&account, &debit, &credit]).await? != 1 {
                return Err(ResourceError::Fatal(format!("txn {txn} holds funds of {account}, which is gone")));
            }
        }
        Ok(())
    }
}

impl BankBranch {
    /// Why a hold does not fit, in the embedded store's words, read with
    /// the account's row locked (until this short transaction ends); None
    /// if it fits now.
    async fn why_not(
        &self,
        tx: &BranchTx<'_>,
        account: &str,
        debit: i64,
        credit: i64,
    ) -> std::result::Result<Option<String>, ResourceError> {
        let sql = format!(
            "SELECT balance_minor - held_minor, balance_minor::numeric + incoming_minor + $2::bigint \
             <= 9223372036854775807 FROM {} WHERE name = $1 FOR UPDATE",
            self.accounts
        );
        let Some(row) = tx.query_opt(&sql, &[&account, &credit]).await? else {
            return Ok(Some(format!("{UNKNOWN_ACCOUNT} {account}")));
        };
        let (available, credit_fits): (i64, bool) = (row.get(0), row.get(1));
        if available < debit {
            return Ok(Some(format!(
                "{INSUFFICIENT_FUNDS} in {account}: available {}, needed {}",
                format_minor(available),
                format_minor(debit)
            )));
        }
        if !credit_fits {
            return Ok(Some(format!("a credit of {} would overflow the balance of {account}", format_minor(credit))));
        }
        Ok(None)
    }
}

/// The bank's accounts in a PostgreSQL schema; see the module docs.
pub struct PgStore {
    resource: PostgresResource<BankBranch>,
    wake: RelayWake,
    /// With events on: what the event stream misses of this bank's history.
    events_missed: Option<String>,
}

impl PgStore {
    /// Opens the store of bank `participant` in `config.schema` (created if
    /// missing), settling what a crash left unsettled. Branches still
    /// prepared wait for the resolver.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config or a server that does not
    /// allow prepared transactions; [`Error::Unavailable`] if the server
    /// cannot be reached.
    pub async fn open(participant: &ParticipantId, config: PostgresConfig) -> Result<Self> {
        Self::open_with_events(participant, config, None, 0).await
    }

    /// As [`PgStore::open`], with events on when `events` is given: each
    /// committed branch's events and each account's opening go to the
    /// outbox, and past `outbox_max` waiting a Prepare votes NO (see the
    /// module docs). Give [`PgStore::relay_wake`] and the store to a relay.
    ///
    /// # Errors
    /// As [`PgStore::open`].
    pub async fn open_with_events(
        participant: &ParticipantId,
        config: PostgresConfig,
        events: Option<EventSubjects>,
        outbox_max: u64,
    ) -> Result<Self> {
        let branch = BankBranch::new(&config.schema, events.map(|e| (e, outbox_max)));
        let resource = PostgresResource::open(participant, config, branch).await.map_err(|e| match e {
            ResourceError::Fatal(why) => Error::Config(why),
            other => Error::from_resource(other),
        })?;
        let events_on = resource.branch().events.is_some();
        let mut store = Self { resource, wake: RelayWake::new(), events_missed: None };
        // A schema made before events existed has no outbox yet.
        let ddl = store.resource.branch().outbox_ddl();
        store.client().await?.batch_execute(&ddl).await.map_err(pg)?;
        store.events_missed = store.record_event_history(events_on).await?;
        if let Some(missed) = &store.events_missed {
            warn!(bank = %participant, "{missed}");
        }
        Ok(store)
    }

    /// With events on, what the event stream is missing of this bank's
    /// history, if anything: accounts and branches from before events were
    /// turned on, or a run with them off since (docs/PROTOCOL.md §14.3).
    /// Logged as a warning at every open.
    pub fn events_missed(&self) -> Option<&str> {
        self.events_missed.as_deref()
    }

    /// Notes in the schema when events were turned on or off, and says what
    /// the event stream is missing, if anything ([`EventHistory`]). A schema
    /// from before this record, opened with events on, is taken as having
    /// had them on.
    async fn record_event_history(&self, events_on: bool) -> Result<Option<String>> {
        let table = &self.resource.branch().event_history;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        // Once the table exists, the lock orders two banks opening the same
        // schema at once (creating it concurrently can still fail, as any
        // CREATE TABLE IF NOT EXISTS can; the next start succeeds).
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (fact text PRIMARY KEY, value bigint NOT NULL);
             LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"
        ))
        .await
        .map_err(pg)?;
        let stored: Vec<(String, i64)> = tx
            .query(&format!("SELECT fact, value FROM {table}"), &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let mut history = EventHistory::from_facts(
            stored.iter().map(|(name, value)| (name.as_str(), u64::try_from(*value).unwrap_or(0))),
        );
        let held_now = if history.turns_on_late(events_on) {
            let accounts: i64 =
                tx.query_one(&format!("SELECT count(*) FROM {}", self.accounts()), &[]).await.map_err(pg)?.get(0);
            let prepared = self.resource.prepared_with_digests().await.map_err(Error::from_resource)?.len();
            u64::try_from(accounts).unwrap_or(0) + prepared as u64
        } else {
            0
        };
        history.record_opening(events_on, held_now);
        let upsert = format!(
            "INSERT INTO {table} (fact, value) VALUES ($1, $2) ON CONFLICT (fact) DO UPDATE SET value = EXCLUDED.value"
        );
        for (name, value) in history.facts() {
            tx.execute(&upsert, &[&name, &i64::try_from(value).unwrap_or(i64::MAX)]).await.map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(history.missed(events_on))
    }

    /// What to tell the relay after a commit that readied events.
    pub fn relay_wake(&self) -> RelayWake {
        self.wake.clone()
    }

    /// The participant library's resource under the store.
    pub fn resource(&self) -> &PostgresResource<BankBranch> {
        &self.resource
    }

    /// How many holds rows exist (reserved and not yet settled).
    ///
    /// # Errors
    /// As any read.
    pub async fn holds(&self) -> Result<u64> {
        let sql = format!("SELECT count(*) FROM {}", self.resource.branch().holds);
        let n: i64 = self.client().await?.query_one(&sql, &[]).await.map_err(pg)?.get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn client(&self) -> Result<Object> {
        self.resource.pool().get().await.map_err(|e| Error::Unavailable(format!("postgres pool: {e}")))
    }

    fn accounts(&self) -> &str {
        &self.resource.branch().accounts
    }
}

impl OutboxSource for PgStore {
    async fn ready(&self, max: usize) -> std::result::Result<Vec<ReadyEvent>, ResourceError> {
        let sql =
            format!("SELECT seq, id, subject, payload FROM {} ORDER BY seq LIMIT $1", self.resource.branch().outbox);
        let client = self.client().await.map_err(ResourceError::from)?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = client.query(&sql, &[&limit]).await?;
        Ok(rows
            .iter()
            .map(|row| {
                let seq: i64 = row.get(0);
                let payload: Vec<u8> = row.get(3);
                ReadyEvent {
                    seq: u64::try_from(seq).unwrap_or(0),
                    id: row.get(1),
                    subject: row.get(2),
                    payload: payload.into(),
                }
            })
            .collect())
    }

    async fn published(&self, seqs: Vec<u64>) -> std::result::Result<(), ResourceError> {
        let sql = format!("DELETE FROM {} WHERE seq = ANY($1)", self.resource.branch().outbox);
        let seqs: Vec<i64> = seqs.into_iter().filter_map(|s| i64::try_from(s).ok()).collect();
        self.client().await.map_err(ResourceError::from)?.execute(&sql, &[&seqs]).await?;
        Ok(())
    }

    /// Events committed and not yet acknowledged; a branch's staged events
    /// are inside its prepared transaction, which no count sees.
    async fn waiting(&self) -> std::result::Result<u64, ResourceError> {
        let sql = format!("SELECT count(*) FROM {}", self.resource.branch().outbox);
        let client = self.client().await.map_err(ResourceError::from)?;
        let count: i64 = client.query_one(&sql, &[]).await?.get(0);
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

fn pg(e: twopc_participant::postgres::tokio_postgres::Error) -> Error {
    Error::from_resource(ResourceError::from(e))
}

impl Error {
    /// A resource failure outside any one txn.
    fn from_resource(e: ResourceError) -> Self {
        match e {
            ResourceError::Unavailable(why) => Self::Unavailable(why),
            other => Self::Fatal(other.to_string()),
        }
    }

    /// A resource failure on `txn`'s branch.
    fn on_branch(txn: TxnId, e: ResourceError) -> Self {
        match e {
            ResourceError::NotPrepared => Self::NotPrepared(txn),
            ResourceError::Conflict { recorded } => Self::Conflict { txn, recorded },
            ResourceError::Unavailable(why) => Self::Unavailable(why),
            ResourceError::Fatal(why) => Self::Fatal(why),
        }
    }
}

fn balance_of(row: &Row) -> Result<AccountBalance> {
    let name: &str = row.get(0);
    let name: AccountName = name.parse().map_err(|e| Error::Fatal(format!("corrupt accounts table: {e}")))?;
    Ok(AccountBalance { name, balance_minor: row.get(1), held_minor: row.get(2), incoming_minor: row.get(3) })
}

fn sum_of(text: &str) -> Result<i128> {
    text.parse().map_err(|e| Error::Fatal(format!("sum {text:?} is not an integer: {e}")))
}

impl AccountStore for PgStore {
    async fn create_account(&self, name: AccountName, initial_minor: i64) -> Result<AccountBalance> {
        if initial_minor < 0 {
            return Err(Error::Invalid {
                field: "initial_balance",
                why: format!("{} is negative", format_minor(initial_minor)),
            });
        }
        let sql = format!(
            "INSERT INTO {} (name, balance_minor) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            self.accounts()
        );
        let mut client = self.client().await?;
        // The opening's event, if events are on, commits with the account.
        let tx = client.transaction().await.map_err(pg)?;
        let inserted = tx.execute(&sql, &[&name.as_str(), &initial_minor]).await.map_err(pg)?;
        if inserted == 0 {
            return Err(Error::AccountExists(name));
        }
        let branch = self.resource.branch();
        if let Some((subjects, _)) = &branch.events {
            let (id, event) = subjects.opened(&name, initial_minor);
            tx.execute(&branch.insert_event_sql(), &[&id, &event.subject, &event.payload.as_ref()])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        if branch.events.is_some() {
            self.wake.wake();
        }
        Ok(AccountBalance { name, balance_minor: initial_minor, held_minor: 0, incoming_minor: 0 })
    }

    async fn account(&self, name: AccountName) -> Result<AccountBalance> {
        let sql =
            format!("SELECT name, balance_minor, held_minor, incoming_minor FROM {} WHERE name = $1", self.accounts());
        match self.client().await?.query_opt(&sql, &[&name.as_str()]).await.map_err(pg)? {
            Some(row) => balance_of(&row),
            None => Err(Error::AccountNotFound(name)),
        }
    }

    async fn list_accounts(&self, after: Option<AccountName>, limit: usize) -> Result<Vec<AccountBalance>> {
        let sql = format!(
            "SELECT name, balance_minor, held_minor, incoming_minor FROM {} WHERE name > $1 ORDER BY name LIMIT $2",
            self.accounts()
        );
        let after = after.as_ref().map_or("", AccountName::as_str);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.client().await?.query(&sql, &[&after, &limit]).await.map_err(pg)?;
        rows.iter().map(balance_of).collect()
    }

    async fn totals(&self) -> Result<Totals> {
        let sql = format!(
            "SELECT coalesce(sum(balance_minor), 0)::text, coalesce(sum(held_minor), 0)::text, \
             coalesce(sum(incoming_minor), 0)::text, count(*) FROM {}",
            self.accounts()
        );
        let row = self.client().await?.query_one(&sql, &[]).await.map_err(pg)?;
        let accounts: i64 = row.get(3);
        Ok(Totals {
            balance_minor: sum_of(row.get(0))?,
            held_minor: sum_of(row.get(1))?,
            incoming_minor: sum_of(row.get(2))?,
            accounts: u64::try_from(accounts).unwrap_or(0),
        })
    }

    async fn prepare_with_digest(&self, txn: TxnId, payload: BranchPayload, digest: PayloadDigest) -> Result<Vote> {
        let prepared = self.resource.prepare_with_digest(txn, &payload.encode(), digest).await;
        prepared.map_err(|e| Error::on_branch(txn, e))
    }

    async fn refuse(&self, txn: TxnId, reason: String) -> Result<Vote> {
        self.resource.refuse(txn, reason).await.map_err(|e| Error::on_branch(txn, e))
    }

    async fn commit(&self, txn: TxnId) -> Result<()> {
        self.resource.commit(txn).await.map_err(|e| Error::on_branch(txn, e))?;
        if self.resource.branch().events.is_some() {
            self.wake.wake();
        }
        Ok(())
    }

    async fn abort(&self, txn: TxnId) -> Result<()> {
        self.resource.abort(txn).await.map_err(|e| Error::on_branch(txn, e))
    }

    async fn prepared_with_digests(&self) -> Result<Vec<(TxnId, Option<PayloadDigest>)>> {
        self.resource.prepared_with_digests().await.map_err(Error::from_resource)
    }

    async fn branch_state(&self, txn: TxnId) -> Result<Option<BranchState>> {
        let status = self.resource.status(txn).await.map_err(Error::from_resource)?;
        Ok(status.map(|status| match status {
            BranchStatus::Reserved { prepared: true } => BranchState::Prepared,
            // Not prepared: abandoned (or being prepared right now); it can only end aborted.
            BranchStatus::Reserved { prepared: false } | BranchStatus::Aborted => BranchState::Aborted,
            BranchStatus::Committed { .. } => BranchState::Committed,
            BranchStatus::Refused(_) => BranchState::Refused,
            BranchStatus::Tombstone => BranchState::Tombstone,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each bank gets its own schema by default, a valid identifier.
    #[test]
    fn default_schemas_are_per_bank_identifiers() {
        let schema = |name: &str| default_schema(&name.parse().expect("id"));
        assert_eq!(schema("bank-a").expect("schema"), "twopc_bank_a");
        assert_eq!(schema("eu.bank_2").expect("schema"), "twopc_eu_bank_2");
        assert!(matches!(schema(&"b".repeat(64)), Err(Error::Config(_))));
    }

    // Operations are summed per account, in name order (the lock order), and an overflow is a refusal.
    #[test]
    fn takes_are_summed_per_account_in_name_order() {
        let op = |debit: bool, account: &str, amount_minor: i64| {
            let account = account.parse().expect("name");
            if debit { Operation::Debit { account, amount_minor } } else { Operation::Credit { account, amount_minor } }
        };
        let payload =
            BranchPayload::new(vec![op(true, "zed", 5), op(false, "amy", 3), op(true, "zed", 2), op(false, "zed", 1)])
                .expect("payload");
        let takes = takes(&payload).expect("takes");
        assert_eq!(takes.into_iter().collect::<Vec<_>>(), vec![("amy".into(), (0, 3)), ("zed".into(), (7, 1))]);
        let overflow = BranchPayload::new(vec![op(true, "a", i64::MAX), op(true, "a", 1)]).expect("payload");
        assert!(super::takes(&overflow).is_err());
    }
}
