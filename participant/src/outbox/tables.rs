//! [`OutboxTables`]: the outbox's two redb tables, written inside the write
//! transaction a store already commits durably for a Prepare, a Commit or an
//! Abort, so events and branch change together or not at all.
//!
//! - `outbox_staged`: txn id (big-endian u128) -> its events with their ids,
//!   written by Prepare, removed by Commit or Abort.
//! - `outbox_ready`: sequence number -> one event with its id, in commit
//!   order, removed once the stream has acknowledged it.

use prost::Message as _;
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};
use twopc_proto::TxnId;

use super::{OutboxEvent, ReadyEvent, event_id};

const STAGED: TableDefinition<u128, &[u8]> = TableDefinition::new("outbox_staged");
const READY: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_ready");

/// A branch's staged events, their ids fixed at Prepare.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredBatch {
    #[prost(message, repeated, tag = "1")]
    events: Vec<StoredEvent>,
}

/// One event as stored, with its id.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredEvent {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    subject: String,
    #[prost(bytes = "bytes", tag = "3")]
    payload: bytes::Bytes,
}

/// The outbox tables, opened inside one write transaction.
pub struct OutboxTables<'t> {
    staged: Table<'t, u128, &'static [u8]>,
    ready: Table<'t, u64, &'static [u8]>,
}

fn key_of(txn: TxnId) -> u128 {
    u128::from_be_bytes(txn.to_bytes())
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> redb::Error {
    redb::Error::Corrupted(format!("outbox: {what}: {e}"))
}

impl<'t> OutboxTables<'t> {
    /// Opens (creating on first use) the tables in `txn`.
    ///
    /// # Errors
    /// redb's, when the tables cannot be opened.
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self { staged: txn.open_table(STAGED)?, ready: txn.open_table(READY)? })
    }

    /// Entries waiting: branches with staged events plus events ready and
    /// not yet acknowledged. A store compares it with its bound before it
    /// stages more (docs/OPERATIONS.md, `outbox_max`).
    ///
    /// # Errors
    /// redb's.
    pub fn waiting(&self) -> Result<u64, redb::Error> {
        Ok(self.staged.len()? + self.ready.len()?)
    }

    /// Stages `events` for the branch of `txn` at participant `source`
    /// (nothing if there are none); their ids are [`event_id`]s. Call it in
    /// the write that records the branch as prepared.
    ///
    /// # Errors
    /// redb's.
    pub fn stage(&mut self, txn: TxnId, source: &str, events: &[OutboxEvent]) -> Result<(), redb::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let batch = StoredBatch {
            events: events
                .iter()
                .enumerate()
                .map(|(index, e)| StoredEvent {
                    id: event_id(txn, source, index),
                    subject: e.subject.clone(),
                    payload: e.payload.clone(),
                })
                .collect(),
        };
        self.staged.insert(key_of(txn), batch.encode_to_vec().as_slice())?;
        Ok(())
    }

    /// Moves `txn`'s staged events to the ready queue, in order, and says how
    /// many. Call it in the write that commits the branch; a repeat (nothing
    /// staged any more) moves nothing.
    ///
    /// # Errors
    /// redb's, or a corrupt staged entry.
    pub fn commit(&mut self, txn: TxnId) -> Result<usize, redb::Error> {
        let Some(staged) = self.staged.remove(key_of(txn))? else { return Ok(0) };
        let batch = StoredBatch::decode(staged.value()).map_err(|e| corrupt("staged events", e))?;
        drop(staged);
        for event in &batch.events {
            self.push_ready(event)?;
        }
        Ok(batch.events.len())
    }

    /// Drops `txn`'s staged events. Call it in the write that aborts the branch.
    ///
    /// # Errors
    /// redb's.
    pub fn abort(&mut self, txn: TxnId) -> Result<(), redb::Error> {
        self.staged.remove(key_of(txn))?;
        Ok(())
    }

    /// Queues one event with id `id` for publishing, with no branch: for a
    /// write that is not a txn's (a bank opening an account), in that write.
    ///
    /// # Errors
    /// redb's.
    pub fn enqueue(&mut self, id: &str, event: &OutboxEvent) -> Result<(), redb::Error> {
        self.push_ready(&StoredEvent {
            id: id.to_owned(),
            subject: event.subject.clone(),
            payload: event.payload.clone(),
        })
    }

    fn push_ready(&mut self, event: &StoredEvent) -> Result<(), redb::Error> {
        let seq = match self.ready.last()? {
            Some((last, _)) => last.value() + 1,
            None => 1,
        };
        self.ready.insert(seq, event.encode_to_vec().as_slice())?;
        Ok(())
    }

    /// Removes events the stream has acknowledged; unknown numbers are ignored.
    ///
    /// # Errors
    /// redb's.
    pub fn remove_published(&mut self, seqs: &[u64]) -> Result<(), redb::Error> {
        for seq in seqs {
            self.ready.remove(*seq)?;
        }
        Ok(())
    }
}

/// Creates the tables if they do not exist yet, in a store's set-up write.
///
/// # Errors
/// redb's.
pub fn create(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(STAGED)?;
    txn.open_table(READY)?;
    Ok(())
}

/// Up to `max` ready events, oldest first, from a read transaction.
///
/// # Errors
/// redb's, or a corrupt entry.
pub fn read_ready(txn: &ReadTransaction, max: usize) -> Result<Vec<ReadyEvent>, redb::Error> {
    let ready = txn.open_table(READY)?;
    let mut events = Vec::with_capacity(max.min(1024));
    for entry in ready.iter()?.take(max) {
        let (seq, bytes) = entry?;
        let stored = StoredEvent::decode(bytes.value()).map_err(|e| corrupt("ready event", e))?;
        events.push(ReadyEvent { seq: seq.value(), id: stored.id, subject: stored.subject, payload: stored.payload });
    }
    Ok(events)
}

/// Entries waiting (as [`OutboxTables::waiting`]), from a read transaction.
///
/// # Errors
/// redb's.
pub fn read_waiting(txn: &ReadTransaction) -> Result<u64, redb::Error> {
    Ok(txn.open_table(STAGED)?.len()? + txn.open_table(READY)?.len()?)
}
