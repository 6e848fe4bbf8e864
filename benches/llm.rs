//! Perplexity-scoring throughput of ladle's own forward pass (issue #4), for the comparison with
//! transformers that `benches/llm_vs_transformers.py` drives:
//!
//! `cargo bench --bench llm -- MODEL_DIR TOKENS.json BATCH[,BATCH...]`
//!
//! TOKENS.json is a list of token-id lists (the same the Python side scores); each is scored in
//! text mode (every position after the first). Prints one JSON object per batch size: tokens/s,
//! seconds, the checksum of all NLLs (to compare with transformers'), and peak RSS.

use std::path::Path;
use std::time::Instant;

use ladle_models::llm::{LanguageModel, Scorer, Sequence};

mod support;
use support::peak_rss;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [model, tokens, batches] = args.as_slice() else {
        eprintln!(
            "usage: cargo bench --bench llm -- MODEL_DIR TOKENS.json BATCH[,BATCH...]\n(see benches/llm_vs_transformers.py)"
        );
        return;
    };
    let t = Instant::now();
    let m = LanguageModel::load(Path::new(model)).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let ids: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(tokens).unwrap()).unwrap();
    let seqs: Vec<Sequence> = ids.into_iter().map(|ids| Sequence { ids, score_from: 1 }).collect();
    let scored: usize = seqs.iter().map(|s| s.ids.len() - 1).sum();
    let scorer = Scorer { decoder: &m.decoder, pad: 0 };
    for b in batches.split(',').map(|b| b.parse::<usize>().unwrap()) {
        let t = Instant::now();
        let mut nll = 0.0;
        for chunk in seqs.chunks(b) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            nll += scorer.score_batch(&refs).unwrap().iter().map(|s| s.nll_sum).sum::<f64>();
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"impl": "ladle", "batch": b, "seconds": secs, "tokens_per_s": scored as f64 / secs,
                               "nll_sum": nll, "scored_tokens": scored, "load_s": load_s, "peak_rss_bytes": peak_rss()})
        );
    }
}
