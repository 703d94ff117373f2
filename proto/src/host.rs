//! What twopc takes from the machine it runs on, in one place: the network,
//! the wall clock, random numbers, and threads of its own.
//!
//! A real process uses the machine's. A deterministic simulation
//! (tests/src/sim/deterministic.rs, docs/TESTING.md) runs a whole system on one thread
//! under virtual time and calls [`simulate`] first, once per process: from
//! then on servers listen and clients dial through its [`Network`], the
//! wall clock is its clock, work that would get a thread of its own (the
//! coordinator's Ready loop, the bank store's writer) runs as a task on the
//! caller's runtime, and blocking calls run in place. [`with_rng`] draws
//! from a per-thread generator that [`seed_this_thread`] makes repeatable.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::SeedableRng as _;
use rand::rngs::StdRng;

use crate::net::{Connection, Listener};

/// A future that resolves to a connection.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<Connection>> + Send>>;

/// A network other than the machine's: listens and connects in memory.
pub trait Network: Send + Sync + 'static {
    /// Listens on `addr` (port 0: any free port).
    ///
    /// # Errors
    /// `AddrInUse` when something listens there already.
    fn bind(&self, addr: SocketAddr) -> io::Result<Listener>;

    /// Connects to `host:port` (`host` as a URI gives it).
    fn connect(&self, host: &str, port: u16) -> Connecting;
}

/// What a simulation supplies in place of the machine.
pub struct Simulated {
    /// The network every server and client uses.
    pub network: Arc<dyn Network>,
    /// The wall clock, in Unix milliseconds.
    pub unix_now_ms: fn() -> u64,
}

static SIMULATED: OnceLock<Simulated> = OnceLock::new();

/// Makes this process a simulation (see the module docs). Once per process.
///
/// # Errors
/// When a simulation was installed already.
pub fn simulate(simulated: Simulated) -> Result<(), &'static str> {
    SIMULATED.set(simulated).map_err(|_| "this process is a simulation already")
}

/// Whether [`simulate`] was called: work that would get a thread runs as a
/// task, and blocking calls run in place.
pub fn is_simulated() -> bool {
    SIMULATED.get().is_some()
}

/// The simulation's network, if this process is one.
pub fn network() -> Option<&'static Arc<dyn Network>> {
    SIMULATED.get().map(|s| &s.network)
}

/// The wall clock in Unix milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    match SIMULATED.get() {
        Some(simulated) => (simulated.unix_now_ms)(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    }
}

thread_local! {
    static RNG: RefCell<StdRng> = RefCell::new(StdRng::from_rng(&mut rand::rng()));
}

/// Calls `draw` with this thread's generator (backoff and pause jitter).
pub fn with_rng<T>(draw: impl FnOnce(&mut StdRng) -> T) -> T {
    RNG.with(|rng| draw(&mut rng.borrow_mut()))
}

/// Reseeds this thread's generator, so a simulation that runs everything on
/// this thread draws the same numbers for the same seed.
pub fn seed_this_thread(seed: u64) {
    RNG.with(|rng| *rng.borrow_mut() = StdRng::seed_from_u64(seed));
}

/// Runs `work`, which blocks, off the async runtime: on the blocking pool,
/// or in place in a simulation (where blocking only stops virtual time).
///
/// # Errors
/// When the blocking task panicked or was cancelled.
pub async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if is_simulated() { Ok(work()) } else { tokio::task::spawn_blocking(work).await }
}
