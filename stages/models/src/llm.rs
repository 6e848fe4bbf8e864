//! Language models, owned end to end: config, tokenizer and chat template, safetensors weights, the
//! decoder forward pass, and perplexity scoring.
//!
//! The forward pass is ours (candle-core/candle-nn ops), not candle-transformers': scoring needs
//! log-probabilities at every position, and a causal mask that padding cannot break. Everything
//! here is checked against values Hugging Face transformers computed (`tests/fixtures/`).

pub mod config;
pub mod decoder;
pub mod generate;
pub mod logsumexp;
pub mod scorer;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{Arch, LlmConfig};
pub use decoder::{Decoder, KvCache, SCORE_BLOCK_ELEMENTS, StepRotary};
pub use scorer::{Score, Scorer, Sequence};
pub use tokenizer::TextTokenizer;

/// What can go wrong loading or running a model; each names the file, key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    #[error("the model computation failed: {0}")]
    Compute(String),
    /// An image the model cannot take (too elongated to preprocess, say).
    #[error("{0}")]
    Image(String),
    /// The device asked for is not there (see [`crate::device`]).
    #[error("{0}")]
    Device(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Compute(candle_message(&e))
    }
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set:
/// users get one clear line, not a page of frames.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        other => other.to_string(),
    }
}

/// A language model loaded from a Hugging Face folder: config, tokenizer, weights.
pub struct LanguageModel {
    pub config: LlmConfig,
    pub tokenizer: TextTokenizer,
    pub decoder: Decoder,
}

impl LanguageModel {
    /// Loads `dir` in f32 on the CPU.
    pub fn load(dir: &Path) -> Result<LanguageModel, ModelError> {
        Self::load_on(dir, &candle_core::Device::Cpu, candle_core::DType::F32)
    }

    /// Loads `dir` onto `device`, its weights converted to `dtype`.
    pub fn load_on(
        dir: &Path,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<LanguageModel, ModelError> {
        let config = LlmConfig::load(dir)?;
        let vb = weights::load(dir, device, dtype)?;
        let model = Self::from_parts(dir, config, &vb, "model")?;
        // The uploads and conversions loading queued are done (or their error is here) before
        // the first batch: a GPU's work is asynchronous.
        device.synchronize()?;
        Ok(model)
    }

    /// The tokenizer of `dir` and the decoder whose weights start at `prefix` in `vb`: shared by
    /// plain language models (`model`) and VLMs (`language_model.model`).
    pub fn from_parts(
        dir: &Path,
        config: LlmConfig,
        vb: &candle_nn::VarBuilder<'static>,
        prefix: &str,
    ) -> Result<LanguageModel, ModelError> {
        let tokenizer = TextTokenizer::load(dir)?;
        let n_tokens = tokenizer.vocab_size();
        if n_tokens > config.vocab_size {
            return Err(ModelError::Tokenizer {
                path: dir.join("tokenizer.json"),
                message: format!(
                    "the tokenizer has {n_tokens} tokens but the model's embedding has {} rows (config.json vocab_size): they do not belong together",
                    config.vocab_size
                ),
            });
        }
        let decoder = Decoder::new(&config, vb.clone(), prefix).map_err(|e| weights::explain(dir, e))?;
        Ok(LanguageModel { config, tokenizer, decoder })
    }
}
