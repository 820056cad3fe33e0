//! Qwen2 byte-level BPE tokenizer with the InternVL added tokens, chat templates and incremental decoding
//! (MODEL_SPEC §5).
//!
//! [`Tokenizer`] wraps the `tokenizers` crate, so encoding is the same code transformers runs. It loads a model
//! folder (`tokenizer.json`, or `vocab.json` + `merges.txt` + added tokens rebuilt into Qwen2's pipeline), or the
//! InternVL3 tokenizer bundled in the binary. Encoding never adds a BOS token (Qwen has none). The folder's
//! special-token roles (eos, pad, image start/end/context) come from its config, defaulting to InternVL3's.
//!
//! Submodules: `load` (folder files -> pipeline), `bundled` (the copy shipped in the binary), `stream`
//! (incremental decoding), `jinja` + `chat` (chat templates), `prompt` (image expansion, training format).

mod bundled;
mod chat;
mod jinja;
mod load;
mod prompt;
mod stream;

use std::collections::BTreeMap;
use std::path::Path;

pub use bundled::{write_internvl3_files, INTERNVL3_FILES};
pub use chat::{ChatTemplate, Content, Message, Part, RenderOptions, INTERNVL3_CHAT_TEMPLATE};
pub use load::QWEN2_PRETOKENIZE_REGEX;
pub use prompt::{
    expand_image_placeholders, ChatOptions, Prompt, PromptFormat, IMAGE_SEQ_LENGTH, LLAMAFACTORY_IMAGE_PLACEHOLDER,
    LLAMAFACTORY_INTERNVL_SYSTEM,
};
pub use stream::IncrementalDecoder;

use crate::{Error, Result};

/// A token with a role, and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: u32,
}

/// Special-token roles. A role is `None` when the folder neither names it nor has the InternVL3 default token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    pub bos: Option<SpecialToken>,
    pub image_start: Option<SpecialToken>,
    pub image_end: Option<SpecialToken>,
    pub image_context: Option<SpecialToken>,
    pub video: Option<SpecialToken>,
}

/// InternVL3-hf defaults per role (MODEL_SPEC §5.1), used when the folder's config does not name the token.
const ROLE_DEFAULTS: [(&str, Option<&str>); 7] = [
    ("eos_token", Some("<|im_end|>")),
    ("pad_token", Some("<|endoftext|>")),
    ("bos_token", None),
    ("start_image_token", Some("<img>")),
    ("end_image_token", Some("</img>")),
    ("context_image_token", Some("<IMG_CONTEXT>")),
    ("video_token", Some("<video>")),
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    /// Ids dropped by `decode(.., true)`, i.e. added tokens flagged special.
    special_ids: BTreeMap<u32, String>,
    /// `special_tokens_map` as transformers passes it to chat templates.
    template_vars: Vec<(String, String)>,
    template: ChatTemplate,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("template", &self.template)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a model or tokenizer folder. Its chat template is `chat_template.jinja`, else tokenizer_config.json's
    /// `chat_template`, else `chat_template.json`, else the built-in InternVL3-hf template.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_files(load::FolderFiles::read(dir.as_ref())?)
    }

    /// The InternVL3-hf tokenizer bundled in the binary (Qwen2.5 vocabulary + InternVL tokens 151643..=151674).
    pub fn internvl3() -> Result<Self> {
        Self::from_files(bundled::files())
    }

    fn from_files(files: load::FolderFiles) -> Result<Self> {
        let cfg = load::parse_config(&files)?;
        let inner = load::build(&files, &cfg)?;
        let sources = load::template_sources(&files, &cfg)?;
        let template = if sources.is_empty() {
            ChatTemplate::internvl3()?
        } else {
            ChatTemplate::from_named(sources).map_err(|e| match e {
                Error::Template(msg) => Error::Template(format!("{}: {msg}", files.origin)),
                other => other,
            })?
        };
        let mut special = SpecialTokens::default();
        for (key, default) in ROLE_DEFAULTS {
            let named = cfg.get(key);
            let Some(content) = named.or(default) else { continue };
            let token = match inner.token_to_id(content) {
                Some(id) => Some(SpecialToken { content: content.to_string(), id }),
                // A token the config names must exist (load adds named special tokens, so this means a broken
                // folder); a missing default only means the model lacks that role (text-only Qwen2.5 has no <img>).
                None if named.is_some() => {
                    return Err(Error::Tokenizer(format!(
                        "{}: {key} {content:?} is not in the vocabulary",
                        files.origin
                    )))
                }
                None => None,
            };
            let slot = match key {
                "eos_token" => &mut special.eos,
                "pad_token" => &mut special.pad,
                "bos_token" => &mut special.bos,
                "start_image_token" => &mut special.image_start,
                "end_image_token" => &mut special.image_end,
                "context_image_token" => &mut special.image_context,
                _ => &mut special.video,
            };
            *slot = token;
        }
        Ok(Tokenizer { special_ids: load::special_ids(&inner), inner, special, template_vars: cfg.named, template })
    }

    /// Token ids of `text`; added tokens written in the text (`<|im_end|>`, `<IMG_CONTEXT>`) are matched whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`. Bytes that are not valid UTF-8 become U+FFFD; ids outside the vocabulary are skipped (both as
    /// transformers does). With `skip_special_tokens`, added tokens flagged special are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// A streaming decoder whose outputs concatenate to `decode(all ids, skip_special_tokens)`.
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder<'_> {
        IncrementalDecoder::new(self, skip_special_tokens)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `decode(.., true)` drops this id.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains_key(&id)
    }

    /// Number of ids, added tokens included (151675 for InternVL3: 151674 embedding rows plus `<video>`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The variables chat templates see besides the conversation (`eos_token`, `pad_token`, ...).
    pub fn template_vars(&self) -> &[(String, String)] {
        &self.template_vars
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Uses another chat template (for example one given on the command line).
    pub fn set_chat_template(&mut self, template: ChatTemplate) {
        self.template = template;
    }

    /// Writes the whole pipeline as a `tokenizer.json`, the fast-loading form `from_dir` prefers.
    pub fn save_tokenizer_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner.save(path, false).map_err(|e| Error::Tokenizer(format!("writing {}: {e}", path.display())))
    }
}
