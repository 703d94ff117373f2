//! A bank for simulated runs: the real account service (`twopc_bank`'s
//! Participant and Bank APIs over a [`RedbStore`] in a temp dir) on an
//! ephemeral port, which can crash and restart.
//!
//! A crash stops the server and the participant library (its outcome memory
//! and resolver are lost) but keeps the store: every write the store
//! acknowledged was fsync'd, which is all a restarted bank may rely on. Calls
//! already inside the store when the crash comes finish before the restart
//! (the harness waits for them), as if they had finished just before it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use twopc_bank::{AccountStore as _, RedbStore, StoreConfig};
use twopc_participant::ParticipantConfig;

use crate::checker::AccountView;

/// How long a crash waits for calls already inside the store to let go of it.
const CRASH_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One bank process, simulated in this one.
pub struct SimBank {
    /// Its participant name.
    pub name: String,
    /// Where it listens (the same address across restarts).
    pub addr: SocketAddr,
    /// Its durable store, shared by every incarnation.
    pub store: Arc<RedbStore>,
    config: ParticipantConfig,
    running: Option<(oneshot::Sender<()>, JoinHandle<twopc_bank::Result<()>>)>,
}

impl SimBank {
    /// Opens a store under `dir` with `accounts` at `opening_minor` each and
    /// starts serving.
    ///
    /// # Errors
    /// The store, an account or the port.
    pub async fn start(
        name: &str,
        dir: &Path,
        accounts: &[String],
        opening_minor: i64,
        config: ParticipantConfig,
    ) -> anyhow::Result<Self> {
        let store = Arc::new(RedbStore::open(dir.join(format!("{name}.redb")), StoreConfig::default()).await?);
        for account in accounts {
            store.create_account(account.parse()?, opening_minor).await?;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut bank = Self { name: name.to_owned(), addr: listener.local_addr()?, store, config, running: None };
        bank.serve(listener);
        Ok(bank)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(twopc_bank::server::serve(listener, self.store.clone(), self.config.clone(), shutdown));
        self.running = Some((stop, task));
    }

    /// Whether it is serving.
    pub fn is_up(&self) -> bool {
        self.running.is_some()
    }

    /// Stops it abruptly; its store survives. A no-op if it is down.
    pub async fn crash(&mut self) {
        let Some((stop, task)) = self.running.take() else {
            return;
        };
        let _ = stop.send(());
        task.abort();
        let _ = task.await;
        // Calls the old incarnation started hold the store until they end.
        let deadline = tokio::time::Instant::now() + CRASH_DRAIN_TIMEOUT;
        while Arc::strong_count(&self.store) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// This bank's wall clock (its participant's deadline checks); a jump
    /// lasts across restarts, as a real machine's would.
    pub fn clock(&self) -> &twopc_proto::Clock {
        &self.config.clock
    }

    /// Starts it again on its address; a no-op if it is up.
    ///
    /// # Errors
    /// The address cannot be bound again (retried for a while first).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_up() {
            return Ok(());
        }
        let mut attempts = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(bank = %self.name, error = %e, "rebinding; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("rebinding bank {} at {}", self.name, self.addr)),
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Whether the store holds no prepared branch and no hold or staged credit.
    ///
    /// # Errors
    /// The store failed.
    pub async fn is_settled(&self) -> anyhow::Result<bool> {
        if !self.store.prepared().await?.is_empty() {
            return Ok(false);
        }
        let totals = self.store.totals().await?;
        Ok(totals.held_minor == 0 && totals.incoming_minor == 0)
    }

    /// Every account, by name.
    ///
    /// # Errors
    /// The store failed.
    pub async fn accounts(&self) -> anyhow::Result<Vec<(String, AccountView)>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.list_accounts(after.clone(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.name.clone());
            for a in &page {
                let view = AccountView {
                    balance_minor: a.balance_minor,
                    held_minor: a.held_minor,
                    incoming_minor: a.incoming_minor,
                };
                all.push((a.name.as_str().to_owned(), view));
            }
        }
        Ok(all)
    }
}

impl Drop for SimBank {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}
