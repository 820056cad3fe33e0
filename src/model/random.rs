//! Deterministic random weights, for the demo, benchmarks and the model tests.
//!
//! The recipe (tests/fixtures/model/RECIPE.md, `facellm-fixture-v1`) is shared with the Python script that
//! records HF's outputs, so a test can rebuild the reference's checkpoint bit for bit instead of committing
//! it: tensor seed = FNV-1a-64 of a namespaced name, values = splitmix64 stream -> uniform [-1, 1) ->
//! `offset + amp * u` in f32 -> bf16 (round to nearest even). Amplitudes keep activations O(1) at any width.

use std::path::Path;

use half::bf16;

use crate::config::ModelConfig;
use crate::loader::expected_tensors;
use crate::{Error, Result};

pub const RECIPE_VERSION: &str = "facellm-fixture-v1";

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Seed of tensor `name` of model `case` under the recipe.
pub fn tensor_seed(case: &str, name: &str) -> u64 {
    fnv1a64(format!("{RECIPE_VERSION}/{case}/{name}").as_bytes())
}

/// Element `i` of the stream: splitmix64's `(i+1)`-th output from state `seed`, as `u` in [-1, 1) (exact).
pub fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let k = (z >> 40) as i64;
    (k - (1 << 23)) as f32 * (2.0f32).powi(-23)
}

/// `n` recipe values: `bf16(offset + amp * u_i)`, each f32 operation rounded separately (no FMA).
pub fn values_bf16(seed: u64, n: usize, amp: f32, offset: f32) -> Vec<bf16> {
    (0..n as u64)
        .map(|i| {
            let mut v = amp * uniform(seed, i);
            if offset != 0.0 {
                v += offset;
            }
            bf16::from_f32(v)
        })
        .collect()
}

/// Per-model knobs of the recipe.
#[derive(Debug, Clone, Copy)]
pub struct RecipeGains {
    pub embed_amp: f64,
    pub lm_head_gain: f64,
    pub projector_gain: f64,
}

impl Default for RecipeGains {
    fn default() -> Self {
        RecipeGains { embed_amp: 1.0, lm_head_gain: 4.0, projector_gain: 0.5 }
    }
}

/// `(offset, amp)` of a tensor (runtime name) under the recipe; amplitudes computed in f64, then rounded.
pub fn rule(name: &str, shape: &[usize], g: &RecipeGains) -> Result<(f32, f32)> {
    let lin = |fan_in: usize, gain: f64| Ok((0.0f32, (gain * (3.0 / fan_in as f64).sqrt()) as f32));
    let parts: Vec<&str> = name.split('.').collect();
    let last = *parts.last().unwrap_or(&"");
    let parent = if parts.len() >= 2 { parts[parts.len() - 2] } else { "" };
    if name.ends_with("embeddings.cls_token") {
        return Ok((0.0, 1.0));
    }
    if name.ends_with("embeddings.position_embeddings") {
        return Ok((0.0, 0.5));
    }
    if name.ends_with("patch_embeddings.projection.weight") && shape.len() == 4 {
        return lin(shape[1] * shape[2] * shape[3], 1.0);
    }
    if last == "lambda_1" || last == "lambda_2" {
        return Ok((0.55, 0.45));
    }
    if parent.contains("norm") {
        return Ok(if last == "weight" { (1.0, 0.1) } else { (0.0, 0.1) });
    }
    if name.ends_with("embed_tokens.weight") {
        return Ok((0.0, g.embed_amp as f32));
    }
    if name.ends_with("multi_modal_projector.linear_2.weight") && shape.len() == 2 {
        return lin(shape[1], g.projector_gain);
    }
    if name.ends_with("lm_head.weight") && shape.len() == 2 {
        return lin(shape[1], g.lm_head_gain);
    }
    if last == "bias" {
        return Ok((0.0, 0.1));
    }
    if last == "weight" && shape.len() == 2 {
        return lin(shape[1], 1.0);
    }
    Err(Error::Invalid(format!("no random-weight rule for tensor `{name}` {shape:?}")))
}

/// Writes `config.json` and a bf16 `model.safetensors` with recipe weights for every tensor the config
/// implies (runtime names), seeded under `case`.
pub fn write_random_model(dir: &Path, config_json: &str, case: &str, g: &RecipeGains) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config_json).map_err(|e| Error::io(&config_path, e))?;
    let config = ModelConfig::from_file(&config_path)?;
    let expected = expected_tensors(&config);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(expected.required.len());
    for (name, shape) in &expected.required {
        let (offset, amp) = rule(name, shape, g)?;
        let n: usize = shape.iter().product();
        let vals = values_bf16(tensor_seed(case, name), n, amp, offset);
        let stored = crate::loader::names::stored_name(config.kind(), name);
        data.push((stored, shape.clone(), bytemuck::cast_slice(&vals).to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path)
        .map_err(|e| Error::Checkpoint { file: path.display().to_string(), msg: e.to_string() })
}

/// The configuration of the demo model: FaceLLM's architecture and geometry (448 px tiles, 256 tokens per
/// tile, the full 151674-token vocabulary, untied lm_head) at a width that runs in seconds on any CPU.
pub fn demo_config_json() -> String {
    serde_json::json!({
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": 256,
        "image_token_id": 151667,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
            "image_size": [448, 448], "patch_size": [14, 14], "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6, "attention_bias": true, "use_qk_norm": false, "hidden_act": "gelu",
            "use_mean_pooling": true, "use_absolute_position_embeddings": true
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 151674, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0},
            "tie_word_embeddings": false, "bos_token_id": 151643, "eos_token_id": 151645
        }
    })
    .to_string()
}

/// The demo configuration in the shapes the CUDA kernels take: head dims of 64 in the vision tower (2 heads)
/// and the language model (2 query heads, 1 kv head), no RoPE scaling; otherwise the demo model.
pub fn demo_config_json_gpu() -> String {
    let mut v: serde_json::Value = serde_json::from_str(&demo_config_json()).unwrap_or_default();
    v["vision_config"]["num_attention_heads"] = 2.into();
    let t = &mut v["text_config"];
    t["num_attention_heads"] = 2.into();
    t["num_key_value_heads"] = 1.into();
    if let Some(m) = t.as_object_mut() {
        m.remove("rope_scaling");
    }
    v.to_string()
}

/// Writes a complete model folder (config, generation config, random bf16 weights, the bundled InternVL3
/// tokenizer) with the demo architecture; `seed_name` namespaces the weights.
pub fn write_demo_model(dir: &Path, seed_name: &str) -> Result<()> {
    write_demo_model_with(dir, seed_name, &demo_config_json())
}

/// `write_demo_model` with another configuration (`demo_config_json_gpu` for the GPU).
pub fn write_demo_model_with(dir: &Path, seed_name: &str, config_json: &str) -> Result<()> {
    write_random_model(dir, config_json, seed_name, &RecipeGains::default())?;
    let gen = dir.join("generation_config.json");
    std::fs::write(&gen, r#"{"bos_token_id": 151643, "eos_token_id": 151645}"#).map_err(|e| Error::io(&gen, e))?;
    crate::tokenizer::write_internvl3_files(dir)
}

/// Recipe weights made on request, never written to disk: for benchmarks of real-size shapes.
pub struct RandomWeights {
    case: String,
    gains: RecipeGains,
    shapes: std::collections::HashMap<String, Vec<usize>>,
}

impl RandomWeights {
    /// Every tensor `config` implies, seeded under `case`.
    pub fn for_config(config: &ModelConfig, case: &str) -> RandomWeights {
        let shapes = expected_tensors(config).required.into_iter().collect();
        RandomWeights { case: case.to_string(), gains: RecipeGains::default(), shapes }
    }
}

impl crate::model::Weights for RandomWeights {
    fn weight(&self, name: &str) -> Result<crate::tensor::Tensor> {
        let shape = self.shapes.get(name).ok_or_else(|| Error::Invalid(format!("no tensor `{name}` in this model")))?;
        let (offset, amp) = rule(name, shape, &self.gains)?;
        let n = shape.iter().product();
        crate::tensor::Tensor::from_bf16(shape.clone(), values_bf16(tensor_seed(&self.case, name), n, amp, offset))
    }
}

/// Full-size InternVL configs with the published shapes (MODEL_SPEC §1): `1b`, `8b` or `38b`.
pub fn published_config_json(size: &str) -> Result<String> {
    let (vision, text) = match size {
        "1b" => ((1024, 24, 16, 4096, "layer_norm", true, false), (896, 24, 14, 2, 4864)),
        "8b" => ((1024, 24, 16, 4096, "layer_norm", true, false), (3584, 28, 28, 4, 18944)),
        "38b" => ((3200, 45, 25, 12800, "rms_norm", false, true), (5120, 64, 40, 8, 27648)),
        other => return Err(Error::Invalid(format!("unknown model size `{other}` (expected 1b, 8b or 38b)"))),
    };
    let (vh, vl, vheads, vi, norm, bias, qk) = vision;
    let (d, l, heads, kv, f) = text;
    Ok(serde_json::json!({
        "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
        "downsample_ratio": 0.5, "image_seq_length": 256, "image_token_id": 151667,
        "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": vh, "num_hidden_layers": vl, "num_attention_heads": vheads,
            "intermediate_size": vi, "image_size": [448, 448], "patch_size": [14, 14], "norm_type": norm,
            "layer_norm_eps": 1e-6, "attention_bias": bias, "use_qk_norm": qk, "hidden_act": "gelu",
            "use_mean_pooling": true
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": 151674, "hidden_size": d, "intermediate_size": f,
            "num_hidden_layers": l, "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": false, "bos_token_id": 151643, "eos_token_id": 151645
        }
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn recipe_test_vector_lambda() {
        // RECIPE.md: vit300m layer.0.lambda_1.
        let seed = tensor_seed("vit300m", "model.vision_tower.encoder.layer.0.lambda_1");
        assert_eq!(seed, 0xc5f55f8c50943345);
        let v = values_bf16(seed, 4, 0.45, 0.55);
        let bits: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3e0b, 0x3f0c, 0x3e6c, 0x3f05]);
    }
}
