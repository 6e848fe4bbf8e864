//! The vision side: reading images from records, CLIP preprocessing and towers, LLaVA-format
//! VLMs, and POINTS' CATTY tiling.

pub mod catty;
pub mod clip;
pub mod encoder;
pub mod images;
pub mod llava;
pub mod preprocess;
pub mod resample;
pub mod source;
