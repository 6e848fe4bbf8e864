//! Numeric columns a stage added: their histogram, the cut of a `select` downstream, and the
//! records at both ends (POINTS' finding that the high-perplexity end is serial numbers and part
//! codes is one look at this panel).
//!
//! A column is "added" by a stage when its output's first record has it as a number and the
//! first record of its input has not. Values come from one pass over the stage's shards that reads
//! only that column ([`ladle_stages::column`]), shards in parallel; the records at the ends are
//! parsed, and their images decoded and shrunk, only for the few shown.

use std::path::PathBuf;

use ladle_engine::records::{lines, parse_record};
use ladle_engine::{Artifact, Pipeline, ShardRef, Store};
use ladle_stages::column::{Cell, read_cell};
use serde_json::{Map, Value};

use crate::histogram::{self, Cut, Histogram};
use crate::{Options, StageView};

/// One column's panel.
pub struct Panel {
    pub stage: String,
    pub column: String,
    pub histogram: Option<Histogram>,
    pub cuts: Vec<Cut>,
    pub svg: Option<String>,
    /// Values that were not numbers, by JSON type, and records without the column.
    pub not_numbers: Vec<(&'static str, u64)>,
    pub missing: u64,
    pub lowest: Vec<Shown>,
    pub highest: Vec<Shown>,
    /// Why there is no histogram, when there is none.
    pub note: Option<String>,
}

/// A record shown at one end of a column.
pub struct Shown {
    pub value: f64,
    /// Its position in the stage's output.
    pub position: u64,
    pub text: String,
    /// A small JPEG as a `data:` URI, when the record has an image that decodes.
    pub thumbnail: Option<String>,
}

/// The column's values over a dataset, in record order (NaN where a record has none), and what
/// was not a number.
pub struct Values {
    pub values: Vec<f64>,
    pub not_numbers: Vec<(&'static str, u64)>,
    pub missing: u64,
}

/// Reads `column` from every record of `shards`, shards on several threads.
pub fn read_values(store: &Store, shards: &[ShardRef], column: &str) -> anyhow::Result<Values> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(shards.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    type ShardCells = Vec<(usize, Vec<Cell>)>;
    let results: Vec<anyhow::Result<ShardCells>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(shard) = shards.get(i) else { return Ok(out) };
                        let bytes = store.get(&shard.digest)?;
                        let cells: Result<Vec<Cell>, String> = lines(&bytes).map(|l| read_cell(l, column)).collect();
                        out.push((i, cells.map_err(|e| anyhow::anyhow!("shard {i}: {e}"))?));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a reader thread panicked"))))
            .collect()
    });
    let mut per_shard: Vec<(usize, Vec<Cell>)> = Vec::with_capacity(shards.len());
    for r in results {
        per_shard.extend(r?);
    }
    per_shard.sort_by_key(|(i, _)| *i);
    let mut values = Vec::new();
    let mut not_numbers: Vec<(&'static str, u64)> = Vec::new();
    let mut missing = 0;
    for (_, cells) in per_shard {
        for cell in cells {
            values.push(match cell {
                Cell::Number(v) => v,
                Cell::Missing => {
                    missing += 1;
                    f64::NAN
                }
                Cell::NotANumber(t) => {
                    match not_numbers.iter_mut().find(|(k, _)| *k == t) {
                        Some((_, n)) => *n += 1,
                        None => not_numbers.push((t, 1)),
                    }
                    f64::NAN
                }
            });
        }
    }
    Ok(Values { values, not_numbers, missing })
}

/// The numeric fields of a dataset's first record.
fn numeric_fields(store: &Store, artifact: &Artifact) -> Option<Vec<String>> {
    let first = first_record(store, artifact)?;
    Some(first.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone()).collect())
}

fn first_record(store: &Store, artifact: &Artifact) -> Option<Map<String, Value>> {
    let Artifact::Dataset { shards, .. } = artifact else { return None };
    let bytes = store.get(&shards.iter().find(|s| s.records > 0)?.digest).ok()?;
    parse_record(lines(&bytes).next()?).ok()
}

/// The panels of every column any stage added.
pub fn panels(pipeline: &Pipeline, store: &Store, stages: &[StageView<'_>], options: &Options) -> Vec<Panel> {
    let mut out = Vec::new();
    for view in stages {
        let Some(artifact) = &view.artifact else { continue };
        let Artifact::Dataset { .. } = &**artifact else { continue };
        let decl = &pipeline.stages[view.index];
        // Its dataset input: the first port's first stage that made a dataset.
        let input = decl
            .inputs
            .values()
            .flatten()
            .find_map(|src| stages.iter().find(|s| s.index == *src).and_then(|s| s.artifact.clone()));
        let Some(input) = input else { continue };
        let Some(before) = first_record(store, &input).map(|r| r.keys().cloned().collect::<Vec<_>>()) else {
            continue;
        };
        let Some(after) = numeric_fields(store, artifact) else { continue };
        for column in after.into_iter().filter(|c| !before.contains(c)) {
            out.push(panel(pipeline, store, stages, view, &column, options));
        }
    }
    out
}

/// One column's panel, or a panel saying why it cannot be drawn.
pub fn panel(
    pipeline: &Pipeline,
    store: &Store,
    stages: &[StageView<'_>],
    view: &StageView<'_>,
    column: &str,
    options: &Options,
) -> Panel {
    let mut panel = Panel {
        stage: view.name.to_string(),
        column: column.to_string(),
        histogram: None,
        cuts: Vec::new(),
        svg: None,
        not_numbers: Vec::new(),
        missing: 0,
        lowest: Vec::new(),
        highest: Vec::new(),
        note: None,
    };
    let Some(Artifact::Dataset { shards, root }) = view.artifact.as_deref() else {
        panel.note = Some(format!("`{}` has no dataset output in this run", view.name));
        return panel;
    };
    let values = match read_values(store, shards, column) {
        Ok(v) => v,
        Err(e) => {
            panel.note = Some(format!("cannot read `{column}`: {e}"));
            return panel;
        }
    };
    panel.not_numbers = values.not_numbers.clone();
    panel.missing = values.missing;
    let Some(h) = Histogram::of(&values.values, options.bins) else {
        panel.note = Some(format!("`{column}` holds no numbers in `{}`'s output", view.name));
        return panel;
    };
    panel.cuts = cuts(pipeline, stages, view, column, &values.values);
    panel.svg = Some(histogram::svg(&h, column, panel.cuts.first(), 720.0, 260.0));
    panel.histogram = Some(h);
    // The records at both ends, ties by position (earlier first).
    let mut order: Vec<u32> =
        (0..values.values.len() as u32).filter(|&i| values.values[i as usize].is_finite()).collect();
    let by = |a: &u32, b: &u32| values.values[*a as usize].total_cmp(&values.values[*b as usize]).then(a.cmp(b));
    let n = options.extremes.min(order.len());
    let mut lowest: Vec<u32> = order.clone();
    if n > 0 && n < lowest.len() {
        lowest.select_nth_unstable_by(n - 1, by);
        lowest.truncate(n);
    }
    lowest.sort_by(by);
    let highest_by = |a: &u32, b: &u32| by(b, a).then(a.cmp(b));
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, highest_by);
        order.truncate(n);
    }
    order.sort_by(highest_by);
    let scorer = &pipeline.stages[view.index].key_params;
    let root = root.as_ref().map(|r| pipeline.dir.join(r));
    panel.lowest = shown(store, shards, &lowest[..n.min(lowest.len())], &values.values, scorer, root.clone());
    panel.highest = shown(store, shards, &order[..n.min(order.len())], &values.values, scorer, root);
    panel
}

/// Where `select` stages reading `view`'s output by `column` cut it.
fn cuts(pipeline: &Pipeline, stages: &[StageView<'_>], view: &StageView<'_>, column: &str, values: &[f64]) -> Vec<Cut> {
    let mut out = Vec::new();
    let total = values.iter().filter(|v| v.is_finite()).count();
    for s in stages.iter().filter(|s| s.kind == "select") {
        let decl = &pipeline.stages[s.index];
        if !decl.inputs.get("data").is_some_and(|srcs| srcs.contains(&view.index)) {
            continue;
        }
        let p = &decl.key_params;
        if p.get("by").and_then(Value::as_str) != Some(column) {
            continue;
        }
        let kept = s.record.and_then(|r| r.records);
        let share = |kept: Option<u64>| match kept {
            Some(k) if total > 0 => {
                format!("`{}` kept {k} of {total} ({:.1}%)", s.name, 100.0 * k as f64 / total as f64)
            }
            _ => format!("`{}` (not in this run)", s.name),
        };
        let nth = |k: usize, highest: bool| -> Option<f64> {
            let mut v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
            if k == 0 || k > v.len() {
                return None;
            }
            let cmp = |a: &f64, b: &f64| if highest { b.total_cmp(a) } else { a.total_cmp(b) };
            Some(*v.select_nth_unstable_by(k - 1, cmp).1)
        };
        // As `select` counts: ⌊fraction · n⌋ of the records with a value.
        let k_of = |f: f64| ((f * total as f64) + 1e-9).floor() as usize;
        if let Some(f) = p.get("lowest").and_then(Value::as_f64) {
            if let Some(at) = nth(k_of(f), false) {
                out.push(Cut {
                    at, keeps_below: true, label: format!("≤ {}: {}", histogram::short(at), share(kept))
                });
            }
        } else if let Some(f) = p.get("highest").and_then(Value::as_f64) {
            if let Some(at) = nth(k_of(f), true) {
                out.push(Cut {
                    at, keeps_below: false, label: format!("≥ {}: {}", histogram::short(at), share(kept))
                });
            }
        } else {
            if let Some(at) = p.get("max").and_then(Value::as_f64) {
                out.push(Cut {
                    at,
                    keeps_below: true,
                    label: format!("max {}: {}", histogram::short(at), share(kept)),
                });
            }
            if let Some(at) = p.get("min").and_then(Value::as_f64) {
                out.push(Cut {
                    at,
                    keeps_below: false,
                    label: format!("min {}: {}", histogram::short(at), share(kept)),
                });
            }
        }
    }
    out
}

/// The records at `positions` (of the dataset `shards`), with the text the scoring stage scored
/// (its `text` template) and a thumbnail of the image it looked at (its `image`).
fn shown(
    store: &Store,
    shards: &[ShardRef],
    positions: &[u32],
    values: &[f64],
    scorer: &Value,
    root: Option<PathBuf>,
) -> Vec<Shown> {
    let text = scorer.get("text").and_then(Value::as_str).and_then(|t| ladle_stages::template::Template::parse(t).ok());
    let image =
        scorer.get("image").and_then(Value::as_str).and_then(|t| ladle_stages::image_source::ImageField::parse(t).ok());
    let mut starts = Vec::with_capacity(shards.len());
    let mut first = 0u64;
    for s in shards {
        starts.push(first);
        first += s.records;
    }
    let mut out = Vec::new();
    let mut cache: Option<(usize, Vec<u8>)> = None;
    for &p in positions {
        let p = p as u64;
        let shard = starts.partition_point(|&s| s <= p).saturating_sub(1);
        if cache.as_ref().is_none_or(|(i, _)| *i != shard) {
            let Ok(bytes) = store.get(&shards[shard].digest) else { continue };
            cache = Some((shard, bytes));
        }
        let (_, bytes) = cache.as_ref().expect("set above");
        let Some(line) = lines(bytes).nth((p - starts[shard]) as usize) else { continue };
        let Ok(record) = parse_record(line) else { continue };
        let text = match &text {
            Some(t) => t.render(&record).unwrap_or_default(),
            None => record.values().filter_map(Value::as_str).collect::<Vec<_>>().join(" · "),
        };
        let thumbnail =
            image.as_ref().and_then(|f| f.locate(&record, root.as_deref()).ok()).and_then(|i| thumbnail(&i));
        out.push(Shown { value: values[p as usize], position: p, text, thumbnail });
    }
    out
}

/// The image shrunk to at most 96 pixels a side, as a JPEG `data:` URI.
fn thumbnail(image: &ladle_stages::image_source::ImageRef) -> Option<String> {
    use base64::Engine;
    let rgb = image.load().ok()?;
    let small = image::DynamicImage::ImageRgb8(rgb).thumbnail(96, 96);
    let mut jpeg = Vec::new();
    small.to_rgb8().write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).ok()?;
    Some(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg)))
}
