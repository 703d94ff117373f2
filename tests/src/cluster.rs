//! An in-process coordinator cluster: every node a real tonic server on its
//! own 127.0.0.1 ephemeral port, with its own data dir, sharing one fault
//! filter so tests can cut links.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use tempfile::TempDir;
use twopc_client::{ClientConfig, ClusterClient};
use twopc_coordinator::config::NodeConfig;
use twopc_coordinator::lossy_disk::{CrashReport, LossyDisk};
use twopc_coordinator::node::{NodeHandle, Role};
use twopc_coordinator::server::{self, RunningNode};
use twopc_coordinator::state_machine::StateMachine;
use twopc_coordinator::storage::TestDisk;
use twopc_coordinator::transport::FaultFilter;
use twopc_proto::net::{self, Listener};

use crate::gate::Gate;
use crate::wait;

/// Any free port on the loopback interface.
pub const LOOPBACK_ANY_PORT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// How long tests wait for an election or for replication to settle.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Changes a node's config before it starts.
pub type Tweak = Box<dyn Fn(&mut NodeConfig) + Send + Sync>;

/// A cluster of coordinator nodes in this process.
pub struct Cluster {
    /// Shared by every node's transport: cut, delay or heal links here.
    pub faults: FaultFilter,
    /// Shared by every node's participant client: hold or fail 2PC calls here.
    pub gate: Gate,
    root: TempDir,
    addrs: BTreeMap<u64, SocketAddr>,
    running: BTreeMap<u64, RunningNode>,
    /// Each node's disk for its raft log, which [`Cluster::crash`] takes
    /// unsynced writes back from.
    disks: BTreeMap<u64, std::sync::Arc<LossyDisk>>,
    /// Nodes added after bootstrap (started with `join`).
    joining: Vec<u64>,
    tweak: Tweak,
}

impl Cluster {
    /// Starts `size` nodes with test timings.
    ///
    /// # Errors
    /// A port or a node that cannot start.
    pub async fn start(size: u64) -> anyhow::Result<Self> {
        Self::start_with(size, Box::new(|_| {})).await
    }

    /// Starts `size` nodes, each config passed through `tweak` first.
    ///
    /// # Errors
    /// A port or a node that cannot start.
    pub async fn start_with(size: u64, tweak: Tweak) -> anyhow::Result<Self> {
        let mut listeners = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=size {
            let listener = net::bind(LOOPBACK_ANY_PORT).await?;
            addrs.insert(id, listener.local_addr()?);
            listeners.insert(id, listener);
        }
        let mut cluster = Self {
            faults: FaultFilter::default(),
            gate: Gate::default(),
            root: tempfile::tempdir()?,
            disks: addrs.keys().map(|id| (*id, LossyDisk::new())).collect(),
            addrs,
            running: BTreeMap::new(),
            joining: Vec::new(),
            tweak,
        };
        for (id, listener) in listeners {
            cluster.spawn(id, listener)?;
        }
        Ok(cluster)
    }

    /// The config node `id` runs with.
    pub fn config(&self, id: u64) -> NodeConfig {
        let peers = self.addrs.iter().map(|(id, addr)| (*id, addr.to_string())).collect();
        let mut config = NodeConfig::new(id, peers, self.root.path().join(format!("node-{id}")));
        config.join = self.joining.contains(&id);
        config.tick_interval_ms = 30;
        config.election_ticks = 10;
        config.heartbeat_ticks = 2;
        config.request_timeout_ms = 3_000;
        config.storage.disk = self.disks.get(&id).cloned().map(TestDisk);
        (self.tweak)(&mut config);
        config
    }

    fn spawn(&mut self, id: u64, listener: Listener) -> anyhow::Result<()> {
        let config = self.config(id);
        let client = self
            .gate
            .client_with_tls(Duration::from_millis(config.engine.participant_connect_timeout_ms), config.tls.clone());
        let node = server::spawn_with_client(listener, &config, self.faults.clone(), client)
            .with_context(|| format!("starting node {id}"))?;
        self.running.insert(id, node);
        Ok(())
    }

    /// The handle of running node `id`.
    ///
    /// # Panics
    /// If the node is not running: a bug in the test.
    pub fn node(&self, id: u64) -> &NodeHandle {
        &self.running.get(&id).unwrap_or_else(|| panic!("node {id} is not running")).handle
    }

    /// Node `id`'s metrics in the Prometheus text format, if it is running.
    pub fn metrics(&self, id: u64) -> Option<String> {
        self.running.get(&id).map(|node| (node.metrics)())
    }

    /// Counter (or unlabelled gauge) `name` in node `id`'s metrics.
    ///
    /// # Errors
    /// The node is not running, or does not report `name`.
    pub fn counter(&self, id: u64, name: &str) -> anyhow::Result<u64> {
        let text = self.metrics(id).ok_or_else(|| anyhow::anyhow!("node {id} is not running"))?;
        crate::metric(&text, name).ok_or_else(|| anyhow::anyhow!("no {name} in node {id}'s metrics"))
    }

    /// Ids of the running nodes.
    pub fn running(&self) -> Vec<u64> {
        self.running.keys().copied().collect()
    }

    /// Node `id`'s gRPC address.
    pub fn addr(&self, id: u64) -> String {
        self.addrs[&id].to_string()
    }

    /// Every node's address, for clients.
    pub fn addrs(&self) -> Vec<String> {
        self.addrs.values().map(ToString::to_string).collect()
    }

    /// Node `id`'s data dir.
    pub fn data_dir(&self, id: u64) -> std::path::PathBuf {
        self.config(id).data_dir
    }

    /// Stops node `id` abruptly: its server and raft task end, in-memory
    /// state is lost, and only what it persisted survives.
    ///
    /// # Errors
    /// The node's raft task had failed.
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.running.remove(&id).with_context(|| format!("node {id} is not running"))?;
        node.stop().await.with_context(|| format!("stopping node {id}"))
    }

    /// Crashes node `id` as a power cut would: it is cut off from its peers
    /// first (so it cannot act on what it is about to lose), every write its
    /// raft log had not synced is taken back, then it stops. Only what it
    /// synced survives; its snapshot files, written with fsync, survive too.
    /// A raft task that failed on the lost disk is part of the crash.
    ///
    /// # Errors
    /// The node is not running, or its disk could not be put back.
    pub async fn crash(&mut self, id: u64) -> anyhow::Result<CrashReport> {
        anyhow::ensure!(self.running.contains_key(&id), "node {id} is not running");
        self.faults.set_down(id, true);
        let report = self.disks[&id].crash().with_context(|| format!("crashing node {id}'s disk"))?;
        if let Err(err) = self.kill(id).await {
            tracing::debug!(node = id, error = %err, "a crashed node's raft task failed");
        }
        Ok(report)
    }

    /// Starts a new node `id` that joins the running cluster (it does not
    /// bootstrap; the cluster must add it with a membership change).
    ///
    /// # Errors
    /// A port that cannot be bound or a node that cannot start.
    pub async fn start_joining(&mut self, id: u64) -> anyhow::Result<String> {
        let listener = net::bind(LOOPBACK_ANY_PORT).await?;
        let addr = listener.local_addr()?;
        self.addrs.insert(id, addr);
        self.disks.insert(id, LossyDisk::new());
        self.joining.push(id);
        self.spawn(id, listener)?;
        Ok(addr.to_string())
    }

    /// Restarts node `id` from its data dir on its old address.
    ///
    /// # Errors
    /// The port cannot be bound again or the node cannot start.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let listener = net::bind(self.addrs[&id]).await.with_context(|| format!("rebinding node {id}"))?;
        self.spawn(id, listener)?;
        self.faults.set_down(id, false);
        Ok(())
    }

    /// Waits until the running nodes agree on one ready leader (an entry of
    /// its term applied) and returns its id.
    ///
    /// # Errors
    /// No agreement within [`SETTLE_TIMEOUT`].
    pub async fn wait_for_leader(&self) -> anyhow::Result<u64> {
        wait::until("a ready leader all running nodes agree on", SETTLE_TIMEOUT, || async {
            let statuses: Vec<_> = self.running.values().map(|n| n.handle.status()).collect();
            let leader = statuses.iter().find(|s| s.role == Role::Leader && s.leader_ready)?;
            statuses.iter().all(|s| s.leader_id == leader.id && s.term == leader.term).then_some(leader.id)
        })
        .await
    }

    /// Waits until every running node has applied at least `index`.
    ///
    /// # Errors
    /// Not reached within [`SETTLE_TIMEOUT`].
    pub async fn wait_applied(&self, index: u64) -> anyhow::Result<()> {
        wait::until(&format!("every running node to apply index {index}"), SETTLE_TIMEOUT, || async {
            self.running.values().all(|n| n.handle.status().applied_index >= index).then_some(())
        })
        .await
    }

    /// A copy of every running node's applied state.
    pub fn states(&self) -> BTreeMap<u64, StateMachine> {
        self.running.iter().map(|(id, n)| (*id, n.handle.local_read(Clone::clone))).collect()
    }

    /// A leader-following client of this cluster.
    ///
    /// # Errors
    /// Never in practice (the addresses are valid).
    pub fn client(&self) -> anyhow::Result<ClusterClient> {
        Ok(ClusterClient::new(self.addrs(), ClientConfig::default())?)
    }

    /// Registers a participant's address with the cluster.
    ///
    /// # Errors
    /// The cluster refused or could not be reached.
    pub async fn register(&self, name: &str, addr: SocketAddr) -> anyhow::Result<()> {
        let client = self.client()?;
        let request = twopc_proto::pb::RegisterParticipantRequest { name: name.to_owned(), addr: addr.to_string() };
        client
            .admin(|mut c| {
                let request = request.clone();
                async move { c.register_participant(request).await }
            })
            .await?;
        Ok(())
    }

    /// Stops every node.
    ///
    /// # Errors
    /// A node's raft task had failed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for id in self.running() {
            self.kill(id).await?;
        }
        Ok(())
    }
}
