//! Real weights: Qwen2.5-Coder-0.5B-Instruct (the exact LLM shape of FaceLLM-1B), converted to a bf16 HF
//! folder by tools/real_weights.py, against HF transformers' greedy output recorded in float32 by the same
//! script (tests/fixtures/model/real_qwen25_greedy.json). The folder (~1 GB) is not in git: point
//! FACELLM_QWEN25_DIR at it (default tools/.cache/qwen2.5-coder-0.5b-instruct when present); without it
//! the test says it was skipped. Run it in release: `cargo test --release --test real_weights -- --nocapture`.

use std::path::PathBuf;

use facellm::backend::cpu::sampling::SamplingParams;
use facellm::engine::{generate, GenerateOptions};
use facellm::tokenizer::{ChatOptions, Message, Tokenizer};
use serde_json::Value;

const MARGIN_TIE: f64 = 1e-3;

fn folder() -> Option<PathBuf> {
    let dir = match std::env::var_os("FACELLM_QWEN25_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/.cache/qwen2.5-coder-0.5b-instruct"),
    };
    dir.join("model.safetensors").exists().then_some(dir)
}

#[test]
fn real_qwen25_greedy_matches_hf() {
    let Some(dir) = folder() else {
        println!("SKIPPED real_qwen25_greedy_matches_hf: no converted folder (run tools/real_weights.py, set FACELLM_QWEN25_DIR)");
        return;
    };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/real_qwen25_greedy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (_, model) = facellm::model::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let eos: Vec<u32> = reference["reference_run"]["decoding"]["eos_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    for case in reference["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let messages = vec![Message::text("user", prompt)];
        let p = tok.encode_chat(&messages, &[], &ChatOptions::default()).unwrap();
        let want_ids: Vec<u32> =
            case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(p.ids, want_ids, "prompt ids for {prompt:?}");
        let opts = GenerateOptions {
            max_new_tokens: 48,
            sampling: SamplingParams::greedy(),
            eos_ids: eos.clone(),
            stop_strings: vec![],
        };
        let decode = |ids: &[u32]| tok.decode(ids, true);
        let out = generate(&model, &p.ids, None, &opts, &decode, &mut |_| {}).unwrap();
        let want: Vec<u32> =
            case["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<u32> = want.into_iter().filter(|id| !eos.contains(id)).collect();
        let margins: Vec<f64> =
            case["top1_top2_margin"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        println!(
            "prompt {prompt:?}\n  ours: {:?}\n  prefill {:.0} ms, decode {:.2} tok/s",
            out.text,
            out.timings.prefill_ms,
            out.timings.decode_tokens_per_s()
        );
        match out.ids.iter().zip(&want).position(|(a, b)| a != b) {
            None => {
                assert_eq!(out.ids.len(), want.len(), "generated length for {prompt:?}");
                assert_eq!(out.text, case["generated_text"].as_str().unwrap());
            }
            Some(step) => assert!(
                margins[step] < MARGIN_TIE,
                "{prompt:?}: diverges at step {step} where HF's margin is {}",
                margins[step]
            ),
        }
    }
}
