//! An ingredient's weights: its safetensors files (one, or a sharded set with
//! `model.safetensors.index.json`), memory-mapped, with each tensor's dtype, shape and bytes.
//!
//! Nothing is read until asked for: averaging walks tensor by tensor, so a soup of four 2 GB
//! checkpoints touches each page once and holds a few tensors, never a whole model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::llm::weights;

/// Why an ingredient cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

/// Where one tensor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Which file of the checkpoint, and the byte range in it.
    pub file: usize,
    pub start: usize,
    pub end: usize,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let files =
            weights::files(dir).map_err(|e| CheckpointError { path: dir.to_path_buf(), message: e.to_string() })?;
        let mut maps = Vec::new();
        let mut tensors = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let err = |message: String| CheckpointError { path: path.clone(), message };
            let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
            // SAFETY: the store's files are read-only and external model folders are not
            // expected to change under a run; a digest check precedes every use of a model.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(format!("cannot map it: {e}")))?;
            let (header, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
            let base = 8 + header;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if base + end > map.len() {
                    return Err(err(format!("tensor `{name}` runs past the end of the file (truncated?)")));
                }
                let t = TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    file: i,
                    start: base + start,
                    end: base + end,
                };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(err(format!("tensor `{name}` is in two files of the checkpoint")));
                }
            }
            maps.push(map);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, maps, tensors })
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.maps[t.file][t.start..t.end]
    }

    /// The file that holds `name`, for error messages.
    pub fn file_of(&self, name: &str) -> &Path {
        self.tensors.get(name).map(|t| self.files[t.file].as_path()).unwrap_or(&self.dir)
    }

    /// Tells the kernel the pages of `t` will not be read again, so averaging big checkpoints
    /// does not keep them all resident (they stay in the page cache, not in our memory).
    pub fn release(&self, t: &TensorInfo) {
        let map = &self.maps[t.file];
        let page = 4096;
        let start = t.start / page * page;
        let len = t.end - start;
        // SAFETY: the range lies inside the mapping; the mapping is read-only and private, so
        // dropping its pages only means they are read again from the file if touched.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
}

/// Checks that all ingredients have the same tensors with the same dtypes and shapes; the error
/// names the tensor and the two files.
pub fn check_compatible(ingredients: &[&Checkpoint]) -> Result<(), CheckpointError> {
    let Some(first) = ingredients.first() else { return Ok(()) };
    for other in &ingredients[1..] {
        for (name, t) in &first.tensors {
            match other.tensors.get(name) {
                None => {
                    return Err(CheckpointError {
                        path: other.dir.clone(),
                        message: format!(
                            "has no tensor `{name}`, which {} has: the ingredients are not the same architecture",
                            first.file_of(name).display()
                        ),
                    });
                }
                Some(o) if o.shape != t.shape || o.dtype != t.dtype => {
                    return Err(CheckpointError {
                        path: other.file_of(name).to_path_buf(),
                        message: format!(
                            "tensor `{name}` is {:?} {:?} here but {:?} {:?} in {}: the ingredients are not the same architecture",
                            o.dtype,
                            o.shape,
                            t.dtype,
                            t.shape,
                            first.file_of(name).display()
                        ),
                    });
                }
                _ => {}
            }
        }
        if let Some(extra) = other.tensors.keys().find(|n| !first.tensors.contains_key(*n)) {
            return Err(CheckpointError {
                path: other.file_of(extra).to_path_buf(),
                message: format!(
                    "has tensor `{extra}`, which {} lacks: the ingredients are not the same architecture",
                    first.dir.display()
                ),
            });
        }
    }
    Ok(())
}
