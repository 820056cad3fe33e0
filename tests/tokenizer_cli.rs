//! `facellm tokenize` end to end, and the tile counts of the image module against the processor fixture
//! (tests/fixtures/tokenizer/chat.json records transformers' num_patches for each image).

use std::path::Path;

use assert_cmd::Command;
use serde::Deserialize;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[derive(Deserialize)]
struct ChatFixture {
    cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    name: String,
    messages: Vec<serde_json::Value>,
    add_generation_prompt: bool,
    max_tiles: usize,
    num_tiles: Vec<usize>,
    rendered: String,
    ids_rle: Vec<(u32, usize)>,
}

fn chat_fixture() -> ChatFixture {
    let path = Path::new(FIXTURES).join("tokenizer/chat.json");
    serde_json::from_slice(&std::fs::read(path).expect("read chat.json")).expect("parse chat.json")
}

fn case(name: &str) -> ChatCase {
    chat_fixture().cases.into_iter().find(|c| c.name == name).expect("fixture case")
}

fn image_names(c: &ChatCase) -> Vec<String> {
    c.messages
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|p| p["type"] == "image")
        .map(|p| p["path"].as_str().expect("image name").to_string())
        .collect()
}

fn unrle(rle: &[(u32, usize)]) -> Vec<u32> {
    rle.iter().flat_map(|&(id, n)| std::iter::repeat_n(id, n)).collect()
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::cargo_bin("facellm").expect("binary").args(args).output().expect("run facellm");
    assert!(out.status.success(), "facellm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v["ids"].as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn text_mode_prints_ids_and_count() {
    let v = run_json(&["tokenize", "--text", "Hello world<|im_end|>"]);
    assert_eq!(ids(&v), vec![9707, 1879, 151645]);
    assert_eq!(v["count"], 3);
}

#[test]
fn model_folder_is_used_when_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    facellm::tokenizer::write_internvl3_files(dir.path()).expect("write");
    let model = dir.path().to_str().expect("utf-8 path");
    let v = run_json(&["tokenize", "--model", model, "--text", "你好"]);
    assert_eq!(ids(&v), vec![108386]);
}

#[test]
fn chat_without_images_matches_processor() {
    let c = case("text_only_string_content");
    let v = run_json(&["tokenize", "--chat", "--prompt", "Hello there!"]);
    assert_eq!(ids(&v), unrle(&c.ids_rle));
    assert_eq!(v["prompt"], c.rendered.as_str());
}

#[test]
fn chat_with_images_matches_processor() {
    let images = Path::new(FIXTURES).join("images");
    for name in ["one_image", "one_image_system", "tiled_image_max4", "two_images_one_turn"] {
        let c = case(name);
        let system =
            c.messages.iter().find(|m| m["role"] == "system").and_then(|m| m["content"].as_str().map(String::from));
        let user = c.messages.iter().find(|m| m["role"] == "user").expect("user turn");
        let prompt =
            user["content"].as_array().expect("parts").iter().find(|p| p["type"] == "text").expect("text part")["text"]
                .as_str()
                .expect("text")
                .to_string();
        let paths: Vec<String> =
            image_names(&c).iter().map(|n| images.join(n).to_str().expect("utf-8 path").to_string()).collect();
        let max_tiles = c.max_tiles.to_string();
        let mut args = vec!["tokenize", "--chat", "--prompt", &prompt, "--max-tiles", &max_tiles];
        for p in &paths {
            args.extend(["--image", p.as_str()]);
        }
        if let Some(s) = &system {
            args.extend(["--system", s.as_str()]);
        }
        if !c.add_generation_prompt {
            args.push("--no-generation-prompt");
        }
        let v = run_json(&args);
        assert_eq!(v["num_tiles"], serde_json::json!(c.num_tiles), "{name}");
        assert_eq!(v["prompt"], c.rendered.as_str(), "{name}");
        assert_eq!(ids(&v), unrle(&c.ids_rle), "{name}");
    }
}

#[test]
fn image_module_tile_counts_match_processor() {
    let images = Path::new(FIXTURES).join("images");
    for c in chat_fixture().cases {
        let opts = facellm::image::ImageOptions { max_tiles: c.max_tiles, ..Default::default() };
        let got: Vec<usize> = image_names(&c)
            .iter()
            .map(|n| facellm::image::preprocess_file(&images.join(n), &opts).expect("preprocess").num_tiles)
            .collect();
        assert_eq!(got, c.num_tiles, "{}", c.name);
    }
}

#[test]
fn errors_are_reported_not_panicked() {
    let out = Command::cargo_bin("facellm")
        .expect("binary")
        .args(["tokenize", "--model", "/definitely/not/here", "--text", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/definitely/not/here"));

    let out = Command::cargo_bin("facellm")
        .expect("binary")
        .args(["tokenize", "--chat", "--prompt", "hi", "--image", "/no/such/image.jpg"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image.jpg"));

    // --text and --chat are exclusive; --chat needs --prompt: usage errors (exit 2).
    for args in
        [&["tokenize", "--text", "a", "--chat", "--prompt", "b"][..], &["tokenize", "--chat"][..], &["tokenize"][..]]
    {
        let out = Command::cargo_bin("facellm").expect("binary").args(args).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn llamafactory_format_flag() {
    let v = run_json(&["tokenize", "--chat", "--prompt", "Hi", "--format", "llamafactory"]);
    let prompt = v["prompt"].as_str().expect("prompt");
    assert!(prompt.starts_with("<|im_start|>system\n你是书生·万象"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");
}
