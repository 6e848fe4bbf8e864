//! Helpers for the end-to-end tests: a throw-away project folder and the real `ladle` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct RunResult {
    pub output: Output,
    pub events: Vec<Value>,
}

impl RunResult {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).to_string()
    }
    pub fn summary(&self) -> &Value {
        self.events
            .iter()
            .find(|e| e["event"] == "summary")
            .unwrap_or_else(|| panic!("no summary; stderr: {}", self.stderr()))
    }
    /// The summary's entry for `stage`.
    pub fn stage(&self, stage: &str) -> &Value {
        self.summary()["stages"]
            .as_array()
            .and_then(|s| s.iter().find(|x| x["stage"] == stage))
            .unwrap_or_else(|| panic!("stage {stage} not in summary {}", self.summary()))
    }
    pub fn status(&self, stage: &str) -> String {
        self.stage(stage)["status"].as_str().unwrap_or_default().to_string()
    }
    pub fn computed(&self, stage: &str) -> u64 {
        self.stage(stage)["shards_computed"].as_u64().unwrap_or(0)
    }
    /// Stages by status, as `name=status`, in summary order.
    pub fn statuses(&self) -> Vec<String> {
        self.summary()["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{}={}", s["stage"].as_str().unwrap(), s["status"].as_str().unwrap()))
            .collect()
    }
}

impl Project {
    pub fn new() -> Project {
        Project { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> &Self {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        self
    }

    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// The records of a JSONL file of the project.
    pub fn jsonl(&self, rel: &str) -> Vec<Value> {
        String::from_utf8(self.read(rel)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(ladle());
        c.args(args).current_dir(self.dir.path()).env_remove("LADLE_STORE");
        c
    }

    pub fn ladle(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run ladle");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "ladle panicked: {stderr}");
        out
    }

    /// `ladle run PIPELINE --json ARGS`, events parsed.
    pub fn run(&self, pipeline: &str, args: &[&str]) -> RunResult {
        let mut all = vec!["run", pipeline, "--json"];
        all.extend_from_slice(args);
        let output = self.ladle(&all);
        let events = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON event {l:?}: {e}")))
            .collect();
        RunResult { output, events }
    }

    /// Text output with this project's folder replaced by `[DIR]`, for snapshots.
    pub fn redact(&self, text: &str) -> String {
        let dir = self.dir.path().to_string_lossy().to_string();
        let canon = std::fs::canonicalize(self.dir.path()).map(|p| p.to_string_lossy().to_string()).unwrap_or_default();
        text.replace(&canon, "[DIR]").replace(&dir, "[DIR]")
    }
}

/// tests/fixtures/points-tiny: the tiny models, captions, images and transformers' values.
pub fn points_tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/points-tiny")
}

/// points-tiny/expected.json.
pub fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(points_tiny().join("expected.json")).unwrap()).unwrap()
}

pub fn ladle() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ladle"))
}

/// `n` JSONL caption records with a numeric `score`, deterministic.
pub fn captions(range: std::ops::Range<usize>) -> String {
    range
        .map(|i| {
            format!("{{\"id\":{i},\"caption\":\"caption number {i} of a test set\",\"score\":{}}}\n", (i * 7919) % 1000)
        })
        .collect()
}

#[path = "wasm.rs"]
mod wasm;
#[allow(unused_imports)] // not every test binary builds guests
pub use wasm::{python_plugin, wasm_dir};
