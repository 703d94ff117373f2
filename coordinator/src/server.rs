//! Runs a coordinator node: the raft task plus one tonic server on one port
//! carrying the peer, client and admin services.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use twopc_proto::MAX_MESSAGE_BYTES;
use twopc_proto::net::Listener;
use twopc_proto::pb::admin_server::AdminServer;
use twopc_proto::pb::coordinator_server::CoordinatorServer;

use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::node::{self, NodeHandle};
use crate::participant_client::{GrpcParticipants, ParticipantClient};
use crate::service::{AdminService, CoordinatorService};
use crate::transport::{FaultFilter, peer_service};

/// A coordinator node running in this process.
pub struct RunningNode {
    /// Talk to the raft node directly (tests, the 2PC driver).
    pub handle: NodeHandle,
    /// The address the gRPC server listens on.
    pub addr: SocketAddr,
    /// Renders the node's metrics (Prometheus text).
    pub metrics: MetricsRenderer,
    stop: Option<watch::Sender<bool>>,
    server: JoinHandle<Result<()>>,
    raft: JoinHandle<Result<()>>,
}

impl RunningNode {
    /// Stops the node and waits until its tasks ended and its storage is
    /// closed. The raft task stops first, which ends the peers' long-lived
    /// streams so the server's graceful shutdown can finish; client calls in
    /// flight get [`SHUTDOWN_GRACE`] to finish before they are cut.
    ///
    /// # Errors
    /// The raft task's fatal error, if it had one.
    pub async fn stop(self) -> Result<()> {
        self.stop_after(None).await
    }

    /// [`RunningNode::stop`], given the raft task's result if it already ended.
    async fn stop_after(mut self, raft_ended: Option<JoinResult>) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let joined = match raft_ended {
            Some(joined) => joined,
            None => (&mut self.raft).await,
        };
        let raft = joined.map_err(|e| Error::Retryable(format!("raft task: {e}")))?;
        let server = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(joined) => joined.map_err(|e| Error::Retryable(format!("server task: {e}")))?,
            Err(_) => {
                self.server.abort();
                Ok(())
            }
        };
        raft.and(server)
    }
}

/// Renders a node's metrics in the Prometheus text format.
pub type MetricsRenderer = Arc<dyn Fn() -> String + Send + Sync>;

type JoinResult = std::result::Result<Result<()>, tokio::task::JoinError>;

/// How long a stopping node lets client calls in flight finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

async fn stop_signal(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Starts a node serving on `listener` and returns once it runs.
///
/// # Errors
/// Bad config, or storage that cannot be opened.
pub fn spawn(listener: impl Into<Listener>, config: &NodeConfig, faults: FaultFilter) -> Result<RunningNode> {
    let connect_timeout = Duration::from_millis(config.engine.participant_connect_timeout_ms);
    let participants =
        GrpcParticipants::with_batching(connect_timeout, config.engine.prepare_batching()).with_tls(config.tls.clone());
    spawn_with_client(listener, config, faults, participants)
}

/// [`spawn`] with another way of calling participants (tests wrap the gRPC
/// client to hold or fail calls at chosen points).
///
/// # Errors
/// Bad config, or storage that cannot be opened.
pub fn spawn_with_client<P: ParticipantClient>(
    listener: impl Into<Listener>,
    config: &NodeConfig,
    faults: FaultFilter,
    client: P,
) -> Result<RunningNode> {
    let listener = listener.into().with_tls(config.tls.clone());
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = node::start(config, faults.clone(), stop_signal(stop_rx.clone()))?;
    let handle = started.handle.clone();
    let engine = Engine::new(handle.clone(), config.engine.clone(), client)?;
    tokio::spawn(engine.clone().run_leader_duties());
    let metrics_engine = engine.clone();
    let metrics: MetricsRenderer = Arc::new(move || metrics_engine.render_metrics());
    let peer = peer_service(config.id, started.inbound, faults);
    let coordinator = CoordinatorServer::new(CoordinatorService::new(engine.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServer::new(AdminService::new(engine))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(twopc_proto::auth::AuthorizeLayer(twopc_proto::auth::COORDINATOR))
            .add_service(peer)
            .add_service(coordinator)
            .add_service(admin)
            .serve_with_incoming_shutdown(listener.incoming(), stop_signal(stop_rx))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))
    });
    Ok(RunningNode { handle, addr, metrics, stop: Some(stop_tx), server, raft: started.task })
}

/// Runs a node until `shutdown` resolves or the raft task fails (the
/// `twopc coordinator` command).
///
/// # Errors
/// Bad config, storage errors, or a fatal raft error.
pub async fn run(
    listener: impl Into<Listener>,
    metrics_listener: Option<TcpListener>,
    config: NodeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut node = spawn(listener, &config, FaultFilter::default())?;
    tracing::info!(node_id = config.id, addr = %node.addr, "coordinator node serving");
    let (metrics_stop, metrics_stopped) = oneshot::channel::<()>();
    if let Some(metrics_listener) = metrics_listener {
        let stopped = async move {
            let _ = metrics_stopped.await;
        };
        tokio::spawn(twopc_proto::metrics_http::serve(metrics_listener, node.metrics.clone(), stopped));
    }
    let raft_ended = tokio::select! {
        () = shutdown => None,
        // A raft task that ended on its own failed: stop serving too.
        joined = &mut node.raft => Some(joined),
    };
    let _ = metrics_stop.send(());
    node.stop_after(raft_ended).await
}
