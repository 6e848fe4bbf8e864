//! A model stage's `device`, `devices`, `replicas` and `dtype` parameters, read into the
//! [`Placement`] of each of its model replicas (what they mean, and why the dtype enters the key
//! and the device does not: [`ladle_models::device`]).
//!
//! A map stage may run several copies of its model side by side, the engine giving each shard to
//! the least busy (ladle-engine's `Stage::replicas`): `device = "cuda:all"` puts one on every GPU
//! of the machine, `devices = ["cuda:0", "cuda:2"]` on those named, `replicas = N` makes N copies
//! on the CPU (where `-j` threads share one model, a replica per NUMA node or socket can still
//! pay). The replicas are all on the CPU or all on GPUs, in one dtype, so every one computes the
//! outputs one would: none of these parameters enters a key.

use candle_core::DType;
use ladle_engine::error::PipelineError;
use ladle_engine::pipeline::params::Params;
use ladle_models::device::{Placement, Processor, dtype_name, gpus};

/// The placements of a model stage's replicas: at least one, all on the CPU or all on GPUs (no
/// GPU twice), one dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Replicas(Vec<Placement>);

impl Replicas {
    /// The first replica's placement (the only one, usually).
    pub fn first(&self) -> Placement {
        self.0[0]
    }
    /// Replica `r`'s placement.
    pub fn get(&self, r: usize) -> Placement {
        self.0[r.min(self.0.len() - 1)]
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The device slot replica `r` holds (see [`Placement::slot`]).
    pub fn slot(&self, r: usize) -> Option<String> {
        self.get(r).slot()
    }
}

/// Reads `device` and `dtype` from the parameters of a stage that computes on one device.
pub fn configure(params: &mut Params<'_>) -> Result<Placement, PipelineError> {
    let replicas = configure_replicas(params)?;
    if replicas.len() > 1 {
        let at = if params.has("devices") { "devices" } else { "replicas" };
        return Err(params.error(at, "this stage computes on one device: give it `device`, not several"));
    }
    Ok(replicas.first())
}

/// Reads `device` (or `devices`), `replicas` and `dtype` from a map stage's parameters.
pub fn configure_replicas(params: &mut Params<'_>) -> Result<Replicas, PipelineError> {
    let device = params.string("device")?;
    params.exclude_from_key("device");
    let devices = params.string_list("devices")?;
    params.exclude_from_key("devices");
    let copies = params.positive("replicas")?;
    params.exclude_from_key("replicas");
    let dtype = params.choice("dtype", &["f32", "bf16", "f16"])?;
    let (names, named_by): (Vec<Option<String>>, &str) = match (device, devices) {
        (Some(_), Some(_)) => return Err(params.error("devices", "give `device` or `devices`, not both")),
        (None, Some(list)) if list.is_empty() => {
            return Err(params.error("devices", "`devices` is empty: name at least one (\"cpu\", \"cuda:N\")"));
        }
        (None, Some(list)) => (list.into_iter().map(Some).collect(), "devices"),
        (Some(all), None) if all == "cuda:all" => {
            let count = match gpus() {
                Ok(n) if cfg!(feature = "cuda") => n,
                Ok(_) => 0,
                Err(e) => {
                    return Err(params
                        .error("device", format!("device = \"cuda:all\", but the CUDA driver did not start: {e}")));
                }
            };
            if count == 0 {
                return Err(params.error(
                    "device",
                    if cfg!(feature = "cuda") {
                        "device = \"cuda:all\", but this machine has no GPU".to_string()
                    } else {
                        "device = \"cuda:all\", but this ladle was built without GPU support: build it with the `cuda` \
                         feature (scripts/build-cuda.sh, see docs/cuda.md), or set device = \"cpu\""
                            .to_string()
                    },
                ));
            }
            ((0..count).map(|n| Some(format!("cuda:{n}"))).collect(), "device")
        }
        (device, None) => (vec![device], "device"),
    };
    let names = match copies {
        Some(_) if names.len() > 1 => {
            return Err(params.error(
                "replicas",
                format!(
                    "`replicas` copies one device, but `{named_by}` names {}: each is a replica already",
                    names.len()
                ),
            ));
        }
        Some(n) => vec![names[0].clone(); n as usize],
        None => names,
    };
    let at = if copies.is_some() { "replicas" } else { named_by };
    let mut placements = Vec::with_capacity(names.len());
    for name in &names {
        let placement = Placement::from_names(name.as_deref(), dtype.as_deref())
            .map_err(|(key, e)| params.error(if key == "device" { named_by } else { key }, e))?;
        placements.push(placement);
    }
    let first = placements[0];
    if placements.iter().any(|p| (p.processor == Processor::Cpu) != (first.processor == Processor::Cpu)) {
        return Err(params.error(
            at,
            "the replicas mix the CPU and GPUs, whose outputs differ in the last digits (and in dtype by \
             default): put them all on GPUs or all on the CPU",
        ));
    }
    for (i, p) in placements.iter().enumerate() {
        if p.processor != Processor::Cpu && placements[..i].contains(p) {
            return Err(params.error(
                at,
                format!(
                    "{} holds two replicas: they would share its memory and take turns on it; name each GPU once",
                    p.name()
                ),
            ));
        }
    }
    if first.dtype == DType::F32 {
        params.exclude_from_key("dtype");
    } else {
        params.record("dtype", dtype_name(first.dtype).into());
    }
    Ok(Replicas(placements))
}
