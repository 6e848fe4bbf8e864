//! Parquet in and out, through Arrow.
//!
//! Reading decodes record batches to JSON objects (arrow-json), then to canonical records.
//! Writing infers one Arrow schema from all records (arrow-json's inference, merged across
//! shards), then encodes shard by shard, so memory holds one shard's batch at a time.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_schema::Schema;
use ladle_engine::error::StageError;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::{ShardRef, StageContext};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn bad_parquet(path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::input(format!("{}: not a readable Parquet file: {e}", path.display()))
        .with_hint("the file may be truncated or not Parquet at all; re-export it, or check its extension")
}

pub fn read(ctx: &StageContext<'_>, path: &Path, shard_records: usize) -> Result<Vec<ShardRef>, StageError> {
    let file = File::open(path).map_err(|e| StageError::input(format!("cannot open {}: {e}", path.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad_parquet(path, e))?
        .with_batch_size(shard_records)
        .build()
        .map_err(|e| bad_parquet(path, e))?;
    let mut shards = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_n = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| bad_parquet(path, e))?;
        let mut writer = arrow_json::LineDelimitedWriter::new(Vec::new());
        writer
            .write(&batch)
            .map_err(|e| StageError::input(format!("{}: cannot convert rows to JSON: {e}", path.display())))?;
        writer
            .finish()
            .map_err(|e| StageError::input(format!("{}: cannot convert rows to JSON: {e}", path.display())))?;
        let json = writer.into_inner();
        for line in lines(&json) {
            let record =
                parse_record(line).map_err(|e| StageError::internal(format!("arrow-json wrote a bad line: {e}")))?;
            write_record(&record, &mut pending);
            pending_n += 1;
            if pending_n == shard_records {
                shards.push(ctx.write_shard(&pending, pending_n as u64)?);
                pending.clear();
                pending_n = 0;
            }
        }
    }
    if pending_n > 0 {
        shards.push(ctx.write_shard(&pending, pending_n as u64)?);
    }
    Ok(shards)
}

/// Writes `shards` as one Parquet file at `dest`.
pub fn write(ctx: &StageContext<'_>, shards: &[ShardRef], dest: &Path) -> Result<(), StageError> {
    write_with(|s| ctx.read_shard(s), shards, dest)
}

/// [`write`], reading shards straight from a store (for `ladle export`).
pub fn write_from_store(store: &ladle_engine::Store, shards: &[ShardRef], dest: &Path) -> Result<(), StageError> {
    write_with(|s| Ok(store.get(&s.digest)?), shards, dest)
}

fn write_with(
    read_shard: impl Fn(&ShardRef) -> Result<Vec<u8>, StageError>,
    shards: &[ShardRef],
    dest: &Path,
) -> Result<(), StageError> {
    let err = |e: &dyn std::fmt::Display| StageError::input(format!("cannot write Parquet to {}: {e}", dest.display()));
    let mut schema: Option<Schema> = None;
    for s in shards {
        let bytes = read_shard(s)?;
        let values = lines(&bytes).map(|l| {
            serde_json::from_slice::<serde_json::Value>(l)
                .map_err(|e| arrow_schema::ArrowError::JsonError(e.to_string()))
        });
        let inferred = arrow_json::reader::infer_json_schema_from_iterator(values).map_err(|e| err(&e))?;
        schema = Some(match schema {
            None => inferred,
            Some(prev) => Schema::try_merge([prev, inferred]).map_err(|e| {
                err(&format!("records disagree on a column's type ({e}); Parquet needs one type per column"))
            })?,
        });
    }
    let schema = Arc::new(schema.unwrap_or_else(Schema::empty));
    let file = File::create(dest).map_err(|e| err(&e))?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), None).map_err(|e| err(&e))?;
    for s in shards {
        let bytes = read_shard(s)?;
        let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(s.records.max(1) as usize)
            .build_decoder()
            .map_err(|e| err(&e))?;
        decoder.decode(&bytes).map_err(|e| err(&e))?;
        if let Some(batch) = decoder.flush().map_err(|e| err(&e))? {
            writer.write(&batch).map_err(|e| err(&e))?;
        }
    }
    let file = writer.into_inner().map_err(|e| err(&e))?;
    file.sync_all().map_err(|e| err(&e))?;
    Ok(())
}
