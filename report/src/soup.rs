//! A soup's panel: its ingredients (the model stages feeding it) with their metric and weight,
//! the greedy trace (each try: the pool it made, its score, kept or not) and the weights as bars,
//! all from the `soup.json` the stage wrote.

use std::fmt::Write as _;

use ladle_engine::{Artifact, Store};
use serde_json::Value;

use crate::StageView;
use crate::histogram::{escape, short};

pub struct Panel {
    pub stage: String,
    /// `soup.json` as the stage wrote it.
    pub summary: Option<Value>,
    /// The ingredients' names: the stages feeding `models`, in order.
    pub names: Vec<String>,
    /// Each try of the greedy trace with the pool it scored (ingredient positions).
    pub tries: Vec<Try>,
    pub svg: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Try {
    pub ingredient: usize,
    pub pool: Vec<usize>,
    pub score: f64,
    pub kept: bool,
}

/// Reads a file of a folder artifact: from the store, or from its folder outside it.
fn folder_file(store: &Store, artifact: &Artifact, name: &str) -> Option<Vec<u8>> {
    let Artifact::Folder { files, external, .. } = artifact else { return None };
    let f = files.iter().find(|f| f.path == name)?;
    match external {
        Some(dir) => std::fs::read(dir.join(name)).ok(),
        None => store.get(&f.digest).ok(),
    }
}

pub fn panel(store: &Store, view: &StageView<'_>, names: Vec<String>) -> Panel {
    let mut panel =
        Panel { stage: view.name.to_string(), summary: None, names, tries: Vec::new(), svg: None, note: None };
    let Some(artifact) = &view.artifact else {
        panel.note = Some(format!("`{}` has no output in this run", view.name));
        return panel;
    };
    let Some(summary) =
        folder_file(store, artifact, "soup.json").and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        panel.note = Some(format!("`{}`'s output has no readable soup.json", view.name));
        return panel;
    };
    let mut pool = Vec::new();
    for t in summary["greedy_trace"].as_array().into_iter().flatten() {
        let (Some(ingredient), Some(score), Some(kept)) =
            (t["ingredient"].as_u64(), t["score"].as_f64(), t["kept"].as_bool())
        else {
            continue;
        };
        let ingredient = ingredient as usize;
        let mut tried = pool.clone();
        tried.push(ingredient);
        if kept {
            pool = tried.clone();
        }
        panel.tries.push(Try { ingredient, pool: tried, score, kept });
    }
    let weights: Vec<f64> =
        summary["ingredients"].as_array().into_iter().flatten().map(|i| i["weight"].as_f64().unwrap_or(0.0)).collect();
    if !weights.is_empty() {
        panel.svg = Some(weights_svg(&panel.names, &weights));
    }
    panel.summary = Some(summary);
    panel
}

/// The chosen weights as horizontal bars, one per ingredient.
fn weights_svg(names: &[String], weights: &[f64]) -> String {
    let (row, left, width) = (22.0, 150.0, 520.0);
    let height = row * weights.len() as f64 + 30.0;
    let max = weights.iter().copied().fold(0.0, f64::max).max(1e-12);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="weights" viewBox="0 0 {width} {height}" width="{width}" height="{height}" font-family="sans-serif" font-size="11"><rect width="{width}" height="{height}" fill="white"/>"#
    );
    for (i, w) in weights.iter().enumerate() {
        let y = 10.0 + row * i as f64;
        let name = names.get(i).cloned().unwrap_or_else(|| format!("model {i}"));
        let bar = (width - left - 60.0) * w / max;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect class="weight" x="{left}" y="{y:.1}" width="{bar:.2}" height="{:.1}" fill="#72b7b2"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            left - 6.0,
            y + 13.0,
            escape(&name),
            row - 6.0,
            left + bar + 4.0,
            y + 13.0,
            short(*w)
        );
    }
    s.push_str("</svg>");
    s
}
