//! Fused CPU kernels for the model forward passes, over plain f32 slices and as candle ops.
//!
//! candle composes attention and activations from generic tensor ops, each a full pass over
//! memory, several single-threaded: for a ViT-L/14-336 batch of 4, `x * sigmoid(1.702 x)` alone
//! took 74 ms per layer against PyTorch's 44 (measured, 2 cores), and attention materialized
//! 85 MB of scores plus four transposed copies per layer. These kernels do the same arithmetic in
//! one pass, split across threads:
//! - [`quick_gelu_in_place`]: `x · sigmoid(1.702 x)`;
//! - [`attention`] (and the [`Attention`] custom op): softmax(Q Kᵀ / √d) V for every (image,
//!   head) straight from the fused QKV projection's output, through `gemm` with strides (no
//!   transposes), one block of scores per thread, the softmax's division applied to the output
//!   rows (d values each) rather than the scores (T each);
//! - [`linear`] (and [`FastLinear`], a drop-in for candle's `Linear`): bias and residual folded
//!   into the gemm call, one single-threaded gemm per thread on rows or output columns;
//!   [`matmul_wt`], the same without a bias (the LM head's logits);
//! - [`SwiGlu`]: `silu(gate) · up` over a fused gate-and-up projection (the LLM's MLP);
//! - [`layer_norm`].
//!
//! `exp` is Cody–Waite range reduction and a degree-7 polynomial (relative error below 5e-7,
//! tested), in plain arithmetic the compiler vectorizes. Other devices keep candle's ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// exp(x) for x ≤ 0; below -87 it returns 0's neighbourhood.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to the nearest integer
    // ln 2 split in two (Cody–Waite): n · LN2_HI is exact, so x - n·ln2 keeps its precision.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let f = (x - n * LN2_HI) - n * LN2_LO; // e^x = 2^n · e^f, |f| ≤ ln2 / 2
    // e^f by its Taylor series to degree 7 (error < 5e-9 relative on |f| ≤ 0.35).
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// sigmoid(z), from exp of a non-positive argument on both sides of 0 (branch-free, so loops
/// over it vectorize).
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    let s = 1.0 / (1.0 + e);
    if z >= 0.0 { s } else { e * s }
}

/// Runs `$body` compiled for AVX-512 or AVX2+FMA when the CPU has them (the crate is built for
/// baseline x86-64, where these loops get 4-lane SSE), else as built.
macro_rules! with_best_simd {
    ($name:ident, ($($arg:ident: $ty:ty),*), $body:expr) => {
        #[inline(always)]
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    $body
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    $body
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body
        }
    };
}

pub(crate) use with_best_simd;

with_best_simd!(quick_gelu_inplace_fast, (x: &mut [f32]), {
    for v in x.iter_mut() {
        *v *= sigmoid(1.702 * *v);
    }
});
// Each row of `scores` ([rows, t]) replaced by exp(x - its max), and `inv[r]` set to 1 / the
// row's sum (16 lanes, so the loop vectorizes): a softmax whose division is left to the caller,
// who applies it to the d values of P·V's row instead of the t values of P's (one pass over the
// scores fewer).
with_best_simd!(exp_rows_fast, (scores: &mut [f32], t: usize, inv: &mut [f32]), {
    for (row, inv) in scores.chunks_exact_mut(t).zip(inv.iter_mut()) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut lanes = [0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for (l, s) in lanes.iter_mut().zip(c.iter_mut()) {
                *s = exp_nonpositive(*s - max);
                *l += *s;
            }
        }
        let mut sum = 0f32;
        for s in chunks.into_remainder() {
            *s = exp_nonpositive(*s - max);
            sum += *s;
        }
        *inv = 1.0 / (sum + lanes.iter().sum::<f32>());
    }
});

with_best_simd!(swiglu_rows_fast, (gate_up: &[f32], dst: &mut [f32], inter: usize), {
    for (row, out) in gate_up.chunks_exact(2 * inter).zip(dst.chunks_exact_mut(inter)) {
        let (gate, up) = row.split_at(inter);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    }
});

/// Elements per parallel task: big enough to amortize scheduling, small enough to balance.
const CHUNK: usize = 1 << 14;

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// Multi-head self-attention over a fused QKV projection `[B, T, 3·H]` (Q, K, V side by side,
/// each head's `d = H / heads` columns within them): returns `[B, T, H]` with the heads side by
/// side, as the output projection takes it.
pub struct Attention {
    pub heads: usize,
}

/// A raw pointer the tasks share; each writes its own columns of the output.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (image, head) blocks of the output, which outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, "attention")?;
        let (b, t, three_h) = layout.shape().dims3()?;
        let mut out = vec![0f32; b * t * three_h / 3];
        attention(qkv, b, t, self.heads, &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from((b, t, three_h / 3))))
    }
}

/// [`Attention`] over slices: `qkv` is [b, t, 3·h], `out` [b, t, h].
pub fn attention(qkv: &[f32], b: usize, t: usize, heads: usize, out: &mut [f32]) -> candle_core::Result<()> {
    attention_spans(qkv, &vec![t; b], heads, t * t, out)
}

/// Self-attention within consecutive spans of rows (packed images, or windows of one): `qkv` is
/// [n, 3·h] with n the spans' total, `out` [n, h]; a row attends only to the rows of its span.
/// Each (span, head) goes in blocks of query rows whose scores stay within `block` values, so
/// a large image needs a bounded buffer per thread (softmax is per row: blocks change nothing).
pub fn attention_spans(
    qkv: &[f32],
    spans: &[usize],
    heads: usize,
    block: usize,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let n: usize = spans.iter().sum();
    let three_h = qkv.len() / n.max(1);
    let h = three_h / 3;
    if qkv.len() != n * three_h || !three_h.is_multiple_of(3) || !h.is_multiple_of(heads) || out.len() != n * h {
        candle_core::bail!("attention: {} values are not [{n}, 3 × heads × head size]", qkv.len());
    }
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    // Tasks: (first row of the span, span length, head, first query row, query rows).
    let mut tasks = Vec::new();
    let mut start = 0;
    for &len in spans {
        let rows = (block / len.max(1)).clamp(1, len.max(1));
        for head in 0..heads {
            for q0 in (0..len).step_by(rows) {
                tasks.push((start, len, head, q0, rows.min(len - q0)));
            }
        }
        start += len;
    }
    let widest = tasks.iter().map(|&(_, len, _, _, rows)| len * rows).max().unwrap_or(0);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let most_rows = tasks.iter().map(|&(_, _, _, _, rows)| rows).max().unwrap_or(0);
    tasks.into_par_iter().for_each_init(
        || (vec![0f32; widest], vec![0f32; most_rows]),
        |(scores, inv), (start, len, head, q0, rows)| {
            let base = start * three_h + head * d;
            let (q, k, v) = (&qkv[base + q0 * three_h..], &qkv[base + h..], &qkv[base + 2 * h..]);
            let rs = three_h as isize;
            let scores = &mut scores[..rows * len];
            // SAFETY: every pointer and stride stays inside `qkv` (rows of the span, columns of
            // the head), `scores` (rows × len) and this task's block of `out` (its query rows,
            // its head's columns), which no other task writes.
            unsafe {
                // scores = scale · Q Kᵀ: Q [rows, d] with rows 3h apart; Kᵀ [d, len] read from K.
                gemm::gemm(
                    rows,
                    len,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    len as isize,
                    false,
                    q.as_ptr(),
                    1,
                    rs,
                    k.as_ptr(),
                    rs,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            let inv = &mut inv[..rows];
            exp_rows_fast(scores, len, inv);
            let dst = out_ptr;
            unsafe {
                // out[rows of the block, head·d..] = P V: P [rows, len]; V [len, d], rows 3h apart.
                gemm::gemm(
                    rows,
                    d,
                    len,
                    dst.0.add((start + q0) * h + head * d),
                    1,
                    h as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    len as isize,
                    v.as_ptr(),
                    1,
                    rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                // The softmax's division, on the output rows.
                for (r, &inv) in inv.iter().enumerate() {
                    let row = std::slice::from_raw_parts_mut(dst.0.add((start + q0 + r) * h + head * d), d);
                    row.iter_mut().for_each(|x| *x *= inv);
                }
            }
        },
    );
    Ok(())
}

/// Rotary embedding in place on the Q and K parts of `qkv` ([n, 3·h], `heads` heads of `d`
/// each): per row r and head, x·cos + rotate_half(x)·sin with `cos`/`sin` [n, d], in the order
/// of operations candle's ops take.
pub fn rotary_qk_in_place(qkv: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    let (three_h, half) = (3 * heads * d, d / 2);
    qkv.par_chunks_mut(three_h).zip(cos.par_chunks(d).zip(sin.par_chunks(d))).for_each(|(row, (c, s))| {
        for x in row[..2 * heads * d].chunks_exact_mut(d) {
            for i in 0..half {
                let (x1, x2) = (x[i], x[i + half]);
                x[i] = x1 * c[i] + -x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    });
}

/// RMS normalization of each `gamma.len()`-wide row of `x` into `dst` (the mean square in f64).
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f64, dst: &mut [f32]) {
    let h = gamma.len();
    dst.par_chunks_mut(h * 16).zip(x.par_chunks(h * 16)).for_each(|(d, x)| {
        for (d, x) in d.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
            let inv = (1.0 / (ms + eps).sqrt()) as f32;
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(gamma) {
                *d = x * inv * g;
            }
        }
    });
}

/// `gate = silu(gate) · up`, in place, across threads.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    gate.par_chunks_mut(CHUNK).zip(up.par_chunks(CHUNK)).for_each(|(g, u)| swiglu_split_fast(g, u));
}

with_best_simd!(swiglu_split_fast, (gate: &mut [f32], up: &[f32]), {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g * sigmoid(*g) * u;
    }
});

/// `x · sigmoid(1.702 x)` in place, across threads.
pub fn quick_gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(quick_gelu_inplace_fast);
}

/// SwiGLU over a fused gate-and-up projection: each row of the input, `[.., 2·I]`, holds the
/// gate's `I` values, then the up projection's; the output `[.., I]` is `silu(gate) · up`, in one
/// pass across threads (candle's `silu` then `*` are two passes and two allocations, with libm's
/// scalar `expf`).
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "swiglu")?;
        let mut dims = layout.shape().dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("swiglu: the fused gate-and-up width {width} is odd");
        }
        let inter = width / 2;
        let mut dst = vec![0f32; x.len() / 2];
        if let Some(rows_per_task) = CHUNK.checked_div(inter) {
            let rows_per_task = rows_per_task.max(1);
            dst.par_chunks_mut(rows_per_task * inter)
                .zip(x.par_chunks(rows_per_task * width))
                .for_each(|(dst, x)| swiglu_rows_fast(x, dst, inter));
        }
        if let Some(last) = dims.last_mut() {
            *last = inter;
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

/// `dst[r] (+)= bias + x[r] · Wᵀ` for the `rows` rows of `x` ([rows, in]) and `w` ([out, in],
/// as checkpoints store it): a linear layer by one `gemm` call with the bias (and, with
/// `accumulate`, the residual already in `dst`) as its starting value.
pub fn linear(x: &[f32], rows: usize, w: &[f32], bias: &[f32], dst: &mut [f32], accumulate: bool) {
    let out = bias.len();
    dst.par_chunks_mut(out * 64).for_each(|block| {
        for row in block.chunks_exact_mut(out) {
            if accumulate {
                row.iter_mut().zip(bias).for_each(|(d, b)| *d += b);
            } else {
                row.copy_from_slice(bias);
            }
        }
    });
    matmul_wt(x, rows, w, out, dst, true);
}

/// `dst = x · Wᵀ` for the `rows` rows of `x` ([rows, in]) and `w` ([out, in]): [`linear`]
/// without a bias, which neither fills `dst` first nor reads it.
pub fn matmul_wt(x: &[f32], rows: usize, w: &[f32], out: usize, dst: &mut [f32], read_dst: bool) {
    let inp = x.len() / rows.max(1);
    assert_eq!(w.len(), inp * out, "matmul_wt: the weight is not [{out}, {inp}]");
    assert_eq!(dst.len(), rows * out, "matmul_wt: the output is not [{rows}, {out}]");
    if rows <= SKINNY_ROWS && skinny_fits(inp) {
        return skinny_matmul_wt(x, rows, w, out, dst, read_dst);
    }
    // One single-threaded gemm per thread, on an even share of the work: measured faster on 2
    // cores than gemm's own threading (which synchronizes inside every call). Many rows (a ViT
    // batch) split by rows; few rows (a batch of short captions) split the output columns, so
    // each thread packs only its share of the weights.
    let threads = rayon::current_num_threads().max(1);
    // SAFETY (both arms): every gemm call stays inside its share of x, w and dst.
    if rows >= 256 * threads {
        let per = rows.div_ceil(threads);
        dst.par_chunks_mut(per * out).zip(x.par_chunks(per * inp)).for_each(|(dst, x)| {
            let m = x.len() / inp.max(1);
            unsafe { gemm_rows(m, out, inp, dst.as_mut_ptr(), out, x.as_ptr(), w.as_ptr(), read_dst) };
        });
    } else {
        let per = out.div_ceil(threads).div_ceil(16) * 16;
        let dst_ptr = OutPtr(dst.as_mut_ptr());
        (0..out.div_ceil(per)).into_par_iter().for_each(|part| {
            let (c0, c1) = (part * per, ((part + 1) * per).min(out));
            let dst = dst_ptr;
            unsafe {
                gemm_rows(rows, c1 - c0, inp, dst.0.add(c0), out, x.as_ptr(), w.as_ptr().add(c0 * inp), read_dst)
            };
        });
    }
}

/// Up to this many rows, [`matmul_wt`] takes [`skinny_matmul_wt`] where it fits (measured on
/// a 152k × 1536 head, 2 cores: 8 rows 0.06 s against gemm's 0.20, 20 rows 0.10 against 0.23,
/// 80 rows 0.35 against 0.50, 160 rows 1.0 against 0.6).
const SKINNY_ROWS: usize = 64;

/// Whether [`skinny_matmul_wt`] can take rows of `k` values on this CPU.
pub fn skinny_fits(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// [`matmul_wt`] for few rows (`x` [rows, k], `w` [out, k]), where [`skinny_fits`]: `gemm` runs
/// rows in panels and its small-panel path is slow (a 152k-row LM head took 0.2 s for 8 rows
/// here, 0.05 s for one). Here each group of 4 weight rows is read once and meets every row of
/// `x` in 4 × 4 tiles of AVX-512 accumulators; threads take blocks of output columns.
pub fn skinny_matmul_wt(x: &[f32], rows: usize, w: &[f32], out: usize, dst: &mut [f32], read_dst: bool) {
    let k = x.len() / rows.max(1);
    assert!(skinny_fits(k), "skinny_matmul_wt needs AVX-512 and rows of a multiple of 16 values");
    assert_eq!(w.len(), k * out, "skinny_matmul_wt: the weight is not [{out}, {k}]");
    assert_eq!(dst.len(), rows * out, "skinny_matmul_wt: the output is not [{rows}, {out}]");
    const COLUMNS: usize = 256;
    let dst_ptr = OutPtr(dst.as_mut_ptr());
    (0..out.div_ceil(COLUMNS)).into_par_iter().for_each(|part| {
        let (o0, o1) = (part * COLUMNS, ((part + 1) * COLUMNS).min(out));
        let dst = dst_ptr;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 (asserted above); the task reads rows of x and w within
        // their lengths and writes only columns o0..o1 of each of the `rows` rows of `dst`.
        unsafe {
            skinny_avx512(x, rows, k, w, o0, o1, out, dst.0, read_dst)
        };
    });
}

/// Columns `o0..o1` of `dst` [rows, out] (+)= x · wᵀ, in 4 × 4 tiles (ragged edges compute a
/// repeated row and store only the real ones).
///
/// # Safety
/// AVX-512F must be present; `k` a multiple of 16; `dst` valid for `rows × out` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn skinny_avx512(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    o0: usize,
    o1: usize,
    out: usize,
    dst: *mut f32,
    read_dst: bool,
) {
    use std::arch::x86_64::*;
    let mut o = o0;
    while o < o1 {
        let wb = (o1 - o).min(4);
        let wp: [*const f32; 4] = std::array::from_fn(|i| w[(o + i.min(wb - 1)) * k..].as_ptr());
        let mut r = 0;
        while r < rows {
            let xb = (rows - r).min(4);
            let xp: [*const f32; 4] = std::array::from_fn(|j| x[(r + j.min(xb - 1)) * k..].as_ptr());
            // SAFETY: every load reads 16 values at kk < k of a row of k values.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut kk = 0;
                while kk < k {
                    let wv = [
                        _mm512_loadu_ps(wp[0].add(kk)),
                        _mm512_loadu_ps(wp[1].add(kk)),
                        _mm512_loadu_ps(wp[2].add(kk)),
                        _mm512_loadu_ps(wp[3].add(kk)),
                    ];
                    let xv = [
                        _mm512_loadu_ps(xp[0].add(kk)),
                        _mm512_loadu_ps(xp[1].add(kk)),
                        _mm512_loadu_ps(xp[2].add(kk)),
                        _mm512_loadu_ps(xp[3].add(kk)),
                    ];
                    for i in 0..4 {
                        for j in 0..4 {
                            acc[i * 4 + j] = _mm512_fmadd_ps(wv[i], xv[j], acc[i * 4 + j]);
                        }
                    }
                    kk += 16;
                }
                for i in 0..wb {
                    for j in 0..xb {
                        let sum = _mm512_reduce_add_ps(acc[i * 4 + j]);
                        let d = dst.add((r + j) * out + o + i);
                        *d = if read_dst { *d + sum } else { sum };
                    }
                }
            }
            r += 4;
        }
        o += 4;
    }
}

/// `dst[m, n] (+)= x[m, k] · w[n, k]ᵀ` with `dst` rows `dst_rs` apart, on this thread (`+=` with
/// `read_dst`).
///
/// # Safety
/// The pointers must cover `m × k` (x), `n × k` (w) and `m` rows of `n` at stride `dst_rs` (dst).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    x: *const f32,
    w: *const f32,
    read_dst: bool,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            read_dst,
            x,
            1,
            k as isize,
            w,
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A linear layer (`x · Wᵀ + b`, W as checkpoints store it: [out, in]) that runs through
/// [`linear`] on the CPU in f32 and through candle's ops elsewhere.
#[derive(Debug, Clone)]
pub struct FastLinear {
    pub weight: candle_core::Tensor,
    pub bias: Option<candle_core::Tensor>,
}

impl candle_core::Module for FastLinear {
    fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        let f32 = candle_core::DType::F32;
        if x.device().is_cpu() && x.dtype() == f32 && self.weight.dtype() == f32 {
            return x.contiguous()?.apply_op1_no_bwd(&LinearOp { weight: &self.weight, bias: self.bias.as_ref() });
        }
        candle_core::Module::forward(&candle_nn::Linear::new(self.weight.clone(), self.bias.clone()), x)
    }
}

struct LinearOp<'a> {
    weight: &'a candle_core::Tensor,
    bias: Option<&'a candle_core::Tensor>,
}

/// A contiguous f32 CPU tensor's values.
pub fn f32_values<'a>(storage: &'a candle_core::StorageRef<'_>, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = &**storage else {
        candle_core::bail!("the CPU path got a tensor on another device")
    };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("a weight is not contiguous".into()))?;
    Ok(&data[start..end])
}

impl CustomOp1 for LinearOp<'_> {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "linear")?;
        let dims = layout.shape().dims();
        let inp = *dims.last().unwrap_or(&0);
        let rows = x.len() / inp.max(1);
        let (out, w_inp) = self.weight.dims2()?;
        if w_inp != inp {
            candle_core::bail!("linear: the input has {inp} features but the weight takes {w_inp}");
        }
        let (ws, wl) = self.weight.storage_and_layout();
        let w = f32_values(&ws, wl)?;
        let mut dst = vec![0f32; rows * out];
        match self.bias {
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                linear(x, rows, w, f32_values(&bs, bl)?, &mut dst, false);
            }
            None => matmul_wt(x, rows, w, out, &mut dst, false),
        }
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(dst), Shape::from(shape)))
    }
}

/// Layer normalization of each `gamma.len()`-wide row of `x` into `dst` (mean and variance in
/// f64, as exact as the inputs allow).
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f64, dst: &mut [f32]) {
    let h = gamma.len();
    dst.par_chunks_mut(h * 16).zip(x.par_chunks(h * 16)).for_each(|(d, x)| {
        for (d, x) in d.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            let inv = (1.0 / (var + eps).sqrt()) as f32;
            let mean = mean as f32;
            for (((d, &x), &g), &b) in d.iter_mut().zip(x).zip(gamma).zip(beta) {
                *d = (x - mean) * inv * g + b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn attention_stays_within_its_spans_and_query_blocks_change_nothing() {
        // Ragged spans, two heads of 4: each output row against softmax(q·k/2)·v over its span.
        let (spans, heads, d) = ([5usize, 1, 9], 2, 4);
        let n: usize = spans.iter().sum();
        let h = heads * d;
        let qkv: Vec<f32> = (0..n * 3 * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let mut want = vec![0f32; n * h];
        let mut start = 0;
        for &len in &spans {
            for r in start..start + len {
                for head in 0..heads {
                    let at = |row: usize, part: usize, c: usize| qkv[row * 3 * h + part * h + head * d + c] as f64;
                    let s: Vec<f64> = (start..start + len)
                        .map(|k| (0..d).map(|c| at(r, 0, c) * at(k, 1, c)).sum::<f64>() / (d as f64).sqrt())
                        .collect();
                    let max = s.iter().copied().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    for c in 0..d {
                        let v: f64 = (start..start + len).map(|k| (s[k - start] - max).exp() / z * at(k, 2, c)).sum();
                        want[r * h + head * d + c] = v as f32;
                    }
                }
            }
            start += len;
        }
        for block in [usize::MAX / 2, 9, 1] {
            let mut got = vec![0f32; n * h];
            attention_spans(&qkv, &spans, heads, block, &mut got).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "block {block}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn few_rows_multiply_as_the_naive_product_with_ragged_tiles() {
        // 6 rows and 7 outputs: neither divides the 4 × 4 tiles; k = 48 (three 16-lane steps).
        let (rows, out, k) = (6, 7, 48);
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 17.0).collect();
        let w: Vec<f32> = (0..out * k).map(|i| ((i * 53 % 89) as f32 - 44.0) / 23.0).collect();
        let naive = |r: usize, o: usize| (0..k).map(|t| x[r * k + t] as f64 * w[o * k + t] as f64).sum::<f64>();
        let mut dst = vec![1f32; rows * out];
        matmul_wt(&x, rows, &w, out, &mut dst, true);
        for r in 0..rows {
            for o in 0..out {
                let want = 1.0 + naive(r, o);
                assert!((dst[r * out + o] as f64 - want).abs() < 1e-4, "({r}, {o}): {} vs {want}", dst[r * out + o]);
            }
        }
        if skinny_fits(k) {
            let mut skinny = vec![0f32; rows * out];
            skinny_matmul_wt(&x, rows, &w, out, &mut skinny, false);
            for (i, s) in skinny.iter().enumerate() {
                assert!((*s as f64 - naive(i / out, i % out)).abs() < 1e-4, "{i}");
            }
        }
    }

    #[test]
    fn rotary_and_rms_norm_by_hand() {
        // One row, one head of 4: (x1, x2) → (x1·c − x2·s, x2·c + x1·s) per half.
        let mut qkv = vec![1.0, 2.0, 3.0, 4.0, 1.0, 0.0, 0.0, 1.0, 9.0, 9.0, 9.0, 9.0];
        let (c, s) = (vec![0.5, 0.25, 0.5, 0.25], vec![2.0, 1.0, 2.0, 1.0]);
        rotary_qk_in_place(&mut qkv, 1, 4, &c, &s);
        assert_eq!(qkv[..4], [1.0 * 0.5 - 3.0 * 2.0, 2.0 * 0.25 - 4.0 * 1.0, 3.0 * 0.5 + 2.0, 4.0 * 0.25 + 2.0]);
        assert_eq!(qkv[4..8], [0.5, -1.0, 2.0, 0.25]);
        assert_eq!(qkv[8..], [9.0; 4], "v is left alone");
        let mut dst = vec![0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut dst);
        let inv = 1.0 / 12.5f32.sqrt();
        assert_eq!(dst, [3.0 * inv, 8.0 * inv]);
    }

    #[test]
    fn swiglu_is_silu_of_the_gate_times_up_in_every_row() {
        // Rows that do not divide the per-task share, values well past where sigmoid saturates.
        let (rows, inter) = (CHUNK / 96 * 3 + 5, 96);
        let x: Vec<f32> = (0..rows * 2 * inter).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 37.0).collect();
        let t = Tensor::from_vec(x.clone(), (rows, 2 * inter), &Device::Cpu).unwrap();
        let got = t.apply_op1_no_bwd(&SwiGlu).unwrap();
        assert_eq!(got.dims(), &[rows, inter]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for r in 0..rows {
            for c in 0..inter {
                let (g, u) = (x[r * 2 * inter + c] as f64, x[r * 2 * inter + inter + c] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let e = (got[r * inter + c] as f64 - want).abs();
                assert!(e <= 1e-6 * want.abs().max(1.0), "row {r} col {c}: {} vs {want}", got[r * inter + c]);
            }
        }
        let odd = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(odd.apply_op1_no_bwd(&SwiGlu).unwrap_err().to_string().contains("odd"));
    }

    #[test]
    fn exp_is_accurate_where_it_is_used() {
        let mut worst: f64 = 0.0;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n).map(|i| (((i as u64 * 2654435761 + seed) % 10007) as f32 / 10007.0 - 0.5) * 6.0).collect()
    }

    #[test]
    fn quick_gelu_matches_its_definition() {
        let x = values(100_003, 1);
        let mut got = x.clone();
        quick_gelu_in_place(&mut got);
        for (g, &x) in got.iter().zip(&x) {
            let want = x as f64 / (1.0 + (-1.702 * x as f64).exp());
            assert!((*g as f64 - want).abs() < 1e-6 * (1.0 + want.abs()), "{x}: {g} vs {want}");
        }
    }

    #[test]
    fn attention_matches_candle_ops() {
        let (b, t, heads, d) = (2, 7, 3, 4);
        let h = heads * d;
        let qkv = Tensor::from_vec(values(b * t * 3 * h, 9), (b, t, 3 * h), &Device::Cpu).unwrap();
        let got = qkv.apply_op1_no_bwd(&Attention { heads }).unwrap();
        let split = |i: usize| {
            qkv.narrow(2, i * h, h)
                .unwrap()
                .reshape((b, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let want = p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, h)).unwrap();
        let diff =
            (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "largest difference {diff}");
    }
}
