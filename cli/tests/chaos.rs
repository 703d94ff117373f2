//! Chaos with real processes (docs/TESTING.md): 3 `twopc coordinator` and 2
//! `twopc bank` processes, clients moving money between accounts of both
//! banks, and a seeded schedule of SIGKILL (then restart) and SIGSTOP (then
//! SIGCONT) of random processes, the leader included. Afterwards every
//! process runs again, the system settles, and the invariant checker judges
//! the banks' final balances against the decisions the cluster reports:
//! I8 (conservation, every balance explained by the committed transfers,
//! acknowledged ones applied, aborted ones never), I4 (no hold left), I2
//! (clients were told what the log holds) and I7 (settled within the bound).
//! With NATS there (required under `TWOPC_REQUIRE_NATS=1`), the banks publish
//! events (docs/PROTOCOL.md §14) and the stream is checked too: exactly one
//! event per branch of every txn the log holds as committed, none of any
//! other, whatever was killed when.
//!
//! Replay a schedule: `TWOPC_CHAOS_SEED=... cargo test -p twopc-cli --test chaos -- --nocapture`
//! (process timing still varies). `TWOPC_CHAOS_SECONDS` lengthens the chaos;
//! `TWOPC_CHAOS_TLS=1` runs it all over mutual TLS.

mod processes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use processes::{Proc, Processes};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;
use twopc_bank::Transfer;
use twopc_client::{ClientConfig, ClusterClient};
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnId, pb};
use twopc_tests::checker::{
    self, AccountRef, AccountView, BranchView, ClientOutcome, ClientTxn, Liveness, Movement, Observation,
    ParticipantView,
};

const BANKS: [&str; 2] = ["bank-a", "bank-b"];
const ACCOUNTS_PER_BANK: usize = 3;
const OPENING_MINOR: i64 = 1_000;
const CLIENTS: usize = 4;
/// How long faults strike, unless `TWOPC_CHAOS_SECONDS` says otherwise.
const CHAOS_SECONDS_DEFAULT: u64 = 25;
/// I7's bound for real processes: in-doubt timeout (500 ms), the resolver's
/// default backoff cap (5 s), an election (1-2 s), and slack for a loaded machine.
const SETTLE_BOUND: Duration = Duration::from_secs(45);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Sends `signal` (STOP, CONT) to a process with the `kill` command.
async fn signal(proc: &Proc, signal: &str) {
    if let Some(pid) = proc.pid() {
        let _ = tokio::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await;
    }
}

/// The index of the coordinator that says it leads, asking each with a short timeout.
async fn leader(p: &Processes) -> Option<usize> {
    for (index, addr) in p.coordinator_addrs.iter().enumerate() {
        let ask = async {
            let mut client = CoordinatorClient::new(p.coordinator_channel(addr).await?);
            client.cluster_status(pb::ClusterStatusRequest {}).await.ok().map(tonic::Response::into_inner)
        };
        if let Ok(Some(status)) = tokio::time::timeout(Duration::from_millis(500), ask).await
            && status.role == pb::Role::Leader as i32
        {
            return Some(index);
        }
    }
    None
}

/// Clients: transfers between random accounts until told to stop, each
/// recorded with what its client was told.
struct Clients {
    client: ClusterClient,
    accounts: Vec<AccountRef>,
    history: Mutex<Vec<ClientTxn>>,
    stop: AtomicBool,
}

impl Clients {
    async fn run(self: Arc<Self>, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        while !self.stop.load(Ordering::SeqCst) {
            let from = self.accounts[rng.random_range(0..self.accounts.len())].clone();
            let to = loop {
                let to = &self.accounts[rng.random_range(0..self.accounts.len())];
                if *to != from {
                    break to.clone();
                }
            };
            let amount_minor = rng.random_range(1..=400);
            self.transfer(from, to, amount_minor).await;
        }
    }

    async fn transfer(&self, from: AccountRef, to: AccountRef, amount_minor: i64) {
        let address = |a: &AccountRef| format!("{}@{}", a.account, a.bank).parse().expect("a valid address");
        let transfer = Transfer::new(address(&from), address(&to), amount_minor).expect("a valid transfer");
        let txn_id = TxnId::new();
        let request = pb::SubmitRequest {
            txn_id: txn_id.to_string(),
            branches: transfer.submit_branches(),
            deadline_unix_ms: unix_now_ms() + 5_000,
        };
        let answer = self
            .client
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.submit(request).await }
            })
            .await;
        let outcome = match answer {
            Ok(r) if r.decision == pb::Decision::Commit as i32 => ClientOutcome::Committed,
            Ok(r) if r.decision == pb::Decision::Abort as i32 => ClientOutcome::Aborted,
            _ => ClientOutcome::Unknown,
        };
        let participants = transfer.branches().iter().map(|(bank, _)| bank.to_string()).collect();
        let movement = Some(Movement { from, to, amount_minor });
        self.history.lock().push(ClientTxn { txn_id, participants, movement, outcome });
    }
}

/// One fault, carried out and undone; returns what it did.
async fn strike(p: &mut Processes, rng: &mut StdRng) -> String {
    let hold = Duration::from_millis(rng.random_range(300..2_500));
    let action = rng.random_range(0..5);
    let coordinator = match action {
        0 | 2 => leader(p).await.unwrap_or_else(|| rng.random_range(0..3)),
        _ => rng.random_range(0..3),
    };
    let bank = rng.random_range(0..BANKS.len());
    match action {
        0 | 1 => {
            p.coordinators[coordinator].kill().await;
            tokio::time::sleep(hold).await;
            p.coordinators[coordinator].restart();
            format!(
                "SIGKILL coordinator {} ({}) for {hold:?}",
                coordinator + 1,
                if action == 0 { "leader" } else { "any" }
            )
        }
        2 | 3 => {
            signal(&p.coordinators[coordinator], "STOP").await;
            tokio::time::sleep(hold).await;
            signal(&p.coordinators[coordinator], "CONT").await;
            let which = if action == 2 { "leader" } else { "any" };
            format!("SIGSTOP coordinator {} ({which}) for {hold:?}", coordinator + 1)
        }
        _ if rng.random_bool(0.5) => {
            p.banks[bank].kill().await;
            tokio::time::sleep(hold).await;
            p.banks[bank].restart();
            format!("SIGKILL {} for {hold:?}", BANKS[bank])
        }
        _ => {
            signal(&p.banks[bank], "STOP").await;
            tokio::time::sleep(hold).await;
            signal(&p.banks[bank], "CONT").await;
            format!("SIGSTOP {} for {hold:?}", BANKS[bank])
        }
    }
}

/// Every account of bank `index`, through the Bank API.
async fn accounts(p: &Processes, index: usize) -> Option<BTreeMap<String, AccountView>> {
    let mut bank = p.bank(index).await?;
    let mut all = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let page = bank
            .list_accounts(pb::ListAccountsRequest { page_size: 1000, page_token: page_token.clone() })
            .await
            .ok()?
            .into_inner();
        for a in page.accounts {
            let view = AccountView {
                balance_minor: a.balance_minor,
                held_minor: a.held_minor,
                incoming_minor: a.incoming_minor,
            };
            all.insert(a.name, view);
        }
        if page.next_page_token.is_empty() {
            return Some(all);
        }
        page_token = page.next_page_token;
    }
}

/// Every decision the cluster's log holds, read page by page.
async fn decisions(client: &ClusterClient) -> Result<BTreeMap<TxnId, Decision>, tonic::Status> {
    let mut all = BTreeMap::new();
    let mut after = String::new();
    loop {
        let request = pb::ListTransactionsRequest {
            filter: pb::TxnFilter::All as i32,
            older_than_ms: 0,
            limit: 1000,
            after_txn_id: after.clone(),
        };
        let page = client
            .coordinator(|mut c| {
                let request = request.clone();
                async move { c.list_transactions(request).await }
            })
            .await?;
        for info in page.transactions {
            let txn: TxnId = info.txn_id.parse().map_err(|e| tonic::Status::internal(format!("{e}")))?;
            let decision = Decision::try_from(info.decision).map_err(|e| tonic::Status::internal(e.to_string()))?;
            all.insert(txn, decision);
        }
        if page.next_after_txn_id.is_empty() {
            return Ok(all);
        }
        after = page.next_after_txn_id;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_survives_sigkill_and_sigstop_of_any_process() {
    let seed = env_u64("TWOPC_CHAOS_SEED").unwrap_or_else(rand::random);
    let chaos_seconds = env_u64("TWOPC_CHAOS_SECONDS").unwrap_or(CHAOS_SECONDS_DEFAULT);
    println!("chaos seed {seed}; replay: TWOPC_CHAOS_SEED={seed} cargo test -p twopc-cli --test chaos -- --nocapture");
    // TWOPC_CHAOS_TLS=1: every process and client over mutual TLS.
    let tls = std::env::var_os("TWOPC_CHAOS_TLS").is_some();
    let nats = twopc_participant::nats_testing::server("money_survives_sigkill_and_sigstop_of_any_process").await;
    let stream = twopc_participant::nats_testing::unique_name("TEST_CHAOS");
    let events_args = match &nats {
        Some(nats) => vec![
            "--events-nats".to_owned(),
            nats.url.clone(),
            "--events-stream".to_owned(),
            stream.clone(),
            "--events-prefix".to_owned(),
            twopc_participant::nats_testing::unique_name("chaos"),
        ],
        None => Vec::new(),
    };
    let mut p = Processes::start_opts(events_args, Vec::new(), tls).await;
    let mut openings = BTreeMap::new();
    for (index, bank) in BANKS.iter().enumerate() {
        let mut client = p.bank(index).await.expect("the bank is up");
        for i in 0..ACCOUNTS_PER_BANK {
            let account = format!("acct-{i}");
            let request = pb::CreateAccountRequest { account: account.clone(), initial_balance_minor: OPENING_MINOR };
            client.create_account(request).await.expect("creating an account");
            openings.insert(AccountRef { bank: (*bank).to_owned(), account }, OPENING_MINOR);
        }
    }
    let client_config = ClientConfig {
        retry_budget_ms: 2_000,
        attempt_timeout_ms: 1_000,
        connect_timeout_ms: 500,
        backoff_min_ms: 20,
        backoff_max_ms: 300,
        tls: p.client_tls(),
    };
    let clients = Arc::new(Clients {
        client: ClusterClient::new(p.coordinator_addrs.clone(), client_config.clone()).expect("a client"),
        accounts: openings.keys().cloned().collect(),
        history: Mutex::default(),
        stop: AtomicBool::new(false),
    });
    let tasks: Vec<_> = (0..CLIENTS).map(|i| tokio::spawn(clients.clone().run(seed ^ (i as u64 + 1)))).collect();

    let mut rng = StdRng::seed_from_u64(seed);
    let chaos_end = Instant::now() + Duration::from_secs(chaos_seconds);
    let mut log = Vec::new();
    while Instant::now() < chaos_end {
        let done = strike(&mut p, &mut rng).await;
        println!("  {done}");
        log.push(done);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_200))).await;
    }
    clients.stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a client task");
    }

    // Every process runs again (strike undoes its own fault); wait for the
    // banks to hold nothing in doubt.
    let healed = Instant::now();
    let settled = loop {
        if let Some((_, 0)) = p.totals().await {
            break Some(healed.elapsed());
        }
        if healed.elapsed() > SETTLE_BOUND {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let reader = ClusterClient::new(p.coordinator_addrs.clone(), client_config).expect("a client");
    let history = clients.history.lock().clone();
    let reported = decisions(&reader)
        .await
        .unwrap_or_else(|status| panic!("listing decisions: {status}; logs in {}", p.dir.path().display()));
    // Branch views follow the log: the balances then show whether every bank
    // applied exactly the logged decisions, once.
    let mut participants = BTreeMap::new();
    for (index, bank) in BANKS.iter().enumerate() {
        let mut view = ParticipantView {
            accounts: accounts(&p, index).await.expect("the bank lists its accounts"),
            ..ParticipantView::default()
        };
        for txn in history.iter().filter(|t| t.participants.iter().any(|b| b == bank)) {
            let branch = match reported.get(&txn.txn_id) {
                Some(Decision::Commit) => BranchView::Committed,
                Some(Decision::Abort) => BranchView::Aborted,
                None => continue,
            };
            view.branches.insert(txn.txn_id, branch);
        }
        participants.insert((*bank).to_owned(), view);
    }
    let count = |o| history.iter().filter(|t| t.outcome == o).count();
    println!(
        "{} transfers: {} committed, {} aborted, {} unknown; settled after {settled:?}",
        history.len(),
        count(ClientOutcome::Committed),
        count(ClientOutcome::Aborted),
        count(ClientOutcome::Unknown)
    );
    let observation = Observation {
        participants,
        history,
        openings,
        liveness: Some(Liveness { settled_after: settled, bound: SETTLE_BOUND }),
        reported,
        ..Observation::default()
    };
    let violations = checker::check(&observation);
    assert!(
        violations.is_empty(),
        "seed {seed}: violations:\n{}faults:\n  {}\nlogs in {}",
        checker::report(&violations),
        log.join("\n  "),
        p.dir.path().display()
    );
    assert!(count_committed(&observation) > 0, "no transfer committed at all: the chaos left no progress");
    if let Some(nats) = nats {
        check_events(&nats, &stream, &observation, &clients).await;
        nats.delete_stream(&stream).await;
    }
}

/// The event stream against the log: one event per branch of every
/// committed txn, none of any other, each id once. A fence transfer,
/// committed last, shows that nothing committed earlier is still to come.
async fn check_events(
    nats: &twopc_participant::nats_testing::TestNats,
    stream: &str,
    observation: &Observation,
    clients: &Clients,
) {
    use prost::Message as _;
    let give_up = Instant::now() + Duration::from_secs(30);
    let fence = loop {
        let (from, to) = (clients.accounts[0].clone(), clients.accounts[ACCOUNTS_PER_BANK].clone());
        clients.transfer(from, to, 1).await;
        let last = clients.history.lock().last().cloned().expect("the fence transfer");
        if last.outcome == ClientOutcome::Committed {
            break last.txn_id;
        }
        assert!(Instant::now() < give_up, "no fence transfer committed within 30 s");
    };
    let committed: Vec<TxnId> =
        observation.reported.iter().filter(|(_, d)| **d == Decision::Commit).map(|(t, _)| *t).collect();
    let expected = observation.openings.len() + 2 * (committed.len() + 1);
    let messages = nats.messages(stream, expected as u64, Duration::from_secs(60)).await;
    let mut seen = std::collections::BTreeSet::new();
    for (id, _, payload) in &messages {
        let event = pb::BankEvent::decode(payload.clone()).expect("a BankEvent");
        assert_eq!(&event.id, id, "the Nats-Msg-Id is the event's id");
        assert!(seen.insert(id.clone()), "event {id} is in the stream twice");
    }
    // Each transfer has a debit and a credit: two events, from the banks of
    // its branches (one bank holds both when the accounts share it).
    let mut per_txn: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in &seen {
        if let Some((txn, rest)) = id.split_once(':') {
            per_txn.entry(txn.to_owned()).or_default().push(rest.to_owned());
        }
    }
    let history = clients.history.lock().clone();
    for txn in committed.iter().chain([&fence]) {
        let events = per_txn.get(&txn.to_string()).cloned().unwrap_or_default();
        assert_eq!(events.len(), 2, "committed txn {txn}: one event per operation, got {events:?}");
        let participants = &history.iter().find(|t| t.txn_id == *txn).expect("in the history").participants;
        for event in &events {
            let bank = event.split(':').next().unwrap_or_default();
            assert!(participants.iter().any(|p| p == bank), "txn {txn}: an event from {bank}, not a participant");
        }
    }
    assert_eq!(
        messages.len(),
        expected,
        "the stream holds events of txns the log does not hold as committed: {} openings, {} committed",
        observation.openings.len(),
        committed.len() + 1
    );
    println!("events: {} in the stream, one per committed branch and opening", messages.len());
}

fn count_committed(obs: &Observation) -> usize {
    obs.history.iter().filter(|t| t.outcome == ClientOutcome::Committed).count()
}
