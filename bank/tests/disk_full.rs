//! A bank store whose disk fills up heals itself once space is back
//! (docs/OPERATIONS.md, "A full disk"): while writes fail, every operation
//! fails with UNAVAILABLE naming the bank store; once they can succeed the
//! store reopens its file, with the branches it had prepared (I3, I4), and
//! carries on without a restart.

mod common;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use common::{create, debit, name, row};
use twopc_bank::{AccountStore, Error, RedbStore, StoreConfig};
use twopc_proto::TxnId;

/// How long the store may take to heal once the disk has room again.
const HEAL_MAX: Duration = Duration::from_secs(10);

/// A disk that can be filled up on command: while full, every write,
/// extension and sync fails as a full file system does.
#[derive(Debug, Default)]
struct Disk {
    full: AtomicBool,
}

impl Disk {
    fn check(&self) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "No space left on device (simulated)"));
        }
        Ok(())
    }
}

/// redb's storage: a file on the [`Disk`].
#[derive(Debug)]
struct Backend {
    file: File,
    disk: Arc<Disk>,
}

impl Backend {
    fn open(path: &Path, disk: &Arc<Disk>) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(Self { file, disk: Arc::clone(disk) })
    }
}

impl redb::StorageBackend for Backend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.disk.check()?;
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.disk.check()?;
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.disk.check()?;
        self.file.write_all_at(data, offset)
    }
}

/// A store on `disk` at `path` that reopens itself quickly after a fault.
async fn open_on(disk: &Arc<Disk>, path: PathBuf) -> anyhow::Result<RedbStore> {
    let config = StoreConfig { reopen_backoff_min_ms: 10, reopen_backoff_max_ms: 50, ..StoreConfig::default() };
    let disk = Arc::clone(disk);
    let store = tokio::task::spawn_blocking(move || {
        let file = path.clone();
        RedbStore::open_reopenable_backend_blocking(move || Backend::open(&file, &disk), &path, config)
    })
    .await??;
    Ok(store)
}

/// The error is the retryable kind and says the bank store failed.
fn names_the_bank_store(e: &Error) -> bool {
    e.is_retryable() && e.to_string().starts_with("bank store unavailable: ")
}

// I3, I4 and I7: a disk that fills up makes every write fail cleanly (UNAVAILABLE, naming the
// bank store); once space is back the store reopens its file by itself, account creation works
// again, and the branch it had prepared before the fault is still held and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_a_full_disk_heals_once_space_is_back_and_keeps_its_prepared_branch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = Arc::new(Disk::default());
    let store = open_on(&disk, dir.path().join("bank.redb")).await?;
    create(&store, "alice", 100).await;
    let txn = TxnId::new();
    ensure!(store.prepare(txn, debit("alice", 30)).await?.is_yes(), "setup: the debit voted NO");

    disk.full.store(true, Ordering::SeqCst);
    let refused = store.create_account(name("bob"), 10).await;
    ensure!(matches!(&refused, Err(e) if names_the_bank_store(e)), "account creation on a full disk: {refused:?}");
    let refused = store.commit(txn).await;
    ensure!(matches!(&refused, Err(e) if names_the_bank_store(e)), "commit on a full disk: {refused:?}");

    disk.full.store(false, Ordering::SeqCst);
    let healed_by = tokio::time::Instant::now() + HEAL_MAX;
    loop {
        match store.create_account(name("bob"), 10).await {
            Ok(_) => break,
            Err(e) if names_the_bank_store(&e) && tokio::time::Instant::now() < healed_by => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => bail!("the store did not heal within {HEAL_MAX:?} of the disk having room: {e}"),
        }
    }

    let prepared = store.prepared().await.context("listing prepared branches")?;
    ensure!(prepared == vec![txn], "the prepared branch was lost: {prepared:?}");
    ensure!(row(&store, "alice").await == (100, 30, 0), "the hold was lost");
    store.commit(txn).await?;
    ensure!(row(&store, "alice").await == (70, 0, 0));
    ensure!(row(&store, "bob").await == (10, 0, 0));
    Ok(())
}
