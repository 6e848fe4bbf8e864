//! `ladle verify` and `ladle gc`.

use std::collections::HashSet;
use std::fs;

use serde::Serialize;

use super::{FILE_TAG, Store};
use crate::artifact::Artifact;
use crate::digest::{ArtifactDigest, Digest};
use crate::error::Result;

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects: u64,
    pub bytes: u64,
    /// Digests whose content no longer matched; now in `quarantine/`.
    pub corrupt: Vec<String>,
    /// Digests indexed but whose file was gone; now forgotten.
    pub missing: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub runs_kept: usize,
    pub artifacts_removed: u64,
    pub objects_removed: u64,
    /// Compiled plugins no retained run used.
    pub compiled_removed: u64,
    pub bytes_freed: u64,
}

fn raw32(v: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(v).ok()
}

impl Store {
    /// Re-hashes every object. Corrupt ones are quarantined and forgotten, so no run serves them.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for item in self.ix()?.objects.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            let Some(raw) = raw32(&k) else { continue };
            let d = Digest(raw);
            report.objects += 1;
            let ok = if v.first() == Some(&FILE_TAG) {
                let path = self.object_file(&d);
                if !path.exists() {
                    self.ix()?.objects.remove(k).map_err(|e| self.index_err(e))?;
                    report.missing.push(d.to_hex());
                    continue;
                }
                let (actual, size) = super::hash_file(&path)?;
                report.bytes += size;
                actual == d
            } else {
                report.bytes += v.len() as u64 - 1;
                Digest::of(&v[1..]) == d
            };
            if !ok {
                self.quarantine(&d)?;
                report.corrupt.push(d.to_hex());
            }
        }
        self.flush()?;
        Ok(report)
    }

    /// Removes everything that neither the latest output of each stage nor the `keep_runs` most
    /// recent runs reference.
    pub fn gc(&self, keep_runs: usize) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut roots: HashSet<ArtifactDigest> = HashSet::new();
        for item in self.ix()?.last.iter() {
            let (_, v) = item.map_err(|e| self.index_err(e))?;
            if let Ok(last) = serde_json::from_slice::<super::LastRun>(&v) {
                roots.insert(last.artifact);
            }
        }
        let runs = self.runs()?;
        report.runs_kept = runs.len().min(keep_runs);
        for run in runs.iter().rev().take(keep_runs) {
            for s in &run.stages {
                if let Some(d) = s.artifact.as_deref().and_then(ArtifactDigest::from_hex) {
                    roots.insert(d);
                }
            }
        }
        for run in runs.iter().rev().skip(keep_runs) {
            self.ix()?.runs.remove(run.id.to_be_bytes()).map_err(|e| self.index_err(e))?;
        }

        let mut live: HashSet<Digest> = HashSet::new();
        for item in self.ix()?.artifacts.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            let Some(raw) = raw32(&k) else { continue };
            if roots.contains(&ArtifactDigest(raw)) {
                if let Ok(a) = serde_json::from_slice::<Artifact>(&v) {
                    live.extend(a.objects());
                }
            } else {
                self.ix()?.artifacts.remove(k).map_err(|e| self.index_err(e))?;
                report.artifacts_removed += 1;
            }
        }
        for item in self.ix()?.actions.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            match raw32(&v) {
                Some(raw) if roots.contains(&ArtifactDigest(raw)) => {
                    if let Some(log) = self.ix()?.logs.get(&k).map_err(|e| self.index_err(e))?.and_then(|l| raw32(&l)) {
                        live.insert(Digest(log));
                    }
                }
                _ => {
                    self.ix()?.actions.remove(&k).map_err(|e| self.index_err(e))?;
                    self.ix()?.logs.remove(&k).map_err(|e| self.index_err(e))?;
                }
            }
        }
        // Compiled plugins go with the runs that used them: kept while a retained run started
        // before their last use.
        let oldest_kept = runs.iter().rev().take(keep_runs).map(|r| r.started_unix).min();
        for item in self.ix()?.compiled.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            match serde_json::from_slice::<super::compiled::Entry>(&v) {
                Ok(e) if oldest_kept.is_some_and(|t| e.used_unix >= t) => {
                    live.insert(e.object);
                }
                _ => {
                    self.ix()?.compiled.remove(k).map_err(|e| self.index_err(e))?;
                    report.compiled_removed += 1;
                }
            }
        }
        for item in self.ix()?.shards.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            let keep = serde_json::from_slice::<super::ShardEntry>(&v).is_ok_and(|e| live.contains(&e.shard.digest));
            if !keep {
                self.ix()?.shards.remove(k).map_err(|e| self.index_err(e))?;
            }
        }
        for item in self.ix()?.objects.iter() {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            let Some(raw) = raw32(&k) else { continue };
            let d = Digest(raw);
            if live.contains(&d) {
                continue;
            }
            if v.first() == Some(&FILE_TAG) {
                let path = self.object_file(&d);
                report.bytes_freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let _ = fs::remove_file(&path);
            } else {
                report.bytes_freed += v.len() as u64 - 1;
            }
            self.ix()?.objects.remove(k).map_err(|e| self.index_err(e))?;
            report.objects_removed += 1;
        }
        // Orphan files (renamed into place, never indexed), quarantine, leftovers.
        if let Ok(dirs) = fs::read_dir(self.inner.root.join("objects")) {
            for dir in dirs.flatten() {
                for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                    let hex = format!("{}{}", dir.file_name().to_string_lossy(), f.file_name().to_string_lossy());
                    let indexed = Digest::from_hex(&hex).is_some_and(|d| live.contains(&d));
                    if !indexed {
                        report.bytes_freed += f.metadata().map(|m| m.len()).unwrap_or(0);
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
        // Temporary folders of cluster workers that were killed: a day old means no worker uses them.
        for dir in fs::read_dir(self.inner.root.join("workers")).into_iter().flatten().flatten() {
            let old = dir.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if old.is_some_and(|age| age > std::time::Duration::from_secs(24 * 3600)) {
                let _ = fs::remove_dir_all(dir.path());
            }
        }
        for dir in ["quarantine", "work", "tmp"] {
            let _ = fs::remove_dir_all(self.inner.root.join(dir));
            let _ = fs::create_dir_all(self.inner.root.join(dir));
        }
        self.flush()?;
        Ok(report)
    }
}
