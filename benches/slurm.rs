//! The Slurm executor's costs (issue #13), each beside its baseline in the same process:
//!
//! - `receipts`: the driver ingesting 100,000 receipts, as 20M records at 4,096 per shard would
//!   need five times over (re-hash each object, index it and its shard, one flush per batch,
//!   delete the receipts), against committing the same shards the way a local run does
//!   (`put_shard` of an object already indexed). Receipts per second, and the ratio.
//! - `scheduling`: an `exec per_shard` stage of 64 shards that each sleep 1 s, with 2 task slots:
//!   `--executor slurm` on the loopback cluster (2 CPUs; `max_concurrent = 2`) against the local
//!   executor's `-j 2`, wall time and the driver's CPU time. Needs the cluster
//!   (`scripts/slurm/loopback-up.sh`); skipped with a note when none answers.
//!
//! `cargo bench --bench slurm [-- RECEIPTS]` prints one JSON line per measurement.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use ladle_engine::digest::{Digest, ShardKey, StageKey};
use ladle_engine::executor::slurm::{Missing, ingest_receipts};
use ladle_engine::executor::task::{Receipt, StageDir};
use ladle_engine::store::ShardEntry;
use ladle_engine::{ShardRef, Store};

fn receipts(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let stage = StageDir::new(&store, &StageKey(Digest::of(b"bench stage").0));
    stage.create().unwrap();
    // What workers leave: an object file and a receipt per shard (outputs of ~1 KiB here; the
    // driver re-hashes each, so the cost grows with output size: ~1 GB/s per core for BLAKE3).
    let worker = Store::open_objects(&dir.path().join("store"), "bench").unwrap();
    let mut waiting = BTreeMap::new();
    let mut entries = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        let bytes = format!("{{\"shard\":{i},\"pad\":\"{}\"}}\n", "x".repeat(1000));
        let digest = worker.put(bytes.as_bytes()).unwrap();
        let key = ShardKey(Digest::of(format!("shard key {i}").as_bytes()).0);
        let output = ShardRef { digest, records: 1, bytes: bytes.len() as u64 };
        let receipt = Receipt { key, output, dropped_on_error: 0, task: "bench".into(), seconds: 0.0 };
        std::fs::write(stage.receipt(&key), serde_json::to_vec(&receipt).unwrap()).unwrap();
        let input = ShardRef { digest, records: 1, bytes: 0 };
        waiting.insert(key, vec![Missing { index: i, first_record: i as u64, input, key }]);
        entries.push((key, ShardEntry { shard: output, dropped_on_error: 0 }));
    }
    let prepare = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0usize;
    let ingested = ingest_receipts(&store, &stage, &mut waiting, &mut |_, _| done += 1).unwrap();
    let ingest = t.elapsed().as_secs_f64();
    assert_eq!((ingested, done), (n, n));
    assert_eq!(std::fs::read_dir(stage.receipts()).unwrap().count(), 0);
    // Baseline: the same shards committed as a local run commits them (objects already indexed).
    let t = Instant::now();
    for (key, entry) in &entries {
        let key = ShardKey(Digest::of(&key.0).0);
        store.put_shard(&key, entry).unwrap();
    }
    store.flush().unwrap();
    let local = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "receipts",
            "receipts": n,
            "workers_writing_s": prepare,
            "ingest_s": ingest,
            "receipts_per_s": n as f64 / ingest,
            "local_commit_s": local,
            "ingest_over_local_commit": ingest / local,
        })
    );
}

const PIPELINE: &str = r#"
[pipeline]
name = "scheduling"

[stages.items]
kind = "read"
path = "items.jsonl"
shard_records = 1

[stages.sleep]
kind = "exec"
inputs = { data = "items" }
per_shard = true
command = ["sh", "-c", "sleep 1; cat"]
"#;

/// Runs `ladle ARGS` in `dir` under bash's `time`: (wall, user + system CPU) seconds.
fn timed(dir: &std::path::Path, args: &str) -> (f64, f64) {
    let ladle = env!("CARGO_BIN_EXE_ladle");
    let script = format!("TIMEFORMAT='%R %U %S'; time '{ladle}' {args} >/dev/null 2>run.log");
    let out = Command::new("bash").arg("-c").arg(script).current_dir(dir).output().unwrap();
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap_or_default();
    assert!(out.status.success(), "ladle {args} failed: {log}");
    let t: Vec<f64> = String::from_utf8_lossy(&out.stderr).split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (t[0], t[1] + t[2])
}

fn scheduling() {
    if !Command::new("sinfo").arg("-h").output().is_ok_and(|o| o.status.success()) {
        println!(
            "{}",
            serde_json::json!({"bench": "scheduling", "skipped": "no Slurm cluster answers: start scripts/slurm/loopback-up.sh"})
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let items: String = (0..64).map(|i| format!("{{\"id\":{i}}}\n")).collect();
    std::fs::write(dir.path().join("items.jsonl"), items).unwrap();
    std::fs::write(dir.path().join("p.toml"), PIPELINE).unwrap();
    std::fs::write(dir.path().join("cluster.toml"), "[slurm]\nmax_concurrent = 2\npoll_seconds = 1\n").unwrap();
    let (local_wall, local_cpu) = timed(dir.path(), "run p.toml -j 2 --store local");
    let (slurm_wall, slurm_cpu) = timed(dir.path(), "run p.toml --executor slurm --profile cluster.toml --store slurm");
    println!(
        "{}",
        serde_json::json!({
            "bench": "scheduling",
            "shards": 64,
            "local_j2_wall_s": local_wall,
            "local_cpu_s": local_cpu,
            "slurm_wall_s": slurm_wall,
            "slurm_driver_cpu_s": slurm_cpu,
            "slurm_over_local_wall": slurm_wall / local_wall,
            "driver_cpu_share_of_wall": slurm_cpu / slurm_wall,
        })
    );
}

fn main() {
    let n = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    receipts(n);
    scheduling();
}
