//! A run killed with SIGKILL resumes where it stopped: committed shards are kept, the rest are
//! computed, and the result is byte-identical to an uninterrupted run.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Project, captions};

const PIPELINE: &str = r#"
[pipeline]
name = "resume"

[stages.captions]
kind = "read"
path = "data.jsonl"
shard_records = 10

[stages.slow]
kind = "exec"
inputs = { data = "captions" }
per_shard = true
command = ["sh", "-c", "sleep 0.3; cat"]

[stages.out]
kind = "write"
data = "slow"
path = "out.jsonl"
"#;

#[test]
fn kill_9_during_a_map_stage_then_rerun_resumes() {
    let p = Project::new();
    p.write("data.jsonl", captions(0..120)).write("p.toml", PIPELINE);

    let mut child = p
        .command(&["run", "p.toml", "--json", "-j", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut committed_before_kill = 0;
    let started = Instant::now();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["event"] == "shard_done" && e["stage"] == "slow" {
            committed_before_kill += 1;
            if committed_before_kill == 4 {
                child.kill().unwrap(); // SIGKILL
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the slow stage never reported shards");
    }
    child.wait().unwrap();
    assert_eq!(committed_before_kill, 4);
    assert!(!p.path("out.jsonl").exists(), "killed before the write stage");

    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let cached =
        r.events.iter().filter(|e| e["event"] == "shard_done" && e["stage"] == "slow" && e["cached"] == true).count();
    // At least what we saw committed; at most what was in flight besides (-j 2).
    assert!((4..=6).contains(&cached), "{cached} shards were cached");
    assert_eq!(r.stage("slow")["shards_total"], 12);
    assert_eq!(r.computed("slow") as usize, 12 - cached, "only uncommitted shards are computed");

    let clean = Project::new();
    clean.write("data.jsonl", captions(0..120)).write("p.toml", PIPELINE);
    assert_eq!(clean.run("p.toml", &[]).code(), 0);
    assert_eq!(p.read("out.jsonl"), clean.read("out.jsonl"), "resumed output differs from an uninterrupted run");
    let runs = String::from_utf8(p.ladle(&["runs", "p.toml"]).stdout).unwrap();
    // The interrupted run's record says what it finished before it was killed.
    let first = runs.lines().next().unwrap();
    assert!(first.contains("interrupted") && first.contains("1 ran"), "{runs}");
}

#[test]
fn a_second_run_on_the_same_store_fails_at_once() {
    let p = Project::new();
    p.write("data.jsonl", captions(0..40)).write("p.toml", PIPELINE);
    let mut first = p
        .command(&["run", "p.toml", "--json", "-j", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds the store.
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let _ = lines.next();
    let started = Instant::now();
    let second = p.ladle(&["run", "p.toml"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("is in use by another ladle process (pid"), "{err}");
    assert!(err.contains("--store"), "{err}");
    for _ in lines {}
    assert!(first.wait().unwrap().success());
}
