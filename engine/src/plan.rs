//! `ladle plan`: what a run would do, and why, without running anything.
//!
//! The planner walks the graph as the scheduler would, resolving each stage's key from the cache.
//! A stage whose inputs are all known is cached or not; when it is not, the planner compares its
//! key parts with those of its last run and names what changed. A stage downstream of one that
//! must run cannot be decided yet (early cutoff may still keep it cached) and says so.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::artifact::Artifact;
use crate::context::StageContext;
use crate::digest::{ArtifactDigest, StageKey};
use crate::error::Result;
use crate::events::NoEvents;
use crate::key::salted_shard_key;
use crate::pipeline::Pipeline;
use crate::record_files;
use crate::resolve::key_parts;
use crate::stage::{Execution, Inputs};
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    Cached,
    Run,
    /// Runs only if an upstream stage's output changes.
    Maybe,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    pub stage: String,
    pub kind: String,
    pub status: PlanStatus,
    pub reasons: Vec<String>,
    #[serde(skip)]
    pub key: Option<StageKey>,
    #[serde(skip)]
    pub output: Option<(ArtifactDigest, Arc<Artifact>)>,
}

pub fn plan(pipeline: &Pipeline, store: &Store, force: &[String]) -> Result<Vec<PlanEntry>> {
    let n = pipeline.stages.len();
    let mut outputs: Vec<Option<(ArtifactDigest, Arc<Artifact>)>> = vec![None; n];
    let mut entries: Vec<Option<PlanEntry>> = vec![None; n];
    let slots = Arc::new(Semaphore::new(1));
    for &i in &pipeline.order {
        let decl = &pipeline.stages[i];
        let entry = |status, reasons: Vec<String>| PlanEntry {
            stage: decl.name.clone(),
            kind: decl.kind.name().to_string(),
            status,
            reasons,
            key: None,
            output: None,
        };
        let pending: Vec<&str> = decl
            .inputs
            .values()
            .flatten()
            .filter(|s| outputs[**s].is_none())
            .map(|s| pipeline.stages[*s].name.as_str())
            .collect();
        if !pending.is_empty() {
            let mut names: Vec<&str> = pending;
            names.dedup();
            let why = format!(
                "depends on {} (runs only if its output changes)",
                names.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            );
            entries[i] = Some(entry(PlanStatus::Maybe, vec![why]));
            continue;
        }
        let mut digests = BTreeMap::new();
        for (port, srcs) in &decl.inputs {
            digests.insert(
                port.clone(),
                srcs.iter().map(|s| outputs[*s].as_ref().map(|o| o.0)).collect::<Option<Vec<_>>>().unwrap_or_default(),
            );
        }
        let salts = if record_files::applies(&*decl.stage) {
            let inputs = Inputs::from_sources(
                pipeline.dir.clone(),
                decl.inputs.iter().map(|(port, srcs)| {
                    let named =
                        srcs.iter().filter_map(|&s| Some((pipeline.stages[s].name.as_str(), &*outputs[s].as_ref()?.1)));
                    (port.clone(), named.collect())
                }),
            );
            match record_files::shard_salts(&*decl.stage, &inputs, store) {
                Ok(s) => s,
                Err(e) => {
                    entries[i] =
                        Some(entry(PlanStatus::Run, vec![format!("cannot read the files its records name: {e}")]));
                    continue;
                }
            }
        } else {
            None
        };
        let parts = match key_parts(decl, digests, store) {
            Ok(mut p) => {
                p.record_files = salts.as_deref().map(record_files::combined);
                p
            }
            Err(e) => {
                entries[i] = Some(entry(PlanStatus::Run, vec![format!("cannot compute its key: {e}")]));
                continue;
            }
        };
        let key = parts.stage_key();
        let ctx = StageContext {
            stage: &decl.name,
            store,
            key,
            pipeline_dir: &pipeline.dir,
            events: &NoEvents,
            slots: slots.clone(),
            work: Default::default(),
            dropped: Default::default(),
            gpus: Vec::new(),
        };
        let forced = force.contains(&decl.name);
        if let Some((digest, artifact)) = store.get_action(&key)?
            && !forced
            && decl.stage.still_valid(&artifact, &ctx)
        {
            let artifact = Arc::new(artifact);
            outputs[i] = Some((digest, artifact.clone()));
            entries[i] = Some(PlanEntry {
                key: Some(key),
                output: Some((digest, artifact)),
                ..entry(PlanStatus::Cached, Vec::new())
            });
            continue;
        }
        let mut reasons = Vec::new();
        if forced {
            reasons.push("forced (--force)".to_string());
        }
        match store.get_last(&pipeline.path, &decl.name)? {
            None => reasons.push("never run".to_string()),
            Some(last) => {
                let changes = parts.explain_change(&last.parts);
                if changes.is_empty() && !forced {
                    reasons.push(
                        "its output is no longer in the store (removed by gc or verify), or its file output changed"
                            .to_string(),
                    );
                }
                reasons.extend(changes);
            }
        }
        if let Execution::Map { port, .. } = decl.stage.execution()
            && let Some(Some((_, input))) = decl.inputs.get(port).and_then(|s| s.first()).map(|s| outputs[*s].as_ref())
            && let Artifact::Dataset { shards, .. } = &**input
            && !forced
        {
            let map_key = parts.map_key(port);
            let mut cached = 0;
            for (n, s) in shards.iter().enumerate() {
                if store.get_shard(&salted_shard_key(&map_key, &s.digest, salts.as_ref().map(|s| &s[n])))?.is_some() {
                    cached += 1;
                }
            }
            reasons.push(format!("{cached} of {} shards cached", shards.len()));
        }
        entries[i] = Some(PlanEntry { key: Some(key), ..entry(PlanStatus::Run, reasons) });
    }
    Ok(pipeline.order.iter().filter_map(|&i| entries[i].take()).collect())
}

/// The current output of `stage` (computed with today's inputs), if the store has it.
pub fn current_output(
    pipeline: &Pipeline,
    store: &Store,
    stage: usize,
) -> Result<Option<(StageKey, ArtifactDigest, Arc<Artifact>)>> {
    let name = &pipeline.stages[stage].name;
    let entries = plan(pipeline, store, &[])?;
    Ok(entries.into_iter().find(|e| &e.stage == name).and_then(|e| match (e.key, e.output) {
        (Some(k), Some((d, a))) => Some((k, d, a)),
        _ => None,
    }))
}
