//! The CLIP vision tower against transformers' CLIPVisionModel (the tiny LLaVA's tower), fed the
//! same pixel values: tests/fixtures/points-tiny/clip_hidden.safetensors, made by
//! tests/fixtures/gen_clip_hidden.py.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ladle_models::vision::clip::{ClipVisionConfig, ClipVisionTower};
use serde_json::Value;

fn floats(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn hidden_states_of_every_layer_match_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/points-tiny");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("tiny-llava/config.json")).unwrap()).unwrap();
    let cfg = ClipVisionConfig::from_json(&config["vision_config"]).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[root.join("tiny-llava/model.safetensors")], DType::F32, &Device::Cpu)
    }
    .unwrap();
    let tower = ClipVisionTower::new(&cfg, vb.pp("vision_tower.vision_model")).unwrap();
    let pixel_bytes = std::fs::read(root.join("clip_pixels.safetensors")).unwrap();
    let pixels = safetensors::SafeTensors::deserialize(&pixel_bytes).unwrap();
    let ref_bytes = std::fs::read(root.join("clip_hidden.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&ref_bytes).unwrap();
    let s = cfg.image_size;
    let mut worst: f32 = 0.0;
    for id in ["r000", "r001", "r003", "r007"] {
        let px = Tensor::from_vec(floats(&pixels, id), (1, 3, s, s), &Device::Cpu).unwrap();
        let states = tower.hidden_states(&px).unwrap();
        assert_eq!(states.len(), cfg.num_layers + 1);
        for (k, h) in states.iter().enumerate() {
            let got = h.squeeze(0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = floats(&reference, &format!("{id}.hidden.{k}"));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((g - w).abs());
                assert!((g - w).abs() < 1e-4, "{id} hidden state {k}: {g} vs {w}");
            }
        }
        let pooled = tower.pooled(states.last().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in pooled.iter().zip(floats(&reference, &format!("{id}.pooled"))) {
            assert!((g - w).abs() < 1e-4, "{id} pooled: {g} vs {w}");
        }
    }
    eprintln!("worst absolute difference over all hidden states: {worst:e}");
}
