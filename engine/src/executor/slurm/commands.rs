//! The Slurm commands the driver runs: `sbatch`, `squeue`, `scancel`. Nothing else talks to
//! Slurm. `sacct` is not used: most clusters' users cannot rely on accounting being there.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// What Slurm says of one array task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, ...
    pub state: String,
    /// The node it ran on (empty while pending).
    pub node: String,
    /// The job's name (`ladle-STAGE`).
    pub name: String,
}

impl TaskState {
    /// Whether the task will do nothing more: its receipts are all there will be.
    pub fn ended(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "REQUEUE_FED"
                | "REQUEUE_HOLD"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "SUSPENDED"
                | "STOPPED"
                | "RESV_DEL_HOLD"
        )
    }
}

fn run(command: &mut Command) -> Result<String, String> {
    let program = command.get_program().to_string_lossy().to_string();
    let output = command.output().map_err(|e| {
        format!("cannot run `{program}`: {e}; is this a Slurm login node (are the Slurm client commands on PATH)?")
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`{program}` failed ({}): {}", output.status, stderr.trim()));
    }
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}

/// Submits a batch script; returns the job id.
pub fn sbatch(script: &Path) -> Result<String, String> {
    let out = run(Command::new("sbatch").arg("--parsable").arg(script))?;
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let id: String = out.trim().chars().take_while(char::is_ascii_digit).collect();
    if id.is_empty() {
        return Err(format!("sbatch printed no job id: {:?}", out.trim()));
    }
    Ok(id)
}

/// The states of every task of the given jobs that Slurm still knows (finished ones stay
/// visible for the cluster's MinJobAge, 300 s by default), by `JOB_TASK` id.
pub fn squeue(jobs: &[String]) -> Result<HashMap<String, TaskState>, String> {
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
    let query = |ids: &str| run(Command::new("squeue").args(["-h", "-r", "-t", "all", "-o", "%i|%T|%N|%j", "-j", ids]));
    let text = match query(&jobs.join(",")) {
        Ok(t) => t,
        // One forgotten job makes squeue refuse the whole list: ask job by job.
        Err(e) if e.contains("Invalid job id") => {
            let mut all = String::new();
            for j in jobs {
                match query(j) {
                    Ok(t) => all.push_str(&t),
                    Err(e) if e.contains("Invalid job id") => {}
                    Err(e) => return Err(e),
                }
            }
            all
        }
        Err(e) => return Err(e),
    };
    Ok(parse_squeue(&text))
}

fn parse_squeue(text: &str) -> HashMap<String, TaskState> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().splitn(4, '|');
            let id = parts.next()?.trim().to_string();
            let state = parts.next()?.trim().to_string();
            let node = parts.next().unwrap_or("").trim().to_string();
            let name = parts.next().unwrap_or("").trim().to_string();
            (!id.is_empty()).then_some((id, TaskState { state, node, name }))
        })
        .collect()
}

/// Cancels jobs (whole arrays).
pub fn scancel(jobs: &[String]) -> Result<(), String> {
    if jobs.is_empty() {
        return Ok(());
    }
    run(Command::new("scancel").args(jobs)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_give_each_array_task_its_state_and_node() {
        let states = parse_squeue(
            "12_0|COMPLETED|node1|ladle-ppl\n12_1|RUNNING|node2|ladle-ppl\n12_2|PENDING||ladle-ppl\n\n13|FAILED|node1|x\n",
        );
        assert_eq!(states.len(), 4);
        let running = TaskState { state: "RUNNING".into(), node: "node2".into(), name: "ladle-ppl".into() };
        assert_eq!(states["12_1"], running);
        assert!(states["12_0"].ended() && states["13"].ended());
        assert!(!states["12_1"].ended() && !states["12_2"].ended());
    }
}
