//! A small service on PostgreSQL for the participant's own tests: every
//! branch reserves a row, stages an effect row, and settles the reservation.

#![allow(dead_code)]

use twopc_participant::postgres::{BranchTx, PostgresBranch, PostgresConfig, PostgresResource};
use twopc_participant::{Decision, ParticipantId, ResourceError, TxnId, Vote};

/// The resource under test.
pub type Counting = PostgresResource<CountingBranch>;

/// Reserve inserts `reservations(txn)`; stage votes NO on a payload starting
/// with `no:` and otherwise inserts `effects(txn)`; settle deletes the
/// reservation and, on Commit, checks the effect is there. Its tables live
/// in the resource's schema.
pub struct CountingBranch {
    effects: String,
    reservations: String,
}

impl CountingBranch {
    /// The branch for tables in `schema`.
    pub fn new(schema: &str) -> Self {
        Self { effects: format!("\"{schema}\".effects"), reservations: format!("\"{schema}\".reservations") }
    }
}

/// Opens the resource for `participant` on `config`.
pub async fn open(participant: &ParticipantId, config: PostgresConfig) -> Counting {
    let branch = CountingBranch::new(&config.schema);
    PostgresResource::open(participant, config, branch).await.expect("open the postgres resource")
}

/// How many effect rows `txn` has (visible only once committed).
pub async fn effects(resource: &Counting, txn: TxnId) -> u64 {
    let client = resource.pool().get().await.expect("a connection");
    let sql = format!("SELECT count(*) FROM {} WHERE txn = $1", resource.branch().effects);
    let n: i64 = client.query_one(&sql, &[&txn.to_string()]).await.expect("count effects").get(0);
    u64::try_from(n).expect("a count")
}

/// How many reservations are not settled yet.
pub async fn reservations(resource: &Counting) -> u64 {
    let client = resource.pool().get().await.expect("a connection");
    let sql = format!("SELECT count(*) FROM {}", resource.branch().reservations);
    let n: i64 = client.query_one(&sql, &[]).await.expect("count reservations").get(0);
    u64::try_from(n).expect("a count")
}

impl PostgresBranch for CountingBranch {
    async fn setup(&self, tx: &BranchTx<'_>) -> Result<(), ResourceError> {
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (txn text NOT NULL); \
             CREATE TABLE IF NOT EXISTS {} (txn text PRIMARY KEY)",
            self.effects, self.reservations
        ))
        .await?;
        Ok(())
    }

    async fn reserve(&self, tx: &BranchTx<'_>, txn: TxnId, _payload: &[u8]) -> Result<Vote, ResourceError> {
        tx.execute(&format!("INSERT INTO {} (txn) VALUES ($1)", self.reservations), &[&txn.to_string()]).await?;
        Ok(Vote::Yes)
    }

    async fn stage(&self, tx: &BranchTx<'_>, txn: TxnId, payload: &[u8]) -> Result<Vote, ResourceError> {
        if let Some(reason) = payload.strip_prefix(b"no:") {
            return Ok(Vote::no(String::from_utf8_lossy(reason)));
        }
        tx.execute(&format!("INSERT INTO {} (txn) VALUES ($1)", self.effects), &[&txn.to_string()]).await?;
        Ok(Vote::Yes)
    }

    async fn settle(&self, tx: &BranchTx<'_>, txn: TxnId, decision: Decision) -> Result<(), ResourceError> {
        let id = txn.to_string();
        let released = tx.execute(&format!("DELETE FROM {} WHERE txn = $1", self.reservations), &[&id]).await?;
        if released != 1 {
            return Err(ResourceError::Fatal(format!("settle {decision} of {txn}: no reservation to release")));
        }
        let effects: i64 =
            tx.query_one(&format!("SELECT count(*) FROM {} WHERE txn = $1", self.effects), &[&id]).await?.get(0);
        let expected = i64::from(decision == Decision::Commit);
        if effects != expected {
            return Err(ResourceError::Fatal(format!("settle {decision} of {txn}: {effects} effects")));
        }
        Ok(())
    }
}

/// The resource of a service that stages every branch with its own SQL
/// (`PostgresResource::prepare_with`, through `Joiner::join_with`).
pub type Notes = PostgresResource<NotesBranch>;

/// A service whose handlers write `notes(txn, note)` rows inside the branch
/// transaction; it has no reserve step and nothing to settle, and it never
/// stages a payload.
pub struct NotesBranch {
    /// `"<schema>".notes`.
    pub notes: String,
}

/// Opens the notes service's resource for `participant` on `config`.
pub async fn open_notes(participant: &ParticipantId, config: PostgresConfig) -> Notes {
    let branch = NotesBranch { notes: format!("\"{}\".notes", config.schema) };
    PostgresResource::open(participant, config, branch).await.expect("open the postgres resource")
}

/// The note `txn` wrote, if it is visible (committed).
pub async fn note(resource: &Notes, txn: TxnId) -> Option<String> {
    let client = resource.pool().get().await.expect("a connection");
    let sql = format!("SELECT note FROM {} WHERE txn = $1", resource.branch().notes);
    client.query_opt(&sql, &[&txn.to_string()]).await.expect("read notes").map(|row| row.get(0))
}

impl PostgresBranch for NotesBranch {
    async fn setup(&self, tx: &BranchTx<'_>) -> Result<(), ResourceError> {
        tx.batch_execute(&format!("CREATE TABLE {} (txn text PRIMARY KEY, note text NOT NULL)", self.notes)).await?;
        Ok(())
    }

    async fn stage(&self, _tx: &BranchTx<'_>, txn: TxnId, _payload: &[u8]) -> Result<Vote, ResourceError> {
        Ok(Vote::no(format!("txn {txn}: this service stages its branches with its own SQL, not a payload")))
    }
}
