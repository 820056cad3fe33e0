//! Bad configs are errors that name the file and the field; none panics.

use std::path::{Path, PathBuf};

use facellm::config::{GenerationConfig, ModelConfig};
use facellm::Error;
use serde_json::{json, Value};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(rel)
}

fn tiny_internvl() -> Value {
    let path = fixture("tiny/vit300m/config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

fn tiny_qwen2() -> Value {
    let path = fixture("tiny/qwen2_tied/config.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

/// Sets `value` at a dotted path ("text_config.hidden_size"); Value::Null removes the key.
fn with(mut cfg: Value, path: &str, value: Value) -> Value {
    let mut node = &mut cfg;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        node = &mut node[*part];
    }
    let last = parts[parts.len() - 1];
    match (node.as_object_mut(), value) {
        (Some(obj), Value::Null) => {
            obj.remove(last);
        }
        (Some(obj), v) => {
            obj.insert(last.to_string(), v);
        }
        (None, _) => panic!("no object at {path}"),
    }
    cfg
}

/// The config must be refused with a Config error naming `field`, and the message must contain `words`.
fn refused(cfg: &Value, field: &str, words: &str) {
    match ModelConfig::from_value("test/config.json", cfg) {
        Err(Error::Config { file, field: f, msg }) => {
            assert_eq!(file, "test/config.json");
            assert_eq!(f, field, "wrong field named; message: {msg}");
            assert!(msg.contains(words), "message for {field} lacks {words:?}: {msg}");
        }
        Err(other) => panic!("{field}: expected a Config error, got {other}"),
        Ok(_) => panic!("{field}: accepted a bad config"),
    }
}

#[test]
fn tiny_fixtures_are_valid() {
    ModelConfig::from_value("vit300m", &tiny_internvl()).expect("vit300m config");
    ModelConfig::from_value("qwen2", &tiny_qwen2()).expect("qwen2 config");
}

#[test]
fn missing_folder_and_file_and_invalid_json() {
    let err = ModelConfig::load("/nonexistent/facellm/model").expect_err("missing folder");
    assert!(err.to_string().contains("/nonexistent/facellm/model"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let err = ModelConfig::load(dir.path()).expect_err("missing config.json");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"internvl\",").expect("write");
    let err = ModelConfig::load(dir.path()).expect_err("invalid json");
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json") && err.to_string().contains("invalid JSON"), "{err}");

    let err = ModelConfig::from_json_str("x.json", "[1, 2]").expect_err("not an object");
    assert!(err.to_string().contains("expected a JSON object"), "{err}");
}

#[test]
fn model_type_and_architecture() {
    refused(&with(tiny_internvl(), "model_type", json!("llava")), "model_type", "unknown model type `llava`");
    refused(&with(tiny_internvl(), "model_type", json!("internvl_chat")), "model_type", "-hf");
    refused(
        &with(with(tiny_internvl(), "model_type", Value::Null), "architectures", Value::Null),
        "model_type",
        "missing",
    );
    refused(
        &with(tiny_internvl(), "architectures", json!(["LlavaForConditionalGeneration"])),
        "architectures",
        "LlavaForConditionalGeneration",
    );
    refused(
        &with(tiny_qwen2(), "architectures", json!(["Qwen2ForSequenceClassification"])),
        "architectures",
        "Qwen2ForSequenceClassification",
    );
    refused(&with(tiny_internvl(), "text_config.model_type", json!("llama")), "text_config.model_type", "llama");
    // A missing model_type is resolved from the architecture, as transformers does.
    let cfg = with(tiny_internvl(), "model_type", Value::Null);
    assert!(ModelConfig::from_value("x", &cfg).is_ok());
}

#[test]
fn head_counts() {
    refused(
        &with(tiny_internvl(), "text_config.num_attention_heads", json!(5)),
        "text_config.num_attention_heads",
        "do not divide hidden_size 32",
    );
    refused(
        &with(tiny_internvl(), "text_config.num_key_value_heads", json!(3)),
        "text_config.num_key_value_heads",
        "do not divide 4",
    );
    refused(
        &with(tiny_internvl(), "text_config.num_key_value_heads", json!(0)),
        "text_config.num_key_value_heads",
        "> 0",
    );
    refused(
        &with(tiny_internvl(), "vision_config.num_attention_heads", json!(5)),
        "vision_config.num_attention_heads",
        "do not divide",
    );
    refused(&with(tiny_qwen2(), "num_attention_heads", json!(3)), "num_attention_heads", "do not divide");
    refused(&with(tiny_qwen2(), "head_dim", json!(7)), "head_dim", "even");
}

#[test]
fn norm_activation_rope() {
    refused(
        &with(tiny_internvl(), "vision_config.norm_type", json!("batch_norm")),
        "vision_config.norm_type",
        "batch_norm",
    );
    refused(
        &with(tiny_internvl(), "vision_config.hidden_act", json!("gelu_pytorch_tanh")),
        "vision_config.hidden_act",
        "gelu_pytorch_tanh",
    );
    refused(&with(tiny_internvl(), "text_config.hidden_act", json!("relu")), "text_config.hidden_act", "relu");
    refused(&with(tiny_internvl(), "projector_hidden_act", json!("quick_gelu")), "projector_hidden_act", "quick_gelu");
    refused(
        &with(tiny_internvl(), "text_config.rope_parameters", json!({"rope_type": "yarn", "factor": 4.0})),
        "text_config.rope_parameters.rope_type",
        "yarn",
    );
    refused(&with(tiny_qwen2(), "rope_scaling", json!({"type": "longrope"})), "rope_scaling.type", "longrope");
    refused(
        &with(tiny_qwen2(), "rope_parameters", json!({"rope_type": "dynamic"})),
        "rope_parameters.factor",
        "required",
    );
    refused(&with(tiny_qwen2(), "rms_norm_eps", json!(0.0)), "rms_norm_eps", "> 0");
    refused(&with(tiny_qwen2(), "use_sliding_window", json!(true)), "use_sliding_window", "not supported");
    refused(
        &with(tiny_qwen2(), "layer_types", json!(["full_attention", "sliding_attention"])),
        "layer_types",
        "sliding_attention",
    );
}

#[test]
fn vision_geometry_and_feature_selection() {
    refused(&with(tiny_internvl(), "vision_config.image_size", json!(50)), "vision_config.image_size", "whole number");
    refused(&with(tiny_internvl(), "vision_config.image_size", json!([56, 28])), "vision_config.image_size", "square");
    refused(&with(tiny_internvl(), "vision_config.image_size", json!(42)), "vision_config.image_size", "even");
    refused(
        &with(tiny_internvl(), "vision_config.image_size", json!([1, 2, 3])),
        "vision_config.image_size",
        "3 values",
    );
    refused(&with(tiny_internvl(), "vision_config.patch_size", json!(0)), "vision_config.patch_size", "> 0");
    refused(&with(tiny_internvl(), "downsample_ratio", json!(0.25)), "downsample_ratio", "0.5 only");
    refused(&with(tiny_internvl(), "vision_feature_layer", json!(-2)), "vision_feature_layer", "-1");
    refused(&with(tiny_internvl(), "vision_feature_layer", json!([-1, -2])), "vision_feature_layer", "list");
    refused(
        &with(tiny_internvl(), "vision_feature_select_strategy", json!("full")),
        "vision_feature_select_strategy",
        "full",
    );
    refused(
        &with(tiny_internvl(), "vision_config.use_mean_pooling", json!(false)),
        "vision_config.use_mean_pooling",
        "layernorm",
    );
    refused(
        &with(tiny_internvl(), "vision_config.use_absolute_position_embeddings", json!(false)),
        "vision_config.use_absolute_position_embeddings",
        "not supported",
    );
    refused(&with(tiny_internvl(), "image_seq_length", json!(256)), "image_seq_length", "gives 4 tokens");
    refused(&with(tiny_internvl(), "image_token_id", json!(512)), "image_token_id", "outside the text vocabulary");
}

#[test]
fn wrong_json_types() {
    refused(
        &with(tiny_internvl(), "text_config.hidden_size", json!("32")),
        "text_config.hidden_size",
        "non-negative integer",
    );
    refused(
        &with(tiny_internvl(), "text_config.hidden_size", json!(32.5)),
        "text_config.hidden_size",
        "non-negative integer",
    );
    refused(
        &with(tiny_internvl(), "text_config.hidden_size", json!(-32)),
        "text_config.hidden_size",
        "non-negative integer",
    );
    refused(&with(tiny_internvl(), "text_config.eos_token_id", json!("501")), "text_config.eos_token_id", "token id");
    refused(
        &with(tiny_internvl(), "text_config.eos_token_id", json!([501, -1])),
        "text_config.eos_token_id",
        "token id",
    );
    refused(
        &with(tiny_internvl(), "vision_config.attention_bias", json!("yes")),
        "vision_config.attention_bias",
        "true or false",
    );
    refused(&with(tiny_internvl(), "text_config", json!([1])), "text_config", "object");
    refused(&with(tiny_internvl(), "vision_config.norm_type", json!(1)), "vision_config.norm_type", "string");
    refused(&with(tiny_internvl(), "text_config.rms_norm_eps", json!("1e-6")), "text_config.rms_norm_eps", "number");
}

#[test]
fn bad_generation_configs() {
    let model = ModelConfig::from_value("m", &tiny_qwen2()).expect("model");
    for (key, value, words) in [
        ("temperature", json!(0.0), "> 0"),
        ("top_p", json!(1.5), "(0, 1]"),
        ("repetition_penalty", json!(-1.0), "> 0"),
        ("num_beams", json!(0), ">= 1"),
        ("top_k", json!(-5), "non-negative integer"),
        ("eos_token_id", json!("x"), "token id"),
        ("do_sample", json!(1), "true or false"),
    ] {
        match GenerationConfig::from_value("g.json", &json!({ key: value }), &model) {
            Err(Error::Config { field, msg, .. }) => {
                assert_eq!(field, key);
                assert!(msg.contains(words), "{key}: {msg}");
            }
            other => panic!("{key}: expected a Config error, got {other:?}"),
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("generation_config.json"), "not json").expect("write");
    let err = GenerationConfig::load(dir.path(), &model).expect_err("invalid json");
    assert!(err.to_string().contains("generation_config.json"), "{err}");
}
