//! `gpus = N` on an `exec` stage: N of the machine's GPUs (here `LADLE_GPUS`, as a test cannot
//! have real ones) held while the command runs and given in `CUDA_VISIBLE_DEVICES`, so two
//! trainings never share one.

use crate::common::Project;
use serde_json::Value;

/// Logs its stage, start, end and CUDA_VISIBLE_DEVICES to gpu-log.jsonl after a short sleep.
const TRAIN: &str = r#"import json, os, sys, time
start = time.time()
time.sleep(0.5)
line = {"stage": sys.argv[1], "start": start, "end": time.time(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
with open("gpu-log.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
open(os.path.join(sys.argv[2], "done"), "w").write(sys.argv[1])
"#;

fn project(gpus: u32, stages: &[&str]) -> Project {
    let mut text = String::from("[pipeline]\nname = \"gpus\"\n");
    for s in stages {
        text.push_str(&format!(
            "\n[stages.{s}]\nkind = \"exec\"\ngpus = {gpus}\ncommand = [\"python3\", \"train.py\", \"{s}\", \"{{out}}\"]\n"
        ));
    }
    let p = Project::new();
    p.write("train.py", TRAIN).write("p.toml", text);
    p
}

fn run(p: &Project, gpus: &str) -> (std::process::Output, Vec<Value>) {
    let out = p.command(&["run", "p.toml", "-j", "4"]).env("LADLE_GPUS", gpus).output().unwrap();
    let log = std::fs::read_to_string(p.path("gpu-log.jsonl")).unwrap_or_default();
    (out, log.lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

fn overlap(a: &Value, b: &Value) -> bool {
    a["start"].as_f64().unwrap() < b["end"].as_f64().unwrap()
        && b["start"].as_f64().unwrap() < a["end"].as_f64().unwrap()
}

#[test]
fn stages_holding_gpus_never_share_one() {
    // Two stages wanting both GPUs of two: one after the other, each given both.
    let p = project(2, &["a", "b"]);
    let (out, log) = run(&p, "2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(log.len(), 2);
    assert!(!overlap(&log[0], &log[1]), "{log:?}");
    assert!(log.iter().all(|l| l["gpus"] == "0,1"), "{log:?}");

    // Three wanting one GPU of two (ids as CUDA_VISIBLE_DEVICES numbers them): never more than
    // two at once, and two at once hold different GPUs.
    let p = project(1, &["a", "b", "c"]);
    let (out, log) = run(&p, "4,7");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(log.len(), 3);
    for (i, a) in log.iter().enumerate() {
        assert!(a["gpus"] == "4" || a["gpus"] == "7", "{log:?}");
        for b in &log[i + 1..] {
            if overlap(a, b) {
                assert_ne!(a["gpus"], b["gpus"], "two stages shared a GPU: {log:?}");
            }
        }
    }
    assert!(!(overlap(&log[0], &log[1]) && overlap(&log[1], &log[2]) && overlap(&log[0], &log[2])), "{log:?}");

    // More than the machine has: one clear error, before the command runs.
    let p = project(3, &["a"]);
    let (out, log) = run(&p, "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("asks for 3 GPU(s), and this machine has 2"), "{stderr}");
    assert!(stderr.contains("LADLE_GPUS"), "{stderr}");
    assert!(log.is_empty());
}
