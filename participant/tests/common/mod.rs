//! Shared test fixtures: a participant served on 127.0.0.1:0, a gRPC client
//! for it, a resource whose calls can be held at a gate, and bounded polling.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use twopc_participant::{
    Decision, MemoryResource, Metrics, Participant, ParticipantConfig, Resource, ResourceError, TxnId, Vote,
};
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::pb::{self, MoveRequest, MoveResponse};
use twopc_proto::pb::{
    DecideBatchRequest, DecisionItem, DecisionRequest, DecisionResult, PrepareRequest, PrepareResponse,
};
use twopc_proto::txn_id::unix_now_ms;

/// The name every test participant goes by.
pub const ID: &str = "bank-a";

/// How long any awaited condition may take before the test fails.
pub const WAIT_MAX: Duration = Duration::from_secs(10);

/// A config with small backoffs, pointing at `coordinators`.
pub fn config(coordinators: Vec<String>) -> ParticipantConfig {
    let mut config = ParticipantConfig::new(ID.parse().expect("valid id"), coordinators);
    config.resolve_backoff_min_ms = 5;
    config.resolve_backoff_max_ms = 20;
    config.connect_timeout_ms = 500;
    config.resolve_timeout_ms = 2_000;
    config
}

/// An address where nothing listens (connections are refused).
pub async fn dead_addr() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.to_string())
}

/// A participant serving in the background.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub client: ParticipantClient<Channel>,
    pub metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<twopc_participant::Result<()>>,
}

/// Serves `resource` on 127.0.0.1:0 with `config` and connects a client.
pub async fn start<R: Resource>(resource: Arc<R>, config: ParticipantConfig) -> anyhow::Result<Running> {
    start_with(resource, config, |_| tonic::service::Routes::default()).await
}

/// [`start`], also serving the services `routes` builds (given the
/// participant, to take its joiner) on the same port.
pub async fn start_with<R: Resource>(
    resource: Arc<R>,
    config: ParticipantConfig,
    routes: impl FnOnce(&Participant<R>) -> tonic::service::Routes,
) -> anyhow::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let participant = Participant::new(resource, config)?;
    let metrics = participant.metrics();
    let routes = routes(&participant);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(participant.serve_with(listener, routes, async {
        let _ = stopped.await;
    }));
    // The listener is bound already, so the connection is accepted once the
    // server starts; no waiting for a port.
    let client = ParticipantClient::connect(format!("http://{addr}")).await.context("connecting to the participant")?;
    Ok(Running { addr, client, metrics, stop: Some(stop), task })
}

impl Running {
    /// Shuts the participant down and checks it stopped cleanly.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = tokio::time::timeout(WAIT_MAX, &mut self.task).await.context("participant did not stop")??;
        served.context("participant failed")?;
        Ok(())
    }

    pub async fn prepare(&self, txn: TxnId, payload: &'static [u8]) -> Result<PrepareResponse, tonic::Status> {
        let request = prepare_request(txn, payload);
        self.client.clone().prepare(request).await.map(tonic::Response::into_inner)
    }

    pub async fn decide(&self, txn: TxnId, decision: Decision) -> Result<(), tonic::Status> {
        let request = DecisionRequest { txn_id: txn.to_string(), participant: ID.into(), decision: decision.into() };
        self.client.clone().decide(request).await.map(|_| ())
    }

    /// One RecoverVote call: the vote on the payload with `digest` (None: any).
    pub async fn recover_vote(&self, txn: TxnId, digest: Option<&[u8]>) -> anyhow::Result<Vote> {
        let request = twopc_proto::pb::RecoverVoteRequest {
            txn_id: txn.to_string(),
            participant: ID.into(),
            payload_digest: digest
                .map(|d| twopc_proto::PayloadDigest::of(d).as_bytes().to_vec())
                .unwrap_or_default()
                .into(),
        };
        let answer = self.client.clone().recover_vote(request).await?.into_inner();
        Ok(Vote::from_pb(answer.vote, &answer.reason)?)
    }

    /// One DecideBatch call addressed to this participant: the per-decision results.
    pub async fn decide_batch(&self, decisions: &[(String, i32)]) -> Result<Vec<DecisionResult>, tonic::Status> {
        let decisions = decisions
            .iter()
            .map(|(txn_id, decision)| DecisionItem { txn_id: txn_id.clone(), decision: *decision })
            .collect();
        let request = DecideBatchRequest { participant: ID.into(), decisions };
        self.client.clone().decide_batch(request).await.map(|r| r.into_inner().results)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A well-formed Prepare with a deadline a minute away.
pub fn prepare_request(txn: TxnId, payload: &'static [u8]) -> PrepareRequest {
    PrepareRequest {
        txn_id: txn.to_string(),
        participant: ID.into(),
        payload: Bytes::from_static(payload),
        deadline_unix_ms: unix_now_ms() + 60_000,
    }
}

/// The vote in a Prepare answer.
pub fn vote(response: &PrepareResponse) -> anyhow::Result<Vote> {
    Ok(Vote::from_pb(response.vote, &response.reason)?)
}

/// Polls `condition` every 5 ms until it holds, failing after [`WAIT_MAX`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {WAIT_MAX:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Awaits `future`, failing after [`WAIT_MAX`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(WAIT_MAX, future)
        .await
        .with_context(|| format!("timed out after {WAIT_MAX:?} waiting for {what}"))
}

/// A [`MemoryResource`] whose `prepare` and `commit` calls can be held at a
/// gate: while a gate is closed, calls wait there before reaching the inner
/// resource; tests see them arrive through `prepares_held`/`commits_held`.
pub struct GatedResource {
    pub inner: MemoryResource,
    prepare_gate: Gate,
    commit_gate: Gate,
}

/// Closed gates hold callers until opened.
struct Gate {
    open: watch::Sender<bool>,
    held: AtomicU32,
}

impl Gate {
    fn open_gate() -> Self {
        Self { open: watch::Sender::new(true), held: AtomicU32::new(0) }
    }

    async fn pass(&self) {
        let mut open = self.open.subscribe();
        if *open.borrow_and_update() {
            return;
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        let _ = open.wait_for(|open| *open).await;
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }

    fn held(&self) -> u32 {
        self.held.load(Ordering::SeqCst)
    }
}

impl GatedResource {
    pub fn new(inner: MemoryResource) -> Self {
        Self { inner, prepare_gate: Gate::open_gate(), commit_gate: Gate::open_gate() }
    }

    pub fn hold_prepares(&self) {
        self.prepare_gate.set_open(false);
    }

    pub fn release_prepares(&self) {
        self.prepare_gate.set_open(true);
    }

    /// Prepare calls held at the gate so far (ever).
    pub fn prepares_held(&self) -> u32 {
        self.prepare_gate.held()
    }

    pub fn hold_commits(&self) {
        self.commit_gate.set_open(false);
    }

    pub fn release_commits(&self) {
        self.commit_gate.set_open(true);
    }

    /// Commit calls held at the gate so far (ever).
    pub fn commits_held(&self) -> u32 {
        self.commit_gate.held()
    }
}

impl Resource for GatedResource {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        self.prepare_gate.pass().await;
        self.inner.prepare(txn, payload).await
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.commit_gate.pass().await;
        self.inner.commit(txn).await
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.inner.abort(txn).await
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        self.inner.prepared().await
    }
}

/// Where a failing `prepare` of [`FailingPrepares`] fails.
#[derive(Clone, Copy)]
pub enum FailAt {
    /// After the inner resource staged the branch durably: the reply is lost.
    AfterStaging,
    /// Before anything was staged.
    BeforeStaging,
}

/// A resource whose next `failures` prepares return `Unavailable`, at `at`
/// (after staging: as when the reply to PREPARE TRANSACTION is lost): the
/// library sees an error either way and cannot tell them apart.
pub struct FailingPrepares<R> {
    pub inner: R,
    at: FailAt,
    failures: AtomicU32,
}

impl<R: Resource> FailingPrepares<R> {
    pub fn new(inner: R, at: FailAt, failures: u32) -> Self {
        Self { inner, at, failures: AtomicU32::new(failures) }
    }

    fn take_failure(&self) -> bool {
        self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

impl<R: Resource> Resource for FailingPrepares<R> {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        if !self.take_failure() {
            return self.inner.prepare(txn, payload).await;
        }
        if let FailAt::AfterStaging = self.at {
            self.inner.prepare(txn, payload).await?;
        }
        Err(ResourceError::Unavailable("connection lost before the reply to PREPARE TRANSACTION".into()))
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.inner.commit(txn).await
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        self.inner.abort(txn).await
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        self.inner.prepared().await
    }
}

/// Serves `resource` with [`JoiningService`] (behind the context
/// interceptor) on the same port, and returns the participant's joiner too.
pub async fn start_joining(
    resource: Arc<MemoryResource>,
    config: ParticipantConfig,
) -> anyhow::Result<(Running, twopc_participant::Joiner<MemoryResource>)> {
    let mut joiner = None;
    let running = start_with(resource, config, |participant| {
        let j = participant.joiner();
        joiner = Some(j.clone());
        let service = twopc_proto::pb::bank_server::BankServer::with_interceptor(
            JoiningService::new(j),
            twopc_participant::context::read_txn_context,
        );
        tonic::service::Routes::new(service)
    })
    .await?;
    Ok((running, joiner.context("the routes were not built")?))
}

/// A service whose `Debit` joins the txn with its account name as the
/// payload (so `no:...` votes NO): the handler's side of §12.
pub struct JoiningService {
    joiner: twopc_participant::Joiner<MemoryResource>,
}

impl JoiningService {
    pub fn new(joiner: twopc_participant::Joiner<MemoryResource>) -> Self {
        Self { joiner }
    }
}

fn unimplemented<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("not part of this test service"))
}

#[tonic::async_trait]
impl twopc_proto::pb::bank_server::Bank for JoiningService {
    async fn debit(
        &self,
        request: tonic::Request<MoveRequest>,
    ) -> Result<tonic::Response<MoveResponse>, tonic::Status> {
        let ctx = twopc_participant::context::require_txn_context(&request, "Debit")?;
        let payload = Bytes::from(request.into_inner().account);
        let joined = self.joiner.join(&ctx, payload).await?;
        Ok(tonic::Response::new(MoveResponse { deadline_unix_ms: joined.deadline_unix_ms }))
    }

    async fn credit(&self, _: tonic::Request<MoveRequest>) -> Result<tonic::Response<MoveResponse>, tonic::Status> {
        unimplemented()
    }

    async fn create_account(
        &self,
        _: tonic::Request<pb::CreateAccountRequest>,
    ) -> Result<tonic::Response<pb::CreateAccountResponse>, tonic::Status> {
        unimplemented()
    }

    async fn balance(
        &self,
        _: tonic::Request<pb::BalanceRequest>,
    ) -> Result<tonic::Response<pb::BalanceResponse>, tonic::Status> {
        unimplemented()
    }

    async fn list_accounts(
        &self,
        _: tonic::Request<pb::ListAccountsRequest>,
    ) -> Result<tonic::Response<pb::ListAccountsResponse>, tonic::Status> {
        unimplemented()
    }

    async fn total(
        &self,
        _: tonic::Request<pb::TotalRequest>,
    ) -> Result<tonic::Response<pb::TotalResponse>, tonic::Status> {
        unimplemented()
    }
}
