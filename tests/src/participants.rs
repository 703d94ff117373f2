//! Participants for whole-system tests: the participant library serving a
//! [`MemoryResource`] on an ephemeral port, and a black hole that accepts
//! connections and never answers.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use twopc_participant::memory::MemoryResource;
use twopc_participant::{Participant, ParticipantConfig};

/// A participant library server over a [`MemoryResource`].
pub struct TestParticipant {
    /// Its name.
    pub name: String,
    /// The resource: inspect commits, prepares, aborts.
    pub resource: Arc<MemoryResource>,
    /// Where it listens.
    pub addr: SocketAddr,
    config: ParticipantConfig,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<twopc_participant::Result<()>>,
}

impl TestParticipant {
    /// Starts `name` resolving against `coordinators`, with an in-doubt
    /// timeout of `in_doubt_timeout_ms`.
    ///
    /// # Errors
    /// A bad config or a port that cannot be bound.
    pub async fn start(name: &str, coordinators: Vec<String>, in_doubt_timeout_ms: u64) -> anyhow::Result<Self> {
        let mut config = ParticipantConfig::new(name.parse()?, coordinators);
        config.in_doubt_timeout_ms = in_doubt_timeout_ms;
        config.resolve_backoff_min_ms = 20;
        config.resolve_backoff_max_ms = 500;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(name, Arc::new(MemoryResource::new()), config, listener)
    }

    fn serve(
        name: &str,
        resource: Arc<MemoryResource>,
        config: ParticipantConfig,
        listener: TcpListener,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let participant = Participant::new(resource.clone(), config.clone())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(participant.serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self { name: name.to_owned(), resource, addr, config, stop: Some(stop), task })
    }

    /// Stops it abruptly and starts it again on the same address with the
    /// same durable state (volatile state, such as the library's outcome
    /// memory, is lost): a crash and restart.
    ///
    /// # Errors
    /// The port cannot be bound again.
    pub async fn restart(mut self) -> anyhow::Result<Self> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
        let _ = (&mut self.task).await;
        let listener = TcpListener::bind(self.addr).await.context("rebinding a participant")?;
        let resource = Arc::new(self.resource.restarted());
        Self::serve(&self.name, resource, self.config.clone(), listener)
    }
}

impl Drop for TestParticipant {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that accepts connections and never answers: a participant
/// that is up but hung.
pub struct BlackHole {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BlackHole {
    /// Starts one on an ephemeral port.
    ///
    /// # Errors
    /// A port that cannot be bound.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                // Bounded: a test opens a handful of connections.
                if held.len() < 1024 {
                    held.push(socket);
                }
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
