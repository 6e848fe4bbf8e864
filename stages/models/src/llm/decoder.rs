//! The LLaMA-family decoder: LLaMA, Yi and Qwen2 in one file, since they differ only in biases.
//!
//! Grouped-query attention (down to one KV head), RoPE with the configured theta (HF's
//! rotate-half layout), RMSNorm, SwiGLU MLP, tied or separate `lm_head`. Weight names are the
//! checkpoint's (`model.layers.N.self_attn.q_proj.weight`, ...). [`Decoder::hidden`] returns the
//! final hidden states at every position, so callers pick the positions they need logits for.
//!
//! The mask is causal only. With right padding that is exact for every real token: a token never
//! attends to a later position, and pads come after all real tokens. Sequences of unequal length
//! (a VLM's records, whose images differ in size) go packed end to end instead
//! ([`Decoder::hidden_packed`]): the linear layers see only real tokens, and attention runs
//! sequence by sequence.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::kernels::FastLinear as Linear;

use super::LlmConfig;

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables are computed in f64, stored in the model's dtype (as transformers casts them
    /// to the activations' dtype).
    fn new(cfg: &LlmConfig, device: &Device, dtype: DType) -> candle_core::Result<Rope> {
        let half = cfg.head_dim / 2;
        let inv: Vec<f64> =
            (0..half).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)).collect();
        let n = cfg.max_positions;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
        })
    }

    fn apply(&self, x: &Tensor, start: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos.narrow(0, start, t)?, &self.sin.narrow(0, start, t)?)
    }
}

/// Where each position's rotary angles come from: the model's table from a start position, or
/// per-sequence tables [B, T, head_dim/2] given by the caller (Qwen2-VL's M-RoPE).
#[derive(Clone, Copy)]
enum Rotation<'a> {
    From(&'a Rope, usize),
    Given(&'a Tensor, &'a Tensor),
}

/// Where the rotary angles of a [`Decoder::step_embeddings`]'s new positions come from.
#[derive(Clone, Copy)]
pub enum StepRotary<'a> {
    /// The model's table, the new positions numbered from the cache's length plus this shift
    /// (0 for text; Qwen2-VL's `rope_delta` for the tokens generated after an image).
    Shifted(i64),
    /// Tables [B, t, head_dim/2] in the model's dtype (Qwen2-VL's M-RoPE for a prompt).
    Given(&'a Tensor, &'a Tensor),
}

impl Rotation<'_> {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Rotation::From(rope, start) => rope.apply(x, *start),
            Rotation::Given(cos, sin) => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        }
    }
}

fn linear(vb: &VarBuilder, inp: usize, out: usize, bias: bool) -> candle_core::Result<Linear> {
    let w = vb.get((out, inp), "weight")?;
    let b = if bias { Some(vb.get(out, "bias")?) } else { None };
    Ok(Linear { weight: w, bias: b })
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlmConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Attention {
            q: linear(&vb.pp("q_proj"), h, cfg.num_heads * d, cfg.qkv_bias)?,
            k: linear(&vb.pp("k_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            v: linear(&vb.pp("v_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            o: linear(&vb.pp("o_proj"), cfg.num_heads * d, h, cfg.o_bias)?,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: d,
        })
    }

    /// Attention of the `t` new positions of `x` over the keys and values in `cache` (the first
    /// `past` columns of its preallocated [B, KV, capacity, D] buffers, which this pass's own are
    /// written after) and their own, for every position or only the `queries` rows of `x` (their
    /// indices, with their rotary angles: a pass that needs hidden states only there). Returns
    /// the output ([B, queries, H]).
    ///
    /// The scale is folded into q (one pass over [B,H,T,D], not over the scores); grouped-query
    /// attention reshapes q to [B, kv_heads, rep·T, D] so keys and values are used as they are,
    /// never repeated; the scores go through in the query blocks of this `pass`, each over only
    /// the keys it can see, sequence by sequence where the pass packs several.
    fn forward(
        &self,
        x: &Tensor,
        rotation: Rotation<'_>,
        cache: Option<(&(Tensor, Tensor), usize)>,
        pass: &Pass,
        queries: Option<(&Tensor, Rotation<'_>)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let shape = |y: Tensor, t: usize, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
        let scale = 1.0 / (d as f64).sqrt();
        let (xq, tq, q_rotation) = match queries {
            Some((rows, rotation)) => (x.index_select(rows, 1)?, rows.dim(0)?, rotation),
            None => (x.clone(), t, rotation),
        };
        let q = (q_rotation.apply(&shape(self.q.forward(&xq)?, tq, self.heads)?)? * scale)?;
        let mut k = rotation.apply(&shape(self.k.forward(x)?, t, self.kv_heads)?)?;
        let mut v = shape(self.v.forward(x)?, t, self.kv_heads)?.contiguous()?;
        if let Some(((ck, cv), past)) = cache {
            // In place: the cache was sized for the whole generation, so no step copies it.
            ck.slice_set(&k, 2, past)?;
            cv.slice_set(&v, 2, past)?;
            k = ck.narrow(2, 0, past + t)?;
            v = cv.narrow(2, 0, past + t)?;
        }
        let y = match pass.sequences.as_slice() {
            [one] if one.queries_from == 0 && one.blocks.t == tq && one.blocks.past + tq == k.dim(2)? => {
                grouped_causal_attention(&q, &k, &v, &one.blocks)?
            }
            packed => {
                if cache.is_some() || b != 1 {
                    candle_core::bail!("packed sequences take one row of positions and no cache");
                }
                let mut parts = Vec::with_capacity(packed.len());
                for seq in packed {
                    let keys = seq.blocks.past + seq.blocks.t;
                    let (k, v) = (k.narrow(2, seq.keys_from, keys)?, v.narrow(2, seq.keys_from, keys)?);
                    parts.push(grouped_causal_attention(
                        &q.narrow(2, seq.queries_from, seq.blocks.t)?,
                        &k,
                        &v,
                        &seq.blocks,
                    )?);
                }
                Tensor::cat(&parts, 2)?
            }
        };
        let y = y.transpose(1, 2)?.reshape((b, tq, self.heads * d))?;
        self.o.forward(&y)
    }
}

/// Scores ([B, heads, queries, keys] elements) formed at once by default: 2²⁷ (512 MiB in f32).
/// candle's CUDA kernels index with 32-bit integers, so a block past 2³¹ elements would be read
/// out of bounds (one 4.7k-token record on a 28-head model gets there unblocked); and the
/// memory attention takes stays bounded whatever the length.
pub const SCORE_BLOCK_ELEMENTS: usize = 1 << 27;

/// How one forward pass of `t` queries after `past` cached positions splits its attention: query
/// blocks whose scores ([B, heads, queries, keys]) stay within a budget, each with its causal
/// mask. They are the same in every layer, so they are made once per pass; the masks are formed
/// on the device from position indices.
struct QueryBlocks {
    past: usize,
    t: usize,
    blocks: Vec<QueryBlock>,
}

struct QueryBlock {
    start: usize,
    len: usize,
    /// Keys the block sees: positions up to its last query's.
    keys: usize,
    /// Added to the block's scores: [len, keys], or [B, 1, 1, len, keys] where rows are padded;
    /// 0 where a key is visible, -inf where it is later than the query or a padding column; none
    /// for a single query of unpadded rows, which sees every key it is given.
    bias: Option<Tensor>,
}

impl QueryBlocks {
    /// Blocks for `rows` = B · heads query rows per position, scores of at most `budget` elements.
    /// `pads` [B] (u32), where rows are left-padded: row b's first `pads[b]` columns are
    /// padding, hidden from its real positions (a padding position sees what causality allows,
    /// so that its values stay finite; nothing real reads them).
    fn new(
        rows: usize,
        t: usize,
        past: usize,
        budget: usize,
        pads: Option<&Tensor>,
        device: &Device,
    ) -> candle_core::Result<QueryBlocks> {
        let per_block = (budget / (rows * (past + t)).max(1)).clamp(1, t.max(1));
        let mut blocks = Vec::with_capacity(t.div_ceil(per_block));
        for start in (0..t).step_by(per_block) {
            let len = per_block.min(t - start);
            let keys = past + start + len;
            if len == 1 && pads.is_none() {
                // A single query of unpadded rows sees every key: no mask to make (every
                // generation step of an unpadded batch).
                blocks.push(QueryBlock { start, len, keys, bias: None });
                continue;
            }
            let query_pos = Tensor::arange((past + start) as u32, keys as u32, device)?;
            let key_pos = Tensor::arange(0u32, keys as u32, device)?;
            let causal = if len == 1 {
                None
            } else {
                // Key j is hidden from query i (position past + start + i) when j > past + start + i.
                let visible = key_pos.unsqueeze(0)?.broadcast_le(&query_pos.unsqueeze(1)?)?;
                Some(additive(&visible, &[len, keys], 0.0, f32::NEG_INFINITY)?)
            };
            let bias = match pads {
                None => causal,
                Some(pads) => {
                    let b = pads.dim(0)?;
                    let pads = pads.reshape((b, 1, 1))?;
                    // Hidden: a padding key (j < pad) from a real query (i >= pad).
                    let padding_key = key_pos.reshape((1, 1, keys))?.broadcast_lt(&pads)?;
                    let real_query = query_pos.reshape((1, len, 1))?.broadcast_ge(&pads)?;
                    let hidden = padding_key.broadcast_minimum(&real_query)?;
                    let bias = additive(&hidden, &[b, len, keys], f32::NEG_INFINITY, 0.0)?;
                    let bias = match causal {
                        Some(causal) => bias.broadcast_add(&causal)?,
                        None => bias,
                    };
                    Some(bias.reshape((b, 1, 1, len, keys))?)
                }
            };
            blocks.push(QueryBlock { start, len, keys, bias });
        }
        Ok(QueryBlocks { past, t, blocks })
    }
}

/// `on` where `condition` (u8, broadcast to `shape`) holds, else `off`, in f32.
fn additive(condition: &Tensor, shape: &[usize], on: f32, off: f32) -> candle_core::Result<Tensor> {
    let device = condition.device();
    let condition = condition.broadcast_as(shape)?;
    condition.where_cond(&Tensor::full(on, shape, device)?, &Tensor::full(off, shape, device)?)
}

/// How the positions of one forward pass split into sequences, each with its query blocks: one
/// sequence of `t` positions per row for a right-padded batch or a cached step, or several laid
/// end to end in one row (packed: no padding computed), each attending only within itself.
struct Pass {
    sequences: Vec<PassSequence>,
}

/// One sequence of a [`Pass`]: its queries are `blocks.t` rows from `queries_from` of the
/// pass's queries, its keys `blocks.past + blocks.t` rows from `keys_from` of its keys (the
/// queries are the last of its positions).
struct PassSequence {
    queries_from: usize,
    keys_from: usize,
    blocks: QueryBlocks,
}

/// Causal attention of q [B, H, T, D] (already scaled) over k, v [B, KV, S, D] (S = past + T:
/// the last T keys are the queries' own positions, the first a cache), H a multiple of KV (head
/// h reads key/value head h / (H / KV), as transformers' `repeat_kv` lays them out), in the
/// pass's query `blocks`. [B, H, T, D]. Scores and their softmax are in f32 whatever the dtype.
fn grouped_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, blocks: &QueryBlocks) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, s, _) = k.dims4()?;
    if heads % kv_heads != 0 || t != blocks.t || s != blocks.past + t {
        candle_core::bail!("attention: {heads} query heads over {kv_heads} key heads, {t} queries over {s} keys");
    }
    let rep = heads / kv_heads;
    let dtype = q.dtype();
    // [B, KV, rep, T, D]: the query heads that share a key head, side by side.
    let q = q.contiguous()?.reshape((b, kv_heads, rep, t, d))?;
    let mut out = Vec::with_capacity(blocks.blocks.len());
    for &QueryBlock { start, len: n, keys, ref bias } in &blocks.blocks {
        let qb = if n == t { q.clone() } else { q.narrow(3, start, n)?.contiguous()? };
        let qb = qb.reshape((b, kv_heads, rep * n, d))?;
        // Keys and values as they lie (a narrowed cache included): matmul reads row-strided
        // operands, so no step copies them.
        let (kb, vb) = if keys == s { (k.clone(), v.clone()) } else { (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?) };
        let scores = qb.matmul(&kb.t()?)?.to_dtype(DType::F32)?;
        let scores = match bias {
            Some(bias) => scores.reshape((b, kv_heads, rep, n, keys))?.broadcast_add(bias)?.reshape((
                b,
                kv_heads,
                rep * n,
                keys,
            ))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        out.push(probs.matmul(&vb)?.reshape((b, kv_heads, rep, n, d))?);
    }
    let y = if out.len() == 1 { out.pop().expect("one block") } else { Tensor::cat(&out, 3)? };
    y.reshape((b, heads, t, d))
}

/// The SwiGLU MLP, `down(silu(gate(x)) · up(x))`, with `gate` and `up` as one projection: one
/// matmul of twice the width instead of two (the input is packed once), then one fused pass.
struct Mlp {
    /// [2·I, H]: the gate's rows, then up's.
    gate_up: Linear,
    down: Linear,
    inter: usize,
}

impl Mlp {
    fn new(cfg: &LlmConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = linear(&vb.pp("gate_proj"), h, i, cfg.mlp_bias)?;
        let up = linear(&vb.pp("up_proj"), h, i, cfg.mlp_bias)?;
        let bias = match (&gate.bias, &up.bias) {
            (Some(g), Some(u)) => Some(Tensor::cat(&[g, u], 0)?),
            _ => None,
        };
        Ok(Mlp {
            gate_up: Linear { weight: Tensor::cat(&[&gate.weight, &up.weight], 0)?, bias },
            down: linear(&vb.pp("down_proj"), i, h, cfg.mlp_bias)?,
            inter: i,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        let y = if gate_up.device().is_cpu() && gate_up.dtype() == DType::F32 {
            gate_up.apply_op1_no_bwd(&crate::kernels::SwiGlu)?
        } else {
            let gate = gate_up.narrow(D::Minus1, 0, self.inter)?;
            (candle_nn::ops::silu(&gate)? * gate_up.narrow(D::Minus1, self.inter, self.inter)?)?
        };
        self.down.forward(&y)
    }
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

impl Layer {
    fn new(cfg: &LlmConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Layer {
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("post_attention_layernorm"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotation: Rotation<'_>,
        cache: Option<(&(Tensor, Tensor), usize)>,
        pass: &Pass,
        queries: Option<(&Tensor, Rotation<'_>)>,
    ) -> candle_core::Result<Tensor> {
        let a = self.attn.forward(&self.input_norm.forward(x)?, rotation, cache, pass, queries)?;
        let x = match queries {
            Some((rows, _)) => (x.index_select(rows, 1)? + a)?,
            None => (x + a)?,
        };
        &x + self.mlp.forward(&self.post_norm.forward(&x)?)?
    }
}

/// Keys and values of the positions seen so far, per layer: [B, kv_heads, capacity, head_dim]
/// buffers allocated once ([`Decoder::new_batch_cache`]), filled from column 0 (keys before
/// repeating KV heads), so a step writes its own and copies nothing else.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    /// Each row's padding columns, as given and on the device; none when no row is padded.
    pads: Option<(Vec<usize>, Tensor)>,
    pub len: usize,
}

impl KvCache {
    /// Rows of the batch.
    pub fn rows(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[0])
    }

    /// Keeps only `rows` (indices, in the order given): generation drops the rows that have
    /// finished, so later steps compute only the rest.
    pub fn keep_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        let Some((k, _)) = self.layers.first() else { return Ok(()) };
        let device = k.device().clone();
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect(), rows.len(), &device)?;
        for (k, v) in &mut self.layers {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        if let Some((pads, _)) = &self.pads {
            let kept: Vec<usize> = rows.iter().map(|&r| pads[r]).collect();
            let tensor = Tensor::from_vec(kept.iter().map(|&p| p as u32).collect(), kept.len(), &device)?;
            self.pads = Some((kept, tensor));
        }
        Ok(())
    }
}

pub struct Decoder {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// [vocab, hidden]
    lm_head: Tensor,
    rope: Rope,
    device: Device,
    /// Attention scores formed at once, at most ([`SCORE_BLOCK_ELEMENTS`]).
    score_block: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Decoder {
    /// `prefix` is where the decoder's weights start (`model`, or `language_model.model` in a VLM);
    /// `lm_head.weight` is looked up beside it.
    pub fn new(cfg: &LlmConfig, vb: VarBuilder, prefix: &str) -> candle_core::Result<Decoder> {
        let m = vb.pp(prefix);
        let embed_w = m.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?;
        let parent = match prefix.rsplit_once('.') {
            Some((p, _)) => vb.pp(p),
            None => vb.clone(),
        };
        let lm_head = if parent.contains_tensor("lm_head.weight") {
            parent.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
        } else if vb.contains_tensor("lm_head.weight") {
            // transformers 5's VLMs: `model.language_model.*` and a top-level `lm_head`.
            vb.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
        } else if cfg.tie_word_embeddings {
            embed_w.clone()
        } else {
            // Name the tensor that is missing.
            parent.get((cfg.vocab_size, cfg.hidden_size), "lm_head.weight")?
        };
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::new(cfg, m.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Decoder {
            embed: Embedding::new(embed_w, cfg.hidden_size),
            layers,
            norm: candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            lm_head,
            rope: Rope::new(cfg, vb.device(), vb.dtype())?,
            device: vb.device().clone(),
            score_block: SCORE_BLOCK_ELEMENTS,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// [vocab, hidden]
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Embeddings of token ids [B, T] → [B, T, H].
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.embed.forward(ids)
    }

    /// Forms at most `elements` attention scores at once from now on (tests hold blocked
    /// attention to the unblocked result; see [`SCORE_BLOCK_ELEMENTS`]).
    pub fn set_score_block(&mut self, elements: usize) {
        self.score_block = elements.max(1);
    }

    /// Final hidden states [B, T, H] of input embeddings [B, T, H] (causal attention).
    pub fn hidden_from_embeddings(&self, x: Tensor) -> candle_core::Result<Tensor> {
        self.hidden_rotated(x, Rotation::From(&self.rope, 0))
    }

    /// [`Decoder::hidden_from_embeddings`] with each position's rotary angles given: `cos` and
    /// `sin` [B, T, head_dim/2] in the model's dtype (Qwen2-VL's M-RoPE, whose angles come from
    /// three position axes).
    pub fn hidden_from_embeddings_with_rotary(
        &self,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.hidden_rotated(x, Rotation::Given(cos, sin))
    }

    fn hidden_rotated(&self, x: Tensor, rotation: Rotation<'_>) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let pass = self.batch_pass(b, t, 0, None)?;
        self.layers_then_norm(x, rotation, &pass)
    }

    fn layers_then_norm(&self, x: Tensor, rotation: Rotation<'_>, pass: &Pass) -> candle_core::Result<Tensor> {
        let mut x = x;
        for layer in &self.layers {
            x = layer.forward(&x, rotation, None, pass, None)?;
        }
        self.norm.forward(&x)
    }

    /// Final hidden states of sequences packed end to end, at each one's last `keep[i]`
    /// positions: [Σ keep, H], sequence by sequence. The input embeddings are [N, H], the
    /// sequences' lengths `lens` summing to N. Nothing is padded, so a batch of unequal lengths
    /// costs what its tokens cost; each sequence attends only within itself, as if it were
    /// alone. The last layer computes queries, attention output and MLP only at the kept
    /// positions (a scorer keeps the caption's: with an image before it, most of the sequence).
    /// Rotary angles come from each sequence's positions 0.., or are given per position
    /// (`rotary`: cos and sin [N, head_dim/2] in the model's dtype, Qwen2-VL's M-RoPE).
    pub fn hidden_packed(
        &self,
        x: Tensor,
        lens: &[usize],
        keep: &[usize],
        rotary: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        if lens.iter().sum::<usize>() != n || keep.len() != lens.len() || keep.iter().zip(lens).any(|(k, l)| k > l) {
            candle_core::bail!(
                "packed sequences of {} positions (keeping {}) for {n} embeddings",
                lens.iter().sum::<usize>(),
                keep.iter().sum::<usize>()
            );
        }
        let (cos, sin) = match rotary {
            Some((cos, sin)) => (cos.clone(), sin.clone()),
            None => {
                let table = self.rope.cos.dim(0)?;
                if let Some(long) = lens.iter().find(|&&l| l > table) {
                    candle_core::bail!("a sequence of {long} positions passes the model's {table}");
                }
                let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
                let positions = Tensor::from_vec(positions, n, &self.device)?;
                (self.rope.cos.index_select(&positions, 0)?, self.rope.sin.index_select(&positions, 0)?)
            }
        };
        let (mut every, mut last, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        let (mut start, mut kept) = (0, 0);
        for (&len, &keep) in lens.iter().zip(keep) {
            let blocks = QueryBlocks::new(self.heads, len, 0, self.score_block, None, &self.device)?;
            every.push(PassSequence { queries_from: start, keys_from: start, blocks });
            if keep > 0 {
                let blocks = QueryBlocks::new(self.heads, keep, len - keep, self.score_block, None, &self.device)?;
                last.push(PassSequence { queries_from: kept, keys_from: start, blocks });
                rows.extend((start + len - keep..start + len).map(|r| r as u32));
            }
            start += len;
            kept += keep;
        }
        if rows.is_empty() {
            return Tensor::zeros((0, x.dim(1)?), x.dtype(), &self.device);
        }
        let rows = Tensor::from_vec(rows, kept, &self.device)?;
        let Some((final_layer, layers)) = self.layers.split_last() else {
            return self.norm.forward(&x.index_select(&rows, 0)?);
        };
        let (cos_kept, sin_kept) =
            (cos.index_select(&rows, 0)?.unsqueeze(0)?, sin.index_select(&rows, 0)?.unsqueeze(0)?);
        let (cos, sin) = (cos.unsqueeze(0)?, sin.unsqueeze(0)?);
        let rotation = Rotation::Given(&cos, &sin);
        let (every, last) = (Pass { sequences: every }, Pass { sequences: last });
        let mut x = x.unsqueeze(0)?;
        for layer in layers {
            x = layer.forward(&x, rotation, None, &every, None)?;
        }
        let x = final_layer.forward(&x, rotation, None, &last, Some((&rows, Rotation::Given(&cos_kept, &sin_kept))))?;
        self.norm.forward(&x)?.squeeze(0)
    }

    /// The pass of `b` sequences of `t` positions after `past` cached ones, one per row, the
    /// rows left-padded by `pads` [B] where given.
    fn batch_pass(&self, b: usize, t: usize, past: usize, pads: Option<&Tensor>) -> candle_core::Result<Pass> {
        let blocks = QueryBlocks::new(b * self.heads, t, past, self.score_block, pads, &self.device)?;
        Ok(Pass { sequences: vec![PassSequence { queries_from: 0, keys_from: 0, blocks }] })
    }

    /// An empty key/value cache for [`Decoder::step`] of one sequence of up to `capacity`
    /// positions.
    pub fn new_cache(&self, capacity: usize) -> candle_core::Result<KvCache> {
        self.new_batch_cache(&[0], capacity)
    }

    /// An empty key/value cache for rows of a batch, each of up to `capacity` positions, row
    /// b's first `pads[b]` of them padding (prompts of unequal length, left-padded to end
    /// together: their padding is never attended to). Its buffers are allocated here, once.
    pub fn new_batch_cache(&self, pads: &[usize], capacity: usize) -> candle_core::Result<KvCache> {
        let b = pads.len();
        let shape = (b, self.kv_heads, capacity, self.head_dim);
        let dtype = self.dtype();
        let layers = (0..self.layers.len())
            .map(|_| Ok((Tensor::zeros(shape, dtype, &self.device)?, Tensor::zeros(shape, dtype, &self.device)?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pads = if pads.iter().any(|&p| p > 0) {
            let tensor = Tensor::from_vec(pads.iter().map(|&p| p as u32).collect(), b, &self.device)?;
            Some((pads.to_vec(), tensor))
        } else {
            None
        };
        Ok(KvCache { layers, capacity, pads, len: 0 })
    }

    /// Final hidden states [1, t, H] of new tokens `ids` [1, t] that follow those in `cache`,
    /// which is extended with them.
    pub fn step(&self, ids: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.step_embeddings(self.embed(ids)?, StepRotary::Shifted(0), cache)
    }

    /// [`Decoder::step`] from input embeddings [B, t, H] (a VLM's prompt, image features
    /// spliced in; a batch's rows), their rotary angles as `rotary` says.
    pub fn step_embeddings(
        &self,
        x: Tensor,
        rotary: StepRotary<'_>,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let rows = cache.layers.first().map_or(b, |(k, _)| k.dims()[0]);
        if b != rows || cache.len + t > cache.capacity {
            candle_core::bail!(
                "{b} rows of {t} positions for a cache of {rows} rows holding {} of {}",
                cache.len,
                cache.capacity
            );
        }
        let rotation = match rotary {
            StepRotary::Given(cos, sin) => Rotation::Given(cos, sin),
            StepRotary::Shifted(_) if cache.pads.is_some() => {
                candle_core::bail!("left-padded rows take their rotary angles given, one table per row")
            }
            StepRotary::Shifted(shift) => {
                let positions = self.rope.cos.dim(0)?;
                let start = cache.len as i64 + shift;
                if start < 0 || start as usize + t > positions {
                    candle_core::bail!("the sequence would pass the model's {positions} positions");
                }
                Rotation::From(&self.rope, start as usize)
            }
        };
        let pass = self.batch_pass(b, t, cache.len, cache.pads.as_ref().map(|(_, p)| p))?;
        let mut x = x;
        for (layer, kv) in self.layers.iter().zip(&cache.layers) {
            x = layer.forward(&x, rotation, Some((kv, cache.len)), &pass, None)?;
        }
        cache.len += t;
        self.norm.forward(&x)
    }

    /// The model's rotary tables at `positions` (one per row): [B, 1, head_dim/2] each, for a
    /// step of rows at different positions.
    pub fn rotary_at(&self, positions: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let table = self.rope.cos.dim(0)?;
        if let Some(p) = positions.iter().find(|&&p| p >= table) {
            candle_core::bail!("position {p} passes the model's {table} positions");
        }
        let b = positions.len();
        let idx = Tensor::from_vec(positions.iter().map(|&p| p as u32).collect(), b, &self.device)?;
        let (cos, sin) = (self.rope.cos.index_select(&idx, 0)?, self.rope.sin.index_select(&idx, 0)?);
        let half = cos.dim(1)?;
        Ok((cos.reshape((b, 1, half))?, sin.reshape((b, 1, half))?))
    }

    /// The model's rotary tables of positions 0..t: [t, head_dim/2] each.
    pub fn rotary_from_start(&self, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let table = self.rope.cos.dim(0)?;
        if t > table {
            candle_core::bail!("a sequence of {t} positions passes the model's {table}");
        }
        Ok((self.rope.cos.narrow(0, 0, t)?, self.rope.sin.narrow(0, 0, t)?))
    }

    /// Final hidden states [B, T, H] of token ids [B, T].
    pub fn hidden(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.hidden_from_embeddings(self.embed(ids)?)
    }

    /// Logits [N, V] for hidden states [N, H].
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        Linear { weight: self.lm_head.clone(), bias: None }.forward(hidden)
    }

    /// Positions the model's rotary table covers.
    pub fn max_positions(&self) -> usize {
        self.rope.cos.dims()[0]
    }

    pub fn dtype(&self) -> DType {
        self.lm_head.dtype()
    }

    /// Log-probabilities of the `[N]` `targets` given hidden states `[N, H]`, in row chunks so that the
    /// full [N, vocab] matrix is never held at once.
    pub fn target_log_probs(&self, hidden: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f32>> {
        if self.device.is_cpu() && hidden.dtype() == DType::F32 && self.lm_head.dtype() == DType::F32 {
            return self.target_log_probs_cpu(hidden, targets, head_rows(self.lm_head.dim(0)?));
        }
        let n = hidden.dim(0)?;
        if targets.len() != n {
            candle_core::bail!("{n} hidden states but {} targets", targets.len());
        }
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && crate::cuda::kernels_load(&self.device) {
            return self.target_log_probs_cuda(hidden, targets);
        }
        let vocab = self.lm_head.dim(0)?;
        let rows = (4_000_000 / vocab.max(1)).clamp(1, 4096);
        let mut out = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let logits = self.logits(&hidden.narrow(0, start, len)?)?;
            let targets = &targets[start..start + len];
            if self.device.is_cpu() {
                // Half precision on the CPU: log-softmax sums in f32 (see `logsumexp`).
                let logits = logits.to_dtype(DType::F32)?.contiguous()?;
                let (storage, layout) = logits.storage_and_layout();
                let data = crate::kernels::f32_values(&storage, layout)?;
                out.extend(super::logsumexp::target_log_probs(data, vocab, targets));
            } else {
                // A GPU whose ladle kernels would not load (see `crate::cuda::kernels_load`).
                let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
                let idx = Tensor::from_slice(targets, (len, 1), &self.device)?;
                out.extend(logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?);
            }
            start += len;
        }
        Ok(out)
    }

    /// [`Decoder::target_log_probs`] on a GPU: the targets go up once, the head runs on as many
    /// rows at a time as keep a block of logits under 2³¹ elements (one pass over the head's
    /// weights per 14k rows at a 152k vocabulary, not per 26), the fused kernel reads each block
    /// in its own dtype, and the results come back in one copy.
    #[cfg(feature = "cuda")]
    fn target_log_probs_cuda(&self, hidden: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f32>> {
        let n = hidden.dim(0)?;
        let vocab = self.lm_head.dim(0)?;
        let rows = (((1usize << 31) - 1) / vocab.max(1)).clamp(1, n.max(1));
        let targets = Tensor::from_slice(targets, n, &self.device)?;
        let mut parts = Vec::with_capacity(n.div_ceil(rows));
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let logits = self.logits(&hidden.narrow(0, start, len)?)?;
            parts.push(crate::cuda::target_log_probs(&logits, &targets.narrow(0, start, len)?)?);
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Tensor::cat(&parts, 0)?.to_vec1::<f32>()
    }

    /// [`Decoder::target_log_probs`] in f32 on the CPU, `rows` at a time: the LM head straight
    /// through `gemm` into one logits buffer reused for every chunk, then the fused log-softmax
    /// (see `logsumexp`).
    fn target_log_probs_cpu(&self, hidden: &Tensor, targets: &[u32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let (n, h) = hidden.dims2()?;
        if targets.len() != n {
            candle_core::bail!("{n} hidden states but {} targets", targets.len());
        }
        let vocab = self.lm_head.dim(0)?;
        let hidden = hidden.contiguous()?;
        let (hs, hl) = hidden.storage_and_layout();
        let x = crate::kernels::f32_values(&hs, hl)?;
        let (ws, wl) = self.lm_head.storage_and_layout();
        let w = crate::kernels::f32_values(&ws, wl)?;
        let rows = rows.clamp(1, n.max(1));
        let mut logits = vec![0f32; rows * vocab];
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(rows) {
            let len = rows.min(n - start);
            let logits = &mut logits[..len * vocab];
            crate::kernels::matmul_wt(&x[start * h..(start + len) * h], len, w, vocab, logits, false);
            out.extend(super::logsumexp::target_log_probs(logits, vocab, &targets[start..start + len]));
        }
        Ok(out)
    }
}

/// Rows of logits computed at a time on the CPU. At least 128: the head is the largest matrix of
/// a small model (Qwen2-0.5B: 152k × 896), and fewer rows per call leave `gemm` packing more than
/// it multiplies (26 rows ran at 84 GFLOP/s here, 128 at 163; 2 cores). The buffer is 16M floats
/// for vocabularies up to 128k, 128 rows above (78 MB at 152k).
fn head_rows(vocab: usize) -> usize {
    ((16 << 20) / vocab.max(1)).clamp(128, 4096)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_cpu_head_in_chunks_matches_log_softmax_and_gather() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny/tiny-qwen2");
        let model = crate::llm::LanguageModel::load(&dir).unwrap();
        let d = &model.decoder;
        let (n, h, vocab) = (300, d.lm_head.dim(1).unwrap(), d.lm_head.dim(0).unwrap());
        let values: Vec<f32> = (0..n * h).map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0).collect();
        let hidden = Tensor::from_vec(values, (n, h), &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..n).map(|i| (i * 104_729 % vocab) as u32).collect();
        let logits = hidden.matmul(&d.lm_head.t().unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let idx = Tensor::from_slice(&targets, (n, 1), &Device::Cpu).unwrap();
        let want = logp.gather(&idx, 1).unwrap().squeeze(1).unwrap().to_vec1::<f32>().unwrap();
        // One chunk, chunks that divide the rows, and chunks with a remainder.
        for rows in [n, 100, 7] {
            let got = d.target_log_probs_cpu(&hidden, &targets, rows).unwrap();
            assert_eq!(got.len(), n);
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{rows} rows a chunk, row {r}: {g} vs {w}");
            }
        }
        assert!(d.target_log_probs_cpu(&hidden, &targets[1..], 7).is_err());
    }

    /// A 6000-token record (past the 2³¹-element wall on a real model's heads unblocked) scores
    /// the same whether its attention goes in one block, the default blocks, or 140 small ones.
    #[test]
    fn blocked_attention_equals_unblocked_on_a_6k_token_record() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny/tiny-qwen2");
        let mut cfg = LlmConfig::load(&dir).unwrap();
        cfg.max_positions = 8192;
        let vb = crate::llm::weights::load(&dir, &Device::Cpu, DType::F32).unwrap();
        let mut decoder = Decoder::new(&cfg, vb, "model").unwrap();
        let t = 6000;
        let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32).collect();
        let ids = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let hidden = |d: &Decoder| d.hidden(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        decoder.set_score_block(usize::MAX);
        let whole = hidden(&decoder);
        // The default: 2 blocks of 5592 and 408 queries here; then 140 blocks of 43.
        for block in [SCORE_BLOCK_ELEMENTS, 1 << 20] {
            decoder.set_score_block(block);
            let got = hidden(&decoder);
            let worst = got.iter().zip(&whole).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(worst <= 2e-5, "{block} scores a block: hidden states differ by {worst}");
        }
    }

    /// Sequences packed end to end come out as each does alone (its positions from 0, its
    /// attention within itself), in one block or many, whole or only at their last positions.
    #[test]
    fn packed_sequences_equal_each_alone() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny/tiny-qwen2");
        let cfg = LlmConfig::load(&dir).unwrap();
        let vb = crate::llm::weights::load(&dir, &Device::Cpu, DType::F32).unwrap();
        let mut decoder = Decoder::new(&cfg, vb, "model").unwrap();
        let lens = [37, 5, 120, 1];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &l)| (0..l).map(|i| ((i * 7919 + s * 104_729 + 13) % cfg.vocab_size) as u32).collect())
            .collect();
        let alone: Vec<f32> = seqs
            .iter()
            .flat_map(|ids| {
                let ids = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
                decoder.hidden(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        let all: Vec<u32> = seqs.concat();
        let x = decoder.embed(&Tensor::from_slice(&all, all.len(), &Device::Cpu).unwrap()).unwrap();
        let width = cfg.hidden_size;
        for block in [SCORE_BLOCK_ELEMENTS, 700] {
            decoder.set_score_block(block);
            // Every position kept, then only some last ones (none of the third sequence).
            for keep in [lens, [3, 5, 0, 1]] {
                let packed = decoder.hidden_packed(x.clone(), &lens, &keep, None).unwrap();
                assert_eq!(packed.dims(), &[keep.iter().sum::<usize>(), width]);
                let packed = packed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (mut start, mut row) = (0, 0);
                for (&len, &k) in lens.iter().zip(&keep) {
                    let want = &alone[(start + len - k) * width..(start + len) * width];
                    let got = &packed[row * width..(row + k) * width];
                    let worst = got.iter().zip(want).map(|(p, a)| (p - a).abs()).fold(0f32, f32::max);
                    assert!(
                        worst <= 1e-5,
                        "{block} scores a block, keeping {keep:?}: packed and alone differ by {worst}"
                    );
                    start += len;
                    row += k;
                }
            }
        }
        // Lengths that do not add up to the embeddings, or keep more than a sequence has, are an
        // error, not a misread.
        assert!(decoder.hidden_packed(x.clone(), &[37, 5, 120], &[1, 1, 1], None).is_err());
        assert!(decoder.hidden_packed(x, &lens, &[38, 1, 1, 1], None).is_err());
    }

    /// Rows of unequal length, left-padded in one batch with a preallocated cache, give each
    /// row's hidden states as it gives alone: the prompt pass (in one query block and in
    /// several), then steps at each row's own position, then steps after rows leave the batch.
    #[test]
    fn padded_rows_in_a_batch_equal_each_alone() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny/tiny-qwen2");
        let cfg = LlmConfig::load(&dir).unwrap();
        let vb = crate::llm::weights::load(&dir, &Device::Cpu, DType::F32).unwrap();
        let mut decoder = Decoder::new(&cfg, vb, "model").unwrap();
        let dev = Device::Cpu;
        let lens = [9usize, 3, 14, 1];
        let steps = 4;
        let ids: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &l)| (0..l + steps).map(|i| ((i * 7919 + s * 104_729 + 13) % cfg.vocab_size) as u32).collect())
            .collect();
        // Alone: each row's hidden states at its prompt's last position, then at each step.
        let alone: Vec<Vec<Vec<f32>>> = ids
            .iter()
            .zip(&lens)
            .map(|(ids, &l)| {
                let all = decoder.hidden(&Tensor::from_slice(ids, (1, ids.len()), &dev).unwrap()).unwrap();
                (l - 1..l + steps).map(|p| all.get(0).unwrap().get(p).unwrap().to_vec1::<f32>().unwrap()).collect()
            })
            .collect();
        let longest = *lens.iter().max().unwrap();
        let pads: Vec<usize> = lens.iter().map(|&l| longest - l).collect();
        let close = |got: &Tensor, want: &[f32], what: &str| {
            let got = got.to_vec1::<f32>().unwrap();
            let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5, "{what}: batch and alone differ by {worst}");
        };
        for block in [SCORE_BLOCK_ELEMENTS, 300] {
            decoder.set_score_block(block);
            let mut cache = decoder.new_batch_cache(&pads, longest + steps).unwrap();
            let (mut xs, mut coss, mut sins) = (Vec::new(), Vec::new(), Vec::new());
            for (row, &l) in lens.iter().enumerate() {
                let x = decoder.embed(&Tensor::from_slice(&ids[row][..l], l, &dev).unwrap()).unwrap();
                let (cos, sin) = decoder.rotary_from_start(l).unwrap();
                // Padding of nonsense, not zeros: nothing real may read it.
                let pad = pads[row];
                let junk = |w: usize| Tensor::full(3.5f32, (pad, w), &dev).unwrap();
                xs.push(Tensor::cat(&[&junk(x.dim(1).unwrap()), &x], 0).unwrap());
                coss.push(Tensor::cat(&[&junk(cos.dim(1).unwrap()), &cos], 0).unwrap());
                sins.push(Tensor::cat(&[&junk(sin.dim(1).unwrap()), &sin], 0).unwrap());
            }
            let (cos, sin) = (Tensor::stack(&coss, 0).unwrap(), Tensor::stack(&sins, 0).unwrap());
            let x = Tensor::stack(&xs, 0).unwrap();
            let hidden = decoder.step_embeddings(x, StepRotary::Given(&cos, &sin), &mut cache).unwrap();
            for row in 0..lens.len() {
                close(
                    &hidden.get(row).unwrap().get(longest - 1).unwrap(),
                    &alone[row][0],
                    &format!("row {row}, prompt"),
                );
            }
            // Steps, every row at its own position; after the second, rows 1 and 3 leave.
            let mut rows: Vec<usize> = (0..lens.len()).collect();
            for step in 0..steps {
                if step == 2 {
                    cache.keep_rows(&[0, 2]).unwrap();
                    rows = vec![0, 2];
                }
                let next: Vec<u32> = rows.iter().map(|&r| ids[r][lens[r] + step]).collect();
                let x = decoder.embed(&Tensor::from_vec(next, (rows.len(), 1), &dev).unwrap()).unwrap();
                let positions: Vec<usize> = rows.iter().map(|&r| lens[r] + step).collect();
                let (cos, sin) = decoder.rotary_at(&positions).unwrap();
                let hidden = decoder.step_embeddings(x, StepRotary::Given(&cos, &sin), &mut cache).unwrap();
                for (b, &r) in rows.iter().enumerate() {
                    let got = hidden.get(b).unwrap().get(0).unwrap();
                    close(&got, &alone[r][step + 1], &format!("{block} scores a block, row {r}, step {step}"));
                }
            }
            // The cache holds what it was sized for, no more.
            let x = decoder.embed(&Tensor::from_vec(vec![1u32, 2], (2, 1), &dev).unwrap()).unwrap();
            let (cos, sin) = decoder.rotary_at(&[0, 0]).unwrap();
            assert!(decoder.step_embeddings(x, StepRotary::Given(&cos, &sin), &mut cache).is_err());
        }
    }
}
