//! `generate`: a language model writes a column (caption fusion in the style of CapFusion,
//! re-captioning, rewriting), from text or from the record's image.
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
//! image = "{image}"      # optional: the model sees the record's image (a VLM: LLaVA-format,
//!                        # Qwen2-VL or Qwen2.5-VL), the prompt after it in the user turn
//! on_bad_image = "fail"  # or "drop"
//! min_pixels = 3136      # Qwen2-VL/Qwen2.5-VL: the image processor's bounds (see crate::vlm)
//! max_pixels = 1003520
//! batch = 16             # records written together (default: 16 on the CPU, 64 on a GPU)
//! ```
//!
//! Generation stops after the chat template's end-of-turn token or the model's EOS, or at
//! `max_new_tokens`; the column holds the new text without special tokens, and
//! `{column}_tokens` the number of new tokens. A sampled record's seed is derived from `seed` and
//! the record itself, so its output does not depend on shards, workers or reruns.
//!
//! Records are written `batch` at a time, in order: one step gives every unfinished record of
//! the batch its next token (see [`ladle_models::llm::generate`]). `batch` is not part of the
//! stage's key.
//!
//! With `image`, the user turn holds the image then the prompt as the model's chat template
//! renders them (LLaVA: `<image>\n{prompt}`; Qwen2-VL: the image's vision tokens, after the
//! default system turn), so a re-captioning prompt may quote the record's alt-text. Images are
//! read as `perplexity` reads them ([`crate::image_source`]); their contents join the shard keys.
//! `device` and `dtype` choose where and in what precision it runs (see [`ladle_models::device`]).

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};
use ladle_engine::{ObjectWriter, StageContext};
use ladle_models::device::Placement;
use ladle_models::llm::generate::{Prompt, Rng, Sampling, generate_batch};
use ladle_models::llm::{LanguageModel, ModelError};
use ladle_models::vision::images::RgbConvention;

use crate::image_source::bad_image;
use crate::model_error;
use crate::template::Template;
use crate::vlm::{self, ImageParams, LoadedVlm, Vlm};

pub struct GenerateKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data"), crate::model::MODEL_PORT];

impl StageKind for GenerateKind {
    fn name(&self) -> &'static str {
        "generate"
    }
    fn about(&self) -> &'static str {
        "a language model writes a column from a chat-formatted prompt template (and the record's image)"
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
        let image = ImageParams::configure(params)?;
        let batch = params.positive("batch")?;
        params.exclude_from_key("batch");
        let replicas = crate::placement::configure_replicas(params)?;
        let placement = replicas.first();
        let batch = batch.map_or(placement.default_batch_records(), |n| n as usize);
        Ok(Arc::new(Generate {
            batch,
            prompt,
            column,
            max_new_tokens,
            sampling: Sampling { temperature, top_p },
            seed: seed as u64,
            image,
            placement,
            replicas,
        }))
    }
}

#[derive(Clone)]
struct Generate {
    /// Records written together.
    batch: usize,
    prompt: Template,
    column: String,
    max_new_tokens: usize,
    sampling: Sampling,
    seed: u64,
    image: Option<ImageParams>,
    placement: Placement,
    /// The model's copies (the first is `placement`).
    replicas: crate::placement::Replicas,
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
    fn replicas(&self) -> usize {
        self.replicas.len()
    }
    fn replica_slot(&self, replica: usize) -> Option<String> {
        self.replicas.slot(replica)
    }
}

impl MapStage for Generate {
    fn reads_record_files(&self) -> bool {
        self.image.is_some()
    }

    fn record_files(&self, inputs: &Inputs, shard: &ShardInput<'_>) -> Result<Vec<PathBuf>, StageError> {
        let Some(image) = &self.image else { return Ok(Vec::new()) };
        image.field.files_of_shard(inputs.dataset_root("data").as_deref(), shard)
    }

    /// Loads the model onto replica `replica`'s device.
    fn prepare(
        &self,
        ctx: &StageContext<'_>,
        inputs: &Inputs,
        replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        let dir = crate::model::model_dir(ctx, inputs)?;
        let device = self.replicas.get(replica).device().map_err(model_error)?;
        let dtype = self.placement.dtype;
        let root = inputs.dataset_root("data");
        let Some(image) = &self.image else {
            let model = LanguageModel::load_on(&dir, &device, dtype).map_err(model_error)?;
            return self.mapper(&dir, model, root);
        };
        match vlm::load(&dir, &device, dtype, &image.pixels, "drop `image` to generate from text alone")? {
            LoadedVlm::Llava(v) => self.mapper(&dir, *v, root),
            LoadedVlm::Qwen2Vl(v) => self.mapper(&dir, *v, root),
        }
    }
}

impl Generate {
    fn mapper<W: Writer>(
        &self,
        dir: &std::path::Path,
        writer: W,
        root: Option<PathBuf>,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        let lm = writer.language_model();
        if !lm.tokenizer.has_chat_template() {
            return Err(StageError::input(format!(
                "{}: the model has no chat template (`chat_template` in tokenizer_config.json, or chat_template.json)",
                dir.display()
            )));
        }
        let mut stop: Vec<u32> = lm.config.eos_token_ids.clone();
        if let Some(id) = lm.tokenizer.end_of_turn().and_then(|t| lm.tokenizer.token_id(t)) {
            stop.push(id);
        }
        Ok(Arc::new(Mapper { stage: self.clone(), writer, stop, root }))
    }
}

/// What writing a column needs of a model: a prompt (and an image, for a VLM) made ready, its
/// length in positions, then new tokens after a batch of them.
trait Writer: Send + Sync + 'static {
    type Prompt;
    /// How the model's reference reads an image's pixels.
    const RGB: RgbConvention = RgbConvention::Displayed;
    fn language_model(&self) -> &LanguageModel;
    /// `image` is given exactly when the stage has `image`.
    fn prompt(&self, prompt: &str, image: Option<&RgbImage>) -> Result<(Self::Prompt, usize), ModelError>;
    /// New tokens after each prompt; `max_new` and `rngs` per prompt.
    fn write(
        &self,
        prompts: &[&Self::Prompt],
        max_new: &[usize],
        stop: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError>;
}

impl Writer for LanguageModel {
    type Prompt = Vec<u32>;
    fn language_model(&self) -> &LanguageModel {
        self
    }
    fn prompt(&self, prompt: &str, _image: Option<&RgbImage>) -> Result<(Vec<u32>, usize), ModelError> {
        let ids = self.tokenizer.encode(&self.tokenizer.chat_prefix(prompt)?, false)?;
        let n = ids.len();
        Ok((ids, n))
    }
    fn write(
        &self,
        prompts: &[&Vec<u32>],
        max_new: &[usize],
        stop: &[u32],
        s: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        let prompts = prompts.iter().map(|ids| Prompt::of_ids(&self.decoder, ids)).collect::<Result<Vec<_>, _>>()?;
        generate_batch(&self.decoder, prompts, max_new, stop, s, rngs)
    }
}

/// Every VLM writes from the record's image, which the stage reads for every record.
impl<V: Vlm> Writer for V {
    type Prompt = V::Prepared;
    const RGB: RgbConvention = V::RGB;
    fn language_model(&self) -> &LanguageModel {
        Vlm::language_model(self)
    }
    fn prompt(&self, prompt: &str, image: Option<&RgbImage>) -> Result<(V::Prepared, usize), ModelError> {
        let image = image.ok_or_else(|| ModelError::Compute("a VLM writes from an image, and none was read".into()))?;
        self.prepare_prompt(image, prompt)
    }
    fn write(
        &self,
        prompts: &[&V::Prepared],
        max_new: &[usize],
        stop: &[u32],
        s: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        self.generate(prompts, max_new, stop, s, rngs)
    }
}

struct Mapper<W> {
    stage: Generate,
    writer: W,
    stop: Vec<u32>,
    root: Option<PathBuf>,
}

impl<W: Writer> Mapper<W> {
    fn drops_bad_images(&self) -> bool {
        self.stage.image.as_ref().is_some_and(|i| i.drop_bad)
    }

    /// The record's image, when the stage reads one; `Err` is the image's fault.
    fn image(&self, record: &serde_json::Map<String, serde_json::Value>) -> Result<Option<RgbImage>, String> {
        let Some(params) = &self.stage.image else { return Ok(None) };
        let image = params.field.locate(record, self.root.as_deref())?;
        image.load_as(W::RGB).map(Some).map_err(|e| e.to_string())
    }
}

/// A record whose prompt is ready, waiting for its batch.
struct Pending<P> {
    index: usize,
    record: serde_json::Map<String, serde_json::Value>,
    prompt: P,
    max_new: usize,
    rng: Rng,
}

impl<W: Writer> Mapper<W> {
    /// Writes a batch of records' columns, in their order, into `out`.
    fn write_batch(&self, batch: &mut Vec<Pending<W::Prompt>>, out: &mut Vec<u8>) -> Result<(), StageError> {
        let Some(first) = batch.first().map(|p| p.index) else { return Ok(()) };
        let tok = &self.writer.language_model().tokenizer;
        let prompts: Vec<&W::Prompt> = batch.iter().map(|p| &p.prompt).collect();
        let max_new: Vec<usize> = batch.iter().map(|p| p.max_new).collect();
        let mut rngs: Vec<Rng> = batch.iter().map(|p| p.rng.clone()).collect();
        let written = self
            .writer
            .write(&prompts, &max_new, &self.stop, &self.stage.sampling, &mut rngs)
            .map_err(|e| model_error(e).at_record(first as u64))?;
        for (mut pending, new) in batch.drain(..).zip(written) {
            let text = tok.decode(&new, true).map_err(|e| model_error(e).at_record(pending.index as u64))?;
            pending.record.insert(self.stage.column.clone(), text.trim().into());
            pending.record.insert(format!("{}_tokens", self.stage.column), new.len().into());
            write_record(&pending.record, out);
        }
        Ok(())
    }
}

impl<W: Writer> ShardMapper for Mapper<W> {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let max_positions = self.writer.language_model().config.max_positions;
        let mut out = Vec::new();
        let (mut n, mut dropped) = (0, 0);
        let mut batch = Vec::with_capacity(self.stage.batch);
        for (i, line) in lines(shard.jsonl).enumerate() {
            let at = |e: String| StageError::input(e).at_record(i as u64);
            let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(i as u64))?;
            let prompt = self.stage.prompt.render(&record).map_err(at)?;
            let image = match self.image(&record) {
                Ok(image) => image,
                Err(_) if self.drops_bad_images() => {
                    dropped += 1;
                    continue;
                }
                Err(e) => return Err(bad_image(e).at_record(i as u64)),
            };
            let (ready, len) = match self.writer.prompt(&prompt, image.as_ref()) {
                Ok(p) => p,
                Err(ModelError::Image(_)) if self.drops_bad_images() => {
                    dropped += 1;
                    continue;
                }
                Err(ModelError::Image(e)) => return Err(bad_image(e).at_record(i as u64)),
                Err(e) => return Err(model_error(e).at_record(i as u64)),
            };
            let room = max_positions.saturating_sub(len);
            if room == 0 {
                return Err(at(format!("the prompt ({len} positions) fills the model's {max_positions} positions")));
            }
            let rng = Rng::new(
                self.stage.seed ^ u64::from_le_bytes(blake3::hash(line).as_bytes()[..8].try_into().expect("8 bytes")),
            );
            let max_new = self.stage.max_new_tokens.min(room);
            batch.push(Pending { index: i, record, prompt: ready, max_new, rng });
            n += 1;
            if batch.len() >= self.stage.batch {
                self.write_batch(&mut batch, &mut out)?;
            }
        }
        self.write_batch(&mut batch, &mut out)?;
        output.append(&out)?;
        Ok(MappedShard { records: n, dropped_on_error: dropped })
    }
}
