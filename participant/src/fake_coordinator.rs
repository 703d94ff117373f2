//! A scriptable fake coordinator (feature `testing`): a real tonic
//! `twopc.v1.Coordinator` server that implements only Resolve, so the
//! resolver can be tested without the Raft cluster.
//!
//! Script it to answer from a decision table (presumed abort for unknown
//! txns, which is then recorded like the real leader logs it), to act as a
//! follower that answers UNAVAILABLE with a leader hint, or to be unavailable
//! for its first N calls. It counts Resolve calls per txn.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use twopc_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use twopc_proto::pb::{
    ClusterStatusRequest, ClusterStatusResponse, GetTransactionRequest, ListTransactionsRequest,
    ListTransactionsResponse, ResolveRequest, ResolveResponse, SubmitRequest, SubmitResponse, TransactionInfo,
};
use twopc_proto::status::not_leader;
use twopc_proto::{Decision, MAX_MESSAGE_BYTES, TxnId};

/// A fake coordinator node; clones share one script and one set of counters.
#[derive(Debug, Clone, Default)]
pub struct FakeCoordinator {
    script: Arc<Mutex<Script>>,
}

#[derive(Debug, Default)]
struct Script {
    decisions: HashMap<TxnId, Decision>,
    /// Txns answered as forgotten after retention (docs/PROTOCOL.md §7.2).
    forgotten: HashSet<TxnId>,
    /// `Some(hint)`: act as a follower; `Some(None)` knows no leader.
    follower_of: Option<Option<String>>,
    unavailable_left: u32,
    calls: HashMap<TxnId, u32>,
    total_calls: u64,
}

impl FakeCoordinator {
    /// A leader with an empty decision table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `decision` for `txn`, as if its decision entry were applied.
    pub fn set_decision(&self, txn: TxnId, decision: Decision) {
        self.script.lock().decisions.insert(txn, decision);
    }

    /// Answers Resolve for `txn` as a coordinator that forgot it after
    /// retention does: `FAILED_PRECONDITION` marked `twopc-forgotten`.
    pub fn set_forgotten(&self, txn: TxnId) {
        self.script.lock().forgotten.insert(txn);
    }

    /// The decision recorded for `txn`, including presumed aborts it answered.
    pub fn decision(&self, txn: TxnId) -> Option<Decision> {
        self.script.lock().decisions.get(&txn).copied()
    }

    /// Acts as a follower: every Resolve gets UNAVAILABLE with `leader` (if
    /// any) in the `twopc-leader` metadata entry.
    pub fn set_follower(&self, leader: Option<&str>) {
        self.script.lock().follower_of = Some(leader.map(str::to_owned));
    }

    /// Acts as the leader again (the default).
    pub fn set_leader(&self) {
        self.script.lock().follower_of = None;
    }

    /// The next `n` Resolve calls fail with UNAVAILABLE and no leader hint, as
    /// from a node that cannot reach a quorum.
    pub fn fail_next(&self, n: u32) {
        self.script.lock().unavailable_left = n;
    }

    /// Resolve calls received for `txn`, whatever they were answered.
    pub fn calls(&self, txn: TxnId) -> u32 {
        self.script.lock().calls.get(&txn).copied().unwrap_or(0)
    }

    /// Resolve calls received in all.
    pub fn total_calls(&self) -> u64 {
        self.script.lock().total_calls
    }

    /// Serves on `listener` until `shutdown` completes.
    ///
    /// # Errors
    /// The transport failed.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        let service = CoordinatorServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(service, TcpListenerStream::new(listener), shutdown)
            .await
    }

    /// Binds `127.0.0.1:0` and serves in the background until the returned
    /// guard is dropped.
    ///
    /// # Errors
    /// The port could not be bound.
    pub async fn start(&self) -> std::io::Result<RunningFake> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let fake = self.clone();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = fake.serve(listener, shutdown).await {
                tracing::warn!(error = %e, "fake coordinator stopped");
            }
        });
        Ok(RunningFake { addr, stop: Some(stop), task })
    }

    fn answer(&self, request: &ResolveRequest) -> Result<Decision, Status> {
        let txn: TxnId = request.txn_id.parse().map_err(|e| twopc_proto::status::invalid("txn_id", e))?;
        let mut script = self.script.lock();
        script.total_calls += 1;
        *script.calls.entry(txn).or_default() += 1;
        if script.unavailable_left > 0 {
            script.unavailable_left -= 1;
            return Err(Status::unavailable("fake coordinator: no quorum"));
        }
        if let Some(leader) = &script.follower_of {
            return Err(not_leader(leader.as_deref()));
        }
        if script.forgotten.contains(&txn) {
            return Err(twopc_proto::status::forgotten(format!(
                "txn {txn} is forgotten; its outcome is no longer kept"
            )));
        }
        // Presumed abort: an unknown txn is aborted, and that is recorded.
        Ok(*script.decisions.entry(txn).or_insert(Decision::Abort))
    }
}

/// A [`FakeCoordinator`] serving in the background; stops when dropped.
#[derive(Debug)]
pub struct RunningFake {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningFake {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RunningFake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn unimplemented(call: &str) -> Status {
    Status::unimplemented(format!("the fake coordinator implements only Resolve, not {call}"))
}

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    async fn submit(&self, _request: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        Err(unimplemented("Submit"))
    }

    async fn resolve(&self, request: Request<ResolveRequest>) -> Result<Response<ResolveResponse>, Status> {
        let decision = self.answer(request.get_ref())?;
        Ok(Response::new(ResolveResponse { decision: decision.into() }))
    }

    async fn get_transaction(
        &self,
        _request: Request<GetTransactionRequest>,
    ) -> Result<Response<TransactionInfo>, Status> {
        Err(unimplemented("GetTransaction"))
    }

    async fn list_transactions(
        &self,
        _request: Request<ListTransactionsRequest>,
    ) -> Result<Response<ListTransactionsResponse>, Status> {
        Err(unimplemented("ListTransactions"))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(unimplemented("ClusterStatus"))
    }
}
