//! Reading a tokenizer folder (or the bundled copy of one) into a `tokenizers::Tokenizer` plus the folder's
//! settings: special-token roles, the variables a chat template sees, and the chat template sources.
//!
//! A Hugging Face folder either holds a `tokenizer.json` (the whole pipeline, authoritative) or only the slow
//! files `vocab.json` + `merges.txt`, with added tokens in `tokenizer_config.json` (`added_tokens_decoder`) or in
//! the legacy `added_tokens.json`. InternVL3-hf checkpoints are often copied without their 11 MB tokenizer.json,
//! so the second form rebuilds exactly the pipeline transformers' `Qwen2Tokenizer` builds (MODEL_SPEC §5.1).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::{Error, Result};

/// Qwen2's pre-tokenizer regex (MODEL_SPEC §5.1): contractions case-insensitively, letter runs with one leading
/// non-letter, single digits, punctuation runs with trailing newlines, newline runs, and whitespace.
pub const QWEN2_PRETOKENIZE_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The raw contents of the files a tokenizer folder may hold; `origin` names the folder in error messages.
#[derive(Default)]
pub(crate) struct FolderFiles {
    pub origin: String,
    pub tokenizer_json: Option<Vec<u8>>,
    pub vocab: Option<Vec<u8>>,
    pub merges: Option<Vec<u8>>,
    pub tokenizer_config: Option<Vec<u8>>,
    pub added_tokens: Option<Vec<u8>>,
    pub special_tokens_map: Option<Vec<u8>>,
    pub chat_template_jinja: Option<Vec<u8>>,
    pub chat_template_json: Option<Vec<u8>>,
}

impl FolderFiles {
    pub fn read(dir: &Path) -> Result<Self> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::Tokenizer(format!("{} is not a folder", dir.display())));
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(path, e)),
            }
        };
        Ok(FolderFiles {
            origin: dir.display().to_string(),
            tokenizer_json: read("tokenizer.json")?,
            vocab: read("vocab.json")?,
            merges: read("merges.txt")?,
            tokenizer_config: read("tokenizer_config.json")?,
            added_tokens: read("added_tokens.json")?,
            special_tokens_map: read("special_tokens_map.json")?,
            chat_template_jinja: read("chat_template.jinja")?,
            chat_template_json: read("chat_template.json")?,
        })
    }

    fn err(&self, file: &str, msg: impl std::fmt::Display) -> Error {
        Error::Tokenizer(format!("{}/{file}: {msg}", self.origin))
    }
}

/// One added token as `tokenizer_config.json` describes it.
#[derive(Debug, Clone)]
pub(crate) struct AddedSpec {
    pub id: u32,
    pub content: String,
    pub special: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub single_word: bool,
    pub normalized: bool,
}

impl AddedSpec {
    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .single_word(self.single_word)
            .normalized(self.normalized)
    }
}

/// The transformers names of the special-token attributes that go into `special_tokens_map`, and so into the
/// variables a chat template sees.
const NAMED_SPECIAL: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// What the folder's config files say, beyond the vocabulary.
#[derive(Debug, Default)]
pub(crate) struct FolderConfig {
    pub added: Vec<AddedSpec>,
    /// The file the added tokens came from, for error messages.
    pub added_source: &'static str,
    /// `special_tokens_map` as transformers builds it: named attributes, then model-specific names from the
    /// `extra_special_tokens` mapping (InternVL's `start_image_token`, `context_image_token`, ...).
    pub named: Vec<(String, String)>,
    /// Tokens that must exist as special tokens: every named one plus `additional_special_tokens`.
    pub required_special: Vec<String>,
    /// `chat_template` of tokenizer_config.json: one template, or named ones.
    pub chat_templates: Vec<(String, String)>,
}

impl FolderConfig {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.named.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn parse_json(files: &FolderFiles, file: &str, bytes: &[u8]) -> Result<Json> {
    serde_json::from_slice(bytes).map_err(|e| files.err(file, format!("invalid JSON: {e}")))
}

/// A special token is written either as a string or as a serialized `AddedToken` (`{"content": ...}`).
fn token_content(files: &FolderFiles, file: &str, key: &str, v: &Json) -> Result<Option<String>> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) => Ok(Some(s.clone())),
        Json::Object(o) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(files.err(file, format!("field `{key}`: an AddedToken object needs a string `content`"))),
        },
        _ => Err(files.err(file, format!("field `{key}`: expected a string, an AddedToken object or null"))),
    }
}

fn flag(
    files: &FolderFiles,
    file: &str,
    id: &str,
    o: &serde_json::Map<String, Json>,
    key: &str,
    dflt: bool,
) -> Result<bool> {
    match o.get(key) {
        None => Ok(dflt),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(files.err(file, format!("added token {id}: field `{key}` must be a boolean"))),
    }
}

pub(crate) fn parse_config(files: &FolderFiles) -> Result<FolderConfig> {
    let mut cfg = FolderConfig::default();
    let tc = match &files.tokenizer_config {
        Some(b) => parse_json(files, "tokenizer_config.json", b)?,
        None => Json::Object(Default::default()),
    };
    let Json::Object(tc) = tc else {
        return Err(files.err("tokenizer_config.json", "expected a JSON object"));
    };
    // special_tokens_map.json is the legacy home of the named tokens; tokenizer_config.json wins where both speak.
    let mut named_src = serde_json::Map::new();
    if let Some(b) = &files.special_tokens_map {
        match parse_json(files, "special_tokens_map.json", b)? {
            Json::Object(m) => named_src.extend(m),
            _ => return Err(files.err("special_tokens_map.json", "expected a JSON object")),
        }
    }
    for (k, v) in &tc {
        named_src.insert(k.clone(), v.clone());
    }

    for key in NAMED_SPECIAL {
        if let Some(v) = named_src.get(key) {
            if let Some(c) = token_content(files, "tokenizer_config.json", key, v)? {
                cfg.named.push((key.to_string(), c));
            }
        }
    }
    if let Some(v) = named_src.get("extra_special_tokens") {
        match v {
            Json::Object(m) => {
                for (k, v) in m {
                    if let Some(c) = token_content(files, "tokenizer_config.json", k, v)? {
                        cfg.named.push((k.clone(), c));
                    }
                }
            }
            Json::Array(a) => {
                for v in a {
                    if let Some(c) = token_content(files, "tokenizer_config.json", "extra_special_tokens", v)? {
                        cfg.required_special.push(c);
                    }
                }
            }
            Json::Null => {}
            _ => {
                return Err(
                    files.err("tokenizer_config.json", "field `extra_special_tokens`: expected an object or a list")
                )
            }
        }
    }
    // InternVL configs also carry the image tokens as plain top-level fields.
    for key in ["start_image_token", "end_image_token", "context_image_token", "video_token"] {
        if cfg.get(key).is_none() {
            if let Some(v) = named_src.get(key) {
                if let Some(c) = token_content(files, "tokenizer_config.json", key, v)? {
                    cfg.named.push((key.to_string(), c));
                }
            }
        }
    }
    if let Some(Json::Array(a)) = named_src.get("additional_special_tokens") {
        for v in a {
            if let Some(c) = token_content(files, "tokenizer_config.json", "additional_special_tokens", v)? {
                cfg.required_special.push(c);
            }
        }
    }
    // Every named token, model-specific ones included, must exist as a special token (transformers adds it).
    for (_, v) in &cfg.named {
        cfg.required_special.push(v.clone());
    }

    if let Some(v) = tc.get("added_tokens_decoder") {
        cfg.added_source = "tokenizer_config.json";
        let Json::Object(m) = v else {
            return Err(files.err("tokenizer_config.json", "field `added_tokens_decoder`: expected an object"));
        };
        for (id, t) in m {
            let idn: u32 = id.parse().map_err(|_| {
                files.err("tokenizer_config.json", format!("added_tokens_decoder: key {id:?} is not a token id"))
            })?;
            let Json::Object(o) = t else {
                return Err(files.err("tokenizer_config.json", format!("added token {id}: expected an object")));
            };
            let Some(Json::String(content)) = o.get("content") else {
                return Err(files.err("tokenizer_config.json", format!("added token {id}: missing string `content`")));
            };
            let f = |k, d| flag(files, "tokenizer_config.json", id, o, k, d);
            cfg.added.push(AddedSpec {
                id: idn,
                content: content.clone(),
                special: f("special", false)?,
                lstrip: f("lstrip", false)?,
                rstrip: f("rstrip", false)?,
                single_word: f("single_word", false)?,
                normalized: f("normalized", true)?,
            });
        }
    } else if let Some(b) = &files.added_tokens {
        cfg.added_source = "added_tokens.json";
        // Legacy file: transformers marks a token special when it is one of the named/additional special tokens,
        // and lets only the non-special ones see the normalizer.
        let Json::Object(m) = parse_json(files, "added_tokens.json", b)? else {
            return Err(files.err("added_tokens.json", "expected an object of token -> id"));
        };
        for (content, id) in m {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| files.err("added_tokens.json", format!("token {content:?}: id must be an integer")))?;
            let special = cfg.required_special.contains(&content) || cfg.named.iter().any(|(_, v)| *v == content);
            cfg.added.push(AddedSpec {
                id,
                content,
                special,
                lstrip: false,
                rstrip: false,
                single_word: false,
                normalized: !special,
            });
        }
    }
    cfg.added.sort_by_key(|a| a.id);

    if let Some(v) = tc.get("chat_template") {
        cfg.chat_templates = parse_template_field(files, "tokenizer_config.json", v)?;
    }
    Ok(cfg)
}

/// `chat_template` is a string, or a list of `{"name": ..., "template": ...}` (transformers' named templates).
pub(crate) fn parse_template_field(files: &FolderFiles, file: &str, v: &Json) -> Result<Vec<(String, String)>> {
    match v {
        Json::Null => Ok(vec![]),
        Json::String(s) => Ok(vec![("default".to_string(), s.clone())]),
        Json::Array(a) => a
            .iter()
            .map(|t| match (t.get("name"), t.get("template")) {
                (Some(Json::String(n)), Some(Json::String(s))) => Ok((n.clone(), s.clone())),
                _ => Err(files.err(file, "field `chat_template`: each entry needs string `name` and `template`")),
            })
            .collect(),
        Json::Object(m) => m
            .iter()
            .map(|(n, s)| match s {
                Json::String(s) => Ok((n.clone(), s.clone())),
                _ => Err(files.err(file, format!("field `chat_template`: template {n:?} is not a string"))),
            })
            .collect(),
        _ => Err(files.err(file, "field `chat_template`: expected a string or a list of named templates")),
    }
}

/// The chat template sources of a folder, most specific first: `chat_template.jinja`, tokenizer_config.json's
/// `chat_template`, then the processor's `chat_template.json`. Empty when the folder has none.
pub(crate) fn template_sources(files: &FolderFiles, cfg: &FolderConfig) -> Result<Vec<(String, String)>> {
    if let Some(b) = &files.chat_template_jinja {
        let s = String::from_utf8(b.clone()).map_err(|_| files.err("chat_template.jinja", "not valid UTF-8"))?;
        return Ok(vec![("default".to_string(), s)]);
    }
    if !cfg.chat_templates.is_empty() {
        return Ok(cfg.chat_templates.clone());
    }
    if let Some(b) = &files.chat_template_json {
        let v = parse_json(files, "chat_template.json", b)?;
        if let Some(t) = v.get("chat_template") {
            return parse_template_field(files, "chat_template.json", t);
        }
    }
    Ok(vec![])
}

fn parse_vocab(files: &FolderFiles, bytes: &[u8]) -> Result<Vocab> {
    let map: std::collections::HashMap<String, u32> = serde_json::from_slice(bytes)
        .map_err(|e| files.err("vocab.json", format!("expected a JSON object of token -> id: {e}")))?;
    Ok(map.into_iter().collect())
}

/// merges.txt: an optional `#version` header, then one `left right` pair per line, by rank. Lines starting with
/// `#` are ordinary merges otherwise (`# #` is a real Qwen2 merge), so only the header is skipped.
fn parse_merges(files: &FolderFiles, bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let text = std::str::from_utf8(bytes).map_err(|_| files.err("merges.txt", "not valid UTF-8"))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(files.err(
                    "merges.txt",
                    format!("line {}: expected two tokens separated by one space, got {line:?}", i + 1),
                ))
            }
        }
    }
    Ok(merges)
}

/// Qwen2's pipeline over a vocabulary and merges: NFC, the Qwen2 split regex (matches kept as pieces), byte-level
/// mapping without prefix space or GPT-2 regex, BPE without unknown token or byte fallback, byte-level decoding.
fn build_qwen2(files: &FolderFiles, vocab: &[u8], merges: &[u8]) -> Result<tokenizers::Tokenizer> {
    let vocab = parse_vocab(files, vocab)?;
    let merges = parse_merges(files, merges)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(false)
        .fuse_unk(false)
        .build()
        .map_err(|e| files.err("merges.txt", format!("does not fit vocab.json: {e}")))?;
    let split =
        Split::new(SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| Error::Tokenizer(format!("Qwen2 pre-tokenizer regex: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(NFC));
    tok.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// Adds the folder's added tokens at their recorded ids. The `tokenizers` crate numbers new tokens after the
/// current vocabulary, so ids must continue it without gaps; anything else is reported rather than silently
/// renumbered, because a shifted id would feed the model the wrong embedding row.
fn add_tokens(files: &FolderFiles, tok: &mut tokenizers::Tokenizer, cfg: &FolderConfig) -> Result<()> {
    for spec in &cfg.added {
        tok.add_tokens(&[spec.to_added_token()]);
        match tok.token_to_id(&spec.content) {
            Some(id) if id == spec.id => {}
            got => {
                return Err(files.err(
                    cfg.added_source,
                    format!(
                        "added token {:?} should have id {} but gets {}; added token ids must continue the \
                         vocabulary without gaps",
                        spec.content,
                        spec.id,
                        got.map_or("none".to_string(), |g| g.to_string())
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Builds the tokenizer pipeline of a folder.
pub(crate) fn build(files: &FolderFiles, cfg: &FolderConfig) -> Result<tokenizers::Tokenizer> {
    let mut tok = if let Some(json) = &files.tokenizer_json {
        let tok = tokenizers::Tokenizer::from_bytes(json).map_err(|e| files.err("tokenizer.json", e))?;
        // Streaming decode works on the bytes of byte-level tokens; other decoders are out of scope here.
        if !matches!(tok.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err(files.err("tokenizer.json", "decoder must be ByteLevel (byte-level BPE such as Qwen2)"));
        }
        tok
    } else {
        let vocab = files
            .vocab
            .as_deref()
            .ok_or_else(|| Error::Tokenizer(format!("{}: no tokenizer.json and no vocab.json", files.origin)))?;
        let merges = files
            .merges
            .as_deref()
            .ok_or_else(|| Error::Tokenizer(format!("{}: vocab.json without merges.txt", files.origin)))?;
        let mut tok = build_qwen2(files, vocab, merges)?;
        add_tokens(files, &mut tok, cfg)?;
        tok
    };
    // transformers registers every named special token that is not an added token yet (reusing its vocabulary
    // id when it has one, else appending it).
    let present: Vec<String> = tok.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
    let mut missing: Vec<AddedToken> = Vec::new();
    for content in &cfg.required_special {
        if !present.contains(content) && !missing.iter().any(|t| t.content == *content) {
            missing.push(AddedToken::from(content.clone(), true).normalized(false));
        }
    }
    if !missing.is_empty() {
        tok.add_special_tokens(&missing);
    }
    Ok(tok)
}

/// Ids of tokens that `decode(.., skip_special_tokens=true)` drops.
pub(crate) fn special_ids(tok: &tokenizers::Tokenizer) -> BTreeMap<u32, String> {
    tok.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, t)| (id, t.content)).collect()
}
