//! From a conversation plus the tile count of each image to the model's input ids.
//!
//! Two formats. `ChatTemplate` is the published inference path (MODEL_SPEC §5.2-5.3): the folder's chat template
//! writes one `<IMG_CONTEXT>` per image, then the processor replaces the k-th one by
//! `<img>` + `<IMG_CONTEXT>` x (256 * tiles_k) + `</img>` and tokenizes the whole text. `LlamaFactoryInternVl` is
//! the format FaceLLM was fine-tuned with (LLaMA-Factory's `intern_vl` template, §5.4): a default Chinese system
//! prompt, `<image>` placeholders expanded without a newline, and each template slot tokenized on its own.

use super::chat::{Content, Message, RenderOptions};
use super::Tokenizer;
use crate::{Error, Result};

/// LLM tokens per 448x448 tile after pixel shuffle: (448 / 14)^2 * 0.5^2.
pub const IMAGE_SEQ_LENGTH: usize = 256;

/// LLaMA-Factory `intern_vl` default system prompt (used whenever the conversation has no non-empty system turn).
pub const LLAMAFACTORY_INTERNVL_SYSTEM: &str =
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";

/// The image placeholder of LLaMA-Factory datasets.
pub const LLAMAFACTORY_IMAGE_PLACEHOLDER: &str = "<image>";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptFormat {
    /// The folder's chat template plus InternVL processor expansion (what transformers does at inference).
    #[default]
    ChatTemplate,
    /// LLaMA-Factory's `intern_vl` training template.
    LlamaFactoryInternVl,
}

/// How to build a chat prompt. The default is the inference path: chat template, generation prompt on (unlike
/// `RenderOptions::default()`, which follows transformers' `add_generation_prompt=False`), 256 tokens per tile.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub format: PromptFormat,
    /// Template options; for `LlamaFactoryInternVl` only the messages matter (its user slot always ends with the
    /// assistant header, so `add_generation_prompt` has no effect).
    pub render: RenderOptions,
    /// Tokens per tile (the processor's `image_seq_length`).
    pub image_seq_length: usize,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            format: PromptFormat::ChatTemplate,
            render: RenderOptions { add_generation_prompt: true, ..Default::default() },
            image_seq_length: IMAGE_SEQ_LENGTH,
        }
    }
}

/// A tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt text before image expansion, one placeholder per image (readable; what `--chat` prints).
    pub text: String,
    pub ids: Vec<u32>,
}

/// The text that stands for one image of `tiles` tiles in the token stream.
fn image_block(tok: &Tokenizer, tiles: usize, seq_len: usize) -> Result<String> {
    let sp = tok.special_tokens();
    let (Some(start), Some(ctx), Some(end)) = (&sp.image_start, &sp.image_context, &sp.image_end) else {
        return Err(Error::Invalid(
            "this tokenizer has no image tokens (<img>, <IMG_CONTEXT>, </img>); it cannot take images".into(),
        ));
    };
    if tiles == 0 {
        return Err(Error::Invalid("an image must have at least one tile".into()));
    }
    let n = seq_len * tiles;
    let mut s = String::with_capacity(start.content.len() + end.content.len() + n * ctx.content.len());
    s.push_str(&start.content);
    for _ in 0..n {
        s.push_str(&ctx.content);
    }
    s.push_str(&end.content);
    Ok(s)
}

/// Replaces placeholder occurrences in order, the k-th by the block of image `next + k`; returns the new text and
/// how many it replaced. Fails if there are more placeholders than images.
fn expand(
    tok: &Tokenizer,
    text: &str,
    placeholder: &str,
    tiles: &[usize],
    next: &mut usize,
    seq_len: usize,
) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(placeholder) {
        let Some(&t) = tiles.get(*next) else {
            return Err(Error::Invalid(format!(
                "the prompt has more image placeholders ({placeholder}) than images ({})",
                tiles.len()
            )));
        };
        out.push_str(&rest[..pos]);
        out.push_str(&image_block(tok, t, seq_len)?);
        rest = &rest[pos + placeholder.len()..];
        *next += 1;
    }
    out.push_str(rest);
    Ok(out)
}

fn check_all_used(used: usize, tiles: &[usize], placeholder: &str) -> Result<()> {
    if used != tiles.len() {
        return Err(Error::Invalid(format!(
            "{} images were given but the prompt has {used} image placeholders ({placeholder})",
            tiles.len()
        )));
    }
    Ok(())
}

/// The InternVL processor's expansion of a rendered prompt: the k-th `<IMG_CONTEXT>` becomes image k's block.
/// The number of placeholders must equal the number of images.
pub fn expand_image_placeholders(tok: &Tokenizer, text: &str, tiles: &[usize], seq_len: usize) -> Result<String> {
    let Some(ctx) = tok.special_tokens().image_context.as_ref().map(|t| t.content.clone()) else {
        check_all_used(0, tiles, "<IMG_CONTEXT>")?;
        return Ok(text.to_string());
    };
    let mut next = 0;
    let out = expand(tok, text, &ctx, tiles, &mut next, seq_len)?;
    check_all_used(next, tiles, &ctx)?;
    Ok(out)
}

/// A message's content as LLaMA-Factory sees it: one string, image parts written as `<image>`.
fn flat_content(m: &Message) -> String {
    match &m.content {
        None => String::new(),
        Some(Content::Text(s)) => s.clone(),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|p| match p.kind.as_str() {
                "image" => LLAMAFACTORY_IMAGE_PLACEHOLDER.to_string(),
                _ => p.text.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// LLaMA-Factory `intern_vl` slots, each tokenized separately as LLaMA-Factory does: the system slot, then per
/// turn `<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n` and `{a}<|im_end|>\n`. Returns the slots
/// with placeholders and with images expanded.
fn llamafactory_slots(
    tok: &Tokenizer,
    messages: &[Message],
    tiles: &[usize],
    seq_len: usize,
) -> Result<(Vec<String>, Vec<String>)> {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == "system" => (flat_content(m), &messages[1..]),
        _ => (String::new(), messages),
    };
    let system = if system.is_empty() { LLAMAFACTORY_INTERNVL_SYSTEM.to_string() } else { system };
    let mut raw = vec![format!("<|im_start|>system\n{system}<|im_end|>\n")];
    let mut expanded = raw.clone();
    let mut next = 0;
    for (i, m) in turns.iter().enumerate() {
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            return Err(Error::Invalid(format!(
                "LLaMA-Factory intern_vl format: message {} has role {:?}, expected {want:?} (turns must alternate user/assistant after an optional system message)",
                i + messages.len() - turns.len(),
                m.role
            )));
        }
        let content = flat_content(m);
        let content_x = expand(tok, &content, LLAMAFACTORY_IMAGE_PLACEHOLDER, tiles, &mut next, seq_len)?;
        let slot = |c: &str| {
            if want == "user" {
                format!("<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n")
            } else {
                format!("{c}<|im_end|>\n")
            }
        };
        raw.push(slot(&content));
        expanded.push(slot(&content_x));
    }
    check_all_used(next, tiles, LLAMAFACTORY_IMAGE_PLACEHOLDER)?;
    Ok((raw, expanded))
}

impl Tokenizer {
    /// Renders a conversation with this tokenizer's chat template and special-token variables.
    pub fn apply_chat_template(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        self.chat_template().render(messages, opts, self.template_vars())
    }

    /// Builds the model input of a conversation whose image parts have `tiles[k]` tiles each, in order.
    pub fn encode_chat(&self, messages: &[Message], tiles: &[usize], opts: &ChatOptions) -> Result<Prompt> {
        if messages.iter().any(|m| m.count_parts("video") > 0) {
            return Err(Error::Invalid("video input is not supported".into()));
        }
        if !tiles.is_empty() {
            // Checked first: a text-only template would otherwise fail on the parts list with a murkier message.
            image_block(self, 1, 1)?;
        }
        match opts.format {
            PromptFormat::ChatTemplate => {
                // Checked before rendering for a clearer message; the placeholder count is checked after it.
                let images: usize = messages.iter().map(|m| m.count_parts("image")).sum();
                if images != tiles.len() {
                    return Err(Error::Invalid(format!(
                        "the conversation has {images} image parts but {} images were given",
                        tiles.len()
                    )));
                }
                let text = self.apply_chat_template(messages, &opts.render)?;
                let expanded = expand_image_placeholders(self, &text, tiles, opts.image_seq_length)?;
                let ids = self.encode(&expanded)?;
                Ok(Prompt { text, ids })
            }
            PromptFormat::LlamaFactoryInternVl => {
                let (raw, expanded) = llamafactory_slots(self, messages, tiles, opts.image_seq_length)?;
                let mut ids = Vec::new();
                for slot in &expanded {
                    ids.extend(self.encode(slot)?);
                }
                Ok(Prompt { text: raw.concat(), ids })
            }
        }
    }
}
