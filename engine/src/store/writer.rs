//! Objects written a piece at a time.
//!
//! A map stage's output shard is streamed into an [`ObjectWriter`] rather than built whole in
//! memory: a shard's output is as large as its stage makes it (a plugin's replacements are not
//! bounded by its input), and `-j` shards are in flight at once. The writer keeps the first
//! [`SPILL_AT`] bytes in memory (most shards, which then go to the index or an object file as
//! [`Store::put`] would put them) and moves to a file under the store's `tmp/` past that,
//! hashing as it goes, so committing a large object is one fsync and one rename.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use super::Store;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Bytes held in memory before a writer moves to a temporary file.
pub const SPILL_AT: usize = 8 << 20;

/// An object being written; [`ObjectWriter::commit`] stores it. Dropped uncommitted, it leaves
/// nothing behind.
pub struct ObjectWriter {
    store: Store,
    hasher: blake3::Hasher,
    len: u64,
    buffer: Vec<u8>,
    spilled: Option<(BufWriter<File>, PathBuf)>,
}

impl ObjectWriter {
    pub(super) fn new(store: Store) -> ObjectWriter {
        ObjectWriter { store, hasher: blake3::Hasher::new(), len: 0, buffer: Vec::new(), spilled: None }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes` to the object.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        if let Some((file, path)) = &mut self.spilled {
            return file.write_all(bytes).map_err(|e| Error::io(format!("cannot write {}", path.display()), e));
        }
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() > SPILL_AT {
            let path = self.store.temp_path("object");
            let spill = || -> std::io::Result<BufWriter<File>> {
                let mut file = BufWriter::with_capacity(1 << 20, File::create(&path)?);
                file.write_all(&self.buffer)?;
                Ok(file)
            };
            let file = spill().map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
            self.buffer = Vec::new();
            self.spilled = Some((file, path));
        }
        Ok(())
    }

    /// Stores the object (idempotently, as [`Store::put`]): its digest and size.
    pub fn commit(mut self) -> Result<(Digest, u64)> {
        let len = self.len;
        let digest = Digest(*self.hasher.finalize().as_bytes());
        let Some((file, path)) = self.spilled.take() else {
            return Ok((self.store.put_digested(&self.buffer, digest)?, len));
        };
        let finish = || -> std::io::Result<()> {
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        };
        let result = finish().map_err(|e| Error::io(format!("cannot write {}", path.display()), e)).and_then(|()| {
            match self.store.has_object(&digest)? {
                true => Ok(()),
                false => self.store.adopt_file(&path, &digest, len),
            }
        });
        let _ = fs::remove_file(&path);
        result.map(|()| (digest, len))
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.append(bytes).map_err(std::io::Error::other)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some((_, path)) = self.spilled.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_streamed_object_is_the_object_put_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for size in [0, 100, SPILL_AT, SPILL_AT + 1, 3 * SPILL_AT + 12345] {
            let bytes = pattern(size);
            let mut w = store.writer();
            for piece in bytes.chunks(1 << 19) {
                w.append(piece).unwrap();
            }
            assert_eq!(w.len(), size as u64);
            let (digest, len) = w.commit().unwrap();
            assert_eq!((digest, len), (Digest::of(&bytes), size as u64), "size {size}");
            assert_eq!(store.get(&digest).unwrap(), bytes, "size {size}");
        }
        // Committed or dropped, a writer leaves nothing under tmp/.
        let mut dropped = store.writer();
        dropped.append(&pattern(SPILL_AT + 1)).unwrap();
        drop(dropped);
        let mut again = store.writer();
        again.append(&pattern(3 * SPILL_AT + 12345)).unwrap();
        again.commit().unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
