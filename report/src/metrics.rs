//! The metrics panel: every stage whose output carries metrics (an `exec` stage's
//! `metrics = "metrics.json"`, a metrics artifact), as a table, and for each number they report
//! a bar chart of it across those stages: a sweep's expansions side by side, the ones a `choose`
//! stage kept filled, the others hollow, and the baseline it compared them with as a dashed line.
//!
//! Nested objects are flattened to dotted keys (`eval.accuracy`), as `choose`'s `metric` names
//! them; strings and booleans are shown in the table only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ladle_engine::{Artifact, Pipeline};
use serde_json::Value;

use crate::StageView;
use crate::histogram::{escape, short};

/// A stage's metrics.
pub struct Row {
    pub stage: String,
    /// Dotted key → value, in key order.
    pub values: BTreeMap<String, Value>,
    /// The `choose` stages that kept it (or kept the candidate it scored).
    pub chosen_by: Vec<String>,
    /// A `choose` stage looked at it and did not keep it.
    pub passed_over: bool,
}

/// One number across the stages reporting it.
pub struct Chart {
    pub key: String,
    pub svg: String,
}

pub struct Panel {
    pub rows: Vec<Row>,
    pub charts: Vec<Chart>,
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

pub fn panel(pipeline: &Pipeline, stages: &[StageView<'_>]) -> Panel {
    let artifact_of = |index: usize| stages.iter().find(|s| s.index == index).and_then(|s| s.artifact.clone());
    // What each `choose` kept: the positions of its candidates whose outputs are in its set,
    // mapped to the stages that carry their metrics (`scores` when connected).
    let mut chosen_by: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut looked_at: BTreeSet<usize> = BTreeSet::new();
    // (metric key, baseline stage) of each choose with `better_than`.
    let mut baselines: Vec<(String, usize, String)> = Vec::new();
    for view in stages.iter().filter(|s| s.kind == "choose") {
        let decl = &pipeline.stages[view.index];
        let Some(Artifact::Chosen { items }) = view.artifact.as_deref() else { continue };
        let kept: BTreeSet<String> = items.iter().map(|a| a.digest().to_hex()).collect();
        let candidates = decl.inputs.get("candidates").cloned().unwrap_or_default();
        let carriers = decl.inputs.get("scores").cloned().unwrap_or_else(|| candidates.clone());
        for (position, &candidate) in candidates.iter().enumerate() {
            let Some(carrier) = carriers.get(position).copied() else { continue };
            looked_at.insert(carrier);
            if artifact_of(candidate).is_some_and(|a| kept.contains(&a.digest().to_hex())) {
                chosen_by.entry(carrier).or_default().push(view.name.to_string());
            }
        }
        if let (Some(metric), Some(&[baseline])) =
            (decl.key_params["metric"].as_str(), decl.inputs.get("better_than").map(Vec::as_slice))
        {
            baselines.push((metric.to_string(), baseline, view.name.to_string()));
        }
    }
    let mut rows = Vec::new();
    let mut row_of: BTreeMap<usize, usize> = BTreeMap::new();
    for view in stages {
        let Some(metrics) = view.artifact.as_deref().and_then(Artifact::metrics) else { continue };
        let mut values = BTreeMap::new();
        flatten("", metrics, &mut values);
        let chosen = chosen_by.remove(&view.index).unwrap_or_default();
        row_of.insert(view.index, rows.len());
        rows.push(Row {
            stage: view.name.to_string(),
            passed_over: chosen.is_empty() && looked_at.contains(&view.index),
            chosen_by: chosen,
            values,
        });
    }
    let keys: BTreeSet<&String> =
        rows.iter().flat_map(|r| r.values.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k)).collect();
    let charts = keys
        .into_iter()
        .filter_map(|key| {
            let bars: Vec<(&Row, f64)> = rows.iter().filter_map(|r| Some((r, r.values.get(key)?.as_f64()?))).collect();
            let baseline = baselines.iter().find(|(metric, _, _)| metric == key).and_then(|(_, stage, chooser)| {
                let row = &rows[*row_of.get(stage)?];
                Some((row.values.get(key)?.as_f64()?, format!("{} (baseline of {chooser})", row.stage)))
            });
            (bars.len() > 1 || baseline.is_some())
                .then(|| Chart { key: key.clone(), svg: bars_svg(key, &bars, baseline) })
        })
        .collect();
    Panel { rows, charts }
}

/// One horizontal bar per stage; a dashed line at the baseline.
fn bars_svg(key: &str, bars: &[(&Row, f64)], baseline: Option<(f64, String)>) -> String {
    let (row, left, width) = (20.0, 190.0, 640.0);
    let plot = width - left - 90.0;
    let height = row * bars.len() as f64 + if baseline.is_some() { 48.0 } else { 30.0 };
    let all = || bars.iter().map(|b| b.1).chain(baseline.as_ref().map(|b| b.0));
    let (min, max) = (all().fold(f64::INFINITY, f64::min), all().fold(f64::NEG_INFINITY, f64::max));
    // A log axis when every value is positive and they span more than 10× (a diverged run's
    // perplexity beside the others'), as the histograms choose; bars start a little below the
    // smallest so that it shows.
    let log = min > 0.0 && max / min > 10.0;
    let (lo, hi) = if log { ((min / 1.5).ln(), max.ln()) } else { (min.min(0.0), max.max(0.0)) };
    let span = (hi - lo).max(1e-300);
    let x = |v: f64| left + plot * ((if log { v.ln() } else { v }) - lo) / span;
    let origin = if log { left } else { x(0.0) };
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="metric" data-key="{}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="11"><rect width="{width}" height="{height}" fill="white"/><text x="{left}" y="11" fill="#555">{}</text>"##,
        escape(key),
        escape(&if log { format!("{key} (log scale)") } else { key.to_string() })
    );
    for (i, (r, v)) in bars.iter().enumerate() {
        let y = 16.0 + row * i as f64;
        let (x0, x1) = (origin.min(x(*v)), origin.max(x(*v)));
        let (fill, class) = if !r.chosen_by.is_empty() {
            ("#4c78a8", "bar chosen")
        } else if r.passed_over {
            ("white", "bar passed-over")
        } else {
            ("#9ecae9", "bar")
        };
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect class="{class}" x="{x0:.2}" y="{y:.1}" width="{:.2}" height="{:.1}" fill="{fill}" stroke="#4c78a8"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            left - 6.0,
            y + 12.0,
            escape(&r.stage),
            (x1 - x0).max(0.5),
            row - 5.0,
            x1 + 4.0,
            y + 12.0,
            short(*v)
        );
    }
    if let Some((v, label)) = baseline {
        let bottom = 16.0 + row * bars.len() as f64;
        let _ = write!(
            s,
            r##"<line class="baseline" x1="{0:.2}" x2="{0:.2}" y1="14" y2="{bottom:.1}" stroke="#e45756" stroke-dasharray="4 3"/><text x="{0:.2}" y="{1:.1}" fill="#e45756" text-anchor="middle">{2} = {3}</text>"##,
            x(v),
            bottom + 14.0,
            escape(&label),
            short(v)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_metrics_flatten_to_the_keys_choose_reads() {
        let mut out = BTreeMap::new();
        flatten("", &serde_json::json!({"acc": 0.5, "eval": {"f1": 0.25, "set": "val"}}), &mut out);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["acc", "eval.f1", "eval.set"]);
        assert_eq!(out["eval.f1"], 0.25);
    }
}
