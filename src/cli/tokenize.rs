//! `facellm tokenize`: token ids of a text, or of a whole chat prompt with images, printed as JSON.
//!
//!   facellm tokenize [--model DIR] --text "Hello"
//!   facellm tokenize [--model DIR] --chat --prompt "Describe the face." [--image F]... [--system S] [--max-tiles N]
//!
//! Without `--model` the InternVL3 tokenizer bundled in the binary is used. For `--chat` the images are
//! preprocessed only to count their tiles, which fixes how many `<IMG_CONTEXT>` tokens each one takes.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::ValueEnum;
use facellm::image::{preprocess_file, ImageOptions};
use facellm::tokenizer::{ChatOptions, Message, PromptFormat, Tokenizer};
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// The model folder's chat template with InternVL image expansion (inference).
    Template,
    /// LLaMA-Factory's `intern_vl` training template (default Chinese system prompt).
    Llamafactory,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model or tokenizer folder; default: the bundled InternVL3 tokenizer.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text to tokenize as is (special tokens written in it are recognised).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    text: Option<String>,
    /// Build a chat prompt: one user turn holding the images, then the prompt.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// The user's question (with --chat).
    #[arg(long, requires = "chat")]
    prompt: Option<String>,
    /// Image file, repeatable; each becomes an image part before the prompt, in order.
    #[arg(long = "image", requires = "chat")]
    images: Vec<PathBuf>,
    /// System message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Largest tile grid per image (1..=12; a thumbnail tile is added when the grid has more than one tile).
    #[arg(long, default_value_t = 12, requires = "chat")]
    max_tiles: usize,
    /// Leave out the assistant header that asks the model to answer.
    #[arg(long, requires = "chat")]
    no_generation_prompt: bool,
    /// Prompt format.
    #[arg(long, value_enum, default_value_t = Format::Template, requires = "chat")]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tok = match &args.model {
        Some(dir) => Tokenizer::from_dir(dir)?,
        None => Tokenizer::internvl3()?,
    };
    let out = if let Some(text) = &args.text {
        let ids = tok.encode(text)?;
        json!({ "count": ids.len(), "ids": ids })
    } else {
        let prompt = args.prompt.clone().unwrap_or_default();
        let opts = ImageOptions { max_tiles: args.max_tiles, ..ImageOptions::default() };
        let mut tiles = Vec::with_capacity(args.images.len());
        for path in &args.images {
            let pre = preprocess_file(path, &opts).with_context(|| format!("image {}", path.display()))?;
            tiles.push(pre.num_tiles);
        }
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::text("system", system.clone()));
        }
        messages.push(super::common::user_turn(args.images.len(), &prompt));
        let mut chat = ChatOptions::default();
        chat.render.add_generation_prompt = !args.no_generation_prompt;
        chat.format = match args.format {
            Format::Template => PromptFormat::ChatTemplate,
            Format::Llamafactory => PromptFormat::LlamaFactoryInternVl,
        };
        let p = tok.encode_chat(&messages, &tiles, &chat)?;
        json!({ "prompt": p.text, "num_tiles": tiles, "count": p.ids.len(), "ids": p.ids })
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
