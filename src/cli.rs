//! Command-line definitions (what was typed) and their dispatch (what it means).

mod graph;
mod render;
mod show;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ladle_engine::events::EventSink;
use ladle_engine::executor::Executor;
use ladle_engine::executor::slurm::{Profile, SlurmOptions};
use ladle_engine::plan::PlanStatus;
use ladle_engine::runs::RunStatus;
use ladle_engine::{Pipeline, RunOptions, Store};

#[derive(Parser, Debug)]
#[command(
    name = "ladle",
    version,
    about = "Cached, resumable data-curation and model-building pipelines for vision-language models"
)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct StoreArg {
    /// The store to use [default: .ladle/ beside the pipeline file; env: LADLE_STORE]
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

/// `--set NAME=VALUE`: a pipeline's `[vars]` for this command.
#[derive(clap::Args, Debug, Clone, Default)]
struct VarsArg {
    /// Set variable NAME of the pipeline's [vars] for this command (repeatable); VALUE is read as
    /// TOML (2e-5, true, ["a", "b"]) and must have the variable's type
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
    set: Vec<(String, String)>,
}

fn parse_set(arg: &str) -> std::result::Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().to_string(), value.to_string())),
        _ => Err(format!("`{arg}` is not NAME=VALUE (e.g. --set lr=2e-5)")),
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run what is not cached
    Run {
        pipeline: PathBuf,
        #[command(flatten)]
        vars: VarsArg,
        #[command(flatten)]
        store: StoreArg,
        /// Work slots: shards and stages computing at once [default: number of cores]
        #[arg(short = 'j', long = "jobs", value_name = "N")]
        jobs: Option<usize>,
        /// Print one JSON object per event, ending with a summary
        #[arg(long)]
        json: bool,
        /// Recompute this stage even if cached (repeatable)
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Run only this stage and what it needs
        #[arg(long, value_name = "STAGE")]
        stage: Option<String>,
        /// Where map stages' uncached shards compute: threads here, or a Slurm cluster's job arrays
        #[arg(long, value_enum, default_value_t = ExecutorArg::Local)]
        executor: ExecutorArg,
        /// The cluster profile for --executor slurm [default: env LADLE_SLURM_PROFILE, else Slurm's defaults]
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// With --executor slurm: leave submitted jobs running when interrupted (a rerun adopts them)
        #[arg(long)]
        detach: bool,
    },
    /// Compute the shards of one task of a Slurm job array (run by the job, not by hand)
    Worker {
        /// The task file the driver wrote
        task: PathBuf,
    },
    /// Say what a run would do, and why
    Plan {
        pipeline: PathBuf,
        #[command(flatten)]
        vars: VarsArg,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph
    Graph {
        pipeline: PathBuf,
        #[command(flatten)]
        vars: VarsArg,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Show a stage's output: digest, counts, schema, a sample, its log
    Show {
        pipeline: PathBuf,
        #[command(flatten)]
        vars: VarsArg,
        stage: String,
        #[command(flatten)]
        store: StoreArg,
        /// How many records to print
        #[arg(short = 'n', long, default_value_t = 3)]
        sample: usize,
        /// Draw the histogram of a numeric column instead (with the cut of a `select` reading it)
        #[arg(long, value_name = "COLUMN")]
        hist: Option<String>,
    },
    /// Write an HTML report of a run: the DAG, histograms with their cuts, the records at both
    /// ends, soups, run history
    Report {
        pipeline: PathBuf,
        #[command(flatten)]
        vars: VarsArg,
        #[command(flatten)]
        store: StoreArg,
        /// Where to write the report
        #[arg(short = 'o', long = "output", value_name = "FILE", default_value = "report.html")]
        output: PathBuf,
        /// The run to report [default: the latest]
        #[arg(long, value_name = "N")]
        run: Option<u64>,
        /// Also write each figure into this folder, as SVG and as PNG (3x, for a paper)
        #[arg(long, value_name = "DIR")]
        figures: Option<PathBuf>,
    },
    /// Write a stage's output outside the store (.jsonl/.parquet for a dataset, a folder for a model)
    Export {
        pipeline: PathBuf,
        #[command(flatten)]
        vars: VarsArg,
        stage: String,
        #[arg(short = 'o', long = "output", value_name = "PATH")]
        output: PathBuf,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the runs kept in a store
    Runs {
        /// A pipeline file whose store to read
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove what no retained run references
    Gc {
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArg,
        /// How many of the most recent runs keep their outputs (besides each stage's latest)
        #[arg(long, default_value_t = 10)]
        keep_runs: usize,
    },
    /// Re-hash every object in the store; quarantine corrupt ones
    Verify {
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Write and check WASM filter plugins
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Look at how images are prepared for vision models
    #[command(subcommand)]
    Image(ImageCmd),
    /// Measure the native model code on random-weight models of real shapes (JSON lines)
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Perplexity scoring throughput (tokens/s) and its fraction of the device's matmul roofline
    Score {
        /// A decoder shape (qwen2-0.5b, qwen2-1.5b, qwen2-7b) or a config.json
        #[arg(long, default_value = "qwen2-0.5b")]
        shape: String,
        /// Keep only this many layers (a quicker run of the same widths)
        #[arg(long, value_name = "N")]
        layers: Option<u64>,
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32, bf16 or f16 [default: f32 on the CPU, bf16 on a GPU]
        #[arg(long)]
        dtype: Option<String>,
        /// Random token sequences to score
        #[arg(long, default_value_t = 256)]
        sequences: usize,
        /// Their mean length in tokens (lengths spread over half to 1.5 times it)
        #[arg(long, default_value_t = 60)]
        length: usize,
        /// Tokens per batch, padding included (the `perplexity` stage's `batch_tokens`)
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        /// Also write the random model here (config.json, model.safetensors), and the token ids
        /// as tokens.json, for a reference implementation to score the very same thing
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
    /// Generation throughput (new tokens/s) of the same prompts at several batch sizes, side by
    /// side (the `generate` stage's `batch`)
    Generate {
        /// A decoder shape (qwen2-0.5b, qwen2-1.5b, qwen2-7b) or a config.json
        #[arg(long, default_value = "qwen2-0.5b")]
        shape: String,
        /// Keep only this many layers (a quicker run of the same widths)
        #[arg(long, value_name = "N")]
        layers: Option<u64>,
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32, bf16 or f16 [default: f32 on the CPU, bf16 on a GPU]
        #[arg(long)]
        dtype: Option<String>,
        /// Random prompts to write after
        #[arg(long, default_value_t = 32)]
        prompts: usize,
        /// Their mean length in tokens (lengths spread over half to 1.5 times it)
        #[arg(long, default_value_t = 40)]
        length: usize,
        /// New tokens each prompt gets
        #[arg(long, default_value_t = 32)]
        new_tokens: usize,
        /// Batch sizes to measure, in turn; the first is the baseline
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32")]
        batch: Vec<usize>,
    },
    /// Image-conditioned scoring (records/s) at LLaVA-1.5-7B's shape with random weights, as the
    /// `perplexity` stage scores with `image`
    Llava {
        /// A LLaVA shape (llava-1.5-7b) or a LLaVA config.json
        #[arg(long, default_value = "llava-1.5-7b")]
        shape: String,
        /// Keep only this many language-model layers
        #[arg(long, value_name = "N")]
        layers: Option<u64>,
        /// Keep only this many vision-tower layers
        #[arg(long, value_name = "N")]
        vision_layers: Option<u64>,
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32, bf16 or f16 [default: f32 on the CPU, bf16 on a GPU]
        #[arg(long)]
        dtype: Option<String>,
        /// Random records (a noise image and a caption each)
        #[arg(long, default_value_t = 64)]
        records: usize,
        /// The captions' mean length in tokens
        #[arg(long, default_value_t = 60)]
        length: usize,
        /// Positions per batch, image slots included (the `perplexity` stage's `batch_tokens`)
        /// [default: the stage's on the device]
        #[arg(long)]
        batch_tokens: Option<usize>,
        /// A LLaVA folder whose tokenizer and chat template make the records
        #[arg(long, default_value = "tests/fixtures/points-tiny/tiny-llava")]
        tokenizer: PathBuf,
        /// Where the random model's folder is made
        #[arg(long, default_value = "/tmp/ladle-llava-bench")]
        work: PathBuf,
        /// Also write its weights and the inputs there (inputs.safetensors, records.json), for
        /// benches/llava_vs_transformers.py to score the very same thing
        #[arg(long)]
        save: bool,
    },
    /// Soup averaging (GB/s of input) against plain reads of the same checkpoints
    Soup {
        /// Ingredient model folders (or --make synthetic ones)
        ingredients: Vec<PathBuf>,
        /// Make this many synthetic bf16 checkpoints of --size-gb each in --work
        #[arg(long, value_name = "N")]
        make: Option<usize>,
        #[arg(long, default_value_t = 2.0)]
        size_gb: f64,
        #[arg(long, default_value = "/tmp/ladle-soup-bench")]
        work: PathBuf,
        /// Where the soup goes (tmpfs keeps the disk's write speed out of the figure)
        #[arg(long, default_value = "/dev/shm/ladle-soup-bench")]
        out: PathBuf,
        /// Runs of each, alternated; medians are reported
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// The transformers fixtures checked in a placement: perplexities (text, prompted, LLaVA,
    /// Qwen2-VL), greedy generation, a 6000-token record; `"ok"` says whether all passed
    Fixtures {
        /// The fixture folder (expected.json, captions.jsonl, the tiny models)
        #[arg(long, default_value = "tests/fixtures/points-tiny")]
        dir: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        /// f32, bf16 or f16 [default: f32 on the CPU, bf16 on a GPU]
        #[arg(long)]
        dtype: Option<String>,
    },
    /// The device's dense matmul rate (FLOP/s): the roofline `score` reports against
    Matmul {
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        dtype: Option<String>,
        /// Square size [default: 8192 on a GPU, 2048 on the CPU]
        #[arg(long)]
        size: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// How CATTY (POINTS' dynamic high resolution) cuts an image: slices, resized size, tiles (JSON)
    Tiles {
        image: PathBuf,
        /// Tile size in pixels
        #[arg(long, default_value_t = 336)]
        size: u32,
        /// At most this many tiles
        #[arg(long, default_value_t = 8)]
        max_splits: u32,
    },
}

#[derive(Subcommand, Debug)]
enum PluginCmd {
    /// Start a plugin: a Rust crate (`cargo build --release --target wasm32-wasip2`), or Python
    /// (`--lang python`, built with componentize-py)
    New {
        name: String,
        /// Where to create it [default: the current folder]
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// What to write it in: a Rust crate, or Python built with componentize-py
        #[arg(long, value_enum, default_value_t = LangArg::Rust)]
        lang: LangArg,
    },
    /// Check a .wasm against ladle's plugin interface and list what it exports and imports
    Check { wasm: PathBuf },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LangArg {
    Rust,
    Python,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

pub enum Outcome {
    Success,
    StageFailed,
}

pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Where the store is: --store, then LADLE_STORE, then `.ladle/` beside the pipeline file (or in
/// the current folder when there is none).
fn store_dir(arg: &StoreArg, pipeline: Option<&Path>) -> PathBuf {
    if let Some(s) = &arg.store {
        return s.clone();
    }
    if let Some(s) = std::env::var_os("LADLE_STORE").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    let dir = pipeline
        .and_then(|p| std::path::absolute(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join(".ladle")
}

/// Every stage kind: the native ones and `plugin`.
fn registry() -> ladle_engine::Registry {
    let mut registry = ladle_stages::registry();
    ladle_plugins::register(&mut registry);
    registry
}

fn load(pipeline: &Path, vars: &VarsArg) -> Result<Pipeline> {
    Ok(Pipeline::load_with(pipeline, &registry(), &vars.set)?)
}

fn open_store(arg: &StoreArg, pipeline: Option<&Path>) -> Result<Store> {
    Ok(Store::open(&store_dir(arg, pipeline))?)
}

fn open_existing_store(arg: &StoreArg, pipeline: Option<&Path>) -> Result<Store> {
    let dir = store_dir(arg, pipeline);
    if !dir.join("index").exists() {
        bail!("there is no store at {}\n  hint: run a pipeline first, or pass --store DIR", dir.display());
    }
    Ok(Store::open(&dir)?)
}

pub fn dispatch(args: Args) -> Result<Outcome> {
    let mut out = std::io::stdout();
    match args.command {
        Cmd::Run { pipeline, vars, store, jobs, json, force, stage, executor, profile, detach } => {
            let p = Arc::new(load(&pipeline, &vars)?);
            let executor = match executor {
                ExecutorArg::Local => {
                    if profile.is_some() || detach {
                        bail!("--profile and --detach are for --executor slurm");
                    }
                    Executor::Local
                }
                ExecutorArg::Slurm => {
                    let path = profile.or_else(|| {
                        std::env::var_os("LADLE_SLURM_PROFILE").filter(|s| !s.is_empty()).map(PathBuf::from)
                    });
                    let profile = match path {
                        Some(path) => Profile::load(&path)?,
                        None => Profile::default(),
                    };
                    Executor::Slurm(Arc::new(SlurmOptions { profile, detach }))
                }
            };
            let store = open_store(&store, Some(&pipeline))?;
            let options = RunOptions {
                jobs: jobs.unwrap_or(RunOptions::default().jobs).max(1),
                force: force.into_iter().collect(),
                only: stage,
                executor,
            };
            let sink: Arc<dyn EventSink> = render::sink(json);
            let record = ladle_engine::run(p, &store, &options, sink.clone())?;
            drop(sink);
            Ok(if record.status == RunStatus::Ok { Outcome::Success } else { Outcome::StageFailed })
        }
        Cmd::Worker { task } => {
            let mut log = std::io::stderr();
            ladle_engine::executor::worker::run_task(&task, &registry(), &mut log)?;
            Ok(Outcome::Success)
        }
        Cmd::Plan { pipeline, vars, store, json } => {
            let p = load(&pipeline, &vars)?;
            let store = open_store(&store, Some(&pipeline))?;
            let entries = ladle_engine::plan::plan(&p, &store, &[])?;
            if json {
                for e in &entries {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
            } else {
                let width = entries.iter().map(|e| e.stage.len()).max().unwrap_or(0);
                for e in &entries {
                    let status = match e.status {
                        PlanStatus::Cached => "cached",
                        PlanStatus::Run => "run",
                        PlanStatus::Maybe => "maybe",
                    };
                    let why = if e.reasons.is_empty() { String::new() } else { format!("  {}", e.reasons.join("; ")) };
                    writeln!(out, "{:<width$}  {:<6}  {:<8}{why}", e.stage, status, e.kind)?;
                }
            }
            Ok(Outcome::Success)
        }
        Cmd::Graph { pipeline, vars, format } => {
            let p = load(&pipeline, &vars)?;
            let graph = graph::render(&p, format);
            // A text output ends with a newline, so a shell prompt does not follow on its last line.
            write!(out, "{graph}{}", if graph.ends_with('\n') { "" } else { "\n" })?;
            Ok(Outcome::Success)
        }
        Cmd::Show { pipeline, vars, stage, store, sample, hist } => {
            let p = load(&pipeline, &vars)?;
            let store = open_existing_store(&store, Some(&pipeline))?;
            match hist {
                Some(column) => show::histogram(&p, &store, &stage, &column, &mut out)?,
                None => show::show(&p, &store, &stage, sample, &mut out)?,
            }
            Ok(Outcome::Success)
        }
        Cmd::Report { pipeline, vars, store, output, run, figures } => {
            let p = load(&pipeline, &vars)?;
            let store = open_existing_store(&store, Some(&pipeline))?;
            let options = ladle_report::Options { run, ..Default::default() };
            let report = ladle_report::build(&p, &store, &options)?;
            write_atomically(&output, report.html.as_bytes())?;
            writeln!(out, "wrote {} ({})", output.display(), human_bytes(report.html.len() as u64))?;
            if let Some(dir) = figures {
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                for f in &report.figures {
                    write_atomically(&dir.join(format!("{}.svg", f.name)), f.svg.as_bytes())?;
                    let png =
                        ladle_report::png::render(&f.svg).map_err(|e| anyhow::anyhow!("figure {}: {e}", f.name))?;
                    write_atomically(&dir.join(format!("{}.png", f.name)), &png)?;
                }
                writeln!(
                    out,
                    "wrote {} figure(s) to {} (SVG, and PNG at {}x)",
                    report.figures.len(),
                    dir.display(),
                    ladle_report::png::SCALE
                )?;
                if !ladle_report::png::has_fonts() {
                    writeln!(
                        out,
                        "warning: no fonts found on this system: the PNG figures have no text\n  hint: install one (Debian: fonts-dejavu-core); the SVG figures and the page are not affected"
                    )?;
                }
            }
            Ok(Outcome::Success)
        }
        Cmd::Export { pipeline, vars, stage, output, store } => {
            let p = load(&pipeline, &vars)?;
            let store = open_existing_store(&store, Some(&pipeline))?;
            let n = show::export(&p, &store, &stage, &output)?;
            writeln!(out, "wrote {} ({n})", output.display())?;
            Ok(Outcome::Success)
        }
        Cmd::Runs { pipeline, store, json } => {
            let store = open_existing_store(&store, pipeline.as_deref())?;
            let runs = store.runs()?;
            for r in &runs {
                if json {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                    continue;
                }
                let status = match r.status {
                    RunStatus::Ok => "ok",
                    RunStatus::Failed => "failed",
                    RunStatus::Running => "interrupted",
                };
                let count = |s| r.stages.iter().filter(|x| x.status == s).count();
                use ladle_engine::runs::StageStatus as S;
                writeln!(
                    out,
                    "run {:>4}  {:<11}  {:<24}  {} ran, {} cached, {} failed  {}",
                    r.id,
                    status,
                    r.pipeline,
                    count(S::Ran),
                    count(S::Cached),
                    count(S::Failed),
                    r.seconds.map(|s| format!("{s:.2} s")).unwrap_or_default()
                )?;
                for s in r.stages.iter().filter(|s| !s.jobs.is_empty()) {
                    writeln!(out, "          {}: Slurm job(s) {}", s.stage, s.jobs.join(", "))?;
                }
            }
            if runs.is_empty() && !json {
                writeln!(out, "no runs yet")?;
            }
            Ok(Outcome::Success)
        }
        Cmd::Gc { pipeline, store, keep_runs } => {
            let store = open_existing_store(&store, pipeline.as_deref())?;
            let r = store.gc(keep_runs)?;
            writeln!(
                out,
                "kept the latest output of every stage and {} recent run(s); removed {} artifact(s), {} compiled plugin(s) and {} object(s), freed {}",
                r.runs_kept,
                r.artifacts_removed,
                r.compiled_removed,
                r.objects_removed,
                human_bytes(r.bytes_freed)
            )?;
            Ok(Outcome::Success)
        }
        Cmd::Plugin(PluginCmd::New { name, dir, lang }) => {
            use ladle_plugins::scaffold::{COMPONENTIZE_PY, Lang, new_plugin, python_build_line};
            let lang = match lang {
                LangArg::Rust => Lang::Rust,
                LangArg::Python => Lang::Python,
            };
            let root = new_plugin(&dir, &name, lang)?;
            let module = name.replace('-', "_");
            writeln!(out, "created {}", root.display())?;
            match lang {
                Lang::Rust => writeln!(
                    out,
                    "next:\n  cd {}\n  rustup target add wasm32-wasip2   # once\n  cargo build --release --target wasm32-wasip2\n  ladle plugin check target/wasm32-wasip2/release/{module}.wasm",
                    root.display()
                )?,
                Lang::Python => writeln!(
                    out,
                    "next:\n  cd {}\n  pip install componentize-py=={COMPONENTIZE_PY}   # once\n  {}\n  ladle plugin check {module}.wasm",
                    root.display(),
                    python_build_line(&module)
                )?,
            }
            Ok(Outcome::Success)
        }
        Cmd::Plugin(PluginCmd::Check { wasm }) => {
            let report = ladle_plugins::check::check(&wasm)?;
            writeln!(out, "ok: {} fits {}", wasm.display(), ladle_plugins::host::WORLD)?;
            writeln!(out, "plugin:  {} ({})", report.name, human_bytes(report.size))?;
            writeln!(out, "exports: {}", report.exports.join(", "))?;
            writeln!(
                out,
                "imports: {}",
                if report.imports.is_empty() { "nothing".to_string() } else { report.imports.join(", ") }
            )?;
            Ok(Outcome::Success)
        }
        Cmd::Image(ImageCmd::Tiles { image, size, max_splits }) => {
            if size == 0 || max_splits == 0 {
                bail!("--size and --max-splits must be positive");
            }
            let [w, h] = ladle_models::vision::images::displayed_size(&image)?;
            let t = ladle_models::vision::catty::tiling(w, h, size, max_splits);
            let json = serde_json::json!({
                "image": image.display().to_string(), "input": [w, h], "image_size": size, "max_splits": max_splits,
                "clamped": t.clamped, "slices": t.slices, "resized": t.resized, "tiles": t.tiles, "thumbnail": t.thumbnail,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
            Ok(Outcome::Success)
        }
        Cmd::Bench(cmd) => {
            bench(cmd, &mut out)?;
            Ok(Outcome::Success)
        }
        Cmd::Verify { pipeline, store } => {
            let store = open_existing_store(&store, pipeline.as_deref())?;
            let r = store.verify().context("verify failed")?;
            writeln!(out, "checked {} object(s), {}", r.objects, human_bytes(r.bytes))?;
            for d in &r.corrupt {
                writeln!(out, "corrupt: {d} (quarantined; a later run recomputes it)")?;
            }
            for d in &r.missing {
                writeln!(out, "missing: {d} (forgotten; a later run recomputes it)")?;
            }
            if r.corrupt.is_empty() && r.missing.is_empty() {
                writeln!(out, "all objects intact")?;
                Ok(Outcome::Success)
            } else {
                Ok(Outcome::StageFailed)
            }
        }
    }
}

pub use ladle_engine::units::human_bytes;

/// `ladle bench`: see [`ladle_stages::bench`].
fn bench(cmd: BenchCmd, out: &mut dyn Write) -> Result<()> {
    use ladle_models::device::Placement;
    use ladle_stages::bench;
    let place = |device: &str, dtype: Option<&str>| {
        Placement::from_names(Some(device), dtype).map_err(|(name, e)| anyhow::anyhow!("{e} (--{name})"))
    };
    let json = match cmd {
        BenchCmd::Fixtures { dir, device, dtype } => {
            let json = ladle_stages::fixture_check::run_fixtures(&dir, &place(&device, dtype.as_deref())?)?;
            if json["ok"] != true {
                writeln!(out, "{json}")?;
                anyhow::bail!(
                    "a fixture check failed on {} in {} (see \"checks\" above)",
                    json["device"],
                    json["dtype"]
                );
            }
            json
        }
        BenchCmd::Matmul { device, dtype, size } => bench::run_matmul(&place(&device, dtype.as_deref())?, size)?,
        BenchCmd::Soup { ingredients, make, size_gb, work, out, repeat } => {
            let json = bench::run_soup(&bench::SoupOptions {
                ingredients,
                make: make.map(|n| (n, size_gb)),
                work,
                out: out.clone(),
                repeat,
            })?;
            let _ = std::fs::remove_dir_all(&out);
            json
        }
        BenchCmd::Llava {
            shape,
            layers,
            vision_layers,
            device,
            dtype,
            records,
            length,
            batch_tokens,
            tokenizer,
            work,
            save,
        } => {
            let placement = place(&device, dtype.as_deref())?;
            ladle_stages::bench_llava::run_llava(&ladle_stages::bench_llava::LlavaOptions {
                shape,
                layers,
                vision_layers,
                placement,
                records,
                length,
                batch_tokens: batch_tokens.unwrap_or_else(|| placement.default_batch_tokens()),
                tokenizer,
                work,
                save,
            })?
        }
        BenchCmd::Generate { shape, layers, device, dtype, prompts, length, new_tokens, batch } => {
            bench::run_generate(&bench::GenerateOptions {
                shape,
                layers,
                placement: place(&device, dtype.as_deref())?,
                prompts,
                length,
                new_tokens,
                batches: batch,
            })?
        }
        BenchCmd::Score { shape, layers, device, dtype, sequences, length, batch_tokens, save } => {
            bench::run_score(&bench::ScoreOptions {
                shape,
                layers,
                placement: place(&device, dtype.as_deref())?,
                sequences,
                length,
                batch_tokens,
                save,
            })?
        }
    };
    writeln!(out, "{json}")?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file beside it, so a reader never sees half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.ladle-{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
