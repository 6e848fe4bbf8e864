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
use crate::llm::scorer::score_hidden;
use crate::llm::{LanguageModel, LlmConfig, ModelError, Score, Sequence, weights};

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
    pub fn load(dir: &Path) -> Result<Llava, ModelError> {
        Self::from_weights(dir, None)
    }

    /// [`Llava::load`] with the weights given (a soup candidate's, in memory) instead of read
    /// from `dir`, which still provides the config, preprocessor and tokenizer.
    pub fn from_weights(dir: &Path, vb: Option<candle_nn::VarBuilder<'static>>) -> Result<Llava, ModelError> {
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
        let vb = match vb {
            Some(vb) => vb,
            None => weights::load(dir)?,
        };
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

    /// Projected image features [slots, text hidden].
    pub fn image_features(&self, image: &image::RgbImage) -> Result<Tensor, ModelError> {
        let pixels = self.preprocess.pixels(image).map_err(ModelError::Image)?;
        let [w, h] = self.preprocess.crop;
        let x = Tensor::from_vec(pixels, (1, 3, h as usize, w as usize), self.lm.decoder.device())?;
        let states = self.tower.hidden_states(&x)?;
        let layer = if self.feature_layer < 0 { states.len() as i64 + self.feature_layer } else { self.feature_layer };
        let mut f = states
            .get(layer as usize)
            .ok_or_else(|| ModelError::Compute(format!("vision_feature_layer {} is out of range", self.feature_layer)))?
            .squeeze(0)?;
        if self.drop_cls {
            f = f.narrow(0, 1, f.dim(0)? - 1)?;
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
        let seq = self.lm.tokenizer.answer_sequence(&format!("<image>\n{prompt}"), text)?;
        let at = seq.ids[..seq.score_from]
            .iter()
            .position(|&t| t == self.image_token)
            .ok_or_else(|| ModelError::Compute("the prompt lost its <image> token".into()))?;
        let features = self.image_features(image)?;
        let slots = features.dim(0)?;
        if slots != self.image_seq_length {
            return Err(ModelError::Compute(format!(
                "the image gives {slots} feature slots but the model expects image_seq_length = {}",
                self.image_seq_length
            )));
        }
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
        let t = seq.ids.len();
        let decoder = &self.lm.decoder;
        let emb = decoder.embed(&Tensor::from_vec(seq.ids.clone(), (1, t), decoder.device())?)?;
        let x = Tensor::cat(
            &[&emb.narrow(1, 0, at)?, &features.unsqueeze(0)?, &emb.narrow(1, at + slots, t - at - slots)?],
            1,
        )?;
        let hidden = decoder.hidden_from_embeddings(x)?.squeeze(0)?;
        Ok((score_hidden(decoder, &hidden, &seq)?, truncated))
    }
}
