//! Artifacts: what flows along the edges of a pipeline.
//!
//! An artifact is described by a manifest; its digest is BLAKE3 over the manifest's canonical JSON
//! (serde_json with sorted map keys and fixed field order). A dataset's manifest is its ordered list
//! of shard digests, so two datasets with the same records in the same shards have the same digest
//! however they were made: that is what makes early cutoff work.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::{ArtifactDigest, Digest, hash_with_context};

/// One shard of a dataset: canonical JSONL bytes stored under `digest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRef {
    pub digest: Digest,
    pub records: u64,
    pub bytes: u64,
}

/// One file of a folder artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Path inside the folder, `/`-separated.
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

/// An output of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Artifact {
    /// Records, as ordered shards of canonical JSONL. `root` is the folder that relative file
    /// paths in the records (images) resolve against: the data file's folder for a dataset that
    /// `read` made, carried along by the stages that pass records through. It is written
    /// relative to the pipeline file's folder when inside it, so moving a project keeps its
    /// digests; it is part of the digest when set, so a cached output never points elsewhere.
    Dataset {
        shards: Vec<ShardRef>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<PathBuf>,
    },
    /// Numbers computed per record (image embeddings), as ordered shards of safetensors files, one
    /// per shard of the dataset they were computed from; `records` of a shard counts its rows.
    /// Kept as tensors, not JSON floats: a 576×1024 embedding is 2.3 MB as f32 and several
    /// times that as text.
    Tensors { shards: Vec<ShardRef> },
    /// A folder of files. `model` when it holds a `config.json` (a Hugging Face model folder).
    /// `external` names where the files live when they were not copied into the store (a `model`
    /// stage's folder); otherwise the files are store objects. `metrics`: the numbers the stage
    /// that made it reported (an `exec` stage's `metrics = "metrics.json"`: a fine-tune and its
    /// evaluation), read downstream by `choose`.
    Folder {
        model: bool,
        external: Option<PathBuf>,
        files: Vec<FileRef>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metrics: Option<serde_json::Value>,
    },
    /// A file written outside the store (by `write`).
    File { path: PathBuf, digest: Digest, size: u64, records: u64 },
    /// A small JSON value.
    Metrics { value: serde_json::Value },
    /// Artifacts a `choose` stage kept out of its candidates, in the candidates' order. A port
    /// fed by it receives the artifacts themselves (see [`Artifact::members`]), so a soup, a
    /// concat or a trainer takes the chosen set as if each were connected by name.
    Chosen { items: Vec<Artifact> },
}

impl Artifact {
    /// A dataset of `shards` whose records name no files (or only absolute paths).
    pub fn dataset(shards: Vec<ShardRef>) -> Artifact {
        Artifact::Dataset { shards, root: None }
    }

    /// The digest of the manifest. Where an external folder lives is not part of it: the same
    /// model files are the same model wherever they are.
    pub fn digest(&self) -> ArtifactDigest {
        let json = match self {
            Artifact::Folder { model, external: Some(_), files, metrics } => serde_json::to_vec(&Artifact::Folder {
                model: *model,
                external: None,
                files: files.clone(),
                metrics: metrics.clone(),
            }),
            other => serde_json::to_vec(other),
        }
        .expect("artifact manifests always serialize");
        ArtifactDigest(hash_with_context("ladle artifact manifest v1", &[&json]))
    }

    /// A dataset's root as stored (see [`Artifact::Dataset`]): what stages that pass records
    /// through give their output.
    pub fn root(&self) -> Option<PathBuf> {
        match self {
            Artifact::Dataset { root, .. } => root.clone(),
            _ => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Artifact::Dataset { .. } => "dataset",
            Artifact::Tensors { .. } => "tensors",
            Artifact::Folder { model: true, .. } => "model",
            Artifact::Folder { .. } => "folder",
            Artifact::File { .. } => "file",
            Artifact::Metrics { .. } => "metrics",
            Artifact::Chosen { .. } => "chosen set",
        }
    }

    /// What a port fed by this artifact receives: a [chosen set](Artifact::Chosen)'s items, or
    /// the artifact itself.
    pub fn members(&self) -> Vec<Artifact> {
        match self {
            Artifact::Chosen { items } => items.clone(),
            other => vec![other.clone()],
        }
    }

    /// The numbers a stage reported with this artifact: a metrics artifact's value, or the
    /// metrics a folder was made with.
    pub fn metrics(&self) -> Option<&serde_json::Value> {
        match self {
            Artifact::Metrics { value } => Some(value),
            Artifact::Folder { metrics, .. } => metrics.as_ref(),
            _ => None,
        }
    }

    /// Store objects this artifact needs to be served.
    pub fn objects(&self) -> Vec<Digest> {
        match self {
            Artifact::Dataset { shards, .. } | Artifact::Tensors { shards } => {
                shards.iter().map(|s| s.digest).collect()
            }
            Artifact::Folder { external: None, files, .. } => files.iter().map(|f| f.digest).collect(),
            Artifact::Chosen { items } => items.iter().flat_map(Artifact::objects).collect(),
            _ => Vec::new(),
        }
    }

    pub fn records(&self) -> Option<u64> {
        match self {
            Artifact::Dataset { shards, .. } | Artifact::Tensors { shards } => {
                Some(shards.iter().map(|s| s.records).sum())
            }
            Artifact::File { records, .. } => Some(*records),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(b: &[u8], n: u64) -> ShardRef {
        ShardRef { digest: Digest::of(b), records: n, bytes: b.len() as u64 }
    }

    #[test]
    fn dataset_digest_depends_on_shards_and_their_order() {
        let a = Artifact::dataset(vec![shard(b"1", 1), shard(b"2", 1)]);
        let b = Artifact::dataset(vec![shard(b"2", 1), shard(b"1", 1)]);
        let a2 = Artifact::dataset(vec![shard(b"1", 1), shard(b"2", 1)]);
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), a2.digest());
        assert_eq!(a.records(), Some(2));
    }

    #[test]
    fn a_dataset_root_is_part_of_the_digest_only_when_set() {
        let shards = vec![shard(b"1", 1)];
        let plain = Artifact::dataset(shards.clone());
        let here = Artifact::Dataset { shards: shards.clone(), root: Some("/data/a".into()) };
        let there = Artifact::Dataset { shards, root: Some("/data/b".into()) };
        assert_ne!(plain.digest(), here.digest());
        assert_ne!(here.digest(), there.digest());
        // Manifests written before roots existed keep their digests.
        let old = serde_json::to_string(&plain).unwrap();
        assert!(!old.contains("root"), "{old}");
    }

    #[test]
    fn metric_values_read_back_to_the_same_bits() {
        // Values whose shortest form needs 17 digits; serde_json's default parser was one unit
        // in the last place off for the first (a soup score), so a cached score differed from a
        // freshly computed one.
        for v in [38.676144612088244_f64, 0.1 + 0.2, 1.0 / 3.0, 2f64.powi(-1074), f64::MAX] {
            let a = Artifact::Metrics { value: serde_json::json!({ "score": v }) };
            let back: Artifact = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
            let Artifact::Metrics { value } = back else { panic!("not metrics") };
            assert_eq!(value["score"].as_f64().map(f64::to_bits), Some(v.to_bits()), "{v:e}");
        }
    }
}
