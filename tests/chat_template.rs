//! Chat prompts against transformers (fixtures from tools/fixtures_tokenizer.py): InternVLProcessor input_ids for
//! image conversations, the Qwen2.5-Instruct template of a text-only folder, and the Jinja environment itself.

use std::path::Path;
use std::sync::LazyLock;

use facellm::tokenizer::{
    write_internvl3_files, ChatOptions, ChatTemplate, Message, Part, PromptFormat, RenderOptions, Tokenizer,
    LLAMAFACTORY_INTERNVL_SYSTEM,
};
use facellm::Error;
use serde::Deserialize;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer");

static TOK: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::internvl3().expect("bundled tokenizer loads"));

fn load<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(FIXTURES).join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("read fixture")).expect("parse fixture")
}

fn unrle(rle: &[(u32, usize)]) -> Vec<u32> {
    rle.iter().flat_map(|&(id, n)| std::iter::repeat_n(id, n)).collect()
}

fn assert_ids(name: &str, got: &[u32], want: &[u32]) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        panic!(
            "{name}: ids differ at {i} (lengths {} vs {}): got {:?} want {:?}",
            got.len(),
            want.len(),
            &got[i..(i + 6).min(got.len())],
            &want[i..(i + 6).min(want.len())]
        );
    }
}

#[derive(Deserialize)]
struct ChatFixture {
    image_seq_length: usize,
    cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct ChatCase {
    name: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    num_tiles: Vec<usize>,
    rendered: String,
    ids_rle: Vec<(u32, usize)>,
}

#[test]
fn internvl_processor_input_ids_match() {
    let fx: ChatFixture = load("chat.json");
    assert!(fx.cases.iter().any(|c| c.num_tiles.len() == 2), "fixture needs a two-image case");
    for c in &fx.cases {
        let mut opts = ChatOptions { image_seq_length: fx.image_seq_length, ..Default::default() };
        opts.render.add_generation_prompt = c.add_generation_prompt;
        let p = TOK.encode_chat(&c.messages, &c.num_tiles, &opts).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(p.text, c.rendered, "{}: rendered text", c.name);
        assert_ids(&c.name, &p.ids, &unrle(&c.ids_rle));
    }
}

#[test]
fn face_prompt_is_the_documented_sequence() {
    // MODEL_SPEC §5.3: 151644 872 198 151665 151667x256 151666 198 <text> 151645 198 151644 77091 198.
    let msgs = vec![Message::parts("user", vec![Part::image(), Part::text("Describe the face.")])];
    let p = TOK.encode_chat(&msgs, &[1], &ChatOptions::default()).expect("encode");
    assert_eq!(&p.ids[..4], &[151644, 872, 198, 151665]);
    assert!(p.ids[4..260].iter().all(|&i| i == 151667));
    assert_eq!(&p.ids[260..262], &[151666, 198]);
    assert_eq!(&p.ids[p.ids.len() - 5..], &[151645, 198, 151644, 77091, 198]);
}

#[derive(Deserialize)]
struct QwenFixture {
    special_tokens_map: serde_json::Map<String, serde_json::Value>,
    eos_token_id: u32,
    cases: Vec<QwenCase>,
}

#[derive(Deserialize)]
struct QwenCase {
    name: String,
    messages: Vec<Message>,
    tools: Option<serde_json::Value>,
    add_generation_prompt: bool,
    rendered: String,
    ids: Vec<u32>,
}

/// A Qwen2.5-Instruct-style folder: the shared vocabulary with Qwen2.5's own tokenizer_config.json (its template
/// and 22 added tokens, no image tokens).
fn qwen25_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_internvl3_files(dir.path()).expect("write files");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).expect("remove template");
    std::fs::copy(
        Path::new(FIXTURES).join("qwen25_instruct/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .expect("copy config");
    dir
}

#[test]
fn qwen25_text_only_template_matches() {
    let fx: QwenFixture = load("qwen25.json");
    let dir = qwen25_folder();
    let tok = Tokenizer::from_dir(dir.path()).expect("load Qwen2.5 folder");
    assert_eq!(tok.special_tokens().eos.as_ref().map(|t| t.id), Some(fx.eos_token_id));
    assert!(tok.special_tokens().image_context.is_none(), "text-only folder has no <IMG_CONTEXT>");
    assert_eq!(tok.vocab_size(), 151_665);
    let mut vars = tok.template_vars().to_vec();
    vars.sort();
    let mut want: Vec<(String, String)> =
        fx.special_tokens_map.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect();
    want.sort();
    assert_eq!(vars, want);
    for c in &fx.cases {
        let mut opts = ChatOptions::default();
        opts.render.add_generation_prompt = c.add_generation_prompt;
        opts.render.tools = c.tools.clone();
        let p = tok.encode_chat(&c.messages, &[], &opts).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(p.text, c.rendered, "{}", c.name);
        assert_ids(&c.name, &p.ids, &c.ids);
    }
    // Images cannot go through a tokenizer without image tokens.
    let msgs = vec![Message::parts("user", vec![Part::image(), Part::text("hi")])];
    let err = tok.encode_chat(&msgs, &[1], &ChatOptions::default()).expect_err("no image tokens");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
}

#[derive(Deserialize)]
struct JinjaFixture {
    cases: Vec<JinjaCase>,
}

#[derive(Deserialize)]
struct JinjaCase {
    name: String,
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    vars: std::collections::BTreeMap<String, String>,
    rendered: Option<String>,
    error: Option<String>,
}

#[test]
fn jinja_environment_behaves_like_transformers() {
    let fx: JinjaFixture = load("jinja.json");
    let mut failures = Vec::new();
    for c in &fx.cases {
        let vars: Vec<(String, String)> = c.vars.clone().into_iter().collect();
        let opts = RenderOptions { add_generation_prompt: c.add_generation_prompt, ..Default::default() };
        let got = ChatTemplate::new(&c.template).and_then(|t| t.render(&c.messages, &opts, &vars));
        match (&got, &c.rendered, &c.error) {
            (Ok(s), Some(want), _) if s == want => {}
            (Err(Error::Template(msg)), None, Some(want)) => {
                // The Python message of raise_exception must reach the user.
                if want.starts_with("TemplateError: ") && !msg.contains(want.trim_start_matches("TemplateError: ")) {
                    failures.push(format!("{}: error {msg:?} lacks {want:?}", c.name));
                }
            }
            _ => failures.push(format!("{}: got {got:?}, want {:?} / error {:?}", c.name, c.rendered, c.error)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn strftime_now_is_available() {
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}").expect("compile");
    let s = t.render(&[], &RenderOptions::default(), &[]).expect("render");
    assert_eq!(s.len(), 10, "{s}");
    assert!(s.starts_with("20"), "{s}");
}

#[test]
fn named_templates_select_default_or_by_name() {
    let t = ChatTemplate::from_named(vec![
        ("default".into(), "D{{ messages | length }}".into()),
        ("tool_use".into(), "T{{ messages | length }}".into()),
    ])
    .expect("compile");
    let msgs = vec![Message::text("user", "x")];
    assert_eq!(t.render(&msgs, &RenderOptions::default(), &[]).expect("render"), "D1");
    let opts = RenderOptions { template: Some("tool_use".into()), ..Default::default() };
    assert_eq!(t.render(&msgs, &opts, &[]).expect("render"), "T1");
    let opts = RenderOptions { template: Some("nope".into()), ..Default::default() };
    assert!(matches!(t.render(&msgs, &opts, &[]), Err(Error::Template(_))));
    let only_named = ChatTemplate::from_named(vec![("rag".into(), "R".into())]).expect("compile");
    let err = only_named.render(&msgs, &RenderOptions::default(), &[]).expect_err("no default");
    assert!(err.to_string().contains("rag"), "{err}");
}

#[test]
fn folder_template_sources_in_order() {
    // tokenizer_config.json list form, chat_template.json (processor form) and chat_template.jinja precedence.
    let dir = tempfile::tempdir().expect("tempdir");
    write_internvl3_files(dir.path()).expect("write");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).expect("rm");
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).expect("read")).expect("json");
    std::fs::write(dir.path().join("chat_template.json"), r#"{"chat_template": "FROM_JSON"}"#).expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.apply_chat_template(&[], &RenderOptions::default()).expect("render"), "FROM_JSON");

    cfg["chat_template"] = serde_json::json!([{"name": "default", "template": "FROM_CONFIG {{ eos_token }}"}]);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("ser")).expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.apply_chat_template(&[], &RenderOptions::default()).expect("render"), "FROM_CONFIG <|im_end|>");

    std::fs::write(dir.path().join("chat_template.jinja"), "FROM_JINJA\n").expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.apply_chat_template(&[], &RenderOptions::default()).expect("render"), "FROM_JINJA");

    // No template anywhere: the built-in InternVL3-hf one.
    for f in ["chat_template.jinja", "chat_template.json"] {
        std::fs::remove_file(dir.path().join(f)).expect("rm");
    }
    cfg.as_object_mut().expect("object").remove("chat_template");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).expect("ser")).expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("load");
    let msgs = vec![Message::text("user", "hi")];
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    assert_eq!(
        tok.apply_chat_template(&msgs, &opts).expect("render"),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn image_count_mismatch_is_an_error() {
    let one = vec![Message::parts("user", vec![Part::image(), Part::text("x")])];
    let two = vec![Message::parts("user", vec![Part::image(), Part::image(), Part::text("x")])];
    for (msgs, tiles) in [(&one, &[][..]), (&one, &[1, 1][..]), (&two, &[1][..])] {
        let err = TOK.encode_chat(msgs, tiles, &ChatOptions::default()).expect_err("mismatch");
        assert!(matches!(err, Error::Invalid(_)), "{err}");
    }
    // A template that writes no placeholder for an image part.
    let mut tok = Tokenizer::internvl3().expect("load");
    tok.set_chat_template(ChatTemplate::new("{% for m in messages %}{{ m.role }}{% endfor %}").expect("compile"));
    let err = tok.encode_chat(&one, &[1], &ChatOptions::default()).expect_err("no placeholder");
    assert!(err.to_string().contains("placeholder"), "{err}");
    // A placeholder typed in the text counts too: two placeholders, one image.
    let typed = vec![Message::parts("user", vec![Part::image(), Part::text("<IMG_CONTEXT>")])];
    assert!(matches!(TOK.encode_chat(&typed, &[1], &ChatOptions::default()), Err(Error::Invalid(_))));
    // Zero tiles and video parts are refused.
    assert!(matches!(TOK.encode_chat(&one, &[0], &ChatOptions::default()), Err(Error::Invalid(_))));
    let video =
        vec![Message::parts("user", vec![Part { kind: "video".into(), text: None, extra: Default::default() }])];
    assert!(matches!(TOK.encode_chat(&video, &[], &ChatOptions::default()), Err(Error::Invalid(_))));
}

#[test]
fn template_errors_are_values() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.role }").expect_err("syntax error");
    assert!(matches!(err, Error::Template(_)), "{err}");
    let t =
        ChatTemplate::new("{{ raise_exception('Only user and assistant roles are supported!') }}").expect("compile");
    let err = t.render(&[], &RenderOptions::default(), &[]).expect_err("raises");
    assert!(err.to_string().contains("Only user and assistant roles are supported!"), "{err}");
    let t = ChatTemplate::new("{{ messages[0].content.nope.deeper }}").expect("compile");
    let err = t.render(&[Message::text("user", "x")], &RenderOptions::default(), &[]).expect_err("undefined");
    assert!(matches!(err, Error::Template(_)), "{err}");
    // A folder whose template does not compile fails to load, naming the folder.
    let dir = tempfile::tempdir().expect("tempdir");
    write_internvl3_files(dir.path()).expect("write");
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").expect("write");
    let err = Tokenizer::from_dir(dir.path()).expect_err("bad template");
    assert!(matches!(err, Error::Template(_)) && err.to_string().contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn llamafactory_intern_vl_format() {
    let lf = ChatOptions { format: PromptFormat::LlamaFactoryInternVl, ..Default::default() };
    let msgs = vec![
        Message::parts("user", vec![Part::image(), Part::text("Describe the face.")]),
        Message::text("assistant", "A man."),
        Message::text("user", "Age?"),
    ];
    let p = TOK.encode_chat(&msgs, &[2], &lf).expect("encode");
    let want_text = format!(
        "<|im_start|>system\n{LLAMAFACTORY_INTERNVL_SYSTEM}<|im_end|>\n<|im_start|>user\n<image>Describe the face.<|im_end|>\n\
         <|im_start|>assistant\nA man.<|im_end|>\n<|im_start|>user\nAge?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(p.text, want_text);
    // Each slot is tokenized on its own; the image block has no newline after </img>.
    let block = format!("<img>{}</img>", "<IMG_CONTEXT>".repeat(512));
    let slots = [
        format!("<|im_start|>system\n{LLAMAFACTORY_INTERNVL_SYSTEM}<|im_end|>\n"),
        format!("<|im_start|>user\n{block}Describe the face.<|im_end|>\n<|im_start|>assistant\n"),
        "A man.<|im_end|>\n".to_string(),
        "<|im_start|>user\nAge?<|im_end|>\n<|im_start|>assistant\n".to_string(),
    ];
    let want: Vec<u32> = slots.iter().flat_map(|s| TOK.encode(s).expect("encode")).collect();
    assert_ids("llamafactory", &p.ids, &want);
    assert_eq!(p.ids.iter().filter(|&&i| i == 151_667).count(), 512);

    // Own system prompt, and `<image>` written in string content as LLaMA-Factory datasets do.
    let msgs = vec![Message::text("system", "Be brief."), Message::text("user", "<image>\nWho?")];
    let p = TOK.encode_chat(&msgs, &[1], &lf).expect("encode");
    assert_eq!(
        p.text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWho?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(matches!(TOK.encode_chat(&msgs, &[], &lf), Err(Error::Invalid(_))));
    // Roles must alternate.
    let bad = vec![Message::text("user", "a"), Message::text("user", "b")];
    assert!(matches!(TOK.encode_chat(&bad, &[], &lf), Err(Error::Invalid(_))));
}
