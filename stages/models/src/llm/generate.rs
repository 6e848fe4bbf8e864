//! Text generation: greedy or seeded sampling (temperature, top-p) with a KV cache, stopping
//! after an end-of-turn or end-of-sequence token or at `max_new_tokens`.
//!
//! Sampling uses its own small generator (SplitMix64) seeded per record, so a sample depends only
//! on the seed and the record — not on the shard, the worker or the version of a random crate.

use candle_core::Tensor;

use super::{Decoder, ModelError, StepRotary};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax, first on ties).
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0 };
}

/// SplitMix64.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The next token from a row of logits.
pub fn pick(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
    if sampling.temperature <= 0.0 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(f64, usize)> =
        logits.iter().enumerate().map(|(i, &l)| (((l as f64 - max) / sampling.temperature).exp(), i)).collect();
    let total: f64 = probs.iter().map(|p| p.0).sum();
    let nucleus = nucleus(&mut probs, total, sampling.top_p);
    let sum: f64 = nucleus.iter().map(|p| p.0).sum();
    let mut x = rng.next_f64() * sum;
    for p in nucleus {
        x -= p.0;
        if x < 0.0 {
            return p.1 as u32;
        }
    }
    nucleus[nucleus.len() - 1].1 as u32
}

/// The smallest prefix, most probable first (ties by token id), of (weight, token) pairs whose
/// share of `total` reaches `top_p`. A nucleus is usually a few hundred tokens of a 152k
/// vocabulary, so the largest `k` are selected (linear time) and only they are sorted, `k`
/// growing until their mass reaches `top_p`: the same prefix as sorting everything, summed in
/// the same order, without sorting the vocabulary for every token.
fn nucleus(probs: &mut [(f64, usize)], total: f64, top_p: f64) -> &[(f64, usize)] {
    let order = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let n = probs.len();
    let mut k = n.min(256);
    loop {
        if k < n {
            probs.select_nth_unstable_by(k - 1, order);
        }
        probs[..k].sort_by(order);
        let mut mass = 0.0;
        for (kept, p) in probs[..k].iter().enumerate() {
            mass += p.0 / total;
            if mass >= top_p {
                return &probs[..=kept];
            }
        }
        if k == n {
            return probs;
        }
        k = (k * 8).min(n);
    }
}

/// New tokens after `prompt` (the stop token included when one ends the generation).
pub fn generate(
    decoder: &Decoder,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampling: &Sampling,
    rng: &mut Rng,
) -> Result<Vec<u32>, ModelError> {
    let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), decoder.device())?;
    let prompt = decoder.embed(&ids)?;
    generate_from_embeddings(decoder, prompt, StepRotary::Shifted(0), 0, max_new, stop, sampling, rng)
}

/// New tokens after a prompt given as input embeddings [1, T, H] (a VLM's, image features
/// spliced in) whose rotary angles `rotary` gives; the new tokens take rotary positions from
/// their place in the sequence plus `shift` (Qwen2-VL's `rope_delta`).
#[allow(clippy::too_many_arguments)]
pub fn generate_from_embeddings(
    decoder: &Decoder,
    prompt: Tensor,
    rotary: StepRotary<'_>,
    shift: i64,
    max_new: usize,
    stop: &[u32],
    sampling: &Sampling,
    rng: &mut Rng,
) -> Result<Vec<u32>, ModelError> {
    let device = decoder.device();
    let mut cache = decoder.new_cache();
    let mut out = Vec::new();
    if max_new == 0 {
        return Ok(out);
    }
    let mut hidden = decoder.step_embeddings(prompt, rotary, &mut cache)?;
    while out.len() < max_new {
        let (_, t, h) = hidden.dims3()?;
        let last = hidden.narrow(1, t - 1, 1)?.reshape((1, h))?;
        let logits = decoder.logits(&last)?.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let next = pick(&logits, sampling, rng);
        out.push(next);
        if stop.contains(&next) || out.len() == max_new {
            break;
        }
        let ids = Tensor::from_vec(vec![next], (1, 1), device)?;
        hidden = decoder.step_embeddings(decoder.embed(&ids)?, StepRotary::Shifted(shift), &mut cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_keeps_the_nucleus() {
        let mut rng = Rng::new(1);
        assert_eq!(pick(&[0.1, 3.0, 3.0, -1.0], &Sampling::GREEDY, &mut rng), 1);
        // One token holds nearly all the mass: top_p = 0.5 can only pick it.
        let logits = [0.0, 20.0, 0.0, 0.0];
        let s = Sampling { temperature: 1.0, top_p: 0.5 };
        assert!((0..100).all(|_| pick(&logits, &s, &mut rng) == 1));
        // Equal logits, full nucleus: all tokens are drawn, about equally.
        let s = Sampling { temperature: 1.0, top_p: 1.0 };
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[pick(&[1.0; 4], &s, &mut rng) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
        // The same seed draws the same sequence.
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        assert!((0..10).all(|_| a.next_u64() == b.next_u64()));
    }

    /// The nucleus by selection is the nucleus by sorting the whole vocabulary: the same tokens
    /// drawn from the same seeds, over peaked and flat distributions, ties included, at every
    /// top_p (the flat ones grow the selection past its first 256 and to the whole vocabulary).
    #[test]
    fn selecting_the_nucleus_draws_what_sorting_everything_draws() {
        fn by_full_sort(logits: &[f32], sampling: &Sampling, rng: &mut Rng) -> u32 {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut probs: Vec<(f64, usize)> =
                logits.iter().enumerate().map(|(i, &l)| (((l as f64 - max) / sampling.temperature).exp(), i)).collect();
            let total: f64 = probs.iter().map(|p| p.0).sum();
            probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut kept = 0;
            let mut mass = 0.0;
            for p in &probs {
                kept += 1;
                mass += p.0 / total;
                if mass >= sampling.top_p {
                    break;
                }
            }
            let nucleus = &probs[..kept];
            let mut x = rng.next_f64() * nucleus.iter().map(|p| p.0).sum::<f64>();
            for p in nucleus {
                x -= p.0;
                if x < 0.0 {
                    return p.1 as u32;
                }
            }
            nucleus[kept - 1].1 as u32
        }
        let mut source = Rng::new(7);
        let vocab = 20_000;
        for (case, spread) in [8.0, 2.0, 0.05, 0.0].into_iter().enumerate() {
            // Logits rounded to a coarse grid, so many tie.
            let logits: Vec<f32> =
                (0..vocab).map(|_| ((source.next_f64() * spread * 4.0).round() / 4.0) as f32).collect();
            for (temperature, top_p) in [(1.0, 0.9), (0.7, 0.5), (1.3, 0.99), (1.0, 1.0), (0.5, 0.0)] {
                let s = Sampling { temperature, top_p };
                let (mut a, mut b) = (Rng::new(case as u64), Rng::new(case as u64));
                for draw in 0..20 {
                    let (got, want) = (pick(&logits, &s, &mut a), by_full_sort(&logits, &s, &mut b));
                    assert_eq!(got, want, "spread {spread}, T {temperature}, top_p {top_p}, draw {draw}");
                }
            }
        }
    }
}
