//! Mutual TLS through the listener/dialer seam, and the per-call role check:
//! each refusal a TLS server or dialer must make, with the status it gives.
//! Certificates are made in each test's temporary directory.

use std::net::SocketAddr;
use std::path::Path;

use time::{Duration, OffsetDateTime};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use twopc_proto::auth::{self, AuthorizeLayer};
use twopc_proto::certs::{CertAuthority, write_pair};
use twopc_proto::net::{self, Listener};
use twopc_proto::pb;
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::pb::participant_server::{Participant, ParticipantServer};
use twopc_proto::tls::{Identity, Tls, TlsConfig};

/// Answers every Prepare YES; the test is about who gets to ask.
struct Yes;

#[tonic::async_trait]
impl Participant for Yes {
    async fn prepare(&self, _: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        Ok(Response::new(pb::PrepareResponse::default()))
    }
    async fn prepare_batch(
        &self,
        _: Request<pb::PrepareBatchRequest>,
    ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
        Ok(Response::new(pb::PrepareBatchResponse::default()))
    }
    async fn decide(&self, _: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
        Ok(Response::new(pb::DecisionResponse::default()))
    }
    async fn decide_batch(
        &self,
        _: Request<pb::DecideBatchRequest>,
    ) -> Result<Response<pb::DecideBatchResponse>, Status> {
        Ok(Response::new(pb::DecideBatchResponse::default()))
    }
    async fn recover_vote(
        &self,
        _: Request<pb::RecoverVoteRequest>,
    ) -> Result<Response<pb::RecoverVoteResponse>, Status> {
        Ok(Response::new(pb::RecoverVoteResponse::default()))
    }
}

struct Served {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Serves [`Yes`] as participant `a` over TLS (`tls` None: plaintext), with the participant policy.
async fn serve(tls: Option<Tls>) -> anyhow::Result<Served> {
    let listener = Listener::from(tokio::net::TcpListener::bind("127.0.0.1:0").await?).with_tls(tls);
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(AuthorizeLayer(auth::PARTICIPANT))
            .add_service(ParticipantServer::new(Yes))
            .serve_with_incoming_shutdown(listener.incoming(), async {
                let _ = stopped.await;
            }),
    );
    Ok(Served { addr, _stop: stop })
}

/// A CA and the certificates of node 1, participants a and b, and a client, in `dir`.
fn cluster_files(dir: &Path) -> anyhow::Result<CertAuthority> {
    let ca = CertAuthority::new("twopc test CA", 1)?;
    ca.write_ca(dir)?;
    for id in [Identity::node(1), Identity::participant("a"), Identity::participant("b"), Identity::client("app")] {
        ca.write_issued(dir, &id, 1)?;
    }
    Ok(ca)
}

/// A call the transport refused (no handshake, so no gRPC answer): tonic
/// reports Unavailable when the client side failed the handshake, and
/// Unknown when the server's alert arrives after the client sent its request.
fn assert_refused_by_transport(status: &Status, why: &str) {
    assert!(matches!(status.code(), Code::Unavailable | Code::Unknown), "{status:?}");
    assert!(format!("{status:?}").contains(why), "expected {why:?} in {status:?}");
}

fn endpoint(addr: SocketAddr) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(std::time::Duration::from_secs(5)))
}

async fn prepare(channel: Channel) -> Result<(), Status> {
    ParticipantClient::new(channel).prepare(pb::PrepareRequest::default()).await.map(|_| ())
}

/// Prepares at `addr` as `who` (files in `dir`), expecting the server to prove `expect`.
async fn prepare_as(
    dir: &Path,
    who: &Identity,
    addr: SocketAddr,
    expect: &Identity,
) -> anyhow::Result<Result<(), Status>> {
    let tls = TlsConfig::new(dir).load(who)?;
    let channel = net::lazy_channel_with(&endpoint(addr)?, Some(tls.dial(&expect.dns_name())?));
    Ok(prepare(channel).await)
}

#[tokio::test]
async fn a_node_certificate_prepares_over_mutual_tls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    let a = Identity::participant("a");
    let server = serve(Some(TlsConfig::new(dir.path()).load(&a)?)).await?;
    prepare_as(dir.path(), &Identity::node(1), server.addr, &a).await??;
    Ok(())
}

#[tokio::test]
async fn a_plaintext_client_gets_no_answer_from_a_tls_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    let server = serve(Some(TlsConfig::new(dir.path()).load(&Identity::participant("a"))?)).await?;
    let status = prepare(net::lazy_channel(&endpoint(server.addr)?)).await.expect_err("plaintext must be refused");
    assert_refused_by_transport(&status, "transport error");
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    let a = Identity::participant("a");
    let server = serve(Some(TlsConfig::new(dir.path()).load(&a)?)).await?;
    // The same file names, made by another CA (which the intruder also trusts).
    let other = tempfile::tempdir()?;
    cluster_files(other.path())?;
    let status = prepare_as(other.path(), &Identity::node(1), server.addr, &a).await?.expect_err("other CA");
    assert_refused_by_transport(&status, "invalid peer certificate");
    Ok(())
}

#[tokio::test]
async fn an_expired_certificate_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = cluster_files(dir.path())?;
    let a = Identity::participant("a");
    let server = serve(Some(TlsConfig::new(dir.path()).load(&a)?)).await?;
    let now = OffsetDateTime::now_utc();
    let expired = ca.issue_between(&Identity::node(1), now - Duration::days(2), now - Duration::days(1))?;
    write_pair(dir.path(), &Identity::node(1).file_stem(), &expired)?;
    let status = prepare_as(dir.path(), &Identity::node(1), server.addr, &a).await?.expect_err("expired");
    assert_refused_by_transport(&status, "CertificateExpired");
    Ok(())
}

#[tokio::test]
async fn a_client_certificate_calling_prepare_is_permission_denied() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    let a = Identity::participant("a");
    let server = serve(Some(TlsConfig::new(dir.path()).load(&a)?)).await?;
    let status = prepare_as(dir.path(), &Identity::client("app"), server.addr, &a).await?.expect_err("client");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("needs role node"), "{status}");
    // A participant may not either: Prepare/Decide come only from nodes.
    let status = prepare_as(dir.path(), &Identity::participant("b"), server.addr, &a).await?.expect_err("b");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    Ok(())
}

#[tokio::test]
async fn a_dialer_refuses_a_server_whose_certificate_names_another_participant() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    // b answers at the address where the node expects a.
    let impostor = serve(Some(TlsConfig::new(dir.path()).load(&Identity::participant("b"))?)).await?;
    let a = Identity::participant("a");
    let status = prepare_as(dir.path(), &Identity::node(1), impostor.addr, &a).await?.expect_err("impostor");
    assert_refused_by_transport(&status, "certificate not valid for name");
    Ok(())
}

#[tokio::test]
async fn reloaded_files_serve_new_connections() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    let a = Identity::participant("a");
    let server_tls = TlsConfig::new(dir.path()).load(&a)?;
    let server = serve(Some(server_tls.clone())).await?;
    let node = Identity::node(1);
    // An old connection, opened before the CA changes.
    let old_tls = TlsConfig::new(dir.path()).load(&node)?;
    let old = net::connect_with(&endpoint(server.addr)?, Some(old_tls.dial(&a.dns_name())?)).await?;
    prepare(old.clone()).await?;

    // A new CA and new certificates for everyone; only the server reloads so far.
    cluster_files(dir.path())?;
    server_tls.reload()?;
    // The node's loaded files are of the old CA: new connections fail...
    let status = net::connect_with(&endpoint(server.addr)?, Some(old_tls.dial(&a.dns_name())?)).await;
    assert!(status.is_err(), "a connection with the old CA's certificate must fail after the reload");
    // ...the open one keeps working, and once the node reloads it connects anew.
    prepare(old).await?;
    old_tls.reload()?;
    prepare_as(dir.path(), &node, server.addr, &a).await??;
    let fresh = net::connect_with(&endpoint(server.addr)?, Some(old_tls.dial(&a.dns_name())?)).await?;
    prepare(fresh).await?;
    Ok(())
}

#[test]
fn a_certificate_naming_someone_else_is_refused_at_load() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    cluster_files(dir.path())?;
    std::fs::copy(dir.path().join("participant-b.pem"), dir.path().join("participant-a.pem"))?;
    std::fs::copy(dir.path().join("participant-b.key"), dir.path().join("participant-a.key"))?;
    let err = TlsConfig::new(dir.path()).load(&Identity::participant("a")).expect_err("b's files as a");
    assert!(err.to_string().contains("names participant:b, but this process is participant:a"), "{err}");
    Ok(())
}

#[test]
fn a_missing_file_is_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = TlsConfig::new(dir.path()).load(&Identity::node(1)).expect_err("no files");
    assert!(err.to_string().contains("ca.pem"), "{err}");
}
