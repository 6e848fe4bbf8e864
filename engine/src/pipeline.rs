//! Pipeline files: parsing, validation and the stage graph.
//!
//! Everything that can be wrong with a pipeline file is found here, before anything runs, and
//! reported once with `file:line:column` and the stage: syntax, types, unknown kinds and
//! parameters, dangling or missing ports, ports fed the wrong kind of artifact, cycles.
//! The graph is a petgraph `DiGraph`; its order is deterministic (Kahn's algorithm, ties broken by
//! the order stages are written in the file), so plans, graphs and runs print the same each time.

pub mod interpolate;
pub mod matrix;
pub mod params;
pub mod value;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::{Error, Location, PipelineError};
use crate::registry::Registry;
use crate::resources::Resources;
use crate::stage::{Accepts, Arity, Produces, Stage, StageKind};
use interpolate::{Scope, interpolate};
use matrix::{MatrixOrigin, glob_match};
use params::{FileDep, Params, closest};
use value::{LineIndex, Param, Value, convert_table};

/// A stage as declared and configured.
pub struct StageDecl {
    pub name: String,
    pub kind: Arc<dyn StageKind>,
    pub at: Location,
    /// Port → indices (into `Pipeline::stages`) of the stages feeding it, in written order.
    pub inputs: BTreeMap<String, Vec<usize>>,
    pub stage: Arc<dyn Stage>,
    pub key_params: serde_json::Value,
    pub files: Vec<FileDep>,
    /// What a task of the stage needs on a cluster (never part of a key).
    pub resources: Resources,
    /// The matrix declaration this stage is one combination of, if any.
    pub matrix: Option<MatrixOrigin>,
}

pub struct Pipeline {
    pub name: String,
    /// The pipeline file, absolute.
    pub path: PathBuf,
    /// The digest of the file's bytes as parsed (a cluster worker checks that it reads the same).
    pub source_digest: crate::digest::Digest,
    /// The folder relative paths resolve against.
    pub dir: PathBuf,
    pub stages: Vec<StageDecl>,
    pub graph: DiGraph<usize, String>,
    /// Stage indices in a deterministic topological order.
    pub order: Vec<usize>,
    /// `[vars]` as used, after `--set`.
    pub vars: BTreeMap<String, serde_json::Value>,
    /// The `--set NAME=VALUE` overrides the file was loaded with (a cluster worker loads it the
    /// same way).
    pub overrides: Vec<(String, String)>,
}

impl Pipeline {
    pub fn load(path: &Path, registry: &Registry) -> Result<Pipeline, Error> {
        Self::load_with(path, registry, &[])
    }

    /// Loads a pipeline file with `--set NAME=VALUE` overrides of its `[vars]`.
    pub fn load_with(path: &Path, registry: &Registry, overrides: &[(String, String)]) -> Result<Pipeline, Error> {
        let bytes = std::fs::read(path).map_err(|e| Error::PipelineFile {
            path: path.to_path_buf(),
            message: format!("cannot read the pipeline file: {e}"),
        })?;
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Self::parse_with(&abs, &bytes, registry, overrides)
    }

    pub fn parse(path: &Path, bytes: &[u8], registry: &Registry) -> Result<Pipeline, Error> {
        Self::parse_with(path, bytes, registry, &[])
    }

    pub fn parse_with(
        path: &Path,
        bytes: &[u8],
        registry: &Registry,
        overrides: &[(String, String)],
    ) -> Result<Pipeline, Error> {
        let file_error = |message: String| Error::PipelineFile { path: path.to_path_buf(), message };
        let source = std::str::from_utf8(bytes).map_err(|e| {
            file_error(format!(
                "not a text file: invalid UTF-8 at byte {}\n  hint: a pipeline file is TOML text; did you pass a data or binary file?",
                e.valid_up_to()
            ))
        })?;
        if source.contains('\0') {
            return Err(file_error(
                "not a text file (it holds NUL bytes)\n  hint: a pipeline file is TOML text".into(),
            ));
        }
        if source.trim().is_empty() {
            return Err(file_error(
                "the pipeline file is empty\n  hint: it needs a [pipeline] table with a `name`, and [stages.NAME] tables".into(),
            ));
        }
        let lines = LineIndex::new(path, source);
        let err = |offset: usize, stage: Option<&str>, message: String, hint: Option<String>| -> Error {
            PipelineError { location: lines.locate(offset), stage: stage.map(str::to_string), message, hint }.into()
        };
        let doc = toml::de::DeTable::parse(source).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim();
            if message.starts_with("duplicate key") {
                let key = source.get(span.clone()).unwrap_or("").trim();
                return err(
                    span.start,
                    None,
                    format!("`{key}` is declared twice"),
                    Some("each key, and each [stages.NAME], may appear once; rename or merge the second".into()),
                );
            }
            err(span.start, None, format!("invalid TOML: {message}"), None)
        })?;
        let root = doc.get_ref();

        let mut name = None;
        let mut stage_tables = None;
        let mut vars = BTreeMap::new();
        for (key, value) in root.iter() {
            match key.get_ref().as_ref() {
                "pipeline" => {
                    let Some(table) = value.get_ref().as_table() else {
                        return Err(err(key.span().start, None, "`pipeline` must be a table: [pipeline]".into(), None));
                    };
                    for (k, v) in table.iter() {
                        match k.get_ref().as_ref() {
                            "name" => match v.get_ref().as_str() {
                                Some(s) if !s.trim().is_empty() => name = Some(s.to_string()),
                                _ => {
                                    return Err(err(
                                        v.span().start,
                                        None,
                                        "`pipeline.name` must be a non-empty string".into(),
                                        None,
                                    ));
                                }
                            },
                            "description" => {
                                if !v.get_ref().is_str() {
                                    return Err(err(
                                        v.span().start,
                                        None,
                                        "`pipeline.description` must be a string".into(),
                                        None,
                                    ));
                                }
                            }
                            other => {
                                return Err(err(
                                    k.span().start,
                                    None,
                                    format!("unknown key `{other}` in [pipeline]"),
                                    Some("[pipeline] takes `name` and `description`".into()),
                                ));
                            }
                        }
                    }
                }
                "stages" => {
                    let Some(table) = value.get_ref().as_table() else {
                        return Err(err(
                            key.span().start,
                            None,
                            "`stages` must hold tables: [stages.NAME]".into(),
                            None,
                        ));
                    };
                    stage_tables = Some(table);
                }
                "vars" => {
                    let Some(table) = value.get_ref().as_table() else {
                        return Err(err(
                            key.span().start,
                            None,
                            "`vars` must be a table: [vars] NAME = VALUE".into(),
                            None,
                        ));
                    };
                    vars = convert_table(table, &lines);
                    for (var, p) in &vars {
                        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                            let message =
                                format!("variable `{var}`: a name may hold only letters, digits, `_` and `-`");
                            return Err(
                                PipelineError { location: p.at.clone(), stage: None, message, hint: None }.into()
                            );
                        }
                        if let Some(text) = find_string(p, &|s| s.contains("${vars.") || s.contains("${matrix.")) {
                            let message = format!(
                                "variable `{var}` refers to another (`{text}`); [vars] values are written out in full"
                            );
                            return Err(
                                PipelineError { location: p.at.clone(), stage: None, message, hint: None }.into()
                            );
                        }
                    }
                }
                other => {
                    let hint = closest(other, ["pipeline", "stages", "vars"]).map(|c| format!("did you mean `{c}`?"));
                    return Err(err(
                        key.span().start,
                        None,
                        format!("unknown top-level key `{other}`"),
                        hint.or(Some(
                            "a pipeline file has a [pipeline] table, [stages.NAME] tables and an optional [vars] table"
                                .into(),
                        )),
                    ));
                }
            }
        }
        let name = name.ok_or_else(|| {
            err(
                0,
                None,
                "missing [pipeline] table with a `name`".into(),
                Some("start the file with:\n    [pipeline]\n    name = \"my-pipeline\"".into()),
            )
        })?;
        let stage_tables = match stage_tables {
            Some(t) if !t.is_empty() => t,
            _ => {
                return Err(err(
                    0,
                    None,
                    "the pipeline declares no stages".into(),
                    Some("add stages as [stages.NAME] tables with a `kind`".into()),
                ));
            }
        };

        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        apply_overrides(&mut vars, overrides, path)?;

        // Stages as declared, matrices expanded and `${...}` filled in.
        struct Declared {
            name: String,
            at: Location,
            offset: usize,
            entries: BTreeMap<String, Param>,
            matrix: Option<MatrixOrigin>,
        }
        let mut declared = Vec::new();
        for (key, value) in stage_tables.iter() {
            let stage = key.get_ref().to_string();
            let at = lines.locate(key.span().start);
            if stage.is_empty() || !stage.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(err(
                    key.span().start,
                    Some(&stage),
                    "a stage name may hold only letters, digits, `_` and `-`".into(),
                    None,
                ));
            }
            let Some(table) = value.get_ref().as_table() else {
                return Err(err(
                    key.span().start,
                    Some(&stage),
                    format!("a stage must be a table, found {}", value.get_ref().type_str()),
                    Some(format!("write it as [stages.{stage}] with a `kind`")),
                ));
            };
            let mut entries = convert_table(table, &lines);
            let plain = Scope { vars: &vars, matrix: None, stage: Some(&stage) };
            let Some(matrix) = entries.remove("matrix") else {
                let entries = entries.iter().map(|(k, p)| Ok((k.clone(), interpolate(p, &plain)?))).collect::<Result<
                    _,
                    PipelineError,
                >>(
                )?;
                declared.push(Declared { name: stage, at, offset: key.span().start, entries, matrix: None });
                continue;
            };
            let matrix = interpolate(&matrix, &plain)?;
            // The axes in the order written (the converted table is sorted by name).
            let written: Vec<String> = match table.get("matrix").map(|m| m.get_ref()) {
                Some(toml::de::DeValue::Table(m)) => m.iter().map(|(k, _)| k.get_ref().to_string()).collect(),
                _ => Vec::new(),
            };
            let Value::Table(axes) = &matrix.value else {
                let message = format!("`matrix` must be a table of axes, found {}", matrix.value.type_name());
                let hint = Some("matrix = { mix = [\"a\", \"b\"], lr = [1e-5, 2e-5] }".into());
                return Err(located(matrix.at.clone(), &stage, message, hint).into());
            };
            let axes: Vec<(String, Param)> =
                written.iter().filter_map(|a| Some((a.clone(), axes.get(a)?.clone()))).collect();
            for expansion in matrix::expand(&stage, &matrix, &axes)? {
                let scope = Scope { vars: &vars, matrix: Some(&expansion.values), stage: Some(&stage) };
                let entries = entries.iter().map(|(k, p)| Ok((k.clone(), interpolate(p, &scope)?))).collect::<Result<
                    _,
                    PipelineError,
                >>(
                )?;
                declared.push(Declared {
                    name: expansion.name,
                    at: at.clone(),
                    offset: key.span().start,
                    entries,
                    matrix: Some(expansion.origin),
                });
            }
        }
        let names: Vec<String> = declared.iter().map(|d| d.name.clone()).collect();
        let mut index_of: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, (name, d)) in names.iter().zip(&declared).enumerate() {
            if index_of.insert(name.as_str(), i).is_some() {
                return Err(err(
                    d.offset,
                    Some(name),
                    format!("two stages are named `{name}` after the matrices are expanded"),
                    Some("rename one of them, or change the matrix values".into()),
                ));
            }
        }
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, d) in declared.iter().enumerate() {
            if let Some(m) = &d.matrix {
                groups.entry(m.declared.clone()).or_default().push(i);
            }
        }
        let known = StageNames { names: &names, index_of: &index_of, groups: &groups };

        // First pass: kinds and ports.
        struct Pending {
            name: String,
            at: Location,
            kind: Arc<dyn StageKind>,
            inputs: BTreeMap<String, Vec<usize>>,
            input_at: BTreeMap<String, Location>,
            params: BTreeMap<String, value::Param>,
            resources: Resources,
            matrix: Option<MatrixOrigin>,
        }
        let mut pending = Vec::new();
        for d in declared {
            let Declared { name: stage, at, offset, mut entries, matrix } = d;
            let kind_param = entries.remove("kind").ok_or_else(|| {
                err(
                    offset,
                    Some(&stage),
                    "missing `kind`".into(),
                    Some(format!("known kinds: {}", registry.names().collect::<Vec<_>>().join(", "))),
                )
            })?;
            let Value::String(kind_name) = &kind_param.value else {
                return Err(PipelineError {
                    location: kind_param.at.clone(),
                    stage: Some(stage),
                    message: format!("`kind` must be a string, found {}", kind_param.value.type_name()),
                    hint: None,
                }
                .into());
            };
            let Some(kind) = registry.get(kind_name) else {
                let hint = match closest(kind_name, registry.names()) {
                    Some(c) => {
                        format!("did you mean `{c}`? known kinds: {}", registry.names().collect::<Vec<_>>().join(", "))
                    }
                    None => format!("known kinds: {}", registry.names().collect::<Vec<_>>().join(", ")),
                };
                return Err(PipelineError {
                    location: kind_param.at.clone(),
                    stage: Some(stage),
                    message: format!("unknown stage kind `{kind_name}`"),
                    hint: Some(hint),
                }
                .into());
            };
            let mut inputs = BTreeMap::new();
            let mut input_at = BTreeMap::new();
            let resolve = |port: &str, p: &value::Param, arity: Arity| resolve_port(&stage, port, p, arity, &known);
            for port in kind.ports() {
                let Some(p) = entries.remove(port.name) else {
                    if port.required {
                        return Err(located(
                            at.clone(),
                            &stage,
                            format!("missing input port `{}` of a `{}` stage", port.name, kind.name()),
                            Some(format!("connect it to the stage whose output it reads: {} = \"STAGE\"", port.name)),
                        )
                        .into());
                    }
                    continue;
                };
                inputs.insert(port.name.to_string(), resolve(port.name, &p, port.arity)?);
                input_at.insert(port.name.to_string(), p.at.clone());
            }
            if let Some(table_name) = kind.port_table()
                && let Some(table) = entries.remove(table_name)
            {
                let Value::Table(ports) = &table.value else {
                    let message =
                        format!("`{table_name}` must be a table of input ports: {table_name} = {{ data = \"STAGE\" }}");
                    return Err(located(table.at.clone(), &stage, message, None).into());
                };
                for (port, p) in ports {
                    if !port.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                        let message = format!("input port name `{port}` may hold only letters, digits, `_` and `-`");
                        return Err(located(p.at.clone(), &stage, message, None).into());
                    }
                    if inputs.contains_key(port) {
                        let message =
                            format!("input port `{port}` is given twice: as `{port} = ...` and in `{table_name}`");
                        let hint = Some(format!("keep one of the two: `{port} = \"STAGE\"` is enough"));
                        return Err(located(p.at.clone(), &stage, message, hint).into());
                    }
                    inputs.insert(port.clone(), resolve(port, p, Arity::Many)?);
                    input_at.insert(port.clone(), p.at.clone());
                }
            }
            let resources = match entries.remove("resources") {
                Some(p) => Resources::parse(&stage, &p)?,
                None => Resources::default(),
            };
            pending.push(Pending {
                name: stage,
                at,
                kind: kind.clone(),
                inputs,
                input_at,
                params: entries,
                resources,
                matrix,
            });
        }

        // Graph and cycles, before configuring (configuring may touch the filesystem).
        let mut graph = DiGraph::<usize, String>::new();
        let nodes: Vec<NodeIndex> = (0..pending.len()).map(|i| graph.add_node(i)).collect();
        for (i, p) in pending.iter().enumerate() {
            for (port, sources) in &p.inputs {
                for &s in sources {
                    graph.add_edge(nodes[s], nodes[i], port.clone());
                }
            }
        }
        if petgraph::algo::is_cyclic_directed(&graph) {
            let scc = petgraph::algo::tarjan_scc(&graph).into_iter().find(|c| c.len() > 1).unwrap_or_default();
            let mut members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
            members.sort_unstable();
            let first = members.first().copied().unwrap_or(0);
            let cycle = describe_cycle(&pending.iter().map(|p| p.inputs.clone()).collect::<Vec<_>>(), &members, &names);
            return Err(PipelineError {
                location: pending[first].at.clone(),
                stage: Some(names[first].clone()),
                message: format!("the stages form a cycle: {cycle}"),
                hint: Some("a pipeline is a DAG: break the cycle by reading from an earlier stage".into()),
            }
            .into());
        }
        let order = kahn_order(&graph, &nodes);

        // Configure each stage.
        let mut stages = Vec::new();
        let mut input_at = Vec::new();
        for p in pending {
            let mut params = Params::new(&p.name, &p.at, &dir, p.params).with_ports(p.inputs.keys().cloned().collect());
            let stage = p.kind.configure(&mut params)?;
            let (key_params, files) = params.finish(p.kind.name())?;
            input_at.push(p.input_at);
            stages.push(StageDecl {
                name: p.name,
                kind: p.kind,
                at: p.at,
                inputs: p.inputs,
                stage,
                key_params,
                files,
                resources: p.resources,
                matrix: p.matrix,
            });
        }

        // Ports fed the wrong kind of artifact.
        for (p, at) in stages.iter().zip(&input_at) {
            for spec in p.kind.ports() {
                let Some(sources) = p.inputs.get(spec.name) else { continue };
                for &s in sources {
                    let produces = stages[s].stage.produces();
                    let ok = match spec.accepts {
                        Accepts::Any => true,
                        _ if produces == Produces::Chosen => true,
                        Accepts::Dataset => produces == Produces::Dataset,
                        Accepts::Model => matches!(produces, Produces::Model | Produces::Folder),
                    };
                    if !ok {
                        let want = match spec.accepts {
                            Accepts::Dataset => "a dataset",
                            Accepts::Model => "a model",
                            Accepts::Any => "anything",
                        };
                        return Err(PipelineError {
                            location: at[spec.name].clone(),
                            stage: Some(p.name.clone()),
                            message: format!(
                                "input port `{}` needs {want}, but stage `{}` (kind `{}`) does not produce one",
                                spec.name,
                                stages[s].name,
                                stages[s].kind.name()
                            ),
                            hint: None,
                        }
                        .into());
                    }
                }
            }
        }
        Ok(Pipeline {
            name,
            path: path.to_path_buf(),
            source_digest: crate::digest::Digest::of(bytes),
            dir,
            stages,
            graph,
            order,
            vars: vars.iter().map(|(k, p)| (k.clone(), p.to_json())).collect(),
            overrides: overrides.to_vec(),
        })
    }

    pub fn index_of(&self, stage: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == stage)
    }

    /// Looks a stage up by name, with a suggestion when it is not there.
    pub fn stage_named(&self, stage: &str) -> Result<usize, Error> {
        self.index_of(stage).ok_or_else(|| {
            let expansions: Vec<&str> = self
                .stages
                .iter()
                .filter(|s| s.matrix.as_ref().is_some_and(|m| m.declared == stage))
                .map(|s| s.name.as_str())
                .collect();
            if !expansions.is_empty() {
                return Error::Usage(format!(
                    "`{stage}` is a matrix of {} stages in pipeline `{}`: {}\n  hint: name one of them",
                    expansions.len(),
                    self.name,
                    expansions.join(", ")
                ));
            }
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            let hint = closest(stage, names.iter().copied())
                .map(|c| format!("did you mean `{c}`?"))
                .unwrap_or_else(|| format!("its stages: {}", names.join(", ")));
            Error::Usage(format!("pipeline `{}` has no stage `{stage}`\n  hint: {hint}", self.name))
        })
    }

    /// The stage and everything it depends on, transitively.
    pub fn with_ancestors(&self, stage: usize) -> Vec<bool> {
        let mut keep = vec![false; self.stages.len()];
        let mut todo = vec![stage];
        while let Some(s) = todo.pop() {
            if !keep[s] {
                keep[s] = true;
                todo.extend(self.stages[s].inputs.values().flatten().copied());
            }
        }
        keep
    }
}

fn located(location: Location, stage: &str, message: String, hint: Option<String>) -> PipelineError {
    PipelineError { location, stage: Some(stage.to_string()), message, hint }
}

/// The stage names a port can refer to: every stage, matrix expansions included, and the names
/// matrices were declared under (each standing for all its expansions).
struct StageNames<'a> {
    names: &'a [String],
    index_of: &'a BTreeMap<&'a str, usize>,
    groups: &'a BTreeMap<String, Vec<usize>>,
}

impl StageNames<'_> {
    /// The stages `reference` names: one stage, a matrix's expansions in order, or the stages a
    /// `*` pattern matches in file order.
    fn lookup(&self, reference: &str) -> Vec<usize> {
        if let Some(&i) = self.index_of.get(reference) {
            return vec![i];
        }
        if let Some(group) = self.groups.get(reference) {
            return group.clone();
        }
        if reference.contains('*') {
            return (0..self.names.len()).filter(|&i| glob_match(reference, &self.names[i])).collect();
        }
        Vec::new()
    }

    fn suggestion(&self, reference: &str) -> String {
        let all = self.names.iter().map(String::as_str).chain(self.groups.keys().map(String::as_str));
        match closest(reference, all) {
            Some(c) => format!("did you mean `{c}`?"),
            None => {
                let mut listed: Vec<&str> =
                    self.names.iter().filter(|n| !n.contains('.')).map(String::as_str).collect();
                listed.extend(self.groups.keys().map(String::as_str));
                format!("stages in this file: {}", listed.join(", "))
            }
        }
    }
}

/// The stages a port's value names (`"a"`, or `["a", "b"]` where the port takes several; a
/// matrix's declared name or a `*` pattern stands for several), as indices, each checked to
/// exist and not to be the stage itself.
fn resolve_port(
    stage: &str,
    port: &str,
    p: &value::Param,
    arity: Arity,
    known: &StageNames<'_>,
) -> Result<Vec<usize>, PipelineError> {
    let refs: Vec<(&str, &Location)> = match &p.value {
        Value::String(s) => vec![(s.as_str(), &p.at)],
        Value::Array(items) if arity == Arity::Many => {
            let mut v = Vec::new();
            for item in items {
                let Value::String(s) = &item.value else {
                    let message = format!(
                        "input port `{port}` must list stage names (strings), found {}",
                        item.value.type_name()
                    );
                    return Err(located(item.at.clone(), stage, message, None));
                };
                v.push((s.as_str(), &item.at));
            }
            if v.is_empty() {
                return Err(located(p.at.clone(), stage, format!("input port `{port}` lists no stages"), None));
            }
            v
        }
        other if arity == Arity::One => {
            let message = format!("input port `{port}` must name one stage (a string), found {}", other.type_name());
            return Err(located(p.at.clone(), stage, message, None));
        }
        other => {
            let message = format!(
                "input port `{port}` must name stages (a string or an array of strings), found {}",
                other.type_name()
            );
            return Err(located(p.at.clone(), stage, message, None));
        }
    };
    let mut idx = Vec::new();
    for (r, loc) in refs {
        let found = known.lookup(r);
        if found.is_empty() {
            let message = if r.contains('*') {
                format!("input port `{port}`: the pattern `{r}` matches no stage")
            } else {
                format!("input port `{port}` refers to a stage `{r}` that does not exist")
            };
            return Err(located(loc.clone(), stage, message, Some(known.suggestion(r))));
        }
        for i in found {
            if known.names[i] == stage {
                let message =
                    format!("input port `{port}` reads the stage's own output: a stage cannot depend on itself");
                return Err(located(loc.clone(), stage, message, None));
            }
            if !idx.contains(&i) {
                idx.push(i);
            }
        }
    }
    if arity == Arity::One && idx.len() > 1 {
        let listed: Vec<&str> = idx.iter().map(|&i| known.names[i].as_str()).collect();
        let written = if let Value::String(s) = &p.value { s.as_str() } else { "" };
        let message =
            format!("input port `{port}` takes one stage, but `{written}` names {}: {}", idx.len(), listed.join(", "));
        let hint = Some(format!("name one of them, e.g. {port} = \"{}\"", listed[0]));
        return Err(located(p.at.clone(), stage, message, hint));
    }
    Ok(idx)
}

/// The first string inside `p` (at any depth) for which `test` holds.
fn find_string(p: &Param, test: &dyn Fn(&str) -> bool) -> Option<String> {
    match &p.value {
        Value::String(s) if test(s) => Some(s.clone()),
        Value::Array(items) => items.iter().find_map(|i| find_string(i, test)),
        Value::Table(t) => t.values().find_map(|i| find_string(i, test)),
        _ => None,
    }
}

/// Applies `--set NAME=VALUE` to `[vars]`. A value is read as TOML (`2e-5`, `true`, `["a", "b"]`)
/// and must have the declared variable's type (any number for a number); for a string
/// variable the text is taken as it is (quotes optional).
fn apply_overrides(
    vars: &mut BTreeMap<String, Param>,
    overrides: &[(String, String)],
    path: &Path,
) -> Result<(), Error> {
    for (name, text) in overrides {
        let Some(declared) = vars.get(name) else {
            let hint = match closest(name, vars.keys().map(String::as_str)) {
                Some(c) => format!("did you mean `{c}`?"),
                None if vars.is_empty() => "the file has no [vars] table; declare the variable there first".into(),
                None => format!("its variables: {}", vars.keys().cloned().collect::<Vec<_>>().join(", ")),
            };
            return Err(Error::Usage(format!(
                "--set {name}={text}: {} declares no variable `{name}`\n  hint: {hint}",
                path.display()
            )));
        };
        let parsed = toml::from_str::<toml::Table>(&format!("v = {text}")).ok().and_then(|mut t| t.remove("v"));
        let value = match (&declared.value, parsed) {
            (Value::String(_), Some(toml::Value::String(s))) => Value::String(s),
            (Value::String(_), _) => Value::String(text.clone()),
            // Numbers stand for each other (`min = 0` swept with 0.5); the parameter a number
            // fills checks its own type, at the place it was written.
            (Value::Float(_) | Value::Integer(_), Some(toml::Value::Float(f))) => Value::Float(f),
            (Value::Float(_) | Value::Integer(_), Some(toml::Value::Integer(i))) => Value::Integer(i),
            (Value::Bool(_), Some(toml::Value::Boolean(b))) => Value::Bool(b),
            (Value::Array(_), Some(v @ toml::Value::Array(_))) | (Value::Table(_), Some(v @ toml::Value::Table(_))) => {
                from_toml(v, &declared.at)
            }
            (want, _) => {
                return Err(Error::Usage(format!(
                    "--set {name}={text}: variable `{name}` is {} in {} ({}), and `{text}` is not",
                    want.type_name(),
                    path.display(),
                    declared.at
                )));
            }
        };
        let at = declared.at.clone();
        vars.insert(name.clone(), Param { value, at });
    }
    Ok(())
}

fn from_toml(v: toml::Value, at: &Location) -> Value {
    let p = |v| Param { value: from_toml(v, at), at: at.clone() };
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::Integer(i),
        toml::Value::Float(f) => Value::Float(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::Datetime(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(p).collect()),
        toml::Value::Table(t) => Value::Table(t.into_iter().map(|(k, v)| (k, p(v))).collect()),
    }
}

fn kahn_order(graph: &DiGraph<usize, String>, nodes: &[NodeIndex]) -> Vec<usize> {
    let mut indegree: Vec<usize> =
        nodes.iter().map(|n| graph.neighbors_directed(*n, petgraph::Direction::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len()).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::new();
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for next in graph.neighbors_directed(nodes[i], petgraph::Direction::Outgoing) {
            let j = graph[next];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(Reverse(j));
            }
        }
    }
    order
}

/// Walks a cycle among `members` and names it, `a → b → a`.
fn describe_cycle(inputs: &[BTreeMap<String, Vec<usize>>], members: &[usize], names: &[String]) -> String {
    let Some(&start) = members.first() else { return String::new() };
    let mut path = vec![start];
    let mut cur = start;
    for _ in 0..members.len() {
        let next = inputs[cur].values().flatten().copied().find(|s| members.contains(s));
        match next {
            Some(n) if n == start => break,
            Some(n) if !path.contains(&n) => {
                path.push(n);
                cur = n;
            }
            _ => break,
        }
    }
    path.push(start);
    // `inputs` point from reader to source; print in data-flow order.
    path.reverse();
    path.iter().map(|&i| format!("`{}`", names[i])).collect::<Vec<_>>().join(" → ")
}
