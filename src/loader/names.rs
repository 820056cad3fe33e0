//! Tensor naming: the canonical names facellm uses, the on-disk spellings mapped onto them, and the tensor
//! list a config implies (MODEL_SPEC §2).
//!
//! Canonical names are InternVL's runtime (module-tree) names for every model kind:
//! `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`.
//! On disk:
//! - InternVL runtime names pass through unchanged.
//! - InternVL legacy names (transformers 4.52-4.5x save_pretrained, and 5.17's too: it reverts its load-time
//!   renaming when saving) map as `language_model.model.` -> `model.language_model.`,
//!   `language_model.lm_head.` -> `lm_head.`, `vision_tower.` -> `model.vision_tower.`,
//!   `multi_modal_projector.` -> `model.multi_modal_projector.`.
//! - Text-only Qwen2ForCausalLM `model.*` maps to `model.language_model.*` so the language model reads the
//!   same names whichever folder it came from; `lm_head.weight` stays.

use crate::config::{ModelConfig, ModelKind, NormType};

pub const VISION_PREFIX: &str = "model.vision_tower.";
pub const PROJECTOR_PREFIX: &str = "model.multi_modal_projector.";
pub const LLM_PREFIX: &str = "model.language_model.";
pub const LM_HEAD: &str = "lm_head.weight";
pub const EMBED_TOKENS: &str = "model.language_model.embed_tokens.weight";

const INTERNVL_LEGACY: [(&str, &str); 4] = [
    ("language_model.model.", LLM_PREFIX),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", VISION_PREFIX),
    ("multi_modal_projector.", PROJECTOR_PREFIX),
];

pub fn canonical_name(kind: ModelKind, stored: &str) -> String {
    let rules: &[(&str, &str)] = match kind {
        ModelKind::InternVl => &INTERNVL_LEGACY,
        ModelKind::Qwen2 => &[("model.", LLM_PREFIX)],
    };
    for (from, to) in rules {
        if let Some(rest) = stored.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    stored.to_string()
}

/// The name transformers writes for canonical `name` in a checkpoint of `kind`: runtime names for InternVL
/// (the loader reads both styles), `model.*` for text-only Qwen2.
pub fn stored_name(kind: ModelKind, name: &str) -> String {
    match (kind, name.strip_prefix(LLM_PREFIX)) {
        (ModelKind::Qwen2, Some(rest)) => format!("model.{rest}"),
        _ => name.to_string(),
    }
}

/// Stored tensors that are skipped rather than refused: rotary `inv_freq` buffers that older Qwen2/Llama
/// exports saved; facellm recomputes them from the config.
pub fn is_ignored(stored: &str) -> bool {
    stored.ends_with("rotary_emb.inv_freq")
}

/// The tensors a config implies, with shapes, in module order.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// Must all be present with these shapes.
    pub required: Vec<(String, Vec<usize>)>,
    /// May be present (then with this shape): `lm_head.weight` when embeddings are tied.
    pub optional: Vec<(String, Vec<usize>)>,
}

pub fn expected_tensors(cfg: &ModelConfig) -> Expected {
    let mut required = Vec::new();
    if let ModelConfig::InternVl(c) = cfg {
        push_vision(&mut required, c);
    }
    push_llm(&mut required, cfg);
    let head = (LM_HEAD.to_string(), vec![cfg.text().vocab_size, cfg.text().hidden_size]);
    let mut optional = Vec::new();
    if cfg.tie_word_embeddings() {
        optional.push(head);
    } else {
        required.push(head);
    }
    Expected { required, optional }
}

fn push_vision(out: &mut Vec<(String, Vec<usize>)>, c: &crate::config::InternVlConfig) {
    let v = &c.vision_config;
    let h = v.hidden_size;
    let p = |s: &str| format!("{VISION_PREFIX}{s}");
    out.push((p("embeddings.cls_token"), vec![1, 1, h]));
    if v.use_mask_token {
        out.push((p("embeddings.mask_token"), vec![1, 1, h]));
    }
    out.push((
        p("embeddings.patch_embeddings.projection.weight"),
        vec![h, v.num_channels, v.patch_size[0], v.patch_size[1]],
    ));
    out.push((p("embeddings.patch_embeddings.projection.bias"), vec![h]));
    out.push((p("embeddings.position_embeddings"), vec![1, v.num_positions(), h]));
    for i in 0..v.num_hidden_layers {
        let l = |s: &str| p(&format!("encoder.layer.{i}.{s}"));
        for proj in ["q_proj", "k_proj", "v_proj"] {
            out.push((l(&format!("attention.{proj}.weight")), vec![h, h]));
            if v.attention_bias {
                out.push((l(&format!("attention.{proj}.bias")), vec![h]));
            }
        }
        if v.use_qk_norm {
            out.push((l("attention.q_norm.weight"), vec![h]));
            out.push((l("attention.k_norm.weight"), vec![h]));
        }
        out.push((l("attention.projection_layer.weight"), vec![h, h]));
        out.push((l("attention.projection_layer.bias"), vec![h]));
        out.push((l("mlp.fc1.weight"), vec![v.intermediate_size, h]));
        out.push((l("mlp.fc1.bias"), vec![v.intermediate_size]));
        out.push((l("mlp.fc2.weight"), vec![h, v.intermediate_size]));
        out.push((l("mlp.fc2.bias"), vec![h]));
        for norm in ["layernorm_before", "layernorm_after"] {
            out.push((l(&format!("{norm}.weight")), vec![h]));
            if v.norm_type == NormType::LayerNorm {
                out.push((l(&format!("{norm}.bias")), vec![h]));
            }
        }
        out.push((l("lambda_1"), vec![h]));
        out.push((l("lambda_2"), vec![h]));
    }
    let d_in = c.projector_in_dim();
    let d = c.text_config.hidden_size;
    let m = |s: &str| format!("{PROJECTOR_PREFIX}{s}");
    out.push((m("layer_norm.weight"), vec![d_in]));
    out.push((m("layer_norm.bias"), vec![d_in]));
    out.push((m("linear_1.weight"), vec![d, d_in]));
    out.push((m("linear_1.bias"), vec![d]));
    out.push((m("linear_2.weight"), vec![d, d]));
    out.push((m("linear_2.bias"), vec![d]));
}

fn push_llm(out: &mut Vec<(String, Vec<usize>)>, cfg: &ModelConfig) {
    let t = cfg.text();
    let d = t.hidden_size;
    let p = |s: &str| format!("{LLM_PREFIX}{s}");
    out.push((EMBED_TOKENS.to_string(), vec![t.vocab_size, d]));
    for j in 0..t.num_hidden_layers {
        let l = |s: &str| p(&format!("layers.{j}.{s}"));
        out.push((l("self_attn.q_proj.weight"), vec![t.q_dim(), d]));
        out.push((l("self_attn.q_proj.bias"), vec![t.q_dim()]));
        out.push((l("self_attn.k_proj.weight"), vec![t.kv_dim(), d]));
        out.push((l("self_attn.k_proj.bias"), vec![t.kv_dim()]));
        out.push((l("self_attn.v_proj.weight"), vec![t.kv_dim(), d]));
        out.push((l("self_attn.v_proj.bias"), vec![t.kv_dim()]));
        out.push((l("self_attn.o_proj.weight"), vec![d, t.q_dim()]));
        out.push((l("mlp.gate_proj.weight"), vec![t.intermediate_size, d]));
        out.push((l("mlp.up_proj.weight"), vec![t.intermediate_size, d]));
        out.push((l("mlp.down_proj.weight"), vec![d, t.intermediate_size]));
        out.push((l("input_layernorm.weight"), vec![d]));
        out.push((l("post_attention_layernorm.weight"), vec![d]));
    }
    out.push((p("norm.weight"), vec![d]));
}
