//! Configs parse to what transformers 5.17 fills in (fixtures recorded by tools/fixtures_config.py): every
//! field facellm exposes is serialized under transformers' name and compared with HF's loaded attributes.

use std::path::{Path, PathBuf};

use facellm::config::{Activation, GenerationConfig, ModelConfig, ModelKind, NormType, RopeScaling};
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config").join(rel)
}

fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn same_number(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Compares every key of `ours` with the same key of `hf`; `path` names the place in failure messages.
fn compare(ours: &Value, hf: &Value, path: &str, diffs: &mut Vec<String>) {
    let (Value::Object(o), Value::Object(h)) = (ours, hf) else {
        diffs.push(format!("{path}: ours {ours} vs hf {hf}"));
        return;
    };
    for (key, ov) in o {
        let p = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        let hv = h.get(key).unwrap_or(&Value::Null);
        match key.as_str() {
            // Ours is always a list; HF keeps what the file had (int, list or null).
            "eos_token_id" => {
                let hf_list = match hv {
                    Value::Null => Value::Array(vec![]),
                    Value::Array(_) => hv.clone(),
                    one => Value::Array(vec![one.clone()]),
                };
                if *ov != hf_list {
                    diffs.push(format!("{p}: ours {ov} vs hf {hv}"));
                }
            }
            // HF only has head_dim when the file sets it; otherwise modeling uses hidden / heads.
            "head_dim" if hv.is_null() => {
                let want = h["hidden_size"].as_u64().unwrap_or(0) / h["num_attention_heads"].as_u64().unwrap_or(1);
                if ov.as_u64() != Some(want) {
                    diffs.push(format!("{p}: ours {ov} vs hidden/heads {want}"));
                }
            }
            // Top-level InternVL tie flag: ours is None when the file does not state it (v5 then says true).
            "tie_word_embeddings" if ov.is_null() => {}
            _ => match (ov, hv) {
                (Value::Object(_), _) => compare(ov, hv, &p, diffs),
                (Value::Number(_), Value::Number(_)) if same_number(ov, hv) => {}
                _ if ov == hv => {}
                _ => diffs.push(format!("{p}: ours {ov} vs hf {hv}")),
            },
        }
    }
}

fn check_against_hf(rel: &str) -> ModelConfig {
    let dir = fixture(rel);
    let cfg = ModelConfig::load(&dir).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let ours = serde_json::to_value(&cfg).expect("serialize");
    let hf = read(&dir.join("hf_loaded.json"));
    let mut diffs = Vec::new();
    compare(&ours, &hf, "", &mut diffs);
    assert!(diffs.is_empty(), "{rel}: fields differing from transformers:\n  {}", diffs.join("\n  "));
    // What `facellm info` prints must parse back to the same config.
    let again = ModelConfig::from_json_str("roundtrip", &cfg.to_json_pretty()).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(again, cfg, "{rel}: serialize/parse round trip changed the config");
    cfg
}

#[test]
fn full_internvl3_configs_match_transformers() {
    for (name, hidden, layers, heads, kv, vheads, vlayers, norm) in [
        ("internvl3_1b", 896, 24, 14, 2, 16, 24, NormType::LayerNorm),
        ("internvl3_8b", 3584, 28, 28, 4, 16, 24, NormType::LayerNorm),
        ("internvl3_38b", 5120, 64, 40, 8, 25, 45, NormType::RmsNorm),
    ] {
        let cfg = check_against_hf(&format!("full/{name}"));
        assert_eq!(cfg.kind(), ModelKind::InternVl);
        let t = cfg.text();
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads),
            (hidden, layers, heads, kv)
        );
        assert_eq!(t.head_dim, hidden / heads);
        assert_eq!(t.vocab_size, 151_674);
        assert_eq!(t.rope.rope_theta, 1e6);
        assert_eq!(t.rope.scaling, RopeScaling::Dynamic { factor: 2.0 });
        assert_eq!(t.eos_token_id, vec![151_645]);
        assert_eq!(t.hidden_act, Activation::Silu);
        let v = cfg.vision().expect("vision config");
        assert_eq!((v.num_attention_heads, v.num_hidden_layers, v.norm_type), (vheads, vlayers, norm));
        assert_eq!(v.num_positions(), 1025);
        let top = cfg.internvl().expect("internvl");
        assert_eq!(top.tokens_per_tile(), 256);
        assert_eq!(top.image_token_id, 151_667);
        assert!(!cfg.tie_word_embeddings());
        assert_eq!(cfg.dtype(), Some("bfloat16"));
    }
}

#[test]
fn qwen2_text_only_config_matches_transformers() {
    let cfg = check_against_hf("full/qwen2_5_0_5b_instruct");
    assert_eq!(cfg.kind(), ModelKind::Qwen2);
    assert!(cfg.vision().is_none());
    assert!(cfg.tie_word_embeddings());
    assert_eq!(cfg.text().sliding_window, None, "transformers nulls sliding_window when it is off");
}

#[test]
fn partial_configs_get_transformers_defaults() {
    for name in
        ["hub452_internvl3_1b", "internvl_bare", "internvl_sparse", "qwen2_kv_null", "qwen2_rope_linear", "qwen2_bare"]
    {
        check_against_hf(&format!("partial/{name}"));
    }
}

#[test]
fn partial_config_details() {
    // 4.52 spelling: rope_theta + rope_scaling{type, rope_type}, torch_dtype, no top-level tie flag.
    let hub = ModelConfig::load(fixture("partial/hub452_internvl3_1b")).expect("hub452");
    assert_eq!(hub.text().rope.scaling, RopeScaling::Dynamic { factor: 2.0 });
    assert_eq!(hub.dtype(), Some("bfloat16"));
    assert!(!hub.tie_word_embeddings(), "text_config decides when the top level is silent");

    let sparse = ModelConfig::load(fixture("partial/internvl_sparse")).expect("sparse");
    assert_eq!(sparse.text().num_key_value_heads, 32, "absent kv heads take the default 32, not the head count");
    assert_eq!(sparse.vision().map(|v| v.image_size), Some([224, 224]));
    assert_eq!(sparse.eos_token_ids(), &[151_645, 151_643]);
    assert_eq!(sparse.dtype(), Some("float16"), "dtype wins over torch_dtype");

    let kv_null = ModelConfig::load(fixture("partial/qwen2_kv_null")).expect("kv_null");
    assert_eq!(kv_null.text().num_key_value_heads, 8, "explicit null falls back to the head count");

    let linear = ModelConfig::load(fixture("partial/qwen2_rope_linear")).expect("linear");
    let t = linear.text();
    assert_eq!(t.rope.scaling, RopeScaling::Linear { factor: 4.0 });
    assert_eq!((t.head_dim, t.q_dim(), t.kv_dim(), t.kv_groups()), (32, 128, 32, 4));
}

#[test]
fn generation_configs_fill_transformers_generate_defaults() {
    let model = ModelConfig::load(fixture("full/internvl3_1b")).expect("model");
    for name in ["internvl3_hf", "qwen2_5_instruct", "empty", "lengths"] {
        let dir = fixture(&format!("generation/{name}"));
        let g = GenerationConfig::load(&dir, &model).unwrap_or_else(|e| panic!("{name}: {e}"));
        let hf = read(&dir.join("hf_loaded.json"));
        let defaults = &hf["_hf_generate_defaults"];
        let or_default = |key: &str| if hf[key].is_null() { defaults[key].clone() } else { hf[key].clone() };
        assert_eq!(g.do_sample, or_default("do_sample").as_bool().unwrap_or(false), "{name}: do_sample");
        assert_eq!(Some(g.temperature), or_default("temperature").as_f64(), "{name}: temperature");
        assert_eq!(Some(g.top_k as u64), or_default("top_k").as_u64(), "{name}: top_k");
        assert_eq!(Some(g.top_p), or_default("top_p").as_f64(), "{name}: top_p");
        assert_eq!(Some(g.repetition_penalty), or_default("repetition_penalty").as_f64(), "{name}: repetition_penalty");
        assert_eq!(Some(g.num_beams as u64), or_default("num_beams").as_u64(), "{name}: num_beams");
        assert_eq!(g.max_new_tokens.map(|n| n as u64), hf["max_new_tokens"].as_u64(), "{name}: max_new_tokens");
        assert_eq!(g.max_length.map(|n| n as u64), hf["max_length"].as_u64(), "{name}: max_length");
        // Ids the file lacks come from the model config (151645 / 151643 for InternVL3).
        let eos: Vec<u32> = match &hf["eos_token_id"] {
            Value::Null => model.eos_token_ids().to_vec(),
            Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            v => vec![v.as_u64().unwrap_or(0) as u32],
        };
        assert_eq!(g.eos_token_ids, eos, "{name}: eos");
        let bos = hf["bos_token_id"].as_u64().map(|v| v as u32).or(model.text().bos_token_id);
        assert_eq!(g.bos_token_id, bos, "{name}: bos");
    }
}

#[test]
fn generation_config_absent_uses_model_ids_and_greedy() {
    let model = ModelConfig::load(fixture("full/internvl3_1b")).expect("model");
    let dir = tempfile::tempdir().expect("tempdir");
    let g = GenerationConfig::load(dir.path(), &model).expect("defaults");
    assert_eq!(g.eos_token_ids, vec![151_645]);
    assert_eq!(g.bos_token_id, Some(151_643));
    assert!(!g.do_sample);
    assert_eq!((g.top_k, g.top_p, g.temperature, g.num_beams), (50, 1.0, 1.0, 1));
    assert_eq!((g.max_new_tokens, g.max_length), (None, None));
}
