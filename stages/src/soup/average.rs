//! The weighted mean of checkpoints, streamed tensor by tensor.
//!
//! Each output element is Σ wᵢ·xᵢ / Σ wᵢ accumulated in f64 (the uniform soup is the plain mean,
//! as `torch.stack(...).double().mean(0)` computes it), then cast to the ingredients' dtype with
//! round-to-nearest-even: f32 directly, f16 and bf16 through f32 (PyTorch's own conversion path).
//! Tensors are processed in steps of [`CHUNK`] elements, split across threads, written as they are
//! computed, and their pages released, so memory holds a step whatever the checkpoints' size. Integer tensors
//! (buffers such as position ids) must be equal in every ingredient and are copied.
//!
//! A NaN or infinite value in an ingredient is an error naming the tensor and the file: a
//! diverged run would otherwise poison the soup silently.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;

use super::checkpoint::{Checkpoint, CheckpointError, TensorInfo};

/// Elements averaged per step: memory holds this many output elements (and their f64 sums).
pub const CHUNK: usize = 1 << 22;

/// Elements per parallel task within a step.
const TASK: usize = 1 << 15;

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// bf16 bits widened to f32 (bf16 is the top half of an f32).
#[inline(always)]
fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round-to-nearest-even (finite inputs: the soup checks for NaN first).
#[inline(always)]
fn f32_to_bf16_bits(f: f32) -> u16 {
    let bits = f.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Adds `w · x` for the elements `start..start + acc.len()` of a tensor (raw little-endian bytes
/// of `dtype`) to `acc`. Non-finite inputs make non-finite sums, which the caller checks once.
fn accumulate(dtype: Dtype, bytes: &[u8], start: usize, w: f64, acc: &mut [f64], first: bool) {
    let len = acc.len();
    if first && dtype != Dtype::BF16 {
        acc.iter_mut().for_each(|a| *a = 0.0);
    }
    match dtype {
        // The first ingredient sets the sums: no separate pass of zeroing.
        Dtype::BF16 if first => set_bf16(&bytes[start * 2..(start + len) * 2], w, acc),
        Dtype::BF16 => add_bf16(&bytes[start * 2..(start + len) * 2], w, acc),
        Dtype::F32 => add_f32(&bytes[start * 4..(start + len) * 4], w, acc),
        Dtype::F16 => {
            for (a, c) in acc.iter_mut().zip(bytes[start * 2..(start + len) * 2].chunks_exact(2)) {
                *a += w * half::f16::from_le_bytes([c[0], c[1]]).to_f64();
            }
        }
        Dtype::F64 => {
            for (a, c) in acc.iter_mut().zip(bytes[start * 8..(start + len) * 8].chunks_exact(8)) {
                *a += w * f64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        _ => unreachable!("only float tensors are averaged"),
    }
}

crate::kernels::with_best_simd!(add_bf16, (data: &[u8], w: f64, acc: &mut [f64]), {
    for (a, c) in acc.iter_mut().zip(data.chunks_exact(2)) {
        *a += w * bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])) as f64;
    }
});

crate::kernels::with_best_simd!(set_bf16, (data: &[u8], w: f64, acc: &mut [f64]), {
    for (a, c) in acc.iter_mut().zip(data.chunks_exact(2)) {
        *a = w * bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])) as f64;
    }
});

crate::kernels::with_best_simd!(all_finite_into, (acc: &[f64], ok: &mut bool), {
    *ok = acc.iter().fold(true, |ok, a| ok & a.is_finite());
});

crate::kernels::with_best_simd!(add_f32, (data: &[u8], w: f64, acc: &mut [f64]), {
    for (a, c) in acc.iter_mut().zip(data.chunks_exact(4)) {
        *a += w * f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
    }
});

crate::kernels::with_best_simd!(cast_bf16, (acc: &[f64], inv: f64, out: &mut [u8]), {
    for (o, a) in out.chunks_exact_mut(2).zip(acc) {
        o.copy_from_slice(&f32_to_bf16_bits((a * inv) as f32).to_le_bytes());
    }
});

/// The first element of `start..start + len` where an ingredient's value is not finite.
fn first_non_finite(dtype: Dtype, bytes: &[u8], start: usize, len: usize) -> Option<usize> {
    let size = dtype.bitsize() / 8;
    bytes[start * size..(start + len) * size]
        .chunks_exact(size)
        .position(|c| match dtype {
            Dtype::BF16 => !bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])).is_finite(),
            Dtype::F16 => !half::f16::from_le_bytes([c[0], c[1]]).is_finite(),
            Dtype::F32 => !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite(),
            _ => !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite(),
        })
        .map(|at| start + at)
}

/// Writes `acc[i] / total` cast to `dtype` (round-to-nearest-even) into `out`.
fn cast_into(dtype: Dtype, acc: &[f64], total: f64, out: &mut [u8]) {
    match dtype {
        Dtype::BF16 if total.log2().fract() == 0.0 => cast_bf16(acc, 1.0 / total, out),
        Dtype::BF16 => out
            .chunks_exact_mut(2)
            .zip(acc)
            .for_each(|(o, a)| o.copy_from_slice(&f32_to_bf16_bits((a / total) as f32).to_le_bytes())),
        Dtype::F32 => {
            out.chunks_exact_mut(4).zip(acc).for_each(|(o, a)| o.copy_from_slice(&((a / total) as f32).to_le_bytes()))
        }
        Dtype::F64 => out.chunks_exact_mut(8).zip(acc).for_each(|(o, a)| o.copy_from_slice(&(a / total).to_le_bytes())),
        Dtype::F16 => out
            .chunks_exact_mut(2)
            .zip(acc)
            .for_each(|(o, a)| o.copy_from_slice(&half::f16::from_f32((a / total) as f32).to_le_bytes())),
        _ => unreachable!("only float tensors are averaged"),
    }
}

/// The weighted mean of tensor `name` over `ingredients`, handed to `emit` chunk by chunk as
/// bytes of the ingredients' dtype.
pub fn average_tensor(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    name: &str,
    emit: &mut dyn FnMut(Vec<u8>) -> std::io::Result<()>,
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
        return emit(first.to_vec()).map_err(write_err);
    }
    let n: usize = t.shape.iter().product();
    let total: f64 = weights.iter().sum();
    let size = t.dtype.bitsize() / 8;
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        // A fresh buffer per step: the writer may still hold the previous one.
        let mut out = vec![0u8; (end - start) * size];
        // Tasks of TASK elements across threads; each sums every ingredient into its own f64s.
        let failed = out
            .par_chunks_mut(TASK * size)
            .enumerate()
            .map_init(Vec::new, |acc: &mut Vec<f64>, (k, dst)| -> Result<(), (usize, usize)> {
                let from = start + k * TASK;
                acc.resize(dst.len() / size, 0.0);
                for (i, ((c, info), &w)) in ingredients.iter().zip(&infos).zip(weights).enumerate() {
                    accumulate(info.dtype, c.bytes(info), from, w, acc, i == 0);
                }
                let mut finite = true;
                all_finite_into(acc, &mut finite);
                if !finite {
                    for (i, (c, info)) in ingredients.iter().zip(&infos).enumerate() {
                        if let Some(at) = first_non_finite(info.dtype, c.bytes(info), from, acc.len()) {
                            return Err((i, at));
                        }
                    }
                }
                cast_into(t.dtype, acc, total, dst);
                Ok(())
            })
            .find_first(|r| r.is_err());
        if let Some(Err((i, at))) = failed {
            return Err(CheckpointError {
                path: ingredients[i].file_of(name).to_path_buf(),
                message: format!(
                    "tensor `{name}` has a NaN or infinite value (element {at}): the run that made it diverged; leave it out of the soup"
                ),
            });
        }
        emit(out).map_err(write_err)?;
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
        let dtypes: Vec<String> = shard.iter().map(|(_, t)| dtype_name(t.dtype)).collect();
        let entries: Vec<crate::tensors::StreamedTensor<'_>> = shard
            .iter()
            .zip(&dtypes)
            .map(|((name, t), dtype)| crate::tensors::StreamedTensor {
                name,
                dtype,
                shape: t.shape.clone(),
                bytes: t.end - t.start,
            })
            .collect();
        for (name, _) in shard {
            weight_map.insert((*name).clone(), file_name.clone().into());
        }
        let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
        w.write_all(&crate::tensors::streamed_header(&entries, metadata)).map_err(|e| io(&path, e))?;
        // A writer thread takes finished steps while the next ones are computed.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        std::thread::scope(|scope| -> Result<(), CheckpointError> {
            let writer = scope.spawn(move || -> std::io::Result<std::fs::File> {
                for bytes in rx {
                    w.write_all(&bytes)?;
                }
                w.into_inner().map_err(|e| e.into_error())
            });
            let mut averaged = Ok(());
            for (name, _) in shard {
                averaged = average_tensor(ingredients, weights, name, &mut |bytes| {
                    tx.send(bytes).map_err(|_| std::io::Error::other("the writer stopped"))
                });
                if averaged.is_err() {
                    break;
                }
            }
            drop(tx);
            let file = writer.join().map_err(|_| io(&path, std::io::Error::other("the writer panicked")))?;
            averaged?;
            file.map_err(|e| io(&path, e))?.sync_all().map_err(|e| io(&path, e))
        })?;
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
            bytes.extend_from_slice(&b);
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
