//! Images read in place from the Parquet files they came in.
//!
//! Hugging Face datasets keep an `Image` column as a struct `{bytes, path}` of the encoded file.
//! `read` does not copy those bytes into records: an image becomes a reference
//! `{"parquet": NAME, "row": N, "column": "image"}` (plus the struct's `path`, when it has one),
//! the same idea as a WebDataset tar's `{tar, offset, length}`, so a 100 GB image set does not
//! double in the store and the Parquet file's digest joins the keys of the stages that read its
//! images.
//!
//! Parquet compresses pages, so an image cannot be read at a byte offset: [`read`] decodes the
//! `bytes` column of the row group holding the row (only that column) and keeps the last few
//! groups decoded (and the files' parsed footers), since the stages that read images go through
//! records in file order. Threads asking for a group being decoded wait for it rather than decode
//! it again.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};

/// Decoded groups kept, at most (and at most [`CACHE_BYTES`] of them, but always the last one).
const CACHE_GROUPS: usize = 8;
const CACHE_BYTES: usize = 512 << 20;

/// A version of a file: its path, length and modification time. A file rewritten in place is
/// another version, so nothing decoded from the old one is served for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileVersion {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupKey {
    file: FileVersion,
    group: usize,
    column: String,
}

/// One row group's `bytes` values of one column.
struct Group {
    first_row: u64,
    values: ArrayRef,
}

type Slot = Arc<OnceLock<Result<Arc<Group>, String>>>;

static CACHE: Mutex<VecDeque<(GroupKey, Slot)>> = Mutex::new(VecDeque::new());

/// The encoded image in `column` (an `Image` struct column) at `row` of the Parquet file at `path`.
pub fn read(path: &Path, row: u64, column: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let version = FileVersion { path: path.to_path_buf(), len: meta.len(), modified: meta.modified().ok() };
    let reader_meta = footer(&version)?;
    let mut first_row = 0u64;
    let mut found = None;
    for (g, rg) in reader_meta.metadata().row_groups().iter().enumerate() {
        let rows = rg.num_rows().max(0) as u64;
        if row < first_row + rows {
            found = Some(g);
            break;
        }
        first_row += rows;
    }
    let Some(group) = found else {
        return Err(format!("{} has {first_row} rows, none at row {row}: was the file rewritten?", path.display()));
    };
    let key = GroupKey { file: version, group, column: column.to_string() };
    let slot = slot(&key);
    let decoded = slot.get_or_init(|| {
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        decode(file, reader_meta, group, first_row, column, path).map(Arc::new)
    });
    let decoded = match decoded {
        Ok(g) => g.clone(),
        Err(e) => {
            let e = e.clone();
            forget(&key);
            return Err(e);
        }
    };
    trim();
    let i = (row - decoded.first_row) as usize;
    value(&decoded.values, i)
        .ok_or_else(|| format!("{}: row {row} of column `{column}` holds no image bytes", path.display()))
}

/// Footers (the files' metadata) parsed, the most recently used last: one parse per file
/// version, not one per image.
static FOOTERS: Mutex<VecDeque<(FileVersion, ArrowReaderMetadata)>> = Mutex::new(VecDeque::new());

/// The parsed footer of a file version.
fn footer(version: &FileVersion) -> Result<ArrowReaderMetadata, String> {
    let mut footers = FOOTERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = footers.iter().position(|(v, _)| v == version) {
        let entry = footers.remove(at).expect("found above");
        let meta = entry.1.clone();
        footers.push_back(entry);
        return Ok(meta);
    }
    let path = &version.path;
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
        .map_err(|e| format!("{}: not a readable Parquet file: {e}", path.display()))?;
    footers.push_back((version.clone(), meta.clone()));
    if footers.len() > CACHE_GROUPS {
        footers.pop_front();
    }
    Ok(meta)
}

/// The cache's slot for `key`, made (empty) if there is none; the most recently used is last.
fn slot(key: &GroupKey) -> Slot {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = cache.iter().position(|(k, _)| k == key) {
        let entry = cache.remove(at).expect("found above");
        let slot = entry.1.clone();
        cache.push_back(entry);
        return slot;
    }
    let slot: Slot = Arc::default();
    cache.push_back((key.clone(), slot.clone()));
    slot
}

fn forget(key: &GroupKey) {
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).retain(|(k, _)| k != key);
}

/// Drops the least recently used groups beyond the cache's bounds.
fn trim() {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let size = |s: &Slot| match s.get() {
        Some(Ok(g)) => g.values.get_array_memory_size(),
        _ => 0,
    };
    let mut bytes: usize = cache.iter().map(|(_, s)| size(s)).sum();
    while cache.len() > 1 && (cache.len() > CACHE_GROUPS || bytes > CACHE_BYTES) {
        let (_, dropped) = cache.pop_front().expect("len > 1");
        bytes -= size(&dropped);
    }
}

/// Decodes the `bytes` leaf of `column` in row group `group`, and nothing else.
fn decode(
    file: File,
    meta: ArrowReaderMetadata,
    group: usize,
    first_row: u64,
    column: &str,
    path: &Path,
) -> Result<Group, String> {
    let bad = |e: &dyn std::fmt::Display| format!("{}: cannot read column `{column}`: {e}", path.display());
    let schema = meta.metadata().file_metadata().schema_descr_ptr();
    let leaves: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| {
            let parts = schema.column(i).path().parts().to_vec();
            parts.len() == 2 && parts[0] == column && parts[1] == "bytes"
        })
        .collect();
    if leaves.is_empty() {
        return Err(format!("{} has no image column `{column}` (a struct with `bytes`)", path.display()));
    }
    let rows = meta.metadata().row_group(group).num_rows().max(1) as usize;
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta)
        .with_projection(ProjectionMask::leaves(&schema, leaves))
        .with_row_groups(vec![group])
        .with_batch_size(rows)
        .build()
        .map_err(|e| bad(&e))?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(&e))?;
        let image = batch.column_by_name(column).ok_or_else(|| bad(&"the column is missing"))?;
        let bytes = image
            .as_struct_opt()
            .and_then(|s| s.column_by_name("bytes"))
            .ok_or_else(|| bad(&"it is not a struct with `bytes`"))?;
        batches.push(bytes.clone());
    }
    let values = match batches.len() {
        1 => batches.pop().expect("one"),
        _ => {
            let refs: Vec<&dyn Array> = batches.iter().map(|a| a.as_ref()).collect();
            arrow_select::concat::concat(&refs).map_err(|e| bad(&e))?
        }
    };
    if value_type_ok(values.data_type()) {
        Ok(Group { first_row, values })
    } else {
        Err(bad(&format!("`bytes` is {}, not binary", values.data_type())))
    }
}

fn value_type_ok(t: &DataType) -> bool {
    matches!(t, DataType::Binary | DataType::LargeBinary | DataType::BinaryView)
}

/// The `i`-th value of a binary array; `None` when null.
fn value(values: &ArrayRef, i: usize) -> Option<Vec<u8>> {
    if i >= values.len() || values.is_null(i) {
        return None;
    }
    Some(match values.data_type() {
        DataType::Binary => values.as_binary::<i32>().value(i).to_vec(),
        DataType::LargeBinary => values.as_binary::<i64>().value(i).to_vec(),
        DataType::BinaryView => values.as_binary_view().value(i).to_vec(),
        _ => return None,
    })
}
