//! `device` and `dtype` on model stages: what enters the cache key, half precision against the
//! transformers fixtures, and the errors a CPU build gives (issue #7's CPU-side half).

mod common;

use common::{Project, expected, points_tiny};

fn pipeline(extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "placement"

[stages.captions]
kind = "read"
path = "{captions}"
shard_records = 16

[stages.scorer]
kind = "model"
path = "{model}"

[stages.ppl]
kind = "perplexity"
data = "captions"
model = "scorer"
text = "{{caption}}"
{extra}

[stages.scored]
kind = "write"
data = "ppl"
path = "scored.jsonl"
"#,
        captions = points_tiny().join("captions.jsonl").display(),
        model = points_tiny().join("tiny-llama").display(),
    )
}

fn run(p: &Project, extra: &str) -> common::RunResult {
    p.write("p.toml", pipeline(extra));
    let r = p.run("p.toml", &["-j", "2"]);
    assert_eq!(r.code(), 0, "{extra}: {}", r.stderr());
    r
}

#[test]
fn half_precision_scores_within_2e2_and_is_keyed_apart_from_f32() {
    let exp = expected();
    let p = Project::new();
    // Spelling out the defaults on this CPU-only build changes nothing: cached.
    run(&p, "");
    for same in ["device = \"cpu\"", "device = \"auto\"", "dtype = \"f32\"", "device = \"cpu\"\ndtype = \"f32\""] {
        let r = run(&p, same);
        assert_eq!(r.status("ppl"), "cached", "{same}: {}", r.summary());
    }
    for dtype in ["bf16", "f16"] {
        let r = run(&p, &format!("dtype = \"{dtype}\""));
        assert_eq!(r.status("ppl"), "ran", "{dtype} must not be served f32 scores");
        let scored = p.jsonl("scored.jsonl");
        for (rec, e) in scored.iter().zip(exp["llama_text"].as_array().unwrap()) {
            let (got, want) = (rec["ppl"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
            assert!((got - want).abs() / want < 2e-2, "{dtype} {}: {got} vs {want}", e["id"]);
        }
    }
    // Each dtype has its own cache entry.
    assert_eq!(run(&p, "dtype = \"bf16\"").status("ppl"), "cached");
}

fn error_of(p: &Project, extra: &str) -> String {
    p.write("p.toml", pipeline(extra));
    let out = p.ladle(&["plan", "p.toml"]);
    assert_ne!(out.status.code(), Some(0), "{extra} was accepted");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn bad_placements_are_clear_errors_before_anything_runs() {
    let p = Project::new();
    let err = error_of(&p, "device = \"tpu\"");
    // Located at the parameter's line (18) of the stage's table.
    assert!(err.contains("\"cpu\", \"cuda\" or \"cuda:N\"") && err.contains("p.toml:18:1: stage `ppl`"), "{err}");
    let err = error_of(&p, "dtype = \"f64\"");
    assert!(err.contains("\"f32\", \"bf16\", \"f16\""), "{err}");
    if !cfg!(feature = "cuda") {
        for device in ["cuda", "cuda:1"] {
            let err = error_of(&p, &format!("device = \"{device}\""));
            assert!(err.contains("built without GPU support") && err.contains("`cuda` feature"), "{err}");
            assert!(err.contains("p.toml"), "the error names the file: {err}");
        }
    }
}

#[test]
fn a_soup_takes_device_and_dtype_only_for_its_built_in_metric() {
    let soup = points_tiny().join("soup");
    let p = Project::new();
    p.write(
        "p.toml",
        format!(
            r#"[pipeline]
name = "soup"

[stages.a]
kind = "model"
path = "{}"

[stages.b]
kind = "model"
path = "{}"

[stages.soup]
kind = "soup"
models = ["a", "b"]
method = "uniform"
dtype = "bf16"
"#,
            soup.join("ft0").display(),
            soup.join("ft1").display()
        ),
    );
    let out = p.ladle(&["plan", "p.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`dtype` places the model of the built-in metric") && err.contains("stage `soup`"), "{err}");
    assert!(err.contains("which this soup does not use; averaging"), "one sentence, not a wrapped source line: {err}");
}

#[test]
fn ladle_bench_measures_on_the_cpu_and_refuses_a_gpu_it_lacks() {
    let p = Project::new();
    let out = p.ladle(&["bench", "matmul", "--device", "cpu", "--size", "64"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["device"].as_str(), v["dtype"].as_str(), v["size"].as_u64()), (Some("cpu"), Some("f32"), Some(64)));
    assert!(v["flops_per_s"].as_f64().unwrap() > 0.0);
    if !cfg!(feature = "cuda") {
        let out = p.ladle(&["bench", "score", "--device", "cuda:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("`cuda` feature") && err.contains("--device"), "{err}");
    }
}

#[test]
fn cpu_replicas_score_what_one_model_scores_and_stay_out_of_the_key() {
    let p = Project::new();
    run(&p, "");
    let one = p.read("scored.jsonl");
    // Replicas are where the model computes, not what: cached.
    for same in ["replicas = 2", "devices = [\"cpu\", \"cpu\"]"] {
        let r = run(&p, same);
        assert_eq!(r.status("ppl"), "cached", "{same}: {}", r.summary());
    }
    // Computed afresh by three replicas (42 records in shards of 16, -j 2): the same bytes.
    let q = Project::new();
    let r = run(&q, "replicas = 3");
    assert_eq!(r.status("ppl"), "ran");
    assert_eq!(q.read("scored.jsonl"), one);
}

#[test]
fn bad_replicas_are_clear_errors_before_anything_runs() {
    let p = Project::new();
    for (extra, says) in [
        ("device = \"cpu\"\ndevices = [\"cpu\"]", "give `device` or `devices`, not both"),
        ("devices = []", "`devices` is empty"),
        ("devices = [\"cpu\", \"cpu\"]\nreplicas = 2", "each is a replica already"),
        ("devices = [\"cpu\", \"tpu\"]", "expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    ] {
        let err = error_of(&p, extra);
        assert!(err.contains(says) && err.contains("stage `ppl`"), "{extra}: {err}");
    }
    if !cfg!(feature = "cuda") {
        let err = error_of(&p, "device = \"cuda:all\"");
        assert!(err.contains("cuda:all") && err.contains("`cuda` feature"), "{err}");
    }
}
