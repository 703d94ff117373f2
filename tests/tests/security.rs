//! Mutual TLS and roles end to end (docs/SECURITY.md): a 3-node cluster and
//! two participant library servers, every connection over mutual TLS with
//! certificates made in the test's temporary directory. Transfers commit,
//! and each refusal of issue 15's list comes with its status: no identity
//! reaches a method its role does not grant, and no decision reaches a
//! server that cannot prove it is the participant registered.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use twopc_client::{ClientConfig, ClusterClient};
use twopc_participant::memory::MemoryResource;
use twopc_participant::{Participant, ParticipantConfig};
use twopc_proto::certs::CertAuthority;
use twopc_proto::pb;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::pb::raft_peer_client::RaftPeerClient;
use twopc_proto::tls::{ANY_NODE_DNS, Identity, Tls, TlsConfig};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnId, net};
use twopc_tests::cluster::Cluster;

struct SecureParticipant {
    resource: Arc<MemoryResource>,
    tls: Tls,
    addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
}

struct Setup {
    dir: tempfile::TempDir,
    cluster: Cluster,
    a: SecureParticipant,
    b: SecureParticipant,
    admin: ClusterClient,
}

fn load(dir: &Path, id: &Identity) -> anyhow::Result<Tls> {
    Ok(TlsConfig::new(dir).load(id)?)
}

async fn participant(dir: &Path, name: &str, coordinators: Vec<String>) -> anyhow::Result<SecureParticipant> {
    let mut config = ParticipantConfig::new(name.parse()?, coordinators);
    let tls = load(dir, &Identity::participant(name))?;
    config.tls = Some(tls.clone());
    let resource = Arc::new(MemoryResource::new());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(Participant::new(resource.clone(), config)?.serve(listener, async move {
        let _ = stopped.await;
    }));
    Ok(SecureParticipant { resource, tls, addr, _stop: stop })
}

fn client(cluster: &Cluster, tls: Option<Tls>) -> anyhow::Result<ClusterClient> {
    let config = ClientConfig { retry_budget_ms: 3_000, tls, ..ClientConfig::default() };
    Ok(ClusterClient::new(cluster.addrs(), config)?)
}

async fn register(admin: &ClusterClient, name: &str, addr: std::net::SocketAddr) -> Result<(), Status> {
    let request = pb::RegisterParticipantRequest { name: name.to_owned(), addr: addr.to_string() };
    admin
        .admin(|mut c| {
            let request = request.clone();
            async move { c.register_participant(request).await }
        })
        .await
        .map(|_| ())
}

/// The CA, nodes 1-3, participants a and b, a client and an admin; a TLS
/// cluster with a and b registered.
async fn setup() -> anyhow::Result<Setup> {
    setup_keeping(Arc::default()).await
}

/// Every identity of [`setup`].
fn identities() -> [Identity; 7] {
    [
        Identity::node(1),
        Identity::node(2),
        Identity::node(3),
        Identity::participant("a"),
        Identity::participant("b"),
        Identity::client("app"),
        Identity::admin("ops"),
    ]
}

/// [`setup`], keeping each node's TLS handle in `nodes` (to reload it).
async fn setup_keeping(nodes: Arc<parking_lot::Mutex<Vec<Tls>>>) -> anyhow::Result<Setup> {
    twopc_tests::init_tracing();
    let dir = tempfile::tempdir()?;
    let ca = CertAuthority::new("twopc test CA", 1)?;
    ca.write_ca(dir.path())?;
    for id in &identities() {
        ca.write_issued(dir.path(), id, 1)?;
    }
    let certs = dir.path().to_owned();
    let cluster = Cluster::start_with(
        3,
        Box::new(move |config| {
            let tls = TlsConfig::new(&certs).load(&Identity::node(config.id)).expect("node certificate");
            nodes.lock().push(tls.clone());
            config.tls = Some(tls);
        }),
    )
    .await?;
    cluster.wait_for_leader().await?;
    let a = participant(dir.path(), "a", cluster.addrs()).await?;
    let b = participant(dir.path(), "b", cluster.addrs()).await?;
    let admin = client(&cluster, Some(load(dir.path(), &Identity::admin("ops"))?))?;
    register(&admin, "a", a.addr).await?;
    register(&admin, "b", b.addr).await?;
    Ok(Setup { dir, cluster, a, b, admin })
}

fn transfer(txn_id: TxnId) -> pb::SubmitRequest {
    let branch = |p: &str| pb::Branch { participant: p.to_owned(), payload: bytes::Bytes::from_static(b"x") };
    pb::SubmitRequest {
        txn_id: txn_id.to_string(),
        branches: vec![branch("a"), branch("b")],
        deadline_unix_ms: unix_now_ms() + 10_000,
    }
}

async fn submit(client: &ClusterClient, request: pb::SubmitRequest) -> Result<pb::SubmitResponse, Status> {
    client
        .coordinator(|mut c| {
            let request = request.clone();
            async move { c.submit(request).await }
        })
        .await
}

/// A channel to node `addr` as `who`, which checks the server is a node.
fn channel_as(dir: &Path, who: &Identity, addr: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(Duration::from_secs(5));
    Ok(net::lazy_channel_with(&endpoint, Some(load(dir, who)?.dial(ANY_NODE_DNS)?)))
}

fn assert_denied(status: &Status, needs: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(needs), "expected {needs:?} in {:?}", status.message());
}

#[tokio::test]
async fn transfers_commit_with_every_connection_over_mutual_tls() -> anyhow::Result<()> {
    let s = setup().await?;
    let app = client(&s.cluster, Some(load(s.dir.path(), &Identity::client("app"))?))?;
    for _ in 0..5 {
        let txn = TxnId::new();
        let response = submit(&app, transfer(txn)).await?;
        assert_eq!(response.decision, i32::from(pb::Decision::Commit), "{response:?}");
        // Phase 2 follows the answer (docs/PROTOCOL.md §5, §13.2).
        twopc_tests::wait::until("both banks to commit", Duration::from_secs(20), || async {
            ((s.a.resource.commit_count(txn), s.b.resource.commit_count(txn)) == (1, 1)).then_some(())
        })
        .await?;
    }
    s.cluster.stop().await
}

#[tokio::test]
async fn a_plaintext_client_gets_nothing_from_a_tls_cluster() -> anyhow::Result<()> {
    let s = setup().await?;
    let txn = TxnId::new();
    let status = submit(&client(&s.cluster, None)?, transfer(txn)).await.expect_err("plaintext");
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown), "{status:?}");
    assert_eq!(s.a.resource.prepare_calls(txn), 0);
    s.cluster.stop().await
}

#[tokio::test]
async fn a_certificate_from_another_ca_gets_nothing() -> anyhow::Result<()> {
    let s = setup().await?;
    let other = tempfile::tempdir()?;
    let ca = CertAuthority::new("another CA", 1)?;
    ca.write_ca(other.path())?;
    ca.write_issued(other.path(), &Identity::admin("ops"), 1)?;
    let intruder = client(&s.cluster, Some(load(other.path(), &Identity::admin("ops"))?))?;
    let status = submit(&intruder, transfer(TxnId::new())).await.expect_err("another CA");
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown), "{status:?}");
    s.cluster.stop().await
}

#[tokio::test]
async fn a_participant_certificate_calling_admin_is_denied() -> anyhow::Result<()> {
    let s = setup().await?;
    let as_a = client(&s.cluster, Some(load(s.dir.path(), &Identity::participant("a"))?))?;
    let request = pb::DecideRequest {
        txn_id: TxnId::new().to_string(),
        decision: pb::Decision::Commit.into(),
        reason: "forced".into(),
        ..Default::default()
    };
    let status = as_a
        .admin(|mut c| {
            let request = request.clone();
            async move { c.decide(request).await }
        })
        .await
        .expect_err("participant on Admin.Decide");
    assert_denied(&status, "needs role admin");
    // Nor may a client.
    let app = client(&s.cluster, Some(load(s.dir.path(), &Identity::client("app"))?))?;
    let status = app.admin(|mut c| async move { c.list_participants(pb::ListParticipantsRequest {}).await }).await;
    assert_denied(&status.expect_err("client on Admin"), "needs role admin");
    s.cluster.stop().await
}

#[tokio::test]
async fn a_client_certificate_calling_a_participants_prepare_is_denied() -> anyhow::Result<()> {
    let s = setup().await?;
    let endpoint = Endpoint::from_shared(format!("http://{}", s.a.addr))?;
    let tls = load(s.dir.path(), &Identity::client("app"))?;
    let channel = net::lazy_channel_with(&endpoint, Some(tls.dial(&Identity::participant("a").dns_name())?));
    let txn = TxnId::new();
    let request = pb::PrepareRequest { txn_id: txn.to_string(), participant: "a".into(), ..Default::default() };
    let status = ParticipantClient::new(channel).prepare(request).await.expect_err("client on Prepare");
    assert_denied(&status, "needs role node");
    assert_eq!(s.a.resource.prepare_calls(txn), 0);
    s.cluster.stop().await
}

#[tokio::test]
async fn participant_a_may_not_resolve_register_or_join_for_b() -> anyhow::Result<()> {
    let s = setup().await?;
    let leader = s.cluster.addr(s.cluster.wait_for_leader().await?);
    let as_a = channel_as(s.dir.path(), &Identity::participant("a"), &leader)?;
    let resolve = pb::ResolveRequest { txn_id: TxnId::new().to_string(), participant: "b".into() };
    let status = CoordinatorClient::new(as_a.clone()).resolve(resolve).await.expect_err("a resolving for b");
    assert_denied(&status, "may not act for participant \"b\"");
    // Asking as itself is allowed (an unknown txn is presumed aborted).
    let own = pb::ResolveRequest { txn_id: TxnId::new().to_string(), participant: "a".into() };
    let answer = CoordinatorClient::new(as_a.clone()).resolve(own).await?.into_inner();
    assert_eq!(answer.decision, i32::from(pb::Decision::Abort));
    // Nor does it learn the decision of b's txn by asking as itself: its own
    // branch of that txn, if it held one, would abort (§6); b's commits.
    let app = client(&s.cluster, Some(load(s.dir.path(), &Identity::client("app"))?))?;
    let txn = TxnId::new();
    let mut only_b = transfer(txn);
    only_b.branches.remove(0);
    submit(&app, only_b).await?;
    // Once the explicit record, which follows the answer off the critical
    // path (§13.2), is logged.
    let logged = twopc_tests::wait::finished(&app, txn, Duration::from_secs(20)).await?;
    let peek = pb::ResolveRequest { txn_id: txn.to_string(), participant: "a".into() };
    let answer = CoordinatorClient::new(as_a.clone()).resolve(peek).await?.into_inner();
    assert_eq!(answer.decision, i32::from(pb::Decision::Abort), "a asking about b's txn");
    assert_eq!(logged.decision, i32::from(pb::Decision::Commit), "b's txn committed all the same");
    // Joining (registering) under b's name, pointing b's traffic at a: refused.
    let join = pb::RegisterParticipantRequest { name: "b".into(), addr: s.a.addr.to_string() };
    let status = twopc_proto::pb::admin_client::AdminClient::new(as_a.clone())
        .register_participant(join)
        .await
        .expect_err("a registering as b");
    assert_denied(&status, "may not act for participant \"b\"");
    // Joining b's branch into a begun txn (§12.3): refused; as itself, a joins; and a
    // client may not join at all (Join is a participant's call).
    let begun =
        app.coordinator(
            |mut c| async move { c.begin(pb::BeginRequest { txn_id: String::new(), timeout_ms: 5_000 }).await },
        );
    let txn_id = begun.await?.context.map(|c| c.txn_id).unwrap_or_default();
    let join = |participant: &str| pb::JoinRequest { txn_id: txn_id.clone(), participant: participant.into() };
    let status = CoordinatorClient::new(as_a.clone()).join(join("b")).await.expect_err("a joining as b");
    assert_denied(&status, "may not act for participant \"b\"");
    CoordinatorClient::new(as_a.clone()).join(join("a")).await?;
    let as_app = channel_as(s.dir.path(), &Identity::client("app"), &leader)?;
    let status = CoordinatorClient::new(as_app).join(join("b")).await.expect_err("a client joining");
    assert_denied(&status, "needs role participant");
    s.cluster.stop().await
}

#[tokio::test]
async fn raft_peer_is_denied_to_non_nodes_and_to_a_node_sending_as_another() -> anyhow::Result<()> {
    let s = setup().await?;
    for who in [Identity::admin("ops"), Identity::participant("a"), Identity::client("app")] {
        let channel = channel_as(s.dir.path(), &who, &s.cluster.addr(1))?;
        let batch = pb::RaftBatch { from: 2, messages: Vec::new() };
        let status = RaftPeerClient::new(channel)
            .stream(futures::stream::iter(vec![batch]))
            .await
            .expect_err("a non-node on RaftPeer");
        assert_denied(&status, "needs role node");
    }
    // A node's certificate speaks for that node only: node 3's key cannot
    // send node 2's votes or appends.
    let channel = channel_as(s.dir.path(), &Identity::node(3), &s.cluster.addr(1))?;
    let batch = pb::RaftBatch { from: 2, messages: Vec::new() };
    let status = RaftPeerClient::new(channel)
        .stream(futures::stream::iter(vec![batch]))
        .await
        .expect_err("node 3 sending as node 2");
    assert_denied(&status, "a node sends only its own messages");
    s.cluster.stop().await
}

#[tokio::test]
async fn the_coordinator_delivers_nothing_to_a_server_proving_another_participant() -> anyhow::Result<()> {
    let s = setup().await?;
    // An operator mistake or a hijacked registry: "a" now points at b's server.
    register(&s.admin, "a", s.b.addr).await?;
    let app = client(&s.cluster, Some(load(s.dir.path(), &Identity::client("app"))?))?;
    let txn = TxnId::new();
    let mut request = transfer(txn);
    request.branches.truncate(1);
    let response = submit(&app, request).await?;
    assert_eq!(response.decision, i32::from(pb::Decision::Abort), "{response:?}");
    assert!(response.reason.contains("certificate not valid for name"), "{}", response.reason);
    assert_eq!(s.b.resource.prepare_calls(txn), 0, "b's server got a's branch");
    assert_eq!(Decision::try_from(response.decision)?, Decision::Abort);
    s.cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_every_certificate_are_replaced_while_transfers_run_and_none_fails() -> anyhow::Result<()> {
    let nodes = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let s = setup_keeping(Arc::clone(&nodes)).await?;
    let dir = s.dir.path().to_owned();
    let app_tls = load(&dir, &Identity::client("app"))?;
    let app = Arc::new(client(&s.cluster, Some(app_tls.clone()))?);
    let old_dir = tempfile::tempdir()?;
    for file in std::fs::read_dir(&dir)? {
        let file = file?;
        std::fs::copy(file.path(), old_dir.path().join(file.file_name()))?;
    }

    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let load_app = Arc::clone(&app);
    let committed = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&committed);
    let transfers = tokio::spawn(async move {
        let mut failed = Vec::new();
        while !*stopped.borrow_and_update() {
            match submit(&load_app, transfer(TxnId::new())).await {
                Ok(r) if r.decision == i32::from(pb::Decision::Commit) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => failed.push(format!("aborted: {}", r.reason)),
                Err(status) => failed.push(format!("{status:?}")),
            }
        }
        failed
    });
    let mut everyone: Vec<Tls> = nodes.lock().clone();
    everyone.extend([s.a.tls.clone(), s.b.tls.clone(), app_tls.clone()]);
    let reload_all = |why: &str| -> anyhow::Result<()> {
        for tls in &everyone {
            tls.reload().map_err(|e| anyhow::anyhow!("{why}: reloading {:?}: {e}", tls.identity()))?;
        }
        Ok(())
    };
    let committed_before = wait_commits(&committed, 3).await?;

    // The documented rotation: trust both CAs, move everyone to the new CA, drop the old one.
    let old_ca = std::fs::read_to_string(dir.join("ca.pem"))?;
    let new_ca = CertAuthority::new("twopc test CA 2", 1)?;
    write_atomically(&dir.join("ca.pem"), &format!("{old_ca}{}", new_ca.pem().cert))?;
    reload_all("both CAs")?;
    for id in &identities() {
        let pem = new_ca.issue(id, 1)?;
        twopc_proto::certs::write_pair(&dir, &id.file_stem(), &pem)?;
    }
    reload_all("new certificates")?;
    write_atomically(&dir.join("ca.pem"), &new_ca.pem().cert)?;
    reload_all("new CA only")?;
    wait_commits(&committed, committed_before + 3).await?;

    stop.send(true)?;
    let failed = transfers.await?;
    assert!(failed.is_empty(), "transfers failed during the rotation: {failed:?}");
    // New connections use the new files: the old CA's certificates are refused now.
    let stale = client(&s.cluster, Some(load(old_dir.path(), &Identity::client("app"))?))?;
    let status = submit(&stale, transfer(TxnId::new())).await.expect_err("an old-CA certificate after rotation");
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown), "{status:?}");
    let fresh = client(&s.cluster, Some(load(&dir, &Identity::client("app"))?))?;
    submit(&fresh, transfer(TxnId::new())).await?;
    s.cluster.stop().await
}

/// Waits until `committed` reaches `n`; returns its value then.
async fn wait_commits(committed: &AtomicU32, n: u32) -> anyhow::Result<u32> {
    twopc_tests::wait::until("transfers to commit", Duration::from_secs(20), || async {
        let now = committed.load(Ordering::SeqCst);
        (now >= n).then_some(now)
    })
    .await
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
