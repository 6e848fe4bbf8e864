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
use crate::llm::scorer::score_hidden;
use crate::llm::{LanguageModel, ModelError, Score, Sequence, weights};

/// The system turn Qwen2-VL's chat template adds when the messages have none.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    pub lm: LanguageModel,
    pub tower: VisionTower,
    pub processor: ImageProcessor,
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

    /// The prompt side as the Qwen2-VL chat template renders a user turn of one image and
    /// `prompt` with the generation prompt, the image's pad expanded to `image_tokens` copies.
    pub fn prompt_text(&self, prompt: &str, image_tokens: usize) -> String {
        format!(
            "<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>{}<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n",
            "<|image_pad|>".repeat(image_tokens)
        )
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
        let patches = self.processor.patches(image).map_err(ModelError::Image)?;
        let image_tokens = self.processor.n_image_tokens(&patches);
        let tok = &self.lm.tokenizer;
        let mut ids = tok.encode(&self.prompt_text(prompt, image_tokens), false)?;
        let score_from = ids.len();
        ids.extend(tok.encode(&format!("{caption}<|im_end|>"), false)?);
        let image_at = ids
            .iter()
            .position(|&t| t == self.config.image_token_id)
            .ok_or_else(|| ModelError::Compute("the tokenizer does not know <|image_pad|> as one token".into()))?;
        let m = self.processor.merge_size;
        let [t, h, w] = patches.grid_thw;
        let positions =
            mrope_positions(&ids, self.config.image_token_id, &[[t, h / m, w / m]]).map_err(ModelError::Compute)?;
        Ok(PreparedImageRecord {
            patches,
            seq: Sequence { ids, score_from },
            truncated: false,
            image_at,
            image_tokens,
            positions,
        })
    }

    /// The record's score: the image through the tower, its tokens replacing the pads, the
    /// decoder with M-RoPE.
    pub fn score_prepared(&self, item: &PreparedImageRecord) -> Result<Score, ModelError> {
        let decoder = &self.lm.decoder;
        let embeds = self.tower.forward(&item.patches)?.to_dtype(decoder.dtype())?;
        let t = item.seq.ids.len();
        let emb = decoder.embed(&Tensor::from_vec(item.seq.ids.clone(), (1, t), decoder.device())?)?.squeeze(0)?;
        let (at, n) = (item.image_at, item.image_tokens);
        let x = Tensor::cat(&[emb.narrow(0, 0, at)?, embeds, emb.narrow(0, at + n, t - at - n)?], 0)?.unsqueeze(0)?;
        let c = &self.config;
        let (cos, sin) = mrope_tables(
            &item.positions,
            c.mrope_section,
            c.text.head_dim,
            c.text.rope_theta,
            decoder.device(),
            decoder.dtype(),
        )?;
        let hidden = decoder.hidden_from_embeddings_with_rotary(x, &cos, &sin)?.squeeze(0)?;
        score_hidden(decoder, &hidden, &item.seq)
    }

    /// POINTS' score of `caption` for `image` after `prompt`.
    pub fn score(&self, image: &RgbImage, prompt: &str, caption: &str) -> Result<Score, ModelError> {
        self.score_prepared(&self.prepare(image, prompt, caption)?)
    }
}
