//! Image-conditioned scoring throughput with Qwen2-VL (issue #12), for the comparison with
//! transformers that `benches/qwen2vl_vs_transformers.py` drives:
//!
//! `cargo bench --bench qwen2vl -- MODEL_DIR RECORDS.json BATCH`
//!
//! RECORDS.json: `{"prompt": ..., "records": [{"image": path, "caption": ...}]}`. Every record is
//! read, fetched and patched as the `perplexity` stage does (timed apart: the preparation), then
//! scored `BATCH` records at a time with POINTS' semantics (the images of a batch in one tower
//! pass). Prints one JSON object: records/s, the preparation / vision / language times, the sum
//! of the mean NLLs (to compare with transformers'), and peak RSS.

use std::path::Path;
use std::time::Instant;

use ladle_models::qwen2_vl::Qwen2Vl;
use ladle_models::qwen2_vl::processor::RGB_CONVENTION;
use ladle_models::vision::images::load_rgb_as;

mod support;
use support::peak_rss;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [model, records, batch] = args.as_slice() else {
        eprintln!(
            "usage: cargo bench --bench qwen2vl -- MODEL_DIR RECORDS.json BATCH\n(see benches/qwen2vl_vs_transformers.py)"
        );
        return;
    };
    let batch: usize = batch.parse().expect("BATCH is a positive integer");
    let t = Instant::now();
    let vlm = Qwen2Vl::load(Path::new(model)).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(records).unwrap()).unwrap();
    let prompt = spec["prompt"].as_str().unwrap();
    let records = spec["records"].as_array().unwrap();

    let t = Instant::now();
    let items: Vec<_> = records
        .iter()
        .map(|r| {
            let image = load_rgb_as(Path::new(r["image"].as_str().unwrap()), RGB_CONVENTION).unwrap();
            vlm.prepare(&image, prompt, r["caption"].as_str().unwrap()).unwrap()
        })
        .collect();
    let prepare_s = t.elapsed().as_secs_f64();
    let (mut vision_s, mut language_s, mut nll) = (0.0, 0.0, Vec::new());
    for chunk in items.chunks(batch.max(1)) {
        let refs: Vec<_> = chunk.iter().collect();
        let (scores, times) = vlm.score_prepared_timed(&refs).unwrap();
        vision_s += times.vision_s;
        language_s += times.language_s;
        nll.extend(scores.iter().map(|s| s.mean_nll()));
    }
    let seconds = prepare_s + vision_s + language_s;
    let image_tokens: usize = items.iter().map(|i| i.image_tokens).sum();
    println!(
        "{}",
        serde_json::json!({"impl": "ladle", "batch": batch, "records": items.len(), "seconds": seconds,
                           "records_per_s": items.len() as f64 / seconds, "prepare_s": prepare_s,
                           "vision_s": vision_s, "language_s": language_s, "mean_nll": nll,
                           "image_tokens": image_tokens, "load_s": load_s, "peak_rss_bytes": peak_rss()})
    );
}
