//! `ladle bench fixtures`: the transformers fixtures checked on any device and dtype, from the
//! binary alone.
//!
//! The fixture tests (`stages/models/tests/*_fixtures.rs`) hold the CPU to transformers under
//! `cargo test`; a GPU machine has no Rust toolchain, so the same comparisons live here too, for
//! `scripts/gpu-proof.sh` to run with the packed `cuda` binary. Each check scores the bundled
//! captions (`tests/fixtures/points-tiny`, see its README) with one fixture model in the asked
//! placement and reports the worst relative error against the fixture's value: text and
//! chat-prompted perplexities (Qwen2, LLaMA), image-conditioned ones (LLaVA, Qwen2-VL,
//! Qwen2.5-VL), greedy generation token for token (f32 only: half precision may flip a near
//! tie), and one 6000-token record scored with its attention in the default query blocks and in
//! small ones (the blocks must agree; the record must score at all).
//!
//! Tolerances are the fixture tests': 1e-4 relative in f32 (LLaVA's 1e-3, as its test holds it),
//! 2e-2 in bf16 and f16.

use std::path::Path;

use candle_core::DType;
use ladle_models::device::{Placement, dtype_name};
use ladle_models::llm::generate::{Prompt, Rng, Sampling, generate_batch};
use ladle_models::llm::{Decoder, LanguageModel, LlmConfig, ModelError, Score, Scorer, Sequence};
use ladle_models::qwen2_vl::Qwen2Vl;
use ladle_models::qwen2_vl::processor::RGB_CONVENTION;
use ladle_models::vision::images::{RgbConvention, load_rgb_as};
use ladle_models::vision::llava::Llava;
use serde_json::{Value, json};

/// One check's outcome.
struct Check {
    name: String,
    records: usize,
    /// Worst relative error against the reference (for generation: mismatching cases).
    worst: f64,
    tolerance: f64,
}

impl Check {
    fn json(&self) -> Value {
        json!({
            "check": self.name, "records": self.records, "worst_rel": self.worst,
            "tolerance": self.tolerance, "ok": self.worst <= self.tolerance,
        })
    }
}

/// Runs every check in `placement` on the fixtures in `dir` (`tests/fixtures/points-tiny`): one
/// JSON object with each check's figures and `ok` overall. A check that cannot run at all (a
/// model that fails to load, a computation error) is an error.
pub fn run_fixtures(dir: &Path, placement: &Placement) -> Result<Value, ModelError> {
    let device = placement.device()?;
    let dtype = placement.dtype;
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let expected: Value = read_json(&dir.join("expected.json"))?;
    let captions: Vec<Value> = std::fs::read_to_string(dir.join("captions.jsonl"))
        .map_err(|e| fixture_error(&dir.join("captions.jsonl"), e.to_string()))?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| fixture_error(&dir.join("captions.jsonl"), e.to_string())))
        .collect::<Result<_, _>>()?;
    let prompt = expected["prompt"].as_str().unwrap_or_default().to_string();
    let text = |r: &Value| r["caption"].as_str().unwrap_or_default().to_string();
    let mut checks = Vec::new();

    for (model, key, prompted) in [
        ("tiny-qwen2", "qwen2_text", false),
        ("tiny-qwen2", "qwen2_prompted", true),
        ("tiny-llama", "llama_text", false),
        ("tiny-llama", "llama_prompted", true),
    ] {
        let m = LanguageModel::load_on(&dir.join(model), &device, dtype)?;
        let seqs = captions
            .iter()
            .map(|r| {
                if prompted {
                    m.tokenizer.answer_sequence(&prompt, &text(r))
                } else {
                    Ok(Sequence { ids: m.tokenizer.encode(&text(r), true)?, score_from: 1 })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let scores = Scorer { decoder: &m.decoder, pad: 0 }.score_batch(&refs)?;
        let want = perplexities(&expected[key], "perplexity");
        checks.push(compare(key, &scores.iter().map(Score::perplexity).collect::<Vec<_>>(), &want, tolerance)?);
    }

    let llava = Llava::load_on(&dir.join("tiny-llava"), &device, dtype)?;
    let mut got = Vec::new();
    for r in &captions {
        let image = image_of(dir, r, RgbConvention::Displayed)?;
        got.push(llava.score(&image, &prompt, &text(r))?.perplexity());
    }
    let want = perplexities(&expected["llava_image_conditioned"], "perplexity");
    // The LLaVA fixture is held to 1e-3 in f32 (its test says why: CLIP's preprocessing).
    checks.push(compare("llava_image_conditioned", &got, &want, tolerance.max(1e-3))?);

    let qwen2vl: Value = read_json(&dir.join("expected_qwen2vl.json"))?;
    for name in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        let vlm = Qwen2Vl::load_on(&dir.join(name), &device, dtype)?;
        let mut items = Vec::new();
        for r in &captions {
            items.push(vlm.prepare(&image_of(dir, r, RGB_CONVENTION)?, &prompt, &text(r))?);
        }
        // Batched as the stage batches them (images packed into one tower pass).
        let refs: Vec<_> = items.iter().collect();
        let got: Vec<f64> = vlm.score_all(&refs, 4096)?.iter().map(|s| s.mean_nll()).collect();
        let want = perplexities(&qwen2vl["models"][name]["records"], "mean_nll");
        checks.push(compare(&format!("{name}_mean_nll"), &got, &want, tolerance)?);
        if dtype == DType::F32 {
            checks.push(image_greedy(dir, name, &vlm, &qwen2vl, &prompt)?);
        }
    }

    if dtype == DType::F32 {
        checks.push(greedy(dir, &expected, &device)?);
    }
    checks.push(long_record(dir, &device, dtype, tolerance)?);

    let ok = checks.iter().all(|c| c.worst <= c.tolerance);
    Ok(json!({
        "bench": "fixtures", "device": placement.name(), "dtype": dtype_name(dtype), "ok": ok,
        "checks": checks.iter().map(Check::json).collect::<Vec<_>>(),
    }))
}

/// The fixture's greedy continuations of chat prompts, token for token, written as one batch
/// (as the `generate` stage writes them): `worst` counts the cases that differ.
fn greedy(dir: &Path, expected: &Value, device: &candle_core::Device) -> Result<Check, ModelError> {
    let m = LanguageModel::load_on(&dir.join("tiny-qwen2"), device, DType::F32)?;
    let eot = m.tokenizer.end_of_turn().and_then(|t| m.tokenizer.token_id(t)).into_iter().collect::<Vec<_>>();
    let cases = expected["qwen2_greedy"].as_array().cloned().unwrap_or_default();
    let mut prompts = Vec::with_capacity(cases.len());
    for case in &cases {
        let ids = m.tokenizer.encode(&m.tokenizer.chat_prefix(case["prompt"].as_str().unwrap_or_default())?, false)?;
        prompts.push(Prompt::of_ids(&m.decoder, &ids)?);
    }
    let mut rngs: Vec<Rng> = cases.iter().map(|_| Rng::new(0)).collect();
    let outs = generate_batch(&m.decoder, prompts, &vec![16; cases.len()], &eot, &Sampling::GREEDY, &mut rngs)?;
    let differ = cases.iter().zip(&outs).filter(|(case, out)| **out != token_ids(&case["generated_ids"])).count();
    Ok(Check { name: "qwen2_greedy_tokens".into(), records: cases.len(), worst: differ as f64, tolerance: 0.0 })
}

/// A Qwen2-VL fixture's greedy captions of r000–r005 (the image in the prompt, then the KV
/// cache), token for token, written as one batch: `worst` counts the records that differ.
fn image_greedy(dir: &Path, name: &str, vlm: &Qwen2Vl, expected: &Value, prompt: &str) -> Result<Check, ModelError> {
    let stop: Vec<u32> = vlm.lm.tokenizer.token_id("<|im_end|>").into_iter().collect();
    let model = &expected["models"][name];
    let cases = model["greedy"].as_array().cloned().unwrap_or_default();
    let mut items = Vec::with_capacity(cases.len());
    for case in &cases {
        let record = model["records"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["id"] == case["id"])
            .ok_or_else(|| ModelError::Compute(format!("{name}: no record {}", case["id"])))?;
        let image = image_of(dir, record, RGB_CONVENTION)?;
        items.push(vlm.prepare_prompt(&image, prompt)?);
    }
    let refs: Vec<_> = items.iter().collect();
    let mut rngs: Vec<Rng> = cases.iter().map(|_| Rng::new(0)).collect();
    let outs = vlm.generate(&refs, &vec![16; cases.len()], &stop, &Sampling::GREEDY, &mut rngs)?;
    let differ = cases.iter().zip(&outs).filter(|(case, out)| **out != token_ids(&case["generated_ids"])).count();
    Ok(Check { name: format!("{name}_greedy_tokens"), records: cases.len(), worst: differ as f64, tolerance: 0.0 })
}

/// A 6000-token record through tiny-qwen2 (its positions raised to 8192), its attention in the
/// default query blocks and in blocks of 2²⁰ scores: both must score, and agree.
fn long_record(dir: &Path, device: &candle_core::Device, dtype: DType, tolerance: f64) -> Result<Check, ModelError> {
    let model_dir = dir.join("tiny-qwen2");
    let mut cfg = LlmConfig::load(&model_dir)?;
    cfg.max_positions = 8192;
    let t = 6000;
    let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32).collect();
    let seq = Sequence { ids, score_from: 1 };
    let vb = ladle_models::llm::weights::load(&model_dir, device, dtype)?;
    let mut decoder = Decoder::new(&cfg, vb, "model")?;
    let mut nll = Vec::new();
    for block in [ladle_models::llm::SCORE_BLOCK_ELEMENTS, 1 << 20] {
        decoder.set_score_block(block);
        let score = Scorer { decoder: &decoder, pad: 0 }.score_batch(&[&seq])?[0];
        if !score.mean_nll().is_finite() {
            return Err(ModelError::Compute(format!(
                "a {t}-token record scored {} (blocks of {block})",
                score.mean_nll()
            )));
        }
        nll.push(score.mean_nll());
    }
    let rel = (nll[0] - nll[1]).abs() / nll[1].abs().max(1e-12);
    Ok(Check { name: format!("long_record_{t}_tokens_blocked"), records: 1, worst: rel, tolerance })
}

fn compare(name: &str, got: &[f64], want: &[f64], tolerance: f64) -> Result<Check, ModelError> {
    if got.len() != want.len() {
        return Err(ModelError::Compute(format!(
            "{name}: {} records scored but the fixture has {}",
            got.len(),
            want.len()
        )));
    }
    // A NaN score is the worst error there is (f64::max would skip it).
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs())
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .fold(0f64, f64::max);
    Ok(Check { name: name.into(), records: got.len(), worst, tolerance })
}

fn perplexities(list: &Value, field: &str) -> Vec<f64> {
    list.as_array().into_iter().flatten().filter_map(|r| r[field].as_f64()).collect()
}

/// A fixture's list of token ids.
fn token_ids(v: &Value) -> Vec<u32> {
    v.as_array().into_iter().flatten().filter_map(Value::as_u64).map(|v| v as u32).collect()
}

/// A fixture record's image, read as the model's reference reads pixels.
fn image_of(dir: &Path, record: &Value, convention: RgbConvention) -> Result<image::RgbImage, ModelError> {
    let path = dir.join(record["image"].as_str().unwrap_or_default());
    load_rgb_as(&path, convention).map_err(|e| ModelError::Image(format!("{}: {e}", path.display())))
}

/// A fixture's JSON file, read as a model folder's are.
fn read_json(path: &Path) -> Result<Value, ModelError> {
    ladle_models::llm::config::read_json(path, "--dir names the fixture folder, tests/fixtures/points-tiny")
}

fn fixture_error(path: &Path, message: String) -> ModelError {
    ModelError::Config { path: path.to_path_buf(), message: format!("cannot read the fixture: {message}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU in f32 every check passes: the command agrees with the fixture tests.
    #[test]
    fn every_fixture_check_passes_on_the_cpu() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/points-tiny");
        let report = run_fixtures(&dir, &Placement::CPU_F32).unwrap();
        eprintln!("{report:#}");
        let checks = report["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 11, "{report}");
        assert!(checks.iter().all(|c| c["records"].as_u64().unwrap() > 0), "{report}");
        assert_eq!(report["ok"], true, "{report:#}");
    }
}
