//! `config.json` of Qwen2-VL and Qwen2.5-VL, in both layouts:
//! - the hub's (Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*): the language model's keys at the top level,
//!   `rope_scaling: {type: mrope, mrope_section}`, `vision_config`;
//! - transformers 5's: `text_config` (with `rope_parameters.mrope_section`) and `vision_config`,
//!   `tie_word_embeddings` at the top level.
//!
//! The vision configs of the two families name the same things differently: Qwen2-VL's width is
//! `embed_dim`, its MLP `mlp_ratio` × width and its output `hidden_size`; Qwen2.5-VL's width is
//! `hidden_size`, its MLP `intermediate_size` and its output `out_hidden_size`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::llm::config::{MODEL_FILES, read_json};
use crate::llm::{LlmConfig, ModelError};

/// Which of the two model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen2-VL: a LayerNorm/QuickGELU vision tower with full attention.
    Qwen2Vl,
    /// Qwen2.5-VL: an RMSNorm/SwiGLU vision tower with window attention in most blocks.
    Qwen25Vl,
}

impl Family {
    /// The family a `config.json` names by `model_type` or `architectures`, if either.
    pub fn of(config: &Value) -> Option<Family> {
        let model_type = config["model_type"].as_str().unwrap_or_default();
        let architecture = config["architectures"][0].as_str().unwrap_or_default();
        match (model_type, architecture) {
            ("qwen2_vl", _) | (_, "Qwen2VLForConditionalGeneration") => Some(Family::Qwen2Vl),
            ("qwen2_5_vl", _) | (_, "Qwen2_5_VLForConditionalGeneration") => Some(Family::Qwen25Vl),
            _ => None,
        }
    }
}

/// The vision tower's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAct {
    QuickGelu,
    Silu,
    /// GELU (erf).
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    /// The tower's width.
    pub hidden_size: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    /// The merger's output: the language model's width.
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub in_channels: usize,
    pub act: VisionAct,
    /// Qwen2.5-VL: the side, in pixels, of an attention window.
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: the blocks that attend over the whole image.
    pub fullatt_block_indexes: Vec<usize>,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Pixels per side of one merged token (28 for the released models).
    pub fn merge_factor(&self) -> usize {
        self.patch_size * self.spatial_merge_size
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlConfig {
    pub family: Family,
    /// The language model (a Qwen2 decoder whose RoPE is M-RoPE).
    pub text: LlmConfig,
    /// How many of the rotary frequencies take their angle from the temporal, row and column
    /// positions; they sum to half the head size.
    pub mrope_section: [usize; 3],
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

impl Qwen2VlConfig {
    pub fn load(dir: &Path) -> Result<Qwen2VlConfig, ModelError> {
        let path = dir.join("config.json");
        let v = read_json(&path, MODEL_FILES)?;
        Self::from_json(&v).map_err(|message| ModelError::Config { path, message })
    }

    pub fn from_json(v: &Value) -> Result<Qwen2VlConfig, String> {
        let family = Family::of(v).ok_or_else(|| {
            format!(
                "not a Qwen2-VL or Qwen2.5-VL config (model_type `{}`, architectures [`{}`])",
                v["model_type"].as_str().unwrap_or_default(),
                v["architectures"][0].as_str().unwrap_or_default()
            )
        })?;
        // The language model's keys: `text_config` (transformers 5) or the top level (the hub).
        let (text_json, text_key) = match v.get("text_config") {
            Some(t @ Value::Object(_)) => (t, "text_config."),
            _ => (v, ""),
        };
        let mut decoder: Map<String, Value> = text_json.as_object().cloned().unwrap_or_default();
        decoder.insert("model_type".into(), "qwen2".into());
        decoder.remove("architectures");
        // M-RoPE is read here; the decoder sees the plain RoPE it generalizes.
        let candidates = [
            (&text_json["rope_parameters"], format!("{text_key}rope_parameters.mrope_section")),
            (&text_json["rope_scaling"], format!("{text_key}rope_scaling.mrope_section")),
            (&v["rope_scaling"], "rope_scaling.mrope_section".to_string()),
        ];
        let (mrope, mrope_key) = candidates
            .into_iter()
            .find(|(r, _)| !r["mrope_section"].is_null())
            .map(|(r, key)| (r["mrope_section"].clone(), key))
            .ok_or_else(|| {
                format!("missing `{text_key}rope_scaling.mrope_section` (or `rope_parameters.mrope_section`): M-RoPE needs it")
            })?;
        let rope_theta = text_json["rope_theta"]
            .as_f64()
            .or(text_json["rope_parameters"]["rope_theta"].as_f64())
            .or(v["rope_theta"].as_f64())
            .unwrap_or(10_000.0);
        decoder.remove("rope_scaling");
        decoder.remove("rope_parameters");
        decoder.insert("rope_theta".into(), rope_theta.into());
        if !decoder.contains_key("tie_word_embeddings") {
            decoder.insert("tie_word_embeddings".into(), v["tie_word_embeddings"].as_bool().unwrap_or(false).into());
        }
        let text = LlmConfig::from_json(&Value::Object(decoder)).map_err(|e| format!("{text_key}{e}"))?;
        let sections: Option<Vec<usize>> =
            mrope.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect());
        let mrope_section: [usize; 3] = sections
            .filter(|s| s.len() == mrope.as_array().map_or(0, Vec::len))
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format!("`{mrope_key}` must be three non-negative integers, found {mrope}"))?;
        if mrope_section.iter().sum::<usize>() * 2 != text.head_dim {
            return Err(format!(
                "`{mrope_key}` {mrope_section:?} sums to {}, but it must split the {} rotary frequencies of a head of {} (half the head size)",
                mrope_section.iter().sum::<usize>(),
                text.head_dim / 2,
                text.head_dim
            ));
        }
        let vision = vision_config(family, &v["vision_config"])?;
        if vision.out_hidden_size != text.hidden_size {
            return Err(format!(
                "the vision tower's output ({}) must be the language model's width ({})",
                vision.out_hidden_size, text.hidden_size
            ));
        }
        let token = |key: &str| -> Result<u32, String> {
            v[key].as_u64().or(text_json[key].as_u64()).map(|x| x as u32).ok_or_else(|| format!("missing `{key}`"))
        };
        Ok(Qwen2VlConfig {
            family,
            text,
            mrope_section,
            vision,
            image_token_id: token("image_token_id")?,
            vision_start_token_id: token("vision_start_token_id")?,
            vision_end_token_id: token("vision_end_token_id")?,
        })
    }
}

fn vision_config(family: Family, v: &Value) -> Result<VisionConfig, String> {
    if !v.is_object() {
        return Err("missing `vision_config`".into());
    }
    let int = |key: &str| -> Result<usize, String> {
        v[key]
            .as_u64()
            .filter(|n| *n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| format!("missing or non-positive `vision_config.{key}`"))
    };
    let int_or = |key: &str, default: usize| v[key].as_u64().map(|n| n as usize).unwrap_or(default);
    let (hidden_size, intermediate_size, out_hidden_size) = match family {
        Family::Qwen2Vl => {
            let width = int("embed_dim")?;
            let ratio = v["mlp_ratio"].as_f64().unwrap_or(4.0);
            (width, (width as f64 * ratio) as usize, int("hidden_size")?)
        }
        Family::Qwen25Vl => (int("hidden_size")?, int("intermediate_size")?, int("out_hidden_size")?),
    };
    let act = match v["hidden_act"].as_str().unwrap_or(if family == Family::Qwen2Vl { "quick_gelu" } else { "silu" }) {
        "quick_gelu" => VisionAct::QuickGelu,
        "silu" => VisionAct::Silu,
        "gelu" => VisionAct::Gelu,
        other => return Err(format!("`vision_config.hidden_act` `{other}` is not supported (quick_gelu, silu, gelu)")),
    };
    let num_heads = int("num_heads")?;
    if hidden_size % num_heads != 0 || (hidden_size / num_heads) % 4 != 0 {
        return Err(format!(
            "the vision width ({hidden_size}) must split into {num_heads} heads of a multiple of 4 (2-D rotary)"
        ));
    }
    let depth = int("depth")?;
    let fullatt_block_indexes: Vec<usize> = v["fullatt_block_indexes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_u64())
        .map(|x| x as usize)
        .collect();
    if let Some(bad) = fullatt_block_indexes.iter().find(|i| **i >= depth) {
        return Err(format!("`vision_config.fullatt_block_indexes` names block {bad} of {depth}"));
    }
    Ok(VisionConfig {
        depth,
        hidden_size,
        num_heads,
        intermediate_size,
        out_hidden_size,
        patch_size: int_or("patch_size", 14),
        temporal_patch_size: int_or("temporal_patch_size", 2),
        spatial_merge_size: int_or("spatial_merge_size", 2),
        in_channels: v["in_channels"].as_u64().or(v["in_chans"].as_u64()).map(|n| n as usize).unwrap_or(3),
        act,
        window_size: match family {
            Family::Qwen25Vl => Some(int("window_size")?),
            Family::Qwen2Vl => None,
        },
        fullatt_block_indexes,
    })
}
