//! facellm: an inference and fine-tuning engine for FaceLLM (InternVL3-hf: InternViT + pixel-shuffle MLP
//! projector + Qwen2.5), with a CPU backend for every op and hand-written CUDA kernels behind feature `cuda`.
//!
//! The model contract (configs, tensor names, forward math, image processor, tokenizer, chat template) is
//! written down in MODEL_SPEC.md of the design docs; the modules follow its sections.

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod image;
pub mod kv;
pub mod loader;
pub mod model;
pub mod selfcheck;
pub mod server;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};
