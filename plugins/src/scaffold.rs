//! `ladle plugin new NAME [--lang rust|python]`: a plugin that builds as it is.
//!
//! Rust: a crate carrying its own copy of the SDK (`ladle-plugin/`, with the WIT file). Python:
//! a folder with `app.py`, the SDK package (`ladle_plugin/`) and the WIT file, built by
//! componentize-py. Either builds anywhere, offline, without this repository; `ladle plugin new`
//! run again by a newer ladle refreshes nothing on its own — copy a newer SDK in to upgrade.

use std::path::{Path, PathBuf};

const SDK_LIB: &str = include_str!("../sdk/src/lib.rs");
const SDK_PYTHON: &str = include_str!("../sdk-python/ladle_plugin/__init__.py");
const WIT: &str = include_str!("../wit/filter.wit");

/// The componentize-py release the Python SDK is built and tested with.
pub const COMPONENTIZE_PY: &str = "0.25.1";

/// What a plugin is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
}

/// Errors of `plugin new`.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "`{0}` is not a usable plugin name\n  hint: use letters, digits, `-` and `_`, starting with a letter (e.g. `min-words`)"
    )]
    BadName(String),
    #[error("{0} already exists\n  hint: choose another name, or remove it first")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Writes a new plugin at `dir/NAME`; returns its folder.
pub fn new_plugin(dir: &Path, name: &str, lang: Lang) -> Result<PathBuf, ScaffoldError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    let crate_name = name.replace('-', "_");
    if lang == Lang::Python {
        return write_files(&root, python_files(name, &crate_name));
    }
    let type_name: String =
        name.split(['-', '_']).filter(|p| !p.is_empty()).map(|p| p[..1].to_ascii_uppercase() + &p[1..]).collect();
    let sdk_toml = format!(
        "[package]\nname = \"ladle-plugin\"\nversion = \"{}\"\nedition = \"2024\"\npublish = false\n\n[dependencies]\nserde_json = \"1\"\nwit-bindgen = \"0.63\"\n",
        env!("CARGO_PKG_VERSION")
    );
    let files: Vec<(&str, String)> = vec![
        (
            "Cargo.toml",
            format!(
                "[package]\nname = \"{crate_name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nladle-plugin = {{ path = \"ladle-plugin\" }}\n\n[profile.release]\nopt-level = 3\nlto = true\ncodegen-units = 1\nstrip = true\n\n# A workspace of its own, wherever it is put.\n[workspace]\n"
            ),
        ),
        (
            "src/lib.rs",
            format!(
                r#"//! `{name}`: a ladle filter plugin.
//!
//! Build: cargo build --release --target wasm32-wasip2
//! Check: ladle plugin check target/wasm32-wasip2/release/{crate_name}.wasm

use ladle_plugin::{{Filter, Value, Verdict, export_filter}};

struct {type_name} {{
    field: String,
    min_chars: usize,
}}

impl Filter for {type_name} {{
    /// `config` is the stage's `config` table.
    fn new(config: Value) -> Result<Self, String> {{
        Ok({type_name} {{
            field: config["field"].as_str().unwrap_or("caption").to_string(),
            min_chars: config["min_chars"].as_u64().unwrap_or(1) as usize,
        }})
    }}

    /// Keep, drop, or replace one record.
    fn filter(&mut self, record: Value) -> Result<Verdict, String> {{
        let text = record[&self.field].as_str().ok_or_else(|| format!("the record has no string field `{{}}`", self.field))?;
        Ok(if text.trim().chars().count() >= self.min_chars {{ Verdict::Keep }} else {{ Verdict::Drop }})
    }}
}}

export_filter!({type_name});
"#
            ),
        ),
        ("ladle-plugin/Cargo.toml", sdk_toml),
        ("ladle-plugin/src/lib.rs", SDK_LIB.to_string()),
        ("ladle-plugin/wit/filter.wit", WIT.to_string()),
        (".gitignore", "/target\n".to_string()),
        (
            "README.md",
            format!(
                "# {name}\n\nA ladle filter plugin.\n\n```sh\nrustup target add wasm32-wasip2\ncargo build --release --target wasm32-wasip2\nladle plugin check target/wasm32-wasip2/release/{crate_name}.wasm\n```\n\nUse it in a pipeline:\n\n```toml\n[stages.{crate_name}]\nkind = \"plugin\"\ndata = \"captions\"\nwasm = \"{name}/target/wasm32-wasip2/release/{crate_name}.wasm\"\nconfig = {{ field = \"caption\", min_chars = 1 }}\n```\n"
            ),
        ),
    ];
    write_files(&root, files)
}

fn write_files(root: &Path, files: Vec<(&str, String)>) -> Result<PathBuf, ScaffoldError> {
    for (rel, content) in files {
        let path = root.join(rel);
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
            std::fs::write(&path, content)
        };
        write().map_err(|source| ScaffoldError::Io { path: path.clone(), source })?;
    }
    Ok(root.to_path_buf())
}

/// The build line of a Python plugin, run in its folder.
pub fn python_build_line(module_name: &str) -> String {
    format!("componentize-py -d wit -w plugin componentize app -p . -o {module_name}.wasm")
}

fn python_files(name: &str, module_name: &str) -> Vec<(&'static str, String)> {
    let build = python_build_line(module_name);
    vec![
        (
            "app.py",
            format!(
                r#""""{name}: a ladle filter plugin written in Python.

Build:  {build}
Check:  ladle plugin check {module_name}.wasm
"""

import ladle_plugin


@ladle_plugin.filter
def keep(record, config):
    """True keeps the record, False or None drops it, a dict replaces it."""
    text = record.get(config.get("field", "caption"))
    if not isinstance(text, str):
        raise ValueError(f"the record has no text field {{config.get('field', 'caption')!r}}")
    return len(text.strip()) >= config.get("min_chars", 1)


# componentize-py builds the component from this class.
Filter = ladle_plugin.Filter
"#
            ),
        ),
        ("ladle_plugin/__init__.py", SDK_PYTHON.to_string()),
        ("wit/filter.wit", WIT.to_string()),
        (".gitignore", "*.wasm\n__pycache__/\n".to_string()),
        (
            "README.md",
            format!(
                "# {name}\n\nA ladle filter plugin written in Python (see `app.py`), run sandboxed.\n\n```sh\npip install componentize-py=={COMPONENTIZE_PY}\n{build}\nladle plugin check {module_name}.wasm\n```\n\nUse it in a pipeline (a Python plugin needs more memory than a Rust one: CPython starts in a few tens of MiB):\n\n```toml\n[stages.{module_name}]\nkind = \"plugin\"\ndata = \"captions\"\nwasm = \"{name}/{module_name}.wasm\"\nconfig = {{ field = \"caption\", min_chars = 1 }}\n```\n\n`ladle_plugin/` is the SDK (`@ladle_plugin.filter`, `@ladle_plugin.batch`, `@ladle_plugin.configure`, `ladle_plugin.log`); `wit/` is ladle's plugin interface.\n"
            ),
        ),
    ]
}
