//! What the model stages that read images (`perplexity`, `generate`) share: the `image`,
//! `on_bad_image`, `min_pixels` and `max_pixels` parameters, and which VLM a model folder holds.
//!
//! `min_pixels`/`max_pixels` bound the image processor of a Qwen2-VL or Qwen2.5-VL model, as
//! `AutoProcessor.from_pretrained(..., min_pixels=, max_pixels=)` does (default: the checkpoint's
//! `preprocessor_config.json`): the image is first fetched as `qwen_vl_utils` fetches it (its own
//! bounds), then resized into these. They change every number, so they enter the stage's key. A
//! LLaVA-format or CLIP model crops to a fixed size: the parameters are refused for it. (`encode`
//! reads them too, with [`PixelBounds::configure`].)

use std::path::Path;

use ladle_engine::StageError;
use ladle_engine::error::PipelineError;
use ladle_engine::pipeline::params::Params;
use ladle_models::qwen2_vl::ImageProcessor;

use crate::image_source::ImageField;

/// The image side of a model stage's parameters.
#[derive(Debug, Clone)]
pub struct ImageParams {
    pub field: ImageField,
    /// `on_bad_image = "drop"`: a record whose image cannot be used is dropped and counted.
    pub drop_bad: bool,
    pub pixels: PixelBounds,
}

/// `min_pixels` / `max_pixels` where the pipeline sets them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PixelBounds {
    pub min: Option<usize>,
    pub max: Option<usize>,
}

impl ImageParams {
    /// Reads `image` (a field or template naming each record's image), `on_bad_image`,
    /// `min_pixels` and `max_pixels`; `None` when the stage reads no images (the other three are
    /// then errors).
    pub fn configure(params: &mut Params<'_>) -> Result<Option<ImageParams>, PipelineError> {
        let field = match params.string("image")? {
            Some(src) => Some(ImageField::parse(&src).map_err(|e| params.error("image", e))?),
            None => None,
        };
        let drop = params.choice("on_bad_image", &["fail", "drop"])?;
        let pixels = PixelBounds::configure(params)?;
        let Some(field) = field else {
            for (name, given) in [
                ("on_bad_image", drop.is_some()),
                ("min_pixels", pixels.min.is_some()),
                ("max_pixels", pixels.max.is_some()),
            ] {
                if given {
                    return Err(params.error(name, format!("`{name}` needs `image`: this stage reads no images")));
                }
            }
            return Ok(None);
        };
        let drop_bad = drop.as_deref() == Some("drop");
        params.record("on_bad_image", if drop_bad { "drop" } else { "fail" }.into());
        Ok(Some(ImageParams { field, drop_bad, pixels }))
    }
}

impl PixelBounds {
    /// Reads `min_pixels` and `max_pixels`.
    pub fn configure(params: &mut Params<'_>) -> Result<PixelBounds, PipelineError> {
        let pixels = PixelBounds {
            min: params.positive("min_pixels")?.map(|n| n as usize),
            max: params.positive("max_pixels")?.map(|n| n as usize),
        };
        if let (Some(min), Some(max)) = (pixels.min, pixels.max)
            && min > max
        {
            return Err(params.error("min_pixels", format!("`min_pixels` ({min}) is more than `max_pixels` ({max})")));
        }
        Ok(pixels)
    }

    pub fn is_set(&self) -> bool {
        self.min.is_some() || self.max.is_some()
    }

    /// Sets a Qwen2-VL image processor's bounds; an error when they cross the checkpoint's
    /// other bound.
    pub fn apply(&self, processor: &mut ImageProcessor, dir: &Path) -> Result<(), StageError> {
        let min = self.min.unwrap_or(processor.min_pixels);
        let max = self.max.unwrap_or(processor.max_pixels);
        if min > max {
            return Err(StageError::input(format!(
                "min_pixels {min} is more than max_pixels {max} (one of them from {})",
                dir.join("preprocessor_config.json").display()
            ))
            .with_hint("set both `min_pixels` and `max_pixels`"));
        }
        processor.min_pixels = min;
        processor.max_pixels = max;
        Ok(())
    }

    /// The error for a model these bounds do not apply to (LLaVA-format or CLIP), if they are set.
    pub fn refuse_for(&self, dir: &Path) -> Result<(), StageError> {
        if !self.is_set() {
            return Ok(());
        }
        Err(StageError::input(format!(
            "{}: `min_pixels`/`max_pixels` bound a Qwen2-VL or Qwen2.5-VL image processor; this model is not one, and crops every image to its fixed size",
            dir.display()
        ))
        .with_hint("drop `min_pixels` and `max_pixels`"))
    }
}
