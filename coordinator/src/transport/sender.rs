//! The sender task of one peer link: lazy connect, one long-lived stream,
//! greedy batching, a bounded delay queue for injected delays, and reconnect
//! with capped exponential back-off and jitter.
//!
//! The task never panics and never holds a message past a failure: whatever
//! is in flight when the stream breaks, and whatever arrives while it backs
//! off, is dropped (raft retransmits) and the peer reported unreachable.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rand::Rng as _;
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use twopc_proto::pb::RaftBatch;
use twopc_proto::pb::raft_peer_client::RaftPeerClient;

use super::{Outbound, PeerCounters, PeerFeedback, TransportConfig, report_snapshot};

/// Bytes a `RaftBatch` spends framing one message: a tag and a length varint.
const PER_MESSAGE_OVERHEAD_BYTES: usize = 6;

/// Encoded messages ready to go out as one `RaftBatch`.
#[derive(Debug, Default)]
struct Batch {
    messages: Vec<Bytes>,
    bytes: usize,
    snapshots: usize,
}

impl Batch {
    fn push(&mut self, encoded: Encoded) {
        self.bytes += encoded.bytes.len() + PER_MESSAGE_OVERHEAD_BYTES;
        self.snapshots += usize::from(encoded.is_snapshot);
        self.messages.push(encoded.bytes);
    }
}

/// One message in raft-rs's encoding.
#[derive(Debug)]
struct Encoded {
    bytes: Bytes,
    is_snapshot: bool,
}

/// A message held back by an injected delay, ordered by due time then arrival.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    seq: u64,
    msg: Message,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Capped exponential back-off with jitter: each wait is drawn from
/// `[d/2, d]`, and `d` doubles per failure up to the maximum.
#[derive(Debug)]
struct Backoff {
    min_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Self {
        Self { min_ms, max_ms, next_ms: min_ms }
    }

    fn next_wait(&mut self) -> Duration {
        let ceiling_ms = self.next_ms;
        self.next_ms = ceiling_ms.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(twopc_proto::host::with_rng(|rng| rng.random_range(ceiling_ms / 2..=ceiling_ms)))
    }

    fn reset(&mut self) {
        self.next_ms = self.min_ms;
    }
}

/// Why a stream ended.
enum StreamEnd {
    /// The peer was removed or the transport shut down.
    QueueClosed,
    /// The connection or the stream failed; reconnect after a back-off.
    Failed(String),
}

/// The state of one peer's sender task.
pub(super) struct PeerSender {
    self_id: u64,
    peer_id: u64,
    addr: String,
    config: TransportConfig,
    feedback: mpsc::Sender<PeerFeedback>,
    counters: Arc<PeerCounters>,
    queue: mpsc::Receiver<Outbound>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    delayed_seq: u64,
    /// A message that did not fit the last batch; it opens the next one.
    carry: Option<Encoded>,
    backoff: Backoff,
    /// Whether the last attempt failed: repeated failures log quietly.
    failing: bool,
    /// Mutual TLS to the peer, which must prove `node-<peer_id>.twopc`.
    tls: Option<twopc_proto::tls::Tls>,
}

impl PeerSender {
    pub(super) fn new(
        self_id: u64,
        peer_id: u64,
        addr: String,
        config: TransportConfig,
        feedback: mpsc::Sender<PeerFeedback>,
        counters: Arc<PeerCounters>,
        queue: mpsc::Receiver<Outbound>,
    ) -> Self {
        let backoff = Backoff::new(config.reconnect_backoff_min_ms, config.reconnect_backoff_max_ms);
        Self {
            self_id,
            peer_id,
            addr,
            config,
            feedback,
            counters,
            queue,
            delayed: BinaryHeap::new(),
            delayed_seq: 0,
            carry: None,
            backoff,
            failing: false,
            tls: None,
        }
    }

    /// Dials the peer over mutual TLS when `tls` is given.
    pub(super) fn with_tls(mut self, tls: Option<twopc_proto::tls::Tls>) -> Self {
        self.tls = tls;
        self
    }

    /// Runs until the peer is removed or the transport shuts down.
    pub(super) async fn run(mut self) {
        loop {
            // Connect lazily: only once there is something to send.
            let Some(first) = self.next_batch().await else {
                return;
            };
            let end = match self.connect().await {
                Ok(client) => self.stream(client, first).await,
                Err(reason) => {
                    self.drop_batch(first);
                    StreamEnd::Failed(reason)
                }
            };
            let StreamEnd::Failed(reason) = end else {
                return;
            };
            self.report_failure(&reason);
            if !self.back_off().await {
                return;
            }
        }
    }

    async fn connect(&self) -> Result<RaftPeerClient<Channel>, String> {
        let uri = if self.addr.contains("://") { self.addr.clone() } else { format!("http://{}", self.addr) };
        let connect_timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| format!("bad peer address {:?}: {e}", self.addr))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_millis(self.config.keepalive_interval_ms))
            .keep_alive_timeout(Duration::from_millis(self.config.keepalive_timeout_ms))
            .keep_alive_while_idle(true);
        // The whole handshake, not only the TCP connect, is bounded.
        let dial = match &self.tls {
            Some(tls) => {
                let name = twopc_proto::tls::Identity::node(self.peer_id).dns_name();
                Some(tls.dial(&name).map_err(|e| format!("peer {}: {e}", self.peer_id))?)
            }
            None => None,
        };
        let channel = tokio::time::timeout(connect_timeout, twopc_proto::net::connect_with(&endpoint, dial))
            .await
            .map_err(|_| format!("connecting timed out after {connect_timeout:?}"))?
            .map_err(|e| format!("connecting failed: {}", error_chain(&e)))?;
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        let limit = self.config.message_max_bytes;
        Ok(RaftPeerClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit))
    }

    /// Feeds batches into one client stream until it fails or the queue closes.
    async fn stream(&mut self, mut client: RaftPeerClient<Channel>, first: Batch) -> StreamEnd {
        // Capacity 1: at most one batch waits between this task and the HTTP/2
        // stream, so back-pressure reaches the bounded queue (and `send` drops)
        // instead of piling up here.
        let (stream_tx, stream_rx) = mpsc::channel::<RaftBatch>(1);
        let call = client.stream(ReceiverStream::new(stream_rx));
        tokio::pin!(call);
        let mut batch = first;
        loop {
            let (count, snapshots) = (batch.messages.len(), batch.snapshots);
            let item = RaftBatch { from: self.self_id, messages: batch.messages };
            let written = tokio::select! {
                biased;
                ended = &mut call => Err(stream_ended(ended)),
                sent = stream_tx.send(item) => match sent {
                    Ok(()) => Ok(()),
                    // tonic dropped the request body: the call is finishing.
                    Err(_) => Err(self.await_end(&mut call).await),
                },
            };
            if let Err(reason) = written {
                self.drop_count(count as u64, snapshots);
                return StreamEnd::Failed(reason);
            }
            self.batch_written(count as u64, snapshots);

            batch = tokio::select! {
                biased;
                ended = &mut call => return StreamEnd::Failed(stream_ended(ended)),
                next = self.next_batch() => match next {
                    Some(next) => next,
                    None => return StreamEnd::QueueClosed,
                },
            };
        }
    }

    async fn await_end<F>(&self, call: &mut std::pin::Pin<&mut F>) -> String
    where
        F: Future<Output = Result<tonic::Response<twopc_proto::pb::RaftStreamEnd>, tonic::Status>>,
    {
        let grace = Duration::from_millis(self.config.connect_timeout_ms);
        match tokio::time::timeout(grace, call.as_mut()).await {
            Ok(ended) => stream_ended(ended),
            Err(_) => "the stream's request body was dropped".to_owned(),
        }
    }

    fn batch_written(&mut self, count: u64, snapshots: usize) {
        self.counters.messages_sent.fetch_add(count, Ordering::Relaxed);
        self.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
        for _ in 0..snapshots {
            report_snapshot(&self.feedback, self.peer_id, true);
        }
        self.backoff.reset();
        if self.failing {
            tracing::info!("raft peer reachable again");
            self.failing = false;
        }
    }

    /// The next batch: waits for at least one message that is due, then takes
    /// greedily whatever else is ready, up to the batch limits. `None` once the
    /// queue is closed. Cancel-safe: nothing taken is held across an await.
    async fn next_batch(&mut self) -> Option<Batch> {
        let mut batch = Batch::default();
        loop {
            if !self.fill(&mut batch) {
                return None;
            }
            if !batch.messages.is_empty() {
                return Some(batch);
            }
            let due = self.delayed.peek().map(|Reverse(delayed)| delayed.due);
            tokio::select! {
                out = self.queue.recv() => match out {
                    Some(out) => self.admit(out, &mut batch),
                    None => return None,
                },
                () = sleep_until(due) => {}
            }
        }
    }

    /// Moves ready messages into `batch` without waiting; `false` if the queue is closed.
    fn fill(&mut self, batch: &mut Batch) -> bool {
        if let Some(carried) = self.carry.take() {
            batch.push(carried);
        }
        let now = Instant::now();
        while !self.is_full(batch) {
            let Some(Reverse(delayed)) = self.delayed.peek() else {
                break;
            };
            if delayed.due > now {
                break;
            }
            let Some(Reverse(delayed)) = self.delayed.pop() else {
                break;
            };
            self.add(delayed.msg, batch);
        }
        while !self.is_full(batch) {
            match self.queue.try_recv() {
                Ok(out) => self.admit(out, batch),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    fn is_full(&self, batch: &Batch) -> bool {
        self.carry.is_some()
            || batch.messages.len() >= self.config.batch_max_messages
            || batch.bytes >= self.config.batch_max_bytes
    }

    /// Puts a queued message into `batch`, or into the delay queue if it is not due.
    fn admit(&mut self, out: Outbound, batch: &mut Batch) {
        match out.not_before {
            Some(due) if due > Instant::now() => self.delay(due, out.msg),
            _ => self.add(out.msg, batch),
        }
    }

    fn delay(&mut self, due: Instant, msg: Message) {
        if self.delayed.len() >= self.config.queue_capacity_messages {
            self.drop_message(&msg);
            return;
        }
        self.delayed_seq += 1;
        self.delayed.push(Reverse(Delayed { due, seq: self.delayed_seq, msg }));
    }

    /// Encodes `msg` into `batch`, or into `carry` if the batch has no room left.
    fn add(&mut self, msg: Message, batch: &mut Batch) {
        let is_snapshot = is_snapshot(&msg);
        let bytes = match msg.write_to_bytes() {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::warn!(error = %e, "raft message failed to encode; dropped");
                self.drop_message(&msg);
                return;
            }
        };
        if bytes.len() > self.config.message_limit_bytes() {
            tracing::warn!(
                bytes = bytes.len(),
                message_max_bytes = self.config.message_max_bytes,
                msg_type = ?msg.get_msg_type(),
                "raft message larger than message_max_bytes; dropped"
            );
            self.drop_message(&msg);
            return;
        }
        let encoded = Encoded { bytes, is_snapshot };
        let room = batch.bytes + encoded.bytes.len() + PER_MESSAGE_OVERHEAD_BYTES <= self.config.batch_max_bytes;
        if batch.messages.is_empty() || room {
            batch.push(encoded);
        } else {
            self.carry = Some(encoded);
        }
    }

    /// Waits out one back-off period, dropping what arrives meanwhile (it would
    /// be stale by the time the link is back, and raft retransmits) and
    /// reporting the peer unreachable again if anything was dropped. `false` if
    /// the queue closed.
    async fn back_off(&mut self) -> bool {
        if let Some(carried) = self.carry.take() {
            self.drop_count(1, usize::from(carried.is_snapshot));
        }
        for Reverse(delayed) in std::mem::take(&mut self.delayed) {
            self.drop_message(&delayed.msg);
        }
        let deadline = Instant::now() + self.backoff.next_wait();
        let mut reported = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return true,
                out = self.queue.recv() => match out {
                    Some(out) => {
                        self.drop_message(&out.msg);
                        // Once per back-off: every drop is reported, but not every message.
                        if !std::mem::replace(&mut reported, true) {
                            let _ = self.feedback.try_send(PeerFeedback::Unreachable(self.peer_id));
                        }
                    }
                    None => return false,
                },
            }
        }
    }

    fn report_failure(&mut self, reason: &str) {
        if self.failing {
            tracing::debug!(reason, "raft peer still unreachable");
        } else {
            tracing::warn!(reason, "raft peer unreachable; reconnecting with back-off");
            self.failing = true;
        }
        // Best-effort: the next failure reports again.
        let _ = self.feedback.try_send(PeerFeedback::Unreachable(self.peer_id));
    }

    fn drop_batch(&mut self, batch: Batch) {
        self.drop_count(batch.messages.len() as u64, batch.snapshots);
    }

    fn drop_message(&mut self, msg: &Message) {
        self.drop_count(1, usize::from(is_snapshot(msg)));
    }

    fn drop_count(&mut self, count: u64, snapshots: usize) {
        self.counters.add_dropped(count);
        for _ in 0..snapshots {
            report_snapshot(&self.feedback, self.peer_id, false);
        }
    }
}

fn is_snapshot(msg: &Message) -> bool {
    msg.get_msg_type() == MessageType::MsgSnapshot
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn stream_ended(ended: Result<tonic::Response<twopc_proto::pb::RaftStreamEnd>, tonic::Status>) -> String {
    match ended {
        Ok(_) => "the peer closed the stream".to_owned(),
        Err(status) => format!("stream failed: {:?}: {}", status.code(), status.message()),
    }
}

/// An error with its sources, so "transport error" says which one.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(20, 100);
        let waits: Vec<u64> = (0..6).map(|_| backoff.next_wait().as_millis() as u64).collect();
        let ceilings = [20, 40, 80, 100, 100, 100];
        for (wait, ceiling) in waits.iter().zip(ceilings) {
            assert!((ceiling / 2..=ceiling).contains(wait), "wait {wait} ms outside [{}, {ceiling}]", ceiling / 2);
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(20));
    }

    #[test]
    fn delayed_messages_come_out_by_due_time_then_arrival() {
        let now = Instant::now();
        let mut heap = BinaryHeap::new();
        for (seq, offset_ms) in [(1, 30), (2, 10), (3, 10)] {
            let due = now + Duration::from_millis(offset_ms);
            heap.push(Reverse(Delayed { due, seq, msg: Message::default() }));
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|Reverse(d)| d.seq)).collect();
        assert_eq!(order, [2, 3, 1]);
    }
}
