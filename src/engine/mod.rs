//! Generation: prefill, decode loop, sampling, stop rules and streaming. `generate` runs one sequence at a
//! time on the CPU (the CLI); `batch` is the continuous-batching engine of the server, built on the same
//! sampler, stop rules and streaming detokenizer, which the CLI also uses with `--device cuda` (`gpu`: the
//! GPU models as its model).

pub mod batch;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod stop;

pub use generate::{generate, FinishReason, GenerateOptions, GenerateOutput, Session, Timings};
