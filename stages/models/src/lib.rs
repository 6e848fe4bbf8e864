//! ladle's models: the language models, vision towers and VLMs that ladle's stages run, on
//! candle-core/candle-nn ops we own end to end, checked against Hugging Face transformers
//! (`tests/fixtures/`).
//!
//! - [`llm`]: configs, tokenizer and chat template, safetensors weights, the LLaMA/Qwen2 decoder,
//!   perplexity scoring and generation;
//! - [`vision`]: images (decoding as Pillow does), CLIP preprocessing and towers, LLaVA-format
//!   VLMs, POINTS' CATTY tiling;
//! - [`kernels`] (CPU) and `cuda` (GPU, the `cuda` feature): the hot loops candle does not do well;
//! - [`device`]: where a model computes and in what precision;
//! - [`soup`]: checkpoints memory-mapped and averaged tensor by tensor (model soups);
//! - [`safetensors_header`]: headers for safetensors files written tensor by tensor.
//!
//! **The dependency rule.** This crate depends on no other ladle crate: it knows checkpoints,
//! tensors and images, not pipelines, records or stores, so anyone can use it as a model library.
//! `ladle-stages` holds the glue between records and these models; `ladle-engine` never sees them.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod kernels;
pub mod llm;
pub mod qwen2_vl;
pub mod safetensors_header;
pub mod soup;
pub mod vision;
