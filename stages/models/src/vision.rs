//! The vision side: decoding images, CLIP preprocessing and towers, LLaVA-format VLMs, and
//! POINTS' CATTY tiling. (Finding a record's image is `ladle-stages`' `image_source`.)

pub mod catty;
pub mod clip;
pub mod encoder;
pub mod images;
pub mod llava;
pub mod preprocess;
pub mod resample;
