//! `select`: keep records by a numeric column.
//!
//! Either a fraction — `lowest = 0.2` keeps the ⌊0.2·n⌋ records with the smallest values (POINTS
//! keeps the lowest-perplexity 20%), `highest` the largest, ties broken by record order (earlier
//! wins) — or thresholds, `min` and/or `max`, inclusive. Kept records stay in their order.
//! A record without the column (or with `null`) is an error naming it, unless `missing = "drop"`.
//!
//! Two passes over the shards, both parallel: the first reads only the column (records are not
//! fully parsed), the second copies the kept lines as bytes. Memory holds one number per record.

use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::lines;
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

pub struct SelectKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data")];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Lowest(f64),
    Highest(f64),
    Range { min: Option<f64>, max: Option<f64> },
}

impl StageKind for SelectKind {
    fn name(&self) -> &'static str {
        "select"
    }
    fn about(&self) -> &'static str {
        "keep records by a numeric column: `lowest`/`highest` fraction or `min`/`max`"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let by = params.required_string("by")?;
        if by.is_empty() {
            return Err(params.error("by", "`by` names a column and cannot be empty"));
        }
        let lowest = params.fraction("lowest")?;
        let highest = params.fraction("highest")?;
        let min = params.float("min")?;
        let max = params.float("max")?;
        let rule = match (lowest, highest, min.is_some() || max.is_some()) {
            (Some(f), None, false) => Rule::Lowest(f),
            (None, Some(f), false) => Rule::Highest(f),
            (None, None, true) => {
                if let (Some(lo), Some(hi)) = (min, max)
                    && lo > hi
                {
                    return Err(params
                        .error("min", format!("`min` ({lo}) is greater than `max` ({hi}): nothing could be kept")));
                }
                Rule::Range { min, max }
            }
            (None, None, false) => {
                let mut e = params
                    .stage_error("`select` needs a rule: `lowest` or `highest` (a fraction), or `min` and/or `max`");
                e.hint = Some("for POINTS' filter: lowest = 0.2".into());
                return Err(e);
            }
            _ => {
                return Err(
                    params.stage_error("give one rule: `lowest`, `highest`, or `min`/`max` thresholds, not several")
                );
            }
        };
        let drop_missing = params.choice("missing", &["error", "drop"])?.as_deref() == Some("drop");
        params.record("missing", if drop_missing { "drop" } else { "error" }.into());
        Ok(Arc::new(Select { by, rule, drop_missing }))
    }
}

pub struct Select {
    by: String,
    rule: Rule,
    drop_missing: bool,
}

impl Stage for Select {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

/// The value of one top-level field of a JSON object, other fields skipped unparsed.
struct Column<'a>(&'a str);

#[derive(Debug, PartialEq)]
enum Cell {
    Missing,
    Number(f64),
    NotANumber(&'static str),
}

impl<'de> DeserializeSeed<'de> for Column<'_> {
    type Value = Cell;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Cell, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Column<'_> {
    type Value = Cell;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cell, A::Error> {
        let mut cell = Cell::Missing;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 {
                let v: serde_json::Value = map.next_value()?;
                cell = match v {
                    serde_json::Value::Number(n) => {
                        n.as_f64().map(Cell::Number).unwrap_or(Cell::NotANumber("a number out of range"))
                    }
                    serde_json::Value::Null => Cell::Missing,
                    other => Cell::NotANumber(ladle_engine::records::json_type(&other)),
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(cell)
    }
}

fn read_cell(line: &[u8], column: &str) -> Result<Cell, String> {
    let mut de = serde_json::Deserializer::from_slice(line);
    Column(column).deserialize(&mut de).map_err(|e| format!("invalid record: {e}"))
}

/// Indices (into `values`) of the `⌊fraction·n⌋` smallest (or largest), ties by position.
fn pick_fraction(values: &[(f64, u64)], fraction: f64, highest: bool) -> Vec<u64> {
    let k = ((fraction * values.len() as f64) + 1e-9).floor() as usize;
    let mut order: Vec<&(f64, u64)> = values.iter().collect();
    if highest {
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    } else {
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    }
    order.into_iter().take(k).map(|v| v.1).collect()
}

impl WholeStage for Select {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let shards = inputs.dataset("data")?;
        let mut first = Vec::with_capacity(shards.len());
        let mut acc = 0u64;
        for s in shards {
            first.push(acc);
            acc += s.records;
        }
        // Pass 1: the column, per shard.
        let cells: Vec<Vec<Option<f64>>> = ctx.par_map(shards.iter().enumerate().map(Ok), |_, (si, s)| {
            let bytes = ctx.read_shard(s)?;
            let mut out = Vec::with_capacity(s.records as usize);
            for (i, line) in lines(&bytes).enumerate() {
                let at = first[si] + i as u64;
                match read_cell(line, &self.by).map_err(|e| StageError::internal(format!("record {at}: {e}")))? {
                    Cell::Number(v) => out.push(Some(v)),
                    Cell::Missing if self.drop_missing => out.push(None),
                    Cell::Missing => {
                        return Err(StageError::input(format!(
                            "record {at} has no column `{}` (or it is null)",
                            self.by
                        ))
                        .with_hint("set missing = \"drop\" to drop such records, or check `by`"));
                    }
                    Cell::NotANumber(t) => {
                        return Err(StageError::input(format!(
                            "record {at}: column `{}` is {t}, not a number",
                            self.by
                        )));
                    }
                }
            }
            Ok(out)
        })?;
        // Decide.
        let mut keep: Vec<Vec<bool>> = cells.iter().map(|c| vec![false; c.len()]).collect();
        match self.rule {
            Rule::Range { min, max } => {
                for (si, c) in cells.iter().enumerate() {
                    for (i, v) in c.iter().enumerate() {
                        keep[si][i] = v.is_some_and(|v| min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m));
                    }
                }
            }
            Rule::Lowest(f) | Rule::Highest(f) => {
                let mut values = Vec::new();
                let mut position = Vec::new();
                for (si, c) in cells.iter().enumerate() {
                    for (i, v) in c.iter().enumerate() {
                        if let Some(v) = v {
                            values.push((*v, values.len() as u64));
                            position.push((si, i));
                        }
                    }
                }
                for idx in pick_fraction(&values, f, matches!(self.rule, Rule::Highest(_))) {
                    let (si, i) = position[idx as usize];
                    keep[si][i] = true;
                }
            }
        }
        drop(cells);
        // Pass 2: copy kept lines, one output shard per input shard.
        let out = ctx.par_map(shards.iter().zip(keep).map(Ok), |_, (s, keep)| {
            let bytes = ctx.read_shard(s)?;
            let (jsonl, n) = crate::keep_lines(&bytes, keep.into_iter());
            if n == 0 { Ok(None) } else { ctx.write_shard(&jsonl, n).map(Some) }
        })?;
        Ok(Artifact::Dataset { shards: out.into_iter().flatten().collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_the_column() {
        assert_eq!(read_cell(br#"{"a":{"x":[1,2]},"ppl":3.5,"z":"q"}"#, "ppl").unwrap(), Cell::Number(3.5));
        assert_eq!(read_cell(br#"{"a":1}"#, "ppl").unwrap(), Cell::Missing);
        assert_eq!(read_cell(br#"{"ppl":null}"#, "ppl").unwrap(), Cell::Missing);
        assert_eq!(read_cell(br#"{"ppl":"3"}"#, "ppl").unwrap(), Cell::NotANumber("a string"));
    }

    #[test]
    fn fraction_takes_floor_and_breaks_ties_by_order() {
        // Values by position: 5, 1, 3, 1, 2 — lowest 40% of 5 = 2 records: positions 1 and 3 (both 1).
        let v: Vec<(f64, u64)> = [5.0, 1.0, 3.0, 1.0, 2.0].iter().enumerate().map(|(i, x)| (*x, i as u64)).collect();
        assert_eq!(pick_fraction(&v, 0.4, false), vec![1, 3]);
        // Tie at the cut: lowest 20% = 1 record; of the two 1.0s the earlier wins.
        assert_eq!(pick_fraction(&v, 0.2, false), vec![1]);
        assert_eq!(pick_fraction(&v, 0.2, true), vec![0]);
        // 0.29 · 100 is 28.999… in floating point; it must still keep 29.
        let w: Vec<(f64, u64)> = (0..100).map(|i| (i as f64, i)).collect();
        assert_eq!(pick_fraction(&w, 0.29, false).len(), 29);
        assert!(pick_fraction(&w, 0.0, false).is_empty());
        assert_eq!(pick_fraction(&w, 1.0, false).len(), 100);
    }
}
