//! Malformed pipeline files and records: one clear error, a non-zero exit, never a panic.
//! Messages are snapshots (insta): they are part of the interface.

mod common;

use common::{Project, captions};

const HEAD: &str = "[pipeline]\nname = \"bad\"\n\n";

/// `ladle plan` on a pipeline file; returns the error text with the project folder redacted.
fn plan_error(p: &Project, content: &[u8]) -> String {
    p.write("p.toml", content);
    let out = p.ladle(&["plan", "p.toml"]);
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(stderr.matches("error:").count(), 1, "one error, once: {stderr}");
    p.redact(&stderr)
}

fn with_data() -> Project {
    let p = Project::new();
    p.write("data.jsonl", captions(0..5));
    p.write("model/config.json", "{}");
    p
}

fn stages(body: &str) -> Vec<u8> {
    format!("{HEAD}{body}").into_bytes()
}

#[test]
fn malformed_pipeline_files() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", b"".to_vec()),
        ("only whitespace", b"  \n\n\t\n".to_vec()),
        ("binary garbage", vec![0x7f, 0x45, 0x4c, 0x46, 0xff, 0xfe, 0x00, 0x01, 0x80]),
        ("NUL bytes in text", b"[pipeline]\nname = \"x\"\0\n".to_vec()),
        ("TOML syntax error", stages("[stages.a]\nkind = \"read\npath = \"data.jsonl\"\n")),
        ("missing [pipeline]", b"[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n".to_vec()),
        (
            "pipeline name of the wrong type",
            b"[pipeline]\nname = 3\n[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n".to_vec(),
        ),
        ("unknown top-level key", stages("[stage.a]\nkind = \"read\"\n")),
        ("no stages", HEAD.as_bytes().to_vec()),
        ("a stage that is not a table", stages("[stages]\na = 3\n")),
        (
            "duplicate stage names",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n\n[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n",
            ),
        ),
        ("missing kind", stages("[stages.a]\npath = \"data.jsonl\"\n")),
        ("kind of the wrong type", stages("[stages.a]\nkind = [\"read\"]\n")),
        ("unknown kind", stages("[stages.a]\nkind = \"raed\"\npath = \"data.jsonl\"\n")),
        ("unknown parameter", stages("[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\nshard_recods = 10\n")),
        (
            "parameter of the wrong type",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = \"a\"\nby = \"score\"\nlowest = \"0.2\"\n",
            ),
        ),
        (
            "fraction out of range",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = \"a\"\nby = \"score\"\nlowest = 1.5\n",
            ),
        ),
        ("negative shard size", stages("[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\nshard_records = -4\n")),
        (
            "missing required parameter",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = \"a\"\nlowest = 0.2\n",
            ),
        ),
        (
            "two rules at once",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = \"a\"\nby = \"score\"\nlowest = 0.2\nmin = 3\n",
            ),
        ),
        (
            "missing input port",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\nby = \"score\"\nlowest = 0.2\n",
            ),
        ),
        (
            "dangling port",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = \"captoins\"\nby = \"score\"\nlowest = 0.2\n",
            ),
        ),
        (
            "port of the wrong type",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = [\"a\"]\nby = \"score\"\nlowest = 0.2\n",
            ),
        ),
        ("self-loop", stages("[stages.a]\nkind = \"sample\"\ndata = \"a\"\nfraction = 0.5\n")),
        (
            "cycle",
            stages(
                "[stages.a]\nkind = \"sample\"\ndata = \"c\"\nfraction = 0.5\n[stages.b]\nkind = \"sample\"\ndata = \"a\"\nfraction = 0.5\n[stages.c]\nkind = \"sample\"\ndata = \"b\"\nfraction = 0.5\n",
            ),
        ),
        (
            "a model fed where a dataset is read",
            stages(
                "[stages.m]\nkind = \"model\"\npath = \"model\"\n[stages.b]\nkind = \"select\"\ndata = \"m\"\nby = \"score\"\nlowest = 0.2\n",
            ),
        ),
        ("missing data file", stages("[stages.a]\nkind = \"read\"\npath = \"nowhere/data.jsonl\"\n")),
        ("unknown data format", stages("[stages.a]\nkind = \"read\"\npath = \"p.toml\"\n")),
        ("model folder without config.json", stages("[stages.m]\nkind = \"model\"\npath = \".\"\n")),
        (
            "malformed template",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"dedup\"\ndata = \"a\"\non = \"{caption\"\n",
            ),
        ),
        (
            "exec placeholder for a missing port",
            stages(
                "[stages.a]\nkind = \"read\"\npath = \"data.jsonl\"\n[stages.b]\nkind = \"exec\"\ninputs = { data = \"a\" }\ncommand = [\"train\", \"{in.base}\", \"{out}\"]\n",
            ),
        ),
        ("exec with an empty command", stages("[stages.b]\nkind = \"exec\"\ncommand = []\n")),
    ];
    assert!(cases.len() >= 15);
    let mut report = String::new();
    for (name, content) in cases {
        let p = with_data();
        let err = plan_error(&p, &content);
        report.push_str(&format!("### {name}\n{err}\n"));
    }
    insta::assert_snapshot!(report);
}

#[test]
fn the_run_command_reports_pipeline_errors_the_same_way() {
    let p = with_data();
    p.write("p.toml", stages("[stages.a]\nkind = \"raed\"\n"));
    let out = p.ladle(&["run", "p.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    assert!(!p.path(".ladle").exists(), "nothing ran, not even the store was created");
    let missing = p.ladle(&["run", "nope.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    insta::assert_snapshot!("missing pipeline file", p.redact(&String::from_utf8_lossy(&missing.stderr)));
}

/// Runs a one-stage-plus-select pipeline over `file`; returns the failed stage's error.
fn record_error(file: &str, content: &[u8], extra: &str) -> String {
    let p = Project::new();
    p.write(file, content);
    p.write("p.toml", stages(&format!("[stages.a]\nkind = \"read\"\npath = \"{file}\"\n{extra}\n[stages.b]\nkind = \"select\"\ndata = \"a\"\nby = \"score\"\nlowest = 0.5\n")));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1, "a failed stage exits 1: {}", r.stderr());
    let failed: Vec<_> = r.summary()["stages"].as_array().unwrap().iter().filter(|s| s["status"] == "failed").collect();
    assert_eq!(failed.len(), 1);
    p.redact(failed[0]["error"].as_str().unwrap())
}

#[test]
fn malformed_records() {
    let mut report = String::new();
    let mut lines = captions(0..30);
    lines.push_str("{\"id\": 30, \"caption\": \"unterminated\n");
    lines.push_str(&captions(31..40));
    report
        .push_str(&format!("### bad JSON line\n{}\n", record_error("d.jsonl", lines.as_bytes(), "shard_records = 8")));
    report.push_str(&format!(
        "### a line that is not an object\n{}\n",
        record_error("d.jsonl", b"{\"score\": 1}\n[1, 2]\n", "")
    ));
    report.push_str(&format!(
        "### a .json file that is not an array\n{}\n",
        record_error("d.json", b"{\"score\": 1}", "")
    ));
    report.push_str(&format!(
        "### a .json array holding a string\n{}\n",
        record_error("d.json", b"[{\"score\": 1}, \"x\"]", "")
    ));
    report.push_str(&format!(
        "### a record without the selected column\n{}\n",
        record_error("d.jsonl", b"{\"score\": 1}\n{\"caption\": \"x\"}\n", "")
    ));
    report.push_str(&format!(
        "### a column that is not a number\n{}\n",
        record_error("d.jsonl", b"{\"score\": 1}\n{\"score\": \"high\"}\n", "")
    ));
    report.push_str(&format!(
        "### not Parquet at all\n{}\n",
        record_error("d.parquet", b"PAR1 this is not really parquet", "")
    ));
    insta::assert_snapshot!(report);
}

#[test]
fn truncated_parquet() {
    // Make a real Parquet file with ladle, then cut it short.
    let p = Project::new();
    p.write("d.jsonl", captions(0..200));
    p.write("w.toml", stages("[stages.a]\nkind = \"read\"\npath = \"d.jsonl\"\n[stages.w]\nkind = \"write\"\ndata = \"a\"\npath = \"d.parquet\"\n"));
    assert_eq!(p.run("w.toml", &[]).code(), 0);
    let bytes = p.read("d.parquet");
    let err = record_error("d.parquet", &bytes[..bytes.len() * 2 / 3], "");
    assert!(err.contains("d.parquet: not a readable Parquet file"), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn missing_column_can_be_dropped_instead() {
    let p = Project::new();
    p.write("d.jsonl", "{\"score\": 1}\n{\"caption\": \"x\"}\n{\"score\": null}\n{\"score\": 3}\n");
    p.write("p.toml", stages("[stages.a]\nkind = \"read\"\npath = \"d.jsonl\"\n[stages.b]\nkind = \"select\"\ndata = \"a\"\nby = \"score\"\nmin = 2\nmissing = \"drop\"\n[stages.w]\nkind = \"write\"\ndata = \"b\"\npath = \"o.jsonl\"\n"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(String::from_utf8(p.read("o.jsonl")).unwrap(), "{\"score\":3}\n");
}
