//! One error type for the library. Every variant names what was wrong and where (file, field, tensor),
//! so the CLI can print it as a single readable line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io error is part of the message (not a `source`), so a chain printer shows it once.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A config.json that cannot be parsed, or a field with an unsupported or inconsistent value.
    #[error("config {file}: field `{field}`: {msg}")]
    Config { file: String, field: String, msg: String },
    /// A tensor that is missing, mis-shaped, of an unsupported dtype or out of the file's bounds.
    #[error("checkpoint {file}: tensor `{tensor}`: {msg}")]
    Tensor { file: String, tensor: String, msg: String },
    /// A checkpoint file or folder that cannot be used at all (missing, truncated header, bad index).
    #[error("checkpoint {file}: {msg}")]
    Checkpoint { file: String, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// An image that cannot be decoded or is refused by a limit.
    #[error("image {source_name}: {msg}")]
    Image { source_name: String, msg: String },
    /// Any other invalid user input (an option out of range, a prompt over the context).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), err: source }
    }
}
