//! ladle's own CUDA kernels (the `cuda` feature), where candle's ops would be slow or wasteful.
//!
//! - [`target_log_probs`]: log p(target) of each row of logits, fused: one pass over the row in
//!   its own dtype (an online max and sum of exponentials in f32), never materializing the
//!   row's log-softmax. candle's path converts a [rows, vocab] block to f32, log-softmaxes it
//!   into another and gathers one value per row: three full passes and two vocab-wide buffers.
//!
//! The kernels are CUDA C compiled once per process with NVRTC (through cudarc) and loaded into
//! each candle device on first use; they need no headers, so no CUDA install beyond the driver
//! and the NVRTC library. Their CPU reference is [`crate::llm::logsumexp`], and the fixture
//! perplexities hold them to it on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

const MODULE: &str = "ladle_target_log_probs";

const SOURCE: &str = r#"
// No headers: NVRTC compiles this alone (INFINITY would need math.h).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float load_f32(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float load_bf16(const unsigned short* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float load_f16(const unsigned short* p, long i) { return f16_to_f32(p[i]); }

// Elements 2i and 2i+1 in one load (the row starts at an even element).
__device__ __forceinline__ void load2_f32(const float* p, long i, float& a, float& b) {
    unsigned long long w = ((const unsigned long long*)p)[i];
    a = __uint_as_float((unsigned int)w);
    b = __uint_as_float((unsigned int)(w >> 32));
}
__device__ __forceinline__ void load2_bf16(const unsigned short* p, long i, float& a, float& b) {
    unsigned int w = ((const unsigned int*)p)[i];
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xffff0000u);
}
__device__ __forceinline__ void load2_f16(const unsigned short* p, long i, float& a, float& b) {
    unsigned int w = ((const unsigned int*)p)[i];
    a = f16_to_f32((unsigned short)(w & 0xffffu));
    b = f16_to_f32((unsigned short)(w >> 16));
}

// Adds exp(v) to a running (max, sum of exp(x - max)).
__device__ __forceinline__ void accumulate(float& m, float& s, float v) {
    if (v == NEG_INF) return;
    if (v > m) { s = s * expf(m - v) + 1.0f; m = v; } else { s += expf(v - m); }
}

// Merges two (max, sum of exp(x - max)) pairs.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    float a = (m == NEG_INF) ? 0.0f : s * expf(m - mm);
    float b = (m2 == NEG_INF) ? 0.0f : s2 * expf(m2 - mm);
    m = mm;
    s = a + b;
}

// One block per row; blockDim.x a multiple of 32, at most 1024. With `pairs` (even vocab, row
// starts aligned to two elements) each thread reads two elements per load.
#define TARGET_LOG_PROBS(NAME, T, LOAD, LOAD2)                                                 \
extern "C" __global__ void NAME(const T* logits, const unsigned int* targets, float* out,     \
                                int vocab, int pairs) {                                        \
    const T* x = logits + (long)blockIdx.x * vocab;                                            \
    float m = NEG_INF, s = 0.0f;                                                             \
    if (pairs) {                                                                               \
        for (int j = threadIdx.x; j < vocab / 2; j += blockDim.x) {                            \
            float a, b;                                                                        \
            LOAD2(x, j, a, b);                                                                 \
            accumulate(m, s, a);                                                               \
            accumulate(m, s, b);                                                               \
        }                                                                                      \
    } else {                                                                                   \
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) accumulate(m, s, LOAD(x, j));   \
    }                                                                                          \
    for (int off = 16; off > 0; off >>= 1)                                                     \
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off)); \
    __shared__ float ms[32], ss[32];                                                           \
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;                                      \
    if (lane == 0) { ms[warp] = m; ss[warp] = s; }                                             \
    __syncthreads();                                                                           \
    if (warp == 0) {                                                                           \
        int warps = blockDim.x / 32;                                                           \
        m = lane < warps ? ms[lane] : NEG_INF;                                               \
        s = lane < warps ? ss[lane] : 0.0f;                                                    \
        for (int off = 16; off > 0; off >>= 1)                                                 \
            merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off)); \
        if (lane == 0) out[blockIdx.x] = LOAD(x, targets[blockIdx.x]) - m - logf(s);           \
    }                                                                                          \
}

TARGET_LOG_PROBS(target_log_probs_f32, float, load_f32, load2_f32)
TARGET_LOG_PROBS(target_log_probs_bf16, unsigned short, load_bf16, load2_bf16)
TARGET_LOG_PROBS(target_log_probs_f16, unsigned short, load_f16, load2_f16)
"#;

/// The PTX of [`SOURCE`], compiled once.
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile ladle's kernels: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Whether ladle's kernels load on `device`'s GPU, tried once per process. The PTX is whatever
/// the NVRTC library that was loaded makes; a driver older than that NVRTC refuses it. Then
/// the LM head falls back to candle's log-softmax and gather (slower, same numbers), and this
/// says so once on stderr rather than failing the run.
pub fn kernels_load(device: &candle_core::Device) -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let tried = device
            .as_cuda_device()
            .and_then(|d| ptx().and_then(|ptx| d.get_or_load_custom_func("target_log_probs_f32", MODULE, ptx)));
        match tried {
            Ok(_) => true,
            Err(e) => {
                eprintln!(
                    "warning: ladle's fused log-probability kernel did not load on this GPU ({e}); scoring \
                     falls back to candle's log-softmax, slower but the same numbers. A libnvrtc newer \
                     than the driver (`nvidia-smi` shows its CUDA version) is the usual cause."
                );
                false
            }
        }
    })
}

/// log p(targets[i]) under softmax(logits[i]) for logits [rows, vocab] (f32, bf16 or f16) and
/// targets [rows] (u32), both on one GPU: [rows] f32.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op2_no_bwd(&targets.contiguous()?, &TargetLogProbs)
}

struct TargetLogProbs;

impl CustomOp2 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "target-log-probs"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("target-log-probs is a GPU kernel; the CPU uses llm::logsumexp")
    }

    fn cuda_fwd(
        &self,
        logits: &CudaStorage,
        logits_layout: &Layout,
        targets: &CudaStorage,
        targets_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, vocab) = logits_layout.shape().dims2()?;
        let n_targets = targets_layout.shape().dims1()?;
        if n_targets != rows {
            candle_core::bail!("target-log-probs: {rows} rows of logits but {n_targets} targets");
        }
        let (Some((l0, _)), Some((t0, t1))) = (logits_layout.contiguous_offsets(), targets_layout.contiguous_offsets())
        else {
            candle_core::bail!("target-log-probs needs contiguous inputs")
        };
        let device = logits.device().clone();
        let name = match logits.dtype() {
            DType::F32 => "target_log_probs_f32",
            DType::BF16 => "target_log_probs_bf16",
            DType::F16 => "target_log_probs_f16",
            other => candle_core::bail!("target-log-probs takes f32, bf16 or f16 logits, not {other:?}"),
        };
        let func = device.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let targets = targets.as_cuda_slice::<u32>()?.slice(t0..t1);
        // SAFETY: every element of `out` is written by the kernel (one block per row).
        let out = unsafe { device.alloc::<f32>(rows) }?;
        let vocab_arg = vocab as i32;
        let config = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut launch = func.builder();
        // The logits as raw 16- or 32-bit words: the kernel reads them by dtype.
        let (f32_view, u16_view);
        match logits.dtype() {
            DType::F32 => {
                f32_view = logits.as_cuda_slice::<f32>()?.slice(l0..l0 + rows * vocab);
                launch.arg(&f32_view);
            }
            DType::BF16 => {
                // SAFETY: bf16 and u16 have the same size; the kernel reinterprets the bits.
                u16_view = unsafe {
                    logits.as_cuda_slice::<half::bf16>()?.slice(l0..l0 + rows * vocab).transmute::<u16>(rows * vocab)
                }
                .ok_or_else(|| candle_core::Error::Msg("bf16 logits could not be viewed as u16".into()))?;
                launch.arg(&u16_view);
            }
            _ => {
                // SAFETY: as above, for f16.
                u16_view = unsafe {
                    logits.as_cuda_slice::<half::f16>()?.slice(l0..l0 + rows * vocab).transmute::<u16>(rows * vocab)
                }
                .ok_or_else(|| candle_core::Error::Msg("f16 logits could not be viewed as u16".into()))?;
                launch.arg(&u16_view);
            }
        }
        // Two elements per load when every row starts on an even element.
        let pairs_arg = i32::from(vocab % 2 == 0 && l0 % 2 == 0);
        launch.arg(&targets);
        launch.arg(&out);
        launch.arg(&vocab_arg);
        launch.arg(&pairs_arg);
        // SAFETY: the arguments match the kernel's signature; the grid covers `rows` rows of
        // `vocab` elements, inside the views passed.
        unsafe { launch.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(rows)))
    }
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: the kernels compile, each entry point is there. (Their numbers are
    /// checked on a GPU by the fixture tests.)
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        for name in ["target_log_probs_f32", "target_log_probs_bf16", "target_log_probs_f16"] {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
    }
}
