//! `--executor slurm` against a real Slurm cluster: the one-node loopback cluster that the
//! README's test command (`scripts/test.sh`) starts with `scripts/slurm/loopback-up.sh`.
//!
//! These tests fail, with what to do, when no cluster answers; `LADLE_SKIP_SLURM=1` skips them on
//! purpose. They share the cluster's two CPUs, so they take turns.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Project, points_tiny};
use serde_json::Value;

static CLUSTER: Mutex<()> = Mutex::new(());

/// Takes the cluster for one test, or returns `None` when the developer skips these tests.
fn cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var("LADLE_SKIP_SLURM").is_ok_and(|v| v == "1") {
        eprintln!("LADLE_SKIP_SLURM=1: skipping a Slurm test");
        return None;
    }
    let sinfo = std::process::Command::new("sinfo").args(["-h", "-o", "%T"]).output();
    match sinfo {
        Ok(o) if o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty() => {}
        other => panic!(
            "no Slurm cluster answers (sinfo: {:?}).\n  Start the loopback cluster with `scripts/slurm/loopback-up.sh` \
             (as root; the README's test command `scripts/test.sh` does it), or set LADLE_SKIP_SLURM=1 to skip \
             the Slurm tests on purpose.",
            other.map(|o| String::from_utf8_lossy(&o.stderr).to_string())
        ),
    }
    Some(CLUSTER.lock().unwrap_or_else(|p| p.into_inner()))
}

const PROFILE: &str = "[slurm]\npoll_seconds = 0.2\nmax_concurrent = 2\nretries = 1\n";

/// A per-shard filter: drops captions with "7" in their id; sleeps `LADLE_TEST_SLEEP` seconds per
/// shard; fails on the shard holding `id == 13` while the file `fail-13` exists.
const FILTER: &str = r#"
import json, os, sys, time
records = [json.loads(l) for l in sys.stdin if l.strip()]
if os.path.exists("fail-13") and any(r["id"] == 13 for r in records):
    print("boom-marker: refusing record 13", file=sys.stderr)
    sys.exit(3)
time.sleep(float(sys.argv[1]))
for r in records:
    if "7" not in str(r["id"]):
        r["kept_by"] = "filter"
        print(json.dumps(r))
"#;

fn project(stage: &str, sleep: f64, shard_records: usize, extra: &str) -> Project {
    let p = Project::new();
    p.write("data/captions.jsonl", common::captions(0..48));
    p.write("filter.py", FILTER);
    p.write("cluster.toml", PROFILE);
    p.write(
        "p.toml",
        format!(
            r#"[pipeline]
name = "slurm"

[stages.captions]
kind = "read"
path = "data/captions.jsonl"
shard_records = {shard_records}

[stages.{stage}]
kind = "exec"
inputs = {{ data = "captions" }}
per_shard = true
command = ["python3", "filter.py", "{sleep}"]
deps = ["filter.py"]

[stages.keep]
kind = "select"
data = "{stage}"
by = "score"
lowest = 0.5

[stages.out]
kind = "write"
data = "keep"
path = "out.jsonl"
{extra}"#
        ),
    );
    p
}

fn slurm_args() -> Vec<&'static str> {
    vec!["--executor", "slurm", "--profile", "cluster.toml"]
}

fn events_named<'a>(r: &'a common::RunResult, name: &str) -> Vec<&'a Value> {
    r.events.iter().filter(|e| e["event"] == name).collect()
}

/// The same project run with the local executor, in a store of its own: its output file.
fn local_output(p: &Project, file: &str) -> Vec<u8> {
    let store = p.path("local-store");
    let before = std::fs::read(p.path(file)).ok();
    let r = p.run("p.toml", &["--store", store.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let local = p.read(file);
    if let Some(b) = before {
        std::fs::write(p.path(file), b).unwrap();
    }
    local
}

/// Lines `shard N:` the workers logged, per shard index (how often each shard was computed).
fn shards_computed_by_workers(p: &Project) -> std::collections::BTreeMap<usize, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for stage_dir in std::fs::read_dir(p.path(".ladle/slurm")).unwrap() {
        let logs = stage_dir.unwrap().path().join("logs");
        for log in std::fs::read_dir(logs).into_iter().flatten() {
            let text = std::fs::read_to_string(log.unwrap().path()).unwrap();
            for line in text.lines() {
                if let Some(n) = line.strip_prefix("shard ").and_then(|l| l.split(':').next())
                    && let Ok(n) = n.parse::<usize>()
                {
                    *counts.entry(n).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

/// Array tasks of jobs named `ladle-STAGE` and their states.
fn tasks_of(stage: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "-o", "%i|%T|%j"])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            let (id, state, name) = (f.next()?, f.next()?, f.next()?);
            (name == format!("ladle-{stage}")).then(|| (id.to_string(), state.to_string()))
        })
        .collect()
}

/// A driver started in the background, its JSON events read as they come.
struct Background {
    child: Child,
    events: std::sync::mpsc::Receiver<Value>,
}

impl Background {
    fn start(p: &Project, args: &[&str]) -> Background {
        let mut all = vec!["run", "p.toml", "--json"];
        all.extend_from_slice(args);
        let mut child = p.command(&all).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start ladle");
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Background { child, events }
    }

    /// Waits for an event for which `f` holds.
    fn wait_for(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(e) = self.events.recv_timeout(Duration::from_millis(200))
                && f(&e)
            {
                return e;
            }
        }
        panic!("no {what} within 120 s");
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 120 s");
}

#[test]
fn a_slurm_run_equals_a_local_run_byte_for_byte_and_a_rerun_submits_nothing() {
    let Some(_cluster) = cluster() else { return };
    // read → exec per_shard → perplexity (tiny LLaVA, images) → select → write.
    let p = Project::new();
    p.write("data/captions.jsonl", std::fs::read(points_tiny().join("captions.jsonl")).unwrap());
    for entry in std::fs::read_dir(points_tiny().join("images")).unwrap() {
        let entry = entry.unwrap();
        p.write(&format!("data/images/{}", entry.file_name().to_string_lossy()), std::fs::read(entry.path()).unwrap());
    }
    p.write("cluster.toml", PROFILE);
    p.write("tag.py", "import json, sys\nfor l in sys.stdin:\n    r = json.loads(l)\n    r['words'] = len(r['caption'].split())\n    print(json.dumps(r))\n");
    let prompt = common::expected()["prompt"].as_str().unwrap().to_string();
    p.write(
        "p.toml",
        format!(
            r#"[pipeline]
name = "vlm-on-slurm"

[stages.captions]
kind = "read"
path = "data/captions.jsonl"
shard_records = 8

[stages.tagged]
kind = "exec"
inputs = {{ data = "captions" }}
per_shard = true
command = ["python3", "tag.py"]
deps = ["tag.py"]

[stages.scorer]
kind = "model"
path = "{}"

[stages.ppl]
kind = "perplexity"
data = "tagged"
model = "scorer"
text = "{{caption}}"
prompt = "{prompt}"
image = "{{image}}"
resources = {{ cpus = 1, mem = "900M", time = "10:00" }}

[stages.keep]
kind = "select"
data = "ppl"
by = "ppl"
lowest = 0.5

[stages.out]
kind = "write"
data = "keep"
path = "out.jsonl"
"#,
            points_tiny().join("tiny-llava").display()
        ),
    );
    let r = p.run("p.toml", &slurm_args());
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let submitted = events_named(&r, "job_submitted");
    let stages: Vec<&str> = submitted.iter().map(|e| e["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["tagged", "ppl"], "the map stages go to Slurm, the others run in the driver");
    let shards = r.stage("ppl")["shards_total"].as_u64().unwrap();
    assert!(shards >= 3, "several shards: {shards}");
    assert_eq!(r.computed("ppl"), shards);
    assert_eq!(r.stage("ppl")["jobs"].as_array().map(Vec::len), Some(1), "{}", r.summary());
    // The resources hints reach sbatch and leave the key alone.
    let script = std::fs::read_dir(p.path(".ladle/slurm"))
        .unwrap()
        .filter_map(|d| std::fs::read_to_string(d.unwrap().path().join("submit-0.sh")).ok())
        .find(|s| s.contains("ladle-ppl"))
        .expect("the ppl stage's batch script");
    assert!(script.contains("#SBATCH --mem=900M") && script.contains("#SBATCH --time=10:00"), "{script}");
    let slurm_out = p.read("out.jsonl");
    assert!(!slurm_out.is_empty());

    // Nothing changed: nothing is computed and nothing submitted.
    let again = p.run("p.toml", &slurm_args());
    assert_eq!(again.code(), 0, "{}", again.stderr());
    assert!(events_named(&again, "job_submitted").is_empty(), "{:?}", again.events);
    assert!(again.statuses().iter().all(|s| s.ends_with("=cached")), "{:?}", again.statuses());

    // The local executor gives the same bytes, and every shard was computed once on the cluster.
    assert_eq!(local_output(&p, "out.jsonl"), slurm_out);
    assert!(shards_computed_by_workers(&p).values().all(|&n| n == 2), "each index once per map stage");
    // The receipts were ingested and removed; `ladle runs` names the jobs.
    let runs = p.ladle(&["runs", "p.toml"]);
    assert!(String::from_utf8_lossy(&runs.stdout).contains("ppl: Slurm job(s)"));
    let show = p.ladle(&["show", "p.toml", "ppl"]);
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(show.contains("slurm:    2 task log(s)") && show.contains("done: "), "{show}");
}

#[test]
fn a_cancelled_array_task_is_retried_and_the_output_is_unchanged() {
    let Some(_cluster) = cluster() else { return };
    let stage = "cancelme";
    let p = project(stage, 1.0, 6, "");
    p.write("cluster.toml", format!("{PROFILE}shards_per_task = 2\n"));
    let driver = Background::start(&p, &slurm_args());
    driver.wait_for("a submission", |e| e["event"] == "job_submitted");
    wait_until("a running task", || tasks_of(stage).iter().any(|(_, s)| s == "RUNNING"));
    let victim = tasks_of(stage).into_iter().find(|(_, s)| s == "RUNNING").unwrap().0;
    let cancelled = std::process::Command::new("scancel").arg(&victim).status().unwrap();
    assert!(cancelled.success());
    let retry = driver.wait_for("a resubmission", |e| e["event"] == "job_submitted");
    assert!(retry["shards"].as_u64().unwrap() >= 1, "{retry}");
    let status = driver.child.wait_with_output().unwrap().status;
    assert!(status.success(), "the run succeeds after the retry");
    assert_eq!(p.read("out.jsonl"), local_output(&p, "out.jsonl"));
}

#[test]
fn a_driver_killed_mid_run_adopts_its_running_tasks_and_computes_nothing_twice() {
    let Some(_cluster) = cluster() else { return };
    let stage = "adoptme";
    // 8 shards, 4 per task, 2 tasks: 1.5 s a shard, so both run for 6 s.
    let p = project(stage, 1.5, 6, "");
    let mut driver = Background::start(&p, &slurm_args());
    driver.wait_for("a finished shard", |e| e["event"] == "shard_done" && e["stage"] == stage && e["cached"] == false);
    driver.child.kill().unwrap(); // SIGKILL: nothing cancels the jobs
    driver.child.wait().unwrap();
    assert!(tasks_of(stage).iter().any(|(_, s)| s == "RUNNING"), "tasks outlive the driver");

    let r = p.run("p.toml", &slurm_args());
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let adopted = events_named(&r, "job_adopted");
    assert_eq!(adopted.len(), 1, "the running tasks are adopted: {:?}", r.events);
    assert!(events_named(&r, "job_submitted").is_empty(), "nothing is submitted again: {:?}", r.events);
    let computed = shards_computed_by_workers(&p);
    assert_eq!(computed.len(), 8);
    assert!(computed.values().all(|&n| n == 1), "no shard computed twice: {computed:?}");
    assert_eq!(p.read("out.jsonl"), local_output(&p, "out.jsonl"));
}

#[test]
fn a_task_that_always_fails_fails_its_stage_with_job_node_and_log_and_keeps_the_rest() {
    let Some(_cluster) = cluster() else { return };
    let stage = "failme";
    // An independent branch that succeeds.
    let other = r#"
[stages.other]
kind = "exec"
inputs = { data = "captions" }
per_shard = true
command = ["python3", "-c", "import sys; sys.stdout.write(sys.stdin.read())"]

[stages.other_out]
kind = "write"
data = "other"
path = "other.jsonl"
"#;
    let p = project(stage, 0.0, 6, other);
    p.write("cluster.toml", format!("{PROFILE}shards_per_task = 1\n"));
    p.write("fail-13", "");
    let r = p.run("p.toml", &slurm_args());
    assert_eq!(r.code(), 1, "{}", r.stderr());
    assert_eq!(r.status(stage), "failed");
    let error = r.stage(stage)["error"].as_str().unwrap().to_string();
    // Shard 2 (records 12..18) holds id 13: one attempt and one retry, then the stage fails.
    assert!(error.contains("shard 2 failed 2 time(s) on Slurm"), "{error}");
    assert!(error.contains("ended FAILED") && error.contains("boom-marker"), "{error}");
    let node = String::from_utf8_lossy(&std::process::Command::new("hostname").arg("-s").output().unwrap().stdout)
        .trim()
        .to_string();
    assert!(error.contains(&format!(" on {node}")), "names the node: {error}");
    assert_eq!(r.status("other_out"), "ran", "independent branches finish");
    assert_eq!(r.status("out"), "skipped");

    // The shards that succeeded were committed: once the cause is gone, only shard 2 runs.
    std::fs::remove_file(p.path("fail-13")).unwrap();
    let again = p.run("p.toml", &slurm_args());
    assert_eq!(again.code(), 0, "{}", again.stderr());
    assert_eq!(again.computed(stage), 1);
    assert_eq!(p.read("out.jsonl"), local_output(&p, "out.jsonl"));
}

#[test]
fn ctrl_c_cancels_the_submitted_jobs_unless_detached_and_a_rerun_adopts_detached_ones() {
    let Some(_cluster) = cluster() else { return };
    let interrupt = |driver: Background| {
        let pid = driver.child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        driver.child.wait_with_output().unwrap().status
    };

    let stage = "interruptme";
    let p = project(stage, 2.0, 6, "");
    let driver = Background::start(&p, &slurm_args());
    driver.wait_for("a submission", |e| e["event"] == "job_submitted");
    wait_until("a running task", || tasks_of(stage).iter().any(|(_, s)| s == "RUNNING"));
    let status = interrupt(driver);
    assert_eq!(status.code(), Some(1), "the interrupted stage fails the run");
    wait_until("the tasks cancelled", || tasks_of(stage).iter().all(|(_, s)| s == "CANCELLED"));

    let stage = "detachme";
    let p = project(stage, 2.0, 6, "");
    let mut args = slurm_args();
    args.push("--detach");
    let driver = Background::start(&p, &args);
    driver.wait_for("a submission", |e| e["event"] == "job_submitted");
    // SIGINT's default action ends a detached driver at once; its jobs run on.
    let _ = interrupt(driver);
    assert!(tasks_of(stage).iter().all(|(_, s)| s == "RUNNING" || s == "PENDING"), "{:?}", tasks_of(stage));
    let r = p.run("p.toml", &slurm_args());
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(events_named(&r, "job_adopted").len(), 1, "{:?}", r.events);
    assert!(events_named(&r, "job_submitted").is_empty());
}

#[test]
fn a_whole_stage_with_resources_runs_as_one_job_and_what_it_cached_reaches_the_index() {
    let Some(_cluster) = cluster() else { return };
    // POINTS' greedy soup of the four tiny fine-tunes, its built-in metric computed in a job.
    let soup = points_tiny().join("soup");
    let p = Project::new();
    p.write("cluster.toml", PROFILE);
    let mut text = String::from("[pipeline]\nname = \"soup-on-slurm\"\n\n");
    for i in 0..4 {
        text += &format!("[stages.m{i}]\nkind = \"model\"\npath = \"{}\"\n\n", soup.join(format!("ft{i}")).display());
    }
    text += &format!(
        "[stages.heldout]\nkind = \"read\"\npath = \"{}\"\n\n[stages.soup]\nkind = \"soup\"\n\
         models = [\"m0\", \"m1\", \"m2\", \"m3\"]\nmethod = \"greedy\"\neval = \"heldout\"\ntext = \"{{caption}}\"\n\
         resources = {{ cpus = 1, mem = \"900M\" }}\n",
        soup.join("heldout.jsonl").display()
    );
    p.write("p.toml", text);
    let r = p.run("p.toml", &slurm_args());
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let submitted = events_named(&r, "job_submitted");
    assert_eq!(submitted.len(), 1, "only the soup, which asked for resources, is a job: {submitted:?}");
    assert_eq!(submitted[0]["stage"], "soup");
    assert_eq!(r.stage("soup")["work_unit"], "candidate score(s)");
    assert_eq!(r.stage("soup")["shards_computed"], 7, "{}", r.summary());
    assert!(p.ladle(&["export", "p.toml", "soup", "-o", "on-slurm"]).status.success());

    // The same soup as a local run makes, byte for byte.
    let store = p.path("local-store");
    let local = p.run("p.toml", &["--store", store.to_str().unwrap()]);
    assert_eq!(local.code(), 0, "{}", local.stderr());
    assert!(p.ladle(&["export", "p.toml", "soup", "-o", "local", "--store", store.to_str().unwrap()]).status.success());
    for f in ["model.safetensors", "soup.json", "config.json"] {
        assert_eq!(p.read(&format!("on-slurm/{f}")), p.read(&format!("local/{f}")), "{f}");
    }
    // The candidates' scores the job computed were indexed from its receipt: recomputing the
    // soup here evaluates none of them again.
    let forced = p.run("p.toml", &["--force", "soup"]);
    assert_eq!(forced.code(), 0, "{}", forced.stderr());
    assert_eq!(forced.stage("soup")["shards_computed"], 0, "{}", forced.summary());
    assert_eq!(forced.stage("soup")["shards_total"], 7);
}
