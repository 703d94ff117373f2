//! A disk that loses what was never synced (feature `testing`), for crash
//! tests. Files are real files; for each one the disk remembers how to undo
//! every write, truncation and extension made since that file's last sync,
//! and [`LossyDisk::crash`] undoes them, newest first, as a power cut takes
//! back a page cache. The incarnation that wrote them can then do no more
//! I/O (every call fails), so a crashed node cannot go on as if its writes
//! had landed; the next incarnation ([`LossyDisk::file_system`] or
//! [`LossyDisk::open`] again, for a restarted node) sees what the crash left.
//!
//! [`LossyFileSystem`] is raft-engine's view of such a disk (the coordinator's
//! log store opens its engine on one when `StorageConfig::disk` is set);
//! [`LossyFile`] is one file of it, which other stores (the tests' redb
//! backend for the banks) wrap.
//!
//! What it models: data that was written but not followed by a sync of its
//! file is lost, wholly or in part, at a crash (here: wholly, back to the
//! last sync). What it does not: file creation, renames and deletions are
//! durable at once, and a single write is never torn.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use raft_engine::env::{FileSystem, Handle, Permission, WriteExt};

/// One way to take back a change made since the last sync.
#[derive(Debug)]
enum Undo {
    /// Put these bytes back at this offset.
    Restore { offset: u64, bytes: Vec<u8> },
    /// Set the file's length back to this.
    SetLen(u64),
}

#[derive(Debug, Default)]
struct DiskState {
    /// Bumped by every crash; I/O of an older incarnation fails.
    generation: u64,
    /// Per file, the undo records of its changes since its last sync, oldest first.
    unsynced: HashMap<PathBuf, Vec<Undo>>,
}

/// What one crash took back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Files that had unsynced changes.
    pub files: usize,
    /// Changes undone (writes, truncations, extensions).
    pub changes: usize,
}

/// One node's disk: every file its incarnations open through it.
#[derive(Debug)]
pub struct LossyDisk {
    state: Mutex<DiskState>,
    /// Whether changes are recorded at all: a disk nobody will crash skips
    /// the bookkeeping.
    crashable: bool,
}

impl LossyDisk {
    /// A disk with nothing unsynced, which a test may crash.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { state: Mutex::default(), crashable: true })
    }

    /// The power cut: every change not followed by a sync of its file is
    /// undone, and every file, handle and file system opened before now
    /// fails from now on.
    ///
    /// # Errors
    /// A file could not be put back (the disk is then in an unknown state
    /// and the test should stop).
    pub fn crash(&self) -> io::Result<CrashReport> {
        let mut state = self.state.lock();
        state.generation += 1;
        let mut report = CrashReport::default();
        for (path, undos) in state.unsynced.drain() {
            report.files += 1;
            report.changes += undos.len();
            let file = match OpenOptions::new().write(true).open(&path) {
                Ok(file) => file,
                // Deleted since: deletions are durable at once.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for undo in undos.into_iter().rev() {
                match undo {
                    Undo::Restore { offset, bytes } => file.write_all_at(&bytes, offset)?,
                    Undo::SetLen(len) => file.set_len(len)?,
                }
            }
            file.sync_all()?;
        }
        Ok(report)
    }

    /// raft-engine's view of this disk for the incarnation starting now.
    pub fn file_system(self: &Arc<Self>) -> LossyFileSystem {
        LossyFileSystem { disk: Arc::clone(self), generation: self.state.lock().generation }
    }

    /// Opens (with `create`, creates) the file at `path` for the incarnation
    /// starting now.
    ///
    /// # Errors
    /// As [`OpenOptions::open`].
    pub fn open(self: &Arc<Self>, path: &Path, create: bool) -> io::Result<LossyFile> {
        let generation = self.state.lock().generation;
        self.open_as(generation, path, create)
    }

    fn open_as(self: &Arc<Self>, generation: u64, path: &Path, create: bool) -> io::Result<LossyFile> {
        self.check(generation)?;
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(LossyFile { disk: Arc::clone(self), generation, path: path.to_owned(), file })
    }

    /// Whether `generation` is still the current incarnation: always, on a
    /// disk nobody crashes (so it takes no lock there).
    fn check(&self, generation: u64) -> io::Result<()> {
        if !self.crashable {
            return Ok(());
        }
        check_generation(&self.state.lock(), generation)
    }
}

fn check_generation(state: &DiskState, generation: u64) -> io::Result<()> {
    if state.generation == generation {
        Ok(())
    } else {
        Err(io::Error::other("simulated crash: this incarnation's disk is gone"))
    }
}

/// One file of a [`LossyDisk`]: positional reads and writes, length changes
/// and sync, with every change recorded until the next sync.
#[derive(Debug)]
pub struct LossyFile {
    disk: Arc<LossyDisk>,
    generation: u64,
    path: PathBuf,
    file: File,
}

impl LossyFile {
    /// The file's length. (No `is_empty`: a file's length is read to size
    /// reads, not to ask whether it is empty.)
    ///
    /// # Errors
    /// After a crash, or as [`File::metadata`].
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> io::Result<u64> {
        self.disk.check(self.generation)?;
        Ok(self.file.metadata()?.len())
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer at the end of the file.
    ///
    /// # Errors
    /// After a crash, or as [`FileExt::read_at`](std::os::unix::fs::FileExt::read_at).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.disk.check(self.generation)?;
        self.file.read_at(buf, offset)
    }

    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// After a crash, or past the end of the file.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk.check(self.generation)?;
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `data` at `offset`, extending the file if needed.
    ///
    /// # Errors
    /// After a crash, or as the write.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.disk.crashable {
            return self.file.write_all_at(data, offset);
        }
        // Held across the write, so a crash never falls between the record and the change.
        let mut state = self.disk.state.lock();
        check_generation(&state, self.generation)?;
        let len = self.file.metadata()?.len();
        let end = offset + data.len() as u64;
        let mut undos = Vec::with_capacity(2);
        if end > len {
            undos.push(Undo::SetLen(len));
        }
        if offset < len {
            undos.push(Undo::Restore { offset, bytes: self.read_range(offset, end.min(len))? });
        }
        state.unsynced.entry(self.path.clone()).or_default().extend(undos);
        self.file.write_all_at(data, offset)
    }

    /// Sets the file's length (new bytes read as zero).
    ///
    /// # Errors
    /// After a crash, or as [`File::set_len`].
    pub fn set_len(&self, new_len: u64) -> io::Result<()> {
        if !self.disk.crashable {
            return self.file.set_len(new_len);
        }
        let mut state = self.disk.state.lock();
        check_generation(&state, self.generation)?;
        let len = self.file.metadata()?.len();
        let mut undos = Vec::with_capacity(2);
        if new_len < len {
            undos.push(Undo::Restore { offset: new_len, bytes: self.read_range(new_len, len)? });
        }
        if new_len != len {
            undos.push(Undo::SetLen(len));
        }
        state.unsynced.entry(self.path.clone()).or_default().extend(undos);
        self.file.set_len(new_len)
    }

    /// Makes every change so far durable: a crash no longer takes it back.
    ///
    /// # Errors
    /// After a crash, or as [`File::sync_data`].
    pub fn sync(&self) -> io::Result<()> {
        if !self.disk.crashable {
            return self.file.sync_data();
        }
        let mut state = self.disk.state.lock();
        check_generation(&state, self.generation)?;
        self.file.sync_data()?;
        state.unsynced.remove(&self.path);
        Ok(())
    }

    fn read_range(&self, from: u64, to: u64) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; usize::try_from(to - from).map_err(io::Error::other)?];
        self.file.read_exact_at(&mut bytes, from)?;
        Ok(bytes)
    }
}

/// raft-engine's file system on a [`LossyDisk`], for one incarnation of a node.
#[derive(Debug)]
pub struct LossyFileSystem {
    disk: Arc<LossyDisk>,
    generation: u64,
}

impl LossyFileSystem {
    /// A file system that keeps nothing from crashes because none will come:
    /// a disk of its own that nobody crashes, and no bookkeeping.
    pub fn durable() -> Self {
        Arc::new(LossyDisk { state: Mutex::default(), crashable: false }).file_system()
    }

    /// Whether this incarnation's disk is still there. A sync that returned
    /// after a crash did nothing (see [`Handle::sync`] for [`LossyFile`]), so
    /// a caller that synced checks this before acting on the write.
    ///
    /// # Errors
    /// After a crash.
    pub fn check_alive(&self) -> io::Result<()> {
        self.disk.check(self.generation)
    }
}

impl FileSystem for LossyFileSystem {
    type Handle = LossyFile;
    type Reader = LossyCursor;
    type Writer = LossyCursor;

    fn create<P: AsRef<Path>>(&self, path: P) -> io::Result<LossyFile> {
        self.disk.open_as(self.generation, path.as_ref(), true)
    }

    fn open<P: AsRef<Path>>(&self, path: P, _perm: Permission) -> io::Result<LossyFile> {
        self.disk.open_as(self.generation, path.as_ref(), false)
    }

    fn delete<P: AsRef<Path>>(&self, path: P) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        check_generation(&state, self.generation)?;
        state.unsynced.remove(path.as_ref());
        std::fs::remove_file(path)
    }

    fn rename<P: AsRef<Path>>(&self, src_path: P, dst_path: P) -> io::Result<()> {
        let mut state = self.disk.state.lock();
        check_generation(&state, self.generation)?;
        std::fs::rename(src_path.as_ref(), dst_path.as_ref())?;
        state.unsynced.remove(dst_path.as_ref());
        if let Some(undos) = state.unsynced.remove(src_path.as_ref()) {
            state.unsynced.insert(dst_path.as_ref().to_owned(), undos);
        }
        Ok(())
    }

    fn new_reader(&self, handle: Arc<LossyFile>) -> io::Result<LossyCursor> {
        Ok(LossyCursor { file: handle, offset: 0 })
    }

    fn new_writer(&self, handle: Arc<LossyFile>) -> io::Result<LossyCursor> {
        Ok(LossyCursor { file: handle, offset: 0 })
    }
}

impl Handle for LossyFile {
    fn truncate(&self, offset: usize) -> io::Result<()> {
        self.set_len(offset as u64)
    }

    fn file_size(&self) -> io::Result<usize> {
        usize::try_from(self.len()?).map_err(io::Error::other)
    }

    fn sync(&self) -> io::Result<()> {
        match LossyFile::sync(self) {
            // raft-engine panics when a sync fails (and, in a drop during
            // that panic, aborts the process); a crashed process does
            // neither, it just stops. So the crashed incarnation's sync does
            // nothing: its writes already fail, and the harness has cut the
            // node off before crashing its disk, so nothing it does after
            // reaches anyone, and the log store checks
            // `LossyFileSystem::check_alive` after every sync before it acts
            // on the write.
            Err(_) if self.disk.check(self.generation).is_err() => Ok(()),
            result => result,
        }
    }
}

/// A position in a [`LossyFile`], for raft-engine's readers and writers.
#[derive(Debug)]
pub struct LossyCursor {
    file: Arc<LossyFile>,
    offset: u64,
}

impl Read for LossyCursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(self.offset, buf)?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl Write for LossyCursor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_at(self.offset, buf)?;
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for LossyCursor {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        // Never fails for a crashed incarnation: raft-engine panics when it
        // cannot seek back after a failed write, and a crash must look like a
        // failed write, not a panic.
        self.offset = match pos {
            SeekFrom::Start(offset) => offset,
            SeekFrom::Current(delta) => self.offset.saturating_add_signed(delta),
            SeekFrom::End(delta) => self.file.file.metadata()?.len().saturating_add_signed(delta),
        };
        Ok(self.offset)
    }
}

impl WriteExt for LossyCursor {
    fn truncate(&mut self, offset: usize) -> io::Result<()> {
        self.file.set_len(offset as u64)
    }

    fn allocate(&mut self, offset: usize, size: usize) -> io::Result<()> {
        // fallocate without KEEP_SIZE: the file grows to cover the range.
        let end = (offset + size) as u64;
        if end > self.file.len()? {
            self.file.set_len(end)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(disk: &Arc<LossyDisk>, path: &Path) -> Vec<u8> {
        let file = disk.open(path, false).expect("open");
        let mut bytes = vec![0; usize::try_from(file.len().expect("len")).expect("small")];
        file.read_at(0, &mut bytes).expect("read");
        bytes
    }

    // The crash model: synced changes survive a crash, unsynced ones
    // (overwrites, appends, truncations) are taken back, newest first.
    #[test]
    fn a_crash_takes_back_exactly_what_was_not_synced() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let disk = LossyDisk::new();
        let file = disk.open(&path, true)?;
        file.write_at(0, b"hello world")?;
        file.sync()?;
        file.write_at(6, b"WORLD and more")?;
        file.set_len(3)?;
        file.write_at(3, b"p!")?;
        assert_eq!(read_all(&disk, &path), b"help!");
        let report = disk.crash()?;
        assert_eq!(report.files, 1);
        assert_eq!(read_all(&disk, &path), b"hello world");
        Ok(())
    }

    // A crashed incarnation can neither write nor sync: it cannot act on
    // writes that are gone.
    #[test]
    fn a_crashed_incarnation_can_do_no_more_io() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let disk = LossyDisk::new();
        let file_system = disk.file_system();
        let file = disk.open(&path, true)?;
        file.write_at(0, b"x")?;
        file_system.check_alive()?;
        disk.crash()?;
        assert!(file.write_at(0, b"y").is_err());
        assert!(file.sync().is_err());
        // raft-engine's view: its sync "succeeds" (it would panic otherwise),
        // and check_alive is how the log store learns it did nothing.
        assert!(Handle::sync(&file).is_ok());
        assert!(file_system.check_alive().is_err());
        assert!(disk.file_system().create(dir.path().join("g")).is_ok());
        assert_eq!(read_all(&disk, &path), b"");
        Ok(())
    }

    // raft-engine recovers from a crash that took back its unsynced tail:
    // what it wrote with sync survives, nothing else needs to.
    #[test]
    fn raft_engine_reopens_after_a_crash_with_every_synced_write() -> Result<(), Box<dyn std::error::Error>> {
        use raft_engine::{Config, Engine, LogBatch};
        let dir = tempfile::tempdir()?;
        let disk = LossyDisk::new();
        let config = Config { dir: dir.path().to_string_lossy().into_owned(), ..Config::default() };
        let engine = Engine::open_with_file_system(config.clone(), Arc::new(disk.file_system()))?;
        let mut batch = LogBatch::default();
        batch.put(1, b"synced".to_vec(), b"yes".to_vec())?;
        engine.write(&mut batch, true)?;
        batch.put(1, b"unsynced".to_vec(), b"maybe".to_vec())?;
        engine.write(&mut batch, false)?;
        disk.crash()?;
        drop(engine);
        let engine = Engine::open_with_file_system(config, Arc::new(disk.file_system()))?;
        assert_eq!(engine.get(1, b"synced"), Some(b"yes".to_vec()));
        assert_eq!(engine.get(1, b"unsynced"), None);
        Ok(())
    }
}
