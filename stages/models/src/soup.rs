//! Model soups\' arithmetic: [`checkpoint`] memory-maps an ingredient's safetensors files,
//! [`average`] streams their weighted mean into a new checkpoint. Choosing the ingredients (the
//! greedy search, the metric) is the `soup` stage's, in `ladle-stages`.

pub mod average;
pub mod checkpoint;
