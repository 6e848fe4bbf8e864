//! `choose`: keep the candidates a metric says are worth keeping.
//!
//! POINTS' "individual select" fine-tunes the base model once per candidate instruction dataset
//! (the baseline mixture plus that dataset), evaluates each, and keeps the datasets whose
//! fine-tune beats the baseline's. `choose` is that decision, and the general "pick by metric":
//!
//! ```toml
//! [stages.pick]
//! kind = "choose"
//! candidates = "ft"          # what is chosen among (a matrix's expansions, in order)
//! better_than = "ft_base"    # keep those whose metric beats this one's by more than `margin`
//! metric = "accuracy"        # the key in each candidate's metrics (`a.b` for nested objects)
//! higher_is_better = true    # the default
//! margin = 0.0
//! ```
//!
//! The metric of a candidate comes from the candidate itself (an `exec` stage's
//! `metrics = "metrics.json"`, or a metrics artifact) or, with `scores = [...]`, from the artifact
//! at the same position there (choose datasets by the evaluations of what was trained on them).
//! Instead of `better_than`: `top = N` keeps the N best (ties go to the earlier candidate); and
//! `method = "forward"` is greedy forward selection: start from the baseline (`better_than`'s
//! metric, or the empty set evaluated), add the candidate whose addition scores best, re-evaluate
//! with it included, stop when no addition improves by more than `margin`. Each evaluation of a
//! set runs `command` (`{set}` as a whole argument becomes one path per member, `{out}` a folder
//! where it writes `metrics.json`) and is cached in the store under (command, `deps`' contents,
//! the members' digests): adding a candidate evaluates only the sets that are new.
//!
//! The output is the chosen set, in the candidates' order ([`Artifact::Chosen`]): a port fed by
//! it receives the chosen artifacts, so a soup, a concat or a trainer takes them as if each were
//! named. Its digest is the chosen artifacts', so a rerun that chooses the same leaves what
//! follows cached. The trace (every candidate's metric, each forward step) is the stage's log,
//! which `ladle show` prints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ladle_engine::error::{PipelineError, StageError};
use ladle_engine::pipeline::params::Params;
use ladle_engine::stage::{Accepts, Arity, Execution, Inputs, PortSpec, Produces, Stage, StageKind, WholeStage};
use ladle_engine::{Artifact, Digest, StageContext, StageKey};
use serde_json::json;

use crate::exec::{command_timeout, read_metrics, run_command, tail};

pub struct ChooseKind;

const PORTS: &[PortSpec] = &[
    PortSpec { name: "candidates", arity: Arity::Many, required: true, accepts: Accepts::Any },
    PortSpec { name: "scores", arity: Arity::Many, required: false, accepts: Accepts::Any },
    PortSpec { name: "better_than", arity: Arity::One, required: false, accepts: Accepts::Any },
];

enum Method {
    /// Those better than the `better_than` artifact's metric.
    BetterThan,
    Top(usize),
    Forward {
        command: Vec<String>,
        metrics_file: String,
        deps: Vec<PathBuf>,
        timeout: Option<Duration>,
    },
}

struct Choose {
    method: Method,
    metric: String,
    higher_is_better: bool,
    margin: f64,
    dir: PathBuf,
}

impl StageKind for ChooseKind {
    fn name(&self) -> &'static str {
        "choose"
    }
    fn about(&self) -> &'static str {
        "keep candidates by a metric: better than a baseline, the top N, or greedy forward selection"
    }
    fn ports(&self) -> &'static [PortSpec] {
        PORTS
    }
    fn configure(&self, params: &mut Params<'_>) -> Result<Arc<dyn Stage>, PipelineError> {
        let metric = params.required_string("metric")?;
        if metric.is_empty() || metric.split('.').any(str::is_empty) {
            return Err(params.error(
                "metric",
                format!("`metric` is \"{metric}\": name a key of the metrics, e.g. \"accuracy\" or \"eval.accuracy\""),
            ));
        }
        let higher_is_better = params.bool("higher_is_better")?.unwrap_or(true);
        let margin = params.float("margin")?.unwrap_or(0.0);
        if margin < 0.0 {
            return Err(params.error("margin", format!("`margin` is {margin}; it must be 0 or more")));
        }
        let has = |port: &str| params.ports().iter().any(|p| p == port);
        let (baseline, scores) = (has("better_than"), has("scores"));
        let top = params.integer("top")?;
        let method = params.choice("method", &["better_than", "top", "forward"])?;
        let method = match (method.as_deref(), top) {
            (Some("forward"), None) => {
                if scores {
                    return Err(params.error(
                        "scores",
                        "method = \"forward\" evaluates sets with `command`; `scores` is for `better_than` and `top`",
                    ));
                }
                let command = params.string_list("command")?.ok_or_else(|| {
                    params.missing(
                        "command",
                        "the evaluation of a set, e.g. [\"python3\", \"eval.py\", \"{set}\", \"{out}\"]",
                    )
                })?;
                if command.is_empty() || command[0].is_empty() {
                    return Err(params.error("command", "`command` is empty: give the program and its arguments"));
                }
                if !command.iter().any(|a| a.contains("{out}")) {
                    return Err(params.error(
                        "command",
                        "`command` never mentions {out}, the folder where it must write its metrics",
                    ));
                }
                if let Some(a) = command.iter().find(|a| a.contains("{set}") && *a != "{set}") {
                    return Err(params.error(
                        "command",
                        format!("`{a}`: {{set}} must be a whole argument (it becomes one argument per member)"),
                    ));
                }
                let metrics_file = params.string("metrics")?.unwrap_or_else(|| "metrics.json".into());
                let deps = params.path_deps("deps")?;
                let timeout = command_timeout(params)?;
                Method::Forward { command, metrics_file, deps, timeout }
            }
            (Some("forward"), Some(_)) => {
                return Err(params.error("top", "`top` and method = \"forward\" are two rules: keep one"));
            }
            (None | Some("top"), Some(n)) => {
                if n < 1 {
                    return Err(params.error("top", format!("`top` is {n}; it must be 1 or more")));
                }
                if baseline {
                    return Err(params.stage_error("`top` and `better_than` are two rules: keep one (or set method = \"forward\", which starts from `better_than`)"));
                }
                Method::Top(n as usize)
            }
            (Some("top"), None) => return Err(params.missing("top", "how many to keep, e.g. top = 3")),
            (None | Some("better_than"), None) if baseline => Method::BetterThan,
            (Some("better_than"), Some(_)) => {
                return Err(params.error("top", "`top` and method = \"better_than\" are two rules: keep one"));
            }
            _ => {
                let mut e = params.stage_error("`choose` needs a rule: `better_than = \"STAGE\"`, `top = N`, or method = \"forward\" with a `command`");
                e.hint = Some("POINTS' individual select is better_than = \"the baseline's stage\"".into());
                return Err(e);
            }
        };
        Ok(Arc::new(Choose { method, metric, higher_is_better, margin, dir: params.base_dir().to_path_buf() }))
    }
}

impl Stage for Choose {
    fn produces(&self) -> Produces {
        Produces::Chosen
    }
    fn execution(&self) -> Execution<'_> {
        Execution::Whole(self)
    }
}

impl Choose {
    /// The metric in `metrics` (a dotted path into nested objects).
    fn metric_of(&self, metrics: &serde_json::Value, what: &str) -> Result<f64, StageError> {
        let mut v = metrics;
        for part in self.metric.split('.') {
            v = v.get(part).ok_or_else(|| {
                let keys: Vec<&str> =
                    metrics.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
                StageError::input(format!("{what} has no metric `{}`; its metrics: {}", self.metric, keys.join(", ")))
                    .with_hint("set `metric` to one of them")
            })?;
        }
        v.as_f64().ok_or_else(|| StageError::input(format!("{what}: metric `{}` is {v}, not a number", self.metric)))
    }

    /// The metric an artifact carries.
    fn carried(&self, artifact: &Artifact, what: &str) -> Result<f64, StageError> {
        let metrics = artifact.metrics().ok_or_else(|| {
            StageError::input(format!("{what} is a {} that carries no metrics", artifact.kind_name())).with_hint(
                "give the exec stage that makes it `metrics = \"metrics.json\"`, or connect `scores` to the evaluations, one per candidate",
            )
        })?;
        self.metric_of(metrics, what)
    }

    /// How much better `a` is than `b` (positive: better).
    fn gain(&self, a: f64, b: f64) -> f64 {
        if self.higher_is_better { a - b } else { b - a }
    }

    /// The metric of the set `members` (candidate positions, ascending), from the store's cache
    /// when this very set was evaluated before.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &self,
        ctx: &StageContext<'_>,
        candidates: &[Artifact],
        members: &[usize],
        command: &[String],
        metrics_file: &str,
        identity: &Digest,
        timeout: Option<Duration>,
        evaluated: &mut u64,
    ) -> Result<f64, StageError> {
        let mut set: Vec<String> = members.iter().map(|&i| candidates[i].digest().to_hex()).collect();
        set.sort();
        let key = StageKey(
            Digest::of(&serde_json::to_vec(&json!({ "set": set, "evaluation": identity.to_hex() })).expect("json")).0,
        );
        let what =
            format!("the evaluation of {{{}}}", members.iter().map(usize::to_string).collect::<Vec<_>>().join(", "));
        if let Some((_, Artifact::Metrics { value })) = ctx.store.get_action(&key)? {
            return self.metric_of(&value, &what);
        }
        let work = ctx.temp_path("choose");
        let io = |e: std::io::Error| StageError::environment(format!("cannot prepare {}: {e}", work.display()));
        let out = work.join("out");
        std::fs::create_dir_all(&out).map_err(io)?;
        let mut paths = Vec::new();
        for &i in members {
            paths.push(ctx.materialize(&candidates[i], &work.join(format!("candidate-{i}")))?.display().to_string());
        }
        let mut args = Vec::new();
        for a in command {
            if a == "{set}" {
                args.extend(paths.iter().cloned());
            } else {
                args.push(a.replace("{out}", &out.display().to_string()));
            }
        }
        let env = BTreeMap::from([("LADLE_OUT".to_string(), out.display().to_string())]);
        let result = run_command(&args, &self.dir, &env, None, timeout);
        let metrics = result.and_then(|(status, stdout, stderr)| {
            if !status.success() {
                return Err(StageError::input(format!(
                    "{what} failed: `{}` ({status}); its last lines:\n{}",
                    args.join(" "),
                    tail(&[stdout, stderr].concat(), 20)
                )));
            }
            read_metrics(&out.join(metrics_file), metrics_file, &args)
        });
        let _ = std::fs::remove_dir_all(&work);
        let metrics = metrics?;
        let score = self.metric_of(&metrics, &what)?;
        *evaluated += 1;
        let digest = ctx.store.put_artifact(&Artifact::Metrics { value: metrics })?;
        ctx.store.put_action(&key, &digest)?;
        Ok(score)
    }
}

impl WholeStage for Choose {
    fn run(&self, ctx: &StageContext<'_>, inputs: &Inputs) -> Result<Artifact, StageError> {
        let candidates = inputs.all("candidates");
        if candidates.is_empty() {
            return Err(StageError::input(
                "there are no candidates to choose from (an empty chosen set feeds `candidates`)",
            ));
        }
        let name = |i: usize| format!("candidate {i} ({})", inputs.name("candidates", i));
        let baseline = match inputs.all("better_than").first() {
            Some(b) => Some(self.carried(b, &format!("`better_than` ({})", inputs.name("better_than", 0)))?),
            None => None,
        };
        let direction = if self.higher_is_better { "higher" } else { "lower" };
        let mut log = format!("metric: `{}` ({direction} is better), margin {}\n", self.metric, self.margin);
        let mut keep = vec![false; candidates.len()];
        match &self.method {
            Method::BetterThan | Method::Top(_) => {
                let scores = inputs.all("scores");
                if inputs.ports.contains_key("scores") && scores.len() != candidates.len() {
                    return Err(StageError::input(format!(
                        "`scores` has {} artifact(s) for {} candidate(s): connect one evaluation per candidate, in the same order",
                        scores.len(),
                        candidates.len()
                    )));
                }
                let metrics: Vec<f64> = (0..candidates.len())
                    .map(|i| match scores.get(i) {
                        Some(s) => self.carried(s, &format!("{} (the score of {})", inputs.name("scores", i), name(i))),
                        None => self.carried(&candidates[i], &name(i)),
                    })
                    .collect::<Result<_, _>>()?;
                match self.method {
                    Method::Top(n) => {
                        if n > candidates.len() {
                            return Err(StageError::input(format!(
                                "top = {n}, but there are only {} candidates",
                                candidates.len()
                            )));
                        }
                        let mut order: Vec<usize> = (0..candidates.len()).collect();
                        order.sort_by(|&a, &b| self.gain(metrics[b], metrics[a]).total_cmp(&0.0).then(a.cmp(&b)));
                        for (rank, &i) in order.iter().enumerate() {
                            keep[i] = rank < n;
                            log.push_str(&format!(
                                "rank {}: {}: {} {}\n",
                                rank + 1,
                                name(i),
                                metrics[i],
                                if keep[i] { "kept" } else { "not kept" }
                            ));
                        }
                    }
                    _ => {
                        let base = baseline.expect("better_than is connected");
                        log.push_str(&format!("baseline: {base}\n"));
                        for i in 0..candidates.len() {
                            let gain = self.gain(metrics[i], base);
                            keep[i] = gain > self.margin;
                            log.push_str(&format!(
                                "{}: {} ({gain:+.6}) {}\n",
                                name(i),
                                metrics[i],
                                if keep[i] { "kept" } else { "not kept" }
                            ));
                        }
                    }
                }
            }
            Method::Forward { command, metrics_file, deps, timeout } => {
                let mut dep_digests = Vec::new();
                for d in deps {
                    let shown = d.strip_prefix(&self.dir).unwrap_or(d).display().to_string();
                    dep_digests.push((shown, ctx.store.file_digest(d)?.to_hex()));
                }
                let identity = Digest::of(
                    &serde_json::to_vec(&json!({
                        "evaluation": "choose forward v1", "command": command, "metrics": metrics_file, "deps": dep_digests,
                    }))
                    .expect("json"),
                );
                let mut evaluated = 0;
                let mut tried = 0;
                let mut eval = |members: &[usize], evaluated: &mut u64| {
                    tried += 1;
                    self.evaluate(ctx, candidates, members, command, metrics_file, &identity, *timeout, evaluated)
                };
                let mut chosen: Vec<usize> = Vec::new();
                let mut current = match baseline {
                    Some(b) => {
                        log.push_str(&format!("start: `better_than`: {b}\n"));
                        b
                    }
                    None => {
                        let s = eval(&[], &mut evaluated)?;
                        log.push_str(&format!("start: the empty set: {s}\n"));
                        s
                    }
                };
                loop {
                    let mut best: Option<(usize, f64)> = None;
                    for i in (0..candidates.len()).filter(|i| !chosen.contains(i)) {
                        let mut members = chosen.clone();
                        members.push(i);
                        members.sort_unstable();
                        let s = eval(&members, &mut evaluated)?;
                        log.push_str(&format!("step {}: with {}: {s}\n", chosen.len() + 1, name(i)));
                        // Ties go to the earlier candidate.
                        if best.is_none_or(|(_, b)| self.gain(s, b) > 0.0) {
                            best = Some((i, s));
                        }
                    }
                    match best {
                        Some((i, s)) if self.gain(s, current) > self.margin => {
                            log.push_str(&format!(
                                "step {}: added {} ({:+.6})\n",
                                chosen.len() + 1,
                                name(i),
                                self.gain(s, current)
                            ));
                            chosen.push(i);
                            current = s;
                        }
                        Some((_, s)) => {
                            log.push_str(&format!(
                                "step {}: stop: the best addition changes {current} by {:+.6}, not more than the margin\n",
                                chosen.len() + 1,
                                self.gain(s, current)
                            ));
                            break;
                        }
                        None => {
                            log.push_str("stop: every candidate is chosen\n");
                            break;
                        }
                    }
                }
                for &i in &chosen {
                    keep[i] = true;
                }
                ctx.report_work("evaluation(s)", tried, evaluated);
                log.push_str(&format!(
                    "{tried} set(s) evaluated: {evaluated} computed, {} from the cache\n",
                    tried - evaluated
                ));
            }
        }
        let items: Vec<Artifact> = candidates.iter().zip(&keep).filter(|(_, k)| **k).map(|(a, _)| a.clone()).collect();
        log.push_str(&format!(
            "chosen: {} of {}: {}\n",
            items.len(),
            candidates.len(),
            (0..candidates.len()).filter(|&i| keep[i]).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        ));
        ctx.save_log(log.as_bytes())?;
        Ok(Artifact::Chosen { items })
    }
}
