//! CLIP image preprocessing exactly as `preprocessor_config.json` (CLIPImageProcessor) says:
//! RGB, resize so the shortest edge is `size.shortest_edge` (bicubic with antialiasing, exactly
//! as Pillow does it: see [`super::resample`]), center crop, rescale, normalize. Output: [3, height, width] f32, channels first.
//!
//! Sizes follow transformers: the long side becomes ⌊size · long / short⌋; the crop starts at
//! ⌊(H - h) / 2⌋, ⌊(W - w) / 2⌋.

use serde_json::Value;

/// The most elongated image preprocessing accepts, long side : short side.
pub const MAX_ASPECT: u64 = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessor {
    pub shortest_edge: u32,
    pub crop: [u32; 2],
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub do_center_crop: bool,
    pub do_normalize: bool,
}

impl ClipPreprocessor {
    /// From `dir/preprocessor_config.json`.
    pub fn load(dir: &std::path::Path) -> Result<ClipPreprocessor, crate::llm::ModelError> {
        let path = dir.join("preprocessor_config.json");
        let json: Value =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).ok_or_else(|| {
                crate::llm::ModelError::Config {
                    path: path.clone(),
                    message: "missing or invalid preprocessor_config.json (the image preprocessing)".into(),
                }
            })?;
        ClipPreprocessor::from_json(&json).map_err(|message| crate::llm::ModelError::Config { path, message })
    }

    /// From a `preprocessor_config.json` value; only CLIPImageProcessor's bicubic is supported.
    pub fn from_json(v: &Value) -> Result<ClipPreprocessor, String> {
        let kind = v["image_processor_type"].as_str().unwrap_or("CLIPImageProcessor");
        if !kind.starts_with("CLIPImageProcessor") {
            return Err(format!("image_processor_type `{kind}` is not supported (CLIPImageProcessor is)"));
        }
        if let Some(r) = v["resample"].as_u64()
            && r != 3
        {
            return Err(format!("resample {r} is not supported (3, bicubic, is)"));
        }
        let shortest_edge = v["size"]["shortest_edge"].as_u64().ok_or("missing `size.shortest_edge`")? as u32;
        let crop = [
            v["crop_size"]["width"].as_u64().unwrap_or(shortest_edge as u64) as u32,
            v["crop_size"]["height"].as_u64().unwrap_or(shortest_edge as u64) as u32,
        ];
        let three = |key: &str, default: [f32; 3]| -> Result<[f32; 3], String> {
            match &v[key] {
                Value::Null => Ok(default),
                Value::Array(a) if a.len() == 3 => Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32)),
                _ => Err(format!("`{key}` must be three numbers")),
            }
        };
        Ok(ClipPreprocessor {
            shortest_edge,
            crop,
            rescale: v["rescale_factor"].as_f64().unwrap_or(1.0 / 255.0) as f32,
            mean: three("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73])?,
            std: three("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1])?,
            do_center_crop: v["do_center_crop"].as_bool().unwrap_or(true),
            do_normalize: v["do_normalize"].as_bool().unwrap_or(true),
        })
    }

    /// Pixel values [3, crop height, crop width] of an RGB image.
    pub fn pixels(&self, image: &image::RgbImage) -> Result<Vec<f32>, String> {
        let (w, h) = image.dimensions();
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = self.shortest_edge as u64 * long as u64 / short as u64;
        // transformers would resize a 1×10000 image to 336×3360000 (3.4 GB) and crop 336×336 of
        // it; such an image is not a photograph with a caption, and is refused.
        if new_long > MAX_ASPECT * self.shortest_edge as u64 {
            return Err(format!(
                "{w}×{h} is too elongated to use (aspect ratio over {MAX_ASPECT}:1): resizing its short side to {} would make it {new_long} pixels long",
                self.shortest_edge
            ));
        }
        let new_long = new_long as u32;
        let (nw, nh) = if w <= h { (self.shortest_edge, new_long) } else { (new_long, self.shortest_edge) };
        let resized = super::resample::resize_rgb8(image.as_raw(), w as usize, h as usize, nw as usize, nh as usize);
        let [cw, ch] = if self.do_center_crop { self.crop } else { [nw, nh] };
        if cw > nw || ch > nh {
            return Err(format!("the resized image ({nw}×{nh}) is smaller than the crop ({cw}×{ch})"));
        }
        let (left, top) = ((nw - cw) / 2, (nh - ch) / 2);
        let buf = &resized;
        let mut out = vec![0f32; 3 * (cw * ch) as usize];
        for y in 0..ch {
            for x in 0..cw {
                let p = (((top + y) * nw + left + x) * 3) as usize;
                for c in 0..3 {
                    let v = buf[p + c] as f32 * self.rescale;
                    out[c * (cw * ch) as usize + (y * cw + x) as usize] =
                        if self.do_normalize { (v - self.mean[c]) / self.std[c] } else { v };
                }
            }
        }
        Ok(out)
    }
}
