//! Generation: prefill, decode loop, sampling, stop rules and streaming. One sequence at a time here; the
//! batching scheduler of the serving issue builds on the same pieces.

pub mod generate;
pub mod stop;

pub use generate::{generate, FinishReason, GenerateOptions, GenerateOutput, Session, Timings};
