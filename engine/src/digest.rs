//! Typed digests: content digests of bytes, artifact digests, stage keys and shard keys.
//!
//! All are BLAKE3, but they mean different things, so they are different types: a stage key can
//! never be passed where an object digest is wanted (Buck2's habit). They print and serialize as
//! lowercase hex.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn to_hex(&self) -> String {
                let mut s = String::with_capacity(64);
                for b in self.0 {
                    s.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
                    s.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
                }
                s
            }

            pub fn from_hex(hex: &str) -> Option<Self> {
                if hex.len() != 64 || !hex.is_ascii() {
                    return None;
                }
                let mut out = [0u8; 32];
                for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
                    let s = std::str::from_utf8(chunk).ok()?;
                    out[i] = u8::from_str_radix(s, 16).ok()?;
                }
                Some($name(out))
            }

            /// The first 12 hex digits, for messages.
            pub fn short(&self) -> String {
                self.to_hex()[..12].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
            }
        }
    };
}

digest_type!(
    /// The BLAKE3 digest of a byte string: a stored object, a shard, an external file.
    Digest
);
digest_type!(
    /// The digest of an artifact's canonical manifest (a dataset's is over its ordered shards).
    ArtifactDigest
);
digest_type!(
    /// A stage's cache key: everything that determines its output, hashed.
    StageKey
);
digest_type!(
    /// The cache key of one shard of a map stage: (map key, input shard digest).
    ShardKey
);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }
}

/// Hashes `parts` with a domain-separating `context`, so equal bytes hashed for different
/// purposes never collide.
pub(crate) fn hash_with_context(context: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(context);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_matches_blake3() {
        let d = Digest::of(b"abc");
        // BLAKE3("abc") from the reference implementation's test vectors.
        assert_eq!(d.to_hex(), "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }

    #[test]
    fn contexts_separate_equal_bytes() {
        assert_ne!(hash_with_context("a", &[b"x"]), hash_with_context("b", &[b"x"]));
        // Length prefixes keep part boundaries: ("ab","c") differs from ("a","bc").
        assert_ne!(hash_with_context("a", &[b"ab", b"c"]), hash_with_context("a", &[b"a", b"bc"]));
    }
}
