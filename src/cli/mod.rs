//! One file per subcommand: an `Args` (clap) and a `run(Args) -> anyhow::Result<()>`.

pub mod bench;
pub mod chat;
pub mod common;
pub mod demo;
pub mod generate;
pub mod info;
pub mod preprocess;
pub mod source;
pub mod tokenize;
