//! The LLM core against values Hugging Face transformers computed (tests/fixtures/points-tiny,
//! see its README in ../shared/fixtures): perplexities of captions, text and chat-prompted.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ladle_models::llm::scorer::plan_batches;
use ladle_models::llm::{LanguageModel, Scorer, Sequence};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn captions() -> Vec<(String, String)> {
    std::fs::read_to_string(fixtures().join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v["caption"].as_str().unwrap().to_string())
        })
        .collect()
}

fn text_sequence(m: &LanguageModel, caption: &str) -> Sequence {
    Sequence { ids: m.tokenizer.encode(caption, true).unwrap(), score_from: 1 }
}

fn prompted_sequence(m: &LanguageModel, prompt: &str, caption: &str) -> Sequence {
    m.tokenizer.answer_sequence(prompt, caption).unwrap()
}

fn check(model: &str, key: &str, prompted: bool) {
    check_in(model, key, prompted, DType::F32, 1e-4);
}

/// The fixture's perplexities with the model computing in `dtype` on the CPU, each within
/// relative `tolerance` (issue #7: 1e-4 in f32, 2e-2 in bf16 and f16).
fn check_in(model: &str, key: &str, prompted: bool, dtype: DType, tolerance: f64) {
    let m = LanguageModel::load_on(&fixtures().join(model), &Device::Cpu, dtype).unwrap();
    let exp = expected();
    let prompt = exp["prompt"].as_str().unwrap();
    let scorer = Scorer { decoder: &m.decoder, pad: 0 };
    let caps = captions();
    let seqs: Vec<Sequence> = caps
        .iter()
        .map(|(_, c)| if prompted { prompted_sequence(&m, prompt, c) } else { text_sequence(&m, c) })
        .collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let scores = scorer.score_batch(&refs).unwrap();
    let mut worst: f64 = 0.0;
    for (i, ((id, _), s)) in caps.iter().zip(&scores).enumerate() {
        let e = &exp[key][i];
        assert_eq!(e["id"].as_str().unwrap(), id);
        assert_eq!(s.tokens as u64, e["n_scored"].as_u64().unwrap(), "{key} {id}: scored tokens");
        let want = e["perplexity"].as_f64().unwrap();
        let rel = (s.perplexity() - want).abs() / want;
        worst = worst.max(rel);
        assert!(rel < tolerance, "{key} {dtype:?} {id}: {} vs {want} (rel {rel:e})", s.perplexity());
    }
    eprintln!("{key} {dtype:?}: worst relative error {worst:e} over {} captions", caps.len());
}

#[test]
fn qwen2_in_bf16_and_f16() {
    check_in("tiny-qwen2", "qwen2_text", false, DType::BF16, 2e-2);
    check_in("tiny-qwen2", "qwen2_prompted", true, DType::BF16, 2e-2);
    check_in("tiny-qwen2", "qwen2_text", false, DType::F16, 2e-2);
}

#[test]
fn llama_in_bf16_and_f16() {
    check_in("tiny-llama", "llama_text", false, DType::BF16, 2e-2);
    check_in("tiny-llama", "llama_prompted", true, DType::F16, 2e-2);
}

#[test]
fn qwen2_text() {
    check("tiny-qwen2", "qwen2_text", false);
}

#[test]
fn qwen2_prompted() {
    check("tiny-qwen2", "qwen2_prompted", true);
}

#[test]
fn llama_text() {
    check("tiny-llama", "llama_text", false);
}

#[test]
fn llama_prompted() {
    check("tiny-llama", "llama_prompted", true);
}

#[test]
fn a_record_scores_the_same_alone_and_in_any_batch() {
    let m = LanguageModel::load(&fixtures().join("tiny-qwen2")).unwrap();
    let scorer = Scorer { decoder: &m.decoder, pad: 0 };
    let seqs: Vec<Sequence> = captions().iter().map(|(_, c)| text_sequence(&m, c)).collect();
    let alone: Vec<f64> = seqs.iter().map(|s| scorer.score_batch(&[s]).unwrap()[0].perplexity()).collect();
    // Mixed lengths: every batch the planner makes at a small budget, and one batch of all.
    let lengths: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    for budget in [64, 200, 100_000] {
        for batch in plan_batches(&lengths, budget) {
            let refs: Vec<&Sequence> = batch.iter().map(|&i| &seqs[i]).collect();
            for (&i, s) in batch.iter().zip(scorer.score_batch(&refs).unwrap()) {
                let rel = (s.perplexity() - alone[i]).abs() / alone[i];
                assert!(rel < 1e-5, "record {i} in a batch of {}: rel {rel:e}", batch.len());
            }
        }
    }
}

#[test]
fn qwen2_greedy_generation_matches_transformers() {
    use ladle_models::llm::generate::{Rng, Sampling, generate};
    let m = LanguageModel::load(&fixtures().join("tiny-qwen2")).unwrap();
    let eot = m.tokenizer.token_id(m.tokenizer.end_of_turn().unwrap()).unwrap();
    for case in expected()["qwen2_greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = m.tokenizer.encode(&m.tokenizer.chat_prefix(prompt).unwrap(), false).unwrap();
        let want_prompt: Vec<u32> =
            case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want_prompt, "prompt ids for {prompt:?}");
        let out = generate(&m.decoder, &ids, 16, &[eot], &Sampling::GREEDY, &mut Rng::new(0)).unwrap();
        let want: Vec<u32> =
            case["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(out, want, "generated ids for {prompt:?}");
        assert_eq!(m.tokenizer.decode(&out, true).unwrap(), case["text"].as_str().unwrap());
    }
}

/// All the fixture's prompts written as one batch (unequal lengths, left-padded) come out as
/// transformers wrote each alone; and seeded sampling draws in a batch what each draws alone.
#[test]
fn qwen2_batched_generation_matches_each_alone() {
    use ladle_models::llm::generate::{Prompt, Rng, Sampling, generate, generate_batch};
    let m = LanguageModel::load(&fixtures().join("tiny-qwen2")).unwrap();
    let eot = m.tokenizer.token_id(m.tokenizer.end_of_turn().unwrap()).unwrap();
    let cases = expected()["qwen2_greedy"].as_array().unwrap().clone();
    let mut prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| m.tokenizer.encode(&m.tokenizer.chat_prefix(c["prompt"].as_str().unwrap()).unwrap(), false).unwrap())
        .collect();
    // One more of a different length, so that rows are padded whatever the fixture holds.
    prompts.push(m.tokenizer.encode(&m.tokenizer.chat_prefix("Say something.").unwrap(), false).unwrap());
    let lengths: std::collections::BTreeSet<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lengths.len() > 1, "the prompts must differ in length: {lengths:?}");
    let batch = |sampling: &Sampling, limits: &[usize], seeds: &[u64]| {
        let ready = prompts.iter().map(|ids| Prompt::of_ids(&m.decoder, ids).unwrap()).collect();
        let mut rngs: Vec<Rng> = seeds.iter().map(|&s| Rng::new(s)).collect();
        generate_batch(&m.decoder, ready, limits, &[eot], sampling, &mut rngs).unwrap()
    };
    let n = prompts.len();
    // Different limits, one of them none: rows leave the batch at different steps.
    let limits: Vec<usize> = (0..n).map(|i| [16, 5, 0, 11][i % 4]).collect();
    let greedy = batch(&Sampling::GREEDY, &limits, &vec![0; n]);
    for (i, case) in cases.iter().enumerate() {
        let want: Vec<u32> =
            case["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(greedy[i], want[..want.len().min(limits[i])], "case {i} in a batch");
    }
    let sampling = Sampling { temperature: 1.0, top_p: 0.9 };
    let seeds: Vec<u64> = (0..n as u64).map(|i| 1000 + i).collect();
    let sampled = batch(&sampling, &vec![12; n], &seeds);
    for (i, ids) in prompts.iter().enumerate() {
        let alone = generate(&m.decoder, ids, 12, &[eot], &sampling, &mut Rng::new(seeds[i])).unwrap();
        assert_eq!(sampled[i], alone, "prompt {i}: sampled in a batch and alone");
    }
}

#[test]
fn cached_steps_agree_with_a_full_forward_pass() {
    use candle_core::Tensor;
    let m = LanguageModel::load(&fixtures().join("tiny-llama")).unwrap();
    let ids = m.tokenizer.encode("a dog runs on the beach at sunset", true).unwrap();
    let dev = m.decoder.device();
    let full = m.decoder.hidden(&Tensor::from_vec(ids.clone(), (1, ids.len()), dev).unwrap()).unwrap();
    let mut cache = m.decoder.new_cache(ids.len()).unwrap();
    let first = m.decoder.step(&Tensor::from_vec(ids[..3].to_vec(), (1, 3), dev).unwrap(), &mut cache).unwrap();
    let mut parts = vec![first];
    for &id in &ids[3..] {
        parts.push(m.decoder.step(&Tensor::from_vec(vec![id], (1, 1), dev).unwrap(), &mut cache).unwrap());
    }
    let stepped = Tensor::cat(&parts, 1).unwrap();
    let diff: f32 = (full - stepped).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff < 1e-4, "max difference {diff}");
}

/// A copy of tiny-qwen2 whose weights are rewritten: `shards` files with an index, each tensor
/// converted to `dtype`.
fn rewritten_qwen2(shards: usize, dtype: safetensors::Dtype) -> tempfile::TempDir {
    rewritten_qwen2_without(shards, dtype, None)
}

fn rewritten_qwen2_without(shards: usize, dtype: safetensors::Dtype, drop: Option<&str>) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let src = fixtures().join("tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> =
        st.names().into_iter().map(str::to_string).filter(|n| Some(n.as_str()) != drop).collect();
    names.sort();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            let floats = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            let data: Vec<u8> = match dtype {
                safetensors::Dtype::F32 => t.data().to_vec(),
                safetensors::Dtype::F16 => floats.flat_map(|x| half::f16::from_f32(x).to_le_bytes()).collect(),
                safetensors::Dtype::BF16 => floats.flat_map(|x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                other => panic!("{other:?}"),
            };
            (n.clone(), t.shape().to_vec(), data)
        })
        .collect();
    let per = converted.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in converted.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", k + 1)
        };
        let views: Vec<(String, TensorView)> =
            chunk.iter().map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap())).collect();
        std::fs::write(dir.path().join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
        for (n, _, _) in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    dir
}

fn text_perplexities(dir: &Path) -> Vec<f64> {
    let m = LanguageModel::load(dir).unwrap();
    let scorer = Scorer { decoder: &m.decoder, pad: 0 };
    let seqs: Vec<Sequence> = captions().iter().map(|(_, c)| text_sequence(&m, c)).collect();
    let refs: Vec<&Sequence> = seqs.iter().collect();
    scorer.score_batch(&refs).unwrap().iter().map(|s| s.perplexity()).collect()
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let reference = text_perplexities(&fixtures().join("tiny-qwen2"));
    let sharded = rewritten_qwen2(3, safetensors::Dtype::F32);
    assert!(sharded.path().join("model-00003-of-00003.safetensors").is_file());
    assert_eq!(text_perplexities(sharded.path()), reference, "sharding changes nothing");
    for dtype in [safetensors::Dtype::F16, safetensors::Dtype::BF16] {
        let half = rewritten_qwen2(2, dtype);
        let got = text_perplexities(half.path());
        assert_ne!(got, reference, "{dtype:?} weights were really rounded");
        for (g, r) in got.iter().zip(&reference) {
            // Weights rounded to 11 (f16) or 8 (bf16) bits of mantissa move perplexities a little.
            assert!((g - r).abs() / r < 2e-2, "{dtype:?}: {g} vs {r}");
        }
    }
    // A shard named in the index but missing is named in the error.
    let broken = rewritten_qwen2(2, safetensors::Dtype::F32);
    std::fs::remove_file(broken.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = LanguageModel::load(broken.path()).err().unwrap().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = rewritten_qwen2_without(1, safetensors::Dtype::F32, Some("model.layers.1.mlp.up_proj.weight"));
    let err = LanguageModel::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    assert!(err.contains("do not match config.json"), "{err}");
}
