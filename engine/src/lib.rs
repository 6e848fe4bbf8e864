//! ladle's engine: pipeline files, the stage graph, the content-addressed store, cache keys, the
//! scheduler, events and run records.
//!
//! The engine has no ML code and no WASM: it knows stages only through the traits in [`stage`]
//! and a [`Registry`] filled by the crates that implement them (see `engine/README.md` for the
//! dependency rule).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ladle_engine::{Pipeline, Registry, RunOptions, Store, events::NoEvents};
//!
//! let registry = Registry::new(); // filled by ladle-stages in the real binary
//! let pipeline = Arc::new(Pipeline::load("pipelines/example.toml".as_ref(), &registry)?);
//! let store = Store::open(&pipeline.dir.join(".ladle"))?;
//! let record = ladle_engine::run(pipeline, &store, &RunOptions::default(), Arc::new(NoEvents))?;
//! println!("run {} finished: {:?}", record.id, record.status);
//! # Ok::<(), ladle_engine::Error>(())
//! ```

pub mod artifact;
pub mod context;
pub mod digest;
pub mod error;
pub mod events;
pub mod executor;
pub mod key;
pub mod pipeline;
pub mod plan;
pub mod record_files;
pub mod records;
pub mod registry;
pub mod resolve;
pub mod resources;
pub mod runs;
pub mod scheduler;
pub mod stage;
pub mod store;
pub mod units;

pub use artifact::{Artifact, FileRef, ShardRef};
pub use context::StageContext;
pub use digest::{ArtifactDigest, Digest, ShardKey, StageKey};
pub use error::{Category, Error, PipelineError, Result, StageError};
pub use pipeline::Pipeline;
pub use registry::Registry;
pub use scheduler::{RunOptions, run};
pub use store::{ObjectWriter, Store};
