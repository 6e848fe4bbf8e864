//! `read`: a data file into a dataset of canonical shards.
//!
//! Formats: JSONL (one object per line; blank lines skipped), JSON (an array of objects — LLaVA
//! conversation files are kept record for record), Parquet. The format comes from the extension
//! or `format`. Records are cut into shards of `shard_records` (default 4096) in file order, so
//! appending records to a file changes only its last shard and adds new ones.
//!
//! JSONL is streamed: a few shards are in memory at a time, whatever the file's size.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{json_type, parse_record, write_record};
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, ShardRef, StageContext};

pub const DEFAULT_SHARD_RECORDS: u64 = 4096;

pub struct ReadKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Json,
    Parquet,
}

impl Format {
    pub fn from_name(s: &str) -> Option<Format> {
        match s {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    pub fn from_path(path: &Path) -> Option<Format> {
        Format::from_name(&path.extension()?.to_string_lossy().to_ascii_lowercase())
    }
}

impl StageKind for ReadKind {
    fn name(&self) -> &'static str {
        "read"
    }
    fn about(&self) -> &'static str {
        "a .jsonl, .json or .parquet file as a dataset"
    }
    fn ports(&self) -> &'static [PortSpec] {
        &[]
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let path = params.path_dep("path", false)?.ok_or_else(|| params.missing("path", "the data file to read"))?;
        let format = match params.choice("format", &["jsonl", "json", "parquet"])? {
            Some(f) => Format::from_name(&f).expect("checked by choice"),
            None => Format::from_path(&path).ok_or_else(|| {
                let mut e =
                    params.error("path", format!("cannot tell the format of `{}` from its extension", path.display()));
                e.hint = Some(
                    "name it .jsonl, .json or .parquet, or set format = \"jsonl\" | \"json\" | \"parquet\"".into(),
                );
                e
            })?,
        };
        params.record("format", format!("{format:?}").to_lowercase().into());
        let shard_records = params.positive("shard_records")?.unwrap_or(DEFAULT_SHARD_RECORDS);
        params.record("shard_records", shard_records.into());
        // Relative paths in the records (images) resolve against the data file's folder. It is
        // kept relative to the pipeline file's folder when inside it, so a moved project keeps
        // its keys and digests.
        let folder = path.parent().unwrap_or(Path::new(""));
        let root = folder.strip_prefix(params.base_dir()).unwrap_or(folder).to_path_buf();
        params.record("root", root.to_string_lossy().into_owned().into());
        Ok(Arc::new(Read { path, format, shard_records: shard_records as usize, root }))
    }
}

pub struct Read {
    path: PathBuf,
    /// The data file's folder, as the output dataset's root.
    root: PathBuf,
    format: Format,
    shard_records: usize,
}

impl Stage for Read {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

impl WholeStage for Read {
    fn run(&self, ctx: &StageContext<'_>, _inputs: &Inputs) -> Result<Artifact, StageError> {
        // The key was computed from this digest (a stat-memo hit, so cheap); if the file changes
        // while it is read, what was read must not be cached under that key.
        let before = ctx.store.file_digest(&self.path)?;
        let shards = match self.format {
            Format::Jsonl => self.read_jsonl(ctx)?,
            Format::Json => self.read_json(ctx)?,
            Format::Parquet => crate::parquet_io::read(ctx, &self.path, self.shard_records)?,
        };
        if ctx.store.file_digest(&self.path)? != before {
            return Err(StageError::input(format!("{} changed while it was being read", self.path.display()))
                .with_hint("run again once whatever writes the file has finished"));
        }
        Ok(Artifact::Dataset { shards, root: Some(self.root.clone()) })
    }
}

/// A run of lines of a JSONL file, with the number of its first line.
struct Chunk {
    first_line: u64,
    bytes: Vec<u8>,
}

impl Read {
    fn read_jsonl(&self, ctx: &StageContext<'_>) -> Result<Vec<ShardRef>, StageError> {
        let file = File::open(&self.path)
            .map_err(|e| StageError::input(format!("cannot open {}: {e}", self.path.display())))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let path = self.path.clone();
        let per_shard = self.shard_records;
        let mut line_no = 0u64;
        let mut done = false;
        let chunks = std::iter::from_fn(move || {
            if done {
                return None;
            }
            let mut chunk = Chunk { first_line: line_no + 1, bytes: Vec::new() };
            let mut records = 0;
            while records < per_shard {
                let start = chunk.bytes.len();
                match reader.read_until(b'\n', &mut chunk.bytes) {
                    Ok(0) => {
                        done = true;
                        break;
                    }
                    Ok(_) => {
                        line_no += 1;
                        if !chunk.bytes[start..].iter().all(u8::is_ascii_whitespace) {
                            records += 1;
                        }
                        if chunk.bytes.last() != Some(&b'\n') {
                            chunk.bytes.push(b'\n');
                        }
                    }
                    Err(e) => {
                        done = true;
                        return Some(Err(StageError::input(format!("cannot read {}: {e}", path.display()))));
                    }
                }
            }
            (records > 0).then_some(Ok(chunk))
        });
        let shards = ctx.par_map(chunks, |_, chunk| {
            let mut out = Vec::with_capacity(chunk.bytes.len());
            let mut n = 0;
            for (i, line) in chunk.bytes.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let record = parse_record(line).map_err(|e| {
                    StageError::input(format!("{}:{}: {e}", self.path.display(), chunk.first_line + i as u64))
                        .with_hint("each line of a .jsonl file must be one JSON object; fix or remove that line")
                })?;
                write_record(&record, &mut out);
                n += 1;
            }
            ctx.write_shard(&out, n)
        })?;
        Ok(shards)
    }

    fn read_json(&self, ctx: &StageContext<'_>) -> Result<Vec<ShardRef>, StageError> {
        let bytes = std::fs::read(&self.path)
            .map_err(|e| StageError::input(format!("cannot read {}: {e}", self.path.display())))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| StageError::input(format!("{}: invalid JSON: {e}", self.path.display())))?;
        let serde_json::Value::Array(items) = value else {
            return Err(StageError::input(format!(
                "{}: expected a JSON array of records, found {}",
                self.path.display(),
                json_type(&value)
            ))
            .with_hint("a .json data file holds an array of objects; for one object per line, name the file .jsonl"));
        };
        let mut records = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match item {
                serde_json::Value::Object(m) => records.push(m),
                other => {
                    return Err(StageError::input(format!(
                        "{}: element {i} of the array is {}, not an object",
                        self.path.display(),
                        json_type(&other)
                    )));
                }
            }
        }
        let chunks: Vec<_> = records.chunks(self.shard_records).map(Ok).collect();
        ctx.par_map(chunks, |_, chunk| {
            let mut out = Vec::new();
            for r in chunk {
                write_record(r, &mut out);
            }
            ctx.write_shard(&out, chunk.len() as u64)
        })
    }
}
