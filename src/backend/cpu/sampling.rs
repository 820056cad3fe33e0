//! Choosing the next token from a row of logits, following HF `generate`'s logits processors in their order:
//! repetition penalty on every id seen so far (prompt included), then, when sampling, temperature, top-k and
//! top-p, then a softmax and one draw from a seeded ChaCha8 stream. Greedy decoding (the InternVL3 default)
//! is the argmax of the penalised logits. The draws cannot reproduce torch's RNG; they are deterministic for
//! a seed on every platform instead.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Index of the largest value, the first one on ties (as `torch.argmax`). Empty input or NaN is an error.
pub fn argmax(x: &[f32]) -> Result<usize> {
    let Some(&first) = x.first() else {
        return Err(Error::Invalid("argmax: empty input".into()));
    };
    let (mut best, mut bv) = (0, first);
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            return Err(Error::Invalid(format!("argmax: NaN at index {i} of {}", x.len())));
        }
        if v > bv {
            best = i;
            bv = v;
        }
    }
    Ok(best)
}

/// How the next token is chosen. `Default` is greedy, as InternVL3's generation_config.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// false: greedy (argmax after the repetition penalty), whatever the other fields say.
    pub do_sample: bool,
    /// Divides the logits; 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` largest logits (ties at the boundary kept); 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass exceeds `top_p` (at least one); 1 disables.
    pub top_p: f32,
    /// HF's CTRL-style penalty: seen ids' positive logits are divided by it, negative ones multiplied; 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { do_sample: false, temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams::default()
    }

    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Invalid(format!("sampling: {what}")));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be finite and >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be finite and > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// Applies HF's `RepetitionPenaltyLogitsProcessor` in place: every distinct id in `previous` once.
pub fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) -> Result<()> {
    if penalty == 1.0 || previous.is_empty() {
        return Ok(());
    }
    let mut ids = previous.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if let Some(&id) = ids.last().filter(|&&id| id as usize >= logits.len()) {
        return Err(Error::Invalid(format!("sampling: previous id {id} is outside the {} logits", logits.len())));
    }
    for id in ids {
        let s = &mut logits[id as usize];
        *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
    }
    Ok(())
}

/// Candidates kept apart for top-p before falling back to sorting the whole vocabulary.
const TOP_P_CANDIDATES: usize = 1024;

/// A seeded next-token chooser; one per sequence, so that its draws are reproducible.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scores: Vec<f32>,
    order: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng, scores: Vec::new(), order: Vec::new() })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether every choice is the plain argmax of the logits (greedy, no repetition penalty), so a device
    /// may choose the token itself.
    pub fn is_argmax(&self) -> bool {
        self.params.is_greedy() && self.params.repetition_penalty == 1.0
    }

    /// The next id for `logits [vocab]`, given every id of the sequence so far (prompt and generated).
    pub fn sample(&mut self, logits: &[f32], previous: &[u32]) -> Result<u32> {
        let p = &self.params;
        if p.is_greedy() && (p.repetition_penalty == 1.0 || previous.is_empty()) {
            return argmax(logits).map(|i| i as u32);
        }
        if let Some(id) = self.process(logits, previous)? {
            return Ok(id);
        }
        Ok(self.draw())
    }

    /// The logits after every processor (penalty, temperature, top-k, top-p; removed tokens at -inf), as
    /// the final softmax sees them. For greedy parameters only the penalty applies.
    pub fn processed(&mut self, logits: &[f32], previous: &[u32]) -> Result<&[f32]> {
        self.process(logits, previous)?;
        Ok(&self.scores)
    }

    /// Fills `self.scores`; returns the id right away when the choice is already made (greedy, +inf).
    fn process(&mut self, logits: &[f32], previous: &[u32]) -> Result<Option<u32>> {
        let p = self.params.clone();
        self.scores.clear();
        self.scores.extend_from_slice(logits);
        apply_repetition_penalty(&mut self.scores, previous, p.repetition_penalty)?;
        let mx = argmax(&self.scores)?;
        if p.is_greedy() || self.scores[mx] == f32::INFINITY {
            return Ok(Some(mx as u32));
        }
        if self.scores[mx] == f32::NEG_INFINITY {
            return Err(Error::Invalid("sampling: every logit is -inf".into()));
        }
        let t = p.temperature;
        if t != 1.0 {
            for s in self.scores.iter_mut() {
                *s /= t;
            }
        }
        if p.top_k > 0 && p.top_k < self.scores.len() {
            self.top_k(p.top_k);
        }
        if p.top_p < 1.0 {
            self.top_p(p.top_p as f64);
        }
        Ok(None)
    }

    /// Masks every logit below the k-th largest (`TopKLogitsWarper`: ties with it survive).
    fn top_k(&mut self, k: usize) {
        let mut vals = self.scores.clone();
        let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        for s in self.scores.iter_mut() {
            if *s < kth {
                *s = f32::NEG_INFINITY;
            }
        }
    }

    /// `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p,
    /// always keeping the most likely one. Only the top candidates are sorted when the rest of the
    /// vocabulary is light enough to be dropped whole anyway.
    fn top_p(&mut self, top_p: f64) {
        let scores = &self.scores;
        let mx = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let total: f64 = scores.iter().map(|&s| (s as f64 - mx).exp()).sum();
        let prob = |i: u32| (scores[i as usize] as f64 - mx).exp() / total;
        self.order.clear();
        self.order.extend((0..scores.len() as u32).filter(|&i| scores[i as usize] > f32::NEG_INFINITY));
        let mut cum = 0.0;
        if self.order.len() > TOP_P_CANDIDATES {
            let split = self.order.len() - TOP_P_CANDIDATES;
            self.order.select_nth_unstable_by(split, |&a, &b| scores[a as usize].total_cmp(&scores[b as usize]));
            let rest: f64 = self.order[..split].iter().map(|&i| prob(i)).sum();
            if rest <= 1.0 - top_p {
                for &i in &self.order[..split] {
                    self.scores[i as usize] = f32::NEG_INFINITY;
                }
                self.order.drain(..split);
                cum = rest;
            }
        }
        let scores = &self.scores;
        self.order.sort_unstable_by(|&a, &b| scores[a as usize].total_cmp(&scores[b as usize]));
        let last = self.order.len().saturating_sub(1);
        let mut drop = Vec::new();
        for (pos, &i) in self.order.iter().enumerate() {
            cum += (scores[i as usize] as f64 - mx).exp() / total;
            if cum > 1.0 - top_p || pos == last {
                break;
            }
            drop.push(i);
        }
        for i in drop {
            self.scores[i as usize] = f32::NEG_INFINITY;
        }
    }

    /// One draw from the softmax of the surviving logits, walking ids in increasing order.
    fn draw(&mut self) -> u32 {
        let mx = self.scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let total: f64 = self.scores.iter().map(|&s| (s as f64 - mx).exp()).sum();
        let u = self.rng.random::<f64>() * total;
        let mut cum = 0.0;
        let mut last = 0;
        for (i, &s) in self.scores.iter().enumerate() {
            if s == f32::NEG_INFINITY {
                continue;
            }
            cum += (s as f64 - mx).exp();
            last = i;
            if u < cum {
                return i as u32;
            }
        }
        last as u32
    }
}
