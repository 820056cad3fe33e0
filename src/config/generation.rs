//! `generation_config.json`: stop ids and sampling defaults (MODEL_SPEC §3.9).
//!
//! Unset sampling fields take the values transformers' `generate()` falls back to (greedy, temperature 1,
//! top_k 50, top_p 1, repetition_penalty 1, one beam). Special-token ids absent from the file, or the whole
//! file being absent, fall back to the model config's ids, which is what transformers builds when a folder
//! has no generation_config.json. Lengths stay optional: transformers' implicit `max_length = 20` would cut
//! every answer short, so the engine chooses its own limit when neither is given.

use std::path::Path;

use serde::Serialize;

use super::fields::{read_json, Obj};
use super::text::positive;
use super::ModelConfig;
use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub num_beams: usize,
    pub max_new_tokens: Option<usize>,
    /// Prompt plus generated tokens, as stored; `max_new_tokens` wins when both are set.
    pub max_length: Option<usize>,
}

impl GenerationConfig {
    /// Reads `<dir>/generation_config.json` if it exists, else derives the defaults from `model`.
    pub fn load(dir: impl AsRef<Path>, model: &ModelConfig) -> Result<Self> {
        let path = dir.as_ref().join("generation_config.json");
        if !path.exists() {
            return Ok(Self::from_model_config(model));
        }
        let value = read_json(&path)?;
        Self::from_value(&path.display().to_string(), &value, model)
    }

    pub fn from_model_config(model: &ModelConfig) -> Self {
        let text = model.text();
        GenerationConfig {
            bos_token_id: text.bos_token_id,
            eos_token_ids: text.eos_token_id.clone(),
            pad_token_id: text.pad_token_id,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            num_beams: 1,
            max_new_tokens: None,
            max_length: None,
        }
    }

    /// Parses a generation config; `file` only labels errors.
    pub fn from_value(file: &str, value: &serde_json::Value, model: &ModelConfig) -> Result<Self> {
        let o = Obj::root(file, value)?;
        let base = Self::from_model_config(model);
        let eos = o.token_ids("eos_token_id")?;
        let c = GenerationConfig {
            bos_token_id: o.u32_opt("bos_token_id")?.or(base.bos_token_id),
            eos_token_ids: if eos.is_empty() { base.eos_token_ids } else { eos },
            pad_token_id: o.u32_opt("pad_token_id")?.or(base.pad_token_id),
            do_sample: o.bool_or("do_sample", base.do_sample)?,
            temperature: o.f64_or("temperature", base.temperature)?,
            top_k: o.usize_or("top_k", base.top_k)?,
            top_p: o.f64_or("top_p", base.top_p)?,
            repetition_penalty: o.f64_or("repetition_penalty", base.repetition_penalty)?,
            num_beams: o.usize_or("num_beams", base.num_beams)?,
            max_new_tokens: o.usize_opt("max_new_tokens")?,
            max_length: o.usize_opt("max_length")?,
        };
        if !positive(c.temperature) {
            return Err(o.err("temperature", format!("{} must be > 0", c.temperature)));
        }
        if !(c.top_p > 0.0 && c.top_p <= 1.0) {
            return Err(o.err("top_p", format!("{} must be in (0, 1]", c.top_p)));
        }
        if !positive(c.repetition_penalty) {
            return Err(o.err("repetition_penalty", format!("{} must be > 0", c.repetition_penalty)));
        }
        if c.num_beams == 0 {
            return Err(o.err("num_beams", "must be >= 1"));
        }
        Ok(c)
    }
}
