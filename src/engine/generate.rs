//! One request end to end: prefill of the prompt (with image features), then the decode loop with
//! sampling, EOS ids, stop strings, a token budget and streaming of text as it becomes final.

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
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub vision_ms: f64,
    pub prefill_ms: f64,
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
    let context = model.llm().params().max_position;
    if prompt_ids.len() + 1 > context {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens, over the model's context of {context}",
            prompt_ids.len()
        )));
    }
    let mut timings = Timings::default();
    let features = match pixel_values {
        Some(px) => {
            let t0 = Instant::now();
            let f = model.encode_images(px)?;
            timings.vision_ms = t0.elapsed().as_secs_f64() * 1e3;
            Some(f.features)
        }
        None => None,
    };
    let budget = opts.max_new_tokens.min(context - prompt_ids.len());
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut cache: KvCache = model.new_cache();
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut ids = Vec::new();
    let mut stops = StopMatcher::new(&opts.stop_strings);
    let mut text = String::new();

    let t0 = Instant::now();
    let mut logits = model.forward(prompt_ids, features.as_ref(), &mut cache, false, None)?;
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
        if step + 1 == budget {
            break;
        }
        let t = Instant::now();
        logits = model.forward(&[id], None, &mut cache, false, None)?;
        timings.decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if !cut_by_stop {
        on_text(&stops.finish(&text));
    }
    Ok(GenerateOutput { ids, text, finish_reason: finish, timings })
}
