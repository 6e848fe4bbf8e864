//! The vision side: image preprocessing and POINTS' CATTY tiling (more to come: CLIP towers,
//! LLaVA-format VLMs, image-conditioned perplexity).

pub mod catty;
pub mod clip;
pub mod images;
pub mod llava;
pub mod preprocess;
pub mod resample;
