//! `facellm chat` driven through stdin, as a script would: the first turn's greedy answer equals
//! `facellm generate`'s for the same input, later turns reuse the cached prefix, and commands work.

use assert_cmd::Command;
use predicates::prelude::*;

fn face() -> String {
    format!("{}/assets/demo/pd_astronaut_eileen_collins.jpg", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn chat_turn_equals_generate_and_reuses_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    facellm::model::random::write_demo_model(dir.path(), "chat-test").unwrap();
    let model = dir.path().to_str().unwrap();
    let gen = Command::cargo_bin("facellm")
        .unwrap()
        .args(["generate", "--model", model, "--image", &face(), "--prompt", "How old is she?"])
        .args(["--max-new-tokens", "10", "--output", "json"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let gen: serde_json::Value = serde_json::from_slice(&gen).unwrap();

    let out = Command::cargo_bin("facellm")
        .unwrap()
        .args(["chat", "--model", model, "--image", &face(), "--max-new-tokens", "10", "--output", "json"])
        .write_stdin(
            "How old is she?\n/stats\nAnd her expression?\n/nonsense\n/reset\nHow old is she?\n/quit\nnever read\n",
        )
        .assert()
        .success()
        .stderr(predicate::str::contains("unknown command /nonsense"))
        .stderr(predicate::str::contains("panicked").not())
        .get_output()
        .stdout
        .clone();
    let turns: Vec<serde_json::Value> =
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(turns.len(), 3, "three answers before /quit");
    assert_eq!(turns[0]["generated_ids"], gen["generated_ids"]);
    assert_eq!(turns[0]["text"], gen["text"]);
    assert_eq!(turns[0]["reused_tokens"], 0);
    // The second turn re-sends the first, whose tokens (image included) are still cached.
    let reused = turns[1]["reused_tokens"].as_u64().unwrap();
    assert!(reused > 256, "second turn reused only {reused} tokens");
    // After /reset (the image is kept for the next turn) the answer is the first one again.
    assert_eq!(turns[2]["generated_ids"], gen["generated_ids"]);
}
