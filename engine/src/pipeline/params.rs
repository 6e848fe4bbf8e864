//! Typed access to a stage's parameters, with errors that point into the pipeline file.
//!
//! A stage kind reads its parameters through [`Params`]. Every value it reads (as interpreted:
//! `1` and `1.0` read as a float are the same) is recorded into the stage's canonical key
//! parameters, unless it is read as a path — then the file's *digest* enters the key instead — or
//! read as incidental (batch sizes, time-outs: things that do not change results). Parameters that
//! are never read are reported as unknown, with the nearest known name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::value::{Param, Value};
use crate::error::{Location, PipelineError};

/// A file or folder whose content digest enters the stage key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDep {
    /// How `plan` names it: the parameter and the path as written.
    pub label: String,
    pub path: PathBuf,
    pub folder: bool,
}

pub struct Params<'a> {
    stage: &'a str,
    stage_at: &'a Location,
    base_dir: &'a Path,
    entries: BTreeMap<String, Param>,
    read: BTreeSet<String>,
    key: serde_json::Map<String, serde_json::Value>,
    files: Vec<FileDep>,
    ports: Vec<String>,
}

impl<'a> Params<'a> {
    pub fn new(stage: &'a str, stage_at: &'a Location, base_dir: &'a Path, entries: BTreeMap<String, Param>) -> Self {
        Params {
            stage,
            stage_at,
            base_dir,
            entries,
            read: BTreeSet::new(),
            key: Default::default(),
            files: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// Sets the names of the stage's connected input ports (done by the pipeline loader).
    pub fn with_ports(mut self, ports: Vec<String>) -> Self {
        self.ports = ports;
        self
    }

    /// The stage's connected input ports.
    pub fn ports(&self) -> &[String] {
        &self.ports
    }

    pub fn stage_name(&self) -> &str {
        self.stage
    }

    /// The folder relative paths resolve against (the pipeline file's).
    pub fn base_dir(&self) -> &Path {
        self.base_dir
    }

    /// An error located at parameter `name` (or at the stage when it is absent).
    pub fn error(&self, name: &str, message: impl Into<String>) -> PipelineError {
        let location = self.entries.get(name).map(|p| p.at.clone()).unwrap_or_else(|| self.stage_at.clone());
        PipelineError { location, stage: Some(self.stage.to_string()), message: message.into(), hint: None }
    }

    /// An error located at the stage's table.
    pub fn stage_error(&self, message: impl Into<String>) -> PipelineError {
        PipelineError {
            location: self.stage_at.clone(),
            stage: Some(self.stage.to_string()),
            message: message.into(),
            hint: None,
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn take(&mut self, name: &str) -> Option<Param> {
        self.read.insert(name.to_string());
        self.entries.get(name).cloned()
    }

    fn wrong_type(&self, name: &str, want: &str, got: &Param) -> PipelineError {
        self.error(name, format!("parameter `{name}` must be {want}, found {}", got.value.type_name()))
    }

    /// Records a value into the canonical key parameters.
    pub fn record(&mut self, name: &str, value: serde_json::Value) {
        self.key.insert(name.to_string(), value);
    }

    pub fn string(&mut self, name: &str) -> Result<Option<String>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        match p.value {
            Value::String(s) => {
                self.record(name, s.clone().into());
                Ok(Some(s))
            }
            _ => Err(self.wrong_type(name, "a string", &p)),
        }
    }

    pub fn required_string(&mut self, name: &str) -> Result<String, PipelineError> {
        self.string(name)?.ok_or_else(|| self.missing(name, "a string"))
    }

    /// A string that must be one of `choices`.
    pub fn choice(&mut self, name: &str, choices: &[&str]) -> Result<Option<String>, PipelineError> {
        let value = self.string(name)?;
        if let Some(v) = &value
            && !choices.contains(&v.as_str())
        {
            return Err(
                self.error(name, format!("parameter `{name}` is \"{v}\"; expected one of: {}", quoted(choices)))
            );
        }
        Ok(value)
    }

    pub fn float(&mut self, name: &str) -> Result<Option<f64>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        let v = match p.value {
            Value::Float(f) => f,
            Value::Integer(i) => i as f64,
            _ => return Err(self.wrong_type(name, "a number", &p)),
        };
        if !v.is_finite() {
            return Err(self.error(name, format!("parameter `{name}` must be a finite number, found {v}")));
        }
        self.record(name, serde_json::json!(v));
        Ok(Some(v))
    }

    /// An array of finite numbers.
    pub fn float_list(&mut self, name: &str) -> Result<Option<Vec<f64>>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        let Value::Array(items) = &p.value else {
            return Err(self.wrong_type(name, "an array of numbers", &p));
        };
        let mut out = Vec::new();
        for item in items {
            let v = match item.value {
                Value::Float(f) if f.is_finite() => f,
                Value::Integer(i) => i as f64,
                ref other => {
                    return Err(PipelineError {
                        location: item.at.clone(),
                        stage: Some(self.stage.to_string()),
                        message: format!(
                            "parameter `{name}` must be an array of finite numbers, found {} in it",
                            other.type_name()
                        ),
                        hint: None,
                    });
                }
            };
            out.push(v);
        }
        self.record(name, serde_json::json!(out));
        Ok(Some(out))
    }

    /// A float in `[lo, hi]`.
    pub fn fraction(&mut self, name: &str) -> Result<Option<f64>, PipelineError> {
        let v = self.float(name)?;
        if let Some(f) = v
            && !(0.0..=1.0).contains(&f)
        {
            return Err(self.error(name, format!("parameter `{name}` is a fraction and must lie in [0, 1], found {f}")));
        }
        Ok(v)
    }

    pub fn integer(&mut self, name: &str) -> Result<Option<i64>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        match p.value {
            Value::Integer(i) => {
                self.record(name, i.into());
                Ok(Some(i))
            }
            _ => Err(self.wrong_type(name, "an integer", &p)),
        }
    }

    /// Takes a parameter that was read out of the key: it does not change results (a batch size,
    /// a time-out).
    pub fn exclude_from_key(&mut self, name: &str) {
        self.key.remove(name);
    }

    pub fn positive(&mut self, name: &str) -> Result<Option<u64>, PipelineError> {
        match self.integer(name)? {
            Some(i) if i <= 0 => {
                Err(self.error(name, format!("parameter `{name}` must be a positive integer, found {i}")))
            }
            other => Ok(other.map(|i| i as u64)),
        }
    }

    pub fn bool(&mut self, name: &str) -> Result<Option<bool>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        match p.value {
            Value::Bool(b) => {
                self.record(name, b.into());
                Ok(Some(b))
            }
            _ => Err(self.wrong_type(name, "a boolean (true or false)", &p)),
        }
    }

    /// An array of strings (numbers and booleans in it taken as their text).
    pub fn string_list(&mut self, name: &str) -> Result<Option<Vec<String>>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        let Value::Array(items) = &p.value else {
            return Err(self.wrong_type(name, "an array of strings", &p));
        };
        let mut out = Vec::new();
        for item in items {
            match &item.value {
                Value::String(s) => out.push(s.clone()),
                // A number or boolean in a list of words (a command's arguments, often a
                // `${matrix.lr}` that kept its type) is its text.
                v @ (Value::Integer(_) | Value::Float(_) | Value::Bool(_)) => {
                    out.push(super::interpolate::scalar_text(v).unwrap_or_default())
                }
                other => {
                    return Err(PipelineError {
                        location: item.at.clone(),
                        stage: Some(self.stage.to_string()),
                        message: format!(
                            "parameter `{name}` must be an array of strings, found {} in it",
                            other.type_name()
                        ),
                        hint: None,
                    });
                }
            }
        }
        self.record(name, serde_json::json!(out));
        Ok(Some(out))
    }

    /// A table (or any value) as JSON, recorded into the key as is.
    pub fn table(&mut self, name: &str) -> Result<Option<serde_json::Value>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        if !matches!(p.value, Value::Table(_)) {
            return Err(self.wrong_type(name, "a table (`{ key = value }`)", &p));
        }
        let json = p.to_json();
        self.record(name, json.clone());
        Ok(Some(json))
    }

    /// A path, resolved against the pipeline file's folder. Its content digest enters the key
    /// (not the path itself), labelled `name`.
    pub fn path_dep(&mut self, name: &str, folder: bool) -> Result<Option<PathBuf>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        let Value::String(s) = &p.value else {
            return Err(self.wrong_type(name, "a path (a string)", &p));
        };
        let path = self.check_path(name, s, folder)?;
        self.files.push(FileDep { label: name.to_string(), path: path.clone(), folder });
        Ok(Some(path))
    }

    /// A parameter that is one string or an array of strings (`path = "a"`, `path = ["a", "b"]`).
    pub fn strings(&mut self, name: &str) -> Result<Option<Vec<String>>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(None) };
        let out = match &p.value {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) if !items.is_empty() => {
                let mut out = Vec::new();
                for item in items {
                    let Value::String(s) = &item.value else {
                        return Err(self.wrong_type(name, "a string or an array of strings", item));
                    };
                    out.push(s.clone());
                }
                out
            }
            _ => return Err(self.wrong_type(name, "a string or a non-empty array of strings", &p)),
        };
        Ok(Some(out))
    }

    /// Makes the content digest of a file found while configuring (a glob's match) part of the
    /// key, labelled `label` for `plan`.
    pub fn depend_on_file(&mut self, label: String, path: PathBuf) {
        self.files.push(FileDep { label, path, folder: false });
    }

    /// Several paths whose digests enter the key, labelled `name[i]: path`.
    pub fn path_deps(&mut self, name: &str) -> Result<Vec<PathBuf>, PipelineError> {
        let Some(p) = self.take(name) else { return Ok(Vec::new()) };
        let Value::Array(items) = &p.value else {
            return Err(self.wrong_type(name, "an array of paths", &p));
        };
        let mut out = Vec::new();
        for item in items {
            let Value::String(s) = &item.value else {
                return Err(self.wrong_type(name, "an array of paths (strings)", item));
            };
            let path = self.resolve(s);
            let folder = path.is_dir();
            let path = self.check_path(name, s, folder)?;
            self.files.push(FileDep { label: format!("{name}: {s}"), path: path.clone(), folder });
            out.push(path);
        }
        Ok(out)
    }

    /// A path whose *name* matters (an output location): recorded into the key as written.
    pub fn output_path(&mut self, name: &str) -> Result<Option<PathBuf>, PipelineError> {
        Ok(self.string(name)?.map(|s| self.resolve(&s)))
    }

    pub fn resolve(&self, written: &str) -> PathBuf {
        let p = Path::new(written);
        if p.is_absolute() { p.to_path_buf() } else { self.base_dir.join(p) }
    }

    fn check_path(&self, name: &str, written: &str, folder: bool) -> Result<PathBuf, PipelineError> {
        let path = self.resolve(written);
        let what = if folder { "folder" } else { "file" };
        match std::fs::metadata(&path) {
            Ok(m) if folder && !m.is_dir() => Err(self.error(name, format!("`{written}` is not a folder"))),
            Ok(m) if !folder && m.is_dir() => {
                Err(self.error(name, format!("`{written}` is a folder; a file is expected")))
            }
            Ok(_) => Ok(path),
            Err(e) => Err(PipelineError {
                hint: Some(format!(
                    "relative paths resolve against the pipeline file's folder, {}",
                    self.base_dir.display()
                )),
                ..self.error(name, format!("{what} `{written}` cannot be read ({}): {e}", path.display()))
            }),
        }
    }

    pub fn missing(&self, name: &str, want: &str) -> PipelineError {
        self.stage_error(format!("missing parameter `{name}` ({want})"))
    }

    /// Ends reading: any parameter never read is unknown. Returns the canonical key parameters
    /// and the referenced files.
    pub fn finish(self, kind: &str) -> Result<(serde_json::Value, Vec<FileDep>), PipelineError> {
        for (name, p) in &self.entries {
            if !self.read.contains(name) {
                let known: Vec<&str> = self.read.iter().map(String::as_str).collect();
                let mut err = PipelineError {
                    location: p.at.clone(),
                    stage: Some(self.stage.to_string()),
                    message: format!("unknown parameter `{name}` for a `{kind}` stage"),
                    hint: None,
                };
                err.hint = Some(match closest(name, known.iter().copied()) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None if known.is_empty() => format!("a `{kind}` stage takes no parameters besides its inputs"),
                    None => format!("a `{kind}` stage takes: {}", known.join(", ")),
                });
                return Err(err);
            }
        }
        Ok((serde_json::Value::Object(self.key), self.files))
    }
}

fn quoted(choices: &[&str]) -> String {
    choices.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
}

/// The candidate nearest to `word` by edit distance, if near enough to be a likely typo.
pub fn closest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_names_only() {
        assert_eq!(closest("lowst", ["lowest", "highest", "by"]), Some("lowest"));
        assert_eq!(closest("zzzzzz", ["lowest", "by"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
