//! The `plugin` stage kind: a WASM filter as a map stage.
//!
//! ```toml
//! [stages.clean]
//! kind = "plugin"
//! data = "captions"
//! wasm = "plugins/caption_clean.wasm"
//! config = { field = "caption" }
//! limits = { memory_mb = 256, batch_timeout_ms = 10000, fuel = 1_000_000_000 }
//! on_error = "fail"        # or "drop": a record whose batch fails is dropped and counted
//! ```
//!
//! The .wasm's digest and `config` enter the cache key; `limits` and batch sizes do not (they
//! change whether a run succeeds, not what it produces). Each shard is filtered in batches
//! (`batch_records`, `batch_bytes`) by an instance from a pool, one per worker, reused across
//! shards. With `on_error = "drop"`, a batch that fails is retried record by record on a fresh
//! instance, so only the records that really fail are dropped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ladle_engine::StageContext;
use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};

use crate::host::{CallError, Instance, Limits, Plugin, Verdict};

pub struct PluginKind;

const PORTS: &[PortSpec] = &[PortSpec::dataset("data")];

impl StageKind for PluginKind {
    fn name(&self) -> &'static str {
        "plugin"
    }
    fn about(&self) -> &'static str {
        "a sandboxed WASM filter: keep, drop or replace each record"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let wasm = params.path_dep("wasm", false)?.ok_or_else(|| params.missing("wasm", "the plugin's .wasm file"))?;
        match std::fs::read(&wasm) {
            Ok(bytes) if bytes.starts_with(b"\0asm") && bytes.get(4..8) == Some(&[1, 0, 0, 0]) => {
                let mut e =
                    params.error("wasm", format!("`{}` is a core WebAssembly module, not a component", wasm.display()));
                e.hint = Some(
                    "build plugins for the wasm32-wasip2 target: cargo build --release --target wasm32-wasip2".into(),
                );
                return Err(e);
            }
            Ok(bytes) if !bytes.starts_with(b"\0asm") => {
                let mut e = params.error("wasm", format!("`{}` is not WebAssembly", wasm.display()));
                e.hint = Some("a plugin is a .wasm component; `ladle plugin new NAME` starts one".into());
                return Err(e);
            }
            _ => {}
        }
        let config = params.table("config")?.unwrap_or_else(|| serde_json::json!({}));
        let limits = read_limits(params)?;
        params.exclude_from_key("limits");
        let drop_on_error = params.choice("on_error", &["fail", "drop"])?.as_deref() == Some("drop");
        params.record("on_error", if drop_on_error { "drop" } else { "fail" }.into());
        let batch_records = params.positive("batch_records")?.unwrap_or(256) as usize;
        params.exclude_from_key("batch_records");
        let batch_bytes = params.positive("batch_bytes")?.unwrap_or(1 << 20) as usize;
        params.exclude_from_key("batch_bytes");
        Ok(Arc::new(PluginStage {
            wasm,
            config: config.to_string(),
            limits,
            drop_on_error,
            batch_records,
            batch_bytes,
        }))
    }
}

fn read_limits(params: &mut Params<'_>) -> Result<Limits, PipelineError> {
    let mut limits = Limits::default();
    let Some(table) = params.table("limits")? else { return Ok(limits) };
    for (key, value) in table.as_object().into_iter().flatten() {
        let positive = value.as_u64().filter(|v| *v > 0);
        match (key.as_str(), positive) {
            ("memory_mb", Some(mb)) => limits.memory_bytes = (mb as usize).saturating_mul(1 << 20),
            ("batch_timeout_ms", Some(ms)) => limits.batch_timeout = Duration::from_millis(ms),
            ("fuel", Some(f)) => limits.fuel = Some(f),
            ("memory_mb" | "batch_timeout_ms" | "fuel", None) => {
                return Err(params.error("limits", format!("`limits.{key}` must be a positive integer, found {value}")));
            }
            (other, _) => {
                let mut e = params.error("limits", format!("unknown limit `{other}`"));
                e.hint = Some("limits are memory_mb, batch_timeout_ms and fuel".into());
                return Err(e);
            }
        }
    }
    Ok(limits)
}

struct PluginStage {
    wasm: PathBuf,
    config: String,
    limits: Limits,
    drop_on_error: bool,
    batch_records: usize,
    batch_bytes: usize,
}

impl Stage for PluginStage {
    fn produces(&self) -> Produces {
        Produces::Dataset
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Map { port: "data", stage: self }
    }
}

impl MapStage for PluginStage {
    fn prepare(&self, _ctx: &StageContext<'_>, _inputs: &Inputs) -> Result<Arc<dyn ShardMapper>, StageError> {
        let plugin = Plugin::load(&self.wasm, self.limits).map_err(|e| StageError::input(e.to_string()))?;
        let mapper = PluginMapper {
            label: format!("plugin `{}` ({})", plugin.name, self.wasm.display()),
            plugin,
            config: self.config.clone(),
            drop_on_error: self.drop_on_error,
            batch_records: self.batch_records,
            batch_bytes: self.batch_bytes,
            pool: Mutex::new(Vec::new()),
        };
        // Fail fast on a config the plugin rejects, before any shard.
        let first = mapper.instance()?;
        mapper.give_back(first);
        Ok(Arc::new(mapper))
    }
}

struct PluginMapper {
    label: String,
    plugin: Plugin,
    config: String,
    drop_on_error: bool,
    batch_records: usize,
    batch_bytes: usize,
    pool: Mutex<Vec<Instance>>,
}

impl PluginMapper {
    fn instance(&self) -> Result<Instance, StageError> {
        if let Some(i) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(i);
        }
        self.plugin.instantiate(&self.config).map_err(|e| self.error(&e, None))
    }

    fn give_back(&self, instance: Instance) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(instance);
    }

    fn error(&self, e: &CallError, records: Option<(u64, u64)>) -> StageError {
        let at = match records {
            Some((a, b)) if a == b => format!(", record {a}"),
            Some((a, b)) => format!(", the batch of records {a}..={b}"),
            None => String::new(),
        };
        let mut message = format!("{}{at}: {e}", self.label);
        let log = self.plugin.log.lock().unwrap_or_else(|p| p.into_inner()).text();
        if !log.is_empty() {
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            message.push_str(&format!(
                "\n  its last log lines:\n{}",
                tail.iter().rev().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n")
            ));
        }
        let err = StageError::input(message);
        match e {
            CallError::Timeout(_) => {
                err.with_hint("raise limits.batch_timeout_ms, lower batch_records, or fix the plugin's loop")
            }
            CallError::Memory(_) => err.with_hint("raise limits.memory_mb, or lower batch_records / batch_bytes"),
            CallError::OutOfFuel(_) => err.with_hint("raise limits.fuel"),
            _ if !self.drop_on_error => err.with_hint("set on_error = \"drop\" to drop failing records and go on"),
            _ => err,
        }
    }
}

/// Applies a verdict to one record, appending what is kept to `out`.
fn apply(verdict: Verdict, line: &[u8], out: &mut Vec<u8>) -> Result<bool, String> {
    match verdict {
        Verdict::Keep => {
            out.extend_from_slice(line);
            out.push(b'\n');
            Ok(true)
        }
        Verdict::Drop => Ok(false),
        Verdict::Replace(text) => {
            let record =
                parse_record(text.as_bytes()).map_err(|e| format!("its replacement record is not valid: {e}"))?;
            write_record(&record, out);
            Ok(true)
        }
    }
}

impl ShardMapper for PluginMapper {
    fn map_shard(&self, shard: &ShardInput<'_>) -> Result<MappedShard, StageError> {
        let records: Vec<&[u8]> = lines(shard.jsonl).collect();
        let mut instance = Some(self.instance()?);
        let mut out = Vec::with_capacity(shard.jsonl.len());
        let (mut kept, mut dropped_on_error) = (0u64, 0u64);
        let mut start = 0;
        while start < records.len() {
            // A batch: up to batch_records records and batch_bytes bytes (at least one record).
            let mut end = start;
            let mut bytes = 0;
            while end < records.len()
                && end - start < self.batch_records
                && (end == start || bytes + records[end].len() <= self.batch_bytes)
            {
                bytes += records[end].len();
                end += 1;
            }
            let batch: Vec<String> =
                records[start..end].iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
            let first = shard.first_record + start as u64;
            let inst = match instance.as_mut() {
                Some(i) => i,
                None => instance.insert(self.instance()?),
            };
            let outcome = inst.filter(&batch).map_err(|e| (e, None)).and_then(|verdicts| {
                let mut staged = Vec::new();
                let mut n = 0;
                for (i, v) in verdicts.into_iter().enumerate() {
                    match apply(v, records[start + i], &mut staged) {
                        Ok(k) => n += u64::from(k),
                        Err(msg) => return Err((CallError::Returned(msg), Some(first + i as u64))),
                    }
                }
                Ok((staged, n))
            });
            match outcome {
                Ok((staged, n)) => {
                    out.extend_from_slice(&staged);
                    kept += n;
                }
                Err((e, at)) => {
                    if e.poisons() {
                        instance = None;
                    }
                    if !self.drop_on_error {
                        let range = at.map(|a| (a, a)).unwrap_or((first, first + (end - start) as u64 - 1));
                        return Err(self.error(&e, Some(range)));
                    }
                    // Find the culprits: one record at a time, on a fresh instance after traps.
                    for (i, text) in batch.iter().enumerate() {
                        if instance.is_none() {
                            instance = Some(self.instance()?);
                        }
                        let result = instance.as_mut().expect("set just above").filter(std::slice::from_ref(text));
                        match result {
                            // `filter` checked that there is exactly one verdict.
                            Ok(mut v) => match apply(v.remove(0), records[start + i], &mut out) {
                                Ok(k) => kept += u64::from(k),
                                Err(_) => dropped_on_error += 1,
                            },
                            Err(e) => {
                                dropped_on_error += 1;
                                if e.poisons() {
                                    instance = None;
                                }
                            }
                        }
                    }
                }
            }
            start = end;
        }
        if let Some(i) = instance {
            self.give_back(i);
        }
        Ok(MappedShard { bytes: out, records: kept, dropped_on_error })
    }
}
