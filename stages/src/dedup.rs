//! `dedup`: exact de-duplication on a field template (`on = "{caption}"`; default: the whole
//! record). The first record with a given key is kept; order is kept.
//!
//! Keys are rendered in parallel per shard and kept as 128-bit BLAKE3 prefixes, so memory holds
//! 16 bytes per distinct key, not the keys themselves.

use std::collections::HashSet;
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record};
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};

use crate::template::Template;

pub struct DedupKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data")];

impl StageKind for DedupKind {
    fn name(&self) -> &'static str {
        "dedup"
    }
    fn about(&self) -> &'static str {
        "drop exact duplicates of a field template (`on`), keeping the first"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let on = match params.string("on")? {
            Some(src) => Some(Template::parse(&src).map_err(|e| params.error("on", e))?),
            None => None,
        };
        Ok(Arc::new(Dedup { on }))
    }
}

struct Dedup {
    on: Option<Template>,
}

impl Stage for Dedup {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

impl WholeStage for Dedup {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let shards = inputs.dataset("data")?;
        let mut first = Vec::new();
        let mut acc = 0;
        for s in shards {
            first.push(acc);
            acc += s.records;
        }
        let keys: Vec<Vec<[u8; 16]>> = ctx.par_map(shards.iter().enumerate().map(Ok), |si, (_, s)| {
            let bytes = ctx.read_shard(s)?;
            lines(&bytes)
                .enumerate()
                .map(|(i, line)| {
                    let key = match &self.on {
                        None => blake3::hash(line),
                        Some(t) => {
                            let record = parse_record(line)
                                .map_err(|e| StageError::internal(format!("record {}: {e}", first[si] + i as u64)))?;
                            let text = t
                                .render(&record)
                                .map_err(|e| StageError::input(format!("record {}: {e}", first[si] + i as u64)))?;
                            blake3::hash(text.as_bytes())
                        }
                    };
                    Ok(key.as_bytes()[..16].try_into().expect("16 bytes"))
                })
                .collect()
        })?;
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        let keep: Vec<Vec<bool>> =
            keys.into_iter().map(|ks| ks.into_iter().map(|k| seen.insert(k)).collect()).collect();
        drop(seen);
        let out = ctx.par_map(shards.iter().zip(keep).map(Ok), |_, (s, keep)| {
            let bytes = ctx.read_shard(s)?;
            let (jsonl, n) = crate::keep_lines(&bytes, keep.into_iter());
            if n == 0 { Ok(None) } else { ctx.write_shard(&jsonl, n).map(Some) }
        })?;
        Ok(Artifact::Dataset { shards: out.into_iter().flatten().collect(), root: inputs.one("data")?.root() })
    }
}
