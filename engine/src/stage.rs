//! The contract between the engine and stage implementations.
//!
//! The engine knows stages only through these traits and the [`Registry`](crate::Registry). A
//! [`StageKind`] declares its input ports and turns parameters into a configured [`Stage`]. A stage
//! is either a *map* stage — a function of one shard at a time, which the engine caches, commits
//! and parallelizes shard by shard — or a *whole* stage that sees its inputs entire.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::artifact::{Artifact, ShardRef};
use crate::context::StageContext;
use crate::digest::Digest;
use crate::error::{PipelineError, StageError};
use crate::pipeline::params::Params;
use crate::store::ObjectWriter;

/// How many stages a port connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    /// `port = "stage"`
    One,
    /// `port = ["a", "b"]` (a single string is accepted too)
    Many,
}

/// What a port accepts, checked before anything runs where the producer's kind tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    Dataset,
    Model,
    Any,
}

#[derive(Debug, Clone, Copy)]
pub struct PortSpec {
    pub name: &'static str,
    pub arity: Arity,
    pub required: bool,
    pub accepts: Accepts,
}

impl PortSpec {
    pub const fn dataset(name: &'static str) -> Self {
        PortSpec { name, arity: Arity::One, required: true, accepts: Accepts::Dataset }
    }
}

/// What a stage kind produces, so ports can be checked before a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Produces {
    Dataset,
    /// Per-record tensors (see [`Artifact::Tensors`]); a map stage that produces them writes a
    /// safetensors file per shard.
    Tensors,
    Model,
    /// Decided at run time (an `exec` stage makes a model when its folder holds a config.json).
    Folder,
    File,
    /// Some of its input artifacts ([`Artifact::Chosen`]), whose kind is checked when they are
    /// known.
    Chosen,
}

/// A kind of stage: `read`, `select`, `exec`, ...
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// One line for `ladle` help texts.
    fn about(&self) -> &'static str;
    fn ports(&self) -> &'static [PortSpec];
    /// A parameter whose table names further input ports chosen by the user
    /// (`inputs = { data = "captions", base = "model" }` for `exec`).
    fn port_table(&self) -> Option<&'static str> {
        None
    }
    /// Reads and checks parameters; every parameter not read is reported as unknown.
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError>;
}

/// A configured stage.
pub trait Stage: Send + Sync {
    /// What the stage outputs, so ports can be checked before anything runs.
    fn produces(&self) -> Produces;
    /// Bumped when the implementation changes what it outputs; part of the cache key.
    fn version(&self) -> u32 {
        1
    }
    fn execution(&self) -> Execution<'_>;
    /// Whether an output cached earlier can still be served as is (`write` checks that its file
    /// is still there, unchanged).
    fn still_valid(&self, _artifact: &Artifact, _ctx: &StageContext<'_>) -> bool {
        true
    }
    /// A device the stage holds alone while it computes (`"cuda:0"`): stages naming the same
    /// device take turns, so two models never share one GPU's memory. Held only when something
    /// is computed (not for a cached stage or cached shards), before any `-j` work slot.
    fn device_slot(&self) -> Option<String> {
        None
    }
    /// How many of the machine's GPUs a whole stage holds alone while it runs (an `exec`
    /// trainer's `gpus = N`); they are in [`StageContext::gpus`](crate::StageContext). A stage's
    /// `resources = { gpus = N }` asks the same of the local executor.
    fn gpus(&self) -> u32 {
        0
    }
    /// How many shards of a map stage with a [`Stage::device_slot`] compute at once. Each
    /// `map_shard` on a GPU runs the model on its own stream with its own activations, so `-j`
    /// of them at once (16 on a 16-core GPU machine) multiply its memory and contend for it; one
    /// at a time keeps the device full with the largest batches instead. Ignored without a device.
    fn device_shards(&self) -> usize {
        1
    }
    /// How many copies of a map stage's model compute its shards side by side, each prepared
    /// once ([`MapStage::prepare`]) and holding its own device ([`Stage::replica_slot`]):
    /// one per GPU of a machine (`devices = ["cuda:0", "cuda:1"]`, `device = "cuda:all"`). A
    /// shard goes to the replica with the fewest shards in flight; every replica computes the
    /// same outputs, so which one a shard meets changes nothing. Ignored for whole stages.
    fn replicas(&self) -> usize {
        1
    }
    /// The device replica `replica` holds alone while the stage computes ([`Stage::device_slot`]
    /// for every replica unless a stage spreads them over devices).
    fn replica_slot(&self, _replica: usize) -> Option<String> {
        self.device_slot()
    }
}

pub enum Execution<'a> {
    /// Maps each shard of the dataset on `port` to one output shard.
    Map {
        port: &'static str,
        stage: &'a dyn MapStage,
    },
    Whole(&'a dyn WholeStage),
}

/// A stage that maps shards. `prepare` runs once per replica (see [`Stage::replicas`]; one for
/// most stages) per stage run, and only when some shard is not cached (load a model here, not
/// per shard).
pub trait MapStage: Send + Sync {
    /// Prepares replica `replica` (its model on that replica's device), when the first shard
    /// goes to it. Stages without replicas are only asked for replica 0.
    fn prepare(
        &self,
        ctx: &StageContext<'_>,
        inputs: &Inputs,
        replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError>;

    /// Whether the records name files outside the store whose contents the output depends on
    /// (the images a scorer reads). Such a stage's shard keys, and its stage key, include the
    /// digests of those files (see [`crate::record_files`]), so editing one image recomputes
    /// the shards that name it and nothing else.
    fn reads_record_files(&self) -> bool {
        false
    }

    /// The files the records of `shard` name, in record order. Called for every shard on every
    /// run, before the cache is consulted, so it only parses records. A record whose path cannot
    /// be formed is skipped here: `map_shard` reports it (or drops it) with the record's position.
    fn record_files(&self, _inputs: &Inputs, _shard: &ShardInput<'_>) -> Result<Vec<PathBuf>, StageError> {
        Ok(Vec::new())
    }
}

pub trait ShardMapper: Send + Sync {
    /// Maps one shard of canonical JSONL (see [`crate::records`]) to an output shard written
    /// into `out`: canonical JSONL, or a safetensors file for a stage that produces
    /// [`Produces::Tensors`]. Write as the output is made: `out` spills to disk past a few MiB,
    /// so a shard's output need not fit in memory. On an error, what was written is discarded.
    fn map_shard(&self, shard: &ShardInput<'_>, out: &mut ObjectWriter) -> Result<MappedShard, StageError>;
}

pub struct ShardInput<'a> {
    /// Position of the shard in the dataset.
    pub index: usize,
    /// Position of the shard's first record in the dataset.
    pub first_record: u64,
    /// The shard's digest: a name for its contents that does not depend on where it sits.
    pub digest: Digest,
    pub jsonl: &'a [u8],
}

/// What a mapper reports of the shard it wrote.
#[derive(Debug, Default)]
pub struct MappedShard {
    /// Records (or tensor rows) in the output shard.
    pub records: u64,
    /// Records dropped because processing them failed (a plugin with `on_error = "drop"`).
    pub dropped_on_error: u64,
}

pub trait WholeStage: Send + Sync {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError>;

    /// The dataset port whose records name files outside the store that the output is made
    /// from (a `write` copying images into tars or Parquet), if any. Their digests join the stage
    /// key as a map stage's [record files](MapStage::reads_record_files) do, so a cached output
    /// is not kept once one of those files changed in place.
    fn record_files_port(&self) -> Option<&'static str> {
        None
    }

    /// The files the records of `shard` (of the [`WholeStage::record_files_port`] dataset)
    /// name, as [`MapStage::record_files`].
    fn record_files(&self, _inputs: &Inputs, _shard: &ShardInput<'_>) -> Result<Vec<PathBuf>, StageError> {
        Ok(Vec::new())
    }
}

/// The artifacts connected to a stage's ports.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Inputs {
    pub ports: BTreeMap<String, Vec<Artifact>>,
    /// The pipeline file's folder, which relative dataset roots are relative to.
    pub pipeline_dir: PathBuf,
    /// What made each artifact of a port, for messages: the stage's name (`pick[1]` for the
    /// second member of a chosen set).
    #[serde(default)]
    pub names: BTreeMap<String, Vec<String>>,
}

impl Inputs {
    /// Inputs from the source stages of each port (name and output), a chosen set standing for
    /// its items.
    pub fn from_sources<'a>(
        pipeline_dir: PathBuf,
        ports: impl IntoIterator<Item = (String, Vec<(&'a str, &'a Artifact)>)>,
    ) -> Inputs {
        let mut inputs = Inputs { pipeline_dir, ..Default::default() };
        for (port, sources) in ports {
            let (mut artifacts, mut names) = (Vec::new(), Vec::new());
            for (name, artifact) in sources {
                match artifact {
                    Artifact::Chosen { items } => {
                        artifacts.extend(items.iter().cloned());
                        names.extend((0..items.len()).map(|i| format!("{name}[{i}]")));
                    }
                    other => {
                        artifacts.push(other.clone());
                        names.push(name.to_string());
                    }
                }
            }
            inputs.ports.insert(port.clone(), artifacts);
            inputs.names.insert(port, names);
        }
        inputs
    }

    /// The name of what made artifact `i` of `port` (its stage), or its position.
    pub fn name(&self, port: &str, i: usize) -> String {
        self.names.get(port).and_then(|n| n.get(i)).cloned().unwrap_or_else(|| format!("{port}[{i}]"))
    }

    pub fn all(&self, port: &str) -> &[Artifact] {
        self.ports.get(port).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn one(&self, port: &str) -> Result<&Artifact, StageError> {
        self.all(port).first().ok_or_else(|| StageError::internal(format!("input port `{port}` is not connected")))
    }

    /// The folder that relative paths in the records on `port` resolve against, when known
    /// (see [`Artifact::Dataset`]).
    pub fn dataset_root(&self, port: &str) -> Option<PathBuf> {
        match self.all(port).first() {
            Some(Artifact::Dataset { root: Some(root), .. }) => Some(self.pipeline_dir.join(root)),
            _ => None,
        }
    }

    /// The shards of the dataset on `port`.
    pub fn dataset(&self, port: &str) -> Result<&[ShardRef], StageError> {
        match self.one(port)? {
            Artifact::Dataset { shards, .. } => Ok(shards),
            other => {
                Err(StageError::input(format!("input `{port}` must be a dataset, but it is a {}", other.kind_name())))
            }
        }
    }
}
