//! Plugin throughput (issue #3): the `min-words` example plugin against the same logic as native
//! Rust, over the same 1,000,000 caption records, side by side in one process, both on one thread.
//! Also the per-call overhead of the host (an empty batch, a one-record batch).
//!
//! `cargo bench --bench plugins [-- RECORDS]` (builds the example plugins first).

use std::time::Instant;

use ladle_plugins::host::{Limits, Plugin, Verdict};

#[path = "../tests/common/wasm.rs"]
mod wasm;

fn records(n: usize) -> Vec<String> {
    let words = ["a", "dog", "on", "the", "red", "mat", "near", "two", "small", "birds", "under", "bright", "sky"];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 12) as usize + 1;
            let caption: Vec<&str> = (0..len).map(|k| words[(x as usize >> k) % words.len()]).collect();
            format!(
                r#"{{"caption":"{}","id":"img-{i:08}","image":"images/{i:08}.jpg","ppl":{}}}"#,
                caption.join(" "),
                x % 10000
            )
        })
        .collect()
}

/// The plugin's rule (plugins/examples/min-words), natively.
fn native(records: &[String], min: usize) -> usize {
    records
        .iter()
        .filter(|r| {
            let v: serde_json::Value = serde_json::from_str(r).unwrap();
            v["caption"].as_str().unwrap().split_whitespace().count() >= min
        })
        .count()
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let wasm = wasm::wasm_dir("plugins/examples").join("min_words.wasm");
    let recs = records(n);
    let bytes: usize = recs.iter().map(|r| r.len()).sum();
    println!("{n} records, {:.1} MB of JSON", bytes as f64 / 1e6);

    let t = Instant::now();
    let kept_native = native(&recs, 4);
    let native_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let plugin = Plugin::load(&wasm, Limits::default()).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let mut instance = plugin.instantiate(r#"{"min_words":4}"#).unwrap();
    let t = Instant::now();
    let mut kept_plugin = 0;
    for (i, batch) in recs.chunks(256).enumerate() {
        let verdicts = instance.filter(batch, &i.to_le_bytes()).unwrap();
        kept_plugin += verdicts.iter().filter(|v| matches!(v, Verdict::Keep)).count();
    }
    let plugin_s = t.elapsed().as_secs_f64();
    assert_eq!(kept_native, kept_plugin, "the plugin and the native rule disagree");

    let calls = 20_000;
    let t = Instant::now();
    for _ in 0..calls {
        instance.filter(&[], b"empty").unwrap();
    }
    let empty_us = t.elapsed().as_secs_f64() / calls as f64 * 1e6;
    let one = [recs[0].clone()];
    let t = Instant::now();
    for _ in 0..calls {
        instance.filter(&one, b"one").unwrap();
    }
    let one_us = t.elapsed().as_secs_f64() / calls as f64 * 1e6;

    println!("  native rule    {native_s:>7.3} s  {:>10.0} records/s", n as f64 / native_s);
    println!(
        "  plugin         {plugin_s:>7.3} s  {:>10.0} records/s  = {:.2}x native (batches of 256; compile once: {load_s:.2} s)",
        n as f64 / plugin_s,
        native_s / plugin_s
    );
    println!("  call overhead  {empty_us:>7.2} µs per call with an empty batch, {one_us:.2} µs with one record");
    println!("  kept {kept_plugin} of {n} (both)");
}
