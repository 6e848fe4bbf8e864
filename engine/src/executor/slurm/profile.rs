//! The cluster profile: how to ask a Slurm cluster for work, kept outside the pipeline file so
//! the same pipeline runs on a laptop and on any cluster.
//!
//! ```toml
//! [slurm]
//! partition = "gpu"
//! account = "vlm-data"
//! time = "4:00:00"               # per task; a stage's resources.time wins
//! cpus_per_task = 8              # resources.cpus wins
//! gpus_per_task = 1              # resources.gpus wins
//! mem = "64G"                    # resources.mem wins
//! max_array_size = 1000          # the cluster's MaxArraySize
//! max_concurrent = 64            # array tasks running at once (sbatch --array=...%N)
//! shards_per_task = 4            # default: spread a stage's shards over max_concurrent tasks
//! sbatch = ["--qos=high", "--constraint=h100"]   # extra #SBATCH lines
//! setup = ["module load cuda/12.4", "source /shared/venv/bin/activate"]
//! retries = 2                    # per shard, after its first attempt
//! poll_seconds = 5
//! ladle = "/shared/bin/ladle"    # the binary tasks run; default: this one
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::resources::Resources;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub time: Option<String>,
    pub cpus_per_task: Option<u32>,
    pub gpus_per_task: Option<u32>,
    pub mem: Option<String>,
    #[serde(default = "default_max_array_size")]
    pub max_array_size: usize,
    pub max_concurrent: Option<usize>,
    pub shards_per_task: Option<usize>,
    #[serde(default)]
    pub sbatch: Vec<String>,
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_poll_seconds")]
    pub poll_seconds: f64,
    pub ladle: Option<PathBuf>,
}

fn default_max_array_size() -> usize {
    1000
}
fn default_retries() -> u32 {
    2
}
fn default_poll_seconds() -> f64 {
    5.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    slurm: Profile,
}

impl Default for Profile {
    fn default() -> Self {
        toml::from_str::<File>("[slurm]").expect("the empty profile parses").slurm
    }
}

impl Profile {
    /// Reads a profile file (a `[slurm]` table).
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read the cluster profile {}", path.display()), e))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Profile> {
        let file_error = |message: String| Error::PipelineFile { path: path.to_path_buf(), message };
        let profile = toml::from_str::<File>(text).map(|f| f.slurm).map_err(|e| {
            file_error(format!(
                "not a cluster profile: {}\n  hint: write a [slurm] table with partition, account, time, \
                 cpus_per_task, gpus_per_task, mem, max_array_size, max_concurrent, shards_per_task, sbatch, \
                 setup, retries, poll_seconds, ladle (all optional)",
                e.message().trim()
            ))
        })?;
        if profile.max_array_size == 0 || profile.max_concurrent == Some(0) || profile.shards_per_task == Some(0) {
            return Err(file_error("max_array_size, max_concurrent and shards_per_task must be at least 1".into()));
        }
        if !(profile.poll_seconds > 0.0 && profile.poll_seconds <= 3600.0) {
            return Err(file_error("poll_seconds must be above 0 and at most 3600".into()));
        }
        if profile.mem.as_deref().is_some_and(|m| !crate::resources::valid_mem(m)) {
            return Err(file_error("mem must be a size such as \"64G\" or \"500M\"".into()));
        }
        if profile.time.as_deref().is_some_and(|t| !crate::resources::valid_time(t)) {
            return Err(file_error("time must be a time limit such as \"2:00:00\" or \"1-00:00:00\"".into()));
        }
        Ok(profile)
    }

    /// How many shards each task of an array computes, for `shards` shards to compute.
    pub fn shards_per_task(&self, shards: usize) -> usize {
        match self.shards_per_task {
            Some(n) => n,
            None => {
                let tasks = self.max_concurrent.unwrap_or(self.max_array_size).min(self.max_array_size).max(1);
                shards.div_ceil(tasks).max(1)
            }
        }
    }

    /// The `#SBATCH` options of a task of a stage with `resources`, which win over the profile.
    pub fn sbatch_options(&self, resources: &Resources) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.partition {
            out.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.account {
            out.push(format!("--account={a}"));
        }
        if let Some(t) = resources.time.as_ref().or(self.time.as_ref()) {
            out.push(format!("--time={t}"));
        }
        if let Some(c) = resources.cpus.or(self.cpus_per_task) {
            out.push(format!("--cpus-per-task={c}"));
        }
        if let Some(g) = resources.gpus.or(self.gpus_per_task).filter(|g| *g > 0) {
            out.push(format!("--gpus-per-task={g}"));
        }
        if let Some(m) = resources.mem.as_ref().or(self.mem.as_ref()) {
            out.push(format!("--mem={m}"));
        }
        out.extend(self.sbatch.iter().cloned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_reads_its_settings_and_a_stage_resources_win() {
        let p = Profile::parse(
            Path::new("p.toml"),
            "[slurm]\npartition = \"gpu\"\ntime = \"1:00:00\"\ncpus_per_task = 4\nmem = \"8G\"\nmax_concurrent = 8\n\
             sbatch = [\"--qos=high\"]\n",
        )
        .unwrap();
        let hints = Resources { gpus: Some(1), cpus: Some(16), mem: None, time: Some("2:00:00".into()) };
        assert_eq!(
            p.sbatch_options(&hints),
            ["--partition=gpu", "--time=2:00:00", "--cpus-per-task=16", "--gpus-per-task=1", "--mem=8G", "--qos=high"]
        );
        // 100 shards over at most 8 tasks at once: 13 per task (8 tasks, the last one short).
        assert_eq!(p.shards_per_task(100), 13);
        assert_eq!(p.shards_per_task(3), 1);
        assert_eq!(Profile::default().shards_per_task(5000), 5);
    }

    #[test]
    fn a_bad_profile_names_its_file_and_what_is_wrong() {
        for (text, wanted) in [
            ("[slurm]\npartitoin = \"gpu\"\n", "partitoin"),
            ("partition = \"gpu\"\n", "[slurm]"),
            ("[slurm]\nmax_concurrent = 0\n", "at least 1"),
            ("[slurm]\nmem = \"lots\"\n", "mem"),
        ] {
            let e = Profile::parse(Path::new("cluster.toml"), text).unwrap_err().to_string();
            assert!(e.contains("cluster.toml") && e.contains(wanted), "{text:?}: {e}");
        }
    }
}
