//! Computing a stage's key parts from its inputs and referenced files.

use std::collections::BTreeMap;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::digest::{ArtifactDigest, Digest};
use crate::error::Result;
use crate::key::KeyParts;
use crate::pipeline::StageDecl;
use crate::pipeline::params::FileDep;
use crate::store::Store;

/// The key parts of `decl` given its input artifacts' digests. Referenced files are digested
/// through the stat memo, so unchanged files are not re-read.
pub fn key_parts(decl: &StageDecl, inputs: BTreeMap<String, Vec<ArtifactDigest>>, store: &Store) -> Result<KeyParts> {
    let digests = digest_files(&decl.files, store)?;
    let files = decl.files.iter().map(|d| d.label.clone()).zip(digests).collect();
    Ok(KeyParts {
        kind: decl.kind.name().to_string(),
        version: decl.stage.version(),
        params: decl.key_params.clone(),
        inputs,
        files,
        record_files: None,
    })
}

/// The digests of the files a stage depends on, in order, several hashed at once: a `read` of 200
/// tars hashes gigabytes on a cold run, and one core hashes them at about the speed the disk
/// serves them.
fn digest_files(deps: &[FileDep], store: &Store) -> Result<Vec<Digest>> {
    let digest = |dep: &FileDep| if dep.folder { store.folder_digest(&dep.path) } else { store.file_digest(&dep.path) };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(deps.len());
    if threads <= 1 {
        return deps.iter().map(digest).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Digest>>>> = Mutex::new((0..deps.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(dep) = deps.get(i) else { return };
                    let d = digest(dep);
                    let failed = d.is_err();
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(d);
                    if failed {
                        next.store(deps.len(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    // The first error in order (later files may not have been hashed after it).
    let mut out = Vec::with_capacity(deps.len());
    for r in results {
        match r {
            Some(r) => out.push(r?),
            None => return Err(crate::error::Error::Internal("a file was not hashed".into())),
        }
    }
    Ok(out)
}
