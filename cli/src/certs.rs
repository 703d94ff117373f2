//! `twopc certs init` and `twopc certs show`, and the process's TLS
//! settings: `--tls-dir` (env `TWOPC_TLS_DIR`) and `--insecure`, which every
//! command takes (docs/SECURITY.md).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use twopc_proto::certs::{CA_LIFETIME_DAYS, CertAuthority, LEAF_LIFETIME_DAYS};
use twopc_proto::tls::{CertSummary, Identity, Role, Tls, TlsConfig};

use super::EXIT_OK;

/// The TLS flags every command takes.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// Mutual TLS with the files in DIR: ca.pem and this process's certificate and key
    /// (`twopc certs init` makes them). Without it, connections are plaintext.
    #[arg(long, global = true, env = "TWOPC_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Allow a server to listen in plaintext on an address other than loopback, and a bank or view to reach
    /// NATS in plaintext off this machine.
    #[arg(long, global = true)]
    pub insecure: bool,
}

/// The process's TLS flags; `demo --tls` and `bench --local --tls` set the
/// directory they made.
static TLS_ARGS: RwLock<Option<TlsArgs>> = RwLock::new(None);

pub fn set_tls_args(args: TlsArgs) {
    *TLS_ARGS.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(args);
}

pub fn tls_args() -> TlsArgs {
    TLS_ARGS.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone().unwrap_or_default()
}

/// The name `certs init` gives the command line's client and admin identities.
pub const CLI_NAME: &str = "cli";

/// The identity a command-line client uses: `admin:cli` when its files are
/// in the directory (an operator's machine), else `client:cli`.
pub fn cli_identity(dir: &Path) -> Identity {
    let admin = Identity::admin(CLI_NAME);
    if dir.join(format!("{}.pem", admin.file_stem())).exists() { admin } else { Identity::client(CLI_NAME) }
}

/// The command line's own TLS as a client, when `--tls-dir` is given.
///
/// # Errors
/// The files are missing or unusable.
pub fn cli_tls() -> anyhow::Result<Option<Tls>> {
    match tls_args().tls_dir {
        Some(dir) => load_tls(&dir, &cli_identity(&dir)).map(Some),
        None => Ok(None),
    }
}

/// A server's TLS as `identity`, when `--tls-dir` is given.
///
/// # Errors
/// The files are missing or unusable.
pub fn server_tls(identity: &Identity) -> anyhow::Result<Option<Tls>> {
    match tls_args().tls_dir {
        Some(dir) => load_tls(&dir, identity).map(Some),
        None => Ok(None),
    }
}

fn load_tls(dir: &Path, identity: &Identity) -> anyhow::Result<Tls> {
    TlsConfig::new(dir)
        .load(identity)
        .with_context(|| format!("--tls-dir {}: cannot load TLS as {identity}", dir.display()))
}

/// Refuses a plaintext listener on anything but loopback, unless `--insecure`.
///
/// # Errors
/// `addr` is not loopback, TLS is off and `--insecure` was not given.
pub fn check_plaintext_listen(addr: &str, tls: bool, what: &str) -> anyhow::Result<()> {
    if tls || tls_args().insecure || is_loopback(addr) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {what} in plaintext on {addr}, which is not loopback: pass --tls-dir DIR \
         (see `twopc certs init`), or --insecure to accept it"
    )
}

fn is_loopback(addr: &str) -> bool {
    if let Ok(addr) = addr.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    addr.rsplit_once(':').is_some_and(|(host, _)| host == "localhost")
}

/// Reloads `tls` on every SIGHUP for as long as the process runs: new
/// connections use the new files, open ones keep theirs.
pub fn reload_on_sighup(tls: Option<Tls>) {
    #[cfg(unix)]
    if let Some(tls) = tls {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: TLS files will not be reloaded");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => tracing::info!(identity = %tls.identity(), "TLS files reloaded"),
                    Err(e) => tracing::error!(error = %e, "TLS reload failed; the old files stay in use"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA and certificates for nodes, participants, a client and an admin in DIR.
    #[command(
        after_help = "Examples:\n  twopc certs init --dir tls --nodes 3 --participants bank-a,bank-b --client --admin\n  \
            twopc certs init --dir tls --add --node-ids 4 --participants bank-c"
    )]
    Init(InitArgs),
    /// Print what a certificate grants: its identity, names and validity.
    #[command(after_help = "Example:\n  twopc certs show tls/node-1.pem")]
    Show {
        /// A PEM certificate file.
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The directory to write into (created if missing). Existing files are replaced.
    #[arg(long)]
    pub dir: PathBuf,
    /// Certificates for nodes 1..=N.
    #[arg(long, default_value_t = 0)]
    pub nodes: u64,
    /// Certificates for these node ids, comma-separated (nodes added later, with --add).
    #[arg(long, value_delimiter = ',')]
    pub node_ids: Vec<u64>,
    /// Issue from the CA already in DIR (ca.pem and ca.key) instead of making a new one.
    #[arg(long)]
    pub add: bool,
    /// Certificates for these participants, comma-separated names.
    #[arg(long, value_delimiter = ',')]
    pub participants: Vec<String>,
    /// A client certificate for the command line and applications (client:cli).
    #[arg(long)]
    pub client: bool,
    /// An admin certificate for the command line (admin:cli).
    #[arg(long)]
    pub admin: bool,
    /// How long the leaf certificates are valid, in days.
    #[arg(long, default_value_t = LEAF_LIFETIME_DAYS, value_parser = clap::value_parser!(i64).range(1..=825))]
    pub days: i64,
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<u8> {
    match cmd {
        CertsCommand::Init(args) => init(&args),
        CertsCommand::Show { file } => show(&file),
    }
}

/// Every identity `args` asks for.
fn identities(args: &InitArgs) -> anyhow::Result<Vec<Identity>> {
    let mut ids: Vec<Identity> = (1..=args.nodes).chain(args.node_ids.iter().copied()).map(Identity::node).collect();
    anyhow::ensure!(ids.iter().all(|id| id.name != "0"), "node ids start at 1");
    for name in &args.participants {
        let name: twopc_proto::ParticipantId = name.parse()?;
        ids.push(Identity::participant(name.as_str()));
    }
    if args.client {
        ids.push(Identity::client(CLI_NAME));
    }
    if args.admin {
        ids.push(Identity::admin(CLI_NAME));
    }
    anyhow::ensure!(
        !ids.is_empty(),
        "nothing to make: pass --nodes N, --node-ids IDS, --participants NAMES, --client or --admin"
    );
    Ok(ids)
}

fn init(args: &InitArgs) -> anyhow::Result<u8> {
    let ids = identities(args)?;
    let ca = if args.add {
        CertAuthority::load(&args.dir).context("--add issues from the CA in --dir")?
    } else {
        let ca = CertAuthority::new("twopc CA", CA_LIFETIME_DAYS)?;
        ca.write_ca(&args.dir)?;
        println!("{}  CA, valid {CA_LIFETIME_DAYS} days (keep ca.key offline)", args.dir.join("ca.pem").display());
        ca
    };
    for id in &ids {
        let path = ca.write_issued(&args.dir, id, args.days)?;
        println!("{}  {id}, valid {} days", path.display(), args.days);
    }
    Ok(EXIT_OK)
}

fn show(file: &Path) -> anyhow::Result<u8> {
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(&text)
        .map(|c: rustls_pki_types::CertificateDer<'_>| c.to_vec())
        .map_err(|e| anyhow::anyhow!("{}: no PEM certificate in it: {e}", file.display()))?;
    let cert = CertSummary::parse(&der)?;
    println!("subject:    {}", cert.subject);
    println!("issuer:     {}", cert.issuer);
    println!("valid:      {} .. {}", cert.not_before, cert.not_after);
    println!("names:      {}", cert.sans.join(", "));
    let grants = match (&cert.identity, cert.is_ca) {
        (_, true) => "a CA: signs the cluster's certificates; grants no calls".to_owned(),
        (None, false) => "nothing: it names no spiffe://twopc/<role>/<name> identity".to_owned(),
        (Some(id), false) => format!("{id}: {}", grants(id.role)),
    };
    println!("identity:   {grants}");
    Ok(EXIT_OK)
}

/// What a role may call (the table in docs/SECURITY.md).
fn grants(role: Role) -> &'static str {
    match role {
        Role::Node => "RaftPeer; Prepare/Decide on participants",
        Role::Participant => "Resolve and RegisterParticipant for itself only",
        Role::Client => "Submit, GetTransaction, ListTransactions, ClusterStatus; the bank API",
        Role::Admin => "the Admin service, the client API and the bank API",
    }
}
