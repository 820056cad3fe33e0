//! Token ids and decoding of the bundled InternVL3 tokenizer against transformers (tests/fixtures/tokenizer/
//! encode.json, written by tools/fixtures_tokenizer.py): every string must give the same ids, and every id list
//! the same text with and without special tokens.

use std::sync::LazyLock;

use facellm::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    added_tokens: Vec<Added>,
    special_tokens_map: serde_json::Map<String, serde_json::Value>,
    cases: Vec<Case>,
    decode_only: Vec<DecodeCase>,
}

#[derive(Deserialize)]
struct Added {
    id: u32,
    content: String,
    special: bool,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip: String,
}

#[derive(Deserialize)]
struct DecodeCase {
    ids: Vec<u32>,
    decoded: String,
    decoded_skip: String,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer/encode.json");
    serde_json::from_slice(&std::fs::read(path).expect("read encode.json")).expect("parse encode.json")
});

static TOK: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::internvl3().expect("bundled tokenizer loads"));

fn first_diff(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

#[test]
fn ids_match_transformers_on_every_string() {
    assert!(FIXTURE.cases.len() >= 300, "fixture has {} strings", FIXTURE.cases.len());
    let mut failures = Vec::new();
    for c in &FIXTURE.cases {
        let got = TOK.encode(&c.text).expect("encode");
        if got != c.ids {
            let i = first_diff(&got, &c.ids);
            failures.push(format!(
                "{:?}: first difference at {i}: got {:?} want {:?} (lengths {} vs {})",
                c.text,
                &got[i..(i + 4).min(got.len())],
                &c.ids[i..(i + 4).min(c.ids.len())],
                got.len(),
                c.ids.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} strings differ:\n{}",
        failures.len(),
        FIXTURE.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn decode_matches_transformers() {
    let mut failures = Vec::new();
    let all = FIXTURE
        .cases
        .iter()
        .map(|c| (&c.ids, &c.decoded, &c.decoded_skip))
        .chain(FIXTURE.decode_only.iter().map(|c| (&c.ids, &c.decoded, &c.decoded_skip)));
    for (ids, want, want_skip) in all {
        let got = TOK.decode(ids, false).expect("decode");
        let got_skip = TOK.decode(ids, true).expect("decode");
        if &got != want {
            failures.push(format!("ids {ids:?}: got {got:?} want {want:?}"));
        }
        if &got_skip != want_skip {
            failures.push(format!("ids {ids:?} (skip special): got {got_skip:?} want {want_skip:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn added_tokens_have_internvl3_ids_and_flags() {
    assert_eq!(FIXTURE.added_tokens.len(), 32);
    for t in &FIXTURE.added_tokens {
        assert_eq!(TOK.token_to_id(&t.content), Some(t.id), "{}", t.content);
        assert_eq!(TOK.id_to_token(t.id).as_deref(), Some(t.content.as_str()));
        assert_eq!(TOK.is_special(t.id), t.special, "special flag of {}", t.content);
        assert_eq!(TOK.encode(&t.content).expect("encode"), vec![t.id]);
    }
    assert_eq!(TOK.vocab_size(), 151_675);
    // MODEL_SPEC §5.1 ids of common pieces.
    for (text, id) in [("user", 872), ("assistant", 77091), ("system", 8948), ("\n", 198)] {
        assert_eq!(TOK.encode(text).expect("encode"), vec![id], "{text:?}");
    }
}

#[test]
fn special_roles_are_internvl3() {
    let sp = TOK.special_tokens();
    let id = |t: &Option<facellm::tokenizer::SpecialToken>| t.as_ref().map(|t| t.id);
    assert_eq!(id(&sp.eos), Some(151_645));
    assert_eq!(id(&sp.pad), Some(151_643));
    assert_eq!(id(&sp.bos), None);
    assert_eq!(id(&sp.image_start), Some(151_665));
    assert_eq!(id(&sp.image_end), Some(151_666));
    assert_eq!(id(&sp.image_context), Some(151_667));
    assert_eq!(id(&sp.video), Some(151_674));
}

#[test]
fn template_variables_equal_special_tokens_map() {
    let mut got: Vec<(String, String)> = TOK.template_vars().to_vec();
    let mut want: Vec<(String, String)> = FIXTURE
        .special_tokens_map
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn encode_does_not_add_bos_or_eos() {
    assert_eq!(TOK.encode("").expect("encode"), Vec::<u32>::new());
    assert_eq!(TOK.encode("Hello world").expect("encode"), vec![9707, 1879]);
}
