//! WASM filter plugins: the examples against their logic written natively here, the sandbox
//! against hostile plugins, caching by the .wasm's digest, and `ladle plugin new`/`check`.

mod common;

use std::time::{Duration, Instant};

use common::{Project, python_plugin, wasm_dir};
use serde_json::{Value, json};

fn example(name: &str) -> String {
    wasm_dir("plugins/examples").join(format!("{name}.wasm")).display().to_string()
}

fn hostile() -> String {
    wasm_dir("tests/plugins").join("hostile.wasm").display().to_string()
}

/// read (shards of `shard`) → plugin(wasm, extra) → write o.jsonl
fn pipeline(wasm: &str, extra: &str, shard: usize) -> String {
    format!(
        "[pipeline]\nname = \"plugins\"\n\n[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\nshard_records = {shard}\n\n[stages.f]\nkind = \"plugin\"\ndata = \"d\"\nwasm = \"{wasm}\"\n{extra}\n\n[stages.w]\nkind = \"write\"\ndata = \"f\"\npath = \"o.jsonl\"\n"
    )
}

fn captions() -> Vec<Value> {
    [
        "a dog on a red mat",
        "two cats",
        "  a   bird   on a wire  ",
        "<p>A <b>yellow</b> taxi</p> in the rain",
        "Tom &amp; Jerry &lt;3 on TV",
        "see https://example.com/img.jpg for the full photo",
        "www.shop.example sells this blue mug",
        "<a href=\"http://x.y\">link</a>",
        "https://only.a.url",
        "SN-4471-AX v2.3.1 REV B",
        "Firmware v1.2.3-rc4 build 20240101 X200T",
        "a photo from 1990 of 3 children",
        "part no. 88-1234/B fits model X5",
        "v2.0 v3.1 v4.2 release notes",
        "",
        "a < b and c > d",
    ]
    .iter()
    .enumerate()
    .map(|(i, c)| json!({"id": i, "caption": c}))
    .collect()
}

fn write_records(p: &Project, records: &[Value]) {
    p.write("d.jsonl", records.iter().map(|r| format!("{r}\n")).collect::<String>());
}

// ---- the examples' logic, written natively (from their module docs) ----------------------

fn native_min_words(caption: &str, min: usize) -> bool {
    caption.split_whitespace().count() >= min
}

fn native_clean(caption: &str) -> String {
    let mut text = String::new();
    let mut rest = caption;
    while let Some(i) = rest.find('<') {
        let after = &rest[i + 1..];
        let tag_like = after.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match (tag_like, after.find('>')) {
            (true, Some(j)) => {
                text.push_str(&rest[..i]);
                text.push(' ');
                rest = &after[j + 1..];
            }
            _ => {
                text.push_str(&rest[..=i]);
                rest = after;
            }
        }
    }
    text.push_str(rest);
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    text.split_whitespace()
        .filter(|t| {
            let t = t.to_ascii_lowercase();
            !(t.starts_with("http://") || t.starts_with("https://") || t.starts_with("www."))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn native_obscure_keeps(caption: &str, max_fraction: f64) -> bool {
    let tokens: Vec<&str> = caption.split_whitespace().collect();
    if tokens.is_empty() {
        return true;
    }
    let obscure = tokens
        .iter()
        .filter(|t| {
            let t = t.trim_matches(|c: char| ",;:()[]{}\"'!?".contains(c));
            t.chars().any(|c| c.is_ascii_digit()) && t.chars().any(|c| c.is_alphabetic() || "-._/#:".contains(c))
        })
        .count();
    obscure as f64 / tokens.len() as f64 <= max_fraction
}

#[test]
fn examples_give_the_same_verdicts_as_their_logic_written_natively() {
    let records = captions();
    let p = Project::new();
    write_records(&p, &records);

    p.write("p.toml", pipeline(&example("min_words"), "config = { min_words = 4 }", 5));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let expected: Vec<Value> =
        records.iter().filter(|r| native_min_words(r["caption"].as_str().unwrap(), 4)).cloned().collect();
    assert_eq!(p.jsonl("o.jsonl"), expected);

    p.write("p.toml", pipeline(&example("caption_clean"), "", 5));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let expected: Vec<Value> = records
        .iter()
        .filter_map(|r| {
            let cleaned = native_clean(r["caption"].as_str().unwrap());
            (!cleaned.is_empty()).then(|| json!({"id": r["id"], "caption": cleaned}))
        })
        .collect();
    assert_eq!(p.jsonl("o.jsonl"), expected);
    // Spot checks of the rule itself, by hand.
    let by_id = |id: u64| p.jsonl("o.jsonl").into_iter().find(|r| r["id"] == id).map(|r| r["caption"].clone());
    assert_eq!(by_id(3), Some(json!("A yellow taxi in the rain")));
    assert_eq!(by_id(4), Some(json!("Tom & Jerry <3 on TV")));
    assert_eq!(by_id(5), Some(json!("see for the full photo")));
    assert_eq!(by_id(8), None, "a caption that was only a URL is dropped");

    p.write("p.toml", pipeline(&example("obscure_tokens"), "config = { max_fraction = 0.4 }", 5));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let expected: Vec<Value> =
        records.iter().filter(|r| native_obscure_keeps(r["caption"].as_str().unwrap(), 0.4)).cloned().collect();
    let got = p.jsonl("o.jsonl");
    assert_eq!(got, expected);
    let kept: Vec<u64> = got.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    // By hand: 9 has 2 obscure tokens of 4 (0.5), 13 has 3 of 5 (0.6): dropped. 10 has 2 of 5,
    // exactly 0.4, which is not *more* than 0.4: kept. 11's plain numbers are not obscure.
    for dropped in [9, 13] {
        assert!(!kept.contains(&dropped), "caption {dropped} is mostly codes and versions");
    }
    for k in [10, 11, 12] {
        assert!(kept.contains(&k), "caption {k} is kept");
    }
}

fn run_failing(p: &Project, extra: &str) -> (String, Duration) {
    p.write("p.toml", pipeline(&hostile(), extra, 3));
    let t = Instant::now();
    let r = p.run("p.toml", &["-j", "1"]);
    let elapsed = t.elapsed();
    assert_eq!(r.code(), 1, "{}", r.stderr());
    (p.redact(r.stage("f")["error"].as_str().unwrap()), elapsed)
}

fn records(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"id": i, "caption": format!("caption {i}")})).collect()
}

#[test]
fn an_infinite_loop_is_stopped_by_the_deadline() {
    let p = Project::new();
    write_records(&p, &records(6));
    let (error, elapsed) = run_failing(&p, "config = { mode = \"loop\" }\nlimits = { batch_timeout_ms = 300 }");
    assert!(error.contains("ran past its deadline of 300 ms"), "{error}");
    assert!(error.contains("plugin `hostile`") && error.contains("records 0..=2"), "{error}");
    // The deadline is 0.3 s; starting ladle and compiling the plugin (seconds in debug builds, more
    // on a loaded machine) is measured by a run that fails at its first call.
    let baseline = failing_at_once(&p);
    assert!(elapsed < baseline + Duration::from_millis(300 + 2000), "{elapsed:?} (failing at once: {baseline:?})");
}

/// How long a run takes that fails at the plugin's first call (the same plugin, compiled anew).
fn failing_at_once(p: &Project) -> Duration {
    let (error, elapsed) = run_failing(p, "config = { mode = \"short\" }");
    assert!(error.contains("verdicts for 3 records"), "{error}");
    elapsed
}

#[test]
fn the_deadline_stops_a_call_within_a_second_of_it() {
    use ladle_plugins::host::{CallError, Limits, Plugin};
    let limits = Limits { batch_timeout: Duration::from_millis(400), ..Limits::default() };
    let plugin = Plugin::load(std::path::Path::new(&hostile()), limits).unwrap();
    let mut instance = plugin.instantiate(r#"{"mode": "loop"}"#).unwrap();
    let t = Instant::now();
    let result = instance.filter(&["{\"id\": 1}".to_string()], b"batch");
    let elapsed = t.elapsed();
    assert_eq!(result.unwrap_err(), CallError::Timeout(400));
    assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(1400), "{elapsed:?}");
}

#[test]
fn a_memory_bomb_is_stopped_at_the_cap() {
    let p = Project::new();
    write_records(&p, &records(3));
    let (error, _) = run_failing(&p, "config = { mode = \"memory\" }\nlimits = { memory_mb = 32 }");
    assert!(error.contains("hit its memory limit of 32 MiB"), "{error}");
}

#[test]
fn fuel_limits_work() {
    let p = Project::new();
    write_records(&p, &records(3));
    let (error, _) = run_failing(&p, "config = { mode = \"loop\" }\nlimits = { fuel = 100000 }");
    assert!(error.contains("ran out of fuel (100000 units per call)"), "{error}");
}

#[test]
fn the_sandbox_gives_no_files_environment_network_or_clock() {
    let p = Project::new();
    write_records(&p, &records(2));
    p.write("p.toml", pipeline(&hostile(), "config = { mode = \"probe\" }", 3));
    let r = p.command(&["run", "p.toml", "--json"]).env("LADLE_SECRET", "hunter2").output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let seen = p.jsonl("o.jsonl");
    assert_eq!(seen.len(), 2);
    let s = &seen[0];
    assert!(s["file"].as_str().unwrap().starts_with("error"), "{s}");
    assert_eq!(s["env"], json!([]), "no environment variables reach the plugin");
    assert_eq!(s["now"], 0, "the clock is frozen");
    assert!(s["tcp"].as_str().unwrap().starts_with("error"), "{s}");
    assert_eq!(seen[0], seen[1], "deterministic");
}

#[test]
fn a_panic_names_the_record_and_committed_shards_stay() {
    let p = Project::new();
    write_records(&p, &records(12));
    let (error, _) = run_failing(&p, "config = { mode = \"panic\", at = 7 }");
    assert!(error.starts_with("shard 2: plugin `hostile`"), "{error}");
    assert!(error.contains("records 6..=8"), "{error}");
    assert!(error.contains("boom at record id 7"), "the guest's panic message is shown: {error}");
    // Shards 0 and 1 were committed before the failure: a rerun serves them from the cache.
    let r = p.run("p.toml", &["-j", "1"]);
    let cached =
        r.events.iter().filter(|e| e["event"] == "shard_done" && e["stage"] == "f" && e["cached"] == true).count();
    assert_eq!(cached, 2);
}

#[test]
fn contract_breaches_and_errors_fail_clearly_or_drop_and_count() {
    let p = Project::new();
    write_records(&p, &records(3));
    let (error, _) = run_failing(&p, "config = { mode = \"short\" }");
    assert!(error.contains("returned 2 verdicts for 3 records"), "{error}");

    let mut recs = records(9);
    recs[4]["bad"] = json!(true);
    write_records(&p, &recs);
    let (error, _) = run_failing(&p, "config = { mode = \"err\" }");
    assert!(error.contains("cannot handle record id 4") && error.contains("records 3..=5"), "{error}");
    assert!(error.contains("on_error = \"drop\""), "the hint names the way out: {error}");

    p.write("p.toml", pipeline(&hostile(), "config = { mode = \"err\" }\non_error = \"drop\"", 3));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("f")["dropped_on_error"], 1);
    let ids: Vec<u64> = p.jsonl("o.jsonl").iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 5, 6, 7, 8], "only the failing record is dropped");

    // A trap with on_error = "drop": the instance is replaced and the run goes on.
    p.write("p.toml", pipeline(&hostile(), "config = { mode = \"panic\", at = 2 }\non_error = \"drop\"", 3));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let ids: Vec<u64> = p.jsonl("o.jsonl").iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn bad_wasm_files_are_refused_with_a_clear_error() {
    let p = Project::new();
    write_records(&p, &records(3));
    let mut report = String::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage.wasm", vec![0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]),
        ("module.wasm", wat::parse_str("(module (func (export \"f\")))").unwrap()),
    ];
    for (name, bytes) in cases {
        p.write(name, bytes);
        p.write("p.toml", pipeline(name, "", 3));
        let out = p.ladle(&["run", "p.toml"]);
        assert_ne!(out.status.code(), Some(0));
        let check = p.ladle(&["plugin", "check", name]);
        assert_eq!(check.status.code(), Some(2));
        // The run's error line (timings elsewhere in its output vary).
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let error_line: String = stderr
            .lines()
            .filter(|l| l.contains("error:") || l.contains("FAILED:") || l.contains("hint:"))
            .collect::<Vec<_>>()
            .join("\n");
        report.push_str(&format!(
            "### {name}\nrun: {}\ncheck: {}\n",
            p.redact(&error_line),
            p.redact(String::from_utf8_lossy(&check.stderr).trim())
        ));
    }
    // Truncated: found when the stage starts (the component is compiled then). The parser's
    // byte offsets depend on the toolchain, so only the wording is checked.
    let bytes = std::fs::read(example("min_words")).unwrap();
    p.write("truncated.wasm", &bytes[..bytes.len() / 2]);
    p.write("p.toml", pipeline("truncated.wasm", "", 3));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 1);
    assert_eq!(r.status("d"), "ran");
    assert!(r.stage("f")["error"].as_str().unwrap().contains("truncated.wasm is not a valid component"));
    let check = p.ladle(&["plugin", "check", "truncated.wasm"]);
    assert_eq!(check.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&check.stderr).contains("is not a valid component"));

    let old = wasm_dir("tests/plugins").join("old_interface.wasm");
    let check = p.ladle(&["plugin", "check", old.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(2));
    let text = String::from_utf8_lossy(&check.stderr).replace(old.to_str().unwrap(), "old_interface.wasm");
    report.push_str(&format!("### an older interface version\ncheck: {}\n", text.trim()));
    // A component of another world: it exports nothing ladle can call.
    p.write("empty.wasm", wat::parse_str("(component)").unwrap());
    let check = p.ladle(&["plugin", "check", "empty.wasm"]);
    report.push_str(&format!(
        "### a component of another world\ncheck: {}\n",
        String::from_utf8_lossy(&check.stderr).trim()
    ));
    insta::assert_snapshot!(report);
}

#[test]
fn the_wasm_digest_and_config_are_in_the_key() {
    let p = Project::new();
    write_records(&p, &captions());
    let wasm = std::fs::read(example("min_words")).unwrap();
    p.write("mw.wasm", &wasm);
    p.write("p.toml", pipeline("mw.wasm", "config = { min_words = 3 }", 4));
    assert_eq!(p.run("p.toml", &[]).code(), 0);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.status("f"), "cached");

    // Limits do not change results: still cached.
    p.write(
        "p.toml",
        pipeline("mw.wasm", "config = { min_words = 3 }\nlimits = { memory_mb = 64, max_output_factor = 2 }", 4),
    );
    assert_eq!(p.run("p.toml", &[]).status("f"), "cached");
    // Batch sizes may (a plugin's randomness is drawn per batch): they are in the key.
    p.write("p.toml", pipeline("mw.wasm", "config = { min_words = 3 }\nbatch_records = 2", 4));
    assert_eq!(p.run("p.toml", &[]).status("f"), "ran");
    p.write("p.toml", pipeline("mw.wasm", "config = { min_words = 3 }", 4));

    // One byte of the .wasm changed (in its producers section: still a valid component).
    let at = wasm.windows(5).position(|w| w == b"rustc").expect("a producers section naming rustc");
    let mut edited = wasm.clone();
    edited[at] = b'R';
    p.write("mw.wasm", &edited);
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.status("f"), "ran");

    p.write("p.toml", pipeline("mw.wasm", "config = { min_words = 5 }", 4));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.status("f"), "ran");
}

#[test]
fn plugin_new_makes_a_crate_that_builds_checks_and_runs() {
    let p = Project::new();
    let out = p.ladle(&["plugin", "new", "short-captions"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let again = p.ladle(&["plugin", "new", "short-captions"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = p.ladle(&["plugin", "new", "9lives"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a usable plugin name"));

    // Build it as its README says, sharing the test guests' target folder to reuse dependencies.
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plugins/target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = std::process::Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target)
        .current_dir(p.path("short-captions"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let wasm = target.join("wasm32-wasip2/release/short_captions.wasm");
    let check = p.ladle(&["plugin", "check", wasm.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("exports: ladle:filter/filter@0.1.0"));

    write_records(&p, &captions());
    p.write("p.toml", pipeline(wasm.to_str().unwrap(), "config = { min_chars = 10 }", 8));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let expected: Vec<Value> =
        captions().into_iter().filter(|r| r["caption"].as_str().unwrap().trim().chars().count() >= 10).collect();
    assert_eq!(p.jsonl("o.jsonl"), expected);
}

// ---- limits a hostile plugin once walked past ------------------------------------------------

#[test]
fn a_sleep_counts_against_the_deadline_and_cannot_outlast_it() {
    use ladle_plugins::host::{CallError, Limits, Plugin};
    let limits = Limits { batch_timeout: Duration::from_secs(2), ..Limits::default() };
    let plugin = Plugin::load(std::path::Path::new(&hostile()), limits).unwrap();
    let batch = ["{\"id\": 1}".to_string()];
    for secs in [3600.0, 5.0, 2.0] {
        let mut instance = plugin.instantiate(&format!(r#"{{"mode": "sleep", "secs": {secs}}}"#)).unwrap();
        let t = Instant::now();
        let result = instance.filter(&batch, b"batch");
        let elapsed = t.elapsed();
        let Err(CallError::Slept(message)) = result else { panic!("a {secs} s sleep: {result:?}") };
        assert!(message.contains(&format!("asked to sleep {} ms", secs * 1000.0)), "{message}");
        assert!(message.contains("past its deadline of 2000 ms"), "{message}");
        assert!(elapsed < Duration::from_secs(3), "a {secs} s sleep held the call {elapsed:?}");
    }
    // A sleep within the deadline returns (at once: time is not the plugin's to spend), and every
    // call has a deadline of its own.
    let mut instance = plugin.instantiate(r#"{"mode": "sleep", "secs": 1.5}"#).unwrap();
    let t = Instant::now();
    for _ in 0..3 {
        assert_eq!(instance.filter(&batch, b"batch").unwrap().len(), 1);
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn a_sleeping_plugin_fails_the_run_naming_the_plugin() {
    let p = Project::new();
    write_records(&p, &records(6));
    let (error, elapsed) =
        run_failing(&p, "config = { mode = \"sleep\", secs = 3600 }\nlimits = { batch_timeout_ms = 2000 }");
    assert!(error.contains("plugin `hostile`") && error.contains("records 0..=2"), "{error}");
    assert!(error.contains("asked to sleep 3600000 ms, which ends past its deadline of 2000 ms"), "{error}");
    // Within the deadline and a second of a run that fails at once (the sleep is not waited for).
    let baseline = failing_at_once(&p);
    assert!(elapsed < baseline + Duration::from_secs(3), "{elapsed:?} (failing at once: {baseline:?})");
}

#[test]
fn replacements_past_the_record_limit_fail_or_drop_and_memory_stays_bounded() {
    let p = Project::new();
    write_records(&p, &records(6));
    let r = {
        p.write("p.toml", pipeline(&hostile(), "config = { mode = \"huge\", mb = 60, every = 3 }", 3));
        p.run("p.toml", &["-j", "1"])
    };
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let error = r.stage("f")["error"].as_str().unwrap().to_string();
    assert!(error.contains("plugin `hostile`") && error.contains("record 0:"), "{error}");
    assert!(
        error.contains("replaced the record with 60.0 MiB of text, past its limit of 16.0 MiB (limits.max_record_mb)"),
        "{error}"
    );
    let peak = r.summary()["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);

    // Dropped and counted; the other records of each batch are kept.
    p.write("p.toml", pipeline(&hostile(), "config = { mode = \"huge\", mb = 60, every = 3 }\non_error = \"drop\"", 3));
    let r = p.run("p.toml", &["-j", "1"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("f")["dropped_on_error"], 2);
    let ids: Vec<u64> = p.jsonl("o.jsonl").iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 4, 5]);
    let peak = r.summary()["peak_rss_bytes"].as_u64().unwrap();
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);

    // Within a raised record limit, the shard's output is still bounded by its input.
    // Three 20 MiB records in a shard of 3 records (about 60 bytes of input) pass the floor of
    // max_record_mb = 24 at the second.
    p.write(
        "p.toml",
        pipeline(&hostile(), "config = { mode = \"huge\", mb = 20 }\nlimits = { max_record_mb = 24 }", 3),
    );
    let r = p.run("p.toml", &["-j", "1"]);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let error = r.stage("f")["error"].as_str().unwrap();
    assert!(error.contains("record 1: the shard's output passed 24.0 MiB, the most a shard of"), "{error}");
    assert!(error.contains("(limits.max_output_factor = 16 times its input"), "{error}");
    // And with both raised, a 20 MiB record goes through, whole.
    p.write(
        "p.toml",
        pipeline(
            &hostile(),
            "config = { mode = \"huge\", mb = 20, every = 3 }\nlimits = { max_record_mb = 64, max_output_factor = 1000000 }",
            3,
        ),
    );
    let r = p.run("p.toml", &["-j", "1"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let out = p.jsonl("o.jsonl");
    assert_eq!(out.len(), 6);
    assert_eq!(out[0]["filler"].as_str().unwrap().len(), 20 << 20);
    assert_eq!(out[1]["id"], 1);
}

/// Bytes of all files under `dir`.
fn size_of(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() { size_of(&e.path()) } else { e.metadata().unwrap().len() }
        })
        .sum()
}

#[test]
fn a_huge_error_message_is_cut_before_it_is_kept_or_shown() {
    // The same failure with an empty message and with a 100 MiB one, each in a store of its own.
    let mut seen = Vec::new();
    for mb in [0, 100] {
        let p = Project::new();
        write_records(&p, &records(6));
        p.write("p.toml", pipeline(&hostile(), &format!("config = {{ mode = \"bigerr\", mb = {mb} }}"), 3));
        let r = p.run("p.toml", &["-j", "1"]);
        assert_eq!(r.code(), 1, "{}", r.stderr());
        let shown = r.output.stdout.len() + r.output.stderr.len();
        let error = r.stage("f")["error"].as_str().unwrap().to_string();
        // Another pipeline on the same store, run twice: the second is all cached.
        p.write("q.toml", "[pipeline]\nname = \"q\"\n\n[stages.d]\nkind = \"read\"\npath = \"d.jsonl\"\n\n[stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"q.jsonl\"\n");
        assert_eq!(p.run("q.toml", &[]).code(), 0);
        let cached = p.run("q.toml", &[]);
        assert_eq!(cached.status("w"), "cached");
        let peak = cached.summary()["peak_rss_bytes"].as_u64().unwrap();
        seen.push((shown, error, size_of(&p.path(".ladle")), peak));
    }
    let (small, big) = (&seen[0], &seen[1]);
    assert!(big.1.contains("the plugin returned an error: eeee"), "{}", &big.1[..200]);
    assert!(big.1.contains(&format!("… [{} more bytes cut]", (100 << 20) - 4096)), "{}", &big.1[big.1.len() - 200..]);
    assert!(big.0 < small.0 + 3 * 4096, "the run printed {} bytes ({} with an empty message)", big.0, small.0);
    assert!(big.2 < small.2 + (1 << 20), "the store holds {} bytes ({} with an empty message)", big.2, small.2);
    assert!(big.3 < small.3 + (8 << 20), "a cached rerun peaked at {} MiB ({} MiB)", big.3 >> 20, small.3 >> 20);
}

#[test]
fn a_sampling_plugin_gets_reproducible_randomness_that_differs_by_record() {
    let recs = records(200);
    let mut outputs = Vec::new();
    for jobs in ["1", "3"] {
        let p = Project::new();
        write_records(&p, &recs);
        p.write("p.toml", pipeline(&hostile(), "config = { mode = \"sample\" }\nbatch_records = 16", 50));
        let r = p.run("p.toml", &["-j", jobs]);
        assert_eq!(r.code(), 0, "{}", r.stderr());
        outputs.push(p.jsonl("o.jsonl"));
    }
    assert_eq!(outputs[0], outputs[1], "two runs (one and three workers) give the same sample");
    let kept = &outputs[0];
    // A fair coin over 200 records: 100 ± 40 is more than 5 standard deviations wide.
    assert!((60..=140).contains(&kept.len()), "kept {} of 200", kept.len());
    let draws: std::collections::BTreeSet<u64> = kept.iter().map(|r| r["draw"].as_u64().unwrap()).collect();
    assert!(draws.len() > 40, "only {} different draws among {} records", draws.len(), kept.len());
    assert!(draws.iter().all(|d| *d < 128));
}

/// The compiled form of a plugin is kept in the store: a later run whose plugin stage must
/// compute loads it instead of compiling; a damaged copy is refused (quarantined), never run,
/// and compiled again; the stage key does not change; `gc` removes it with the runs that used it.
#[test]
fn compiled_plugins_are_kept_loaded_and_a_damaged_one_is_compiled_again() {
    let p = Project::new();
    let all = captions();
    write_records(&p, &all[..8]);
    p.write("p.toml", pipeline(&example("min_words"), "config = { min_words = 3 }", 4));
    let log = |p: &Project| String::from_utf8(p.ladle(&["show", "p.toml", "f"]).stdout).unwrap();
    let expect = |p: &Project, n: usize| {
        let want: Vec<&Value> =
            all[..n].iter().filter(|r| native_min_words(r["caption"].as_str().unwrap(), 3)).collect();
        let got = p.jsonl("o.jsonl");
        assert_eq!(got.iter().collect::<Vec<_>>(), want);
    };
    let first = p.run("p.toml", &[]);
    assert_eq!(first.code(), 0, "{}", first.stderr());
    assert!(log(&p).contains("s; its compiled form is kept in the store for later runs"), "{}", log(&p));
    expect(&p, 8);

    // New records: the plugin stage computes the new shard, with the kept code.
    write_records(&p, &all[..12]);
    let second = p.run("p.toml", &[]);
    assert_eq!(second.code(), 0, "{}", second.stderr());
    assert_eq!(second.computed("f"), 1, "the two old shards are cached, as before");
    assert!(log(&p).contains("loaded compiled from the store in"), "{}", log(&p));
    expect(&p, 12);

    // The kept code damaged on disk (wasmtime writes ELF): refused, compiled again, same output.
    let objects = p.path(".ladle/objects");
    let compiled: Vec<_> =
        walk(&objects).into_iter().filter(|f| std::fs::read(f).is_ok_and(|b| b.starts_with(b"\x7fELF"))).collect();
    assert_eq!(compiled.len(), 1, "one compiled component in {}", objects.display());
    let mut bytes = std::fs::read(&compiled[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&compiled[0], bytes).unwrap();
    write_records(&p, &all);
    let third = p.run("p.toml", &[]);
    assert_eq!(third.code(), 0, "{}", third.stderr());
    assert!(log(&p).contains("s; its compiled form is kept in the store for later runs"), "{}", log(&p));
    assert!(walk(&p.path(".ladle/quarantine")).len() == 1, "the damaged copy is quarantined");
    expect(&p, all.len());

    // Nothing new: all cached, nothing loaded.
    assert_eq!(p.run("p.toml", &[]).status("f"), "cached");
    // gc keeping no run removes it; keeping the runs keeps it.
    let gc = |keep: &str| String::from_utf8(p.ladle(&["gc", "p.toml", "--keep-runs", keep]).stdout).unwrap();
    assert!(gc("10").contains("0 compiled plugin(s)"));
    assert!(gc("0").contains("1 compiled plugin(s)"));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

// ---- Python plugins (componentize-py and plugins/sdk-python) ------------------------------

/// caption-rules' rules, written natively from its module docs.
fn native_caption_rules(record: &Value, min_words: usize, min_alpha: f64, banned: &[&str]) -> bool {
    let Some(caption) = record["caption"].as_str() else { return false };
    if caption.split_whitespace().count() < min_words {
        return false;
    }
    let visible: Vec<char> = caption.chars().filter(|c| !c.is_whitespace()).collect();
    let letters = visible.iter().filter(|c| c.is_alphabetic()).count();
    if visible.is_empty() || (letters as f64) / (visible.len() as f64) < min_alpha {
        return false;
    }
    let lowered = caption.to_lowercase();
    !banned.iter().any(|b| lowered.contains(&b.to_lowercase()))
}

#[test]
fn the_python_example_gives_the_verdicts_of_its_rules_written_natively() {
    let wasm = python_plugin("plugins/examples/python/caption-rules");
    let mut records = captions();
    for (i, c) in [
        "一只 狗 在 草地 上 睡觉",
        "Кошка спит на диване",
        "click HERE for a stock photo of a cat",
        "1234 5678 90 12",
        "a b",
    ]
    .iter()
    .enumerate()
    {
        records.push(json!({"id": 100 + i, "caption": c}));
    }
    records.push(json!({"id": 200, "caption": 42}));
    records.push(json!({"id": 201}));
    let p = Project::new();
    write_records(&p, &records);
    let config = "config = { min_words = 3, min_alpha = 0.6, banned = [\"Click here\", \"example.com\"] }";
    p.write("p.toml", pipeline(wasm.to_str().unwrap(), &format!("{config}\nlimits = {{ memory_mb = 128 }}"), 5));
    let run = p.run("p.toml", &[]);
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let want: Vec<&Value> =
        records.iter().filter(|r| native_caption_rules(r, 3, 0.6, &["Click here", "example.com"])).collect();
    assert!(want.len() > 3 && want.len() < records.len() - 3, "the rules keep some and drop some");
    assert_eq!(p.jsonl("o.jsonl").iter().collect::<Vec<_>>(), want);
    // A config the plugin refuses fails the stage with its Python message, before any record.
    p.write("p.toml", pipeline(wasm.to_str().unwrap(), "config = { min_alpha = 2 }\nlimits = { memory_mb = 128 }", 5));
    let run = p.run("p.toml", &[]);
    let error = run.stage("f")["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("ValueError: min_alpha is a share of the characters: between 0 and 1"), "{error}");
}

#[test]
fn a_hostile_python_plugin_is_contained_and_its_errors_show_the_python_exception() {
    use ladle_plugins::host::{CallError, Limits, Plugin, Verdict};
    let wasm = python_plugin("tests/plugins/python/hostile");
    let limits = Limits { memory_bytes: 128 << 20, batch_timeout: Duration::from_millis(1500), fuel: None };
    let plugin = Plugin::load(&wasm, limits).unwrap();
    let call = |what: &str| {
        let mut instance = plugin.instantiate(&format!("{{\"do\": \"{what}\"}}")).unwrap();
        instance.filter(&["{\"id\": 7, \"caption\": \"a cat\"}".to_string()], b"batch")
    };
    match call("raise") {
        Err(CallError::Returned(e)) => {
            assert!(e.contains("ValueError: bad caption in record 7"), "{e}");
            assert!(e.contains("Traceback") || e.contains("line "), "the traceback's last lines: {e}");
        }
        other => panic!("{other:?}"),
    }
    let t = Instant::now();
    assert_eq!(call("loop").unwrap_err(), CallError::Timeout(1500));
    assert!(t.elapsed() < Duration::from_millis(1500 + 1000), "{:?}", t.elapsed());
    match call("alloc") {
        Err(CallError::Memory(128)) => {}
        Err(CallError::Returned(e)) if e.contains("MemoryError") => {}
        other => panic!("an unbounded allocation must stop at the cap: {other:?}"),
    }
    match call("open") {
        Err(CallError::Returned(e)) => assert!(e.contains("Error") && e.contains("/etc/passwd"), "{e}"),
        other => panic!("opening a host file must fail: {other:?}"),
    }
    match call("socket") {
        Err(CallError::Returned(e)) => assert!(e.contains("Error"), "{e}"),
        other => panic!("a connection must fail: {other:?}"),
    }
    let replaced = |v: Result<Vec<Verdict>, CallError>| match v.unwrap().as_slice() {
        [Verdict::Replace(r)] => serde_json::from_str::<Value>(r).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(replaced(call("environ"))["environ"], json!({}));
    assert_eq!(replaced(call("clock"))["time"], json!(0.0));
}

/// `ladle plugin new NAME --lang python` makes a folder that builds as its README says (with the
/// componentize-py the test command installs) and passes `plugin check`. (Its filter runs as the
/// example's does, in the tests above; each run of an 18 MB component costs a compile here.)
#[test]
fn plugin_new_python_makes_a_folder_that_builds_checks_and_runs() {
    let p = Project::new();
    let out = p.ladle(&["plugin", "new", "short-captions", "--lang", "python"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let next = String::from_utf8_lossy(&out.stdout);
    assert!(next.contains("componentize-py -d wit -w plugin componentize app -p . -o short_captions.wasm"), "{next}");
    let readme = String::from_utf8(p.read("short-captions/README.md")).unwrap();
    assert!(
        readme.contains("pip install componentize-py==")
            && readme.contains("componentize app -p . -o short_captions.wasm")
    );

    // The build line of its README, in its folder.
    let tool = std::env::var("LADLE_COMPONENTIZE_PY").unwrap_or_else(|_| "componentize-py".into());
    let build = std::process::Command::new(&tool)
        .args(["-d", "wit", "-w", "plugin", "componentize", "app", "-p", ".", "-o", "short_captions.wasm"])
        .current_dir(p.path("short-captions"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (scripts/test.sh installs it): {e}"));
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    let wasm = p.path("short-captions/short_captions.wasm");
    let check = p.ladle(&["plugin", "check", wasm.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
    let report = String::from_utf8_lossy(&check.stdout);
    let exports = report.lines().find(|l| l.starts_with("exports:")).unwrap_or_default();
    assert!(exports.contains("ladle:filter/filter@0.1.0"), "{report}");
}
