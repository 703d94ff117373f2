//! `twopc demo`: 3 coordinators and 2 banks as child processes of this one,
//! accounts seeded, random transfers with live counters, the balance table
//! and the conservation check (I8). `--chaos` SIGKILLs the coordinator leader
//! and a bank mid-run, restarts them, and prints a timeline. `--interactive`
//! runs each transfer as an interactive txn (docs/PROTOCOL.md §12): Begin,
//! Debit and Credit at the banks with the txn's context, Commit. `--events`
//! has the banks publish their events to NATS JetStream (docs/PROTOCOL.md
//! §14) and builds `twopc view`'s read model from the stream, printed beside
//! the banks' balances with the moment the two agree.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use rand::Rng as _;
use twopc_bank::{AccountAddress, Transfer, format_minor, parse_balance};
use twopc_client::{ClientConfig, ClusterClient};
use twopc_proto::{TxnId, pb};

use super::interactive::{self, Banks, Calls, Shape};
use super::local_cluster::{LocalCluster, Spec, bank_client, leader, wait_until};
use super::money::{Outcome, submit_transfer};
use super::output::table;
use super::{EXIT_ERROR, EXIT_OK};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep data and logs here (default: a temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How many transfers to run.
    #[arg(long, default_value_t = 1_000)]
    pub transfers: u64,
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Accounts per bank.
    #[arg(long, default_value_t = 5)]
    pub accounts: u32,
    /// Mutual TLS on every connection, with certificates made for the demo in its directory.
    #[arg(long)]
    pub tls: bool,
    /// Each account's opening balance.
    #[arg(long, default_value = "100.00")]
    pub opening_balance: String,
    /// Kill and restart the coordinator leader and a bank mid-run.
    #[arg(long)]
    pub chaos: bool,
    /// Run each transfer as an interactive txn: Begin, Debit at the payer's bank and Credit at the payee's
    /// with the txn's context, Commit (a refused call rolls it back). A transfer within one bank is begun
    /// and committed with one one-shot branch holding both moves; the summary counts each kind.
    #[arg(long)]
    pub interactive: bool,
    /// Run bank-b on PostgreSQL at this URL (such as postgres://postgres@127.0.0.1:5432/test) instead of
    /// the embedded store, in a schema of its own: dropped at the end, or kept with --dir.
    #[arg(long, value_name = "URL", alias = "pg-bank")]
    pub store: Option<String>,
    /// The banks publish an event per committed debit and credit (and per account opened) to NATS JetStream,
    /// on a stream of this run's own (kept with --dir); at the end `twopc view`'s read model, built from the
    /// stream alone, is printed beside the banks' balances, with how long after the last transfer they agreed.
    #[arg(long)]
    pub events: bool,
    /// The NATS server for --events.
    #[arg(long, env = "TWOPC_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// TLS and credentials for --events, for the banks and for this process's view.
    #[command(flatten)]
    pub nats_connect: crate::nats::NatsArgs,
}

/// How long the view may take to agree with the banks after the last transfer.
const VIEW_CONVERGE_MAX: Duration = Duration::from_secs(60);

/// --events: the stream and subject prefix of this run (one derived from
/// the directory with --dir, so a rerun's view finds its stream again).
struct DemoEvents {
    nats: twopc_participant::outbox::NatsConnect,
    /// The banks' environment: NATS's TLS files and credentials.
    bank_env: Vec<(&'static str, std::ffi::OsString)>,
    stream: String,
    prefix: String,
    view_dir: PathBuf,
}

impl DemoEvents {
    fn new(args: &DemoArgs, dir: &Path) -> anyhow::Result<Self> {
        let tag = run_tag(args.dir.as_deref());
        Ok(Self {
            nats: args.nats_connect.connect(&args.nats)?,
            bank_env: args.nats_connect.child_env(),
            stream: format!("TWOPC_DEMO_{tag}"),
            prefix: format!("demo{tag}"),
            view_dir: dir.join("view"),
        })
    }

    fn bank_args(&self) -> Vec<String> {
        crate::servers::EventsArgs::for_local_run(&self.nats.url, self.stream.clone(), self.prefix.clone()).to_args()
    }
}

const BANKS: [&str; 2] = ["bank-a", "bank-b"];
const COORDINATORS: u64 = 3;
/// Aborts for reasons other than funds that the timeline shows one by one
/// (the rest are counted).
const ABORTS_NOTED_MAX: u64 = 5;
/// A txn whose outcome stays unknown is retried (same id) at most this often.
const RETRIES_MAX: u32 = 50;

/// The demo's processes and what it knows about them.
struct Demo {
    /// Its processes are locked by the chaos task to kill and restart; by nothing else while transfers run.
    cluster: LocalCluster,
    started: Instant,
    timeline: Mutex<Vec<(Duration, String)>>,
}

impl Demo {
    fn note(&self, progress: Option<&ProgressBar>, what: String) {
        let at = self.started.elapsed();
        if let Some(bar) = progress {
            bar.println(format!("  [{:>5.1}s] {what}", at.as_secs_f64()));
        }
        self.timeline.lock().push((at, what));
    }
}

async fn totals(demo: &Demo) -> anyhow::Result<Vec<pb::TotalResponse>> {
    let mut totals = Vec::new();
    for (name, addr) in demo.cluster.bank_names.iter().zip(&demo.cluster.bank_addrs) {
        totals.push(bank_client(name, addr).await?.total(pb::TotalRequest {}).await?.into_inner());
    }
    Ok(totals)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let opening = parse_balance(&args.opening_balance).context("--opening-balance")?;
    anyhow::ensure!(args.accounts >= 1, "--accounts must be at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
    let postgres = args.store.as_ref().map(|url| pg_bank(url, args.dir.as_deref()));
    let events = args.events.then(|| DemoEvents::new(&args, &dir)).transpose()?;
    let demo = build(&dir, postgres.as_ref(), events.as_ref(), args.tls)?;
    println!("twopc demo: {COORDINATORS} coordinators and {} banks in {}", BANKS.len(), dir.display());
    if let Some(pg) = &postgres {
        println!("{} keeps its accounts on PostgreSQL, schema {}", BANKS[PG_BANK], pg.schema);
    }
    if args.interactive {
        println!("transfers run as interactive txns: Begin, Debit and Credit at the banks, Commit");
    }
    if args.tls {
        println!("every conversation on mutual TLS; certificates in {}", dir.join("tls").display());
    }
    if let Some(events) = &events {
        println!(
            "the banks publish events to {}, stream {}; the view is in {}",
            events.nats.shown_url(),
            events.stream,
            events.view_dir.display()
        );
    }
    let result = tokio::select! {
        result = run_demo(&demo, &args, opening, events.as_ref()) => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted; stopping the cluster");
            Ok(EXIT_ERROR)
        }
    };
    demo.cluster.stop_all().await;
    if args.dir.is_none() {
        drop(temp);
        if let Some(events) = &events
            && let Err(e) = crate::servers::delete_event_stream(&events.nats, &events.stream).await
        {
            eprintln!("could not delete stream {}: {e:#}", events.stream);
        }
        if let Some(pg) = &postgres
            && let Err(e) = drop_pg_schema(pg).await
        {
            eprintln!("could not drop PostgreSQL schema {}: {e:#}", pg.schema);
        }
    } else {
        println!("data and logs kept in {}", dir.display());
    }
    result
}

/// Which bank runs on PostgreSQL with --store: bank-b, the one --chaos kills
/// while it holds prepared branches.
const PG_BANK: usize = 1;

/// Where the PostgreSQL bank keeps its accounts.
struct PgBank {
    url: String,
    schema: String,
}

/// A schema of this run's own; with --dir, one derived from the directory,
/// so a rerun finds its accounts again.
fn pg_bank(url: &str, kept: Option<&Path>) -> PgBank {
    PgBank { url: url.to_owned(), schema: format!("twopc_demo_{}", run_tag(kept)) }
}

/// A name part of this run's own: derived from the kept directory, so a
/// rerun with the same --dir finds its schema and stream again, or from the
/// process and the time.
fn run_tag(kept: Option<&Path>) -> String {
    use std::hash::{Hash as _, Hasher as _};
    match kept {
        Some(dir) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned()).hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        }
        None => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            format!("{}_{}", std::process::id(), now.as_millis())
        }
    }
}

/// Rolls back what the PostgreSQL bank left prepared (only if the demo
/// failed) and drops its schema.
async fn drop_pg_schema(pg: &PgBank) -> anyhow::Result<()> {
    use twopc_participant::postgres::tokio_postgres;
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let table = format!("\"{}\".twopc_branches", pg.schema);
    let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
    if exists {
        let sql = format!("SELECT p.gid FROM pg_prepared_xacts p JOIN {table} b ON b.gid = p.gid");
        for row in client.query(&sql, &[]).await? {
            let gid: String = row.get(0);
            client.batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).await?;
        }
    }
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", pg.schema)).await?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

fn build(dir: &Path, postgres: Option<&PgBank>, events: Option<&DemoEvents>, tls: bool) -> anyhow::Result<Demo> {
    let mut bank_args = vec!["--in-doubt-timeout-ms".into(), "1000".into()];
    bank_args.extend(events.map(DemoEvents::bank_args).unwrap_or_default());
    let spec = Spec {
        coordinators: COORDINATORS,
        banks: BANKS.iter().map(|b| (*b).to_owned()).collect(),
        coordinator_args: Vec::new(),
        bank_args,
        bank_env: events.map(|e| e.bank_env.clone()).unwrap_or_default(),
        tls,
    };
    let mut cluster = LocalCluster::build(dir, &spec)?;
    if let Some(pg) = postgres {
        let args = ["--store", &pg.url, "--pg-schema", &pg.schema];
        cluster.banks[PG_BANK].get_mut().args.extend(args.map(String::from));
    }
    Ok(Demo { cluster, started: Instant::now(), timeline: Mutex::default() })
}

async fn run_demo(demo: &Demo, args: &DemoArgs, opening: i64, events: Option<&DemoEvents>) -> anyhow::Result<u8> {
    demo.cluster.start_all().await?;
    let client = Arc::new(ClusterClient::new(
        demo.cluster.coordinator_addrs.clone(),
        ClientConfig { tls: super::certs::cli_tls()?, ..ClientConfig::default() },
    )?);
    let first_leader = wait_until("a coordinator leader", || leader(&client)).await?;
    demo.note(None, format!("cluster up, coordinator {first_leader} leads"));
    demo.cluster.register_banks(&client).await?;
    let accounts = seed(demo, args.accounts, opening).await?;
    let before: i64 = totals(demo).await?.iter().map(|t| t.balance_total_minor).sum();
    println!("{} accounts seeded with {} each; total {}", accounts.len(), format_minor(opening), format_minor(before));

    let counters = Counters::default();
    let bar = ProgressBar::new(args.transfers);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} transfers  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let transfers = run_transfers(demo, &client, &accounts, args, &counters, &bar);
    let chaos = async { if args.chaos { chaos(demo, &client, args.transfers, &counters, &bar).await } else { Ok(()) } };
    let (transfers, chaos) = tokio::join!(transfers, chaos);
    bar.finish_with_message(counters.line());
    chaos?;
    let undecided = transfers?;
    report(demo, &accounts, before, undecided, &counters, args, events).await
}

async fn seed(demo: &Demo, per_bank: u32, opening: i64) -> anyhow::Result<Vec<AccountAddress>> {
    let mut accounts = Vec::new();
    for (bank, addr) in BANKS.iter().zip(&demo.cluster.bank_addrs) {
        let mut client =
            wait_until(&format!("{bank} to start"), || async { bank_client(bank, addr).await.ok() }).await?;
        for i in 1..=per_bank {
            let name = format!("acct-{i}");
            let request = pb::CreateAccountRequest { account: name.clone(), initial_balance_minor: opening };
            match client.create_account(request).await {
                Ok(_) => {}
                // A kept --dir: the accounts are already there.
                Err(status) if status.code() == tonic::Code::AlreadyExists => {}
                Err(status) => return Err(status).with_context(|| format!("creating {name}@{bank}")),
            }
            accounts.push(format!("{name}@{bank}").parse()?);
        }
    }
    Ok(accounts)
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    insufficient: AtomicU64,
    aborted_other: AtomicU64,
    retried: AtomicU64,
    /// --interactive: transfers run as Begin, Debit, Credit, Commit.
    joined: AtomicU64,
    /// --interactive: of those, the ones that committed.
    joined_committed: AtomicU64,
    /// --interactive: transfers within one bank, run as Begin and a Commit with one one-shot branch.
    one_shot_branch: AtomicU64,
}

impl Counters {
    fn finished(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
            + self.insufficient.load(Ordering::Relaxed)
            + self.aborted_other.load(Ordering::Relaxed)
    }

    fn line(&self) -> String {
        format!(
            "committed {}  aborted (insufficient funds) {}  aborted (other) {}  retried {}",
            self.committed.load(Ordering::Relaxed),
            self.insufficient.load(Ordering::Relaxed),
            self.aborted_other.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
        )
    }
}

/// Runs the transfers; returns how many ended with an unknown outcome.
async fn run_transfers(
    demo: &Demo,
    client: &ClusterClient,
    accounts: &[AccountAddress],
    args: &DemoArgs,
    counters: &Counters,
    bar: &ProgressBar,
) -> anyhow::Result<u64> {
    let banks = if args.interactive {
        let names = demo.cluster.bank_names.iter().cloned();
        Some(Banks::new(&names.zip(demo.cluster.bank_addrs.iter().cloned()).collect::<Vec<_>>())?)
    } else {
        None
    };
    let banks = banks.as_ref();
    let outcomes: Vec<anyhow::Result<bool>> = futures::stream::iter(0..args.transfers)
        .map(|_| async {
            let transfer = random_transfer(accounts)?;
            let txn_id = TxnId::new();
            let mut attempts = 0;
            if args.interactive {
                match Shape::of(&transfer) {
                    Shape::Joined => counters.joined.fetch_add(1, Ordering::Relaxed),
                    Shape::OneShotBranch => counters.one_shot_branch.fetch_add(1, Ordering::Relaxed),
                };
            }
            let decided = loop {
                // A retry keeps the txn id: the cluster answers it once (I5). An
                // interactive retry resumes the txn: only the calls whose bank has
                // not joined are made again before the Commit.
                let outcome = match banks {
                    Some(banks) => {
                        let timeout = Duration::from_secs(10);
                        let resume = attempts > 0;
                        interactive::transfer(client, banks, &transfer, txn_id, timeout, Calls::Sequential, resume)
                            .await?
                    }
                    None => submit_transfer(client, &transfer, txn_id, Duration::from_secs(10)).await?,
                };
                match outcome {
                    Outcome::Committed => {
                        counters.committed.fetch_add(1, Ordering::Relaxed);
                        if args.interactive && Shape::of(&transfer) == Shape::Joined {
                            counters.joined_committed.fetch_add(1, Ordering::Relaxed);
                        }
                        break true;
                    }
                    Outcome::Aborted(reason) if reason.contains("insufficient funds") => {
                        counters.insufficient.fetch_add(1, Ordering::Relaxed);
                        break true;
                    }
                    Outcome::Aborted(reason) => {
                        let seen = counters.aborted_other.fetch_add(1, Ordering::Relaxed);
                        if seen < ABORTS_NOTED_MAX {
                            demo.note(Some(bar), format!("txn {txn_id} aborted: {reason}"));
                        }
                        break true;
                    }
                    Outcome::Unknown(_) if attempts < RETRIES_MAX => {
                        attempts += 1;
                        counters.retried.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Outcome::Unknown(reason) => {
                        demo.note(Some(bar), format!("txn {txn_id} outcome unknown: {reason}"));
                        break false;
                    }
                }
            };
            bar.inc(1);
            bar.set_message(counters.line());
            Ok(decided)
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let mut unknown = 0;
    for outcome in outcomes {
        if !outcome? {
            unknown += 1;
        }
    }
    Ok(unknown)
}

fn random_transfer(accounts: &[AccountAddress]) -> anyhow::Result<Transfer> {
    let mut rng = rand::rng();
    let from = rng.random_range(0..accounts.len());
    let mut to = rng.random_range(0..accounts.len() - 1);
    if to >= from {
        to += 1;
    }
    let amount = rng.random_range(1..=5_000);
    Ok(Transfer::new(accounts[from].clone(), accounts[to % accounts.len()].clone(), amount)?)
}

/// Kills the leader a tenth into the run, and a bank holding prepared
/// branches three tenths in; restarts each half a second later.
async fn chaos(
    demo: &Demo,
    client: &ClusterClient,
    total: u64,
    counters: &Counters,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let done = || counters.finished();
    wait_progress(|| done() >= total / 10).await;
    let Some(victim) = leader(client).await else { anyhow::bail!("no leader to kill") };
    let index = usize::try_from(victim - 1)?;
    let proc = demo.cluster.coordinators.get(index).with_context(|| format!("no coordinator {victim}"))?;
    proc.lock().await.kill().await;
    demo.note(Some(bar), format!("SIGKILL coordinator {victim} (the leader)"));
    let new_leader = wait_until("a new leader", || async { leader(client).await.filter(|l| *l != victim) }).await?;
    demo.note(Some(bar), format!("coordinator {new_leader} elected leader"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proc.lock().await.start(&demo.cluster.exe)?;
    demo.note(Some(bar), format!("coordinator {victim} restarted from its data dir"));

    wait_progress(|| done() >= total * 3 / 10).await;
    let bank = 1;
    // Kill the bank the moment it holds a prepared branch: it voted YES and
    // waits for a decision it will only learn after its restart. On a fast
    // run the transfers may all be done first: then kill it holding nothing.
    let staged = wait_until(&format!("{} to hold a prepared branch", BANKS[bank]), || async {
        if done() >= total {
            return Some(0);
        }
        let t = bank_client(BANKS[bank], &demo.cluster.bank_addrs[bank])
            .await
            .ok()?
            .total(pb::TotalRequest {})
            .await
            .ok()?
            .into_inner();
        let staged = t.held_total_minor + t.incoming_total_minor;
        (staged > 0).then_some(staged)
    })
    .await?;
    let proc = &demo.cluster.banks[bank];
    proc.lock().await.kill().await;
    demo.note(Some(bar), format!("SIGKILL {} holding {} in prepared branches", BANKS[bank], format_minor(staged)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    proc.lock().await.start(&demo.cluster.exe)?;
    demo.note(Some(bar), format!("{} restarted; it resolves its prepared branches with the cluster", BANKS[bank]));
    Ok(())
}

async fn wait_progress(mut reached: impl FnMut() -> bool) {
    while !reached() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn report(
    demo: &Demo,
    accounts: &[AccountAddress],
    before: i64,
    unknown: u64,
    counters: &Counters,
    args: &DemoArgs,
    events: Option<&DemoEvents>,
) -> anyhow::Result<u8> {
    let transfers_done = Instant::now();
    // Decisions reach banks asynchronously (phase 2); wait until none is in doubt.
    let settled = wait_until("every prepared branch to be decided", || async {
        let totals = totals(demo).await.ok()?;
        totals.iter().all(|t| t.held_total_minor == 0 && t.incoming_total_minor == 0).then_some(totals)
    })
    .await?;
    let mut balances = std::collections::BTreeMap::new();
    for (bank, addr) in BANKS.iter().zip(&demo.cluster.bank_addrs) {
        let mut client = bank_client(bank, addr).await?;
        let list = client.list_accounts(pb::ListAccountsRequest { page_size: 1000, page_token: String::new() }).await?;
        for account in list.into_inner().accounts {
            balances.insert(format!("{}@{bank}", account.name), account.balance_minor);
        }
    }
    let view = match events {
        Some(events) => Some(converge_view(events, &balances, transfers_done).await?),
        None => None,
    };
    let rows: Vec<Vec<String>> = balances
        .iter()
        .map(|(account, balance)| {
            let mut row = vec![account.clone(), format_minor(*balance)];
            if let Some(view) = &view {
                row.push(view.balances.get(account).map_or_else(|| "-".to_owned(), |b| format_minor(*b)));
            }
            row
        })
        .collect();
    let after: i64 = settled.iter().map(|t| t.balance_total_minor).sum();
    println!();
    if view.is_some() {
        table(&["ACCOUNT", " BALANCE", " VIEW"], &rows);
    } else {
        table(&["ACCOUNT", " BALANCE"], &rows);
    }
    println!();
    println!("{}", counters.line());
    if args.interactive {
        println!(
            "interactive: {} transfers across banks ran as Begin, Debit, Credit, Commit ({} committed); {} within \
             one bank as Begin and a Commit with one one-shot branch (a bank holds one branch per txn)",
            counters.joined.load(Ordering::Relaxed),
            counters.joined_committed.load(Ordering::Relaxed),
            counters.one_shot_branch.load(Ordering::Relaxed),
        );
    }
    if args.chaos {
        println!("\ntimeline:");
        for (at, what) in demo.timeline.lock().iter() {
            println!("  {:>6.2}s  {what}", at.as_secs_f64());
        }
    }
    let conserved = before == after;
    println!(
        "\ntotal before {}  total after {}  money conserved: {}",
        format_minor(before),
        format_minor(after),
        if conserved { "yes" } else { "NO" }
    );
    if let Some(view) = &view {
        let total: i64 = view.balances.values().sum();
        match view.converged_after {
            Some(after) => println!(
                "view total {}  from {} events  view matches the banks: yes ({:.1}s after the last transfer)",
                format_minor(total),
                view.applied,
                after.as_secs_f64()
            ),
            None => println!(
                "view total {}  from {} events  view matches the banks: NO (not within {}s)",
                format_minor(total),
                view.applied,
                VIEW_CONVERGE_MAX.as_secs()
            ),
        }
    }
    anyhow::ensure!(accounts.len() == rows.len(), "expected {} accounts, found {}", accounts.len(), rows.len());
    let view_agrees = view.as_ref().is_none_or(|v| v.converged_after.is_some());
    if !conserved || unknown > 0 || !view_agrees {
        eprintln!("error: {unknown} transfers undecided, money conserved: {conserved}, view agrees: {view_agrees}");
        return Ok(EXIT_ERROR);
    }
    Ok(EXIT_OK)
}

/// The view's read model once it agrees with the banks, or as it stands
/// after [`VIEW_CONVERGE_MAX`].
struct ViewResult {
    balances: std::collections::BTreeMap<String, i64>,
    applied: u64,
    converged_after: Option<Duration>,
}

/// Syncs the view from the stream until its balances equal the banks' (the
/// banks publish what they committed as soon as NATS acknowledges; a bank
/// killed by --chaos publishes the rest after its restart).
async fn converge_view(
    events: &DemoEvents,
    banks: &std::collections::BTreeMap<String, i64>,
    since: Instant,
) -> anyhow::Result<ViewResult> {
    let config = super::view::SyncConfig {
        nats: events.nats.clone(),
        stream: events.stream.clone(),
        ..super::view::SyncConfig::new(&events.view_dir)
    };
    let mut applied = 0;
    loop {
        let report = super::view::sync(&config, false, std::future::pending()).await?;
        applied += report.applied;
        let balances: std::collections::BTreeMap<String, i64> =
            super::view::ViewStore::open_existing(&events.view_dir)?.balances()?.into_iter().collect();
        let converged = balances == *banks;
        if converged || since.elapsed() > VIEW_CONVERGE_MAX {
            let converged_after = converged.then(|| since.elapsed());
            return Ok(ViewResult { balances, applied, converged_after });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
