//! Listening and dialing: TCP in a real process, the simulation's network
//! in a simulated one ([`crate::host`]).
//!
//! Every twopc server takes a [`Listener`] and serves [`Listener::incoming`];
//! every client channel is made by [`lazy_channel`] or [`connect`]. That is
//! the whole seam a simulation needs to carry the real gRPC stack, and the
//! place TLS is added ([`Listener::with_tls`], [`lazy_channel_with`]): a
//! simulation stays plaintext.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::host::{self, Connecting};
use crate::tls::{Identity, Tls, TlsDial};

/// A byte stream a simulated network carries.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Duplex for T {}

/// One end of a simulated connection.
pub type Connection = Box<dyn Duplex>;

/// The connections a simulated listener accepts.
pub type Accepted = Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send>>;

/// Where a server accepts connections.
pub enum Listener {
    /// The machine's TCP.
    Tcp(TcpListener),
    /// A simulated network's listener.
    Simulated {
        /// The address it listens on.
        addr: SocketAddr,
        /// The connections it accepts.
        accepted: Accepted,
    },
    /// Another listener whose connections must complete a mutual TLS handshake.
    Tls(Box<Listener>, Tls),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

impl Listener {
    /// The address it listens on.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(listener) => listener.local_addr(),
            Self::Simulated { addr, .. } => Ok(*addr),
            Self::Tls(inner, _) => inner.local_addr(),
        }
    }

    /// This listener, its connections wrapped in mutual TLS when `tls` is given.
    #[must_use]
    pub fn with_tls(self, tls: Option<Tls>) -> Self {
        match tls {
            Some(tls) => Self::Tls(Box::new(self), tls),
            None => self,
        }
    }

    /// Whether connections are accepted over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(..))
    }

    /// The accepted connections, for tonic's `serve_with_incoming`. TCP ones
    /// have Nagle's algorithm off: a small response must not wait for the
    /// peer's delayed ACK (40 ms on Linux), which it otherwise did at every
    /// few hundred calls under load (docs/BENCHMARKS.md).
    pub fn incoming(self) -> Pin<Box<dyn Stream<Item = io::Result<Accept>> + Send>> {
        match self {
            Self::Tcp(listener) => {
                Box::pin(TcpIncoming::from(listener).with_nodelay(Some(true)).map(|r| r.map(Accept::Tcp)))
            }
            Self::Simulated { accepted, .. } => Box::pin(accepted.map(|r| r.map(Accept::Simulated))),
            Self::Tls(inner, tls) => tls_incoming(inner.incoming(), tls),
        }
    }
}

/// Runs the TLS handshakes of `raw`'s connections, at most
/// [`Tls::handshakes_max`] at once and each within [`Tls::handshake_timeout`],
/// so a slow or silent peer never holds up the others. A failed handshake
/// (another CA, an expired or missing client certificate) drops that
/// connection only. The task ends when the server drops the stream.
fn tls_incoming(
    mut raw: Pin<Box<dyn Stream<Item = io::Result<Accept>> + Send>>,
    tls: Tls,
) -> Pin<Box<dyn Stream<Item = io::Result<Accept>> + Send>> {
    let (tx, rx) = mpsc::channel(tls.handshakes_max());
    tokio::spawn(async move {
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                () = tx.closed() => break,
                accepted = raw.next(), if handshakes.len() < tls.handshakes_max() => match accepted {
                    None => break,
                    Some(Err(e)) => {
                        if tx.send(Err(e)).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(conn)) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                        let timeout = tls.handshake_timeout();
                        handshakes.spawn(async move { tokio::time::timeout(timeout, acceptor.accept(conn)).await });
                    }
                },
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    let stream = match done {
                        Ok(Ok(Ok(stream))) => stream,
                        Ok(Ok(Err(e))) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            continue;
                        }
                        Ok(Err(_)) => {
                            tracing::debug!("TLS handshake timed out");
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| Identity::from_cert(cert).ok());
                    let accepted = Accept::Tls(Box::new(TlsAccepted { stream, identity }));
                    if tx.send(Ok(accepted)).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// A connection that completed a TLS handshake, and who the client proved to be.
pub struct TlsAccepted {
    stream: tokio_rustls::server::TlsStream<Accept>,
    identity: Option<Identity>,
}

/// Listens on `addr`: on the simulation's network in a simulation, else TCP.
///
/// # Errors
/// The address is taken or cannot be bound.
pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
    match host::network() {
        Some(network) => network.bind(addr),
        None => TcpListener::bind(addr).await.map(Listener::Tcp),
    }
}

/// An accepted connection.
pub enum Accept {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a simulated network.
    Simulated(Connection),
    /// Over TLS.
    Tls(Box<TlsAccepted>),
}

/// What a server knows of a connection's peer; every request carries it in
/// its extensions ([`PeerInfo::of`]).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's address, when over TCP.
    pub remote_addr: Option<SocketAddr>,
    /// Whether the connection is TLS (and so the peer proved a certificate of the CA).
    pub tls: bool,
    /// The twopc identity the peer's certificate names, if any.
    pub identity: Option<Identity>,
}

impl PeerInfo {
    /// The peer of the connection `request` came on; `None` for a request
    /// that did not come through a [`Listener`] (a test calling a handler).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
        request.extensions().get::<PeerInfo>()
    }
}

impl Connected for Accept {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Self::Tcp(stream) => PeerInfo { remote_addr: stream.peer_addr().ok(), tls: false, identity: None },
            Self::Simulated(_) => PeerInfo::default(),
            Self::Tls(accepted) => PeerInfo {
                remote_addr: accepted.stream.get_ref().0.connect_info().remote_addr,
                tls: true,
                identity: accepted.identity.clone(),
            },
        }
    }
}

impl AsyncRead for Accept {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Simulated(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut s.stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accept {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Simulated(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut s.stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Simulated(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut s.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Simulated(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut s.stream).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Simulated(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(&mut s.stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Simulated(s) => s.is_write_vectored(),
            Self::Tls(s) => s.stream.is_write_vectored(),
        }
    }
}

/// A channel to `endpoint` that connects on first use (and again after a
/// failure): over TCP, or the simulation's network.
pub fn lazy_channel(endpoint: &Endpoint) -> Channel {
    lazy_channel_with(endpoint, None)
}

/// [`lazy_channel`], over mutual TLS when `tls` is given (TCP only: a
/// simulation stays plaintext).
pub fn lazy_channel_with(endpoint: &Endpoint, tls: Option<TlsDial>) -> Channel {
    match (host::network(), tls) {
        (Some(_), _) => endpoint.connect_with_connector_lazy(Dial),
        (None, Some(tls)) => endpoint.connect_with_connector_lazy(DialTls(tls)),
        (None, None) => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint`, connected now.
///
/// # Errors
/// The connection failed or timed out (the endpoint's connect timeout).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    connect_with(endpoint, None).await
}

/// [`connect`], over mutual TLS when `tls` is given (TCP only).
///
/// # Errors
/// As [`connect`], and a failed handshake (the server's certificate is not
/// of the CA, or does not carry the name `tls` expects).
pub async fn connect_with(endpoint: &Endpoint, tls: Option<TlsDial>) -> Result<Channel, tonic::transport::Error> {
    match (host::network(), tls) {
        (Some(_), _) => endpoint.connect_with_connector(Dial).await,
        (None, Some(tls)) => endpoint.connect_with_connector(DialTls(tls)).await,
        (None, None) => endpoint.connect().await,
    }
}

/// Dials TCP and runs the client side of a mutual TLS handshake, checking
/// the server's certificate against the CA and the expected name.
#[derive(Clone)]
struct DialTls(TlsDial);

impl tonic::codegen::Service<Uri> for DialTls {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = self.0.clone();
        Box::pin(async move {
            let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot dial {uri}: no host and port"),
                ));
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(dial.tls.client_config());
            let stream = connector.connect(dial.server_name.clone(), tcp).await.map_err(|e| {
                let name = dial.server_name.to_str();
                io::Error::new(e.kind(), format!("TLS handshake with {uri} (expecting {name}) failed: {e}"))
            })?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Dials through the simulation's network.
#[derive(Clone, Copy)]
struct Dial;

impl tonic::codegen::Service<Uri> for Dial {
    type Response = hyper_util::rt::TokioIo<Connection>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting: Connecting = match (host::network(), uri.host(), uri.port_u16()) {
            (Some(network), Some(host), Some(port)) => network.connect(host, port),
            _ => {
                let why = format!("cannot dial {uri}: it needs a host and a port, and a simulated network");
                Box::pin(std::future::ready(Err(io::Error::new(io::ErrorKind::InvalidInput, why))))
            }
        };
        Box::pin(async move { connecting.await.map(hyper_util::rt::TokioIo::new) })
    }
}
