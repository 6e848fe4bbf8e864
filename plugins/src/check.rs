//! `ladle plugin check`: does a .wasm fit the interface, and what does it export and import?

use std::path::Path;

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::host::{Limits, LoadError, Plugin};

/// What `check` found in a component that fits.
#[derive(Debug)]
pub struct Report {
    pub name: String,
    pub size: u64,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
}

/// The names a component exports (interfaces and functions).
pub(crate) fn exports(component: &Component, engine: &Engine) -> Vec<String> {
    let ty = component.component_type();
    let mut names: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    names.sort();
    names
}

fn imports(component: &Component, engine: &Engine) -> Vec<String> {
    let ty = component.component_type();
    let mut names: Vec<String> = ty.imports(engine).map(|(name, _)| name.to_string()).collect();
    names.sort();
    names
}

/// Loads the plugin as a run would (compiling it and linking it against the sandbox), then lists
/// what it exports and imports.
pub fn check(path: &Path) -> Result<Report, LoadError> {
    let plugin = Plugin::load(path, Limits::default())?;
    let component = plugin.component();
    let engine = component.engine();
    Ok(Report {
        name: plugin.name.clone(),
        size: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        exports: exports(component, engine),
        imports: imports(component, engine),
    })
}
