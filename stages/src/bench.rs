//! `ladle bench`: throughput of the native model code on models of real shapes with random
//! weights, made in memory from a config (no download, no files), on any device and dtype.
//!
//! The binary carries it so that a GPU machine with no Rust toolchain can measure a `cuda` build
//! (issue #7); `benches/gpu_vs_transformers.py` runs it beside transformers on the same machine.
//!
//! - [`score`]: perplexity scoring, tokens/s, through the same [`Scorer`] the `perplexity` stage
//!   uses (length buckets under a token budget), with the fraction of the matmul roofline:
//!   2 · parameters FLOPs per token against the rate [`matmul`] measures on the same device.
//! - [`matmul`]: the device's dense matmul rate in the dtype, the roofline's denominator.
//! - [`run_generate`]: generation, new tokens/s, the same prompts written at each of several
//!   batch sizes side by side (the first the baseline), as the `generate` stage writes them: the
//!   measurement behind its default `batch` per device.
//! - [`run_soup`]: the soup stage's averager against plain reads of the same checkpoints, as
//!   `benches/soup_vs_torch.py` measures it with cargo, for machines without it.
//!
//! Weights follow transformers' initialization (normal with std 0.02, norms 1, biases 0), so the
//! numbers flowing through are of realistic magnitude; `--save` writes the random model as a
//! Hugging Face folder, for a reference implementation to load the very same weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use ladle_models::device::{Placement, Processor, dtype_name};
use ladle_models::llm::generate::{Prompt, Rng, Sampling, generate_batch};
use ladle_models::llm::scorer::plan_batches;
use ladle_models::llm::{Decoder, LlmConfig, ModelError, Score, Scorer, Sequence};
use serde_json::{Value, json};

/// Decoder shapes by name: `config.json` as the hub has them (random weights are made for them).
pub fn llm_shape(name: &str) -> Option<Value> {
    let qwen2 = |hidden: u64, inter: u64, layers: u64, heads: u64, kv: u64, vocab: u64, tie: bool| {
        json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tie, "eos_token_id": 151643, "torch_dtype": "bfloat16"
        })
    };
    match name {
        "qwen2-0.5b" => Some(qwen2(896, 4864, 24, 14, 2, 151936, true)),
        "qwen2-1.5b" => Some(qwen2(1536, 8960, 28, 12, 2, 151936, true)),
        "qwen2-7b" => Some(qwen2(3584, 18944, 28, 28, 4, 152064, false)),
        _ => None,
    }
}

/// The shape names [`llm_shape`] knows.
pub const LLM_SHAPES: &[&str] = &["qwen2-0.5b", "qwen2-1.5b", "qwen2-7b"];

/// The tensors a random model was made of, by name, when it is to be saved.
pub(crate) type Kept = Arc<Mutex<Vec<(String, Tensor)>>>;

/// Makes tensors as they are asked for: normal(0, 0.02) weights, ones for norms, zeros for
/// biases; keeps them when the model is to be saved.
pub(crate) struct RandomWeights {
    pub(crate) tied: bool,
    pub(crate) keep: Option<Kept>,
}

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // Norms' scales (`input_layernorm`, CLIP's `layer_norm1`, `pre_layrnorm`) are ones.
        let t = if name.contains("norm") && name.ends_with(".weight") {
            Tensor::ones(shape, dtype, dev)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, dtype, dev)?
        } else {
            Tensor::randn(0f32, 0.02, shape, dev)?.to_dtype(dtype)?
        };
        if let Some(keep) = &self.keep {
            keep.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_string(), t.clone()));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape: `{name}` was asked for without one")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !(self.tied && name == "lm_head.weight")
    }
}

/// A decoder of `config`'s shape with random weights on `device`; with `save`, also written
/// there as a Hugging Face folder (config.json and model.safetensors).
pub fn random_decoder(
    config: &Value,
    device: &Device,
    dtype: DType,
    save: Option<&Path>,
) -> Result<Decoder, ModelError> {
    let cfg = shape_config(config)?;
    let kept: Option<Kept> = save.map(|_| Arc::new(Mutex::new(Vec::new())));
    let backend = RandomWeights { tied: cfg.tie_word_embeddings, keep: kept.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let decoder = Decoder::new(&cfg, vb, "model")?;
    if let (Some(kept), Some(dir)) = (kept, save) {
        let tensors = std::mem::take(&mut *kept.lock().unwrap_or_else(|p| p.into_inner()));
        save_model(tensors.into_iter().collect(), config, dir)?;
    }
    Ok(decoder)
}

/// A shape's config, read as a decoder's.
pub fn shape_config(config: &Value) -> Result<LlmConfig, ModelError> {
    LlmConfig::from_json(config).map_err(|message| ModelError::Config { path: "shape".into(), message })
}

/// The weights the forward pass multiplies by, per token: attention and MLP projections of
/// every layer and the LM head (the embedding is a lookup, not a product).
pub fn matmul_params(cfg: &LlmConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (q, kv) = ((cfg.num_heads * cfg.head_dim) as u64, (cfg.num_kv_heads * cfg.head_dim) as u64);
    let layer = h * q + 2 * h * kv + q * h + 3 * h * i;
    layer * cfg.num_layers as u64 + cfg.vocab_size as u64 * h
}

pub(crate) fn save_model(tensors: HashMap<String, Tensor>, config: &Value, dir: &Path) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::Weights { path: dir.to_path_buf(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(io)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let text = serde_json::to_string_pretty(config).expect("a config serializes");
    std::fs::write(dir.join("config.json"), text).map_err(io)
}

/// What [`score`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScoreReport {
    pub sequences: usize,
    pub scored_tokens: usize,
    pub batches: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Weights the forward pass multiplies by (embeddings excluded, the LM head included).
    pub matmul_params: u64,
    /// 2 · matmul_params · tokens/s.
    pub flops_per_s: f64,
    pub nll_sum: f64,
}

/// `count` random token sequences of lengths uniform in [length/2, 3·length/2], seeded.
pub fn random_sequences(vocab: usize, count: usize, length: usize, seed: u64) -> Vec<Sequence> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let len = (length / 2 + (rng.next_u64() as usize % (length + 1))).max(2);
            Sequence { ids: (0..len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect(), score_from: 1 }
        })
        .collect()
}

/// Scores `seqs` with `decoder` in batches of at most `batch_tokens` tokens, after one untimed
/// warm-up batch (kernel compilation, allocator); returns the measurement.
pub fn score(
    decoder: &Decoder,
    cfg: &LlmConfig,
    seqs: &[Sequence],
    batch_tokens: usize,
) -> Result<ScoreReport, ModelError> {
    let scorer = Scorer { decoder, pad: 0 };
    let lengths: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    let plan = plan_batches(&lengths, batch_tokens);
    let batches = plan.len();
    if let Some(first) = plan.first() {
        let refs: Vec<&Sequence> = first.iter().map(|&i| &seqs[i]).collect();
        scorer.score_batch(&refs)?;
    }
    decoder.device().synchronize()?;
    let t = Instant::now();
    let scores = scorer.score_all(seqs, batch_tokens)?;
    decoder.device().synchronize()?;
    let seconds = t.elapsed().as_secs_f64();
    let scored_tokens: usize = scores.iter().map(|s| s.tokens).sum();
    let tokens_per_s = scored_tokens as f64 / seconds;
    let matmul_params = matmul_params(cfg);
    Ok(ScoreReport {
        sequences: seqs.len(),
        scored_tokens,
        batches,
        seconds,
        tokens_per_s,
        matmul_params,
        flops_per_s: 2.0 * matmul_params as f64 * tokens_per_s,
        nll_sum: Score::total(&scores).nll_sum,
    })
}

/// The dense matmul rate of `device` in `dtype`, FLOP/s: [n, n] × [n, n], best of `repeats`
/// after a warm-up.
pub fn matmul(device: &Device, dtype: DType, n: usize, repeats: usize) -> Result<f64, ModelError> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(2.0 * (n as f64).powi(3) / best)
}

/// What `ladle bench score` measures.
pub struct ScoreOptions {
    /// A name from [`LLM_SHAPES`] or a config.json.
    pub shape: String,
    /// Keep only this many layers.
    pub layers: Option<u64>,
    pub placement: Placement,
    pub sequences: usize,
    pub length: usize,
    pub batch_tokens: usize,
    /// Also write the random model and the token ids here.
    pub save: Option<PathBuf>,
}

/// A shape's config.json by name ([`LLM_SHAPES`]) or path, cut to `layers` when given.
fn shape_config_json(shape: &str, layers: Option<u64>) -> Result<Value, ModelError> {
    let mut config = config_by_name_or_path(shape, llm_shape, LLM_SHAPES)?;
    if let Some(n) = layers {
        config["num_hidden_layers"] = n.into();
    }
    Ok(config)
}

/// A config by name (`known` looks it up among `names`) or from a config.json at that path.
pub(crate) fn config_by_name_or_path(
    shape: &str,
    known: fn(&str) -> Option<Value>,
    names: &[&str],
) -> Result<Value, ModelError> {
    Ok(match known(shape) {
        Some(c) => c,
        None => {
            let path = PathBuf::from(shape);
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Config {
                path: path.clone(),
                message: format!("not one of {} and not a readable config.json: {e}", names.join(", ")),
            })?;
            serde_json::from_str(&text)
                .map_err(|e| ModelError::Config { path, message: format!("invalid JSON: {e}") })?
        }
    })
}

/// `ladle bench score`: one JSON object with the report, the roofline and the setting.
pub fn run_score(o: &ScoreOptions) -> Result<Value, ModelError> {
    let config = shape_config_json(&o.shape, o.layers)?;
    let cfg = shape_config(&config)?;
    let device = o.placement.device()?;
    let dtype = o.placement.dtype;
    let t = Instant::now();
    let decoder = random_decoder(&config, &device, dtype, o.save.as_deref())?;
    let build_s = t.elapsed().as_secs_f64();
    let seqs = random_sequences(cfg.vocab_size, o.sequences, o.length, 0);
    if let Some(dir) = &o.save {
        let ids: Vec<&Vec<u32>> = seqs.iter().map(|s| &s.ids).collect();
        std::fs::write(dir.join("tokens.json"), serde_json::to_vec(&ids).expect("ids serialize"))
            .map_err(|e| ModelError::Weights { path: dir.clone(), message: e.to_string() })?;
    }
    let report = score(&decoder, &cfg, &seqs, o.batch_tokens)?;
    let roofline = matmul(&device, dtype, default_matmul_size(&o.placement), 5)?;
    Ok(json!({
        "bench": "score", "shape": o.shape, "layers": cfg.num_layers, "device": o.placement.name(),
        "dtype": dtype_name(dtype), "batch_tokens": o.batch_tokens, "build_s": build_s, "report": report,
        "matmul_flops_per_s": roofline, "roofline_fraction": report.flops_per_s / roofline,
    }))
}

/// What `ladle bench generate` measures.
pub struct GenerateOptions {
    /// A name from [`LLM_SHAPES`] or a config.json.
    pub shape: String,
    /// Keep only this many layers.
    pub layers: Option<u64>,
    pub placement: Placement,
    /// Random prompts, and their mean length in tokens.
    pub prompts: usize,
    pub length: usize,
    /// New tokens per prompt (no stop token: every prompt writes them all).
    pub new_tokens: usize,
    /// Records written together, each measured in turn; the first is the baseline.
    pub batches: Vec<usize>,
}

/// `ladle bench generate`: the same random prompts written greedily at each batch size, after
/// an untimed warm-up of that size; new tokens/s and the ratio to the first batch size.
pub fn run_generate(o: &GenerateOptions) -> Result<Value, ModelError> {
    if o.batches.is_empty() || o.batches.contains(&0) {
        return Err(ModelError::Compute("--batch takes one or more positive sizes".into()));
    }
    let config = shape_config_json(&o.shape, o.layers)?;
    let cfg = shape_config(&config)?;
    let device = o.placement.device()?;
    let decoder = random_decoder(&config, &device, o.placement.dtype, None)?;
    let seqs = random_sequences(cfg.vocab_size, o.prompts, o.length, 0);
    let write = |ids: &[Sequence], new_tokens: usize| -> Result<usize, ModelError> {
        let prompts = ids.iter().map(|s| Prompt::of_ids(&decoder, &s.ids)).collect::<Result<Vec<_>, _>>()?;
        let mut rngs: Vec<Rng> = ids.iter().map(|_| Rng::new(0)).collect();
        let limits = vec![new_tokens; ids.len()];
        let out = generate_batch(&decoder, prompts, &limits, &[], &Sampling::GREEDY, &mut rngs)?;
        Ok(out.iter().map(Vec::len).sum())
    };
    let mut runs = Vec::with_capacity(o.batches.len());
    let mut baseline = None;
    for &batch in &o.batches {
        write(&seqs[..batch.min(seqs.len())], 2)?;
        device.synchronize()?;
        let t = Instant::now();
        let mut written = 0;
        for chunk in seqs.chunks(batch) {
            written += write(chunk, o.new_tokens)?;
        }
        device.synchronize()?;
        let seconds = t.elapsed().as_secs_f64();
        let rate = written as f64 / seconds;
        let base = *baseline.get_or_insert(rate);
        runs.push(json!({"batch": batch, "new_tokens": written, "seconds": seconds,
            "new_tokens_per_s": rate, "vs_first": rate / base}));
    }
    Ok(json!({
        "bench": "generate", "shape": o.shape, "layers": cfg.num_layers, "device": o.placement.name(),
        "dtype": dtype_name(o.placement.dtype), "prompts": o.prompts, "length": o.length,
        "new_tokens": o.new_tokens, "default_batch": o.placement.default_batch_records(), "runs": runs,
    }))
}

pub(crate) fn default_matmul_size(p: &Placement) -> usize {
    if p.processor == Processor::Cpu { 2048 } else { 8192 }
}

/// `ladle bench matmul`: one JSON object.
pub fn run_matmul(p: &Placement, size: Option<usize>) -> Result<Value, ModelError> {
    let n = size.unwrap_or_else(|| default_matmul_size(p));
    let rate = matmul(&p.device()?, p.dtype, n, 5)?;
    Ok(json!({"bench": "matmul", "device": p.name(), "dtype": dtype_name(p.dtype), "size": n, "flops_per_s": rate}))
}

/// What `ladle bench soup` measures.
pub struct SoupOptions {
    /// Ingredient folders; empty: make `make` synthetic ones in `work`.
    pub ingredients: Vec<PathBuf>,
    /// Synthetic bf16 checkpoints to make: how many, and GB each.
    pub make: Option<(usize, f64)>,
    pub work: PathBuf,
    /// Where the soup is written (on tmpfs, the disk's write speed stays out of the figure).
    pub out: PathBuf,
    pub repeat: usize,
}

/// `ladle bench soup`: the `soup` stage's streaming averager (uniform, f64 sums, bf16 out)
/// against plain sequential reads of the same files (the I/O bound), alternated `repeat` times
/// on a warm page cache; medians in GB/s of input, and peak RSS.
pub fn run_soup(o: &SoupOptions) -> Result<Value, ModelError> {
    use ladle_models::soup::average::write_soup;
    use ladle_models::soup::checkpoint::{Checkpoint, check_compatible};
    let io = |path: &Path, e: std::io::Error| ModelError::Weights { path: path.to_path_buf(), message: e.to_string() };
    let mut dirs = o.ingredients.clone();
    if let Some((n, gb)) = o.make {
        for i in 0..n {
            let dir = o.work.join(format!("ing{i}"));
            synthetic_checkpoint(&dir, gb, i as u64)?;
            dirs.push(dir);
        }
    }
    if dirs.len() < 2 {
        return Err(ModelError::Config {
            path: o.work.clone(),
            message: "a soup needs two ingredients at least".into(),
        });
    }
    let cks: Vec<Checkpoint> = dirs
        .iter()
        .map(|d| Checkpoint::open(d).map_err(|e| ModelError::Weights { path: e.path, message: e.message }))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    check_compatible(&refs).map_err(|e| ModelError::Weights { path: e.path, message: e.message })?;
    let files: Vec<PathBuf> = cks.iter().flat_map(|c| c.files.clone()).collect();
    let read_all = || -> Result<(u64, f64), ModelError> {
        let t = Instant::now();
        let mut total = 0u64;
        let mut buf = vec![0u8; 16 << 20];
        for f in &files {
            let mut file = std::fs::File::open(f).map_err(|e| io(f, e))?;
            loop {
                let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| io(f, e))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
        Ok((total, t.elapsed().as_secs_f64()))
    };
    let (input, _) = read_all()?; // warm the page cache: both then read from memory alike
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let (mut reads, mut soups) = (Vec::new(), Vec::new());
    for _ in 0..o.repeat.max(1) {
        reads.push(read_all()?.1);
        let _ = std::fs::remove_dir_all(&o.out);
        std::fs::create_dir_all(&o.out).map_err(|e| io(&o.out, e))?;
        let t = Instant::now();
        write_soup(&refs, &vec![1.0; refs.len()], &o.out, 5_000_000_000, &meta)
            .map_err(|e| ModelError::Weights { path: e.path, message: e.message })?;
        soups.push(t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (read_s, soup_s) = (median(&mut reads), median(&mut soups));
    let gb = input as f64 / 1e9;
    Ok(json!({
        "bench": "soup", "ingredients": dirs.len(), "input_gb": gb, "repeat": o.repeat.max(1),
        "read_limit_gb_per_s": gb / read_s, "soup_gb_per_s": gb / soup_s, "fraction_of_read_limit": read_s / soup_s,
        "peak_rss_bytes": ladle_engine::runs::peak_rss_bytes(), "out": o.out.display().to_string(),
    }))
}

/// A bf16 checkpoint of about `gb` GB of [4096, 4096] tensors with values in (-1, 1), made once
/// (kept for the next run when already there).
fn synthetic_checkpoint(dir: &Path, gb: f64, seed: u64) -> Result<(), ModelError> {
    let path = dir.join("model.safetensors");
    if path.is_file() {
        return Ok(());
    }
    let io = |e: std::io::Error| ModelError::Weights { path: path.clone(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(io)?;
    let per = 4096 * 4096;
    let count = ((gb * 1e9) as usize / (per * 2)).max(1);
    let mut rng = Rng::new(seed);
    let mut tensors = HashMap::new();
    for k in 0..count {
        let values: Vec<half::bf16> = (0..per).map(|_| half::bf16::from_f64(rng.next_f64() * 2.0 - 1.0)).collect();
        tensors.insert(format!("model.layers.{k}.weight"), Tensor::from_vec(values, (4096, 4096), &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, &path)?;
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"synthetic\"}").map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_sequences_have_the_asked_lengths_and_ids() {
        let seqs = random_sequences(1000, 200, 60, 7);
        assert_eq!(seqs.len(), 200);
        assert!(seqs.iter().all(|s| (30..=90).contains(&s.ids.len()) && s.ids.iter().all(|&t| t < 1000)));
        assert_eq!(seqs, random_sequences(1000, 200, 60, 7), "seeded");
    }

    fn tiny_shape() -> Value {
        let mut c = llm_shape("qwen2-0.5b").unwrap();
        for (k, v) in [("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 2)] {
            c[k] = v.into();
        }
        c["num_attention_heads"] = 4.into();
        c["num_key_value_heads"] = 2.into();
        c["vocab_size"] = 1000.into();
        c
    }

    #[test]
    fn a_random_model_predicts_uniformly_and_saves_what_it_scored() {
        let config = tiny_shape();
        let cfg = shape_config(&config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let decoder = random_decoder(&config, &Device::Cpu, DType::F32, Some(dir.path())).unwrap();
        let seqs = random_sequences(1000, 24, 20, 1);
        let r = score(&decoder, &cfg, &seqs, 256).unwrap();
        assert_eq!(r.scored_tokens, seqs.iter().map(|s| s.ids.len() - 1).sum::<usize>());
        // Weights of std 0.02 make logits of std about 0.02·√64 = 0.16: the NLL per token is
        // ln(vocab) plus about half their variance.
        let mean = r.nll_sum / r.scored_tokens as f64;
        assert!((mean - 1000f64.ln()).abs() < 0.05, "mean NLL {mean} vs ln 1000 = {}", 1000f64.ln());
        // The saved folder is that same model.
        let vb = ladle_models::llm::weights::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let saved_cfg = LlmConfig::load(dir.path()).unwrap();
        let reloaded = Decoder::new(&saved_cfg, vb, "model").unwrap();
        let again = score(&reloaded, &saved_cfg, &seqs, 256).unwrap();
        assert_eq!(again.nll_sum, r.nll_sum);
    }

    /// Every batch size writes every prompt's tokens, each row reported against the first; a
    /// config on disk is a shape too, and a zero batch is refused.
    #[test]
    fn the_generate_bench_writes_every_token_at_every_batch_size() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, tiny_shape().to_string()).unwrap();
        let options = |batches: Vec<usize>| GenerateOptions {
            shape: config.display().to_string(),
            layers: Some(1),
            placement: Placement::CPU_F32,
            prompts: 5,
            length: 6,
            new_tokens: 3,
            batches,
        };
        let r = run_generate(&options(vec![1, 2, 8])).unwrap();
        assert_eq!(r["layers"], 1);
        let runs = r["runs"].as_array().unwrap();
        assert_eq!(runs.iter().map(|x| x["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 8]);
        assert!(runs.iter().all(|x| x["new_tokens"] == 15), "{runs:?}");
        assert_eq!(runs[0]["vs_first"], 1.0);
        assert!(run_generate(&options(vec![2, 0])).is_err());
    }

    #[test]
    fn the_soup_bench_averages_synthetic_checkpoints_and_reports_against_reads() {
        let work = tempfile::tempdir().unwrap();
        let o = SoupOptions {
            ingredients: Vec::new(),
            make: Some((2, 0.001)), // the smallest: one [4096, 4096] bf16 tensor each
            work: work.path().to_path_buf(),
            out: work.path().join("soup"),
            repeat: 1,
        };
        let r = run_soup(&o).unwrap();
        assert_eq!(r["ingredients"], 2);
        let input = r["input_gb"].as_f64().unwrap();
        assert!((input - 2.0 * 4096.0 * 4096.0 * 2.0 / 1e9).abs() < 1e-3, "{r}");
        assert!(r["soup_gb_per_s"].as_f64().unwrap() > 0.0 && r["read_limit_gb_per_s"].as_f64().unwrap() > 0.0);
        // The soup is the mean of the two, element by element (to bf16).
        let read = |p: &Path| std::fs::read(p).unwrap();
        let (a, b, soup) = (
            read(&work.path().join("ing0/model.safetensors")),
            read(&work.path().join("ing1/model.safetensors")),
            read(&o.out.join("model.safetensors")),
        );
        let st = |bytes: &[u8]| -> Vec<f32> {
            let t = safetensors::SafeTensors::deserialize(bytes).unwrap();
            t.tensor("model.layers.0.weight")
                .unwrap()
                .data()
                .chunks(2)
                .take(1000)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        for ((x, y), m) in st(&a).iter().zip(st(&b)).zip(st(&soup)) {
            assert_eq!(m, half::bf16::from_f32(((*x as f64 + y as f64) / 2.0) as f32).to_f32());
        }
    }

    #[test]
    fn named_shapes_have_the_published_parameter_counts() {
        // The Hugging Face model cards' totals: 0.49B, 1.54B and 7.6B parameters. Ours are the
        // matmul weights; adding the embedding (a separate matrix unless tied to the head)
        // leaves out only norms and biases, well under 2%.
        for (name, total) in [("qwen2-0.5b", 0.49e9), ("qwen2-1.5b", 1.54e9), ("qwen2-7b", 7.62e9)] {
            let cfg = shape_config(&llm_shape(name).unwrap()).unwrap();
            let embedding = (cfg.vocab_size * cfg.hidden_size) as f64;
            // Tied models multiply by the embedding as their head: it is counted once.
            let all = matmul_params(&cfg) as f64 + if cfg.tie_word_embeddings { 0.0 } else { embedding };
            assert!((all - total).abs() / total < 0.02, "{name}: {all:e} parameters vs {total:e}");
        }
    }
}
