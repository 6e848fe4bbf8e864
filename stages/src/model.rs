//! `model`: a local Hugging Face model folder as an artifact.
//!
//! The folder is not copied into the store: its files are digested (through the stat memo, so a
//! multi-gigabyte checkpoint is hashed once) and the digests are the artifact. Any change to any
//! file changes the artifact, and every stage that uses the model reruns.

use std::path::PathBuf;
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{Accepts, Arity, Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};

pub struct ModelKind;

impl StageKind for ModelKind {
    fn name(&self) -> &'static str {
        "model"
    }
    fn about(&self) -> &'static str {
        "a local Hugging Face model folder (config.json, tokenizer, *.safetensors)"
    }
    fn ports(&self) -> &'static [PortSpec] {
        &[]
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let path = params.path_dep("path", true)?.ok_or_else(|| params.missing("path", "the model folder"))?;
        if !path.join("config.json").is_file() {
            let mut e = params.error(
                "path",
                format!("`{}` holds no config.json, so it is not a Hugging Face model folder", path.display()),
            );
            e.hint = Some("point `path` at the folder with config.json, the tokenizer files and *.safetensors".into());
            return Err(e);
        }
        Ok(Arc::new(Model { path }))
    }
}

struct Model {
    path: PathBuf,
}

impl Stage for Model {
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

impl WholeStage for Model {
    fn run(&self, ctx: &StageContext<'_>, _inputs: &Inputs) -> Result<Artifact, StageError> {
        let files = ctx.store.folder_files(&self.path)?;
        Ok(Artifact::Folder { model: true, external: Some(self.path.clone()), files, metrics: None })
    }
}

/// The `model` input port of the stages that run a model.
pub const MODEL_PORT: PortSpec = PortSpec { name: "model", arity: Arity::One, required: true, accepts: Accepts::Model };

/// Where the model on the `model` port is, materializing store-held ones if needed.
pub fn model_dir(ctx: &StageContext<'_>, inputs: &Inputs) -> Result<PathBuf, StageError> {
    model_folder(ctx, inputs.one("model")?, "input `model`", "model")
}

/// Where a model artifact's files are: an external folder as it is, a store-held one
/// materialized (hard links) under the store's `tmp/` as `temp_name`. `what` names the input in
/// errors.
pub fn model_folder(
    ctx: &StageContext<'_>,
    artifact: &Artifact,
    what: &str,
    temp_name: &str,
) -> Result<PathBuf, StageError> {
    match artifact {
        Artifact::Folder { external: Some(root), model: true, .. } => Ok(root.clone()),
        a @ Artifact::Folder { model: true, .. } => ctx.materialize(a, &ctx.temp_path(temp_name)),
        Artifact::Folder { .. } => {
            Err(StageError::input(format!("{what} is a folder without config.json, not a model")))
        }
        other => Err(StageError::input(format!("{what} must be a model, but it is a {}", other.kind_name()))),
    }
}
