//! LLaVA-format VLMs (`LlavaForConditionalGeneration`): CLIP tower → 2-layer projector (GELU) →
//! Qwen2 or LLaMA language model, with the `<image>` token expanded to `image_seq_length` slots
//! that take the projected features of the image.
//!
//! Features come from the tower's hidden state at `vision_feature_layer` (-2 by default), without
//! the class token under the `default` selection strategy. Weights in the hub's layout
//! (`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`) or what
//! transformers 5 saves (`vision_tower.*` without `vision_model.`) both load.

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::Linear;
use serde_json::Value;

use super::clip::{ClipVisionConfig, ClipVisionTower};
use super::preprocess::ClipPreprocessor;
use crate::llm::generate::{Prompt, Rng, Sampling, generate_batch};
use crate::llm::scorer::{plan_batches, score_packed};
use crate::llm::{LanguageModel, LlmConfig, ModelError, Score, Sequence, weights};

/// A record ready to score: see [`Llava::prepare`].
pub struct PreparedRecord {
    /// The preprocessed image [3, S, S].
    pixels: Vec<f32>,
    /// Token ids with the image's slots in place of `<image>`.
    pub seq: Sequence,
    /// Where the slots start.
    at: usize,
    /// Whether `max_tokens` cut the sequence.
    pub truncated: bool,
}

impl PreparedRecord {
    /// The preprocessed image [3, S, S], as the tower takes it.
    pub fn pixels(&self) -> &[f32] {
        &self.pixels
    }
}

pub struct Llava {
    /// The language model: tokenizer and decoder (weights under `language_model.`).
    pub lm: LanguageModel,
    pub tower: ClipVisionTower,
    pub preprocess: ClipPreprocessor,
    proj1: Linear,
    proj2: Linear,
    image_token: u32,
    image_seq_length: usize,
    feature_layer: i64,
    drop_cls: bool,
}

impl Llava {
    /// Loads `dir` in f32 on the CPU.
    pub fn load(dir: &Path) -> Result<Llava, ModelError> {
        Self::load_on(dir, &candle_core::Device::Cpu, candle_core::DType::F32)
    }

    /// Loads `dir` onto `device`, its weights converted to `dtype`.
    pub fn load_on(dir: &Path, device: &candle_core::Device, dtype: candle_core::DType) -> Result<Llava, ModelError> {
        let model = Self::from_weights(dir, weights::load(dir, device, dtype)?)?;
        device.synchronize()?;
        Ok(model)
    }

    /// [`Llava::load`] with the weights given (a soup candidate's, in memory) instead of read
    /// from `dir`, which still provides the config, preprocessor and tokenizer.
    pub fn from_weights(dir: &Path, vb: candle_nn::VarBuilder<'static>) -> Result<Llava, ModelError> {
        let cfg_path = dir.join("config.json");
        let cfg_err = |message: String| ModelError::Config { path: cfg_path.clone(), message };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| cfg_err(format!("cannot read it: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| cfg_err(format!("invalid JSON: {e}")))?;
        if v["vision_config"].is_null() {
            return Err(cfg_err(
                "the model has no vision tower (no `vision_config`), so it cannot score images".into(),
            ));
        }
        let config = LlmConfig::from_json(&v["text_config"]).map_err(|e| cfg_err(format!("text_config: {e}")))?;
        let vision = ClipVisionConfig::from_json(&v["vision_config"]).map_err(cfg_err)?;
        let preprocess = ClipPreprocessor::load(dir)?;
        let vision_prefix = if vb.contains_tensor("vision_tower.vision_model.embeddings.class_embedding") {
            "vision_tower.vision_model"
        } else {
            "vision_tower"
        };
        let tower = ClipVisionTower::new(&vision, vb.pp(vision_prefix)).map_err(|e| weights::explain(dir, e))?;
        let p = vb.pp("multi_modal_projector");
        let linear = |name: &str, inp: usize, out: usize| -> candle_core::Result<Linear> {
            let l = p.pp(name);
            Ok(Linear::new(l.get((out, inp), "weight")?, Some(l.get(out, "bias")?)))
        };
        let proj1 = linear("linear_1", vision.hidden_size, config.hidden_size).map_err(|e| weights::explain(dir, e))?;
        let proj2 = linear("linear_2", config.hidden_size, config.hidden_size).map_err(|e| weights::explain(dir, e))?;
        let lm = LanguageModel::from_parts(dir, config, &vb, "language_model.model")?;
        let image_token = v["image_token_index"].as_u64().or(v["image_token_id"].as_u64()).unwrap_or(32000) as u32;
        let strategy = v["vision_feature_select_strategy"].as_str().unwrap_or("default");
        Ok(Llava {
            image_seq_length: v["image_seq_length"].as_u64().map(|n| n as usize).unwrap_or(vision.num_patches()),
            feature_layer: v["vision_feature_layer"].as_i64().unwrap_or(-2),
            drop_cls: strategy == "default",
            lm,
            tower,
            preprocess,
            proj1,
            proj2,
            image_token,
        })
    }

    /// Projected image features [batch, slots, text hidden] of preprocessed images (each
    /// [3, S, S], as [`ClipPreprocessor::pixels`] makes them), the tower run once for all.
    fn image_features(&self, pixels: &[&[f32]]) -> Result<Tensor, ModelError> {
        let [w, h] = self.preprocess.crop;
        let decoder = &self.lm.decoder;
        let x = Tensor::from_vec(pixels.concat(), (pixels.len(), 3, h as usize, w as usize), decoder.device())?
            .to_dtype(decoder.dtype())?;
        let layer = self.tower.state_index(self.feature_layer).ok_or_else(|| {
            ModelError::Compute(format!("vision_feature_layer {} is out of range", self.feature_layer))
        })?;
        let mut f = self.tower.hidden_state(&x, layer as i64)?;
        if self.drop_cls {
            f = f.narrow(1, 1, f.dim(1)? - 1)?;
        }
        Ok(self.proj2.forward(&self.proj1.forward(&f)?.gelu_erf()?)?)
    }

    /// The perplexity of `text` (+ end of turn) as the answer to `prompt` about `image`:
    /// the user turn is `<image>\n{prompt}`.
    pub fn score(&self, image: &image::RgbImage, prompt: &str, text: &str) -> Result<Score, ModelError> {
        Ok(self.score_within(image, prompt, text, usize::MAX)?.0)
    }

    /// [`Llava::score`] with the sequence (image slots included) cut to `max_tokens` from the
    /// end; says whether it was cut.
    pub fn score_within(
        &self,
        image: &image::RgbImage,
        prompt: &str,
        text: &str,
        max_tokens: usize,
    ) -> Result<(Score, bool), ModelError> {
        let item = self.prepare(image, prompt, text, max_tokens)?;
        let truncated = item.truncated;
        Ok((self.score_prepared(&[&item])?[0], truncated))
    }

    /// Everything about one record that needs no model: its pixels and its token sequence with
    /// the image slots, cut to `max_tokens`. Image errors come out here, before any scoring.
    pub fn prepare(
        &self,
        image: &image::RgbImage,
        prompt: &str,
        text: &str,
        max_tokens: usize,
    ) -> Result<PreparedRecord, ModelError> {
        let pixels = self.preprocess.pixels(image).map_err(ModelError::Image)?;
        let seq = self.lm.tokenizer.answer_sequence(&format!("<image>\n{prompt}"), text)?;
        let at = seq.ids[..seq.score_from]
            .iter()
            .position(|&t| t == self.image_token)
            .ok_or_else(|| ModelError::Compute("the prompt lost its <image> token".into()))?;
        let slots = self.image_seq_length;
        // The one <image> token becomes `slots` positions, which take the features.
        let mut ids: Vec<u32> = seq.ids[..at].to_vec();
        ids.extend(std::iter::repeat_n(self.image_token, slots));
        ids.extend(&seq.ids[at + 1..]);
        let mut seq = Sequence { ids, score_from: seq.score_from + slots - 1 };
        let truncated = seq.ids.len() > max_tokens;
        seq.ids.truncate(max_tokens);
        if seq.ids.len() <= seq.score_from {
            return Err(ModelError::Compute(format!(
                "the prompt and the image's {slots} slots fill max_tokens ({max_tokens}): nothing is left to score"
            )));
        }
        if at + slots > seq.ids.len() {
            return Err(ModelError::Compute(format!(
                "max_tokens ({max_tokens}) cuts into the image's {slots} slots: raise it"
            )));
        }
        Ok(PreparedRecord { pixels, seq, at, truncated })
    }

    /// Scores prepared records in batches of similar length under `batch_tokens` (image slots
    /// counted), as [`crate::llm::Scorer::score_all`] does for text; scores in `items`' order.
    pub fn score_all(&self, items: &[&PreparedRecord], batch_tokens: usize) -> Result<Vec<Score>, ModelError> {
        let lengths: Vec<usize> = items.iter().map(|p| p.seq.ids.len()).collect();
        let mut scores = vec![None; items.len()];
        for batch in plan_batches(&lengths, batch_tokens) {
            let group: Vec<&PreparedRecord> = batch.iter().map(|&k| items[k]).collect();
            for (&k, score) in batch.iter().zip(self.score_prepared(&group)?) {
                scores[k] = Some(score);
            }
        }
        scores.into_iter().map(|s| s.ok_or_else(|| ModelError::Compute("a record was not scored".into()))).collect()
    }

    /// The image's pixels and the chat prefix of a user turn `<image>\n{prompt}` up to the
    /// assistant's turn, the `<image>` token expanded to its slots: what generation starts from.
    pub fn prepare_prompt(&self, image: &image::RgbImage, prompt: &str) -> Result<PreparedRecord, ModelError> {
        let pixels = self.preprocess.pixels(image).map_err(ModelError::Image)?;
        let tok = &self.lm.tokenizer;
        let prefix = tok.encode(&tok.chat_prefix(&format!("<image>\n{prompt}"))?, false)?;
        let at = prefix
            .iter()
            .position(|&t| t == self.image_token)
            .ok_or_else(|| ModelError::Compute("the prompt lost its <image> token".into()))?;
        let mut ids: Vec<u32> = prefix[..at].to_vec();
        ids.extend(std::iter::repeat_n(self.image_token, self.image_seq_length));
        ids.extend(&prefix[at + 1..]);
        let score_from = ids.len();
        Ok(PreparedRecord { pixels, seq: Sequence { ids, score_from }, at, truncated: false })
    }

    /// New tokens written after prompts prepared with [`Llava::prepare_prompt`], all together
    /// ([`generate_batch`]): one tower pass over their images, each image's features in its
    /// slots, then the prompts in one pass and one token of every unfinished record per step.
    /// `max_new` and `rngs` are per prompt; a record stops after a `stop` token (kept).
    pub fn generate(
        &self,
        items: &[&PreparedRecord],
        max_new: &[usize],
        stop: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let prompts =
            self.inputs(items)?.into_iter().map(|x| Prompt { embeddings: x, rotary: None, shift: 0 }).collect();
        generate_batch(&self.lm.decoder, prompts, max_new, stop, sampling, rngs)
    }

    /// The decoder's input embeddings of prepared records, each [t, H]: one tower pass over
    /// their images, each image's projected features in its slots.
    fn inputs(&self, items: &[&PreparedRecord]) -> Result<Vec<Tensor>, ModelError> {
        let pixels: Vec<&[f32]> = items.iter().map(|r| r.pixels.as_slice()).collect();
        let features = self.image_features(&pixels)?;
        let slots = features.dim(1)?;
        if slots != self.image_seq_length {
            return Err(ModelError::Compute(format!(
                "the image gives {slots} feature slots but the model expects image_seq_length = {}",
                self.image_seq_length
            )));
        }
        let decoder = &self.lm.decoder;
        let mut rows = Vec::with_capacity(items.len());
        for (b, r) in items.iter().enumerate() {
            let t = r.seq.ids.len();
            let emb = decoder.embed(&Tensor::from_vec(r.seq.ids.clone(), t, decoder.device())?)?;
            let parts = [emb.narrow(0, 0, r.at)?, features.get(b)?, emb.narrow(0, r.at + slots, t - r.at - slots)?];
            rows.push(Tensor::cat(&parts, 0)?);
        }
        Ok(rows)
    }

    /// Scores prepared records together: one tower pass over their images, one decoder pass
    /// over their sequences packed end to end (each attends only within itself, and no padding
    /// is computed), so a record's score does not depend on its batch.
    pub fn score_prepared(&self, items: &[&PreparedRecord]) -> Result<Vec<Score>, ModelError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let decoder = &self.lm.decoder;
        let seqs: Vec<&Sequence> = items.iter().map(|r| &r.seq).collect();
        score_packed(decoder, Tensor::cat(&self.inputs(items)?, 0)?, &seqs, None)
    }
}
