//! The weighted mean of checkpoints, streamed tensor by tensor.
//!
//! Each output element is Σ wᵢ·xᵢ / Σ wᵢ accumulated in f64 (the uniform soup is the plain mean,
//! as `torch.stack(...).double().mean(0)` computes it), then cast to the ingredients' dtype with
//! round-to-nearest-even: f32 directly, f16 and bf16 through f32 (PyTorch's own conversion path).
//! Tensors are processed in chunks of [`CHUNK`] elements, written as they are computed, and their
//! pages released, so memory holds a few chunks whatever the checkpoints' size. Integer tensors
//! (buffers such as position ids) must be equal in every ingredient and are copied.
//!
//! A NaN or infinite value in an ingredient is an error naming the tensor and the file: a
//! diverged run would otherwise poison the soup silently.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::checkpoint::{Checkpoint, CheckpointError, TensorInfo};

/// Elements averaged at a time.
pub const CHUNK: usize = 1 << 20;

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Adds `w · x` for the elements `range` of a tensor to `acc`; says where a value is not finite.
fn accumulate(dtype: Dtype, bytes: &[u8], range: std::ops::Range<usize>, w: f64, acc: &mut [f64]) -> Result<(), usize> {
    macro_rules! add {
        ($size:expr, $conv:expr) => {{
            let data = &bytes[range.start * $size..range.end * $size];
            for (i, (a, c)) in acc.iter_mut().zip(data.chunks_exact($size)).enumerate() {
                let v: f64 = $conv(c);
                if !v.is_finite() {
                    return Err(range.start + i);
                }
                *a += w * v;
            }
        }};
    }
    match dtype {
        Dtype::F32 => add!(4, |c: &[u8]| f32::from_le_bytes(c.try_into().unwrap()) as f64),
        Dtype::F64 => add!(8, |c: &[u8]| f64::from_le_bytes(c.try_into().unwrap())),
        Dtype::F16 => add!(2, |c: &[u8]| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64()),
        Dtype::BF16 => add!(2, |c: &[u8]| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64()),
        _ => unreachable!("only float tensors are averaged"),
    }
    Ok(())
}

/// Appends `v` cast to `dtype` (round-to-nearest-even) to `out`.
fn push_cast(dtype: Dtype, v: f64, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => out.extend((v as f32).to_le_bytes()),
        Dtype::F64 => out.extend(v.to_le_bytes()),
        Dtype::F16 => out.extend(half::f16::from_f32(v as f32).to_le_bytes()),
        Dtype::BF16 => out.extend(half::bf16::from_f32(v as f32).to_le_bytes()),
        _ => unreachable!("only float tensors are averaged"),
    }
}

/// The weighted mean of tensor `name` over `ingredients`, handed to `emit` chunk by chunk as
/// bytes of the ingredients' dtype.
pub fn average_tensor(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    name: &str,
    emit: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), CheckpointError> {
    let infos: Vec<&TensorInfo> = ingredients
        .iter()
        .map(|c| {
            c.tensors
                .get(name)
                .ok_or_else(|| CheckpointError { path: c.dir.clone(), message: format!("has no tensor `{name}`") })
        })
        .collect::<Result<_, _>>()?;
    let t = infos[0];
    let write_err = |e: std::io::Error| CheckpointError {
        path: PathBuf::from(name),
        message: format!("cannot write the soup: {e}"),
    };
    if !is_float(t.dtype) {
        let first = ingredients[0].bytes(t);
        for (c, info) in ingredients.iter().zip(&infos).skip(1) {
            if c.bytes(info) != first {
                return Err(CheckpointError {
                    path: c.file_of(name).to_path_buf(),
                    message: format!(
                        "integer tensor `{name}` differs from {}'s; integer tensors cannot be averaged",
                        ingredients[0].dir.display()
                    ),
                });
            }
        }
        return emit(first).map_err(write_err);
    }
    let n: usize = t.shape.iter().product();
    let total: f64 = weights.iter().sum();
    let mut acc = vec![0f64; CHUNK.min(n)];
    let mut out = Vec::with_capacity(CHUNK.min(n) * 8);
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        let acc = &mut acc[..end - start];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for ((c, info), &w) in ingredients.iter().zip(&infos).zip(weights) {
            accumulate(info.dtype, c.bytes(info), start..end, w, acc).map_err(|at| CheckpointError {
                path: c.file_of(name).to_path_buf(),
                message: format!(
                    "tensor `{name}` has a NaN or infinite value (element {at}): the run that made it diverged; leave it out of the soup"
                ),
            })?;
        }
        out.clear();
        for &a in acc.iter() {
            push_cast(t.dtype, a / total, &mut out);
        }
        emit(&out).map_err(write_err)?;
        start = end;
    }
    for (c, info) in ingredients.iter().zip(&infos) {
        c.release(info);
    }
    Ok(())
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// Writes the soup of `ingredients` to `dir` as `model.safetensors`, or as shards of at most
/// `max_shard_bytes` with `model.safetensors.index.json`. `metadata` goes into every file's
/// `__metadata__`. Returns the files written.
pub fn write_soup(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    dir: &Path,
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let io = |path: &Path, e: std::io::Error| CheckpointError { path: path.to_path_buf(), message: e.to_string() };
    let tensors = &ingredients[0].tensors;
    // Shards: tensors in name order, a new shard when the next would pass the limit.
    let mut shards: Vec<Vec<(&String, &TensorInfo)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in tensors {
        let bytes = (t.end - t.start) as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push((name, t));
        size += bytes;
    }
    let count = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let path = dir.join(&file_name);
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, t) in shard {
            let len = t.end - t.start;
            header.insert(
                (*name).clone(),
                serde_json::json!({ "dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [offset, offset + len] }),
            );
            offset += len;
            weight_map.insert((*name).clone(), file_name.clone().into());
        }
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
        let mut json = serde_json::to_vec(&header).expect("a header serializes");
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
        w.write_all(&(json.len() as u64).to_le_bytes()).and_then(|_| w.write_all(&json)).map_err(|e| io(&path, e))?;
        for (name, _) in shard {
            average_tensor(ingredients, weights, name, &mut |bytes| w.write_all(bytes))?;
        }
        w.into_inner().map_err(|e| io(&path, e.into_error()))?.sync_all().map_err(|e| io(&path, e))?;
        written.push(path);
    }
    if count > 1 {
        let total: usize = tensors.values().map(|t| t.end - t.start).sum();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&index).expect("an index serializes"))
            .map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// The soup as f32 tensors in memory (values cast to the ingredients' dtype first, so a
/// candidate is scored exactly as it would be written), for evaluating candidates without
/// writing them.
pub fn soup_tensors(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    device: &candle_core::Device,
) -> Result<HashMap<String, candle_core::Tensor>, CheckpointError> {
    let mut out = HashMap::new();
    for (name, t) in &ingredients[0].tensors {
        let mut bytes = Vec::with_capacity(t.end - t.start);
        average_tensor(ingredients, weights, name, &mut |b| {
            bytes.extend_from_slice(b);
            Ok(())
        })?;
        let values: Vec<f32> = match t.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            Dtype::F16 => {
                bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect()
            }
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect()
            }
            _ => continue, // integer buffers are not weights the decoder reads
        };
        let tensor = candle_core::Tensor::from_vec(values, t.shape.as_slice(), device)
            .map_err(|e| CheckpointError { path: PathBuf::from(name), message: crate::llm::candle_message(&e) })?;
        out.insert(name.clone(), tensor);
    }
    Ok(out)
}
