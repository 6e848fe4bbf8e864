//! Tensor shards: the safetensors files a [`Artifact::Tensors`](ladle_engine::Artifact) is made
//! of, and their export as one `.safetensors` or `.npy` file.
//!
//! A shard holds, for the records of one input shard, in record order:
//! - `embedding`: F32 `[rows, ...]`, one row per record (or per view of a tiled image);
//! - `record`: I64 `[rows]`, the position of the row's record in the input dataset, so rows can
//!   be matched to records when some were dropped or images were tiled;
//! - `view`: I64 `[rows]`, only for tiled images: the tile (0..n), then n for the thumbnail;
//! - `position`: I64 `[rows, 2]`, only where a row is one token of an image whose token count
//!   varies (a Qwen2-VL tower's merged tokens): the token's (row, column) in the image's grid.
//!
//! Export concatenates the shards' tensors along the first axis, streaming: memory holds one
//! shard at a time, whatever the total size.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use ladle_engine::ShardRef;
use ladle_engine::error::StageError;
use ladle_models::safetensors_header::{StreamedTensor, streamed_header};
use safetensors::{Dtype, SafeTensors};

/// The tensors of one shard.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TensorShard {
    /// The shape of one row of `embedding`.
    pub row_shape: Vec<usize>,
    pub embedding: Vec<f32>,
    pub record: Vec<i64>,
    pub view: Option<Vec<i64>>,
    /// (row, column) pairs, one per row.
    pub position: Option<Vec<i64>>,
}

impl TensorShard {
    pub fn rows(&self) -> usize {
        self.record.len()
    }

    /// The shard as a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StageError> {
        let rows = self.rows();
        let mut shape = vec![rows];
        shape.extend(&self.row_shape);
        let as_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let ints = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (embedding, record) = (as_bytes(&self.embedding), ints(&self.record));
        let view = self.view.as_deref().map(ints);
        let position = self.position.as_deref().map(ints);
        let err = |e: safetensors::SafeTensorError| StageError::internal(format!("cannot build a tensor shard: {e}"));
        let mut tensors = vec![
            ("embedding", safetensors::tensor::TensorView::new(Dtype::F32, shape, &embedding).map_err(err)?),
            ("record", safetensors::tensor::TensorView::new(Dtype::I64, vec![rows], &record).map_err(err)?),
        ];
        if let Some(view) = &view {
            tensors.push(("view", safetensors::tensor::TensorView::new(Dtype::I64, vec![rows], view).map_err(err)?));
        }
        if let Some(position) = &position {
            let t = safetensors::tensor::TensorView::new(Dtype::I64, vec![rows, 2], position).map_err(err)?;
            tensors.push(("position", t));
        }
        let meta = HashMap::from([("format".to_string(), "ladle tensors v1".to_string())]);
        safetensors::serialize(tensors, Some(meta)).map_err(err)
    }
}

/// One tensor of a shard, as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

fn bad_shard(e: impl std::fmt::Display) -> StageError {
    StageError::internal(format!("a tensor shard in the store is not a readable safetensors file: {e}"))
}

/// The tensors of a shard, sorted by name.
pub fn describe(bytes: &[u8]) -> Result<Vec<TensorInfo>, StageError> {
    let st = SafeTensors::deserialize(bytes).map_err(bad_shard)?;
    let mut out: Vec<TensorInfo> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| TensorInfo { name, dtype: format!("{:?}", t.dtype()), shape: t.shape().to_vec() })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes the shards' tensors, concatenated, to `dest` (`.safetensors`: every tensor; `.npy`:
/// `embedding` only). Returns what was written, in words.
pub fn export(
    read_shard: impl Fn(&ShardRef) -> Result<Vec<u8>, StageError>,
    shards: &[ShardRef],
    dest: &Path,
) -> Result<String, StageError> {
    let ext = dest.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let npy = match ext.as_str() {
        "safetensors" => false,
        "npy" => true,
        _ => {
            return Err(StageError::input(format!("cannot tell the format of {} from its extension", dest.display()))
                .with_hint("name it .safetensors (embeddings with their record positions) or .npy (embeddings)"));
        }
    };
    // Pass 1: headers, to know the total shapes before writing. Every shard holds the same
    // tensors: `embedding`, then the per-row indices (`record`, and `view`/`position` where made).
    let mut rows = 0usize;
    let mut layout: Option<Vec<TensorInfo>> = None;
    for s in shards {
        let infos = describe(&read_shard(s)?)?;
        let emb = infos.iter().find(|t| t.name == "embedding").ok_or_else(|| bad_shard("no `embedding` tensor"))?;
        rows += emb.shape[0];
        let rowless: Vec<TensorInfo> =
            infos.iter().map(|t| TensorInfo { shape: t.shape[1..].to_vec(), ..t.clone() }).collect();
        match &layout {
            Some(l) if *l != rowless => return Err(bad_shard("shards disagree on their tensors or their shapes")),
            _ => layout = Some(rowless),
        }
    }
    let mut layout =
        layout.unwrap_or_else(|| vec![TensorInfo { name: "embedding".into(), dtype: "F32".into(), shape: Vec::new() }]);
    // `embedding` first (streamed), then the indices in name order (gathered: 8 bytes a value).
    layout.sort_by_key(|t| (t.name != "embedding", t.name.clone()));
    let shape_of = |t: &TensorInfo| std::iter::once(rows).chain(t.shape.iter().copied()).collect::<Vec<usize>>();
    let shape = shape_of(&layout[0]);
    let indices: Vec<&TensorInfo> = if npy { Vec::new() } else { layout[1..].iter().collect() };

    let io = |e: std::io::Error| StageError::input(format!("cannot write {}: {e}", dest.display()));
    let file = std::fs::File::create(dest).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    if npy {
        out.write_all(&npy_header(&shape)).map_err(io)?;
    } else {
        let entries: Vec<StreamedTensor<'_>> = layout
            .iter()
            .map(|t| {
                let shape = shape_of(t);
                let width = if t.dtype == "F32" { 4 } else { 8 };
                StreamedTensor { name: &t.name, dtype: &t.dtype, bytes: shape.iter().product::<usize>() * width, shape }
            })
            .collect();
        let meta = std::collections::BTreeMap::from([("format".to_string(), "ladle tensors v1".to_string())]);
        out.write_all(&streamed_header(&entries, &meta)).map_err(io)?;
    }
    // Pass 2: the data, shard by shard.
    let mut gathered: Vec<Vec<u8>> = vec![Vec::new(); indices.len()];
    for s in shards {
        let bytes = read_shard(s)?;
        let st = SafeTensors::deserialize(&bytes).map_err(bad_shard)?;
        out.write_all(st.tensor("embedding").map_err(bad_shard)?.data()).map_err(io)?;
        for (t, into) in indices.iter().zip(&mut gathered) {
            into.extend_from_slice(st.tensor(&t.name).map_err(bad_shard)?.data());
        }
    }
    for data in &gathered {
        out.write_all(data).map_err(io)?;
    }
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let dims = shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×");
    Ok(if npy { format!("embedding [{dims}] f32") } else { format!("embedding [{dims}] f32 with record positions") })
}

/// A `.npy` (format 1.0) header for a little-endian f32 C-order array of `shape`.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + dict + '\n' is a multiple of 64.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(first: i64, rows: usize, view: bool) -> TensorShard {
        TensorShard {
            row_shape: vec![2, 3],
            embedding: (0..rows * 6).map(|i| first as f32 * 100.0 + i as f32).collect(),
            record: (0..rows as i64).map(|r| first + r).collect(),
            view: view.then(|| (0..rows as i64).collect()),
            position: None,
        }
    }

    #[test]
    fn shards_round_trip_and_export_concatenates_them() {
        let dir = tempfile::tempdir().unwrap();
        let shards = [shard(0, 2, false), shard(5, 3, false)];
        let blobs: Vec<Vec<u8>> = shards.iter().map(|s| s.to_bytes().unwrap()).collect();
        let refs: Vec<ShardRef> = blobs
            .iter()
            .enumerate()
            .map(|(i, b)| ShardRef { digest: ladle_engine::Digest([i as u8; 32]), records: 0, bytes: b.len() as u64 })
            .collect();
        let read = |s: &ShardRef| Ok(blobs[s.digest.0[0] as usize].clone());
        let infos = describe(&blobs[1]).unwrap();
        assert_eq!(infos[0], TensorInfo { name: "embedding".into(), dtype: "F32".into(), shape: vec![3, 2, 3] });

        let st_path = dir.path().join("e.safetensors");
        assert_eq!(export(read, &refs, &st_path).unwrap(), "embedding [5×2×3] f32 with record positions");
        let bytes = std::fs::read(&st_path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let emb = st.tensor("embedding").unwrap();
        assert_eq!(emb.shape(), [5, 2, 3]);
        let floats: Vec<f32> = emb.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let want: Vec<f32> = shards.iter().flat_map(|s| s.embedding.clone()).collect();
        assert_eq!(floats, want);
        let recs: Vec<i64> =
            st.tensor("record").unwrap().data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(recs, [0, 1, 5, 6, 7]);

        let npy_path = dir.path().join("e.npy");
        export(read, &refs, &npy_path).unwrap();
        let npy = std::fs::read(&npy_path).unwrap();
        let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&npy[10..10 + header_len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (5, 2, 3), }"), "{header}");
        let data: Vec<f32> =
            npy[10 + header_len..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(data, want);

        assert!(export(read, &refs, &dir.path().join("e.csv")).is_err());
    }

    #[test]
    fn tiled_shards_carry_their_views() {
        let blob = shard(0, 4, true).to_bytes().unwrap();
        let names: Vec<String> = describe(&blob).unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["embedding", "record", "view"]);
    }
}
