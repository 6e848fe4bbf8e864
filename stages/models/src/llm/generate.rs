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
    let sum: f64 = nucleus.iter().map(|p| p.0).sum();
    let mut x = rng.next_f64() * sum;
    for p in nucleus {
        x -= p.0;
        if x < 0.0 {
            return p.1 as u32;
        }
    }
    nucleus[kept - 1].1 as u32
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
}
