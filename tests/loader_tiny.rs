//! Tiny checkpoints written by transformers' own save_pretrained (tools/fixtures_config.py): the tensor list a
//! config implies equals what HF wrote, and every on-disk layout (single / sharded, legacy / runtime names)
//! yields the same tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use facellm::config::ModelConfig;
use facellm::loader::{canonical_name, expected_tensors, open_model, Checkpoint, Component, DType};
use half::bf16;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/tiny").join(rel)
}

/// hf_tensors.json as {canonical name: shape}, checking every dtype is BF16.
fn hf_tensors(name: &str, cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let path = fixture(name).join("hf_tensors.json");
    let list: Vec<(String, Vec<usize>, String)> =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("hf_tensors.json");
    list.into_iter()
        .map(|(n, shape, dtype)| {
            assert_eq!(dtype, "BF16", "{n}");
            (canonical_name(cfg.kind(), &n), shape)
        })
        .collect()
}

#[test]
fn expected_tensors_equal_what_transformers_wrote() {
    for name in ["vit300m", "vit6b", "qwen2_tied"] {
        let cfg = ModelConfig::load(fixture(name)).expect("config");
        let hf = hf_tensors(name, &cfg);
        let exp = expected_tensors(&cfg);
        let mut ours: BTreeMap<String, Vec<usize>> = exp.required.iter().cloned().collect();
        // Optional tensors (tied lm_head) count only when HF stored them.
        for (n, s) in &exp.optional {
            if hf.contains_key(n) {
                ours.insert(n.clone(), s.clone());
            }
        }
        let only_ours: Vec<_> = ours.keys().filter(|k| !hf.contains_key(*k)).collect();
        let only_hf: Vec<_> = hf.keys().filter(|k| !ours.contains_key(*k)).collect();
        assert!(only_ours.is_empty() && only_hf.is_empty(), "{name}: only ours {only_ours:?}, only HF {only_hf:?}");
        for (n, s) in &hf {
            assert_eq!(&ours[n], s, "{name}: shape of {n}");
        }
        assert_eq!(ours.len(), exp.required.len() + exp.optional.iter().filter(|(n, _)| hf.contains_key(n)).count());
    }
}

#[test]
fn variant_specific_tensors() {
    let exp300 = expected_tensors(&ModelConfig::load(fixture("vit300m")).expect("config"));
    let names300: Vec<&str> = exp300.required.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names300.contains(&"model.vision_tower.encoder.layer.1.attention.q_proj.bias"));
    assert!(names300.contains(&"model.vision_tower.encoder.layer.0.layernorm_after.bias"));
    assert!(!names300.iter().any(|n| n.contains("q_norm")));

    let exp6b = expected_tensors(&ModelConfig::load(fixture("vit6b")).expect("config"));
    let names6b: Vec<&str> = exp6b.required.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names6b.contains(&"model.vision_tower.encoder.layer.1.attention.k_norm.weight"));
    assert!(!names6b.iter().any(|n| n.contains("attention.q_proj.bias") && n.contains("vision")));
    assert!(!names6b.iter().any(|n| n.contains("layernorm_before.bias")));
    assert!(exp6b.optional.is_empty(), "untied: lm_head is required");

    let tied = expected_tensors(&ModelConfig::load(fixture("qwen2_tied")).expect("config"));
    assert_eq!(tied.optional, vec![("lm_head.weight".to_string(), vec![512, 32])]);
}

#[test]
fn every_layout_opens_validates_and_holds_identical_tensors() {
    for group in [&["vit300m", "vit300m_sharded", "vit300m_runtime"][..], &["vit6b", "vit6b_runtime_sharded"][..]] {
        let opened: Vec<(ModelConfig, Checkpoint)> =
            group.iter().map(|n| open_model(fixture(n)).unwrap_or_else(|e| panic!("{n}: {e}"))).collect();
        let (cfg0, base) = &opened[0];
        assert_eq!(base.len(), expected_tensors(cfg0).required.len());
        for ((cfg, ckpt), name) in opened.iter().zip(group.iter()) {
            assert_eq!(cfg, cfg0, "{name}: config");
            assert_eq!(ckpt.names().collect::<Vec<_>>(), base.names().collect::<Vec<_>>(), "{name}: names");
            for n in base.names() {
                let (a, b) = (base.tensor(n).expect("base"), ckpt.tensor(n).expect("other"));
                assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{name}: {n}");
                assert!(a.bytes == b.bytes, "{name}: {n} bytes differ");
            }
        }
    }
    let (_, sharded) = open_model(fixture("vit300m_sharded")).expect("sharded");
    assert_eq!(sharded.files().count(), 2);
    assert_eq!(sharded.stored_name("lm_head.weight"), Some("language_model.lm_head.weight"));
    let (_, runtime) = open_model(fixture("vit300m_runtime")).expect("runtime");
    assert_eq!(runtime.stored_name("lm_head.weight"), Some("lm_head.weight"));
}

#[test]
fn tied_qwen2_uses_embeddings_as_lm_head() {
    let (cfg, ckpt) = open_model(fixture("qwen2_tied")).expect("qwen2_tied");
    assert!(cfg.tie_word_embeddings());
    assert!(ckpt.get("lm_head.weight").is_none());
    let head = ckpt.lm_head().expect("lm_head");
    assert_eq!(head.name, "model.language_model.embed_tokens.weight");
    assert_eq!(ckpt.stored_name(head.name), Some("model.embed_tokens.weight"));
    assert_eq!(head.shape, &[512, 32]);
}

#[test]
fn conversions_agree() {
    let (_, ckpt) = open_model(fixture("vit300m")).expect("vit300m");
    let t = ckpt.tensor("model.vision_tower.embeddings.patch_embeddings.projection.weight").expect("tensor");
    assert_eq!((t.dtype, t.numel()), (DType::BF16, 32 * 3 * 14 * 14));
    assert_eq!(t.bytes.len(), t.numel() * 2);
    assert!(t.file.ends_with("model.safetensors"));
    let f = t.to_f32_vec();
    let b = t.to_bf16_vec();
    assert_eq!(f.len(), t.numel());
    for (i, (x, y)) in f.iter().zip(&b).enumerate() {
        assert_eq!(*x, y.to_f32(), "element {i}");
    }
    assert!(f.iter().any(|v| *v != 0.0) && f.iter().all(|v| v.is_finite()));
    if let Some(s) = t.as_bf16_slice() {
        assert_eq!(s, b.as_slice());
    }
    let manual = bf16::from_bits(u16::from_le_bytes([t.bytes[0], t.bytes[1]])).to_f32();
    assert_eq!(f[0], manual);
}

#[test]
fn summary_of_checkpoint_equals_config_count() {
    for name in ["vit300m", "vit6b", "qwen2_tied"] {
        let (cfg, ckpt) = open_model(fixture(name)).expect("open");
        let stored = ckpt.summary();
        assert_eq!(stored, expected_tensors(&cfg).summary(2), "{name}");
        assert_eq!(stored.total_bytes, stored.total_params * 2);
        let on_disk: u64 = ckpt.names().map(|n| ckpt.tensor(n).map_or(0, |t| t.bytes.len() as u64)).sum();
        assert_eq!(stored.total_bytes, on_disk, "{name}");
        assert_eq!(stored.get(Component::LmHead).is_some(), name != "qwen2_tied", "{name}");
        assert_eq!(stored.get(Component::Other), None, "{name}");
    }
}
