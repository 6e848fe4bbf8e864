//! Log-probabilities of target tokens from rows of logits, in one pass per row: max, then the
//! sum of exponentials, then `logit[target] - max - ln(sum)`.
//!
//! This is the hot loop of perplexity scoring (a vocabulary of 150k means 150k exponentials per
//! scored token). `exp` is [`crate::kernels`]' vectorizable one (relative error about 1e-7);
//! libm's scalar `expf` is several times slower. Rows are split across threads.

use crate::kernels::exp_nonpositive;

/// ln Σ exp(row) (stable).
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += exp_nonpositive(x - max);
        }
    }
    let mut sum: f32 = chunks.remainder().iter().map(|&x| exp_nonpositive(x - max)).sum();
    sum += lanes.iter().sum::<f32>();
    max + sum.ln()
}

/// log p(target) for each row of a row-major [rows, vocab] matrix.
pub fn target_log_probs(logits: &[f32], vocab: usize, targets: &[u32]) -> Vec<f32> {
    let rows = targets.len();
    debug_assert_eq!(logits.len(), rows * vocab);
    let one = |r: usize| {
        let row = &logits[r * vocab..(r + 1) * vocab];
        row[targets[r] as usize] - log_sum_exp(row)
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(rows.max(1));
    if threads <= 1 || rows * vocab < 1 << 16 {
        return (0..rows).map(one).collect();
    }
    let mut out = vec![0f32; rows];
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (k, chunk) in out.chunks_mut(per).enumerate() {
            let one = &one;
            s.spawn(move || {
                for (i, o) in chunk.iter_mut().enumerate() {
                    *o = one(k * per + i);
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_direct_log_softmax() {
        let vocab = 1000;
        let logits: Vec<f32> = (0..3 * vocab).map(|i| ((i * 7919 % 1000) as f32 / 37.0).sin() * 12.0).collect();
        let targets = [5u32, 999, 0];
        let got = target_log_probs(&logits, vocab, &targets);
        for (r, &t) in targets.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let want = row[t as usize] as f64 - lse;
            assert!((got[r] as f64 - want).abs() < 1e-5, "row {r}: {} vs {want}", got[r]);
        }
    }
}
