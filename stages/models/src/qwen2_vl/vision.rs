//! The vision tower of Qwen2-VL and Qwen2.5-VL: patch rows → merged image tokens in the language
//! model's width.
//!
//! - patch embedding: each row (channels × 2 frames × 14 × 14) times the Conv3d weight reshaped
//!   to [width, row] (no bias);
//! - 2-D rotary embedding per head: angles (row · f, column · f) of the patch in the patch grid,
//!   f = 10000^(−2k/(head_dim/2)) for k < head_dim/4, repeated twice to head_dim, applied in f32;
//! - blocks: pre-norm attention (qkv and projection with biases) and MLP. Qwen2-VL: LayerNorm
//!   (eps 1e-6) and fc1 → QuickGELU → fc2, full attention over the image's patches. Qwen2.5-VL:
//!   RMSNorm and a SwiGLU MLP with biases; its patches are reordered into windows of
//!   `window_size / 28` × `window_size / 28` merged tokens (ragged at the right and bottom),
//!   and blocks not in `fullatt_block_indexes` attend within their window only;
//! - the merger: norm, the 4 patches of each merged token side by side, Linear → GELU (erf) →
//!   Linear; Qwen2.5-VL's outputs are put back into row-major order.
//!
//! Several images go through in one pass, packed one after another; attention never crosses
//! images (nor, in Qwen2.5-VL's windowed blocks, windows), and each image's patches come in the
//! order the processor lays them out ([`super::processor`]). A large image's attention is formed
//! in query blocks of at most [`SCORE_BLOCK_ELEMENTS`] scores.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, RmsNorm, VarBuilder};

use super::config::{Family, VisionAct, VisionConfig};
use super::processor::{ImagePatches, patch_order};
use crate::llm::ModelError;
use crate::llm::SCORE_BLOCK_ELEMENTS;

/// LayerNorm (Qwen2-VL, with a bias) or RMSNorm (Qwen2.5-VL), eps 1e-6.
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
}

const NORM_EPS: f64 = 1e-6;

impl Norm {
    fn load(family: Family, size: usize, vb: VarBuilder) -> candle_core::Result<Norm> {
        let weight = vb.get(size, "weight")?;
        let bias = match family {
            Family::Qwen2Vl => Some(vb.get(size, "bias")?),
            Family::Qwen25Vl => None,
        };
        Ok(Norm { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(bias) => LayerNorm::new(self.weight.clone(), bias.clone(), NORM_EPS).forward(x),
            None => RmsNorm::new(self.weight.clone(), NORM_EPS).forward(x),
        }
    }
}

enum Mlp {
    /// fc1 → activation → fc2.
    Plain { fc1: Linear, fc2: Linear, act: VisionAct },
    /// down(act(gate(x)) · up(x)).
    Gated { gate: Linear, up: Linear, down: Linear, act: VisionAct },
}

fn activate(x: &Tensor, act: VisionAct) -> candle_core::Result<Tensor> {
    match act {
        VisionAct::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        VisionAct::Silu => candle_nn::ops::silu(x),
        VisionAct::Gelu => x.gelu_erf(),
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Mlp::Plain { fc1, fc2, act } => fc2.forward(&activate(&fc1.forward(x)?, *act)?),
            Mlp::Gated { gate, up, down, act } => down.forward(&(activate(&gate.forward(x)?, *act)? * up.forward(x)?)?),
        }
    }
}

struct Block {
    norm1: Norm,
    norm2: Norm,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

/// A contiguous f32 CPU tensor's values (the rotary tables, the activations).
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl Block {
    /// The block's tensors in the order [`VisionTower::blocks_cpu`] reads them (norm1 weight and
    /// bias, qkv, proj, norm2, fc1 or gate, fc2 or down, then up), when the CPU path can run it:
    /// QuickGELU with a plain MLP or SiLU with a gated one, every linear layer with its bias.
    /// Norm biases are absent for RMSNorm.
    fn cpu_tensors(&self) -> Option<Vec<Option<&Tensor>>> {
        let (fc1, fc2, up) = match &self.mlp {
            Mlp::Plain { fc1, fc2, act: VisionAct::QuickGelu } => (fc1, fc2, None),
            Mlp::Gated { gate, up, down, act: VisionAct::Silu } => (gate, down, Some(up)),
            _ => return None,
        };
        let mut out = vec![Some(&self.norm1.weight), self.norm1.bias.as_ref()];
        for l in [&self.qkv, &self.proj] {
            out.extend([Some(l.weight()), Some(l.bias()?)]);
        }
        out.extend([Some(&self.norm2.weight), self.norm2.bias.as_ref()]);
        for l in [Some(fc1), Some(fc2), up].into_iter().flatten() {
            out.extend([Some(l.weight()), Some(l.bias()?)]);
        }
        Some(out)
    }
}

/// The vision tower, loaded.
pub struct VisionTower {
    config: VisionConfig,
    family: Family,
    /// [width, channels · temporal_patch_size · patch_size²].
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger_norm: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    device: Device,
    dtype: DType,
    /// Attention scores formed at once, at most ([`SCORE_BLOCK_ELEMENTS`]).
    score_block: usize,
    /// Whether the blocks run on the CPU path ([`VisionTower::blocks_cpu`]): f32 on the CPU,
    /// every block of a shape it takes.
    cpu_path: bool,
}

impl VisionTower {
    /// The tower's weights under `prefix` (`visual` in the hub's layout, `model.visual` in
    /// transformers 5's).
    pub fn new(config: &VisionConfig, family: Family, vb: VarBuilder) -> candle_core::Result<VisionTower> {
        let c = config;
        let width = c.hidden_size;
        let row = c.in_channels * c.temporal_patch_size * c.patch_size * c.patch_size;
        let patch_embed = vb
            .get((width, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size), "patch_embed.proj.weight")?
            .reshape((width, row))?;
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let b = vb.pp(format!("blocks.{i}"));
            let mlp = match family {
                Family::Qwen2Vl => Mlp::Plain {
                    fc1: candle_nn::linear(width, c.intermediate_size, b.pp("mlp.fc1"))?,
                    fc2: candle_nn::linear(c.intermediate_size, width, b.pp("mlp.fc2"))?,
                    act: c.act,
                },
                Family::Qwen25Vl => Mlp::Gated {
                    gate: candle_nn::linear(width, c.intermediate_size, b.pp("mlp.gate_proj"))?,
                    up: candle_nn::linear(width, c.intermediate_size, b.pp("mlp.up_proj"))?,
                    down: candle_nn::linear(c.intermediate_size, width, b.pp("mlp.down_proj"))?,
                    act: c.act,
                },
            };
            blocks.push(Block {
                norm1: Norm::load(family, width, b.pp("norm1"))?,
                norm2: Norm::load(family, width, b.pp("norm2"))?,
                qkv: candle_nn::linear(width, 3 * width, b.pp("attn.qkv"))?,
                proj: candle_nn::linear(width, width, b.pp("attn.proj"))?,
                mlp,
            });
        }
        let merged = width * c.spatial_merge_size * c.spatial_merge_size;
        let cpu_path =
            vb.device().is_cpu() && vb.dtype() == DType::F32 && blocks.iter().all(|b| b.cpu_tensors().is_some());
        Ok(VisionTower {
            config: c.clone(),
            family,
            patch_embed,
            blocks,
            merger_norm: Norm::load(family, width, vb.pp("merger.ln_q"))?,
            merger_fc1: candle_nn::linear(merged, merged, vb.pp("merger.mlp.0"))?,
            merger_fc2: candle_nn::linear(merged, c.out_hidden_size, vb.pp("merger.mlp.2"))?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            score_block: SCORE_BLOCK_ELEMENTS,
            cpu_path,
        })
    }

    /// Forms at most `elements` attention scores at once from now on (tests hold blocked
    /// attention to the unblocked result).
    pub fn set_score_block(&mut self, elements: usize) {
        self.score_block = elements.max(1);
    }

    /// The merged image tokens of one image: [rows / merge², out_hidden_size], row-major over the
    /// merged grid, as they replace the image's `<|image_pad|>` embeddings.
    pub fn forward(&self, image: &ImagePatches) -> Result<Tensor, ModelError> {
        Ok(self.forward_many(&[image])?.remove(0))
    }

    /// [`VisionTower::forward`] of several images in one pass: their patches packed one after
    /// another (as transformers packs them, with `cu_seqlens`), attention within each image (and
    /// each window) only, so an image's tokens do not depend on the others.
    pub fn forward_many(&self, images: &[&ImagePatches]) -> Result<Vec<Tensor>, ModelError> {
        Ok(self.encode(images)?)
    }

    fn encode(&self, images: &[&ImagePatches]) -> candle_core::Result<Vec<Tensor>> {
        let c = &self.config;
        let m = c.spatial_merge_size;
        let unit = m * m;
        let Some(first) = images.first() else { return Ok(Vec::new()) };
        let row_len = first.row_len;
        if let Some(odd) = images.iter().find(|i| i.row_len != row_len || i.values.len() != i.rows() * i.row_len) {
            candle_core::bail!(
                "an image's patches have rows of {} values, not the {row_len} of the others",
                odd.row_len
            );
        }
        // Packed: image after image. Per image its patches' (row, column), its merged tokens in the
        // order the blocks see them (Qwen2.5-VL: by window) and its attention spans.
        let n: usize = images.iter().map(|i| i.rows()).sum();
        let mut values = Vec::with_capacity(n * row_len);
        let mut rows_cols = Vec::with_capacity(n);
        let mut order = Vec::with_capacity(n / unit);
        let (mut full, mut windowed) = (Vec::with_capacity(images.len()), Vec::new());
        for image in images {
            let [t, gh, gw] = image.grid_thw;
            let before = order.len();
            values.extend_from_slice(&image.values);
            let (image_order, windows) = match (self.family, c.window_size) {
                (Family::Qwen25Vl, Some(size)) => window_order(t, gh / m, gw / m, size / c.merge_factor()),
                _ => ((0..image.rows() / unit).collect(), vec![image.rows() / unit]),
            };
            let cells: Vec<(usize, usize)> = patch_order(image.grid_thw, m).collect();
            for &tok in &image_order {
                rows_cols.extend_from_slice(&cells[tok * unit..(tok + 1) * unit]);
                order.push(before + tok);
            }
            full.push(image.rows());
            windowed.extend(windows.iter().map(|w| w * unit));
        }
        let pixels =
            Tensor::from_vec(values, (n, row_len), &Device::Cpu)?.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mut x = pixels.matmul(&self.patch_embed.t()?)?;
        let permute = order.iter().enumerate().any(|(k, &tok)| k != tok);
        if permute {
            let patches: Vec<u32> =
                order.iter().flat_map(|&tok| (0..unit).map(move |p| (tok * unit + p) as u32)).collect();
            x = x.index_select(&Tensor::new(patches.as_slice(), &self.device)?, 0)?;
        }
        let (cos, sin) = self.rotary(&rows_cols)?;
        let spans_of = |i: usize| {
            if self.family == Family::Qwen25Vl && !c.fullatt_block_indexes.contains(&i) { &windowed } else { &full }
        };
        if self.cpu_path {
            x = self.blocks_cpu(x, &cos, &sin, &spans_of)?;
        } else {
            for (i, block) in self.blocks.iter().enumerate() {
                let h = block.norm1.forward(&x)?;
                x = (x + self.attention(block, &h, &cos, &sin, spans_of(i))?)?;
                let h = block.norm2.forward(&x)?;
                x = (&x + block.mlp.forward(&h)?)?;
            }
        }
        let merged = self.merger_norm.forward(&x)?.reshape((n / unit, unit * c.hidden_size))?;
        let mut out = self.merger_fc2.forward(&self.merger_fc1.forward(&merged)?.gelu_erf()?)?;
        if permute {
            // Back to row-major: the token at k goes to order[k].
            let mut inverse = vec![0u32; order.len()];
            for (k, &tok) in order.iter().enumerate() {
                inverse[tok] = k as u32;
            }
            out = out.index_select(&Tensor::new(inverse.as_slice(), &self.device)?, 0)?;
        }
        let mut start = 0;
        let mut each = Vec::with_capacity(images.len());
        for image in images {
            let tokens = image.rows() / unit;
            each.push(out.narrow(0, start, tokens)?);
            start += tokens;
        }
        Ok(each)
    }

    /// The blocks on the CPU in f32, over plain buffers with [`crate::kernels`]' fused kernels:
    /// the residuals added by the projections' gemm calls, attention within each span in query
    /// blocks, the rotary embedding in place (the same arithmetic as the candle path).
    fn blocks_cpu<'s>(
        &self,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        spans_of: &dyn Fn(usize) -> &'s Vec<usize>,
    ) -> candle_core::Result<Tensor> {
        use crate::kernels;
        let c = &self.config;
        let (n, w) = x.dims2()?;
        let (heads, d) = (c.num_heads, c.head_dim());
        let gated = self.blocks.iter().any(|b| matches!(b.mlp, Mlp::Gated { .. }));
        let inter = c.intermediate_size;
        let (cos, sin) = (values(cos)?, values(sin)?);
        let mut x = values(&x)?;
        let mut normed = vec![0f32; n * w];
        let mut qkv = vec![0f32; n * 3 * w];
        let mut attended = vec![0f32; n * w];
        let mut mlp = vec![0f32; n * inter];
        let mut up = if gated { vec![0f32; n * inter] } else { Vec::new() };
        let norm = |x: &[f32], g: &[f32], b: Option<&[f32]>, dst: &mut [f32]| match b {
            Some(b) => kernels::layer_norm(x, g, b, NORM_EPS, dst),
            None => kernels::rms_norm(x, g, NORM_EPS, dst),
        };
        for (i, block) in self.blocks.iter().enumerate() {
            // The weights are read in place, as the CLIP tower's CPU path reads them.
            let tensors =
                block.cpu_tensors().ok_or_else(|| candle_core::Error::Msg("a block off the CPU path".into()))?;
            let guards: Vec<_> = tensors.iter().map(|t| t.map(|t| t.storage_and_layout())).collect();
            let weights = guards
                .iter()
                .map(|g| g.as_ref().map(|(s, l)| kernels::f32_values(s, l)).transpose())
                .collect::<candle_core::Result<Vec<Option<&[f32]>>>>()?;
            let want =
                |k: usize| weights[k].ok_or_else(|| candle_core::Error::Msg("a CPU-path weight is missing".into()));
            norm(&x, want(0)?, weights[1], &mut normed);
            kernels::linear(&normed, n, want(2)?, want(3)?, &mut qkv, false);
            kernels::rotary_qk_in_place(&mut qkv, heads, d, &cos, &sin);
            kernels::attention_spans(&qkv, spans_of(i), heads, self.score_block / heads.max(1), &mut attended)?;
            kernels::linear(&attended, n, want(4)?, want(5)?, &mut x, true);
            norm(&x, want(6)?, weights[7], &mut normed);
            kernels::linear(&normed, n, want(8)?, want(9)?, &mut mlp, false);
            if weights.len() > 12 {
                kernels::linear(&normed, n, want(12)?, want(13)?, &mut up, false);
                kernels::swiglu_in_place(&mut mlp, &up);
            } else {
                kernels::quick_gelu_in_place(&mut mlp);
            }
            kernels::linear(&mlp, n, want(10)?, want(11)?, &mut x, true);
        }
        Tensor::from_vec(x, (n, w), &self.device)
    }

    /// cos and sin, [n, head_dim] in f32, of the 2-D rotary angles of each patch.
    fn rotary(&self, rows_cols: &[(usize, usize)]) -> candle_core::Result<(Tensor, Tensor)> {
        let head_dim = self.config.head_dim();
        let dim = head_dim / 2;
        // As transformers forms them: in f32, 1 / 10000^(2k / dim).
        let inv_freq: Vec<f32> = (0..dim / 2).map(|k| 1.0 / 10000f32.powf((2 * k) as f32 / dim as f32)).collect();
        let mut angles = Vec::with_capacity(rows_cols.len() * head_dim);
        for &(r, c) in rows_cols {
            let half: Vec<f32> =
                inv_freq.iter().map(|f| r as f32 * f).chain(inv_freq.iter().map(|f| c as f32 * f)).collect();
            angles.extend_from_slice(&half);
            angles.extend_from_slice(&half);
        }
        let angles = Tensor::from_vec(angles, (rows_cols.len(), head_dim), &self.device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// Attention of `h` [n, width] within consecutive spans of `spans` rows.
    fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        spans: &[usize],
    ) -> candle_core::Result<Tensor> {
        let n = h.dim(0)?;
        let heads = self.config.num_heads;
        let head_dim = self.config.head_dim();
        let qkv = block.qkv.forward(h)?.reshape((n, 3, heads, head_dim))?;
        let rope = |x: Tensor| -> candle_core::Result<Tensor> {
            // [n, heads, head_dim] in f32: x·cos + rotate_half(x)·sin.
            let x = x.to_dtype(DType::F32)?;
            let x1 = x.narrow(D::Minus1, 0, head_dim / 2)?;
            let x2 = x.narrow(D::Minus1, head_dim / 2, head_dim / 2)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
            (x.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?)?.to_dtype(self.dtype)
        };
        let q = rope(qkv.narrow(1, 0, 1)?.squeeze(1)?)?.transpose(0, 1)?.contiguous()?;
        let k = rope(qkv.narrow(1, 1, 1)?.squeeze(1)?)?.transpose(0, 1)?.contiguous()?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(spans.len());
        let mut start = 0;
        for &len in spans {
            let (k, v) = (k.narrow(1, start, len)?, v.narrow(1, start, len)?);
            // Queries in blocks, so that a large image's scores stay within `score_block`.
            let block = (self.score_block / (heads * len).max(1)).clamp(1, len);
            let mut from = 0;
            while from < len {
                let rows = block.min(len - from);
                let q = q.narrow(1, start + from, rows)?;
                let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
                outs.push(probs.matmul(&v)?);
                from += rows;
            }
            start += len;
        }
        let out = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, heads * head_dim))?;
        block.proj.forward(&out)
    }
}

/// Qwen2.5-VL's window order over a t × mh × mw grid of merged tokens: windows of `side` × `side`
/// tokens (ragged at the right and bottom edges), row-major, tokens row-major inside; the merged
/// token at each place, and each window's size.
pub fn window_order(t: usize, mh: usize, mw: usize, side: usize) -> (Vec<usize>, Vec<usize>) {
    let side = side.max(1);
    let (mut order, mut sizes) = (Vec::with_capacity(t * mh * mw), Vec::new());
    for frame in 0..t {
        for wy in (0..mh).step_by(side) {
            for wx in (0..mw).step_by(side) {
                let before = order.len();
                for y in wy..(wy + side).min(mh) {
                    for x in wx..(wx + side).min(mw) {
                        order.push((frame * mh + y) * mw + x);
                    }
                }
                sizes.push(order.len() - before);
            }
        }
    }
    (order, sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_row_major_and_ragged_at_the_edges() {
        // 3 × 5 merged tokens in windows of 2 × 2.
        let (order, sizes) = window_order(1, 3, 5, 2);
        assert_eq!(order, [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        assert_eq!(sizes, [4, 4, 2, 2, 2, 1]);
    }
}
