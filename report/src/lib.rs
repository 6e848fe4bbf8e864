//! `ladle report`: what a run did and what its data looks like, as one self-contained HTML file
//! (inline SVG and thumbnails, no network, no script) and, on request, each figure on its own.
//!
//! Everything comes from the store and the run records: nothing is recomputed. A report is of one
//! run (the pipeline's latest, or `--run N`); its stages' outputs are the artifacts that run
//! recorded. Panels:
//! - the DAG ([`dag`]), each stage coloured by status with its time, records in → out and shards;
//! - for every numeric column a stage added to the records it passed on (`perplexity`'s `ppl`),
//!   a histogram ([`histogram`]) with the cut of a `select` downstream and the share it keeps, and
//!   the lowest and highest records with their text and image ([`columns`]);
//! - for a `soup`, its ingredients, greedy trace and weights ([`soup`]);
//! - the metrics stages reported (an `exec`'s `metrics`), each number across the stages that
//!   report it, with what a `choose` kept and its baseline ([`metrics`]);
//! - the run's timeline: stages and their shards over time, per work slot ([`timeline`]);
//! - the history of the pipeline's runs.
//!
//! A panel that cannot be drawn (a column of strings, a stage that never ran) says why instead.

pub mod columns;
pub mod dag;
pub mod histogram;
pub mod metrics;
mod page;
pub mod png;
pub mod soup;
pub mod timeline;

use std::sync::Arc;

use anyhow::{Result, bail};
use ladle_engine::runs::{RunRecord, StageRecord};
use ladle_engine::{Artifact, ArtifactDigest, Pipeline, Store};

/// What to put in a report.
#[derive(Debug, Clone)]
pub struct Options {
    /// The run to report (default: the pipeline's latest).
    pub run: Option<u64>,
    /// Records listed at each end of a column.
    pub extremes: usize,
    pub bins: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { run: None, extremes: 8, bins: histogram::DEFAULT_BINS }
    }
}

/// A figure on its own, as `--figures` writes it.
pub struct Figure {
    /// A file name without extension: `dag`, `ppl-ppl` (stage, column), `soup-soup`.
    pub name: String,
    pub svg: String,
}

pub struct Report {
    pub html: String,
    pub figures: Vec<Figure>,
}

/// A stage as the report sees it: its declaration, what the run recorded, its output.
pub struct StageView<'a> {
    pub index: usize,
    pub name: &'a str,
    pub kind: &'static str,
    pub record: Option<&'a StageRecord>,
    pub artifact: Option<Arc<Artifact>>,
}

/// The runs of `pipeline` kept in `store`, oldest first.
pub fn runs_of(pipeline: &Pipeline, store: &Store) -> Result<Vec<RunRecord>> {
    let file = pipeline.path.to_string_lossy();
    Ok(store.runs()?.into_iter().filter(|r| r.pipeline_file == file).collect())
}

/// A run record of `pipeline` holding no stage: what a view of a pipeline that never ran uses.
pub fn empty_run(pipeline: &Pipeline) -> RunRecord {
    RunRecord {
        id: 0,
        pipeline: pipeline.name.clone(),
        pipeline_file: pipeline.path.to_string_lossy().into_owned(),
        started_unix: 0,
        status: ladle_engine::runs::RunStatus::Ok,
        seconds: None,
        peak_rss_bytes: None,
        stages: Vec::new(),
    }
}

/// Builds the report of one run of `pipeline`.
pub fn build(pipeline: &Pipeline, store: &Store, options: &Options) -> Result<Report> {
    let runs = runs_of(pipeline, store)?;
    let run = match options.run {
        Some(id) => match runs.iter().find(|r| r.id == id) {
            Some(r) => r,
            None => bail!(
                "run {id} is not a run of {} in this store\n  hint: `ladle runs {}` lists them",
                pipeline.path.display(),
                pipeline.path.display()
            ),
        },
        None => match runs.last() {
            Some(r) => r,
            None => bail!(
                "{} has not run with this store: there is nothing to report\n  hint: run it first: ladle run {}",
                pipeline.path.display(),
                pipeline.path.display()
            ),
        },
    };
    let stages = stage_views(pipeline, store, run);
    let mut figures = Vec::new();
    let dag = dag::svg(pipeline, &stages);
    figures.push(Figure { name: "dag".into(), svg: dag.clone() });
    let column_panels = columns::panels(pipeline, store, &stages, options);
    for p in &column_panels {
        if let Some(svg) = &p.svg {
            figures.push(Figure { name: format!("{}-{}", p.stage, p.column), svg: svg.clone() });
        }
    }
    let soups: Vec<soup::Panel> = stages
        .iter()
        .filter(|s| s.kind == "soup")
        .map(|s| soup::panel(store, s, input_names(pipeline, s, "models")))
        .collect();
    for p in &soups {
        if let Some(svg) = &p.svg {
            figures.push(Figure { name: format!("soup-{}", p.stage), svg: svg.clone() });
        }
    }
    let metrics = metrics::panel(pipeline, &stages);
    for c in &metrics.charts {
        let name: String =
            c.key.chars().map(|ch| if ch.is_ascii_alphanumeric() || ch == '-' { ch } else { '_' }).collect();
        figures.push(Figure { name: format!("metric-{name}"), svg: c.svg.clone() });
    }
    let timeline = timeline::svg(run);
    if let Some(svg) = &timeline {
        figures.push(Figure { name: "timeline".into(), svg: svg.clone() });
    }
    let parts = page::Parts {
        dag: &dag,
        timeline: timeline.as_deref(),
        columns: &column_panels,
        soups: &soups,
        metrics: &metrics,
    };
    let html = page::html(pipeline, run, &runs, &stages, &parts);
    Ok(Report { html, figures })
}

/// The stages of `pipeline` in order, as `run` recorded them, with the outputs it recorded.
pub fn stage_views<'a>(pipeline: &'a Pipeline, store: &Store, run: &'a RunRecord) -> Vec<StageView<'a>> {
    pipeline
        .order
        .iter()
        .map(|&i| {
            let decl = &pipeline.stages[i];
            let record = run.stages.iter().find(|s| s.stage == decl.name);
            let artifact = record
                .and_then(|r| r.artifact.as_deref())
                .and_then(ArtifactDigest::from_hex)
                .and_then(|d| store.get_artifact(&d).ok().flatten())
                .map(Arc::new);
            StageView { index: i, name: &decl.name, kind: decl.kind.name(), record, artifact }
        })
        .collect()
}

/// The records a stage took in: its inputs' outputs, summed (what the run recorded of them).
pub fn records_in(pipeline: &Pipeline, stages: &[StageView<'_>], view: &StageView<'_>) -> Option<u64> {
    let decl = &pipeline.stages[view.index];
    let mut total = None;
    for srcs in decl.inputs.values() {
        for &src in srcs {
            let n = stages.iter().find(|s| s.index == src).and_then(|s| s.record).and_then(|r| r.records);
            if let Some(n) = n {
                total = Some(total.unwrap_or(0) + n);
            }
        }
    }
    total
}

/// The names of the stages feeding `port` of a stage, in order.
fn input_names(pipeline: &Pipeline, view: &StageView<'_>, port: &str) -> Vec<String> {
    pipeline.stages[view.index]
        .inputs
        .get(port)
        .map(|srcs| srcs.iter().map(|&i| pipeline.stages[i].name.clone()).collect())
        .unwrap_or_default()
}
