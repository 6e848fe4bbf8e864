//! The `plugin` stage kind: a WASM filter as a map stage.
//!
//! ```toml
//! [stages.clean]
//! kind = "plugin"
//! data = "captions"
//! wasm = "plugins/caption_clean.wasm"
//! config = { field = "caption" }
//! limits = { memory_mb = 256, batch_timeout_ms = 10000, fuel = 1_000_000_000, max_record_mb = 16, max_output_factor = 16 }
//! on_error = "fail"        # or "drop": a record whose batch fails is dropped and counted
//! ```
//!
//! The .wasm's digest, `config` and the batch sizes enter the cache key (a plugin's randomness
//! is drawn per batch, see [`crate::sandbox`]); `limits` do not (they change whether a run
//! succeeds, not what it produces). Each shard is filtered in batches (`batch_records`,
//! `batch_bytes`) by an instance from a pool, one per worker, reused across shards, and its
//! output is streamed to the store batch by batch. A plugin's output is bounded, since it is not
//! bounded by its input: a replacement record by `max_record_mb`, a shard's output by
//! `max_output_factor` times its input. With `on_error = "drop"`, a batch that fails is retried
//! record by record on a fresh instance, so only the records that really fail are dropped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::stage::{
    Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage, StageKind,
};
use ladle_engine::units::human_bytes;
use ladle_engine::{ObjectWriter, StageContext};

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
        let (limits, output_limits) = read_limits(params)?;
        params.exclude_from_key("limits");
        let drop_on_error = params.choice("on_error", &["fail", "drop"])?.as_deref() == Some("drop");
        params.record("on_error", if drop_on_error { "drop" } else { "fail" }.into());
        // Batch sizes stay in the key: a plugin's randomness is drawn per batch.
        let batch_records = params.positive("batch_records")?.unwrap_or(256) as usize;
        let batch_bytes = params.positive("batch_bytes")?.unwrap_or(1 << 20) as usize;
        Ok(Arc::new(PluginStage {
            wasm,
            config: config.to_string(),
            limits,
            output_limits,
            drop_on_error,
            batch_records,
            batch_bytes,
        }))
    }
}

/// Bounds on what a plugin may return: a plugin's verdicts are not bounded by its input, and
/// whatever it returns is kept in the store.
#[derive(Debug, Clone, Copy, PartialEq)]
struct OutputLimits {
    /// The largest replacement record, in bytes of JSON.
    max_record_bytes: usize,
    /// A shard's output may be this many times its input's bytes (or `max_record_bytes`, if
    /// more).
    max_output_factor: u64,
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits { max_record_bytes: 16 << 20, max_output_factor: 16 }
    }
}

const LIMITS: &str = "memory_mb, batch_timeout_ms, fuel, max_record_mb and max_output_factor";

fn read_limits(params: &mut Params<'_>) -> Result<(Limits, OutputLimits), PipelineError> {
    let (mut limits, mut output) = (Limits::default(), OutputLimits::default());
    let Some(table) = params.table("limits")? else { return Ok((limits, output)) };
    for (key, value) in table.as_object().into_iter().flatten() {
        let positive = value.as_u64().filter(|v| *v > 0);
        match (key.as_str(), positive) {
            ("memory_mb", Some(mb)) => limits.memory_bytes = (mb as usize).saturating_mul(1 << 20),
            ("batch_timeout_ms", Some(ms)) => limits.batch_timeout = Duration::from_millis(ms),
            ("fuel", Some(f)) => limits.fuel = Some(f),
            ("max_record_mb", Some(mb)) => output.max_record_bytes = (mb as usize).saturating_mul(1 << 20),
            ("max_output_factor", Some(f)) => output.max_output_factor = f,
            ("memory_mb" | "batch_timeout_ms" | "fuel" | "max_record_mb" | "max_output_factor", None) => {
                return Err(params.error("limits", format!("`limits.{key}` must be a positive integer, found {value}")));
            }
            (other, _) => {
                let mut e = params.error("limits", format!("unknown limit `{other}`"));
                e.hint = Some(format!("limits are {LIMITS}"));
                return Err(e);
            }
        }
    }
    Ok((limits, output))
}

struct PluginStage {
    wasm: PathBuf,
    config: String,
    limits: Limits,
    output_limits: OutputLimits,
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
    fn prepare(
        &self,
        ctx: &StageContext<'_>,
        _inputs: &Inputs,
        _replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        let plugin = Plugin::load_kept(&self.wasm, self.limits, Some(ctx.store))
            .map_err(|e| StageError::input(e.to_string()))?;
        ctx.save_log(format!("component {}: {}\n", self.wasm.display(), plugin.prepared).as_bytes())?;
        let mapper = PluginMapper {
            label: format!("plugin `{}` ({})", plugin.name, self.wasm.display()),
            plugin,
            config: self.config.clone(),
            output_limits: self.output_limits,
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
    output_limits: OutputLimits,
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
        self.plugin.instantiate(&self.config).map_err(|e| self.describe(None, e.to_string(), FailureKind::Call(e)))
    }

    fn give_back(&self, instance: Instance) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(instance);
    }
}

/// Why one record's verdict cannot be applied.
enum VerdictError {
    /// The replacement is not a JSON object.
    Invalid(String),
    /// The replacement is larger than `limits.max_record_mb`.
    TooLarge { bytes: usize, limit: usize },
}

/// Applies a verdict to one record, appending what is kept to `out`: whether it was kept.
fn apply(verdict: Verdict, line: &[u8], limits: &OutputLimits, out: &mut Vec<u8>) -> Result<bool, VerdictError> {
    match verdict {
        Verdict::Keep => {
            out.extend_from_slice(line);
            out.push(b'\n');
            Ok(true)
        }
        Verdict::Drop => Ok(false),
        Verdict::Replace(text) if text.len() > limits.max_record_bytes => {
            Err(VerdictError::TooLarge { bytes: text.len(), limit: limits.max_record_bytes })
        }
        Verdict::Replace(text) => {
            let record = parse_record(text.as_bytes())
                .map_err(|e| VerdictError::Invalid(format!("its replacement record is not valid: {e}")))?;
            write_record(&record, out);
            Ok(true)
        }
    }
}

/// Why a batch failed.
enum Failure {
    /// At some records (one, or the batch): retried record by record with `on_error = "drop"`.
    At { message: String, kind: FailureKind, records: (u64, u64) },
    /// No instance could be made: nothing to retry.
    Instantiate(StageError),
}

impl Failure {
    fn is_output_cap(&self) -> bool {
        matches!(self, Failure::At { kind: FailureKind::OutputCap, .. })
    }
}

enum FailureKind {
    Call(CallError),
    TooLarge,
    OutputCap,
    Other,
}

/// The name a call gets for its randomness: the shard's contents and the batch's place in it.
fn nonce(shard: &ShardInput<'_>, start: usize, len: usize) -> Vec<u8> {
    [shard.digest.0.as_slice(), &(start as u64).to_le_bytes(), &(len as u64).to_le_bytes()].concat()
}

impl PluginMapper {
    /// Runs one batch (`records[start..end]` of the shard) on `instance`: its output and the
    /// records kept, or the failure (a call that failed poisons `instance` when it must).
    fn run_batch(
        &self,
        instance: &mut Option<Instance>,
        shard: &ShardInput<'_>,
        records: &[&[u8]],
        start: usize,
        end: usize,
        written: u64,
    ) -> Result<(Vec<u8>, u64), Failure> {
        let cap = self.output_cap(shard.jsonl.len());
        let first = shard.first_record + start as u64;
        let last = shard.first_record + end as u64 - 1;
        let batch: Vec<String> = records[start..end].iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
        let inst = match instance {
            Some(i) => i,
            None => instance.insert(self.instance().map_err(Failure::Instantiate)?),
        };
        let verdicts = inst.filter(&batch, &nonce(shard, start, end - start)).map_err(|e| {
            let failure =
                Failure::At { message: e.to_string(), kind: FailureKind::Call(e.clone()), records: (first, last) };
            if e.poisons() {
                *instance = None;
            }
            failure
        })?;
        drop(batch);
        let mut staged = Vec::new();
        let mut kept = 0;
        for (i, verdict) in verdicts.into_iter().enumerate() {
            let at = first + i as u64;
            match apply(verdict, records[start + i], &self.output_limits, &mut staged) {
                Ok(_) if written + staged.len() as u64 > cap => {
                    return Err(Failure::At {
                        message: format!(
                            "the shard's output passed {}, the most a shard of {} may give \
                             (limits.max_output_factor = {} times its input, and at least limits.max_record_mb)",
                            human_bytes(cap),
                            human_bytes(shard.jsonl.len() as u64),
                            self.output_limits.max_output_factor,
                        ),
                        kind: FailureKind::OutputCap,
                        records: (at, at),
                    });
                }
                Ok(k) => kept += u64::from(k),
                Err(VerdictError::Invalid(message)) => {
                    return Err(Failure::At { message, kind: FailureKind::Other, records: (at, at) });
                }
                Err(VerdictError::TooLarge { bytes, limit }) => {
                    return Err(Failure::At {
                        message: format!(
                            "it replaced the record with {} of text, past its limit of {} (limits.max_record_mb)",
                            human_bytes(bytes as u64),
                            human_bytes(limit as u64)
                        ),
                        kind: FailureKind::TooLarge,
                        records: (at, at),
                    });
                }
            }
        }
        Ok((staged, kept))
    }

    fn stage_error(&self, failure: Failure) -> StageError {
        match failure {
            Failure::At { message, kind, records } => self.describe(Some(records), message, kind),
            Failure::Instantiate(e) => e,
        }
    }

    /// The stage's error: the plugin, the records, what happened, its last log lines, a hint.
    fn describe(&self, records: Option<(u64, u64)>, message: String, kind: FailureKind) -> StageError {
        let at = match records {
            Some((a, b)) if a == b => format!(", record {a}"),
            Some((a, b)) => format!(", the batch of records {a}..={b}"),
            None => String::new(),
        };
        let mut message = format!("{}{at}: {message}", self.label);
        let log = self.plugin.log.lock().unwrap_or_else(|p| p.into_inner()).text();
        if !log.is_empty() {
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            message.push_str(&format!(
                "\n  its last log lines:\n{}",
                tail.iter().rev().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n")
            ));
        }
        let err = StageError::input(message);
        let drop_hint = "set on_error = \"drop\" to drop failing records and go on";
        match kind {
            FailureKind::Call(CallError::Timeout(_) | CallError::Slept(_)) => {
                err.with_hint("raise limits.batch_timeout_ms, lower batch_records, or fix the plugin's loop or sleep")
            }
            FailureKind::Call(CallError::Memory(_)) => {
                err.with_hint("raise limits.memory_mb, or lower batch_records / batch_bytes")
            }
            FailureKind::Call(CallError::OutOfFuel(_)) => err.with_hint("raise limits.fuel"),
            FailureKind::TooLarge if !self.drop_on_error => {
                err.with_hint(format!("raise limits.max_record_mb if records this large are expected, or {drop_hint}"))
            }
            FailureKind::OutputCap => {
                err.with_hint("raise limits.max_output_factor if the plugin is meant to grow records this much")
            }
            _ if !self.drop_on_error => err.with_hint(drop_hint),
            _ => err,
        }
    }

    /// The most output bytes a shard of `input` bytes may have.
    fn output_cap(&self, input: usize) -> u64 {
        (input as u64)
            .saturating_mul(self.output_limits.max_output_factor)
            .max(self.output_limits.max_record_bytes as u64)
    }
}

impl ShardMapper for PluginMapper {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let records: Vec<&[u8]> = lines(shard.jsonl).collect();
        let mut instance = Some(self.instance()?);
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
            match self.run_batch(&mut instance, shard, &records, start, end, output.len()) {
                Ok((staged, n)) => {
                    output.append(&staged)?;
                    kept += n;
                }
                // Dropping records cannot mend a shard whose output is too large.
                Err(failure) if !self.drop_on_error || failure.is_output_cap() => {
                    return Err(self.stage_error(failure));
                }
                // Find the culprits: one record at a time (on a fresh instance after traps).
                Err(_) => {
                    for i in start..end {
                        match self.run_batch(&mut instance, shard, &records, i, i + 1, output.len()) {
                            Ok((staged, n)) => {
                                output.append(&staged)?;
                                kept += n;
                            }
                            Err(
                                failure @ (Failure::Instantiate(_) | Failure::At { kind: FailureKind::OutputCap, .. }),
                            ) => {
                                return Err(self.stage_error(failure));
                            }
                            Err(Failure::At { .. }) => dropped_on_error += 1,
                        }
                    }
                }
            }
            start = end;
        }
        if let Some(i) = instance {
            self.give_back(i);
        }
        Ok(MappedShard { records: kept, dropped_on_error })
    }
}
