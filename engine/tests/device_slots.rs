//! Stages that name the same device never compute at once; others still run side by side.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use common::ShardsKind;
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::events::NoEvents;
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{
    Accepts, Arity, Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage,
    StageKind, WholeStage,
};
use ladle_engine::store::ObjectWriter;
use ladle_engine::{Artifact, Pipeline, Registry, RunOptions, StageContext, Store};

/// How many `hold` stages compute right now, and the most seen at once.
#[derive(Default)]
struct Overlap {
    now: AtomicUsize,
    most: AtomicUsize,
    /// Shards mapped.
    done: AtomicUsize,
}

struct HoldKind {
    overlap: Arc<Overlap>,
    /// Stages without a device meet here: they pass only if two compute at the same time.
    meeting: Arc<Barrier>,
    /// Which stages ran, for a sanity check.
    ran: Arc<Mutex<Vec<String>>>,
}

struct Hold {
    device: Option<String>,
    tag: String,
    overlap: Arc<Overlap>,
    meeting: Arc<Barrier>,
    ran: Arc<Mutex<Vec<String>>>,
}

impl StageKind for HoldKind {
    fn name(&self) -> &'static str {
        "hold"
    }
    fn about(&self) -> &'static str {
        "computes for a while, on a device if given"
    }
    fn ports(&self) -> &'static [PortSpec] {
        &[]
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        Ok(Arc::new(Hold {
            device: params.string("device")?,
            tag: params.required_string("tag")?,
            overlap: self.overlap.clone(),
            meeting: self.meeting.clone(),
            ran: self.ran.clone(),
        }))
    }
}

impl Stage for Hold {
    fn produces(&self) -> Produces {
        Produces::File
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
    fn device_slot(&self) -> Option<String> {
        self.device.clone()
    }
}

impl WholeStage for Hold {
    fn run(&self, _ctx: &StageContext<'_>, _inputs: &Inputs) -> Result<Artifact, StageError> {
        let now = self.overlap.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.overlap.most.fetch_max(now, Ordering::SeqCst);
        if self.device.is_none() {
            self.meeting.wait();
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.overlap.now.fetch_sub(1, Ordering::SeqCst);
        self.ran.lock().unwrap().push(self.tag.clone());
        Ok(Artifact::Metrics { value: serde_json::json!({ "tag": self.tag }) })
    }
}

/// `hold_shards`: maps each shard after holding it a while, on a device if given.
struct HoldShardsKind {
    overlap: Arc<Overlap>,
    meeting: Arc<Barrier>,
}

impl StageKind for HoldShardsKind {
    fn name(&self) -> &'static str {
        "hold_shards"
    }
    fn about(&self) -> &'static str {
        "maps shards slowly, on a device if given"
    }
    fn ports(&self) -> &'static [PortSpec] {
        const PORTS: &[PortSpec] =
            &[PortSpec { name: "data", arity: Arity::One, required: true, accepts: Accepts::Dataset }];
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        Ok(Arc::new(HoldShards {
            device: params.string("device")?,
            overlap: self.overlap.clone(),
            meeting: self.meeting.clone(),
        }))
    }
}

#[derive(Clone)]
struct HoldShards {
    device: Option<String>,
    overlap: Arc<Overlap>,
    meeting: Arc<Barrier>,
}

impl Stage for HoldShards {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Map { port: "data", stage: self }
    }
    fn device_slot(&self) -> Option<String> {
        self.device.clone()
    }
}

impl MapStage for HoldShards {
    fn prepare(
        &self,
        _ctx: &StageContext<'_>,
        _inputs: &Inputs,
        _replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        Ok(Arc::new(self.clone()))
    }
}

impl ShardMapper for HoldShards {
    fn map_shard(&self, shard: &ShardInput<'_>, out: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let now = self.overlap.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.overlap.most.fetch_max(now, Ordering::SeqCst);
        if self.device.is_none() {
            self.meeting.wait();
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.overlap.now.fetch_sub(1, Ordering::SeqCst);
        self.overlap.done.fetch_add(1, Ordering::SeqCst);
        std::io::Write::write_all(out, shard.jsonl).map_err(|e| StageError::input(e.to_string()))?;
        Ok(MappedShard { records: 1, dropped_on_error: 0 })
    }
}

/// Runs a `shards` → `hold_shards` pipeline with `-j 4`: the most shards mapped at once, and how
/// many were mapped.
fn run_map(device: Option<&str>) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let overlap = Arc::new(Overlap::default());
    let mut registry = Registry::new();
    registry.register(Arc::new(ShardsKind { count: 4 }));
    registry.register(Arc::new(HoldShardsKind { overlap: overlap.clone(), meeting: Arc::new(Barrier::new(2)) }));
    let device = device.map(|d| format!("device = \"{d}\"")).unwrap_or_default();
    let toml = format!(
        "[pipeline]\nname = \"map\"\n[stages.src]\nkind = \"shards\"\n[stages.m]\nkind = \"hold_shards\"\ndata = \"src\"\n{device}\n"
    );
    let path = dir.path().join("p.toml");
    let pipeline = Arc::new(Pipeline::parse(&path, toml.as_bytes(), &registry).unwrap());
    let store = Store::open(&dir.path().join(".ladle")).unwrap();
    let options = RunOptions { jobs: 4, ..Default::default() };
    ladle_engine::run(pipeline, &store, &options, Arc::new(NoEvents)).unwrap();
    (overlap.most.load(Ordering::SeqCst), overlap.done.load(Ordering::SeqCst))
}

#[test]
fn shards_on_a_device_compute_one_at_a_time() {
    let (most, records) = run_map(Some("cuda:0"));
    assert_eq!(records, 4);
    assert_eq!(most, 1, "two shards computed on cuda:0 at once");
}

#[test]
fn shards_without_a_device_still_compute_side_by_side() {
    // Shards meet in pairs at a two-party barrier: the run ends only if two compute at once.
    let (most, records) = run_map(None);
    assert_eq!(records, 4);
    assert!(most >= 2);
}

fn run(toml: &str) -> (usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let overlap = Arc::new(Overlap::default());
    let ran = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    registry.register(Arc::new(HoldKind {
        overlap: overlap.clone(),
        meeting: Arc::new(Barrier::new(2)),
        ran: ran.clone(),
    }));
    let path = dir.path().join("p.toml");
    let pipeline = Arc::new(Pipeline::parse(&path, toml.as_bytes(), &registry).unwrap());
    let store = Store::open(&dir.path().join(".ladle")).unwrap();
    let options = RunOptions { jobs: 4, ..Default::default() };
    ladle_engine::run(pipeline, &store, &options, Arc::new(NoEvents)).unwrap();
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    (overlap.most.load(Ordering::SeqCst), ran)
}

#[test]
fn stages_on_one_device_take_turns() {
    let (most, ran) = run(r#"
        [pipeline]
        name = "gpu"
        [stages.a]
        kind = "hold"
        tag = "a"
        device = "cuda:0"
        [stages.b]
        kind = "hold"
        tag = "b"
        device = "cuda:0"
        [stages.c]
        kind = "hold"
        tag = "c"
        device = "cuda:0"
    "#);
    assert_eq!(ran, ["a", "b", "c"]);
    assert_eq!(most, 1, "two stages computed on cuda:0 at once");
}

#[test]
fn stages_without_a_device_still_run_side_by_side() {
    // Each waits at a two-party barrier: the run finishes only if both compute at once.
    let (most, ran) = run(r#"
        [pipeline]
        name = "cpu"
        [stages.a]
        kind = "hold"
        tag = "a"
        [stages.b]
        kind = "hold"
        tag = "b"
    "#);
    assert_eq!(ran, ["a", "b"]);
    assert_eq!(most, 2);
}
