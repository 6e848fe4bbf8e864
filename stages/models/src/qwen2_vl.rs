//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL
//! (`Qwen2_5_VLForConditionalGeneration`): the VLMs POINTS scores its pre-training data with.
//!
//! Exact against transformers (`tests/fixtures/points-tiny/expected_qwen2vl.json`):
//! - [`config`]: both config layouts (the hub's flat one, transformers 5's `text_config` +
//!   `vision_config`), the M-RoPE sections checked against the head size;
//! - [`processor`]: images as `qwen_vl_utils` fetches them and the image processor turns them
//!   into patches (`smart_resize`, the two bicubic resizes, normalization, merge-window order);
//! - [`rope`]: M-RoPE's three position axes for a sequence with images, and their rotary tables;
//! - [`vision`]: the vision tower (2-D rotary, Qwen2.5-VL's windows, the patch merger);
//! - [`encoder`]: the vision tower alone (the `encode` stage's image tokens);
//! - [`model`]: a checkpoint loaded, and POINTS' perplexity score of a caption given an image
//!   (the language model is ladle's Qwen2 decoder, given M-RoPE's tables).

pub mod config;
pub mod encoder;
pub mod model;
pub mod processor;
pub mod rope;
pub mod vision;

pub use config::{Family, Qwen2VlConfig, VisionConfig};
pub use encoder::{EncodedImage, Qwen2VlEncoder};
pub use model::{PreparedImageRecord, Qwen2Vl, ScoreTimes};
pub use processor::{ImagePatches, ImageProcessor, smart_resize};
pub use rope::{MropePositions, mrope_positions, mrope_tables};
pub use vision::VisionTower;
