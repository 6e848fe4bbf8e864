//! `ladle worker TASK.json`: what each array task of a Slurm job runs.
//!
//! A worker opens only the objects of the store ([`Store::open_objects`]: no index, no lock, so
//! any number of workers run beside the driver), loads the pipeline file and configures the one
//! stage its task names, prepares the stage's model once, and computes its shards in order. Each
//! output object is written atomically, then a [`Receipt`] for it; a shard whose receipt is
//! already there (a retried task that had finished some) is not computed again. A worker never
//! touches what another task owns: it writes only objects (digest-named, so two writers of one
//! are harmless), its own receipts and its own temporary folder.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::task::{Receipt, StageDir, Task, WholeReceipt, write_atomically};
use crate::context::StageContext;
use crate::digest::Digest;
use crate::error::{Error, Result, StageError};
use crate::events::NoEvents;
use crate::pipeline::Pipeline;
use crate::registry::Registry;
use crate::scheduler::map_one_shard;
use crate::stage::Execution;
use crate::store::Store;

/// What a worker did.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerReport {
    pub computed: usize,
    /// Shards whose receipt an earlier attempt had left.
    pub already_done: usize,
}

/// The name of this array task (`JOB_TASK`), or `local` outside Slurm.
pub fn task_name() -> String {
    match (std::env::var("SLURM_ARRAY_JOB_ID"), std::env::var("SLURM_ARRAY_TASK_ID")) {
        (Ok(job), Ok(task)) => format!("{job}_{task}"),
        _ => std::env::var("SLURM_JOB_ID").unwrap_or_else(|_| "local".into()),
    }
}

/// Computes the shards of the task described in `task_file`, logging a line per shard to `log`.
/// An error names the shard (and record) that failed; receipts already written stay.
pub fn run_task(task_file: &Path, registry: &Registry, log: &mut dyn Write) -> Result<WorkerReport> {
    let bytes = std::fs::read(task_file).map_err(|e| Error::io(format!("cannot read {}", task_file.display()), e))?;
    let task: Task = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Usage(format!("{} is not a task file this ladle can read: {e}", task_file.display())))?;
    let source = std::fs::read(&task.pipeline)
        .map_err(|e| Error::io(format!("cannot read the pipeline file {}", task.pipeline.display()), e))?;
    if Digest::of(&source) != task.pipeline_digest {
        return Err(Error::PipelineFile {
            path: task.pipeline.clone(),
            message: "the pipeline file changed after this task was submitted; its stage may no longer be the \
                      one the driver asked for. Run `ladle run` again: it submits tasks for the file as it is now"
                .into(),
        });
    }
    let pipeline = Pipeline::parse_with(&task.pipeline, &source, registry, &task.overrides)?;
    let decl = pipeline.stage_named(&task.stage)?;
    let decl = &pipeline.stages[decl];
    let name = task_name();
    let store = Store::open_objects(&task.store, &name)?;
    let dir = StageDir::new(&store, &task.stage_key);
    let cpus = std::env::var("SLURM_CPUS_PER_TASK").ok().and_then(|c| c.parse().ok()).unwrap_or(1usize);
    let ctx = StageContext {
        stage: &task.stage,
        store: &store,
        key: task.stage_key,
        pipeline_dir: &pipeline.dir,
        events: &NoEvents,
        slots: Arc::new(Semaphore::new(cpus.saturating_sub(1))),
        work: Default::default(),
        dropped: Default::default(),
        gpus: Vec::new(),
    };
    let mut report = WorkerReport::default();
    let stage = match (decl.stage.execution(), task.whole) {
        (Execution::Map { stage, .. }, false) => stage,
        (Execution::Whole(stage), true) => {
            writeln!(log, "ladle worker {name}: stage `{}`, whole", task.stage).ok();
            let started = Instant::now();
            let artifact =
                stage.run(&ctx, &task.inputs).map_err(|error| Error::Stage { stage: task.stage.clone(), error })?;
            let work = ctx.work.lock().unwrap_or_else(|p| p.into_inner()).take();
            let receipt = WholeReceipt {
                artifact,
                work: work.map(|w| (w.unit.to_string(), w.total, w.computed)),
                index: store.take_pending_index(),
                task: name.clone(),
                seconds: started.elapsed().as_secs_f64(),
            };
            let json = serde_json::to_vec(&receipt).map_err(|e| Error::Internal(e.to_string()))?;
            let path = dir.whole_receipt();
            write_atomically(&path, &json)
                .map_err(|e| Error::io(format!("cannot write the receipt {}", path.display()), e))?;
            writeln!(log, "done in {:.2} s", receipt.seconds).ok();
            report.computed = 1;
            return Ok(report);
        }
        _ => {
            return Err(Error::Usage(format!(
                "stage `{}` does not run the way {} says: the pipeline file changed kinds",
                task.stage,
                task_file.display()
            )));
        }
    };
    let mut mapper = None;
    let started = Instant::now();
    writeln!(log, "ladle worker {name}: stage `{}`, {} shard(s)", task.stage, task.shards.len()).ok();
    for shard in &task.shards {
        let receipt_path = dir.receipt(&shard.key);
        if let Ok(bytes) = std::fs::read(&receipt_path)
            && let Ok(r) = serde_json::from_slice::<Receipt>(&bytes)
            && store.has_object(&r.output.digest)?
        {
            report.already_done += 1;
            continue;
        }
        if mapper.is_none() {
            let t = Instant::now();
            let prepared = stage
                .prepare(&ctx, &task.inputs, 0)
                .map_err(|error| Error::Stage { stage: task.stage.clone(), error })?;
            writeln!(log, "prepared in {:.2} s", t.elapsed().as_secs_f64()).ok();
            mapper = Some(prepared);
        }
        let mapper = mapper.as_deref().expect("prepared above");
        let t = Instant::now();
        let entry = map_one_shard(&store, mapper, shard.index, shard.first_record, &shard.input)
            .map_err(|message| Error::Stage { stage: task.stage.clone(), error: StageError::input(message) })?;
        let receipt = Receipt {
            key: shard.key,
            output: entry.shard,
            dropped_on_error: entry.dropped_on_error,
            task: name.clone(),
            seconds: t.elapsed().as_secs_f64(),
        };
        let json = serde_json::to_vec(&receipt).map_err(|e| Error::Internal(e.to_string()))?;
        write_atomically(&receipt_path, &json)
            .map_err(|e| Error::io(format!("cannot write the receipt {}", receipt_path.display()), e))?;
        report.computed += 1;
        writeln!(log, "shard {}: {} record(s) in {:.2} s", shard.index, entry.shard.records, receipt.seconds).ok();
    }
    writeln!(
        log,
        "done: {} computed, {} already done, {:.2} s",
        report.computed,
        report.already_done,
        started.elapsed().as_secs_f64()
    )
    .ok();
    Ok(report)
}
