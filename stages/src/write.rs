//! `write`: a dataset to a file outside the store (JSONL or Parquet, by extension or `format`).
//!
//! The file is written under a temporary name beside its destination, synced, then renamed, so a
//! reader never sees half a file. A cached `write` checks that its file is still there and
//! unchanged (through the stat memo, so without reading it) and writes it again if not.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladle_engine::digest::{Digest, StageKey};
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::write_record;
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, ShardInput, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, FileRef, StageContext};
use serde_json::{Map, Value};

use crate::sources::{Compression, Format};

pub struct WriteKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data")];

impl StageKind for WriteKind {
    fn name(&self) -> &'static str {
        "write"
    }
    fn about(&self) -> &'static str {
        "a dataset to a .jsonl or .parquet file"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let path = params.output_path("path")?.ok_or_else(|| params.missing("path", "where to write the file"))?;
        let named = Format::from_path(&path);
        let compression = named.map_or(Compression::None, |(_, c)| c);
        let format = match params.choice("format", &["jsonl", "parquet", "webdataset"])? {
            Some(f) => Format::from_name(&f).expect("checked by choice"),
            None => match named {
                Some((f @ (Format::Jsonl | Format::Parquet | Format::WebDataset), _)) => f,
                _ => {
                    let mut e = params
                        .error("path", format!("cannot tell the format of `{}` from its extension", path.display()));
                    e.hint = Some(
                        "name it .jsonl, .jsonl.gz, .jsonl.zst or .parquet, or set format = \"jsonl\" | \"parquet\""
                            .into(),
                    );
                    return Err(e);
                }
            },
        };
        if format == Format::Parquet && compression != Compression::None {
            return Err(params.error("path", "Parquet compresses inside the file: name it .parquet"));
        }
        params.record("format", format!("{format:?}").to_lowercase().into());
        if path.is_dir() {
            return Err(params.error("path", format!("`{}` is a folder; `write` writes a file", path.display())));
        }
        let pattern = match ShardPattern::parse(&path) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => return Err(params.error("path", e)),
            None => None,
        };
        let tars = if format == Format::WebDataset {
            if pattern.is_none() {
                let mut e = params.error("path", "a WebDataset is a set of tars: name them with the shard number");
                e.hint = Some("write path = \"out/{shard:05}.tar\"".into());
                return Err(e);
            }
            let image = match params.string("image")? {
                Some(src) => Some(crate::image_source::ImageField::parse(&src).map_err(|e| params.error("image", e))?),
                None => None,
            };
            let text = match params.string("text")? {
                Some(src) => Some(crate::template::Template::parse(&src).map_err(|e| params.error("text", e))?),
                None => None,
            };
            let samples_per_tar = params.positive("samples_per_tar")?;
            Some(TarOptions { image, text, samples_per_tar })
        } else {
            None
        };
        Ok(Arc::new(Write_ { path, pattern, format, compression, tars }))
    }
}

struct Write_ {
    path: PathBuf,
    /// `{shard:05}` in the name: one file per shard.
    pattern: Option<ShardPattern>,
    format: Format,
    /// For JSONL: from the name (`.jsonl.gz`, `.jsonl.zst`). The name is in the key already.
    compression: Compression,
    /// For a WebDataset.
    tars: Option<TarOptions>,
}

/// How a WebDataset output makes its samples (see [`crate::webdataset::TarWriter`]).
struct TarOptions {
    image: Option<crate::image_source::ImageField>,
    text: Option<crate::template::Template>,
    /// Samples a tar; default: a tar per shard.
    samples_per_tar: Option<u64>,
}

impl Stage for Write_ {
    fn produces(&self) -> Produces {
        if self.pattern.is_some() { Produces::Folder } else { Produces::File }
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }

    fn still_valid(&self, artifact: &Artifact, ctx: &StageContext<'_>) -> bool {
        match (artifact, &self.pattern) {
            (Artifact::File { path, digest, .. }, None) => {
                path == &self.path && ctx.store.file_digest(path).is_ok_and(|d| &d == digest)
            }
            (Artifact::Folder { external: Some(dir), files, .. }, Some(pattern)) => {
                dir == &pattern.dir
                    && files.iter().all(|f| ctx.store.file_digest(&dir.join(&f.path)).is_ok_and(|d| d == f.digest))
                    && pattern.existing().is_ok_and(|e| e.len() == files.len())
            }
            _ => false,
        }
    }
}

impl WholeStage for Write_ {
    /// Tars and Parquet files are made of the bytes the records point at (images in tars,
    /// Parquet rows or files), so those files' digests are in the key: one changed in place
    /// writes the output again. JSONL copies records, references and all.
    fn record_files_port(&self) -> Option<&'static str> {
        matches!(self.format, Format::Parquet | Format::WebDataset).then_some("data")
    }

    fn record_files(&self, inputs: &Inputs, shard: &ShardInput<'_>) -> Result<Vec<PathBuf>, StageError> {
        let root = inputs.dataset_root("data");
        let image = self.tars.as_ref().and_then(|t| t.image.as_ref());
        let mut files = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, line) in ladle_engine::records::lines(shard.jsonl).enumerate() {
            let record = ladle_engine::records::parse_record(line)
                .map_err(|e| StageError::internal(e).at_record(shard.first_record + i as u64))?;
            let mut found: Vec<PathBuf> =
                record.values().filter_map(|v| crate::image_source::referenced_file(v, root.as_deref())).collect();
            if let Some(field) = image
                && let Ok(located) = field.locate(&record, root.as_deref())
                && let Some(path) = located.file()
            {
                found.push(path.to_path_buf());
            }
            // Each file once, in the order records first name it: its digest is what counts.
            files.extend(found.into_iter().filter(|f| seen.insert(f.clone())));
        }
        Ok(files)
    }

    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let shards = inputs.dataset("data")?;
        let Some(pattern) = &self.pattern else {
            self.write_file(ctx, shards, inputs.dataset_root("data").as_deref(), &self.path, true)?;
            let digest = ctx.store.file_digest(&self.path)?;
            let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
            let records = shards.iter().map(|s| s.records).sum();
            return Ok(Artifact::File { path: self.path.clone(), digest, size, records });
        };
        if let Some(options) = &self.tars {
            return self.write_tars(ctx, inputs, pattern, options);
        }
        // One file per shard. A file already holding what its shard makes is left alone: the
        // shard's digest (and how it is written) is remembered with the file's digest.
        let root = inputs.dataset_root("data");
        let mut files = Vec::with_capacity(shards.len());
        let (mut written, total) = (0u64, shards.len() as u64);
        for (i, shard) in shards.iter().enumerate() {
            let dest = pattern.path(i);
            let memo = serde_json::json!({
                "write shard": shard.digest.to_hex(),
                "format": self.format.name(),
                "compression": format!("{:?}", self.compression),
            });
            let key = StageKey(Digest::of(memo.to_string().as_bytes()).0);
            let (file, wrote) = write_part(ctx, &key, &dest, shard.records, || {
                self.write_file(ctx, std::slice::from_ref(shard), root.as_deref(), &dest, false)
            })?;
            written += u64::from(wrote);
            files.push(file);
            ctx.progress(i as u64 + 1, total);
        }
        ctx.report_work("file(s)", total, written);
        pattern.remove_beyond(files.len())?;
        Ok(Artifact::Folder { model: false, external: Some(pattern.dir.clone()), files, metrics: None })
    }
}

impl Write_ {
    /// A WebDataset: tars of `samples_per_tar` samples (a tar per shard by default), each left
    /// alone when it already holds what it would be written with (its records, and the digests
    /// of the files their images come from).
    fn write_tars(
        &self,
        ctx: &StageContext<'_>,
        inputs: &Inputs,
        pattern: &ShardPattern,
        options: &TarOptions,
    ) -> Result<Artifact, StageError> {
        let shards = inputs.dataset("data")?;
        let layout = crate::webdataset::SampleLayout {
            image: options.image.clone(),
            text: options.text.clone(),
            root: inputs.dataset_root("data"),
        };
        let mut files = Vec::new();
        let mut written = 0u64;
        let mut unit: Vec<Map<String, Value>> = Vec::new();
        let mut position = 0u64;
        let mut write_unit = |unit: &mut Vec<Map<String, Value>>, first: u64| -> Result<(), StageError> {
            if unit.is_empty() {
                return Ok(());
            }
            let index = files.len();
            let dest = pattern.path(index);
            // What the tar depends on: its records, where they start, and the files they point into.
            let mut hasher = blake3::Hasher::new();
            hasher.update(format!("webdataset tar v1 {first} {:?} {:?}", options.image, options.text).as_bytes());
            let mut seen = std::collections::BTreeSet::new();
            for record in unit.iter() {
                let mut line = Vec::new();
                write_record(record, &mut line);
                hasher.update(&line);
                for field in record.values() {
                    if let Some(Value::String(tar)) = field.get("tar")
                        && seen.insert(tar.clone())
                        && let Some(root) = &layout.root
                    {
                        hasher.update(&ctx.store.file_digest(&root.join(tar))?.0);
                    }
                }
                if let Some(image) = &layout.image
                    && let Ok(found) = image.locate(record, layout.root.as_deref())
                    && let Some(path) = found.file()
                    && seen.insert(path.display().to_string())
                {
                    hasher.update(&ctx.store.file_digest(path)?.0);
                }
            }
            let key = StageKey(*hasher.finalize().as_bytes());
            let (file, wrote) = write_part(ctx, &key, &dest, unit.len() as u64, || {
                let io = |e: std::io::Error| StageError::environment(format!("cannot write {}: {e}", dest.display()));
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                let name = dest.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let tmp = dest.with_file_name(format!(".{name}.ladle-{}.tmp", std::process::id()));
                let result = (|| {
                    let file = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
                    let mut tar = crate::webdataset::TarWriter::new(file);
                    for (i, record) in unit.iter().enumerate() {
                        tar.sample(record, first + i as u64, &layout)
                            .map_err(|e| StageError::input(e).at_record(first + i as u64))?;
                    }
                    let file = tar.finish().map_err(io)?.into_inner().map_err(|e| io(e.into_error()))?;
                    file.sync_all().map_err(io)?;
                    std::fs::rename(&tmp, &dest).map_err(io)
                })();
                if result.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                result
            })?;
            written += u64::from(wrote);
            files.push(file);
            unit.clear();
            Ok(())
        };
        let mut first = 0u64;
        for shard in shards {
            let bytes = ctx.read_shard(shard)?;
            for line in ladle_engine::records::lines(&bytes) {
                let record = ladle_engine::records::parse_record(line).map_err(StageError::internal)?;
                unit.push(record);
                position += 1;
                if options.samples_per_tar.is_some_and(|n| unit.len() as u64 == n) {
                    write_unit(&mut unit, first)?;
                    first = position;
                }
            }
            if options.samples_per_tar.is_none() {
                write_unit(&mut unit, first)?;
                first = position;
            }
        }
        write_unit(&mut unit, first)?;
        ctx.report_work("file(s)", files.len() as u64, written);
        pattern.remove_beyond(files.len())?;
        Ok(Artifact::Folder { model: false, external: Some(pattern.dir.clone()), files, metrics: None })
    }

    /// Writes `shards` to `dest` atomically: a temporary file beside it, synced, then renamed.
    fn write_file(
        &self,
        ctx: &StageContext<'_>,
        shards: &[ladle_engine::ShardRef],
        root: Option<&Path>,
        dest: &Path,
        progress: bool,
    ) -> Result<(), StageError> {
        let io =
            |what: &str, e: std::io::Error| StageError::environment(format!("cannot {what} {}: {e}", dest.display()));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create the folder of", e))?;
        }
        let file_name = dest.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{file_name}.ladle-{}.tmp", std::process::id()));
        let result = (|| {
            match self.format {
                Format::Parquet => crate::parquet_io::write(ctx, shards, root, &tmp)?,
                _ => {
                    let out =
                        std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(|e| io("create", e))?);
                    let mut out: Box<dyn Finish> = match self.compression {
                        Compression::None => Box::new(out),
                        Compression::Gzip => {
                            Box::new(flate2::write::GzEncoder::new(out, flate2::Compression::default()))
                        }
                        Compression::Zstd => {
                            Box::new(zstd::stream::write::Encoder::new(out, 3).map_err(|e| io("write", e))?)
                        }
                    };
                    let total = shards.len() as u64;
                    for (i, s) in shards.iter().enumerate() {
                        out.write_all(&ctx.read_shard(s)?).map_err(|e| io("write", e))?;
                        if progress {
                            ctx.progress(i as u64 + 1, total);
                        }
                    }
                    let file = out.finish().map_err(|e| io("write", e))?;
                    file.sync_all().map_err(|e| io("sync", e))?;
                }
            }
            std::fs::rename(&tmp, dest).map_err(|e| io("move the finished file to", e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// One part of a sharded output at `dest`, remembered under `key` (what the part is made from):
/// written by `write` unless the file already holds what was written for that key before.
/// Returns the part and whether it was written.
fn write_part(
    ctx: &StageContext<'_>,
    key: &StageKey,
    dest: &Path,
    records: u64,
    write: impl FnOnce() -> Result<(), StageError>,
) -> Result<(FileRef, bool), StageError> {
    let done = match ctx.store.get_action(key)? {
        Some((_, Artifact::File { digest, .. })) => ctx.store.file_digest(dest).ok() == Some(digest),
        _ => false,
    };
    if !done {
        write()?;
    }
    let digest = ctx.store.file_digest(dest)?;
    let size = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    if !done {
        let made = Artifact::File { path: dest.to_path_buf(), digest, size, records };
        let d = ctx.store.put_artifact(&made)?;
        ctx.store.put_action(key, &d)?;
    }
    let path = dest.file_name().unwrap_or_default().to_string_lossy().into_owned();
    Ok((FileRef { path, digest, size }, !done))
}

/// `{shard}` or `{shard:05}` in an output file's name: one file per shard.
#[derive(Debug, Clone)]
struct ShardPattern {
    dir: PathBuf,
    prefix: String,
    width: usize,
    suffix: String,
}

impl ShardPattern {
    /// The pattern in `path`, if it has one.
    fn parse(path: &Path) -> Option<Result<ShardPattern, String>> {
        let text = path.to_string_lossy();
        let start = text.find("{shard")?;
        let Some(len) = text[start..].find('}') else {
            return Some(Err(format!("`{text}`: `{{shard` is never closed")));
        };
        let spec = &text[start + 6..start + len];
        let width = match spec.strip_prefix(':') {
            None if spec.is_empty() => 1,
            Some(w) if !w.is_empty() && w.chars().all(|c| c.is_ascii_digit()) && w.len() <= 2 => w.parse().unwrap_or(1),
            _ => return Some(Err(format!("`{text}`: write the shard number as {{shard}} or {{shard:05}}"))),
        };
        let (prefix, suffix) = (&text[..start], &text[start + len + 1..]);
        if suffix.contains('/') || suffix.contains("{shard") {
            return Some(Err(format!("`{text}`: {{shard}} goes once, in the file name")));
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Some(Ok(ShardPattern { dir, prefix: prefix.to_string(), width, suffix: suffix.to_string() }))
    }

    fn path(&self, shard: usize) -> PathBuf {
        PathBuf::from(format!("{}{shard:0width$}{}", self.prefix, self.suffix, width = self.width))
    }

    /// Removes the files of the pattern numbered `count` and above: parts of a longer output
    /// before, which a reader of the folder must not take for part of this one.
    fn remove_beyond(&self, count: usize) -> Result<(), StageError> {
        for (_, stale) in self.existing()?.into_iter().filter(|(i, _)| *i >= count) {
            std::fs::remove_file(&stale)
                .map_err(|e| StageError::environment(format!("cannot remove {}: {e}", stale.display())))?;
        }
        Ok(())
    }

    /// The files in the pattern's folder it matches, with their shard numbers.
    fn existing(&self) -> Result<Vec<(usize, PathBuf)>, StageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(_) => return Ok(Vec::new()),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let text = path.to_string_lossy();
            if let Some(n) = text.strip_prefix(&self.prefix).and_then(|r| r.strip_suffix(&self.suffix))
                && n.len() >= self.width
                && n.chars().all(|c| c.is_ascii_digit())
                && let Ok(i) = n.parse::<usize>()
                && self.path(i) == path
            {
                out.push((i, path));
            }
        }
        Ok(out)
    }
}

/// A writer that ends its stream (a compressor's trailer) and hands back the file.
trait Finish: Write {
    fn finish(self: Box<Self>) -> std::io::Result<File>;
}

impl Finish for std::io::BufWriter<File> {
    fn finish(self: Box<Self>) -> std::io::Result<File> {
        self.into_inner().map_err(|e| e.into_error())
    }
}

impl Finish for flate2::write::GzEncoder<std::io::BufWriter<File>> {
    fn finish(self: Box<Self>) -> std::io::Result<File> {
        flate2::write::GzEncoder::finish(*self)?.into_inner().map_err(|e| e.into_error())
    }
}

impl Finish for zstd::stream::write::Encoder<'static, std::io::BufWriter<File>> {
    fn finish(self: Box<Self>) -> std::io::Result<File> {
        zstd::stream::write::Encoder::finish(*self)?.into_inner().map_err(|e| e.into_error())
    }
}
