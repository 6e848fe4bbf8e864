//! Where a model computes and in what precision: a [`Placement`], named as a model stage's
//! `device` and `dtype` parameters name it (`ladle-stages` reads them from a pipeline file).
//!
//! ```toml
//! device = "auto"    # or "cpu", "cuda" (= "cuda:0"), "cuda:N"; auto: the first GPU if this
//!                    # build has the `cuda` feature and the machine a GPU, else the CPU
//! dtype = "bf16"     # or "f16", "f32"; default f32 on the CPU, bf16 on a GPU
//! ```
//!
//! Weights are converted to `dtype` as they are loaded; a stage's model is loaded once per run.
//! Sums that decide a score (softmax, log-sum-exp, norms) are taken in f32 whatever the dtype.
//!
//! **Keys.** The dtype changes the numbers, so the resolved dtype enters the stage key, but only
//! when it is not f32: pipelines written before these parameters existed keep their caches. The
//! device does not enter the key: in the same dtype a GPU and the CPU compute the same numbers to
//! within rounding, as different thread counts do, so a run on a GPU machine is served from a
//! CPU machine's cache and back. `auto` is resolved when the pipeline is loaded, so `ladle plan`
//! on a machine without a GPU says what that machine would compute.
//!
//! A CPU build never touches CUDA: `cuda` asked of it is an error before anything runs, naming
//! the feature to build with.

use candle_core::{DType, Device};

use crate::llm::ModelError;

/// A processor a stage computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processor {
    Cpu,
    /// The GPU of this ordinal (`cuda:N`).
    Cuda(usize),
}

/// Where and in what precision a model stage computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub processor: Processor,
    pub dtype: DType,
}

impl Placement {
    /// f32 on the CPU: the reference every other placement is checked against.
    pub const CPU_F32: Placement = Placement { processor: Processor::Cpu, dtype: DType::F32 };

    /// The placement `device` and `dtype` name (absent: their defaults). An error says which of
    /// the two is wrong, and why.
    pub fn from_names(device: Option<&str>, dtype: Option<&str>) -> Result<Placement, (&'static str, String)> {
        let processor = match device {
            None | Some("auto") => match gpus() {
                Ok(0) => Processor::Cpu,
                Ok(_) => Processor::Cuda(0),
                Err(e) => {
                    // A GPU build on a machine whose driver is broken: say so, once, rather than
                    // let a user wonder why a GPU machine scores at CPU speed.
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        eprintln!(
                            "warning: device = \"auto\" runs on the CPU because the CUDA driver did not start ({e}); \
                             check `nvidia-smi`, or set device = \"cpu\" to say that the CPU is meant"
                        )
                    });
                    Processor::Cpu
                }
            },
            Some("cpu") => Processor::Cpu,
            Some(other) => {
                let ordinal = parse_cuda(other).ok_or_else(|| {
                    ("device", format!("`device` is \"{other}\"; expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""))
                })?;
                if !cfg!(feature = "cuda") {
                    return Err((
                        "device",
                        format!(
                            "device = \"{other}\", but this ladle was built without GPU support: build it with the \
                             `cuda` feature (scripts/build-cuda.sh, see docs/cuda.md), or set device = \"cpu\""
                        ),
                    ));
                }
                Processor::Cuda(ordinal)
            }
        };
        let dtype = match dtype {
            Some("bf16") => DType::BF16,
            Some("f16") => DType::F16,
            Some("f32") => DType::F32,
            Some(other) => {
                return Err(("dtype", format!("`dtype` is \"{other}\"; expected \"f32\", \"bf16\" or \"f16\"")));
            }
            None if processor == Processor::Cpu => DType::F32,
            None => DType::BF16,
        };
        Ok(Placement { processor, dtype })
    }

    /// Opens the device (a GPU's context is created here, once per stage run).
    pub fn device(&self) -> Result<Device, ModelError> {
        match self.processor {
            Processor::Cpu => Ok(Device::Cpu),
            Processor::Cuda(n) => {
                let count = gpus().map_err(|e| {
                    ModelError::Device(format!("device = \"cuda:{n}\", but the CUDA driver did not start: {e}"))
                })?;
                if n >= count {
                    return Err(ModelError::Device(format!(
                        "device = \"cuda:{n}\", but this machine has {count} GPU(s){}",
                        if count > 0 { format!(" (cuda:0 to cuda:{})", count - 1) } else { String::new() }
                    )));
                }
                Device::new_cuda(n).map_err(|e| {
                    ModelError::Device(format!("cannot open GPU cuda:{n}: {}", crate::llm::candle_message(&e)))
                })
            }
        }
    }

    /// `cpu` or `cuda:N`.
    pub fn name(&self) -> String {
        match self.processor {
            Processor::Cpu => "cpu".into(),
            Processor::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// The device slot a stage holds while it computes (ladle-engine's `Stage::device_slot`):
    /// a GPU's name; none for the CPU, whose sharing `-j` bounds.
    pub fn slot(&self) -> Option<String> {
        (self.processor != Processor::Cpu).then(|| self.name())
    }

    /// Tokens per scoring batch when a stage does not say: a GPU wants big batches to be kept
    /// busy; on the CPU smaller ones run faster, their activations staying in cache
    /// (`ladle bench score --device cpu --batch-tokens N`, Qwen2-0.5B's shape, f32, 2 cores:
    /// 86 tokens/s at 512, 82 at 1024, 78 at 4096; on a machine with AVX-512, 300 at 512
    /// against 250 at 4096).
    pub fn default_batch_tokens(&self) -> usize {
        if self.processor == Processor::Cpu { 512 } else { 16384 }
    }

    /// Records a `generate` stage writes together when it does not say. A step reads every
    /// weight once for the whole batch, so a batch costs little more than one record until the
    /// rows' arithmetic catches up with the weights' reading: on the CPU that is near 16 rows
    /// (`ladle bench generate --device cpu`, Qwen2-0.5B's shape, f32, 2 cores: 6.1 new tokens/s
    /// one at a time, 13.6 at 8, 17.8 at 16, 19.0 at 32); a GPU's far higher arithmetic rate
    /// keeps gaining to many more, so 64 there.
    pub fn default_batch_records(&self) -> usize {
        if self.processor == Processor::Cpu { 16 } else { 64 }
    }

    /// Images an `encode` stage runs through the vision tower at once when it does not say. On
    /// the CPU 16 already fill the cores (a CLIP ViT-L/14-336 image is 577 tokens); a GPU needs
    /// more tokens per pass to be kept busy, and 64 such images (37k tokens, 1.3 GB of f32
    /// attention scores per layer) stay well within its memory.
    pub fn default_batch_images(&self) -> usize {
        if self.processor == Processor::Cpu { 16 } else { 64 }
    }
}

/// `f32`, `bf16` or `f16`, as the parameter is written.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// The ordinal of `cuda` or `cuda:N`.
fn parse_cuda(s: &str) -> Option<usize> {
    match s.strip_prefix("cuda") {
        Some("") => Some(0),
        Some(rest) => rest.strip_prefix(':')?.parse().ok(),
        None => None,
    }
}

/// How many GPUs this process can use: none in a CPU build; in a `cuda` build, those the
/// driver reports (none when it reports no device), asked once.
pub fn gpu_count() -> usize {
    gpus().unwrap_or(0)
}

/// [`gpu_count`], or why the driver failed to start: a machine with no GPU is `Ok(0)`, a
/// driver that is there but broken (too old for this build's CUDA, a device in a bad state) is
/// the driver's error.
pub fn gpus() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::sys::CUresult;
        static COUNT: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
        COUNT
            .get_or_init(|| match cudarc::driver::result::init() {
                Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
                Err(e) => Err(e.to_string()),
                Ok(()) => {
                    cudarc::driver::result::device::get_count().map(|n| n.max(0) as usize).map_err(|e| e.to_string())
                }
            })
            .clone()
    }
    #[cfg(not(feature = "cuda"))]
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_names_parse() {
        assert_eq!(parse_cuda("cuda"), Some(0));
        assert_eq!(parse_cuda("cuda:3"), Some(3));
        assert_eq!(parse_cuda("cuda:"), None);
        assert_eq!(parse_cuda("cuda3"), None);
        assert_eq!(parse_cuda("gpu"), None);
    }
}
