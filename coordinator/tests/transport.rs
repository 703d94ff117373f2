//! The Raft peer transport over real loopback gRPC: ordering and batching,
//! unreachable peers and reconnection, bounded queues, the fault filter, and
//! the server's handling of bad input.
//!
//! Every server binds `127.0.0.1:0` through an injected listener; tests wait
//! on the receiving channel (with a timeout), never on a fixed sleep.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::TcpListenerStream;
use twopc_coordinator::transport::{FaultFilter, LinkFault, PeerFeedback, Transport, TransportConfig, peer_service};
use twopc_proto::pb::RaftBatch;
use twopc_proto::pb::raft_peer_client::RaftPeerClient;

const WAIT: Duration = Duration::from_secs(10);
const INBOUND_CAPACITY: usize = 16_384;

/// A node's receiving half: a tonic server with `peer_service`, and the
/// channel its raft task would read.
struct Node {
    addr: SocketAddr,
    inbound: mpsc::Receiver<Message>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Node {
    async fn start(id: u64, faults: &FaultFilter) -> Result<Self> {
        Self::serve(id, TcpListener::bind("127.0.0.1:0").await?, faults)
    }

    fn serve(id: u64, listener: TcpListener, faults: &FaultFilter) -> Result<Self> {
        let addr = listener.local_addr()?;
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_CAPACITY);
        let (stop, stopped) = oneshot::channel::<()>();
        let service = peer_service(id, inbound_tx, faults.clone());
        // The single-service form: it needs no tonic "router" feature.
        let server = tokio::spawn(tonic::transport::Server::builder().serve_with_incoming_shutdown(
            service,
            TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self { addr, inbound, stop, server })
    }

    /// Stops like a node does: the raft task goes away (ending the peer
    /// streams), then the server shuts down gracefully.
    async fn stop(self) -> Result<()> {
        drop(self.inbound);
        let _ = self.stop.send(());
        timeout(WAIT, self.server).await.context("server did not stop")???;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Message> {
        timeout(WAIT, self.inbound.recv())
            .await
            .context("no message arrived in time")?
            .context("inbound channel closed")
    }
}

fn append(from: u64, to: u64, index: u64) -> Message {
    Message { msg_type: MessageType::MsgAppend, from, to, index, ..Message::default() }
}

fn snapshot(from: u64, to: u64) -> Message {
    Message { msg_type: MessageType::MsgSnapshot, from, to, ..Message::default() }
}

fn transport(id: u64, config: TransportConfig, faults: &FaultFilter) -> (Transport, mpsc::Receiver<PeerFeedback>) {
    let (feedback_tx, feedback) = mpsc::channel(1024);
    (Transport::new(id, config, faults.clone(), feedback_tx), feedback)
}

/// Quick reconnects so recovery tests finish fast.
fn fast_config() -> TransportConfig {
    TransportConfig { reconnect_backoff_min_ms: 5, reconnect_backoff_max_ms: 100, ..TransportConfig::default() }
}

/// An address on which nothing listens (yet): bound, then released.
async fn vacant_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?)
}

async fn next_feedback(
    feedback: &mut mpsc::Receiver<PeerFeedback>,
    wanted: impl Fn(&PeerFeedback) -> bool,
) -> Result<PeerFeedback> {
    let deadline = Instant::now() + WAIT;
    loop {
        let item = tokio::time::timeout_at(deadline, feedback.recv())
            .await
            .context("expected feedback did not arrive")?
            .context("feedback channel closed")?;
        if wanted(&item) {
            return Ok(item);
        }
    }
}

/// Polls a condition that has no channel to await (counters updated after a write).
async fn eventually(what: &str, condition: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Sends one message and checks that `send` returned at once, as the Ready loop needs.
fn send_nonblocking(transport: &Transport, msgs: Vec<Message>) -> Result<()> {
    let started = std::time::Instant::now();
    transport.send(msgs);
    let took = started.elapsed();
    ensure!(took < Duration::from_millis(200), "send blocked for {took:?}");
    Ok(())
}

/// Sends a message every 10 ms (raft's tick does the same) until `node` gets one.
async fn heartbeat_until_received(transport: &Transport, node: &mut Node, to: u64) -> Result<Message> {
    let deadline = Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            msg = node.inbound.recv() => return msg.context("inbound channel closed"),
            _ = tick.tick() => {
                ensure!(Instant::now() < deadline, "traffic never resumed");
                send_nonblocking(transport, vec![append(1, to, 1)])?;
            }
        }
    }
}

/// Opens a raw stream to `addr` carrying one batch, and returns the call's outcome.
async fn raw_batch(addr: SocketAddr, batch: RaftBatch) -> Result<tonic::Status> {
    let mut client = RaftPeerClient::connect(format!("http://{addr}")).await?;
    let outcome = timeout(WAIT, client.stream(tokio_stream::iter(vec![batch]))).await?;
    match outcome {
        Ok(_) => bail!("the server accepted the batch"),
        Err(status) => Ok(status),
    }
}

/// Named so that `cargo test transport` selects these tests.
mod transport {
    use super::*;

    // Proves: messages on one link arrive complete and in order, and a burst shares
    // batches (far fewer RaftBatches than messages).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_arrive_in_order_and_share_batches() -> Result<()> {
        const COUNT: u64 = 10_000;
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;
        let config = TransportConfig { queue_capacity_messages: 16_384, ..TransportConfig::default() };
        let (transport, _feedback) = transport(1, config, &faults);
        transport.set_peer(2, node2.addr.to_string());

        send_nonblocking(&transport, (1..=COUNT).map(|i| append(1, 2, i)).collect())?;
        for expected in 1..=COUNT {
            let msg = node2.recv().await?;
            ensure!(msg.index == expected, "got index {} where {expected} was due", msg.index);
            ensure!(msg.from == 1 && msg.to == 2);
        }
        eventually("the sender to count every message", || {
            transport.peer_stats(2).is_some_and(|s| s.messages_sent == COUNT)
        })
        .await?;
        let stats = transport.peer_stats(2).context("peer 2 is known")?;
        ensure!(stats.dropped == 0, "{stats:?}");
        ensure!(stats.batches_sent < COUNT / 10, "batching barely happened: {stats:?}");
        ensure!(stats.connects == 1, "one long-lived stream expected: {stats:?}");

        transport.shutdown();
        node2.stop().await
    }

    // Proves: messages to a peer that is down are dropped and reported Unreachable
    // without `send` blocking; once the peer starts, the sender reconnects (with
    // back-off) and traffic flows; a peer that stops mid-stream is reported again
    // and reconnected when it returns at the same address.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn down_peer_is_reported_and_reconnected_when_it_returns() -> Result<()> {
        let faults = FaultFilter::default();
        let addr = vacant_addr().await?;
        let (transport, mut feedback) = transport(1, fast_config(), &faults);
        transport.set_peer(2, addr.to_string());

        send_nonblocking(&transport, vec![append(1, 2, 1)])?;
        next_feedback(&mut feedback, |f| *f == PeerFeedback::Unreachable(2)).await.context("first")?;

        let mut node2 = Node::serve(2, TcpListener::bind(addr).await?, &faults)?;
        // Like raft's heartbeats: keep sending until one gets through.
        let arrived = heartbeat_until_received(&transport, &mut node2, 2).await?;
        ensure!(arrived.to == 2);
        let stats = transport.peer_stats(2).context("peer 2 is known")?;
        ensure!(stats.dropped > 0 && stats.connects >= 1, "{stats:?}");

        // The peer stops while its stream is open: reported, then reconnected.
        node2.stop().await?;
        while feedback.try_recv().is_ok() {}
        send_nonblocking(&transport, vec![append(1, 2, 1)])?;
        next_feedback(&mut feedback, |f| *f == PeerFeedback::Unreachable(2)).await.context("second")?;

        let mut node2 = Node::serve(2, TcpListener::bind(addr).await?, &faults)?;
        heartbeat_until_received(&transport, &mut node2, 2).await?;

        transport.shutdown();
        node2.stop().await
    }

    // Proves: a full queue drops instead of blocking: 100,000 messages to an
    // unreachable peer with a 16-message queue return at once, counted as dropped
    // and reported Unreachable.
    #[tokio::test]
    async fn full_queue_drops_rather_than_blocks() -> Result<()> {
        const COUNT: u64 = 100_000;
        let faults = FaultFilter::default();
        let config = TransportConfig { queue_capacity_messages: 16, ..TransportConfig::default() };
        let (transport, mut feedback) = transport(1, config, &faults);
        transport.set_peer(2, vacant_addr().await?.to_string());

        let msgs: Vec<Message> = (1..=COUNT).map(|i| append(1, 2, i)).collect();
        let started = std::time::Instant::now();
        transport.send(msgs);
        let took = started.elapsed();
        ensure!(took < Duration::from_secs(2), "send of {COUNT} messages took {took:?}");

        let stats = transport.peer_stats(2).context("peer 2 is known")?;
        // On this single-threaded runtime the sender task cannot drain during `send`.
        ensure!(stats.dropped >= COUNT - 16, "{stats:?}");
        ensure!(feedback.try_recv().ok() == Some(PeerFeedback::Unreachable(2)));
        transport.shutdown();
        Ok(())
    }

    // Proves: isolate and partition drop exactly the links they cut (a message sent
    // during the fault never arrives, even after heal), and heal restores traffic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn isolate_and_partition_drop_until_healed() -> Result<()> {
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;
        let mut node3 = Node::start(3, &faults).await?;
        let (transport, mut feedback) = transport(1, TransportConfig::default(), &faults);
        transport.set_peer(2, node2.addr.to_string());
        transport.set_peer(3, node3.addr.to_string());

        // Partition {1, 3} | {2}: 1 -> 2 is cut, 1 -> 3 is not.
        faults.partition(&[1, 3], &[2]);
        send_nonblocking(&transport, vec![append(1, 2, 1), append(1, 3, 1)])?;
        next_feedback(&mut feedback, |f| *f == PeerFeedback::Unreachable(2)).await?;
        faults.heal();
        send_nonblocking(&transport, vec![append(1, 2, 2), append(1, 3, 2)])?;
        ensure!(node2.recv().await?.index == 2, "a message sent across the partition arrived");
        ensure!(node3.recv().await?.index == 1);
        ensure!(node3.recv().await?.index == 2);

        // Isolating node 1 cuts both of its links.
        faults.isolate(1);
        send_nonblocking(&transport, vec![append(1, 2, 3), append(1, 3, 3)])?;
        faults.heal();
        send_nonblocking(&transport, vec![append(1, 2, 4), append(1, 3, 4)])?;
        ensure!(node2.recv().await?.index == 4, "a message from the isolated node arrived");
        ensure!(node3.recv().await?.index == 4, "a message from the isolated node arrived");
        ensure!(transport.peer_stats(2).is_some_and(|s| s.dropped == 2));

        transport.shutdown();
        node2.stop().await?;
        node3.stop().await
    }

    // Proves: a delayed link delivers late (no earlier than the delay) while
    // neither the caller of `send` nor another link waits for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_holds_one_link_without_blocking_others() -> Result<()> {
        const DELAY: Duration = Duration::from_millis(1500);
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;
        let mut node3 = Node::start(3, &faults).await?;
        let (transport, _feedback) = transport(1, TransportConfig::default(), &faults);
        transport.set_peer(2, node2.addr.to_string());
        transport.set_peer(3, node3.addr.to_string());

        faults.set_link(1, 2, LinkFault::delayed(DELAY.as_millis() as u64));
        let started = Instant::now();
        send_nonblocking(&transport, vec![append(1, 2, 1), append(1, 3, 1)])?;
        ensure!(node3.recv().await?.index == 1);
        let undelayed = started.elapsed();
        if undelayed < DELAY {
            ensure!(node2.inbound.try_recv().is_err(), "the delayed message arrived early");
        }
        ensure!(node2.recv().await?.index == 1);
        let delayed = started.elapsed();
        ensure!(delayed >= DELAY, "delivered after {delayed:?}, before the {DELAY:?} delay");

        transport.shutdown();
        node2.stop().await?;
        node3.stop().await
    }

    // Proves: a link with jitter reorders messages (later ones overtake earlier ones) and still
    // delivers each exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jitter_reorders_without_losing_or_repeating() -> Result<()> {
        const MESSAGES: u64 = 50;
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;
        let (transport, _feedback) = transport(1, TransportConfig::default(), &faults);
        transport.set_peer(2, node2.addr.to_string());

        faults.set_link(1, 2, LinkFault { jitter_ms: 50, ..LinkFault::default() });
        send_nonblocking(&transport, (1..=MESSAGES).map(|i| append(1, 2, i)).collect())?;
        let mut indexes = Vec::new();
        for _ in 0..MESSAGES {
            indexes.push(node2.recv().await?.index);
        }
        let mut sorted = indexes.clone();
        sorted.sort_unstable();
        ensure!(sorted == (1..=MESSAGES).collect::<Vec<_>>(), "lost or repeated: {indexes:?}");
        ensure!(indexes != sorted, "50 messages with up to 50 ms of jitter each arrived in order");

        transport.shutdown();
        node2.stop().await
    }

    // Proves: a duplicating link delivers every message twice, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicate_delivers_twice() -> Result<()> {
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;
        let (transport, _feedback) = transport(1, TransportConfig::default(), &faults);
        transport.set_peer(2, node2.addr.to_string());

        faults.set_link(1, 2, LinkFault { duplicate_probability: 1.0, ..LinkFault::default() });
        send_nonblocking(&transport, vec![append(1, 2, 1), append(1, 2, 2)])?;
        let mut indexes = Vec::new();
        for _ in 0..4 {
            indexes.push(node2.recv().await?.index);
        }
        ensure!(indexes == [1, 1, 2, 2], "{indexes:?}");

        transport.shutdown();
        node2.stop().await
    }

    // Proves: a snapshot's fate reaches raft: SnapshotSent { delivered: true } once
    // written to a live peer's stream, delivered: false when it cannot be sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_outcome_is_reported() -> Result<()> {
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;
        let (transport, mut feedback) = transport(1, TransportConfig::default(), &faults);
        transport.set_peer(2, node2.addr.to_string());

        send_nonblocking(&transport, vec![snapshot(1, 2)])?;
        ensure!(node2.recv().await?.get_msg_type() == MessageType::MsgSnapshot);
        let sent = next_feedback(&mut feedback, |f| matches!(f, PeerFeedback::SnapshotSent { .. })).await?;
        ensure!(sent == PeerFeedback::SnapshotSent { to: 2, delivered: true }, "{sent:?}");

        faults.isolate(2);
        send_nonblocking(&transport, vec![snapshot(1, 2)])?;
        let sent = next_feedback(&mut feedback, |f| matches!(f, PeerFeedback::SnapshotSent { .. })).await?;
        ensure!(sent == PeerFeedback::SnapshotSent { to: 2, delivered: false }, "{sent:?}");
        faults.heal();

        send_nonblocking(&transport, vec![snapshot(1, 7)])?;
        let sent = next_feedback(&mut feedback, |f| matches!(f, PeerFeedback::SnapshotSent { .. })).await?;
        ensure!(sent == PeerFeedback::SnapshotSent { to: 7, delivered: false }, "{sent:?}");

        transport.shutdown();
        node2.stop().await
    }

    // Proves: re-addressing a peer moves its traffic to the new address, and a
    // removed peer is reported Unreachable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_peer_readdresses_and_remove_peer_forgets() -> Result<()> {
        let faults = FaultFilter::default();
        let mut old = Node::start(2, &faults).await?;
        let (transport, mut feedback) = transport(1, TransportConfig::default(), &faults);
        transport.set_peer(2, old.addr.to_string());
        send_nonblocking(&transport, vec![append(1, 2, 1)])?;
        ensure!(old.recv().await?.index == 1);

        let mut moved = Node::start(2, &faults).await?;
        transport.set_peer(2, moved.addr.to_string());
        ensure!(transport.peer_addr(2) == Some(moved.addr.to_string()));
        send_nonblocking(&transport, vec![append(1, 2, 2)])?;
        ensure!(moved.recv().await?.index == 2);

        transport.remove_peer(2);
        ensure!(transport.peer_addr(2).is_none());
        while feedback.try_recv().is_ok() {}
        send_nonblocking(&transport, vec![append(1, 2, 3)])?;
        ensure!(feedback.try_recv().ok() == Some(PeerFeedback::Unreachable(2)));

        transport.shutdown();
        old.stop().await?;
        moved.stop().await
    }

    // Proves: the server rejects bytes that are not a raft message with
    // INVALID_ARGUMENT, a mislabelled sender likewise, and a message addressed to
    // another node with FAILED_PRECONDITION; nothing reaches the raft task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_rejects_malformed_and_misaddressed_batches() -> Result<()> {
        let faults = FaultFilter::default();
        let mut node2 = Node::start(2, &faults).await?;

        let garbage = RaftBatch { from: 1, messages: vec![Bytes::from_static(&[0xff, 0xff, 0xff])] };
        let status = raw_batch(node2.addr, garbage).await?;
        ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");

        let encode = |msg: Message| -> Result<Bytes> { Ok(Bytes::from(msg.write_to_bytes()?)) };
        let mislabelled = RaftBatch { from: 3, messages: vec![encode(append(1, 2, 1))?] };
        let status = raw_batch(node2.addr, mislabelled).await?;
        ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");

        let misaddressed = RaftBatch { from: 1, messages: vec![encode(append(1, 3, 1))?] };
        let status = raw_batch(node2.addr, misaddressed).await?;
        ensure!(status.code() == tonic::Code::FailedPrecondition, "{status:?}");

        ensure!(node2.inbound.try_recv().is_err(), "a rejected message reached the raft task");
        node2.stop().await
    }
}
