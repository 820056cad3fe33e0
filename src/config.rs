//! `config.json` -> typed, validated model config (MODEL_SPEC §1).
//!
//! Two layouts are accepted: `InternVLForConditionalGeneration` (model_type `internvl`, nested `vision_config`
//! of type `internvl_vision` and `text_config` of type `qwen2`) and text-only `Qwen2ForCausalLM` (model_type
//! `qwen2`). Absent fields get the defaults transformers applies (checked against 5.17 by the fixtures that
//! `tools/fixtures_config.py` records; the 4.52 spellings are accepted too, see each field). Everything facellm
//! cannot run is refused here, naming the field, so no compute starts on a config that would fail later.
//!
//! Version differences handled (transformers 4.52 vs 5.x):
//! - dtype: 4.x writes `torch_dtype`, v5 `dtype` (v5 keeps `dtype` when both exist).
//! - RoPE: 4.x writes `rope_theta` + `rope_scaling` (`type` and/or `rope_type`), v5 `rope_parameters`
//!   holding `rope_type`, `rope_theta`, `factor`. Both are read; `rope_scaling` wins over `rope_parameters`
//!   as in v5.
//! - image_size / patch_size: an int or `[h, w]` (v5 stores a pair either way).
//! - tie_word_embeddings: 4.52 decides tying from `text_config`; v5 from the top level, whose default is
//!   `true`. See [`ModelConfig::tie_word_embeddings`].

mod fields;
mod generation;
mod text;
mod vision;

use std::path::Path;

use serde::Serialize;

pub use generation::GenerationConfig;
pub use text::{RopeConfig, RopeScaling, TextConfig};
pub use vision::{InternVlConfig, VisionConfig};

use crate::{Error, Result};
pub(crate) use fields::read_json as read_json_file;
use fields::Obj;

/// Activation functions facellm implements. `gelu` is the exact erf form (transformers' `GELUActivation`);
/// `silu` (alias `swish`) is x*sigmoid(x). Tanh-approximated GELU variants are refused: they would silently
/// change the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    Silu,
}

impl Activation {
    pub(crate) fn parse(obj: &Obj, key: &str, name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(obj.err(key, format!("unsupported activation `{other}` (supported: gelu (exact erf), silu)"))),
        }
    }
}

/// Vision-tower normalization: `nn.LayerNorm` (weight + bias) or RMSNorm (weight only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    LayerNorm,
    RmsNorm,
}

/// Which of the two supported model layouts a folder holds; it decides the tensor naming (loader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ModelKind {
    InternVl,
    Qwen2,
}

// One config per process: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "model_type")]
pub enum ModelConfig {
    #[serde(rename = "internvl")]
    InternVl(InternVlConfig),
    #[serde(rename = "qwen2")]
    Qwen2(TextConfig),
}

const INTERNVL_ARCH: &str = "InternVLForConditionalGeneration";
const QWEN2_ARCH: &str = "Qwen2ForCausalLM";

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Checkpoint { file: dir.display().to_string(), msg: "model folder not found".into() });
        }
        Self::from_file(dir.join("config.json"))
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = fields::read_json(path)?;
        Self::from_value(&path.display().to_string(), &value)
    }

    /// Parses config text; `file` only labels errors.
    pub fn from_json_str(file: &str, text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config {
            file: file.to_string(),
            field: "(json)".to_string(),
            msg: format!("invalid JSON: {e}"),
        })?;
        Self::from_value(file, &value)
    }

    pub fn from_value(file: &str, value: &serde_json::Value) -> Result<Self> {
        let root = Obj::root(file, value)?;
        let architectures = root.strings("architectures")?;
        let model_type = match root.str_opt("model_type")? {
            Some(t) => t.to_string(),
            // transformers resolves a missing model_type from the architecture name; do the same for ours.
            None if architectures.iter().any(|a| a == INTERNVL_ARCH) => "internvl".to_string(),
            None if architectures.iter().any(|a| a == QWEN2_ARCH) => "qwen2".to_string(),
            None => return Err(root.err("model_type", "missing (expected `internvl` or `qwen2`)")),
        };
        let (config, expected_arch) = match model_type.as_str() {
            "internvl" => (ModelConfig::InternVl(InternVlConfig::parse(&root)?), INTERNVL_ARCH),
            "qwen2" => (ModelConfig::Qwen2(TextConfig::parse(&root)?), QWEN2_ARCH),
            "internvl_chat" => {
                return Err(root.err(
                    "model_type",
                    "`internvl_chat` is the original OpenGVLab format; use the transformers-format `-hf` \
                     checkpoint (model_type `internvl`)",
                ))
            }
            other => {
                return Err(root.err("model_type", format!("unknown model type `{other}` (supported: internvl, qwen2)")))
            }
        };
        // Other heads on the same model type (e.g. Qwen2ForSequenceClassification) have different tensors.
        if !architectures.is_empty() && !architectures.iter().any(|a| a == expected_arch) {
            return Err(root.err(
                "architectures",
                format!(
                    "unsupported architecture {architectures:?} for model_type `{model_type}` \
                     (expected {expected_arch})"
                ),
            ));
        }
        Ok(config)
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            ModelConfig::InternVl(_) => ModelKind::InternVl,
            ModelConfig::Qwen2(_) => ModelKind::Qwen2,
        }
    }

    /// The language model's config (the `text_config` of an InternVL config).
    pub fn text(&self) -> &TextConfig {
        match self {
            ModelConfig::InternVl(c) => &c.text_config,
            ModelConfig::Qwen2(c) => c,
        }
    }

    pub fn vision(&self) -> Option<&VisionConfig> {
        self.internvl().map(|c| &c.vision_config)
    }

    pub fn internvl(&self) -> Option<&InternVlConfig> {
        match self {
            ModelConfig::InternVl(c) => Some(c),
            ModelConfig::Qwen2(_) => None,
        }
    }

    /// Whether `lm_head` may share the input embeddings. facellm always uses a stored `lm_head.weight` when the
    /// checkpoint has one (FaceLLM's is untied and differs from the embeddings); this flag only decides whether
    /// a checkpoint *without* it is acceptable. For InternVL the top-level value counts when the file states
    /// it (v5 behaviour), else `text_config`'s (4.52 behaviour; v5's implicit top-level default `true` is not
    /// applied, so a 4.52-era checkpoint missing its lm_head is an error rather than silently tied).
    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::InternVl(c) => c.tie_word_embeddings.unwrap_or(c.text_config.tie_word_embeddings),
            ModelConfig::Qwen2(c) => c.tie_word_embeddings,
        }
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.text().eos_token_id
    }

    /// The dtype the config says the weights were saved in (`bfloat16` for FaceLLM), if stated.
    pub fn dtype(&self) -> Option<&str> {
        match self {
            ModelConfig::InternVl(c) => c.dtype.as_deref().or(c.text_config.dtype.as_deref()),
            ModelConfig::Qwen2(c) => c.dtype.as_deref(),
        }
    }

    pub fn to_json_pretty(&self) -> String {
        // Serializing plain structs of numbers, strings and enums cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
