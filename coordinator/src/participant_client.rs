//! The coordinator's seam to participants: [`ParticipantClient`], and the
//! gRPC implementation over reused HTTP/2 channels.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};
use twopc_proto::pb::participant_client::ParticipantClient as PbClient;
use twopc_proto::{Decision, MAX_MESSAGE_BYTES, ParticipantId, PayloadDigest, TxnId, Vote, pb};

use crate::prepare_batch::{PrepareBatching, PrepareQueue};

/// Why a call to a participant failed. Every failure is treated as "no
/// answer": at prepare time it means Abort; at delivery time, retry later.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{participant} at {addr}: {message}")]
pub struct CallError {
    /// Who was called.
    pub participant: ParticipantId,
    /// Where.
    pub addr: String,
    /// What went wrong, for the txn's reason and the logs.
    pub message: String,
}

impl CallError {
    /// A failed call to `target`.
    pub fn new(target: &Target, message: impl Into<String>) -> Self {
        Self { participant: target.participant.clone(), addr: target.addr.clone(), message: message.into() }
    }
}

/// Calls participants on the coordinator's behalf.
///
/// Implementations must not connect eagerly and must bound each call by the
/// given timeout.
///
/// # Errors
/// A [`CallError`] for anything but a clean answer: unreachable, timed out, or
/// a status from the participant.
///
/// To ensure correctness: a YES is only returned when the participant answered
/// YES (it has persisted the branch, I3); `decide_batch` reports a decision as
/// acknowledged only when the participant said it carried that decision out.
pub trait ParticipantClient: Send + Sync + 'static {
    /// Sends Prepare and returns the participant's vote.
    fn prepare(
        &self,
        target: &Target,
        txn_id: TxnId,
        payload: bytes::Bytes,
        deadline_unix_ms: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vote, CallError>> + Send;

    /// Asks for the vote the participant gave for a staged txn (status
    /// recovery, docs/PROTOCOL.md §13.3). A participant that holds no record
    /// of the txn records a tombstone and answers NO.
    fn recover_vote(
        &self,
        target: &Target,
        txn_id: TxnId,
        staged: Option<PayloadDigest>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vote, CallError>> + Send;

    /// Sends logged decisions in one call: one [`Acknowledgement`] per
    /// decision, in the order given.
    fn decide_batch(
        &self,
        target: &Target,
        decisions: &[(TxnId, Decision)],
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Acknowledgement>, CallError>> + Send;
}

/// What a participant answered for one decision of a batch: Ok when it has
/// carried the decision out, or why not (it will be sent again).
pub type Acknowledgement = Result<(), String>;

/// A participant and where it currently is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Its registered name.
    pub participant: ParticipantId,
    /// Its registered `host:port`.
    pub addr: String,
}

/// [`ParticipantClient`] over gRPC, one lazily connected HTTP/2 channel per
/// address. Prepares to one participant are gathered into `PrepareBatch`
/// calls under load ([`crate::prepare_batch`]).
#[derive(Clone, Default)]
pub struct GrpcParticipants {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    prepare_queues: Arc<Mutex<HashMap<Target, Arc<PrepareQueue>>>>,
    connect_timeout: Duration,
    batching: PrepareBatching,
    /// Mutual TLS: each participant must prove the name it was registered as.
    tls: Option<twopc_proto::tls::Tls>,
}

/// Distinct participant addresses whose channels are kept; beyond it the
/// cache is cleared (channels are cheap to rebuild, and addresses rarely churn).
const CHANNEL_CACHE_MAX: usize = 1024;

impl GrpcParticipants {
    /// A client whose connection attempts give up after `connect_timeout`,
    /// batching Prepares by the defaults of [`PrepareBatching`].
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_batching(connect_timeout, PrepareBatching::default())
    }

    /// As [`GrpcParticipants::new`], gathering Prepares as `batching` says.
    pub fn with_batching(connect_timeout: Duration, batching: PrepareBatching) -> Self {
        Self { channels: Arc::default(), prepare_queues: Arc::default(), connect_timeout, batching, tls: None }
    }

    /// Calls participants over mutual TLS when `tls` is given: a server whose
    /// certificate does not name the participant it was registered as gets
    /// no call (docs/SECURITY.md, "no impostors").
    #[must_use]
    pub fn with_tls(mut self, tls: Option<twopc_proto::tls::Tls>) -> Self {
        self.tls = tls;
        self
    }

    fn prepare_queue(&self, target: &Target) -> Result<Arc<PrepareQueue>, CallError> {
        if let Some(queue) = self.prepare_queues.lock().get(target) {
            return Ok(Arc::clone(queue));
        }
        let queue = PrepareQueue::new(self.client(target)?, target.clone(), self.batching);
        let mut queues = self.prepare_queues.lock();
        if queues.len() >= CHANNEL_CACHE_MAX {
            queues.clear();
        }
        Ok(Arc::clone(queues.entry(target.clone()).or_insert(queue)))
    }

    fn client(&self, target: &Target) -> Result<PbClient<Channel>, CallError> {
        // Keyed by name too: over TLS a channel proves one participant's name.
        let key = format!("{}@{}", target.participant, target.addr);
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(&key) {
            return Ok(Self::wrap(channel.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{}", target.addr))
            .map_err(|e| CallError::new(target, format!("bad address: {e}")))?;
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let dial = match &self.tls {
            Some(tls) => {
                let name = twopc_proto::tls::Identity::participant(target.participant.as_str()).dns_name();
                Some(tls.dial(&name).map_err(|e| CallError::new(target, e.to_string()))?)
            }
            None => None,
        };
        let channel = twopc_proto::net::lazy_channel_with(&endpoint, dial);
        if channels.len() >= CHANNEL_CACHE_MAX {
            channels.clear();
        }
        channels.insert(key, channel.clone());
        Ok(Self::wrap(channel))
    }

    fn wrap(channel: Channel) -> PbClient<Channel> {
        PbClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// A gRPC status code and message, as a failed call reports them.
fn status_text(code: tonic::Code, message: &str) -> String {
    format!("{code:?}: {message}")
}

/// Bounds a call by `timeout` on the client side too: grpc-timeout is only
/// honoured by a server that is reachable and responsive.
pub(crate) async fn bounded<T>(
    target: &Target,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(|s| CallError::new(target, status_text(s.code(), s.message()))),
        Err(_) => Err(CallError::new(target, format!("no answer within {} ms", timeout.as_millis()))),
    }
}

impl ParticipantClient for GrpcParticipants {
    async fn prepare(
        &self,
        target: &Target,
        txn_id: TxnId,
        payload: bytes::Bytes,
        deadline_unix_ms: u64,
        timeout: Duration,
    ) -> Result<Vote, CallError> {
        let item = pb::PrepareItem { txn_id: txn_id.to_string(), payload, deadline_unix_ms };
        let result = self.prepare_queue(target)?.prepare(item, timeout).await?;
        if result.code != 0 {
            return Err(CallError::new(target, status_text(tonic::Code::from_i32(result.code), &result.message)));
        }
        Vote::from_pb(result.vote, &result.reason).map_err(|e| CallError::new(target, e.to_string()))
    }

    async fn recover_vote(
        &self,
        target: &Target,
        txn_id: TxnId,
        staged: Option<PayloadDigest>,
        timeout: Duration,
    ) -> Result<Vote, CallError> {
        let mut client = self.client(target)?;
        let mut request = tonic::Request::new(pb::RecoverVoteRequest {
            txn_id: txn_id.to_string(),
            participant: target.participant.to_string(),
            payload_digest: staged.map(|d| d.as_bytes().to_vec()).unwrap_or_default().into(),
        });
        request.set_timeout(timeout);
        let answer = bounded(target, timeout, client.recover_vote(request)).await?.into_inner();
        Vote::from_pb(answer.vote, &answer.reason).map_err(|e| CallError::new(target, e.to_string()))
    }

    async fn decide_batch(
        &self,
        target: &Target,
        decisions: &[(TxnId, Decision)],
        timeout: Duration,
    ) -> Result<Vec<Acknowledgement>, CallError> {
        let mut client = self.client(target)?;
        let items = decisions
            .iter()
            .map(|(txn_id, decision)| pb::DecisionItem { txn_id: txn_id.to_string(), decision: (*decision).into() })
            .collect();
        let mut request = tonic::Request::new(pb::DecideBatchRequest {
            participant: target.participant.to_string(),
            decisions: items,
        });
        request.set_timeout(timeout);
        let results = bounded(target, timeout, client.decide_batch(request)).await?.into_inner().results;
        let in_order = results.len() == decisions.len()
            && results.iter().zip(decisions).all(|(r, (txn_id, _))| r.txn_id == txn_id.to_string());
        if !in_order {
            return Err(CallError::new(
                target,
                format!(
                    "answered {} results, not one per decision in order, for {} decisions",
                    results.len(),
                    decisions.len()
                ),
            ));
        }
        Ok(results.into_iter().map(acknowledgement).collect())
    }
}

fn acknowledgement(result: pb::DecisionResult) -> Acknowledgement {
    if result.code == 0 {
        return Ok(());
    }
    Err(status_text(tonic::Code::from_i32(result.code), &result.message))
}
