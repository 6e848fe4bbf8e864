//! Qwen2-VL and Qwen2.5-VL against transformers + qwen_vl_utils (tests/fixtures/points-tiny/
//! expected_qwen2vl.json, made by ../shared/fixtures/generator/gen_qwen2vl.py): both config
//! layouts; every record's sizes, grid, image-token count and pixel sum; record0's pixel values
//! and M-RoPE positions; Qwen2.5-VL's windows; every record's image embeddings and POINTS'
//! perplexity score.

use std::path::{Path, PathBuf};

use ladle_models::qwen2_vl::{Family, ImageProcessor, Qwen2VlConfig, mrope_positions};
use ladle_models::vision::resample::Resampler;
use serde_json::{Value, json};

/// A fixture image, read as qwen_vl_utils reads images.
fn load_rgb(path: &Path) -> Result<image::RgbImage, ladle_models::vision::images::ImageError> {
    ladle_models::vision::images::load_rgb_as(path, ladle_models::qwen2_vl::processor::RGB_CONVENTION)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected_qwen2vl.json")).unwrap()).unwrap()
}

const MODELS: [&str; 2] = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"];

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

#[test]
fn both_config_layouts_read_to_what_transformers_read() {
    let expected = expected();
    for name in MODELS {
        let e = &expected["models"][name];
        let c = Qwen2VlConfig::load(&fixtures().join(name)).unwrap();
        assert_eq!(c.family, if name == "tiny-qwen2-vl" { Family::Qwen2Vl } else { Family::Qwen25Vl }, "{name}");
        assert_eq!(c.text.vocab_size, e["vocab_size"].as_u64().unwrap() as usize, "{name}");
        assert_eq!(c.mrope_section.to_vec(), usizes(&e["mrope_section"]), "{name}");
        assert_eq!(c.text.rope_theta, e["rope_theta"].as_f64().unwrap(), "{name}");
        assert_eq!(c.text.tie_word_embeddings, e["tie_word_embeddings"].as_bool().unwrap(), "{name}");
        // The fixtures README: text hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, q/k/v biases.
        let t = &c.text;
        assert_eq!((t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim), (64, 2, 4, 2, 16));
        assert!(t.qkv_bias && !t.o_bias);
        assert_eq!((c.image_token_id, c.vision_start_token_id, c.vision_end_token_id), (405, 403, 404));
        let v = &c.vision;
        assert_eq!((v.depth, v.num_heads, v.out_hidden_size, v.patch_size, v.spatial_merge_size), (2, 2, 64, 14, 2));
        match c.family {
            Family::Qwen2Vl => assert_eq!((v.hidden_size, v.intermediate_size, v.window_size), (32, 128, None)),
            Family::Qwen25Vl => {
                assert_eq!((v.hidden_size, v.intermediate_size), (32, 64));
                assert_eq!(v.window_size, Some(e["window_size"].as_u64().unwrap() as usize));
                assert_eq!(v.fullatt_block_indexes, usizes(&e["fullatt_block_indexes"]));
            }
        }
    }
}

#[test]
fn bad_configs_name_the_key() {
    let hub: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-qwen2-vl/config.json")).unwrap()).unwrap();
    let mut bad = hub.clone();
    bad["rope_scaling"]["mrope_section"] = json!([2, 3, 4]);
    let e = Qwen2VlConfig::from_json(&bad).unwrap_err();
    assert!(e.contains("`rope_scaling.mrope_section` [2, 3, 4] sums to 9") && e.contains("head of 16"), "{e}");
    bad["rope_scaling"]["mrope_section"] = json!([2, "3", 3]);
    let e = Qwen2VlConfig::from_json(&bad).unwrap_err();
    assert!(e.contains("`rope_scaling.mrope_section` must be three"), "{e}");
    let mut bad = hub.clone();
    bad["rope_scaling"] = Value::Null;
    assert!(Qwen2VlConfig::from_json(&bad).unwrap_err().contains("missing `rope_scaling.mrope_section`"));
    let mut bad = hub.clone();
    bad["vision_config"]["hidden_size"] = json!(48);
    assert!(Qwen2VlConfig::from_json(&bad).unwrap_err().contains("vision tower's output (48)"));

    let t5: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-qwen2.5-vl/config.json")).unwrap())
            .unwrap();
    let mut bad = t5.clone();
    bad["text_config"]["rope_parameters"]["mrope_section"] = json!([4, 4, 4]);
    let e = Qwen2VlConfig::from_json(&bad).unwrap_err();
    assert!(e.contains("`text_config.rope_parameters.mrope_section` [4, 4, 4]"), "{e}");
    let mut bad = t5;
    bad["vision_config"]["fullatt_block_indexes"] = json!([2]);
    assert!(Qwen2VlConfig::from_json(&bad).unwrap_err().contains("names block 2 of 2"));
}

/// The f64 sum of f32 values, as `pixel_values.double().sum()`.
fn sum(values: &[f32]) -> (f64, f64) {
    (values.iter().map(|&v| v as f64).sum(), values.iter().map(|&v| (v as f64).abs()).sum())
}

#[test]
fn every_image_becomes_the_patches_transformers_made() {
    let expected = expected();
    for name in MODELS {
        let e = &expected["models"][name];
        let processor = ImageProcessor::load(&fixtures().join(name)).unwrap();
        assert_eq!(processor.min_pixels, e["image_processor"]["min_pixels"].as_u64().unwrap() as usize);
        assert_eq!(processor.max_pixels, e["image_processor"]["max_pixels"].as_u64().unwrap() as usize);
        let pillow = ImageProcessor { resampler: Resampler::Pillow, ..processor.clone() };
        let (mut resized_again, mut pillow_differs) = (0, 0);
        for r in e["records"].as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let image = load_rgb(&fixtures().join(r["image"].as_str().unwrap())).unwrap();
            assert_eq!(usizes(&r["orig_size"]), [image.width() as usize, image.height() as usize], "{id}");
            let patches = processor.patches(&image).unwrap();
            assert_eq!(patches.fetched.to_vec(), usizes(&r["fetch_size"]), "{name} {id}");
            assert_eq!(patches.resized.to_vec(), usizes(&r["resized"]), "{name} {id}");
            assert_eq!(patches.grid_thw.to_vec(), usizes(&r["image_grid_thw"]), "{name} {id}");
            assert_eq!(processor.n_image_tokens(&patches), r["n_image_tokens"].as_u64().unwrap() as usize, "{id}");
            // One level on one value moves the sum by ~0.03; float64 summation order by ~1e-11.
            let want = r["pixel_sum"].as_f64().unwrap();
            let (got, _) = sum(&patches.values);
            assert!((got - want).abs() <= 1e-9 * want.abs(), "{name} {id}: pixel sum {got} vs {want}");
            if patches.fetched != patches.resized {
                resized_again += 1;
                let (pil, _) = sum(&pillow.patches(&image).unwrap().values);
                pillow_differs += usize::from(pil != got);
            }
        }
        // Most records are resized twice; there Pillow's bicubic is not torchvision's.
        assert!(resized_again >= 15 && pillow_differs > 0, "{name}: {resized_again} resized again, {pillow_differs}");
    }
}

#[test]
fn record0_pixel_values_and_positions_are_transformers_to_the_bit() {
    let expected = expected();
    for name in MODELS {
        let e = &expected["models"][name];
        let r0 = &e["record0"];
        let rec = e["records"].as_array().unwrap().iter().find(|r| r["id"] == r0["id"]).unwrap();
        let processor = ImageProcessor::load(&fixtures().join(name)).unwrap();
        let image = load_rgb(&fixtures().join(rec["image"].as_str().unwrap())).unwrap();
        let patches = processor.patches(&image).unwrap();
        let px = &r0["pixel_values"];
        assert_eq!(vec![patches.rows(), patches.row_len], usizes(&px["shape"]));
        let floats =
            |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
        assert_eq!(patches.values[..16], floats(&px["first16"])[..], "{name}");
        let stride = px["sample16_stride"].as_u64().unwrap() as usize;
        let sample: Vec<f32> = (0..16).map(|i| patches.values[i * stride]).collect();
        assert_eq!(sample, floats(&px["sample16"]), "{name}");
        let (s, a) = sum(&patches.values);
        assert!((s - px["sum"].as_f64().unwrap()).abs() < 1e-9 * a, "{name}");
        assert!((a - px["abs_sum"].as_f64().unwrap()).abs() < 1e-9 * a, "{name}");

        let config = Qwen2VlConfig::load(&fixtures().join(name)).unwrap();
        let ids: Vec<u32> = r0["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let [t, h, w] = patches.grid_thw;
        let m = processor.merge_size;
        let positions = mrope_positions(&ids, config.image_token_id, &[[t, h / m, w / m]]).unwrap();
        for axis in 0..3 {
            let want: Vec<i64> =
                r0["position_ids"][axis].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
            assert_eq!(positions.axes[axis], want, "{name} axis {axis}");
        }
        assert_eq!(positions.rope_delta, r0["rope_delta"].as_i64().unwrap(), "{name}");
    }
}

/// The tower of `name`, under the prefix its layout puts it.
fn tower(name: &str) -> ladle_models::qwen2_vl::VisionTower {
    let dir = fixtures().join(name);
    let config = Qwen2VlConfig::load(&dir).unwrap();
    let vb = ladle_models::llm::weights::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let prefix = if vb.contains_tensor("visual.patch_embed.proj.weight") { "visual" } else { "model.visual" };
    ladle_models::qwen2_vl::VisionTower::new(&config.vision, config.family, vb.pp(prefix)).unwrap()
}

#[test]
fn the_vision_towers_give_transformers_image_embeddings() {
    let expected = expected();
    for name in MODELS {
        let e = &expected["models"][name];
        let processor = ImageProcessor::load(&fixtures().join(name)).unwrap();
        let tower = tower(name);
        for r in e["records"].as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let image = load_rgb(&fixtures().join(r["image"].as_str().unwrap())).unwrap();
            let patches = processor.patches(&image).unwrap();
            let embeds = tower.forward(&patches).unwrap();
            assert_eq!(embeds.dims(), [r["n_image_tokens"].as_u64().unwrap() as usize, 64], "{name} {id}");
            let values: Vec<f32> = embeds.flatten_all().unwrap().to_vec1().unwrap();
            let (s, a) = sum(&values);
            let (want, want_abs) =
                (r["image_embeds_sum"].as_f64().unwrap(), r["image_embeds_abs_sum"].as_f64().unwrap());
            // A window or rotary mistake moves the sum by 1e-4..1e-3 of the absolute sum.
            assert!((s - want).abs() <= 1e-5 * want_abs, "{name} {id}: embeddings sum {s} vs {want} (abs {want_abs})");
            assert!((a - want_abs).abs() <= 1e-5 * want_abs, "{name} {id}: abs sum {a} vs {want_abs}");
            if r["id"] == e["record0"]["id"] {
                let first: Vec<f64> = e["record0"]["image_embeds"]["first16"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                for (g, w) in values.iter().zip(&first) {
                    assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name} record0: {g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn qwen2_5_vl_windows_are_transformers_windows() {
    let e = &expected()["models"]["tiny-qwen2.5-vl"];
    let r0 = &e["record0"];
    let rec = e["records"].as_array().unwrap().iter().find(|r| r["id"] == r0["id"]).unwrap();
    let [t, h, w]: [usize; 3] = usizes(&rec["image_grid_thw"]).try_into().unwrap();
    let side = e["window_size"].as_u64().unwrap() as usize / 28;
    let (order, sizes) = ladle_models::qwen2_vl::vision::window_order(t, h / 2, w / 2, side);
    assert_eq!(order, usizes(&r0["window_index"]));
    // cu_window_seqlens counts patches (4 per merged token), from 0.
    let mut cu = vec![0];
    for s in sizes {
        cu.push(cu.last().unwrap() + 4 * s);
    }
    assert_eq!(cu, usizes(&r0["cu_window_seqlens"]));
}

#[test]
fn every_record_scores_as_transformers_scored_it() {
    let expected = expected();
    let captions: Vec<Value> = std::fs::read_to_string(fixtures().join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let prompt = expected["prompt"].as_str().unwrap();
    for name in MODELS {
        let e = &expected["models"][name];
        let model = ladle_models::qwen2_vl::Qwen2Vl::load(&fixtures().join(name)).unwrap();
        let n_prefix_text = model.prompt_text(prompt, 1).unwrap();
        assert_eq!(n_prefix_text, expected["prompt_text"].as_str().unwrap(), "the template's rendering");
        let mut worst = 0f64;
        for (r, c) in e["records"].as_array().unwrap().iter().zip(&captions) {
            let id = r["id"].as_str().unwrap();
            assert_eq!(c["id"], r["id"]);
            let image = load_rgb(&fixtures().join(r["image"].as_str().unwrap())).unwrap();
            let item = model.prepare(&image, prompt, c["caption"].as_str().unwrap()).unwrap();
            assert_eq!(item.seq.score_from, r["n_prefix"].as_u64().unwrap() as usize, "{name} {id}");
            assert_eq!(
                item.seq.ids.len() - item.seq.score_from,
                r["n_scored"].as_u64().unwrap() as usize,
                "{name} {id}"
            );
            if r["id"] == e["record0"]["id"] {
                let want: Vec<u32> =
                    e["record0"]["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                assert_eq!(item.seq.ids, want, "{name} record0 ids");
            }
            let score = model.score_prepared(&[&item]).unwrap()[0];
            let want = r["mean_nll"].as_f64().unwrap();
            let rel = (score.mean_nll() - want).abs() / want;
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{name} {id}: mean nll {} vs transformers {want}", score.mean_nll());
        }
        eprintln!("{name}: worst relative difference in mean NLL {worst:.2e}");
    }
}

#[test]
fn a_checkpoint_missing_a_vision_tensor_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-qwen2-vl");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(name, _)| name != "visual.merger.mlp.2.weight").collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    let err = match ladle_models::qwen2_vl::Qwen2Vl::load(dir.path()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a checkpoint without the merger's last weight loaded"),
    };
    assert!(err.contains("visual.merger.mlp.2.weight"), "{err}");
}

/// Every record of the fixtures, prepared for `model` with POINTS' prompt.
fn prepared_records(
    model: &ladle_models::qwen2_vl::Qwen2Vl,
    expected: &Value,
) -> Vec<ladle_models::qwen2_vl::PreparedImageRecord> {
    let prompt = expected["prompt"].as_str().unwrap();
    std::fs::read_to_string(fixtures().join("captions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let c: Value = serde_json::from_str(l).unwrap();
            let image = load_rgb(&fixtures().join(c["image"].as_str().unwrap())).unwrap();
            model.prepare(&image, prompt, c["caption"].as_str().unwrap()).unwrap()
        })
        .collect()
}

#[test]
fn a_record_scores_the_same_alone_and_in_a_batch_of_mixed_image_sizes() {
    let expected = expected();
    for name in MODELS {
        let model = ladle_models::qwen2_vl::Qwen2Vl::load(&fixtures().join(name)).unwrap();
        let items = prepared_records(&model, &expected);
        let refs: Vec<_> = items.iter().collect();
        let grids: std::collections::BTreeSet<[usize; 3]> = items.iter().map(|i| i.patches.grid_thw).collect();
        assert!(grids.len() >= 5, "{name}: the fixtures' images should come in several sizes, found {grids:?}");
        // All 42 in one batch (one tower pass over every image), and as the stage plans them.
        let together = model.score_prepared(&refs).unwrap();
        let planned = model.score_all(&refs, 1024).unwrap();
        for (k, item) in items.iter().enumerate() {
            let alone = model.score_prepared(&[item]).unwrap()[0];
            for (how, s) in [("one batch", together[k]), ("planned batches", planned[k])] {
                assert_eq!(s.tokens, alone.tokens, "{name} record {k}");
                let rel = (s.mean_nll() - alone.mean_nll()).abs() / alone.mean_nll();
                assert!(rel < 1e-5, "{name} record {k} ({how}): {} vs {} alone", s.mean_nll(), alone.mean_nll());
            }
        }
    }
}

#[test]
fn images_packed_in_one_tower_pass_or_in_query_blocks_give_the_same_tokens() {
    let expected = expected();
    for name in MODELS {
        let processor = ImageProcessor::load(&fixtures().join(name)).unwrap();
        let mut tower = tower(name);
        let patches: Vec<_> = expected["models"][name]["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| processor.patches(&load_rgb(&fixtures().join(r["image"].as_str().unwrap())).unwrap()).unwrap())
            .collect();
        let refs: Vec<_> = patches.iter().collect();
        let alone: Vec<Vec<f32>> =
            patches.iter().map(|p| tower.forward(p).unwrap().flatten_all().unwrap().to_vec1().unwrap()).collect();
        let packed = tower.forward_many(&refs).unwrap();
        // Two heads × 3 query rows × the image's keys: every image's attention in many blocks.
        tower.set_score_block(2 * 3 * 64);
        let blocked = tower.forward_many(&refs).unwrap();
        for (k, want) in alone.iter().enumerate() {
            for (how, got) in [("packed", &packed[k]), ("packed, blocked", &blocked[k])] {
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got.len(), want.len(), "{name} image {k} {how}");
                let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0f32, f32::max);
                assert!(worst < 1e-5, "{name} image {k} {how}: differs by {worst:e}");
            }
        }
    }
}

/// Each record's greedy caption alone, then all of a model's records as one batch (images of
/// different sizes: prompts of unequal length, left-padded, each with its own M-RoPE positions
/// and `rope_delta`), token for token as transformers wrote them.
#[test]
fn greedy_generations_are_transformers_token_for_token() {
    use ladle_models::llm::generate::{Rng, Sampling};
    let expected = expected();
    let prompt = expected["prompt"].as_str().unwrap();
    for name in MODELS {
        let e = &expected["models"][name];
        let model = ladle_models::qwen2_vl::Qwen2Vl::load(&fixtures().join(name)).unwrap();
        let stop = [model.lm.tokenizer.token_id("<|im_end|>").unwrap()];
        let (mut items, mut wants) = (Vec::new(), Vec::new());
        for g in e["greedy"].as_array().unwrap() {
            let id = g["id"].as_str().unwrap();
            let record = e["records"].as_array().unwrap().iter().find(|r| r["id"] == g["id"]).unwrap();
            let image = load_rgb(&fixtures().join(record["image"].as_str().unwrap())).unwrap();
            let item = model.prepare_prompt(&image, prompt).unwrap();
            let got = model.generate(&[&item], &[16], &stop, &Sampling::GREEDY, &mut [Rng::new(0)]).unwrap().remove(0);
            let want: Vec<u32> =
                g["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(got, want, "{name} {id}: greedy tokens");
            assert_eq!(model.lm.tokenizer.decode(&got, true).unwrap(), g["text"].as_str().unwrap(), "{name} {id}");
            items.push(item);
            wants.push(want);
        }
        let lengths: std::collections::BTreeSet<usize> = items.iter().map(|i| i.seq.ids.len()).collect();
        assert!(lengths.len() > 1, "{name}: the records' prompts must differ in length");
        let refs: Vec<_> = items.iter().collect();
        let mut rngs: Vec<Rng> = items.iter().map(|_| Rng::new(0)).collect();
        let batch = model.generate(&refs, &vec![16; refs.len()], &stop, &Sampling::GREEDY, &mut rngs).unwrap();
        assert_eq!(batch, wants, "{name}: greedy tokens written as one batch");
    }
}

#[test]
fn the_processor_chat_template_renders_when_the_tokenizer_has_none() {
    // transformers' processors save the VLM template in chat_template.json; drop it from
    // tokenizer_config.json and the prompt must render the same.
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-qwen2-vl");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config = dir.path().join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config, v.to_string()).unwrap();
    let expected = expected();
    let model = ladle_models::qwen2_vl::Qwen2Vl::load(dir.path()).unwrap();
    assert_eq!(
        model.prompt_text(expected["prompt"].as_str().unwrap(), 1).unwrap(),
        expected["prompt_text"].as_str().unwrap()
    );
    // Without any template, the error names where it looked.
    std::fs::remove_file(dir.path().join("chat_template.json")).unwrap();
    let model = ladle_models::qwen2_vl::Qwen2Vl::load(dir.path()).unwrap();
    let err = model.prompt_text("x", 1).unwrap_err().to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn bf16_and_f16_on_the_cpu_stay_within_2e_2_of_the_f32_references() {
    use candle_core::{DType, Device};
    let expected = expected();
    for name in MODELS {
        let e = &expected["models"][name];
        for dtype in [DType::BF16, DType::F16] {
            let model = ladle_models::qwen2_vl::Qwen2Vl::load_on(&fixtures().join(name), &Device::Cpu, dtype).unwrap();
            let items = prepared_records(&model, &expected);
            let refs: Vec<_> = items.iter().collect();
            let scores = model.score_all(&refs, 4096).unwrap();
            let mut worst = 0f64;
            for (s, r) in scores.iter().zip(e["records"].as_array().unwrap()) {
                let want = r["mean_nll"].as_f64().unwrap();
                let rel = (s.mean_nll() - want).abs() / want;
                worst = worst.max(rel);
                assert!(rel < 2e-2, "{name} {dtype:?} {}: {} vs {want}", r["id"], s.mean_nll());
            }
            eprintln!("{name} {dtype:?}: worst relative difference in mean NLL {worst:.2e}");
        }
    }
}
