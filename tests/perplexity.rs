//! The `perplexity` stage end to end, on the tiny fixture models, against transformers' values.

mod common;

use std::path::{Path, PathBuf};

use common::{Project, expected, points_tiny};
use serde_json::Value;

/// read captions → model → perplexity(extra) → write scored.jsonl (and select lowest 20% → kept.jsonl)
fn pipeline(captions: &Path, model: &Path, extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "ppl"

[stages.captions]
kind = "read"
path = "{}"
shard_records = 16

[stages.scorer]
kind = "model"
path = "{}"

[stages.ppl]
kind = "perplexity"
data = "captions"
model = "scorer"
text = "{{caption}}"
{extra}

[stages.keep]
kind = "select"
data = "ppl"
by = "ppl"
lowest = 0.2

[stages.scored]
kind = "write"
data = "ppl"
path = "scored.jsonl"

[stages.kept]
kind = "write"
data = "keep"
path = "kept.jsonl"
"#,
        captions.display(),
        model.display()
    )
}

fn run(p: &Project) -> common::RunResult {
    p.run("p.toml", &["-j", "2"])
}

#[test]
fn scores_match_transformers_and_the_filter_keeps_the_lowest_20_percent() {
    let exp = expected();
    let prompt = exp["prompt"].as_str().unwrap();
    for (model, key, extra) in [
        ("tiny-qwen2", "qwen2_prompted", format!("prompt = \"{prompt}\"")),
        ("tiny-llama", "llama_text", String::new()),
    ] {
        let p = Project::new();
        p.write("p.toml", pipeline(&points_tiny().join("captions.jsonl"), &points_tiny().join(model), &extra));
        let r = run(&p);
        assert_eq!(r.code(), 0, "{}", r.stderr());
        let scored = p.jsonl("scored.jsonl");
        assert_eq!(scored.len(), 42);
        for (rec, e) in scored.iter().zip(exp[key].as_array().unwrap()) {
            assert_eq!(rec["id"], e["id"]);
            let (got, want) = (rec["ppl"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
            assert!((got - want).abs() / want < 1e-4, "{key} {}: {got} vs {want}", e["id"]);
            let (got, want) = (rec["ppl_nll"].as_f64().unwrap(), e["mean_nll"].as_f64().unwrap());
            assert!((got - want).abs() / want < 1e-4, "{key} {}: nll {got} vs {want}", e["id"]);
            assert_eq!(rec["ppl_tokens"], e["n_scored"]);
            assert!(rec.get("ppl_truncated").is_none());
        }
        // The lowest ⌊0.2 · 42⌋ = 8 by the reference perplexities, in record order.
        let mut by_ref: Vec<(f64, usize)> = exp[key]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, e)| (e["perplexity"].as_f64().unwrap(), i))
            .collect();
        by_ref.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut want: Vec<usize> = by_ref[..8].iter().map(|x| x.1).collect();
        want.sort();
        let want_ids: Vec<Value> = want.iter().map(|&i| exp[key][i]["id"].clone()).collect();
        let kept: Vec<Value> = p.jsonl("kept.jsonl").iter().map(|r| r["id"].clone()).collect();
        assert_eq!(kept, want_ids, "{key}");
        // The six 'obscure' captions (serials, versions) are the last six records: all dropped.
        for i in 36..42 {
            assert!(!kept.contains(&exp[key][i]["id"]), "{key}: obscure caption {} was kept", exp[key][i]["id"]);
        }
    }
}

#[test]
fn long_records_are_cut_and_marked() {
    let p = Project::new();
    p.write(
        "p.toml",
        pipeline(&points_tiny().join("captions.jsonl"), &points_tiny().join("tiny-qwen2"), "max_tokens = 6"),
    );
    let r = run(&p);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let scored = p.jsonl("scored.jsonl");
    for rec in &scored {
        // Qwen2's tokenizer adds no BOS: 6 tokens, 5 scored.
        assert_eq!(rec["ppl_tokens"], 5, "{rec}");
        assert_eq!(rec["ppl_truncated"], true);
    }
}

fn copy_model(p: &Project, name: &str) -> PathBuf {
    let dest = p.path(name);
    std::fs::create_dir_all(&dest).unwrap();
    for f in std::fs::read_dir(points_tiny().join("tiny-qwen2")).unwrap().flatten() {
        std::fs::copy(f.path(), dest.join(f.file_name())).unwrap();
    }
    for f in std::fs::read_dir(&dest).unwrap().flatten() {
        let mut perms = f.metadata().unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(f.path(), perms).unwrap();
    }
    dest
}

fn ppl_error(p: &Project) -> String {
    let r = run(p);
    assert_eq!(r.code(), 1, "{}", r.stderr());
    p.redact(r.stage("ppl")["error"].as_str().unwrap())
}

#[test]
fn bad_models_and_records_give_one_clear_error() {
    let mut report = String::new();

    let p = Project::new();
    let model = copy_model(&p, "m");
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    p.write("p.toml", pipeline(&points_tiny().join("captions.jsonl"), &model, ""));
    report.push_str(&format!("### a truncated safetensors file\n{}\n", ppl_error(&p)));

    let p = Project::new();
    let model = copy_model(&p, "m");
    let config = std::fs::read_to_string(model.join("config.json"))
        .unwrap()
        .replace("\"vocab_size\": 400", "\"vocab_size\": 300");
    std::fs::write(model.join("config.json"), config).unwrap();
    p.write("p.toml", pipeline(&points_tiny().join("captions.jsonl"), &model, ""));
    report.push_str(&format!("### a tokenizer that does not match the embedding size\n{}\n", ppl_error(&p)));

    let p = Project::new();
    let model = copy_model(&p, "m");
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    p.write("p.toml", pipeline(&points_tiny().join("captions.jsonl"), &model, ""));
    report.push_str(&format!("### no weights\n{}\n", ppl_error(&p)));

    let p = Project::new();
    p.write(
        "c.jsonl",
        "{\"id\": \"a\", \"caption\": \"a dog on a mat\"}\n{\"id\": \"b\", \"text\": \"no caption field\"}\n",
    );
    p.write("p.toml", pipeline(&p.path("c.jsonl"), &points_tiny().join("tiny-qwen2"), ""));
    report.push_str(&format!("### a record whose template field is missing\n{}\n", ppl_error(&p)));

    let p = Project::new();
    p.write("c.jsonl", "{\"id\": \"a\", \"caption\": \"a dog on a mat\"}\n{\"id\": \"b\", \"caption\": \"   \"}\n");
    p.write("p.toml", pipeline(&p.path("c.jsonl"), &points_tiny().join("tiny-qwen2"), ""));
    report.push_str(&format!("### an empty caption\n{}\n", ppl_error(&p)));

    let p = Project::new();
    let model = copy_model(&p, "m");
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    p.write("p.toml", pipeline(&points_tiny().join("captions.jsonl"), &model, "prompt = \"describe it\""));
    report.push_str(&format!("### a prompt for a model without a chat template\n{}\n", ppl_error(&p)));

    insta::assert_snapshot!(report);
}

fn generate_pipeline(extra: &str) -> String {
    format!(
        "[pipeline]\nname = \"gen\"\n\n[stages.prompts]\nkind = \"read\"\npath = \"prompts.jsonl\"\n\n[stages.llm]\nkind = \"model\"\npath = \"{}\"\n\n[stages.gen]\nkind = \"generate\"\ndata = \"prompts\"\nmodel = \"llm\"\nprompt = \"{{prompt}}\"\ncolumn = \"caption\"\nmax_new_tokens = 16\n{extra}\n\n[stages.out]\nkind = \"write\"\ndata = \"gen\"\npath = \"out.jsonl\"\n",
        points_tiny().join("tiny-qwen2").display()
    )
}

#[test]
fn the_generate_stage_writes_what_transformers_generates() {
    let exp = expected();
    let cases = exp["qwen2_greedy"].as_array().unwrap();
    let p = Project::new();
    p.write(
        "prompts.jsonl",
        cases.iter().map(|c| format!("{}\n", serde_json::json!({"prompt": c["prompt"]}))).collect::<String>(),
    );
    p.write("p.toml", generate_pipeline(""));
    let r = run(&p);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let out = p.jsonl("out.jsonl");
    for (rec, case) in out.iter().zip(cases) {
        assert_eq!(rec["caption"], case["text"]);
        assert_eq!(rec["caption_tokens"], 16);
    }

    // In bf16 it generates too (its own cache entry; greedy paths may part from f32's).
    p.write("p.toml", generate_pipeline("dtype = \"bf16\""));
    let r = run(&p);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.status("gen"), "ran");
    for rec in p.jsonl("out.jsonl") {
        let n = rec["caption_tokens"].as_u64().unwrap();
        assert!((1..=16).contains(&n) && !rec["caption"].as_str().unwrap().is_empty(), "{rec}");
    }

    // Sampling is seeded per record: the same in another store, different with another seed.
    p.write("p.toml", generate_pipeline("temperature = 1.5\ntop_p = 0.9\nseed = 7"));
    assert_eq!(run(&p).code(), 0);
    let sampled = p.read("out.jsonl");
    let q = Project::new();
    q.write("prompts.jsonl", p.read("prompts.jsonl"));
    q.write("p.toml", generate_pipeline("temperature = 1.5\ntop_p = 0.9\nseed = 7"));
    assert_eq!(run(&q).code(), 0);
    assert_eq!(q.read("out.jsonl"), sampled);
    q.write("p.toml", generate_pipeline("temperature = 1.5\ntop_p = 0.9\nseed = 8"));
    assert_eq!(run(&q).code(), 0);
    assert_ne!(q.read("out.jsonl"), sampled);
    assert_ne!(q.jsonl("out.jsonl"), out, "sampling at temperature 1.5 differs from greedy");

    // Records written one at a time or two at a time (a remainder batch too) write the same;
    // `batch` is how, not what, so changing it reruns nothing.
    assert!(cases.len() >= 3, "the fixture has {} prompts", cases.len());
    for batch in [1, 2] {
        let b = Project::new();
        b.write("prompts.jsonl", p.read("prompts.jsonl"));
        b.write("p.toml", generate_pipeline(&format!("temperature = 1.5\ntop_p = 0.9\nseed = 7\nbatch = {batch}")));
        assert_eq!(run(&b).code(), 0);
        assert_eq!(b.read("out.jsonl"), sampled, "sampled {batch} at a time");
        b.write("p.toml", generate_pipeline(&format!("batch = {batch}")));
        assert_eq!(run(&b).code(), 0);
        assert_eq!(b.jsonl("out.jsonl"), out, "greedy {batch} at a time");
        b.write("p.toml", generate_pipeline(&format!("batch = {}", batch + 5)));
        let r = run(&b);
        assert_eq!(r.status("gen"), "cached", "{}", r.stderr());
    }
}
