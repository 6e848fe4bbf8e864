//! Stage cache keys: one struct lists everything that enters a key (Turborepo's habit).
//!
//! The key is BLAKE3 over the canonical JSON of [`KeyParts`]: the stage kind, its implementation
//! version, its canonical parameters, the digests of its input artifacts and the digests of the
//! files it references (data files, models, scripts, plugins). Nothing incidental enters: not the
//! store's path, not `-j`, not the absolute location of the pipeline file.
//!
//! A map stage's shards are keyed by the *map key* — the same parts without the mapped dataset's
//! digest — and the input shard's digest, so appending records recomputes only new shards.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::{ArtifactDigest, Digest, ShardKey, StageKey, hash_with_context};

/// Everything that determines a stage's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    pub kind: String,
    pub version: u32,
    /// Parameters in canonical form (map keys sorted; paths replaced by file digests below).
    pub params: serde_json::Value,
    /// Input port → digests of the artifacts connected to it, in order.
    pub inputs: BTreeMap<String, Vec<ArtifactDigest>>,
    /// Referenced file label (as the stage names it) → digest of its content.
    pub files: BTreeMap<String, Digest>,
    /// For stages that read files their records name (images): the digest of those files'
    /// digests, shard by shard (see [`crate::record_files`]). Not part of the map key: each
    /// shard's own salt is part of its shard key instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_files: Option<Digest>,
}

impl KeyParts {
    pub fn stage_key(&self) -> StageKey {
        let json = serde_json::to_vec(self).expect("key parts always serialize");
        StageKey(hash_with_context("ladle stage key v1", &[&json]))
    }

    /// The key without the digest of `mapped_port`: shared by all shards of a map stage.
    pub fn map_key(&self, mapped_port: &str) -> StageKey {
        let mut without = self.clone();
        without.inputs.remove(mapped_port);
        without.record_files = None;
        let json = serde_json::to_vec(&without).expect("key parts always serialize");
        StageKey(hash_with_context("ladle map key v1", &[&json]))
    }

    /// Says, in words, which parts differ from `old` (for `ladle plan`).
    pub fn explain_change(&self, old: &KeyParts) -> Vec<String> {
        let mut why = Vec::new();
        if self.kind != old.kind {
            why.push(format!("kind changed ({} → {})", old.kind, self.kind));
        }
        if self.version != old.version {
            why.push(format!("implementation version changed ({} → {})", old.version, self.version));
        }
        if let (Some(new), Some(old)) = (self.params.as_object(), old.params.as_object()) {
            let names: std::collections::BTreeSet<&String> = new.keys().chain(old.keys()).collect();
            for name in names {
                match (old.get(name), new.get(name)) {
                    (Some(a), Some(b)) if a != b => why.push(format!("parameter `{name}` changed ({a} → {b})")),
                    (None, Some(b)) => why.push(format!("parameter `{name}` added ({b})")),
                    (Some(a), None) => why.push(format!("parameter `{name}` removed (was {a})")),
                    _ => {}
                }
            }
        } else if self.params != old.params {
            why.push("parameters changed".to_string());
        }
        let ports: std::collections::BTreeSet<&String> = self.inputs.keys().chain(old.inputs.keys()).collect();
        for port in ports {
            if self.inputs.get(port) != old.inputs.get(port) {
                why.push(format!("input `{port}` changed"));
            }
        }
        let files: std::collections::BTreeSet<&String> = self.files.keys().chain(old.files.keys()).collect();
        for file in files {
            match (old.files.get(file), self.files.get(file)) {
                (Some(a), Some(b)) if a != b => why.push(format!("file `{file}` changed")),
                (None, Some(_)) => why.push(format!("file `{file}` added")),
                (Some(_), None) => why.push(format!("file `{file}` no longer referenced")),
                _ => {}
            }
        }
        match (old.record_files, self.record_files) {
            (Some(a), Some(b)) if a != b => why.push("files named by its input records (images) changed".to_string()),
            (None, Some(_)) => why.push("now reads files named by its input records (images)".to_string()),
            _ => {}
        }
        why
    }
}

pub fn shard_key(map_key: &StageKey, input_shard: &Digest) -> ShardKey {
    ShardKey(hash_with_context("ladle shard key v1", &[&map_key.0, &input_shard.0]))
}

/// [`shard_key`], with the digest of the files the shard's records name when the stage reads them.
pub fn salted_shard_key(map_key: &StageKey, input_shard: &Digest, record_files: Option<&Digest>) -> ShardKey {
    match record_files {
        None => shard_key(map_key, input_shard),
        Some(salt) => ShardKey(hash_with_context("ladle shard key v1", &[&map_key.0, &input_shard.0, &salt.0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> KeyParts {
        let mut inputs = BTreeMap::new();
        inputs.insert("data".to_string(), vec![ArtifactDigest([1; 32])]);
        inputs.insert("model".to_string(), vec![ArtifactDigest([2; 32])]);
        KeyParts {
            kind: "perplexity".into(),
            version: 1,
            params: serde_json::json!({"column": "ppl", "text": "{caption}"}),
            inputs,
            files: BTreeMap::new(),
            record_files: None,
        }
    }

    #[test]
    fn record_files_change_the_stage_key_but_not_the_map_key() {
        let a = parts();
        let mut b = parts();
        b.record_files = Some(Digest([7; 32]));
        assert_ne!(a.stage_key(), b.stage_key());
        assert_eq!(a.map_key("data"), b.map_key("data"));
        assert_eq!(b.explain_change(&a), ["now reads files named by its input records (images)"]);
        let salt = Digest([3; 32]);
        let shard = Digest([4; 32]);
        let map_key = a.map_key("data");
        assert_eq!(salted_shard_key(&map_key, &shard, None), shard_key(&map_key, &shard));
        assert_ne!(salted_shard_key(&map_key, &shard, Some(&salt)), shard_key(&map_key, &shard));
    }

    #[test]
    fn map_key_ignores_only_the_mapped_dataset() {
        let a = parts();
        let mut b = parts();
        b.inputs.insert("data".into(), vec![ArtifactDigest([9; 32])]);
        assert_ne!(a.stage_key(), b.stage_key());
        assert_eq!(a.map_key("data"), b.map_key("data"));
        let mut c = parts();
        c.inputs.insert("model".into(), vec![ArtifactDigest([9; 32])]);
        assert_ne!(a.map_key("data"), c.map_key("data"));
    }

    #[test]
    fn explains_what_changed() {
        let a = parts();
        let mut b = parts();
        b.params = serde_json::json!({"column": "score", "text": "{caption}"});
        b.files.insert("path".into(), Digest::of(b"x"));
        let why = b.explain_change(&a);
        assert_eq!(why, vec!["parameter `column` changed (\"ppl\" → \"score\")", "file `path` added"]);
    }
}
