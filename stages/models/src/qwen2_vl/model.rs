//! A Qwen2-VL or Qwen2.5-VL checkpoint, loaded, and POINTS' perplexity filter on it: the
//! perplexity of a caption (and `<|im_end|>`) as the assistant's answer to a user turn holding
//! the image and a prompt, after the default system turn.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::config::{Family, Qwen2VlConfig};
use super::processor::{ImagePatches, ImageProcessor};
use super::rope::{MropePositions, mrope_positions, mrope_tables};
use super::vision::VisionTower;
use crate::llm::config::{MODEL_FILES, read_json};
use crate::llm::generate::{Prompt, Rng, Sampling, generate_batch};
use crate::llm::scorer::{plan_batches, score_packed};
use crate::llm::{LanguageModel, ModelError, Score, Sequence, weights};

/// The system turn Qwen2-VL's chat template adds when the messages have none.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    pub lm: LanguageModel,
    pub tower: VisionTower,
    pub processor: ImageProcessor,
}

/// Where a batch's scoring time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScoreTimes {
    /// The vision tower, all images of the batch.
    pub vision_s: f64,
    /// Splicing, the decoder and the scored positions' log-probabilities.
    pub language_s: f64,
}

/// One record, ready to score: its image's patches and its tokens (image pads expanded).
pub struct PreparedImageRecord {
    pub patches: ImagePatches,
    pub seq: Sequence,
    /// Whether the caption was cut to fit `max_tokens`.
    pub truncated: bool,
    /// Where the image's pads start, and how many there are.
    pub image_at: usize,
    pub image_tokens: usize,
    pub positions: MropePositions,
}

impl Qwen2Vl {
    pub fn load(dir: &Path) -> Result<Qwen2Vl, ModelError> {
        Self::load_on(dir, &Device::Cpu, DType::F32)
    }

    /// Loads `dir` (the hub's layout or transformers 5's) onto `device` in `dtype`.
    pub fn load_on(dir: &Path, device: &Device, dtype: DType) -> Result<Qwen2Vl, ModelError> {
        let config = Qwen2VlConfig::load(dir)?;
        let processor = ImageProcessor::load(dir)?;
        let vb = weights::load(dir, device, dtype)?;
        let (lm_prefix, visual) = if vb.contains_tensor("model.language_model.embed_tokens.weight") {
            ("model.language_model", "model.visual")
        } else {
            ("model", "visual")
        };
        let lm = LanguageModel::from_parts(dir, config.text.clone(), &vb, lm_prefix)?;
        let tower =
            VisionTower::new(&config.vision, config.family, vb.pp(visual)).map_err(|e| weights::explain(dir, e))?;
        device.synchronize()?;
        Ok(Qwen2Vl { config, lm, tower, processor })
    }

    /// The prompt side as the model's chat template renders a user turn of one image then
    /// `prompt` (POINTS' order), with the generation prompt; the image's one `<|image_pad|>` expanded to `image_tokens` copies. Qwen2-VL's
    /// template adds its default system turn ([`DEFAULT_SYSTEM`]).
    pub fn prompt_text(&self, prompt: &str, image_tokens: usize) -> Result<String, ModelError> {
        let mut content = vec![serde_json::json!({"type": "image"})];
        if !prompt.is_empty() {
            content.push(serde_json::json!({"type": "text", "text": prompt}));
        }
        let text = self.lm.tokenizer.render(serde_json::json!([{"role": "user", "content": content}]), true)?;
        let pad = "<|image_pad|>";
        if text.matches(pad).count() != 1 {
            return Err(ModelError::Compute(format!(
                "the chat template rendered {} `{pad}` for one image (a Qwen2-VL template renders one)",
                text.matches(pad).count()
            )));
        }
        Ok(text.replacen(pad, &pad.repeat(image_tokens), 1))
    }

    /// Whether `dir`'s `config.json` names a Qwen2-VL or Qwen2.5-VL model (it may still be a
    /// broken one: [`Qwen2Vl::load`] says how).
    pub fn is_one(dir: &Path) -> bool {
        read_json(&dir.join("config.json"), MODEL_FILES).is_ok_and(|v| Family::of(&v).is_some())
    }

    /// Everything about one record that needs no model weights, the sequence cut to `max_tokens`
    /// from the end (never into the image).
    pub fn prepare_within(
        &self,
        image: &RgbImage,
        prompt: &str,
        caption: &str,
        max_tokens: usize,
    ) -> Result<PreparedImageRecord, ModelError> {
        let mut item = self.prepare(image, prompt, caption)?;
        if item.seq.ids.len() > max_tokens {
            if max_tokens <= item.seq.score_from {
                return Err(ModelError::Compute(format!(
                    "the prompt and the image's {} tokens fill max_tokens ({max_tokens}): nothing is left to score",
                    item.image_tokens
                )));
            }
            item.seq.ids.truncate(max_tokens);
            item.positions.axes.iter_mut().for_each(|a| a.truncate(max_tokens));
            item.truncated = true;
        }
        Ok(item)
    }

    /// Everything about one record that needs no model weights.
    pub fn prepare(&self, image: &RgbImage, prompt: &str, caption: &str) -> Result<PreparedImageRecord, ModelError> {
        let mut item = self.prepare_prompt(image, prompt)?;
        let answer = self.lm.tokenizer.encode(&format!("{caption}<|im_end|>"), false)?;
        item.seq.ids.extend(&answer);
        let last = item.positions.axes[0].last().copied().unwrap_or(-1);
        for (k, _) in answer.iter().enumerate() {
            item.positions.axes.iter_mut().for_each(|a| a.push(last + 1 + k as i64));
        }
        Ok(item)
    }

    /// The image's patches and the prompt's tokens and positions, up to the assistant's turn:
    /// what generation starts from, and what scoring appends the caption to.
    pub fn prepare_prompt(&self, image: &RgbImage, prompt: &str) -> Result<PreparedImageRecord, ModelError> {
        let patches = self.processor.patches(image).map_err(ModelError::Image)?;
        let image_tokens = self.processor.n_image_tokens(&patches);
        let ids = self.lm.tokenizer.encode(&self.prompt_text(prompt, image_tokens)?, false)?;
        let image_at = ids
            .iter()
            .position(|&t| t == self.config.image_token_id)
            .ok_or_else(|| ModelError::Compute("the tokenizer does not know <|image_pad|> as one token".into()))?;
        let m = self.processor.merge_size;
        let [t, h, w] = patches.grid_thw;
        let positions =
            mrope_positions(&ids, self.config.image_token_id, &[[t, h / m, w / m]]).map_err(ModelError::Compute)?;
        let score_from = ids.len();
        Ok(PreparedImageRecord {
            patches,
            seq: Sequence { ids, score_from },
            truncated: false,
            image_at,
            image_tokens,
            positions,
        })
    }

    /// One record's input embeddings [t, H]: its tokens', with the image's merged tokens
    /// (`image`, [n, H] from the tower) in place of its pads.
    fn spliced(&self, item: &PreparedImageRecord, image: Tensor) -> Result<Tensor, ModelError> {
        let decoder = &self.lm.decoder;
        let t = item.seq.ids.len();
        let (at, n) = (item.image_at, item.image_tokens);
        if image.dim(0)? != n || at + n > t {
            return Err(ModelError::Compute(format!(
                "the image gives {} tokens for {n} places at {at} in a sequence of {t}",
                image.dim(0)?
            )));
        }
        let emb = decoder.embed(&Tensor::from_vec(item.seq.ids.clone(), t, decoder.device())?)?;
        let parts = [emb.narrow(0, 0, at)?, image.to_dtype(decoder.dtype())?, emb.narrow(0, at + n, t - at - n)?];
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// M-RoPE's tables [1, t, head_dim/2] of one record's positions.
    fn rotary(&self, item: &PreparedImageRecord) -> Result<(Tensor, Tensor), ModelError> {
        let (c, decoder) = (&self.config, &self.lm.decoder);
        Ok(mrope_tables(
            &[&item.positions],
            item.seq.ids.len(),
            c.mrope_section,
            c.text.head_dim,
            c.text.rope_theta,
            decoder.device(),
            decoder.dtype(),
        )?)
    }

    /// The decoder's inputs for records packed end to end ([`crate::llm::Decoder::hidden_packed`]):
    /// embeddings [N, H] (N their total length) and M-RoPE's tables [N, head_dim/2], from the
    /// images' merged tokens `embeds` (one [n, H] per record).
    fn packed_inputs(
        &self,
        items: &[&PreparedImageRecord],
        embeds: Vec<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let mut xs = Vec::with_capacity(items.len());
        let (mut coss, mut sins) = (Vec::with_capacity(items.len()), Vec::with_capacity(items.len()));
        for (item, image) in items.iter().zip(embeds) {
            xs.push(self.spliced(item, image)?);
            let (cos, sin) = self.rotary(item)?;
            coss.push(cos.squeeze(0)?);
            sins.push(sin.squeeze(0)?);
        }
        Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&coss, 0)?, Tensor::cat(&sins, 0)?))
    }

    /// Scores prepared records in batches of similar length under `batch_tokens` (image tokens
    /// counted), as [`crate::llm::Scorer::score_all`] does for text; scores in `items`' order.
    pub fn score_all(&self, items: &[&PreparedImageRecord], batch_tokens: usize) -> Result<Vec<Score>, ModelError> {
        let lengths: Vec<usize> = items.iter().map(|p| p.seq.ids.len()).collect();
        let mut scores = vec![None; items.len()];
        for batch in plan_batches(&lengths, batch_tokens) {
            let group: Vec<&PreparedImageRecord> = batch.iter().map(|&k| items[k]).collect();
            for (&k, score) in batch.iter().zip(self.score_prepared(&group)?) {
                scores[k] = Some(score);
            }
        }
        scores.into_iter().map(|s| s.ok_or_else(|| ModelError::Compute("a record was not scored".into()))).collect()
    }

    /// Scores prepared records together: one tower pass over their images (attention within
    /// each image), one decoder pass over their sequences packed end to end (attention within
    /// each, no padding computed), so a record's score does not depend on its batch.
    pub fn score_prepared(&self, items: &[&PreparedImageRecord]) -> Result<Vec<Score>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let patches: Vec<&ImagePatches> = items.iter().map(|r| &r.patches).collect();
        let (x, cos, sin) = self.packed_inputs(items, self.tower.forward_many(&patches)?)?;
        self.score_inputs(items, x, &cos, &sin)
    }

    /// [`Qwen2Vl::score_prepared`], saying how its time split between the vision tower and the
    /// language model (the benchmark's: the device is synchronized between the two, which
    /// scoring itself never waits for).
    pub fn score_prepared_timed(&self, items: &[&PreparedImageRecord]) -> Result<(Vec<Score>, ScoreTimes), ModelError> {
        let start = std::time::Instant::now();
        let patches: Vec<&ImagePatches> = items.iter().map(|r| &r.patches).collect();
        let embeds = self.tower.forward_many(&patches)?;
        self.lm.decoder.device().synchronize()?;
        let vision_s = start.elapsed().as_secs_f64();
        let (x, cos, sin) = self.packed_inputs(items, embeds)?;
        let scores = self.score_inputs(items, x, &cos, &sin)?;
        let language_s = start.elapsed().as_secs_f64() - vision_s;
        Ok((scores, ScoreTimes { vision_s, language_s }))
    }

    /// The scores of records from their packed decoder inputs ([`Qwen2Vl::packed_inputs`]).
    fn score_inputs(
        &self,
        items: &[&PreparedImageRecord],
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Vec<Score>, ModelError> {
        let decoder = &self.lm.decoder;
        let seqs: Vec<&Sequence> = items.iter().map(|r| &r.seq).collect();
        score_packed(decoder, x, &seqs, Some((cos, sin)))
    }

    /// New tokens written after prompts prepared with [`Qwen2Vl::prepare_prompt`], all together
    /// ([`generate_batch`]): one tower pass over their images, the prompts in one pass with
    /// M-RoPE, then one token of every unfinished record per step, each at the text position
    /// after its image's block (`rope_delta`). `max_new` and `rngs` are per prompt; a record
    /// stops after a `stop` token (kept).
    pub fn generate(
        &self,
        items: &[&PreparedImageRecord],
        max_new: &[usize],
        stop: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let patches: Vec<&ImagePatches> = items.iter().map(|r| &r.patches).collect();
        let mut prompts = Vec::with_capacity(items.len());
        for (item, image) in items.iter().zip(self.tower.forward_many(&patches)?) {
            let (cos, sin) = self.rotary(item)?;
            prompts.push(Prompt {
                embeddings: self.spliced(item, image)?,
                rotary: Some((cos.squeeze(0)?, sin.squeeze(0)?)),
                shift: item.positions.rope_delta,
            });
        }
        generate_batch(&self.lm.decoder, prompts, max_new, stop, sampling, rngs)
    }

    /// POINTS' score of `caption` for `image` after `prompt`.
    pub fn score(&self, image: &RgbImage, prompt: &str, caption: &str) -> Result<Score, ModelError> {
        Ok(self.score_prepared(&[&self.prepare(image, prompt, caption)?])?[0])
    }
}
