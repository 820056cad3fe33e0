//! FaceLLM on the backend ops: InternViT (`vision`), pixel shuffle + MLP projector (`projector`), the Qwen2
//! decoder (`llm`) and their composition (`facellm`). Weights come from any `Weights` source by their
//! runtime (transformers >= 4.52) names; the loader maps the legacy on-disk names onto those.

pub mod facellm;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod linear;
pub mod llm;
pub mod projector;
pub mod random;
pub mod vision;

use crate::config::{Activation, ModelConfig, NormType, TextConfig, VisionConfig};
use crate::tensor::Tensor;
use crate::{Error, Result};
use llm::TextParams;
use vision::VisionParams;

/// `<IMG_CONTEXT>` tokens per 448 px tile (32x32 patches, pixel shuffle 0.5).
pub const IMAGE_TOKENS_PER_TILE: usize = 256;

/// Where a model gets its weights from: a checkpoint, or a generated random model.
pub trait Weights {
    /// The tensor called `name` (runtime naming), with its stored dtype.
    fn weight(&self, name: &str) -> Result<Tensor>;
}

/// Fetch `name` and check its shape, so a wrong checkpoint fails at load and never mid-forward.
pub(crate) fn get_shaped(w: &dyn Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = w.weight(name)?;
    if t.shape() != shape {
        return Err(Error::Invalid(format!("tensor `{name}`: expected shape {shape:?}, found {:?}", t.shape())));
    }
    Ok(t)
}

fn unsupported(field: &str, msg: String) -> Error {
    Error::Config { file: "config.json".into(), field: field.into(), msg }
}

impl VisionParams {
    pub fn from_config(c: &VisionConfig) -> Result<VisionParams> {
        if c.hidden_act != Activation::Gelu {
            return Err(unsupported("vision_config.hidden_act", "the vision tower supports gelu only".into()));
        }
        let [h, w] = c.image_size;
        let [ph, pw] = c.patch_size;
        if h != w || ph != pw {
            return Err(unsupported(
                "vision_config.image_size",
                format!("square images and patches only, got {h}x{w} / {ph}x{pw}"),
            ));
        }
        Ok(VisionParams {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            intermediate: c.intermediate_size,
            patch: ph,
            image_size: h,
            rms_norm: c.norm_type == NormType::RmsNorm,
            eps: c.layer_norm_eps as f32,
            qkv_bias: c.attention_bias,
            qk_norm: c.use_qk_norm,
        })
    }
}

impl TextParams {
    pub fn from_config(c: &TextConfig, tie_embeddings: bool) -> Result<TextParams> {
        if c.hidden_act != Activation::Silu {
            return Err(unsupported("text_config.hidden_act", "the Qwen2 MLP supports silu only".into()));
        }
        Ok(TextParams {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            rope_theta: c.rope.rope_theta,
            rope_scaling: c.rope.scaling,
            max_position: c.max_position_embeddings,
            tie_embeddings,
        })
    }
}

/// The model a config describes, with its weights from `w`.
pub fn build(config: &ModelConfig, w: &dyn Weights) -> Result<facellm::FaceLlm> {
    let text = TextParams::from_config(config.text(), config.tie_word_embeddings())?;
    match config.internvl() {
        Some(ivl) => {
            if ivl.projector_hidden_act != Activation::Gelu {
                return Err(unsupported("projector_hidden_act", "the projector supports gelu only".into()));
            }
            let vision = VisionParams::from_config(&ivl.vision_config)?;
            facellm::FaceLlm::load(w, Some(&vision), &text, ivl.image_token_id)
        }
        None => facellm::FaceLlm::load(w, None, &text, u32::MAX),
    }
}

/// Loads, validates and builds the model in `dir` (config.json + safetensors).
pub fn load_dir(dir: &std::path::Path) -> Result<(ModelConfig, facellm::FaceLlm)> {
    let (config, ckpt) = crate::loader::open_model(dir)?;
    let model = build(&config, &ckpt)?;
    Ok((config, model))
}
