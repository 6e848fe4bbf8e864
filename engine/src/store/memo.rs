//! The stat memo: external files are re-hashed only when their size, mtime, ctime or inode change.
//!
//! This is what makes a rerun with nothing changed take milliseconds instead of re-reading every
//! input (git's index does the same). A file modified without any of these changing — which takes
//! deliberate effort — is not noticed; `ladle run --force STAGE` rehashes nothing but recomputes.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Store, hash_file};
use crate::artifact::FileRef;
use crate::digest::Digest;
use crate::error::{Error, Result};

#[derive(Serialize, Deserialize, PartialEq)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    device: u64,
}

#[derive(Serialize, Deserialize)]
struct Memo {
    stat: Stat,
    digest: Digest,
}

fn stat_of(meta: &fs::Metadata) -> Stat {
    Stat {
        size: meta.len(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        inode: meta.ino(),
        device: meta.dev(),
    }
}

impl Store {
    /// The digest of an external file, from the memo when the file is unchanged.
    pub fn file_digest(&self, path: &Path) -> Result<Digest> {
        let meta = fs::metadata(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let stat = stat_of(&meta);
        if self.is_objects_only() {
            // A worker has no memo (it lives in the index): it hashes.
            return Ok(hash_file(path)?.0);
        }
        let key = path.to_string_lossy().as_bytes().to_vec();
        if let Some(v) = self.ix()?.memo.get(&key).map_err(|e| self.index_err(e))?
            && let Ok(memo) = serde_json::from_slice::<Memo>(&v)
            && memo.stat == stat
        {
            return Ok(memo.digest);
        }
        let (digest, _) = hash_file(path)?;
        // Re-stat: a file that changed while it was hashed is not memoized.
        let after = fs::metadata(path).map(|m| stat_of(&m)).ok();
        if after.as_ref() == Some(&stat) {
            let json = serde_json::to_vec(&Memo { stat, digest }).map_err(|e| Error::Internal(e.to_string()))?;
            self.ix()?.memo.insert(key, json).map_err(|e| self.index_err(e))?;
        }
        Ok(digest)
    }

    /// The files of an external folder, sorted, with digests (hidden entries are skipped).
    pub fn folder_files(&self, root: &Path) -> Result<Vec<FileRef>> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            let entries = fs::read_dir(&dir).map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                let meta = fs::metadata(&path).map_err(|e| Error::io(format!("cannot stat {}", path.display()), e))?;
                if meta.is_dir() {
                    todo.push(path);
                } else {
                    let rel = path.strip_prefix(root).unwrap_or(&path);
                    let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                    out.push(FileRef { path: rel, digest: self.file_digest(&path)?, size: meta.len() });
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// One digest for a whole external folder (its sorted file list).
    pub fn folder_digest(&self, root: &Path) -> Result<Digest> {
        let files = self.folder_files(root)?;
        let json = serde_json::to_vec(&files).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Digest::of(&json))
    }
}
