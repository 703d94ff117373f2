//! Listening and dialing: TCP in a real process, the simulation's network
//! in a simulated one ([`crate::host`]).
//!
//! Every twopc server takes a [`Listener`] and serves [`Listener::incoming`];
//! every client channel is made by [`lazy_channel`] or [`connect`]. That is
//! the whole seam a simulation needs to carry the real gRPC stack.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::host::{self, Connecting};

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
        }
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
        }
    }
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
}

impl Connected for Accept {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Self::Tcp(stream) => stream.connect_info(),
            Self::Simulated(_) => TcpConnectInfo { local_addr: None, remote_addr: None },
        }
    }
}

impl AsyncRead for Accept {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Simulated(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accept {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Simulated(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Simulated(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Simulated(s) => Pin::new(s).poll_shutdown(cx),
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
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Simulated(s) => s.is_write_vectored(),
        }
    }
}

/// A channel to `endpoint` that connects on first use (and again after a
/// failure): over TCP, or the simulation's network.
pub fn lazy_channel(endpoint: &Endpoint) -> Channel {
    match host::network() {
        Some(_) => endpoint.connect_with_connector_lazy(Dial),
        None => endpoint.connect_lazy(),
    }
}

/// A channel to `endpoint`, connected now.
///
/// # Errors
/// The connection failed or timed out (the endpoint's connect timeout).
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    match host::network() {
        Some(_) => endpoint.connect_with_connector(Dial).await,
        None => endpoint.connect().await,
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
