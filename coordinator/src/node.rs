//! The raft node: one task owns raft-rs's `RawNode`; everything else talks to
//! it through a [`NodeHandle`] over bounded channels. The task runs on a
//! thread and a current-thread runtime of its own, so its fsyncs never block
//! a worker of the runtime that serves gRPC.
//!
//! The task's loop takes ticks, peer messages and requests, then handles each
//! `Ready` in raft-rs's order exactly (docs/PROTOCOL.md §4, I3): send the
//! leader's messages, apply a snapshot, answer read states, apply committed
//! entries, persist entries and hard state (fsync), send the persisted
//! messages, advance, then the light ready's commit index, messages and
//! entries.
//!
//! Proposals are matched to their entries by log index and term, recorded when
//! raft-rs appends them, never by queue position. A leader that steps down
//! fails its waiting proposals as "outcome unknown": the entry may still be
//! applied, so callers retry with the same txn id (I5 makes that safe).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole, Storage as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::command::Proposal;
use crate::config::NodeConfig;
use crate::election_timeout::SeededElectionTimeout;
use crate::error::{Error, Result};
use crate::raft_log::raft_logger;
use crate::state_machine::{Applied, StateMachine};
use crate::storage::{BOOTSTRAP_INDEX, RaftStorage};
use crate::transport::{FaultFilter, PeerFeedback, Transport};

/// A cheap, cloneable way to talk to the raft task.
#[derive(Clone)]
pub struct NodeHandle {
    id: u64,
    requests: mpsc::Sender<Request>,
    state: Arc<RwLock<StateMachine>>,
    applied: watch::Receiver<u64>,
    status: watch::Receiver<NodeStatus>,
    request_timeout: Duration,
}

/// What a node knows about itself and the cluster, refreshed after each Ready.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStatus {
    /// This node's id.
    pub id: u64,
    /// Follower, candidate, pre-candidate or leader.
    pub role: Role,
    /// The current raft term.
    pub term: u64,
    /// The known leader, 0 if none.
    pub leader_id: u64,
    /// The known leader's address, if any.
    pub leader_addr: Option<String>,
    /// True on a leader once an entry of its own term is applied: only then is
    /// its applied state complete enough to re-drive txns (docs/PROTOCOL.md §4).
    pub leader_ready: bool,
    /// Raft's committed index.
    pub raft_committed_index: u64,
    /// The state machine's applied index.
    pub applied_index: u64,
    /// First index still in the log (earlier ones are compacted).
    pub first_log_index: u64,
    /// Last index in the log.
    pub last_log_index: u64,
    /// Raft log writes this node has fsync'd since it started.
    pub log_syncs: u64,
    /// Every member, its address, whether it votes, and (on the leader) its match index.
    pub peers: Vec<PeerInfo>,
}

/// One cluster member as this node sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerInfo {
    /// Raft id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// Voter (true) or learner.
    pub voter: bool,
    /// Replication progress, known only on the leader.
    pub match_index: u64,
}

/// A raft role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Following a leader (or waiting for one).
    #[default]
    Follower,
    /// Campaigning.
    Candidate,
    /// Pre-vote campaigning.
    PreCandidate,
    /// The leader.
    Leader,
}

impl From<StateRole> for Role {
    fn from(role: StateRole) -> Self {
        match role {
            StateRole::Follower => Self::Follower,
            StateRole::Candidate => Self::Candidate,
            StateRole::PreCandidate => Self::PreCandidate,
            StateRole::Leader => Self::Leader,
        }
    }
}

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Add a voter at `addr`.
    AddVoter {
        /// New node's id.
        id: u64,
        /// Its gRPC address.
        addr: String,
    },
    /// Remove a member.
    Remove {
        /// The node's id.
        id: u64,
    },
}

enum Request {
    Propose { data: Vec<u8>, reply: oneshot::Sender<Result<Applied>> },
    ChangeMembership { change: Membership, reply: oneshot::Sender<Result<()>> },
    ReadIndex { reply: oneshot::Sender<Result<u64>> },
    TransferLeader { to: u64, reply: oneshot::Sender<Result<()>> },
}

/// The outcome channel of an appended proposal, matched by (index, term).
enum Waiter {
    Command(oneshot::Sender<Result<Applied>>),
    Membership(oneshot::Sender<Result<()>>),
}

struct Pending {
    term: u64,
    waiter: Waiter,
}

impl Waiter {
    fn fail(self, err: Error) {
        // The caller may have timed out and gone; nobody is left to tell.
        match self {
            Self::Command(tx) => drop(tx.send(Err(err))),
            Self::Membership(tx) => drop(tx.send(Err(err))),
        }
    }
}

impl NodeHandle {
    /// This node's raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Proposes a command and waits until its entry is applied, returning the
    /// state machine's result (read from applied state, I2).
    ///
    /// # Errors
    /// [`Error::NotLeader`] on a follower; [`Error::Retryable`] when leadership
    /// changed before the entry was applied (the outcome is unknown: retry with
    /// the same request); [`Error::Timeout`]; [`Error::Overloaded`].
    pub async fn propose(&self, proposal: &Proposal) -> Result<Applied> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::Propose { data: proposal.encode(), reply }, rx).await
    }

    /// Changes the membership through a raft conf change and waits until it is applied.
    ///
    /// # Errors
    /// As [`NodeHandle::propose`].
    pub async fn change_membership(&self, change: Membership) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::ChangeMembership { change, reply }, rx).await
    }

    /// Asks the leader to hand leadership to `to`; returns once the request is
    /// handed to raft (watch [`NodeHandle::status`] for the outcome).
    ///
    /// # Errors
    /// [`Error::NotLeader`] on a follower; [`Error::InvalidArgument`] for a non-member.
    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.call(Request::TransferLeader { to, reply }, rx).await
    }

    /// Runs `read` on state that reflects every entry committed before this
    /// call started (ReadIndex, `ReadOnlyOption::Safe`; never a lease read).
    /// Works on followers too: raft forwards the read index to the leader.
    ///
    /// # Errors
    /// [`Error::NotLeader`] when no leader is known; [`Error::Timeout`] when the
    /// quorum cannot be reached in time (a node isolated in a minority never
    /// answers from stale state).
    pub async fn linearizable_read<T>(&self, read: impl FnOnce(&StateMachine) -> T) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let index = self.call(Request::ReadIndex { reply }, rx).await?;
        self.wait_applied(index).await?;
        Ok(read(&self.state.read()))
    }

    /// Runs `read` on this node's applied state as it is now (possibly stale).
    pub fn local_read<T>(&self, read: impl FnOnce(&StateMachine) -> T) -> T {
        read(&self.state.read())
    }

    /// Waits until the state machine has applied `index`.
    ///
    /// # Errors
    /// [`Error::Timeout`] after the request timeout; [`Error::Stopped`].
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut applied = self.applied.clone();
        let wait = applied.wait_for(|a| *a >= index);
        match tokio::time::timeout(self.request_timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout(format!("index {index} not applied within {:?}", self.request_timeout))),
        }
    }

    /// The latest status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// Runs `read` on the latest status without copying it (the hot path's
    /// leader check).
    pub fn with_status<T>(&self, read: impl FnOnce(&NodeStatus) -> T) -> T {
        read(&self.status.borrow())
    }

    /// A receiver that changes whenever the status does.
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    async fn call<T>(&self, request: Request, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded("the raft request queue is full".into()),
            mpsc::error::TrySendError::Closed(_) => Error::Stopped,
        })?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout(format!(
                "no answer from the raft group within {:?} (is a majority of coordinators up?)",
                self.request_timeout
            ))),
        }
    }
}

/// A running raft node: its handle, the sender peers' messages go to, and the task.
pub struct StartedNode {
    /// Talk to the node.
    pub handle: NodeHandle,
    /// Where the peer service delivers inbound raft messages.
    pub inbound: mpsc::Sender<Message>,
    /// The raft task; ends after shutdown, or with a fatal error.
    pub task: JoinHandle<Result<()>>,
}

/// Opens (or bootstraps) the node's storage and starts its raft task.
///
/// # Errors
/// Bad config, a storage that cannot be opened, or a corrupt snapshot.
pub fn start(
    config: &NodeConfig,
    faults: FaultFilter,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<StartedNode> {
    config.validate()?;
    let storage = RaftStorage::open(&config.data_dir.join("raft"), &config.storage)?;
    if storage.is_fresh() && !config.join {
        // Every node of a static cluster bootstraps the same state: the voters
        // and their addresses, as of BOOTSTRAP_INDEX.
        let voters: Vec<u64> = config.peers.keys().copied().collect();
        let initial = StateMachine::bootstrap(config.peers.clone(), BOOTSTRAP_INDEX);
        storage.bootstrap(&voters, initial.to_snapshot().into())?;
    }
    let (state_machine, applied) = match storage.latest_snapshot()? {
        Some(snapshot) => {
            let sm = StateMachine::from_snapshot(snapshot.get_data())?;
            let index = snapshot.get_metadata().index;
            (sm, index)
        }
        None => (StateMachine::new(config.peers.clone()), 0),
    };
    let conf_state = storage.initial_state()?.conf_state;
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied,
        max_size_per_msg: config.max_size_per_msg_bytes,
        max_inflight_msgs: config.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        ..raft::Config::default()
    };
    raft_config.validate()?;
    let raw = RawNode::new(&raft_config, storage.clone(), &raft_logger(config.id))?;

    let (feedback_tx, feedback_rx) = mpsc::channel(1024);
    let transport = Transport::with_tls(config.id, config.transport.clone(), faults, feedback_tx, config.tls.clone());
    for (id, addr) in state_machine.members() {
        if *id != config.id {
            transport.set_peer(*id, addr.clone());
        }
    }
    let (requests_tx, requests_rx) = mpsc::channel(config.request_queue_max);
    let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_queue_max);
    let (applied_tx, applied_rx) = watch::channel(applied);
    let (status_tx, status_rx) = watch::channel(NodeStatus { id: config.id, ..NodeStatus::default() });
    let state = Arc::new(RwLock::new(state_machine));
    let handle = NodeHandle {
        id: config.id,
        requests: requests_tx,
        state: state.clone(),
        applied: applied_rx,
        status: status_rx,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
    };
    let mut task = RaftTask {
        id: config.id,
        raw,
        storage,
        transport,
        state,
        conf_state,
        applied_tx,
        status_tx,
        pending: BTreeMap::new(),
        pending_reads: BTreeMap::new(),
        read_contexts: ReadContexts::new(),
        last_snapshot_index: applied,
        was_leader: false,
        leader_ready: false,
        pending_proposals_max: config.pending_proposals_max,
        snapshot_interval_entries: config.snapshot_interval_entries,
        election_timeout: config.election_seed.map(SeededElectionTimeout::new),
    };
    task.reseed_election_timeout();
    let tick = Duration::from_millis(config.tick_interval_ms);
    let ready_loop = async move {
        let result = task.run(tick, requests_rx, inbound_rx, feedback_rx, shutdown).await;
        task.transport.shutdown();
        task.fail_all(|| Error::Stopped);
        if let Err(err) = &result {
            tracing::error!(node_id = task.id, error = %err, "raft task stopped on a fatal error");
        }
        result
    };
    let task = if twopc_proto::host::is_simulated() {
        // One thread runs the whole simulation (twopc_proto::host).
        tokio::spawn(ready_loop)
    } else {
        // The Ready loop fsyncs (I3), so it gets a thread and a runtime of
        // its own: no fsync ever blocks a worker of the runtime serving
        // gRPC. It talks to the rest only through channels, which work
        // across runtimes; the transport spawns its peer senders on the
        // outer runtime.
        let raft_runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        tokio::task::spawn_blocking(move || raft_runtime.block_on(ready_loop))
    };
    Ok(StartedNode { handle, inbound: inbound_tx, task })
}

struct RaftTask {
    id: u64,
    raw: RawNode<RaftStorage>,
    storage: RaftStorage,
    transport: Transport,
    state: Arc<RwLock<StateMachine>>,
    conf_state: ConfState,
    applied_tx: watch::Sender<u64>,
    status_tx: watch::Sender<NodeStatus>,
    /// Appended proposals by log index.
    pending: BTreeMap<u64, Pending>,
    /// ReadIndex requests by their context id.
    pending_reads: BTreeMap<u64, oneshot::Sender<Result<u64>>>,
    read_contexts: ReadContexts,
    last_snapshot_index: u64,
    was_leader: bool,
    leader_ready: bool,
    pending_proposals_max: usize,
    snapshot_interval_entries: u64,
    /// With `NodeConfig::election_seed`: replaces raft-rs's random draws.
    election_timeout: Option<SeededElectionTimeout>,
}

/// ReadIndex request contexts unique to this node incarnation
/// (docs/PROTOCOL.md §4.3): a random incarnation id drawn at start, then a
/// counter. raft-rs's leader drops a read whose context is already pending
/// (another node's, or this node's before a restart) and answers by context,
/// so a context used twice could lose a read or answer it with an old index.
struct ReadContexts {
    incarnation: u64,
    last_id: u64,
}

impl ReadContexts {
    fn new() -> Self {
        // Through the host's seeded randomness, so a deterministic run replays.
        Self { incarnation: twopc_proto::host::with_rng(rand::Rng::random), last_id: 0 }
    }

    /// The next read's id and its context: incarnation then id, little-endian.
    fn next(&mut self) -> (u64, Vec<u8>) {
        self.last_id += 1;
        let mut context = Vec::with_capacity(16);
        context.extend_from_slice(&self.incarnation.to_le_bytes());
        context.extend_from_slice(&self.last_id.to_le_bytes());
        (self.last_id, context)
    }

    /// The id of a read this incarnation asked for; None for any other context.
    fn id_of(&self, context: &[u8]) -> Option<u64> {
        let (incarnation, id) = context.split_at_checked(8)?;
        if u64::from_le_bytes(incarnation.try_into().ok()?) != self.incarnation {
            return None;
        }
        Some(u64::from_le_bytes(id.try_into().ok()?))
    }
}

/// How many queued items one loop turn takes before handling the Ready, so
/// many proposals share one fsync without starving ticks.
const DRAIN_BATCH_MAX: usize = 1024;

/// Ticks between disk purges of the log store.
const PURGE_EVERY_TICKS: u64 = 50;

impl RaftTask {
    async fn run(
        &mut self,
        tick: Duration,
        mut requests: mpsc::Receiver<Request>,
        mut inbound: mpsc::Receiver<Message>,
        mut feedback: mpsc::Receiver<PeerFeedback>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                _ = ticker.tick() => {
                    self.raw.tick();
                    ticks += 1;
                    // A transfer raft-rs gave up on is tried again.
                    self.hand_on_leadership_if_removed();
                    self.forget_abandoned_reads();
                    if ticks.is_multiple_of(PURGE_EVERY_TICKS) {
                        self.storage.purge()?;
                    }
                }
                Some(msg) = inbound.recv() => {
                    self.step(msg);
                    for _ in 0..DRAIN_BATCH_MAX {
                        let Ok(msg) = inbound.try_recv() else { break };
                        self.step(msg);
                    }
                }
                Some(request) = requests.recv() => {
                    self.handle(request);
                    for _ in 0..DRAIN_BATCH_MAX {
                        let Ok(request) = requests.try_recv() else { break };
                        self.handle(request);
                    }
                }
                Some(fb) = feedback.recv() => match fb {
                    PeerFeedback::Unreachable(id) => self.raw.report_unreachable(id),
                    PeerFeedback::SnapshotSent { to, delivered } => {
                        let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                        self.raw.report_snapshot(to, status);
                    }
                },
            }
            if self.raw.has_ready() {
                self.on_ready()?;
            }
            self.reseed_election_timeout();
        }
    }

    /// Before the next tick: a term or role change just reset raft's election
    /// timeout from its thread random generator; a seeded node draws its own.
    fn reseed_election_timeout(&mut self) {
        if let Some(seeded) = self.election_timeout.as_mut() {
            seeded.after_step(&mut self.raw.raft);
        }
    }

    fn step(&mut self, msg: Message) {
        if let Err(err) = self.raw.step(msg) {
            tracing::debug!(node_id = self.id, error = %err, "dropped a raft message");
        }
    }

    fn leader_addr(&self) -> Option<String> {
        let leader = self.raw.raft.leader_id;
        (leader != 0).then(|| self.state.read().members().get(&leader).cloned()).flatten()
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader { leader_addr: self.leader_addr() }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Propose { data, reply } => {
                if let Err(err) = self.check_can_propose() {
                    let _ = reply.send(Err(err));
                    return;
                }
                let result = self.raw.propose(Vec::new(), data);
                self.track(result, Waiter::Command(reply));
            }
            Request::ChangeMembership { change, reply } => {
                if let Err(err) = self.check_can_propose().and_then(|()| self.check_membership_change(&change)) {
                    let _ = reply.send(Err(err));
                    return;
                }
                let (cc, context) = conf_change(&change);
                let result = self.raw.propose_conf_change(context, cc);
                self.track(result, Waiter::Membership(reply));
            }
            Request::ReadIndex { reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let (id, context) = self.read_contexts.next();
                self.pending_reads.insert(id, reply);
                self.raw.read_index(context);
            }
            Request::TransferLeader { to, reply } => {
                let result = if self.raw.raft.state != StateRole::Leader {
                    Err(self.not_leader())
                } else if !self.raw.raft.prs().conf().voters().contains(to) {
                    Err(Error::InvalidArgument(format!("node {to} is not a voting member")))
                } else {
                    self.raw.transfer_leader(to);
                    Ok(())
                };
                let _ = reply.send(result);
            }
        }
    }

    fn check_can_propose(&self) -> Result<()> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if !self.is_voter() {
            // A leader that applied its own removal is handing leadership on
            // (docs/PROTOCOL.md §4.6); raft-rs would drop the proposal, so
            // the caller is sent elsewhere.
            return Err(Error::NotLeader { leader_addr: None });
        }
        if self.pending.len() >= self.pending_proposals_max {
            return Err(Error::Overloaded(format!(
                "{} proposals are waiting to be applied (pending_proposals_max)",
                self.pending.len()
            )));
        }
        Ok(())
    }

    /// Refuses, before anything is logged, a membership change that could
    /// only be rejected at apply time or that would leave the cluster without
    /// a leader (docs/PROTOCOL.md §4.6). Runs on the leader, against the
    /// applied configuration.
    fn check_membership_change(&self, change: &Membership) -> Result<()> {
        if crate::failpoint::fired(crate::failpoint::MEMBERSHIP_SKIP_CHECK, || self.id.to_string()) {
            return Ok(());
        }
        let Membership::Remove { id } = change else {
            return Ok(());
        };
        let (voters, learners) = (&self.conf_state.voters, &self.conf_state.learners);
        if !voters.contains(id) && !learners.contains(id) {
            return Err(Error::NotFound(format!(
                "node {id} is not a member of the cluster (voters: {voters:?}, learners: {learners:?}); nothing to remove"
            )));
        }
        if voters.as_slice() == [*id] {
            return Err(Error::FailedPrecondition(format!(
                "node {id} is the last voter; a cluster with no voter can decide nothing. Add another node first"
            )));
        }
        if *id == self.id {
            return Err(Error::FailedPrecondition(format!(
                "node {id} is the leader; hand leadership to another voter first (twopc cluster transfer-leader \
                 ID), then remove it"
            )));
        }
        Ok(())
    }

    fn is_voter(&self) -> bool {
        self.conf_state.voters.contains(&self.id)
    }

    /// A leader that is no longer a voter (its own removal was applied) asks
    /// the most up-to-date voter to take over, and again whenever a transfer
    /// was given up, until it is a follower (docs/PROTOCOL.md §4.6). raft-rs
    /// 0.7 leaves such a leader leading, dropping every proposal, until
    /// check_quorum deposes it; its heartbeats hold back the others' election
    /// until then.
    fn hand_on_leadership_if_removed(&mut self) {
        if self.raw.raft.state != StateRole::Leader || self.is_voter() || self.raw.raft.lead_transferee.is_some() {
            return;
        }
        let prs = self.raw.raft.prs();
        let target = self.conf_state.voters.iter().copied().max_by_key(|id| prs.get(*id).map_or(0, |p| p.matched));
        if let Some(target) = target {
            tracing::warn!(node_id = self.id, target, "this leader was removed; handing leadership on");
            self.raw.transfer_leader(target);
        }
    }

    /// Records where raft appended a proposal so its result can be routed back.
    fn track(&mut self, proposed: raft::Result<()>, waiter: Waiter) {
        if let Err(err) = proposed {
            waiter.fail(Error::Retryable(format!("raft dropped the proposal: {err}")));
            return;
        }
        let index = self.raw.raft.raft_log.last_index();
        let term = self.raw.raft.term;
        self.pending.insert(index, Pending { term, waiter });
    }

    fn forget_abandoned_reads(&mut self) {
        self.pending_reads.retain(|_, reply| !reply.is_closed());
    }

    fn fail_all(&mut self, err: impl Fn() -> Error) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            pending.waiter.fail(err());
        }
        for (_, reply) in std::mem::take(&mut self.pending_reads) {
            let _ = reply.send(Err(err()));
        }
    }

    /// Handles one Ready in raft-rs's required order (I3).
    fn on_ready(&mut self) -> Result<()> {
        let mut ready = self.raw.ready();
        // 1. A leader may send before persisting (raft-rs's thesis §10.2.1).
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        #[cfg(feature = "failpoints")]
        if self.raw.raft.state == StateRole::Leader
            && ready.entries().iter().any(|e| !e.data.is_empty())
            && crate::failpoint::fired(crate::failpoint::READY_BEFORE_APPLY, || self.id.to_string())
        {
            return Err(Error::Io(std::io::Error::other("failpoint node::ready::before_apply: simulated crash")));
        }
        // 2. A snapshot from the leader replaces the state machine.
        if !ready.snapshot().is_empty() {
            self.apply_snapshot(ready.snapshot().clone())?;
        }
        // 3. Read states: the reader waits until its index is applied.
        for read in ready.take_read_states() {
            let Some(id) = self.read_contexts.id_of(&read.request_ctx) else {
                continue;
            };
            if let Some(reply) = self.pending_reads.remove(&id) {
                let _ = reply.send(Ok(read.index));
            }
        }
        // 4. Apply what raft committed.
        self.apply_entries(ready.take_committed_entries())?;
        // 5. Persist entries and hard state; fsync before any persisted
        //    message (a vote, an append ack) leaves this node (I3). A hard
        //    state whose commit index alone changed is written unsynced
        //    (raft-rs's must_sync), as the light ready's below: its entries
        //    are durable on a quorum, a node that loses it learns it again
        //    from the leader, and a later synced write carries it (§4.2).
        //    Syncing it cost every node an fdatasync per committed entry.
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.storage.append(ready.entries(), ready.hs(), ready.must_sync())?;
        }
        // 6. Messages that promise persisted state.
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let soft_changed = ready.ss().is_some();
        // 7. Advance, then the light ready.
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            // The commit index need not be synced: raft recovers it from a quorum.
            self.storage.set_commit_index(commit, false)?;
        }
        self.transport.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        if soft_changed || self.raw.raft.state != StateRole::Leader && self.was_leader {
            self.on_role_change();
        }
        self.maybe_snapshot()?;
        self.publish_status();
        Ok(())
    }

    fn on_role_change(&mut self) {
        let is_leader = self.raw.raft.state == StateRole::Leader;
        if self.was_leader && !is_leader {
            let hint = self.leader_addr();
            tracing::info!(node_id = self.id, term = self.raw.raft.term, "stepped down; failing waiting proposals");
            self.fail_all(|| Error::NotLeader { leader_addr: hint.clone() });
        }
        if !is_leader {
            self.leader_ready = false;
        }
        self.was_leader = is_leader;
    }

    fn apply_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let index = snapshot.get_metadata().index;
        self.storage.apply_snapshot(&snapshot)?;
        let sm = StateMachine::from_snapshot(snapshot.get_data())?;
        if sm.applied_index() != index {
            return Err(Error::Corrupt(format!(
                "snapshot at index {index} holds state applied to {}",
                sm.applied_index()
            )));
        }
        self.conf_state = snapshot.get_metadata().get_conf_state().clone();
        self.sync_transport_peers(&sm);
        *self.state.write() = sm;
        self.last_snapshot_index = index;
        self.applied_tx.send_replace(index);
        tracing::info!(node_id = self.id, index, "installed a snapshot from the leader");
        Ok(())
    }

    fn sync_transport_peers(&self, sm: &StateMachine) {
        for (id, addr) in sm.members() {
            if *id != self.id && self.transport.peer_addr(*id).as_deref() != Some(addr) {
                self.transport.set_peer(*id, addr.clone());
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        for entry in entries {
            self.apply_entry(entry)?;
        }
        self.applied_tx.send_replace(last);
        Ok(())
    }

    fn apply_entry(&mut self, entry: Entry) -> Result<()> {
        let index = entry.index;
        let term = entry.term;
        if self.raw.raft.state == StateRole::Leader && term == self.raw.raft.term {
            // An entry of our own term is applied: the applied state now holds
            // every decision any earlier leader made (docs/PROTOCOL.md §4).
            self.leader_ready = true;
        }
        let waiter = self.take_waiter(index, term);
        match entry.get_entry_type() {
            EntryType::EntryNormal if entry.data.is_empty() => {
                self.state.write().skip(index);
                if let Some(waiter) = waiter {
                    waiter.fail(Error::Retryable(format!("entry {index} was replaced by a leader's empty entry")));
                }
            }
            EntryType::EntryNormal => {
                let proposal = Proposal::decode(&entry.data)?;
                let applied = self.state.write().apply(index, &proposal);
                match waiter {
                    Some(Waiter::Command(tx)) => drop(tx.send(Ok(applied))),
                    Some(other) => other.fail(Error::Retryable(format!("entry {index} is not a membership change"))),
                    None => {}
                }
            }
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                let cc = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
                    ConfChangeV2::parse_from_bytes(&entry.data)
                } else {
                    raft::prelude::ConfChange::parse_from_bytes(&entry.data).map(|v1| v1_to_v2(&v1))
                }
                .map_err(|e| Error::Corrupt(format!("conf change at {index}: {e}")))?;
                let result = self.apply_conf_change(index, &cc, &entry.context);
                // A rejected change was logged and skipped; only a waiting
                // caller hears of it. Never fatal: every node, and this one at
                // every replay, rejects the same entry alike (§4.6).
                match waiter {
                    Some(Waiter::Membership(tx)) => drop(tx.send(result)),
                    Some(other) => other.fail(Error::Retryable(format!("entry {index} is a membership change"))),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// The waiter for the entry at `index`, if this node proposed it in `term`.
    /// Waiters for earlier indexes that were never applied are failed: their
    /// entries were overwritten by another leader's.
    fn take_waiter(&mut self, index: u64, term: u64) -> Option<Waiter> {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (pending_index, pending) = entry.remove_entry();
            if pending_index == index && pending.term == term {
                return Some(pending.waiter);
            }
            pending.waiter.fail(Error::Retryable(format!(
                "entry {pending_index} of term {} was overwritten; outcome unknown",
                pending.term
            )));
        }
        None
    }

    fn apply_conf_change(&mut self, index: u64, cc: &ConfChangeV2, context: &[u8]) -> Result<()> {
        match self.raw.apply_conf_change(cc) {
            Ok(conf_state) => self.conf_state = conf_state,
            Err(err) => {
                // A rejected change is applied as a no-op on every node alike.
                tracing::warn!(node_id = self.id, index, error = %err, "conf change rejected");
                self.state.write().skip(index);
                return Err(Error::FailedPrecondition(format!("membership change rejected: {err}")));
            }
        }
        let mut sm = self.state.write();
        sm.skip(index);
        for change in cc.get_changes() {
            let id = change.node_id;
            match change.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    let addr = String::from_utf8_lossy(context).into_owned();
                    if id != self.id {
                        self.transport.set_peer(id, addr.clone());
                    }
                    sm.set_member(id, addr);
                }
                ConfChangeType::RemoveNode => {
                    sm.remove_member(id);
                    self.transport.remove_peer(id);
                    if id == self.id {
                        tracing::warn!(node_id = self.id, "this node was removed from the cluster");
                    }
                }
            }
        }
        drop(sm);
        // At once: until then the cluster's leader can log nothing.
        self.hand_on_leadership_if_removed();
        Ok(())
    }

    /// Snapshots the state machine and compacts the log once enough entries
    /// were applied since the last snapshot (bounded disk, I6).
    fn maybe_snapshot(&mut self) -> Result<()> {
        let applied = self.state.read().applied_index();
        if applied < self.last_snapshot_index + self.snapshot_interval_entries {
            return Ok(());
        }
        let data = self.state.read().to_snapshot();
        self.storage.compact(applied, &self.conf_state, data.into())?;
        self.last_snapshot_index = applied;
        tracing::debug!(node_id = self.id, applied, "snapshotted state and compacted the log");
        Ok(())
    }

    /// Updates the published status in place after each Ready: no allocation
    /// unless the membership or the leader's address changed.
    fn publish_status(&self) {
        let raft = &self.raw.raft;
        let is_leader = raft.state == StateRole::Leader;
        let sm = self.state.read();
        let conf = raft.prs().conf();
        let leader_addr = (raft.leader_id != 0).then(|| sm.members().get(&raft.leader_id)).flatten();
        let progress = |id: u64| {
            (conf.voters().contains(id), if is_leader { raft.prs().get(id).map_or(0, |p| p.matched) } else { 0 })
        };
        self.status_tx.send_if_modified(|status| {
            let before = (
                status.role,
                status.term,
                status.leader_id,
                status.leader_ready,
                status.raft_committed_index,
                status.applied_index,
                status.first_log_index,
                status.last_log_index,
            );
            status.id = self.id;
            status.role = raft.state.into();
            status.term = raft.term;
            status.leader_id = raft.leader_id;
            status.leader_ready = is_leader && self.leader_ready;
            status.raft_committed_index = raft.raft_log.committed;
            status.applied_index = sm.applied_index();
            status.first_log_index = raft.raft_log.first_index();
            status.last_log_index = raft.raft_log.last_index();
            status.log_syncs = self.storage.syncs();
            let mut changed = before
                != (
                    status.role,
                    status.term,
                    status.leader_id,
                    status.leader_ready,
                    status.raft_committed_index,
                    status.applied_index,
                    status.first_log_index,
                    status.last_log_index,
                );
            if status.leader_addr.as_ref() != leader_addr {
                status.leader_addr = leader_addr.cloned();
                changed = true;
            }
            let same_members = status.peers.len() == sm.members().len()
                && status.peers.iter().zip(sm.members()).all(|(p, (id, addr))| p.id == *id && p.addr == *addr);
            if same_members {
                for peer in &mut status.peers {
                    let now = progress(peer.id);
                    if (peer.voter, peer.match_index) != now {
                        (peer.voter, peer.match_index) = now;
                        changed = true;
                    }
                }
            } else {
                status.peers = sm
                    .members()
                    .iter()
                    .map(|(id, addr)| {
                        let (voter, match_index) = progress(*id);
                        PeerInfo { id: *id, addr: addr.clone(), voter, match_index }
                    })
                    .collect();
                changed = true;
            }
            changed
        });
    }
}

/// A v1 conf change as the equivalent single-step v2 one.
fn v1_to_v2(v1: &raft::prelude::ConfChange) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(v1.get_change_type());
    single.node_id = v1.node_id;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single].into());
    cc
}

fn conf_change(change: &Membership) -> (ConfChangeV2, Vec<u8>) {
    let mut single = ConfChangeSingle::default();
    let context = match change {
        Membership::AddVoter { id, addr } => {
            single.set_change_type(ConfChangeType::AddNode);
            single.node_id = *id;
            addr.clone().into_bytes()
        }
        Membership::Remove { id } => {
            single.set_change_type(ConfChangeType::RemoveNode);
            single.node_id = *id;
            Vec::new()
        }
    };
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![single].into());
    (cc, context)
}

#[cfg(test)]
mod tests {
    use raft::prelude::MessageType;
    use raft::storage::MemStorage;

    use super::*;

    /// A leader of voters 1, 2, 3 that has committed an entry of its term, so
    /// it serves ReadIndex requests.
    fn ready_leader() -> raft::Raft<MemStorage> {
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let config = raft::Config { id: 1, read_only_option: ReadOnlyOption::Safe, ..raft::Config::default() };
        let mut raft = raft::Raft::new(&config, storage, &raft_logger(1)).expect("a valid raft");
        raft.become_candidate();
        raft.become_leader();
        let last = raft.raft_log.last_index();
        raft.raft_log.commit_to(last);
        raft.msgs.clear();
        raft
    }

    fn read_index_from(from: u64, term: u64, context: Vec<u8>) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgReadIndex);
        m.from = from;
        m.to = 1;
        m.term = term;
        m.set_entries(vec![Entry { data: context.into(), ..Entry::default() }].into());
        m
    }

    fn heartbeat_ack(from: u64, term: u64, context: Vec<u8>) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeatResponse);
        m.from = from;
        m.to = 1;
        m.term = term;
        m.context = context.into();
        m
    }

    #[test]
    fn the_first_reads_of_two_nodes_are_both_answered_by_the_leader() {
        // §4.3: raft-rs's leader drops a read whose context is already
        // pending. Two nodes' (or one node's two incarnations') first reads
        // must not share a context, or one of them is never answered.
        let mut leader = ready_leader();
        let term = leader.term;
        let (_, from_2) = ReadContexts::new().next();
        let (_, from_3) = ReadContexts::new().next();
        leader.step(read_index_from(2, term, from_2.clone())).expect("stepped");
        leader.step(read_index_from(3, term, from_3.clone())).expect("stepped");
        // Node 2 confirms the leader's heartbeats carrying each context.
        leader.step(heartbeat_ack(2, term, from_2)).expect("stepped");
        leader.step(heartbeat_ack(2, term, from_3)).expect("stepped");
        let answered: Vec<u64> =
            leader.msgs.iter().filter(|m| m.get_msg_type() == MessageType::MsgReadIndexResp).map(|m| m.to).collect();
        assert_eq!(answered, vec![2, 3], "each node's read is answered");
    }

    #[test]
    fn a_read_answer_meant_for_an_earlier_incarnation_is_ignored() {
        // §4.3: an answer to a read made before a restart must not complete a
        // read made after it (its index may be older than the new read).
        let mut before_restart = ReadContexts::new();
        let (id, old_context) = before_restart.next();
        assert_eq!(before_restart.id_of(&old_context), Some(id));
        let mut after_restart = ReadContexts::new();
        let (new_id, new_context) = after_restart.next();
        assert_eq!(new_id, id, "the counter starts afresh");
        assert_eq!(after_restart.id_of(&old_context), None);
        assert_eq!(after_restart.id_of(&new_context), Some(new_id));
        assert_eq!(after_restart.id_of(&new_id.to_le_bytes()), None, "a short context is nobody's");
    }
}
