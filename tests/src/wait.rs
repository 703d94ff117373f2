//! Waiting for a condition with a bounded deadline.
//!
//! Tests never sleep for a fixed time in place of synchronisation: they poll
//! the condition they need, and fail with a message once the deadline passes.

use std::future::Future;
use std::time::Duration;

/// How often a condition is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
///
/// # Errors
/// The deadline passed before the condition held.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// What the cluster's log says about `txn_id` (GetTransaction, leader-following).
///
/// # Errors
/// The cluster's status (`NOT_FOUND` for a txn it holds no record of).
pub async fn transaction(
    client: &twopc_client::ClusterClient,
    txn_id: twopc_proto::TxnId,
) -> Result<twopc_proto::pb::TransactionInfo, tonic::Status> {
    let request = twopc_proto::pb::GetTransactionRequest { txn_id: txn_id.to_string() };
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.get_transaction(request).await }
        })
        .await
}

/// Waits until every branch of `txn_id` acknowledged the decision.
///
/// # Errors
/// Not finished within `timeout`.
pub async fn finished(
    client: &twopc_client::ClusterClient,
    txn_id: twopc_proto::TxnId,
    timeout: Duration,
) -> anyhow::Result<twopc_proto::pb::TransactionInfo> {
    until("every branch to acknowledge", timeout, || async {
        transaction(client, txn_id).await.ok().filter(|t| t.state == twopc_proto::pb::TxnState::Finished as i32)
    })
    .await
}

/// Waits until `check` holds of `resource`.
///
/// # Errors
/// It did not hold within `timeout`.
pub async fn resource(
    what: &str,
    resource: &twopc_participant::memory::MemoryResource,
    timeout: Duration,
    check: impl Fn(&twopc_participant::memory::MemoryResource) -> bool,
) -> anyhow::Result<()> {
    until(what, timeout, || async { check(resource).then_some(()) }).await
}
