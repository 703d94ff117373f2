//! The coordinator's durable raft state: raft-rs's [`raft::Storage`] on
//! raft-engine, plus the state-machine snapshots that let the log be compacted.
//!
//! # Layout on disk
//! - `dir/log/`: raft-engine's files. One raft group ([`RAFT_GROUP_ID`]) holds
//!   the entries and two keys: the [`HardState`] and the current snapshot's
//!   [`SnapshotMetadata`] (index, term and the [`ConfState`] as of that index).
//! - `dir/snap/`: exactly one snapshot file, `{index:020}-{term:020}.snap`:
//!   a checksummed header, the metadata and the state machine's bytes.
//!
//! # Durability rules (docs/PROTOCOL.md: "I3 Persist before speaking", §4.2, §4.5)
//! - [`RaftStorage::append`] writes a Ready's entries and hard state in one
//!   raft-engine batch; with `sync` it returns only after fdatasync, so the
//!   Ready loop may then send the persisted messages (votes, append acks).
//! - A snapshot (taken locally by [`RaftStorage::compact`], received from the
//!   leader by [`RaftStorage::apply_snapshot`], or made by
//!   [`RaftStorage::bootstrap`]) is written to its own file first (fsync, atomic
//!   rename, fsync of the directory); only then does one synced raft-engine
//!   batch make it current and drop the log entries it covers. A crash in
//!   between leaves an orphan file that the next [`RaftStorage::open`] deletes;
//!   the log is never compacted past a snapshot that is not on disk.
//! - [`RaftStorage::set_commit_index`] may be unsynced: a lost raft commit
//!   index is learnt again from the quorum; it never speaks for this node.
//!
//! # Bootstrap
//! A static cluster starts every node from the same snapshot at
//! [`BOOTSTRAP_INDEX`] (term [`BOOTSTRAP_TERM`]) holding the initial voters and
//! the state machine's initial bytes, not from an empty log at index 0. So the
//! log of every node starts at index 2, and a node added later (its storage is
//! empty) can only be caught up by a snapshot, which carries the membership. A
//! node replaying the log from index 1 instead would never learn the initial
//! voters, and could elect itself as the only voter.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use raft_engine::{Command, Engine, LogBatch, MessageExt, ReadableSize};

#[cfg(feature = "testing")]
use crate::lossy_disk::LossyDisk;

/// The one raft group this node keeps in raft-engine.
pub const RAFT_GROUP_ID: u64 = 1;
/// Log index of the snapshot every node of a static cluster starts from.
pub const BOOTSTRAP_INDEX: u64 = 1;
/// Term of the bootstrap snapshot.
pub const BOOTSTRAP_TERM: u64 = 1;

const HARD_STATE_KEY: &[u8] = b"hard_state";
const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";
const LOG_DIR: &str = "log";
const SNAP_DIR: &str = "snap";
const SNAP_EXT: &str = "snap";
const SNAP_TMP_EXT: &str = "tmp";
/// Snapshot file header: magic (format version in its last byte), metadata
/// length (u32 LE), data length (u64 LE), CRC-32 of metadata and data (u32 LE).
const SNAP_MAGIC: [u8; 8] = *b"2PCSNAP1";
const SNAP_HEADER_LEN: usize = 24;
/// A snapshot's metadata is a conf state: a few ids. Anything larger is corrupt.
const SNAP_META_MAX_BYTES: u32 = 1024 * 1024;
/// Directory depth [`RaftStorage::disk_usage`] descends; the layout has two levels.
const DISK_USAGE_MAX_DEPTH: usize = 4;

/// How the log store is sized. The disk it takes stays below about
/// `purge_threshold_bytes + target_file_size_bytes` of live log files, plus
/// up to `1.5 * purge_threshold_bytes` of recycled ones (with
/// `enable_log_recycle`), plus one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Size at which raft-engine starts a new log file.
    /// Default: 8 MiB. Minimum: 4 KiB.
    pub target_file_size_bytes: u64,
    /// Log bytes on disk above which a purge rewrites or removes old files;
    /// below it [`RaftStorage::purge`] does nothing.
    /// Default: 64 MiB. At least `target_file_size_bytes`.
    pub purge_threshold_bytes: u64,
    /// Write batches larger than this are LZ4-compressed; 0 disables it.
    /// Default: 8 KiB.
    pub batch_compression_threshold_bytes: u64,
    /// Keep purged log files for reuse instead of creating new ones (saves
    /// file creation on the write path, costs the disk noted above).
    /// Default: true.
    pub enable_log_recycle: bool,
    /// Recent entries kept in memory, so that applying committed entries and
    /// `term()` lookups do not read the log files; 0 disables the cache.
    /// Default: 16 MiB.
    pub entry_cache_max_bytes: u64,
    /// Largest snapshot (state-machine bytes) written or read; a bigger one is
    /// refused with [`StorageError::SnapshotTooLarge`].
    /// Default: 1 GiB.
    pub snapshot_max_bytes: u64,
    /// The disk the raft log is written to: `None` for the real one. Crash
    /// tests give each node a [`LossyDisk`] whose crash takes back every
    /// write the log did not sync (feature `testing`).
    ///
    /// Default: None.
    #[cfg(feature = "testing")]
    pub disk: Option<TestDisk>,
}

/// The file system raft-engine writes the log through: the real one, or
/// with feature `testing` one that can lose what was never synced (a
/// `LossyFileSystem` that loses nothing unless a test gives it a disk).
#[cfg(not(feature = "testing"))]
type LogFileSystem = raft_engine::env::DefaultFileSystem;
#[cfg(feature = "testing")]
type LogFileSystem = crate::lossy_disk::LossyFileSystem;
type LogEngine = Engine<LogFileSystem>;

/// A test's [`LossyDisk`] in a config (compared by identity).
#[cfg(feature = "testing")]
#[derive(Debug, Clone)]
pub struct TestDisk(pub Arc<LossyDisk>);

#[cfg(feature = "testing")]
impl PartialEq for TestDisk {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(feature = "testing")]
impl Eq for TestDisk {}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            target_file_size_bytes: 8 * 1024 * 1024,
            purge_threshold_bytes: 64 * 1024 * 1024,
            batch_compression_threshold_bytes: 8 * 1024,
            enable_log_recycle: true,
            entry_cache_max_bytes: 16 * 1024 * 1024,
            snapshot_max_bytes: 1024 * 1024 * 1024,
            #[cfg(feature = "testing")]
            disk: None,
        }
    }
}

impl StorageConfig {
    /// Checks the config; [`RaftStorage::open`] calls it.
    ///
    /// # Errors
    /// [`StorageError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), StorageError> {
        let bad = |msg: String| Err(StorageError::InvalidConfig(msg));
        if self.target_file_size_bytes < 4096 {
            return bad(format!("target_file_size_bytes is {}, must be at least 4096", self.target_file_size_bytes));
        }
        if self.purge_threshold_bytes < self.target_file_size_bytes {
            return bad(format!(
                "purge_threshold_bytes ({}) must be at least target_file_size_bytes ({})",
                self.purge_threshold_bytes, self.target_file_size_bytes
            ));
        }
        if self.snapshot_max_bytes == 0 {
            return bad("snapshot_max_bytes must be greater than zero".into());
        }
        Ok(())
    }

    #[cfg(not(feature = "testing"))]
    fn log_file_system(&self) -> LogFileSystem {
        raft_engine::env::DefaultFileSystem
    }

    #[cfg(feature = "testing")]
    fn log_file_system(&self) -> LogFileSystem {
        match &self.disk {
            Some(disk) => disk.0.file_system(),
            None => crate::lossy_disk::LossyFileSystem::durable(),
        }
    }

    fn engine_config(&self, log_dir: &Path) -> Result<raft_engine::Config, StorageError> {
        let Some(dir) = log_dir.to_str() else {
            return Err(StorageError::InvalidConfig(format!("data dir {} is not valid UTF-8", log_dir.display())));
        };
        Ok(raft_engine::Config {
            dir: dir.to_owned(),
            target_file_size: ReadableSize(self.target_file_size_bytes),
            purge_threshold: ReadableSize(self.purge_threshold_bytes),
            batch_compression_threshold: ReadableSize(self.batch_compression_threshold_bytes),
            enable_log_recycle: self.enable_log_recycle,
            ..raft_engine::Config::default()
        })
    }
}

/// What can go wrong in the log store. `Compacted`, `Unavailable` and
/// `SnapshotOutOfDate` become raft-rs's own storage errors of those names;
/// everything else is fatal for the node (a broken disk, a corrupt file or a
/// caller breaking the contract).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A [`StorageConfig`] field is out of range.
    #[error("invalid storage config: {0}")]
    InvalidConfig(String),
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// raft-engine failed.
    #[error("raft-engine: {context}: {source}")]
    Engine {
        /// What was being done, with the indexes involved.
        context: String,
        /// raft-engine's error.
        #[source]
        source: raft_engine::Error,
    },
    /// The entry is below the log's first index (it is in a snapshot).
    #[error("log entry {index} is compacted (the log starts at {first_index})")]
    Compacted {
        /// The index asked for.
        index: u64,
        /// The log's first index.
        first_index: u64,
    },
    /// The entry is past the log's last index.
    #[error("log entry {index} is unavailable (the log ends at {last_index})")]
    Unavailable {
        /// The index asked for.
        index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// Entries to append do not continue the log (a hole, or an overwrite of
    /// compacted entries), or are not consecutive.
    #[error("cannot append entries {first}..={last}: the log holds {first_index}..={last_index}")]
    BadAppend {
        /// Index of the first entry given.
        first: u64,
        /// Index of the last entry given.
        last: u64,
        /// The log's first index.
        first_index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// A received snapshot is not newer than the one this node holds.
    #[error("snapshot at index {index} is out of date (the log starts at {first_index})")]
    SnapshotOutOfDate {
        /// The snapshot's index.
        index: u64,
        /// The log's first index.
        first_index: u64,
    },
    /// [`RaftStorage::compact`] was asked to go past the last log entry.
    #[error("cannot compact the log to {index}: it ends at {last_index}")]
    CompactBeyondLog {
        /// The index asked for.
        index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// [`RaftStorage::bootstrap`] on a storage that already holds state, or
    /// with no voters.
    #[error("cannot bootstrap: {0}")]
    Bootstrap(String),
    /// A snapshot is bigger than `snapshot_max_bytes`.
    #[error("snapshot of {bytes} bytes exceeds snapshot_max_bytes ({max_bytes})")]
    SnapshotTooLarge {
        /// The snapshot's data size.
        bytes: u64,
        /// The configured limit.
        max_bytes: u64,
    },
    /// A snapshot file fails its checks.
    #[error("snapshot file {} is corrupt: {reason}", path.display())]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored state contradicts itself (e.g. a hole between the snapshot
    /// and the log, or a snapshot file missing).
    #[error("inconsistent raft storage: {0}")]
    Inconsistent(String),
}

impl From<StorageError> for raft::Error {
    fn from(err: StorageError) -> Self {
        let store = match err {
            StorageError::Compacted { .. } => raft::StorageError::Compacted,
            StorageError::Unavailable { .. } => raft::StorageError::Unavailable,
            StorageError::SnapshotOutOfDate { .. } => raft::StorageError::SnapshotOutOfDate,
            other => raft::StorageError::Other(Box::new(other)),
        };
        raft::Error::Store(store)
    }
}

fn engine_err(context: impl Into<String>) -> impl FnOnce(raft_engine::Error) -> StorageError {
    let context = context.into();
    move |source| StorageError::Engine { context, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_owned();
    move |source| StorageError::Io { op, path, source }
}

/// Tells raft-engine how to index raft-rs entries (the orphan rule forbids
/// implementing its trait on `Entry` itself).
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(entry: &Entry) -> u64 {
        entry.index
    }
}

/// raft-rs [`raft::Storage`] on raft-engine, with state-machine snapshots.
/// Cheap to clone: clones share one store. Every mutation is serialised and
/// visible to readers only once it is written.
#[derive(Clone)]
pub struct RaftStorage {
    inner: Arc<Inner>,
}

struct Inner {
    engine: LogEngine,
    /// What the engine writes through (kept to ask a crash test's disk
    /// whether a sync really happened; see [`Inner::write_log`]).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    log_fs: Arc<LogFileSystem>,
    dir: PathBuf,
    snap_dir: PathBuf,
    config: StorageConfig,
    /// Everything readers need, changed only together with the engine write
    /// that makes it true (the write happens under the write lock).
    state: RwLock<State>,
    /// Serialises snapshot installs, whose file writes run outside `state`.
    snapshot_install: Mutex<()>,
    /// Synced log writes since open (`twopc_raft_log_syncs_total`).
    syncs: AtomicU64,
}

struct State {
    hard_state: HardState,
    /// The current snapshot; the log holds the entries after its index.
    snapshot: Option<SnapshotMetadata>,
    cache: EntryCache,
}

impl State {
    /// Index and term of the last entry covered by the snapshot (0, 0 if none).
    fn truncated(&self) -> (u64, u64) {
        self.snapshot.as_ref().map_or((0, 0), |m| (m.index, m.term))
    }

    fn first_index(&self) -> u64 {
        self.truncated().0 + 1
    }
}

impl RaftStorage {
    /// Opens (creating if needed) the store under `dir` and checks it: the
    /// snapshot file the log refers to exists, and the log continues right
    /// after it. Deletes snapshot files left behind by a crash.
    ///
    /// # Errors
    /// A bad config, an unreadable or inconsistent store.
    pub fn open(dir: &Path, config: &StorageConfig) -> Result<Self, StorageError> {
        config.validate()?;
        let log_dir = dir.join(LOG_DIR);
        let snap_dir = dir.join(SNAP_DIR);
        for d in [dir, &log_dir, &snap_dir] {
            fs::create_dir_all(d).map_err(io_err("create directory", d))?;
        }
        let log_fs = Arc::new(config.log_file_system());
        let engine = Engine::open_with_file_system(config.engine_config(&log_dir)?, Arc::clone(&log_fs))
            .map_err(engine_err(format!("open {}", log_dir.display())))?;
        let hard_state = engine
            .get_message::<HardState>(RAFT_GROUP_ID, HARD_STATE_KEY)
            .map_err(engine_err("read the hard state"))?
            .unwrap_or_default();
        let snapshot = engine
            .get_message::<SnapshotMetadata>(RAFT_GROUP_ID, SNAPSHOT_META_KEY)
            .map_err(engine_err("read the snapshot metadata"))?;
        let keep = snapshot.as_ref().map(|m| snapshot_path(&snap_dir, m));
        if let Some(path) = &keep
            && !path.is_file()
        {
            return Err(StorageError::Inconsistent(format!(
                "the log refers to snapshot file {}, which is missing",
                path.display()
            )));
        }
        remove_stale_snapshots(&snap_dir, keep.as_deref());
        let storage = Self {
            inner: Arc::new(Inner {
                engine,
                log_fs,
                dir: dir.to_owned(),
                snap_dir,
                config: config.clone(),
                state: RwLock::new(State {
                    hard_state,
                    snapshot,
                    cache: EntryCache::new(config.entry_cache_max_bytes),
                }),
                snapshot_install: Mutex::new(()),
                syncs: AtomicU64::new(0),
            }),
        };
        storage.check_log_follows_snapshot()?;
        Ok(storage)
    }

    /// The log must start right after the snapshot. Entries at or below it can
    /// only be left by a crash of an older layout; they are compacted away.
    fn check_log_follows_snapshot(&self) -> Result<(), StorageError> {
        let st = self.inner.state.write();
        let Some(engine_first) = self.inner.engine.first_index(RAFT_GROUP_ID) else {
            return Ok(());
        };
        let first_index = st.first_index();
        if engine_first > first_index {
            return Err(StorageError::Inconsistent(format!(
                "the snapshot ends at {} but the log starts at {engine_first}",
                first_index - 1
            )));
        }
        if engine_first < first_index {
            tracing::warn!(engine_first, first_index, "log entries below the snapshot found at start-up; compacting");
            let mut batch = LogBatch::default();
            batch.add_command(RAFT_GROUP_ID, Command::Compact { index: first_index });
            self.inner.write_log(&mut batch, true).map_err(engine_err(format!("compact the log to {first_index}")))?;
        }
        Ok(())
    }

    /// True if nothing was ever written (a fresh dir): a node of the initial
    /// cluster must [`bootstrap`](Self::bootstrap); a joining node must not
    /// (it waits for the leader's snapshot).
    pub fn is_fresh(&self) -> bool {
        let st = self.inner.state.read();
        self.inner.is_fresh(&st)
    }

    /// First start of a static cluster: stores the bootstrap snapshot at
    /// [`BOOTSTRAP_INDEX`] with `voters` as its conf state and `initial_state`
    /// as its data (the state machine as of that index; it must be the same on
    /// every node), and a hard state of term [`BOOTSTRAP_TERM`], raft commit
    /// index [`BOOTSTRAP_INDEX`]. Start raft-rs with `applied` =
    /// [`BOOTSTRAP_INDEX`] afterwards, as after any snapshot.
    ///
    /// # Errors
    /// [`StorageError::Bootstrap`] if the storage is not fresh or `voters` is
    /// empty or holds id 0; I/O errors.
    pub fn bootstrap(&self, voters: &[u64], initial_state: Bytes) -> Result<(), StorageError> {
        let _install = self.inner.snapshot_install.lock();
        if !self.is_fresh() {
            return Err(StorageError::Bootstrap("the storage already holds raft state".into()));
        }
        if voters.is_empty() || voters.contains(&0) {
            return Err(StorageError::Bootstrap(format!("voters must be non-empty non-zero ids, got {voters:?}")));
        }
        let mut voters = voters.to_vec();
        voters.sort_unstable();
        voters.dedup();
        let conf_state = ConfState { voters, ..ConfState::default() };
        let meta = snapshot_meta(BOOTSTRAP_INDEX, BOOTSTRAP_TERM, conf_state);
        self.inner.install_snapshot(&meta, &initial_state, Install::ReplaceLog)
    }

    /// Persists one Ready: `entries` (replacing the log's suffix from
    /// `entries[0].index` on) and the hard state when given, in one raft-engine
    /// write. With `sync` it returns only after fdatasync (I3: persist before
    /// speaking); `sync` with nothing to write still syncs earlier writes.
    ///
    /// # Errors
    /// [`StorageError::BadAppend`] if the entries leave a hole, overwrite
    /// compacted entries or are not consecutive; raft-engine errors.
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>, sync: bool) -> Result<(), StorageError> {
        let mut st = self.inner.state.write();
        let mut batch = LogBatch::with_capacity(2);
        if !entries.is_empty() {
            self.inner.check_append(&st, entries)?;
            batch
                .add_entries::<EntryExt>(RAFT_GROUP_ID, entries)
                .map_err(engine_err(format!("encode {} entries", entries.len())))?;
        }
        match hard_state {
            Some(hs) => put_hard_state(&mut batch, hs)?,
            // raft-engine skips an empty batch entirely, fsync included; the
            // hard state is rewritten so that `sync` means what it says.
            None if sync && batch.is_empty() => put_hard_state(&mut batch, &st.hard_state)?,
            None => {}
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.inner.write_log(&mut batch, sync).map_err(engine_err(append_context(entries)))?;
        if let Some(hs) = hard_state {
            st.hard_state = hs.clone();
        }
        st.cache.append(entries);
        Ok(())
    }

    /// Log writes synced since this storage was opened: each an fdatasync.
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    /// Raises the raft commit index in the persisted hard state (a
    /// LightReady's commit index). Never lowers it.
    ///
    /// # Errors
    /// raft-engine errors.
    pub fn set_commit_index(&self, commit: u64, sync: bool) -> Result<(), StorageError> {
        let mut st = self.inner.state.write();
        if commit <= st.hard_state.commit && !sync {
            return Ok(());
        }
        let mut hs = st.hard_state.clone();
        hs.commit = hs.commit.max(commit);
        let mut batch = LogBatch::with_capacity(1);
        put_hard_state(&mut batch, &hs)?;
        self.inner.write_log(&mut batch, sync).map_err(engine_err(format!("set the raft commit index to {commit}")))?;
        st.hard_state = hs;
        Ok(())
    }

    /// Stores a snapshot received from the leader (data and metadata,
    /// durably), drops every log entry, and raises the hard state to at least
    /// the snapshot's term and index. The log's first index becomes
    /// `index + 1` and the conf state the snapshot's. The caller then restores
    /// its state machine from `snapshot.data`.
    ///
    /// # Errors
    /// [`StorageError::SnapshotOutOfDate`] if it is not newer than the current
    /// snapshot; [`StorageError::SnapshotTooLarge`]; I/O errors.
    pub fn apply_snapshot(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        let _install = self.inner.snapshot_install.lock();
        let first_index = self.inner.state.read().first_index();
        if meta.index < first_index {
            return Err(StorageError::SnapshotOutOfDate { index: meta.index, first_index });
        }
        self.inner.install_snapshot(meta, &snapshot.data, Install::ReplaceLog)?;
        tracing::info!(index = meta.index, term = meta.term, bytes = snapshot.data.len(), "stored a received snapshot");
        self.purge()
    }

    /// Stores a snapshot of the applied state machine at `index` (at most the
    /// applied index, so at most the last log index) with `conf_state` as of
    /// that index, then compacts the log so that entries up to `index` are
    /// gone, removes the older snapshot file and purges expired log files.
    /// Does nothing if the log is already compacted to `index` or beyond.
    ///
    /// The snapshot goes to its own fsync'd file under `dir/snap/`, not into
    /// raft-engine: it may be several MiB, and raft-engine would copy it on
    /// every rewrite of old files and keep it in the log files it purges
    /// by size; a file is written once and replaced by rename.
    ///
    /// # Errors
    /// [`StorageError::CompactBeyondLog`]; [`StorageError::SnapshotTooLarge`];
    /// I/O errors.
    pub fn compact(&self, index: u64, conf_state: &ConfState, data: Bytes) -> Result<(), StorageError> {
        let _install = self.inner.snapshot_install.lock();
        let term = {
            let st = self.inner.state.read();
            if index < st.first_index() {
                return Ok(());
            }
            let last_index = self.inner.last_index(&st);
            if index > last_index {
                return Err(StorageError::CompactBeyondLog { index, last_index });
            }
            self.inner.term(&st, index)?
        };
        let meta = snapshot_meta(index, term, conf_state.clone());
        self.inner.install_snapshot(&meta, &data, Install::KeepLogAfter)?;
        tracing::debug!(index, term, bytes = data.len(), "snapshotted the state machine and compacted the log");
        self.purge()
    }

    /// The latest snapshot this node holds (bootstrap, local or received), to
    /// restore the state machine from at start-up; `None` on a fresh or
    /// joining node that has none yet. Reads the file each time.
    ///
    /// # Errors
    /// I/O errors; [`StorageError::CorruptSnapshot`] if the file fails its
    /// checksum or does not match the log's record of it.
    pub fn latest_snapshot(&self) -> Result<Option<Snapshot>, StorageError> {
        let (meta, path, file) = {
            // The file is opened under the lock: an install removes the old
            // file only while holding the write lock, so this one still exists.
            let st = self.inner.state.read();
            let Some(meta) = st.snapshot.clone() else {
                return Ok(None);
            };
            let path = snapshot_path(&self.inner.snap_dir, &meta);
            let file = File::open(&path).map_err(io_err("open snapshot", &path))?;
            (meta, path, file)
        };
        let snapshot = read_snapshot(file, &path, self.inner.config.snapshot_max_bytes)?;
        let got = snapshot.get_metadata();
        if got != &meta {
            return Err(StorageError::CorruptSnapshot {
                path,
                reason: format!(
                    "holds index {} term {}, the log expects {} term {}",
                    got.index, got.term, meta.index, meta.term
                ),
            });
        }
        Ok(Some(snapshot))
    }

    /// Reclaims disk: raft-engine rewrites or removes log files that only
    /// hold compacted entries once the log exceeds `purge_threshold_bytes`.
    /// Cheap below that; call it periodically. If raft-engine finds live
    /// entries in its oldest files it asks for a compaction: the log is
    /// already compacted to the latest snapshot, so this is logged (take
    /// snapshots more often); raft-engine rewrites the entries itself if asked
    /// repeatedly, so the disk stays bounded either way.
    ///
    /// # Errors
    /// raft-engine errors.
    pub fn purge(&self) -> Result<(), StorageError> {
        let wants_compaction =
            self.inner.read_engine(|engine| engine.purge_expired_files()).map_err(engine_err("purge expired files"))?;
        if wants_compaction.contains(&RAFT_GROUP_ID) {
            let first_index = self.inner.state.read().first_index();
            tracing::info!(first_index, "raft-engine holds live entries in old files; snapshot more often");
        }
        Ok(())
    }

    /// Bytes and number of files under the storage's directory.
    ///
    /// # Errors
    /// I/O errors listing the directory.
    pub fn disk_usage(&self) -> io::Result<(u64, usize)> {
        let mut usage = (0, 0);
        add_disk_usage(&self.inner.dir, DISK_USAGE_MAX_DEPTH, &mut usage)?;
        Ok(usage)
    }
}

fn add_disk_usage(dir: &Path, depth: usize, usage: &mut (u64, usize)) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() && depth > 0 {
            add_disk_usage(&entry.path(), depth - 1, usage)?;
        } else if kind.is_file() {
            usage.0 += entry.metadata()?.len();
            usage.1 += 1;
        }
    }
    Ok(())
}

/// How installing a snapshot treats the log.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Install {
    /// A local snapshot: entries after its index stay.
    KeepLogAfter,
    /// A received or bootstrap snapshot: the whole log goes, and the hard state
    /// is raised to the snapshot's term and index.
    ReplaceLog,
}

impl Inner {
    /// Writes `batch` to the log; with `sync`, returns only once it is
    /// durable (I3).
    fn write_log(&self, batch: &mut LogBatch, sync: bool) -> Result<(), raft_engine::Error> {
        self.engine.write(batch, sync)?;
        if sync {
            self.syncs.fetch_add(1, Ordering::Relaxed);
        }
        // A crash test's disk may have crashed between this write and its
        // sync, which then did nothing (raft-engine panics on a failed sync,
        // so the crashed disk's sync "succeeds"): fail as the crash would have,
        // before anyone acts on the write.
        #[cfg(feature = "testing")]
        if sync {
            self.log_fs.check_alive().map_err(raft_engine::Error::Io)?;
        }
        Ok(())
    }

    /// Runs `read` on raft-engine where its block cache cannot answer with
    /// another engine's block. raft-engine keeps the last block it read in
    /// a thread-local cache keyed by file number and offset, not by engine:
    /// on a thread that serves several engines (every node of a
    /// deterministic simulation runs on one thread; a crash test's restarted
    /// node may get its crashed incarnation's pool thread, and rewrites the
    /// offsets whose writes the crash took back) a read could return
    /// another engine's entry. There each read gets a thread of its own,
    /// whose cache starts empty; a production node is one engine per
    /// process and reads in place.
    fn read_engine<T: Send>(&self, read: impl FnOnce(&LogEngine) -> T + Send) -> T {
        #[cfg(feature = "testing")]
        let shared_thread = self.config.disk.is_some() || twopc_proto::host::is_simulated();
        #[cfg(not(feature = "testing"))]
        let shared_thread = twopc_proto::host::is_simulated();
        if !shared_thread {
            return read(&self.engine);
        }
        std::thread::scope(|scope| match scope.spawn(|| read(&self.engine)).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    fn is_fresh(&self, st: &State) -> bool {
        st.hard_state == HardState::default()
            && st.snapshot.is_none()
            && self.engine.last_index(RAFT_GROUP_ID).is_none()
    }

    fn last_index(&self, st: &State) -> u64 {
        let truncated = st.truncated().0;
        self.engine.last_index(RAFT_GROUP_ID).map_or(truncated, |last| last.max(truncated))
    }

    fn term(&self, st: &State, index: u64) -> Result<u64, StorageError> {
        let (truncated, truncated_term) = st.truncated();
        if index == truncated {
            return Ok(truncated_term);
        }
        if index < truncated {
            return Err(StorageError::Compacted { index, first_index: truncated + 1 });
        }
        let last_index = self.last_index(st);
        if index > last_index {
            return Err(StorageError::Unavailable { index, last_index });
        }
        if let Some(term) = st.cache.term(index) {
            return Ok(term);
        }
        match self.read_engine(|engine| engine.get_entry::<EntryExt>(RAFT_GROUP_ID, index)) {
            Ok(Some(entry)) => Ok(entry.term),
            Ok(None) => Err(StorageError::Inconsistent(format!(
                "entry {index} is missing from the log {}..={last_index}",
                truncated + 1
            ))),
            Err(e) => Err(engine_err(format!("read entry {index}"))(e)),
        }
    }

    fn entries(&self, st: &State, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, StorageError> {
        let first_index = st.first_index();
        if low < first_index {
            return Err(StorageError::Compacted { index: low, first_index });
        }
        let last_index = self.last_index(st);
        if high > last_index + 1 || low > high {
            return Err(StorageError::Unavailable { index: high.saturating_sub(1), last_index });
        }
        if low == high {
            return Ok(Vec::new());
        }
        if let Some(entries) = st.cache.slice(low, high, max_size) {
            return Ok(entries);
        }
        let max_size = max_size.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        let mut entries = Vec::new();
        let fetched = self.read_engine(|engine| {
            engine.fetch_entries_to::<EntryExt>(RAFT_GROUP_ID, low, high, max_size, &mut entries)
        });
        match fetched {
            Ok(_) if !entries.is_empty() => Ok(entries),
            Ok(_) | Err(raft_engine::Error::EntryNotFound) => Err(StorageError::Inconsistent(format!(
                "entries {low}..{high} are missing from the log {first_index}..={last_index}"
            ))),
            Err(raft_engine::Error::EntryCompacted) => Err(StorageError::Compacted { index: low, first_index }),
            Err(e) => Err(engine_err(format!("read entries {low}..{high}"))(e)),
        }
    }

    fn check_append(&self, st: &State, entries: &[Entry]) -> Result<(), StorageError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let first_index = st.first_index();
        let last_index = self.last_index(st);
        let consecutive = entries.iter().zip(first.index..).all(|(e, i)| e.index == i);
        if first.index < first_index || first.index > last_index + 1 || !consecutive {
            return Err(StorageError::BadAppend { first: first.index, last: last.index, first_index, last_index });
        }
        Ok(())
    }

    /// Makes `meta` the current snapshot: its file first (durable), then one
    /// synced raft-engine batch recording it and compacting the log. The
    /// caller holds `snapshot_install` and has checked `meta` is newer.
    fn install_snapshot(&self, meta: &SnapshotMetadata, data: &Bytes, how: Install) -> Result<(), StorageError> {
        let path = write_snapshot(&self.snap_dir, meta, data, self.config.snapshot_max_bytes)?;
        let mut st = self.state.write();
        let mut batch = LogBatch::with_capacity(3);
        batch
            .put_message(RAFT_GROUP_ID, SNAPSHOT_META_KEY.to_vec(), meta)
            .map_err(engine_err(format!("encode snapshot metadata at {}", meta.index)))?;
        let mut hard_state = st.hard_state.clone();
        let compact_to = match how {
            Install::KeepLogAfter => {
                // Entries up to the applied index are raft-committed and never
                // replaced; a different term here means a broken caller.
                let term = self.term(&st, meta.index)?;
                if term != meta.term {
                    return Err(StorageError::Inconsistent(format!(
                        "entry {} changed term from {} to {term} while being snapshotted",
                        meta.index, meta.term
                    )));
                }
                // The commit index may have been written unsynced (§4.2); a
                // restart restores the state machine at this snapshot and
                // raft needs a commit index at least as high.
                hard_state.commit = hard_state.commit.max(meta.index);
                put_hard_state(&mut batch, &hard_state)?;
                meta.index + 1
            }
            Install::ReplaceLog => {
                hard_state.term = hard_state.term.max(meta.term);
                hard_state.commit = hard_state.commit.max(meta.index);
                put_hard_state(&mut batch, &hard_state)?;
                self.last_index(&st).max(meta.index) + 1
            }
        };
        batch.add_command(RAFT_GROUP_ID, Command::Compact { index: compact_to });
        // One synced batch: the snapshot becomes current and the log below it
        // goes together, so a crash never leaves a log with a hole.
        self.write_log(&mut batch, true)
            .map_err(engine_err(format!("record snapshot {} and compact the log to {compact_to}", meta.index)))?;
        st.hard_state = hard_state;
        st.snapshot = Some(meta.clone());
        match how {
            Install::KeepLogAfter => st.cache.compact_to(meta.index),
            Install::ReplaceLog => st.cache.clear(),
        }
        // Under the write lock, so a reader that saw the old metadata has
        // already opened the old file (see `latest_snapshot`).
        remove_stale_snapshots(&self.snap_dir, Some(&path));
        Ok(())
    }
}

fn put_hard_state(batch: &mut LogBatch, hs: &HardState) -> Result<(), StorageError> {
    batch
        .put_message(RAFT_GROUP_ID, HARD_STATE_KEY.to_vec(), hs)
        .map_err(engine_err(format!("encode hard state (term {}, commit {})", hs.term, hs.commit)))
}

fn append_context(entries: &[Entry]) -> String {
    match (entries.first(), entries.last()) {
        (Some(first), Some(last)) => format!("append entries {}..={}", first.index, last.index),
        _ => "write the hard state".to_owned(),
    }
}

fn snapshot_meta(index: u64, term: u64, conf_state: ConfState) -> SnapshotMetadata {
    let mut meta = SnapshotMetadata { index, term, ..SnapshotMetadata::default() };
    meta.set_conf_state(conf_state);
    meta
}

fn snapshot_path(snap_dir: &Path, meta: &SnapshotMetadata) -> PathBuf {
    snap_dir.join(format!("{:020}-{:020}.{SNAP_EXT}", meta.index, meta.term))
}

/// Writes a snapshot file durably: a temporary file, fsync, rename, fsync of
/// the directory. Returns its path.
fn write_snapshot(
    snap_dir: &Path,
    meta: &SnapshotMetadata,
    data: &[u8],
    max_bytes: u64,
) -> Result<PathBuf, StorageError> {
    let data_len = data.len() as u64;
    if data_len > max_bytes {
        return Err(StorageError::SnapshotTooLarge { bytes: data_len, max_bytes });
    }
    let path = snapshot_path(snap_dir, meta);
    let meta_bytes = meta.write_to_bytes().map_err(|e| StorageError::CorruptSnapshot {
        path: path.clone(),
        reason: format!("cannot encode its metadata: {e}"),
    })?;
    let Ok(meta_len) = u32::try_from(meta_bytes.len()) else {
        return Err(StorageError::Inconsistent(format!("snapshot metadata of {} bytes", meta_bytes.len())));
    };
    if meta_len > SNAP_META_MAX_BYTES {
        return Err(StorageError::Inconsistent(format!(
            "snapshot metadata of {meta_len} bytes exceeds {SNAP_META_MAX_BYTES}"
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&meta_bytes);
    crc.update(data);
    let mut header = [0u8; SNAP_HEADER_LEN];
    header[..8].copy_from_slice(&SNAP_MAGIC);
    header[8..12].copy_from_slice(&meta_len.to_le_bytes());
    header[12..20].copy_from_slice(&data_len.to_le_bytes());
    header[20..24].copy_from_slice(&crc.finalize().to_le_bytes());

    let tmp = path.with_extension(SNAP_TMP_EXT);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("create snapshot", &tmp))?;
    file.write_all(&header).map_err(io_err("write snapshot", &tmp))?;
    file.write_all(&meta_bytes).map_err(io_err("write snapshot", &tmp))?;
    file.write_all(data).map_err(io_err("write snapshot", &tmp))?;
    file.sync_all().map_err(io_err("fsync snapshot", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err("rename snapshot into place", &path))?;
    File::open(snap_dir).and_then(|d| d.sync_all()).map_err(io_err("fsync snapshot directory", snap_dir))?;
    Ok(path)
}

fn read_snapshot(mut file: File, path: &Path, max_bytes: u64) -> Result<Snapshot, StorageError> {
    let corrupt = |reason: String| StorageError::CorruptSnapshot { path: path.to_owned(), reason };
    let file_len = file.metadata().map_err(io_err("stat snapshot", path))?.len();
    let mut header = [0u8; SNAP_HEADER_LEN];
    file.read_exact(&mut header).map_err(io_err("read snapshot header", path))?;
    if header[..8] != SNAP_MAGIC {
        return Err(corrupt("bad magic or unknown format version".into()));
    }
    let field = |range: std::ops::Range<usize>| {
        let mut buf = [0u8; 8];
        buf[..range.len()].copy_from_slice(&header[range]);
        u64::from_le_bytes(buf)
    };
    let (meta_len, data_len, crc) = (field(8..12), field(12..20), field(20..24));
    if meta_len > u64::from(SNAP_META_MAX_BYTES) {
        return Err(corrupt(format!("metadata length {meta_len} is implausible")));
    }
    if data_len > max_bytes {
        return Err(StorageError::SnapshotTooLarge { bytes: data_len, max_bytes });
    }
    let expected_len = SNAP_HEADER_LEN as u64 + meta_len + data_len;
    if file_len != expected_len {
        return Err(corrupt(format!("file is {file_len} bytes, its header says {expected_len}")));
    }
    let to_usize = |n: u64| usize::try_from(n).map_err(|_| corrupt(format!("length {n} does not fit in memory")));
    let mut meta_bytes = vec![0u8; to_usize(meta_len)?];
    let mut data = vec![0u8; to_usize(data_len)?];
    file.read_exact(&mut meta_bytes).map_err(io_err("read snapshot", path))?;
    file.read_exact(&mut data).map_err(io_err("read snapshot", path))?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&meta_bytes);
    hasher.update(&data);
    if u64::from(hasher.finalize()) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let meta = SnapshotMetadata::parse_from_bytes(&meta_bytes).map_err(|e| corrupt(format!("bad metadata: {e}")))?;
    let mut snapshot = Snapshot::default();
    snapshot.set_metadata(meta);
    snapshot.data = Bytes::from(data);
    Ok(snapshot)
}

/// Deletes snapshot and temporary files other than `keep`. A failure only
/// leaks disk until the next install or open, so it is logged, not returned.
fn remove_stale_snapshots(snap_dir: &Path, keep: Option<&Path>) {
    let entries = match fs::read_dir(snap_dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(dir = %snap_dir.display(), %error, "cannot list snapshot files");
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path.extension().is_some_and(|ext| ext == SNAP_EXT || ext == SNAP_TMP_EXT);
        if !ours || Some(path.as_path()) == keep {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "removed an old snapshot file"),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot remove an old snapshot file")
            }
        }
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.inner.state.read();
        let conf_state = st.snapshot.as_ref().map(|m| m.get_conf_state().clone()).unwrap_or_default();
        Ok(RaftState::new(st.hard_state.clone(), conf_state))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let st = self.inner.state.read();
        Ok(self.inner.entries(&st, low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.inner.state.read();
        Ok(self.inner.term(&st, idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.state.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        let st = self.inner.state.read();
        Ok(self.inner.last_index(&st))
    }

    /// The latest stored snapshot. raft-rs panics on any storage error here
    /// but `SnapshotTemporarilyUnavailable` (then it retries later), so a
    /// failure to read the file is logged and reported as that.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        match self.latest_snapshot() {
            Ok(Some(snapshot)) if snapshot.get_metadata().index >= request_index => Ok(snapshot),
            Ok(_) => Err(unavailable),
            Err(error) => {
                tracing::error!(to, %error, "cannot read the snapshot for a follower");
                Err(unavailable)
            }
        }
    }
}

/// The newest entries of the log, in memory, within a byte budget: always a
/// suffix of the log (its last entry is the log's last entry) or empty.
struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: u64,
    max_bytes: u64,
}

impl EntryCache {
    fn new(max_bytes: u64) -> Self {
        Self { entries: VecDeque::new(), bytes: 0, max_bytes }
    }

    fn size(entry: &Entry) -> u64 {
        u64::from(entry.compute_size())
    }

    /// Mirrors an append to the log: drops the replaced suffix, adds the new
    /// entries, evicts the oldest beyond the budget.
    fn append(&mut self, new: &[Entry]) {
        let Some(first) = new.first() else { return };
        if self.max_bytes == 0 {
            return;
        }
        while let Some(back) = self.entries.back() {
            if back.index < first.index {
                break;
            }
            self.bytes -= Self::size(back);
            self.entries.pop_back();
        }
        if self.entries.back().is_some_and(|back| back.index + 1 != first.index) {
            self.clear();
        }
        for entry in new {
            self.bytes += Self::size(entry);
            self.entries.push_back(entry.clone());
        }
        while self.bytes > self.max_bytes {
            let Some(front) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= Self::size(&front);
        }
    }

    fn compact_to(&mut self, index: u64) {
        while let Some(front) = self.entries.front() {
            if front.index > index {
                break;
            }
            self.bytes -= Self::size(front);
            self.entries.pop_front();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    fn term(&self, index: u64) -> Option<u64> {
        let front = self.entries.front()?.index;
        let offset = usize::try_from(index.checked_sub(front)?).ok()?;
        self.entries.get(offset).map(|e| e.term)
    }

    /// Entries `[low, high)` if all are cached, cut like raft-engine's
    /// `fetch_entries_to` at `max_size` bytes but never to nothing.
    fn slice(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
        let front = self.entries.front()?.index;
        let back = self.entries.back()?.index;
        if low < front || high > back + 1 {
            return None;
        }
        let start = usize::try_from(low - front).ok()?;
        let end = usize::try_from(high - front).ok()?;
        let mut out = Vec::with_capacity(end - start);
        let mut total = 0u64;
        for entry in self.entries.range(start..end) {
            total += Self::size(entry);
            if max_size.is_some_and(|max| total > max) && !out.is_empty() {
                break;
            }
            out.push(entry.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Context as _, Result, bail, ensure};
    use raft::Storage as _;

    fn entry(index: u64, term: u64, data_len: usize) -> Entry {
        // Varied bytes, so that compression cannot hide the volume written.
        let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data = (0..data_len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect::<Vec<u8>>()
            .into();
        Entry { index, term, data, ..Entry::default() }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term, 16)).collect()
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..HardState::default() }
    }

    fn voters(ids: &[u64]) -> ConfState {
        ConfState { voters: ids.to_vec(), ..ConfState::default() }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn raft_err<T: std::fmt::Debug>(r: raft::Result<T>) -> Result<raft::StorageError> {
        match r {
            Err(raft::Error::Store(e)) => Ok(e),
            other => bail!("expected a storage error, got {other:?}"),
        }
    }

    /// Both read paths: from the in-memory cache and from raft-engine's files.
    fn configs() -> [StorageConfig; 2] {
        let small = StorageConfig {
            target_file_size_bytes: 64 * 1024,
            purge_threshold_bytes: 256 * 1024,
            ..StorageConfig::default()
        };
        [small.clone(), StorageConfig { entry_cache_max_bytes: 0, ..small }]
    }

    fn bootstrapped(dir: &Path, config: &StorageConfig) -> Result<RaftStorage> {
        let s = RaftStorage::open(dir, config)?;
        ensure!(s.is_fresh());
        s.bootstrap(&[3, 1, 2], Bytes::from_static(b"initial"))?;
        Ok(s)
    }

    #[test]
    // Proves: RaftStorage is shareable with the raft task and other threads.
    fn storage_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<RaftStorage>();
    }

    #[test]
    // Proves: bootstrap yields the snapshot raft-rs starts from (index 1,
    // voters, data), only on a fresh store, and survives a reopen.
    fn bootstrap_records_voters_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = StorageConfig::default();
        let s = bootstrapped(dir.path(), &config)?;
        ensure!(!s.is_fresh());
        ensure!(s.bootstrap(&[1], Bytes::new()).is_err(), "a second bootstrap must fail");
        drop(s);
        let s = RaftStorage::open(dir.path(), &config)?;
        ensure!(!s.is_fresh());
        let state = s.initial_state()?;
        ensure!(state.conf_state.voters == [1, 2, 3]);
        ensure!(state.hard_state == hard_state(BOOTSTRAP_TERM, 0, BOOTSTRAP_INDEX));
        ensure!(s.first_index()? == BOOTSTRAP_INDEX + 1 && s.last_index()? == BOOTSTRAP_INDEX);
        ensure!(s.term(BOOTSTRAP_INDEX)? == BOOTSTRAP_TERM);
        ensure!(raft_err(s.term(0))? == raft::StorageError::Compacted);
        let snap = s.latest_snapshot()?.context("bootstrap snapshot")?;
        ensure!(snap.get_metadata().index == BOOTSTRAP_INDEX && snap.get_data() == b"initial");
        ensure!(s.snapshot(0, 2)?.get_data() == b"initial");

        let empty = tempfile::tempdir()?;
        let s = RaftStorage::open(empty.path(), &config)?;
        ensure!(s.is_fresh() && s.latest_snapshot()?.is_none());
        ensure!(s.bootstrap(&[], Bytes::new()).is_err(), "no voters");
        ensure!(s.first_index()? == 1 && s.last_index()? == 0 && s.term(0)? == 0);
        ensure!(raft_err(s.snapshot(0, 1))? == raft::StorageError::SnapshotTemporarilyUnavailable);
        Ok(())
    }

    #[cfg(feature = "testing")]
    #[test]
    // Proves: two logs read on one thread each read their own entries, even
    // where both hold a block at the same file and offset (raft-engine's
    // thread-local block cache is keyed by those alone; see read_engine).
    fn two_logs_on_one_thread_each_read_their_own_entries() -> Result<()> {
        let config = || StorageConfig {
            entry_cache_max_bytes: 0,
            disk: Some(TestDisk(LossyDisk::new())),
            ..StorageConfig::default()
        };
        let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let a = bootstrapped(dir_a.path(), &config())?;
        let b = bootstrapped(dir_b.path(), &config())?;
        a.append(&entries(2..=10, 5), Some(&hard_state(5, 1, BOOTSTRAP_INDEX)), true)?;
        b.append(&entries(2..=10, 7), Some(&hard_state(7, 1, BOOTSTRAP_INDEX)), true)?;
        for index in 2..=10 {
            ensure!(a.term(index)? == 5, "a's entry {index}");
            ensure!(b.term(index)? == 7, "b's entry {index}");
        }
        ensure!(a.entries(2, 11, None, ctx())? == entries(2..=10, 5));
        ensure!(b.entries(2, 11, None, ctx())? == entries(2..=10, 7));
        Ok(())
    }

    #[test]
    // Proves: appended entries, terms and the hard state read back the same
    // before and after a reopen, on both read paths; max_size is honoured
    // and never returns nothing; out-of-range reads give raft-rs's errors.
    fn append_and_read_back_across_reopen() -> Result<()> {
        for config in configs() {
            let dir = tempfile::tempdir()?;
            let s = bootstrapped(dir.path(), &config)?;
            let written: Vec<Entry> = (2..=300).map(|i| entry(i, 2 + i / 100, 100)).collect();
            for chunk in written.chunks(37) {
                s.append(chunk, Some(&hard_state(4, 1, BOOTSTRAP_INDEX)), true)?;
            }
            s.set_commit_index(250, false)?;
            let check = |s: &RaftStorage| -> Result<()> {
                ensure!(s.first_index()? == 2 && s.last_index()? == 300);
                ensure!(s.entries(2, 301, None, ctx())? == written);
                ensure!(s.entries(150, 160, u64::MAX, ctx())? == written[148..158]);
                for e in &written {
                    ensure!(s.term(e.index)? == e.term);
                }
                let one = u64::from(written[0].compute_size());
                ensure!(s.entries(2, 301, 0, ctx())?.len() == 1, "at least one entry");
                ensure!(s.entries(2, 301, one * 5 + 1, ctx())?.len() == 5);
                ensure!(raft_err(s.entries(1, 5, None, ctx()))? == raft::StorageError::Compacted);
                ensure!(raft_err(s.entries(290, 302, None, ctx()))? == raft::StorageError::Unavailable);
                ensure!(raft_err(s.term(301))? == raft::StorageError::Unavailable);
                ensure!(s.initial_state()?.hard_state == hard_state(4, 1, 250));
                ensure!(s.initial_state()?.conf_state.voters == [1, 2, 3]);
                Ok(())
            };
            check(&s)?;
            drop(s);
            check(&RaftStorage::open(dir.path(), &config)?)?;
        }
        Ok(())
    }

    #[test]
    // Proves: an append starting inside the log replaces the old suffix (also
    // after a reopen), and appends that would leave a hole or rewrite
    // compacted entries are refused with an error, not a panic.
    fn conflicting_append_truncates_suffix() -> Result<()> {
        for config in configs() {
            let dir = tempfile::tempdir()?;
            let s = bootstrapped(dir.path(), &config)?;
            s.append(&entries(2..=20, 2), None, true)?;
            s.append(&entries(11..=13, 3), Some(&hard_state(3, 0, 5)), true)?;
            let expect: Vec<Entry> = entries(2..=10, 2).into_iter().chain(entries(11..=13, 3)).collect();
            let check = |s: &RaftStorage| -> Result<()> {
                ensure!(s.last_index()? == 13);
                ensure!(s.entries(2, 14, None, ctx())? == expect);
                ensure!(s.term(10)? == 2 && s.term(11)? == 3);
                ensure!(matches!(s.append(&entries(15..=16, 3), None, true), Err(StorageError::BadAppend { .. })));
                ensure!(matches!(s.append(&entries(1..=2, 3), None, true), Err(StorageError::BadAppend { .. })));
                let gap = [entry(14, 3, 1), entry(16, 3, 1)];
                ensure!(matches!(s.append(&gap, None, true), Err(StorageError::BadAppend { .. })));
                ensure!(s.last_index()? == 13);
                Ok(())
            };
            check(&s)?;
            drop(s);
            check(&RaftStorage::open(dir.path(), &config)?)?;
        }
        Ok(())
    }

    #[test]
    // Proves: a local snapshot records a commit index at least its own, so
    // a restart (which applies from the snapshot) never finds the commit
    // index below it, whatever the unsynced commit writes before it left.
    fn compact_records_a_commit_index_at_least_the_snapshot() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = &configs()[0];
        let s = bootstrapped(dir.path(), config)?;
        s.append(&entries(2..=100, 2), Some(&hard_state(2, 1, 50)), true)?;
        s.compact(90, &voters(&[1, 2, 3]), Bytes::from_static(b"state@90"))?;
        drop(s);
        let s = RaftStorage::open(dir.path(), config)?;
        let commit = s.initial_state()?.hard_state.commit;
        ensure!(commit == 90, "commit index {commit} after a snapshot at 90");
        Ok(())
    }

    #[test]
    // Proves: compact moves the first index, keeps term(snapshot index),
    // answers Compacted below it, serves the stored snapshot (and refuses
    // newer requests), keeps one snapshot file, and all of it survives a
    // reopen. Also a second compaction at a lower index is a no-op.
    fn compact_moves_first_index_and_serves_snapshot() -> Result<()> {
        for config in configs() {
            let dir = tempfile::tempdir()?;
            let s = bootstrapped(dir.path(), &config)?;
            s.append(&entries(2..=600, 2), None, true)?;
            s.append(&entries(601..=1000, 3), Some(&hard_state(3, 2, 1000)), true)?;
            s.compact(700, &voters(&[1, 2, 3, 4]), Bytes::from_static(b"state@700"))?;
            s.compact(650, &voters(&[9]), Bytes::from_static(b"older"))?;
            ensure!(matches!(s.compact(1001, &voters(&[1]), Bytes::new()), Err(StorageError::CompactBeyondLog { .. })));
            let check = |s: &RaftStorage| -> Result<()> {
                ensure!(s.first_index()? == 701 && s.last_index()? == 1000);
                ensure!(s.term(700)? == 3);
                ensure!(raft_err(s.term(699))? == raft::StorageError::Compacted);
                ensure!(raft_err(s.entries(600, 800, None, ctx()))? == raft::StorageError::Compacted);
                ensure!(s.entries(701, 1001, None, ctx())? == entries(701..=1000, 3));
                let snap = s.snapshot(0, 2)?;
                ensure!(snap.get_data() == b"state@700");
                ensure!(snap.get_metadata().index == 700 && snap.get_metadata().term == 3);
                ensure!(snap.get_metadata().get_conf_state().voters == [1, 2, 3, 4]);
                ensure!(raft_err(s.snapshot(701, 2))? == raft::StorageError::SnapshotTemporarilyUnavailable);
                ensure!(s.initial_state()?.conf_state.voters == [1, 2, 3, 4]);
                ensure!(s.initial_state()?.hard_state == hard_state(3, 2, 1000));
                ensure!(fs::read_dir(dir.path().join(SNAP_DIR))?.count() == 1, "one snapshot file");
                Ok(())
            };
            check(&s)?;
            // Compacting to the last entry leaves an empty log that still appends.
            s.compact(1000, &voters(&[1, 2, 3, 4]), Bytes::from_static(b"state@1000"))?;
            ensure!(s.first_index()? == 1001 && s.last_index()? == 1000 && s.term(1000)? == 3);
            s.append(&entries(1001..=1002, 4), None, true)?;
            drop(s);
            let s = RaftStorage::open(dir.path(), &config)?;
            ensure!(s.first_index()? == 1001 && s.last_index()? == 1002 && s.term(1002)? == 4);
            ensure!(s.latest_snapshot()?.context("snapshot")?.get_data() == b"state@1000");
        }
        Ok(())
    }

    #[test]
    // Proves: disk stays bounded under continuous writes with periodic
    // compaction, because compact purges raft-engine's expired files: 200k
    // entries of 100 bytes (~24 MB of log) never take more than 4 MiB (22 MB without the purge). Fails
    // if the purge is removed.
    fn disk_stays_bounded_under_compaction() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = StorageConfig {
            target_file_size_bytes: 128 * 1024,
            purge_threshold_bytes: 1024 * 1024,
            batch_compression_threshold_bytes: 0,
            ..StorageConfig::default()
        };
        let s = bootstrapped(dir.path(), &config)?;
        let (mut max_bytes, mut max_files) = (0, 0);
        let mut written = 0u64;
        let mut next = BOOTSTRAP_INDEX + 1;
        while next < 200_000 {
            let batch: Vec<Entry> = (next..next + 100).map(|i| entry(i, 2, 100)).collect();
            written += batch.iter().map(|e| u64::from(e.compute_size())).sum::<u64>();
            next += 100;
            s.append(&batch, Some(&hard_state(2, 1, next - 1)), false)?;
            if next % 10_000 < 100 {
                s.compact(next - 1, &voters(&[1, 2, 3]), Bytes::from(vec![7u8; 4096]))?;
                let (bytes, files) = s.disk_usage()?;
                max_bytes = max_bytes.max(bytes);
                max_files = max_files.max(files);
            }
        }
        ensure!(written > 20_000_000, "wrote {written} bytes");
        ensure!(s.first_index()? > 190_000, "first index {}", s.first_index()?);
        ensure!(max_bytes < 4 * 1024 * 1024, "disk grew to {max_bytes} bytes");
        ensure!(max_files < 32, "disk grew to {max_files} files");
        Ok(())
    }

    #[test]
    // Proves: a snapshot from the leader on a node with older (and
    // conflicting newer) entries drops them all, sets the indexes, conf state
    // and hard state, accepts appends after it, survives a reopen; a snapshot
    // that is not newer is refused.
    fn apply_snapshot_replaces_log() -> Result<()> {
        for config in configs() {
            let dir = tempfile::tempdir()?;
            let s = bootstrapped(dir.path(), &config)?;
            s.append(&entries(2..=150, 2), Some(&hard_state(2, 1, 40)), true)?;
            let mut snap = Snapshot::default();
            snap.set_metadata(snapshot_meta(100, 5, voters(&[1, 2, 3, 4])));
            snap.data = Bytes::from_static(b"leader state");
            s.apply_snapshot(&snap)?;
            let check = |s: &RaftStorage, last: u64| -> Result<()> {
                ensure!(s.first_index()? == 101 && s.last_index()? == last);
                ensure!(s.term(100)? == 5);
                ensure!(raft_err(s.entries(2, 50, None, ctx()))? == raft::StorageError::Compacted);
                let state = s.initial_state()?;
                ensure!(state.conf_state.voters == [1, 2, 3, 4]);
                ensure!(state.hard_state.commit >= 100 && state.hard_state.term >= 5);
                ensure!(s.latest_snapshot()?.context("snapshot")? == snap);
                Ok(())
            };
            check(&s, 100)?;
            ensure!(matches!(s.apply_snapshot(&snap), Err(StorageError::SnapshotOutOfDate { .. })));
            s.append(&entries(101..=110, 5), Some(&hard_state(5, 0, 105)), true)?;
            check(&s, 110)?;
            drop(s);
            let s = RaftStorage::open(dir.path(), &config)?;
            check(&s, 110)?;
            ensure!(s.entries(101, 111, None, ctx())? == entries(101..=110, 5));
        }
        Ok(())
    }

    #[test]
    // Proves: a joining node (fresh storage) accepts the leader's snapshot
    // and is no longer fresh.
    fn fresh_node_takes_leader_snapshot() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = RaftStorage::open(dir.path(), &StorageConfig::default())?;
        s.append(&[], Some(&hard_state(7, 0, 0)), true)?;
        let mut snap = Snapshot::default();
        snap.set_metadata(snapshot_meta(BOOTSTRAP_INDEX, BOOTSTRAP_TERM, voters(&[1, 2, 3, 4])));
        s.apply_snapshot(&snap)?;
        ensure!(!s.is_fresh());
        ensure!(s.first_index()? == 2 && s.last_index()? == 1);
        ensure!(s.initial_state()?.hard_state == hard_state(7, 0, 1));
        Ok(())
    }

    #[test]
    // Proves: a crash between writing a snapshot file and recording it leaves
    // an orphan that open removes; a corrupt snapshot file is reported, not
    // silently restored; a missing one fails open.
    fn snapshot_files_are_checked() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = StorageConfig::default();
        let s = bootstrapped(dir.path(), &config)?;
        let snap_dir = dir.path().join(SNAP_DIR);
        drop(s);
        let orphan = snapshot_path(&snap_dir, &snapshot_meta(50, 3, voters(&[1])));
        write_snapshot(&snap_dir, &snapshot_meta(50, 3, voters(&[1])), b"never recorded", 1024)?;
        fs::write(snap_dir.join("x.tmp"), b"half written")?;
        let s = RaftStorage::open(dir.path(), &config)?;
        ensure!(!orphan.exists());
        ensure!(fs::read_dir(&snap_dir)?.count() == 1);

        let current = snapshot_path(&snap_dir, &snapshot_meta(BOOTSTRAP_INDEX, BOOTSTRAP_TERM, ConfState::default()));
        let mut bytes = fs::read(&current)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&current, &bytes)?;
        ensure!(matches!(s.latest_snapshot(), Err(StorageError::CorruptSnapshot { .. })));
        ensure!(raft_err(s.snapshot(0, 2))? == raft::StorageError::SnapshotTemporarilyUnavailable);
        drop(s);
        fs::remove_file(&current)?;
        ensure!(matches!(RaftStorage::open(dir.path(), &config), Err(StorageError::Inconsistent(_))));
        Ok(())
    }

    #[test]
    // Proves: raft-rs itself runs on this storage: a single-voter node
    // elects itself and raft-commits proposals through the Ready order,
    // then restarts from the data dir with its log, hard state and applied
    // point, and raft-commits again.
    fn raft_rs_runs_and_restarts_on_it() -> Result<()> {
        use raft::{Config, RawNode};
        let dir = tempfile::tempdir()?;
        let storage_config = StorageConfig::default();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut applied = Vec::new();

        let run = |node: &mut RawNode<RaftStorage>, applied: &mut Vec<Vec<u8>>| -> Result<()> {
            for _ in 0..10 {
                if !node.has_ready() {
                    return Ok(());
                }
                let mut ready = node.ready();
                ensure!(ready.snapshot().get_metadata().index == 0);
                for e in ready.take_committed_entries() {
                    if !e.data.is_empty() {
                        applied.push(e.data.to_vec());
                    }
                }
                let store = node.store().clone();
                store.append(ready.entries(), ready.hs(), true)?;
                let mut light = node.advance(ready);
                if let Some(commit) = light.commit_index() {
                    store.set_commit_index(commit, false)?;
                }
                for e in light.take_committed_entries() {
                    if !e.data.is_empty() {
                        applied.push(e.data.to_vec());
                    }
                }
                node.advance_apply();
            }
            bail!("the node kept producing Readys")
        };

        let storage = RaftStorage::open(dir.path(), &storage_config)?;
        storage.bootstrap(&[1], Bytes::new())?;
        let config = Config { id: 1, applied: BOOTSTRAP_INDEX, ..Config::default() };
        let mut node = RawNode::new(&config, storage, &logger)?;
        node.campaign()?;
        run(&mut node, &mut applied)?;
        node.propose(vec![], b"one".to_vec())?;
        node.propose(vec![], b"two".to_vec())?;
        run(&mut node, &mut applied)?;
        ensure!(applied == [b"one".to_vec(), b"two".to_vec()], "applied {applied:?}");
        let last = node.raft.raft_log.last_index();
        node.store().compact(last, &voters(&[1]), Bytes::from_static(b"sm"))?;
        drop(node);

        let storage = RaftStorage::open(dir.path(), &storage_config)?;
        let snap = storage.latest_snapshot()?.context("snapshot")?;
        let config = Config { id: 1, applied: snap.get_metadata().index, ..Config::default() };
        let mut node = RawNode::new(&config, storage, &logger)?;
        ensure!(node.raft.raft_log.last_index() == last && node.raft.raft_log.committed == last);
        node.campaign()?;
        run(&mut node, &mut applied)?;
        node.propose(vec![], b"three".to_vec())?;
        run(&mut node, &mut applied)?;
        ensure!(applied.last().map(Vec::as_slice) == Some(b"three".as_slice()), "applied {applied:?}");
        Ok(())
    }
}
