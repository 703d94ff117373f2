//! The Raft peer transport: carries raft-rs messages between coordinator nodes.
//!
//! Each node runs one [`Transport`] (the sending half) and adds
//! [`peer_service`] (the receiving half) to its tonic server. For every peer
//! the transport keeps one bounded queue and one sender task; the task
//! connects lazily on the first message, opens one long-lived client stream
//! (`RaftPeer.Stream`), and drains its queue greedily into `RaftBatch`es so
//! that many messages share one gRPC message. Each message is encoded with
//! raft-rs's own codec and carried as opaque bytes (DESIGN.md §1: raft's types
//! never enter twopc's .proto files).
//!
//! # Why `send` never blocks the Ready loop
//!
//! [`Transport::send`] is called from the task that owns the `RawNode`, between
//! the steps of raft-rs's Ready order (I3). It only does `try_send` on bounded
//! queues: a full queue, an unknown peer or a link cut by the fault filter
//! drops the message and reports [`PeerFeedback::Unreachable`]. Dropping is
//! safe because raft retransmits (appends are re-sent after a probe, votes
//! and heartbeats are repeated every tick); blocking would stall elections and
//! log writes for every peer because of one slow peer. Encoding, connecting,
//! back-off and delays all happen in the per-peer sender task.
//!
//! # Which side filters
//!
//! The [`FaultFilter`] is applied on the **sending** side only, once per
//! message, at the moment `send` is called: a message's fate (deliver, drop,
//! delay, duplicate) is decided before it is queued, so a test that heals a
//! partition never sees messages sent during the partition arrive afterwards.
//! Delayed messages wait in the sender task's bounded delay queue, so a delay
//! holds up neither the caller nor other links. [`peer_service`] does not
//! filter, so no fault is applied twice.
//!
//! # Layout
//! - `fault`: [`FaultFilter`], [`LinkFault`], [`Verdict`]: test fault injection.
//! - `sender`: the per-peer sender task: lazy connect, batching, back-off.
//! - `service`: [`peer_service`], the receiving half.

mod fault;
mod sender;
mod service;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;
use raft::eraftpb::{Message, MessageType};
use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

pub use fault::{FaultFilter, LinkFault, Verdict};
pub use service::peer_service;

/// Bytes a `RaftBatch` adds around its messages beyond the per-message
/// overhead counted by the sender (the `from` field and framing slack).
const BATCH_ENVELOPE_BYTES: usize = 64;

/// Tuning and limits of the peer transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Messages queued per peer before `send` starts dropping (raft retransmits).
    /// The sender task's delay queue (fault injection) has the same bound.
    ///
    /// Default: 4096
    pub queue_capacity_messages: usize,
    /// Most messages in one `RaftBatch`.
    ///
    /// Default: 512
    pub batch_max_messages: usize,
    /// A batch stops growing once its encoded messages reach this many bytes; a
    /// single larger message (a snapshot) travels alone. At most
    /// `message_max_bytes - 64`.
    ///
    /// Default: 1 MiB
    pub batch_max_bytes: usize,
    /// Time allowed to open a connection to a peer.
    ///
    /// Default: 1000
    pub connect_timeout_ms: u64,
    /// First wait before reconnecting after a failure; doubles per failure, with jitter.
    ///
    /// Default: 20
    pub reconnect_backoff_min_ms: u64,
    /// Longest wait between reconnection attempts.
    ///
    /// Default: 1000
    pub reconnect_backoff_max_ms: u64,
    /// HTTP/2 PING interval on a peer connection, even while idle, so a dead
    /// peer is noticed.
    ///
    /// Default: 1000
    pub keepalive_interval_ms: u64,
    /// A connection whose PING is not acknowledged within this time is closed
    /// and the peer reported unreachable.
    ///
    /// Default: 2000
    pub keepalive_timeout_ms: u64,
    /// Largest gRPC message encoded or decoded, in bytes; bounds the largest
    /// raft message, so it must hold a whole snapshot. The receiving side
    /// ([`peer_service`]) uses the default unless told otherwise.
    ///
    /// Default: 64 MiB
    pub message_max_bytes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            queue_capacity_messages: 4096,
            batch_max_messages: 512,
            batch_max_bytes: 1024 * 1024,
            connect_timeout_ms: 1000,
            reconnect_backoff_min_ms: 20,
            reconnect_backoff_max_ms: 1000,
            keepalive_interval_ms: 1000,
            keepalive_timeout_ms: 2000,
            message_max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A [`TransportConfig`] value that cannot work, with the field to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transport config: {0}")]
pub struct TransportConfigError(String);

impl TransportConfig {
    /// Checks every field; run at start-up.
    ///
    /// # Errors
    /// [`TransportConfigError`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), TransportConfigError> {
        let check = |ok: bool, why: &str| {
            if ok { Ok(()) } else { Err(TransportConfigError(why.to_owned())) }
        };
        check(self.queue_capacity_messages > 0, "queue_capacity_messages must be at least 1")?;
        check(self.batch_max_messages > 0, "batch_max_messages must be at least 1")?;
        check(self.message_max_bytes > 2 * BATCH_ENVELOPE_BYTES, "message_max_bytes is too small to carry a message")?;
        check(self.batch_max_bytes > 0, "batch_max_bytes must be at least 1")?;
        check(
            self.batch_max_bytes <= self.message_max_bytes - BATCH_ENVELOPE_BYTES,
            "batch_max_bytes must be at most message_max_bytes - 64",
        )?;
        check(self.connect_timeout_ms > 0, "connect_timeout_ms must be at least 1")?;
        check(self.reconnect_backoff_min_ms > 0, "reconnect_backoff_min_ms must be at least 1")?;
        check(
            self.reconnect_backoff_min_ms <= self.reconnect_backoff_max_ms,
            "reconnect_backoff_min_ms must not exceed reconnect_backoff_max_ms",
        )?;
        check(self.keepalive_interval_ms > 0, "keepalive_interval_ms must be at least 1")?;
        check(self.keepalive_timeout_ms > 0, "keepalive_timeout_ms must be at least 1")
    }

    /// The largest single encoded raft message that fits in one `RaftBatch`.
    fn message_limit_bytes(&self) -> usize {
        self.message_max_bytes.saturating_sub(BATCH_ENVELOPE_BYTES)
    }
}

/// What raft-rs must be told about its peers (`RawNode::report_unreachable`,
/// `RawNode::report_snapshot`). Delivered best-effort on the feedback channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerFeedback {
    /// Messages to this peer are being dropped (unknown peer, full queue, cut
    /// link, failed connection): call `report_unreachable(id)`.
    Unreachable(u64),
    /// A `MsgSnapshot` to `to` was handed to its stream (`delivered`) or
    /// dropped: call `report_snapshot(to, Finish | Failure)`. "Delivered" means
    /// written to the peer's stream without error, not applied by the peer.
    SnapshotSent {
        /// The peer the snapshot was for.
        to: u64,
        /// Whether it reached the stream.
        delivered: bool,
    },
}

/// Counters of one peer link, for tests and metrics. They survive re-addressing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages written to the peer's stream.
    pub messages_sent: u64,
    /// `RaftBatch`es written to the peer's stream.
    pub batches_sent: u64,
    /// Messages dropped: full queue, cut link, failed connection, too large.
    pub dropped: u64,
    /// Connections successfully opened to the peer.
    pub connects: u64,
}

#[derive(Debug, Default)]
struct PeerCounters {
    messages_sent: AtomicU64,
    batches_sent: AtomicU64,
    dropped: AtomicU64,
    connects: AtomicU64,
}

impl PeerCounters {
    fn add_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PeerStats {
        PeerStats {
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            batches_sent: self.batches_sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
        }
    }
}

/// A message on its way to a peer's sender task.
#[derive(Debug)]
struct Outbound {
    msg: Message,
    /// Set by a delaying fault: the message is not sent before this instant.
    not_before: Option<Instant>,
}

/// One known peer: its address, its queue, and the task draining the queue.
struct Peer {
    addr: String,
    queue: mpsc::Sender<Outbound>,
    counters: Arc<PeerCounters>,
    task: AbortHandle,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    self_id: u64,
    config: TransportConfig,
    faults: FaultFilter,
    feedback: mpsc::Sender<PeerFeedback>,
    peers: RwLock<HashMap<u64, Peer>>,
    shut_down: AtomicBool,
    /// Mutual TLS to the peers (each must prove `node-<id>.twopc`); `None`: plaintext.
    tls: Option<twopc_proto::tls::Tls>,
    /// Where peer sender tasks run: the runtime the transport was made in
    /// (or first used from). The raft task calls [`Transport::set_peer`] from
    /// a runtime of its own, whose thread fsyncs; senders must not run there.
    runtime: OnceLock<Handle>,
}

/// The sending half of the peer transport: one bounded queue and one sender
/// task per peer. Cheap to clone; every clone drives the same peers.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("self_id", &self.shared.self_id)
            .field("peers", &self.shared.peers.read().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A transport for node `self_id` with no peers yet. Does not connect
    /// anywhere and needs no runtime (made inside one, its sender tasks run
    /// there); `config` should have passed [`TransportConfig::validate`].
    pub fn new(
        self_id: u64,
        config: TransportConfig,
        faults: FaultFilter,
        feedback: mpsc::Sender<PeerFeedback>,
    ) -> Self {
        Self::with_tls(self_id, config, faults, feedback, None)
    }

    /// [`Transport::new`], dialing peers over mutual TLS when `tls` is given.
    pub fn with_tls(
        self_id: u64,
        config: TransportConfig,
        faults: FaultFilter,
        feedback: mpsc::Sender<PeerFeedback>,
        tls: Option<twopc_proto::tls::Tls>,
    ) -> Self {
        let shared = Shared {
            self_id,
            config,
            faults,
            feedback,
            peers: RwLock::new(HashMap::new()),
            shut_down: AtomicBool::new(false),
            tls,
            runtime: Handle::try_current().map(OnceLock::from).unwrap_or_default(),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Adds peer `id` at `addr` (`host:port`, or a URI with a scheme), or
    /// re-addresses it: the old sender task and whatever it had queued are
    /// dropped and a new task is started. Setting the address a peer already
    /// has is a no-op. The task connects lazily, on the first message.
    ///
    /// Must be called inside a tokio runtime. Does nothing after [`Self::shutdown`].
    pub fn set_peer(&self, id: u64, addr: String) {
        let shared = &self.shared;
        let mut peers = shared.peers.write();
        if shared.shut_down.load(Ordering::Acquire) {
            return;
        }
        if peers.get(&id).is_some_and(|peer| peer.addr == addr && !peer.task.is_finished()) {
            return;
        }
        let counters = peers.get(&id).map(|peer| Arc::clone(&peer.counters)).unwrap_or_default();
        let (queue, rx) = mpsc::channel(shared.config.queue_capacity_messages);
        let span = tracing::info_span!("raft_peer", from = shared.self_id, to = id, addr = %addr);
        let task = sender::PeerSender::new(
            shared.self_id,
            id,
            addr.clone(),
            shared.config.clone(),
            shared.feedback.clone(),
            Arc::clone(&counters),
            rx,
        )
        .with_tls(shared.tls.clone());
        let runtime = shared.runtime.get_or_init(Handle::current);
        let task = runtime.spawn(task.run().instrument(span)).abort_handle();
        // Replacing the old entry drops it, which aborts its task.
        peers.insert(id, Peer { addr, queue, counters, task });
    }

    /// Forgets peer `id`: its sender task stops and its queue is dropped.
    pub fn remove_peer(&self, id: u64) {
        let removed = self.shared.peers.write().remove(&id);
        drop(removed);
    }

    /// The address peer `id` was last set to, if it is known.
    pub fn peer_addr(&self, id: u64) -> Option<String> {
        self.shared.peers.read().get(&id).map(|peer| peer.addr.clone())
    }

    /// The counters of peer `id`'s link, if it is known.
    pub fn peer_stats(&self, id: u64) -> Option<PeerStats> {
        self.shared.peers.read().get(&id).map(|peer| peer.counters.snapshot())
    }

    /// Hands messages to their destinations' queues, in order per destination.
    ///
    /// Never blocks or awaits, so it is safe to call from the Ready loop. A
    /// message to an unknown peer, to a full queue, or on a link the fault
    /// filter cuts is dropped (raft retransmits) and the peer is reported with
    /// [`PeerFeedback::Unreachable`], at most once per call. A dropped
    /// `MsgSnapshot` is also reported as `SnapshotSent { delivered: false }`;
    /// one that is queued is reported by the sender task once its fate is known.
    pub fn send(&self, msgs: Vec<Message>) {
        let mut unreachable: Vec<u64> = Vec::new();
        {
            let peers = self.shared.peers.read();
            for msg in msgs {
                let to = msg.to;
                if !self.route(&peers, msg) && !unreachable.contains(&to) {
                    unreachable.push(to);
                }
            }
        }
        for id in unreachable {
            // Best-effort: raft learns of a dead link again on the next failure.
            let _ = self.shared.feedback.try_send(PeerFeedback::Unreachable(id));
        }
    }

    /// Stops every sender task and forgets every peer. In-flight messages are
    /// dropped; later `send`s report every destination unreachable.
    pub fn shutdown(&self) {
        let mut peers = self.shared.peers.write();
        self.shared.shut_down.store(true, Ordering::Release);
        let stopped = std::mem::take(&mut *peers);
        drop(peers);
        drop(stopped);
    }

    /// Applies the fault filter and queues `msg`; `false` if it was dropped.
    fn route(&self, peers: &HashMap<u64, Peer>, msg: Message) -> bool {
        let shared = &self.shared;
        let to = msg.to;
        let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
        let Some(peer) = peers.get(&to) else {
            if is_snapshot {
                report_snapshot(&shared.feedback, to, false);
            }
            return false;
        };
        let drop_one = || {
            peer.counters.add_dropped(1);
            if is_snapshot {
                report_snapshot(&shared.feedback, to, false);
            }
            false
        };
        let at = |delay: Duration| (!delay.is_zero()).then(|| Instant::now() + delay);
        let (not_before, copies) = match shared.faults.verdict(shared.self_id, to) {
            Verdict::Deliver => (None, 1),
            Verdict::Drop => return drop_one(),
            Verdict::Delay(delay) => (at(delay), 1),
            // A snapshot is never duplicated: its outcome must be reported exactly once.
            Verdict::Duplicate(delay) => (at(delay), if is_snapshot { 1 } else { 2 }),
        };
        if copies == 2 {
            // The copy may be dropped on its own; raft tolerates both.
            let copy = Outbound { msg: msg.clone(), not_before };
            if peer.queue.try_send(copy).is_err() {
                peer.counters.add_dropped(1);
            }
        }
        match peer.queue.try_send(Outbound { msg, not_before }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => drop_one(),
        }
    }
}

/// Tells raft-rs how a `MsgSnapshot` fared.
///
/// raft-rs keeps the follower paused in snapshot state until it hears the
/// outcome, so unlike `Unreachable` this report must not be lost to a
/// momentarily full channel: it is then sent from a spawned task.
fn report_snapshot(feedback: &mpsc::Sender<PeerFeedback>, to: u64, delivered: bool) {
    let report = PeerFeedback::SnapshotSent { to, delivered };
    let Err(TrySendError::Full(report)) = feedback.try_send(report) else {
        return;
    };
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let feedback = feedback.clone();
        runtime.spawn(async move {
            let _ = feedback.send(report).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert_eq!(TransportConfig::default().validate(), Ok(()));
    }

    #[test]
    fn validate_names_the_bad_field() {
        let config = TransportConfig { batch_max_bytes: 64 * 1024 * 1024, ..TransportConfig::default() };
        let err = config.validate().expect_err("batch larger than a gRPC message");
        assert!(err.to_string().contains("batch_max_bytes"), "{err}");

        let config = TransportConfig { reconnect_backoff_min_ms: 5000, ..TransportConfig::default() };
        let err = config.validate().expect_err("min above max");
        assert!(err.to_string().contains("reconnect_backoff_min_ms"), "{err}");

        let config = TransportConfig { queue_capacity_messages: 0, ..TransportConfig::default() };
        assert!(config.validate().is_err());
    }

    // A message to a peer that was never set is dropped and reported, without a runtime.
    #[test]
    fn unknown_peer_is_reported_unreachable_once_per_call() {
        let (feedback, mut rx) = mpsc::channel(16);
        let transport = Transport::new(1, TransportConfig::default(), FaultFilter::default(), feedback);
        let msgs = (0..3).map(|_| Message { to: 9, from: 1, ..Message::default() }).collect();
        transport.send(msgs);
        assert_eq!(rx.try_recv().ok(), Some(PeerFeedback::Unreachable(9)));
        assert!(rx.try_recv().is_err(), "one report per send call");
    }
}
