//! pipelines/points-recipe.toml, the whole of POINTS in one file, runs end to end on the bundled
//! fixtures; its evaluations agree with transformers' values for the same checkpoints; a second
//! run computes nothing.

use std::path::Path;

use crate::common::{Project, expected};

#[test]
fn the_points_recipe_runs_end_to_end_and_its_second_run_computes_nothing() {
    let pipeline = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/points-recipe.toml");
    let pipeline = pipeline.to_str().unwrap();
    let p = Project::new();
    let store = p.path("store");
    let store = store.to_str().unwrap();
    let first = p.run(pipeline, &["--store", store]);
    assert_eq!(first.code(), 0, "{}", first.stderr());
    assert!(first.statuses().iter().all(|s| s.ends_with("=ran")), "{:?}", first.statuses());
    assert_eq!(first.stage("pretrain")["records"], 8, "the lowest 20% of 42 captions");

    // The baseline fine-tune is ft0 itself, the lvis one the mean of ft0 and ft2: their held-out
    // perplexities are transformers' (float64) for those weights, here in float32.
    let soup = &expected()["soup"];
    let metric = |stage: &str| -> f64 {
        let out = p.ladle(&["show", pipeline, stage, "--store", store]);
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text.lines().find(|l| l.starts_with("metrics:")).unwrap_or_else(|| panic!("{text}"));
        let json: serde_json::Value = serde_json::from_str(line.trim_start_matches("metrics:").trim()).unwrap();
        json["ppl"].as_f64().unwrap()
    };
    let close = |got: f64, want: f64| (got - want).abs() / want < 1e-5;
    let baseline = metric("eval_baseline");
    assert!(close(baseline, soup["single_heldout_ppl"][0].as_f64().unwrap()), "{baseline}");
    let lvis = metric("eval.lvis");
    let trace = soup["greedy_trace"].as_array().unwrap();
    assert_eq!(trace[1]["try"], 2, "the fixture's second greedy step is the mean of ft0 and ft2");
    assert!(close(lvis, trace[1]["score"].as_f64().unwrap()), "{lvis}");
    assert!(metric("eval.sharegpt") < baseline && metric("eval.docvqa") > baseline);

    // Individual select keeps the two candidates whose fine-tune beats the baseline's, in order;
    // ft3 (docvqa's stand-in) diverged.
    let show = String::from_utf8(p.ladle(&["show", pipeline, "pick", "--store", store]).stdout).unwrap();
    let chosen: Vec<&str> = show.lines().filter_map(|l| l.strip_prefix("  model    ")).collect();
    let short = |stage: &str| first.stage(stage)["artifact"].as_str().unwrap()[..12].to_string();
    assert_eq!(chosen, [short("ft.sharegpt"), short("ft.lvis")], "{show}");
    assert!(show.contains("chosen: 2 of 3: 0, 1"), "{show}");
    // The soup was made of them: its trace tried both.
    let soup_log = String::from_utf8(p.ladle(&["show", pipeline, "soup", "--store", store]).stdout).unwrap();
    assert!(soup_log.contains("greedy: try ingredient 1:"), "{soup_log}");

    // The report plots the metrics, with what `pick` kept and the baseline it beat.
    let html = p.path("report.html");
    let report = p.ladle(&["report", pipeline, "--store", store, "-o", html.to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let html = std::fs::read_to_string(html).unwrap();
    assert!(html.contains("<tr><td>eval.sharegpt</td><td>nll = "), "{html}");
    assert!(html.contains("</td><td>kept by pick</td></tr><tr><td>eval.lvis</td>"));
    assert!(html.contains("<tr><td>eval.docvqa</td>") && html.contains("</td><td>not kept</td></tr>"));
    let ppl_chart = html.split("data-key=\"ppl\"").nth(1).and_then(|c| c.split("</svg>").next()).unwrap();
    assert_eq!(ppl_chart.matches("class=\"bar chosen\"").count(), 2, "{ppl_chart}");
    assert_eq!(ppl_chart.matches("class=\"bar passed-over\"").count(), 1, "{ppl_chart}");
    assert!(ppl_chart.contains("(log scale)") && ppl_chart.contains("eval_baseline (baseline of pick) = 42.4"));

    let second = p.run(pipeline, &["--store", store]);
    assert_eq!(second.code(), 0, "{}", second.stderr());
    assert!(second.statuses().iter().all(|s| s.ends_with("=cached")), "{:?}", second.statuses());
}
