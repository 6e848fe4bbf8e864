//! `exec`: an external program as a stage (a trainer, an evaluator, a filter in any language).
//!
//! Two modes:
//! - **folder** (default): `command` runs once, with `{in.PORT}` replaced by each input
//!   materialized (a dataset as a JSONL file, a model or folder as a folder) and `{out}` by an
//!   empty folder the command fills. The folder becomes the output artifact — a model when it
//!   holds a config.json. The same paths are in `LADLE_IN_<PORT>` and `LADLE_OUT`. A port fed
//!   several artifacts (`models = ["a", "b"]`, a matrix, a `choose` stage's set) gets one path
//!   each: `{in.PORT}` as a whole argument becomes one argument per artifact (none for an empty
//!   set), and `LADLE_IN_<PORT>` lists them one per line.
//! - **per shard** (`per_shard = true`): a map stage. For each shard of input `data`, `command`
//!   gets the shard's records as JSONL on stdin and prints records as JSONL on stdout: an escape
//!   hatch for filters written in any language, cached and resumable shard by shard.
//!
//! `metrics = "metrics.json"` (folder mode): a JSON object the command writes into `{out}`; its
//! numbers travel with the output artifact, so `ladle show` prints them, the report plots them
//! and a `choose` stage picks by them (a trainer that also evaluates its fine-tune).
//!
//! `gpus = N` (folder mode) holds N of the machine's GPUs while the command runs and gives their
//! ids in `CUDA_VISIBLE_DEVICES`: two trainings never share a GPU, and a model stage on one of
//! them waits (the machine's GPUs: `LADLE_GPUS`, else `CUDA_VISIBLE_DEVICES`, else the driver's
//! device files). Not part of the key.
//!
//! `deps = [paths]` (its scripts) enter the cache key by content. The command runs in the
//! pipeline file's folder. stdout and stderr are kept in the store (`ladle show`); a non-zero exit
//! or a time-out fails the stage with the end of that log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record, write_record};
use ladle_engine::stage::{
    Accepts, Arity, Execution, Inputs, MapStage, MappedShard, PortSpec, Produces, ShardInput, ShardMapper, Stage,
    StageKind, WholeStage,
};
use ladle_engine::{Artifact, ObjectWriter, StageContext};
use wait_timeout::ChildExt;

pub struct ExecKind;

impl StageKind for ExecKind {
    fn name(&self) -> &'static str {
        "exec"
    }
    fn about(&self) -> &'static str {
        "an external program: fills a folder ({out}), or filters shards as JSONL (per_shard)"
    }
    fn ports(&self) -> &'static [PortSpec] {
        // `data = "STAGE"` as every other stage takes its dataset; the same as inputs = { data = ... }.
        const PORTS: &[PortSpec] =
            &[PortSpec { name: "data", arity: Arity::One, required: false, accepts: Accepts::Any }];
        PORTS
    }
    fn port_table(&self) -> Option<&'static str> {
        Some("inputs")
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let command = params.string_list("command")?.ok_or_else(|| {
            params.missing(
                "command",
                "the program and its arguments, e.g. [\"python\", \"train.py\", \"{in.data}\", \"{out}\"]",
            )
        })?;
        if command.is_empty() || command[0].is_empty() {
            return Err(params.error("command", "`command` is empty: give the program and its arguments"));
        }
        let per_shard = params.bool("per_shard")?.unwrap_or(false);
        let metrics = params.string("metrics")?;
        if let Some(m) = &metrics {
            if per_shard {
                return Err(params.error("metrics", "`metrics` names a file in {out}, which per_shard = true has not"));
            }
            if m.is_empty() || Path::new(m).is_absolute() || m.split(['/', '\\']).any(|c| c == "..") {
                return Err(params.error(
                    "metrics",
                    format!("`metrics` is \"{m}\": it must be a path inside {{out}}, e.g. \"metrics.json\""),
                ));
            }
        }
        let gpus = match params.integer("gpus")? {
            Some(n) if n < 0 => return Err(params.error("gpus", format!("`gpus` is {n}; give a count of GPUs"))),
            Some(n) if n > 0 && per_shard => {
                return Err(params.error(
                    "gpus",
                    "`gpus` holds GPUs for a command that runs once; per_shard = true runs one per shard",
                ));
            }
            n => n.unwrap_or(0) as u32,
        };
        // Which GPUs it gets does not change what it makes (it must not: they differ run to run).
        params.exclude_from_key("gpus");
        let ports: Vec<String> = params.ports().to_vec();
        for arg in &command {
            for placeholder in placeholders(arg) {
                match placeholder.strip_prefix("in.") {
                    Some(port) if ports.iter().any(|p| p == port) => {}
                    Some(port) => {
                        let mut e = params
                            .error("command", format!("`{{in.{port}}}` names an input port this stage does not have"));
                        e.hint = Some(format!("declare it: inputs = {{ {port} = \"STAGE\" }}"));
                        return Err(e);
                    }
                    None if placeholder == "out" && !per_shard => {}
                    None if placeholder == "out" => {
                        return Err(params
                            .error("command", "`{out}` has no meaning with per_shard = true: records go to stdout"));
                    }
                    None => {
                        let mut e = params.error("command", format!("unknown placeholder `{{{placeholder}}}`; known: {{in.PORT}}, {{out}} (write `{{{{` for a literal brace)"));
                        if placeholder.starts_with("matrix.") || placeholder.starts_with("vars.") {
                            e.hint = Some(format!(
                                "a matrix value or variable is written with a dollar: ${{{placeholder}}}"
                            ));
                        }
                        return Err(e);
                    }
                }
            }
        }
        if per_shard && !ports.iter().any(|p| p == "data") {
            let mut e =
                params.stage_error("per_shard = true streams the dataset on input port `data`, which is not connected");
            e.hint = Some("add data = \"STAGE\" (or inputs = { data = \"STAGE\" })".into());
            return Err(e);
        }
        // Scripts the command runs: their content enters the key.
        params.path_deps("deps")?;
        let timeout = command_timeout(params)?;
        Ok(Arc::new(Exec { command, per_shard, metrics, gpus, timeout, dir: params.base_dir().to_path_buf() }))
    }
}

/// A command's `timeout` parameter (seconds, positive), kept out of the key: it does not change
/// what the command produces.
pub(crate) fn command_timeout(params: &mut Params<'_>) -> Result<Option<Duration>, PipelineError> {
    let timeout = match params.float("timeout")? {
        Some(t) if t <= 0.0 => return Err(params.error("timeout", "`timeout` is in seconds and must be positive")),
        t => t.map(Duration::from_secs_f64),
    };
    params.exclude_from_key("timeout");
    Ok(timeout)
}

/// The `{name}` placeholders of an argument (`{{` and `}}` are literal braces).
fn placeholders(arg: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
            }
            '{' => out.push(chars.by_ref().take_while(|c| *c != '}').collect()),
            _ => {}
        }
    }
    out
}

fn substitute(arg: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                out.push_str(values.get(&name).map(String::as_str).unwrap_or(""));
            }
            c => out.push(c),
        }
    }
    out
}

struct Exec {
    command: Vec<String>,
    per_shard: bool,
    /// The file in `{out}` holding the metrics (folder mode).
    metrics: Option<String>,
    /// GPUs held while the command runs (folder mode), given in `CUDA_VISIBLE_DEVICES`.
    gpus: u32,
    timeout: Option<Duration>,
    dir: PathBuf,
}

impl Stage for Exec {
    fn produces(&self) -> Produces {
        if self.per_shard { Produces::Dataset } else { Produces::Folder }
    }
    fn execution(&self) -> Execution<'_> {
        if self.per_shard { Execution::Map { port: "data", stage: self } } else { Execution::Whole(self) }
    }
    fn gpus(&self) -> u32 {
        self.gpus
    }
}

/// The last `n` lines of a log, for error messages.
pub(crate) fn tail(log: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].iter().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n");
    if out.is_empty() {
        out = "    | (no output)".into();
    }
    out
}

/// Runs `command` with `stdin` fed from memory; returns (exit status, stdout, stderr).
pub(crate) fn run_command(
    command: &[String],
    dir: &Path,
    env: &BTreeMap<String, String>,
    stdin: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), StageError> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .current_dir(dir)
        .envs(env)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        StageError::environment(format!("cannot start `{}`: {e}", command[0])).with_hint(
            "check that the program is installed and on PATH, or give its path relative to the pipeline file",
        )
    })?;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let stdin_pipe = child.stdin.take();
    let (status, stdout, stderr) = std::thread::scope(|s| {
        if let (Some(mut pipe), Some(data)) = (stdin_pipe, stdin) {
            // A program that exits early closes its stdin: not an error of ours.
            s.spawn(move || {
                let _ = pipe.write_all(data);
            });
        }
        let out = s.spawn(move || {
            let mut v = Vec::new();
            let _ = out_pipe.read_to_end(&mut v);
            v
        });
        let err = s.spawn(move || {
            let mut v = Vec::new();
            let _ = err_pipe.read_to_end(&mut v);
            v
        });
        let status = match timeout {
            Some(t) => match child.wait_timeout(t) {
                Ok(Some(status)) => Ok(status),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(StageError::input(format!(
                        "`{}` ran past its timeout of {:.1} s and was stopped",
                        command[0],
                        t.as_secs_f64()
                    ))
                    .with_hint("raise `timeout`, or make the command faster"))
                }
                Err(e) => Err(StageError::environment(format!("cannot wait for `{}`: {e}", command[0]))),
            },
            None => child.wait().map_err(|e| StageError::environment(format!("cannot wait for `{}`: {e}", command[0]))),
        };
        (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
    });
    Ok((status?, stdout, stderr))
}

impl WholeStage for Exec {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let work = ctx.temp_path("exec");
        let io = |what: &str, e: std::io::Error| StageError::environment(format!("cannot {what}: {e}"));
        std::fs::create_dir_all(work.join("in")).map_err(|e| io("create a work folder", e))?;
        let out_dir = work.join("out");
        std::fs::create_dir_all(&out_dir).map_err(|e| io("create the output folder", e))?;
        let mut values = BTreeMap::new();
        let mut lists = BTreeMap::new();
        let mut env = BTreeMap::new();
        for (port, artifacts) in &inputs.ports {
            let paths: Vec<String> = match artifacts.as_slice() {
                [one] => vec![ctx.materialize(one, &work.join("in").join(port))?.display().to_string()],
                several => {
                    let dir = work.join("in").join(port);
                    std::fs::create_dir_all(&dir).map_err(|e| io("create a work folder", e))?;
                    several
                        .iter()
                        .enumerate()
                        .map(|(i, a)| Ok(ctx.materialize(a, &dir.join(i.to_string()))?.display().to_string()))
                        .collect::<Result<_, StageError>>()?
                }
            };
            env.insert(format!("LADLE_IN_{}", port.to_uppercase().replace('-', "_")), paths.join("\n"));
            if let [one] = paths.as_slice() {
                values.insert(format!("in.{port}"), one.clone());
            }
            lists.insert(format!("{{in.{port}}}"), paths);
        }
        values.insert("out".into(), out_dir.display().to_string());
        env.insert("LADLE_OUT".into(), out_dir.display().to_string());
        if !ctx.gpus.is_empty() {
            env.insert("CUDA_VISIBLE_DEVICES".into(), ctx.gpus.join(","));
        }
        let mut command = Vec::new();
        for arg in &self.command {
            match lists.get(arg.as_str()) {
                Some(paths) => command.extend(paths.iter().cloned()),
                None => {
                    if let Some(port) = placeholders(arg)
                        .iter()
                        .find_map(|p| p.strip_prefix("in.").filter(|port| !values.contains_key(&format!("in.{port}"))))
                    {
                        return Err(StageError::input(format!(
                            "`{arg}`: input port `{port}` holds {} artifacts, so {{in.{port}}} must be a whole argument (it becomes one argument per artifact)",
                            inputs.all(port).len()
                        )));
                    }
                    command.push(substitute(arg, &values));
                }
            }
        }
        let (status, stdout, stderr) = run_command(&command, &self.dir, &env, None, self.timeout)?;
        let mut log = stdout;
        if !stderr.is_empty() {
            log.extend_from_slice(b"\n--- stderr ---\n");
            log.extend_from_slice(&stderr);
        }
        ctx.save_log(&log)?;
        if !status.success() {
            return Err(StageError::input(format!(
                "`{}` failed ({status}); the end of its output:\n{}",
                self.command.join(" "),
                tail(&log, 20)
            )));
        }
        let metrics = match &self.metrics {
            Some(name) => Some(read_metrics(&out_dir.join(name), name, &self.command)?),
            None => None,
        };
        let files = ctx.ingest_folder(&out_dir, "the command left")?;
        let model = files.iter().any(|f| f.path == "config.json");
        let _ = std::fs::remove_dir_all(&work);
        Ok(Artifact::Folder { model, external: None, files, metrics })
    }
}

/// The metrics file a command wrote: a JSON object (numbers, or objects of them, and any
/// strings or booleans that label them).
pub(crate) fn read_metrics(path: &Path, name: &str, command: &[String]) -> Result<serde_json::Value, StageError> {
    let hint = "the command must write a JSON object such as {\"accuracy\": 0.71} into {out}";
    let bytes = std::fs::read(path).map_err(|e| {
        StageError::input(format!("`{}` left no readable {{out}}/{name} (`metrics` names it): {e}", command.join(" ")))
            .with_hint(hint)
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| StageError::input(format!("{{out}}/{name} is not JSON: {e}")).with_hint(hint))?;
    if !value.is_object() {
        return Err(StageError::input(format!("{{out}}/{name} holds {value}, not a JSON object")).with_hint(hint));
    }
    Ok(value)
}

impl MapStage for Exec {
    fn prepare(
        &self,
        ctx: &StageContext<'_>,
        inputs: &Inputs,
        _replica: usize,
    ) -> Result<Arc<dyn ShardMapper>, StageError> {
        let work = ctx.temp_path("exec-inputs");
        let mut values = BTreeMap::new();
        let mut env = BTreeMap::new();
        for (port, artifacts) in &inputs.ports {
            if port == "data" {
                continue;
            }
            let artifact = match artifacts.as_slice() {
                [] => continue,
                [one] => one,
                several => {
                    return Err(StageError::input(format!(
                        "input port `{port}` holds {} artifacts; with per_shard = true each port gives the command one",
                        several.len()
                    ))
                    .with_hint("run the command once over all of them without per_shard (then {in.PORT} lists them)"));
                }
            };
            std::fs::create_dir_all(&work)
                .map_err(|e| StageError::environment(format!("cannot create a work folder: {e}")))?;
            let path = ctx.materialize(artifact, &work.join(port))?;
            values.insert(format!("in.{port}"), path.display().to_string());
            env.insert(format!("LADLE_IN_{}", port.to_uppercase().replace('-', "_")), path.display().to_string());
        }
        let command: Vec<String> = self.command.iter().map(|a| substitute(a, &values)).collect();
        Ok(Arc::new(ShardFilter { command, env, dir: self.dir.clone(), timeout: self.timeout }))
    }
}

struct ShardFilter {
    command: Vec<String>,
    env: BTreeMap<String, String>,
    dir: PathBuf,
    timeout: Option<Duration>,
}

impl ShardMapper for ShardFilter {
    fn map_shard(&self, shard: &ShardInput<'_>, output: &mut ObjectWriter) -> Result<MappedShard, StageError> {
        let (status, stdout, stderr) =
            run_command(&self.command, &self.dir, &self.env, Some(shard.jsonl), self.timeout)?;
        if !status.success() {
            return Err(StageError::input(format!(
                "`{}` failed ({status}); the end of its stderr:\n{}",
                self.command.join(" "),
                tail(&stderr, 20)
            )));
        }
        let mut out = Vec::with_capacity(stdout.len());
        let mut n = 0;
        for (i, line) in lines(&stdout).enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let record = parse_record(line).map_err(|e| {
                StageError::input(format!("line {} of the command's output: {e}", i + 1))
                    .with_hint("a per_shard command must print one JSON object per line on stdout (log to stderr)")
            })?;
            write_record(&record, &mut out);
            n += 1;
        }
        output.append(&out)?;
        Ok(MappedShard { records: n, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_substitution() {
        assert_eq!(placeholders("--data={in.data}"), vec!["in.data"]);
        assert_eq!(placeholders("{{literal}} {out}"), vec!["out"]);
        let mut v = BTreeMap::new();
        v.insert("out".to_string(), "/o".to_string());
        assert_eq!(substitute("{{x}}={out}/m", &v), "{x}=/o/m");
    }
}
