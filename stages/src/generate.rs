//! `generate`: a language model writes a column (caption fusion in the style of CapFusion,
//! re-captioning, rewriting).
//!
//! ```toml
//! [stages.fused]
//! kind = "generate"
//! data = "captions"
//! model = "llm"
//! prompt = "Merge these captions into one: {caption} / {alt_text}"   # a template, chat-formatted
//! column = "fused"
//! max_new_tokens = 64
//! temperature = 0.0      # greedy; > 0 samples, seeded per record
//! top_p = 1.0
//! seed = 0
//! ```
//!
//! Generation stops after the chat template's end-of-turn token or the model's EOS, or at
//! `max_new_tokens`; the column holds the new text without special tokens, and
//! `{column}_tokens` the number of new tokens. A sampled record's seed is derived from `seed` and
//! the record itself, so its output does not depend on shards, workers or reruns.
//! `device` and `dtype` choose where and in what precision it runs (see [`ladle_models::device`]).

use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};
use ladle_engine::{ObjectWriter, StageContext};
use ladle_models::device::Placement;
use ladle_models::llm::LanguageModel;
use ladle_models::llm::generate::{Rng, Sampling, generate};

use crate::model_error;
use crate::template::Template;

pub struct GenerateKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data"), crate::model::MODEL_PORT];

impl StageKind for GenerateKind {
    fn name(&self) -> &'static str {
        "generate"
    }
    fn about(&self) -> &'static str {
        "a language model writes a column from a chat-formatted prompt template"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let src = params.required_string("prompt")?;
        let prompt = Template::parse(&src).map_err(|e| params.error("prompt", e))?;
        let column = params.string("column")?.unwrap_or_else(|| "generated".into());
        params.record("column", column.clone().into());
        let max_new_tokens = params.positive("max_new_tokens")?.unwrap_or(64) as usize;
        params.record("max_new_tokens", max_new_tokens.into());
        let temperature = params.float("temperature")?.unwrap_or(0.0);
        if temperature < 0.0 {
            return Err(params.error("temperature", "`temperature` must be 0 (greedy) or positive"));
        }
        let top_p = params.float("top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(params.error("top_p", "`top_p` must lie in (0, 1]"));
        }
        let seed = params.integer("seed")?.unwrap_or(0);
        params.record("sampling", serde_json::json!({"temperature": temperature, "top_p": top_p, "seed": seed}));
        let placement = crate::placement::configure(params)?;
        Ok(Arc::new(Generate {
            prompt,
            column,
            max_new_tokens,
            sampling: Sampling { temperature, top_p },
            seed: seed as u64,
            placement,
        }))
    }
}

#[derive(Clone)]
struct Generate {
    prompt: Template,
    column: String,
    max_new_tokens: usize,
    sampling: Sampling,
    seed: u64,
    placement: Placement,
}

impl Stage for Generate {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Map { port: "data", stage: self }
    }
    fn device_slot(&self) -> Option<String> {
        self.placement.slot()
    }
}

impl MapStage for Generate {
    fn prepare(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Arc<dyn ShardMapper>, StageError> {
        let dir = crate::model::model_dir(ctx, inputs)?;
        let model = LanguageModel::load_on(&dir, &self.placement.device().map_err(model_error)?, self.placement.dtype)
            .map_err(model_error)?;
        if !model.tokenizer.has_chat_template() {
            return Err(StageError::input(format!(
                "{}: the model has no chat template (`chat_template` in tokenizer_config.json)",
                dir.display()
            )));
        }
        let mut stop: Vec<u32> = model.config.eos_token_ids.clone();
        if let Some(id) = model.tokenizer.end_of_turn().and_then(|t| model.tokenizer.token_id(t)) {
            stop.push(id);
        }
        Ok(Arc::new(Mapper { stage: self.clone(), model, stop }))
    }
}

struct Mapper {
    stage: Generate,
    model: LanguageModel,
    stop: Vec<u32>,
}

impl ShardMapper for Mapper {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let tok = &self.model.tokenizer;
        let mut out = Vec::new();
        let mut n = 0;
        for (i, line) in lines(shard.jsonl).enumerate() {
            let at = |e: String| StageError::input(e).at_record(i as u64);
            let mut record = parse_record(line).map_err(|e| StageError::internal(e).at_record(i as u64))?;
            let prompt = self.stage.prompt.render(&record).map_err(at)?;
            let ids = tok.encode(&tok.chat_prefix(&prompt).map_err(model_error)?, false).map_err(model_error)?;
            let room = self.model.config.max_positions.saturating_sub(ids.len());
            if room == 0 {
                return Err(at(format!(
                    "the prompt ({} tokens) fills the model's {} positions",
                    ids.len(),
                    self.model.config.max_positions
                )));
            }
            let mut rng = Rng::new(
                self.stage.seed ^ u64::from_le_bytes(blake3::hash(line).as_bytes()[..8].try_into().expect("8 bytes")),
            );
            let new = generate(
                &self.model.decoder,
                &ids,
                self.stage.max_new_tokens.min(room),
                &self.stop,
                &self.stage.sampling,
                &mut rng,
            )
            .map_err(model_error)?;
            let text = tok.decode(&new, true).map_err(model_error)?;
            record.insert(self.stage.column.clone(), text.trim().into());
            record.insert(format!("{}_tokens", self.stage.column), new.len().into());
            write_record(&record, &mut out);
            n += 1;
        }
        output.append(&out)?;
        Ok(MappedShard { records: n, ..Default::default() })
    }
}
