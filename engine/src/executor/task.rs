//! What a driver hands a worker and what a worker hands back, as files in the store.
//!
//! Everything lives under `<store>/slurm/<stage key>/`, on the filesystem every node sees:
//! ```text
//! tasks/<submission>-<task>.json   a [`Task`]: the shards one array task computes
//! submit-<submission>.sh            the batch script given to sbatch
//! submissions/<submission>.json     a [`Submission`]: its job id and each task's shards
//! logs/<submission>-<task>.log      the task's stdout and stderr
//! receipts/<shard key>.json         a [`Receipt`] per shard a worker finished
//! ```
//! A worker writes each output object and then its receipt, each atomically (temporary file,
//! fsync, rename), so a receipt never names an object that is not whole. The driver, the only
//! writer of the index, ingests a receipt by re-hashing the object it names before indexing it,
//! and deletes the receipt once the index entry is durable. Submissions are kept so that a driver
//! killed and started again adopts the tasks still running instead of submitting them again.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::artifact::{Artifact, ShardRef};
use crate::digest::{Digest, ShardKey, StageKey};
use crate::stage::Inputs;
use crate::store::{PendingIndex, Store};

/// The shards one array task computes, and how to find the stage that computes them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Task {
    /// The pipeline file (absolute), which the worker loads to configure the stage.
    pub pipeline: PathBuf,
    /// Its digest when the driver submitted the task: a worker refuses a file edited since.
    pub pipeline_digest: Digest,
    /// The `--set NAME=VALUE` overrides the driver loaded the file with.
    #[serde(default)]
    pub overrides: Vec<(String, String)>,
    pub stage: String,
    pub stage_key: StageKey,
    /// The store's root (absolute).
    pub store: PathBuf,
    /// The stage's inputs; the mapped port's dataset lists only this task's shards.
    pub inputs: Inputs,
    pub shards: Vec<TaskShard>,
    /// A whole stage run as one job (it asked for resources): no shards, one [`WholeReceipt`].
    #[serde(default)]
    pub whole: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TaskShard {
    /// Position of the shard in the dataset.
    pub index: usize,
    pub first_record: u64,
    pub input: ShardRef,
    /// Where its output is cached: the name of its receipt.
    pub key: ShardKey,
}

/// What a worker reports of a shard it computed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    pub key: ShardKey,
    pub output: ShardRef,
    pub dropped_on_error: u64,
    /// The array task that computed it (`JOB_TASK`), for the curious.
    pub task: String,
    pub seconds: f64,
}

/// What a worker reports of a whole stage it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WholeReceipt {
    pub artifact: Artifact,
    /// The units of work the stage reported (`candidate score(s)`, total, computed).
    pub work: Option<(String, u64, u64)>,
    /// What the stage asked to index (a soup's cached metrics, a log).
    pub index: PendingIndex,
    pub task: String,
    pub seconds: f64,
}

/// A job array the driver submitted: its id and the shards of each of its tasks, by task index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub number: u32,
    pub job: String,
    pub tasks: Vec<Vec<ShardKey>>,
}

/// The folder of one stage key's cluster work (see the module docs).
#[derive(Debug, Clone)]
pub struct StageDir {
    pub root: PathBuf,
}

impl StageDir {
    pub fn new(store: &Store, key: &StageKey) -> StageDir {
        StageDir { root: store.root().join("slurm").join(key.to_hex()) }
    }

    /// Creates the folders (idempotent).
    pub fn create(&self) -> std::io::Result<()> {
        for d in ["tasks", "submissions", "logs", "receipts"] {
            fs::create_dir_all(self.root.join(d))?;
        }
        Ok(())
    }

    pub fn receipts(&self) -> PathBuf {
        self.root.join("receipts")
    }

    pub fn receipt(&self, key: &ShardKey) -> PathBuf {
        self.receipts().join(format!("{}.json", key.to_hex()))
    }

    /// The receipt of a whole stage run as a job.
    pub fn whole_receipt(&self) -> PathBuf {
        self.root.join("whole.json")
    }

    pub fn task(&self, submission: u32, task: usize) -> PathBuf {
        self.root.join("tasks").join(format!("{submission}-{task}.json"))
    }

    pub fn log(&self, submission: u32, task: usize) -> PathBuf {
        self.root.join("logs").join(format!("{submission}-{task}.log"))
    }

    pub fn script(&self, submission: u32) -> PathBuf {
        self.root.join(format!("submit-{submission}.sh"))
    }

    pub fn submission(&self, number: u32) -> PathBuf {
        self.root.join("submissions").join(format!("{number}.json"))
    }

    /// The submissions kept, oldest first (unreadable ones are skipped: they can only be a crash's
    /// leftovers, and their tasks' receipts are still ingested).
    pub fn submissions(&self) -> Vec<Submission> {
        let mut out: Vec<Submission> = fs::read_dir(self.root.join("submissions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by_key(|s| s.number);
        out
    }

    /// A number no submission of this stage has used.
    pub fn next_submission(&self) -> u32 {
        let used = |dir: &str| -> u32 {
            fs::read_dir(self.root.join(dir))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    name.split(['-', '.']).next()?.parse::<u32>().ok()
                })
                .max()
                .map_or(0, |n| n + 1)
        };
        used("submissions").max(used("tasks")).max(used("logs"))
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of the
/// folder. Readers see the old file, no file, or the whole new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(parent)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// The last `lines` lines of a log file, or a note saying why there is none.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no log at {}: {e})", path.display()),
    }
}
