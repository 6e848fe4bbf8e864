//! What a running stage may use: the store, progress events, a bounded share of the machine.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::artifact::{Artifact, ShardRef};
use crate::digest::StageKey;
use crate::error::StageError;
use crate::events::{Event, EventSink};
use crate::store::Store;

/// Work a whole stage reports (see [`StageContext::report_work`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Work {
    pub unit: &'static str,
    pub total: u64,
    pub computed: u64,
}

pub struct StageContext<'a> {
    pub stage: &'a str,
    pub store: &'a Store,
    pub key: StageKey,
    /// The folder relative paths in the pipeline file resolve against.
    pub pipeline_dir: &'a Path,
    pub(crate) events: &'a dyn EventSink,
    /// Work slots shared by the whole run (`-j`). The stage already holds one while it runs.
    pub(crate) slots: Arc<Semaphore>,
    /// Units of work a whole stage reports (see [`StageContext::report_work`]).
    pub(crate) work: Mutex<Option<Work>>,
    /// Records a whole stage dropped (see [`StageContext::report_dropped`]).
    pub(crate) dropped: AtomicU64,
    /// The GPUs the stage holds while it runs (a whole stage with `gpus = N`), as
    /// `CUDA_VISIBLE_DEVICES` ids: what a program it starts should be given.
    pub gpus: Vec<String>,
}

impl StageContext<'_> {
    /// Reads a shard, verifying its digest.
    pub fn read_shard(&self, shard: &ShardRef) -> Result<Vec<u8>, StageError> {
        Ok(self.store.get(&shard.digest)?)
    }

    /// Stores a shard of canonical JSONL.
    pub fn write_shard(&self, jsonl: &[u8], records: u64) -> Result<ShardRef, StageError> {
        let digest = self.store.put(jsonl)?;
        Ok(ShardRef { digest, records, bytes: jsonl.len() as u64 })
    }

    /// For a whole stage whose work comes in units some of which may be cached (a soup's
    /// candidate scores): `total` units, `computed` of them done in this run. They appear in the
    /// run's summary where a map stage's shards do, named `unit` (plural, as "candidate score(s)").
    pub fn report_work(&self, unit: &'static str, total: u64, computed: u64) {
        *self.work.lock().unwrap_or_else(|p| p.into_inner()) = Some(Work { unit, total, computed });
    }

    /// For a whole stage told to drop what it cannot read (`read`'s `on_bad_record = "drop"`):
    /// `n` more records dropped, counted in the run's summary as a map stage's are.
    pub fn report_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub fn progress(&self, done: u64, total: u64) {
        self.events.emit(&Event::Progress { stage: self.stage.to_string(), done, total });
    }

    /// Keeps a log (exec's stdout and stderr) with the stage's key, for `ladle show`.
    pub fn save_log(&self, log: &[u8]) -> Result<(), StageError> {
        Ok(self.store.put_log(&self.key, log)?)
    }

    /// A fresh path under the store's `tmp/` (removed when the next run opens the store).
    pub fn temp_path(&self, what: &str) -> PathBuf {
        self.store.temp_path(what)
    }

    /// Applies `f` to each item on as many threads as free work slots allow (at least the one the
    /// stage holds), keeping the order of the results. Items are pulled from the iterator as
    /// threads free up, so a streaming source holds only a few items in memory at once. Stops at
    /// the first error.
    pub fn par_map<I, T, R, F>(&self, items: I, f: F) -> Result<Vec<R>, StageError>
    where
        I: IntoIterator<Item = Result<T, StageError>>,
        I::IntoIter: Send,
        T: Send,
        R: Send,
        F: Fn(usize, T) -> Result<R, StageError> + Sync,
    {
        let items = items.into_iter();
        let wanted = items.size_hint().1.unwrap_or(usize::MAX);
        let mut extra = Vec::new();
        while extra.len() + 1 < wanted {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => extra.push(p),
                Err(_) => break,
            }
        }
        let threads = extra.len() + 1;
        let queue = Mutex::new(items.enumerate());
        let results: Mutex<Vec<Option<R>>> = Mutex::new(Vec::new());
        let failed = AtomicBool::new(false);
        let first_error: Mutex<Option<(usize, StageError)>> = Mutex::new(None);
        let fail = |i: usize, e: StageError| {
            failed.store(true, Ordering::Relaxed);
            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                *slot = Some((i, e));
            }
        };
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return;
                        }
                        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let (i, item) = match next {
                            None => return,
                            Some((i, Err(e))) => return fail(i, e),
                            Some((i, Ok(item))) => (i, item),
                        };
                        match f(i, item) {
                            Ok(r) => {
                                let mut results = results.lock().unwrap_or_else(|p| p.into_inner());
                                if results.len() <= i {
                                    results.resize_with(i + 1, || None);
                                }
                                results[i] = Some(r);
                            }
                            Err(e) => return fail(i, e),
                        }
                    }
                });
            }
        });
        drop(extra);
        if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        results
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .map(|r| r.ok_or_else(|| StageError::internal("a parallel task produced no result")))
            .collect()
    }

    /// Moves the files under `dir` into the store and returns them, sorted, as a folder
    /// artifact's files. Anything that is not a plain file or folder is an error that starts
    /// with `who` ("the command left", say).
    pub fn ingest_folder(&self, dir: &Path, who: &str) -> Result<Vec<crate::FileRef>, StageError> {
        let io = |what: &str, e: std::io::Error| StageError::environment(format!("cannot {what}: {e}"));
        let mut files = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in fs::read_dir(&d).map_err(|e| io(&format!("list {}", d.display()), e))? {
                let path = entry.map_err(|e| io(&format!("list {}", d.display()), e))?.path();
                let meta = fs::symlink_metadata(&path).map_err(|e| io(&format!("stat {}", path.display()), e))?;
                if meta.is_dir() {
                    todo.push(path);
                } else if meta.is_file() {
                    let rel = path
                        .strip_prefix(dir)
                        .unwrap_or(&path)
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/");
                    let (digest, size) = self.store.put_file(&path)?;
                    files.push(crate::FileRef { path: rel, digest, size });
                } else {
                    return Err(StageError::input(format!(
                        "{who} `{}`, which is not a plain file or folder (a symlink?)",
                        path.display()
                    )));
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// Writes an input artifact where an external program can read it: a dataset as one JSONL
    /// file, a folder as a folder (store objects hard-linked, read-only; external folders are
    /// linked to where they are).
    pub fn materialize(&self, artifact: &Artifact, dest: &Path) -> Result<PathBuf, StageError> {
        let io = |what: &str, e: std::io::Error| StageError::environment(format!("cannot {what}: {e}"));
        match artifact {
            Artifact::Dataset { shards, .. } => {
                let path = dest.with_extension("jsonl");
                let mut out = fs::File::create(&path).map_err(|e| io(&format!("create {}", path.display()), e))?;
                for s in shards {
                    std::io::Write::write_all(&mut out, &self.read_shard(s)?)
                        .map_err(|e| io("write a materialized dataset", e))?;
                }
                Ok(path)
            }
            Artifact::Folder { external: Some(root), .. } => Ok(root.clone()),
            Artifact::Folder { external: None, files, .. } => {
                for f in files {
                    let path = dest.join(&f.path);
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent).map_err(|e| io(&format!("create {}", parent.display()), e))?;
                    }
                    match self.store.object_path(&f.digest)? {
                        Some(obj) if fs::hard_link(&obj, &path).is_ok() => {}
                        _ => {
                            let bytes = self.store.get(&f.digest)?;
                            fs::write(&path, bytes).map_err(|e| io(&format!("write {}", path.display()), e))?;
                        }
                    }
                }
                fs::create_dir_all(dest).map_err(|e| io(&format!("create {}", dest.display()), e))?;
                Ok(dest.to_path_buf())
            }
            // The shards as they are (safetensors files, in order): a script reads them in turn.
            Artifact::Tensors { shards } => {
                fs::create_dir_all(dest).map_err(|e| io(&format!("create {}", dest.display()), e))?;
                for (i, s) in shards.iter().enumerate() {
                    let path = dest.join(format!("shard-{i:05}.safetensors"));
                    fs::write(&path, self.read_shard(s)?).map_err(|e| io(&format!("write {}", path.display()), e))?;
                }
                Ok(dest.to_path_buf())
            }
            Artifact::File { path, .. } => Ok(path.clone()),
            Artifact::Metrics { value } => {
                let path = dest.with_extension("json");
                fs::write(&path, serde_json::to_vec_pretty(value).unwrap_or_default())
                    .map_err(|e| io(&format!("write {}", path.display()), e))?;
                Ok(path)
            }
            // Ports receive a chosen set's items (`Inputs::from_sources`), never the set.
            Artifact::Chosen { items } => Err(StageError::internal(format!(
                "a chosen set of {} artifact(s) reached a stage whole instead of as its items",
                items.len()
            ))),
        }
    }
}
