//! Parquet in and out, through Arrow.
//!
//! Reading decodes record batches to JSON objects (arrow-json), then to canonical records.
//! A Hugging Face `Image` column (a struct `{bytes, path}`, at the top of the schema) becomes a
//! reference to its row, read in place by the stages that read images
//! ([`crate::parquet_images`]): no image byte is copied into the store. Other binary values
//! (anywhere in structs or lists, images in lists included) become standard base64 strings: a
//! third larger than the bytes, where arrow-json's hex doubles them.
//!
//! Writing turns image references back into bytes: a field holding references (to Parquet rows
//! or tar members) or `{bytes, path}` structs becomes an `Image` column, with the schema metadata
//! Hugging Face datasets read it as an `Image` feature by.
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
use serde_json::Value;

fn bad_parquet(path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::input(format!("{}: not a readable Parquet file: {e}", path.display()))
        .with_hint("the file may be truncated or not Parquet at all; re-export it, or check its extension")
}

/// Reads the Parquet file at `path` into shards of `shard_records`; `name` is how its image
/// references name it (relative to the dataset's root).
pub fn read(
    ctx: &StageContext<'_>,
    path: &Path,
    name: &str,
    shard_records: usize,
) -> Result<Vec<ShardRef>, StageError> {
    let file = File::open(path).map_err(|e| StageError::input(format!("cannot open {}: {e}", path.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad_parquet(path, e))?
        .with_batch_size(shard_records)
        .build()
        .map_err(|e| bad_parquet(path, e))?;
    let mut shards = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_n = 0usize;
    let mut first_row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| bad_parquet(path, e))?;
        let rows = batch.num_rows() as u64;
        let batch = images_as_references(&batch, name, first_row)
            .and_then(|b| binary_as_base64(&b))
            .map_err(|e| StageError::internal(format!("{}: cannot re-encode binary values: {e}", path.display())))?;
        first_row += rows;
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

/// Whether a column is a Hugging Face `Image` (or `Audio`) struct: `bytes` (binary) and `path`.
fn is_image_struct(t: &DataType) -> bool {
    let DataType::Struct(fields) = t else { return false };
    let binary = |t: &DataType| matches!(t, DataType::Binary | DataType::LargeBinary | DataType::BinaryView);
    let text = |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    fields.len() == 2
        && fields.iter().any(|f| f.name() == "bytes" && binary(f.data_type()))
        && fields.iter().any(|f| f.name() == "path" && text(f.data_type()))
}

/// `batch` (whose first row is row `first_row` of the file `name`) with each top-level `Image`
/// column replaced by references to its rows: `{parquet, row, column, path}`; a row whose
/// `bytes` is null keeps only its `path`, as Hugging Face reads it.
fn images_as_references(
    batch: &RecordBatch,
    name: &str,
    first_row: u64,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_image_struct(f.data_type())) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if !is_image_struct(field.data_type()) {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
            continue;
        }
        let image = column.as_struct();
        let bytes = image.column_by_name("bytes").expect("checked by is_image_struct");
        let paths = arrow_cast::cast(image.column_by_name("path").expect("checked"), &DataType::Utf8)?;
        let paths = paths.as_string::<i32>();
        let n = image.len();
        let has_bytes = |i: usize| image.is_valid(i) && bytes.is_valid(i);
        let file: StringArray = (0..n).map(|i| has_bytes(i).then_some(name)).collect();
        let row: arrow_array::UInt64Array = (0..n).map(|i| has_bytes(i).then_some(first_row + i as u64)).collect();
        let col: StringArray = (0..n).map(|i| has_bytes(i).then_some(field.name().as_str())).collect();
        let path: StringArray =
            (0..n).map(|i| (image.is_valid(i) && paths.is_valid(i)).then(|| paths.value(i))).collect();
        let parts: Vec<(Arc<Field>, ArrayRef)> = vec![
            (Arc::new(Field::new("parquet", DataType::Utf8, true)), Arc::new(file)),
            (Arc::new(Field::new("row", DataType::UInt64, true)), Arc::new(row)),
            (Arc::new(Field::new("column", DataType::Utf8, true)), Arc::new(col)),
            (Arc::new(Field::new("path", DataType::Utf8, true)), Arc::new(path)),
        ];
        let (child_fields, child_columns): (Vec<_>, Vec<_>) = parts.into_iter().unzip();
        let reference = StructArray::try_new(child_fields.into(), child_columns, image.nulls().cloned())?;
        fields.push(field.as_ref().clone().with_data_type(reference.data_type().clone()));
        columns.push(Arc::new(reference) as ArrayRef);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
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

/// Writes `shards` (of a dataset whose root is `root`) as one Parquet file at `dest`.
pub fn write(ctx: &StageContext<'_>, shards: &[ShardRef], root: Option<&Path>, dest: &Path) -> Result<(), StageError> {
    write_with(|s| ctx.read_shard(s), shards, root, dest)
}

/// [`write`], reading shards straight from a store (for `ladle export`).
pub fn write_from_store(
    store: &ladle_engine::Store,
    shards: &[ShardRef],
    root: Option<&Path>,
    dest: &Path,
) -> Result<(), StageError> {
    write_with(|s| Ok(store.get(&s.digest)?), shards, root, dest)
}

/// How an image value is written, as Hugging Face datasets write an `Image` column.
fn image_type() -> DataType {
    DataType::Struct(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)].into())
}

/// Whether `value` is an image in one of the forms records carry them as objects: a reference
/// into a tar or a Parquet file, or a `{bytes, path}` struct with its bytes.
fn is_image_value(value: &Value) -> bool {
    let Value::Object(o) = value else { return false };
    let has = |k: &str| o.contains_key(k);
    (has("tar") && has("offset") && has("length"))
        || (has("parquet") && has("row") && has("column"))
        || (matches!(o.get("bytes"), Some(Value::String(_))) && o.keys().all(|k| k == "bytes" || k == "path"))
}

fn write_with(
    read_shard: impl Fn(&ShardRef) -> Result<Vec<u8>, StageError>,
    shards: &[ShardRef],
    root: Option<&Path>,
    dest: &Path,
) -> Result<(), StageError> {
    let err = |e: &dyn std::fmt::Display| StageError::input(format!("cannot write Parquet to {}: {e}", dest.display()));
    // First pass: each shard's schema, with image values standing in as empty `{bytes, path}`.
    let mut schemas = Vec::with_capacity(shards.len());
    let mut images: std::collections::BTreeSet<String> = Default::default();
    for s in shards {
        let bytes = read_shard(s)?;
        let mut values = Vec::with_capacity(s.records as usize);
        for line in lines(&bytes) {
            let mut value: Value = serde_json::from_slice(line).map_err(|e| err(&e))?;
            if let Value::Object(record) = &mut value {
                for (field, v) in record.iter_mut() {
                    if is_image_value(v) {
                        images.insert(field.clone());
                        *v = serde_json::json!({ "bytes": "", "path": "" });
                    }
                }
            }
            values.push(Ok(value));
        }
        schemas.push(arrow_json::reader::infer_json_schema_from_iterator(values.into_iter()).map_err(|e| err(&e))?);
    }
    let mut schema: Option<Schema> = None;
    for inferred in schemas {
        let fields: Vec<Field> = inferred
            .fields()
            .iter()
            .map(|f| {
                let f = f.as_ref().clone();
                if images.contains(f.name()) { f.with_data_type(image_type()) } else { f }
            })
            .collect();
        let inferred = Schema::new(fields);
        schema = Some(match schema {
            None => inferred,
            Some(prev) => Schema::try_merge([prev, inferred]).map_err(|e| {
                err(&format!("records disagree on a column's type ({e}); Parquet needs one type per column"))
            })?,
        });
    }
    let mut schema = schema.unwrap_or_else(Schema::empty);
    if !images.is_empty() {
        // Only the image columns are described: datasets generates the rest from the Arrow types.
        let features: serde_json::Map<String, Value> =
            images.iter().map(|f| (f.clone(), serde_json::json!({ "_type": "Image" }))).collect();
        let metadata = serde_json::json!({ "info": { "features": features } }).to_string();
        schema = schema.with_metadata(std::collections::HashMap::from([("huggingface".to_string(), metadata)]));
    }
    let schema = Arc::new(schema);
    let file = File::create(dest).map_err(|e| err(&e))?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), None).map_err(|e| err(&e))?;
    let mut position = 0u64;
    for s in shards {
        let mut bytes = read_shard(s)?;
        if !images.is_empty() {
            bytes = with_image_bytes(&bytes, &images, root, position)?;
        }
        position += s.records;
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

/// A shard's records with the images of the `images` fields as `{bytes, path}`, `bytes` in the
/// hex arrow-json reads binary from. `first` is the shard's first record's position.
fn with_image_bytes(
    jsonl: &[u8],
    images: &std::collections::BTreeSet<String>,
    root: Option<&Path>,
    first: u64,
) -> Result<Vec<u8>, StageError> {
    let mut out = Vec::with_capacity(jsonl.len());
    for (i, line) in lines(jsonl).enumerate() {
        let at = first + i as u64;
        let mut record = parse_record(line).map_err(|e| StageError::internal(e).at_record(at))?;
        for field in images {
            let Some(value) = record.get(field) else { continue };
            let written = match value {
                Value::Null => Value::Null,
                v if is_image_value(v) => {
                    let locate = crate::image_source::ImageField::parse(&format!("{{{field}}}"))
                        .and_then(|f| f.locate(&record, root))
                        .and_then(|image| image.encoded());
                    let data = locate.map_err(|e| {
                        StageError::input(format!("`{field}`: {e}"))
                            .at_record(at)
                            .with_hint("the image must be readable to be written into the Parquet file")
                    })?;
                    let path = v.get("path").filter(|p| p.is_string()).cloned().unwrap_or(Value::Null);
                    serde_json::json!({ "bytes": hex(&data), "path": path })
                }
                Value::Object(o) if o.keys().all(|k| k == "path") => value.clone(),
                other => {
                    return Err(StageError::input(format!(
                        "`{field}` holds images in other records, but {} in this one; a Parquet column has one type",
                        ladle_engine::records::json_type(other)
                    ))
                    .at_record(at)
                    .with_hint("make every record's value an image (or null), or write the dataset as JSONL"));
                }
            };
            record.insert(field.clone(), written);
        }
        write_record(&record, &mut out);
    }
    Ok(out)
}

fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(data.len() * 2);
    for b in data {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
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
