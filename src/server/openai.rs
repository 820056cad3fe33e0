//! The OpenAI chat-completions protocol: the request as clients send it, its validation into an engine
//! request, and the response and stream-chunk bodies.
//!
//! Parsing is two-stage so every error names its field: the body must be JSON (else `invalid_json`), then
//! it is deserialized with the path of any mistyped field kept (`messages[0].content`). Message contents
//! are checked by hand for the same reason. Fields this server does not implement are refused when set to
//! a value that would change the answer (`n > 1`, `logprobs`, tools, penalties other than 0), never
//! silently ignored; fields that cannot change it (`user`, `metadata`, ...) are ignored.

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::backend::SamplingParams;
use crate::config::GenerationConfig;
use crate::engine::batch::{SeqParams, Summary};
use crate::engine::FinishReason;
use crate::tokenizer::{Content, Message, Part};

/// Stop strings at most per request, and bytes per stop string.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// Messages at most per request.
const MAX_MESSAGES: usize = 1024;

#[derive(Deserialize)]
pub struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<StopField>,
    n: Option<u64>,
    repetition_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    tools: Option<Vec<Value>>,
    response_format: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

/// The body as JSON, then as a `ChatRequest` (a mistyped field's path becomes the error's `param`).
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("invalid_json", format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid("invalid_json", "the request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = match path.as_str() {
            "stop" => "`stop` must be a string or an array of strings".to_string(),
            _ => format!("`{path}`: {}", e.inner()),
        };
        ApiError::param("invalid_type", path, msg)
    })
}

/// What the server knows when it validates a request.
pub struct Context<'a> {
    pub model_name: &'a str,
    pub generation: &'a GenerationConfig,
    pub default_max_tokens: usize,
    pub max_tiles_per_request: usize,
}

/// A request that passed validation: the conversation with image placeholders, the image URLs in order
/// (with the `param` naming each), and how to generate.
pub struct Validated {
    pub messages: Vec<Message>,
    pub images: Vec<(String, String)>,
    pub params: SeqParams,
    /// Set by the client (checked against the context once the prompt length is known).
    pub explicit_max_tokens: bool,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn validate(mut req: ChatRequest, cx: &Context) -> Result<Validated, ApiError> {
    let model = req.model.take().ok_or_else(|| ApiError::param("missing_parameter", "model", "`model` is required"))?;
    if model != cx.model_name {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::not_found(
                "model_not_found",
                format!("model {model:?} does not exist here; this server serves {:?}", cx.model_name),
            )
        });
    }
    let messages = req
        .messages
        .take()
        .ok_or_else(|| ApiError::param("missing_parameter", "messages", "`messages` is required"))?;
    if messages.is_empty() {
        return Err(ApiError::param("invalid_value", "messages", "`messages` must hold at least one message"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::param("invalid_value", "messages", format!("at most {MAX_MESSAGES} messages")));
    }
    let mut images = Vec::new();
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        out.push(message(i, m, &mut images)?);
    }
    if images.len() > cx.max_tiles_per_request {
        return Err(ApiError::param(
            "too_many_images",
            "messages",
            format!(
                "{} images; this server takes at most {} tiles per request",
                images.len(),
                cx.max_tiles_per_request
            ),
        ));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::param("unsupported_parameter", "n", "only n = 1 is supported"));
    }
    if req.logprobs == Some(true) || req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::param("unsupported_parameter", "logprobs", "logprobs are not supported"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::param("unsupported_parameter", "tools", "tools are not supported"));
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::param(
                "unsupported_parameter",
                "response_format",
                "only {\"type\": \"text\"} is supported",
            ));
        }
    }
    for (name, v) in [("frequency_penalty", req.frequency_penalty), ("presence_penalty", req.presence_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::param(
                "unsupported_parameter",
                name,
                format!("`{name}` is not supported (use repetition_penalty)"),
            ));
        }
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let param = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    if max_tokens == Some(0) {
        return Err(ApiError::param("invalid_value", param, format!("`{param}` must be at least 1")));
    }
    let sampling = sampling(&req, cx.generation)?;
    let stop = match req.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::param(
            "invalid_value",
            "stop",
            format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    let max_tokens_usize = max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    Ok(Validated {
        messages: out,
        images,
        params: SeqParams {
            max_tokens: max_tokens_usize.unwrap_or(cx.default_max_tokens),
            sampling,
            eos_ids: cx.generation.eos_token_ids.clone(),
            stop,
        },
        explicit_max_tokens: max_tokens.is_some(),
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Sampling parameters: the request's over the model folder's generation_config (greedy for FaceLLM), as
/// the CLI's flags are. Temperature 0 is greedy; a request without a seed gets a fresh one.
fn sampling(req: &ChatRequest, g: &GenerationConfig) -> Result<SamplingParams, ApiError> {
    let mut p = SamplingParams {
        do_sample: g.do_sample,
        temperature: g.temperature as f32,
        top_k: g.top_k,
        top_p: g.top_p as f32,
        repetition_penalty: g.repetition_penalty as f32,
        seed: 0,
    };
    if let Some(t) = req.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::param(
                "invalid_value",
                "temperature",
                format!("temperature must be in [0, 2], got {t}"),
            ));
        }
        p.temperature = t as f32;
        p.do_sample = t > 0.0;
    }
    if let Some(tp) = req.top_p {
        if !(tp > 0.0 && tp <= 1.0) {
            return Err(ApiError::param("invalid_value", "top_p", format!("top_p must be in (0, 1], got {tp}")));
        }
        p.top_p = tp as f32;
    }
    if let Some(k) = req.top_k {
        if k < -1 {
            return Err(ApiError::param(
                "invalid_value",
                "top_k",
                format!("top_k must be >= 0 (or -1 for off), got {k}"),
            ));
        }
        p.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(r) = req.repetition_penalty {
        if !(r > 0.0 && r.is_finite() && r <= 10.0) {
            return Err(ApiError::param(
                "invalid_value",
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10], got {r}"),
            ));
        }
        p.repetition_penalty = r as f32;
    }
    p.seed = match req.seed {
        Some(s) => s as u64,
        None => fresh_seed(),
    };
    p.validate().map_err(|e| ApiError::invalid("invalid_value", e.to_string()))?;
    Ok(p)
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// One message as the chat template takes it; image parts become placeholders and their URLs go to
/// `images`, in order.
fn message(i: usize, m: ChatMessage, images: &mut Vec<(String, String)>) -> Result<Message, ApiError> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::param(
                "invalid_value",
                format!("messages[{i}].role"),
                format!("role {other:?} is not supported (system, developer, user or assistant)"),
            ))
        }
    };
    let at = |s: String| format!("messages[{i}].content{s}");
    let content = match m.content {
        Value::String(s) => Content::Text(s),
        Value::Null if role == "assistant" => Content::Text(String::new()),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                let param = at(format!("[{j}]"));
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" => match part.get("text") {
                        Some(Value::String(t)) => out.push(Part::text(t.clone())),
                        _ => return Err(ApiError::param("invalid_type", param, "a text part needs a string `text`")),
                    },
                    "image_url" => {
                        if role != "user" {
                            return Err(ApiError::param(
                                "invalid_value",
                                param,
                                "images are accepted in user messages only",
                            ));
                        }
                        let url = match part.get("image_url") {
                            Some(Value::String(u)) => u.clone(),
                            Some(Value::Object(o)) => match o.get("url") {
                                Some(Value::String(u)) => u.clone(),
                                _ => {
                                    return Err(ApiError::param(
                                        "invalid_type",
                                        format!("{param}.image_url.url"),
                                        "an image_url part needs a string `image_url.url`",
                                    ))
                                }
                            },
                            _ => {
                                return Err(ApiError::param(
                                    "invalid_type",
                                    format!("{param}.image_url"),
                                    "an image_url part needs `image_url: {\"url\": ...}`",
                                ))
                            }
                        };
                        images.push((url, format!("{param}.image_url")));
                        out.push(Part::image());
                    }
                    "" => return Err(ApiError::param("invalid_type", param, "a content part needs a string `type`")),
                    other => {
                        return Err(ApiError::param(
                            "unsupported_content_type",
                            param,
                            format!("content part type {other:?} is not supported (text or image_url)"),
                        ))
                    }
                }
            }
            Content::Parts(out)
        }
        Value::Null => {
            return Err(ApiError::param(
                "missing_parameter",
                at(String::new()),
                format!("a {role} message needs `content`"),
            ))
        }
        _ => {
            return Err(ApiError::param(
                "invalid_type",
                at(String::new()),
                "`content` must be a string or an array of content parts",
            ))
        }
    };
    Ok(Message::new(role, content))
}

/// OpenAI's name of a finish reason.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

pub fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

/// The identity of one response, repeated in every chunk of a stream.
pub struct ResponseId {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn completion(r: &ResponseId, text: &str, s: &Summary) -> Value {
    json!({
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(s.finish_reason),
        }],
        "usage": usage(s),
    })
}

/// A stream chunk: `delta` for choice 0 and its finish reason (`None` until the last one).
pub fn chunk(r: &ResponseId, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": r.id,
        "object": "chat.completion.chunk",
        "created": r.created,
        "model": r.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

/// The last chunk of a stream with `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(r: &ResponseId, s: &Summary) -> Value {
    json!({
        "id": r.id,
        "object": "chat.completion.chunk",
        "created": r.created,
        "model": r.model,
        "choices": [],
        "usage": usage(s),
    })
}
