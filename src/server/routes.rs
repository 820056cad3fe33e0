//! The HTTP routes, the server state they share, and the relay from engine events to responses.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::error::ApiError;
use super::openai::{self, Context, ResponseId, Validated};
use super::{images, ServerConfig};
use crate::engine::batch::{EngineHandle, Event, Failure, ImageInput, Request, Summary};
use crate::tokenizer::{ChatOptions, Tokenizer};

pub struct AppState {
    cfg: ServerConfig,
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    created: u64,
    /// Responses by (route, status code).
    responses: Mutex<BTreeMap<(String, u16), u64>>,
}

impl AppState {
    pub fn new(cfg: ServerConfig, engine: EngineHandle, tokenizer: Arc<Tokenizer>) -> AppState {
        AppState {
            cfg,
            engine,
            tokenizer,
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            created: unix_now(),
            responses: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn model_name(&self) -> &str {
        &self.cfg.model_name
    }

    /// Refuses new requests from now on and drains the engine (the first call decides the grace).
    pub fn begin_shutdown(&self, grace: Duration) {
        if !self.shutting_down.swap(true, Ordering::AcqRel) {
            self.engine.drain(grace);
        }
    }

    pub fn join_engine(&self) {
        self.engine.join();
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        // The body limit is enforced by `Bytes` extraction; its rejection becomes an OpenAI-shaped 413.
        .layer(axum::extract::DefaultBodyLimit::max(state.cfg.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_responses))
        .with_state(state)
}

async fn require_api_key(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn count_responses(State(st): State<Arc<AppState>>, req: HttpRequest, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let resp = next.run(req).await;
    *st.responses.lock().unwrap_or_else(|p| p.into_inner()).entry((route, resp.status().as_u16())).or_insert(0) += 1;
    resp
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.shutting_down.load(Ordering::Acquire) {
        return ApiError::overloaded("shutting_down", "the server is shutting down", 5).into_response();
    }
    if !st.engine.is_alive() {
        return ApiError::internal("the engine has stopped").into_response();
    }
    Json(json!({"status": "ok", "model": st.cfg.model_name})).into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "facellm",
            "max_model_len": st.engine.context,
        }],
    }))
    .into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    st.engine.metrics.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP facellm_requests_in_engine Requests admitted and not finished (waiting or running).\n\
         # TYPE facellm_requests_in_engine gauge\nfacellm_requests_in_engine {}",
        st.engine.slots.in_use()
    );
    let _ = writeln!(out, "# HELP facellm_http_responses_total HTTP responses by route and status.");
    let _ = writeln!(out, "# TYPE facellm_http_responses_total counter");
    for ((route, code), n) in st.responses.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "facellm_http_responses_total{{route=\"{route}\",code=\"{code}\"}} {n}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::unsupported_media_type(format!(
                "the body must be application/json, got content type {ct:?}"
            )));
        }
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(format!(
            "the request body is over this server's limit of {} bytes",
            st.cfg.limits.max_body_bytes
        )),
        _ => ApiError::invalid("invalid_body", format!("cannot read the request body: {}", e.body_text())),
    })?;
    let cx = Context {
        model_name: &st.cfg.model_name,
        generation: &st.cfg.generation,
        default_max_tokens: st.cfg.default_max_tokens,
        max_tiles_per_request: st.cfg.limits.max_tiles_per_request,
    };
    let v = openai::validate(openai::parse(&body)?, &cx)?;
    drop(body);
    if st.shutting_down.load(Ordering::Acquire) {
        return Err(ApiError::overloaded("shutting_down", "the server is shutting down", 5));
    }
    let Some(permit) = st.engine.slots.try_acquire() else {
        return Err(ApiError::overloaded(
            "queue_full",
            "the server is at capacity (running and waiting requests); retry shortly",
            1,
        ));
    };
    let (stream, include_usage) = (v.stream, v.include_usage);
    let prep = {
        let st = st.clone();
        tokio::task::spawn_blocking(move || prepare(&st, v))
            .await
            .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??
    };
    let (tx, rx) = unbounded_channel();
    let prompt_tokens = prep.prompt.len();
    let req = Request {
        prompt: prep.prompt,
        images: prep.images,
        params: prep.params,
        arrived,
        deadline: Some(arrived + st.cfg.limits.request_timeout),
        events: tx,
        permit,
    };
    if st.engine.submit(req).is_err() {
        return Err(ApiError::overloaded("engine_stopped", "the engine has stopped", 5));
    }
    let id = ResponseId {
        id: format!("chatcmpl-{:x}{:06x}", st.created, st.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        model: st.cfg.model_name.clone(),
    };
    if stream {
        Ok(sse(rx, id, include_usage).into_response())
    } else {
        complete(rx, id, prompt_tokens).await
    }
}

/// The engine's input, ready to submit.
struct Prepared {
    prompt: Vec<u32>,
    images: Vec<ImageInput>,
    params: crate::engine::batch::SeqParams,
}

/// The blocking part of a request: images (fetched, hashed, looked up or preprocessed), chat template,
/// tokenization, and the checks that need the prompt's length.
fn prepare(st: &AppState, v: Validated) -> Result<Prepared, ApiError> {
    let Validated { messages, images: urls, mut params, explicit_max_tokens, .. } = v;
    let policy = &st.cfg.images;
    let mut images = Vec::with_capacity(urls.len());
    let mut tiles_total = 0;
    for (url, param) in &urls {
        let bytes = images::fetch(url, policy, param)?;
        let img = images::prepare(&bytes, policy, &st.engine.vision, &st.engine.metrics, param)?;
        tiles_total += img.tiles;
        if tiles_total > st.cfg.limits.max_tiles_per_request {
            return Err(ApiError::param(
                "too_many_tiles",
                param.clone(),
                format!(
                    "the images of this request need more than {} tiles (448 px crops; a large image takes up to \
                     {} plus a thumbnail); send smaller or fewer images",
                    st.cfg.limits.max_tiles_per_request, policy.options.max_tiles
                ),
            ));
        }
        images.push(img);
    }
    let tiles: Vec<usize> = images.iter().map(|i| i.tiles).collect();
    if let Some(ctx) = &st.tokenizer.special_tokens().image_context {
        if messages.iter().any(|m| message_text_contains(m, &ctx.content)) {
            return Err(placeholder_in_text(&ctx.content));
        }
    }
    let prompt = st
        .tokenizer
        .encode_chat(&messages, &tiles, &ChatOptions::default())
        .map_err(|e| ApiError::invalid("invalid_prompt", format!("cannot build the prompt: {e}")))?
        .ids;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= st.engine.vocab) {
        let token = st.tokenizer.id_to_token(bad).unwrap_or_default();
        return Err(ApiError::param(
            "invalid_value",
            "messages",
            format!("the prompt holds the token {token:?} (id {bad}), which this model cannot take as input"),
        ));
    }
    let image_tokens = prompt.iter().filter(|&&t| t == st.engine.image_token_id).count();
    if image_tokens != tiles.iter().sum::<usize>() * crate::model::IMAGE_TOKENS_PER_TILE {
        return Err(placeholder_in_text("<IMG_CONTEXT>"));
    }
    let limit = st.engine.context.min(st.engine.kv_capacity_tokens);
    let n = prompt.len();
    if n >= limit || (explicit_max_tokens && n + params.max_tokens > limit) {
        let asked = if explicit_max_tokens { params.max_tokens } else { 1 };
        return Err(ApiError::param(
            "context_length_exceeded",
            "messages",
            format!(
                "this model's maximum context length is {limit} tokens; the request needs {} ({n} in the messages, \
                 {asked} for the completion)",
                n + asked
            ),
        ));
    }
    params.max_tokens = params.max_tokens.min(limit - n);
    Ok(Prepared { prompt, images, params })
}

/// The image placeholder token typed as text would be expanded like an image (or shift the real images'
/// features onto the wrong tokens): refused.
fn placeholder_in_text(token: &str) -> ApiError {
    ApiError::param(
        "invalid_value",
        "messages",
        format!("message text must not contain the image placeholder token {token}; send images as image_url parts"),
    )
}

fn message_text_contains(m: &crate::tokenizer::Message, needle: &str) -> bool {
    use crate::tokenizer::Content;
    match &m.content {
        Some(Content::Text(t)) => t.contains(needle),
        Some(Content::Parts(parts)) => parts.iter().any(|p| p.text.as_deref().is_some_and(|t| t.contains(needle))),
        None => false,
    }
}

fn failure_error(f: &Failure) -> ApiError {
    match f {
        Failure::Timeout(m) => ApiError::timeout(m.clone()),
        Failure::Shutdown(m) => ApiError::overloaded("shutting_down", m.clone(), 5),
        Failure::Invalid(m) => ApiError::invalid("invalid_request", m.clone()),
        Failure::Internal(m) => ApiError::internal(m.clone()),
    }
}

/// A non-streaming answer: every event, then one JSON body.
async fn complete(
    mut rx: UnboundedReceiver<Event>,
    id: ResponseId,
    prompt_tokens: usize,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done(s) => return Ok(Json(openai::completion(&id, &text, &s)).into_response()),
            Event::Failed(f) => return Err(failure_error(&f)),
        }
    }
    Err(ApiError::internal(format!("the engine stopped before answering ({prompt_tokens} prompt tokens)")))
}

enum Phase {
    Start,
    Running,
    /// The finish chunk is sent; the usage chunk (if asked) and `[DONE]` remain.
    Finishing(Option<Summary>),
    Done,
}

/// A streaming answer: a role chunk, one chunk per text delta, a finish chunk, the usage chunk if asked,
/// then `data: [DONE]`. A failure midway is sent as an error event before `[DONE]`.
fn sse(
    rx: UnboundedReceiver<Event>,
    id: ResponseId,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    let id = Arc::new(id);
    let s = stream::unfold((rx, Phase::Start), move |(mut rx, phase)| {
        let id = id.clone();
        let id = async move {
            let id = &*id;
            match phase {
                Phase::Start => {
                    let c = openai::chunk(id, json!({"role": "assistant", "content": ""}), None);
                    Some((data(c), (rx, Phase::Running)))
                }
                Phase::Running => match rx.recv().await {
                    Some(Event::Text(t)) => {
                        Some((data(openai::chunk(id, json!({"content": t}), None)), (rx, Phase::Running)))
                    }
                    Some(Event::Done(s)) => {
                        let c = openai::chunk(id, json!({}), Some(openai::finish_reason(s.finish_reason)));
                        Some((data(c), (rx, Phase::Finishing(include_usage.then_some(s)))))
                    }
                    Some(Event::Failed(f)) => Some((data(failure_error(&f).body()), (rx, Phase::Finishing(None)))),
                    None => {
                        let e = ApiError::internal("the engine stopped before the answer was complete");
                        Some((data(e.body()), (rx, Phase::Finishing(None))))
                    }
                },
                Phase::Finishing(Some(s)) => Some((data(openai::usage_chunk(id, &s)), (rx, Phase::Finishing(None)))),
                Phase::Finishing(None) => Some((Ok(SseEvent::default().data("[DONE]")), (rx, Phase::Done))),
                Phase::Done => None,
            }
        };
        id
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}
