//! The `facellm` binary as a user runs it: demo, generate (text and JSON agree), and the bad inputs that
//! must give one readable line and exit code 1 (2 for usage errors), never a panic.

use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

#[path = "support/png.rs"]
mod png;
use png::png_header_only;

fn facellm() -> Command {
    Command::cargo_bin("facellm").unwrap()
}

fn demo_model(dir: &Path) {
    facellm::model::random::write_demo_model(dir, "cli-test").unwrap();
}

fn face() -> String {
    format!("{}/assets/demo/pd_astronaut_eileen_collins.jpg", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn demo_runs_and_says_the_weights_are_random() {
    facellm()
        .arg("demo")
        .assert()
        .success()
        .stdout(predicate::str::contains("RANDOM weights"))
        .stdout(predicate::str::contains("the weights are random"))
        .stdout(predicate::str::contains("decode"))
        .stderr(predicate::str::contains("panicked").not());
}

#[test]
fn generate_text_and_json_agree() {
    let dir = tempfile::tempdir().unwrap();
    demo_model(dir.path());
    let model = dir.path().to_str().unwrap();
    let args = [
        "generate",
        "--model",
        model,
        "--image",
        &face(),
        "--prompt",
        "How old is this person?",
        "--max-new-tokens",
        "12",
    ];
    let text = facellm().args(args).assert().success().get_output().stdout.clone();
    let text = String::from_utf8(text).unwrap();
    let json = facellm().args(args).args(["--output", "json"]).assert().success().get_output().stdout.clone();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(text.trim_end_matches('\n'), json["text"].as_str().unwrap());
    assert_eq!(json["generated_ids"].as_array().unwrap().len(), 12);
    assert_eq!(json["tiles_per_image"], serde_json::json!([1]));
    let prompt_ids = json["prompt_ids"].as_array().unwrap();
    assert_eq!(prompt_ids.iter().filter(|v| v.as_u64() == Some(151667)).count(), 256);
    for key in ["load_ms", "vision_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s"] {
        assert!(json["timings"].get(key).is_some(), "timings.{key}");
    }
}

#[test]
fn temperature_zero_is_greedy_and_sampling_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    demo_model(dir.path());
    let model = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = facellm()
            .args(["generate", "--model", model, "--prompt", "Hi", "--max-new-tokens", "8", "--output", "json"])
            .args(extra)
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        serde_json::from_slice(&out).unwrap()
    };
    assert_eq!(run(&[])["generated_ids"], run(&["--temperature", "0"])["generated_ids"]);
    let a = run(&["--temperature", "1.5", "--seed", "7"]);
    let b = run(&["--temperature", "1.5", "--seed", "7"]);
    assert_eq!(a["generated_ids"], b["generated_ids"]);
}

fn fails_with(args: &[&str], needle: &str) {
    facellm()
        .args(args)
        .assert()
        .code(1)
        .stderr(predicate::str::contains(needle))
        .stderr(predicate::str::contains("panicked").not());
}

#[test]
fn bad_inputs_give_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    demo_model(dir.path());
    let model = dir.path().to_str().unwrap();
    fails_with(&["generate", "--model", "/no/such/model", "--prompt", "x"], "not found");

    let not_image = dir.path().join("notes.jpg");
    std::fs::write(&not_image, b"this is text, not a JPEG").unwrap();
    fails_with(&["generate", "--model", model, "--image", not_image.to_str().unwrap(), "--prompt", "x"], "notes.jpg");
    fails_with(&["generate", "--model", model, "--image", "/no/such/face.jpg", "--prompt", "x"], "face.jpg");

    // A checkpoint cut in half.
    let cut = tempfile::tempdir().unwrap();
    demo_model(cut.path());
    let st = cut.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["generate", "--model", cut.path().to_str().unwrap(), "--prompt", "x"], "model.safetensors");

    // A context shorter than the prompt (one image is 256 tokens).
    let short = tempfile::tempdir().unwrap();
    demo_model(short.path());
    let cfg_path = short.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["text_config"]["max_position_embeddings"] = serde_json::json!(128);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_with(
        &["generate", "--model", short.path().to_str().unwrap(), "--image", &face(), "--prompt", "x"],
        "context",
    );
}

#[test]
fn more_bad_inputs_give_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    demo_model(dir.path());
    let model = dir.path().to_str().unwrap();

    let huge = dir.path().join("huge.png");
    std::fs::write(&huge, png_header_only(30_000, 30_000)).unwrap();
    fails_with(&["generate", "--model", model, "--image", huge.to_str().unwrap(), "--prompt", "x"], "over the limit");
    fails_with(&["generate", "--model", model, "--image", &face(), "--max-tiles", "13", "--prompt", "x"], "13");

    let no_config = tempfile::tempdir().unwrap();
    demo_model(no_config.path());
    std::fs::remove_file(no_config.path().join("config.json")).unwrap();
    fails_with(&["generate", "--model", no_config.path().to_str().unwrap(), "--prompt", "x"], "config.json");

    let llama = tempfile::tempdir().unwrap();
    demo_model(llama.path());
    let cfg_path = llama.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("llama");
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    fails_with(&["generate", "--model", llama.path().to_str().unwrap(), "--prompt", "x"], "llama");
    fails_with(&["info", "--model", llama.path().to_str().unwrap()], "llama");
}

#[test]
fn usage_errors_exit_2() {
    facellm().args(["generate", "--prompt", "x"]).assert().code(2);
    facellm().args(["no-such-command"]).assert().code(2);
}

/// A text-only Qwen2ForCausalLM folder with Qwen2.5-Instruct's tokenizer config (its chat template wants
/// string content and adds a default system prompt).
#[test]
fn text_only_qwen2_folder_generates() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 151665, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "bos_token_id": 151643, "eos_token_id": 151645
    });
    facellm::model::random::write_random_model(
        dir.path(),
        &config.to_string(),
        "qwen2-cli",
        &facellm::model::random::RecipeGains::default(),
    )
    .unwrap();
    facellm::tokenizer::write_internvl3_files(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::copy(
        format!("{}/tests/fixtures/tokenizer/qwen25_instruct/tokenizer_config.json", env!("CARGO_MANIFEST_DIR")),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let model = dir.path().to_str().unwrap();
    let out = facellm()
        .args(["generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", "5", "--output", "json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(json["prompt"].as_str().unwrap().starts_with("<|im_start|>system\nYou are Qwen"), "{}", json["prompt"]);
    assert!(!json["generated_ids"].as_array().unwrap().is_empty());
    // Images need image tokens, which this tokenizer does not have.
    facellm()
        .args(["generate", "--model", model, "--prompt", "Hello", "--image", &face()])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("image"))
        .stderr(predicate::str::contains("panicked").not());
}
