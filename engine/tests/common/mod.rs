//! Stage kinds the engine's tests share.

use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};

/// `shards`: a dataset of `count` one-record shards, `{"i": 0}` to `{"i": count - 1}`.
pub struct ShardsKind {
    pub count: usize,
}

struct Shards(usize);

impl StageKind for ShardsKind {
    fn name(&self) -> &'static str {
        "shards"
    }
    fn about(&self) -> &'static str {
        "one-record shards"
    }
    fn ports(&self) -> &'static [PortSpec] {
        &[]
    }
    fn configure(&self, _params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        Ok(Arc::new(Shards(self.count)))
    }
}

impl Stage for Shards {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

impl WholeStage for Shards {
    fn run(&self, ctx: &StageContext<'_>, _inputs: &Inputs) -> Result<Artifact, StageError> {
        let shards = (0..self.0)
            .map(|i| ctx.write_shard(format!("{{\"i\":{i}}}\n").as_bytes(), 1))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Artifact::Dataset { shards, root: None })
    }
}
