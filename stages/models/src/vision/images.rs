//! Reading images: decoding to RGB as a reference reads them ([`RgbConvention`]: as displayed, or
//! as `qwen_vl_utils` reads them), sizes from headers, and errors that say what is wrong with
//! which file.
//!
//! JPEGs go through mozjpeg (libjpeg-turbo's decoder) with libjpeg's defaults, as Pillow decodes
//! them, so pixels match transformers' to the level. libjpeg fills a truncated JPEG with gray
//! and only warns; Pillow refuses it ("image file is truncated"), and so do we: a caption scored
//! against half an image is a wrong number, not a result. Images over Pillow's decompression-bomb
//! limit are refused before their pixels are allocated.

use std::path::Path;

use image::ImageDecoder;

/// Pillow's `Image.MAX_IMAGE_PIXELS` × 2: where Pillow raises DecompressionBombError.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot read the image: {message}")]
    Unreadable { path: String, message: String },
}

impl ImageError {
    fn new(name: &str, message: impl Into<String>) -> ImageError {
        ImageError::Unreadable { path: name.to_string(), message: message.into() }
    }
}

/// The displayed size [width, height] of the image at `path`, read from its header: an EXIF
/// orientation that rotates by 90° swaps the two.
pub fn displayed_size(path: &Path) -> Result<[u32; 2], ImageError> {
    let name = path.display().to_string();
    let reader = image::ImageReader::open(path)
        .map_err(|e| ImageError::new(&name, e.to_string()))?
        .with_guessed_format()
        .map_err(|e| ImageError::new(&name, e.to_string()))?;
    if reader.format().is_none() {
        return Err(ImageError::new(&name, "not a PNG, JPEG or WebP file"));
    }
    let mut decoder = reader.into_decoder().map_err(|e| ImageError::new(&name, e.to_string()))?;
    let (w, h) = decoder.dimensions();
    check_size(&name, w, h)?;
    let rotated = matches!(
        decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms),
        image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH
    );
    Ok(if rotated { [h, w] } else { [w, h] })
}

/// How stored pixels become the RGB a model sees: each reference ladle matches reads images its
/// own way, and the same file can differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RgbConvention {
    /// The image as displayed: EXIF orientation applied; alpha dropped, as Pillow's
    /// `convert("RGB")` drops it (CLIP, LLaVA).
    #[default]
    Displayed,
    /// As `qwen_vl_utils.fetch_image` reads it for Qwen2-VL: the pixels as stored (`Image.open`
    /// applies no EXIF orientation); an RGBA image (Pillow's mode `RGBA`: a PNG of colour type 6,
    /// a WebP with alpha) composited over white as Pillow's `paste` with the alpha as mask does
    /// it; any other image through `convert("RGB")` (grey + alpha and palette transparency
    /// dropped).
    QwenVlUtils,
}

/// Decodes the image file at `path` to RGB with its EXIF orientation applied.
pub fn load_rgb(path: &Path) -> Result<image::RgbImage, ImageError> {
    load_rgb_as(path, RgbConvention::Displayed)
}

/// Decodes the image file at `path` to RGB as `convention` says.
pub fn load_rgb_as(path: &Path, convention: RgbConvention) -> Result<image::RgbImage, ImageError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| ImageError::new(&name, e.to_string()))?;
    decode_rgb_as(&bytes, &name, convention)
}

/// Decodes an encoded image (PNG, JPEG, WebP) to RGB with its EXIF orientation applied; `name`
/// (a path, or a record's field) is what errors name.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<image::RgbImage, ImageError> {
    decode_rgb_as(bytes, name, RgbConvention::Displayed)
}

/// Decodes an encoded image (PNG, JPEG, WebP) to RGB as `convention` says; `name` (a path, or a
/// record's field) is what errors name.
pub fn decode_rgb_as(bytes: &[u8], name: &str, convention: RgbConvention) -> Result<image::RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::new(name, "the file is empty (0 bytes)"));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::new(name, e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(ImageError::new(name, "not a PNG, JPEG or WebP file"));
    };
    let mut decoder = reader.into_decoder().map_err(|e| ImageError::new(name, e.to_string()))?;
    let (w, h) = decoder.dimensions();
    check_size(name, w, h)?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    // Pillow's mode RGBA: PNG colour type 6 (byte 25, in IHDR), or a WebP with alpha.
    let pillow_rgba = match format {
        image::ImageFormat::Png => bytes.get(25) == Some(&6),
        image::ImageFormat::WebP => decoder.color_type().has_alpha(),
        _ => false,
    };
    let mut img = if format == image::ImageFormat::Jpeg {
        let (w, h, rgb) = decode_jpeg(bytes).map_err(|e| ImageError::new(name, format!("not a readable JPEG: {e}")))?;
        image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| ImageError::new(name, "truncated JPEG pixels"))?,
        )
    } else {
        image::DynamicImage::from_decoder(decoder).map_err(|e| ImageError::new(name, e.to_string()))?
    };
    match convention {
        RgbConvention::Displayed => {
            img.apply_orientation(orientation);
            Ok(img.to_rgb8())
        }
        RgbConvention::QwenVlUtils if pillow_rgba => Ok(over_white(&img.to_rgba8())),
        RgbConvention::QwenVlUtils => Ok(img.to_rgb8()),
    }
}

/// An RGBA image pasted over white with its alpha as the mask, as Pillow's `paste` blends:
/// out = (255·(255 − a) + c·a) / 255, the division rounded as Pillow's `DIV255` rounds it.
fn over_white(rgba: &image::RgbaImage) -> image::RgbImage {
    let div255 = |v: u32| {
        let t = v + 128;
        ((t >> 8) + t) >> 8
    };
    image::RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = a as u32;
        let blend = |c: u8| div255(255 * (255 - a) + c as u32 * a) as u8;
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

fn check_size(name: &str, w: u32, h: u32) -> Result<(), ImageError> {
    if w == 0 || h == 0 {
        return Err(ImageError::new(name, format!("it has no pixels ({w}×{h})")));
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(ImageError::new(
            name,
            format!("{w}×{h} is over {MAX_PIXELS} pixels, Pillow's decompression-bomb limit; downscale it first"),
        ));
    }
    Ok(())
}

/// libjpeg's defaults, as Pillow uses them: the slow integer IDCT and fancy upsampling. A
/// "premature end of JPEG file" warning is an error (see the module docs).
fn decode_jpeg(bytes: &[u8]) -> std::io::Result<(u32, u32, Vec<u8>)> {
    use mozjpeg_sys as ffi;

    /// Carried by the unwind out of libjpeg, caught below.
    struct JpegFailure(String);

    fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
        // SAFETY: libjpeg calls its handlers with a live cinfo whose `err` is our manager;
        // format_message writes at most JMSG_LENGTH_MAX (200) bytes.
        unsafe {
            let mut buf = [0u8; 200];
            if let Some(format) = (*cinfo.err).format_message {
                format(cinfo, &*(buf.as_mut_ptr() as *const [u8; 80]));
            }
            let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
            String::from_utf8_lossy(&buf[..end]).into_owned()
        }
    }
    extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
        std::panic::resume_unwind(Box::new(JpegFailure(message(cinfo))));
    }
    extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: std::os::raw::c_int) {
        // SAFETY: as in `message`.
        let code = unsafe { (*cinfo.err).msg_code };
        if level < 0 && code == ffi::JWRN_JPEG_EOF as std::os::raw::c_int {
            std::panic::resume_unwind(Box::new(JpegFailure("the file is truncated".into())));
        }
    }

    // SAFETY: jpeg_std_error initializes every field of a zeroed manager.
    let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    let decode = || -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut d = mozjpeg::Decompress::builder().with_err(err).from_mem(bytes)?;
        d.dct_method(mozjpeg::DctMethod::IntegerSlow);
        d.do_fancy_upsampling(true);
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let rgb = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok((w, h, rgb))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(r) => r,
        Err(payload) => Err(std::io::Error::other(match payload.downcast::<JpegFailure>() {
            Ok(f) => f.0,
            Err(p) => p.downcast::<String>().map(|s| *s).unwrap_or_else(|_| "the decoder failed".into()),
        })),
    }
}

#[cfg(test)]
mod convention_tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pixels").join(name)
    }

    /// What Pillow wrote (tests/fixtures/generator/pixel_conventions.py): an RGB PNG.
    fn pillow(name: &str) -> image::RgbImage {
        image::open(fixture(name)).unwrap().to_rgb8()
    }

    #[test]
    fn images_read_as_qwen_vl_utils_reads_them() {
        for (src, want) in [
            ("rgba.png", "rgba_qwen_vl_utils.png"),
            ("la.png", "la_qwen_vl_utils.png"),
            ("palette_trns.png", "palette_trns_qwen_vl_utils.png"),
            ("exif_rotated.jpg", "exif_rotated_qwen_vl_utils.png"),
        ] {
            let got = load_rgb_as(&fixture(src), RgbConvention::QwenVlUtils).unwrap();
            let want = pillow(want);
            assert_eq!(got.dimensions(), want.dimensions(), "{src}");
            assert!(got == want, "{src}: pixels differ from qwen_vl_utils'");
        }
    }

    #[test]
    fn displayed_images_drop_alpha_and_follow_exif() {
        assert!(load_rgb(&fixture("rgba.png")).unwrap() == pillow("rgba_pillow_rgb.png"));
        // Orientation 6: the stored 40×24 is shown 24×40, the left band (blue) on top.
        let shown = load_rgb(&fixture("exif_rotated.jpg")).unwrap();
        assert_eq!(shown.dimensions(), (24, 40));
        assert_eq!(displayed_size(&fixture("exif_rotated.jpg")).unwrap(), [24, 40]);
        let top = shown.get_pixel(12, 2).0;
        assert!(top[2] > 150 && top[0] < 80, "{top:?}");
    }
}
