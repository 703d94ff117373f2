//! The coordinator's interactive-txn calls (docs/PROTOCOL.md §12) made raw
//! through a [`ClusterClient`], so a test sees each answer's status as a
//! client in any language would: used by the simulation's clients and
//! misuser and by `tests/interactive.rs`.

use tonic::Status;
use twopc_client::ClusterClient;
use twopc_proto::{TxnContext, TxnId, pb};

/// `Coordinator.Begin`: `txn_id` None lets the coordinator pick one.
///
/// # Errors
/// The coordinator's refusal, or the last failure once the client's retry
/// budget is spent; a context the answer lacks or garbles is `INTERNAL`.
pub async fn begin(client: &ClusterClient, txn_id: Option<TxnId>, timeout_ms: u64) -> Result<TxnContext, Status> {
    let request = pb::BeginRequest { txn_id: txn_id.map(|id| id.to_string()).unwrap_or_default(), timeout_ms };
    let answer = client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.begin(request).await }
        })
        .await?;
    let context = answer.context.ok_or_else(|| Status::internal("Begin answered no context"))?;
    let txn_id = context.txn_id.parse().map_err(|e| Status::internal(format!("Begin answered a bad txn id: {e}")))?;
    Ok(TxnContext { txn_id, deadline_unix_ms: context.deadline_unix_ms })
}

/// `Coordinator.Commit`, with `branches` as its one-shot branches (none for
/// a txn whose every branch joined).
///
/// # Errors
/// As [`begin`].
pub async fn commit(
    client: &ClusterClient,
    txn_id: TxnId,
    branches: Vec<pb::Branch>,
) -> Result<pb::SubmitResponse, Status> {
    let request = pb::CommitRequest { txn_id: txn_id.to_string(), branches };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.commit(request).await }
        })
        .await
}

/// `Coordinator.Rollback`.
///
/// # Errors
/// As [`begin`].
pub async fn rollback(client: &ClusterClient, txn_id: TxnId, reason: &str) -> Result<pb::RollbackResponse, Status> {
    let request = pb::RollbackRequest { txn_id: txn_id.to_string(), reason: reason.to_owned() };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.rollback(request).await }
        })
        .await
}

/// `Coordinator.Join`, as a participant calls it (`txn_id` as text, so a
/// malformed one can be sent).
///
/// # Errors
/// As [`begin`].
pub async fn join(client: &ClusterClient, txn_id: &str, participant: &str) -> Result<pb::JoinResponse, Status> {
    let request = pb::JoinRequest { txn_id: txn_id.to_owned(), participant: participant.to_owned() };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.join(request).await }
        })
        .await
}
