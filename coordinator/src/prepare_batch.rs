//! Prepares to one participant, gathered into `PrepareBatch` calls: the
//! gRPC [`crate::participant_client::GrpcParticipants`] sends every Prepare
//! through the [`PrepareQueue`] of its participant's address.
//!
//! A Prepare that finds fewer than `calls_max` calls in flight to its
//! participant goes out at once, alone: one client waits no longer than it
//! would for a plain Prepare. Prepares that arrive while `calls_max` calls
//! are in flight wait, and the next call to finish sends them together, up to
//! `batch_max` Prepares and [`BATCH_BYTES_MAX`] payload bytes a call. So the
//! batch size follows the load, the way a store's group commit does.
//!
//! Each batch is sent by a task of its own, so a caller that gives up (its
//! timeout, an early abort) never strands the Prepares it carried.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use twopc_proto::pb;
use twopc_proto::pb::participant_client::ParticipantClient as PbClient;

use crate::participant_client::{CallError, Target, bounded};

/// Payload bytes in one call, kept well under the 4 MiB message limit.
pub const BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;

/// What a queued Prepare gets back: the participant's result for it, or why
/// the call carrying it failed.
pub(crate) type PrepareAnswer = Result<pb::PrepareResult, CallError>;

/// How Prepares to one participant are gathered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareBatching {
    /// Prepares in one call. Default: 256.
    pub batch_max: usize,
    /// Calls in flight to one participant before Prepares start to wait for a
    /// batch. Default: 4.
    pub calls_max: usize,
}

impl Default for PrepareBatching {
    fn default() -> Self {
        Self { batch_max: 256, calls_max: 4 }
    }
}

/// The Prepares waiting for one participant, and its calls in flight.
pub(crate) struct PrepareQueue {
    client: PbClient<Channel>,
    target: Target,
    batching: PrepareBatching,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<Waiting>,
    calls_in_flight: usize,
}

struct Waiting {
    item: pb::PrepareItem,
    give_up_at: Instant,
    reply: oneshot::Sender<PrepareAnswer>,
}

impl PrepareQueue {
    pub(crate) fn new(client: PbClient<Channel>, target: Target, batching: PrepareBatching) -> Arc<Self> {
        Arc::new(Self { client, target, batching, state: Mutex::default() })
    }

    /// Queues one Prepare and waits at most `timeout` for its result.
    pub(crate) async fn prepare(self: &Arc<Self>, item: pb::PrepareItem, timeout: Duration) -> PrepareAnswer {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting { item, give_up_at: Instant::now() + timeout, reply };
        let batch = {
            let mut state = self.state.lock();
            state.waiting.push_back(waiting);
            if state.calls_in_flight < self.batching.calls_max {
                state.calls_in_flight += 1;
                Some(self.take_batch(&mut state))
            } else {
                None
            }
        };
        if let Some(batch) = batch {
            tokio::spawn(Arc::clone(self).send_until_drained(batch));
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(CallError::new(&self.target, "the call carrying this prepare ended without an answer")),
            Err(_) => Err(CallError::new(&self.target, format!("no answer within {} ms", timeout.as_millis()))),
        }
    }

    /// The next batch, oldest first, leaving out Prepares whose callers
    /// have given up.
    fn take_batch(&self, state: &mut QueueState) -> Vec<Waiting> {
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < self.batching.batch_max {
            let Some(next) = state.waiting.front() else { break };
            if next.reply.is_closed() || next.give_up_at <= now {
                state.waiting.pop_front();
                continue;
            }
            let size = next.item.payload.len();
            if !batch.is_empty() && bytes + size > BATCH_BYTES_MAX {
                break;
            }
            bytes += size;
            batch.extend(state.waiting.pop_front());
        }
        batch
    }

    /// Sends `batch`, then whatever waited meanwhile, until nothing waits;
    /// then gives up its call slot.
    async fn send_until_drained(self: Arc<Self>, mut batch: Vec<Waiting>) {
        loop {
            if !batch.is_empty() {
                self.send(batch).await;
            }
            let mut state = self.state.lock();
            batch = self.take_batch(&mut state);
            if batch.is_empty() {
                state.calls_in_flight -= 1;
                return;
            }
        }
    }

    async fn send(&self, batch: Vec<Waiting>) {
        let now = Instant::now();
        let timeout = batch.iter().map(|w| w.give_up_at.saturating_duration_since(now)).max().unwrap_or_default();
        let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|w| (w.item, w.reply)).unzip();
        let txn_ids: Vec<String> = items.iter().map(|item| item.txn_id.clone()).collect();
        let count = items.len();
        let mut request = tonic::Request::new(pb::PrepareBatchRequest {
            participant: self.target.participant.to_string(),
            prepares: items,
        });
        request.set_timeout(timeout);
        let answered = bounded(&self.target, timeout, self.client.clone().prepare_batch(request)).await;
        let results = answered.and_then(|response| {
            let results = response.into_inner().results;
            let in_order = results.len() == count && results.iter().zip(&txn_ids).all(|(r, id)| &r.txn_id == id);
            if in_order {
                return Ok(results);
            }
            let why = format!("answered {} results, not one per prepare in order, for {count} prepares", results.len());
            Err(CallError::new(&self.target, why))
        });
        match results {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(failed) => {
                for reply in replies {
                    let _ = reply.send(Err(failed.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::watch;
    use tonic::{Request, Response, Status};
    use twopc_proto::pb::participant_server::{Participant, ParticipantServer};

    use super::*;

    /// A participant that votes YES to everything, counts PrepareBatch
    /// calls and their sizes, and holds each call while `hold` is true.
    #[derive(Clone)]
    struct Recorder {
        calls: Arc<Mutex<Vec<usize>>>,
        arrived: Arc<AtomicUsize>,
        hold: watch::Receiver<bool>,
    }

    #[tonic::async_trait]
    impl Participant for Recorder {
        async fn prepare(&self, _: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
            Err(Status::unimplemented("batches only"))
        }

        async fn prepare_batch(
            &self,
            request: Request<pb::PrepareBatchRequest>,
        ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
            let prepares = request.into_inner().prepares;
            self.calls.lock().push(prepares.len());
            self.arrived.fetch_add(1, Ordering::SeqCst);
            let _ = self.hold.clone().wait_for(|hold| !hold).await;
            let results = prepares
                .into_iter()
                .map(|p| pb::PrepareResult { txn_id: p.txn_id, vote: pb::VoteKind::Yes.into(), ..Default::default() })
                .collect();
            Ok(Response::new(pb::PrepareBatchResponse { results }))
        }

        async fn decide(&self, _: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
            Err(Status::unimplemented("prepares only"))
        }

        async fn decide_batch(
            &self,
            _: Request<pb::DecideBatchRequest>,
        ) -> Result<Response<pb::DecideBatchResponse>, Status> {
            Err(Status::unimplemented("prepares only"))
        }

        async fn recover_vote(
            &self,
            _: Request<pb::RecoverVoteRequest>,
        ) -> Result<Response<pb::RecoverVoteResponse>, Status> {
            Err(Status::unimplemented("prepares only"))
        }
    }

    async fn serve(recorder: Recorder) -> anyhow::Result<PbClient<Channel>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(recorder))
                .serve_with_incoming(incoming),
        );
        Ok(PbClient::new(Channel::from_shared(format!("http://{addr}"))?.connect_lazy()))
    }

    /// A recording participant holding its calls, and a queue to it with
    /// one call slot and batches of at most 4.
    async fn held_participant() -> anyhow::Result<(watch::Sender<bool>, Recorder, Arc<PrepareQueue>)> {
        let (hold, held) = watch::channel(true);
        let recorder = Recorder { calls: Arc::default(), arrived: Arc::default(), hold: held };
        let client = serve(recorder.clone()).await?;
        let target = Target { participant: "bank-a".parse()?, addr: "test".into() };
        let queue = PrepareQueue::new(client, target, PrepareBatching { batch_max: 4, calls_max: 1 });
        Ok((hold, recorder, queue))
    }

    fn item() -> pb::PrepareItem {
        pb::PrepareItem {
            txn_id: twopc_proto::TxnId::new().to_string(),
            payload: Default::default(),
            deadline_unix_ms: 1,
        }
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    // I6 (bounded) and the batching itself: with every call slot taken, Prepares wait and the
    // next call carries them together, at most batch_max at a time; each caller gets its own
    // result. A lone Prepare goes out at once, in a call of its own.
    #[tokio::test]
    async fn prepares_that_find_every_call_slot_taken_go_together_in_the_next_calls() -> anyhow::Result<()> {
        let (hold, recorder, queue) = held_participant().await?;
        let timeout = Duration::from_secs(10);

        let first = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.prepare(item(), timeout).await }
        });
        wait_until("the first call arrives", || recorder.arrived.load(Ordering::SeqCst) == 1).await?;
        let rest: Vec<_> = (0..9)
            .map(|_| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.prepare(item(), timeout).await })
            })
            .collect();
        wait_until("nine prepares wait", || queue.state.lock().waiting.len() == 9).await?;
        hold.send_replace(false);

        for answer in std::iter::once(first).chain(rest) {
            let result = answer.await??;
            assert_eq!(result.vote, i32::from(pb::VoteKind::Yes));
        }
        assert_eq!(*recorder.calls.lock(), [1, 4, 4, 1]);
        assert_eq!(queue.state.lock().calls_in_flight, 0, "the call slot is given back");
        Ok(())
    }

    // I7 (no hanging): a caller whose timeout passes while its Prepare waits gets an error, and
    // its Prepare is left out of the next call rather than sent late.
    #[tokio::test]
    async fn a_prepare_whose_caller_gave_up_is_not_sent() -> anyhow::Result<()> {
        let (hold, recorder, queue) = held_participant().await?;

        let first = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.prepare(item(), Duration::from_secs(10)).await }
        });
        wait_until("the first call arrives", || recorder.arrived.load(Ordering::SeqCst) == 1).await?;
        let late = queue.prepare(item(), Duration::from_millis(20)).await;
        assert!(late.is_err_and(|e| e.message.contains("no answer within 20 ms")));
        hold.send_replace(false);
        first.await??;
        wait_until("the call slot is given back", || queue.state.lock().calls_in_flight == 0).await?;
        assert_eq!(*recorder.calls.lock(), [1]);
        Ok(())
    }
}
