//! The scheduler: walks the graph and hands ready stages to tokio; nothing else.
//!
//! A stage is ready when all its inputs are. Its key is computed from its inputs' *output*
//! digests, so a stage whose upstream reran but produced the same output stays cached (early
//! cutoff). Map stages run shard by shard: each shard is looked up in the shard cache, or computed
//! on a blocking thread holding one of the run's `-j` work slots, then committed on its own (object
//! fsynced, index entry flushed) — a crash loses only the shards in flight. A failed stage does not
//! stop independent branches; its dependants are skipped. A stage that names a device (a GPU)
//! holds that device's slot while it computes, so two stages never share one GPU's memory. A map
//! stage with several model replicas (one per GPU) holds all their devices and gives each shard
//! to the least busy replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::artifact::{Artifact, ShardRef};
use crate::context::StageContext;
use crate::digest::{ArtifactDigest, StageKey};
use crate::error::{Error, Result, StageError};
use crate::events::{Event, EventSink};
use crate::executor::Executor;
use crate::executor::slurm::{self, Missing, StageWork};
use crate::key::{KeyParts, salted_shard_key};
use crate::pipeline::Pipeline;
use crate::record_files;
use crate::resolve::key_parts;
use crate::runs::{RunRecord, RunRecorder, RunStatus, peak_rss_bytes};
use crate::stage::{Arity, Execution, Inputs, Produces, ShardInput, ShardMapper};
use crate::store::{LastRun, ShardEntry, Store};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Work slots: shards and stages computing at once.
    pub jobs: usize,
    /// Stages to recompute even when cached (their shards too).
    pub force: BTreeSet<String>,
    /// Run only this stage and what it needs.
    pub only: Option<String>,
    /// Where map stages' uncached shards compute.
    pub executor: Executor,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            force: BTreeSet::new(),
            only: None,
            executor: Executor::Local,
        }
    }
}

/// The devices stages hold exclusively (see [`crate::stage::Stage::device_slot`]): two stages on
/// one GPU would fight over its memory, so they take turns. Also the machine's GPUs, which a
/// whole stage asking for `gpus = N` takes N of (any free ones), so two trainings never share a
/// GPU and a scoring stage on `cuda:0` waits for a trainer holding it. A stage takes everything
/// it needs at once or waits holding nothing, so no two stages wait on each other. Created per
/// run.
struct DeviceSlots {
    busy: std::sync::Mutex<BTreeSet<String>>,
    freed: tokio::sync::Notify,
    /// The machine's GPUs: the slot a model stage names (`cuda:I`, I counting the GPUs this
    /// process sees) and the id a child process is given in `CUDA_VISIBLE_DEVICES`.
    gpus: Vec<(String, String)>,
}

/// Devices held until dropped.
struct HeldDevices {
    slots: Arc<DeviceSlots>,
    names: Vec<String>,
    /// The `CUDA_VISIBLE_DEVICES` ids of the GPUs among them.
    gpu_ids: Vec<String>,
}

impl Drop for HeldDevices {
    fn drop(&mut self) {
        let mut busy = self.slots.busy.lock().unwrap_or_else(|p| p.into_inner());
        for n in &self.names {
            busy.remove(n);
        }
        drop(busy);
        self.slots.freed.notify_waiters();
    }
}

impl DeviceSlots {
    fn new(gpus: Vec<String>) -> DeviceSlots {
        DeviceSlots {
            busy: Default::default(),
            freed: tokio::sync::Notify::new(),
            gpus: gpus.into_iter().enumerate().map(|(i, id)| (format!("cuda:{i}"), id)).collect(),
        }
    }

    /// Waits until every one of `devices` is free and holds them all.
    async fn hold(self: &Arc<Self>, devices: &[String]) -> HeldDevices {
        self.take(|busy| devices.iter().all(|d| !busy.contains(d)).then(|| devices.to_vec())).await
    }

    /// Waits until `n` of the machine's GPUs are free and holds them (the lowest free ones).
    async fn hold_gpus(self: &Arc<Self>, n: usize) -> HeldDevices {
        self.take(|busy| {
            let free: Vec<String> = self
                .gpus
                .iter()
                .filter(|(slot, _)| !busy.contains(slot))
                .map(|(slot, _)| slot.clone())
                .take(n)
                .collect();
            (free.len() == n).then_some(free)
        })
        .await
    }

    async fn take(self: &Arc<Self>, pick: impl Fn(&BTreeSet<String>) -> Option<Vec<String>>) -> HeldDevices {
        loop {
            // Registered before looking, so a release between the look and the wait is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(names) = pick(&busy) {
                    busy.extend(names.iter().cloned());
                    let gpu_ids =
                        self.gpus.iter().filter(|(slot, _)| names.contains(slot)).map(|(_, id)| id.clone()).collect();
                    return HeldDevices { slots: self.clone(), names, gpu_ids };
                }
            }
            freed.await;
        }
    }
}

/// The machine's GPUs, as `CUDA_VISIBLE_DEVICES` ids: `LADLE_GPUS` (a count, or a list of ids
/// `0,2`), else `CUDA_VISIBLE_DEVICES`, else the `/dev/nvidiaN` device files (none on a machine
/// without an NVIDIA driver).
pub fn machine_gpus() -> Vec<String> {
    let list = |s: &str| -> Vec<String> {
        s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect()
    };
    if let Ok(v) = std::env::var("LADLE_GPUS") {
        return match v.trim().parse::<usize>() {
            Ok(n) if !v.contains(',') => (0..n).map(|i| i.to_string()).collect(),
            _ => list(&v),
        };
    }
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return list(&v).into_iter().filter(|id| id != "-1").collect();
    }
    let mut ids: Vec<usize> = std::fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("nvidia")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids.into_iter().map(|i| i.to_string()).collect()
}

/// Everything a stage task needs, shared with its shard tasks.
struct StageEnv {
    pipeline: Arc<Pipeline>,
    idx: usize,
    store: Store,
    sink: Arc<dyn EventSink>,
    slots: Arc<Semaphore>,
    devices: Arc<DeviceSlots>,
    key: StageKey,
    run: u64,
    executor: Executor,
}

impl StageEnv {
    fn ctx(&self) -> StageContext<'_> {
        StageContext {
            stage: &self.pipeline.stages[self.idx].name,
            store: &self.store,
            key: self.key,
            pipeline_dir: &self.pipeline.dir,
            events: &*self.sink,
            slots: self.slots.clone(),
            work: Default::default(),
            dropped: Default::default(),
            gpus: Vec::new(),
        }
    }
    fn name(&self) -> String {
        self.pipeline.stages[self.idx].name.clone()
    }
    /// Says that shard `shard` is done (`done` of `total`), and how long computing it took here.
    fn shard_done(&self, shard: usize, cached: bool, done: u64, total: u64, seconds: Option<f64>) {
        self.sink.emit(&Event::ShardDone { stage: self.name(), shard, cached, done, total, seconds });
    }
    fn kind(&self) -> String {
        self.pipeline.stages[self.idx].kind.name().to_string()
    }
}

type Output = (ArtifactDigest, Arc<Artifact>);

/// Runs what is not cached. Returns the run record (also kept in the store); a failed stage makes
/// its status `Failed`, it is not an `Err`. `Err` is for what stops the run as a whole.
pub fn run(
    pipeline: Arc<Pipeline>,
    store: &Store,
    options: &RunOptions,
    sink: Arc<dyn EventSink>,
) -> Result<RunRecord> {
    for name in options.force.iter().chain(options.only.iter()) {
        pipeline.stage_named(name)?;
    }
    let started = Instant::now();
    let id = store.next_run_id()?;
    let record = RunRecord {
        id,
        pipeline: pipeline.name.clone(),
        pipeline_file: pipeline.path.display().to_string(),
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        status: RunStatus::Running,
        seconds: None,
        peak_rss_bytes: None,
        stages: Vec::new(),
    };
    store.put_run(&record)?;
    let recorder = Arc::new(RunRecorder::new(record, sink.clone(), Some(store.clone())));
    let selected: Vec<bool> = match &options.only {
        Some(name) => pipeline.with_ancestors(pipeline.stage_named(name)?),
        None => vec![true; pipeline.stages.len()],
    };
    recorder.emit(&Event::RunStarted {
        run: id,
        pipeline: pipeline.name.clone(),
        stages: pipeline.order.iter().filter(|&&i| selected[i]).map(|&i| pipeline.stages[i].name.clone()).collect(),
    });
    let jobs = options.jobs.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(jobs * 2 + 4)
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the scheduler's runtime", e))?;
    let sink_for_stages: Arc<dyn EventSink> = recorder.clone();
    let fatal =
        runtime.block_on(schedule(pipeline.clone(), store.clone(), options, selected, sink_for_stages, id, jobs));
    runtime.shutdown_background();
    let mut record = Arc::try_unwrap(recorder)
        .map(RunRecorder::into_record)
        .unwrap_or_else(|r| r.record.lock().unwrap_or_else(|p| p.into_inner()).clone());
    let any_failed = record
        .stages
        .iter()
        .any(|s| matches!(s.status, crate::runs::StageStatus::Failed | crate::runs::StageStatus::Skipped));
    record.status = if fatal.is_err() || any_failed { RunStatus::Failed } else { RunStatus::Ok };
    record.seconds = Some(started.elapsed().as_secs_f64());
    record.peak_rss_bytes = peak_rss_bytes();
    // Stages in the order they were declared, for stable summaries.
    record.stages.sort_by_key(|s| pipeline.index_of(&s.stage).unwrap_or(usize::MAX));
    store.put_run(&record)?;
    fatal?;
    sink.emit(&Event::Summary(record.clone()));
    Ok(record)
}

async fn schedule(
    pipeline: Arc<Pipeline>,
    store: Store,
    options: &RunOptions,
    selected: Vec<bool>,
    sink: Arc<dyn EventSink>,
    run_id: u64,
    jobs: usize,
) -> Result<()> {
    let n = pipeline.stages.len();
    let slots = Arc::new(Semaphore::new(jobs));
    let devices = Arc::new(DeviceSlots::new(machine_gpus()));
    let sources: Vec<BTreeSet<usize>> =
        pipeline.stages.iter().map(|s| s.inputs.values().flatten().copied().collect()).collect();
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, srcs) in sources.iter().enumerate() {
        for &s in srcs {
            dependants[s].push(i);
        }
    }
    let mut waiting: Vec<usize> = sources.iter().map(BTreeSet::len).collect();
    let mut outputs: Vec<Option<Output>> = vec![None; n];
    let mut set: JoinSet<(usize, std::result::Result<Output, ()>)> = JoinSet::new();

    let spawn = |set: &mut JoinSet<_>, i: usize, outputs: &[Option<Output>]| {
        let decl = &pipeline.stages[i];
        let mut digests = BTreeMap::new();
        let mut sources = Vec::new();
        for (port, srcs) in &decl.inputs {
            let outs: Vec<&Output> = srcs.iter().filter_map(|s| outputs[*s].as_ref()).collect();
            let names = srcs.iter().filter(|s| outputs[**s].is_some()).map(|&s| pipeline.stages[s].name.as_str());
            sources.push((port.clone(), names.zip(outs.iter().map(|o| &*o.1)).collect()));
            digests.insert(port.clone(), outs.iter().map(|o| o.0).collect());
        }
        let inputs = Inputs::from_sources(pipeline.dir.clone(), sources);
        let task = StageTask {
            pipeline: pipeline.clone(),
            idx: i,
            store: store.clone(),
            sink: sink.clone(),
            slots: slots.clone(),
            devices: devices.clone(),
            forced: options.force.contains(&decl.name),
            run: run_id,
            executor: options.executor.clone(),
        };
        set.spawn(async move { (i, task.execute(inputs, digests).await) });
    };

    for &i in &pipeline.order {
        if selected[i] && waiting[i] == 0 {
            spawn(&mut set, i, &outputs);
        }
    }
    let mut fatal = None;
    while let Some(joined) = set.join_next().await {
        let (i, outcome) = match joined {
            Ok(r) => r,
            Err(e) => {
                fatal = Some(Error::Internal(format!("a stage task panicked: {e}")));
                continue;
            }
        };
        let ok = outcome.is_ok();
        outputs[i] = outcome.ok();
        let mut finished = vec![(i, ok)];
        while let Some((done, _ok)) = finished.pop() {
            for &j in &dependants[done] {
                if !selected[j] {
                    continue;
                }
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    let all_ok = sources[j].iter().all(|s| outputs[*s].is_some());
                    if all_ok {
                        spawn(&mut set, j, &outputs);
                    } else {
                        let failed: Vec<&str> = sources[j]
                            .iter()
                            .filter(|s| outputs[**s].is_none())
                            .map(|s| pipeline.stages[*s].name.as_str())
                            .collect();
                        sink.emit(&Event::StageSkipped {
                            stage: pipeline.stages[j].name.clone(),
                            kind: pipeline.stages[j].kind.name().to_string(),
                            reason: format!(
                                "not run: its input from {} did not complete",
                                failed.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                            ),
                        });
                        finished.push((j, false));
                    }
                }
            }
        }
    }
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

struct StageTask {
    pipeline: Arc<Pipeline>,
    idx: usize,
    store: Store,
    sink: Arc<dyn EventSink>,
    slots: Arc<Semaphore>,
    devices: Arc<DeviceSlots>,
    forced: bool,
    run: u64,
    executor: Executor,
}

impl StageTask {
    /// Whether this stage runs as a cluster job: a whole stage that carries `resources` hints,
    /// with the Slurm executor (map stages always go to the cluster there; other whole stages
    /// are light and run in the driver).
    fn on_cluster(&self) -> bool {
        matches!(self.executor, Executor::Slurm(_))
            && self.pipeline.stages[self.idx].resources != crate::resources::Resources::default()
    }

    async fn execute(
        self,
        inputs: Inputs,
        digests: BTreeMap<String, Vec<ArtifactDigest>>,
    ) -> std::result::Result<Output, ()> {
        let started = Instant::now();
        let name = self.pipeline.stages[self.idx].name.clone();
        let kind = self.pipeline.stages[self.idx].kind.name().to_string();
        let fail = |sink: &Arc<dyn EventSink>, error: String, shards: (u64, u64)| {
            sink.emit(&Event::StageFailed {
                stage: name.clone(),
                kind: kind.clone(),
                error,
                shards_total: shards.0,
                shards_computed: shards.1,
            });
        };
        if let Err(e) = one_artifact_ports(&self.pipeline.stages[self.idx], &inputs) {
            fail(&self.sink, e.to_string(), (0, 0));
            return Err(());
        }
        // Key: digests of referenced files may need hashing (big models): off the async threads.
        let parts = {
            let (pipeline, store, idx) = (self.pipeline.clone(), self.store.clone(), self.idx);
            tokio::task::spawn_blocking(move || key_parts(&pipeline.stages[idx], digests, &store)).await
        };
        let inputs = Arc::new(inputs);
        // Files the input records name (images): their digests join the shard and stage keys.
        let salts = if record_files::applies(&*self.pipeline.stages[self.idx].stage) {
            let (pipeline, store, idx, inputs) = (self.pipeline.clone(), self.store.clone(), self.idx, inputs.clone());
            tokio::task::spawn_blocking(move || {
                record_files::shard_salts(&*pipeline.stages[idx].stage, &inputs, &store)
            })
            .await
        } else {
            Ok(Ok(None))
        };
        let salts = match salts {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                fail(&self.sink, e, (0, 0));
                return Err(());
            }
            Err(e) => {
                fail(&self.sink, format!("internal error: {e}"), (0, 0));
                return Err(());
            }
        };
        let parts = match parts {
            Ok(Ok(mut p)) => {
                p.record_files = salts.as_deref().map(record_files::combined);
                p
            }
            Ok(Err(e)) => {
                fail(&self.sink, e.to_string(), (0, 0));
                return Err(());
            }
            Err(e) => {
                fail(&self.sink, format!("internal error: {e}"), (0, 0));
                return Err(());
            }
        };
        let key = parts.stage_key();
        let env = Arc::new(StageEnv {
            pipeline: self.pipeline.clone(),
            idx: self.idx,
            store: self.store.clone(),
            sink: self.sink.clone(),
            slots: self.slots.clone(),
            devices: self.devices.clone(),
            key,
            run: self.run,
            executor: self.executor.clone(),
        });
        let previous = self.store.get_last(&self.pipeline.path, &name).ok().flatten();

        if !self.forced {
            match self.store.get_action(&key) {
                Ok(Some((digest, artifact)))
                    if self.pipeline.stages[self.idx].stage.still_valid(&artifact, &env.ctx()) =>
                {
                    // As when it runs: a map stage counts its input shards, others their output's.
                    let shards_total = match (self.pipeline.stages[self.idx].stage.execution(), &artifact) {
                        (Execution::Map { port, .. }, _) => inputs.dataset(port).map(|s| s.len() as u64).unwrap_or(0),
                        (_, Artifact::Dataset { shards, .. }) => shards.len() as u64,
                        _ => 0,
                    };
                    if let Err(e) = remember(&env, &parts, digest) {
                        fail(&self.sink, e.to_string(), (0, 0));
                        return Err(());
                    }
                    self.sink.emit(&Event::StageCached {
                        stage: name,
                        kind,
                        artifact: digest.to_hex(),
                        records: artifact.records(),
                        shards_total,
                    });
                    return Ok((digest, Arc::new(artifact)));
                }
                Ok(_) => {}
                Err(e) => {
                    fail(&self.sink, e.to_string(), (0, 0));
                    return Err(());
                }
            }
        }

        // What a whole stage counted instead of shards, when it reported its work.
        let mut work_unit = None;
        let result = match self.pipeline.stages[self.idx].stage.execution() {
            Execution::Map { port, .. } => run_map(env.clone(), inputs, &parts, salts, port, self.forced).await,
            Execution::Whole(_) if self.on_cluster() => {
                self.sink.emit(&Event::StageStarted { stage: name.clone(), kind: kind.clone(), shards_total: None });
                let Executor::Slurm(options) = &self.executor else { unreachable!() };
                let work = StageWork {
                    pipeline: &self.pipeline,
                    idx: self.idx,
                    key,
                    store: &self.store,
                    inputs: &inputs,
                    port: "",
                    sink: &*self.sink,
                    forced: self.forced,
                };
                match slurm::run_whole(work, options).await {
                    Ok(receipt) => {
                        let (total, computed) = match &receipt.work {
                            Some((unit, total, computed)) => {
                                // Units are a handful of fixed phrases; one leaked per such stage run.
                                work_unit = Some(&*Box::leak(unit.clone().into_boxed_str()));
                                (*total, *computed)
                            }
                            None => (0, 0),
                        };
                        Ok((receipt.artifact, total, computed, 0))
                    }
                    Err(e) => Err((e, (0, 0))),
                }
            }
            Execution::Whole(_) => {
                self.sink.emit(&Event::StageStarted { stage: name.clone(), kind: kind.clone(), shards_total: None });
                // The device first, then a work slot: nothing holds a work slot while it waits for a
                // device, so the two kinds of slot cannot deadlock.
                let decl = &self.pipeline.stages[self.idx];
                // An `exec`'s `gpus` is a need; a `resources` hint (written for a cluster) is
                // one too where this machine has GPUs, and nothing where it has none.
                let (needed, hinted) = (decl.stage.gpus() as usize, decl.resources.gpus.unwrap_or(0) as usize);
                let gpus = if self.devices.gpus.is_empty() && needed == 0 { 0 } else { needed.max(hinted) };
                if gpus > self.devices.gpus.len() {
                    let seen = self.devices.gpus.len();
                    fail(
                        &self.sink,
                        StageError::environment(format!(
                            "the stage asks for {gpus} GPU(s), and this machine has {seen} that ladle can see"
                        ))
                        .with_hint(
                            "run it where there are enough, or say which GPUs to use: LADLE_GPUS=2 (a count) or LADLE_GPUS=0,1 (ids), as CUDA_VISIBLE_DEVICES numbers them",
                        )
                        .to_string(),
                        (0, 0),
                    );
                    return Err(());
                }
                let device = match (decl.stage.device_slot(), gpus) {
                    (_, n) if n > 0 => Some(self.devices.hold_gpus(n).await),
                    (Some(d), _) => Some(self.devices.hold(&[d]).await),
                    (None, _) => None,
                };
                let gpu_ids = device.as_ref().map(|d| d.gpu_ids.clone()).unwrap_or_default();
                let permit = self.slots.clone().acquire_owned().await;
                let env2 = env.clone();
                let joined = tokio::task::spawn_blocking(move || {
                    let _held = (permit, device);
                    let Execution::Whole(stage) = env2.pipeline.stages[env2.idx].stage.execution() else {
                        unreachable!()
                    };
                    let mut ctx = env2.ctx();
                    ctx.gpus = gpu_ids;
                    let result = stage.run(&ctx, &inputs).map_err(|e| e.to_string());
                    let work = ctx.work.lock().ok().and_then(|mut w| w.take());
                    let dropped = ctx.dropped.load(std::sync::atomic::Ordering::Relaxed);
                    result.map(|a| (a, work, dropped))
                })
                .await;
                match joined {
                    Ok(Ok((a, work, dropped))) => {
                        work_unit = work.map(|w| w.unit);
                        let (total, computed) = work.map(|w| (w.total, w.computed)).unwrap_or_else(|| {
                            let n = match &a {
                                Artifact::Dataset { shards, .. } => shards.len() as u64,
                                _ => 0,
                            };
                            (n, n)
                        });
                        Ok((a, total, computed, dropped))
                    }
                    Ok(Err(e)) => Err((e, (0, 0))),
                    Err(e) => Err((format!("internal error: the stage panicked: {e}"), (0, 0))),
                }
            }
        };
        let (artifact, shards_total, shards_computed, dropped_on_error) = match result {
            Ok(r) => r,
            Err((e, shards)) => {
                fail(&self.sink, e, shards);
                return Err(());
            }
        };
        let commit = || -> Result<ArtifactDigest> {
            let digest = self.store.put_artifact(&artifact)?;
            self.store.put_action(&key, &digest)?;
            remember(&env, &parts, digest)?;
            self.store.flush()?;
            Ok(digest)
        };
        match commit() {
            Ok(digest) => {
                self.sink.emit(&Event::StageFinished {
                    stage: name,
                    kind,
                    artifact: digest.to_hex(),
                    records: artifact.records(),
                    shards_total,
                    shards_computed,
                    work_unit,
                    dropped_on_error,
                    unchanged: previous.is_some_and(|p| p.artifact == digest),
                    seconds: started.elapsed().as_secs_f64(),
                });
                Ok((digest, Arc::new(artifact)))
            }
            Err(e) => {
                fail(&self.sink, e.to_string(), (shards_total, shards_computed));
                Err(())
            }
        }
    }
}

fn remember(env: &StageEnv, parts: &KeyParts, artifact: ArtifactDigest) -> Result<()> {
    let last = LastRun { parts: parts.clone(), key: env.key, artifact, run: env.run };
    env.store.put_last(&env.pipeline.path, &env.pipeline.stages[env.idx].name, &last)
}

type MapResult = std::result::Result<(Artifact, u64, u64, u64), (String, (u64, u64))>;

async fn run_map(
    env: Arc<StageEnv>,
    inputs: Arc<Inputs>,
    parts: &KeyParts,
    salts: Option<Vec<crate::digest::Digest>>,
    port: &'static str,
    forced: bool,
) -> MapResult {
    let shards: Vec<ShardRef> = match inputs.dataset(port) {
        Ok(s) => s.to_vec(),
        Err(e) => return Err((e.to_string(), (0, 0))),
    };
    let total = shards.len() as u64;
    env.sink.emit(&Event::StageStarted { stage: env.name(), kind: env.kind(), shards_total: Some(total) });
    let map_key = parts.map_key(port);
    if let Executor::Slurm(options) = env.executor.clone() {
        return run_map_on_slurm(env, inputs, shards, map_key, salts, port, forced, &options).await;
    }
    let mut first_record = Vec::with_capacity(shards.len());
    let mut acc = 0u64;
    for s in &shards {
        first_record.push(acc);
        acc += s.records;
    }
    let stage = &env.pipeline.stages[env.idx].stage;
    let replicas = stage.replicas().max(1);
    let mappers: Arc<Vec<Mapper>> = Arc::new((0..replicas).map(|_| OnceLock::new()).collect());
    // Shards in flight per replica: each shard goes to the least busy.
    let busy = Arc::new(std::sync::Mutex::new(vec![0usize; replicas]));
    let failed = Arc::new(AtomicBool::new(false));
    let mut results: Vec<Option<ShardEntry>> = vec![None; shards.len()];
    let mut errors: Vec<(usize, String)> = Vec::new();
    let mut done = 0u64;
    let mut computed = 0u64;
    let mut set: JoinSet<(usize, std::result::Result<ShardEntry, String>, f64)> = JoinSet::new();
    // The replicas' devices, held from the first computed shard to the stage's end (cached
    // shards need none), all at once.
    let device_slots: BTreeSet<String> = (0..replicas).filter_map(|r| stage.replica_slot(r)).collect();
    let mut devices = None;
    // Of the computed shards, those on the devices at once (see `Stage::device_shards`), per replica.
    let on_device =
        (!device_slots.is_empty()).then(|| Arc::new(Semaphore::new(stage.device_shards().max(1) * replicas)));

    let handle =
        |joined: std::result::Result<(usize, std::result::Result<ShardEntry, String>, f64), tokio::task::JoinError>,
         results: &mut Vec<Option<ShardEntry>>,
         errors: &mut Vec<(usize, String)>,
         done: &mut u64,
         computed: &mut u64| {
            match joined {
                Ok((i, Ok(r), seconds)) => {
                    results[i] = Some(r);
                    *done += 1;
                    *computed += 1;
                    env.shard_done(i, false, *done, total, Some(seconds));
                }
                Ok((i, Err(e), _)) => errors.push((i, e)),
                Err(e) => errors.push((usize::MAX, format!("internal error: a shard task panicked: {e}"))),
            }
        };

    for (i, shard) in shards.iter().enumerate() {
        let sk = salted_shard_key(&map_key, &shard.digest, salts.as_ref().map(|s| &s[i]));
        if !forced {
            match env.store.get_shard(&sk) {
                Ok(Some(out)) => {
                    results[i] = Some(out);
                    done += 1;
                    env.shard_done(i, true, done, total, None);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    errors.push((i, e.to_string()));
                    break;
                }
            }
        }
        if devices.is_none() && !device_slots.is_empty() {
            devices = Some(env.devices.hold(&device_slots.iter().cloned().collect::<Vec<_>>()).await);
        }
        // The device's turn before a work slot, as for whole stages: no work slot waits idle.
        let device_turn = match &on_device {
            Some(s) => Some(s.clone().acquire_owned().await.expect("the device-shard semaphore is never closed")),
            None => None,
        };
        let permit = env.slots.clone().acquire_owned().await.expect("the work-slot semaphore is never closed");
        while let Some(j) = set.try_join_next() {
            handle(j, &mut results, &mut errors, &mut done, &mut computed);
        }
        if failed.load(Ordering::Relaxed) || !errors.is_empty() {
            break;
        }
        let replica = {
            let mut busy = busy.lock().unwrap_or_else(|p| p.into_inner());
            let r = (0..replicas).min_by_key(|&r| (busy[r], r)).expect("at least one replica");
            busy[r] += 1;
            r
        };
        let (env2, inputs2, mappers2, busy2, failed2, shard, first) =
            (env.clone(), inputs.clone(), mappers.clone(), busy.clone(), failed.clone(), *shard, first_record[i]);
        set.spawn_blocking(move || {
            let _permit = (permit, device_turn);
            let started = Instant::now();
            let r = compute_shard(&env2, &inputs2, &mappers2[replica], replica, i, first, &shard, &sk);
            let seconds = started.elapsed().as_secs_f64();
            busy2.lock().unwrap_or_else(|p| p.into_inner())[replica] -= 1;
            if r.is_err() {
                failed2.store(true, Ordering::Relaxed);
            }
            (i, r, seconds)
        });
    }
    while let Some(j) = set.join_next().await {
        handle(j, &mut results, &mut errors, &mut done, &mut computed);
    }
    if let Some((_, e)) = errors.into_iter().min_by_key(|(i, _)| *i) {
        return Err((e, (total, computed)));
    }
    Ok(map_output(&env, &inputs, port, results, total, computed))
}

/// A map stage's output artifact from its output shards, in input order.
fn map_output(
    env: &StageEnv,
    inputs: &Inputs,
    port: &str,
    results: Vec<Option<ShardEntry>>,
    total: u64,
    computed: u64,
) -> (Artifact, u64, u64, u64) {
    let dropped_on_error = results.iter().flatten().map(|e| e.dropped_on_error).sum();
    let out: Vec<ShardRef> = results.into_iter().flatten().map(|e| e.shard).filter(|s| s.records > 0).collect();
    if env.pipeline.stages[env.idx].stage.produces() == Produces::Tensors {
        return (Artifact::Tensors { shards: out }, total, computed, dropped_on_error);
    }
    // Records pass through a map stage, and so does the folder their relative paths resolve against.
    let root = inputs.one(port).ok().and_then(Artifact::root);
    (Artifact::Dataset { shards: out, root }, total, computed, dropped_on_error)
}

/// [`run_map`] with the Slurm executor: the cache is consulted here as for a local run, and the
/// missing shards go to the cluster as job arrays (see [`crate::executor::slurm`]).
#[allow(clippy::too_many_arguments)]
async fn run_map_on_slurm(
    env: Arc<StageEnv>,
    inputs: Arc<Inputs>,
    shards: Vec<ShardRef>,
    map_key: StageKey,
    salts: Option<Vec<crate::digest::Digest>>,
    port: &'static str,
    forced: bool,
    options: &slurm::SlurmOptions,
) -> MapResult {
    let total = shards.len() as u64;
    let mut results: Vec<Option<ShardEntry>> = vec![None; shards.len()];
    let mut missing = Vec::new();
    let (mut done, mut computed) = (0u64, 0u64);
    let mut first_record = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let key = salted_shard_key(&map_key, &shard.digest, salts.as_ref().map(|s| &s[i]));
        let cached = if forced { Ok(None) } else { env.store.get_shard(&key) };
        match cached {
            Ok(Some(out)) => {
                results[i] = Some(out);
                done += 1;
                env.shard_done(i, true, done, total, None);
            }
            Ok(None) => missing.push(Missing { index: i, first_record, input: *shard, key }),
            Err(e) => return Err((e.to_string(), (total, 0))),
        }
        first_record += shard.records;
    }
    if !missing.is_empty() {
        let work = StageWork {
            pipeline: &env.pipeline,
            idx: env.idx,
            key: env.key,
            store: &env.store,
            inputs: &inputs,
            port,
            sink: &*env.sink,
            forced,
        };
        let outcome = slurm::compute(work, missing, options, |i, entry| {
            results[i] = Some(entry);
            done += 1;
            computed += 1;
            env.shard_done(i, false, done, total, None);
        })
        .await;
        if let Err(e) = outcome {
            return Err((e, (total, computed)));
        }
    }
    Ok(map_output(&env, &inputs, port, results, total, computed))
}

/// A replica's mapper, prepared when its first shard comes (or the error preparing it gave).
type Mapper = OnceLock<std::result::Result<Arc<dyn ShardMapper>, StageError>>;

#[allow(clippy::too_many_arguments)]
fn compute_shard(
    env: &StageEnv,
    inputs: &Inputs,
    mapper: &Mapper,
    replica: usize,
    index: usize,
    first_record: u64,
    shard: &ShardRef,
    key: &crate::digest::ShardKey,
) -> std::result::Result<ShardEntry, String> {
    let ctx = env.ctx();
    let mapper = mapper
        .get_or_init(|| {
            let Execution::Map { stage, .. } = env.pipeline.stages[env.idx].stage.execution() else { unreachable!() };
            stage.prepare(&ctx, inputs, replica)
        })
        .as_ref()
        .map_err(|e| e.to_string())?;
    let out = map_one_shard(&env.store, &**mapper, index, first_record, shard)?;
    let commit = || -> Result<ShardEntry> {
        env.store.put_shard(key, &out)?;
        env.store.flush()?;
        Ok(out)
    };
    commit().map_err(|e| e.to_string())
}

/// Maps one shard and stores its output object (not indexed: the caller records it, in the
/// index or, in a worker, as a receipt). The error names the record, by its position in the
/// dataset and in the shard, where the stage said which one failed.
pub(crate) fn map_one_shard(
    store: &Store,
    mapper: &dyn ShardMapper,
    index: usize,
    first_record: u64,
    shard: &ShardRef,
) -> std::result::Result<ShardEntry, String> {
    let bytes = store.get(&shard.digest).map_err(|e| e.to_string())?;
    let mut out = store.writer();
    let input = ShardInput { index, first_record, digest: shard.digest, jsonl: &bytes };
    let mapped = mapper.map_shard(&input, &mut out).map_err(|e| match e.record {
        Some(r) => format!("record {} (shard {index}, line {} of the shard): {e}", first_record + r, r + 1),
        None => format!("shard {index}: {e}"),
    })?;
    drop(bytes);
    let (digest, size) = out.commit().map_err(|e| e.to_string())?;
    Ok(ShardEntry {
        shard: ShardRef { digest, records: mapped.records, bytes: size },
        dropped_on_error: mapped.dropped_on_error,
    })
}

/// A port that takes one artifact but is fed a chosen set of another size fails before its stage
/// runs (a set's size is known only once it is chosen).
fn one_artifact_ports(decl: &crate::pipeline::StageDecl, inputs: &Inputs) -> std::result::Result<(), StageError> {
    for spec in decl.kind.ports().iter().filter(|p| p.arity == Arity::One) {
        let n = inputs.all(spec.name).len();
        if decl.inputs.contains_key(spec.name) && n != 1 {
            return Err(StageError::input(format!(
                "input port `{}` takes one artifact, but the chosen set connected to it holds {n}",
                spec.name
            ))
            .with_hint("connect the set to a port that takes several (a soup's `models`, a concat's `data`), or choose `top = 1`"));
        }
    }
    Ok(())
}
