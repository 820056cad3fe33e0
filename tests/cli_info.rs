//! `facellm info` on a real-format checkpoint, model sources (a folder, a hub id found in the local HF
//! cache), and `--device cuda` on a build without CUDA.

use assert_cmd::Command;
use predicates::prelude::*;

fn facellm() -> Command {
    Command::cargo_bin("facellm").unwrap()
}

#[test]
fn info_json_matches_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    facellm::model::random::write_demo_model(dir.path(), "info-test").unwrap();
    let out = facellm()
        .args(["info", "--model", dir.path().to_str().unwrap(), "--output", "json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let info: serde_json::Value = serde_json::from_slice(&out).unwrap();
    // Independent count: every tensor in the safetensors header.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let params: u64 = st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>() as u64).sum();
    assert_eq!(info["total_params"].as_u64().unwrap(), params);
    assert_eq!(info["weights_bytes"].as_u64().unwrap(), 2 * params);
    assert_eq!(info["dtypes"], serde_json::json!({ "BF16": st.len() }));
    assert_eq!(info["architecture"]["class"], "InternVLForConditionalGeneration");
    assert_eq!(info["context_length"], 32768);
    // 4 layers x (k + v) x 2 kv heads x head_dim 16 x 4 bytes (f32 cache).
    assert_eq!(info["memory"]["cpu"]["kv_bytes_per_token"].as_f64().unwrap(), (4 * 2 * 2 * 16 * 4) as f64);
    let sp = &info["tokenizer"]["special_tokens"];
    assert_eq!(sp["eos"]["id"], 151645);
    assert_eq!(sp["image_context"]["id"], 151667);
    let components: Vec<&str> =
        info["components"].as_array().unwrap().iter().map(|c| c["component"].as_str().unwrap()).collect();
    for c in ["vision_tower", "projector", "embed_tokens", "llm_layers", "lm_head"] {
        assert!(components.iter().any(|x| x.contains(c)), "component {c} in {components:?}");
    }
}

#[test]
fn hub_id_is_found_in_the_local_hf_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--Idiap--FaceLLM-tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    facellm::model::random::write_demo_model(&repo.join("snapshots").join(commit), "hub-test").unwrap();
    facellm()
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["info", "--model", "Idiap/FaceLLM-tiny"])
        .assert()
        .success()
        .stdout(predicate::str::contains("InternVLForConditionalGeneration"));
    facellm()
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["info", "--model", "Idiap/not-downloaded"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("not in the Hugging Face cache"))
        .stderr(predicate::str::contains("panicked").not());
}

#[test]
fn device_cuda_without_the_feature_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    facellm::model::random::write_demo_model(dir.path(), "device-test").unwrap();
    facellm()
        .args(["generate", "--model", dir.path().to_str().unwrap(), "--prompt", "x", "--device", "cuda"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no CUDA backend"))
        .stderr(predicate::str::contains("panicked").not());
    facellm()
        .args(["serve", "--model", "demo", "--port", "0", "--device", "cuda"])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .code(1)
        .stderr(predicate::str::contains("no CUDA backend"))
        .stderr(predicate::str::contains("panicked").not());
}
