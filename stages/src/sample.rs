//! `sample`: a deterministic fraction of the records.
//!
//! A record is kept when BLAKE3(seed, its canonical bytes), read as a number in [0, 1), is below
//! `fraction`. The decision depends only on the record and the seed — not on its position, shard
//! or the other records — so appending data keeps earlier decisions, and the same seed gives the
//! same sample on every machine.

use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::lines;
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};
use ladle_engine::{ObjectWriter, StageContext};

pub struct SampleKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data")];

impl StageKind for SampleKind {
    fn name(&self) -> &'static str {
        "sample"
    }
    fn about(&self) -> &'static str {
        "a deterministic fraction of the records (`fraction`, `seed`)"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let fraction = params.fraction("fraction")?.ok_or_else(|| params.missing("fraction", "a number in [0, 1]"))?;
        let seed = params.integer("seed")?.unwrap_or(0);
        params.record("seed", seed.into());
        Ok(Arc::new(Sample { fraction, seed }))
    }
}

pub struct Sample {
    fraction: f64,
    seed: i64,
}

impl Sample {
    pub fn keeps(&self, line: &[u8]) -> bool {
        let mut h = blake3::Hasher::new_derive_key("ladle sample v1");
        h.update(&self.seed.to_le_bytes());
        h.update(line);
        let x = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
        (x as f64) / 18446744073709551616.0 < self.fraction
    }
}

impl Stage for Sample {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Map { port: "data", stage: self }
    }
}

impl MapStage for Sample {
    fn prepare(
        &self,
        _ctx: &StageContext<'_>,
        _inputs: &Inputs,
        _replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        Ok(Arc::new(Sample { fraction: self.fraction, seed: self.seed }))
    }
}

impl ShardMapper for Sample {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let (jsonl, records) = crate::keep_lines(shard.jsonl, lines(shard.jsonl).map(|l| self.keeps(l)));
        output.append(&jsonl)?;
        Ok(MappedShard { records, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_about_the_fraction_and_depends_on_the_seed() {
        let s = Sample { fraction: 0.25, seed: 7 };
        let lines: Vec<String> = (0..20000).map(|i| format!("{{\"i\":{i}}}")).collect();
        let kept = lines.iter().filter(|l| s.keeps(l.as_bytes())).count();
        // Binomial(20000, 0.25): sd ≈ 61; 5 sd either way.
        assert!((4700..=5300).contains(&kept), "{kept}");
        let other = Sample { fraction: 0.25, seed: 8 };
        assert!(lines.iter().any(|l| s.keeps(l.as_bytes()) != other.keeps(l.as_bytes())));
        assert!(lines.iter().all(|l| !Sample { fraction: 0.0, seed: 7 }.keeps(l.as_bytes())));
        assert!(lines.iter().all(|l| Sample { fraction: 1.0, seed: 7 }.keeps(l.as_bytes())));
    }
}
