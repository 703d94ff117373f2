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
use tokio::net::TcpListener;
use tonic::transport::Channel;
use twopc_bank::{AccountStore, BankResource, BranchState, Error, RedbStore, StoreConfig};
use twopc_participant::fake_coordinator::FakeCoordinator;
use twopc_participant::{Participant, ParticipantConfig};
use twopc_proto::pb::participant_client::ParticipantClient;
use twopc_proto::pb::{DecisionRequest, PrepareRequest};
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{Decision, TxnId, Vote};

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

/// A Prepare of `payload` for `txn` to the bank at `client`.
async fn prepare(
    client: &mut ParticipantClient<Channel>,
    txn: TxnId,
    payload: bytes::Bytes,
) -> Result<Vote, tonic::Status> {
    let request = PrepareRequest {
        txn_id: txn.to_string(),
        participant: String::new(),
        payload,
        deadline_unix_ms: unix_now_ms() + 60_000,
    };
    let response = client.prepare(request).await?.into_inner();
    Vote::from_pb(response.vote, &response.reason).map_err(|e| tonic::Status::internal(e.to_string()))
}

async fn commit(client: &mut ParticipantClient<Channel>, txn: TxnId) -> Result<(), tonic::Status> {
    let request =
        DecisionRequest { txn_id: txn.to_string(), participant: String::new(), decision: Decision::Commit.into() };
    client.decide(request).await.map(|_| ())
}

// I7, I4 and I1 through the participant library: on a full disk the bank's Prepare and Commit
// fail with UNAVAILABLE naming the bank store; once space is back the coordinator's retried
// Commit of the branch prepared before the fault succeeds, and the Prepare that failed on the
// full disk is settled by the resolver (the coordinator's Abort leaves a tombstone), so no hold
// is left behind and no restart was needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_on_a_full_disk_commits_and_settles_its_branches_once_space_is_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = Arc::new(Disk::default());
    let store = Arc::new(open_on(&disk, dir.path().join("bank.redb")).await?);
    create(store.as_ref(), "alice", 100).await;
    let coordinator = FakeCoordinator::new();
    let coordinator_node = coordinator.start().await?;
    let mut config = ParticipantConfig::new("bank-a".parse()?, vec![coordinator_node.addr().to_string()]);
    config.in_doubt_timeout_ms = 50;
    config.resolve_backoff_min_ms = 5;
    config.resolve_backoff_max_ms = 20;
    let participant = Participant::new(Arc::new(BankResource::new(Arc::clone(&store))), config)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(participant.serve(listener, async {
        let _ = stopped.await;
    }));
    let mut client = ParticipantClient::connect(format!("http://{addr}")).await?;

    let (kept, failed) = (TxnId::new(), TxnId::new());
    ensure!(prepare(&mut client, kept, debit("alice", 30).encode()).await? == Vote::Yes, "setup: NO vote");
    coordinator.set_decision(kept, Decision::Commit);
    coordinator.set_decision(failed, Decision::Abort);

    disk.full.store(true, Ordering::SeqCst);
    let refused = prepare(&mut client, failed, debit("alice", 20).encode()).await;
    ensure!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("bank store")),
        "prepare on a full disk: {refused:?}"
    );
    let refused = commit(&mut client, kept).await;
    ensure!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("bank store")),
        "commit on a full disk: {refused:?}"
    );

    disk.full.store(false, Ordering::SeqCst);
    let healed_by = tokio::time::Instant::now() + HEAL_MAX;
    loop {
        match commit(&mut client, kept).await {
            Ok(()) => break,
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < healed_by => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => bail!("the retried commit did not succeed within {HEAL_MAX:?} of the disk having room: {s:?}"),
        }
    }
    loop {
        let state = store.branch_state(failed).await;
        if matches!(state, Ok(Some(BranchState::Tombstone | BranchState::Aborted))) {
            break;
        }
        ensure!(tokio::time::Instant::now() < healed_by, "the failed prepare was never settled: {state:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(coordinator.calls(failed) >= 1, "settled without asking the coordinator");
    ensure!(row(store.as_ref(), "alice").await == (70, 0, 0), "a hold was left behind or the commit was lost");

    let _ = stop.send(());
    serving.await??;
    Ok(())
}
