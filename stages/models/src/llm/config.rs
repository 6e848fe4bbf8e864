//! `config.json` of LLaMA-family decoders (LLaMA, Yi, Qwen2), in both layouts transformers writes:
//! top-level `rope_theta`, or transformers 5's `rope_parameters.rope_theta`.

use std::path::Path;

use serde_json::Value;

use super::ModelError;

/// What a model folder must hold, for errors about a file that is not there.
pub(crate) const MODEL_FILES: &str = "a model folder needs config.json, tokenizer.json and *.safetensors";

/// A model folder's JSON file (a config, a preprocessor config); an error names the file and,
/// when it cannot be read, what the folder `needs`.
pub fn read_json(path: &Path, needs: &str) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: format!("cannot read it ({e}); {needs}"),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: format!("invalid JSON: {e}") })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LlamaForCausalLM (also Yi-1.5, the LLM of POINTS-9B).
    Llama,
    /// Qwen2ForCausalLM: LLaMA with biases on q, k and v.
    Qwen2,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    /// LLaMA's `attention_bias` covers o_proj too; Qwen2 biases only q, k and v.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// `eos_token_id`: a number or a list.
    pub eos_token_ids: Vec<u32>,
}

impl LlmConfig {
    pub fn load(dir: &Path) -> Result<LlmConfig, ModelError> {
        let path = dir.join("config.json");
        let v = read_json(&path, MODEL_FILES)?;
        Self::from_json(&v).map_err(|message| ModelError::Config { path, message })
    }

    /// Reads a decoder config; `v` may be a LLaVA config's `text_config` too.
    pub fn from_json(v: &Value) -> Result<LlmConfig, String> {
        let model_type = v["model_type"].as_str().unwrap_or_default();
        let architecture = v["architectures"][0].as_str().unwrap_or_default();
        let arch = match (model_type, architecture) {
            ("qwen2", _) | (_, "Qwen2ForCausalLM") => Arch::Qwen2,
            ("llama" | "yi", _) | (_, "LlamaForCausalLM") => Arch::Llama,
            _ => {
                return Err(format!(
                    "unsupported architecture (model_type `{model_type}`, architectures [`{architecture}`]); ladle runs llama (and Yi) and qwen2 decoders"
                ));
            }
        };
        let usize_key = |key: &str| -> Result<usize, String> {
            v[key].as_u64().map(|n| n as usize).ok_or_else(|| format!("missing or non-integer key `{key}`"))
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = v["num_key_value_heads"].as_u64().map(|n| n as usize).unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            ));
        }
        let head_dim = v["head_dim"].as_u64().map(|n| n as usize).unwrap_or(hidden_size / num_heads);
        let rope = if v["rope_parameters"].is_object() { &v["rope_parameters"] } else { &v["rope_scaling"] };
        if let Some(kind) = rope["rope_type"].as_str().or(rope["type"].as_str())
            && kind != "default"
        {
            return Err(format!("rope_type `{kind}` is not supported yet (only the default RoPE)"));
        }
        let rope_theta = v["rope_theta"].as_f64().or(v["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10_000.0);
        Ok(LlmConfig {
            arch,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta,
            vocab_size: usize_key("vocab_size")?,
            max_positions: v["max_position_embeddings"].as_u64().map(|n| n as usize).unwrap_or(4096),
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || v["attention_bias"].as_bool().unwrap_or(false),
            o_bias: arch == Arch::Llama && v["attention_bias"].as_bool().unwrap_or(false),
            mlp_bias: v["mlp_bias"].as_bool().unwrap_or(false),
            eos_token_ids: match &v["eos_token_id"] {
                Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                x => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_rope_layouts_and_defaults() {
        let base = json!({"model_type": "llama", "hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 96,
                          "num_hidden_layers": 2, "vocab_size": 400, "head_dim": 12});
        let mut a = base.clone();
        a["rope_theta"] = json!(1e6);
        let mut b = base.clone();
        b["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "default"});
        assert_eq!(LlmConfig::from_json(&a).unwrap().rope_theta, 1e6);
        assert_eq!(LlmConfig::from_json(&b).unwrap().rope_theta, 1e6);
        let c = LlmConfig::from_json(&base).unwrap();
        assert_eq!((c.rope_theta, c.num_kv_heads, c.qkv_bias, c.arch), (10_000.0, 4, false, Arch::Llama));
        let mut d = base.clone();
        d["model_type"] = json!("mamba");
        assert!(LlmConfig::from_json(&d).unwrap_err().contains("unsupported architecture"));
        let mut e = base;
        e["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        assert!(LlmConfig::from_json(&e).unwrap_err().contains("rope_type `llama3`"));
    }
}
