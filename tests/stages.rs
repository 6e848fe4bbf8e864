//! Each stage's behaviour, end to end, against hand-computed expectations.

mod common;

use common::{Project, captions};
use serde_json::{Value, json};

const HEAD: &str = "[pipeline]\nname = \"stages\"\n\n";

fn run_ok(p: &Project, body: &str) -> common::RunResult {
    p.write("p.toml", format!("{HEAD}{body}"));
    let r = p.run("p.toml", &["-j", "2"]);
    assert_eq!(r.code(), 0, "{}\n{:?}", r.stderr(), r.summary());
    r
}

#[test]
fn select_lowest_highest_and_thresholds_with_ties_by_order() {
    let p = Project::new();
    // ids 0..10 with scores; ties at 2.0 (ids 1, 4, 7).
    let scores = [5.0, 2.0, 9.0, 1.0, 2.0, 8.0, 3.0, 2.0, 7.0, 0.5];
    let data: String = scores.iter().enumerate().map(|(i, s)| format!("{{\"id\":{i},\"score\":{s}}}\n")).collect();
    p.write("d.jsonl", data);
    run_ok(
        &p,
        r#"
[stages.d]
kind = "read"
path = "d.jsonl"
shard_records = 3
[stages.low]
kind = "select"
data = "d"
by = "score"
lowest = 0.3
[stages.high]
kind = "select"
data = "d"
by = "score"
highest = 0.25
[stages.mid]
kind = "select"
data = "d"
by = "score"
min = 2
max = 5
[stages.w1]
kind = "write"
data = "low"
path = "low.jsonl"
[stages.w2]
kind = "write"
data = "high"
path = "high.jsonl"
[stages.w3]
kind = "write"
data = "mid"
path = "mid.jsonl"
"#,
    );
    let ids = |rel: &str| p.jsonl(rel).iter().map(|r| r["id"].as_u64().unwrap()).collect::<Vec<_>>();
    // ⌊0.3·10⌋ = 3 lowest: 0.5 (id 9), 1.0 (id 3), then the first 2.0 (id 1); kept in record order.
    assert_eq!(ids("low.jsonl"), [1, 3, 9]);
    // ⌊0.25·10⌋ = 2 highest: 9.0 (id 2), 8.0 (id 5).
    assert_eq!(ids("high.jsonl"), [2, 5]);
    // 2 ≤ score ≤ 5, inclusive.
    assert_eq!(ids("mid.jsonl"), [0, 1, 4, 6, 7]);
}

#[test]
fn dedup_keeps_the_first_of_each_key_and_concat_keeps_order() {
    let p = Project::new();
    p.write(
        "a.jsonl",
        "{\"id\":1,\"caption\":\"a cat\"}\n{\"id\":2,\"caption\":\"a dog\"}\n{\"id\":3,\"caption\":\"a cat\"}\n",
    );
    p.write("b.jsonl", "{\"id\":4,\"caption\":\"a dog\"}\n{\"id\":5,\"caption\":\"a bird\"}\n");
    run_ok(
        &p,
        r#"
[stages.a]
kind = "read"
path = "a.jsonl"
shard_records = 2
[stages.b]
kind = "read"
path = "b.jsonl"
[stages.both]
kind = "concat"
data = ["b", "a"]
[stages.unique]
kind = "dedup"
data = "both"
on = "{caption}"
[stages.w]
kind = "write"
data = "unique"
path = "u.jsonl"
[stages.w2]
kind = "write"
data = "both"
path = "both.jsonl"
"#,
    );
    let ids = |rel: &str| p.jsonl(rel).iter().map(|r| r["id"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(ids("both.jsonl"), [4, 5, 1, 2, 3]);
    assert_eq!(ids("u.jsonl"), [4, 5, 1]);
}

#[test]
fn sample_is_deterministic_and_depends_on_the_seed() {
    let body = |seed: u32| {
        format!(
            "[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 100\n[stages.s]\nkind = \"sample\"\ndata = \"d\"\nfraction = 0.3\nseed = {seed}\n[stages.w]\nkind = \"write\"\ndata = \"s\"\npath = \"s.jsonl\"\n"
        )
    };
    let a = Project::new();
    a.write("d.jsonl", captions(0..2000));
    run_ok(&a, &body(1));
    let b = Project::new();
    b.write("d.jsonl", captions(0..2000));
    run_ok(&b, &body(1));
    assert_eq!(a.read("s.jsonl"), b.read("s.jsonl"), "same seed, same sample, in another store");
    let n = a.jsonl("s.jsonl").len();
    // Binomial(2000, 0.3): mean 600, sd ≈ 20.5.
    assert!((500..=700).contains(&n), "{n}");
    run_ok(&b, &body(2));
    assert_ne!(a.read("s.jsonl"), b.read("s.jsonl"));
}

#[test]
fn records_are_canonical_so_key_order_and_spacing_do_not_change_digests() {
    let p = Project::new();
    p.write("a.jsonl", "{\"b\": 1, \"a\": {\"y\": 2, \"x\": 1}}\n{\"c\":3}\n");
    p.write("b.jsonl", "{\"a\":{\"x\":1,\"y\":2},\"b\":1}\n\n  {\"c\": 3}  \n");
    let r = run_ok(
        &p,
        "[stages.a]\nkind = \"read\"\npath = \"a.jsonl\"\n[stages.b]\nkind = \"read\"\npath = \"b.jsonl\"\n[stages.w]\nkind = \"write\"\ndata = \"b\"\npath = \"o.jsonl\"\n",
    );
    assert_eq!(r.stage("a")["artifact"], r.stage("b")["artifact"]);
    assert_eq!(String::from_utf8(p.read("o.jsonl")).unwrap(), "{\"a\":{\"x\":1,\"y\":2},\"b\":1}\n{\"c\":3}\n");
}

#[test]
fn llava_conversation_files_are_read_record_for_record() {
    let p = Project::new();
    let convs = json!([
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."}]},
        {"id": "000000052846", "image": "coco/train2017/000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned?\n<image>"},
            {"from": "gpt", "value": "On the bench."}]}
    ]);
    p.write("llava.json", serde_json::to_vec_pretty(&convs).unwrap());
    run_ok(
        &p,
        "[stages.c]\nkind = \"read\"\npath = \"llava.json\"\n[stages.w]\nkind = \"write\"\ndata = \"c\"\npath = \"o.jsonl\"\n",
    );
    assert_eq!(p.jsonl("o.jsonl"), convs.as_array().unwrap().clone());
}

#[test]
fn parquet_round_trips_through_write_and_read() {
    let p = Project::new();
    let records: String = (0..300)
        .map(|i| format!("{{\"id\":{i},\"caption\":\"c {i}\",\"score\":{}.5,\"ok\":{}}}\n", i % 17, i % 2 == 0))
        .collect();
    p.write("d.jsonl", &records);
    run_ok(
        &p,
        "[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 64\n[stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"d.parquet\"\n",
    );
    assert_eq!(&p.read("d.parquet")[..4], b"PAR1");
    run_ok(
        &p,
        "[stages.d]\nkind = \"read\"\npath = \"d.parquet\"\nshard_records = 64\n[stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"back.jsonl\"\n",
    );
    let expected: Vec<Value> = records.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(p.jsonl("back.jsonl"), expected);
}

#[test]
fn exec_fills_a_folder_that_becomes_a_model_and_feeds_the_next_stage() {
    let p = Project::new();
    p.write("d.jsonl", captions(0..10));
    p.write(
        "train.sh",
        "#!/bin/sh\n# Stands in for a trainer: counts its data, writes a model folder.\nset -e\necho \"training on $(wc -l < \"$1\") records\"\necho '{\"model_type\":\"toy\"}' > \"$2/config.json\"\nmkdir -p \"$2/weights\"\nwc -l < \"$1\" > \"$2/weights/n.txt\"\necho 'warning: toy trainer' >&2\n",
    );
    let body = r#"
[stages.d]
kind = "read"
path = "d.jsonl"
[stages.train]
kind = "exec"
inputs = { data = "d" }
command = ["sh", "train.sh", "{in.data}", "{out}"]
deps = ["train.sh"]
[stages.eval]
kind = "exec"
inputs = { model = "train" }
command = ["sh", "-c", "cat \"$0/weights/n.txt\" > \"$1/score.txt\"", "{in.model}", "{out}"]
"#;
    let r = run_ok(&p, body);
    assert_eq!(r.statuses(), ["d=ran", "train=ran", "eval=ran"]);
    let show = String::from_utf8(p.ladle(&["show", "p.toml", "train"]).stdout).unwrap();
    assert!(show.contains("(model)"), "{show}");
    assert!(show.contains("config.json") && show.contains("weights/n.txt"), "{show}");
    assert!(show.contains("| training on 10 records") && show.contains("| warning: toy trainer"), "{show}");
    let out = p.path("exported");
    let export = p.ladle(&["export", "p.toml", "eval", "-o", out.to_str().unwrap()]);
    assert_eq!(export.status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(out.join("score.txt")).unwrap().trim(), "10");

    // Editing the script (a dep) reruns the trainer; `eval` reruns only if the model changed.
    p.write("train.sh", String::from_utf8(p.read("train.sh")).unwrap().replace("# Stands in", "# Still stands in"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.statuses(), ["d=cached", "train=ran", "eval=cached"]);
}

#[test]
fn exec_failures_name_the_cause() {
    let p = Project::new();
    p.write("d.jsonl", captions(0..30));
    p.write("p.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 10\n[stages.bad]\nkind = \"exec\"\ninputs = {{ data = \"d\" }}\ncommand = [\"sh\", \"-c\", \"echo step one; echo 'boom: out of memory' >&2; exit 3\"]\n"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1);
    let e = r.stage("bad")["error"].as_str().unwrap();
    assert!(e.contains("failed (exit status: 3)") && e.contains("| boom: out of memory"), "{e}");

    p.write("p.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 10\n[stages.slow]\nkind = \"exec\"\ninputs = {{ data = \"d\" }}\ncommand = [\"sleep\", \"5\"]\ntimeout = 0.3\n"));
    let r = p.run("p.toml", &[]);
    let e = r.stage("slow")["error"].as_str().unwrap();
    assert!(e.contains("ran past its timeout of 0.3 s"), "{e}");

    // A per-shard filter printing a bad line: the shard and the line are named.
    p.write("p.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 10\n[stages.f]\nkind = \"exec\"\ninputs = {{ data = \"d\" }}\nper_shard = true\ncommand = [\"sh\", \"-c\", \"head -n 2; echo not-json\"]\n"));
    let r = p.run("p.toml", &["-j", "1"]);
    let e = r.stage("f")["error"].as_str().unwrap();
    assert!(e.starts_with("shard 0: line 3 of the command's output: invalid JSON"), "{e}");

    p.write("p.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\n[stages.f]\nkind = \"exec\"\ninputs = {{ data = \"d\" }}\ncommand = [\"no-such-program-ladle\"]\n"));
    let r = p.run("p.toml", &[]);
    let e = r.stage("f")["error"].as_str().unwrap();
    assert!(e.contains("cannot start `no-such-program-ladle`") && e.contains("PATH"), "{e}");
}

#[test]
fn show_export_and_graph() {
    let p = Project::new();
    p.write("d.jsonl", captions(0..50));
    run_ok(
        &p,
        "[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 20\n[stages.k]\nkind = \"select\"\ndata = \"d\"\nby = \"score\"\nlowest = 0.5\n",
    );
    let show = String::from_utf8(p.ladle(&["show", "p.toml", "k", "-n", "1"]).stdout).unwrap();
    assert!(show.contains("records:  25 in 3 shard(s)"), "{show}");
    assert!(show.contains("  score: number"), "{show}");
    let export = p.ladle(&["export", "p.toml", "k", "-o", "k.jsonl"]);
    assert_eq!(export.status.code(), Some(0));
    assert_eq!(p.jsonl("k.jsonl").len(), 25);
    let export = p.ladle(&["export", "p.toml", "k", "-o", "k.parquet"]);
    assert_eq!(export.status.code(), Some(0));
    assert_eq!(&p.read("k.parquet")[..4], b"PAR1");

    p.write("p.toml", format!("{HEAD}[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = 20\n[stages.k]\nkind = \"select\"\ndata = \"d\"\nby = \"score\"\nlowest = 0.4\n"));
    let stale = p.ladle(&["show", "p.toml", "k"]);
    assert_eq!(stale.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("has no output for its current inputs"));

    let dot = String::from_utf8(p.ladle(&["graph", "p.toml"]).stdout).unwrap();
    let mermaid = String::from_utf8(p.ladle(&["graph", "p.toml", "--format", "mermaid"]).stdout).unwrap();
    insta::assert_snapshot!(format!("{dot}\n{mermaid}"));
}
