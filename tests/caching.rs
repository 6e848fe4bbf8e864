//! Reruns do only what changed: nothing, one stage and what really depends on it, or new shards.

mod common;

use common::{Project, captions};

const PIPELINE: &str = r#"
[pipeline]
name = "caching"

[stages.captions]
kind = "read"
path = "data.jsonl"
shard_records = 10

[stages.sampled]
kind = "sample"
data = "captions"
fraction = 1.0

[stages.keep]
kind = "select"
data = "sampled"
by = "score"
min = 0

[stages.out]
kind = "write"
data = "keep"
path = "out.jsonl"
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("data.jsonl", captions(0..95)).write("p.toml", PIPELINE);
    p
}

#[test]
fn a_second_run_with_nothing_changed_computes_nothing() {
    let p = project();
    let first = p.run("p.toml", &[]);
    assert_eq!(first.code(), 0, "{}", first.stderr());
    assert_eq!(first.statuses(), ["captions=ran", "sampled=ran", "keep=ran", "out=ran"]);
    assert_eq!(first.stage("sampled")["shards_total"], 10);
    assert_eq!(first.computed("sampled"), 10);
    let out = p.read("out.jsonl");

    let second = p.run("p.toml", &[]);
    assert_eq!(second.code(), 0);
    assert_eq!(second.statuses(), ["captions=cached", "sampled=cached", "keep=cached", "out=cached"]);
    for s in ["captions", "sampled", "keep", "out"] {
        assert_eq!(second.computed(s), 0, "{s}");
    }
    assert_eq!(second.stage("sampled")["shards_total"], 10);
    assert_eq!(p.read("out.jsonl"), out);
}

#[test]
fn a_changed_parameter_reruns_its_stage_and_early_cutoff_stops_the_rest() {
    let p = project();
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    // Scores lie in [0, 1000): `min = -5` keeps exactly what `min = 0` kept.
    p.write("p.toml", PIPELINE.replace("min = 0", "min = -5"));
    let plan = String::from_utf8(p.ladle(&["plan", "p.toml"]).stdout).unwrap();
    assert!(plan.contains("parameter `min` changed (0.0 → -5.0)"), "{plan}");
    let r = p.run("p.toml", &[]);
    assert_eq!(r.statuses(), ["captions=cached", "sampled=cached", "keep=ran", "out=cached"]);
    let finished: Vec<_> = r.events.iter().filter(|e| e["event"] == "stage_finished").collect();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0]["unchanged"], true);

    // A change that really changes the output reruns what is downstream.
    p.write("p.toml", PIPELINE.replace("min = 0", "min = 500"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.statuses(), ["captions=cached", "sampled=cached", "keep=ran", "out=ran"]);
    let kept = String::from_utf8(p.read("out.jsonl")).unwrap();
    let expected = (0..95).filter(|i| (i * 7919) % 1000 >= 500).count();
    assert_eq!(kept.lines().count(), expected);
}

#[test]
fn appending_records_recomputes_only_the_new_shards() {
    let p = project();
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    // 95 records = 9 full shards + one of 5; 30 more fill that 10th shard and add three:
    // 125 records = 13 shards, of which the first 9 are unchanged.
    let mut data = captions(0..95);
    data.push_str(&captions(95..125));
    p.write("data.jsonl", data);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0);
    assert_eq!(r.status("captions"), "ran");
    assert_eq!(r.status("sampled"), "ran");
    assert_eq!(r.stage("sampled")["shards_total"], 13);
    assert_eq!(r.computed("sampled"), 4, "only the changed 10th shard and the three new ones");
    let cached_shards = r
        .events
        .iter()
        .filter(|e| e["event"] == "shard_done" && e["stage"] == "sampled" && e["cached"] == true)
        .count();
    assert_eq!(cached_shards, 9);

    // The result equals a cold run's.
    let cold = Project::new();
    cold.write("data.jsonl", p.read("data.jsonl")).write("p.toml", PIPELINE);
    assert_eq!(cold.run("p.toml", &[]).code(), 0);
    assert_eq!(cold.read("out.jsonl"), p.read("out.jsonl"));
}

#[test]
fn force_and_stage_limit_what_runs() {
    let p = project();
    let r = p.run("p.toml", &["--stage", "sampled"]);
    assert_eq!(r.code(), 0);
    assert_eq!(r.statuses(), ["captions=ran", "sampled=ran"]);
    assert!(!p.path("out.jsonl").exists());

    let r = p.run("p.toml", &["--force", "sampled"]);
    assert_eq!(r.statuses(), ["captions=cached", "sampled=ran", "keep=ran", "out=ran"]);
    assert_eq!(r.computed("sampled"), 10);
    // Forced, but the same output: nothing after `keep` needed it... `keep` and `out` ran here
    // only because they had never run before.
    let r = p.run("p.toml", &["--force", "sampled"]);
    assert_eq!(r.statuses(), ["captions=cached", "sampled=ran", "keep=cached", "out=cached"]);

    let bad = p.ladle(&["run", "p.toml", "--force", "sampeld"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("did you mean `sampled`?"));
}

#[test]
fn a_deleted_output_file_is_written_again_and_an_edited_input_is_noticed() {
    let p = project();
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let out = p.read("out.jsonl");
    std::fs::remove_file(p.path("out.jsonl")).unwrap();
    let r = p.run("p.toml", &[]);
    assert_eq!(r.statuses(), ["captions=cached", "sampled=cached", "keep=cached", "out=ran"]);
    assert_eq!(p.read("out.jsonl"), out);

    // Same size, different content: the stat memo sees the new mtime and re-hashes.
    let data = String::from_utf8(p.read("data.jsonl")).unwrap().replacen("caption number 3 ", "caption number X ", 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.write("data.jsonl", data);
    let plan = String::from_utf8(p.ladle(&["plan", "p.toml"]).stdout).unwrap();
    assert!(plan.contains("file `path` changed"), "{plan}");
    let r = p.run("p.toml", &[]);
    assert_eq!(r.status("captions"), "ran");
    assert_eq!(r.computed("sampled"), 1);
}
