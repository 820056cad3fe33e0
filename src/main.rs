//! The `facellm` command line: argument parsing only; each subcommand lives in `cli/<name>.rs`.
//! Exit codes: 0 ok, 1 runtime error, 2 usage error (clap's own).

mod cli;

use std::io::IsTerminal as _;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "facellm", version, about = "Run and fine-tune FaceLLM, the face-understanding multimodal LLM")]
struct Cli {
    /// No progress bars or notices on stderr (results and errors are still printed).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure speed on this machine (vision tower, prefill, decode) and print JSON.
    Bench(cli::bench::Args),
    /// Talk about one or more images, turn by turn (stdin: one turn per line; /image, /reset, /quit).
    Chat(cli::chat::Args),
    /// Run the whole pipeline on a tiny built-in model with random weights (no download, no GPU).
    Demo(cli::demo::Args),
    /// Answer a question about zero or more images (streams text; --output json for ids and timings).
    Generate(cli::generate::Args),
    /// Tokenize text, or a whole chat prompt with images, and print the ids as JSON.
    Tokenize(cli::tokenize::Args),
    /// Describe a model folder: architecture, parameters, dtypes, memory needed, special tokens.
    Info(cli::info::Args),
    /// Preprocess an image as the model sees it and print the tiles' summary as JSON.
    Preprocess(cli::preprocess::Args),
    /// Check every CUDA kernel and the GPU models against the CPU backend; prints a table, fails on any error.
    Selfcheck(cli::selfcheck::Args),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming, continuous batching).
    Serve(cli::serve::Args),
}

fn main() {
    let cli = Cli::parse();
    cli::common::QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let result = match cli.command {
        Command::Bench(args) => cli::bench::run(args),
        Command::Chat(args) => cli::chat::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Tokenize(args) => cli::tokenize::run(args),
        Command::Info(args) => cli::info::run(args),
        Command::Preprocess(args) => cli::preprocess::run(args),
        Command::Selfcheck(args) => cli::selfcheck::run(args),
        Command::Serve(args) => cli::serve::run(args),
    };
    if let Err(err) = result {
        // Colour only for a person at a terminal; logs and pipes get plain text.
        if std::io::stderr().is_terminal() {
            eprintln!("\x1b[1;31merror:\x1b[0m {err:#}");
        } else {
            eprintln!("error: {err:#}");
        }
        std::process::exit(1);
    }
}
