//! One file per subcommand: an `Args` (clap) and a `run(Args) -> anyhow::Result<()>`.

pub mod preprocess;
pub mod tokenize;
