//! Image encoders for the `encode` stage: the CLIP vision tower of any checkpoint that holds one,
//! with the preprocessing its `preprocessor_config.json` gives.
//!
//! Checkpoints, told apart by `config.json`:
//! - a CLIP vision model (`model_type = "clip_vision_model"`, CLIPVisionModel): the config is the
//!   tower's, weights under `vision_model.` (the hub's layout) or unprefixed (what transformers 5
//!   saves);
//! - a CLIP model (`"clip"`, CLIPModel): `vision_config`, weights under `vision_model.`;
//! - a LLaVA-format VLM (`vision_config` and `text_config`): the tower under
//!   `vision_tower.vision_model.` (the hub's layout) or `vision_tower.` (what transformers 5 saves).

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::clip::{ClipVisionConfig, ClipVisionTower};
use super::preprocess::ClipPreprocessor;
use crate::llm::{ModelError, weights};

/// Which tokens of a hidden state make an image's embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// Every patch token (the class token left out): [patches, hidden].
    Patch,
    /// The class token: `[hidden]`.
    Cls,
    /// The mean of the patch tokens: `[hidden]`.
    Mean,
}

impl Select {
    pub fn from_name(s: &str) -> Option<Select> {
        match s {
            "patch" => Some(Select::Patch),
            "cls" => Some(Select::Cls),
            "mean" => Some(Select::Mean),
            _ => None,
        }
    }
}

pub struct ImageEncoder {
    pub tower: ClipVisionTower,
    pub config: ClipVisionConfig,
    pub preprocess: ClipPreprocessor,
    device: candle_core::Device,
    /// What the tower computes in; embeddings come out as f32.
    dtype: candle_core::DType,
}

impl ImageEncoder {
    /// Loads `dir` in f32 on the CPU.
    pub fn load(dir: &Path) -> Result<ImageEncoder, ModelError> {
        Self::load_on(dir, &candle_core::Device::Cpu, candle_core::DType::F32)
    }

    /// Loads `dir` onto `device`, its weights converted to `dtype`.
    pub fn load_on(
        dir: &Path,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<ImageEncoder, ModelError> {
        let cfg_path = dir.join("config.json");
        let cfg_err = |message: String| ModelError::Config { path: cfg_path.clone(), message };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| cfg_err(format!("cannot read it: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| cfg_err(format!("invalid JSON: {e}")))?;
        let model_type = v["model_type"].as_str().unwrap_or("");
        let vision_json = match model_type {
            "clip_vision_model" => &v,
            _ if v["vision_config"].is_object() => &v["vision_config"],
            _ => {
                return Err(cfg_err(format!(
                    "not an image encoder (model_type `{model_type}`): `encode` takes a CLIP vision model, a CLIP \
                     model or a LLaVA-format VLM"
                )));
            }
        };
        let config = ClipVisionConfig::from_json(vision_json).map_err(cfg_err)?;
        let preprocess = ClipPreprocessor::load(dir)?;
        let [cw, ch] = preprocess.crop;
        if cw as usize != config.image_size || ch as usize != config.image_size {
            return Err(cfg_err(format!(
                "the preprocessor crops {cw}×{ch} but the tower takes {0}×{0} images",
                config.image_size
            )));
        }
        let vb = weights::load(dir, device, dtype)?;
        // transformers 5 saves a CLIPVisionModel's tensors with no prefix at all.
        let tower_vb = if vb.contains_tensor("embeddings.class_embedding") {
            vb.clone()
        } else {
            let prefix = ["vision_model", "vision_tower.vision_model", "vision_tower"]
                .into_iter()
                .find(|p| vb.contains_tensor(&format!("{p}.embeddings.class_embedding")))
                .unwrap_or("vision_model");
            vb.pp(prefix)
        };
        let tower = ClipVisionTower::new(&config, tower_vb).map_err(|e| weights::explain(dir, e))?;
        device.synchronize()?;
        Ok(ImageEncoder { tower, config, preprocess, device: vb.device().clone(), dtype })
    }

    /// Embeddings of a batch of preprocessed images (`pixels`: `batch` × [3, S, S], as
    /// [`ClipPreprocessor::pixels`] makes them) from hidden state `layer`: [batch, ...row], f32.
    pub fn encode(&self, pixels: Vec<f32>, batch: usize, layer: i64, select: Select) -> Result<Tensor, ModelError> {
        let s = self.config.image_size;
        let x =
            Tensor::from_vec(pixels, (batch, self.config.num_channels, s, s), &self.device)?.to_dtype(self.dtype)?;
        let h = self.tower.hidden_state(&x, layer)?.to_dtype(candle_core::DType::F32)?;
        let tokens = h.dim(1)?;
        Ok(match select {
            Select::Patch => h.narrow(1, 1, tokens - 1)?,
            Select::Cls => h.narrow(1, 0, 1)?.squeeze(1)?,
            Select::Mean => h.narrow(1, 1, tokens - 1)?.mean(1)?,
        })
    }

    /// The shape of one image's embedding.
    pub fn row_shape(&self, select: Select) -> Vec<usize> {
        match select {
            Select::Patch => vec![self.config.num_patches(), self.config.hidden_size],
            Select::Cls | Select::Mean => vec![self.config.hidden_size],
        }
    }
}
