//! `soup`: average fine-tuned models into one (model soups; POINTS §3.3, Algorithm 1).
//!
//! ```toml
//! [stages.soup]
//! kind = "soup"
//! models = ["ft_a", "ft_b", "ft_c"]   # model artifacts: `model` stages, or `exec` stages that train
//! eval = "heldout"                    # a dataset: the metric is its corpus perplexity (lower wins)
//! text = "{caption}"                  # what is scored, as in `perplexity` (and `prompt`)
//! method = "greedy"                   # "uniform" | "weighted" (weights = [...]) | "maximum" (top = N)
//! strict = false                      # greedy: keep an ingredient only if strictly better
//! max_shard_size = "5GB"              # output shards (with model.safetensors.index.json)
//! device = "auto"                      # where the built-in metric scores (see ladle_models::device);
//! dtype = "f32"                        # default f32 on the CPU, bf16 on a GPU
//! ```
//!
//! - `uniform`: the mean of all; `weighted`: Σ wᵢ·modelᵢ / Σ wᵢ.
//! - `maximum`: the mean of the `top` ingredients by the metric.
//! - `greedy`: ingredients sorted by the metric, best first; the pool starts with the best, and
//!   each next ingredient joins when the mean of pool + it scores at least as well as the pool
//!   (`strict = true`: strictly better, as the model-soups paper's code does).
//!
//! The metric is either built in, the corpus perplexity of `text` (and `prompt`, as in
//! [`crate::perplexity`]) over the `eval` records, exp(Σ NLL / Σ scored tokens), with candidates
//! averaged and scored in memory, never written; or external:
//! `metric = { command = ["python3", "eval.py", "{model}"], higher_is_better = true, timeout = 3600 }`
//! gets each candidate as a model folder in `{model}` (a VLMEvalKit run, say) and prints one
//! number as its last line; `metric_deps = ["eval.py"]` puts the files it reads into the cache
//! keys. With `image = "{image}"` the built-in metric is image-conditioned, as in `perplexity`
//! (the ingredients are then LLaVA-format VLMs). Every score is cached in the store under (the ingredients' digests and weights, the
//! metric's definition and inputs), so adding an ingredient evaluates only the new candidates.
//!
//! The output is a model folder: the soup's weights (streamed tensor by tensor, see
//! [`average`](ladle_models::soup::average)), the best ingredient's other files (config, tokenizer), and `soup.json` with the
//! method, the ingredients' digests and weights, and the greedy trace (each try, its score, kept
//! or not), which `ladle show` prints too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::records::{lines, parse_record};
use ladle_engine::stage::{Accepts, Arity, Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, ArtifactDigest, Digest, StageContext, StageKey};
use ladle_models::device::Placement;
use ladle_models::llm::{LanguageModel, LlmConfig, Score, Scorer, Sequence};
use ladle_models::soup::average;
use ladle_models::soup::checkpoint::{Checkpoint, check_compatible};
use serde_json::json;

use crate::model_error;
use crate::template::Template;

pub struct SoupKind;

const PORTS: &[PortSpec] = &[
    PortSpec { name: "models", arity: Arity::Many, required: true, accepts: Accepts::Model },
    PortSpec { name: "eval", arity: Arity::One, required: false, accepts: Accepts::Dataset },
];

#[derive(Debug, Clone, PartialEq)]
enum Method {
    Uniform,
    Weighted(Vec<f64>),
    Maximum(usize),
    Greedy { strict: bool },
}

impl StageKind for SoupKind {
    fn name(&self) -> &'static str {
        "soup"
    }
    fn about(&self) -> &'static str {
        "average fine-tuned models: uniform, weighted, maximum or greedy (POINTS' model soup)"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let method_name = params
            .choice("method", &["uniform", "weighted", "maximum", "greedy"])?
            .ok_or_else(|| params.missing("method", "\"uniform\", \"weighted\", \"maximum\" or \"greedy\""))?;
        let weights = params.float_list("weights")?;
        let top = params.positive("top")?;
        let strict = params.bool("strict")?;
        let method = match method_name.as_str() {
            "uniform" => Method::Uniform,
            "weighted" => {
                let w = weights.clone().ok_or_else(|| params.missing("weights", "one weight per model"))?;
                if w.iter().any(|&x| x < 0.0) || w.iter().sum::<f64>() <= 0.0 {
                    return Err(params.error("weights", "weights must be non-negative and not all zero"));
                }
                Method::Weighted(w)
            }
            "maximum" => {
                Method::Maximum(top.ok_or_else(|| params.missing("top", "how many of the best to average"))? as usize)
            }
            _ => Method::Greedy { strict: strict.unwrap_or(false) },
        };
        let misplaced = [
            ("weights", "weighted", weights.is_some()),
            ("top", "maximum", top.is_some()),
            ("strict", "greedy", strict.is_some()),
        ]
        .into_iter()
        .find(|(_, m, given)| *given && *m != method_name)
        .map(|(p, m, _)| (p, m));
        if let Some((p, m)) = misplaced {
            return Err(params.error(p, format!("`{p}` belongs to method = \"{m}\", not \"{method_name}\"")));
        }
        let text =
            params.string("text")?.map(|s| Template::parse(&s).map_err(|e| params.error("text", e))).transpose()?;
        let prompt =
            params.string("prompt")?.map(|s| Template::parse(&s).map_err(|e| params.error("prompt", e))).transpose()?;
        let image = params
            .string("image")?
            .map(|s| crate::image_source::ImageField::parse(&s).map_err(|e| params.error("image", e)))
            .transpose()?;
        let command = match params.table("metric")? {
            None => None,
            Some(t) => Some(parse_metric(&t).map_err(|e| params.error("metric", e))?),
        };
        let metric_deps = params.path_deps("metric_deps")?;
        if image.is_some() && text.is_none() {
            return Err(
                params.error("image", "`image` conditions the built-in metric: give `text` (what to score) too")
            );
        }
        let metric = match (text, command) {
            (Some(_), Some(_)) => {
                return Err(params.stage_error(
                    "give one metric: `text` (the corpus perplexity of `eval`) or `metric = { command = [...] }`",
                ));
            }
            (Some(text), None) => Some(MetricSpec::Perplexity { text, prompt, image }),
            (None, Some(c)) => Some(c),
            (None, None) => None,
        };
        let needs_metric = matches!(method, Method::Maximum(_) | Method::Greedy { .. });
        let has_eval = params.ports().iter().any(|p| p == "eval");
        if needs_metric && !matches!(&metric, Some(MetricSpec::Command { .. })) && (metric.is_none() || !has_eval) {
            let mut e = params.stage_error(format!(
                "method = \"{method_name}\" ranks the models by a metric: give `eval` (a dataset) and `text` (what to \
                 score), or `metric = {{ command = [...] }}`"
            ));
            e.hint = Some(
                "eval = \"heldout\" and text = \"{caption}\": the corpus perplexity of the held-out captions".into(),
            );
            return Err(e);
        }
        let max_shard_bytes = match params.string("max_shard_size")? {
            None => 5_000_000_000,
            Some(s) => parse_size(&s).ok_or_else(|| {
                params.error("max_shard_size", format!("`{s}` is not a size like \"5GB\" or \"500MB\""))
            })?,
        };
        params.exclude_from_key("max_shard_size");
        // Averaging streams on the CPU at the speed the checkpoints can be read; only the
        // built-in metric runs a model, and `device` and `dtype` place it.
        let builtin = matches!(metric, Some(MetricSpec::Perplexity { .. }));
        if let Some(p) = ["device", "dtype"].into_iter().find(|p| !builtin && params.has(p)) {
            return Err(params.error(
                p,
                format!(
                    "`{p}` places the model of the built-in metric (`eval` with `text`), which this soup does not \
                     use; averaging itself always streams on the CPU"
                ),
            ));
        }
        let placement = if builtin { crate::placement::configure(params)? } else { Placement::CPU_F32 };
        Ok(Arc::new(Soup { method, metric, metric_deps, max_shard_bytes, placement }))
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n > 0.0).then_some((n * mult) as u64)
}

struct Soup {
    method: Method,
    metric: Option<MetricSpec>,
    /// Files the metric command reads (its script, say): their digests join the score cache key.
    metric_deps: Vec<PathBuf>,
    max_shard_bytes: u64,
    /// Where the built-in metric's candidates are scored.
    placement: Placement,
}

/// How candidates are scored.
enum MetricSpec {
    /// Corpus perplexity of `text` (after `prompt`) over the `eval` records; lower is better.
    /// With `image`, image-conditioned as in `perplexity`: the ingredients are LLaVA-format VLMs.
    Perplexity { text: Template, prompt: Option<Template>, image: Option<crate::image_source::ImageField> },
    /// An external program given the candidate as a model folder in `{model}`; it prints one
    /// number as the last line of its output.
    Command { command: Vec<String>, higher_is_better: bool, timeout: Option<std::time::Duration> },
}

fn parse_metric(t: &serde_json::Value) -> Result<MetricSpec, String> {
    let obj = t.as_object().ok_or("`metric` must be a table")?;
    if let Some(unknown) = obj.keys().find(|k| !["command", "higher_is_better", "timeout"].contains(&k.as_str())) {
        return Err(format!("unknown key `{unknown}` in `metric` (it takes `command`, `higher_is_better`, `timeout`)"));
    }
    let command: Vec<String> = match obj.get("command").and_then(|c| c.as_array()) {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or("`metric.command` must be an array of strings"))
            .collect::<Result<_, _>>()?,
        _ => return Err("`metric` needs `command = [\"program\", \"arg\", \"{model}\"]`".into()),
    };
    if !command.iter().any(|a| a.contains("{model}")) {
        return Err("`metric.command` must pass the candidate somewhere: put `{model}` in an argument".into());
    }
    let higher_is_better = match obj.get("higher_is_better") {
        None => false,
        Some(v) => v.as_bool().ok_or("`metric.higher_is_better` must be true or false")?,
    };
    let timeout = match obj.get("timeout") {
        None => None,
        Some(v) => match v.as_f64() {
            Some(s) if s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
            _ => return Err("`metric.timeout` must be a positive number of seconds".into()),
        },
    };
    Ok(MetricSpec::Command { command, higher_is_better, timeout })
}

impl Stage for Soup {
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
    fn device_slot(&self) -> Option<String> {
        matches!(self.metric, Some(MetricSpec::Perplexity { .. })).then(|| self.placement.slot()).flatten()
    }
}

/// One ingredient: where its files are and its artifact digest.
struct Ingredient {
    dir: PathBuf,
    digest: ArtifactDigest,
    checkpoint: Checkpoint,
}

/// One step of the greedy search, as `soup.json` and `ladle show` report it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Try {
    /// The ingredient tried (its position in `models`).
    pub ingredient: usize,
    /// The metric of the pool with it.
    pub score: f64,
    pub kept: bool,
}

impl WholeStage for Soup {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let models = inputs.all("models");
        if models.is_empty() {
            return Err(StageError::input("`models` is empty: a soup needs at least one model"));
        }
        let mut ingredients = Vec::new();
        for (i, m) in models.iter().enumerate() {
            let dir = crate::model::model_folder(ctx, m, &format!("input {i} of `models`"), &format!("model-{i}"))?;
            let checkpoint = Checkpoint::open(&dir).map_err(|e| StageError::input(e.to_string()))?;
            ingredients.push(Ingredient { dir, digest: m.digest(), checkpoint });
        }
        let cks: Vec<&Checkpoint> = ingredients.iter().map(|i| &i.checkpoint).collect();
        check_compatible(&cks).map_err(|e| StageError::input(e.to_string()))?;
        if let Method::Weighted(w) = &self.method
            && w.len() != ingredients.len()
        {
            return Err(StageError::input(format!(
                "`weights` has {} numbers for {} models: give one per model",
                w.len(),
                ingredients.len()
            )));
        }
        if let Method::Maximum(top) = self.method
            && top > ingredients.len()
        {
            return Err(StageError::input(format!("top = {top}, but there are only {} models", ingredients.len())));
        }

        let mut log = String::new();
        let mut trace = Vec::new();
        let mut scores: Vec<Option<f64>> = vec![None; ingredients.len()];
        let (weights, best) = match &self.method {
            Method::Uniform => (vec![1.0; ingredients.len()], 0),
            Method::Weighted(w) => (w.clone(), 0),
            Method::Maximum(_) | Method::Greedy { .. } => {
                let metric = self.metric(ctx, inputs, &ingredients[0].dir)?;
                // Lower is better for every comparison below; a higher-is-better metric is negated.
                let loss = |s: f64| if metric.higher_is_better() { -s } else { s };
                let mut evaluated = 0;
                let mut score = |members: &[(usize, f64)]| -> Result<f64, StageError> {
                    metric.score(ctx, &ingredients, members, &mut evaluated)
                };
                for (i, s) in scores.iter_mut().enumerate() {
                    *s = Some(score(&[(i, 1.0)])?);
                }
                let mut order: Vec<usize> = (0..ingredients.len()).collect();
                // Best first; ties keep the order of `models`.
                order.sort_by(|&a, &b| loss(scores[a].unwrap()).total_cmp(&loss(scores[b].unwrap())).then(a.cmp(&b)));
                let mut weights = vec![0.0; ingredients.len()];
                match self.method {
                    Method::Maximum(top) => {
                        for &i in &order[..top] {
                            weights[i] = 1.0;
                        }
                    }
                    Method::Greedy { strict } => {
                        let mut pool = vec![order[0]];
                        let mut pool_score = scores[order[0]].unwrap();
                        trace.push(Try { ingredient: order[0], score: pool_score, kept: true });
                        for &next in &order[1..] {
                            let members: Vec<(usize, f64)> = pool.iter().chain([&next]).map(|&i| (i, 1.0)).collect();
                            let s = score(&members)?;
                            let kept = if strict { loss(s) < loss(pool_score) } else { loss(s) <= loss(pool_score) };
                            trace.push(Try { ingredient: next, score: s, kept });
                            if kept {
                                pool.push(next);
                                pool_score = s;
                            }
                        }
                        for &i in &pool {
                            weights[i] = 1.0;
                        }
                    }
                    _ => unreachable!(),
                }
                let candidates = ingredients.len() + trace.len().saturating_sub(1);
                ctx.report_work("candidate score(s)", candidates as u64, evaluated as u64);
                log.push_str(&format!(
                    "metric: {}; {evaluated} evaluated, {} from the cache\n",
                    metric.describe(),
                    candidates - evaluated
                ));
                (weights, order[0])
            }
        };
        for (i, ing) in ingredients.iter().enumerate() {
            let s = scores[i].map(|s| format!(", metric {s:.6}")).unwrap_or_default();
            log.push_str(&format!("ingredient {i}: {} (weight {}{s})\n", ing.digest.short(), weights[i]));
        }
        for t in &trace {
            log.push_str(&format!(
                "greedy: try ingredient {}: {:.6} {}\n",
                t.ingredient,
                t.score,
                if t.kept { "kept" } else { "not kept" }
            ));
        }

        // Write the soup: weights streamed, the best ingredient's other files copied.
        let out = ctx.temp_path("soup");
        std::fs::create_dir_all(&out)
            .map_err(|e| StageError::environment(format!("cannot create {}: {e}", out.display())))?;
        let members: Vec<(&Checkpoint, f64)> =
            ingredients.iter().zip(&weights).filter(|(_, w)| **w > 0.0).map(|(i, w)| (&i.checkpoint, *w)).collect();
        let (cks, ws): (Vec<&Checkpoint>, Vec<f64>) = members.into_iter().unzip();
        let method = match &self.method {
            Method::Uniform => "uniform",
            Method::Weighted(_) => "weighted",
            Method::Maximum(_) => "maximum",
            Method::Greedy { .. } => "greedy",
        };
        let metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("ladle_soup_method".to_string(), method.to_string()),
            (
                "ladle_soup_ingredients".to_string(),
                ingredients
                    .iter()
                    .zip(&weights)
                    .filter(|(_, w)| **w > 0.0)
                    .map(|(i, w)| format!("{}:{w}", i.digest.to_hex()))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]);
        average::write_soup(&cks, &ws, &out, self.max_shard_bytes, &metadata)
            .map_err(|e| StageError::input(e.to_string()))?;
        copy_other_files(&ingredients[best].dir, &out)?;
        let summary = json!({
            "method": method,
            "ingredients": ingredients.iter().enumerate().map(|(i, ing)| json!({
                "position": i, "digest": ing.digest.to_hex(), "weight": weights[i], "metric": scores[i],
            })).collect::<Vec<_>>(),
            "greedy_trace": trace,
        });
        std::fs::write(out.join("soup.json"), serde_json::to_vec_pretty(&summary).expect("json"))
            .map_err(|e| StageError::environment(format!("cannot write soup.json: {e}")))?;
        ctx.save_log(log.as_bytes())?;
        let files = ctx.ingest_folder(&out, "the soup left")?;
        let _ = std::fs::remove_dir_all(&out);
        Ok(Artifact::Folder { model: true, external: None, files, metrics: None })
    }
}

/// Copies every file of `from` but its weights into `to` (config, tokenizer, generation config).
fn copy_other_files(from: &Path, to: &Path) -> Result<(), StageError> {
    let io = |e: std::io::Error| StageError::environment(format!("cannot copy {}'s files: {e}", from.display()));
    for entry in std::fs::read_dir(from).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().to_string();
        let weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json" || name == "soup.json";
        if entry.file_type().map_err(io)?.is_file() && !weights && !name.starts_with('.') {
            std::fs::copy(entry.path(), to.join(&name)).map_err(io)?;
        }
    }
    Ok(())
}

/// A metric ready to score candidates.
enum Metric {
    /// Image-conditioned: every eval record with its decoded image, scored by the candidate VLM.
    ImagePerplexity {
        records: Vec<(image::RgbImage, String, String)>,
        dir: PathBuf,
        device: candle_core::Device,
        dtype: candle_core::DType,
        batch_tokens: usize,
    },
    Perplexity {
        sequences: Vec<Sequence>,
        config: LlmConfig,
        tokenizer_dir: PathBuf,
        device: candle_core::Device,
        dtype: candle_core::DType,
        batch_tokens: usize,
    },
    Command {
        command: Vec<String>,
        higher_is_better: bool,
        timeout: Option<std::time::Duration>,
        cwd: PathBuf,
    },
}

/// A metric and what identifies it in score-cache keys (its definition, the eval data, the
/// digests of the files it reads).
struct ScoredBy {
    metric: Metric,
    identity: Digest,
}

impl Soup {
    /// A built-in metric's identity with the dtype it scores in, when not f32 (f32 scores are
    /// those cached before `dtype` existed).
    fn with_dtype(&self, mut identity: serde_json::Value) -> serde_json::Value {
        if self.placement.dtype != candle_core::DType::F32 {
            identity["dtype"] = ladle_models::device::dtype_name(self.placement.dtype).into();
        }
        identity
    }

    fn metric(&self, ctx: &StageContext<'_>, inputs: &Inputs, first: &Path) -> Result<ScoredBy, StageError> {
        let mut deps = Vec::new();
        for d in &self.metric_deps {
            deps.push((d.display().to_string(), ctx.store.file_digest(d)?.to_hex()));
        }
        match self.metric.as_ref().ok_or_else(|| StageError::input("this method needs a metric"))? {
            MetricSpec::Command { command, higher_is_better, timeout } => {
                let identity = json!({ "metric": "command v1", "command": command, "higher_is_better": higher_is_better, "deps": deps });
                Ok(ScoredBy {
                    metric: Metric::Command {
                        command: command.clone(),
                        higher_is_better: *higher_is_better,
                        timeout: *timeout,
                        cwd: ctx.pipeline_dir.to_path_buf(),
                    },
                    identity: Digest::of(&serde_json::to_vec(&identity).expect("json")),
                })
            }
            MetricSpec::Perplexity { text, prompt, image: Some(field) } => {
                let eval = inputs.one("eval")?;
                let Artifact::Dataset { shards, .. } = eval else {
                    return Err(StageError::input(format!(
                        "`eval` must be a dataset, but it is a {}",
                        eval.kind_name()
                    )));
                };
                let root = inputs.dataset_root("eval");
                let mut records = Vec::new();
                let mut n = 0u64;
                for s in shards {
                    let bytes = ctx.read_shard(s)?;
                    for line in lines(&bytes) {
                        let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(n))?;
                        let at = |e: String| StageError::input(format!("eval record {n}: {e}"));
                        let rendered = text.render(&record).map_err(at)?;
                        let prompt = match prompt {
                            Some(p) => p.render(&record).map_err(at)?,
                            None => String::new(),
                        };
                        let rgb = field
                            .locate(&record, root.as_deref())
                            .map_err(at)?
                            .load()
                            .map_err(|e| at(e.to_string()))?;
                        records.push((rgb, prompt, rendered));
                        n += 1;
                    }
                }
                if records.is_empty() {
                    return Err(StageError::input("the eval dataset has no records to score"));
                }
                // The images' contents: their bytes decoded, hashed in order.
                let mut h = Vec::new();
                for (rgb, prompt, text) in &records {
                    h.extend(Digest::of(rgb.as_raw()).0);
                    h.extend(Digest::of(prompt.as_bytes()).0);
                    h.extend(Digest::of(text.as_bytes()).0);
                }
                let identity = self.with_dtype(
                    json!({ "metric": "image-conditioned corpus perplexity v1", "records": Digest::of(&h).to_hex() }),
                );
                Ok(ScoredBy {
                    metric: Metric::ImagePerplexity {
                        records,
                        dir: first.to_path_buf(),
                        device: self.placement.device().map_err(model_error)?,
                        dtype: self.placement.dtype,
                        batch_tokens: self.placement.default_batch_tokens(),
                    },
                    identity: Digest::of(&serde_json::to_vec(&identity).expect("json")),
                })
            }
            MetricSpec::Perplexity { text, prompt, image: None } => {
                let eval = inputs.one("eval")?;
                let Artifact::Dataset { shards, .. } = eval else {
                    return Err(StageError::input(format!(
                        "`eval` must be a dataset, but it is a {}",
                        eval.kind_name()
                    )));
                };
                let model = LanguageModel::load(first).map_err(model_error)?;
                let tok = &model.tokenizer;
                let mut sequences = Vec::new();
                let mut n = 0u64;
                for s in shards {
                    let bytes = ctx.read_shard(s)?;
                    for line in lines(&bytes) {
                        let record = parse_record(line).map_err(|e| StageError::internal(e).at_record(n))?;
                        let rendered =
                            text.render(&record).map_err(|e| StageError::input(format!("eval record {n}: {e}")))?;
                        let prompt = match prompt {
                            Some(p) => Some(
                                p.render(&record).map_err(|e| StageError::input(format!("eval record {n}: {e}")))?,
                            ),
                            None => None,
                        };
                        let seq = tok.scored_sequence(prompt.as_deref(), &rendered).map_err(model_error)?;
                        if seq.ids.len() > seq.score_from.max(1) {
                            sequences.push(seq);
                        }
                        n += 1;
                    }
                }
                if sequences.is_empty() {
                    return Err(StageError::input(
                        "the eval dataset has nothing to score (no records, or only one-token texts)",
                    ));
                }
                let identity = self.with_dtype(json!({
                    "metric": "corpus perplexity v1",
                    "eval": eval.digest().to_hex(),
                    "sequences": sequences.iter().map(|s| (&s.ids, s.score_from)).collect::<Vec<_>>(),
                }));
                Ok(ScoredBy {
                    metric: Metric::Perplexity {
                        sequences,
                        config: model.config.clone(),
                        tokenizer_dir: first.to_path_buf(),
                        device: self.placement.device().map_err(model_error)?,
                        dtype: self.placement.dtype,
                        batch_tokens: self.placement.default_batch_tokens(),
                    },
                    identity: Digest::of(&serde_json::to_vec(&identity).expect("json")),
                })
            }
        }
    }
}

impl ScoredBy {
    fn higher_is_better(&self) -> bool {
        matches!(self.metric, Metric::Command { higher_is_better: true, .. })
    }

    fn describe(&self) -> String {
        match &self.metric {
            Metric::Perplexity { .. } => "corpus perplexity of the eval set (lower is better)".into(),
            Metric::ImagePerplexity { .. } => {
                "image-conditioned corpus perplexity of the eval set (lower is better)".into()
            }
            Metric::Command { command, higher_is_better, .. } => {
                format!("`{}` ({} is better)", command.join(" "), if *higher_is_better { "higher" } else { "lower" })
            }
        }
    }

    /// The metric of the soup of `members` (ingredient, weight), from the store's cache when
    /// this very candidate was scored before.
    fn score(
        &self,
        ctx: &StageContext<'_>,
        ingredients: &[Ingredient],
        members: &[(usize, f64)],
        evaluated: &mut usize,
    ) -> Result<f64, StageError> {
        let mut ids: Vec<(String, f64)> = members.iter().map(|&(i, w)| (ingredients[i].digest.to_hex(), w)).collect();
        ids.sort_by(|a, b| a.0.cmp(&b.0));
        let key_bytes =
            serde_json::to_vec(&json!({ "candidate": ids, "metric": self.identity.to_hex() })).expect("json");
        let key = StageKey(Digest::of(&key_bytes).0);
        if let Some((_, Artifact::Metrics { value })) = ctx.store.get_action(&key)?
            && let Some(s) = value["score"].as_f64()
        {
            return Ok(s);
        }
        let cks: Vec<&Checkpoint> = members.iter().map(|&(i, _)| &ingredients[i].checkpoint).collect();
        let ws: Vec<f64> = members.iter().map(|&(_, w)| w).collect();
        let score = match &self.metric {
            Metric::ImagePerplexity { records, dir, device, dtype, batch_tokens } => {
                let tensors = average::soup_tensors(&cks, &ws, device).map_err(|e| StageError::input(e.to_string()))?;
                let vb = candle_nn::VarBuilder::from_tensors(tensors, *dtype, device);
                let vlm = ladle_models::vision::llava::Llava::from_weights(dir, vb).map_err(model_error)?;
                // Batched as the perplexity stage batches them.
                let prepared = records
                    .iter()
                    .map(|(rgb, prompt, text)| vlm.prepare(rgb, prompt, text, usize::MAX))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(model_error)?;
                Score::total(&vlm.score_all(&prepared.iter().collect::<Vec<_>>(), *batch_tokens).map_err(model_error)?)
                    .perplexity()
            }
            Metric::Perplexity { sequences, config, tokenizer_dir, device, dtype, batch_tokens } => {
                let tensors = average::soup_tensors(&cks, &ws, device).map_err(|e| StageError::input(e.to_string()))?;
                let vb = candle_nn::VarBuilder::from_tensors(tensors, *dtype, device);
                let model =
                    LanguageModel::from_parts(tokenizer_dir, config.clone(), &vb, "model").map_err(model_error)?;
                let scorer = Scorer { decoder: &model.decoder, pad: 0 };
                Score::total(&scorer.score_all(sequences, *batch_tokens).map_err(model_error)?).perplexity()
            }
            Metric::Command { command, timeout, cwd, .. } => {
                // The candidate as a model folder, for the command to load.
                let dir = ctx.temp_path("candidate");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| StageError::environment(format!("cannot create {}: {e}", dir.display())))?;
                let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
                average::write_soup(&cks, &ws, &dir, u64::MAX, &meta).map_err(|e| StageError::input(e.to_string()))?;
                copy_other_files(&ingredients[members[0].0].dir, &dir)?;
                let args: Vec<String> =
                    command.iter().map(|a| a.replace("{model}", &dir.display().to_string())).collect();
                let result = crate::exec::run_command(&args, cwd, &BTreeMap::new(), None, *timeout);
                let _ = std::fs::remove_dir_all(&dir);
                let (status, stdout, stderr) = result?;
                if !status.success() {
                    return Err(StageError::input(format!(
                        "the metric command `{}` failed ({status}); its last lines:\n{}",
                        args.join(" "),
                        crate::exec::tail(&[stdout, stderr].concat(), 20)
                    )));
                }
                let text = String::from_utf8_lossy(&stdout);
                let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                match last.parse::<f64>() {
                    Ok(v) if v.is_finite() => v,
                    _ => {
                        return Err(StageError::input(format!(
                            "the metric command `{}` printed `{last}` last; it must print one number as its last line",
                            args.join(" ")
                        )));
                    }
                }
            }
        };
        *evaluated += 1;
        let artifact = Artifact::Metrics { value: json!({ "score": score, "candidate": ids }) };
        let digest = ctx.store.put_artifact(&artifact)?;
        ctx.store.put_action(&key, &digest)?;
        Ok(score)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("1.5 MB"), Some(1_500_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("5 parsecs"), None);
        assert_eq!(parse_size("0GB"), None);
    }
}
