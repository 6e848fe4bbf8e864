//! `read`: data files into a dataset of canonical shards.
//!
//! `path` names one file or many (a glob, a brace range, a folder, a Hugging Face datasets
//! folder, a list: see [`crate::sources`]); they become one dataset in a stable order. Formats:
//! JSONL (one object per line; blank lines skipped), JSON (an array of objects — LLaVA
//! conversation files are kept record for record), Parquet; JSONL and JSON may be gzip- or
//! zstd-compressed (`.jsonl.gz`, `.jsonl.zst`, `.json.gz`). The format comes from each file's name
//! or from `format`.
//!
//! Each file's records are cut into shards of `shard_records` (default 4096) in file order, and
//! no shard holds records of two files: appending records to a file changes only its last shard,
//! and adding a file to a glob adds shards without changing any other, so downstream only the
//! new shards compute. A file's shards are also remembered by the file's digest, so a rerun after
//! one file of 200 changed reads that one file.
//!
//! JSONL is streamed (compressed or not): a few shards are in memory at a time, whatever the
//! file's size.
//!
//! A bad record (a JSONL line that is not an object, a JSON array element that is not one, a
//! damaged tar member or header, a compressed file cut short) is an error naming the file and
//! the line or offset; with `on_bad_record = "drop"` it is skipped instead (a tar read on at its
//! next good header, a cut file kept up to its last whole line), counted in the run's summary,
//! and each one listed in the stage's log (`ladle show STAGE`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladle_engine::digest::{Digest, StageKey};
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{json_type, parse_record, write_record};
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, ShardRef, StageContext};

pub use crate::sources::{Compression, Format};

pub const DEFAULT_SHARD_RECORDS: u64 = 4096;

pub struct ReadKind;

impl StageKind for ReadKind {
    fn name(&self) -> &'static str {
        "read"
    }
    fn about(&self) -> &'static str {
        "data files (.jsonl, .json, .parquet; .gz/.zst; globs, ranges, folders) as a dataset"
    }
    fn ports(&self) -> &'static [PortSpec] {
        &[]
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let specs = params
            .strings("path")?
            .ok_or_else(|| params.missing("path", "the data file(s) to read: a file, glob, range, folder or list"))?;
        let split = params.string("split")?;
        if split.is_some() {
            params.exclude_from_key("split"); // what it selects enters the key as files
        }
        let split = split.unwrap_or_else(|| "train".to_string());
        let forced = params
            .choice("format", &["jsonl", "json", "parquet"])?
            .map(|f| Format::from_name(&f).expect("checked by choice"));
        let paths = crate::sources::expand(params.base_dir(), &specs, &split).map_err(|e| {
            let mut err = params.error("path", e);
            err.hint = Some(format!(
                "relative paths resolve against the pipeline file's folder, {}; `path` takes a file, a glob \
                 (data/*.jsonl), a range (shards/{{00000..00127}}.jsonl), a folder or a list",
                params.base_dir().display()
            ));
            err
        })?;
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let (format, compression) = match (forced, Format::from_path(&path)) {
                (Some(f), Some((_, c))) => (f, c),
                (Some(f), None) => (f, Compression::None),
                (None, Some(fc)) => fc,
                (None, None) => {
                    let mut e =
                        params.error("path", format!("cannot tell the format of `{}` from its name", path.display()));
                    e.hint = Some(
                        "name it .jsonl, .json or .parquet (.jsonl and .json may end in .gz or .zst), or set format = \"jsonl\" | \"json\" | \"parquet\"".into(),
                    );
                    return Err(e);
                }
            };
            if matches!(format, Format::Parquet | Format::WebDataset) && compression != Compression::None {
                return Err(params.error(
                    "path",
                    format!("`{}`: only .jsonl and .json files may be compressed (.gz, .zst)", path.display()),
                ));
            }
            files.push(DataFile { path, format, compression, name: String::new() });
        }
        // One plain file keeps the key it always had; several are named one by one, in order.
        let base = params.base_dir().to_path_buf();
        let relative = |p: &Path| p.strip_prefix(&base).unwrap_or(p).to_string_lossy().into_owned();
        if let [only] = files.as_slice()
            && specs.len() == 1
            && only.path == params.resolve(&specs[0])
        {
            params.depend_on_file("path".into(), only.path.clone());
            params.record("format", only.format.name().into());
            if only.compression != Compression::None {
                params.record("compression", format!("{:?}", only.compression).to_lowercase().into());
            }
        } else {
            for f in &files {
                params.depend_on_file(format!("path: {}", relative(&f.path)), f.path.clone());
            }
            // Each file's name says how it is read, so the names (in order) are the key's.
            params.record("files", files.iter().map(|f| relative(&f.path)).collect::<Vec<_>>().into());
            if let Some(f) = forced {
                params.record("format", f.name().into());
            }
        }
        let drop_bad = params.choice("on_bad_record", &["fail", "drop"])?.as_deref() == Some("drop");
        let shard_records = params.positive("shard_records")?.unwrap_or(DEFAULT_SHARD_RECORDS);
        params.record("shard_records", shard_records.into());
        // Relative paths in the records (images) resolve against the data files' folder (the
        // deepest folder holding them all). It is kept relative to the pipeline file's folder
        // when inside it, so a moved project keeps its keys and digests.
        let folder = common_folder(files.iter().map(|f| f.path.as_path()));
        let root = folder.strip_prefix(params.base_dir()).unwrap_or(&folder).to_path_buf();
        for f in &mut files {
            f.name = f.path.strip_prefix(&folder).unwrap_or(&f.path).to_string_lossy().into_owned();
        }
        params.record("root", root.to_string_lossy().into_owned().into());
        // Records from tars and Parquet files name the file their images are in.
        if let [only] = files.as_slice()
            && matches!(only.format, Format::WebDataset | Format::Parquet)
        {
            params.record("name", only.name.clone().into());
        }
        if files.iter().any(|f| f.format == Format::Parquet) {
            params.record("parquet images", "references".into());
        }
        Ok(Arc::new(Read { files, shard_records: shard_records as usize, root, drop_bad }))
    }
}

/// The deepest folder that holds every path.
fn common_folder<'a>(mut paths: impl Iterator<Item = &'a Path>) -> PathBuf {
    let Some(first) = paths.next() else { return PathBuf::new() };
    let mut common = first.parent().unwrap_or(Path::new("")).to_path_buf();
    for p in paths {
        while !p.starts_with(&common) {
            if !common.pop() {
                return PathBuf::new();
            }
        }
    }
    common
}

/// One file `read` reads.
#[derive(Debug, Clone)]
pub struct DataFile {
    pub path: PathBuf,
    pub format: Format,
    pub compression: Compression,
    /// The path relative to the dataset's root: how records refer to it (a tar's images).
    pub name: String,
}

pub struct Read {
    files: Vec<DataFile>,
    /// The data files' folder, as the output dataset's root.
    root: PathBuf,
    shard_records: usize,
    /// `on_bad_record = "drop"`.
    drop_bad: bool,
}

/// What a read dropped: a line per bad record, naming its file and where it is in it.
#[derive(Default)]
struct DropLog {
    lines: std::sync::Mutex<Vec<String>>,
    records: std::sync::atomic::AtomicU64,
}

impl DropLog {
    fn note(&self, records: u64, line: String) {
        self.records.fetch_add(records, std::sync::atomic::Ordering::Relaxed);
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
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
    /// Files are read several at a time (each file's shards stay in order, and files in theirs);
    /// a single file is read on as many threads as its format allows instead.
    fn run(&self, ctx: &StageContext<'_>, _inputs: &Inputs) -> Result<Artifact, StageError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let total = self.files.len() as u64;
        let (done, read) = (AtomicU64::new(0), AtomicU64::new(0));
        // Each file's dropped records, in file order of completion.
        let dropped = std::sync::Mutex::new(Vec::<String>::new());
        let per_file = ctx.par_map(self.files.iter().map(Ok), |_, file| {
            let log = DropLog::default();
            let (shards, was_read) = self.read_file(ctx, file, &log)?;
            let lines = log.lines.into_inner().unwrap_or_else(|e| e.into_inner());
            ctx.report_dropped(log.records.into_inner());
            if !lines.is_empty() {
                dropped.lock().unwrap_or_else(|e| e.into_inner()).push(lines.join("\n"));
            }
            read.fetch_add(u64::from(was_read), Ordering::Relaxed);
            let done = done.fetch_add(1, Ordering::Relaxed) + 1;
            if total > 1 {
                ctx.progress(done, total);
            }
            Ok(shards)
        })?;
        if total > 1 {
            ctx.report_work("file(s)", total, read.into_inner());
        }
        let dropped = dropped.into_inner().unwrap_or_else(|e| e.into_inner());
        if !dropped.is_empty() {
            ctx.save_log(format!("dropped (on_bad_record = \"drop\"):\n{}\n", dropped.join("\n")).as_bytes())?;
        }
        Ok(Artifact::Dataset { shards: per_file.into_iter().flatten().collect(), root: Some(self.root.clone()) })
    }
}

impl Read {
    /// One file's shards: remembered by the file's digest and how it is read, or read now (and
    /// then `true`).
    /// What it dropped goes to `log` (from the memo, when remembered).
    fn read_file(
        &self,
        ctx: &StageContext<'_>,
        file: &DataFile,
        log: &DropLog,
    ) -> Result<(Vec<ShardRef>, bool), StageError> {
        // The key was computed from this digest (a stat-memo hit, so cheap); if the file changes
        // while it is read, what was read must not be kept under that key.
        let before = ctx.store.file_digest(&file.path)?;
        let memo = serde_json::json!({
            "read file": before.to_hex(),
            "format": file.format.name(),
            "compression": format!("{:?}", file.compression),
            "shard_records": self.shard_records,
            "on_bad_record": self.drop_bad.then_some("drop"),
            // Records from a tar or a Parquet file (its images) name it.
            "name": matches!(file.format, Format::WebDataset | Format::Parquet).then_some(&file.name),
        });
        let key = StageKey(Digest::of(memo.to_string().as_bytes()).0);
        // One file: the stage's own cache entry is the file's; nothing more to remember.
        let remember = self.files.len() > 1;
        if remember && let Some((_, Artifact::Dataset { shards, .. })) = ctx.store.get_action(&key)? {
            // What reading it dropped is remembered with it.
            if let Some(text) = ctx.store.get_log(&key)?
                && let Ok((records, lines)) = serde_json::from_slice::<(u64, Vec<String>)>(&text)
            {
                log.records.fetch_add(records, std::sync::atomic::Ordering::Relaxed);
                log.lines.lock().unwrap_or_else(|e| e.into_inner()).extend(lines);
            }
            return Ok((shards, false));
        }
        let shards = match file.format {
            Format::Jsonl => self.read_jsonl(ctx, file, log)?,
            Format::Json => self.read_json(ctx, file, log)?,
            Format::Parquet => crate::parquet_io::read(ctx, &file.path, &file.name, self.shard_records)?,
            Format::WebDataset => self.read_tar(ctx, file, log)?,
        };
        if ctx.store.file_digest(&file.path)? != before {
            return Err(StageError::input(format!("{} changed while it was being read", file.path.display()))
                .with_hint("run again once whatever writes the file has finished"));
        }
        if !remember {
            return Ok((shards, true));
        }
        let artifact = Artifact::Dataset { shards, root: None };
        let digest = ctx.store.put_artifact(&artifact)?;
        let lines = log.lines.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !lines.is_empty() {
            let records = log.records.load(std::sync::atomic::Ordering::Relaxed);
            ctx.store.put_log(&key, serde_json::json!([records, lines]).to_string().as_bytes())?;
        }
        ctx.store.put_action(&key, &digest)?;
        let Artifact::Dataset { shards, .. } = artifact else { unreachable!() };
        Ok((shards, true))
    }
}

impl Read {
    /// A tar's samples (see [`crate::webdataset`]), cut into shards in tar order.
    fn read_tar(&self, ctx: &StageContext<'_>, file: &DataFile, log: &DropLog) -> Result<Vec<ShardRef>, StageError> {
        use crate::webdataset::OnBad;
        let (mut shards, mut out, mut n) = (Vec::new(), Vec::new(), 0u64);
        let on_bad = if self.drop_bad { OnBad::Drop } else { OnBad::Fail };
        let dropped = crate::webdataset::read_samples(&file.path, &file.name, on_bad, |record| {
            write_record(&record, &mut out);
            n += 1;
            if n == self.shard_records as u64 {
                shards.push(ctx.write_shard(&out, n)?);
                out.clear();
                n = 0;
            }
            Ok(())
        })?;
        if n > 0 {
            shards.push(ctx.write_shard(&out, n)?);
        }
        for d in dropped {
            let sample = d.sample.as_ref().map(|k| format!(" sample `{k}`:")).unwrap_or_default();
            log.note(
                u64::from(d.sample.is_some()),
                format!("{} at offset {}:{sample} {}", file.path.display(), d.offset, d.what),
            );
        }
        Ok(shards)
    }
}

/// A data file's bytes, decompressed as its name says.
fn open(file: &DataFile) -> Result<Box<dyn std::io::Read + Send>, StageError> {
    let f =
        File::open(&file.path).map_err(|e| StageError::input(format!("cannot open {}: {e}", file.path.display())))?;
    Ok(match file.compression {
        Compression::None => Box::new(f),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, f))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(f)
                .map_err(|e| StageError::input(format!("cannot read {} as zstd: {e}", file.path.display())))?,
        ),
    })
}

/// A run of lines of a JSONL file, with the number of its first line.
struct Chunk {
    first_line: u64,
    bytes: Vec<u8>,
}

impl Read {
    fn read_jsonl(&self, ctx: &StageContext<'_>, file: &DataFile, log: &DropLog) -> Result<Vec<ShardRef>, StageError> {
        let mut reader = BufReader::with_capacity(1 << 20, open(file)?);
        let path = file.path.clone();
        let per_shard = self.shard_records;
        let mut line_no = 0u64;
        let mut done = false;
        let drop_bad = self.drop_bad;
        let chunks = std::iter::from_fn(|| {
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
                        let last = if line_no == 0 {
                            "before its first line".to_string()
                        } else {
                            format!("after line {line_no}, the last whole one")
                        };
                        if drop_bad {
                            // Keep the whole lines read; the rest of the file is lost.
                            chunk.bytes.truncate(start);
                            log.note(
                                0,
                                format!("{}: {e} ({last}); the rest of the file is unreadable", path.display()),
                            );
                            break;
                        }
                        return Some(Err(StageError::input(format!("cannot read {}: {e} ({last})", path.display()))
                            .with_hint(
                                "the file is truncated or damaged: write it again, leave it out of `path`, or set \
                                 on_bad_record = \"drop\" to keep what is readable",
                            )));
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
                let record = match parse_record(line) {
                    Ok(record) => record,
                    Err(e) => {
                        let at = format!("{}:{}: {e}", file.path.display(), chunk.first_line + i as u64);
                        if self.drop_bad {
                            log.note(1, at);
                            continue;
                        }
                        return Err(StageError::input(at).with_hint(
                            "each line of a .jsonl file must be one JSON object; fix or remove that line, or set \
                             on_bad_record = \"drop\" to skip such lines",
                        ));
                    }
                };
                write_record(&record, &mut out);
                n += 1;
            }
            if n == 0 {
                return Ok(None);
            }
            ctx.write_shard(&out, n).map(Some)
        })?;
        Ok(shards.into_iter().flatten().collect())
    }

    fn read_json(&self, ctx: &StageContext<'_>, file: &DataFile, log: &DropLog) -> Result<Vec<ShardRef>, StageError> {
        let mut bytes = Vec::new();
        open(file)?
            .read_to_end(&mut bytes)
            .map_err(|e| StageError::input(format!("cannot read {}: {e}", file.path.display())))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| StageError::input(format!("{}: invalid JSON: {e}", file.path.display())))?;
        let serde_json::Value::Array(items) = value else {
            return Err(StageError::input(format!(
                "{}: expected a JSON array of records, found {}",
                file.path.display(),
                json_type(&value)
            ))
            .with_hint("a .json data file holds an array of objects; for one object per line, name the file .jsonl"));
        };
        let mut records = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match item {
                serde_json::Value::Object(m) => records.push(m),
                other => {
                    let what = format!(
                        "{}: element {i} of the array is {}, not an object",
                        file.path.display(),
                        json_type(&other)
                    );
                    if self.drop_bad {
                        log.note(1, what);
                        continue;
                    }
                    return Err(StageError::input(what).with_hint(
                        "fix or remove that element, or set on_bad_record = \"drop\" to skip such elements",
                    ));
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
