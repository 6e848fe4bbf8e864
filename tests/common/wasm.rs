//! Building the WASM guests (example plugins, hostile test plugins) from tests and benches.
//! Shared by `tests/common` and `benches/plugins.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Builds a guest workspace (a folder of the repository) for wasm32-wasip2, once per process,
/// and returns the folder holding its .wasm files. `.ci/run` builds them first, so this is
/// usually a no-op.
pub fn wasm_dir(workspace: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(dir) = built.get(workspace) {
        return dir.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(workspace);
    let target = root.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "building {workspace} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let dir = target.join("wasm32-wasip2/release");
    built.insert(workspace.to_string(), dir.clone());
    dir
}
