//! [`EventResource`]: a participant whose branch is a list of events to
//! publish, for a service with no store of its own, or one that wants "send
//! this iff the global txn commits". Its Prepare payload is a `StagedEvents`
//! message (participant.proto; [`super::encode_staged`] builds one); it votes
//! YES once the events are staged in its own redb file, and a [`Relay`]
//! publishes them after Commit.
//!
//! ```no_run
//! use std::sync::Arc;
//! use twopc_participant::outbox::{EventResource, EventResourceConfig, Relay, RelayConfig, RelayWake};
//! use twopc_participant::{Participant, ParticipantConfig};
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! let wake = RelayWake::new();
//! let id = "order-events".parse()?;
//! let limits = EventResourceConfig::new(&id);
//! let events = Arc::new(EventResource::open("data/events.redb", limits, wake.clone()).await?);
//! let _relay = Relay::spawn(Arc::clone(&events), wake, RelayConfig::new("nats://127.0.0.1:4222"))?;
//! let config = ParticipantConfig::new(id, vec!["10.0.0.1:7000".into()]);
//! let participant = Participant::new(events, config)?;
//! # Ok(())
//! # }
//! ```
//!
//! Tables, beside the outbox's own ([`super::tables`]):
//! - `event_branches`: txn id -> state, time of the last change, and the NO
//!   reason or, while prepared, the payload's digest (docs/PROTOCOL.md §3.1).
//! - `event_finished`: (finished at, txn id) -> (), the retention index.
//!
//! [`Relay`]: super::Relay

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, PayloadDigest, TxnId, Vote};

use super::tables::{self, OutboxTables};
use super::{OutboxSource, ReadyEvent, RelayWake, decode_staged};
use crate::resource::{Resource, ResourceError};

const BRANCHES: TableDefinition<u128, &[u8]> = TableDefinition::new("event_branches");
const FINISHED: TableDefinition<(u64, u128), ()> = TableDefinition::new("event_finished");

/// The NO reason when the outbox holds `outbox_max` entries already.
pub const OUTBOX_FULL: &str = "event outbox full";

/// Limits of an [`EventResource`], each with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventResourceConfig {
    /// The participant's id (its name in the cluster), part of every event
    /// id, so two event participants of one txn never publish the same id
    /// (the stream would drop the second). Always given.
    pub source: String,
    /// The most entries waiting (branches staged plus events not yet
    /// acknowledged by the stream) before Prepare votes NO ("event outbox
    /// full"); default 100 000.
    pub outbox_max: u64,
    /// The most events in one branch; default 64.
    pub events_per_branch_max: usize,
    /// How long finished branch records (and tombstones) are kept; default
    /// 600 000 ms, the participant library's `tombstone_retention_ms`.
    pub finished_retention_ms: u64,
}

impl EventResourceConfig {
    /// The defaults, for participant `id`.
    pub fn new(id: &twopc_proto::ParticipantId) -> Self {
        Self { source: id.to_string(), outbox_max: 100_000, events_per_branch_max: 64, finished_retention_ms: 600_000 }
    }
}

/// Where a branch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Prepared = 1,
    Refused = 2,
    Committed = 3,
    Aborted = 4,
    Tombstone = 5,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    state: State,
    updated_unix_ms: u64,
    /// Why it voted NO (Refused only).
    reason: String,
    /// The digest of the payload it voted YES on (Prepared only; none in a
    /// record written before digests were kept).
    digest: Option<PayloadDigest>,
}

impl Record {
    /// The state byte, the time, then the reason, or for a prepared branch
    /// its payload's digest in hex: text, so a binary from before digests
    /// reads it as an (unused) reason rather than as corrupt.
    fn encode(&self) -> Vec<u8> {
        let tail = match (self.state, &self.digest) {
            (State::Prepared, Some(digest)) => digest.to_hex(),
            _ => self.reason.clone(),
        };
        let mut bytes = Vec::with_capacity(9 + tail.len());
        bytes.push(self.state as u8);
        bytes.extend_from_slice(&self.updated_unix_ms.to_be_bytes());
        bytes.extend_from_slice(tail.as_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, ResourceError> {
        let corrupt = || ResourceError::Fatal("corrupt event branch record".into());
        let (&state, rest) = bytes.split_first().ok_or_else(corrupt)?;
        let state = match state {
            1 => State::Prepared,
            2 => State::Refused,
            3 => State::Committed,
            4 => State::Aborted,
            5 => State::Tombstone,
            _ => return Err(corrupt()),
        };
        let (time, tail) = rest.split_at_checked(8).ok_or_else(corrupt)?;
        let updated_unix_ms = u64::from_be_bytes(time.try_into().map_err(|_| corrupt())?);
        let tail = String::from_utf8(tail.to_vec()).map_err(|_| corrupt())?;
        let (reason, digest) = match state {
            State::Prepared if tail.is_empty() => (String::new(), None),
            State::Prepared => (String::new(), Some(PayloadDigest::from_hex(&tail).ok_or_else(corrupt)?)),
            _ => (tail, None),
        };
        Ok(Self { state, updated_unix_ms, reason, digest })
    }

    fn vote(&self) -> Vote {
        match self.state {
            State::Prepared | State::Committed => Vote::Yes,
            State::Refused => Vote::no(self.reason.clone()),
            State::Aborted | State::Tombstone => Vote::no("txn already aborted"),
        }
    }
}

/// A participant that only publishes events: see the module documentation.
pub struct EventResource {
    db: Arc<Database>,
    config: EventResourceConfig,
    wake: RelayWake,
    path: PathBuf,
}

fn storage(e: impl Into<redb::Error>) -> ResourceError {
    match e.into() {
        redb::Error::Io(io) => ResourceError::Unavailable(format!("event store I/O: {io}")),
        other => ResourceError::Fatal(format!("event store: {other}")),
    }
}

fn key_of(txn: TxnId) -> u128 {
    u128::from_be_bytes(txn.to_bytes())
}

/// What one write did to a branch.
enum Outcome {
    Vote(Vote),
    Decided { readied: usize },
}

impl EventResource {
    /// Opens (or creates) the store file at `path`; `wake` is told after each
    /// commit that readied events (give the same one to the [`super::Relay`]).
    ///
    /// # Errors
    /// [`ResourceError::Unavailable`] if the file is in use or unreadable,
    /// [`ResourceError::Fatal`] if it is corrupt or `config` is invalid.
    pub async fn open(
        path: impl Into<PathBuf>,
        config: EventResourceConfig,
        wake: RelayWake,
    ) -> Result<Self, ResourceError> {
        if config.outbox_max == 0 || config.events_per_branch_max == 0 || config.finished_retention_ms == 0 {
            return Err(ResourceError::Fatal(
                "outbox_max, events_per_branch_max and finished_retention_ms must be above 0".into(),
            ));
        }
        if config.source.is_empty() {
            return Err(ResourceError::Fatal("source is empty; give the participant's id".into()));
        }
        let path = path.into();
        let opened = path.clone();
        let db = twopc_proto::host::run_blocking(move || -> Result<Database, ResourceError> {
            let db = Database::create(&opened).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => ResourceError::Unavailable(format!(
                    "the event store {} is open in another process; stop it first",
                    opened.display()
                )),
                other => storage(other),
            })?;
            let init = db.begin_write().map_err(storage)?;
            init.open_table(BRANCHES).map_err(storage)?;
            init.open_table(FINISHED).map_err(storage)?;
            tables::create(&init).map_err(storage)?;
            init.commit().map_err(storage)?;
            Ok(db)
        })
        .await
        .map_err(|e| ResourceError::Fatal(format!("opening the event store: {e}")))??;
        Ok(Self { db: Arc::new(db), config, wake, path })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries waiting: branches staged plus events not yet acknowledged.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn waiting(&self) -> Result<u64, ResourceError> {
        let db = Arc::clone(&self.db);
        run(move || tables::read_waiting(&db.begin_read().map_err(storage)?).map_err(storage)).await
    }

    /// One durable write: `change` sees the branch's record (None if there
    /// is none) and the outbox tables, and returns the record to keep.
    async fn write(
        &self,
        txn: TxnId,
        change: impl FnOnce(Option<Record>, &mut OutboxTables<'_>, u64) -> Result<(Option<Record>, Outcome), ResourceError>
        + Send
        + 'static,
    ) -> Result<Outcome, ResourceError> {
        let db = Arc::clone(&self.db);
        let retention = self.config.finished_retention_ms;
        run(move || {
            let now = unix_now_ms();
            let mut write = db.begin_write().map_err(storage)?;
            write.set_durability(Durability::Immediate).map_err(storage)?;
            let outcome = {
                let mut branches = write.open_table(BRANCHES).map_err(storage)?;
                let mut finished = write.open_table(FINISHED).map_err(storage)?;
                let mut outbox = OutboxTables::open(&write).map_err(storage)?;
                let record =
                    branches.get(key_of(txn)).map_err(storage)?.map(|r| Record::decode(r.value())).transpose()?;
                let (keep, outcome) = change(record, &mut outbox, now)?;
                if let Some(record) = keep {
                    branches.insert(key_of(txn), record.encode().as_slice()).map_err(storage)?;
                    if record.state != State::Prepared {
                        finished.insert((record.updated_unix_ms, key_of(txn)), ()).map_err(storage)?;
                    }
                }
                // Forget a few expired finished records with every write, so
                // the file stays bounded without a timer of its own.
                let expired: Vec<(u64, u128)> = finished
                    .range(..(now.saturating_sub(retention), 0u128))
                    .map_err(storage)?
                    .take(16)
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(storage)?;
                for (at, key) in expired {
                    finished.remove((at, key)).map_err(storage)?;
                    branches.remove(key).map_err(storage)?;
                }
                outcome
            };
            // The vote or the decision is durable before anyone hears it (I3).
            write.commit().map_err(storage)?;
            Ok(outcome)
        })
        .await
    }
}

async fn run<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ResourceError> + Send + 'static,
) -> Result<T, ResourceError> {
    twopc_proto::host::run_blocking(work).await.map_err(|e| ResourceError::Fatal(format!("event store worker: {e}")))?
}

fn record(state: State, now: u64, reason: impl Into<String>) -> Record {
    Record { state, updated_unix_ms: now, reason: reason.into(), digest: None }
}

impl Resource for EventResource {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        let events = decode_staged(&payload, self.config.events_per_branch_max);
        let digest = PayloadDigest::of(&payload);
        let outbox_max = self.config.outbox_max;
        let source = self.config.source.clone();
        let outcome = self
            .write(txn, move |existing, outbox, now| {
                // I5: a txn with a record keeps its vote.
                if let Some(existing) = existing {
                    return Ok((None, Outcome::Vote(existing.vote())));
                }
                let events = match events {
                    Ok(events) => events,
                    Err(why) => {
                        return Ok((Some(record(State::Refused, now, why.clone())), Outcome::Vote(Vote::no(why))));
                    }
                };
                let waiting = outbox.waiting().map_err(storage)?;
                if waiting >= outbox_max {
                    let why = format!(
                        "{OUTBOX_FULL}: {waiting} entries wait for NATS (outbox_max {outbox_max}); \
                         events go out and transfers are taken again once NATS is back"
                    );
                    return Ok((Some(record(State::Refused, now, why.clone())), Outcome::Vote(Vote::no(why))));
                }
                outbox.stage(txn, &source, &events).map_err(storage)?;
                let prepared = Record { digest: Some(digest), ..record(State::Prepared, now, "") };
                Ok((Some(prepared), Outcome::Vote(Vote::Yes)))
            })
            .await?;
        match outcome {
            Outcome::Vote(vote) => Ok(vote),
            Outcome::Decided { .. } => Err(ResourceError::Fatal("prepare decided a branch".into())),
        }
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        let outcome = self
            .write(txn, move |existing, outbox, now| match existing.map(|r| r.state) {
                None => Err(ResourceError::NotPrepared),
                Some(State::Committed) => Ok((None, Outcome::Decided { readied: 0 })),
                Some(State::Refused | State::Aborted | State::Tombstone) => {
                    Err(ResourceError::Conflict { recorded: Decision::Abort })
                }
                Some(State::Prepared) => {
                    let readied = outbox.commit(txn).map_err(storage)?;
                    Ok((Some(record(State::Committed, now, "")), Outcome::Decided { readied }))
                }
            })
            .await?;
        if let Outcome::Decided { readied } = outcome
            && readied > 0
        {
            self.wake.wake();
        }
        Ok(())
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.write(txn, move |existing, outbox, now| match existing.map(|r| r.state) {
            // I4: a tombstone, so that a late Prepare votes NO.
            None => Ok((Some(record(State::Tombstone, now, "")), Outcome::Decided { readied: 0 })),
            Some(State::Committed) => Err(ResourceError::Conflict { recorded: Decision::Commit }),
            Some(State::Refused | State::Aborted | State::Tombstone) => Ok((None, Outcome::Decided { readied: 0 })),
            Some(State::Prepared) => {
                outbox.abort(txn).map_err(storage)?;
                Ok((Some(record(State::Aborted, now, "")), Outcome::Decided { readied: 0 }))
            }
        })
        .await?;
        Ok(())
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        Ok(self.prepared_with_digests().await?.into_iter().map(|(txn, _)| txn).collect())
    }

    async fn prepared_with_digests(&self) -> Result<Vec<(TxnId, Option<PayloadDigest>)>, ResourceError> {
        let db = Arc::clone(&self.db);
        run(move || {
            let read = db.begin_read().map_err(storage)?;
            let branches = read.open_table(BRANCHES).map_err(storage)?;
            let mut txns = Vec::new();
            for entry in branches.iter().map_err(storage)? {
                let (key, value) = entry.map_err(storage)?;
                let record = Record::decode(value.value())?;
                if record.state == State::Prepared {
                    let txn = TxnId::from_bytes(key.value().to_be_bytes())
                        .map_err(|e| ResourceError::Fatal(format!("corrupt event branch key: {e}")))?;
                    txns.push((txn, record.digest));
                }
            }
            Ok(txns)
        })
        .await
    }
}

impl OutboxSource for EventResource {
    async fn ready(&self, max: usize) -> Result<Vec<ReadyEvent>, ResourceError> {
        let db = Arc::clone(&self.db);
        run(move || tables::read_ready(&db.begin_read().map_err(storage)?, max).map_err(storage)).await
    }

    async fn published(&self, seqs: Vec<u64>) -> Result<(), ResourceError> {
        let db = Arc::clone(&self.db);
        run(move || {
            // A removal lost in a crash only republishes events, which the
            // stream drops as duplicates.
            let mut write = db.begin_write().map_err(storage)?;
            write.set_durability(Durability::Immediate).map_err(storage)?;
            OutboxTables::open(&write).map_err(storage)?.remove_published(&seqs).map_err(storage)?;
            write.commit().map_err(storage)?;
            Ok(())
        })
        .await
    }

    async fn waiting(&self) -> Result<u64, ResourceError> {
        EventResource::waiting(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A prepared record's digest is stored as text, so a refused record's
    // reason is never read as one, and a prepared record from before digests
    // (empty tail) reads as having none.
    #[test]
    fn records_keep_a_prepared_digest_and_a_refusal_reason_apart() {
        let digest = PayloadDigest::of(b"events");
        let prepared = Record { digest: Some(digest), ..record(State::Prepared, 7, "") };
        assert_eq!(Record::decode(&prepared.encode()), Ok(prepared.clone()));
        assert!(prepared.encode()[9..].is_ascii(), "the digest is text an older binary reads as a reason");
        let refused = record(State::Refused, 7, digest.to_hex());
        assert_eq!(Record::decode(&refused.encode()).map(|r| (r.reason, r.digest)), Ok((digest.to_hex(), None)));
        let before_digests = record(State::Prepared, 7, "");
        assert_eq!(Record::decode(&before_digests.encode()).map(|r| r.digest), Ok(None));
    }
}
