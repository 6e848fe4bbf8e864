//! Text generation: greedy or seeded sampling (temperature, top-p) with a KV cache, stopping
//! after an end-of-turn or end-of-sequence token or at `max_new_tokens`.
//!
//! Records go in batches ([`generate_batch`]): one token of every unfinished record per step, so
//! the weights are read once per step for all of them rather than once per record (on a GPU, a
//! step of one row leaves the device idle). Prompts of unequal length are left-padded to end
//! together, their padding never attended to and each row's rotary positions its own; the
//! cache is allocated once for the longest generation, and rows leave the batch as they finish.
//!
//! Sampling uses its own small generator (SplitMix64) seeded per record, so a sample depends only
//! on the seed and the record — not on the shard, the worker or the version of a random crate.
//! (In a batch a record's logits may differ from its own in the last bits of float rounding, as
//! in any batched inference; a draw can only change where two tokens' cumulative probabilities
//! meet within that rounding.)

use candle_core::{DType, Tensor};

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
#[derive(Debug, Clone)]
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
    let prompt = Prompt::of_ids(decoder, prompt)?;
    let mut out = generate_batch(decoder, vec![prompt], &[max_new], stop, sampling, std::slice::from_mut(rng))?;
    Ok(out.pop().unwrap_or_default())
}

/// A prompt as the decoder takes it.
pub struct Prompt {
    /// Input embeddings [T, H] (a VLM's, image features spliced in).
    pub embeddings: Tensor,
    /// Rotary tables [T, head_dim/2] each, in the model's dtype (Qwen2-VL's M-RoPE); none for
    /// the positions 0..T.
    pub rotary: Option<(Tensor, Tensor)>,
    /// The first new token takes rotary position T + `shift` (Qwen2-VL's `rope_delta`: text after
    /// an image's block).
    pub shift: i64,
}

impl Prompt {
    /// A text prompt of token ids.
    pub fn of_ids(decoder: &Decoder, ids: &[u32]) -> Result<Prompt, ModelError> {
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), decoder.device())?;
        Ok(Prompt { embeddings: decoder.embed(&ids)?, rotary: None, shift: 0 })
    }

    fn len(&self) -> Result<usize, ModelError> {
        Ok(self.embeddings.dim(0)?)
    }
}

/// New tokens after each of `prompts` (the stop token included when one ends a generation), at
/// most `max_new[i]` for prompt i, drawn with `rngs[i]`: all of them together, one step per
/// token, each row leaving the batch when it finishes.
pub fn generate_batch(
    decoder: &Decoder,
    prompts: Vec<Prompt>,
    max_new: &[usize],
    stop: &[u32],
    sampling: &Sampling,
    rngs: &mut [Rng],
) -> Result<Vec<Vec<u32>>, ModelError> {
    let n = prompts.len();
    if max_new.len() != n || rngs.len() != n {
        return Err(ModelError::Compute(format!(
            "{n} prompts, {} limits and {} generators",
            max_new.len(),
            rngs.len()
        )));
    }
    let mut outs = vec![Vec::new(); n];
    // Rows of the batch, by prompt; a prompt given no new tokens takes none.
    let mut rows: Vec<usize> = (0..n).filter(|&i| max_new[i] > 0).collect();
    if rows.is_empty() {
        return Ok(outs);
    }
    let lens = prompts.iter().map(Prompt::len).collect::<Result<Vec<_>, _>>()?;
    // The position of each prompt's first new token, and the last one a step feeds.
    let mut next_position = Vec::with_capacity(n);
    for (i, p) in prompts.iter().enumerate() {
        let first = lens[i] as i64 + p.shift;
        let last = first + max_new[i].saturating_sub(2) as i64;
        if first < 0 || (max_new[i] > 1 && last as usize >= decoder.max_positions()) {
            return Err(ModelError::Compute(format!(
                "a prompt of {} positions and {} new tokens would pass the model's {} positions",
                lens[i],
                max_new[i],
                decoder.max_positions()
            )));
        }
        next_position.push(first as usize);
    }
    let longest = rows.iter().map(|&i| lens[i]).max().unwrap_or(0);
    let pads: Vec<usize> = rows.iter().map(|&i| longest - lens[i]).collect();
    let capacity = longest + rows.iter().map(|&i| max_new[i]).max().unwrap_or(1) - 1;
    let mut cache = decoder.new_batch_cache(&pads, capacity)?;

    // The prompts in one pass, left-padded (zero embeddings, zero angles) to end together.
    let dtype = decoder.dtype();
    let device = decoder.device();
    let mut xs = Vec::with_capacity(rows.len());
    let (mut coss, mut sins) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    for (&i, &pad) in rows.iter().zip(&pads) {
        let p = &prompts[i];
        let (cos, sin) = match &p.rotary {
            Some((cos, sin)) => (cos.clone(), sin.clone()),
            None => decoder.rotary_from_start(lens[i])?,
        };
        xs.push(p.embeddings.to_dtype(dtype)?.pad_with_zeros(0, pad, 0)?);
        coss.push(cos.pad_with_zeros(0, pad, 0)?);
        sins.push(sin.pad_with_zeros(0, pad, 0)?);
    }
    let (cos, sin) = (Tensor::stack(&coss, 0)?, Tensor::stack(&sins, 0)?);
    let hidden = decoder.step_embeddings(Tensor::stack(&xs, 0)?, StepRotary::Given(&cos, &sin), &mut cache)?;
    let mut last = hidden.narrow(1, longest - 1, 1)?.squeeze(1)?;

    loop {
        let logits = decoder.logits(&last)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let (mut kept, mut ids, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for (r, (&i, logits)) in rows.iter().zip(&logits).enumerate() {
            let next = pick(logits, sampling, &mut rngs[i]);
            outs[i].push(next);
            if !stop.contains(&next) && outs[i].len() < max_new[i] {
                kept.push(r);
                ids.push(next);
                positions.push(next_position[i]);
                next_position[i] += 1;
            }
        }
        if kept.is_empty() {
            return Ok(outs);
        }
        if kept.len() < rows.len() {
            cache.keep_rows(&kept)?;
            rows = kept.iter().map(|&r| rows[r]).collect();
        }
        let b = ids.len();
        let x = decoder.embed(&Tensor::from_vec(ids, (b, 1), device)?)?;
        let (cos, sin) = decoder.rotary_at(&positions)?;
        last = decoder.step_embeddings(x, StepRotary::Given(&cos, &sin), &mut cache)?.squeeze(1)?;
    }
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
