//! The receiving half of the peer transport: a tonic `RaftPeer` service that
//! decodes each batch and hands every message to the node's raft task.
//!
//! It never waits on the raft task: a full inbound channel drops the message
//! (raft retransmits), so one busy node cannot stall its peers' streams. It
//! applies no fault filter; the sending side does (see the `transport` module doc).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc::{self, error::TrySendError};
use tonic::{Request, Response, Status, Streaming};
use twopc_proto::pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use twopc_proto::pb::{RaftBatch, RaftStreamEnd};

use super::{FaultFilter, TransportConfig};

/// The server half, to add to the node's tonic server.
///
/// Decodes each `RaftBatch` and hands every message to `inbound` with
/// `try_send`; a full channel drops it (raft retransmits). Bytes that are not
/// a raft message, or a message whose `from` differs from the batch's, end the
/// stream with `INVALID_ARGUMENT`; a message addressed to another node ends it
/// with `FAILED_PRECONDITION` (the sender's peer list is wrong).
///
/// `faults` is accepted for symmetry with [`super::Transport::new`] but not
/// applied: faults are applied on the sending side only, so none is applied twice.
///
/// Decoding and encoding limits are `TransportConfig::default().message_max_bytes`;
/// a node configured otherwise chains
/// `.max_decoding_message_size(config.message_max_bytes)` on the result.
///
/// # To ensure a graceful server shutdown
/// Peer streams are long-lived, and a graceful tonic shutdown waits for open
/// streams. Every stream served here ends as soon as `inbound`'s receiver is
/// dropped, so stop (or drop the receiver of) the raft task before awaiting the
/// server's shutdown.
pub fn peer_service(
    self_id: u64,
    inbound: mpsc::Sender<Message>,
    faults: FaultFilter,
) -> RaftPeerServer<impl RaftPeer> {
    drop(faults);
    let limit = TransportConfig::default().message_max_bytes;
    let service = PeerService { self_id, inbound, dropped: Arc::new(AtomicU64::new(0)) };
    RaftPeerServer::new(service).max_decoding_message_size(limit).max_encoding_message_size(limit)
}

struct PeerService {
    self_id: u64,
    inbound: mpsc::Sender<Message>,
    /// Messages dropped because the raft task's channel was full.
    dropped: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn stream(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<RaftStreamEnd>, Status> {
        // Over TLS the role table let in any node certificate; this stream may
        // carry only the messages of the node that certificate names, or one
        // node's key would let it vote and append as every other (docs/SECURITY.md).
        let certified_node = twopc_proto::net::PeerInfo::of(&request)
            .and_then(|peer| peer.identity.as_ref())
            .map(|identity| identity.name.clone());
        let mut batches = request.into_inner();
        loop {
            let batch = tokio::select! {
                () = self.inbound.closed() => return Err(stopped()),
                batch = batches.message() => batch?,
            };
            let Some(batch) = batch else {
                return Ok(Response::new(RaftStreamEnd {}));
            };
            if let Some(node) = certified_node.as_deref().filter(|node| *node != batch.from.to_string()) {
                return Err(Status::permission_denied(format!(
                    "a batch from node {} on a connection certified as node:{node}: a node sends only its own messages",
                    batch.from
                )));
            }
            self.deliver(batch)?;
        }
    }
}

impl PeerService {
    fn deliver(&self, batch: RaftBatch) -> Result<(), Status> {
        for bytes in &batch.messages {
            let msg = Message::parse_from_bytes(bytes)
                .map_err(|e| twopc_proto::status::invalid("messages", format!("not a raft message: {e}")))?;
            if msg.from != batch.from {
                let why = format!("a message from node {} in a batch from node {}", msg.from, batch.from);
                return Err(twopc_proto::status::invalid("messages", why));
            }
            if msg.to != self.self_id {
                return Err(Status::failed_precondition(format!(
                    "node {} received a message for node {}: the sender's peer addresses are wrong",
                    self.self_id, msg.to
                )));
            }
            match self.inbound.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(from = batch.from, dropped, "raft inbound channel full; message dropped");
                }
                Err(TrySendError::Closed(_)) => return Err(stopped()),
            }
        }
        Ok(())
    }
}

fn stopped() -> Status {
    Status::unavailable("this coordinator node's raft task has stopped")
}
