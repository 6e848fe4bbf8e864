//! Images into Qwen2-VL's patches, as POINTS' reference filter gets them: `qwen_vl_utils`
//! reads the pixels ([`RGB_CONVENTION`]: as stored, with no EXIF orientation, and RGBA over
//! white), fetches the image (smart_resize to multiples of 28 within its own pixel bounds, Pillow's
//! bicubic resize), then transformers' image processor resizes again to the checkpoint's
//! `min_pixels`/`max_pixels` (only when that changes the size), normalizes with CLIP's mean and
//! std, and lays the 14×14 patches out in merge-window order with the frame repeated to
//! `temporal_patch_size`.
//!
//! The processor's resize is torchvision's antialiased bicubic on uint8 by default, which is what
//! transformers runs when torchvision is installed (and what the fixtures were made with);
//! [`Resampler::Pillow`] gives what its PIL backend computes instead (they differ by one level on
//! a few pixels, which moves a perplexity by ~1e-5).

use std::borrow::Cow;
use std::path::Path;

use image::RgbImage;
use serde_json::Value;

use crate::llm::ModelError;
use crate::llm::config::read_json;
use crate::vision::resample::{Resampler, resize_rgb8, resize_rgb8_as};

/// How `qwen_vl_utils` reads an image's pixels: as stored (no EXIF orientation), RGBA over white.
pub const RGB_CONVENTION: crate::vision::images::RgbConvention = crate::vision::images::RgbConvention::QwenVlUtils;

/// `qwen_vl_utils`' bounds for fetching an image: 4 and 16384 merged tokens of 28×28 pixels.
pub const FETCH_MIN_PIXELS: usize = 4 * 28 * 28;
pub const FETCH_MAX_PIXELS: usize = 16384 * 28 * 28;
/// The most elongated image `smart_resize` takes (longer side over shorter).
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// The size (height, width) that `smart_resize` gives an image of `height` × `width`: both
/// multiples of `factor` (at least `factor`), the aspect ratio kept as well as that allows,
/// the area within `min_pixels ..= max_pixels`. Python's rounding (half to even) and float
/// order of operations, so boundary cases land where `qwen_vl_utils` lands them.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), String> {
    if height == 0 || width == 0 {
        return Err(format!("the image is empty ({width}×{height})"));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > MAX_ASPECT_RATIO {
        return Err(format!(
            "the image is {width}×{height}: its aspect ratio {ratio:.1} is past the {MAX_ASPECT_RATIO} that Qwen2-VL's smart_resize takes"
        ));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let round = |x: f64| factor.max((x / f).round_ties_even() as usize * factor);
    let (mut h_bar, mut w_bar) = (round(h), round(w));
    if h_bar * w_bar > max_pixels {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// Each patch's (row, column) in the patch grid, in the order the processor lays patches out
/// and the vision tower reads them: frame by frame, merge windows row-major, the `merge` ×
/// `merge` patches of a window row-major.
pub fn patch_order(grid_thw: [usize; 3], merge: usize) -> impl Iterator<Item = (usize, usize)> {
    let [t, gh, gw] = grid_thw;
    (0..t).flat_map(move |_| {
        (0..gh / merge).flat_map(move |bh| {
            (0..gw / merge).flat_map(move |bw| {
                (0..merge).flat_map(move |i| (0..merge).map(move |j| (bh * merge + i, bw * merge + j)))
            })
        })
    })
}

/// An image as the vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePatches {
    /// [width, height] after `qwen_vl_utils`' fetch.
    pub fetched: [usize; 2],
    /// [width, height] after the processor's resize.
    pub resized: [usize; 2],
    /// `image_grid_thw`: frames (after the temporal patching), patch rows, patch columns.
    pub grid_thw: [usize; 3],
    /// One row of `channels × temporal_patch_size × patch_size²` values per patch, rows in
    /// merge-window order.
    pub values: Vec<f32>,
    pub row_len: usize,
}

impl ImagePatches {
    pub fn rows(&self) -> usize {
        self.grid_thw.iter().product()
    }
}

/// `preprocessor_config.json`'s Qwen2VLImageProcessor.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Whose bicubic the processor's resize reproduces.
    pub resampler: Resampler,
}

impl ImageProcessor {
    pub fn load(dir: &Path) -> Result<ImageProcessor, ModelError> {
        let path = dir.join("preprocessor_config.json");
        let v = read_json(&path, "a Qwen2-VL folder needs its preprocessor_config.json")?;
        Self::from_json(&v).map_err(|message| ModelError::Config { path, message })
    }

    /// Reads `min_pixels`/`max_pixels` at the top level or, as transformers 5 writes them, as
    /// `size.shortest_edge`/`size.longest_edge`.
    pub fn from_json(v: &Value) -> Result<ImageProcessor, String> {
        let int = |key: &str, default: usize| -> Result<usize, String> {
            match &v[key] {
                Value::Null => Ok(default),
                x => x
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{key}` must be a positive integer, found {x}")),
            }
        };
        let pixels = |key: &str, edge: &str, default: usize| -> Result<usize, String> {
            match (&v[key], &v["size"][edge]) {
                (Value::Null, Value::Null) => Ok(default),
                (Value::Null, x) | (x, _) => x
                    .as_u64()
                    .filter(|n| *n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{key}` must be a positive integer, found {x}")),
            }
        };
        // Read as JSON's doubles, then rounded to f32 as torch.tensor(list) rounds them.
        let triple = |key: &str, default: [f64; 3]| -> Result<[f32; 3], String> {
            match &v[key] {
                Value::Null => Ok(default.map(|x| x as f32)),
                x => x
                    .as_array()
                    .filter(|a| a.len() == 3)
                    .and_then(|a| {
                        let f: Vec<f32> = a.iter().filter_map(Value::as_f64).map(|f| f as f32).collect();
                        f.try_into().ok()
                    })
                    .ok_or_else(|| format!("`{key}` must be three numbers, found {x}")),
            }
        };
        let p = ImageProcessor {
            min_pixels: pixels("min_pixels", "shortest_edge", 56 * 56)?,
            max_pixels: pixels("max_pixels", "longest_edge", 28 * 28 * 1280)?,
            patch_size: int("patch_size", 14)?,
            temporal_patch_size: int("temporal_patch_size", 2)?,
            merge_size: int("merge_size", 2)?,
            mean: triple("image_mean", [0.48145466, 0.4578275, 0.40821073])?,
            std: triple("image_std", [0.26862954, 0.26130258, 0.27577711])?,
            resampler: Resampler::Torchvision,
        };
        if p.min_pixels > p.max_pixels {
            return Err(format!("min_pixels ({}) is more than max_pixels ({})", p.min_pixels, p.max_pixels));
        }
        Ok(p)
    }

    /// Pixels per side of a merged token.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// The image as `qwen_vl_utils.fetch_image` returns it, with its default bounds (borrowed
    /// when that leaves its size as it is).
    pub fn fetch<'a>(&self, image: &'a RgbImage) -> Result<Cow<'a, RgbImage>, String> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (nh, nw) = smart_resize(h, w, self.factor(), FETCH_MIN_PIXELS, FETCH_MAX_PIXELS)?;
        if (nw, nh) == (w, h) {
            return Ok(Cow::Borrowed(image));
        }
        let px = resize_rgb8(image.as_raw(), w, h, nw, nh);
        Ok(Cow::Owned(RgbImage::from_raw(nw as u32, nh as u32, px).expect("the resize fills nw × nh × 3 bytes")))
    }

    /// Fetches `image` and makes its patches.
    pub fn patches(&self, image: &RgbImage) -> Result<ImagePatches, String> {
        let fetched = self.fetch(image)?;
        self.patches_of_fetched(&fetched)
    }

    /// The patches of an image already fetched.
    pub fn patches_of_fetched(&self, fetched: &RgbImage) -> Result<ImagePatches, String> {
        let (w, h) = (fetched.width() as usize, fetched.height() as usize);
        let (nh, nw) = smart_resize(h, w, self.factor(), self.min_pixels, self.max_pixels)?;
        let resized: Cow<'_, [u8]> = if (nw, nh) == (w, h) {
            Cow::Borrowed(fetched.as_raw())
        } else {
            Cow::Owned(resize_rgb8_as(fetched.as_raw(), w, h, nw, nh, self.resampler))
        };
        // (v − 255·mean) / (255·std), each factor formed in f32 as torch forms it.
        let scale: Vec<(f32, f32)> = (0..3).map(|c| (self.mean[c] * 255.0, self.std[c] * 255.0)).collect();
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (nh / p, nw / p);
        let row_len = 3 * tp * p * p;
        let mut values = Vec::with_capacity(gh * gw * row_len);
        for (row, col) in patch_order([1, gh, gw], m) {
            let (y0, x0) = (row * p, col * p);
            for (c, &(mean, std)) in scale.iter().enumerate() {
                for _frame in 0..tp {
                    for y in y0..y0 + p {
                        for x in x0..x0 + p {
                            values.push((resized[(y * nw + x) * 3 + c] as f32 - mean) / std);
                        }
                    }
                }
            }
        }
        Ok(ImagePatches { fetched: [w, h], resized: [nw, nh], grid_thw: [1, gh, gw], values, row_len })
    }

    /// How many `<|image_pad|>` tokens an image of these patches takes: one per merged token.
    pub fn n_image_tokens(&self, patches: &ImagePatches) -> usize {
        patches.rows() / (self.merge_size * self.merge_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_by_hand() {
        // Rounds to multiples of 28, half to even: 98 / 28 = 3.5 → 4 (even), 42 / 28 = 1.5 → 2.
        assert_eq!(smart_resize(98, 42, 28, 0, 1 << 30).unwrap(), (112, 56));
        assert_eq!(smart_resize(70, 126, 28, 0, 1 << 30).unwrap(), (56, 112)); // 2.5 → 2, 4.5 → 4
        // Never below one factor.
        assert_eq!(smart_resize(10, 1500, 28, 0, 1 << 30).unwrap(), (28, 1512));
        // Too many pixels: scaled by β = sqrt(h·w / max), floored to the factor.
        // 1000×1000 into 100,000: β = sqrt(10), 1000/β/28 = 11.29 → 11 · 28 = 308.
        assert_eq!(smart_resize(1000, 1000, 28, 0, 100_000).unwrap(), (308, 308));
        // Too few: 30×30 up to 3136: β = sqrt(3136/900) = 1.8667, 30·β/28 = 2 → ceil 2 → 56.
        assert_eq!(smart_resize(30, 30, 28, 3136, 1 << 30).unwrap(), (56, 56));
        // The fixtures' record r001 (320×240) at the processor's bounds.
        assert_eq!(smart_resize(252, 308, 28, 3136, 12544).unwrap(), (84, 112));
        assert!(smart_resize(1, 201, 28, 0, 1 << 30).unwrap_err().contains("aspect ratio 201.0"));
        assert!(smart_resize(1, 200, 28, 0, 1 << 30).is_ok());
        assert!(smart_resize(0, 5, 28, 0, 1 << 30).is_err());
    }

    #[test]
    fn patches_are_laid_out_in_merge_windows_with_the_frame_repeated() {
        // A 56×28 (w×h) image whose pixel values say where they are.
        let (w, h) = (56u32, 28u32);
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 4) as u8, (y * 8) as u8, 7]));
        let p = ImageProcessor {
            min_pixels: 1,
            max_pixels: 1 << 20,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            ..ImageProcessor::from_json(&Value::Null).unwrap()
        };
        let out = p.patches_of_fetched(&img).unwrap();
        assert_eq!((out.grid_thw, out.row_len, out.rows()), ([1, 2, 4], 1176, 8));
        let at = |row: usize, c: usize, frame: usize, y: usize, x: usize| {
            out.values[row * 1176 + ((c * 2 + frame) * 14 + y) * 14 + x]
        };
        // Rows: merge window (0,0) holds patches (0,0) (0,1) (1,0) (1,1); then window (0,1).
        // Row 5 is window 1's second patch: patch row 0, patch column 3 → x from 42.
        assert_eq!(at(5, 0, 0, 0, 0), (42 * 4) as f32);
        assert_eq!(at(5, 0, 1, 0, 0), (42 * 4) as f32, "the frame repeats");
        assert_eq!(at(2, 1, 0, 3, 0), ((14 + 3) * 8) as f32, "row 2 is patch (1, 0): y from 14");
        assert_eq!(at(7, 2, 1, 13, 13), 7.0);
        assert_eq!(p.n_image_tokens(&out), 2);
    }
}
