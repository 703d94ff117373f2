//! An interactive transaction from the application's side (docs/PROTOCOL.md
//! §12): [`ClusterClient::begin`] logs the txn, the application calls each
//! service's own API with the txn's context attached ([`Transaction::interceptor`],
//! [`Transaction::attach`]), each service prepares and joins, and
//! [`Transaction::commit`] or [`Transaction::rollback`] ends it.
//!
//! Every call here is idempotent by txn id (I5) and goes through the
//! [`ClusterClient`]'s retries, so a leader change between the joins and the
//! Commit is absorbed: the retried Commit reaches the new leader, whose log
//! names every joined branch (§12.6).

use std::time::Duration;

use tonic::service::Interceptor;
use tonic::{Request, Status};
use twopc_proto::pb::{self, Branch};
use twopc_proto::{Decision, TxnContext, TxnId, status};

use crate::ClusterClient;

/// The longest rollback reason the coordinator accepts (docs/PROTOCOL.md §12.4:
/// `rolled back: ` and it fit the log's reason limit uncut; a longer one is
/// `INVALID_ARGUMENT` there). [`Transaction::rollback`] cuts longer ones at a
/// character boundary, so a rollback is never refused for its reason.
pub const ROLLBACK_REASON_MAX_BYTES: usize = 499;

/// An interactive txn that has been begun: its context, and the calls that end it.
///
/// Cheap to clone; clones are the same txn. Dropping a `Transaction` does not
/// end the txn: one neither committed nor rolled back is aborted by the
/// coordinator at its deadline ("timed out"), which releases whatever its
/// branches hold.
#[derive(Clone)]
pub struct Transaction {
    client: ClusterClient,
    context: TxnContext,
}

/// How an interactive txn ended, read from the coordinator's applied record.
///
/// An Abort is an outcome, not an error: the txn is over and nothing of it
/// was applied anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The logged decision.
    pub decision: Decision,
    /// Why it aborted (a NO vote, "timed out", "rolled back: ..."); empty on a commit.
    pub reason: String,
    /// The votes of one-shot branches given to [`Transaction::commit_with`], as
    /// the coordinator reported them; empty otherwise (joined branches voted
    /// YES by joining).
    pub votes: Vec<pb::BranchVote>,
}

impl Outcome {
    /// Whether the txn committed.
    pub fn is_commit(&self) -> bool {
        self.decision == Decision::Commit
    }

    fn from_wire(decision: i32, reason: String, votes: Vec<pb::BranchVote>) -> Result<Self, Status> {
        let decision = Decision::try_from(decision)
            .map_err(|e| Status::internal(format!("the coordinator answered an unreadable decision: {e}")))?;
        Ok(Self { decision, reason, votes })
    }
}

impl ClusterClient {
    /// Begins an interactive txn that the coordinator aborts if it is not
    /// committed within `timeout`. The txn id is chosen here (a fresh UUIDv7),
    /// so a Begin retried after a lost answer is the same txn, not a second one.
    ///
    /// # Errors
    /// As [`ClusterClient::begin_with_id`].
    pub async fn begin(&self, timeout: Duration) -> Result<Transaction, Status> {
        self.begin_with_id(TxnId::new(), timeout).await
    }

    /// Begins (or, on a repeat, finds) the interactive txn `txn_id`. A repeat
    /// answers the first Begin's deadline (first writer wins).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` when `timeout` is under 1 ms (checked here) or over
    /// the cluster's `deadline_max_ms`, or the id is too old or too far in the
    /// future; `FAILED_PRECONDITION` when the id is already decided (a one-shot
    /// Submit used it, or it was presumed aborted); `RESOURCE_EXHAUSTED` when
    /// `begun_max` txns are open; `UNAVAILABLE` when no leader answered within
    /// the retry budget (then nothing may or may not be begun: retry with the
    /// same id).
    pub async fn begin_with_id(&self, txn_id: TxnId, timeout: Duration) -> Result<Transaction, Status> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if timeout_ms == 0 {
            return Err(status::invalid(
                "timeout_ms",
                format!("{timeout:?} is under 1 ms; an interactive txn needs time for its services to join"),
            ));
        }
        let request = pb::BeginRequest { txn_id: txn_id.to_string(), timeout_ms };
        let response = self
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.begin(request).await }
            })
            .await?;
        let context = response
            .context
            .ok_or_else(|| Status::internal("the coordinator answered Begin without the txn's context"))?;
        let answered: TxnId = context
            .txn_id
            .parse()
            .map_err(|e| Status::internal(format!("the coordinator answered Begin with a bad txn id: {e}")))?;
        if answered != txn_id || context.deadline_unix_ms == 0 {
            return Err(Status::internal(format!(
                "the coordinator answered Begin of {txn_id} with the context of {answered} (deadline {})",
                context.deadline_unix_ms
            )));
        }
        Ok(Transaction {
            client: self.clone(),
            context: TxnContext { txn_id, deadline_unix_ms: context.deadline_unix_ms },
        })
    }

    /// A handle on an interactive txn begun earlier (by this process before a
    /// restart, or by another one), to commit or roll it back.
    pub fn transaction(&self, context: TxnContext) -> Transaction {
        Transaction { client: self.clone(), context }
    }
}

impl Transaction {
    /// The txn's id.
    pub fn id(&self) -> TxnId {
        self.context.txn_id
    }

    /// The txn's id and deadline, as services receive them.
    pub fn context(&self) -> TxnContext {
        self.context
    }

    /// Unix milliseconds at which the coordinator aborts the txn if it is
    /// still undecided; services must have prepared and joined before it.
    pub fn deadline_unix_ms(&self) -> u64 {
        self.context.deadline_unix_ms
    }

    /// A tonic interceptor that attaches the txn's context (the `twopc-txn`
    /// metadata entry) to every call of a client built with it:
    /// `BankClient::with_interceptor(channel, txn.interceptor())`.
    pub fn interceptor(&self) -> TxnInterceptor {
        TxnInterceptor { context: self.context }
    }

    /// Attaches the txn's context to one request, replacing any other.
    pub fn attach<T>(&self, request: &mut Request<T>) {
        self.context.attach(request.metadata_mut());
    }

    /// Commits the txn: every joined branch voted YES by joining, so the
    /// coordinator logs Commit unless the deadline passed first (then Abort,
    /// "timed out"). Retried through leader changes; a retry answers the
    /// logged outcome.
    ///
    /// # Errors
    /// As [`Transaction::commit_with`].
    pub async fn commit(&self) -> Result<Outcome, Status> {
        self.commit_with(Vec::new()).await
    }

    /// Commits the txn with one-shot `branches` prepared now, as a Submit
    /// prepares them (under the txn's deadline); the decision covers them and
    /// every joined branch. A NO vote or no answer from one of them makes it
    /// an Abort, which is an `Ok` outcome.
    ///
    /// # Errors
    /// `NOT_FOUND` when the txn was never begun; `FAILED_PRECONDITION` when it
    /// is forgotten, or a retry names other one-shot branches than the logged
    /// record; `INVALID_ARGUMENT` for a branch whose participant also joined;
    /// `UNAVAILABLE` or `DEADLINE_EXCEEDED` when no leader answered within the
    /// retry budget: the outcome is then unknown, and calling again (or
    /// `twopc txn show`) tells it.
    pub async fn commit_with(&self, branches: Vec<Branch>) -> Result<Outcome, Status> {
        let request = pb::CommitRequest { txn_id: self.context.txn_id.to_string(), branches };
        let response = self
            .client
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.commit(request).await }
            })
            .await?;
        Outcome::from_wire(response.decision, response.reason, response.votes)
    }

    /// Rolls the txn back: the coordinator logs Abort with reason
    /// `rolled back: <reason>` and phase 2 releases every joined branch. A
    /// reason longer than [`ROLLBACK_REASON_MAX_BYTES`] is cut. Rolling back a
    /// txn that already aborted (timed out, rolled back) answers that Abort.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` when the txn already committed or is forgotten;
    /// `NOT_FOUND` when it was never begun; `UNAVAILABLE` as for a commit.
    pub async fn rollback(&self, reason: &str) -> Result<Outcome, Status> {
        let mut reason = reason.to_owned();
        reason.truncate(reason.floor_char_boundary(ROLLBACK_REASON_MAX_BYTES));
        let request = pb::RollbackRequest { txn_id: self.context.txn_id.to_string(), reason };
        let response = self
            .client
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.rollback(request).await }
            })
            .await?;
        Outcome::from_wire(response.decision, response.reason, Vec::new())
    }
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction").field("context", &self.context).finish_non_exhaustive()
    }
}

/// Attaches one txn's context to every request that passes through it (see
/// [`Transaction::interceptor`]). Holds nothing but the context, so clients
/// built with it may be cloned and moved between tasks.
#[derive(Debug, Clone, Copy)]
pub struct TxnInterceptor {
    context: TxnContext,
}

impl TxnInterceptor {
    /// An interceptor for a context received from elsewhere (a service that
    /// calls further services inside the same txn).
    pub fn new(context: TxnContext) -> Self {
        Self { context }
    }
}

impl Interceptor for TxnInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.context.attach(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use parking_lot::Mutex;
    use tokio::sync::oneshot;
    use twopc_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};

    use super::*;
    use crate::ClientConfig;

    /// A txn's deadline, and its logged decision and reason once ended.
    type FakeTxn = (u64, Option<(pb::Decision, String)>);

    /// A coordinator node that leads (answers Begin, Commit and Rollback from
    /// a map of begun txns) or follows (answers every call "not the leader",
    /// pointing at `leader`).
    struct FakeNode {
        leader: Option<String>,
        /// Answers Begin with another txn's context (a broken server).
        confused: bool,
        txns: Mutex<HashMap<String, FakeTxn>>,
        calls: Mutex<Vec<String>>,
    }

    impl FakeNode {
        fn follower_of(leader: &str) -> Self {
            Self { leader: Some(leader.to_owned()), confused: false, txns: Mutex::default(), calls: Mutex::default() }
        }

        fn leader() -> Self {
            Self { leader: None, confused: false, txns: Mutex::default(), calls: Mutex::default() }
        }

        fn lead(&self, method: &str) -> Result<(), Status> {
            self.calls.lock().push(method.to_owned());
            match &self.leader {
                Some(leader) => Err(status::not_leader(Some(leader))),
                None => Ok(()),
            }
        }

        fn end(&self, txn_id: &str, decision: pb::Decision, reason: String) -> Result<(pb::Decision, String), Status> {
            let mut txns = self.txns.lock();
            let (_, ended) = txns.get_mut(txn_id).ok_or_else(|| Status::not_found(format!("{txn_id} never begun")))?;
            Ok(ended.get_or_insert((decision, reason)).clone())
        }
    }

    type Answer<T> = Result<tonic::Response<T>, Status>;

    #[tonic::async_trait]
    impl Coordinator for FakeNode {
        async fn begin(&self, request: Request<pb::BeginRequest>) -> Answer<pb::BeginResponse> {
            self.lead("begin")?;
            let request = request.into_inner();
            let deadline = twopc_proto::txn_id::unix_now_ms() + request.timeout_ms;
            let mut txns = self.txns.lock();
            let (deadline, _) = txns.entry(request.txn_id.clone()).or_insert((deadline, None));
            let txn_id = if self.confused { TxnId::new().to_string() } else { request.txn_id };
            let context = pb::TxnContext { txn_id, deadline_unix_ms: *deadline };
            Ok(tonic::Response::new(pb::BeginResponse { context: Some(context) }))
        }

        async fn commit(&self, request: Request<pb::CommitRequest>) -> Answer<pb::SubmitResponse> {
            self.lead("commit")?;
            let (decision, reason) = self.end(&request.into_inner().txn_id, pb::Decision::Commit, String::new())?;
            Ok(tonic::Response::new(pb::SubmitResponse { decision: decision.into(), votes: Vec::new(), reason }))
        }

        async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Answer<pb::RollbackResponse> {
            self.lead("rollback")?;
            let request = request.into_inner();
            let reason = format!("rolled back: {}", request.reason);
            let (decision, reason) = self.end(&request.txn_id, pb::Decision::Abort, reason)?;
            if decision == pb::Decision::Commit {
                return Err(Status::failed_precondition("committed"));
            }
            Ok(tonic::Response::new(pb::RollbackResponse { decision: decision.into(), reason }))
        }

        async fn submit(&self, _: Request<pb::SubmitRequest>) -> Answer<pb::SubmitResponse> {
            Err(Status::unimplemented("not in this fake"))
        }
        async fn resolve(&self, _: Request<pb::ResolveRequest>) -> Answer<pb::ResolveResponse> {
            Err(Status::unimplemented("not in this fake"))
        }
        async fn get_transaction(&self, _: Request<pb::GetTransactionRequest>) -> Answer<pb::TransactionInfo> {
            Err(Status::unimplemented("not in this fake"))
        }
        async fn list_transactions(
            &self,
            _: Request<pb::ListTransactionsRequest>,
        ) -> Answer<pb::ListTransactionsResponse> {
            Err(Status::unimplemented("not in this fake"))
        }
        async fn cluster_status(&self, _: Request<pb::ClusterStatusRequest>) -> Answer<pb::ClusterStatusResponse> {
            Err(Status::unimplemented("not in this fake"))
        }
        async fn join(&self, _: Request<pb::JoinRequest>) -> Answer<pb::JoinResponse> {
            Err(Status::unimplemented("not in this fake"))
        }
    }

    /// Serves `node` on a fresh loopback port until the returned sender is dropped.
    async fn serve(node: std::sync::Arc<FakeNode>) -> (SocketAddr, oneshot::Sender<()>) {
        let listener = twopc_proto::net::bind("127.0.0.1:0".parse().expect("an address")).await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let service = CoordinatorServer::from_arc(node);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(listener.incoming(), async move { drop(stopped.await) }),
        );
        (addr, stop)
    }

    fn client(addrs: Vec<String>) -> ClusterClient {
        let config =
            ClientConfig { retry_budget_ms: 5_000, backoff_min_ms: 1, backoff_max_ms: 5, ..Default::default() };
        ClusterClient::new(addrs, config).expect("a client")
    }

    // A runtime because the client's channels, lazy as they are, spawn their workers.
    #[tokio::test]
    async fn the_interceptor_attaches_a_context_a_service_can_read() {
        let cluster = client(vec!["127.0.0.1:1".into()]);
        let context = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: 1_764_786_000_000 };
        let txn = cluster.transaction(context);

        let request = txn.interceptor().call(Request::new(())).expect("the interceptor never refuses");
        assert_eq!(TxnContext::from_metadata(request.metadata()).expect("parses"), Some(context));

        // attach replaces a context already there: a call belongs to one txn.
        let mut request = Request::new(());
        TxnContext { txn_id: TxnId::new(), deadline_unix_ms: 5 }.attach(request.metadata_mut());
        txn.attach(&mut request);
        assert_eq!(TxnContext::from_metadata(request.metadata()).expect("one entry"), Some(context));
    }

    #[tokio::test]
    async fn a_timeout_under_one_millisecond_is_refused_before_anything_is_sent() {
        // Nothing listens at port 1: a call that went out would fail UNAVAILABLE, not INVALID_ARGUMENT.
        let cluster = client(vec!["127.0.0.1:1".into()]);
        for timeout in [Duration::ZERO, Duration::from_micros(999)] {
            let refused = cluster.begin(timeout).await.expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
            assert!(
                refused.message().contains("timeout_ms") && refused.message().contains("under 1 ms"),
                "{refused:?}"
            );
        }
    }

    #[tokio::test]
    async fn begin_commit_and_rollback_follow_the_leader_and_answer_the_logged_outcome() {
        let leader = std::sync::Arc::new(FakeNode::leader());
        let (leader_addr, _stop_leader) = serve(leader.clone()).await;
        let follower = std::sync::Arc::new(FakeNode::follower_of(&leader_addr.to_string()));
        let (follower_addr, _stop_follower) = serve(follower.clone()).await;
        // Only the follower is given: every call must get to the leader through its hint.
        let cluster = client(vec![follower_addr.to_string()]);

        let before = twopc_proto::txn_id::unix_now_ms();
        let txn = cluster.begin(Duration::from_secs(10)).await.expect("begun");
        assert!(txn.deadline_unix_ms() >= before + 10_000, "{txn:?}");
        // A repeated Begin is the same txn with the first deadline (first writer wins).
        let again = cluster.begin_with_id(txn.id(), Duration::from_secs(60)).await.expect("begun again");
        assert_eq!(again.context(), txn.context());

        let outcome = txn.commit().await.expect("committed");
        assert_eq!(outcome, Outcome { decision: Decision::Commit, reason: String::new(), votes: Vec::new() });
        // A retried Commit answers the logged outcome; a Rollback of a committed txn is refused.
        assert!(txn.commit().await.expect("the same outcome").is_commit());
        assert_eq!(txn.rollback("too late").await.expect_err("refused").code(), tonic::Code::FailedPrecondition);

        // An Abort is an outcome, not an error; a long reason is cut at a character boundary.
        let other = cluster.begin(Duration::from_secs(10)).await.expect("begun");
        let outcome = other.rollback(&"é".repeat(400)).await.expect("rolled back");
        assert_eq!(outcome.decision, Decision::Abort);
        let kept = outcome.reason.strip_prefix("rolled back: ").expect("the coordinator's prefix");
        assert_eq!(kept.len(), 498, "cut to the limit (499) at a character boundary (é is 2 bytes)");
        let outcome = other.commit().await.expect("the logged Abort");
        assert_eq!(outcome.decision, Decision::Abort);
        assert!(!outcome.is_commit());

        assert!(!follower.calls.lock().is_empty(), "the follower was asked first");
        let calls = leader.calls.lock().clone();
        assert_eq!(calls, ["begin", "begin", "commit", "commit", "rollback", "begin", "rollback", "commit"]);
    }

    #[tokio::test]
    async fn a_begin_answered_with_another_txn_is_an_error_not_a_handle() {
        let confused = std::sync::Arc::new(FakeNode { confused: true, ..FakeNode::leader() });
        let (addr, _stop) = serve(confused).await;
        let refused = client(vec![addr.to_string()]).begin(Duration::from_secs(1)).await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");
        assert!(refused.message().contains("with the context of"), "{refused:?}");
    }
}
