//! What the model stages that read images (`perplexity`, `generate`) share: the `image`,
//! `on_bad_image`, `min_pixels` and `max_pixels` parameters, which VLM a model folder holds
//! ([`load`]), and what a stage asks of either family ([`Vlm`]).
//!
//! `min_pixels`/`max_pixels` bound the image processor of a Qwen2-VL or Qwen2.5-VL model, as
//! `AutoProcessor.from_pretrained(..., min_pixels=, max_pixels=)` does (default: the checkpoint's
//! `preprocessor_config.json`): the image is first fetched as `qwen_vl_utils` fetches it (its own
//! bounds), then resized into these. They change every number, so they enter the stage's key. A
//! LLaVA-format or CLIP model crops to a fixed size: the parameters are refused for it. (`encode`
//! reads them too, with [`PixelBounds::configure`].)

use std::path::Path;

use candle_core::{DType, Device};
use image::RgbImage;
use ladle_engine::StageError;
use ladle_engine::error::PipelineError;
use ladle_engine::pipeline::params::Params;
use ladle_models::llm::generate::{Rng, Sampling};
use ladle_models::llm::{LanguageModel, ModelError, Score};
use ladle_models::qwen2_vl::{ImageProcessor, PreparedImageRecord, Qwen2Vl};
use ladle_models::vision::images::RgbConvention;
use ladle_models::vision::llava::{Llava, PreparedRecord};

use crate::image_source::ImageField;
use crate::model_error;

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

/// What the image stages need of a VLM, one implementation per family: records prepared one at
/// a time (image errors come out there), scored together; prompts prepared, then written after.
pub trait Vlm: Send + Sync + 'static {
    type Prepared: Send;
    /// How the family's reference reads an image's pixels.
    const RGB: RgbConvention;
    fn language_model(&self) -> &LanguageModel;
    /// `text` (and the end of turn) as the answer to the image and `prompt`, cut to `max_tokens`.
    fn prepare_scored(
        &self,
        image: &RgbImage,
        prompt: &str,
        text: &str,
        max_tokens: usize,
    ) -> Result<Self::Prepared, ModelError>;
    fn truncated(prepared: &Self::Prepared) -> bool;
    /// Scores in `items`' order, batched by length under `batch_tokens`.
    fn score_all(&self, items: &[&Self::Prepared], batch_tokens: usize) -> Result<Vec<Score>, ModelError>;
    /// The image and `prompt` up to the assistant's turn, and the position the first new token
    /// takes (Qwen2-VL's text positions jump past an image's block).
    fn prepare_prompt(&self, image: &RgbImage, prompt: &str) -> Result<(Self::Prepared, usize), ModelError>;
    /// New tokens after each prompt, all written together; `max_new` and `rngs` per prompt.
    fn generate(
        &self,
        prompts: &[&Self::Prepared],
        max_new: &[usize],
        stop: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError>;
}

impl Vlm for Llava {
    type Prepared = PreparedRecord;
    const RGB: RgbConvention = RgbConvention::Displayed;
    fn language_model(&self) -> &LanguageModel {
        &self.lm
    }
    fn prepare_scored(
        &self,
        image: &RgbImage,
        prompt: &str,
        text: &str,
        max_tokens: usize,
    ) -> Result<PreparedRecord, ModelError> {
        self.prepare(image, prompt, text, max_tokens)
    }
    fn truncated(prepared: &PreparedRecord) -> bool {
        prepared.truncated
    }
    fn score_all(&self, items: &[&PreparedRecord], batch_tokens: usize) -> Result<Vec<Score>, ModelError> {
        Llava::score_all(self, items, batch_tokens)
    }
    fn prepare_prompt(&self, image: &RgbImage, prompt: &str) -> Result<(PreparedRecord, usize), ModelError> {
        let p = Llava::prepare_prompt(self, image, prompt)?;
        let n = p.seq.ids.len();
        Ok((p, n))
    }
    fn generate(
        &self,
        prompts: &[&PreparedRecord],
        max_new: &[usize],
        stop: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        Llava::generate(self, prompts, max_new, stop, sampling, rngs)
    }
}

impl Vlm for Qwen2Vl {
    type Prepared = PreparedImageRecord;
    const RGB: RgbConvention = ladle_models::qwen2_vl::processor::RGB_CONVENTION;
    fn language_model(&self) -> &LanguageModel {
        &self.lm
    }
    fn prepare_scored(
        &self,
        image: &RgbImage,
        prompt: &str,
        text: &str,
        max_tokens: usize,
    ) -> Result<PreparedImageRecord, ModelError> {
        self.prepare_within(image, prompt, text, max_tokens)
    }
    fn truncated(prepared: &PreparedImageRecord) -> bool {
        prepared.truncated
    }
    fn score_all(&self, items: &[&PreparedImageRecord], batch_tokens: usize) -> Result<Vec<Score>, ModelError> {
        Qwen2Vl::score_all(self, items, batch_tokens)
    }
    fn prepare_prompt(&self, image: &RgbImage, prompt: &str) -> Result<(PreparedImageRecord, usize), ModelError> {
        let p = Qwen2Vl::prepare_prompt(self, image, prompt)?;
        let n = (p.seq.ids.len() as i64 + p.positions.rope_delta).max(0) as usize;
        Ok((p, n))
    }
    fn generate(
        &self,
        prompts: &[&PreparedImageRecord],
        max_new: &[usize],
        stop: &[u32],
        sampling: &Sampling,
        rngs: &mut [Rng],
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        Qwen2Vl::generate(self, prompts, max_new, stop, sampling, rngs)
    }
}

/// A model folder's VLM, loaded (boxed: the two differ in size, and a stage moves one once).
pub enum LoadedVlm {
    Llava(Box<Llava>),
    Qwen2Vl(Box<Qwen2Vl>),
}

/// Loads the VLM in `dir` (Qwen2-VL/Qwen2.5-VL by its config, else LLaVA-format) with the
/// stage's pixel bounds; a folder that is neither says so, with `without_images` (what the
/// stage can do without `image`) as the hint.
pub fn load(
    dir: &Path,
    device: &Device,
    dtype: DType,
    pixels: &PixelBounds,
    without_images: &str,
) -> Result<LoadedVlm, StageError> {
    if Qwen2Vl::is_one(dir) {
        let mut vlm = Qwen2Vl::load_on(dir, device, dtype).map_err(model_error)?;
        pixels.apply(&mut vlm.processor, dir)?;
        return Ok(LoadedVlm::Qwen2Vl(Box::new(vlm)));
    }
    pixels.refuse_for(dir)?;
    let vlm = Llava::load_on(dir, device, dtype).map_err(|e| {
        model_error(e)
            .with_hint(format!("`image` needs a VLM (LLaVA-format, Qwen2-VL or Qwen2.5-VL); {without_images}"))
    })?;
    Ok(LoadedVlm::Llava(Box::new(vlm)))
}
