//! Run records, folded from events and kept in the store (`ladle runs`).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventSink};
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Cached,
    Ran,
    Failed,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub stage: String,
    pub kind: String,
    pub status: StageStatus,
    pub shards_total: u64,
    pub shards_computed: u64,
    /// What `shards_*` count when not shards (a soup's "candidate score(s)").
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub work_unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub records: Option<u64>,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub dropped_on_error: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub artifact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// The Slurm jobs that computed its shards in this run.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub jobs: Vec<String>,
    /// When it started (or was found cached), in milliseconds since the run started.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_ms: Option<u64>,
    /// The shards it computed here, when each ran (for the report's timeline).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub shard_times: Vec<ShardTime>,
}

/// When a shard computed, in milliseconds since the run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardTime {
    pub shard: usize,
    pub start_ms: u64,
    pub end_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Still running — or, read back by a later process, interrupted.
    Running,
    Ok,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub pipeline: String,
    pub pipeline_file: String,
    pub started_unix: u64,
    pub status: RunStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seconds: Option<f64>,
    /// Peak resident memory of the process, where the OS reports it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peak_rss_bytes: Option<u64>,
    pub stages: Vec<StageRecord>,
}

/// Folds stage events into a [`RunRecord`] and forwards every event to `next`. With a store, the
/// record is saved after each stage ends, so a run killed half-way still says what it finished.
pub struct RunRecorder {
    pub record: Mutex<RunRecord>,
    /// Slurm jobs per stage, until the stage's record is made.
    jobs: Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// When the run started, and per stage (until its record is made) when it started and the
    /// times of the shards it computed.
    started: std::time::Instant,
    timing: Mutex<std::collections::BTreeMap<String, (u64, Vec<ShardTime>)>>,
    next: Arc<dyn EventSink>,
    store: Option<Store>,
}

impl RunRecorder {
    pub fn new(record: RunRecord, next: Arc<dyn EventSink>, store: Option<Store>) -> Self {
        RunRecorder {
            record: Mutex::new(record),
            jobs: Default::default(),
            started: std::time::Instant::now(),
            timing: Default::default(),
            next,
            store,
        }
    }

    pub fn into_record(self) -> RunRecord {
        self.record.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl EventSink for RunRecorder {
    fn emit(&self, event: &Event) {
        match event {
            Event::JobSubmitted { stage, job, .. } => {
                self.jobs.lock().unwrap_or_else(|p| p.into_inner()).entry(stage.clone()).or_default().push(job.clone())
            }
            Event::JobAdopted { stage, jobs, .. } => {
                let mut all = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                all.entry(stage.clone()).or_default().extend(jobs.iter().cloned())
            }
            Event::StageStarted { stage, .. } => {
                let now = self.started.elapsed().as_millis() as u64;
                self.timing.lock().unwrap_or_else(|p| p.into_inner()).insert(stage.clone(), (now, Vec::new()));
            }
            Event::ShardDone { stage, shard, cached: false, seconds: Some(s), .. } => {
                let end_ms = self.started.elapsed().as_millis() as u64;
                let start_ms = end_ms.saturating_sub((s * 1000.0).round() as u64);
                let mut timing = self.timing.lock().unwrap_or_else(|p| p.into_inner());
                let (_, shards) = timing.entry(stage.clone()).or_insert((start_ms, Vec::new()));
                shards.push(ShardTime { shard: *shard, start_ms, end_ms });
            }
            _ => {}
        }
        let timing_of = |stage: &str| {
            let now = self.started.elapsed().as_millis() as u64;
            self.timing.lock().unwrap_or_else(|p| p.into_inner()).remove(stage).unwrap_or((now, Vec::new()))
        };
        let jobs_of =
            |stage: &str| self.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(stage).unwrap_or_default();
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let entry = |stage: &str, kind: &str, status| {
            let (started_ms, shard_times) = timing_of(stage);
            StageRecord {
                stage: stage.to_string(),
                kind: kind.to_string(),
                status,
                shards_total: 0,
                shards_computed: 0,
                work_unit: None,
                records: None,
                dropped_on_error: 0,
                artifact: None,
                seconds: None,
                error: None,
                jobs: jobs_of(stage),
                started_ms: Some(started_ms),
                shard_times,
            }
        };
        match event {
            Event::StageCached { stage, kind, artifact, records, shards_total } => rec.stages.push(StageRecord {
                artifact: Some(artifact.clone()),
                records: *records,
                shards_total: *shards_total,
                ..entry(stage, kind, StageStatus::Cached)
            }),
            Event::StageFinished {
                stage,
                kind,
                artifact,
                records,
                shards_total,
                shards_computed,
                work_unit,
                dropped_on_error,
                seconds,
                ..
            } => rec.stages.push(StageRecord {
                work_unit: work_unit.map(str::to_string),
                dropped_on_error: *dropped_on_error,
                artifact: Some(artifact.clone()),
                records: *records,
                shards_total: *shards_total,
                shards_computed: *shards_computed,
                seconds: Some(*seconds),
                ..entry(stage, kind, StageStatus::Ran)
            }),
            Event::StageFailed { stage, kind, error, shards_total, shards_computed } => rec.stages.push(StageRecord {
                error: Some(error.clone()),
                shards_total: *shards_total,
                shards_computed: *shards_computed,
                ..entry(stage, kind, StageStatus::Failed)
            }),
            Event::StageSkipped { stage, kind, reason } => {
                rec.stages.push(StageRecord { error: Some(reason.clone()), ..entry(stage, kind, StageStatus::Skipped) })
            }
            _ => {
                drop(rec);
                self.next.emit(event);
                return;
            }
        }
        if let Some(store) = &self.store {
            // Best effort: the final record is written (and errors reported) when the run ends.
            let _ = store.put_run(&rec);
        }
        drop(rec);
        self.next.emit(event);
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Peak resident set size of this process (Linux: VmHWM).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
