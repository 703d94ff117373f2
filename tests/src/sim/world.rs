//! A whole twopc system in this process: a coordinator [`Cluster`], real
//! banks ([`SimBank`]) with accounts, and a client that records what it was
//! told about every transfer, one-shot or interactive
//! ([`super::interactive`]). After faults it heals everything, waits for the
//! system to settle, and hands the final state to the checker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::time::Instant;
use twopc_bank::{AccountStore as _, Transfer};
use twopc_client::{ClientConfig, ClusterClient};
use twopc_coordinator::config::{CommitProtocol, EngineConfig};
use twopc_coordinator::lossy_disk::CrashReport;
use twopc_coordinator::node::Role;
use twopc_participant::ParticipantConfig;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Clock, Decision, TxnId, pb};

use tonic::transport::{Channel, Endpoint};
use twopc_proto::pb::bank_client::BankClient;

use crate::checker::{
    self, AccountRef, BankTotals, ClientOutcome, ClientTxn, Hearer, InteractiveTxn, Liveness, Movement, Observation,
    ParticipantView, Resubmit, Told,
};
use crate::cluster::Cluster;
use crate::sim::bank::{BankDisk, SimBank};

/// The shape and timings of a world.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// Coordinator nodes (3 or 5).
    pub coordinators: u64,
    /// Banks, named bank-a, bank-b, ...
    pub banks: usize,
    /// Accounts per bank, named acct-0, acct-1, ...
    pub accounts_per_bank: usize,
    /// Each account's opening balance, in minor units.
    pub opening_minor: i64,
    /// Raft tick.
    pub tick_interval_ms: u64,
    /// The banks' in-doubt timeout.
    pub in_doubt_timeout_ms: u64,
    /// The banks' resolve backoff cap.
    pub resolve_backoff_max_ms: u64,
    /// How long a client keeps retrying one Submit before calling its outcome unknown.
    pub client_retry_budget_ms: u64,
    /// I7's bound: how long the system may take to settle after the last heal.
    pub settle_bound: Duration,
    /// Seeds every coordinator's election timeouts (node `id` gets
    /// `election_seed ^ id`), so the same seed replays the same elections.
    pub election_seed: u64,
    /// How long coordinators keep finished txns (`EngineConfig::retention_ms`).
    /// A run lasts seconds, so only a much shorter retention than the
    /// default 60 s forgets txns in the middle of one (or a clock jump past
    /// it); the deadlines a Submit may carry shrink with it.
    pub retention_ms: u64,
    /// A broken protocol, to show the checker bites: every bank's store
    /// skips its fsync, so it votes YES and acknowledges decisions before
    /// anything is durable (against I3), and a crash takes back what it said.
    pub banks_skip_fsync: bool,
    /// How the coordinators commit one-shot txns (docs/PROTOCOL.md §5, §13).
    /// Default: the engine's default, parallel.
    pub commit_protocol: CommitProtocol,
    /// How often a leader scans begun and staged txns (the engine's
    /// `begun_scan_interval_ms`). Default: the engine's, 100 ms; a test
    /// that must act on a staged txn before status recovery does slows it.
    pub begun_scan_interval_ms: u64,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            coordinators: 3,
            banks: 2,
            accounts_per_bank: 3,
            opening_minor: 500,
            tick_interval_ms: 20,
            in_doubt_timeout_ms: 300,
            resolve_backoff_max_ms: 300,
            client_retry_budget_ms: 1_500,
            settle_bound: Duration::from_secs(20),
            election_seed: 0,
            retention_ms: EngineConfig::default().retention_ms,
            banks_skip_fsync: false,
            commit_protocol: CommitProtocol::default(),
            begun_scan_interval_ms: twopc_coordinator::config::EngineConfig::default().begun_scan_interval_ms,
        }
    }
}

/// A running world.
pub struct World {
    /// The coordinators, with their shared fault filter and participant gate.
    pub cluster: Cluster,
    /// The banks, in name order.
    pub banks: Vec<SimBank>,
    /// The client side: submits transfers and remembers what it was told.
    pub teller: Arc<Teller>,
    config: WorldConfig,
    openings: BTreeMap<AccountRef, i64>,
    down: BTreeSet<u64>,
    leaders: Mutex<BTreeMap<u64, BTreeSet<u64>>>,
    /// Each coordinator's wall clock, which clock-jump faults step.
    clocks: BTreeMap<u64, Clock>,
    /// The furthest any coordinator's clock has run ahead in this run: a
    /// leader then stamped Begin deadlines that much later (§12.1).
    clock_ahead_max_ms: u64,
    /// Membership changes the cluster had to refuse and applied instead.
    membership_accepted: Vec<String>,
    _dir: TempDir,
}

/// What [`World::heal_and_check`] found.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// How long the system took to settle after the heal; None if it did not within the bound.
    pub settled_after: Option<Duration>,
    /// Everything the checker found.
    pub violations: Vec<checker::Violation>,
}

/// The client side of a world: a leader-following client of the cluster,
/// and what it was told about every txn it submitted. Shared by the
/// workload's client tasks.
pub struct Teller {
    client: ClusterClient,
    /// How far ahead of now each Submit's deadline is.
    deadline_ms: u64,
    /// The coordinators' `deadline_max_ms`: the longest Begin timeout.
    deadline_max_ms: u64,
    history: Mutex<Vec<ClientTxn>>,
    /// Txns whose Submit is under way, or begun and not yet committed or
    /// rolled back by their client, with the movement each asks for.
    running: Mutex<BTreeMap<TxnId, Movement>>,
    /// The one-shot txns among `running`: their Submit is under way.
    submitting: Mutex<BTreeSet<TxnId>>,
    /// Decisions told to others than a txn's client (operator, Resolves, retries).
    told: Mutex<Vec<Told>>,
    /// Submits of running txns' ids with other amounts.
    resubmits: Mutex<Vec<Resubmit>>,
    /// The interactive txns of the history, with the branches seen to join.
    interactive: Mutex<BTreeMap<TxnId, InteractiveTxn>>,
    /// Calls answered otherwise than documented, for the checker.
    misanswered: Mutex<Vec<String>>,
    /// Each bank's own API (`Debit`, `Credit`, `Total`), by name; dialled
    /// through `twopc_proto::net`, so a deterministic run's network carries it.
    banks: BTreeMap<String, Channel>,
    /// The coordinators' wall clocks, which clock-jump faults step.
    clocks: Vec<Clock>,
    /// The banks' wall clocks, which clock-jump faults step too.
    bank_clocks: Vec<Clock>,
}

impl Teller {
    /// Moves `amount_minor` from one account to another as a new txn, and
    /// records what the client was told.
    pub async fn transfer(&self, from: &AccountRef, to: &AccountRef, amount_minor: i64) -> (TxnId, ClientOutcome) {
        let txn_id = TxnId::new();
        (txn_id, self.transfer_as(txn_id, from, to, amount_minor).await)
    }

    /// [`World::transfer`] with a chosen txn id (a retry, or one a failpoint names).
    ///
    /// # Panics
    /// On a transfer the bank refuses to build (same account, amount not
    /// positive, bad names): a bug in the test.
    pub async fn transfer_as(
        &self,
        txn_id: TxnId,
        from: &AccountRef,
        to: &AccountRef,
        amount_minor: i64,
    ) -> ClientOutcome {
        self.submit(txn_id, from, to, amount_minor, false).await.unwrap_or(ClientOutcome::Unknown)
    }

    /// [`Teller::transfer_as`] for a Submit that must be refused (an id from
    /// the far future): a refusal (`INVALID_ARGUMENT`) is returned and not
    /// recorded, since nothing ran; any other answer is recorded as usual.
    ///
    /// # Errors
    /// The refusal.
    pub async fn transfer_refused(
        &self,
        txn_id: TxnId,
        from: &AccountRef,
        to: &AccountRef,
        amount_minor: i64,
    ) -> Result<ClientOutcome, tonic::Status> {
        self.submit(txn_id, from, to, amount_minor, true).await
    }

    async fn submit(
        &self,
        txn_id: TxnId,
        from: &AccountRef,
        to: &AccountRef,
        amount_minor: i64,
        refusal_expected: bool,
    ) -> Result<ClientOutcome, tonic::Status> {
        let address = |a: &AccountRef| format!("{}@{}", a.account, a.bank).parse().expect("a valid account address");
        let transfer = Transfer::new(address(from), address(to), amount_minor).expect("a valid transfer");
        let participants: Vec<String> = transfer.branches().iter().map(|(bank, _)| bank.to_string()).collect();
        let request = pb::SubmitRequest {
            txn_id: txn_id.to_string(),
            branches: transfer.submit_branches(),
            deadline_unix_ms: unix_now_ms() + self.deadline_ms,
        };
        self.running.lock().insert(txn_id, Movement { from: from.clone(), to: to.clone(), amount_minor });
        self.submitting.lock().insert(txn_id);
        let answer = self
            .client
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.submit(request).await }
            })
            .await;
        self.running.lock().remove(&txn_id);
        self.submitting.lock().remove(&txn_id);
        let outcome = match answer {
            Ok(r) if r.decision == pb::Decision::Commit as i32 => ClientOutcome::Committed,
            Ok(r) if r.decision == pb::Decision::Abort as i32 => ClientOutcome::Aborted,
            Err(refused) if refusal_expected && refused.code() == tonic::Code::InvalidArgument => return Err(refused),
            Ok(_) | Err(_) => ClientOutcome::Unknown,
        };
        let movement = Movement { from: from.clone(), to: to.clone(), amount_minor };
        let mut history = self.history.lock();
        // A retried txn keeps one entry: the latest thing its client was told.
        history.retain(|t| t.txn_id != txn_id || outcome == ClientOutcome::Unknown);
        if !history.iter().any(|t| t.txn_id == txn_id) {
            history.push(ClientTxn { txn_id, participants, movement: Some(movement), outcome });
        }
        Ok(outcome)
    }

    /// What the client was told so far.
    pub fn history(&self) -> Vec<ClientTxn> {
        self.history.lock().clone()
    }

    /// Txns whose Submit is under way, with their movements.
    pub fn running(&self) -> Vec<(TxnId, Movement)> {
        self.running.lock().iter().map(|(id, m)| (*id, m.clone())).collect()
    }

    /// The one-shot txns among [`Teller::running`]: their Submit is under way.
    pub fn submitting(&self) -> Vec<(TxnId, Movement)> {
        let submitting = self.submitting.lock().clone();
        self.running().into_iter().filter(|(id, _)| submitting.contains(id)).collect()
    }

    /// Notes that `hearer` was told `decision` for `txn_id`.
    pub fn heard(&self, txn_id: TxnId, hearer: Hearer, decision: Decision) {
        self.told.lock().push(Told { txn_id, hearer, decision });
    }

    /// What others than the txns' clients were told so far.
    pub fn told(&self) -> Vec<Told> {
        self.told.lock().clone()
    }

    /// Notes a Submit of `resubmit.txn_id` with another amount, and what it
    /// was told; a Commit is also a decision told ([`Teller::heard`]).
    pub fn resubmitted(&self, resubmit: Resubmit) {
        if let Some(decision) = resubmit.told {
            self.heard(resubmit.txn_id, Hearer::Retrier, decision);
        }
        self.resubmits.lock().push(resubmit);
    }

    /// How far ahead of now a Submit's deadline is set.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The leader-following client the transfers go through.
    pub fn client(&self) -> &ClusterClient {
        &self.client
    }

    /// The coordinators' `deadline_max_ms`: the longest timeout a Begin may ask for.
    pub fn deadline_max_ms(&self) -> u64 {
        self.deadline_max_ms
    }

    /// A client of bank `name`'s own API, if there is such a bank.
    pub fn bank(&self, name: &str) -> Option<BankClient<Channel>> {
        self.banks.get(name).map(|channel| BankClient::new(channel.clone()))
    }

    /// A client of bank `name`'s participant API (Prepare, Decide,
    /// RecoverVote), which it serves on the same port, if there is such a bank.
    pub fn bank_participant(
        &self,
        name: &str,
    ) -> Option<twopc_proto::pb::participant_client::ParticipantClient<Channel>> {
        self.banks.get(name).map(|channel| twopc_proto::pb::participant_client::ParticipantClient::new(channel.clone()))
    }

    /// The banks' names.
    pub fn bank_names(&self) -> Vec<String> {
        self.banks.keys().cloned().collect()
    }

    /// Notes that a txn is under way (adversaries pick running txns from these).
    pub fn start_running(&self, txn_id: TxnId, movement: Movement) {
        self.running.lock().insert(txn_id, movement);
    }

    /// Notes that a txn's client is done with it.
    pub fn stop_running(&self, txn_id: TxnId) {
        self.running.lock().remove(&txn_id);
    }

    /// Records what the client of an interactive txn was told, and which of
    /// its branches joined; a txn recorded again keeps the latest.
    pub fn record_interactive(&self, txn: ClientTxn, interactive: InteractiveTxn) {
        let mut history = self.history.lock();
        history.retain(|t| t.txn_id != txn.txn_id);
        self.interactive.lock().insert(txn.txn_id, interactive);
        history.push(txn);
    }

    /// The interactive txns of the history, by id.
    pub fn interactive(&self) -> BTreeMap<TxnId, InteractiveTxn> {
        self.interactive.lock().clone()
    }

    /// Notes a call answered otherwise than documented (docs/PROTOCOL.md §12).
    pub fn misanswered(&self, what: String) {
        self.misanswered.lock().push(what);
    }

    /// The calls answered otherwise than documented so far.
    pub fn misanswers(&self) -> Vec<String> {
        self.misanswered.lock().clone()
    }

    /// Whether some coordinator's clock is off by more than
    /// [`CLOCK_OFF_MS`]: its leader may then take a fresh txn id for one
    /// from the future (`INVALID_ARGUMENT`), or from before its retention
    /// horizon (forgotten), or a deadline for past.
    pub fn clocks_off(&self) -> bool {
        self.clocks.iter().any(|c| c.offset_ms().unsigned_abs() > CLOCK_OFF_MS)
    }

    /// Whether some bank may refuse to join `txn_id` as created in the
    /// future (`INVALID_ARGUMENT`, nothing staged, docs/PROTOCOL.md §12.3):
    /// its clock stepped back, or a coordinator whose clock ran ahead picked
    /// the id, puts the id more than the banks' `txn_id_future_skew_ms`
    /// ahead of the bank's clock.
    pub fn ahead_of_a_bank(&self, txn_id: TxnId) -> bool {
        let created = txn_id.created_unix_ms().saturating_add(ANSWER_SLACK_MS);
        self.bank_clocks.iter().any(|clock| created > clock.unix_now_ms().saturating_add(BANK_FUTURE_SKEW_MS))
    }
}

/// How late past its deadline a leader's timeout scan may log a begun txn's
/// Abort (scans every 100 ms by default; a leader change delays it).
const BEGUN_SCAN_SLACK_MS: u64 = 1_000;

/// The banks' `txn_id_future_skew_ms` (the participant library's default).
const BANK_FUTURE_SKEW_MS: u64 = 60_000;

/// How much virtual time may pass between a bank's check of an id and its
/// caller seeing the answer (call chaos delays, a slow store).
const ANSWER_SLACK_MS: u64 = 5_000;

/// How far a coordinator's clock may be off before a fresh txn id or a
/// deadline may be judged otherwise than by the clients' clock
/// ([`Teller::clocks_off`]).
pub const CLOCK_OFF_MS: u64 = 1_000;

/// How far ahead of now the clients set a Submit's deadline, at most.
const CLIENT_DEADLINE_MS: u64 = 3_000;

/// How many times a settled bank's `Total` is asked before it counts as not answering.
const TOTAL_ATTEMPTS: usize = 5;
/// How long one `Total` call may take.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(2);

/// The furthest deadline coordinators accept with retention `retention_ms`
/// (which must exceed it): the default, or less for a short retention.
fn deadline_max_ms(retention_ms: u64) -> u64 {
    EngineConfig::default().deadline_max_ms.min(retention_ms.saturating_sub(retention_ms / 10))
}

/// The name of bank `index`: bank-a, bank-b, ...
pub fn bank_name(index: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(index % 26).unwrap_or(0));
    format!("bank-{letter}")
}

impl World {
    /// Starts the coordinators, waits for a leader, starts and registers the banks.
    ///
    /// # Errors
    /// Anything that fails to start.
    pub async fn start(config: WorldConfig) -> anyhow::Result<Self> {
        let tick = config.tick_interval_ms;
        let election_seed = config.election_seed;
        let retention_ms = config.retention_ms;
        let commit_protocol = config.commit_protocol;
        let begun_scan_interval_ms = config.begun_scan_interval_ms;
        let deadline_max_ms = deadline_max_ms(retention_ms);
        let clocks: BTreeMap<u64, Clock> = (1..=config.coordinators).map(|id| (id, Clock::system())).collect();
        let node_clocks = clocks.clone();
        let cluster = Cluster::start_with(
            config.coordinators,
            Box::new(move |c| {
                c.tick_interval_ms = tick;
                c.election_seed = Some(election_seed ^ c.id);
                // A restarted node keeps its (possibly jumped) clock.
                c.engine.clock = node_clocks.get(&c.id).cloned().unwrap_or_default();
                c.election_ticks = 10;
                c.heartbeat_ticks = 2;
                c.request_timeout_ms = 1_500;
                c.engine.prepare_timeout_ms = 500;
                c.engine.decide_timeout_ms = 1_000;
                c.engine.delivery_backoff_min_ms = 10;
                c.engine.delivery_backoff_max_ms = 300;
                c.engine.participant_connect_timeout_ms = 300;
                c.engine.retention_ms = retention_ms;
                c.engine.deadline_max_ms = deadline_max_ms;
                c.engine.gc_interval_ms = c.engine.gc_interval_ms.min(retention_ms / 10).max(1);
                c.engine.commit_protocol = commit_protocol;
                c.engine.begun_scan_interval_ms = begun_scan_interval_ms;
            }),
        )
        .await?;
        cluster.wait_for_leader().await?;
        let dir = tempfile::tempdir()?;
        let accounts: Vec<String> = (0..config.accounts_per_bank).map(|i| format!("acct-{i}")).collect();
        let mut banks = Vec::new();
        let mut openings = BTreeMap::new();
        for index in 0..config.banks {
            let name = bank_name(index);
            let mut participant = ParticipantConfig::new(name.parse()?, cluster.addrs());
            participant.in_doubt_timeout_ms = config.in_doubt_timeout_ms;
            participant.resolve_backoff_min_ms = 20;
            participant.resolve_backoff_max_ms = config.resolve_backoff_max_ms;
            participant.resolve_timeout_ms = 1_000;
            participant.connect_timeout_ms = 300;
            let disk = if config.banks_skip_fsync { BankDisk::SkipsFsync } else { BankDisk::Lossy };
            let bank = SimBank::start(&name, dir.path(), disk, &accounts, config.opening_minor, participant).await?;
            cluster.register(&name, bank.addr).await?;
            for account in &accounts {
                openings.insert(AccountRef { bank: name.clone(), account: account.clone() }, config.opening_minor);
            }
            banks.push(bank);
        }
        let client_config = ClientConfig {
            retry_budget_ms: config.client_retry_budget_ms,
            attempt_timeout_ms: 2_000,
            connect_timeout_ms: 300,
            backoff_min_ms: 10,
            backoff_max_ms: 200,
            tls: None,
        };
        let client = ClusterClient::new(cluster.addrs(), client_config)?;
        let bank_clocks = banks.iter().map(|bank| bank.clock().clone()).collect();
        let mut bank_channels = BTreeMap::new();
        for bank in &banks {
            let endpoint = Endpoint::from_shared(format!("http://{}", bank.addr))?
                .connect_timeout(Duration::from_millis(300))
                .tcp_nodelay(true);
            bank_channels.insert(bank.name.clone(), twopc_proto::net::lazy_channel(&endpoint));
        }
        Ok(Self {
            cluster,
            banks,
            config,
            openings,
            teller: Arc::new(Teller {
                client,
                deadline_ms: CLIENT_DEADLINE_MS.min(deadline_max_ms / 2),
                deadline_max_ms,
                history: Mutex::default(),
                running: Mutex::default(),
                submitting: Mutex::default(),
                told: Mutex::default(),
                resubmits: Mutex::default(),
                interactive: Mutex::default(),
                misanswered: Mutex::default(),
                banks: bank_channels,
                clocks: clocks.values().cloned().collect(),
                bank_clocks,
            }),
            clocks,
            clock_ahead_max_ms: 0,
            membership_accepted: Vec::new(),
            down: BTreeSet::new(),
            leaders: Mutex::default(),
            _dir: dir,
        })
    }

    /// Every account of every bank.
    pub fn accounts(&self) -> Vec<AccountRef> {
        self.openings.keys().cloned().collect()
    }

    /// The world's config.
    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// Moves money as a new txn through the [`Teller`].
    pub async fn transfer(&self, from: &AccountRef, to: &AccountRef, amount_minor: i64) -> (TxnId, ClientOutcome) {
        self.teller.transfer(from, to, amount_minor).await
    }

    /// The running node every running node takes for a ready leader, if any.
    pub fn leader(&self) -> Option<u64> {
        let statuses: Vec<_> = self.cluster.running().into_iter().map(|id| self.cluster.node(id).status()).collect();
        let leader = statuses.iter().find(|s| s.role == Role::Leader && s.leader_ready)?;
        statuses.iter().all(|s| s.leader_id == leader.id && s.term == leader.term).then_some(leader.id)
    }

    /// Notes which running nodes act as leader in which term (for I2's one
    /// leader per term); call it often while faults strike.
    pub fn sample_leaders(&self) {
        let mut leaders = self.leaders.lock();
        for id in self.cluster.running() {
            let status = self.cluster.node(id).status();
            if status.role == Role::Leader {
                leaders.entry(status.term).or_default().insert(id);
            }
        }
    }

    /// The raft side of a run, for a deterministic run's trace: who led in
    /// which term, and each running node's term and log position.
    pub fn raft_trace(&self) -> Vec<String> {
        let leaders = self.leaders.lock();
        let terms = leaders.iter().map(|(term, ids)| format!("term {term} led by {ids:?}"));
        let nodes = self.cluster.running().into_iter().map(|id| {
            let s = self.cluster.node(id).status();
            format!("node {id}: term {} applied {} last log {}", s.term, s.applied_index, s.last_log_index)
        });
        terms.chain(nodes).collect()
    }

    /// Coordinator `id`'s wall clock (deadlines, txn-id ages, retention).
    pub fn coordinator_clock(&self, id: u64) -> Option<&Clock> {
        self.clocks.get(&id)
    }

    /// Begun txns with a deadline before this are overdue (I4): now, less
    /// how far behind a coordinator's clock runs (such a leader sees every
    /// deadline that much later) and a second for its timeout scan.
    fn begun_overdue_before_unix_ms(&self) -> u64 {
        twopc_proto::txn_id::unix_now_ms().saturating_sub(self.clock_behind_ms()).saturating_sub(BEGUN_SCAN_SLACK_MS)
    }

    /// How far behind the furthest-behind coordinator clock runs now.
    fn clock_behind_ms(&self) -> u64 {
        self.clocks.values().map(Clock::offset_ms).min().unwrap_or(0).min(0).unsigned_abs()
    }

    /// Notes how far coordinator clocks run ahead after a clock jump, for
    /// the settle bound ([`World::settle`]).
    pub fn note_clock_ahead(&mut self) {
        let ahead_ms = self.clocks.values().map(Clock::offset_ms).max().unwrap_or(0).max(0).unsigned_abs();
        self.clock_ahead_max_ms = self.clock_ahead_max_ms.max(ahead_ms);
    }

    /// Records a membership change the cluster had to refuse and applied
    /// instead, for the checker.
    pub fn membership_accepted(&mut self, what: String) {
        self.membership_accepted.push(what);
    }

    /// Coordinator ids that are down.
    pub fn down(&self) -> &BTreeSet<u64> {
        &self.down
    }

    /// Crashes coordinator `id` (a no-op if it is down) as a power cut
    /// would ([`Cluster::crash`]): whatever its raft log had not synced is
    /// lost. Says what the crash took back. A raft task that already stopped
    /// on an error (a failpoint's simulated crash) is fine.
    ///
    /// # Errors
    /// The node's disk could not be put back (the harness broke).
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<CrashReport> {
        if !self.down.insert(id) {
            return Ok(CrashReport::default());
        }
        self.cluster.crash(id).await
    }

    /// Restarts coordinator `id` if it is down.
    ///
    /// # Errors
    /// Its address cannot be bound again (retried for a while first).
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        if !self.down.contains(&id) {
            return Ok(());
        }
        let mut attempts = 0;
        loop {
            match self.cluster.restart(id).await {
                Ok(()) => break,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(node = id, error = %e, "restarting; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.down.remove(&id);
        Ok(())
    }

    /// Ends every fault: network healed, call chaos and gates off, every
    /// coordinator and bank running.
    ///
    /// # Errors
    /// A node or bank cannot be restarted.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        self.cluster.faults.heal();
        self.cluster.gate.set_chaos(None);
        self.cluster.gate.fail_decides(false);
        self.cluster.gate.hold_after_prepare(false);
        for id in self.down.clone() {
            self.restart(id).await?;
        }
        for bank in &mut self.banks {
            bank.restart().await?;
        }
        Ok(())
    }

    /// Waits (up to the settle bound) until the system is quiescent: one
    /// ready leader everyone follows, every node applied everything, every
    /// decision acknowledged, no bank holding anything.
    ///
    /// The bound is the config's, plus what an interactive txn may
    /// legitimately take: the longest Begin timeout the clients ask for
    /// (a vanished client's txn holds its branches until its deadline), how
    /// far behind a coordinator's clock runs (a leader whose clock is behind
    /// sees every deadline that much later), and how far ahead one ever ran
    /// (a leader whose clock was ahead stamped deadlines that much later).
    pub async fn settle(&self) -> Liveness {
        let started = Instant::now();
        let late_ms = self.clock_behind_ms().saturating_add(self.clock_ahead_max_ms);
        let bound = self.config.settle_bound
            + Duration::from_millis(super::interactive::TIMEOUT_MAX_MS.saturating_add(late_ms));
        loop {
            self.sample_leaders();
            if self.is_settled().await {
                return Liveness { settled_after: Some(started.elapsed()), bound };
            }
            if started.elapsed() > bound {
                return Liveness { settled_after: None, bound };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn is_settled(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let status = self.cluster.node(leader).status();
        let applied_everywhere = self
            .cluster
            .running()
            .into_iter()
            .all(|id| self.cluster.node(id).status().applied_index == status.raft_committed_index);
        // A begun txn ends by its client's word or its deadline (§12.5); until
        // then its joined branches are rightly held.
        let pending = self.cluster.node(leader).local_read(|sm| sm.unacknowledged_count() + sm.begun_count());
        if !applied_everywhere || pending > 0 {
            return false;
        }
        for bank in &self.banks {
            if !bank.is_up() || !bank.is_settled().await.unwrap_or(false) {
                return false;
            }
        }
        true
    }

    /// Everything the checker needs, as it stands now.
    ///
    /// # Errors
    /// A bank's store failed.
    pub async fn observe(&self, liveness: Option<Liveness>) -> anyhow::Result<Observation> {
        let coordinators = self.cluster.states();
        let history = self.teller.history();
        let told = self.teller.told();
        let resubmits = self.teller.resubmits.lock().clone();
        let mut txns: BTreeSet<TxnId> = history.iter().map(|t| t.txn_id).collect();
        txns.extend(told.iter().map(|t| t.txn_id));
        for sm in coordinators.values() {
            let all = sm.list(twopc_coordinator::state_machine::ListFilter::All, u64::MAX, None, usize::MAX);
            txns.extend(all.into_iter().map(|r| r.txn_id));
        }
        let mut participants = BTreeMap::new();
        for bank in &self.banks {
            let mut view = ParticipantView::default();
            let mut bank_txns = txns.clone();
            bank_txns.extend(bank.store.prepared().await?);
            for txn in bank_txns {
                if let Some(state) = bank.store.branch_state(txn).await? {
                    view.branches.insert(txn, state.into());
                }
            }
            for txn in resubmits.iter().map(|r| r.txn_id).collect::<BTreeSet<_>>() {
                if view.branches.get(&txn) == Some(&checker::BranchView::Committed)
                    && let Some(payload) = bank.store.branch_payload(txn).await?
                {
                    view.committed_amounts.insert(txn, payload.ops().iter().map(|op| op.amount_minor()).collect());
                }
            }
            view.accounts = bank.accounts().await?.into_iter().collect();
            // Once settled, the bank's own API must say what its store says.
            if liveness.is_some() {
                view.totals = Some(self.bank_totals(&bank.name).await);
            }
            participants.insert(bank.name.clone(), view);
        }
        let leaders = self.leaders.lock().clone();
        let openings = self.openings.clone();
        Ok(Observation {
            coordinators,
            participants,
            history,
            openings,
            liveness,
            leaders,
            reported: BTreeMap::new(),
            told,
            membership_accepted: self.membership_accepted.clone(),
            interactive: self.teller.interactive(),
            resubmits,
            misanswered: self.teller.misanswers(),
            begun_overdue_before_unix_ms: self.begun_overdue_before_unix_ms(),
        })
    }

    /// What bank `name`'s `Total` RPC answers (a few tries: a bank restarted
    /// by the heal may still be starting), or why it did not.
    async fn bank_totals(&self, name: &str) -> Result<BankTotals, String> {
        let Some(mut bank) = self.teller.bank(name) else {
            return Err(format!("no bank {name}"));
        };
        let mut last = String::new();
        for _ in 0..TOTAL_ATTEMPTS {
            let call = bank.total(twopc_proto::pb::TotalRequest {});
            match tokio::time::timeout(TOTAL_TIMEOUT, call).await {
                Ok(Ok(t)) => {
                    let t = t.into_inner();
                    return Ok(BankTotals {
                        balance_minor: t.balance_total_minor,
                        held_minor: t.held_total_minor,
                        incoming_minor: t.incoming_total_minor,
                    });
                }
                Ok(Err(status)) => last = format!("{:?}: {}", status.code(), status.message()),
                Err(_) => last = format!("no answer within {TOTAL_TIMEOUT:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last)
    }

    /// Heals everything, waits for the system to settle, and runs the checker.
    ///
    /// # Errors
    /// Healing or observing failed (not a violation: the harness broke).
    pub async fn heal_and_check(&mut self) -> anyhow::Result<Verdict> {
        self.heal().await?;
        let liveness = self.settle().await;
        let observation = self.observe(Some(liveness)).await?;
        Ok(Verdict { settled_after: liveness.settled_after, violations: checker::check(&observation) })
    }

    /// Stops every node and bank.
    pub async fn stop(mut self) {
        // Dropping a bank stops its server; its store closes with the last call.
        self.banks.clear();
        if let Err(err) = self.cluster.stop().await {
            tracing::debug!(error = %err, "stopping the cluster");
        }
    }
}
