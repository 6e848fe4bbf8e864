//! Perplexity scoring: the negative log-likelihood of chosen positions of token sequences.
//!
//! Sequences are batched right-padded (text) or packed end to end (a VLM's, whose image sizes
//! make lengths unequal: [`score_packed`]); only the positions that are scored go through `lm_head`,
//! and their log-softmax is computed in row chunks. A sequence's score does not depend on what it
//! is batched with (causal attention keeps real tokens from seeing pads); the tests hold it to
//! 1e-5. [`plan_batches`] groups sequences of similar length under a token budget.

use candle_core::Tensor;

use super::{Decoder, ModelError};

/// Token ids, of which positions `score_from..` are scored (each predicted from those before it).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub score_from: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Sum of -log p(t_i | t_<i) over the scored positions, accumulated in f64.
    pub nll_sum: f64,
    pub tokens: usize,
}

impl Score {
    pub fn mean_nll(&self) -> f64 {
        self.nll_sum / self.tokens as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
    /// The score of a corpus: the sums of its sequences' scores.
    pub fn total(scores: &[Score]) -> Score {
        Score { nll_sum: scores.iter().map(|s| s.nll_sum).sum(), tokens: scores.iter().map(|s| s.tokens).sum() }
    }
}

pub struct Scorer<'a> {
    pub decoder: &'a Decoder,
    /// Any valid token id; pads are never attended to by real tokens nor scored.
    pub pad: u32,
}

impl Scorer<'_> {
    /// Scores every sequence, in batches of at most `batch_tokens` tokens planned by length
    /// ([`plan_batches`]); the scores come back in the order of `seqs`.
    pub fn score_all(&self, seqs: &[Sequence], batch_tokens: usize) -> Result<Vec<Score>, ModelError> {
        let lengths: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
        let mut scores: Vec<Option<Score>> = vec![None; seqs.len()];
        for batch in plan_batches(&lengths, batch_tokens) {
            let refs: Vec<&Sequence> = batch.iter().map(|&i| &seqs[i]).collect();
            for (&i, s) in batch.iter().zip(self.score_batch(&refs)?) {
                scores[i] = Some(s);
            }
        }
        scores.into_iter().map(|s| s.ok_or_else(|| ModelError::Compute("a sequence was not scored".into()))).collect()
    }

    pub fn score_batch(&self, seqs: &[&Sequence]) -> Result<Vec<Score>, ModelError> {
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        if b == 0 || t < 2 {
            return Ok(seqs.iter().map(|_| Score { nll_sum: 0.0, tokens: 0 }).collect());
        }
        let mut ids = vec![self.pad; b * t];
        for (r, s) in seqs.iter().enumerate() {
            ids[r * t..r * t + s.ids.len()].copy_from_slice(&s.ids);
        }
        let hidden = self.decoder.hidden(&Tensor::from_vec(ids, (b, t), self.decoder.device())?)?;
        score_hidden_batch(self.decoder, &hidden, seqs)
    }
}

/// The scores of right-padded sequences from their final hidden states [B, T, H], for callers
/// that build the inputs themselves (a VLM splices image features into the embeddings): every
/// scored position of the batch through the LM head in one call (one pass over its weights, not
/// one per sequence).
pub fn score_hidden_batch(decoder: &Decoder, hidden: &Tensor, seqs: &[&Sequence]) -> Result<Vec<Score>, ModelError> {
    let (b, t, h) = hidden.dims3()?;
    if seqs.len() != b || seqs.iter().any(|s| s.ids.len() > t) {
        return Err(ModelError::Compute(format!("{} sequences for hidden states of {b} × {t}", seqs.len())));
    }
    let starts: Vec<isize> = (0..b).map(|r| (r * t) as isize).collect();
    score_rows(decoder, &hidden.reshape((b * t, h))?, seqs, &starts)
}

/// The scores of sequences from their input embeddings packed end to end ([N, H], N their
/// total length; a VLM's, image features spliced in), through [`Decoder::hidden_packed`] keeping
/// only the positions that predict a scored token (and the last), then as
/// [`score_hidden_batch`]. `rotary`: per-position cos and sin [N, head_dim/2], if not each
/// sequence's positions 0.. in the model's table.
pub fn score_packed(
    decoder: &Decoder,
    x: Tensor,
    seqs: &[&Sequence],
    rotary: Option<(&Tensor, &Tensor)>,
) -> Result<Vec<Score>, ModelError> {
    let lens: Vec<usize> = seqs.iter().map(|s| s.ids.len()).collect();
    // Position p - 1 predicts scored token p, p from score_from (at least 1) to the end.
    let keep: Vec<usize> = seqs
        .iter()
        .map(|s| {
            let first = s.score_from.max(1);
            if s.ids.len() > first { s.ids.len() - first + 1 } else { 0 }
        })
        .collect();
    if keep.iter().all(|&k| k == 0) {
        return Ok(vec![Score { nll_sum: 0.0, tokens: 0 }; seqs.len()]);
    }
    let hidden = decoder.hidden_packed(x, &lens, &keep, rotary)?;
    // Sequence i's position q is kept row (its first kept row) + q - (its length - keep).
    let mut starts = Vec::with_capacity(seqs.len());
    let mut kept = 0usize;
    for (&len, &k) in lens.iter().zip(&keep) {
        starts.push(kept as isize - (len - k) as isize);
        kept += k;
    }
    score_rows(decoder, &hidden, seqs, &starts)
}

/// Scores from hidden states [rows, H] where sequence `i`'s position `p` is row `starts[i] + p`
/// (for every `p` that predicts a scored token).
fn score_rows(
    decoder: &Decoder,
    hidden: &Tensor,
    seqs: &[&Sequence],
    starts: &[isize],
) -> Result<Vec<Score>, ModelError> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut owner = Vec::new();
    for (r, (s, &start)) in seqs.iter().zip(starts).enumerate() {
        for p in s.score_from.max(1)..s.ids.len() {
            rows.push((start + p as isize - 1) as u32);
            targets.push(s.ids[p]);
            owner.push(r);
        }
    }
    let mut scores = vec![Score { nll_sum: 0.0, tokens: 0 }; seqs.len()];
    if rows.is_empty() {
        return Ok(scores);
    }
    let picked = hidden.index_select(&Tensor::from_vec(rows, owner.len(), decoder.device())?, 0)?;
    for (lp, r) in decoder.target_log_probs(&picked, &targets)?.into_iter().zip(owner) {
        scores[r].nll_sum -= lp as f64;
        scores[r].tokens += 1;
    }
    Ok(scores)
}

/// Groups indices of sequences with the given lengths into batches whose padded size
/// (count × longest) stays within `budget` tokens; similar lengths go together.
pub fn plan_batches(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        let longest = current.iter().map(|&j| lengths[j]).max().unwrap_or(0).max(lengths[i]);
        if !current.is_empty() && (current.len() + 1) * longest > budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget_and_cover_everything_once() {
        let lengths = [5, 50, 7, 6, 49, 200, 1];
        let batches = plan_batches(&lengths, 100);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 100, "{b:?}");
        }
        // The 200-token sequence is alone; the short ones share a batch.
        assert!(batches.contains(&vec![5]));
        assert!(batches.iter().any(|b| b.contains(&6) && b.contains(&0) && b.contains(&3)));
    }
}
