//! Reading images: sizes (with EXIF orientation applied), and errors that say what is wrong.

use std::path::Path;

use image::ImageDecoder;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot read the image: {message}")]
    Unreadable { path: String, message: String },
}

/// The displayed size [width, height] of the image at `path`, read from its header: an EXIF
/// orientation that rotates by 90° swaps the two.
pub fn displayed_size(path: &Path) -> Result<[u32; 2], ImageError> {
    let err = |message: String| ImageError::Unreadable { path: path.display().to_string(), message };
    let reader = image::ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(err("not a PNG, JPEG or WebP file".into()));
    }
    let mut decoder = reader.into_decoder().map_err(|e| err(e.to_string()))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(err(format!("it has no pixels ({w}×{h})")));
    }
    let rotated = matches!(
        decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms),
        image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH
    );
    Ok(if rotated { [h, w] } else { [w, h] })
}
