//! ladle's native stages.
//!
//! Each stage kind is one module: it reads its parameters, declares its ports and implements the
//! engine's [`Stage`](ladle_engine::stage::Stage) traits. [`registry`] returns them all for the
//! binary. The model stages ([`perplexity`], [`generate`], [`encode`], [`soup`]) are the glue
//! between records and the models of `ladle-models`: [`image_source`] finds a record's image,
//! [`vlm`] reads the image parameters, [`placement`] reads `device`/`dtype`, [`model_error`] turns a model's error into a stage's.
//! The data stages share [`sources`] (which files `read` reads, and their formats) and
//! [`webdataset`] (tars in and out).
//!
//! The dependency rule: stages → engine and stages → models; the models never see the engine.

pub mod bench;
pub mod bench_llava;
pub mod choose;
pub mod column;
pub mod concat;
pub mod dedup;
pub mod encode;
pub mod exec;
pub mod fixture_check;
pub mod generate;
pub mod image_source;
pub mod model;
pub mod parquet_images;
pub mod parquet_io;
pub mod perplexity;
pub mod placement;
pub mod read;
pub mod sample;
pub mod select;
pub mod soup;
pub mod sources;
pub mod template;
pub mod tensors;
pub mod vlm;
pub mod webdataset;
pub mod write;

use std::sync::Arc;

use ladle_engine::{Registry, StageError};
use ladle_models::llm::ModelError;

/// Every native stage kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(read::ReadKind));
    r.register(Arc::new(write::WriteKind));
    r.register(Arc::new(select::SelectKind));
    r.register(Arc::new(dedup::DedupKind));
    r.register(Arc::new(sample::SampleKind));
    r.register(Arc::new(concat::ConcatKind));
    r.register(Arc::new(model::ModelKind));
    r.register(Arc::new(exec::ExecKind));
    r.register(Arc::new(perplexity::PerplexityKind));
    r.register(Arc::new(generate::GenerateKind));
    r.register(Arc::new(encode::EncodeKind));
    r.register(Arc::new(soup::SoupKind));
    r.register(Arc::new(choose::ChooseKind));
    r
}

/// The JSONL lines of `jsonl` whose flag is set, with their count.
pub(crate) fn keep_lines(jsonl: &[u8], keep: impl Iterator<Item = bool>) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut n = 0;
    for (line, k) in ladle_engine::records::lines(jsonl).zip(keep) {
        if k {
            out.extend_from_slice(line);
            out.push(b'\n');
            n += 1;
        }
    }
    (out, n)
}

/// A model's error as a stage's: a computation that failed is ladle's fault (internal), anything
/// else (a config, a tokenizer, weights, an image, a device) is the input's.
pub fn model_error(e: ModelError) -> StageError {
    match e {
        ModelError::Compute(_) => StageError::internal(e.to_string()),
        _ => StageError::input(e.to_string()),
    }
}
