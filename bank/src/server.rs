//! Running a bank: [`run`] opens the store and serves the Participant and
//! Bank gRPC services on one listener until the shutdown signal; [`serve`]
//! does the same over a store the caller opened (any [`AccountStore`]: the
//! embedded one or PostgreSQL). The Bank service's Debit and Credit join
//! interactive txns through the participant's joiner, behind the
//! participant library's txn context interceptor.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};
use twopc_participant::context::read_txn_context;
use twopc_participant::outbox::{Relay, RelayStats};
use twopc_participant::{Participant, ParticipantConfig};
use twopc_proto::MAX_MESSAGE_BYTES;
use twopc_proto::metrics_http;
use twopc_proto::net::Listener;
use twopc_proto::pb::bank_server::BankServer;

use crate::config::BankConfig;
use crate::error::{Error, Result};
use crate::metrics::BankMetrics;
use crate::redb_store::RedbStore;
use crate::resource::BankResource;
use crate::service::BankService;
use crate::store::AccountStore;

/// How long [`run`] waits, after serving ends, for calls still in flight to
/// let go of the store so it can close the file.
pub const STORE_CLOSE_TIMEOUT_MS: u64 = 5_000;

/// Runs bank `config.participant.id`: opens (or creates) its store under
/// `config.data_dir`, then serves the Participant and Bank APIs on
/// `listener` and resolves in-doubt branches until `shutdown` completes.
/// Branches found prepared at start-up are resolved first (I7). When it
/// returns, the store file is closed.
///
/// # Errors
/// [`Error::Config`] for an invalid config; [`Error::Unavailable`] or
/// [`Error::Fatal`] if the store cannot be opened; [`Error::Participant`]
/// if serving fails.
pub async fn run(
    listener: impl Into<Listener>,
    config: BankConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    run_with_metrics(listener, None, config, shutdown).await
}

/// [`run`], also serving `GET /metrics` on `metrics` when given
/// ([`BankMetrics`]: the participant's counters and, with events on, the
/// relay's).
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    listener: impl Into<Listener>,
    metrics: Option<tokio::net::TcpListener>,
    config: BankConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|e| Error::Unavailable(format!("creating data dir {}: {e}", config.data_dir.display())))?;
    let mut store_config = config.store.clone();
    store_config.events = config.events.as_ref().map(|events| events.subjects(config.id()));
    let store = Arc::new(RedbStore::open(config.store_path(), store_config).await?);
    let relay = match &config.events {
        Some(events) => Some(events.start_relay(config.id(), Arc::clone(&store), store.relay_wake())?),
        None => None,
    };
    let metrics = metrics.map(|listener| MetricsEndpoint::new(listener, relay.as_ref()));
    let served = serve_with_metrics(listener, Arc::clone(&store), config.participant, metrics, shutdown).await;
    // The relay holds the store too; what it has not published waits on disk.
    drop(relay);
    close(store).await;
    served
}

/// Serves the Participant and Bank APIs over `store` on `listener` until
/// `shutdown` completes; the caller keeps its handle on the store.
///
/// # Errors
/// [`Error::Participant`] for an invalid participant config or if serving
/// fails.
pub async fn serve<S: AccountStore>(
    listener: impl Into<Listener>,
    store: Arc<S>,
    participant: ParticipantConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve_with_metrics(listener, store, participant, None, shutdown).await
}

/// Where a bank serves `GET /metrics` (plaintext: bind it to loopback or a
/// trusted network), and the relay whose counters it shows.
#[derive(Debug)]
pub struct MetricsEndpoint {
    /// The listener for `GET /metrics`.
    pub listener: tokio::net::TcpListener,
    /// The store's outbox relay, when events are on.
    pub relay: Option<Arc<RelayStats>>,
}

impl MetricsEndpoint {
    /// The endpoint on `listener`, showing `relay`'s counters when events are on.
    pub fn new(listener: tokio::net::TcpListener, relay: Option<&Relay>) -> Self {
        Self { listener, relay: relay.map(|r| Arc::clone(r.stats())) }
    }
}

/// [`serve`], also serving `GET /metrics` on `metrics` when given.
///
/// # Errors
/// As [`serve`].
pub async fn serve_with_metrics<S: AccountStore>(
    listener: impl Into<Listener>,
    store: Arc<S>,
    participant: ParticipantConfig,
    metrics: Option<MetricsEndpoint>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let listener = listener.into();
    let id = participant.id.clone();
    let resource = Arc::new(BankResource::new(Arc::clone(&store)));
    let participant = Participant::new(resource, participant)?;
    let metrics = metrics.map(|endpoint| {
        let source = BankMetrics { participant: participant.metrics(), relay: endpoint.relay };
        info!(bank = %id, addr = ?endpoint.listener.local_addr().ok(), "bank metrics at /metrics");
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || source.render());
        AbortOnDrop(tokio::spawn(metrics_http::serve(endpoint.listener, render, std::future::pending())))
    });
    // Debit and Credit join txns through the participant serving beside them.
    let bank = BankServer::new(BankService::new(store, participant.joiner()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Every Bank call's twopc-txn entry is checked before its handler runs.
    let bank = InterceptedService::new(bank, read_txn_context);
    info!(bank = %id, addr = ?listener.local_addr().ok(), "bank serving");
    participant.serve_with(listener, Routes::new(bank), shutdown).await?;
    drop(metrics);
    info!(bank = %id, "bank stopped");
    Ok(())
}

/// Stops the metrics endpoint's task with the bank, on every way out.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for calls still in flight to drop their handles, then closes the
/// store (joining its writer) off the async runtime.
async fn close(mut store: Arc<RedbStore>) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STORE_CLOSE_TIMEOUT_MS);
    loop {
        match Arc::try_unwrap(store) {
            Ok(store) => {
                let _ = twopc_proto::host::run_blocking(move || drop(store)).await;
                return;
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                store = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                warn!(timeout_ms = STORE_CLOSE_TIMEOUT_MS, "calls still hold the store; it closes when they end");
                return;
            }
        }
    }
}
