//! `facellm chat`: an interactive conversation about one or more face images. Each image goes through the
//! vision tower once; every turn re-renders the conversation with the chat template and only the tokens
//! after the cached prefix are computed. Reads one user turn per line, so it can be piped and scripted.
//!
//! Commands: `/image FILE` attaches an image to the next turn, `/system TEXT` sets the system prompt (and
//! restarts), `/reset` starts over, `/stats` prints the last answer's timings, `/quit` leaves.
//! Ctrl-C stops the current answer; at the prompt it leaves.

use std::io::{BufRead, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use facellm::engine::{Session, Timings};
use facellm::tensor::Tensor;
use facellm::tokenizer::{ChatOptions, Message};
use serde_json::json;

use super::common::{load_model, preprocess_images, select_device, user_turn, RequestArgs};
use super::generate::Output;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    request: RequestArgs,
    /// text: answers on stdout, prompts and notices on stderr; json: one JSON object per answer.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

struct Conversation {
    system: Option<String>,
    messages: Vec<Message>,
    /// Tiles of every image in the conversation, in order.
    tiles: Vec<usize>,
    /// Projector features of every image, concatenated in order.
    features: Option<Tensor>,
    /// Images attached for the next user turn.
    pending: usize,
}

impl Conversation {
    fn new(system: Option<String>) -> Self {
        Conversation { system, messages: Vec::new(), tiles: Vec::new(), features: None, pending: 0 }
    }
}

/// The feature rows of the first `images` images of `conv`.
fn initial_features(conv: &Conversation, images: usize) -> Option<Tensor> {
    let f = conv.features.as_ref()?;
    if images == 0 {
        return None;
    }
    let d = f.shape()[1];
    let rows: usize = conv.tiles[..images].iter().sum::<usize>() * facellm::model::IMAGE_TOKENS_PER_TILE;
    let values = f.f32s().ok()?[..rows * d].to_vec();
    Tensor::from_f32([rows, d], values).ok()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let req = &args.request;
    select_device(req.device)?;
    let loaded = load_model(&req.model)?;
    let image_opts = req.image_options();
    let opts = req.generate_options(&loaded.generation)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let generating = Arc::new(AtomicBool::new(false));
    {
        let (cancel, generating) = (Arc::clone(&cancel), Arc::clone(&generating));
        ctrlc::set_handler(move || {
            if generating.load(Ordering::SeqCst) {
                cancel.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(130);
            }
        })?;
    }
    let model = &loaded.model;
    let tok = &loaded.tokenizer;
    let json_mode = args.output == Output::Json;
    let mut session = Session::new(model);
    let mut conv = Conversation::new(req.system.clone());
    let mut last = Timings::default();

    let attach = |conv: &mut Conversation, path: &PathBuf| -> anyhow::Result<()> {
        let (px, tiles) = preprocess_images(std::slice::from_ref(path), &image_opts)?;
        let px = px.ok_or_else(|| anyhow::anyhow!("no tiles"))?;
        let f = model.encode_images(&px)?.features;
        conv.features = Some(match conv.features.take() {
            None => f,
            Some(old) => {
                let d = old.shape()[1];
                let mut v = old.into_f32_vec();
                v.extend_from_slice(f.f32s()?);
                Tensor::from_f32([v.len() / d, d], v)?
            }
        });
        conv.tiles.extend(tiles);
        conv.pending += 1;
        Ok(())
    };
    for path in &req.images {
        attach(&mut conv, path)?;
    }
    // /reset and /system start over on the command line's images (attached to the next turn again).
    let restart = |system: Option<String>, from: &Conversation| Conversation {
        system,
        messages: Vec::new(),
        tiles: from.tiles[..req.images.len()].to_vec(),
        features: initial_features(from, req.images.len()),
        pending: req.images.len(),
    };
    if !json_mode && !super::common::QUIET.load(Ordering::Relaxed) {
        eprintln!("facellm chat: type a question; /image FILE, /system TEXT, /reset, /stats, /quit");
    }

    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    conv = restart(conv.system.clone(), &conv);
                    session.reset(model);
                    eprintln!("(conversation reset; the command line's images are attached to the next turn)");
                }
                "system" => {
                    conv = restart((!rest.trim().is_empty()).then(|| rest.trim().to_string()), &conv);
                    session.reset(model);
                    eprintln!("(system prompt set; conversation restarted)");
                }
                "image" => match attach(&mut conv, &PathBuf::from(rest.trim())) {
                    Ok(()) => eprintln!("(image attached: {} tile(s))", conv.tiles.last().copied().unwrap_or(0)),
                    Err(e) => eprintln!("error: {e:#}"),
                },
                "stats" => eprintln!(
                    "last answer: prefill {:.0} ms ({} cached tokens reused), decode {:.1} tok/s; {} tokens cached",
                    last.prefill_ms,
                    last.reused_tokens,
                    last.decode_tokens_per_s(),
                    session.cached_tokens()
                ),
                other => eprintln!("error: unknown command /{other} (try /image, /system, /reset, /stats, /quit)"),
            }
            continue;
        }
        let mut messages = Vec::new();
        if let Some(s) = &conv.system {
            messages.push(Message::text("system", s.clone()));
        }
        messages.extend(conv.messages.iter().cloned());
        messages.push(user_turn(conv.pending, line));
        let prompt = match tok.encode_chat(&messages, &conv.tiles, &ChatOptions::default()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        cancel.store(false, Ordering::SeqCst);
        generating.store(true, Ordering::SeqCst);
        let decode = |ids: &[u32]| tok.decode(ids, true);
        let mut on_text = |s: &str| {
            if !json_mode && !s.is_empty() {
                let _ = stdout.write_all(s.as_bytes());
                let _ = stdout.flush();
            }
        };
        let result =
            session.generate(model, &prompt.ids, conv.features.as_ref(), &opts, &decode, &mut on_text, Some(&cancel));
        generating.store(false, Ordering::SeqCst);
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                eprintln!("\nerror: {e}");
                continue;
            }
        };
        if json_mode {
            let report = json!({ "text": out.text, "generated_ids": out.ids, "finish_reason": out.finish_reason,
                                 "prompt_tokens": prompt.ids.len(), "reused_tokens": out.timings.reused_tokens });
            println!("{report}");
        } else {
            println!();
        }
        conv.messages = messages.into_iter().filter(|m| m.role != "system").collect();
        conv.messages.push(Message::text("assistant", out.text.clone()));
        conv.pending = 0;
        last = out.timings;
    }
    Ok(())
}
