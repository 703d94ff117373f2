//! An in-memory network for deterministic runs ([`super::deterministic`]):
//! listeners are channels of connections, a connection is a pair of
//! in-memory pipes with a latency drawn from the seed ([`super::pipe`]), and
//! nothing touches a socket or another thread.
//!
//! Each thread has a network of its own (a deterministic run keeps the
//! whole system on its thread), so runs on different test threads never
//! meet; [`reset`] empties this thread's before a run, so ports are handed
//! out alike on every run of a seed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt as _;
use rand::Rng as _;
use tokio::sync::mpsc;
use twopc_proto::host::{Connecting, Network};
use twopc_proto::net::{Connection, Listener};

use super::pipe;

/// Connections a listener holds before it accepts them; a dialer waits beyond that.
const BACKLOG: usize = 64;
/// A connection's latency each way, drawn per connection, in microseconds.
const LATENCY_MICROS: std::ops::RangeInclusive<u64> = 100..=2_000;
/// The first port handed out for port 0.
const FIRST_PORT: u16 = 20_000;

#[derive(Default)]
struct State {
    listeners: BTreeMap<SocketAddr, mpsc::Sender<Connection>>,
    next_port: u16,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State { listeners: BTreeMap::new(), next_port: FIRST_PORT });
}

/// This thread's in-memory network, as [`twopc_proto::host::Network`].
pub struct MemoryNetwork;

/// Forgets this thread's listeners and starts handing out ports afresh.
pub fn reset() {
    STATE.with(|state| *state.borrow_mut() = State { listeners: BTreeMap::new(), next_port: FIRST_PORT });
}

impl Network for MemoryNetwork {
    fn bind(&self, addr: SocketAddr) -> io::Result<Listener> {
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            let state = &mut *state;
            let taken = |addr: &SocketAddr| state.listeners.get(addr).is_some_and(|l| !l.is_closed());
            let addr = if addr.port() == 0 {
                let mut candidate = SocketAddr::new(addr.ip(), state.next_port);
                while taken(&candidate) {
                    candidate.set_port(candidate.port().checked_add(1).ok_or(io::ErrorKind::AddrNotAvailable)?);
                }
                state.next_port = candidate.port().saturating_add(1);
                candidate
            } else if taken(&addr) {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{addr} is in use")));
            } else {
                addr
            };
            let (queue, accepted) = mpsc::channel(BACKLOG);
            state.listeners.insert(addr, queue);
            let accepted = futures::stream::unfold(accepted, |mut accepted| async move {
                accepted.recv().await.map(|connection| (Ok(connection), accepted))
            });
            Ok(Listener::Simulated { addr, accepted: accepted.boxed() })
        })
    }

    fn connect(&self, host: &str, port: u16) -> Connecting {
        let ip = match host {
            "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            host => host.trim_start_matches('[').trim_end_matches(']').parse().ok(),
        };
        let listener = ip.and_then(|ip| STATE.with(|s| s.borrow().listeners.get(&SocketAddr::new(ip, port)).cloned()));
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens on {host}:{port}"));
        let latency = Duration::from_micros(twopc_proto::host::with_rng(|rng| rng.random_range(LATENCY_MICROS)));
        Box::pin(async move {
            let Some(listener) = listener else { return Err(refused) };
            let (client, server) = pipe::connection(latency);
            match listener.send(Box::new(server)).await {
                Ok(()) => Ok(Box::new(client) as Connection),
                Err(_) => Err(refused),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    // The in-memory network behaves as TCP does where a test relies on it:
    // port 0 gets a free port, a taken address is refused, a dropped
    // listener frees its address and then refuses connections.
    #[tokio::test]
    async fn binds_like_tcp_and_refuses_where_nothing_listens() -> io::Result<()> {
        reset();
        let first = MemoryNetwork.bind(loopback(0))?;
        let second = MemoryNetwork.bind(loopback(0))?;
        let addr = first.local_addr()?;
        assert_ne!(addr, second.local_addr()?);
        let taken = MemoryNetwork.bind(addr).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(taken, Err(io::ErrorKind::AddrInUse));
        let mut accepted = first.incoming();
        let dialed = MemoryNetwork.connect("127.0.0.1", addr.port()).await;
        assert!(dialed.is_ok() && accepted.next().await.is_some_and(|c| c.is_ok()));
        drop(accepted);
        let refused = MemoryNetwork.connect("127.0.0.1", addr.port()).await.map(|_| ()).map_err(|e| e.kind());
        assert_eq!(refused, Err(io::ErrorKind::ConnectionRefused));
        assert!(MemoryNetwork.bind(addr).is_ok(), "a dropped listener frees its address");
        Ok(())
    }
}
