//! M-RoPE's positions: three axes (temporal, row, column) per token.
//!
//! A text token at running position p gets (p, p, p), then p += 1. An image of merged grid
//! t × mh × mw starting at p gets, for its token (k, a, b) in row-major order, (p + k, p + a,
//! p + b); the text after it continues at p + max(t, mh, mw), not at p + t·mh·mw. transformers'
//! `get_rope_index`; `rope_delta` (last position + 1 − length) is what generation adds to the
//! positions of new tokens.

/// Positions of a sequence on the three axes, and its `rope_delta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    pub axes: [Vec<i64>; 3],
    pub rope_delta: i64,
}

/// The positions of `ids`, where each run of `image_token_id` is one image whose merged grid
/// (frames, rows, columns) is the next of `grids`. A run whose length is not its grid's size, or
/// more runs than grids, is an error.
pub fn mrope_positions(ids: &[u32], image_token_id: u32, grids: &[[usize; 3]]) -> Result<MropePositions, String> {
    let mut axes: [Vec<i64>; 3] = std::array::from_fn(|_| Vec::with_capacity(ids.len()));
    let mut grids = grids.iter();
    let mut p: i64 = 0;
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token_id {
            axes.iter_mut().for_each(|a| a.push(p));
            p += 1;
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&t| t == image_token_id).count();
        let &[t, mh, mw] = grids.next().ok_or("more images in the text than images given")?;
        if run != t * mh * mw {
            return Err(format!(
                "an image of {t}×{mh}×{mw} merged tokens needs {} image tokens, the text has {run}",
                t * mh * mw
            ));
        }
        for k in 0..t {
            for a in 0..mh {
                for b in 0..mw {
                    axes[0].push(p + k as i64);
                    axes[1].push(p + a as i64);
                    axes[2].push(p + b as i64);
                }
            }
        }
        p += t.max(mh).max(mw) as i64;
        i += run;
    }
    if grids.next().is_some() {
        return Err("more images given than the text has places for".into());
    }
    let last = axes.iter().filter_map(|a| a.iter().max()).max().copied().unwrap_or(-1);
    Ok(MropePositions { rope_delta: last + 1 - ids.len() as i64, axes })
}

/// The rotary tables [B, len, head_dim/2] of a batch of sequences' M-RoPE positions, each
/// right-padded to `len` (the pads' angles are those of position 0: nothing real attends to
/// them): frequency j (θ^(−2j/head_dim)) takes its angle from the temporal axis for the first
/// `section[0]` values of j, the row axis for the next `section[1]`, the column axis for the
/// rest. Computed in f64, stored in `dtype`.
pub fn mrope_tables(
    batch: &[&MropePositions],
    len: usize,
    section: [usize; 3],
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
    let half = head_dim / 2;
    let axis_of = |j: usize| {
        if j < section[0] {
            0
        } else if j < section[0] + section[1] {
            1
        } else {
            2
        }
    };
    let inv: Vec<f64> = (0..half).map(|j| 1.0 / theta.powf(2.0 * j as f64 / head_dim as f64)).collect();
    let (mut cos, mut sin) =
        (Vec::with_capacity(batch.len() * len * half), Vec::with_capacity(batch.len() * len * half));
    for positions in batch {
        let t = positions.axes[0].len();
        if t > len {
            candle_core::bail!("a sequence of {t} positions in rotary tables of {len}");
        }
        for p in 0..len {
            for (j, f) in inv.iter().enumerate() {
                let a = positions.axes[axis_of(j)].get(p).copied().unwrap_or(0) as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    let table = |v: Vec<f32>| candle_core::Tensor::from_vec(v, (batch.len(), len, half), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_takes_a_block_of_positions_and_the_text_jumps_past_it() {
        // text, text, image 1×2×3, text
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let m = mrope_positions(&ids, 9, &[[1, 2, 3]]).unwrap();
        assert_eq!(m.axes[0], [0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(m.axes[1], [0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(m.axes[2], [0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(m.rope_delta, 5 + 1 - 9);
        assert!(mrope_positions(&ids, 9, &[[1, 2, 2]]).unwrap_err().contains("needs 4 image tokens"));
        assert!(mrope_positions(&ids, 9, &[]).is_err());
        assert!(mrope_positions(&[1, 2], 9, &[[1, 1, 1]]).is_err());
    }
}
