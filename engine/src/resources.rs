//! A stage's `resources` hints: what one task of it needs on a cluster.
//!
//! `resources = { gpus = 1, cpus = 8, mem = "64G", time = "2:00:00" }` tells an executor that
//! places work on machines (Slurm) what to ask for; the local executor ignores it. Hints describe
//! *where* a stage computes, never *what*: they never enter a key, so a pipeline tuned for one
//! cluster stays cached on another.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::PipelineError;
use crate::pipeline::value::{Param, Value};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub gpus: Option<u32>,
    pub cpus: Option<u32>,
    /// As Slurm writes it: `64G`, `500M`.
    pub mem: Option<String>,
    /// As Slurm writes it: `2:00:00`, `1-00:00:00`, `30` (minutes).
    pub time: Option<String>,
}

impl Resources {
    /// Reads the `resources` table of stage `stage`.
    pub fn parse(stage: &str, param: &Param) -> Result<Resources, PipelineError> {
        let error = |at: &crate::error::Location, message: String| PipelineError {
            location: at.clone(),
            stage: Some(stage.to_string()),
            message,
            hint: Some("write resources = { gpus = 1, cpus = 8, mem = \"64G\", time = \"2:00:00\" }".into()),
        };
        let Value::Table(table) = &param.value else {
            return Err(error(&param.at, format!("`resources` must be a table, found {}", param.value.type_name())));
        };
        let mut out = Resources::default();
        let count = |p: &Param, name: &str| match p.value {
            Value::Integer(n) if (0..=4096).contains(&n) => Ok(n as u32),
            _ => Err(error(&p.at, format!("`resources.{name}` must be a whole number from 0 to 4096"))),
        };
        let text = |p: &Param, name: &str, check: fn(&str) -> bool, shape: &str| match &p.value {
            Value::String(s) if check(s) => Ok(s.clone()),
            Value::Integer(n) if *n > 0 && check(&n.to_string()) => Ok(n.to_string()),
            _ => Err(error(&p.at, format!("`resources.{name}` must be {shape}"))),
        };
        let entries: &BTreeMap<String, Param> = table;
        for (name, p) in entries {
            match name.as_str() {
                "gpus" => out.gpus = Some(count(p, name)?),
                "cpus" => out.cpus = Some(count(p, name)?),
                "mem" => out.mem = Some(text(p, name, valid_mem, "a size such as \"64G\" or \"500M\"")?),
                "time" => {
                    out.time = Some(text(p, name, valid_time, "a time limit such as \"2:00:00\" or \"1-00:00:00\"")?)
                }
                other => {
                    return Err(PipelineError {
                        location: p.at.clone(),
                        stage: Some(stage.to_string()),
                        message: format!("unknown resource `{other}`"),
                        hint: Some("resources are gpus, cpus, mem and time".into()),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Whether a task of the stage asks for a GPU.
    pub fn wants_gpu(&self) -> bool {
        self.gpus.is_some_and(|g| g > 0)
    }
}

/// `64G`, `500M`, `1T`, `1024` (MiB, as Slurm reads a bare number).
pub(crate) fn valid_mem(s: &str) -> bool {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) && s.len() - digits.len() <= 1
}

/// Slurm's forms: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`.
pub(crate) fn valid_time(s: &str) -> bool {
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, s),
    };
    let number = |p: &str| !p.is_empty() && p.len() <= 4 && p.chars().all(|c| c.is_ascii_digit());
    days.is_none_or(number) && !rest.is_empty() && rest.split(':').count() <= 3 && rest.split(':').all(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_forms_of_sizes_and_times_are_accepted_and_others_refused() {
        for ok in ["64G", "500M", "1024", "2t"] {
            assert!(valid_mem(ok), "{ok}");
        }
        for bad in ["", "G", "64GB", "6.4G", "-1G"] {
            assert!(!valid_mem(bad), "{bad}");
        }
        for ok in ["30", "30:00", "2:00:00", "1-00", "1-00:00:00"] {
            assert!(valid_time(ok), "{ok}");
        }
        for bad in ["", "2h", "1:2:3:4", "-5", "1-", "a:00"] {
            assert!(!valid_time(bad), "{bad}");
        }
    }
}
