//! The engine benchmark of issue #2: read → select (lowest 20%) → write over 1,000,000 JSONL
//! records of ~200 bytes, run cold and warm, beside baselines measured in the same process:
//!
//! - `read`: reading the file once (the page-cache read limit);
//! - `naive`: a plain single-pass Rust program doing the same job with serde_json and no cache,
//!   what one would write by hand.
//!
//! `cargo bench --bench engine [-- RECORDS]` prints MB/s, the ratios and the peak memory the run
//! records report (for two sizes, to show memory does not grow with the record count).

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const PIPELINE: &str = r#"
[pipeline]
name = "bench"

[stages.captions]
kind = "read"
path = "captions.jsonl"

[stages.keep]
kind = "select"
data = "captions"
by = "ppl"
lowest = 0.2

[stages.out]
kind = "write"
data = "keep"
path = "out.jsonl"
"#;

fn generate(path: &Path, n: usize) -> u64 {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let words = ["a", "dog", "on", "the", "red", "mat", "near", "two", "small", "birds", "under", "bright", "sky"];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..n {
        let mut caption = String::new();
        while caption.len() < 110 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            caption.push_str(words[(x % words.len() as u64) as usize]);
            caption.push(' ');
        }
        let ppl = (x >> 11) as f64 / (1u64 << 53) as f64 * 100.0;
        writeln!(
            f,
            r#"{{"id":"img-{i:08}","caption":"{}","image":"images/{i:08}.jpg","ppl":{ppl:.6}}}"#,
            caption.trim_end()
        )
        .unwrap();
    }
    f.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

fn naive(input: &Path, output: &Path) {
    let f = std::io::BufReader::new(std::fs::File::open(input).unwrap());
    let mut rows: Vec<(f64, usize, String)> = Vec::new();
    for (i, line) in f.lines().enumerate() {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        rows.push((v["ppl"].as_f64().unwrap(), i, line));
    }
    let k = rows.len() / 5;
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| rows[a].0.total_cmp(&rows[b].0).then(a.cmp(&b)));
    let mut keep = vec![false; rows.len()];
    for &i in &order[..k] {
        keep[i] = true;
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(output).unwrap());
    for (i, r) in rows.iter().enumerate() {
        if keep[i] {
            writeln!(out, "{}", r.2).unwrap();
        }
    }
    out.into_inner().unwrap().sync_all().unwrap();
}

fn ladle(dir: &Path) -> (f64, serde_json::Value) {
    let t = Instant::now();
    let out =
        Command::new(env!("CARGO_BIN_EXE_ladle")).args(["run", "p.toml", "--json"]).current_dir(dir).output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "summary")
        .unwrap();
    (secs, summary)
}

fn bench(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("captions.jsonl");
    let bytes = generate(&input, n);
    std::fs::write(dir.path().join("p.toml"), PIPELINE).unwrap();
    let mb = bytes as f64 / 1e6;
    println!("{n} records, {mb:.1} MB of JSONL ({:.0} bytes/record)", bytes as f64 / n as f64);

    let t = Instant::now();
    let read = std::fs::read(&input).unwrap().len();
    let read_s = t.elapsed().as_secs_f64();
    assert_eq!(read as u64, bytes);
    let t = Instant::now();
    naive(&input, &dir.path().join("naive.jsonl"));
    let naive_s = t.elapsed().as_secs_f64();

    let (cold_s, cold) = ladle(dir.path());
    let (warm_s, warm) = ladle(dir.path());
    assert!(warm["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"));
    let mib = |v: &serde_json::Value| v["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    println!("  baseline read      {read_s:>7.3} s  {:>7.0} MB/s", mb / read_s);
    println!("  baseline naive     {naive_s:>7.3} s  {:>7.0} MB/s  (single pass, no cache)", mb / naive_s);
    println!(
        "  ladle cold run     {cold_s:>7.3} s  {:>7.0} MB/s  = {:.2}x naive   peak RSS {:.0} MiB",
        mb / cold_s,
        naive_s / cold_s,
        mib(&cold)
    );
    println!(
        "  ladle warm rerun   {warm_s:>7.3} s  = {:.2}% of the cold run       peak RSS {:.0} MiB",
        100.0 * warm_s / cold_s,
        mib(&warm)
    );
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    bench(n / 4);
    bench(n);
}
