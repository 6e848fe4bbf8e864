//! Parquet in and out, through Arrow.
//!
//! Reading decodes record batches to JSON objects (arrow-json), then to canonical records.
//! Binary values (a Hugging Face `Image` column's `bytes`, anywhere in structs or lists) become
//! standard base64 strings first: a third larger than the bytes, where arrow-json's hex doubles
//! them.
//! Writing infers one Arrow schema from all records (arrow-json's inference, merged across
//! shards), then encodes shard by shard, so memory holds one shard's batch at a time.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, LargeListArray, ListArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Schema};
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
        let batch = binary_as_base64(&batch.map_err(|e| bad_parquet(path, e))?)
            .map_err(|e| StageError::internal(format!("{}: cannot re-encode binary values: {e}", path.display())))?;
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

/// `batch` with every binary array (at any depth of structs and lists) replaced by base64 strings.
fn binary_as_base64(batch: &RecordBatch) -> Result<RecordBatch, arrow_schema::ArrowError> {
    if !batch.schema().fields().iter().any(|f| holds_binary(f.data_type())) {
        return Ok(batch.clone());
    }
    let columns: Vec<ArrayRef> = batch.columns().iter().map(base64_array).collect::<Result<_, _>>()?;
    let fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .zip(&columns)
        .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
        .collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

fn holds_binary(t: &DataType) -> bool {
    match t {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => true,
        DataType::Struct(fields) => fields.iter().any(|f| holds_binary(f.data_type())),
        DataType::List(f) | DataType::LargeList(f) => holds_binary(f.data_type()),
        _ => false,
    }
}

fn base64_array(array: &ArrayRef) -> Result<ArrayRef, arrow_schema::ArrowError> {
    use base64::Engine;
    let encode = |values: &mut dyn Iterator<Item = Option<&[u8]>>| -> ArrayRef {
        Arc::new(
            values.map(|v| v.map(|b| base64::engine::general_purpose::STANDARD.encode(b))).collect::<StringArray>(),
        )
    };
    Ok(match array.data_type() {
        DataType::Binary => encode(&mut array.as_binary::<i32>().iter()),
        DataType::LargeBinary => encode(&mut array.as_binary::<i64>().iter()),
        DataType::BinaryView => encode(&mut array.as_binary_view().iter()),
        DataType::FixedSizeBinary(_) => encode(&mut array.as_fixed_size_binary().iter()),
        DataType::Struct(_) if holds_binary(array.data_type()) => {
            let s = array.as_struct();
            let columns: Vec<ArrayRef> = s.columns().iter().map(base64_array).collect::<Result<_, _>>()?;
            let fields: Vec<Field> = s
                .fields()
                .iter()
                .zip(&columns)
                .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
                .collect();
            Arc::new(StructArray::try_new(fields.into(), columns, s.nulls().cloned())?)
        }
        DataType::List(f) if holds_binary(f.data_type()) => {
            let l = array.as_list::<i32>();
            let values = base64_array(l.values())?;
            let field = Arc::new(f.as_ref().clone().with_data_type(values.data_type().clone()));
            Arc::new(ListArray::try_new(field, l.offsets().clone(), values, l.nulls().cloned())?)
        }
        DataType::LargeList(f) if holds_binary(f.data_type()) => {
            let l = array.as_list::<i64>();
            let values = base64_array(l.values())?;
            let field = Arc::new(f.as_ref().clone().with_data_type(values.data_type().clone()));
            Arc::new(LargeListArray::try_new(field, l.offsets().clone(), values, l.nulls().cloned())?)
        }
        _ => array.clone(),
    })
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

#[cfg(test)]
mod base64_tests {
    use arrow_array::builder::{BinaryBuilder, ListBuilder};
    use arrow_array::{BinaryArray, Int32Array};

    use super::*;

    #[test]
    fn binary_values_become_base64_at_any_depth_and_the_rest_is_kept() {
        let top: ArrayRef = Arc::new(BinaryArray::from(vec![Some(&b"\xff\xd8\xff"[..]), None]));
        let mut list = ListBuilder::new(BinaryBuilder::new());
        list.values().append_value(b"ab");
        list.values().append_value(b"");
        list.append(true);
        list.append(false);
        let list: ArrayRef = Arc::new(list.finish());
        let n: ArrayRef = Arc::new(Int32Array::from(vec![1, 2]));
        let batch = RecordBatch::try_from_iter([("top", top), ("list", list), ("n", n)]).unwrap();
        let out = binary_as_base64(&batch).unwrap();
        let top = out.column(0).as_string::<i32>();
        assert_eq!((top.value(0), top.is_null(1)), ("/9j/", true));
        let list = out.column(1).as_list::<i32>();
        let first = list.value(0);
        let first = first.as_string::<i32>();
        assert_eq!((first.value(0), first.value(1)), ("YWI=", ""));
        assert!(list.is_null(1));
        assert_eq!(out.column(2).as_ref(), batch.column(2).as_ref());
        assert_eq!(
            out.schema().field(1).data_type(),
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
        );
    }
}
