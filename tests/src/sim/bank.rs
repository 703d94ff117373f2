//! A bank for simulated runs: the real account service (`twopc_bank`'s
//! Participant and Bank APIs over a [`RedbStore`]) on an ephemeral port,
//! which can crash and restart.
//!
//! The store's file lives on a [`LossyDisk`]. A crash is a power cut: every
//! write the store had not synced is taken back and the old store can do no
//! more I/O (so a vote or acknowledgement whose fsync had not finished never
//! leaves), the server and the participant library stop (outcome memory and
//! resolver lost), and the store is opened again from what the disk kept:
//! redb recovers from its last durable commit, which is all a restarted
//! bank may rely on.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use twopc_bank::{AccountStore as _, RedbStore, StoreConfig};
use twopc_coordinator::lossy_disk::{CrashReport, LossyDisk, LossyFile};
use twopc_participant::ParticipantConfig;
use twopc_proto::net::{self, Listener};

use crate::checker::AccountView;

/// One bank process, simulated in this one.
pub struct SimBank {
    /// Its participant name.
    pub name: String,
    /// Where it listens (the same address across restarts).
    pub addr: SocketAddr,
    /// Its store; a crash replaces it with one opened from what the disk kept.
    pub store: Arc<RedbStore>,
    disk: Arc<LossyDisk>,
    disk_kind: BankDisk,
    path: PathBuf,
    config: ParticipantConfig,
    running: Option<(oneshot::Sender<()>, JoinHandle<twopc_bank::Result<()>>)>,
}

/// What a simulated bank's store is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankDisk {
    /// A [`LossyDisk`]: a crash takes back what the store did not sync.
    Lossy,
    /// The same disk, but the store's syncs do nothing, as if it answered
    /// before its fsync (a broken store, for the tests that show the
    /// checker bites).
    SkipsFsync,
}

/// redb's storage on a [`LossyFile`].
#[derive(Debug)]
struct LossyBackend {
    file: LossyFile,
    kind: BankDisk,
}

impl redb::StorageBackend for LossyBackend {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        match self.kind {
            BankDisk::Lossy => self.file.sync(),
            BankDisk::SkipsFsync => Ok(()),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_at(offset, data)
    }
}

/// Opens the store at `path` on `disk` as the disk now holds it.
fn open_store_blocking(disk: &Arc<LossyDisk>, path: &Path, kind: BankDisk) -> anyhow::Result<RedbStore> {
    let backend = LossyBackend { file: disk.open(path, true)?, kind };
    Ok(RedbStore::open_backend_blocking(backend, path, StoreConfig::default())?)
}

/// [`open_store_blocking`] off the async runtime (`twopc_proto::host::run_blocking`).
async fn open_store(disk: &Arc<LossyDisk>, path: &Path, kind: BankDisk) -> anyhow::Result<Arc<RedbStore>> {
    let (disk, path) = (Arc::clone(disk), path.to_owned());
    let store = twopc_proto::host::run_blocking(move || open_store_blocking(&disk, &path, kind)).await??;
    Ok(Arc::new(store))
}

impl SimBank {
    /// Opens a store under `dir` on a disk of kind `disk_kind` with
    /// `accounts` at `opening_minor` each and starts serving.
    ///
    /// # Errors
    /// The store, an account or the port.
    pub async fn start(
        name: &str,
        dir: &Path,
        disk_kind: BankDisk,
        accounts: &[String],
        opening_minor: i64,
        config: ParticipantConfig,
    ) -> anyhow::Result<Self> {
        let disk = LossyDisk::new();
        let path = dir.join(format!("{name}.redb"));
        let store = open_store(&disk, &path, disk_kind).await?;
        for account in accounts {
            store.create_account(account.parse()?, opening_minor).await?;
        }
        let listener = net::bind(crate::cluster::LOOPBACK_ANY_PORT).await?;
        let addr = listener.local_addr()?;
        let mut bank = Self { name: name.to_owned(), addr, store, disk, disk_kind, path, config, running: None };
        bank.serve(listener);
        Ok(bank)
    }

    fn serve(&mut self, listener: Listener) {
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

    /// Crashes it as a power cut would (see the module doc) and opens its
    /// store again from what the disk kept, ready for [`SimBank::restart`].
    /// Says what the crash took back; a no-op if it is down.
    ///
    /// # Errors
    /// The disk could not be put back or the store not reopened (redb could
    /// not recover: a finding, not a harness failure).
    pub async fn crash(&mut self) -> anyhow::Result<CrashReport> {
        let Some((stop, task)) = self.running.take() else {
            return Ok(CrashReport::default());
        };
        let lost = self.disk.crash().with_context(|| format!("crashing {}'s disk", self.name))?;
        let _ = stop.send(());
        task.abort();
        let _ = task.await;
        // Calls still inside the old store fail on its dead disk and let go of it.
        self.store = open_store(&self.disk, &self.path, self.disk_kind)
            .await
            .with_context(|| format!("reopening {}'s store after a crash", self.name))?;
        Ok(lost)
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
            match net::bind(self.addr).await {
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

#[cfg(test)]
mod tests {
    use twopc_bank::{AccountName, BranchPayload, BranchState};
    use twopc_proto::{TxnId, Vote};

    use super::*;

    // I3 (persist before speaking) seen through the crash model: a branch the
    // store voted YES on survives a crash of its disk, and the same crash
    // loses it when the store skips its fsync. The simulation's bank crashes
    // can therefore tell a store that speaks before its fsync from one that
    // does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_yes_vote_survives_a_crash_only_when_its_fsync_ran() -> anyhow::Result<()> {
        for skip_sync in [false, true] {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("bank.redb");
            let disk = LossyDisk::new();
            let store =
                open_store_blocking(&disk, &path, if skip_sync { BankDisk::SkipsFsync } else { BankDisk::Lossy })?;
            let alice: AccountName = "alice".parse()?;
            store.create_account(alice.clone(), 500).await?;
            let txn = TxnId::new();
            assert_eq!(store.prepare(txn, BranchPayload::debit(alice, 100)?).await?, Vote::Yes);
            disk.crash()?;
            drop(store);
            let reopened = open_store_blocking(&disk, &path, BankDisk::Lossy)?;
            let survived = reopened.branch_state(txn).await? == Some(BranchState::Prepared);
            assert_eq!(survived, !skip_sync, "skip_sync = {skip_sync}");
        }
        Ok(())
    }
}
