//! A Qwen2-VL or Qwen2.5-VL vision tower on its own: images → merged image tokens in the
//! language model's width, what the `<|image_pad|>` places of a prompt take. Loads only the
//! tower's weights (`visual.*`, or `model.visual.*` in transformers 5's layout).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::config::Qwen2VlConfig;
use super::processor::{ImagePatches, ImageProcessor};
use super::vision::VisionTower;
use crate::llm::{ModelError, weights};

pub struct Qwen2VlEncoder {
    pub config: Qwen2VlConfig,
    pub tower: VisionTower,
    pub processor: ImageProcessor,
}

/// One image's merged tokens.
pub struct EncodedImage {
    /// [tokens, out_hidden_size] in f32, row-major over the merged grid.
    pub tokens: Tensor,
    /// The merged grid: frames, rows, columns.
    pub grid: [usize; 3],
}

impl Qwen2VlEncoder {
    pub fn load_on(dir: &Path, device: &Device, dtype: DType) -> Result<Qwen2VlEncoder, ModelError> {
        let config = Qwen2VlConfig::load(dir)?;
        let processor = ImageProcessor::load(dir)?;
        let vb = weights::load(dir, device, dtype)?;
        let prefix = if vb.contains_tensor("model.visual.patch_embed.proj.weight") { "model.visual" } else { "visual" };
        let tower =
            VisionTower::new(&config.vision, config.family, vb.pp(prefix)).map_err(|e| weights::explain(dir, e))?;
        device.synchronize()?;
        Ok(Qwen2VlEncoder { config, tower, processor })
    }

    /// Width of a merged token.
    pub fn width(&self) -> usize {
        self.config.vision.out_hidden_size
    }

    /// An image's patches as the processor makes them (image errors come out here).
    pub fn patches(&self, image: &RgbImage) -> Result<ImagePatches, ModelError> {
        self.processor.patches(image).map_err(ModelError::Image)
    }

    /// The merged tokens of several images, in one tower pass.
    pub fn encode(&self, images: &[&ImagePatches]) -> Result<Vec<EncodedImage>, ModelError> {
        let m = self.processor.merge_size;
        let out = self.tower.forward_many(images)?;
        images
            .iter()
            .zip(out)
            .map(|(p, tokens)| {
                let [t, h, w] = p.grid_thw;
                Ok(EncodedImage { tokens: tokens.to_dtype(DType::F32)?, grid: [t, h / m, w / m] })
            })
            .collect()
    }
}
