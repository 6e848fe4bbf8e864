//! Model-soup averaging throughput (issue #6), for the comparison that `benches/soup_vs_torch.py`
//! drives:
//!
//! `cargo bench --bench soup -- OUT_DIR INGREDIENT_DIR...`
//!
//! Averages the ingredients uniformly with the `soup` stage's streaming averager into OUT_DIR
//! (one shard per 5 GB, as the stage's default) and prints one JSON object: input bytes,
//! seconds, GB/s of input, and peak RSS.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ladle_models::soup::average::write_soup;
use ladle_models::soup::checkpoint::{Checkpoint, check_compatible};

mod support;
use support::peak_rss;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [out, ingredients @ ..] = args.as_slice() else {
        eprintln!("usage: cargo bench --bench soup -- OUT_DIR INGREDIENT_DIR... (see benches/soup_vs_torch.py)");
        return;
    };
    if ingredients.is_empty() {
        eprintln!("usage: cargo bench --bench soup -- OUT_DIR INGREDIENT_DIR...");
        return;
    }
    let t = Instant::now();
    let cks: Vec<Checkpoint> = ingredients.iter().map(|d| Checkpoint::open(Path::new(d)).unwrap()).collect();
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    check_compatible(&refs).unwrap();
    let input: u64 =
        cks.iter().flat_map(|c| c.files.iter()).map(|f: &PathBuf| std::fs::metadata(f).unwrap().len()).sum();
    let out = Path::new(out);
    std::fs::create_dir_all(out).unwrap();
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    write_soup(&refs, &vec![1.0; refs.len()], out, 5_000_000_000, &meta).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"impl": "ladle", "input_bytes": input, "seconds": secs,
                           "input_gb_per_s": input as f64 / secs / 1e9, "peak_rss_bytes": peak_rss()})
    );
}
