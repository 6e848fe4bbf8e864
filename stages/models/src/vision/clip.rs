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

/// Self-attention with Q, K and V projected by one fused matrix ([3·H, H]): one matmul instead of
/// three, and on the CPU the fused kernel of [`crate::kernels::Attention`] reads it directly.
struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, h: usize, heads: usize) -> candle_core::Result<Self> {
        let (q, k, v) = (vb.pp("q_proj"), vb.pp("k_proj"), vb.pp("v_proj"));
        let weight = Tensor::cat(&[q.get((h, h), "weight")?, k.get((h, h), "weight")?, v.get((h, h), "weight")?], 0)?;
        let bias = Tensor::cat(&[q.get(h, "bias")?, k.get(h, "bias")?, v.get(h, "bias")?], 0)?;
        Ok(Attention {
            qkv: Linear::new(weight, Some(bias)),
            out: linear(vb.pp("out_proj"), h, h)?,
            heads,
            head_dim: h / heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let y = if qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32 {
            qkv.contiguous()?.apply_op1_no_bwd(&crate::kernels::Attention { heads: self.heads })?
        } else {
            let (b, t, h3) = qkv.dims3()?;
            let h = h3 / 3;
            let split = |i: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, i * h, h)?.reshape((b, t, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            // Scores and their softmax in f32 whatever the dtype.
            let dtype = q.dtype();
            let scores =
                (q.matmul(&k.t()?)?.to_dtype(candle_core::DType::F32)? * (1.0 / (self.head_dim as f64).sqrt()))?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?
        };
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
    eps: f64,
}

impl EncoderLayer {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(EncoderLayer {
            norm1: layer_norm(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            attn: Attention::new(vb.pp("self_attn"), h, cfg.num_heads)?,
            norm2: layer_norm(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: linear(vb.pp("mlp").pp("fc1"), h, i)?,
            fc2: linear(vb.pp("mlp").pp("fc2"), i, h)?,
            activation: cfg.activation,
            eps: cfg.layer_norm_eps,
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

    /// The CPU path over plain f32 buffers (see [`CpuBuffers`]): `x` [rows, h] is updated in
    /// place, the residuals added by the projections' `gemm` calls themselves.
    fn forward_cpu(&self, x: &mut [f32], b: usize, t: usize, buf: &mut CpuBuffers) -> candle_core::Result<()> {
        let rows = b * t;
        let bias =
            |l: &Linear| l.bias().cloned().ok_or_else(|| candle_core::Error::Msg("a linear layer without bias".into()));
        let tensors = [
            self.norm1.weight().clone(),
            self.norm1.bias().cloned().ok_or_else(|| candle_core::Error::Msg("a layer norm without bias".into()))?,
            self.attn.qkv.weight().clone(),
            bias(&self.attn.qkv)?,
            self.attn.out.weight().clone(),
            bias(&self.attn.out)?,
            self.norm2.weight().clone(),
            self.norm2.bias().cloned().ok_or_else(|| candle_core::Error::Msg("a layer norm without bias".into()))?,
            self.fc1.weight().clone(),
            bias(&self.fc1)?,
            self.fc2.weight().clone(),
            bias(&self.fc2)?,
        ];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let w = guards
            .iter()
            .map(|(s, l)| crate::kernels::f32_values(s, l))
            .collect::<candle_core::Result<Vec<&[f32]>>>()?;
        let [n1g, n1b, wqkv, bqkv, wout, bout, n2g, n2b, w1, b1, w2, b2] = w.as_slice() else { unreachable!() };
        use crate::kernels;
        kernels::layer_norm(x, n1g, n1b, self.eps, &mut buf.normed);
        kernels::linear(&buf.normed, rows, wqkv, bqkv, &mut buf.qkv, false);
        kernels::attention(&buf.qkv, b, t, self.attn.heads, &mut buf.attended)?;
        kernels::linear(&buf.attended, rows, wout, bout, x, true);
        kernels::layer_norm(x, n2g, n2b, self.eps, &mut buf.normed);
        kernels::linear(&buf.normed, rows, w1, b1, &mut buf.mlp, false);
        kernels::quick_gelu_in_place(&mut buf.mlp);
        kernels::linear(&buf.mlp, rows, w2, b2, x, true);
        Ok(())
    }
}

/// Work buffers of the CPU path, allocated once per forward pass and reused by every layer (a
/// fresh 37 MB activation per layer costs page faults the kernel zeroes one by one).
struct CpuBuffers {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attended: Vec<f32>,
    mlp: Vec<f32>,
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
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        self.run(pixels, self.layers.len(), true, &mut |x| states.push(x))?;
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
        let mut last = None;
        self.run(pixels, index, false, &mut |x| last = Some(x))?;
        last.ok_or_else(|| candle_core::Error::Msg("no hidden state".into()))
    }

    /// Runs layers `..upto`, giving `each` the embeddings and then every layer's output (with
    /// `every`; otherwise only the last state). On the
    /// CPU in f32 with quick_gelu (every CLIP), the layers run over plain buffers with the fused
    /// kernels of [`crate::kernels`]; elsewhere with candle's ops.
    fn run(&self, pixels: &Tensor, upto: usize, every: bool, each: &mut dyn FnMut(Tensor)) -> candle_core::Result<()> {
        let x = self.embed(pixels)?;
        let cpu = x.device().is_cpu()
            && x.dtype() == candle_core::DType::F32
            && self.layers.iter().all(|l| l.activation == Activation::QuickGelu);
        if !cpu {
            let mut x = x;
            for layer in &self.layers[..upto] {
                if every {
                    each(x.clone());
                }
                x = layer.forward(&x)?;
            }
            each(x);
            return Ok(());
        }
        let (b, t, h) = x.dims3()?;
        let inter = self.layers.first().map(|l| l.fc1.weight().dim(0)).transpose()?.unwrap_or(0);
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        let mut buf = CpuBuffers {
            normed: vec![0.0; b * t * h],
            qkv: vec![0.0; b * t * 3 * h],
            attended: vec![0.0; b * t * h],
            mlp: vec![0.0; b * t * inter],
        };
        for layer in &self.layers[..upto] {
            if every {
                each(Tensor::from_slice(&v, (b, t, h), x.device())?);
            }
            layer.forward_cpu(&mut v, b, t, &mut buf)?;
        }
        each(Tensor::from_vec(v, (b, t, h), x.device())?);
        Ok(())
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
        let patches = self.patch_embeddings(pixels)?.flatten_from(2)?.transpose(1, 2)?; // [B, N, H]
        let h = patches.dim(2)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.expand((b, 1, h))?;
        let ids = Tensor::arange(0u32, self.num_positions as u32, pixels.device())?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions.forward(&ids)?)?;
        self.pre_norm.forward(&x)
    }

    /// The patch convolution [B, H, grid, grid]. candle's CPU convolution has no bf16 kernel, so
    /// there a half-precision tower convolves in f32 and rounds the result to its dtype.
    fn patch_embeddings(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = pixels.dtype();
        if !pixels.device().is_cpu() || dtype == candle_core::DType::F32 {
            return self.patch.forward(pixels);
        }
        let f32 = candle_core::DType::F32;
        let weight = self.patch.weight().to_dtype(f32)?;
        let cfg = *self.patch.config();
        let conv = candle_nn::Conv2d::new(weight, self.patch.bias().map(|b| b.to_dtype(f32)).transpose()?, cfg);
        conv.forward(&pixels.to_dtype(f32)?)?.to_dtype(dtype)
    }

    /// post_layernorm of the class token of the last hidden state: [B, hidden].
    pub fn pooled(&self, last: &Tensor) -> candle_core::Result<Tensor> {
        self.post_norm.forward(&last.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
