//! The Slurm executor's driver: `ladle run --executor slurm` on a login node.
//!
//! For a map stage the scheduler found shards missing from the cache, the driver packs them into
//! the tasks of a job array ([`Profile::shards_per_task`]), writes each task's [`Task`] file and a
//! batch script whose tasks run `ladle worker`, and submits it. It then polls (`squeue -r -t all`)
//! and ingests the receipts workers leave, shard by shard: re-hash the object, index it, make
//! the index durable, delete the receipt. A `kill -9` of the driver loses nothing a worker
//! finished: the next run ingests the receipts that arrived meanwhile, adopts the array tasks
//! still running (their job ids are kept in `submissions/`) and submits only what is missing.
//!
//! A task that ends (fails, times out, is cancelled or preempted, loses its node) with shards
//! still missing gives those shards another attempt in a new array, up to the profile's
//! `retries`; then the stage fails naming the task, its node, its state and the end of its log,
//! and its other tasks are cancelled. Ctrl-C (or SIGTERM) cancels what the stage submitted,
//! unless the run was started with `--detach`.

mod commands;
pub mod profile;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::time::{Duration, Instant};

pub use profile::Profile;

use super::task::{Receipt, StageDir, Submission, Task, TaskShard, WholeReceipt, log_tail, write_atomically};
use crate::artifact::{Artifact, ShardRef};
use crate::digest::{ShardKey, StageKey};
use crate::events::{Event, EventSink};
use crate::pipeline::Pipeline;
use crate::stage::Inputs;
use crate::store::{ShardEntry, Store};

/// How a run uses Slurm.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    pub profile: Profile,
    /// Leave submitted jobs running when the driver is interrupted (a later run adopts them).
    pub detach: bool,
}

/// A shard the scheduler found missing.
#[derive(Debug, Clone, Copy)]
pub struct Missing {
    pub index: usize,
    pub first_record: u64,
    pub input: ShardRef,
    pub key: ShardKey,
}

/// The stage whose shards the driver computes.
pub(crate) struct StageWork<'a> {
    pub pipeline: &'a Pipeline,
    pub idx: usize,
    pub key: StageKey,
    pub store: &'a Store,
    pub inputs: &'a Inputs,
    pub port: &'static str,
    pub sink: &'a dyn EventSink,
    pub forced: bool,
}

/// An array task the driver waits for.
struct InFlight {
    job: String,
    submission: u32,
    task: usize,
    keys: Vec<ShardKey>,
    node: String,
}

impl InFlight {
    fn id(&self) -> String {
        format!("{}_{}", self.job, self.task)
    }
}

/// Computes the missing shards on the cluster; `done` is called for each as it is committed.
pub(crate) async fn compute(
    work: StageWork<'_>,
    missing: Vec<Missing>,
    options: &SlurmOptions,
    mut done: impl FnMut(usize, ShardEntry),
) -> Result<(), String> {
    let mut driver = Driver::new(&work, options)?;
    for m in missing {
        driver.waiting.entry(m.key).or_default().push(m);
    }
    if work.forced {
        for key in driver.waiting.keys() {
            let _ = fs::remove_file(driver.dir.receipt(key));
        }
    }
    driver.ingest(&mut done)?;
    driver.adopt()?;
    let fresh: Vec<ShardKey> =
        driver.waiting.keys().filter(|k| !driver.in_flight_keys().contains(k)).copied().collect();
    driver.submit(fresh)?;

    let mut rounds = Rounds::new(options);
    while !driver.waiting.is_empty() {
        // States first, receipts second: a task seen ended has left every receipt it will.
        let states = rounds.next(&driver).await?;
        driver.ingest(&mut done)?;
        if let Some(states) = states
            && let Err(e) = driver.settle(&states)
        {
            driver.cancel_all();
            return Err(e);
        }
    }
    Ok(())
}

/// Runs a whole stage that asked for `resources` as one job, and returns what it made (its
/// objects and the index entries it asked for already checked and indexed). A receipt left by
/// an earlier driver is used as is; a job of an earlier driver still queued or running is
/// adopted.
pub(crate) async fn run_whole(work: StageWork<'_>, options: &SlurmOptions) -> Result<WholeReceipt, String> {
    let mut driver = Driver::new(&work, options)?;
    driver.whole = true;
    if work.forced {
        let _ = fs::remove_file(driver.dir.whole_receipt());
    } else if let Some(r) = driver.ingest_whole()? {
        return Ok(r);
    }
    driver.adopt()?;
    if driver.in_flight.is_empty() {
        driver.export(&[])?;
        driver.submit_array(&[Vec::new()])?;
    }
    let mut rounds = Rounds::new(options);
    let mut attempts = 0;
    loop {
        let states = rounds.next(&driver).await?;
        if let Some(r) = driver.ingest_whole()? {
            return Ok(r);
        }
        let Some(states) = states else { continue };
        let Some(t) = driver.in_flight.first() else { continue };
        let state = states.get(&t.id());
        if state.is_some_and(|s| !s.ended()) {
            continue;
        }
        if let Some(s) = state.filter(|s| !s.node.is_empty()) {
            driver.in_flight[0].node = s.node.clone();
        }
        // Ended: a receipt written just before is there now, or the job failed.
        if let Some(r) = driver.ingest_whole()? {
            return Ok(r);
        }
        attempts += 1;
        let t = driver.in_flight.remove(0);
        if attempts > options.profile.retries {
            let how = state.map_or("no longer known to Slurm".to_string(), |s| s.state.clone());
            let log = driver.dir.log(t.submission, t.task);
            return Err(format!(
                "the stage's job failed {attempts} time(s) on Slurm; its last, {} on {}, ended {how}; the end of its \
                 log ({}):\n{}",
                t.id(),
                if t.node.is_empty() { "no node" } else { &t.node },
                log.display(),
                log_tail(&log, 20)
            ));
        }
        driver.submit_array(&[Vec::new()])?;
    }
}

/// The driver's polling rounds: a sleep (cut short by Ctrl-C or SIGTERM, which cancel the
/// stage's jobs unless detached), then what Slurm says of the tasks waited for.
struct Rounds {
    signals: Option<Signals>,
    poll: Duration,
    failing_since: Option<Instant>,
}

impl Rounds {
    fn new(options: &SlurmOptions) -> Rounds {
        Rounds {
            signals: if options.detach { None } else { Signals::new() },
            poll: Duration::from_secs_f64(options.profile.poll_seconds),
            failing_since: None,
        }
    }

    /// The tasks' states, or `None` when Slurm did not answer this round (for up to 10 minutes).
    async fn next(&mut self, driver: &Driver<'_>) -> Result<Option<HashMap<String, commands::TaskState>>, String> {
        let interrupted = match &mut self.signals {
            Some(s) => tokio::select! {
                _ = tokio::time::sleep(self.poll) => false,
                _ = s.next() => true,
            },
            None => {
                tokio::time::sleep(self.poll).await;
                false
            }
        };
        if interrupted {
            let jobs = driver.jobs();
            let cancelled = commands::scancel(&jobs);
            return Err(format!(
                "interrupted: {}; what already finished is kept",
                match cancelled {
                    Ok(()) if jobs.is_empty() => "nothing was left running".to_string(),
                    Ok(()) => format!("cancelled Slurm job(s) {}", jobs.join(", ")),
                    Err(e) => format!("could not cancel Slurm job(s) {}: {e}", jobs.join(", ")),
                }
            ));
        }
        match commands::squeue(&driver.jobs()) {
            Ok(s) => {
                self.failing_since = None;
                Ok(Some(s))
            }
            Err(e) => {
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(600) {
                    driver.cancel_all();
                    return Err(format!("Slurm has not answered for 10 minutes: {e}"));
                }
                Ok(None)
            }
        }
    }
}

struct Driver<'a> {
    work: &'a StageWork<'a>,
    options: &'a SlurmOptions,
    dir: StageDir,
    waiting: BTreeMap<ShardKey, Vec<Missing>>,
    in_flight: Vec<InFlight>,
    attempts: HashMap<ShardKey, u32>,
    /// Objects of inputs other than the mapped dataset, exported once.
    exported: bool,
    /// The stage is a whole stage run as one job.
    whole: bool,
}

impl<'a> Driver<'a> {
    fn new(work: &'a StageWork<'a>, options: &'a SlurmOptions) -> Result<Self, String> {
        let dir = StageDir::new(work.store, &work.key);
        dir.create().map_err(|e| format!("cannot create {}: {e}", dir.root.display()))?;
        Ok(Driver {
            work,
            options,
            dir,
            waiting: BTreeMap::new(),
            in_flight: Vec::new(),
            attempts: HashMap::new(),
            exported: false,
            whole: false,
        })
    }

    fn stage(&self) -> &str {
        &self.work.pipeline.stages[self.work.idx].name
    }

    fn in_flight_keys(&self) -> BTreeSet<ShardKey> {
        self.in_flight.iter().flat_map(|t| t.keys.iter().copied()).collect()
    }

    /// The job ids of the arrays still waited for.
    fn jobs(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.in_flight.iter().map(|t| &t.job).collect();
        set.into_iter().cloned().collect()
    }

    fn cancel_all(&self) {
        let _ = commands::scancel(&self.jobs());
    }

    /// Indexes every receipt that has landed for a shard still waited for; returns how many.
    fn ingest(&mut self, done: &mut impl FnMut(usize, ShardEntry)) -> Result<usize, String> {
        let n = ingest_receipts(self.work.store, &self.dir, &mut self.waiting, done)?;
        if n > 0 {
            self.attempts.retain(|k, _| self.waiting.contains_key(k));
            self.in_flight.retain(|t| t.keys.iter().any(|k| self.waiting.contains_key(k)));
        }
        Ok(n)
    }

    /// The receipt of the whole stage, once its objects and index entries are checked and
    /// indexed; a receipt that does not check out is deleted (the job is then retried).
    fn ingest_whole(&mut self) -> Result<Option<WholeReceipt>, String> {
        let path = self.dir.whole_receipt();
        let Ok(bytes) = fs::read(&path) else { return Ok(None) };
        let store = self.work.store;
        let receipt = serde_json::from_slice::<WholeReceipt>(&bytes).ok().filter(|r| {
            r.artifact
                .objects()
                .iter()
                .all(|d| store.has_object(d).unwrap_or(false) || store.index_object_file(d).is_ok())
                && store.apply_pending_index(&r.index).is_ok()
        });
        match receipt {
            Some(r) => {
                store.flush().map_err(|e| e.to_string())?;
                Ok(Some(r))
            }
            None => {
                let _ = fs::remove_file(&path);
                Ok(None)
            }
        }
    }

    /// Waits again for the tasks of earlier submissions that are still queued or running.
    fn adopt(&mut self) -> Result<(), String> {
        let submissions = self.dir.submissions();
        if submissions.is_empty() {
            return Ok(());
        }
        let jobs: Vec<String> = submissions.iter().map(|s| s.job.clone()).collect();
        let states = commands::squeue(&jobs)?;
        let mut adopted = 0;
        // Job ids restart when a cluster's state is wiped: a task must also carry our job name.
        let name = job_name(self.stage());
        for sub in submissions {
            let mut live = false;
            for (task, keys) in sub.tasks.iter().enumerate() {
                let id = format!("{}_{task}", sub.job);
                let Some(state) = states.get(&id).filter(|s| !s.ended() && s.name == name) else { continue };
                live = true;
                let keys: Vec<ShardKey> = keys.iter().filter(|k| self.waiting.contains_key(k)).copied().collect();
                if !keys.is_empty() || self.whole {
                    adopted += 1;
                    let node = state.node.clone();
                    self.in_flight.push(InFlight { job: sub.job.clone(), submission: sub.number, task, keys, node });
                }
            }
            if !live {
                let _ = fs::remove_file(self.dir.submission(sub.number));
            }
        }
        if adopted > 0 {
            self.work.sink.emit(&Event::JobAdopted {
                stage: self.stage().to_string(),
                jobs: self.jobs(),
                tasks: adopted,
            });
        }
        Ok(())
    }

    /// Files the objects a worker reads that live only inside the index (small ones).
    fn export(&mut self, tasks: &[Vec<ShardKey>]) -> Result<(), String> {
        let store = self.work.store;
        if !self.exported {
            for (port, artifacts) in &self.work.inputs.ports {
                if port == self.work.port && !self.whole {
                    continue;
                }
                for a in artifacts {
                    for d in a.objects() {
                        store.export_object_file(&d).map_err(|e| e.to_string())?;
                    }
                }
            }
            self.exported = true;
        }
        for key in tasks.iter().flatten() {
            if let Some(m) = self.waiting.get(key).and_then(|m| m.first()) {
                store.export_object_file(&m.input.digest).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Submits `keys` as one or more job arrays, in the order of their shards in the dataset.
    fn submit(&mut self, mut keys: Vec<ShardKey>) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort_by_key(|k| self.waiting.get(k).and_then(|m| m.first()).map_or(usize::MAX, |m| m.index));
        let profile = &self.options.profile;
        let per_task = profile.shards_per_task(keys.len());
        let tasks: Vec<Vec<ShardKey>> = keys.chunks(per_task).map(<[ShardKey]>::to_vec).collect();
        self.export(&tasks)?;
        for array in tasks.chunks(profile.max_array_size) {
            self.submit_array(array)?;
        }
        Ok(())
    }

    fn submit_array(&mut self, tasks: &[Vec<ShardKey>]) -> Result<(), String> {
        let number = self.dir.next_submission();
        let work = self.work;
        let decl = &work.pipeline.stages[work.idx];
        for (t, keys) in tasks.iter().enumerate() {
            let shards: Vec<TaskShard> = keys
                .iter()
                .filter_map(|k| self.waiting.get(k)?.first())
                .map(|m| TaskShard { index: m.index, first_record: m.first_record, input: m.input, key: m.key })
                .collect();
            let mut inputs = work.inputs.clone();
            if let Some(Some(Artifact::Dataset { shards: s, .. })) =
                inputs.ports.get_mut(work.port).map(|a| a.first_mut())
            {
                *s = shards.iter().map(|t| t.input).collect();
            }
            let task = Task {
                pipeline: work.pipeline.path.clone(),
                pipeline_digest: work.pipeline.source_digest,
                overrides: work.pipeline.overrides.clone(),
                stage: decl.name.clone(),
                stage_key: work.key,
                store: std::path::absolute(work.store.root()).unwrap_or_else(|_| work.store.root().to_path_buf()),
                inputs,
                shards,
                whole: self.whole,
            };
            let path = self.dir.task(number, t);
            let json = serde_json::to_vec(&task).map_err(|e| e.to_string())?;
            write_atomically(&path, &json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        let script = self.script(number, tasks.len())?;
        let script_path = self.dir.script(number);
        write_atomically(&script_path, script.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", script_path.display()))?;
        let job = commands::sbatch(&script_path)?;
        let submission = Submission { number, job: job.clone(), tasks: tasks.to_vec() };
        let json = serde_json::to_vec(&submission).map_err(|e| e.to_string())?;
        let path = self.dir.submission(number);
        if let Err(e) = write_atomically(&path, &json) {
            let _ = commands::scancel(std::slice::from_ref(&job));
            return Err(format!("cannot record job {job} in {}: {e}; the job was cancelled", path.display()));
        }
        for (task, keys) in tasks.iter().enumerate() {
            let keys = keys.clone();
            self.in_flight.push(InFlight { job: job.clone(), submission: number, task, keys, node: String::new() });
        }
        self.work.sink.emit(&Event::JobSubmitted {
            stage: decl.name.clone(),
            job,
            tasks: tasks.len(),
            shards: tasks.iter().map(Vec::len).sum(),
        });
        Ok(())
    }

    fn script(&self, number: u32, tasks: usize) -> Result<String, String> {
        let profile = &self.options.profile;
        let decl = &self.work.pipeline.stages[self.work.idx];
        let ladle = match &profile.ladle {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(|e| format!("cannot find this ladle binary: {e}"))?,
        };
        let mut s = String::from("#!/bin/bash\n");
        s += &format!("#SBATCH --job-name={}\n", job_name(&decl.name));
        let limit = profile.max_concurrent.map(|n| format!("%{n}")).unwrap_or_default();
        s += &format!("#SBATCH --array=0-{}{limit}\n", tasks - 1);
        s += &format!("#SBATCH --output={}\n", self.dir.root.join("logs").join(format!("{number}-%a.log")).display());
        for option in profile.sbatch_options(&decl.resources) {
            s += &format!("#SBATCH {option}\n");
        }
        s += "set -e\n";
        for line in &profile.setup {
            s += line;
            s += "\n";
        }
        let task = self.dir.root.join("tasks").join(format!("{number}-"));
        s += &format!(
            "exec {} worker {}\"$SLURM_ARRAY_TASK_ID\".json\n",
            shell_quote(&ladle.to_string_lossy()),
            shell_quote(&task.to_string_lossy())
        );
        Ok(s)
    }

    /// Handles tasks Slurm reports ended: their missing shards get another attempt, or the stage
    /// fails once a shard has used its retries.
    fn settle(&mut self, states: &HashMap<String, commands::TaskState>) -> Result<(), String> {
        let mut retry = Vec::new();
        let mut still = Vec::new();
        let mut tasks = std::mem::take(&mut self.in_flight).into_iter();
        while let Some(mut t) = tasks.next() {
            let state = states.get(&t.id());
            if let Some(s) = state
                && !s.node.is_empty()
            {
                t.node = s.node.clone();
            }
            let ended = match state {
                Some(s) => s.ended().then(|| s.state.clone()),
                // Forgotten by Slurm (past MinJobAge, or purged): it runs no more.
                None => Some("no longer known to Slurm".to_string()),
            };
            let Some(how) = ended else {
                still.push(t);
                continue;
            };
            let missing: Vec<ShardKey> = t.keys.iter().filter(|k| self.waiting.contains_key(k)).copied().collect();
            for key in missing {
                let attempts = self.attempts.entry(key).or_insert(0);
                *attempts += 1;
                if *attempts > self.options.profile.retries {
                    let index = self.waiting[&key].first().map(|m| m.index).unwrap_or(0);
                    let log = self.dir.log(t.submission, t.task);
                    let message = format!(
                        "shard {index} failed {} time(s) on Slurm; its last task, {} on {}, ended {how}; the end of \
                         its log ({}):\n{}",
                        attempts,
                        t.id(),
                        if t.node.is_empty() { "no node" } else { &t.node },
                        log.display(),
                        log_tail(&log, 20)
                    );
                    // Every task still out stays listed, so the stage's failure cancels them all.
                    still.push(t);
                    still.extend(tasks);
                    self.in_flight = still;
                    return Err(message);
                }
                retry.push(key);
            }
        }
        self.in_flight = still;
        self.submit(retry)
    }
}

/// Indexes every receipt in `dir` for a shard in `waiting`: the object it names is re-hashed and
/// indexed, then the shard, then the index is made durable, and only then are the receipts
/// deleted and the shards taken out of `waiting` (`done` is told of each). A receipt whose
/// object is missing or not what it says is deleted: its shard stays missing, and its task's
/// end gives it another attempt. Returns how many shards were committed.
pub fn ingest_receipts(
    store: &Store,
    dir: &StageDir,
    waiting: &mut BTreeMap<ShardKey, Vec<Missing>>,
    done: &mut impl FnMut(usize, ShardEntry),
) -> Result<usize, String> {
    let entries = match fs::read_dir(dir.receipts()) {
        Ok(e) => e,
        Err(e) => return Err(format!("cannot list {}: {e}", dir.receipts().display())),
    };
    let mut committed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(key) = name.strip_suffix(".json").and_then(ShardKey::from_hex) else { continue };
        if !waiting.contains_key(&key) {
            // Already indexed (ingested before a crash kept it from being deleted): drop it.
            if store.get_shard(&key).ok().flatten().is_some() {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let receipt = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Receipt>(&b).ok());
        let Some(receipt) = receipt.filter(|r| r.key == key) else {
            let _ = fs::remove_file(&path);
            continue;
        };
        // The object must be whole and be what the receipt says before the index names it.
        match store.index_object_file(&receipt.output.digest) {
            Ok(size) if size == receipt.output.bytes => {}
            _ => {
                let _ = fs::remove_file(&path);
                continue;
            }
        }
        let entry = ShardEntry { shard: receipt.output, dropped_on_error: receipt.dropped_on_error };
        store.put_shard(&key, &entry).map_err(|e| e.to_string())?;
        committed.push((key, entry, path));
    }
    if committed.is_empty() {
        return Ok(0);
    }
    store.flush().map_err(|e| e.to_string())?;
    let n = committed.len();
    for (key, entry, path) in committed {
        let _ = fs::remove_file(path);
        for m in waiting.remove(&key).unwrap_or_default() {
            done(m.index, entry);
        }
    }
    Ok(n)
}

/// The name of a stage's jobs, as `squeue` shows it.
fn job_name(stage: &str) -> String {
    format!("ladle-{stage}")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// SIGINT and SIGTERM, listened for while jobs are out (so they can be cancelled).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Signals { int: signal(SignalKind::interrupt()).ok()?, term: signal(SignalKind::terminate()).ok()? })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {},
            _ = self.term.recv() => {},
        }
    }
}
