//! The gRPC `twopc.v1.Participant` service and [`Participant`], which runs it
//! together with the resolver: [`run`] is the one call a service makes.
//! [`Participant::serve_with`] also serves the service's own gRPC API on the
//! same port.
//!
//! Handlers convert the wire request into domain types first thing; bad input
//! becomes `INVALID_ARGUMENT` with a message a person can act on. The status
//! codes are listed in the crate docs.

use std::future::Future;
use std::sync::Arc;

use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tracing::{Span, field, info, instrument};
use twopc_proto::net::Listener;
use twopc_proto::pb::participant_server::{self, ParticipantServer};
use twopc_proto::pb::{
    DecideBatchRequest, DecideBatchResponse, DecisionItem, DecisionRequest, DecisionResponse, DecisionResult,
    PrepareBatchRequest, PrepareBatchResponse, PrepareItem, PrepareRequest, PrepareResponse, PrepareResult,
    RecoverVoteRequest, RecoverVoteResponse,
};
use twopc_proto::{Decision, MAX_MESSAGE_BYTES, TxnId};

use crate::cluster::Cluster;
use crate::config::ParticipantConfig;
use crate::engine::{Engine, Origin};
use crate::error::{Error, Result};
use crate::join::Joiner;
use crate::metrics::Metrics;
use crate::resolver;
use crate::resource::Resource;

/// Serves the Participant gRPC API for `resource` on `listener` and resolves
/// in-doubt branches, until `shutdown` completes; calls in flight then finish
/// before it returns.
///
/// Shorthand for [`Participant::new`] followed by [`Participant::serve`]; use
/// those to keep a [`Metrics`] handle.
///
/// # Errors
/// [`Error::Config`] if `config` is invalid; [`Error::Fatal`] if the resource
/// cannot list its prepared branches at start-up; [`Error::Transport`] if the
/// server fails.
pub async fn run<R: Resource>(
    listener: impl Into<Listener>,
    resource: Arc<R>,
    config: ParticipantConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    Participant::new(resource, config)?.serve(listener, shutdown).await
}

/// A participant ready to serve: the resource, its config and its counters.
pub struct Participant<R> {
    engine: Arc<Engine<R>>,
    cluster: Arc<Cluster>,
}

impl<R: Resource> Participant<R> {
    /// Checks `config` and prepares to serve `resource`. Nothing runs yet.
    ///
    /// # Errors
    /// [`Error::Config`] naming the invalid field.
    pub fn new(resource: Arc<R>, config: ParticipantConfig) -> Result<Self> {
        config.validate()?;
        let cluster = Arc::new(Cluster::new(&config));
        let engine = Engine::new(resource, config, Metrics::default());
        Ok(Self { engine: Arc::new(engine), cluster })
    }

    /// A handle by which the service's own gRPC handlers join interactive
    /// txns ([`Joiner::join`], docs/PROTOCOL.md §12.3). Take it before
    /// [`Participant::serve`] or [`Participant::serve_with`] and give it to
    /// the services in their `routes`; it shares this participant's outcome
    /// memory, locks, limits, metrics and coordinator connections, and the
    /// resolver serving with it settles what a join leaves in doubt.
    pub fn joiner(&self) -> Joiner<R> {
        Joiner::new(Arc::clone(&self.engine), Arc::clone(&self.cluster))
    }

    /// A handle on the counters; stays valid after [`Participant::serve`] ends.
    pub fn metrics(&self) -> Metrics {
        self.engine.metrics().clone()
    }

    /// Loads the resource's prepared branches (they are resolved first), then
    /// serves on `listener` and runs the resolver until `shutdown` completes.
    ///
    /// # Errors
    /// [`Error::Fatal`] if the resource cannot list its prepared branches;
    /// [`Error::Transport`] if the server fails.
    pub async fn serve(self, listener: impl Into<Listener>, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        self.serve_with(listener, Routes::default(), shutdown).await
    }

    /// [`Participant::serve`], also serving the service's own gRPC services
    /// in `routes` on the same listener, so one port carries both (the bank
    /// serves its `twopc.v1.Bank` API this way).
    ///
    /// `routes` must not contain a `twopc.v1.Participant` service. Message
    /// size limits and other per-service settings are the caller's, set on
    /// each service before it is added.
    ///
    /// Build `routes` with `tonic::service::Routes::new(MyApiServer::new(api))`
    /// and `.add_service(..)` for more.
    ///
    /// # Errors
    /// As [`Participant::serve`].
    pub async fn serve_with(
        self,
        listener: impl Into<Listener>,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let recovered = self.engine.recover().await?;
        let listener = listener.into().with_tls(self.engine.config().tls.clone());
        let local_addr = listener.local_addr().ok();
        info!(
            participant = %self.engine.config().id,
            ?local_addr,
            recovered,
            "participant serving"
        );
        let resolver = AbortOnDrop(tokio::spawn(resolver::run(Arc::clone(&self.engine), self.cluster)));
        let service = ParticipantServer::new(Service { engine: self.engine })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let served = tonic::transport::Server::builder()
            .layer(twopc_proto::auth::AuthorizeLayer(twopc_proto::auth::PARTICIPANT))
            .add_routes(routes)
            .add_service(service)
            .serve_with_incoming_shutdown(listener.incoming(), shutdown)
            .await;
        drop(resolver);
        info!("participant stopped");
        Ok(served?)
    }
}

/// Stops the resolver when serving ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Service<R> {
    engine: Arc<Engine<R>>,
}

/// A Prepare after conversion and checks.
struct Prepare {
    txn: TxnId,
    payload: bytes::Bytes,
    deadline_unix_ms: u64,
}

impl<R: Resource> Service<R> {
    fn txn_id(text: &str) -> Result<TxnId> {
        text.parse()
            .map_err(|e: twopc_proto::txn_id::TxnIdError| Error::Invalid { field: "txn_id", why: e.to_string() })
    }

    /// An empty name skips the check (see participant.proto).
    fn check_participant(&self, name: &str) -> Result<()> {
        let ours = &self.engine.config().id;
        if name.is_empty() || name == ours.as_str() {
            return Ok(());
        }
        Err(Error::WrongParticipant { ours: ours.clone(), theirs: name.chars().take(80).collect() })
    }

    fn prepare_from_wire(&self, req: PrepareRequest) -> Result<Prepare> {
        self.check_participant(&req.participant)?;
        self.prepare_from_item(PrepareItem {
            txn_id: req.txn_id,
            payload: req.payload,
            deadline_unix_ms: req.deadline_unix_ms,
        })
    }

    fn prepare_from_item(&self, item: PrepareItem) -> Result<Prepare> {
        let txn = Self::txn_id(&item.txn_id)?;
        let limit = self.engine.config().payload_max_bytes;
        if item.payload.len() > limit {
            return Err(Error::Invalid {
                field: "payload",
                why: format!(
                    "{} bytes is over this participant's limit of {limit} bytes \
                     (payload_max_bytes); split the work into smaller branches",
                    item.payload.len()
                ),
            });
        }
        if item.deadline_unix_ms == 0 {
            return Err(Error::Invalid {
                field: "deadline_unix_ms",
                why: "is 0; set it to the txn's deadline in Unix milliseconds".into(),
            });
        }
        Ok(Prepare { txn, payload: item.payload, deadline_unix_ms: item.deadline_unix_ms })
    }

    fn decision_from_wire(&self, req: &DecisionRequest) -> Result<(TxnId, Decision)> {
        self.check_participant(&req.participant)?;
        Self::decision_from_parts(&req.txn_id, req.decision)
    }

    fn decision_from_parts(txn_id: &str, decision: i32) -> Result<(TxnId, Decision)> {
        let txn = Self::txn_id(txn_id)?;
        let decision = Decision::try_from(decision).map_err(|e| Error::Invalid {
            field: "decision",
            why: format!("{e}; use DECISION_COMMIT (1) or DECISION_ABORT (2)"),
        })?;
        Ok((txn, decision))
    }

    /// A batch's own checks (each item is checked on its own): addressed to
    /// this participant, and 1 to `max` items.
    fn check_batch(&self, participant: &str, field: &'static str, len: usize, max: usize, limit: &str) -> Result<()> {
        self.check_participant(participant)?;
        if len == 0 || len > max {
            return Err(Error::Invalid {
                field,
                why: format!("holds {len}; a batch holds 1 to {max} ({limit}); split it"),
            });
        }
        Ok(())
    }

    /// One Prepare of a batch, answered as its own Prepare would be.
    async fn prepare_one(&self, item: PrepareItem) -> PrepareResult {
        let txn_id = item.txn_id.clone();
        let voted = match self.prepare_from_item(item) {
            Ok(p) => self.engine.prepare(p.txn, p.payload, p.deadline_unix_ms).await,
            Err(e) => Err(e),
        };
        match voted {
            Ok(vote) => {
                let pb = vote.to_pb();
                PrepareResult { txn_id, code: 0, message: String::new(), vote: pb.vote, reason: pb.reason }
            }
            Err(e) => {
                let (code, message) = status_parts(e);
                PrepareResult { txn_id, code, message, ..PrepareResult::default() }
            }
        }
    }

    /// One decision of a batch, answered as its own Decide would be.
    async fn decide_one(&self, item: DecisionItem) -> DecisionResult {
        let applied = match Self::decision_from_parts(&item.txn_id, item.decision) {
            Ok((txn, decision)) => self.engine.decide_in_batch(txn, decision).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let (code, message) = match applied {
            Ok(()) => (0, String::new()),
            Err(e) => status_parts(e),
        };
        DecisionResult { txn_id: item.txn_id, code, message }
    }
}

/// An error as a batch result carries it: the code and message of the status
/// the same call alone would have returned.
fn status_parts(e: Error) -> (i32, String) {
    let status = Status::from(e);
    (status.code() as i32, status.message().to_owned())
}

#[tonic::async_trait]
impl<R: Resource> participant_server::Participant for Service<R> {
    #[instrument(skip_all, fields(txn_id = field::Empty))]
    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let prepare = self.prepare_from_wire(request.into_inner())?;
        Span::current().record("txn_id", field::display(prepare.txn));
        let vote = self.engine.prepare(prepare.txn, prepare.payload, prepare.deadline_unix_ms).await?;
        Ok(Response::new(vote.to_pb()))
    }

    #[instrument(skip_all, fields(txn_id = field::Empty))]
    async fn decide(&self, request: Request<DecisionRequest>) -> Result<Response<DecisionResponse>, Status> {
        let (txn, decision) = self.decision_from_wire(request.get_ref())?;
        Span::current().record("txn_id", field::display(txn));
        self.engine.decide(txn, decision, Origin::Coordinator).await?;
        Ok(Response::new(DecisionResponse {}))
    }

    #[instrument(skip_all, fields(prepares = field::Empty))]
    async fn prepare_batch(
        &self,
        request: Request<PrepareBatchRequest>,
    ) -> Result<Response<PrepareBatchResponse>, Status> {
        let request = request.into_inner();
        let max = self.engine.config().prepare_batch_max;
        self.check_batch(&request.participant, "prepares", request.prepares.len(), max, "prepare_batch_max")?;
        Span::current().record("prepares", request.prepares.len());
        // All at once, as separate Prepares would run: a store with group
        // commit makes them durable with one fsync.
        let results = futures::future::join_all(request.prepares.into_iter().map(|item| self.prepare_one(item))).await;
        Ok(Response::new(PrepareBatchResponse { results }))
    }

    #[instrument(skip_all, fields(decisions = field::Empty))]
    async fn decide_batch(
        &self,
        request: Request<DecideBatchRequest>,
    ) -> Result<Response<DecideBatchResponse>, Status> {
        let request = request.into_inner();
        let max = self.engine.config().decide_batch_max;
        self.check_batch(&request.participant, "decisions", request.decisions.len(), max, "decide_batch_max")?;
        Span::current().record("decisions", request.decisions.len());
        // At once, up to decide_batch_concurrency_max across all batches:
        // each runs under its own txn's lock, and a store with group commit
        // gives them one fsync.
        let results = futures::future::join_all(request.decisions.into_iter().map(|item| self.decide_one(item))).await;
        Ok(Response::new(DecideBatchResponse { results }))
    }

    #[instrument(skip_all, fields(txn_id = field::Empty))]
    async fn recover_vote(
        &self,
        request: Request<RecoverVoteRequest>,
    ) -> Result<Response<RecoverVoteResponse>, Status> {
        let request = request.into_inner();
        self.check_participant(&request.participant)?;
        let txn = Self::txn_id(&request.txn_id)?;
        Span::current().record("txn_id", field::display(txn));
        let staged = match &request.payload_digest[..] {
            [] => None,
            bytes => Some(twopc_proto::PayloadDigest::from_slice(bytes).ok_or(Error::Invalid {
                field: "payload_digest",
                why: format!("{} bytes; a SHA-256 digest is 32, or empty for none", bytes.len()),
            })?),
        };
        let pb = self.engine.recover_vote(txn, staged).await?.to_pb();
        Ok(Response::new(RecoverVoteResponse { vote: pb.vote, reason: pb.reason }))
    }
}
