//! A cluster of real `twopc` processes (3 coordinators, 2 banks) on
//! 127.0.0.1, driven through the command line as a user would.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use twopc_proto::pb;
use twopc_proto::pb::bank_client::BankClient;

/// The binary under test.
pub const TWOPC: &str = env!("CARGO_BIN_EXE_twopc");

/// Every environment variable `twopc` reads NATS settings from: a test that
/// gives its own removes them, so a developer's shell cannot change it.
pub const NATS_ENV: [&str; 8] = [
    "TWOPC_NATS_URL",
    "TWOPC_NATS_CA",
    "TWOPC_NATS_CERT",
    "TWOPC_NATS_KEY",
    "TWOPC_NATS_TOKEN",
    "TWOPC_NATS_USER",
    "TWOPC_NATS_PASSWORD",
    "TWOPC_NATS_NKEY",
];
/// How long the tests wait for processes to come up or settle: a bound,
/// polled. Eight clusters of five processes start at once in one test
/// binary on two cores, and one took longer than 30 s to register.
pub const SETTLE: Duration = Duration::from_secs(60);

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("an ephemeral port");
    let addr = listener.local_addr().expect("its address");
    format!("127.0.0.1:{}", addr.port())
}

/// One child process, restartable with the same arguments.
pub struct Proc {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(TWOPC)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start twopc");
        self.child = Some(child);
    }

    /// SIGKILL: the process gets no chance to flush or say goodbye.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The running child's process id (for `kill -STOP`, `kill -CONT`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts it again with the same arguments and data dir.
    pub fn restart(&mut self) {
        self.start();
    }
}

/// 3 coordinators and banks bank-a and bank-b, registered.
pub struct Processes {
    pub dir: tempfile::TempDir,
    pub coordinators: Vec<Proc>,
    pub coordinator_addrs: Vec<String>,
    pub banks: Vec<Proc>,
    pub bank_addrs: Vec<String>,
    /// Where `twopc certs init` put the cluster's certificates, when it runs over mutual TLS.
    pub tls_dir: Option<PathBuf>,
}

impl Processes {
    /// Starts everything and waits until the banks are registered and serving.
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// As [`Processes::start`], with `bank_b_args` added to bank-b's command
    /// line (such as `--store postgres://...`).
    pub async fn start_with(bank_b_args: Vec<String>) -> Self {
        Self::start_opts(Vec::new(), bank_b_args, false).await
    }

    /// As [`Processes::start`], with `bank_args` added to both banks'
    /// command lines (such as `--events-nats URL`).
    pub async fn start_with_banks(bank_args: Vec<String>) -> Self {
        Self::start_opts(bank_args, Vec::new(), false).await
    }

    /// As [`Processes::start`], every process and command over mutual TLS
    /// with certificates from `twopc certs init`.
    pub async fn start_tls() -> Self {
        Self::start_opts(Vec::new(), Vec::new(), true).await
    }

    /// Starts everything: `bank_args` added to both banks' command lines,
    /// `bank_b_args` to bank-b's, and over mutual TLS if `tls`.
    pub async fn start_opts(bank_args: Vec<String>, bank_b_args: Vec<String>, tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls_dir = tls.then(|| dir.path().join("tls"));
        if let Some(tls_dir) = &tls_dir {
            let out = std::process::Command::new(TWOPC)
                .args(["certs", "init", "--nodes", "3", "--participants", "bank-a,bank-b", "--client", "--admin"])
                .arg("--dir")
                .arg(tls_dir)
                .output()
                .expect("run twopc certs init");
            assert!(out.status.success(), "certs init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let coordinator_addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let bank_addrs: Vec<String> = (0..2).map(|_| free_addr()).collect();
        let peers = coordinator_addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>();
        let mut coordinators: Vec<Proc> = (1..=3)
            .map(|id| Proc {
                args: vec![
                    "coordinator".into(),
                    "--id".into(),
                    id.to_string(),
                    "--peers".into(),
                    peers.join(","),
                    "--data-dir".into(),
                    dir.path().join(format!("c{id}")).display().to_string(),
                ],
                log: dir.path().join(format!("c{id}.log")),
                child: None,
            })
            .collect();
        let mut banks: Vec<Proc> = ["bank-a", "bank-b"]
            .iter()
            .zip(&bank_addrs)
            .map(|(name, addr)| Proc {
                args: vec![
                    "bank".into(),
                    "--name".into(),
                    (*name).into(),
                    "--listen".into(),
                    addr.clone(),
                    "--data-dir".into(),
                    dir.path().join(name).display().to_string(),
                    "--coordinators".into(),
                    coordinator_addrs.join(","),
                    "--register".into(),
                    "--in-doubt-timeout-ms".into(),
                    "500".into(),
                ],
                log: dir.path().join(format!("{name}.log")),
                child: None,
            })
            .collect();
        for bank in &mut banks {
            bank.args.extend(bank_args.iter().cloned());
        }
        banks[1].args.extend(bank_b_args);
        for proc in coordinators.iter_mut().chain(banks.iter_mut()) {
            if let Some(tls_dir) = &tls_dir {
                proc.args.extend(["--tls-dir".into(), tls_dir.display().to_string()]);
            }
            proc.start();
        }
        let processes = Self { dir, coordinators, coordinator_addrs, banks, bank_addrs, tls_dir };
        processes
            .wait("both banks registered", |p| async move {
                let out = p.twopc(&["participants", "list", "--json"]).await;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                (out.status.success() && text.contains("bank-a") && text.contains("bank-b")).then_some(())
            })
            .await;
        processes
    }

    /// Runs `twopc ARGS` against this cluster and returns its output.
    pub async fn twopc(&self, args: &[&str]) -> Output {
        let mut command = Command::new(TWOPC);
        command.args(args).env("TWOPC_COORDINATORS", self.coordinator_addrs.join(","));
        match &self.tls_dir {
            Some(dir) => command.env("TWOPC_TLS_DIR", dir),
            None => command.env_remove("TWOPC_TLS_DIR"),
        };
        command.output().await.expect("run twopc")
    }

    /// `twopc ARGS` without any TLS files, whatever the cluster runs.
    pub async fn twopc_plaintext(&self, args: &[&str]) -> Output {
        Command::new(TWOPC)
            .args(args)
            .env("TWOPC_COORDINATORS", self.coordinator_addrs.join(","))
            .env_remove("TWOPC_TLS_DIR")
            .output()
            .await
            .expect("run twopc")
    }

    /// Polls `check` until it returns Some, or panics after [`SETTLE`] naming `what`.
    pub async fn wait<'a, T, F, Fut>(&'a self, what: &str, check: F) -> T
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(value) = check(self).await {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; logs in {}", self.dir.path().display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The TLS the test itself uses as a client (`admin:cli`), when the cluster runs over TLS.
    pub fn client_tls(&self) -> Option<twopc_proto::tls::Tls> {
        let dir = self.tls_dir.as_ref()?;
        Some(twopc_proto::tls::TlsConfig::new(dir).load(&twopc_proto::tls::Identity::admin("cli")).expect("admin-cli"))
    }

    /// A connected channel to coordinator `addr` (over TLS if the cluster runs it).
    pub async fn coordinator_channel(&self, addr: &str) -> Option<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
        let dial = match self.client_tls() {
            Some(tls) => Some(tls.dial(twopc_proto::tls::ANY_NODE_DNS).ok()?),
            None => None,
        };
        twopc_proto::net::connect_with(&endpoint, dial).await.ok()
    }

    /// A Bank API client of bank `index` (0 = bank-a).
    pub async fn bank(&self, index: usize) -> Option<BankClient<tonic::transport::Channel>> {
        self.bank_channel(index).await.map(BankClient::new)
    }

    /// A connected channel to bank `index` (0 = bank-a), over TLS if the cluster runs it.
    pub async fn bank_channel(&self, index: usize) -> Option<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.bank_addrs[index])).ok()?;
        let dial = match &self.tls_dir {
            Some(dir) => {
                let tls = twopc_proto::tls::TlsConfig::new(dir).load(&twopc_proto::tls::Identity::admin("cli")).ok()?;
                let name = ["bank-a", "bank-b"][index];
                Some(tls.dial(&twopc_proto::tls::Identity::participant(name).dns_name()).ok()?)
            }
            None => None,
        };
        twopc_proto::net::connect_with(&endpoint, dial).await.ok()
    }

    /// A leader-following client of the cluster, as an application would hold.
    pub fn cluster_client(&self) -> twopc_client::ClusterClient {
        let config = twopc_client::ClientConfig { tls: self.client_tls(), ..Default::default() };
        twopc_client::ClusterClient::new(self.coordinator_addrs.clone(), config).expect("a cluster client")
    }

    /// The id of the coordinator that leads now (1-based, as `--id`).
    pub async fn leader(&self) -> Option<u64> {
        let client = self.cluster_client();
        let status = client
            .coordinator(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
            .await
            .ok()?;
        (status.leader_id != 0).then_some(status.leader_id)
    }

    /// (balance, held + incoming) summed over both banks.
    pub async fn totals(&self) -> Option<(i64, i64)> {
        let mut balance = 0;
        let mut staged = 0;
        for index in 0..self.bank_addrs.len() {
            let t = self.bank(index).await?.total(pb::TotalRequest {}).await.ok()?.into_inner();
            balance += t.balance_total_minor;
            staged += t.held_total_minor + t.incoming_total_minor;
        }
        Some((balance, staged))
    }

    /// An account's balance in minor units.
    pub async fn balance(&self, index: usize, account: &str) -> Option<i64> {
        let response = self.bank(index).await?.balance(pb::BalanceRequest { account: account.into() }).await.ok()?;
        response.into_inner().account.map(|a| a.balance_minor)
    }
}

/// The output's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The output's stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `twopc demo ARGS` to the end (at most `limit`) and returns its
/// stdout, after checking it exited 0 and conserved money (I8).
pub async fn demo(args: &[&str], limit: Duration) -> String {
    // Its output goes to files, so a demo that overruns `limit` shows how far
    // it got.
    let dir = tempfile::tempdir().expect("a temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let file = |path: &PathBuf| std::fs::File::create(path).expect("an output file");
    let mut child = Command::new(TWOPC)
        .arg("demo")
        .args(args)
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .kill_on_drop(true)
        .spawn()
        .expect("the demo starts");
    let read = |path: &PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let Ok(status) = tokio::time::timeout(limit, child.wait()).await else {
        let _ = child.kill().await;
        let tail = |text: String| {
            text.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        panic!(
            "demo {args:?} did not finish within {limit:?}; its stdout:\n{}\nthe end of its stderr:\n{}",
            read(&out_path),
            tail(read(&err_path))
        );
    };
    let out = Output {
        status: status.expect("the demo ran"),
        stdout: read(&out_path).into(),
        stderr: read(&err_path).into(),
    };
    let (stdout, stderr) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "demo {args:?} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("money conserved: yes"), "{stdout}");
    stdout
}
