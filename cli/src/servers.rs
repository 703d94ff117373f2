//! `twopc coordinator` and `twopc bank`: run one node in the foreground
//! until Ctrl-C or SIGTERM.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tokio::net::TcpListener;
use twopc_client::{ClientConfig, ClusterClient};
use twopc_coordinator::config::{CommitProtocol, NodeConfig};
use twopc_proto::pb;

use twopc_proto::tls::Identity;

use super::{EXIT_OK, certs, dir_arg};

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// This node's id (non-zero; one of the ids in --peers).
    #[arg(long)]
    pub id: u64,
    /// Every initial node as ID=HOST:PORT, comma-separated (this node included).
    #[arg(long, value_delimiter = ',', value_parser = parse_peer, required = true)]
    pub peers: Vec<(u64, String)>,
    /// Where the raft log and snapshots live.
    #[arg(long, value_parser = dir_arg)]
    pub data_dir: PathBuf,
    /// Address to listen on. Default: this node's address in --peers.
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics; a bare PORT binds loopback (127.0.0.1:PORT).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Join an existing cluster (added with `twopc cluster add`) instead of bootstrapping.
    #[arg(long)]
    pub join: bool,
    /// How long finished txns are kept, and how old a txn id may be when submitted (ms).
    #[arg(long, default_value_t = 60_000)]
    pub retention_ms: u64,
    /// Applied entries between snapshots (after which the log is compacted).
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_interval_entries: u64,
    /// How one-shot txns commit: parallel (a Staged entry logged while the Prepares are out, one durable
    /// round, docs/PROTOCOL.md §13) or sequential (the decision logged after the votes, §5).
    #[arg(long, default_value_t = CommitProtocol::default(), value_parser = parse_commit_protocol)]
    pub commit_protocol: CommitProtocol,
}

pub(crate) fn parse_commit_protocol(text: &str) -> Result<CommitProtocol, String> {
    text.parse().map_err(|e: twopc_coordinator::Error| e.to_string())
}

fn parse_peer(text: &str) -> Result<(u64, String), String> {
    let (id, addr) = text.split_once('=').ok_or_else(|| format!("{text:?} is not ID=HOST:PORT"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("{id:?} is not a node id (a positive number)"))?;
    if id == 0 {
        return Err("node ids start at 1".into());
    }
    if !addr.contains(':') {
        return Err(format!("{addr:?} is not HOST:PORT"));
    }
    Ok((id, addr.trim().to_owned()))
}

/// A bare port is on loopback: metrics are for the machine's own scraper
/// unless an address says otherwise.
fn metrics_addr(addr: &str) -> String {
    if addr.parse::<u16>().is_ok() { format!("127.0.0.1:{addr}") } else { addr.to_owned() }
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for {what}"))
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<u8> {
    let peers: BTreeMap<u64, String> = args.peers.into_iter().collect();
    let listen = match (&args.listen, peers.get(&args.id)) {
        (Some(listen), _) => listen.clone(),
        (None, Some(addr)) => addr.clone(),
        (None, None) => {
            anyhow::bail!("--peers has no entry for --id {}; add {}=HOST:PORT or pass --listen", args.id, args.id)
        }
    };
    let mut config = NodeConfig::new(args.id, peers, args.data_dir);
    config.join = args.join;
    config.engine.retention_ms = args.retention_ms;
    config.engine.commit_protocol = args.commit_protocol;
    config.snapshot_interval_entries = args.snapshot_interval_entries;
    config.tls = certs::server_tls(&Identity::node(args.id))?;
    config.validate()?;
    certs::check_plaintext_listen(&listen, config.tls.is_some(), "the coordinator")?;
    let listener = bind(&listen, "the coordinator").await?;
    let metrics = match &args.metrics_listen {
        Some(addr) => Some(bind(&metrics_addr(addr), "metrics").await?),
        None => None,
    };
    certs::reload_on_sighup(config.tls.clone());
    twopc_coordinator::server::run(listener, metrics, config, stop_signal()).await?;
    Ok(EXIT_OK)
}

#[derive(Debug, Args)]
pub struct BankArgs {
    /// This bank's participant name, such as bank-a.
    #[arg(long)]
    pub name: String,
    /// Address to listen on (the Participant and Bank APIs share it).
    #[arg(long)]
    pub listen: String,
    /// Where the bank's embedded (redb) store lives; not needed with --store postgres://...
    #[arg(long, value_parser = dir_arg, required_unless_present = "store")]
    pub data_dir: Option<PathBuf>,
    /// The store: `redb` (the embedded store in --data-dir, the default) or a PostgreSQL URL such as
    /// postgres://postgres@127.0.0.1:5432/test (the server must allow prepared transactions).
    #[arg(long, value_parser = store_arg)]
    pub store: Option<Store>,
    /// With a PostgreSQL store: the schema holding this bank's tables. Default: twopc_NAME ('-' and '.' as '_').
    #[arg(long)]
    pub pg_schema: Option<String>,
    /// With a PostgreSQL store: the most connections the bank opens (at least 2; half may prepare at once).
    #[arg(long, default_value_t = 16)]
    pub pg_pool_max: usize,
    /// Coordinator addresses, comma-separated host:port.
    #[arg(long, env = "TWOPC_COORDINATORS", value_delimiter = ',', default_value = "127.0.0.1:7001")]
    pub coordinators: Vec<String>,
    /// Register this bank's name and address with the cluster once it listens.
    #[arg(long)]
    pub register: bool,
    /// The address coordinators reach this bank at. Default: --listen.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Serve Prometheus metrics (votes, decisions, in-doubt branches, the event relay) at http://ADDR/metrics;
    /// a bare PORT binds loopback (127.0.0.1:PORT).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// How long a prepared branch waits for its decision before asking the cluster (ms).
    #[arg(long, default_value_t = 5_000)]
    pub in_doubt_timeout_ms: u64,
    /// How long finished branches, their outcomes and tombstones are kept (ms) before they are collected;
    /// the files level off after one such window. At least 60000: a tombstone must outlive any deadline
    /// (the coordinators' deadline_max_ms is 30000 by default). At most 7 days.
    #[arg(long, default_value_t = twopc_bank::StoreConfig::default().finished_retention_ms,
          value_parser = clap::value_parser!(u64).range(BANK_RETENTION_MIN_MS..=twopc_bank::config::FINISHED_RETENTION_MAX_MS))]
    pub finished_retention_ms: u64,
    #[command(flatten)]
    pub events: EventsArgs,
}

/// A bank's events to NATS JetStream (docs/PROTOCOL.md §14).
#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// Publish an event per committed debit and credit (and per account opened) to the NATS server at this URL,
    /// such as nats://127.0.0.1:4222. Off unless given. NATS being down only delays events.
    #[arg(long, value_name = "URL")]
    pub events_nats: Option<String>,
    /// The JetStream stream for events, created (with subjects PREFIX.>) if missing.
    #[arg(long, default_value = "TWOPC", requires = "events_nats")]
    pub events_stream: String,
    /// The first token of every event subject (PREFIX.BANK.ACCOUNT): one per cluster sharing a NATS server.
    #[arg(long, default_value = twopc_bank::events::DEFAULT_SUBJECT_PREFIX, requires = "events_nats")]
    pub events_prefix: String,
    /// The most events that may wait for NATS (plus branches with staged events); past it the bank votes NO
    /// ("event outbox full") until they go out. Committed events are never dropped.
    #[arg(long, default_value_t = twopc_bank::StoreConfig::default().outbox_max, requires = "events_nats")]
    pub outbox_max: u64,
    #[command(flatten)]
    pub nats: crate::nats::NatsArgs,
}

impl EventsArgs {
    /// Events on, for the banks of a local run (`demo`, `bench --local`) on
    /// a stream and subject prefix of that run's own; limits at their defaults.
    pub fn for_local_run(nats: &str, stream: String, prefix: String) -> Self {
        Self {
            events_nats: Some(nats.to_owned()),
            events_stream: stream,
            events_prefix: prefix,
            outbox_max: twopc_bank::StoreConfig::default().outbox_max,
            nats: crate::nats::NatsArgs::default(),
        }
    }

    /// The bank's events config, if events are on.
    ///
    /// # Errors
    /// The NATS connection flags are unusable (see [`crate::nats::NatsArgs::connect`]).
    pub fn config(&self) -> anyhow::Result<Option<twopc_bank::events::EventsConfig>> {
        let Some(url) = self.events_nats.as_ref() else { return Ok(None) };
        let mut events = twopc_bank::events::EventsConfig::new(url.clone()).with_prefix(self.events_prefix.clone());
        events.relay.stream = self.events_stream.clone();
        events.relay.nats = self.nats.connect(url)?;
        Ok(Some(events))
    }

    /// These flags as arguments of `twopc bank`, for a child bank of a local
    /// run, with this process's `--insecure` (a run against a NATS server
    /// elsewhere). NATS TLS files and credentials are not passed: a child
    /// gets them in its environment (`TWOPC_NATS_CA`, ...,
    /// [`crate::nats::NatsArgs::child_env`]), where secrets belong rather
    /// than on a command line.
    pub fn to_args(&self) -> Vec<String> {
        let Some(url) = &self.events_nats else { return Vec::new() };
        let mut args: Vec<String> = [
            ("--events-nats", url.clone()),
            ("--events-stream", self.events_stream.clone()),
            ("--events-prefix", self.events_prefix.clone()),
            ("--outbox-max", self.outbox_max.to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect();
        if certs::tls_args().insecure {
            args.push("--insecure".to_owned());
        }
        args
    }
}

/// Deletes a local run's own event stream at its end.
///
/// # Errors
/// NATS unreachable, or the stream not deleted.
pub async fn delete_event_stream(nats: &twopc_participant::outbox::NatsConnect, stream: &str) -> anyhow::Result<()> {
    let options = nats.options("twopc-cleanup").map_err(|e| anyhow::anyhow!(e))?;
    let client = options.connect(nats.url.as_str()).await?;
    async_nats::jetstream::new(client).delete_stream(stream).await?;
    Ok(())
}

/// The shortest `twopc bank --finished-retention-ms`: twice the coordinators'
/// default `deadline_max_ms`, so a tombstone outlives any deadline (I4).
pub const BANK_RETENTION_MIN_MS: u64 = 60_000;

/// Where a bank keeps its accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// The embedded redb store in --data-dir.
    Redb,
    /// PostgreSQL at this URL.
    Postgres(String),
}

fn store_arg(text: &str) -> Result<Store, String> {
    if text == "redb" {
        return Ok(Store::Redb);
    }
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok(Store::Postgres(text.to_owned()));
    }
    Err(format!("{text:?} is neither redb nor a postgres://USER@HOST:PORT/DB URL"))
}

pub async fn bank(args: BankArgs) -> anyhow::Result<u8> {
    let name: twopc_proto::ParticipantId = args.name.parse()?;
    let store = args.store.clone().unwrap_or(Store::Redb);
    let data_dir = match (&store, &args.data_dir) {
        (_, Some(dir)) => dir.clone(),
        (Store::Postgres(_), None) => PathBuf::from("."),
        (Store::Redb, None) => anyhow::bail!("--data-dir is required with the redb store"),
    };
    let mut config = twopc_bank::BankConfig::new(name.clone(), args.coordinators.clone(), data_dir);
    config.participant.in_doubt_timeout_ms = args.in_doubt_timeout_ms;
    // The store must keep tombstones at least as long as the library's memory does (I4).
    config.store.finished_retention_ms = args.finished_retention_ms;
    config.participant.tombstone_retention_ms = args.finished_retention_ms;
    config.participant.tls = certs::server_tls(&Identity::participant(name.as_str()))?;
    config.events = args.events.config()?;
    config.store.outbox_max = args.events.outbox_max;
    config.validate()?;
    certs::check_plaintext_listen(&args.listen, config.participant.tls.is_some(), "the bank")?;
    certs::reload_on_sighup(config.participant.tls.clone());
    let postgres = match &store {
        Store::Redb => None,
        Store::Postgres(url) => {
            let schema = match &args.pg_schema {
                Some(schema) => schema.clone(),
                None => twopc_bank::pg_store::default_schema(&name)?,
            };
            let mut pg = twopc_participant::postgres::PostgresConfig::new(url.clone(), schema);
            pg.pool_max = args.pg_pool_max;
            pg.prepare_concurrency_max = (args.pg_pool_max / 2).max(1);
            pg.finished_retention_ms = config.store.finished_retention_ms;
            let schema = pg.schema.clone();
            let events = config.events.as_ref().map(|events| events.subjects(&name));
            let store = twopc_bank::PgStore::open_with_events(&name, pg, events, config.store.outbox_max).await?;
            tracing::info!(bank = %name, %schema, "accounts on PostgreSQL");
            Some(std::sync::Arc::new(store))
        }
    };
    let listener = bind(&args.listen, "the bank").await?;
    let metrics = match &args.metrics_listen {
        Some(addr) => Some(bind(&metrics_addr(addr), "metrics").await?),
        None => None,
    };
    if args.register {
        let addr = args.advertise.clone().unwrap_or_else(|| args.listen.clone());
        // Over TLS the bank registers as itself (participant:<name> may register only its own name).
        let tls = config.participant.tls.clone();
        let client = ClusterClient::new(
            args.coordinators,
            ClientConfig { retry_budget_ms: 60_000, tls, ..ClientConfig::default() },
        )?;
        tokio::spawn(async move {
            let request = pb::RegisterParticipantRequest { name: name.to_string(), addr: addr.clone() };
            let registered = client
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.register_participant(request).await }
                })
                .await;
            match registered {
                Ok(_) => tracing::info!(participant = %name, %addr, "registered with the cluster"),
                Err(status) => tracing::error!(participant = %name, error = %status.message(), "could not register"),
            }
        });
    }
    match postgres {
        None => twopc_bank::server::run_with_metrics(listener, metrics, config, stop_signal()).await?,
        Some(store) => {
            let relay = match &config.events {
                Some(events) => Some(events.start_relay(config.id(), store.clone(), store.relay_wake())?),
                None => None,
            };
            let metrics = metrics.map(|listener| twopc_bank::server::MetricsEndpoint::new(listener, relay.as_ref()));
            twopc_bank::server::serve_with_metrics(listener, store, config.participant, metrics, stop_signal()).await?
        }
    }
    Ok(EXIT_OK)
}
