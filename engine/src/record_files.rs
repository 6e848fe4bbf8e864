//! Files named by records: the images a scoring stage reads live outside the store, so their
//! contents must enter cache keys or an edited image would be served its old score.
//!
//! For a map stage that [reads record files](crate::stage::MapStage::reads_record_files) (or a
//! whole stage with a [record files port](crate::stage::WholeStage::record_files_port), whose
//! salts only join its stage key), each input shard gets a *salt*: BLAKE3 over the digests of the files its records name, in record
//! order. The salt joins that shard's key, and the digest of all salts joins the stage key (as
//! [`KeyParts::record_files`](crate::key::KeyParts)). Digests come from the store's stat memo, so
//! a rerun stats each file and reads none that did not change. A file that cannot be read gets a
//! marker instead of a digest: the stage itself reports it (or drops the record), and once the
//! file appears the shard's key changes and it is computed again.

use crate::digest::{Digest, hash_with_context};
use crate::stage::{Execution, Inputs, ShardInput};
use crate::store::Store;

/// Whether `stage` reads files its records name (so has salts).
pub fn applies(stage: &dyn crate::stage::Stage) -> bool {
    match stage.execution() {
        Execution::Map { stage, .. } => stage.reads_record_files(),
        Execution::Whole(stage) => stage.record_files_port().is_some(),
    }
}

/// One salt per shard of the mapped dataset, or `None` when the stage reads no record files.
pub fn shard_salts(
    stage: &dyn crate::stage::Stage,
    inputs: &Inputs,
    store: &Store,
) -> Result<Option<Vec<Digest>>, String> {
    type Files<'a> = Box<dyn Fn(&ShardInput<'_>) -> Result<Vec<std::path::PathBuf>, crate::StageError> + 'a>;
    let (port, files): (&str, Files<'_>) = match stage.execution() {
        Execution::Map { port, stage } if stage.reads_record_files() => {
            (port, Box::new(move |shard| stage.record_files(inputs, shard)))
        }
        Execution::Whole(stage) => match stage.record_files_port() {
            Some(port) => (port, Box::new(move |shard| stage.record_files(inputs, shard))),
            None => return Ok(None),
        },
        Execution::Map { .. } => return Ok(None),
    };
    let shards = inputs.dataset(port).map_err(|e| e.to_string())?;
    let mut salts = Vec::with_capacity(shards.len());
    let mut first_record = 0;
    for (index, shard) in shards.iter().enumerate() {
        let bytes = store.get(&shard.digest).map_err(|e| e.to_string())?;
        let paths = files(&ShardInput { index, first_record, digest: shard.digest, jsonl: &bytes })
            .map_err(|e| format!("shard {index}: {e}"))?;
        let mut parts: Vec<[u8; 32]> = Vec::with_capacity(paths.len());
        for path in &paths {
            parts.push(match store.file_digest(path) {
                Ok(d) => d.0,
                Err(_) => hash_with_context("ladle unreadable record file v1", &[path.as_os_str().as_encoded_bytes()]),
            });
        }
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        salts.push(Digest(hash_with_context("ladle record files v1", &refs)));
        first_record += shard.records;
    }
    Ok(Some(salts))
}

/// The digest of all shards' salts, for the stage key.
pub fn combined(salts: &[Digest]) -> Digest {
    let refs: Vec<&[u8]> = salts.iter().map(|s| s.0.as_slice()).collect();
    Digest(hash_with_context("ladle record files of a dataset v1", &refs))
}
