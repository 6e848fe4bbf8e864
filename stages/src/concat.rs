//! `concat`: datasets one after another. No record is copied: the output lists the inputs' shards.

use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{Accepts, Arity, Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};

pub struct ConcatKind;

const PORTS: &[PortSpec] = &[PortSpec { name: "data", arity: Arity::Many, required: true, accepts: Accepts::Dataset }];

impl StageKind for ConcatKind {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn about(&self) -> &'static str {
        "datasets one after another, in the order listed"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, _params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        Ok(Arc::new(Concat))
    }
}

struct Concat;

impl Stage for Concat {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

impl WholeStage for Concat {
    fn run(&self, _ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let mut shards = Vec::new();
        for (i, a) in inputs.all("data").iter().enumerate() {
            match a {
                Artifact::Dataset { shards: s, .. } => shards.extend_from_slice(s),
                other => {
                    return Err(StageError::input(format!(
                        "input {i} of `data` is a {}, not a dataset",
                        other.kind_name()
                    )));
                }
            }
        }
        // Relative paths in the records keep their meaning only if every input has the same root.
        let roots: Vec<Option<std::path::PathBuf>> = inputs.all("data").iter().map(Artifact::root).collect();
        let root = if roots.windows(2).all(|w| w[0] == w[1]) { roots.into_iter().next().flatten() } else { None };
        Ok(Artifact::Dataset { shards, root })
    }
}
