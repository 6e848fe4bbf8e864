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

use crate::column::{Cell, read_cell};
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::lines;
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};

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

/// Positions of the `⌊fraction·n⌋` smallest (or largest) present values, ties broken by
/// position (earlier wins). `values` holds NaN where a record has no value. Selection is a
/// partial sort (`select_nth_unstable`), linear on average; memory is one `u32` per record.
fn pick_fraction(values: &[f64], fraction: f64, highest: bool) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).filter(|&i| !values[i as usize].is_nan()).collect();
    let k = ((fraction * idx.len() as f64) + 1e-9).floor() as usize;
    let cmp = |a: &u32, b: &u32| {
        let (va, vb) = (values[*a as usize], values[*b as usize]);
        let by_value = if highest { vb.total_cmp(&va) } else { va.total_cmp(&vb) };
        by_value.then(a.cmp(b))
    };
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx
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
        if acc > u32::MAX as u64 {
            return Err(StageError::input(format!(
                "`select` handles up to {} records per stage; this dataset has {acc}",
                u32::MAX
            ))
            .with_hint("split the dataset with `sample` or several `read` stages"));
        }
        // Pass 1: the column, per shard; NaN marks a record without a value (JSON has no NaN).
        let per_shard: Vec<Vec<f64>> = ctx.par_map(shards.iter().enumerate().map(Ok), |_, (si, s)| {
            let bytes = ctx.read_shard(s)?;
            let mut out = Vec::with_capacity(s.records as usize);
            for (i, line) in lines(&bytes).enumerate() {
                let at = first[si] + i as u64;
                match read_cell(line, &self.by).map_err(|e| StageError::internal(format!("record {at}: {e}")))? {
                    Cell::Number(v) => out.push(v),
                    Cell::Missing if self.drop_missing => out.push(f64::NAN),
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
        let mut values: Vec<f64> = Vec::with_capacity(acc as usize);
        for v in per_shard {
            values.extend_from_slice(&v);
        }
        // Decide.
        let mut keep = vec![false; values.len()];
        match self.rule {
            Rule::Range { min, max } => {
                for (k, v) in keep.iter_mut().zip(&values) {
                    *k = !v.is_nan() && min.is_none_or(|m| *v >= m) && max.is_none_or(|m| *v <= m);
                }
            }
            Rule::Lowest(f) | Rule::Highest(f) => {
                for i in pick_fraction(&values, f, matches!(self.rule, Rule::Highest(_))) {
                    keep[i as usize] = true;
                }
            }
        }
        drop(values);
        let keep: Vec<&[bool]> =
            shards.iter().zip(&first).map(|(s, f)| &keep[*f as usize..(*f + s.records) as usize]).collect();
        // Pass 2: copy kept lines, one output shard per input shard.
        let out = ctx.par_map(shards.iter().zip(keep).map(Ok), |_, (s, keep)| {
            let bytes = ctx.read_shard(s)?;
            let (jsonl, n) = crate::keep_lines(&bytes, keep.iter().copied());
            if n == 0 { Ok(None) } else { ctx.write_shard(&jsonl, n).map(Some) }
        })?;
        Ok(Artifact::Dataset { shards: out.into_iter().flatten().collect(), root: inputs.one("data")?.root() })
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
        let sorted = |mut v: Vec<u32>| {
            v.sort();
            v
        };
        // Values by position: 5, 1, 3, 1, 2 — lowest 40% of 5 = 2 records: positions 1 and 3 (both 1).
        let v = [5.0, 1.0, 3.0, 1.0, 2.0];
        assert_eq!(sorted(pick_fraction(&v, 0.4, false)), vec![1, 3]);
        // Tie at the cut: lowest 20% = 1 record; of the two 1.0s the earlier wins.
        assert_eq!(pick_fraction(&v, 0.2, false), vec![1]);
        assert_eq!(pick_fraction(&v, 0.2, true), vec![0]);
        // Missing values (NaN) are not counted: 2 of 4 present, 50% = 1.
        assert_eq!(pick_fraction(&[f64::NAN, 4.0, f64::NAN, 3.0], 0.5, false), vec![3]);
        // 0.29 · 100 is 28.999… in floating point; it must still keep 29.
        let w: Vec<f64> = (0..100).map(|i| ((i * 37) % 100) as f64).collect();
        let low = sorted(pick_fraction(&w, 0.29, false));
        assert_eq!(low.len(), 29);
        assert!(low.iter().all(|&i| w[i as usize] < 29.0));
        assert!(pick_fraction(&w, 0.0, false).is_empty());
        assert_eq!(pick_fraction(&w, 1.0, false).len(), 100);
    }
}
