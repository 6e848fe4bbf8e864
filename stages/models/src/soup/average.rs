//! The weighted mean of checkpoints, streamed tensor by tensor.
//!
//! Each output element is Σ wᵢ·xᵢ / Σ wᵢ accumulated in f64 (the uniform soup is the plain mean,
//! as `torch.stack(...).double().mean(0)` computes it), then cast to the ingredients' dtype with
//! round-to-nearest-even: f32 directly, f16 and bf16 through f32 (PyTorch's own conversion path).
//! Tensors are processed in steps of [`CHUNK`] elements, split across threads, written as they are
//! computed, and their pages released, so memory holds a step whatever the checkpoints' size.
//! Integer tensors (buffers such as position ids) must be equal in every ingredient and are copied.
//!
//! The averager should run at the speed the inputs can be read; what it took (each measured on
//! `benches/soup_vs_torch.py`): sums in blocks that stay in L1 while every ingredient is added,
//! inputs prefetched a block ahead (mapped page-cache pages are not physically contiguous, so the
//! hardware prefetcher stops at each 4 KB page), and a few step buffers handed back and forth
//! with the writer thread rather than fresh ones, whose pages the kernel would fault in and zero.
//!
//! A NaN or infinite value in an ingredient is an error naming the tensor and the file: a
//! diverged run would otherwise poison the soup silently.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;

use super::checkpoint::{Checkpoint, CheckpointError, TensorInfo};

/// Elements averaged per step: memory holds a few steps of output.
pub const CHUNK: usize = 1 << 22;

/// Elements per parallel task within a step.
const TASK: usize = 1 << 15;

/// Elements summed at a time within a task: their f64 sums (4 KB) stay in L1.
const BLOCK: usize = 512;

/// How far ahead of the block being summed its inputs are fetched, in elements.
const PREFETCH: usize = 2 * BLOCK;

/// Asks the CPU to start loading `bytes[at..at + len]` into cache (a hint; out-of-range is
/// clipped). The inputs are page-cache pages mapped in no particular physical order, so the
/// hardware prefetcher stops at every 4 KB page; this keeps the loads ahead of the sums.
#[inline(always)]
fn prefetch(bytes: &[u8], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = (at + len).min(bytes.len());
        let mut p = at;
        while p < end {
            // SAFETY: `p` is in bounds of `bytes`; prefetching has no other effect.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(bytes.as_ptr().add(p).cast())
            };
            p += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at, len);
}

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

/// Where the averaged steps of a tensor go, and where the buffers they are computed in come from.
pub trait Steps {
    /// A buffer of `len` bytes for the next step; its contents are overwritten.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        vec![0; len]
    }
    /// Takes one finished step: bytes of the ingredients' dtype, in order.
    fn emit(&mut self, step: Vec<u8>) -> std::io::Result<()>;
}

/// Steps appended to one buffer in memory.
impl Steps for Vec<u8> {
    fn emit(&mut self, step: Vec<u8>) -> std::io::Result<()> {
        self.extend_from_slice(&step);
        Ok(())
    }
}

/// Steps sent to a writer thread, which hands each buffer back once written: a soup reuses a
/// few buffers instead of faulting in fresh pages for every step.
struct ToWriter {
    to_writer: std::sync::mpsc::SyncSender<Vec<u8>>,
    returned: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Steps for ToWriter {
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.returned.try_recv() {
            Ok(mut buf) => {
                buf.resize(len, 0);
                buf
            }
            Err(_) => vec![0; len],
        }
    }

    fn emit(&mut self, step: Vec<u8>) -> std::io::Result<()> {
        self.to_writer.send(step).map_err(|_| std::io::Error::other("the writer stopped"))
    }
}

/// The weighted mean of tensor `name` over `ingredients`, handed to `steps` chunk by chunk as
/// bytes of the ingredients' dtype.
pub fn average_tensor(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    name: &str,
    steps: &mut dyn Steps,
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
        let mut step = steps.buffer(first.len());
        step.copy_from_slice(first);
        return steps.emit(step).map_err(write_err);
    }
    let n: usize = t.shape.iter().product();
    let total: f64 = weights.iter().sum();
    let size = t.dtype.bitsize() / 8;
    let mut start = 0;
    while start < n {
        let end = (start + CHUNK).min(n);
        // A buffer per step: the writer may still hold the previous one.
        let mut out = steps.buffer((end - start) * size);
        // Tasks of TASK elements across threads; each sums every ingredient into its own f64s.
        let failed = out
            .par_chunks_mut(TASK * size)
            .enumerate()
            .map(|(k, dst)| -> Result<(), (usize, usize)> {
                // Blocks small enough that the sums stay in L1 while every ingredient is added.
                let mut sums = [0f64; BLOCK];
                for (b, dst) in dst.chunks_mut(BLOCK * size).enumerate() {
                    let from = start + k * TASK + b * BLOCK;
                    let acc = &mut sums[..dst.len() / size];
                    for (c, info) in ingredients.iter().zip(&infos) {
                        prefetch(c.bytes(info), (from + PREFETCH) * size, BLOCK * size);
                    }
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
                }
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
        steps.emit(out).map_err(write_err)?;
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
        let entries: Vec<crate::safetensors_header::StreamedTensor<'_>> = shard
            .iter()
            .zip(&dtypes)
            .map(|((name, t), dtype)| crate::safetensors_header::StreamedTensor {
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
        w.write_all(&crate::safetensors_header::streamed_header(&entries, metadata)).map_err(|e| io(&path, e))?;
        // A writer thread takes finished steps while the next ones are computed.
        let (to_writer, steps) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
        let (give_back, returned) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::scope(|scope| -> Result<(), CheckpointError> {
            let writer = scope.spawn(move || -> std::io::Result<std::fs::File> {
                for bytes in steps {
                    w.write_all(&bytes)?;
                    let _ = give_back.send(bytes);
                }
                w.into_inner().map_err(|e| e.into_error())
            });
            let mut sink = ToWriter { to_writer, returned };
            let mut averaged = Ok(());
            for (name, _) in shard {
                averaged = average_tensor(ingredients, weights, name, &mut sink);
                if averaged.is_err() {
                    break;
                }
            }
            drop(sink);
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

/// The soup's tensors on `device`, each in the ingredients' dtype and equal, bit for bit, to
/// what [`write_soup`] writes, for evaluating a candidate without writing it. They stay in the
/// checkpoints' dtype: a 7B bf16 soup holds 15 GB, not the 30 of f32.
///
/// On the CPU the streaming averager computes each tensor. On a GPU each ingredient's tensor
/// goes up as it is stored and the sum is taken there ([`average_on_device`]), so only the
/// ingredients' bytes cross the bus, once, and the CPU does not average. Integer buffers are
/// left out: they are not weights a decoder reads.
pub fn soup_tensors(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    device: &candle_core::Device,
) -> Result<HashMap<String, candle_core::Tensor>, CheckpointError> {
    let mut out = HashMap::new();
    for (name, t) in &ingredients[0].tensors {
        let Some(dtype) = candle_dtype(t.dtype) else { continue };
        let on_device = if device.is_cpu() { None } else { average_on_device(ingredients, weights, name, device)? };
        let tensor = match on_device {
            Some(tensor) => tensor,
            None => {
                let mut bytes = Vec::with_capacity(t.end - t.start);
                average_tensor(ingredients, weights, name, &mut bytes)?;
                candle_core::Tensor::from_raw_buffer(&bytes, dtype, &t.shape, device)
                    .map_err(|e| candle_error(name, e))?
            }
        };
        out.insert(name.clone(), tensor);
    }
    Ok(out)
}

/// The candle dtype of a float safetensors dtype.
fn candle_dtype(d: Dtype) -> Option<candle_core::DType> {
    match d {
        Dtype::BF16 => Some(candle_core::DType::BF16),
        Dtype::F16 => Some(candle_core::DType::F16),
        Dtype::F32 => Some(candle_core::DType::F32),
        Dtype::F64 => Some(candle_core::DType::F64),
        _ => None,
    }
}

fn candle_error(name: &str, e: candle_core::Error) -> CheckpointError {
    CheckpointError { path: PathBuf::from(name), message: crate::llm::candle_message(&e) }
}

/// Float tensor `name`'s weighted mean computed on `device` in the averager's arithmetic, so
/// its bits are the averager's: each ingredient widened to f64 and multiplied by its weight,
/// the products summed in ingredient order (the first sets the sum where the averager's does,
/// `0 + w·x` otherwise, which keeps the sign of a zero as it does), divided by Σ w, rounded to
/// f32 and from there to the dtype. `None` when a value is not finite: the averager, which
/// names the element and the file, reports it.
pub fn average_on_device(
    ingredients: &[&Checkpoint],
    weights: &[f64],
    name: &str,
    device: &candle_core::Device,
) -> Result<Option<candle_core::Tensor>, CheckpointError> {
    use candle_core::{DType, Tensor};
    let err = |e| candle_error(name, e);
    let mut sum: Option<Tensor> = None;
    let mut out_dtype = None;
    for (c, &w) in ingredients.iter().zip(weights) {
        let info = c
            .tensors
            .get(name)
            .ok_or_else(|| CheckpointError { path: c.dir.clone(), message: format!("has no tensor `{name}`") })?;
        let Some(dtype) = candle_dtype(info.dtype) else {
            return Err(CheckpointError {
                path: c.file_of(name).to_path_buf(),
                message: format!("tensor `{name}` is not a float tensor here"),
            });
        };
        let x = Tensor::from_raw_buffer(c.bytes(info), dtype, &info.shape, device).map_err(err)?;
        c.release(info);
        let w = Tensor::new(w, device).map_err(err)?;
        let term = x.to_dtype(DType::F64).and_then(|x| x.broadcast_mul(&w)).map_err(err)?;
        sum = Some(match sum {
            Some(sum) => (sum + term).map_err(err)?,
            None if info.dtype == Dtype::BF16 => term,
            None => term.broadcast_add(&Tensor::new(0f64, device).map_err(err)?).map_err(err)?,
        });
        out_dtype.get_or_insert(dtype);
    }
    let (Some(sum), Some(dtype)) = (sum, out_dtype) else { return Ok(None) };
    let finite = sum.sum_all().and_then(|s| s.to_scalar::<f64>()).map_err(err)?.is_finite();
    if !finite {
        return Ok(None);
    }
    let total = Tensor::new(weights.iter().sum::<f64>(), device).map_err(err)?;
    let mean = sum.broadcast_div(&total).map_err(err)?;
    let mean = match dtype {
        DType::F64 => mean,
        DType::F32 => mean.to_dtype(DType::F32).map_err(err)?,
        other => mean.to_dtype(DType::F32).and_then(|m| m.to_dtype(other)).map_err(err)?,
    };
    Ok(Some(mean))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// Elements enough to cross every boundary of the averager: steps, tasks and blocks, with a
    /// ragged end.
    const N: usize = CHUNK + TASK + BLOCK + 3;

    fn checkpoint(dir: &Path, dtype: Dtype, values: &[f64]) -> Checkpoint {
        std::fs::create_dir_all(dir).unwrap();
        let bytes: Vec<u8> = match dtype {
            Dtype::BF16 => values.iter().flat_map(|&v| half::bf16::from_f64(v).to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f64(v).to_le_bytes()).collect(),
            Dtype::F32 => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
            _ => unreachable!(),
        };
        let view = TensorView::new(dtype, vec![values.len()], &bytes).unwrap();
        safetensors::serialize_to_file([("w", view)], None, &dir.join("model.safetensors")).unwrap();
        Checkpoint::open(dir).unwrap()
    }

    /// A value per element and ingredient spread over many binades, so sums round.
    fn value(i: usize, k: usize) -> f64 {
        let x = ((i * 2654435761 + k * 40503) % 1000003) as f64 / 1000003.0 - 0.5;
        x * 2f64.powi((i % 17) as i32 - 8)
    }

    /// The reference: Σ wᵢ·xᵢ in f64 in ingredient order, divided by Σ w, to f32, then to the
    /// dtype with the `half` crate's round-to-nearest-even.
    fn reference(dtype: Dtype, inputs: &[Vec<u8>], weights: &[f64], i: usize) -> Vec<u8> {
        let x = |k: usize| -> f64 {
            let b = &inputs[k];
            match dtype {
                Dtype::BF16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
                Dtype::F16 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
                _ => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as f64,
            }
        };
        let sum = (0..inputs.len()).fold(0.0, |s, k| s + weights[k] * x(k));
        let mean = (sum / weights.iter().sum::<f64>()) as f32;
        match dtype {
            Dtype::BF16 => half::bf16::from_f32(mean).to_le_bytes().to_vec(),
            Dtype::F16 => half::f16::from_f32(mean).to_le_bytes().to_vec(),
            _ => mean.to_le_bytes().to_vec(),
        }
    }

    #[test]
    fn every_element_across_steps_tasks_and_blocks_matches_a_scalar_reference() {
        let tmp = tempfile::tempdir().unwrap();
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            // Uniform (a power-of-two total: multiplied by the inverse) and uneven weights.
            for weights in [vec![1.0; 4], vec![0.5, 1.25, 3.0, 0.1]] {
                let cks: Vec<Checkpoint> = (0..4)
                    .map(|k| {
                        let values: Vec<f64> = (0..N).map(|i| value(i, k)).collect();
                        checkpoint(&tmp.path().join(format!("{dtype:?}-{k}")), dtype, &values)
                    })
                    .collect();
                let refs: Vec<&Checkpoint> = cks.iter().collect();
                let inputs: Vec<Vec<u8>> = refs.iter().map(|c| c.bytes(&c.tensors["w"]).to_vec()).collect();
                let mut got = Vec::new();
                average_tensor(&refs, &weights, "w", &mut got).unwrap();
                let size = dtype.bitsize() / 8;
                assert_eq!(got.len(), N * size);
                for i in 0..N {
                    let want = reference(dtype, &inputs, &weights, i);
                    assert_eq!(&got[i * size..(i + 1) * size], want.as_slice(), "{dtype:?} {weights:?} element {i}");
                }
            }
        }
    }

    #[test]
    fn a_non_finite_value_is_reported_at_its_element_and_file() {
        let tmp = tempfile::tempdir().unwrap();
        // In the second step, a later task and a middle block: the first bad element is reported.
        let bad = CHUNK + TASK + BLOCK + 1;
        let good: Vec<f64> = (0..N).map(|i| value(i, 0)).collect();
        let mut poisoned = good.clone();
        poisoned[bad] = f64::INFINITY;
        poisoned[bad + 1] = f64::NAN;
        let a = checkpoint(&tmp.path().join("a"), Dtype::BF16, &good);
        let b = checkpoint(&tmp.path().join("b"), Dtype::BF16, &poisoned);
        let err = average_tensor(&[&a, &b], &[1.0, 1.0], "w", &mut Vec::new()).unwrap_err();
        assert_eq!(err.path, tmp.path().join("b").join("model.safetensors"));
        assert!(err.message.contains(&format!("element {bad})")), "{}", err.message);
    }

    /// The bytes of a 1-D tensor as it would be written.
    fn tensor_bytes(t: &candle_core::Tensor) -> Vec<u8> {
        match t.dtype() {
            candle_core::DType::BF16 => {
                t.to_vec1::<half::bf16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            candle_core::DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
            candle_core::DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
            other => panic!("{other:?}"),
        }
    }

    /// The sum taken with tensor ops (as on a GPU, here on the CPU device) and the soup handed
    /// to an evaluation are the averager's bits: every dtype, uniform and uneven weights, signed
    /// zeros (`-0 · w` first, then added to) included; a non-finite value goes back to the
    /// averager, which names it.
    #[test]
    fn the_sum_on_a_device_is_the_averagers_to_the_bit() {
        let tmp = tempfile::tempdir().unwrap();
        let n = 10_007;
        let cpu = candle_core::Device::Cpu;
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            for weights in [vec![1.0; 4], vec![0.5, 1.25, 3.0, 0.1], vec![1.0, 2.0, 0.0, 0.3]] {
                let cks: Vec<Checkpoint> = (0..4)
                    .map(|k| {
                        let values: Vec<f64> = (0..n)
                            .map(|i| match i % 97 {
                                0 => -0.0,
                                1 => 0.0,
                                2 if k % 2 == 0 => -0.0,
                                _ => value(i, k),
                            })
                            .collect();
                        checkpoint(&tmp.path().join(format!("d-{dtype:?}-{k}")), dtype, &values)
                    })
                    .collect();
                let refs: Vec<&Checkpoint> = cks.iter().collect();
                let mut want = Vec::new();
                average_tensor(&refs, &weights, "w", &mut want).unwrap();
                let got = average_on_device(&refs, &weights, "w", &cpu).unwrap().unwrap();
                assert_eq!(got.dims(), &[n]);
                let got = tensor_bytes(&got);
                let size = dtype.bitsize() / 8;
                for i in 0..n {
                    let (g, w) = (&got[i * size..(i + 1) * size], &want[i * size..(i + 1) * size]);
                    assert_eq!(g, w, "{dtype:?} {weights:?} element {i}");
                }
                let soup = soup_tensors(&refs, &weights, &cpu).unwrap();
                assert_eq!(tensor_bytes(&soup["w"]), want, "{dtype:?} {weights:?}: the soup's tensor");
            }
        }
        let good: Vec<f64> = (0..n).map(|i| value(i, 0)).collect();
        let mut poisoned = good.clone();
        poisoned[n / 2] = f64::NAN;
        let a = checkpoint(&tmp.path().join("good"), Dtype::BF16, &good);
        let b = checkpoint(&tmp.path().join("poisoned"), Dtype::BF16, &poisoned);
        assert!(average_on_device(&[&a, &b], &[1.0, 1.0], "w", &cpu).unwrap().is_none());
        let err = soup_tensors(&[&a, &b], &[1.0, 1.0], &cpu).unwrap_err();
        assert!(err.message.contains(&format!("element {})", n / 2)), "{}", err.message);
    }
}
