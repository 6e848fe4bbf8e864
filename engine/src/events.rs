//! Run events: the one source for the terminal, `--json` and run records.
//!
//! The scheduler and stage runners only emit events; renderers (in the CLI) and the run-record
//! folder ([`crate::runs::RunRecorder`]) consume them.

use serde::Serialize;

use crate::runs::RunRecord;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: u64,
        pipeline: String,
        stages: Vec<String>,
    },
    StageStarted {
        stage: String,
        kind: String,
        shards_total: Option<u64>,
    },
    ShardDone {
        stage: String,
        shard: usize,
        cached: bool,
        done: u64,
        total: u64,
        /// How long computing it took here (not for cached shards, nor ones a cluster computed).
        #[serde(skip_serializing_if = "Option::is_none")]
        seconds: Option<f64>,
    },
    /// A job array submitted to Slurm for a stage's missing shards.
    JobSubmitted {
        stage: String,
        job: String,
        tasks: usize,
        shards: usize,
    },
    /// Array tasks an earlier driver submitted, still queued or running, waited for again.
    JobAdopted {
        stage: String,
        jobs: Vec<String>,
        tasks: usize,
    },
    Progress {
        stage: String,
        done: u64,
        total: u64,
    },
    StageCached {
        stage: String,
        kind: String,
        artifact: String,
        records: Option<u64>,
        shards_total: u64,
    },
    StageFinished {
        stage: String,
        kind: String,
        artifact: String,
        records: Option<u64>,
        shards_total: u64,
        shards_computed: u64,
        /// What a whole stage counts in `shards_*` instead of shards (`"candidate score(s)"`).
        #[serde(skip_serializing_if = "Option::is_none")]
        work_unit: Option<&'static str>,
        /// Records dropped because processing them failed (`on_error = "drop"`).
        dropped_on_error: u64,
        /// The output equals the previous run's: stages downstream stay cached (early cutoff).
        unchanged: bool,
        seconds: f64,
    },
    StageFailed {
        stage: String,
        kind: String,
        error: String,
        shards_total: u64,
        shards_computed: u64,
    },
    StageSkipped {
        stage: String,
        kind: String,
        reason: String,
    },
    Summary(RunRecord),
}

/// Where events go.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// Drops every event.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _: &Event) {}
}
