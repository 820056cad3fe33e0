//! Loading tokenizer folders: the bundled files written out, a tokenizer.json saved by this crate, the legacy
//! added_tokens.json, and broken folders, each of which must fail with a clear error rather than a panic.

use std::path::Path;
use std::sync::LazyLock;

use facellm::tokenizer::{write_internvl3_files, Tokenizer, INTERNVL3_FILES};
use facellm::Error;
use serde::Deserialize;

static TOK: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::internvl3().expect("bundled tokenizer loads"));

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

static STRINGS: LazyLock<Vec<Case>> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/encode.json");
    let fx: Fixture = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("parse");
    fx.cases
});

/// Same ids as transformers on every fixture string, same decode, same special flags.
fn assert_same_as_reference(tok: &Tokenizer, what: &str) {
    for c in STRINGS.iter() {
        let ids = tok.encode(&c.text).expect("encode");
        assert_eq!(ids, c.ids, "{what}: {:?}", c.text);
        assert_eq!(tok.decode(&ids, true).expect("decode"), TOK.decode(&ids, true).expect("decode"), "{what}");
    }
    for id in 151_643..151_675 {
        assert_eq!(tok.is_special(id), TOK.is_special(id), "{what}: special flag of {id}");
    }
    assert_eq!(tok.special_tokens(), TOK.special_tokens(), "{what}");
    assert_eq!(tok.vocab_size(), TOK.vocab_size(), "{what}");
}

fn internvl3_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_internvl3_files(dir.path()).expect("write bundled files");
    dir
}

#[test]
fn written_bundle_loads_like_the_bundle() {
    let dir = internvl3_dir();
    for (name, bytes) in INTERNVL3_FILES {
        assert_eq!(std::fs::read(dir.path().join(name)).expect("read").len(), bytes.len(), "{name}");
    }
    let tok = Tokenizer::from_dir(dir.path()).expect("load folder");
    assert_same_as_reference(&tok, "vocab+merges folder");
}

#[test]
fn tokenizer_json_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    TOK.save_tokenizer_json(dir.path().join("tokenizer.json")).expect("save");
    // Only tokenizer.json: roles fall back to the InternVL3 defaults, the template to the built-in one.
    let tok = Tokenizer::from_dir(dir.path()).expect("load tokenizer.json");
    assert_same_as_reference(&tok, "tokenizer.json only");
    // With the config beside it, as in a checkpoint; a vocab.json next to it must be ignored.
    for (name, bytes) in INTERNVL3_FILES {
        if name != "vocab.json" {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
    }
    std::fs::write(dir.path().join("vocab.json"), "not json").expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load tokenizer.json + config");
    assert_same_as_reference(&tok, "tokenizer.json + config");
    assert_eq!(tok.template_vars(), TOK.template_vars());
}

#[test]
fn legacy_added_tokens_json() {
    // Old folders list added tokens in added_tokens.json; special ones are those the config names.
    let dir = internvl3_dir();
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).expect("read")).expect("json");
    let decoder = cfg.as_object_mut().expect("object").remove("added_tokens_decoder").expect("decoder");
    let added: serde_json::Map<String, serde_json::Value> = decoder
        .as_object()
        .expect("object")
        .iter()
        .map(|(id, t)| {
            (t["content"].as_str().expect("content").to_string(), serde_json::json!(id.parse::<u32>().expect("id")))
        })
        .collect();
    let named: Vec<String> = decoder
        .as_object()
        .expect("object")
        .values()
        .filter(|t| t["special"] == true)
        .map(|t| t["content"].as_str().expect("content").to_string())
        .collect();
    cfg["additional_special_tokens"] = serde_json::json!(named);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("ser")).expect("write");
    std::fs::write(dir.path().join("added_tokens.json"), serde_json::to_vec(&added).expect("ser")).expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert_same_as_reference(&tok, "added_tokens.json");
}

fn expect_err(dir: &Path, what: &str, needle: &str) -> Error {
    let err = Tokenizer::from_dir(dir).expect_err(what);
    let msg = err.to_string();
    assert!(msg.contains(needle), "{what}: error {msg:?} should mention {needle:?}");
    err
}

#[test]
fn missing_folder_and_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = dir.path().join("no_such_model");
    assert!(matches!(expect_err(&gone, "missing folder", "no_such_model"), Error::Io { .. }));

    let file = dir.path().join("a_file");
    std::fs::write(&file, "x").expect("write");
    expect_err(&file, "file instead of folder", "not a folder");

    let empty = tempfile::tempdir().expect("tempdir");
    expect_err(empty.path(), "empty folder", "no tokenizer.json and no vocab.json");

    let d = internvl3_dir();
    std::fs::remove_file(d.path().join("vocab.json")).expect("rm");
    expect_err(d.path(), "missing vocab", "vocab.json");

    let d = internvl3_dir();
    std::fs::remove_file(d.path().join("merges.txt")).expect("rm");
    expect_err(d.path(), "missing merges", "merges.txt");
}

#[test]
fn corrupt_files() {
    let d = internvl3_dir();
    std::fs::write(d.path().join("merges.txt"), "#version: 0.2\nĠ Ġ\nthis line has three\n").expect("write");
    let err = expect_err(d.path(), "merges with a bad line", "merges.txt: line 3");
    assert!(matches!(err, Error::Tokenizer(_)));

    let d = internvl3_dir();
    std::fs::write(d.path().join("merges.txt"), "#version: 0.2\nzzqq_not_a_token xxyy\n").expect("write");
    expect_err(d.path(), "merge of unknown tokens", "does not fit vocab.json");

    let d = internvl3_dir();
    std::fs::write(d.path().join("merges.txt"), [0xff, 0xfe, b'a']).expect("write");
    expect_err(d.path(), "merges not UTF-8", "UTF-8");

    let d = internvl3_dir();
    std::fs::write(d.path().join("vocab.json"), "{\"a\": 0, \"b\": ").expect("write");
    expect_err(d.path(), "truncated vocab", "vocab.json");

    let d = internvl3_dir();
    std::fs::write(d.path().join("vocab.json"), "[1, 2]").expect("write");
    expect_err(d.path(), "vocab not an object", "vocab.json");

    let d = internvl3_dir();
    std::fs::write(d.path().join("tokenizer_config.json"), "{ nope").expect("write");
    expect_err(d.path(), "bad config", "tokenizer_config.json");

    let d = internvl3_dir();
    std::fs::write(d.path().join("tokenizer.json"), "{\"version\": \"1.0\", \"model\": 3}").expect("write");
    expect_err(d.path(), "bad tokenizer.json", "tokenizer.json");
}

#[test]
fn added_token_ids_must_continue_the_vocabulary() {
    let d = internvl3_dir();
    let cfg_path = d.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).expect("read")).expect("json");
    let dec = cfg["added_tokens_decoder"].as_object_mut().expect("object");
    let tok = dec.remove("151674").expect("video");
    dec.insert("151680".into(), tok);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("ser")).expect("write");
    expect_err(d.path(), "gap in added ids", "should have id 151680");

    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).expect("read")).expect("json");
    cfg["added_tokens_decoder"]["151680"]["special"] = serde_json::json!("yes");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("ser")).expect("write");
    expect_err(d.path(), "non-boolean flag", "must be a boolean");
}

#[test]
fn named_special_tokens_missing_from_the_vocabulary_are_added() {
    // transformers appends a named special token the vocabulary lacks; so must we, and give it its role.
    let d = internvl3_dir();
    let cfg_path = d.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).expect("read")).expect("json");
    cfg["bos_token"] = serde_json::json!("<|my_bos|>");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("ser")).expect("write");
    let tok = Tokenizer::from_dir(d.path()).expect("load");
    let bos = tok.special_tokens().bos.clone().expect("bos role");
    assert_eq!((bos.content.as_str(), bos.id), ("<|my_bos|>", 151_675));
    assert!(tok.is_special(151_675));
    assert_eq!(tok.encode("<|my_bos|>x").expect("encode"), vec![151_675, 87]);
    assert!(tok.template_vars().contains(&("bos_token".to_string(), "<|my_bos|>".to_string())));

    // Model-specific names too (checked against transformers 5.17: `<CTX>` becomes id 151675).
    let d = internvl3_dir();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("tokenizer_config.json")).expect("read")).expect("json");
    cfg["extra_special_tokens"]["context_image_token"] = serde_json::json!("<CTX>");
    cfg["context_image_token"] = serde_json::json!("<CTX>");
    std::fs::write(d.path().join("tokenizer_config.json"), serde_json::to_vec(&cfg).expect("ser")).expect("write");
    let tok = Tokenizer::from_dir(d.path()).expect("load");
    let ctx = tok.special_tokens().image_context.clone().expect("context role");
    assert_eq!((ctx.content.as_str(), ctx.id), ("<CTX>", 151_675));
    assert_eq!(tok.encode("<CTX>").expect("encode"), vec![151_675]);
}
