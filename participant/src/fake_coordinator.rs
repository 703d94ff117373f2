//! A scriptable fake coordinator (feature `testing`): a real tonic
//! `twopc.v1.Coordinator` server implementing Resolve and the interactive
//! calls (Begin, Join, Commit, Rollback, docs/PROTOCOL.md §12) over an
//! in-memory table, so the resolver and the joiner can be tested without the
//! Raft cluster.
//!
//! Script it to answer from a decision table (presumed abort for unknown
//! txns, which is then recorded like the real leader logs it), to act as a
//! follower that answers UNAVAILABLE with a leader hint, or to be unavailable
//! for its next N Resolve calls. Begun txns are kept as the leader keeps
//! them: Resolve of one that is undecided before its deadline answers
//! `undecided` (after it, a timeout Abort is recorded), and Join logs the
//! branch or refuses with the txn's state in `twopc-txn-state`, unless
//! [`FakeCoordinator::set_join_answer`] scripts another answer. It counts
//! Resolve and Join calls per txn. Phase 2 is not sent: tests deliver
//! decisions themselves.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use twopc_proto::context::TXN_STATE_METADATA_KEY;
use twopc_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use twopc_proto::pb::{
    BeginRequest, BeginResponse, ClusterStatusRequest, ClusterStatusResponse, CommitRequest, GetTransactionRequest,
    JoinRequest, JoinResponse, ListTransactionsRequest, ListTransactionsResponse, ResolveRequest, ResolveResponse,
    RollbackRequest, RollbackResponse, SubmitRequest, SubmitResponse, TransactionInfo, TxnContext,
};
use twopc_proto::status::not_leader;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, MAX_MESSAGE_BYTES, TxnId};

/// The `retry_after_ms` an undecided Resolve answer gives unless scripted
/// otherwise (the real leader gives at most 1 s).
pub const UNDECIDED_RETRY_DEFAULT_MS: u64 = 20;

/// How the fake answers Join calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum JoinAnswer {
    /// As the leader does: logs the branch into a begun, undecided txn
    /// before its deadline, else refuses naming the state (`DECIDED
    /// COMMIT`, `DECIDED ABORT`, `TIMED OUT`, `UNKNOWN`, or forgotten).
    #[default]
    AsLeader,
    /// Refuses every Join with `FAILED_PRECONDITION` and this state in
    /// `twopc-txn-state`, logging nothing.
    Refuse(String),
    /// Fails every Join with `UNAVAILABLE`, as a cluster without a leader.
    Unavailable,
    /// Logs the branch as [`JoinAnswer::AsLeader`] would, then fails the
    /// call with `UNAVAILABLE`, as when the answer is lost.
    LogThenUnavailable,
}

/// A begun txn (§12.1).
#[derive(Debug, Clone)]
struct Begun {
    deadline_unix_ms: u64,
    joined: BTreeSet<String>,
}

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
    begun: HashMap<TxnId, Begun>,
    join_answer: JoinAnswer,
    join_calls: HashMap<TxnId, u32>,
    /// `None`: [`UNDECIDED_RETRY_DEFAULT_MS`].
    undecided_retry_ms: Option<u64>,
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

    /// Logs `txn` as begun with `deadline_unix_ms` (as a Begin would).
    pub fn begin(&self, txn: TxnId, deadline_unix_ms: u64) {
        self.script.lock().begun.entry(txn).or_insert(Begun { deadline_unix_ms, joined: BTreeSet::new() });
    }

    /// The participants joined to `txn`, in name order.
    pub fn joined(&self, txn: TxnId) -> Vec<String> {
        self.script.lock().begun.get(&txn).map(|b| b.joined.iter().cloned().collect()).unwrap_or_default()
    }

    /// Scripts how Join calls are answered from now on.
    pub fn set_join_answer(&self, answer: JoinAnswer) {
        self.script.lock().join_answer = answer;
    }

    /// Join calls received for `txn`, whatever they were answered.
    pub fn join_calls(&self, txn: TxnId) -> u32 {
        self.script.lock().join_calls.get(&txn).copied().unwrap_or(0)
    }

    /// The `retry_after_ms` of undecided Resolve answers.
    pub fn set_undecided_retry_ms(&self, retry_after_ms: u64) {
        self.script.lock().undecided_retry_ms = Some(retry_after_ms);
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

    fn answer(&self, request: &ResolveRequest) -> Result<ResolveResponse, Status> {
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
        let decided = |decision: Decision| ResolveResponse { decision: decision.into(), ..ResolveResponse::default() };
        if let Some(begun) = script.begun.get(&txn).cloned() {
            let now = unix_now_ms();
            match script.decisions.get(&txn).copied() {
                // §6: a participant not named by a begun txn's record is answered Abort.
                Some(Decision::Commit) if !begun.joined.contains(&request.participant) => {
                    return Ok(decided(Decision::Abort));
                }
                Some(decision) => return Ok(decided(decision)),
                None if now > begun.deadline_unix_ms => {
                    // §12.5: past its deadline the leader logs the timeout Abort.
                    script.decisions.insert(txn, Decision::Abort);
                    return Ok(decided(Decision::Abort));
                }
                None => {
                    let retry = script.undecided_retry_ms.unwrap_or(UNDECIDED_RETRY_DEFAULT_MS);
                    let retry_after_ms = retry.min(begun.deadline_unix_ms - now);
                    return Ok(ResolveResponse { undecided: true, retry_after_ms, ..ResolveResponse::default() });
                }
            }
        }
        // Presumed abort: an unknown txn is aborted, and that is recorded.
        Ok(decided(*script.decisions.entry(txn).or_insert(Decision::Abort)))
    }

    fn join_call(&self, request: &JoinRequest) -> Result<JoinResponse, Status> {
        let txn: TxnId = request.txn_id.parse().map_err(|e| twopc_proto::status::invalid("txn_id", e))?;
        let mut script = self.script.lock();
        *script.join_calls.entry(txn).or_default() += 1;
        if let Some(leader) = &script.follower_of {
            return Err(not_leader(leader.as_deref()));
        }
        let log_then_fail = match &script.join_answer {
            JoinAnswer::AsLeader => false,
            JoinAnswer::LogThenUnavailable => true,
            JoinAnswer::Refuse(state) => return Err(refusal(txn, state)),
            JoinAnswer::Unavailable => return Err(Status::unavailable("fake coordinator: no leader")),
        };
        if script.forgotten.contains(&txn) {
            return Err(twopc_proto::status::forgotten(format!("txn {txn} is forgotten")));
        }
        if let Some(decision) = script.decisions.get(&txn) {
            return Err(refusal(txn, &format!("DECIDED {}", decision.to_string().to_uppercase())));
        }
        let Some(begun) = script.begun.get_mut(&txn) else {
            return Err(refusal(txn, "UNKNOWN"));
        };
        if unix_now_ms() > begun.deadline_unix_ms {
            return Err(refusal(txn, "TIMED OUT"));
        }
        begun.joined.insert(request.participant.clone());
        if log_then_fail {
            return Err(Status::unavailable("fake coordinator: the join was logged but its answer is lost"));
        }
        Ok(JoinResponse { deadline_unix_ms: begun.deadline_unix_ms })
    }

    fn begin_call(&self, request: &BeginRequest) -> Result<BeginResponse, Status> {
        let txn: TxnId = match request.txn_id.as_str() {
            "" => TxnId::new(),
            id => id.parse().map_err(|e| twopc_proto::status::invalid("txn_id", e))?,
        };
        if request.timeout_ms == 0 {
            return Err(twopc_proto::status::invalid("timeout_ms", "is 0"));
        }
        let mut script = self.script.lock();
        if let Some(decision) = script.decisions.get(&txn) {
            return Err(refusal(txn, &format!("DECIDED {}", decision.to_string().to_uppercase())));
        }
        let deadline = unix_now_ms().saturating_add(request.timeout_ms);
        let begun = script.begun.entry(txn).or_insert(Begun { deadline_unix_ms: deadline, joined: BTreeSet::new() });
        let context = TxnContext { txn_id: txn.to_string(), deadline_unix_ms: begun.deadline_unix_ms };
        Ok(BeginResponse { context: Some(context) })
    }

    /// Logs `decision` for a begun txn (a Commit past its deadline becomes
    /// an Abort, §12.4) and answers the recorded one.
    fn end(&self, txn_id: &str, decision: Decision) -> Result<Decision, Status> {
        let txn: TxnId = txn_id.parse().map_err(|e| twopc_proto::status::invalid("txn_id", e))?;
        let mut script = self.script.lock();
        let Some(begun) = script.begun.get(&txn) else {
            return Err(Status::not_found(format!("txn {txn} was never begun")));
        };
        let decision = if unix_now_ms() > begun.deadline_unix_ms { Decision::Abort } else { decision };
        Ok(*script.decisions.entry(txn).or_insert(decision))
    }
}

/// A refused Join, naming the txn's state.
fn refusal(txn: TxnId, state: &str) -> Status {
    let mut status = Status::failed_precondition(format!("fake coordinator: txn {txn} is {state}; not joined"));
    if let Ok(value) = state.parse() {
        status.metadata_mut().insert(TXN_STATE_METADATA_KEY, value);
    }
    status
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
    Status::unimplemented(format!("the fake coordinator does not implement {call}"))
}

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    async fn submit(&self, _request: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        Err(unimplemented("Submit"))
    }

    async fn resolve(&self, request: Request<ResolveRequest>) -> Result<Response<ResolveResponse>, Status> {
        Ok(Response::new(self.answer(request.get_ref())?))
    }

    async fn begin(&self, request: Request<BeginRequest>) -> Result<Response<BeginResponse>, Status> {
        Ok(Response::new(self.begin_call(request.get_ref())?))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        Ok(Response::new(self.join_call(request.get_ref())?))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<SubmitResponse>, Status> {
        if !request.get_ref().branches.is_empty() {
            return Err(unimplemented("Commit with one-shot branches"));
        }
        let decision = self.end(&request.get_ref().txn_id, Decision::Commit)?;
        let reason = if decision == Decision::Abort { "timed out".to_owned() } else { String::new() };
        Ok(Response::new(SubmitResponse { decision: decision.into(), votes: Vec::new(), reason }))
    }

    async fn rollback(&self, request: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        let decision = self.end(&request.get_ref().txn_id, Decision::Abort)?;
        if decision != Decision::Abort {
            return Err(Status::failed_precondition("fake coordinator: the txn committed"));
        }
        Ok(Response::new(RollbackResponse { decision: decision.into(), reason: "rolled back".into() }))
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
