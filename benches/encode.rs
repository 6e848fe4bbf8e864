//! Image-encoding throughput of the `encode` stage's path (issue #5), for the comparison with
//! transformers that `benches/encode_vs_transformers.py` drives:
//!
//! `cargo bench --bench encode -- MODEL_DIR IMAGES.json BATCH [LAYER]`
//!
//! IMAGES.json lists image paths. Each is decoded and preprocessed (timed apart: the
//! preprocessing share), then the tower runs `BATCH` images at a time up to hidden state `LAYER`
//! (default -2) and the patch tokens are taken, as `encode` does with its defaults. Prints one
//! JSON object: images/s, the two times, peak RSS, and the embeddings' sum and first values (to
//! compare with transformers').

use std::path::Path;
use std::time::Instant;

use ladle_models::vision::encoder::{ImageEncoder, Select};
use ladle_models::vision::images::load_rgb;

mod support;
use support::peak_rss;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (model, images, batch, layer) = match args.as_slice() {
        [m, i, b] => (m, i, b, -2),
        [m, i, b, l] => (m, i, b, l.parse::<i64>().expect("LAYER is an integer")),
        _ => {
            eprintln!(
                "usage: cargo bench --bench encode -- MODEL_DIR IMAGES.json BATCH [LAYER]\n(see benches/encode_vs_transformers.py)"
            );
            return;
        }
    };
    let batch: usize = batch.parse().expect("BATCH is a positive integer");
    let t = Instant::now();
    let encoder = ImageEncoder::load(Path::new(model)).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let paths: Vec<String> = serde_json::from_str(&std::fs::read_to_string(images).unwrap()).unwrap();

    let t = Instant::now();
    let pixels: Vec<Vec<f32>> =
        paths.iter().map(|p| encoder.preprocess.pixels(&load_rgb(Path::new(p)).unwrap()).unwrap()).collect();
    let preprocess_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut sum = 0f64;
    let mut first = Vec::new();
    for chunk in pixels.chunks(batch) {
        let emb = encoder.encode(chunk.concat(), chunk.len(), layer, Select::Patch).unwrap();
        let v = emb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if first.is_empty() {
            first = v[..8].to_vec();
        }
        sum += v.iter().map(|&x| x as f64).sum::<f64>();
    }
    let tower_s = t.elapsed().as_secs_f64();
    let n = paths.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "ladle", "images": paths.len(), "batch": batch,
            "images_per_s": n / (preprocess_s + tower_s),
            "preprocess_s": preprocess_s, "tower_s": tower_s,
            "preprocess_share": preprocess_s / (preprocess_s + tower_s),
            "embedding_sum": sum, "first": first, "load_s": load_s, "peak_rss_bytes": peak_rss(),
        })
    );
}
