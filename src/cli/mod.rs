//! One file per subcommand: an `Args` (clap) and a `run(Args) -> anyhow::Result<()>`.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod bench_cuda;
pub mod chat;
pub mod common;
pub mod demo;
#[cfg(any(feature = "cuda", test))]
pub mod engine_chat;
pub mod generate;
pub mod info;
pub mod preprocess;
pub mod selfcheck;
pub mod serve;
pub mod source;
pub mod tokenize;
