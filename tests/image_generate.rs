//! `generate` with `image` end to end: re-captioning with the tiny Qwen2-VL, Qwen2.5-VL and LLaVA
//! against transformers' greedy generations, images embedded in the records (WePOINTS' base64
//! JSONL) or named by path, images in the cache keys, and bad images named or dropped.

mod common;

use common::{Project, points_tiny};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(points_tiny().join(name)).unwrap()).unwrap()
}

/// The fixture captions, their images copied under `data/`.
fn copy_data(p: &Project) {
    p.write("data/captions.jsonl", std::fs::read(points_tiny().join("captions.jsonl")).unwrap());
    for entry in std::fs::read_dir(points_tiny().join("images")).unwrap() {
        let entry = entry.unwrap();
        p.write(&format!("data/images/{}", entry.file_name().to_string_lossy()), std::fs::read(entry.path()).unwrap());
    }
}

fn pipeline(model: &str, data: &str, extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "recaption"

[stages.captions]
kind = "read"
path = "data/{data}"
shard_records = 4

[stages.vlm]
kind = "model"
path = "{}"

[stages.recaption]
kind = "generate"
data = "captions"
model = "vlm"
prompt = "please generate a caption for this image."
image = "{{image}}"
column = "recaption"
max_new_tokens = 16
{extra}

[stages.out]
kind = "write"
data = "recaption"
path = "out.jsonl"
"#,
        points_tiny().join(model).display()
    )
}

fn by_id(records: &[Value]) -> std::collections::BTreeMap<String, Value> {
    records.iter().map(|r| (r["id"].as_str().unwrap().to_string(), r.clone())).collect()
}

#[test]
fn qwen2_vl_recaptions_from_embedded_images_as_transformers_does() {
    let expected = fixture("expected_qwen2vl.json");
    for model in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        let p = Project::new();
        // WePOINTS' own format: plain base64 images inside the JSONL.
        p.write("data/captions.jsonl", std::fs::read(points_tiny().join("captions_base64.jsonl")).unwrap());
        p.write("p.toml", pipeline(model, "captions.jsonl", ""));
        let r = p.run("p.toml", &[]);
        assert_eq!(r.code(), 0, "{model}: {}", r.stderr());
        let out = by_id(&p.jsonl("out.jsonl"));
        let greedy = expected["models"][model]["greedy"].as_array().unwrap();
        let mut compared = 0;
        for g in greedy {
            let Some(rec) = out.get(g["id"].as_str().unwrap()) else { continue };
            assert_eq!(rec["recaption"], g["text"], "{model} {}", g["id"]);
            assert_eq!(rec["recaption_tokens"], g["generated_ids"].as_array().unwrap().len(), "{model} {}", g["id"]);
            compared += 1;
        }
        assert!(compared >= 4, "{model}: the base64 fixture shares only {compared} records with the greedy ones");
        assert_eq!(p.run("p.toml", &[]).status("recaption"), "cached");
    }
}

#[test]
fn llava_recaptions_as_transformers_does_and_edited_images_rerun_only_their_shard() {
    let expected = fixture("llava_greedy.json");
    let p = Project::new();
    copy_data(&p);
    let eight: String =
        String::from_utf8(p.read("data/captions.jsonl")).unwrap().lines().take(8).map(|l| format!("{l}\n")).collect();
    p.write("data/captions.jsonl", eight);
    p.write("p.toml", pipeline("tiny-llava", "captions.jsonl", ""));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.computed("recaption"), 2);
    let out = by_id(&p.jsonl("out.jsonl"));
    for g in expected["greedy"].as_array().unwrap() {
        // Two logits within 0.01 of each other: CLIP's pixels may pick either (see llava_fixtures).
        if g["min_top2_logit_margin"].as_f64().unwrap() >= 0.01 {
            assert_eq!(out[g["id"].as_str().unwrap()]["recaption"], g["text"], "{}", g["id"]);
        }
    }
    // r005 (shard 1) gets r002's picture: only shard 1 runs again, and its caption changes.
    p.write("data/images/img005.jpg", std::fs::read(points_tiny().join("images/img002.jpg")).unwrap());
    let edited = p.run("p.toml", &[]);
    assert_eq!(edited.code(), 0, "{}", edited.stderr());
    assert_eq!(edited.computed("recaption"), 1);
    let after = by_id(&p.jsonl("out.jsonl"));
    assert_eq!(after["r001"], out["r001"]);
    assert_ne!(after["r005"]["recaption"], out["r005"]["recaption"]);
}

#[test]
fn bad_images_name_the_record_or_are_dropped_and_text_models_are_refused() {
    let p = Project::new();
    copy_data(&p);
    let mut lines = p.jsonl("data/captions.jsonl");
    lines.truncate(6);
    lines[3]["image"] = Value::String("iVBORw0KGgoAAAANSUhEUgAAA!!".into());
    p.write("data/captions.jsonl", lines.iter().map(|l| format!("{l}\n")).collect::<String>());
    p.write("p.toml", pipeline("tiny-qwen2-vl", "captions.jsonl", ""));
    let out = p.ladle(&["run", "p.toml"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("record 3") && err.contains("not valid base64") && err.contains("on_bad_image"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    p.write("p.toml", pipeline("tiny-qwen2-vl", "captions.jsonl", "on_bad_image = \"drop\""));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("recaption")["dropped_on_error"], 1, "{}", r.summary());
    assert_eq!(p.jsonl("out.jsonl").len(), 5);

    // A text-only model cannot look at images: one error saying what to do.
    p.write("p.toml", pipeline("tiny-qwen2", "captions.jsonl", ""));
    let out = p.ladle(&["run", "p.toml"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("drop `image` to generate from text alone"), "{err}");
}

#[test]
fn the_bundled_recaption_pipeline_writes_captions_from_images_and_scores_them() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("pipelines/recaption-qwen2vl.toml")).unwrap();
    let text = text.replace("../tests/fixtures", &repo.join("tests/fixtures").display().to_string()).replace(
        "data/points-tiny-base64.jsonl",
        &repo.join("pipelines/data/points-tiny-base64.jsonl").display().to_string(),
    );
    let p = Project::new();
    p.write("r.toml", text);
    let r = p.run("r.toml", &["-j", "2"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let out = p.jsonl("out/recaption-qwen2vl.jsonl");
    assert_eq!(out.len(), 8, "⌊0.2 · 42⌋");
    for rec in &out {
        assert!(!rec["fused"].as_str().unwrap().is_empty(), "{rec}");
        assert!((1..=32).contains(&rec["fused_tokens"].as_u64().unwrap()), "{rec}");
        assert!(rec["ppl"].as_f64().unwrap() > 1.0, "{rec}");
    }
    // A second run is served from the cache, generation included.
    assert_eq!(p.run("r.toml", &[]).status("fused"), "cached");
}
