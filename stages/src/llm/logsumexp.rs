//! Log-probabilities of target tokens from rows of logits, in one pass per row: max, then the
//! sum of exponentials, then `logit[target] - max - ln(sum)`.
//!
//! This is the hot loop of perplexity scoring (a vocabulary of 150k means 150k exponentials per
//! scored token). `exp` is computed by Cody–Waite range reduction to 2^n · e^f with |f| ≤ ln2/2
//! and a degree-7 polynomial for e^f (relative error about 1e-7), in plain arithmetic the compiler
//! vectorizes; libm's scalar `expf` is several times slower. Rows are split across threads.

/// exp(x) for x ≤ 0 (inputs are `logit - max`); below -87 it returns 0's neighbourhood.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to the nearest integer
    // ln 2 split in two (Cody–Waite): n · LN2_HI is exact, so x - n·ln2 keeps its precision.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let f = (x - n * LN2_HI) - n * LN2_LO; // e^x = 2^n · e^f, |f| ≤ ln2 / 2
    // e^f by its Taylor series to degree 7 (error < 5e-9 relative on |f| ≤ 0.35).
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

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
    fn exp_is_accurate_where_it_is_used() {
        let mut worst: f64 = 0.0;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
    }

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
