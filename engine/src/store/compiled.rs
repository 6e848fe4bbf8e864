//! Compiled code kept between runs: a plugin's WebAssembly component as wasmtime compiled it.
//!
//! Compiling a component is most of a plugin stage's start-up (an 18 MB Python component takes
//! seconds); its compiled form loads in milliseconds. The entry's key is chosen by the caller
//! (the `.wasm` digest with everything of the engine that changes the code: wasmtime's version,
//! its settings, the CPU); the bytes are an ordinary object, so reading them verifies their
//! digest, and a corrupt entry is quarantined and reported as absent: its caller compiles again
//! and never loads what it did not write. Entries are indexed apart from actions: they enter no
//! stage key and no artifact. `ladle gc` removes those no retained run has used (see
//! [`Store::gc`]).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Store;
use crate::digest::Digest;
use crate::error::{Error, Result};

#[derive(Serialize, Deserialize)]
pub(super) struct Entry {
    pub object: Digest,
    /// When a run last loaded or wrote it (Unix seconds).
    pub used_unix: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Store {
    /// The compiled code kept under `key`, if any and intact. A worker's view of the store (no
    /// index) keeps none.
    pub fn get_compiled(&self, key: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(ix) = &self.inner.index else { return Ok(None) };
        let Some(raw) = ix.compiled.get(key.0).map_err(|e| self.index_err(e))? else { return Ok(None) };
        let Ok(mut entry) = serde_json::from_slice::<Entry>(&raw) else { return Ok(None) };
        match self.get(&entry.object) {
            Ok(bytes) => {
                entry.used_unix = now();
                let _ = ix.compiled.insert(key.0, serde_json::to_vec(&entry).expect("json"));
                Ok(Some(bytes))
            }
            // Quarantined by `get` (corrupt) or gone: as if never kept.
            Err(Error::Corrupt { .. } | Error::MissingObject { .. }) => {
                ix.compiled.remove(key.0).map_err(|e| self.index_err(e))?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps `bytes` as the compiled code for `key`, replacing what was there; false where
    /// nothing can be kept (a worker's view of the store).
    pub fn put_compiled(&self, key: &Digest, bytes: &[u8]) -> Result<bool> {
        let Some(ix) = &self.inner.index else { return Ok(false) };
        let object = self.put(bytes)?;
        let entry = Entry { object, used_unix: now() };
        ix.compiled.insert(key.0, serde_json::to_vec(&entry).expect("json")).map_err(|e| self.index_err(e))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_code_reads_back_and_a_corrupt_entry_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = Digest::of(b"a component, compiled by an engine");
        assert_eq!(store.get_compiled(&key).unwrap(), None);
        let code = vec![7u8; 200_000];
        store.put_compiled(&key, &code).unwrap();
        assert_eq!(store.get_compiled(&key).unwrap().as_deref(), Some(&code[..]));
        // One byte of the object flipped on disk.
        let path = store.object_path(&Digest::of(&code)).unwrap().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1000] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(store.get_compiled(&key).unwrap(), None);
        assert!(!path.exists(), "quarantined");
        // Compiled again and kept again: readable.
        store.put_compiled(&key, &code).unwrap();
        assert_eq!(store.get_compiled(&key).unwrap().as_deref(), Some(&code[..]));
    }
}
