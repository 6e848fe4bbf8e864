//! Computing a stage's key parts from its inputs and referenced files.

use std::collections::BTreeMap;

use crate::digest::ArtifactDigest;
use crate::error::Result;
use crate::key::KeyParts;
use crate::pipeline::StageDecl;
use crate::store::Store;

/// The key parts of `decl` given its input artifacts' digests. Referenced files are digested
/// through the stat memo, so unchanged files are not re-read.
pub fn key_parts(decl: &StageDecl, inputs: BTreeMap<String, Vec<ArtifactDigest>>, store: &Store) -> Result<KeyParts> {
    let mut files = BTreeMap::new();
    for dep in &decl.files {
        let digest = if dep.folder { store.folder_digest(&dep.path)? } else { store.file_digest(&dep.path)? };
        files.insert(dep.label.clone(), digest);
    }
    Ok(KeyParts {
        kind: decl.kind.name().to_string(),
        version: decl.stage.version(),
        params: decl.key_params.clone(),
        inputs,
        files,
        record_files: None,
    })
}
