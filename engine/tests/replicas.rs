//! A map stage with several model replicas spreads its shards over all of them, prepares each
//! once, holds each replica's device, and gives the outputs one replica gives.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ShardsKind;
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::events::NoEvents;
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{
    Accepts, Arity, Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage,
    StageKind,
};
use ladle_engine::store::ObjectWriter;
use ladle_engine::{Pipeline, Registry, RunOptions, StageContext, Store};

const SHARDS: usize = 12;

/// What the replicas did, seen from outside.
#[derive(Default)]
struct Seen {
    /// Times each replica was prepared.
    prepared: Mutex<Vec<usize>>,
    /// Shards each replica mapped.
    mapped: Mutex<Vec<usize>>,
    /// Shards on each device now, and the most seen at once on any one device.
    on_device: Mutex<Vec<usize>>,
    most_on_a_device: AtomicUsize,
}

/// `square`: each record's `i` squared, computed by whichever replica the engine picks:
/// `devices = [...]` (one replica each; "cpu" holds no device slot) or `replicas = N`.
struct SquareKind {
    seen: Arc<Seen>,
}

struct Square {
    devices: Vec<String>,
    seen: Arc<Seen>,
}

impl StageKind for SquareKind {
    fn name(&self) -> &'static str {
        "square"
    }
    fn about(&self) -> &'static str {
        "squares `i`, on replicas"
    }
    fn ports(&self) -> &'static [PortSpec] {
        const PORTS: &[PortSpec] =
            &[PortSpec { name: "data", arity: Arity::One, required: true, accepts: Accepts::Dataset }];
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let devices = params.string_list("devices")?;
        params.exclude_from_key("devices");
        let replicas = params.positive("replicas")?;
        params.exclude_from_key("replicas");
        let devices = devices.unwrap_or_else(|| vec!["cpu".into(); replicas.unwrap_or(1) as usize]);
        let n = devices.len();
        *self.seen.prepared.lock().unwrap() = vec![0; n];
        *self.seen.mapped.lock().unwrap() = vec![0; n];
        *self.seen.on_device.lock().unwrap() = vec![0; n];
        Ok(Arc::new(Square { devices, seen: self.seen.clone() }))
    }
}

impl Stage for Square {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Map { port: "data", stage: self }
    }
    fn device_slot(&self) -> Option<String> {
        self.replica_slot(0)
    }
    fn replicas(&self) -> usize {
        self.devices.len()
    }
    fn replica_slot(&self, replica: usize) -> Option<String> {
        self.devices.get(replica).filter(|d| *d != "cpu").cloned()
    }
}

impl MapStage for Square {
    fn prepare(
        &self,
        _ctx: &StageContext<'_>,
        _inputs: &Inputs,
        replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        self.seen.prepared.lock().unwrap()[replica] += 1;
        let slot = self.replica_slot(replica).map(|_| replica);
        Ok(Arc::new(SquareReplica { replica, slot, seen: self.seen.clone() }))
    }
}

struct SquareReplica {
    replica: usize,
    /// The device's index in `seen.on_device`, for a replica that holds one.
    slot: Option<usize>,
    seen: Arc<Seen>,
}

impl ShardMapper for SquareReplica {
    fn map_shard(&self, shard: &ShardInput<'_>, out: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        if let Some(d) = self.slot {
            let now = {
                let mut on = self.seen.on_device.lock().unwrap();
                on[d] += 1;
                on[d]
            };
            self.seen.most_on_a_device.fetch_max(now, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(30));
        if let Some(d) = self.slot {
            self.seen.on_device.lock().unwrap()[d] -= 1;
        }
        self.seen.mapped.lock().unwrap()[self.replica] += 1;
        let record: serde_json::Value =
            serde_json::from_slice(shard.jsonl.trim_ascii_end()).map_err(|e| StageError::input(e.to_string()))?;
        let i = record["i"].as_u64().unwrap_or(0);
        let line = format!("{{\"i\":{i},\"square\":{}}}\n", i * i);
        std::io::Write::write_all(out, line.as_bytes()).map_err(|e| StageError::input(e.to_string()))?;
        Ok(MappedShard { records: 1, dropped_on_error: 0 })
    }
}

/// Runs `shards` → `square` with `-j 4` and the given `square` parameters: the output's digest
/// and what the replicas did.
fn run_square(params: &str) -> (String, Arc<Seen>) {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let mut registry = Registry::new();
    registry.register(Arc::new(ShardsKind { count: SHARDS }));
    registry.register(Arc::new(SquareKind { seen: seen.clone() }));
    let toml = format!(
        "[pipeline]\nname = \"replicas\"\n[stages.src]\nkind = \"shards\"\n[stages.sq]\nkind = \"square\"\ndata = \"src\"\n{params}\n"
    );
    let path = dir.path().join("p.toml");
    let pipeline = Arc::new(Pipeline::parse(&path, toml.as_bytes(), &registry).unwrap());
    let store = Store::open(&dir.path().join(".ladle")).unwrap();
    let options = RunOptions { jobs: 4, ..Default::default() };
    let record = ladle_engine::run(pipeline, &store, &options, Arc::new(NoEvents)).unwrap();
    let sq = record.stages.iter().find(|s| s.stage == "sq").expect("the square stage ran");
    assert_eq!(sq.error, None);
    (sq.artifact.clone().expect("an output"), seen)
}

#[test]
fn cpu_replicas_share_the_shards_and_give_one_replicas_output() {
    let (one, seen_one) = run_square("");
    assert_eq!(*seen_one.mapped.lock().unwrap(), vec![SHARDS]);
    for params in ["replicas = 3", r#"devices = ["cpu", "cpu"]"#] {
        let (many, seen) = run_square(params);
        assert_eq!(many, one, "{params}: the output differs from one replica's");
        let mapped = seen.mapped.lock().unwrap().clone();
        assert_eq!(mapped.iter().sum::<usize>(), SHARDS, "{params}: {mapped:?}");
        assert!(mapped.iter().all(|&n| n > 0), "{params}: a replica computed nothing: {mapped:?}");
        assert!(seen.prepared.lock().unwrap().iter().all(|&n| n == 1), "{params}: each replica is prepared once");
    }
}

#[test]
fn device_replicas_take_one_shard_each_at_a_time_and_all_of_them_work() {
    let (one, _) = run_square("");
    let (many, seen) = run_square(r#"devices = ["cuda:0", "cuda:1"]"#);
    assert_eq!(many, one);
    let mapped = seen.mapped.lock().unwrap().clone();
    assert!(mapped.iter().all(|&n| n > 0), "{mapped:?}");
    // device_shards is 1: never two shards on one device, though -j 4 would allow it.
    assert_eq!(seen.most_on_a_device.load(Ordering::SeqCst), 1);
    let prepared: BTreeSet<usize> = seen.prepared.lock().unwrap().iter().copied().collect();
    assert_eq!(prepared, BTreeSet::from([1]));
}
