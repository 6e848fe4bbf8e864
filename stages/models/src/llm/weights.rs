//! Weights from one `.safetensors` file or a sharded set with `model.safetensors.index.json`,
//! memory-mapped, stored as f32, f16 or bf16 and read in the dtype and onto the device the stage
//! computes with (see [`crate::device`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::ModelError;

/// The safetensors files of a model folder.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ModelError::Weights { path: index.clone(), message: e.to_string() })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Weights { path: index.clone(), message: format!("invalid JSON: {e}") })?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| ModelError::Weights { path: index.clone(), message: "no `weight_map` object".into() })?;
        let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::Weights {
                path: missing.clone(),
                message: "a shard listed in model.safetensors.index.json is missing".into(),
            });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::Weights {
        path: dir.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json in the model folder".into(),
    })
}

/// A memory-mapped view of the folder's weights, each read as `dtype` onto `device` when asked for.
pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<VarBuilder<'static>, ModelError> {
    let files = files(dir)?;
    for f in &files {
        // Check the header ourselves (mapped, so only its pages are read): a truncated or foreign
        // file gets an error naming it.
        let file =
            std::fs::File::open(f).map_err(|e| ModelError::Weights { path: f.clone(), message: e.to_string() })?;
        // SAFETY: read-only mapping of a file nothing writes while the stage runs.
        let bytes = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| ModelError::Weights { path: f.clone(), message: e.to_string() })?;
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Weights {
            path: f.clone(),
            message: format!("not a readable safetensors file ({e}); it may be truncated"),
        })?;
    }
    // SAFETY: the files are only read; the store and model folders are not modified while a
    // stage runs (a model's digest is checked before the run).
    unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| ModelError::Weights { path: dir.to_path_buf(), message: e.to_string() })
}

/// Turns a candle error met while building the model into one that names the folder.
pub fn explain(dir: &Path, e: candle_core::Error) -> ModelError {
    ModelError::Weights {
        path: dir.to_path_buf(),
        message: format!("the weights do not match config.json: {}", super::candle_message(&e)),
    }
}
