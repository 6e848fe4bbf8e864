//! `perplexity`: score a text span of each record with a language model.
//!
//! ```toml
//! [stages.ppl]
//! kind = "perplexity"
//! data = "captions"
//! model = "scorer"            # a model artifact (a `model` stage, or an `exec` that trains one)
//! text = "{caption}"          # the scored span, a template over record fields
//! prompt = "please generate a caption for this image."   # optional, chat-formatted, not scored
//! column = "ppl"              # adds ppl, ppl_nll, ppl_tokens (and ppl_truncated when cut)
//! image = "{image}"           # optional: image-conditioned scoring with a VLM (LLaVA-format,
//!                             # Qwen2-VL or Qwen2.5-VL)
//! on_bad_image = "fail"       # or "drop": a record whose image cannot be used is dropped, counted
//! min_pixels = 3136           # Qwen2-VL/Qwen2.5-VL: the image processor's bounds (default: the
//! max_pixels = 1003520        # checkpoint's preprocessor_config.json; see crate::vlm)
//! device = "auto"             # or "cpu", "cuda", "cuda:N"; dtype = "f32" | "bf16" | "f16"
//!                             # devices = ["cuda:0", "cuda:1"] or device = "cuda:all": a
//!                             # model replica per GPU; replicas = N: N on the CPU (crate::placement)
//! ```                         # (see ladle_models::device: default f32 on the CPU, bf16 on a GPU)
//!
//! Semantics (those of the transformers fixtures):
//! - text mode: tokens = tokenizer(text) with its special tokens (BOS where the tokenizer adds
//!   one); every position i ≥ 1 is scored by -log p(t_i | t_<i).
//! - prompted: the chat template's user turn holding `prompt` and the generation prompt, then
//!   the tokens of `text + end-of-turn`; only the latter are scored (the end-of-turn token too).
//!
//! - image-conditioned (`image`): prompted, with `<image>\n` before the prompt in the user turn
//!   (the prompt may be left out: the user turn is then `<image>\n`); the one `<image>` token
//!   becomes the model's `image_seq_length` slots, which take the projected CLIP features of the
//!   record's image. With a Qwen2-VL or Qwen2.5-VL model: POINTS' own filter, the user turn
//!   holding the image (as `<|vision_start|>` + its `<|image_pad|>` tokens + `<|vision_end|>`)
//!   then the prompt, after the template's default system turn; the image is fetched and
//!   patched as `qwen_vl_utils` and transformers do ([`ladle_models::qwen2_vl`]). Images are paths (relative to the data file's folder) or embedded bytes, see
//!   [`crate::image_source`]; their contents are part of each shard's key, so an edited image
//!   rescores the shards that name it.
//!
//! `{column}` is the perplexity exp(mean NLL), `{column}_nll` the mean NLL, `{column}_tokens` the
//! number of scored tokens. A record longer than `max_tokens` (default: the model's maximum
//! positions) is cut from the end and gets `{column}_truncated = true`. Records are batched by
//! length under `batch_tokens` (default 512 on the CPU, 16384 on a GPU; image-conditioned
//! records too, image slots counted); a record's score does not depend on its batch.
//! The model is loaded once per stage run, and only if some shard is not cached.

use std::path::PathBuf;
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};
use ladle_engine::{ObjectWriter, StageContext};
use ladle_models::device::Placement;
use ladle_models::llm::{LanguageModel, ModelError, Score, Scorer, Sequence};
use serde_json::Value;

use crate::image_source::{ImageField, bad_image};
use crate::model::{MODEL_PORT, model_dir};
use crate::model_error;
use crate::template::Template;
use crate::vlm::{self, ImageParams, LoadedVlm, Vlm};

pub struct PerplexityKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data"), MODEL_PORT];

impl StageKind for PerplexityKind {
    fn name(&self) -> &'static str {
        "perplexity"
    }
    fn about(&self) -> &'static str {
        "score a text span of each record with a language model (adds a perplexity column)"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let template =
            |params: &mut Params<'_>, name: &str, src: Option<String>| -> Result<Option<Template>, PipelineError> {
                src.map(|s| Template::parse(&s).map_err(|e| params.error(name, e))).transpose()
            };
        let text_src = params.required_string("text")?;
        let text = template(params, "text", Some(text_src))?.expect("given");
        let prompt_src = params.string("prompt")?;
        let prompt = template(params, "prompt", prompt_src)?;
        let column = params.string("column")?.unwrap_or_else(|| "ppl".into());
        params.record("column", column.clone().into());
        if column.is_empty() {
            return Err(params.error("column", "`column` cannot be empty"));
        }
        let max_tokens = params.positive("max_tokens")?.map(|n| n as usize);
        if max_tokens == Some(1) {
            return Err(params.error("max_tokens", "`max_tokens` must be at least 2: one token predicts the next"));
        }
        let batch_tokens = params.positive("batch_tokens")?;
        params.exclude_from_key("batch_tokens");
        let image = ImageParams::configure(params)?;
        let replicas = crate::placement::configure_replicas(params)?;
        let placement = replicas.first();
        let batch_tokens = batch_tokens.map_or(placement.default_batch_tokens(), |n| n as usize);
        Ok(Arc::new(Perplexity { text, prompt, column, max_tokens, batch_tokens, image, placement, replicas }))
    }
}

struct Perplexity {
    text: Template,
    prompt: Option<Template>,
    column: String,
    max_tokens: Option<usize>,
    batch_tokens: usize,
    image: Option<ImageParams>,
    placement: Placement,
    /// The model's copies (the first is `placement`).
    replicas: crate::placement::Replicas,
}

impl Stage for Perplexity {
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

impl MapStage for Perplexity {
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
        let dir = model_dir(ctx, inputs)?;
        let device = self.replicas.get(replica).device().map_err(model_error)?;
        if let Some(image) = &self.image {
            let root = inputs.dataset_root("data");
            return Ok(
                match vlm::load(
                    &dir,
                    &device,
                    self.placement.dtype,
                    &image.pixels,
                    "drop `image` to score the text alone",
                )? {
                    LoadedVlm::Llava(v) => self.image_mapper(*v, image, root),
                    LoadedVlm::Qwen2Vl(v) => self.image_mapper(*v, image, root),
                },
            );
        }
        let model = LanguageModel::load_on(&dir, &device, self.placement.dtype).map_err(model_error)?;
        // Prompted scoring needs a chat template and its end-of-turn token: fail before any shard.
        match &self.prompt {
            Some(_) if !model.tokenizer.has_chat_template() => {
                return Err(StageError::input(format!(
                    "{}: the model has no chat template (`chat_template` in tokenizer_config.json), so `prompt` cannot be used",
                    dir.display()
                ))
                .with_hint("drop `prompt` to score the text alone, or use a chat model"));
            }
            Some(_) if model.tokenizer.end_of_turn().is_none() => {
                return Err(StageError::input(format!(
                    "{}: the chat template names no end-of-turn token, so a prompted score has no end",
                    dir.display()
                )));
            }
            _ => {}
        }
        let max_tokens = self.max_tokens.unwrap_or(model.config.max_positions).min(model.config.max_positions);
        Ok(Arc::new(Mapper {
            text: self.text.clone(),
            prompt: self.prompt.clone(),
            column: self.column.clone(),
            max_tokens,
            batch_tokens: self.batch_tokens,
            model,
        }))
    }
}

struct Mapper {
    text: Template,
    prompt: Option<Template>,
    column: String,
    max_tokens: usize,
    batch_tokens: usize,
    model: LanguageModel,
}

impl Mapper {
    /// The record's token sequence, and whether it was cut to `max_tokens`.
    fn sequence(&self, record: &serde_json::Map<String, Value>) -> Result<(Sequence, bool), String> {
        let text = self.text.render(record)?;
        if text.trim().is_empty() {
            return Err("the text to score is empty".into());
        }
        let tok = &self.model.tokenizer;
        let prompt = self.prompt.as_ref().map(|p| p.render(record)).transpose()?;
        let mut seq = tok.scored_sequence(prompt.as_deref(), &text).map_err(|e| e.to_string())?;
        let truncated = seq.ids.len() > self.max_tokens;
        seq.ids.truncate(self.max_tokens);
        if seq.ids.len() <= seq.score_from.max(1) {
            return Err(if truncated {
                format!("the prompt alone fills max_tokens ({}): nothing is left to score", self.max_tokens)
            } else {
                "the text is a single token: there is nothing to score (a score predicts each token from those before it)".into()
            });
        }
        Ok((seq, truncated))
    }
}

impl ShardMapper for Mapper {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let mut records = Vec::new();
        let mut seqs = Vec::new();
        let mut truncated = Vec::new();
        for (i, line) in lines(shard.jsonl).enumerate() {
            let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(i as u64))?;
            let (seq, cut) = self.sequence(&record).map_err(|e| StageError::input(e).at_record(i as u64))?;
            records.push(record);
            seqs.push(seq);
            truncated.push(cut);
        }
        let scores =
            Scorer { decoder: &self.model.decoder, pad: 0 }.score_all(&seqs, self.batch_tokens).map_err(model_error)?;
        let mut out = Vec::with_capacity(shard.jsonl.len() + records.len() * 64);
        let n = records.len() as u64;
        for ((mut record, s), cut) in records.into_iter().zip(scores).zip(truncated) {
            add_score(&mut record, &self.column, &s, cut);
            write_record(&record, &mut out);
        }
        output.append(&out)?;
        Ok(MappedShard { records: n, ..Default::default() })
    }
}

/// Adds `{column}`, `{column}_nll`, `{column}_tokens` (and `{column}_truncated`) to a record.
fn add_score(record: &mut serde_json::Map<String, Value>, column: &str, s: &Score, truncated: bool) {
    record.insert(column.to_string(), serde_json::json!(s.perplexity()));
    record.insert(format!("{column}_nll"), serde_json::json!(s.mean_nll()));
    record.insert(format!("{column}_tokens"), serde_json::json!(s.tokens));
    if truncated {
        record.insert(format!("{column}_truncated"), Value::Bool(true));
    }
}

impl Perplexity {
    fn image_mapper<V: Vlm>(&self, vlm: V, image: &ImageParams, root: Option<PathBuf>) -> Arc<dyn ShardMapper> {
        let positions = vlm.language_model().config.max_positions;
        let max_tokens = self.max_tokens.unwrap_or(positions).min(positions);
        Arc::new(ImageMapper {
            text: self.text.clone(),
            prompt: self.prompt.clone(),
            column: self.column.clone(),
            max_tokens,
            image: image.field.clone(),
            root,
            drop_bad_images: image.drop_bad,
            batch_tokens: self.batch_tokens,
            vlm,
        })
    }
}

/// Image-conditioned scoring with a VLM, records prepared one at a time and scored in windows.
struct ImageMapper<V> {
    text: Template,
    prompt: Option<Template>,
    column: String,
    max_tokens: usize,
    image: ImageField,
    root: Option<PathBuf>,
    drop_bad_images: bool,
    batch_tokens: usize,
    vlm: V,
}

/// Why a record was not scored: its image (which `on_bad_image = "drop"` forgives) or the rest.
enum RecordFailure {
    Image(String),
    Other(StageError),
}

impl<V: Vlm> ImageMapper<V> {
    /// The record's image and sequence, ready to score with others.
    fn prepare(&self, record: &serde_json::Map<String, Value>) -> Result<V::Prepared, RecordFailure> {
        let text = self.text.render(record).map_err(|e| RecordFailure::Other(StageError::input(e)))?;
        if text.trim().is_empty() {
            return Err(RecordFailure::Other(StageError::input("the text to score is empty")));
        }
        let prompt = match &self.prompt {
            Some(p) => p.render(record).map_err(|e| RecordFailure::Other(StageError::input(e)))?,
            None => String::new(),
        };
        let image = self.image.locate(record, self.root.as_deref()).map_err(RecordFailure::Image)?;
        let rgb = image.load_as(V::RGB).map_err(|e| RecordFailure::Image(e.to_string()))?;
        self.vlm.prepare_scored(&rgb, &prompt, &text, self.max_tokens).map_err(|e| match e {
            ModelError::Image(m) => RecordFailure::Image(m),
            other => RecordFailure::Other(model_error(other)),
        })
    }
}

/// Records prepared at a time: their preprocessed images are held until scored (1.4 MB each at
/// 336 pixels), so a window bounds memory whatever the shard's size.
const IMAGE_WINDOW: usize = 64;

impl<V: Vlm> ImageMapper<V> {
    /// Scores a window of prepared records in batches of similar length under `batch_tokens`,
    /// and writes them in order.
    fn flush(
        &self,
        window: &mut Vec<(usize, serde_json::Map<String, Value>, V::Prepared)>,
        out: &mut Vec<u8>,
    ) -> Result<(), StageError> {
        let Some(first) = window.first().map(|w| w.0 as u64) else { return Ok(()) };
        let items: Vec<&V::Prepared> = window.iter().map(|w| &w.2).collect();
        let scores = self.vlm.score_all(&items, self.batch_tokens).map_err(|e| model_error(e).at_record(first))?;
        for ((_, mut record, p), score) in window.drain(..).zip(scores) {
            add_score(&mut record, &self.column, &score, V::truncated(&p));
            write_record(&record, out);
        }
        Ok(())
    }
}

impl<V: Vlm> ShardMapper for ImageMapper<V> {
    /// Records are prepared one by one (an unusable image fails or drops its record there), then
    /// scored together, [`IMAGE_WINDOW`] at a time.
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let mut out = Vec::with_capacity(shard.jsonl.len() * 2);
        let mut window = Vec::with_capacity(IMAGE_WINDOW);
        let (mut kept, mut dropped) = (0u64, 0u64);
        for (i, line) in lines(shard.jsonl).enumerate() {
            let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(i as u64))?;
            match self.prepare(&record) {
                Ok(p) => {
                    window.push((i, record, p));
                    kept += 1;
                }
                Err(RecordFailure::Image(_)) if self.drop_bad_images => dropped += 1,
                Err(RecordFailure::Image(e)) => return Err(bad_image(e).at_record(i as u64)),
                Err(RecordFailure::Other(e)) => return Err(e.at_record(i as u64)),
            }
            if window.len() == IMAGE_WINDOW {
                self.flush(&mut window, &mut out)?;
            }
        }
        self.flush(&mut window, &mut out)?;
        output.append(&out)?;
        Ok(MappedShard { records: kept, dropped_on_error: dropped })
    }
}
