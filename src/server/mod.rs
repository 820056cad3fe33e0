//! `facellm serve`: an OpenAI-compatible HTTP server in front of the batching engine.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text). The HTTP side (axum on a tokio runtime) parses and validates requests,
//! fetches and preprocesses images (or finds their features in the vision cache), renders the chat
//! template and tokenizes; then it hands the request to the engine thread (`engine::batch`) and relays the
//! engine's events as a JSON answer or as SSE chunks. A client that disconnects drops its event receiver,
//! which the engine notices at the next step and frees the sequence's blocks.
//!
//! Limits hold at each stage: body size (413), images per request and bytes per image (checked on the
//! base64 length, before decoding), pixels per image (checked from the header, before decoding), tiles per
//! image and per request, prompt tokens against the context and the KV pool, and a bounded number of
//! requests in the engine (`max_seqs` running + `max_queue` waiting; beyond it 503 with `Retry-After`).
//! Each request has a deadline. Every error has OpenAI's shape (`error.rs`).
//!
//! Shutdown (SIGINT or SIGTERM): the listener stops accepting, waiting requests get 503, running ones may
//! finish for `shutdown_grace`, after which their streams end with an error event and `[DONE]`.

mod error;
mod images;
mod openai;
mod routes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::ApiError;
pub use images::ImagePolicy;

use crate::config::GenerationConfig;
use crate::engine::batch::EngineHandle;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Per-request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request body, in bytes.
    pub max_body_bytes: usize,
    /// Tiles over all images of a request (each image has at least one; a tiled image adds a thumbnail).
    pub max_tiles_per_request: usize,
    /// From arrival to the last token.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port; the chosen address is printed once the server listens.
    pub port: u16,
    /// The `model` clients must name, listed by `/v1/models`.
    pub model_name: String,
    pub api_key: Option<String>,
    pub images: ImagePolicy,
    pub limits: Limits,
    /// Sampling defaults and EOS ids (the model folder's generation_config.json).
    pub generation: GenerationConfig,
    /// `max_tokens` of requests that do not set it.
    pub default_max_tokens: usize,
    pub shutdown_grace: Duration,
}

/// Serves until SIGINT or SIGTERM, then drains the engine and returns. Prints
/// `facellm serve: listening on http://ADDR` to stdout once the socket is bound.
pub fn run(cfg: ServerConfig, engine: EngineHandle, tokenizer: Arc<Tokenizer>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)))
        .thread_name("facellm-http")
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("serve: cannot start the async runtime: {e}")))?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let grace = cfg.shutdown_grace;
    let state = Arc::new(routes::AppState::new(cfg, engine, tokenizer));
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::io(PathBuf::from(format!("listening on {addr}")), e))?;
        let local = listener.local_addr().map_err(|e| Error::io(PathBuf::from(&addr), e))?;
        {
            use std::io::Write as _;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "facellm serve: listening on http://{local} (model {})", state.model_name());
            let _ = out.flush();
        }
        let app = routes::router(state.clone());
        let stopping = state.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("facellm serve: shutting down (running requests get up to {} s)", grace.as_secs_f64());
                stopping.begin_shutdown(grace);
            })
            .await
            .map_err(|e| Error::Invalid(format!("serve: {e}")))
    });
    // The listener is closed and every connection has ended (streams included); make sure the engine ends too.
    state.begin_shutdown(Duration::ZERO);
    state.join_engine();
    served
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
