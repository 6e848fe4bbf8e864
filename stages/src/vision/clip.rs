//! The CLIP vision tower (ViT), in candle's shape: patch embedding (a convolution without bias),
//! class embedding, position embedding, pre-layernorm, encoder layers (pre-norm attention and MLP
//! with quick_gelu or gelu), post-layernorm on the class token.
//!
//! Weight names are the checkpoint's under a prefix: `vision_model.` in a CLIP checkpoint,
//! `vision_tower.vision_model.` in a hub LLaVA, `vision_tower.` in what transformers 5 saves.
//! [`ClipVisionTower::hidden_states`] returns every hidden state (the embeddings, then each
//! layer's output), since VLMs take their features from a chosen layer (-2 for LLaVA).

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, LayerNorm, Linear, VarBuilder};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl ClipVisionConfig {
    /// From a `vision_config` (or a CLIP vision model's `config.json`).
    pub fn from_json(v: &Value) -> Result<ClipVisionConfig, String> {
        let get = |key: &str| {
            v[key].as_u64().map(|n| n as usize).ok_or_else(|| format!("missing or non-integer `vision_config.{key}`"))
        };
        let activation = match v["hidden_act"].as_str().unwrap_or("quick_gelu") {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => {
                return Err(format!("`vision_config.hidden_act` `{other}` is not supported (quick_gelu, gelu are)"));
            }
        };
        let cfg = ClipVisionConfig {
            hidden_size: get("hidden_size")?,
            intermediate_size: get("intermediate_size")?,
            num_layers: get("num_hidden_layers")?,
            num_heads: get("num_attention_heads")?,
            num_channels: v["num_channels"].as_u64().unwrap_or(3) as usize,
            image_size: get("image_size")?,
            patch_size: get("patch_size")?,
            layer_norm_eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
            activation,
        };
        if cfg.num_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_heads)
            || cfg.patch_size == 0
            || !cfg.image_size.is_multiple_of(cfg.patch_size)
        {
            return Err(
                "vision_config: hidden_size must divide by num_attention_heads and image_size by patch_size".into()
            );
        }
        Ok(cfg)
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((out, inp), "weight")?, Some(vb.get(out, "bias")?)))
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(size, "weight")?, vb.get(size, "bias")?, eps))
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let shape = |y: Tensor| y.reshape((b, t, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (shape(self.q.forward(x)?)?, shape(self.k.forward(x)?)?, shape(self.v.forward(x)?)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?;
        let y = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        self.out.forward(&y)
    }
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let a = vb.pp("self_attn");
        Ok(EncoderLayer {
            norm1: layer_norm(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            attn: Attention {
                q: linear(a.pp("q_proj"), h, h)?,
                k: linear(a.pp("k_proj"), h, h)?,
                v: linear(a.pp("v_proj"), h, h)?,
                out: linear(a.pp("out_proj"), h, h)?,
                heads: cfg.num_heads,
                head_dim: h / cfg.num_heads,
            },
            norm2: layer_norm(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: linear(vb.pp("mlp").pp("fc1"), h, i)?,
            fc2: linear(vb.pp("mlp").pp("fc2"), i, h)?,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let y = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let y = match self.activation {
            Activation::QuickGelu => (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)?,
            Activation::Gelu => y.gelu_erf()?,
        };
        &x + self.fc2.forward(&y)?
    }
}

pub struct ClipVisionTower {
    patch: Conv2d,
    class_embedding: Tensor,
    positions: Embedding,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    num_positions: usize,
}

impl ClipVisionTower {
    /// `vb` points at the tower's `vision_model` (the prefix holding `embeddings.*`).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let conv = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
        let patch_w = e.get((h, cfg.num_channels, cfg.patch_size, cfg.patch_size), "patch_embedding.weight")?;
        let num_positions = cfg.num_patches() + 1;
        Ok(ClipVisionTower {
            patch: Conv2d::new(patch_w, None, conv),
            class_embedding: e.get(h, "class_embedding")?,
            positions: Embedding::new(e.get((num_positions, h), "position_embedding.weight")?, h),
            // The checkpoint's own spelling.
            pre_norm: layer_norm(vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            post_norm: layer_norm(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            num_positions,
        })
    }

    /// Hidden states of pixel values [B, C, S, S]: index 0 is the embeddings after the
    /// pre-layernorm, index i the output of layer i; each [B, 1 + patches, hidden].
    pub fn hidden_states(&self, pixels: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut x = self.embed(pixels)?;
        let mut states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x)?;
            states.push(x.clone());
        }
        Ok(states)
    }

    /// The one hidden state `layer` of [`ClipVisionTower::hidden_states`] (negative counts from
    /// the end: -1 is the last layer's output), running only the layers it needs.
    pub fn hidden_state(&self, pixels: &Tensor, layer: i64) -> candle_core::Result<Tensor> {
        let index = self.state_index(layer).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "layer {layer} is out of range: the tower has {} hidden states (-{} to {})",
                self.layers.len() + 1,
                self.layers.len() + 1,
                self.layers.len()
            ))
        })?;
        let mut x = self.embed(pixels)?;
        for layer in &self.layers[..index] {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    /// The index into [`ClipVisionTower::hidden_states`] that `layer` names, if in range.
    pub fn state_index(&self, layer: i64) -> Option<usize> {
        let n = self.layers.len() as i64 + 1;
        let i = if layer < 0 { n + layer } else { layer };
        (0..n).contains(&i).then_some(i as usize)
    }

    /// Patch embedding, class token and positions, pre-layernorm: [B, 1 + patches, hidden].
    fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let patches = self.patch.forward(pixels)?.flatten_from(2)?.transpose(1, 2)?; // [B, N, H]
        let h = patches.dim(2)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.expand((b, 1, h))?;
        let ids = Tensor::arange(0u32, self.num_positions as u32, pixels.device())?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions.forward(&ids)?)?;
        self.pre_norm.forward(&x)
    }

    /// post_layernorm of the class token of the last hidden state: [B, hidden].
    pub fn pooled(&self, last: &Tensor) -> candle_core::Result<Tensor> {
        self.post_norm.forward(&last.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
