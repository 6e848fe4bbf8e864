//! Image-conditioned `perplexity` end to end: the tiny LLaVA against transformers' values, images
//! in the cache keys, and bad images of every kind as errors naming the record (or dropped).

mod common;

use std::path::Path;

use common::{Project, expected, points_tiny, wasm_dir};
use serde_json::Value;

/// The fixture captions and their images, copied into the project under `data/`.
fn copy_data(p: &Project) {
    p.write("data/captions.jsonl", std::fs::read(points_tiny().join("captions.jsonl")).unwrap());
    for entry in std::fs::read_dir(points_tiny().join("images")).unwrap() {
        let entry = entry.unwrap();
        p.write(&format!("data/images/{}", entry.file_name().to_string_lossy()), std::fs::read(entry.path()).unwrap());
    }
}

fn pipeline(model: &str, extra: &str) -> String {
    let prompt = expected()["prompt"].as_str().unwrap().to_string();
    format!(
        r#"[pipeline]
name = "vlm"

[stages.captions]
kind = "read"
path = "data/captions.jsonl"
shard_records = 16

[stages.scorer]
kind = "model"
path = "{}"

[stages.ppl]
kind = "perplexity"
data = "captions"
model = "scorer"
text = "{{caption}}"
prompt = "{prompt}"
image = "{{image}}"
{extra}

[stages.scored]
kind = "write"
data = "ppl"
path = "scored.jsonl"
"#,
        points_tiny().join(model).display()
    )
}

fn by_id(records: &[Value]) -> std::collections::BTreeMap<String, Value> {
    records.iter().map(|r| (r["id"].as_str().unwrap().to_string(), r.clone())).collect()
}

#[test]
fn image_conditioned_scores_match_transformers_and_edited_images_rescore_only_their_shard() {
    let p = Project::new();
    copy_data(&p);
    p.write("p.toml", pipeline("tiny-llava", ""));
    let r = p.run("p.toml", &["-j", "2"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.computed("ppl"), 3);
    let scored = p.jsonl("scored.jsonl");
    let exp = expected();
    let want = exp["llava_image_conditioned"].as_array().unwrap();
    assert_eq!(scored.len(), want.len());
    for (got, e) in scored.iter().zip(want) {
        assert_eq!(got["id"], e["id"]);
        assert_eq!(got["ppl_tokens"], e["n_scored"], "{}", e["id"]);
        let (g, w) = (got["ppl"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
        assert!((g - w).abs() / w < 1e-3, "{}: {g} vs transformers {w}", e["id"]);
    }

    // Nothing changed: nothing runs.
    let again = p.run("p.toml", &[]);
    assert_eq!(again.status("ppl"), "cached", "{}", again.stderr());

    // Replace record 20's image (shard 1 of 0..2) with another: only that shard is scored again,
    // and `plan` says why.
    p.write("data/images/img020.jpg", std::fs::read(points_tiny().join("images/img002.jpg")).unwrap());
    let plan = p.ladle(&["plan", "p.toml"]);
    let plan = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(plan.contains("files named by its input records (images) changed"), "{plan}");
    assert!(plan.contains("2 of 3 shards cached"), "{plan}");
    let edited = p.run("p.toml", &[]);
    assert_eq!(edited.code(), 0, "{}", edited.stderr());
    assert_eq!(edited.status("captions"), "cached");
    assert_eq!(edited.computed("ppl"), 1);
    let before = by_id(&scored);
    let after = by_id(&p.jsonl("scored.jsonl"));
    for (id, rec) in &after {
        if id == "r020" {
            assert_ne!(rec["ppl"], before[id]["ppl"], "the new image must change the score");
        } else {
            assert_eq!(rec["ppl"], before[id]["ppl"], "{id}");
        }
    }
}

#[test]
fn base64_and_data_uri_images_score_as_their_files_and_rescore_only_their_shard() {
    let p = Project::new();
    copy_data(&p);
    // The fixtures' first eight records three ways: paths, plain base64 (WePOINTS' JSONL), data URIs.
    let eight: String = std::fs::read_to_string(points_tiny().join("captions.jsonl"))
        .unwrap()
        .lines()
        .take(8)
        .map(|l| format!("{l}\n"))
        .collect();
    p.write("data/captions.jsonl", &eight);
    p.write("p.toml", pipeline("tiny-llava", "").replace("shard_records = 16", "shard_records = 4"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let from_paths = by_id(&p.jsonl("scored.jsonl"));
    assert_eq!(from_paths.len(), 8);
    for form in ["captions_base64.jsonl", "captions_datauri.jsonl"] {
        p.write("data/captions.jsonl", std::fs::read(points_tiny().join(form)).unwrap());
        let r = p.run("p.toml", &[]);
        assert_eq!(r.code(), 0, "{form}: {}", r.stderr());
        assert_eq!(r.computed("ppl"), 2, "{form}: new records, new shards");
        let scored = by_id(&p.jsonl("scored.jsonl"));
        for (id, rec) in &from_paths {
            assert_eq!(scored[id]["ppl"], rec["ppl"], "{form} {id}: the same image, the same score");
        }
    }
    // Give r005 (shard 1) r002's embedded image: only shard 1 is scored again.
    let mut lines = p.jsonl("data/captions.jsonl");
    lines[5]["image"] = lines[2]["image"].clone();
    p.write("data/captions.jsonl", lines.iter().map(|l| format!("{l}\n")).collect::<String>());
    let edited = p.run("p.toml", &[]);
    assert_eq!(edited.code(), 0, "{}", edited.stderr());
    assert_eq!(edited.computed("ppl"), 1);
    let after = by_id(&p.jsonl("scored.jsonl"));
    for (id, rec) in &after {
        if id == "r005" {
            assert_ne!(rec["ppl"], from_paths[id]["ppl"], "the new image must change the score");
        } else {
            assert_eq!(rec["ppl"], from_paths[id]["ppl"], "{id}");
        }
    }
}

/// Writes a bad image for record `r005` and returns the run's error text.
fn failure_with(p: &Project, image_field: &str, bytes: Option<Vec<u8>>) -> String {
    let mut lines: Vec<Value> = p.jsonl("data/captions.jsonl");
    lines[5]["image"] = Value::String(image_field.to_string());
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    p.write("data/captions.jsonl", text);
    if let Some(bytes) = bytes {
        p.write(&format!("data/{image_field}"), bytes);
    }
    run_failing(p)
}

/// `ladle run p.toml`, which must fail; its error output.
fn run_failing(p: &Project) -> String {
    let out = p.ladle(&["run", "p.toml"]);
    assert_ne!(out.status.code(), Some(0), "the run should fail");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 40, 40])).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn bad_images_are_errors_naming_the_record_or_dropped_and_counted() {
    let p = Project::new();
    copy_data(&p);
    p.write("outside.png", png(8, 8));
    p.write("p.toml", pipeline("tiny-llava", ""));
    let jpeg = std::fs::read(points_tiny().join("images/img002.jpg")).unwrap();
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("images/truncated.jpg", Some(jpeg[..jpeg.len() / 2].to_vec()), "truncated"),
        ("images/empty.png", Some(Vec::new()), "empty (0 bytes)"),
        ("images/tall.png", Some(png(1, 10000)), "too elongated"),
        ("../outside.png", None, "outside the data file's folder"),
        ("images/missing.png", None, "missing.png"),
        // Embedded in the record: corrupt base64, a data URI of text, of bytes that are no image.
        ("iVBORw0KGgoAAAANSUhEUgAAA!!", None, "(base64): not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", None, "a data URI of `text/plain`, not of an image"),
        ("data:image/png;base64,aGVsbG8=", None, "not a PNG, JPEG or WebP"),
    ];
    for (field, bytes, why) in &cases {
        let err = failure_with(&p, field, bytes.clone());
        assert!(err.contains("record 5 "), "{field}: {err}");
        assert!(err.contains(why), "{field}: expected `{why}` in: {err}");
        assert!(err.contains("on_bad_image"), "{field}: the hint is missing: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // Dropped instead: every bad record goes, the others are scored as before.
    copy_data(&p);
    let mut lines: Vec<Value> = p.jsonl("data/captions.jsonl");
    for (i, (field, _, _)) in cases.iter().enumerate() {
        lines[3 + i * 4]["image"] = Value::String(field.to_string());
    }
    p.write("data/captions.jsonl", lines.iter().map(|l| format!("{l}\n")).collect::<String>());
    p.write("p.toml", pipeline("tiny-llava", "on_bad_image = \"drop\""));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.stage("ppl")["dropped_on_error"], cases.len(), "{}", r.summary());
    let scored = p.jsonl("scored.jsonl");
    assert_eq!(scored.len(), 42 - cases.len());
    let dropped: Vec<String> = (0..cases.len()).map(|i| format!("r{:03}", 3 + i * 4)).collect();
    assert!(scored.iter().all(|r| !dropped.contains(&r["id"].as_str().unwrap().to_string())));
}

/// A Parquet file as Hugging Face datasets writes an `Image` column: a {bytes, path} struct.
fn write_parquet_with_images(path: &Path, rows: &[(String, String, Option<Vec<u8>>, String)]) {
    use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Fields};
    use std::sync::Arc;
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0.clone())));
    let captions: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1.clone())));
    let bytes: ArrayRef = Arc::new(BinaryArray::from_iter(rows.iter().map(|r| r.2.as_deref())));
    let paths: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3.clone())));
    let fields =
        Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)]);
    let image: ArrayRef = Arc::new(StructArray::new(fields, vec![bytes, paths], None));
    let batch = RecordBatch::try_from_iter([("id", ids), ("caption", captions), ("image", image)]).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn images_embedded_in_parquet_score_as_their_files_do() {
    let p = Project::new();
    copy_data(&p);
    let exp = expected();
    let want = exp["llava_image_conditioned"].as_array().unwrap();
    let records = p.jsonl("data/captions.jsonl");
    // Six records with their image bytes embedded; the seventh has only a (relative) path.
    let mut rows: Vec<(String, String, Option<Vec<u8>>, String)> = records[..6]
        .iter()
        .map(|r| {
            let image = r["image"].as_str().unwrap().to_string();
            let bytes = std::fs::read(points_tiny().join(&image)).unwrap();
            (r["id"].as_str().unwrap().into(), r["caption"].as_str().unwrap().into(), Some(bytes), image)
        })
        .collect();
    let r6 = &records[6];
    rows.push((
        r6["id"].as_str().unwrap().into(),
        r6["caption"].as_str().unwrap().into(),
        None,
        r6["image"].as_str().unwrap().into(),
    ));
    write_parquet_with_images(&p.path("data/captions.parquet"), &rows);
    p.write("p.toml", pipeline("tiny-llava", "").replace("data/captions.jsonl", "data/captions.parquet"));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let scored = p.jsonl("scored.jsonl");
    assert_eq!(scored.len(), 7);
    // No image byte travels in the records: they point at their rows, read in place.
    for (i, (got, row)) in scored.iter().zip(&rows).enumerate() {
        let want = match row.2 {
            Some(_) => serde_json::json!({ "parquet": "captions.parquet", "row": i, "column": "image", "path": row.3 }),
            None => serde_json::json!({ "path": row.3 }),
        };
        assert_eq!(got["image"], want, "{}", row.0);
    }
    for (got, e) in scored.iter().zip(want) {
        assert_eq!(got["id"], e["id"]);
        let (g, w) = (got["ppl"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
        assert!((g - w).abs() / w < 1e-3, "{}: {g} vs transformers {w}", e["id"]);
    }
}

#[test]
fn models_that_cannot_take_images_are_clear_errors() {
    let p = Project::new();
    copy_data(&p);
    p.write("p.toml", pipeline("tiny-qwen2", ""));
    let err = run_failing(&p);
    assert!(err.contains("no vision tower") && err.contains("drop `image`"), "{err}");

    // A LLaVA checkpoint whose projector is missing: the error names the tensor.
    let model = p.path("broken-llava");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(points_tiny().join("tiny-llava")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        tensors.tensors().into_iter().filter(|(name, _)| !name.starts_with("multi_modal_projector.linear_2")).collect();
    safetensors::serialize_to_file(kept, None, &weights).unwrap();
    p.write(
        "p.toml",
        pipeline("tiny-llava", "").replace(&points_tiny().join("tiny-llava").display().to_string(), "broken-llava"),
    );
    let err = run_failing(&p);
    assert!(err.contains("multi_modal_projector.linear_2.weight"), "{err}");
}

#[test]
fn the_bundled_points_pretrain_pipeline_runs_end_to_end() {
    let wasm = wasm_dir("plugins/examples");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("pipelines/points-pretrain.toml")).unwrap();
    let text = text
        .replace("../tests/fixtures", &repo.join("tests/fixtures").display().to_string())
        .replace("../plugins/examples/target/wasm32-wasip2/release", &wasm.display().to_string());
    let p = Project::new();
    p.write("points-pretrain.toml", text);
    let r = p.run("points-pretrain.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    // Lowest 20% of 42 by image-conditioned perplexity: the ⌊0.2·42⌋ = 8 transformers ranks lowest.
    let exp = expected();
    let mut want: Vec<(f64, String)> = exp["llava_image_conditioned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["perplexity"].as_f64().unwrap(), e["id"].as_str().unwrap().to_string()))
        .collect();
    want.sort_by(|a, b| a.0.total_cmp(&b.0));
    let out = p.jsonl("out/points-pretrain.jsonl");
    let mut got: Vec<String> = out.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    got.sort();
    let mut lowest: Vec<String> = want.iter().take(got.len()).map(|w| w.1.clone()).collect();
    lowest.sort();
    assert_eq!(got.len(), 8, "{out:?}");
    assert_eq!(got, lowest);
    // The plugin cleaned the captions it kept: no doubled spaces, trimmed.
    for r in &out {
        let c = r["caption"].as_str().unwrap();
        assert_eq!(c, c.trim());
        assert!(!c.contains("  "), "{c}");
    }
}

#[test]
fn the_bundled_qwen2_vl_pipeline_scores_as_transformers_and_keeps_the_lowest_fifth() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("pipelines/points-pretrain-qwen2vl.toml")).unwrap();
    let text = text.replace("../tests/fixtures", &repo.join("tests/fixtures").display().to_string()).replace(
        "data/points-tiny-base64.jsonl",
        &repo.join("pipelines/data/points-tiny-base64.jsonl").display().to_string(),
    );
    let p = Project::new();
    p.write("q.toml", text);
    let r = p.run("q.toml", &["-j", "2"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(points_tiny().join("expected_qwen2vl.json")).unwrap()).unwrap();
    let records = exp["models"]["tiny-qwen2-vl"]["records"].as_array().unwrap();
    // Every record's score, from the stage's own output (the select keeps 8; `show` has them all).
    let mut want: Vec<(f64, String)> =
        records.iter().map(|e| (e["perplexity"].as_f64().unwrap(), e["id"].as_str().unwrap().to_string())).collect();
    want.sort_by(|a, b| a.0.total_cmp(&b.0));
    let out = p.jsonl("out/points-pretrain-qwen2vl.jsonl");
    assert_eq!(out.len(), 8, "⌊0.2 · 42⌋");
    for rec in &out {
        let id = rec["id"].as_str().unwrap();
        let e = records.iter().find(|e| e["id"] == id).unwrap();
        let (g, w) = (rec["ppl"].as_f64().unwrap(), e["perplexity"].as_f64().unwrap());
        assert!((g - w).abs() / w < 1e-4, "{id}: {g} vs transformers {w}");
        assert_eq!(rec["ppl_tokens"], e["n_scored"], "{id}");
    }
    let mut got: Vec<String> = out.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    got.sort();
    let mut lowest: Vec<String> = want.iter().take(8).map(|w| w.1.clone()).collect();
    lowest.sort();
    assert_eq!(got, lowest);
}

#[test]
fn min_and_max_pixels_bound_qwen2_vl_images_as_transformers_bounds_them() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(points_tiny().join("qwen2vl_pixel_bounds.json")).unwrap())
            .unwrap();
    let (min, max) =
        (reference["bounds"]["min_pixels"].as_u64().unwrap(), reference["bounds"]["max_pixels"].as_u64().unwrap());
    let p = Project::new();
    copy_data(&p);
    let eight: String =
        String::from_utf8(p.read("data/captions.jsonl")).unwrap().lines().take(8).map(|l| format!("{l}\n")).collect();
    p.write("data/captions.jsonl", eight);
    for model in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        p.write("p.toml", pipeline(model, ""));
        assert_eq!(p.run("p.toml", &[]).code(), 0);
        let default = by_id(&p.jsonl("scored.jsonl"));
        p.write("p.toml", pipeline(model, &format!("min_pixels = {min}\nmax_pixels = {max}")));
        let r = p.run("p.toml", &[]);
        assert_eq!(r.code(), 0, "{}", r.stderr());
        assert_eq!(r.status("ppl"), "ran", "the bounds are in the key");
        let bounded = by_id(&p.jsonl("scored.jsonl"));
        let mut moved = 0;
        for e in reference["models"][model].as_array().unwrap() {
            let id = e["id"].as_str().unwrap();
            let (g, w) = (bounded[id]["ppl_nll"].as_f64().unwrap(), e["mean_nll"].as_f64().unwrap());
            assert!((g - w).abs() / w < 1e-4, "{model} {id}: {g} vs transformers {w}");
            moved += usize::from(bounded[id]["ppl"] != default[id]["ppl"]);
        }
        assert!(moved >= 6, "{model}: the bounds resize most of the images, only {moved} scores moved");
    }

    // Bounds that cross, or on a model they do not apply to: one clear error each.
    p.write("p.toml", pipeline("tiny-qwen2-vl", "min_pixels = 20000\nmax_pixels = 10000"));
    let err = run_failing(&p);
    assert!(err.contains("`min_pixels` (20000) is more than `max_pixels` (10000)"), "{err}");
    p.write("p.toml", pipeline("tiny-qwen2-vl", "min_pixels = 20000"));
    let err = run_failing(&p);
    assert!(
        err.contains("min_pixels 20000 is more than max_pixels 12544") && err.contains("preprocessor_config.json"),
        "{err}"
    );
    p.write("p.toml", pipeline("tiny-llava", "max_pixels = 10000"));
    let err = run_failing(&p);
    assert!(err.contains("this model is not one") && err.contains("drop `min_pixels` and `max_pixels`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn qwen2_vl_reads_pixels_as_qwen_vl_utils_does_rgba_over_white_and_exif_ignored() {
    // Each image beside the PNG Pillow + qwen_vl_utils made of it (tests/fixtures/pixels): the
    // two must score alike, to the last digit.
    let p = Project::new();
    let pixels = points_tiny().join("../pixels");
    let mut lines = String::new();
    for (i, (src, made)) in
        [("rgba.png", "rgba_qwen_vl_utils.png"), ("exif_rotated.jpg", "exif_rotated_qwen_vl_utils.png")]
            .iter()
            .enumerate()
    {
        for (j, file) in [src, made].iter().enumerate() {
            p.write(&format!("data/{file}"), std::fs::read(pixels.join(file)).unwrap());
            let id = format!("{i}{j}");
            lines.push_str(&format!("{}\n", serde_json::json!({"id": id, "caption": "a red square", "image": file})));
        }
    }
    p.write("data/captions.jsonl", lines);
    p.write("p.toml", pipeline("tiny-qwen2-vl", ""));
    let r = p.run("p.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let scored = by_id(&p.jsonl("scored.jsonl"));
    for i in 0..2 {
        assert_eq!(scored[&format!("{i}0")]["ppl"], scored[&format!("{i}1")]["ppl"], "image {i}");
    }
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn files_under(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        out.insert(entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap());
    }
    out
}

#[test]
fn a_hugging_face_image_dataset_reads_in_place_scores_as_its_files_and_writes_back_byte_for_byte() {
    let p = Project::new();
    copy_data(&p);
    // Written by `datasets` itself (tests/fixtures/generator/hf_image_parquet.py): two files of
    // 21 rows in row groups of 8, `image` an `Image` feature with the files' bytes.
    for (name, bytes) in files_under(&points_tiny().join("hf/data")) {
        p.write(&format!("hf/data/{name}"), bytes);
    }
    let images = files_under(&p.path("data/images"));
    let image_bytes: usize = images.values().map(Vec::len).sum();

    // The records: the JSONL's, with each image a reference to its row.
    p.write(
        "read.toml",
        "[pipeline]\nname = \"r\"\n[stages.d]\nkind = \"read\"\npath = \"hf\"\n\
         [stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"records.jsonl\"\n",
    );
    let r = p.run("read.toml", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let got = p.jsonl("records.jsonl");
    let source = p.jsonl("data/captions.jsonl");
    assert_eq!(got.len(), 42);
    for (i, (g, s)) in got.iter().zip(&source).enumerate() {
        let (file, row) = (i / 21, i % 21);
        let name = s["image"].as_str().unwrap().trim_start_matches("images/");
        let image = serde_json::json!({
            "parquet": format!("train-{file:05}-of-00002.parquet"), "row": row, "column": "image", "path": name
        });
        assert_eq!(g, &serde_json::json!({ "id": s["id"], "caption": s["caption"], "image": image }));
    }
    // What reading added to the store is the records (the shards `write` concatenated).
    let records = p.read("records.jsonl").len();
    eprintln!("records {records} B for {image_bytes} B of images ({:.3}x)", records as f64 / image_bytes as f64);
    assert!((records as f64) < 1.1 * image_bytes as f64, "records {records} B vs images {image_bytes} B");

    // Scored from the Parquet rows in place: the perplexities the image files give, to the digit.
    p.write("files.toml", pipeline("tiny-llava", ""));
    let files = p.run("files.toml", &[]);
    assert_eq!(files.code(), 0, "{}", files.stderr());
    let from_files = by_id(&p.jsonl("scored.jsonl"));
    p.write("hf.toml", pipeline("tiny-llava", "").replace("data/captions.jsonl", "hf"));
    let hf = p.run("hf.toml", &[]);
    assert_eq!(hf.code(), 0, "{}", hf.stderr());
    let from_hf = by_id(&p.jsonl("scored.jsonl"));
    assert_eq!(from_hf.len(), 42);
    for (id, r) in &from_hf {
        assert_eq!(r["ppl"], from_files[id]["ppl"], "{id}");
    }

    // Back out as Parquet: `image` an `Image` column again, each value the file's bytes.
    p.write(
        "out.toml",
        "[pipeline]\nname = \"o\"\n[stages.d]\nkind = \"read\"\npath = \"hf\"\n\
         [stages.w]\nkind = \"write\"\ndata = \"d\"\npath = \"out/kept.parquet\"\n\
         [stages.t]\nkind = \"write\"\ndata = \"d\"\npath = \"tars/{shard:05}.tar\"\nimage = \"{image}\"\ntext = \"{caption}\"\n",
    );
    let out = p.run("out.toml", &[]);
    assert_eq!(out.code(), 0, "{}", out.stderr());
    let file = std::fs::File::open(p.path("out/kept.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let features = reader.schema().metadata()["huggingface"].clone();
    assert_eq!(serde_json::from_str::<Value>(&features).unwrap()["info"]["features"]["image"]["_type"], "Image");
    let mut rows = 0;
    for batch in reader.build().unwrap() {
        use arrow_array::cast::AsArray;
        let batch = batch.unwrap();
        let image = batch.column_by_name("image").unwrap().as_struct();
        let (bytes, paths) = (image.column(0).as_binary::<i32>(), image.column(1).as_string::<i32>());
        for i in 0..batch.num_rows() {
            assert_eq!(bytes.value(i), images[paths.value(i)].as_slice(), "{}", paths.value(i));
            rows += 1;
        }
    }
    assert_eq!(rows, 42);
    // And as WebDataset tars, the images copied out of the Parquet rows.
    let mut members = 0;
    for (_, tar) in files_under(&p.path("tars")) {
        for (name, data) in tar_members(&tar) {
            if let Some(key) = name.strip_suffix(".png").or_else(|| name.strip_suffix(".jpg")) {
                // Records without `__key__` are keyed by their position.
                let source = &source[key.parse::<usize>().unwrap()];
                assert_eq!(data, images[source["image"].as_str().unwrap().trim_start_matches("images/")], "{name}");
                members += 1;
            }
        }
    }
    assert_eq!(members, 42);
}

/// The members of a ustar archive (names and bytes), parsed by hand: 512-byte headers, the size
/// in octal at offset 124, data padded to 512 bytes, two zero blocks at the end.
fn tar_members(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() && tar[at..at + 512].iter().any(|b| *b != 0) {
        let header = &tar[at..at + 512];
        let name = String::from_utf8(header[..100].split(|b| *b == 0).next().unwrap().to_vec()).unwrap();
        let size = std::str::from_utf8(&header[124..136]).unwrap().trim_matches(|c: char| c == '\0' || c == ' ');
        let size = usize::from_str_radix(size, 8).unwrap();
        out.push((name, tar[at + 512..at + 512 + size].to_vec()));
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}
