//! The store: corrupt objects are found by `verify` and never served; gc keeps what is current.

mod common;

use common::{Project, captions};

const PIPELINE: &str = r#"
[pipeline]
name = "store"

[stages.captions]
kind = "read"
path = "data.jsonl"
shard_records = 1000

[stages.keep]
kind = "select"
data = "captions"
by = "score"
highest = 0.5

[stages.out]
kind = "write"
data = "keep"
path = "out.jsonl"
"#;

/// Files under .ladle/objects (shards over the inline limit).
fn object_files(p: &Project) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(p.path(".ladle/objects")).unwrap().flatten() {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

fn corrupt(path: &std::path::Path) {
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(path, perms).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn verify_reports_a_corrupt_object_and_run_recomputes_it() {
    let p = Project::new();
    p.write("data.jsonl", captions(0..3000)).write("p.toml", PIPELINE);
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let out = p.read("out.jsonl");
    let files = object_files(&p);
    assert!(files.len() >= 3, "expected shard files, found {files:?}");
    corrupt(&files[0]);
    let name = format!(
        "{}{}",
        files[0].parent().unwrap().file_name().unwrap().to_string_lossy(),
        files[0].file_name().unwrap().to_string_lossy()
    );

    let v = p.ladle(&["verify", "p.toml"]);
    assert_eq!(v.status.code(), Some(1));
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(text.contains(&format!("corrupt: {name}")), "{text}");
    assert!(p.path(&format!(".ladle/quarantine/{name}")).exists());

    // The next run recomputes what used the object instead of serving it.
    std::fs::remove_file(p.path("out.jsonl")).unwrap();
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.statuses().iter().any(|s| s.ends_with("=ran")));
    assert_eq!(p.read("out.jsonl"), out);
    let v = p.ladle(&["verify", "p.toml"]);
    assert_eq!(v.status.code(), Some(0), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn a_reader_that_meets_a_corrupt_object_fails_cleanly_and_a_rerun_recovers() {
    let p = Project::new();
    p.write("data.jsonl", captions(0..3000)).write("p.toml", PIPELINE);
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let out = p.read("out.jsonl");
    for f in object_files(&p) {
        corrupt(&f);
    }
    // `--force keep` makes `select` read every shard of `captions` (files; its own are inline).
    let r = p.run("p.toml", &["--force", "keep"]);
    assert_eq!(r.code(), 1);
    let error = r.stage("keep")["error"].as_str().unwrap().to_string();
    assert!(error.contains("is corrupt") && error.contains("quarantined"), "{error}");
    assert_eq!(r.status("out"), "skipped");
    assert_eq!(p.read("out.jsonl"), out, "the old output was not touched");
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(p.read("out.jsonl"), out);
}

#[test]
fn gc_keeps_current_outputs_and_removes_the_rest() {
    let p = Project::new();
    p.write("data.jsonl", captions(0..3000)).write("p.toml", PIPELINE);
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    p.write("p.toml", PIPELINE.replace("highest = 0.5", "highest = 0.25"));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let gc = p.ladle(&["gc", "p.toml", "--keep-runs", "0"]);
    assert_eq!(gc.status.code(), Some(0));
    // The first run's `keep` and `out` outputs are no one's latest: 2 artifacts; `keep` had one
    // shard per input shard, 3 objects. `captions` is shared and stays.
    let text = String::from_utf8_lossy(&gc.stdout);
    assert!(text.contains("removed 2 artifact(s), 0 compiled plugin(s) and 3 object(s)"), "{text}");
    // The current pipeline is still fully cached.
    let r = p.run("p.toml", &[]);
    assert!(r.statuses().iter().all(|s| s.ends_with("=cached")), "{:?}", r.statuses());
    assert_eq!(p.ladle(&["verify", "p.toml"]).status.code(), Some(0));
}
