//! `write`: a dataset to a file outside the store (JSONL or Parquet, by extension or `format`).
//!
//! The file is written under a temporary name beside its destination, synced, then renamed, so a
//! reader never sees half a file. A cached `write` checks that its file is still there and
//! unchanged (through the stat memo, so without reading it) and writes it again if not.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, StageContext};

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
        let format = match params.choice("format", &["jsonl", "parquet"])? {
            Some(f) => Format::from_name(&f).expect("checked by choice"),
            None => match named {
                Some((f @ (Format::Jsonl | Format::Parquet), _)) => f,
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
        Ok(Arc::new(Write_ { path, format, compression }))
    }
}

struct Write_ {
    path: PathBuf,
    format: Format,
    /// For JSONL: from the name (`.jsonl.gz`, `.jsonl.zst`). The name is in the key already.
    compression: Compression,
}

impl Stage for Write_ {
    fn produces(&self) -> Produces {
        Produces::File
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }

    fn still_valid(&self, artifact: &Artifact, ctx: &StageContext<'_>) -> bool {
        match artifact {
            Artifact::File { path, digest, .. } => {
                path == &self.path && ctx.store.file_digest(path).is_ok_and(|d| &d == digest)
            }
            _ => false,
        }
    }
}

impl WholeStage for Write_ {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let shards = inputs.dataset("data")?;
        let io = |what: &str, e: std::io::Error| {
            StageError::environment(format!("cannot {what} {}: {e}", self.path.display()))
        };
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create the folder of", e))?;
        }
        let file_name = self.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let tmp = self.path.with_file_name(format!(".{file_name}.ladle-{}.tmp", std::process::id()));
        let result = (|| {
            match self.format {
                Format::Parquet => crate::parquet_io::write(ctx, shards, &tmp)?,
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
                        ctx.progress(i as u64 + 1, total);
                    }
                    let file = out.finish().map_err(|e| io("write", e))?;
                    file.sync_all().map_err(|e| io("sync", e))?;
                }
            }
            std::fs::rename(&tmp, &self.path).map_err(|e| io("move the finished file to", e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        let digest = ctx.store.file_digest(&self.path)?;
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(Artifact::File { path: self.path.clone(), digest, size, records: shards.iter().map(|s| s.records).sum() })
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
