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

/// The componentize-py release the Python SDK is tested with (as `ladle plugin new` says).
#[allow(dead_code)] // not every user of this file builds Python plugins
pub const COMPONENTIZE_PY: &str = "0.25.1";

/// Builds the Python plugin in `folder` (a folder of the repository holding `app.py`) with
/// componentize-py, against ladle's WIT and the Python SDK, when its .wasm is missing or older
/// than its sources; returns the .wasm (in `folder/target/`). `scripts/test.sh` installs
/// componentize-py where it is missing and builds them first; run without it, this fails saying
/// how to install it.
#[allow(dead_code)] // not every user of this file builds Python plugins
pub fn python_plugin(folder: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(wasm) = built.get(folder) {
        return wasm.clone();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = repo.join(folder);
    let name = root.file_name().unwrap().to_string_lossy().replace('-', "_");
    let wasm = root.join("target").join(format!("{name}.wasm"));
    let sdk = repo.join("plugins/sdk-python");
    let wit = repo.join("plugins/wit");
    let newest = [root.join("app.py"), sdk.join("ladle_plugin/__init__.py"), wit.join("filter.wit")]
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    let built_at = std::fs::metadata(&wasm).and_then(|m| m.modified()).ok();
    if built_at.is_none() || built_at < newest {
        std::fs::create_dir_all(wasm.parent().unwrap()).unwrap();
        let tool = std::env::var("LADLE_COMPONENTIZE_PY").unwrap_or_else(|_| "componentize-py".into());
        let out = Command::new(&tool)
            .arg("-d")
            .arg(&wit)
            .args(["-w", "plugin", "componentize", "app", "-p"])
            .arg(&root)
            .arg("-p")
            .arg(&sdk)
            .arg("-o")
            .arg(&wasm)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `{tool}` to build {folder}: {e}\n  hint: pip install componentize-py=={COMPONENTIZE_PY}, or run scripts/test.sh, which installs it"
                )
            });
        assert!(out.status.success(), "building {folder} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    built.insert(folder.to_string(), wasm.clone());
    wasm
}
