//! The Qwen2 language-model config (MODEL_SPEC §1.3): `text_config` of InternVL, or a whole Qwen2ForCausalLM
//! config. Defaults are transformers' `Qwen2Config` ones (identical in 4.52 and 5.17 for the fields read here).

use serde::Serialize;

use super::fields::Obj;
use super::Activation;
use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `head_dim` from the file when present (transformers' Qwen2 honours it), else hidden / heads.
    pub head_dim: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// Serialized under v5's name so `facellm info` output parses back as a config.json.
    #[serde(rename = "rope_parameters")]
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub use_sliding_window: bool,
    /// Kept for `facellm info`; transformers nulls it when `use_sliding_window` is false.
    pub sliding_window: Option<usize>,
    pub max_window_layers: usize,
    pub attention_dropout: f64,
    pub initializer_range: f64,
    pub use_cache: bool,
    pub bos_token_id: Option<u32>,
    /// One id or several in the file; empty when absent.
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub dtype: Option<String>,
}

/// Rotary embedding: NeoX half-split rotation with `inv_freq[i] = theta^(-2i/head_dim)`, then the scaling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopeConfig {
    pub rope_theta: f64,
    #[serde(flatten)]
    pub scaling: RopeScaling,
}

/// The RoPE types facellm implements. Others transformers knows (yarn, longrope, llama3, ...) are refused.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    Default,
    /// inv_freq / factor.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: base' = theta * (factor*L/max_pos - (factor-1))^(d/(d-2)) once a sequence of length L
    /// exceeds `max_position_embeddings`; identical to `Default` below that (MODEL_SPEC §3.8).
    Dynamic {
        factor: f64,
    },
}

const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// False for NaN too, which a plain `x <= 0.0` test would let through.
pub(crate) fn positive(x: f64) -> bool {
    x > 0.0
}

impl TextConfig {
    pub(crate) fn parse(o: &Obj) -> Result<Self> {
        let hidden_size = o.usize_or("hidden_size", 4096)?;
        let num_attention_heads = o.usize_or("num_attention_heads", 32)?;
        // An absent key takes the dataclass default 32; only an explicit null falls back to the head count.
        let num_key_value_heads = match o.raw("num_key_value_heads") {
            None => 32,
            Some(serde_json::Value::Null) => num_attention_heads,
            Some(_) => o.usize_or("num_key_value_heads", 32)?,
        };
        let head_dim_stored = o.usize_opt("head_dim")?;
        let use_sliding_window = o.bool_or("use_sliding_window", false)?;
        let sliding_window = if use_sliding_window { o.usize_opt("sliding_window")?.or(Some(4096)) } else { None };
        let c = TextConfig {
            vocab_size: o.usize_or("vocab_size", 151_936)?,
            hidden_size,
            intermediate_size: o.usize_or("intermediate_size", 22_016)?,
            num_hidden_layers: o.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: head_dim_stored.unwrap_or(hidden_size.checked_div(num_attention_heads).unwrap_or(0)),
            hidden_act: Activation::parse(o, "hidden_act", o.str_or("hidden_act", "silu")?)?,
            max_position_embeddings: o.usize_or("max_position_embeddings", 32_768)?,
            rms_norm_eps: o.f64_or("rms_norm_eps", 1e-6)?,
            rope: RopeConfig::parse(o)?,
            tie_word_embeddings: o.bool_or("tie_word_embeddings", false)?,
            use_sliding_window,
            sliding_window,
            max_window_layers: o.usize_or("max_window_layers", 28)?,
            attention_dropout: o.f64_or("attention_dropout", 0.0)?,
            initializer_range: o.f64_or("initializer_range", 0.02)?,
            use_cache: o.bool_or("use_cache", true)?,
            bos_token_id: o.u32_opt("bos_token_id")?,
            eos_token_id: o.token_ids("eos_token_id")?,
            pad_token_id: o.u32_opt("pad_token_id")?,
            dtype: o.dtype()?,
        };
        c.validate(o, head_dim_stored.is_some())?;
        Ok(c)
    }

    fn validate(&self, o: &Obj, head_dim_stored: bool) -> Result<()> {
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(o.err(key, "must be > 0"));
            }
        }
        if !head_dim_stored && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(o.err(
                "num_attention_heads",
                format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(o.err("head_dim", format!("{} must be even and > 0 for rotary embeddings", self.head_dim)));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(o.err(
                "num_key_value_heads",
                format!(
                    "{} kv heads do not divide {} attention heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !positive(self.rms_norm_eps) {
            return Err(o.err("rms_norm_eps", format!("{} must be > 0", self.rms_norm_eps)));
        }
        if self.use_sliding_window {
            return Err(
                o.err("use_sliding_window", "sliding-window attention is not supported (Qwen2.5 leaves it off)")
            );
        }
        // v5 writes one entry per layer; anything but full attention would need sliding windows.
        for t in o.strings("layer_types")? {
            if t != "full_attention" {
                return Err(o.err("layer_types", format!("unsupported layer type `{t}` (only full_attention)")));
            }
        }
        Ok(())
    }

    /// Width of the concatenated query heads (= hidden_size unless `head_dim` is set explicitly).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads per kv head (GQA group size).
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

impl RopeConfig {
    fn parse(o: &Obj) -> Result<Self> {
        // v5 order: `rope_scaling` (4.x name) replaces `rope_parameters`; theta from inside the dict, else the
        // top-level `rope_theta`, else 10000.
        let params = match (o.sub("rope_scaling")?, o.sub("rope_parameters")?) {
            (Some(p), _) => Some(p),
            (None, p) => p,
        };
        let Some(mut p) = params else {
            return Ok(RopeConfig {
                rope_theta: o.f64_or("rope_theta", DEFAULT_ROPE_THETA)?,
                scaling: RopeScaling::Default,
            });
        };
        // v5 may nest one dict per layer type; facellm has only full-attention layers.
        if let Some(full) = p.sub("full_attention")? {
            p = full;
        }
        let rope_theta = match p.f64_opt("rope_theta")? {
            Some(t) => t,
            None => o.f64_or("rope_theta", DEFAULT_ROPE_THETA)?,
        };
        if !positive(rope_theta) {
            return Err(p.err("rope_theta", format!("{rope_theta} must be > 0")));
        }
        let rope_type = match p.str_opt("rope_type")? {
            Some(t) => t,
            None => p.str_or("type", "default")?,
        };
        let factor = |p: &Obj| -> Result<f64> {
            match p.f64_opt("factor")? {
                Some(f) if f >= 1.0 => Ok(f),
                Some(f) => Err(p.err("factor", format!("{f} must be >= 1"))),
                None => Err(p.err("factor", format!("required for rope_type `{rope_type}`"))),
            }
        };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor(&p)? },
            "dynamic" => RopeScaling::Dynamic { factor: factor(&p)? },
            other => {
                return Err(p.err(
                    if p.has("rope_type") { "rope_type" } else { "type" },
                    format!("unsupported RoPE type `{other}` (supported: default, linear, dynamic)"),
                ))
            }
        };
        Ok(RopeConfig { rope_theta, scaling })
    }
}
