//! Bicubic resampling exactly as Pillow's `Image.resize(size, BICUBIC)` does it (libImaging
//! Resample.c), so pixel values match what CLIPImageProcessor's PIL backend produces bit for bit.
//!
//! Pillow precomputes, per output pixel, the weights of the input pixels within the filter's
//! support (widened by the scale when downsampling: that is its antialiasing), normalizes them,
//! turns them into 22-bit fixed point, and resizes in two passes — horizontal, then vertical —
//! rounding to 8 bits in between. fast_image_resize's Catmull-Rom, though the same kernel,
//! differs from it by up to 12 levels on the fixture images, hence this module.

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position: the first input index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    (k * (1u64 << PRECISION_BITS) as f64 + if k < 0.0 { -0.5 } else { 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes an RGB8 image (row-major, 3 bytes per pixel) to `nw` × `nh`.
pub fn resize_rgb8(src: &[u8], w: usize, h: usize, nw: usize, nh: usize) -> Vec<u8> {
    let horizontal = if nw != w {
        let coeffs = coefficients(w, nw);
        let mut out = vec![0u8; nw * h * 3];
        for y in 0..h {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kk) in k.iter().enumerate() {
                        ss += row[(xmin + i) * 3 + c] as i64 * kk as i64;
                    }
                    out[(y * nw + x) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if nh == h {
        return horizontal;
    }
    let coeffs = coefficients(h, nh);
    let mut out = vec![0u8; nw * nh * 3];
    for (y, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..nw {
            for c in 0..3 {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &kk) in k.iter().enumerate() {
                    ss += horizontal[((ymin + i) * nw + x) * 3 + c] as i64 * kk as i64;
                }
                out[(y * nw + x) * 3 + c] = clip8(ss);
            }
        }
    }
    out
}
