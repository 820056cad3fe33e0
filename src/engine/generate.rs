//! One request end to end: prefill of the prompt (with image features), then the decode loop with
//! sampling, EOS ids, stop strings, a token budget and streaming of text as it becomes final.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::stop::{StopMatcher, StopState};
use crate::backend::cpu::sampling::{Sampler, SamplingParams};
use crate::model::facellm::FaceLlm;
use crate::model::llm::KvCache;
use crate::tensor::Tensor;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when one of these ids is produced (it is not part of the answer).
    pub eos_ids: Vec<u32>,
    /// Generation ends when the answer contains one of these; the answer is cut before it.
    pub stop_strings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS id or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// Stopped by the caller (Ctrl-C in chat, a client that went away).
    Cancelled,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub vision_ms: f64,
    pub prefill_ms: f64,
    /// Prompt tokens whose keys and values were already cached (not recomputed).
    pub reused_tokens: usize,
    /// Wall time of every decode step after the first token.
    pub decode_ms: Vec<f64>,
}

impl Timings {
    pub fn decode_tokens_per_s(&self) -> f64 {
        let total: f64 = self.decode_ms.iter().sum();
        if total > 0.0 {
            self.decode_ms.len() as f64 * 1000.0 / total
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    /// Generated ids, the EOS id excluded.
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Generates from `prompt_ids` (which already hold the expanded `<IMG_CONTEXT>` tokens) and the images'
/// tiles `pixel_values [tiles, 3, 448, 448]`. `decode` turns generated ids into text (special tokens
/// skipped); `on_text` receives the answer's text as it becomes final.
pub fn generate(
    model: &FaceLlm,
    prompt_ids: &[u32],
    pixel_values: Option<&Tensor>,
    opts: &GenerateOptions,
    decode: &dyn Fn(&[u32]) -> Result<String>,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    let t0 = Instant::now();
    let features = match pixel_values {
        Some(px) => Some(model.encode_images(px)?.features),
        None => None,
    };
    let vision_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut session = Session::new(model);
    let mut out = session.generate(model, prompt_ids, features.as_ref(), opts, decode, on_text, None)?;
    out.timings.vision_ms = vision_ms;
    Ok(out)
}

/// A sequence whose KV cache outlives one answer: a multi-turn chat re-sends its whole rendered history,
/// and only the tokens after the longest prefix already in the cache are computed (the image, encoded once,
/// is never run through the vision tower or the prefill again).
pub struct Session {
    cache: KvCache,
    /// The tokens whose keys and values are in `cache`, in order.
    ids: Vec<u32>,
}

impl Session {
    pub fn new(model: &FaceLlm) -> Session {
        Session { cache: model.new_cache(), ids: Vec::new() }
    }

    /// Tokens held in the cache.
    pub fn cached_tokens(&self) -> usize {
        self.ids.len()
    }

    /// Forgets everything (a new conversation).
    pub fn reset(&mut self, model: &FaceLlm) {
        *self = Session::new(model);
    }

    /// Generates an answer to the whole conversation `prompt_ids`. `features` holds one row per
    /// `<IMG_CONTEXT>` token of `prompt_ids` (all images of the conversation, in order). Setting `cancel`
    /// ends the answer after the current token (finish reason `cancelled`).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &mut self,
        model: &FaceLlm,
        prompt_ids: &[u32],
        features: Option<&Tensor>,
        opts: &GenerateOptions,
        decode: &dyn Fn(&[u32]) -> Result<String>,
        on_text: &mut dyn FnMut(&str),
        cancel: Option<&AtomicBool>,
    ) -> Result<GenerateOutput> {
        let context = model.llm().params().max_position;
        if prompt_ids.is_empty() {
            return Err(Error::Invalid("empty prompt".into()));
        }
        if prompt_ids.len() + 1 > context {
            return Err(Error::Invalid(format!(
                "the prompt has {} tokens, over the model's context of {context}",
                prompt_ids.len()
            )));
        }
        // Reuse the longest cached prefix, keeping at least one token to run (its logits start the answer).
        let reuse = self.ids.iter().zip(prompt_ids).take_while(|(a, b)| a == b).count().min(prompt_ids.len() - 1);
        self.cache.truncate(reuse)?;
        self.ids.truncate(reuse);
        let image_id = model.image_token_id();
        let skipped_rows = prompt_ids[..reuse].iter().filter(|&&id| id == image_id).count();
        let new_features = match features {
            Some(f) if skipped_rows > 0 => {
                let d = f.shape()[1];
                let rows = f.shape()[0].saturating_sub(skipped_rows);
                Some(Tensor::from_f32([rows, d], f.f32s()?[skipped_rows.min(f.shape()[0]) * d..].to_vec())?)
            }
            Some(f) => Some(f.clone()),
            None => None,
        };

        let mut timings = Timings { reused_tokens: reuse, ..Timings::default() };
        let budget = opts.max_new_tokens.min(context - prompt_ids.len());
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        let mut history: Vec<u32> = prompt_ids.to_vec();
        let mut ids = Vec::new();
        let mut stops = StopMatcher::new(&opts.stop_strings);
        let mut text = String::new();

        let t0 = Instant::now();
        let mut logits = model.forward(&prompt_ids[reuse..], new_features.as_ref(), &mut self.cache, false, None)?;
        self.ids.extend_from_slice(&prompt_ids[reuse..]);
        timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut finish = FinishReason::Length;
        let mut cut_by_stop = false;
        for step in 0..budget {
            let id = sampler.sample(logits.f32s()?, &history)?;
            if opts.eos_ids.contains(&id) {
                finish = FinishReason::Stop;
                break;
            }
            ids.push(id);
            history.push(id);
            text = decode(&ids)?;
            match stops.update(&text) {
                StopState::Continue { release } => on_text(&release),
                StopState::Stopped { release, text: cut } => {
                    on_text(&release);
                    text = cut;
                    finish = FinishReason::Stop;
                    cut_by_stop = true;
                    break;
                }
            }
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                finish = FinishReason::Cancelled;
                break;
            }
            if step + 1 == budget {
                break;
            }
            let t = Instant::now();
            logits = model.forward(&[id], None, &mut self.cache, false, None)?;
            self.ids.push(id);
            timings.decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if !cut_by_stop {
            on_text(&stops.finish(&text));
        }
        Ok(GenerateOutput { ids, text, finish_reason: finish, timings })
    }
}
