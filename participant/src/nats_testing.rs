//! Helpers for tests against a real NATS server with JetStream (features
//! `events` and `testing`): find the server or say why the test is skipped,
//! name throwaway streams and subject prefixes uniquely, and clean up; and
//! start a server of a test's own that requires TLS and credentials
//! ([`SecureNats`]).
//!
//! The server is `TWOPC_NATS_URL` (default `nats://127.0.0.1:4222`) and must
//! have JetStream enabled. Where it is unreachable or has no JetStream,
//! [`server`] prints why and returns None, so the test passes as skipped,
//! unless `TWOPC_REQUIRE_NATS=1` (set by `.ci/run`), when it panics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;

/// The server tests use when `TWOPC_NATS_URL` is unset.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// A reachable NATS server with JetStream.
#[derive(Debug, Clone)]
pub struct TestNats {
    /// Its URL.
    pub url: String,
    /// A connected client.
    pub client: async_nats::Client,
    /// JetStream on that client.
    pub jetstream: jetstream::Context,
}

/// The test server, or None (after printing why `test` is skipped) when
/// there is none and `TWOPC_REQUIRE_NATS` is not `1`.
///
/// # Panics
/// When `TWOPC_REQUIRE_NATS=1` and the server is unreachable or has no JetStream.
pub async fn server(test: &str) -> Option<TestNats> {
    let url = std::env::var("TWOPC_NATS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let required = std::env::var("TWOPC_REQUIRE_NATS").is_ok_and(|v| v == "1");
    match check(&url).await {
        Ok((client, jetstream)) => Some(TestNats { url, client, jetstream }),
        Err(why) if required => panic!("{test}: NATS with JetStream is required (TWOPC_REQUIRE_NATS=1) but {why}"),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set TWOPC_REQUIRE_NATS=1 to fail instead)");
            None
        }
    }
}

async fn check(url: &str) -> Result<(async_nats::Client, jetstream::Context), String> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(url)
        .await
        .map_err(|e| format!("no NATS server answers at {url}: {e}"))?;
    let jetstream = jetstream::new(client.clone());
    // The raw account-info request: the client's typed answer expects
    // fields newer servers send.
    let info = client
        .request("$JS.API.INFO", bytes::Bytes::new())
        .await
        .map_err(|e| format!("the NATS server at {url} has no JetStream (start it with -js): {e}"))?;
    let info = String::from_utf8_lossy(&info.payload);
    if info.contains("\"error\"") {
        return Err(format!("the NATS server at {url} refuses JetStream: {info}"));
    }
    Ok((client, jetstream))
}

/// A name no other test (or earlier run) uses, of `[A-Za-z0-9_]`: for a
/// stream name (`TEST_...`) or a subject prefix.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

impl TestNats {
    /// Every message in `stream`, in stream order, as (Nats-Msg-Id, subject,
    /// payload), read with an ephemeral consumer; waits up to `wait` for the
    /// stream to hold at least `at_least` messages.
    ///
    /// # Panics
    /// When the stream cannot be read, or holds fewer messages after `wait`.
    pub async fn messages(&self, stream: &str, at_least: u64, wait: Duration) -> Vec<(String, String, bytes::Bytes)> {
        let give_up = tokio::time::Instant::now() + wait;
        let mut stream_handle = self.jetstream.get_stream(stream).await.expect("the stream exists");
        loop {
            let info = stream_handle.info().await.expect("stream info");
            if info.state.messages >= at_least || tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let count = stream_handle.info().await.expect("stream info").state.messages;
        assert!(
            count >= at_least,
            "stream {stream} holds {count} messages after {wait:?}, expected at least {at_least}"
        );
        let mut out = Vec::with_capacity(count as usize);
        for seq in 1..=stream_handle.info().await.expect("stream info").state.last_sequence {
            let Ok(message) = stream_handle.get_raw_message(seq).await else { continue };
            let id = message.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()).unwrap_or_default();
            out.push((id, message.subject.to_string(), message.payload));
        }
        out
    }

    /// Deletes `stream`, ignoring a stream that is already gone.
    pub async fn delete_stream(&self, stream: &str) {
        let _ = self.jetstream.delete_stream(stream).await;
    }
}

/// A TCP proxy in front of the NATS server that a test can cut and restore,
/// so a client sees the server go away (every connection dropped, new ones
/// closed at once) and come back, while the real server keeps running for
/// every other test.
pub struct NatsProxy {
    /// The URL clients use, `nats://127.0.0.1:PORT`.
    pub url: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl NatsProxy {
    /// A proxy to `upstream` (host:port or `nats://host:port`), up.
    ///
    /// # Panics
    /// When it cannot listen on loopback.
    pub async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("nats://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy listens");
        let url = format!("nats://{}", listener.local_addr().expect("proxy address"));
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (up, connections) = (up.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().push(task.abort_handle());
                }
            }
        });
        Self { url, up, connections, accept }
    }

    /// Drops every connection and refuses new ones until [`NatsProxy::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().drain(..) {
            connection.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The files of a TLS setup for [`SecureNats`]: the CA, and the server's
/// certificate and key, all PEM.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    /// The CA certificate that signs the server's and the clients' certificates.
    pub ca: std::path::PathBuf,
    /// The server's certificate (for `localhost` / 127.0.0.1).
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
}

impl ServerTlsFiles {
    /// A CA, a server certificate for localhost and a client certificate,
    /// as PEM files in `dir`: the server's files, and the client's (cert, key).
    ///
    /// # Panics
    /// When a certificate cannot be made or a file written.
    pub fn write_with_client(dir: &std::path::Path) -> (Self, (std::path::PathBuf, std::path::PathBuf)) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "twopc test NATS CA");
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write a PEM file");
            path
        };
        let leaf = |name: &str, hosts: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(hosts).expect("params").signed_by(&key, &issuer).expect("certificate");
            (write(&format!("{name}.pem"), cert.pem()), write(&format!("{name}.key"), key.serialize_pem()))
        };
        let (cert, key) = leaf("server", vec!["localhost".into(), "127.0.0.1".into()]);
        let client = leaf("client", vec!["nats-client".into()]);
        (Self { ca: write("ca.pem", ca_cert.pem()), cert, key }, client)
    }
}

/// The credentials a [`SecureNats`] requires.
#[derive(Debug, Clone, Copy)]
pub enum ServerAuth<'a> {
    /// This token.
    Token(&'a str),
    /// The NKey user with this public key (`U...`).
    NkeyUser(&'a str),
}

/// A nats-server of a test's own, with JetStream, that requires TLS,
/// verifies client certificates against the CA, and requires the
/// credentials its [`ServerAuth`] names.
/// Started from the `nats-server` binary (`TWOPC_NATS_SERVER`, else found
/// on PATH or in /usr/sbin); killed when dropped.
pub struct SecureNats {
    /// Its URL, `tls://localhost:PORT`.
    pub url: String,
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
    tls: ServerTlsFiles,
}

impl SecureNats {
    /// Starts the server with its files under `dir`, or None (after
    /// printing why `test` is skipped) when there is no nats-server binary
    /// and `TWOPC_REQUIRE_NATS` is not `1`.
    ///
    /// # Panics
    /// When the binary is required and missing, or the server does not
    /// accept connections within 10 s.
    pub async fn start(test: &str, dir: &std::path::Path, tls: &ServerTlsFiles, auth: ServerAuth<'_>) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let config = dir.join("nats-server.conf");
        write_config(&config, port, dir, tls, auth);
        let binaries = std::env::var("TWOPC_NATS_SERVER")
            .map_or_else(|_| vec!["nats-server".to_owned(), "/usr/sbin/nats-server".to_owned()], |bin| vec![bin]);
        let log = std::fs::File::create(dir.join("nats-server.log")).expect("the server's log");
        let spawned = binaries.iter().find_map(|bin| {
            std::process::Command::new(bin)
                .arg("-c")
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(log.try_clone().expect("the server's log"))
                .spawn()
                .ok()
        });
        let Some(child) = spawned else {
            let why = format!("no nats-server binary (tried {binaries:?}; set TWOPC_NATS_SERVER)");
            if std::env::var("TWOPC_REQUIRE_NATS").is_ok_and(|v| v == "1") {
                panic!("{test}: a nats-server binary is required (TWOPC_REQUIRE_NATS=1) but {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        };
        let server =
            Self { url: format!("tls://localhost:{port}"), child, port, dir: dir.to_owned(), tls: tls.clone() };
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap_or_default();
            assert!(tokio::time::Instant::now() < give_up, "{test}: nats-server did not start within 10 s:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(server)
    }
}

impl SecureNats {
    /// Makes the server require `auth` from now on: rewrites its config and
    /// has it reload (SIGHUP), which closes connections `auth` no longer
    /// admits; returns once the server's log says it reloaded.
    ///
    /// # Panics
    /// When the config cannot be written, the signal sent, or the reload is
    /// not logged within 10 s.
    pub async fn reload(&self, auth: ServerAuth<'_>) {
        const RELOADED: &str = "Reloaded server configuration";
        let log = self.dir.join("nats-server.log");
        let reloads = || std::fs::read_to_string(&log).unwrap_or_default().matches(RELOADED).count();
        let before = reloads();
        write_config(&self.dir.join("nats-server.conf"), self.port, &self.dir, &self.tls, auth);
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("run kill -HUP");
        assert!(status.success(), "kill -HUP {} failed", self.child.id());
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while reloads() == before {
            assert!(tokio::time::Instant::now() < give_up, "nats-server did not log {RELOADED:?} within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Writes a [`SecureNats`] config: JetStream under `dir`, TLS verifying
/// clients, and `auth`.
fn write_config(
    config: &std::path::Path,
    port: u16,
    dir: &std::path::Path,
    tls: &ServerTlsFiles,
    auth: ServerAuth<'_>,
) {
    let authorization = match auth {
        ServerAuth::Token(token) => format!("authorization {{ token: {token:?} }}"),
        ServerAuth::NkeyUser(public) => format!("authorization {{ users = [ {{ nkey: {public:?} }} ] }}"),
    };
    let text = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {store:?} }}\n\
         tls {{ cert_file: {cert:?}, key_file: {key:?}, ca_file: {ca:?}, verify: true, timeout: 2 }}\n\
         {authorization}\n",
        store = dir.join("jetstream"),
        cert = tls.cert,
        key = tls.key,
        ca = tls.ca,
    );
    std::fs::write(config, text).expect("write the server's config");
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
