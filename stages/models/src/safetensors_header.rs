//! safetensors headers for files written tensor by tensor: the soup's output shards and the
//! `encode` stage's exports stream their data after a header made here, instead of holding the
//! whole file in memory as `safetensors::serialize` would.

/// One tensor of a safetensors file written by streaming its data after the header.
pub struct StreamedTensor<'a> {
    pub name: &'a str,
    /// safetensors' spelling: `F32`, `BF16`, `I64`, ...
    pub dtype: &'a str,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// What precedes the data of a safetensors file whose tensors are then written one after the
/// other in `tensors` order: the header's length and the header (offsets from the sizes, padded
/// to 8 bytes, `metadata` as `__metadata__`). For writers that cannot hold the data in memory.
pub fn streamed_header(
    tensors: &[StreamedTensor<'_>],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        header.insert(
            t.name.to_string(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes] }),
        );
        offset += t.bytes;
    }
    header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    let mut json = serde_json::to_vec(&header).expect("a header serializes");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}
