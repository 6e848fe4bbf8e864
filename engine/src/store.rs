//! The content-addressed store (`.ladle/` beside the pipeline file by default).
//!
//! Layout:
//! ```text
//! .ladle/
//!   lock            held (flock) by the one process using the store; holds its pid
//!   index/          sled: the index (trees below)
//!   objects/ab/...  objects over INLINE_MAX bytes, named by their BLAKE3 digest, read-only
//!   tmp/            objects and outputs being written
//!   quarantine/     objects `verify` or a reader found corrupt
//!   work/           inputs materialized for `exec` stages
//! ```
//! Index trees: `objects` (digest → inline bytes or the size of a file object), `actions` (stage
//! key → artifact digest), `artifacts` (artifact digest → manifest), `shards` (shard key → output
//! shard), `memo` (external path → size, mtime, inode, digest), `runs` (run id → run record),
//! `last` (pipeline + stage → key parts of its last run, for `plan`), `logs` (stage key → log).
//!
//! Commit order makes crashes harmless: an object is written to `tmp/`, fsynced and renamed into
//! place before it is indexed, and an artifact is indexed before the action that produces it, so
//! the index never names something that is not there. A file renamed into `objects/` but never
//! indexed (a crash in between) is an orphan `ladle gc` removes.

mod compiled;
mod maintenance;
mod memo;
mod writer;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use maintenance::{GcReport, VerifyReport};
pub use writer::ObjectWriter;

use crate::artifact::{Artifact, ShardRef};
use crate::digest::{ArtifactDigest, Digest, ShardKey, StageKey};
use crate::error::{Error, Result};
use crate::key::KeyParts;
use crate::runs::RunRecord;

/// Objects up to this size live inside the index; larger ones are files.
pub const INLINE_MAX: usize = 64 * 1024;

const INLINE_TAG: u8 = 0;
const FILE_TAG: u8 = 1;

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// The sled index: `None` in a worker's view of the store (see [`Store::open_objects`]).
    index: Option<Index>,
    /// Where temporary files go: `tmp/`, or a worker's own folder under `workers/`.
    tmp: PathBuf,
    tmp_counter: AtomicU64,
    _lock: Option<File>,
    /// What a worker's stage asked to index, for the driver to index after checking it.
    pending: std::sync::Mutex<PendingIndex>,
}

/// Index entries a stage made in a worker's view of the store (which has no index): the artifacts
/// and actions a soup caches its candidates' metrics in, the logs `exec` keeps. The worker hands
/// them to the driver in its receipt; the driver checks their objects and indexes them.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PendingIndex {
    pub artifacts: Vec<Artifact>,
    pub actions: Vec<(StageKey, ArtifactDigest)>,
    pub logs: Vec<(StageKey, Digest)>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A worker's temporary folder is its own; the driver's `tmp/` is cleared when it opens.
        if self.index.is_none() {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

struct Index {
    db: sled::Db,
    objects: sled::Tree,
    actions: sled::Tree,
    artifacts: sled::Tree,
    shards: sled::Tree,
    memo: sled::Tree,
    runs: sled::Tree,
    last: sled::Tree,
    logs: sled::Tree,
    /// Compiled plugin components (see [`compiled`]).
    compiled: sled::Tree,
}

/// A map stage's cached output shard, and what was dropped on error while computing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub shard: ShardRef,
    #[serde(default)]
    pub dropped_on_error: u64,
}

/// What the `last` tree remembers of a stage's most recent successful run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    pub parts: KeyParts,
    pub key: StageKey,
    pub artifact: ArtifactDigest,
    pub run: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, taking its lock. A second process fails at
    /// once with [`Error::StoreBusy`].
    pub fn open(root: &Path) -> Result<Store> {
        for dir in ["", "objects", "tmp", "quarantine", "work"] {
            let d = root.join(dir);
            fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("cannot create the store folder {}", d.display()), e))?;
        }
        let lock_path = root.join("lock");
        let mut lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let pid = pid.trim().to_string();
                return Err(Error::StoreBusy { store: root.to_path_buf(), pid: (!pid.is_empty()).then_some(pid) });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("cannot lock {}", lock_path.display()), e));
            }
        }
        lock.set_len(0)
            .and_then(|_| write!(lock, "{}", std::process::id()))
            .map_err(|e| Error::io("cannot write the store's lock file", e))?;

        let index_path = root.join("index");
        let db = sled::Config::new()
            .path(&index_path)
            .flush_every_ms(Some(1000))
            .cache_capacity(64 << 20)
            .open()
            .map_err(|source| Error::Index { path: index_path.clone(), source })?;
        let tree = |name: &str| db.open_tree(name).map_err(|source| Error::Index { path: index_path.clone(), source });
        let index = Index {
            objects: tree("objects")?,
            actions: tree("actions")?,
            artifacts: tree("artifacts")?,
            shards: tree("shards")?,
            memo: tree("memo")?,
            runs: tree("runs")?,
            last: tree("last")?,
            logs: tree("logs")?,
            compiled: tree("compiled")?,
            db,
        };
        let inner = Inner {
            root: root.to_path_buf(),
            index: Some(index),
            tmp: root.join("tmp"),
            tmp_counter: AtomicU64::new(0),
            _lock: Some(lock),
            pending: Default::default(),
        };
        // Leftovers of a crashed run are never referenced: clear them.
        let _ = fs::remove_dir_all(root.join("tmp"));
        let _ = fs::create_dir_all(root.join("tmp"));
        Ok(Store { inner: Arc::new(inner) })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn index_err(&self, source: sled::Error) -> Error {
        Error::Index { path: self.inner.root.join("index"), source }
    }

    /// The index, or an error for a worker's view of the store, which has none.
    fn ix(&self) -> Result<&Index> {
        self.inner.index.as_ref().ok_or_else(|| {
            Error::Internal(format!(
                "the store at {} was opened without its index (a worker's view): only objects can be read and written",
                self.inner.root.display()
            ))
        })
    }

    /// Opens the objects of the store at `root` without its index or its lock: the view a
    /// `ladle worker` has on a cluster node, many at once beside the driver that holds the index.
    /// Every object it writes is a file (temporary file, fsync, rename; digest-named, so two
    /// writers of one object are harmless); temporary files go to a folder of its own under
    /// `workers/`, which it removes when dropped. Nothing here is indexed: the driver indexes
    /// what a worker reports, after checking it (see [`Store::index_object_file`]).
    pub fn open_objects(root: &Path, worker: &str) -> Result<Store> {
        if !root.join("objects").is_dir() {
            return Err(Error::io(
                format!("there is no store at {} (no objects/ folder)", root.display()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let tmp = root.join("workers").join(format!("{worker}-{}", std::process::id()));
        fs::create_dir_all(&tmp).map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
        let inner = Inner {
            root: root.to_path_buf(),
            index: None,
            tmp,
            tmp_counter: AtomicU64::new(0),
            _lock: None,
            pending: Default::default(),
        };
        Ok(Store { inner: Arc::new(inner) })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, PendingIndex> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a stage asked a worker's view of the store to index (see [`PendingIndex`]); emptied.
    pub fn take_pending_index(&self) -> PendingIndex {
        std::mem::take(&mut *self.pending())
    }

    /// Indexes what a worker's stage asked for, after checking every object it names (the
    /// artifacts' and the logs'), in commit order: objects, artifacts, then actions and logs.
    pub fn apply_pending_index(&self, pending: &PendingIndex) -> Result<()> {
        let objects = pending.artifacts.iter().flat_map(Artifact::objects).chain(pending.logs.iter().map(|l| l.1));
        for d in objects {
            if !self.has_object(&d)? {
                self.index_object_file(&d)?;
            }
        }
        for a in &pending.artifacts {
            self.put_artifact(a)?;
        }
        for (key, artifact) in &pending.actions {
            self.put_action(key, artifact)?;
        }
        for (key, log) in &pending.logs {
            self.ix()?.logs.insert(key.0, &log.0).map_err(|e| self.index_err(e))?;
        }
        Ok(())
    }

    /// Whether this is a worker's view of the store, without the index.
    pub fn is_objects_only(&self) -> bool {
        self.inner.index.is_none()
    }

    /// Makes everything indexed so far durable (objects are durable when written).
    pub fn flush(&self) -> Result<()> {
        match &self.inner.index {
            Some(ix) => ix.db.flush().map(|_| ()).map_err(|e| self.index_err(e)),
            None => Ok(()),
        }
    }

    /// A fresh path under `tmp/` (nothing is created).
    pub fn temp_path(&self, what: &str) -> PathBuf {
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.inner.tmp.join(format!("{}-{}-{what}", std::process::id(), n))
    }

    fn object_file(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.inner.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    // ---- objects -------------------------------------------------------------------------

    /// Stores `bytes`, returning their digest. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest> {
        self.put_digested(bytes, Digest::of(bytes))
    }

    /// [`Store::put`] of bytes whose digest `d` the caller has already computed.
    fn put_digested(&self, bytes: &[u8], d: Digest) -> Result<Digest> {
        if self.has_object(&d)? {
            return Ok(d);
        }
        if bytes.len() <= INLINE_MAX && !self.is_objects_only() {
            let mut v = Vec::with_capacity(bytes.len() + 1);
            v.push(INLINE_TAG);
            v.extend_from_slice(bytes);
            self.ix()?.objects.insert(d.0, v).map_err(|e| self.index_err(e))?;
        } else {
            let tmp = self.temp_path("object");
            let write = || -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(bytes)?;
                f.sync_all()
            };
            write().map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
            self.adopt_file(&tmp, &d, bytes.len() as u64)?;
        }
        Ok(d)
    }

    /// A writer for an object too large, or too gradual, to hand over whole (see
    /// [`ObjectWriter`]).
    pub fn writer(&self) -> ObjectWriter {
        ObjectWriter::new(self.clone())
    }

    /// Moves a finished file (written under `tmp/` or elsewhere on the same disk) into the store.
    pub fn put_file(&self, path: &Path) -> Result<(Digest, u64)> {
        let (d, size) = hash_file(path)?;
        if self.has_object(&d)? {
            return Ok((d, size));
        }
        if size as usize <= INLINE_MAX && !self.is_objects_only() {
            let bytes = fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
            self.put(&bytes)?;
        } else {
            File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(format!("cannot sync {}", path.display()), e))?;
            self.adopt_file(path, &d, size)?;
        }
        Ok((d, size))
    }

    fn adopt_file(&self, from: &Path, d: &Digest, size: u64) -> Result<()> {
        let dest = self.object_file(d);
        let parent = dest.parent().expect("object paths have a parent");
        fs::create_dir_all(parent).map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
        if fs::rename(from, &dest).is_err() {
            // Another filesystem: copy beside the destination, sync, then rename (atomic there).
            let beside = parent.join(format!(".{}-{}", std::process::id(), &d.to_hex()[2..]));
            fs::copy(from, &beside)
                .and_then(|_| File::open(&beside)?.sync_all())
                .and_then(|()| fs::rename(&beside, &dest))
                .map_err(|e| {
                    let _ = fs::remove_file(&beside);
                    Error::io(format!("cannot copy {} into the store", from.display()), e)
                })?;
        }
        // The rename itself must survive a crash before the index names the object.
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("cannot sync {}", parent.display()), e))?;
        let mut perms = fs::metadata(&dest).map_err(|e| Error::io("cannot stat a new object", e))?.permissions();
        perms.set_readonly(true);
        let _ = fs::set_permissions(&dest, perms);
        if let Some(ix) = &self.inner.index {
            let mut v = vec![FILE_TAG];
            v.extend_from_slice(&size.to_le_bytes());
            ix.objects.insert(d.0, v).map_err(|e| self.index_err(e))?;
        }
        Ok(())
    }

    /// Whether the object is indexed and, for a file object, its file exists (in a worker's
    /// view: whether its file exists).
    pub fn has_object(&self, d: &Digest) -> Result<bool> {
        let Some(ix) = &self.inner.index else { return Ok(self.object_file(d).exists()) };
        match ix.objects.get(d.0).map_err(|e| self.index_err(e))? {
            None => Ok(false),
            Some(v) if v.first() == Some(&FILE_TAG) => Ok(self.object_file(d).exists()),
            Some(_) => Ok(true),
        }
    }

    /// Reads an object, verifying its digest. A corrupt object is quarantined and reported.
    pub fn get(&self, d: &Digest) -> Result<Vec<u8>> {
        let entry = match &self.inner.index {
            Some(ix) => ix.objects.get(d.0).map_err(|e| self.index_err(e))?,
            None => Some(sled::IVec::from(&[FILE_TAG][..])),
        };
        let bytes = match entry {
            None => return Err(Error::MissingObject { digest: d.to_hex() }),
            Some(v) if v.first() == Some(&INLINE_TAG) => v[1..].to_vec(),
            Some(_) => {
                let path = self.object_file(d);
                match fs::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        if let Some(ix) = &self.inner.index {
                            let _ = ix.objects.remove(d.0);
                        }
                        return Err(Error::MissingObject { digest: d.to_hex() });
                    }
                    Err(e) => return Err(Error::io(format!("cannot read object {}", path.display()), e)),
                }
            }
        };
        if Digest::of(&bytes) != *d {
            // A worker leaves the object where it is: the driver, which owns the index, decides.
            if !self.is_objects_only() {
                self.quarantine(d)?;
            }
            return Err(Error::Corrupt { digest: d.to_hex() });
        }
        Ok(bytes)
    }

    /// The file holding a large object, for hard-linking into a materialized folder.
    pub fn object_path(&self, d: &Digest) -> Result<Option<PathBuf>> {
        let Some(ix) = &self.inner.index else {
            let path = self.object_file(d);
            return Ok(path.exists().then_some(path));
        };
        match ix.objects.get(d.0).map_err(|e| self.index_err(e))? {
            Some(v) if v.first() == Some(&FILE_TAG) => Ok(Some(self.object_file(d))),
            _ => Ok(None),
        }
    }

    /// Makes sure an indexed object also exists as a file, so that a worker, which cannot read
    /// the index, can read it: small objects live only inside the index. The index is not
    /// changed; `ladle gc` removes such copies once nothing needs them.
    pub fn export_object_file(&self, d: &Digest) -> Result<()> {
        let path = self.object_file(d);
        if path.exists() {
            return Ok(());
        }
        let bytes = self.get(d)?;
        let tmp = self.temp_path("export");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        write().map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
        let parent = path.parent().expect("object paths have a parent");
        fs::create_dir_all(parent)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        let _ = File::open(parent).and_then(|d| d.sync_all());
        Ok(())
    }

    /// Indexes an object file another process (a worker) wrote into `objects/`, after checking
    /// that its content has digest `d`; returns its size. A file whose content does not match is
    /// quarantined and reported as corrupt, so nothing serves it.
    pub fn index_object_file(&self, d: &Digest) -> Result<u64> {
        let path = self.object_file(d);
        let (actual, size) = match hash_file(&path) {
            Ok(r) => r,
            Err(_) if !path.exists() => return Err(Error::MissingObject { digest: d.to_hex() }),
            Err(e) => return Err(e),
        };
        if actual != *d {
            let dest = self.inner.root.join("quarantine").join(d.to_hex());
            let _ = fs::rename(&path, &dest);
            return Err(Error::Corrupt { digest: d.to_hex() });
        }
        let ix = self.ix()?;
        let indexed = ix.objects.get(d.0).map_err(|e| self.index_err(e))?;
        if indexed.is_none_or(|v| v.first() != Some(&INLINE_TAG)) {
            let mut v = vec![FILE_TAG];
            v.extend_from_slice(&size.to_le_bytes());
            ix.objects.insert(d.0, v).map_err(|e| self.index_err(e))?;
        }
        Ok(size)
    }

    /// Moves a corrupt object aside and forgets it, so nothing serves it and a rerun recomputes it.
    pub fn quarantine(&self, d: &Digest) -> Result<()> {
        let path = self.object_file(d);
        if path.exists() {
            let dest = self.inner.root.join("quarantine").join(d.to_hex());
            fs::rename(&path, &dest).map_err(|e| Error::io(format!("cannot quarantine {}", path.display()), e))?;
        }
        self.ix()?.objects.remove(d.0).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    // ---- artifacts, actions, shards --------------------------------------------------------

    pub fn put_artifact(&self, artifact: &Artifact) -> Result<ArtifactDigest> {
        let d = artifact.digest();
        if self.is_objects_only() {
            self.pending().artifacts.push(artifact.clone());
            return Ok(d);
        }
        let json = serde_json::to_vec(artifact).map_err(|e| Error::Internal(e.to_string()))?;
        self.ix()?.artifacts.insert(d.0, json).map_err(|e| self.index_err(e))?;
        Ok(d)
    }

    pub fn get_artifact(&self, d: &ArtifactDigest) -> Result<Option<Artifact>> {
        if self.is_objects_only() {
            return Ok(None);
        }
        match self.ix()?.artifacts.get(d.0).map_err(|e| self.index_err(e))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Internal(format!("unreadable artifact manifest {d}: {e}"))),
        }
    }

    /// Whether every object of `artifact` is present (a cached output can be served).
    pub fn artifact_complete(&self, artifact: &Artifact) -> Result<bool> {
        for d in artifact.objects() {
            if !self.has_object(&d)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Records that `key` produced `artifact` (the artifact must be stored first).
    pub fn put_action(&self, key: &StageKey, artifact: &ArtifactDigest) -> Result<()> {
        if self.is_objects_only() {
            self.pending().actions.push((*key, *artifact));
            return Ok(());
        }
        self.ix()?.actions.insert(key.0, &artifact.0).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    /// The artifact `key` produced, if it is indexed and all its objects are present.
    /// (A worker's view of the store answers `None`: it cannot read the index.)
    pub fn get_action(&self, key: &StageKey) -> Result<Option<(ArtifactDigest, Artifact)>> {
        if self.is_objects_only() {
            return Ok(None);
        }
        let Some(v) = self.ix()?.actions.get(key.0).map_err(|e| self.index_err(e))? else { return Ok(None) };
        let Ok(raw) = <[u8; 32]>::try_from(v.as_ref()) else { return Ok(None) };
        let d = ArtifactDigest(raw);
        match self.get_artifact(&d)? {
            Some(a) if self.artifact_complete(&a)? => Ok(Some((d, a))),
            _ => Ok(None),
        }
    }

    pub fn put_shard(&self, key: &ShardKey, entry: &ShardEntry) -> Result<()> {
        let json = serde_json::to_vec(entry).map_err(|e| Error::Internal(e.to_string()))?;
        self.ix()?.shards.insert(key.0, json).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    /// A cached output shard, if its object is present.
    pub fn get_shard(&self, key: &ShardKey) -> Result<Option<ShardEntry>> {
        let Some(v) = self.ix()?.shards.get(key.0).map_err(|e| self.index_err(e))? else { return Ok(None) };
        let Ok(entry) = serde_json::from_slice::<ShardEntry>(&v) else { return Ok(None) };
        Ok(self.has_object(&entry.shard.digest)?.then_some(entry))
    }

    // ---- logs, last runs, run records -------------------------------------------------------

    pub fn put_log(&self, key: &StageKey, log: &[u8]) -> Result<()> {
        let d = self.put(log)?;
        if self.is_objects_only() {
            self.pending().logs.push((*key, d));
            return Ok(());
        }
        self.ix()?.logs.insert(key.0, &d.0).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    pub fn get_log(&self, key: &StageKey) -> Result<Option<Vec<u8>>> {
        if self.is_objects_only() {
            return Ok(None);
        }
        let Some(v) = self.ix()?.logs.get(key.0).map_err(|e| self.index_err(e))? else { return Ok(None) };
        let Ok(raw) = <[u8; 32]>::try_from(v.as_ref()) else { return Ok(None) };
        match self.get(&Digest(raw)) {
            Ok(b) => Ok(Some(b)),
            Err(Error::MissingObject { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn last_key(pipeline: &Path, stage: &str) -> Vec<u8> {
        let mut k = pipeline.to_string_lossy().as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(stage.as_bytes());
        k
    }

    pub fn put_last(&self, pipeline: &Path, stage: &str, last: &LastRun) -> Result<()> {
        let json = serde_json::to_vec(last).map_err(|e| Error::Internal(e.to_string()))?;
        self.ix()?.last.insert(Self::last_key(pipeline, stage), json).map_err(|e| self.index_err(e))?;
        Ok(())
    }

    pub fn get_last(&self, pipeline: &Path, stage: &str) -> Result<Option<LastRun>> {
        let Some(v) = self.ix()?.last.get(Self::last_key(pipeline, stage)).map_err(|e| self.index_err(e))? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&v).ok())
    }

    pub fn next_run_id(&self) -> Result<u64> {
        let last = self.ix()?.runs.last().map_err(|e| self.index_err(e))?;
        let prev = last.and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0);
        Ok(prev + 1)
    }

    pub fn put_run(&self, record: &RunRecord) -> Result<()> {
        let json = serde_json::to_vec(record).map_err(|e| Error::Internal(e.to_string()))?;
        self.ix()?.runs.insert(record.id.to_be_bytes(), json).map_err(|e| self.index_err(e))?;
        self.flush()
    }

    pub fn runs(&self) -> Result<Vec<RunRecord>> {
        let mut out = Vec::new();
        for item in self.ix()?.runs.iter() {
            let (_, v) = item.map_err(|e| self.index_err(e))?;
            if let Ok(r) = serde_json::from_slice(&v) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// BLAKE3 of a file's content, streamed (memory-mapped where the OS allows), and its size.
pub fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut hasher = blake3::Hasher::new();
    let f = File::open(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    let size = f.metadata().map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?.len();
    hasher.update_reader(f).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    Ok((Digest(*hasher.finalize().as_bytes()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_objects_live_in_the_index_and_large_ones_in_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let small = store.put(b"hello").unwrap();
        assert_eq!(small, Digest::of(b"hello"));
        assert_eq!(store.object_path(&small).unwrap(), None);
        let big_bytes = vec![7u8; INLINE_MAX + 1];
        let big = store.put(&big_bytes).unwrap();
        let path = store.object_path(&big).unwrap().expect("a file object");
        assert!(path.starts_with(dir.path().join("objects")));
        assert!(std::fs::metadata(&path).unwrap().permissions().readonly());
        assert_eq!(store.get(&small).unwrap(), b"hello");
        assert_eq!(store.get(&big).unwrap(), big_bytes);
        // Idempotent.
        assert_eq!(store.put(&big_bytes).unwrap(), big);
    }

    #[test]
    fn a_corrupt_file_object_is_quarantined_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put(&vec![1u8; INLINE_MAX * 2]).unwrap();
        let path = store.object_path(&d).unwrap().unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] = 2;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(store.get(&d), Err(Error::Corrupt { .. })));
        assert!(!store.has_object(&d).unwrap());
        assert!(dir.path().join("quarantine").join(d.to_hex()).exists());
        assert!(matches!(store.get(&d), Err(Error::MissingObject { .. })));
    }

    #[test]
    fn the_stat_memo_sees_a_same_size_edit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let file = dir.path().join("data.txt");
        std::fs::write(&file, b"aaaa").unwrap();
        assert_eq!(store.file_digest(&file).unwrap(), Digest::of(b"aaaa"));
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&file, b"bbbb").unwrap();
        assert_eq!(store.file_digest(&file).unwrap(), Digest::of(b"bbbb"));
    }

    #[test]
    fn a_second_open_of_the_same_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        match Store::open(dir.path()) {
            Err(Error::StoreBusy { pid, .. }) => assert_eq!(pid, Some(std::process::id().to_string())),
            other => panic!("expected StoreBusy, got {:?}", other.err()),
        }
    }
}
