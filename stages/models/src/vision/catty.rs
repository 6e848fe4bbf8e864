//! CATTY, POINTS' "Consistent Aspect Ratio Dynamic High Resolution": how an image is cut into
//! tiles of `size` × `size` (plus a global thumbnail), as WePOINTS' reference implementation
//! computes it (checked against `tests/fixtures/catty.json`).
//!
//! 1. An aspect ratio beyond `max_splits`:1 is clamped to it (the longer side is shortened).
//! 2. Candidate grids are all (columns, rows) with columns · rows ≤ `max_splits`. For a wide image
//!    (ratio > 1) only grids at least as wide are kept, for a tall one only grids at least as tall.
//! 3. The grid ratio closest to the image's wins; among grids of that ratio, the one whose tile
//!    count is closest to (w / size) · (h / size).
//! 4. The image is resized so its shorter side spans the grid exactly, keeping its aspect ratio
//!    (the longer side rounded down), and tiles are cut at even steps, overlapping if needed.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tiling {
    /// The size after clamping the aspect ratio, [width, height].
    pub clamped: [u32; 2],
    /// [columns, rows]
    pub slices: [u32; 2],
    /// [width, height] of the resized image the tiles are cut from.
    pub resized: [u32; 2],
    /// Crop boxes [x0, y0, x1, y1], row-major.
    pub tiles: Vec<[u32; 4]>,
    /// A global thumbnail (the resized image scaled to size × size) follows the tiles.
    pub thumbnail: bool,
}

/// The tiling of a `width` × `height` image. Both must be positive, `size` and `max_splits` too.
pub fn tiling(width: u32, height: u32, size: u32, max_splits: u32) -> Tiling {
    let (mut w, mut h) = (width.max(1) as u64, height.max(1) as u64);
    let m = max_splits.max(1) as u64;
    if w > h * m {
        w = h * m;
    } else if h > w * m {
        h = w * m;
    }
    let ratio = w as f64 / h as f64;
    let mut grids: Vec<(u64, u64)> = Vec::new();
    for c in 1..=m {
        for r in 1..=m / c {
            let g = c as f64 / r as f64;
            let fits = if ratio > 1.0 {
                g >= ratio
            } else if ratio < 1.0 {
                g <= ratio
            } else {
                true
            };
            if fits {
                grids.push((c, r));
            }
        }
    }
    if grids.is_empty() {
        grids.push(if ratio > 1.0 { (m, 1) } else { (1, m) });
    }
    let distance = |&(c, r): &(u64, u64)| (c as f64 / r as f64 - ratio).abs();
    let best = grids.iter().map(distance).fold(f64::INFINITY, f64::min);
    let wanted = (w as f64 / size as f64) * (h as f64 / size as f64);
    let (c, r) = grids
        .iter()
        .filter(|g| distance(g) == best)
        .min_by(|a, b| ((a.0 * a.1) as f64 - wanted).abs().total_cmp(&((b.0 * b.1) as f64 - wanted).abs()))
        .copied()
        .expect("at least one grid");
    let s = size as u64;
    let (rw, rh) = if w < h {
        let rw = c * s;
        (rw, (h as f64 / w as f64 * rw as f64) as u64)
    } else {
        let rh = r * s;
        ((w as f64 / h as f64 * rh as f64) as u64, rh)
    };
    let step = |total: u64, n: u64| if n > 1 { (total - s) / (n - 1) } else { 0 };
    let (sx, sy) = (step(rw, c), step(rh, r));
    let mut tiles = Vec::new();
    for row in 0..r {
        for col in 0..c {
            let (x, y) = (col * sx, row * sy);
            tiles.push([x as u32, y as u32, (x + s) as u32, (y + s) as u32]);
        }
    }
    Tiling {
        clamped: [w as u32, h as u32],
        slices: [c as u32, r as u32],
        resized: [rw as u32, rh as u32],
        tiles,
        thumbnail: true,
    }
}

/// The views CATTY makes of an image: its tiles in row-major order, then the global thumbnail,
/// each `size` × `size`. As the reference does: a clamped aspect ratio is a resize to the clamped
/// size first, then the resize to `resized`, the crops, and the thumbnail (the resized image
/// scaled to `size` × `size`). Resizing is Pillow's bicubic ([`super::resample`]).
pub fn views(image: &image::RgbImage, size: u32, max_splits: u32) -> Vec<image::RgbImage> {
    let (w, h) = image.dimensions();
    let t = tiling(w, h, size, max_splits);
    let resize = |img: &image::RgbImage, [nw, nh]: [u32; 2]| -> image::RgbImage {
        let (w, h) = img.dimensions();
        let px = super::resample::resize_rgb8(img.as_raw(), w as usize, h as usize, nw as usize, nh as usize);
        image::RgbImage::from_raw(nw, nh, px).expect("resize returns nw × nh pixels")
    };
    let clamped = if t.clamped == [w, h] { image.clone() } else { resize(image, t.clamped) };
    let resized = resize(&clamped, t.resized);
    let mut out: Vec<image::RgbImage> = t
        .tiles
        .iter()
        .map(|&[x0, y0, x1, y1]| image::imageops::crop_imm(&resized, x0, y0, x1 - x0, y1 - y0).to_image())
        .collect();
    if t.thumbnail {
        out.push(resize(&resized, [size, size]));
    }
    out
}

#[cfg(test)]
mod view_tests {
    #[test]
    fn views_are_the_tiles_then_the_thumbnail_cut_from_the_resized_image() {
        // 3:1, max 8 splits, tiles of 4: a 3×1 grid of a 12×4 resize, and a thumbnail.
        let img = image::RgbImage::from_fn(30, 10, |x, y| image::Rgb([x as u8 * 8, y as u8 * 20, 7]));
        let views = super::views(&img, 4, 8);
        let t = super::tiling(30, 10, 4, 8);
        assert_eq!(t.slices, [3, 1]);
        assert_eq!(views.len(), 4);
        assert!(views.iter().all(|v| v.dimensions() == (4, 4)));
        let resized = super::super::resample::resize_rgb8(img.as_raw(), 30, 10, 12, 4);
        // The second tile starts 4 pixels in.
        assert_eq!(views[1].get_pixel(0, 0).0, resized[4 * 3..4 * 3 + 3]);
    }
}
