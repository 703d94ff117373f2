//! A local cluster of child processes of this executable: coordinators and
//! banks on loopback ports, each with its own data dir and log file,
//! restartable with the same arguments. `twopc demo` and `twopc bench --local`
//! both run on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::process::{Child, Command};
use twopc_client::ClusterClient;
use twopc_proto::pb;
use twopc_proto::pb::bank_client::BankClient;

/// How long callers wait for the cluster, a bank, or in-doubt branches.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One child process, restartable with the same arguments.
pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    /// Set in its environment (beside what it inherits).
    pub env: Vec<(&'static str, std::ffi::OsString)>,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Proc {
    pub fn start(&mut self, exe: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(exe)
            .args(&self.args)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// The data directory it was started with (`--data-dir`), if any.
    pub fn data_dir(&self) -> Option<&Path> {
        self.args.iter().skip_while(|a| *a != "--data-dir").nth(1).map(Path::new)
    }

    /// The running child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL: no chance to flush anything.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

/// What to start.
pub struct Spec {
    /// Coordinator nodes (ids 1..=n).
    pub coordinators: u64,
    /// Bank names, one process each.
    pub banks: Vec<String>,
    /// Extra arguments for every `twopc coordinator`.
    pub coordinator_args: Vec<String>,
    /// Extra arguments for every `twopc bank`.
    pub bank_args: Vec<String>,
    /// Set in every `twopc bank`'s environment (NATS credentials).
    pub bank_env: Vec<(&'static str, std::ffi::OsString)>,
    /// Mutual TLS: certificates for every process are made in `dir/tls` and
    /// this process uses them too (as `admin:cli`).
    pub tls: bool,
}

/// The processes of a local cluster and where they listen. The processes
/// are locked only to kill or restart one.
pub struct LocalCluster {
    pub exe: PathBuf,
    pub coordinators: Vec<tokio::sync::Mutex<Proc>>,
    pub banks: Vec<tokio::sync::Mutex<Proc>>,
    pub coordinator_addrs: Vec<String>,
    pub bank_names: Vec<String>,
    pub bank_addrs: Vec<String>,
}

impl LocalCluster {
    /// Picks ports and lays out data dirs and logs under `dir` (logs in
    /// `dir/logs`); starts nothing.
    pub fn build(dir: &Path, spec: &Spec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("creating {}", dir.display()))?;
        let exe = std::env::current_exe().context("finding this executable")?;
        let tls_args = if spec.tls { make_certs(&dir.join("tls"), spec)? } else { Vec::new() };
        let coordinator_addrs: Vec<String> =
            (0..spec.coordinators).map(|_| loopback_addr()).collect::<Result<_, _>>()?;
        let bank_addrs: Vec<String> = spec.banks.iter().map(|_| loopback_addr()).collect::<Result<_, _>>()?;
        let peers =
            coordinator_addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let coordinators = (1..=spec.coordinators)
            .map(|id| {
                let mut args = vec![
                    "coordinator".into(),
                    "--id".into(),
                    id.to_string(),
                    "--peers".into(),
                    peers.clone(),
                    "--data-dir".into(),
                    dir.join(format!("coordinator-{id}")).display().to_string(),
                ];
                args.extend(spec.coordinator_args.iter().cloned());
                args.extend(tls_args.iter().cloned());
                Proc {
                    name: format!("coordinator {id}"),
                    args,
                    log: dir.join("logs").join(format!("coordinator-{id}.log")),
                    env: Vec::new(),
                    child: None,
                }
            })
            .map(tokio::sync::Mutex::new)
            .collect();
        let banks = spec
            .banks
            .iter()
            .zip(&bank_addrs)
            .map(|(name, addr)| {
                let mut args = vec![
                    "bank".into(),
                    "--name".into(),
                    name.clone(),
                    "--listen".into(),
                    addr.clone(),
                    "--data-dir".into(),
                    dir.join(name).display().to_string(),
                    "--coordinators".into(),
                    coordinator_addrs.join(","),
                ];
                args.extend(spec.bank_args.iter().cloned());
                args.extend(tls_args.iter().cloned());
                let log = dir.join("logs").join(format!("{name}.log"));
                Proc { name: name.clone(), args, log, env: spec.bank_env.clone(), child: None }
            })
            .map(tokio::sync::Mutex::new)
            .collect();
        Ok(Self { exe, coordinators, banks, coordinator_addrs, bank_names: spec.banks.clone(), bank_addrs })
    }

    /// Starts every process.
    pub async fn start_all(&self) -> anyhow::Result<()> {
        for proc in self.coordinators.iter().chain(self.banks.iter()) {
            proc.lock().await.start(&self.exe)?;
        }
        Ok(())
    }

    /// Registers every bank's name and address with the cluster.
    pub async fn register_banks(&self, client: &ClusterClient) -> anyhow::Result<()> {
        for (name, addr) in self.bank_names.iter().zip(&self.bank_addrs) {
            let request = pb::RegisterParticipantRequest { name: name.clone(), addr: addr.clone() };
            client
                .admin(|mut c| {
                    let request = request.clone();
                    async move { c.register_participant(request).await }
                })
                .await
                .with_context(|| format!("registering {name}"))?;
        }
        Ok(())
    }

    /// Stops every process (banks first).
    pub async fn stop_all(&self) {
        for proc in self.banks.iter().chain(self.coordinators.iter()) {
            proc.lock().await.stop().await;
        }
    }
}

/// Makes a CA and certificates for every process of `spec` (and this one) in
/// `dir`, switches this process to them, and returns the children's arguments.
fn make_certs(dir: &Path, spec: &Spec) -> anyhow::Result<Vec<String>> {
    let ca = twopc_proto::certs::CertAuthority::new("twopc local CA", 1)?;
    ca.write_ca(dir)?;
    let mut ids: Vec<_> = (1..=spec.coordinators).map(twopc_proto::tls::Identity::node).collect();
    ids.extend(spec.banks.iter().map(|b| twopc_proto::tls::Identity::participant(b)));
    ids.push(twopc_proto::tls::Identity::admin(super::certs::CLI_NAME));
    for id in &ids {
        ca.write_issued(dir, id, 1)?;
    }
    super::certs::set_tls_args(super::certs::TlsArgs { tls_dir: Some(dir.to_owned()), insecure: false });
    Ok(vec!["--tls-dir".into(), dir.display().to_string()])
}

fn loopback_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

pub fn free_port() -> anyhow::Result<u16> {
    // Bound and released at once; the child binds it a moment later.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A client of bank `name`'s own API at `addr` (over TLS if this process has it).
pub async fn bank_client(name: &str, addr: &str) -> anyhow::Result<BankClient<tonic::transport::Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5));
    let dial = match super::certs::cli_tls()? {
        Some(tls) => Some(tls.dial(&twopc_proto::tls::Identity::participant(name).dns_name())?),
        None => None,
    };
    let channel = twopc_proto::net::connect_with(&endpoint, dial).await?;
    Ok(BankClient::new(channel))
}

/// Polls `check` every 50 ms until it returns a value, for at most [`SETTLE_TIMEOUT`].
pub async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {SETTLE_TIMEOUT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The current leader's id, if the cluster knows one.
pub async fn leader(client: &ClusterClient) -> Option<u64> {
    let status =
        client.coordinator(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await }).await.ok()?;
    (status.leader_id != 0).then_some(status.leader_id)
}
