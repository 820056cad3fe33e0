//! Malformed and hostile requests against the real server: each must get its 4xx status with an error in
//! OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), and afterwards the server must still
//! answer a normal request exactly as before. The table is printed (`--nocapture`) as markdown.

#[path = "support/png.rs"]
mod png;
mod server_common;
use png::png_header_only;

use serde_json::{json, Value};
use server_common::*;

fn user(content: Value) -> Value {
    json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

fn with_image(url: &str) -> Value {
    user(json!([image_part(url), {"type": "text", "text": "Who is this?"}]))
}

/// `base` with `key` set to `value`.
fn set(key: &str, value: Value) -> Value {
    let mut b = user(json!("Hello"));
    b[key] = value;
    b
}

enum Body {
    Json(Value),
    Raw(&'static str, Vec<u8>),
}

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    body: Body,
    status: u16,
    kind: &'static str,
    code: &'static str,
}

fn case(what: &'static str, body: Value, status: u16, kind: &'static str, code: &'static str) -> Case {
    Case { what, method: "POST", path: "/v1/chat/completions", body: Body::Json(body), status, kind, code }
}

fn cases() -> Vec<Case> {
    const BAD: &str = "invalid_request_error";
    let face = face_bytes();
    let big = std::fs::read(format!("{}/tests/fixtures/images/gen_1024.jpg", env!("CARGO_MANIFEST_DIR"))).expect("jpg");
    let raw = |ct: &'static str, b: &[u8]| Body::Raw(ct, b.to_vec());
    let mut v = vec![
        Case {
            body: raw("application/json", b"{\"model\": "),
            ..case("truncated JSON", json!(null), 400, BAD, "invalid_json")
        },
        Case { body: raw("application/json", b""), ..case("empty body", json!(null), 400, BAD, "invalid_json") },
        Case {
            body: raw("application/json", b"\xff\xfe{}"),
            ..case("body not UTF-8", json!(null), 400, BAD, "invalid_json")
        },
        Case {
            body: raw("application/json", "[".repeat(100_000).as_bytes()),
            ..case("100000 nested arrays", json!(null), 400, BAD, "invalid_json")
        },
        case("JSON array instead of object", json!([1, 2]), 400, BAD, "invalid_json"),
        case("missing messages", json!({"model": MODEL}), 400, BAD, "missing_parameter"),
        case("missing model", json!({"messages": [{"role": "user", "content": "hi"}]}), 400, BAD, "missing_parameter"),
        case(
            "unknown model",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "not_found_error",
            "model_not_found",
        ),
        case("messages is a string", set("messages", json!("hi")), 400, BAD, "invalid_type"),
        case("messages empty", set("messages", json!([])), 400, BAD, "invalid_value"),
        case("message without role", set("messages", json!([{"content": "hi"}])), 400, BAD, "invalid_type"),
        case("role tool", set("messages", json!([{"role": "tool", "content": "hi"}])), 400, BAD, "invalid_value"),
        case("content is a number", user(json!(42)), 400, BAD, "invalid_type"),
        case("user content null", user(Value::Null), 400, BAD, "missing_parameter"),
        case(
            "part type input_audio",
            user(json!([{"type": "input_audio", "input_audio": {}}])),
            400,
            BAD,
            "unsupported_content_type",
        ),
        case("part without type", user(json!([{"text": "hi"}])), 400, BAD, "invalid_type"),
        case("text part with a number", user(json!([{"type": "text", "text": 5}])), 400, BAD, "invalid_type"),
        case("image_url without url", user(json!([{"type": "image_url", "image_url": {}}])), 400, BAD, "invalid_type"),
        case("remote http image URL", with_image("http://example.com/face.jpg"), 400, BAD, "unsupported_image_url"),
        case("local path, not allowed", with_image("/etc/passwd"), 400, BAD, "unsupported_image_url"),
        case("data URL not base64", with_image("data:image/png,abc"), 400, BAD, "invalid_image_url"),
        case("data URL image/gif", with_image(&data_url(b"GIF89a", "image/gif")), 400, BAD, "unsupported_image_type"),
        case("data URL text/html", with_image(&data_url(b"<html>", "text/html")), 400, BAD, "unsupported_image_type"),
        case("bad base64", with_image("data:image/jpeg;base64,!!!not-base64!!!"), 400, BAD, "invalid_image"),
        case(
            "text posing as a JPEG",
            with_image(&data_url(b"this is not an image at all", "image/jpeg")),
            400,
            BAD,
            "invalid_image",
        ),
        case("truncated JPEG", with_image(&data_url(&face[..face.len() / 3], "image/jpeg")), 400, BAD, "invalid_image"),
        case(
            "PNG header of 40000x40000 px",
            with_image(&data_url(&png_header_only(40_000, 40_000), "image/png")),
            400,
            BAD,
            "invalid_image",
        ),
        case(
            "image over --max-image-bytes",
            with_image(&data_url(&vec![0u8; 400_000], "image/jpeg")),
            400,
            BAD,
            "image_too_large",
        ),
        case(
            "5 images, over 4 tiles per request",
            user(Value::Array((0..5).map(|_| image_part(&data_url(&face, "image/jpeg"))).collect())),
            400,
            BAD,
            "too_many_images",
        ),
        case("one image of 5 tiles, over 4", with_image(&data_url(&big, "image/jpeg")), 400, BAD, "too_many_tiles"),
        case(
            "image in an assistant message",
            set("messages", json!([{"role": "assistant", "content": [image_part(&data_url(&face, "image/jpeg"))]}])),
            400,
            BAD,
            "invalid_value",
        ),
        case(
            "<IMG_CONTEXT> typed in the text",
            user(json!("look: <IMG_CONTEXT><IMG_CONTEXT>")),
            400,
            BAD,
            "invalid_value",
        ),
        case("<video> (no embedding) typed in the text", user(json!("a <video> here")), 400, BAD, "invalid_value"),
        case("temperature is a string", set("temperature", json!("hot")), 400, BAD, "invalid_type"),
        case("temperature 5", set("temperature", json!(5)), 400, BAD, "invalid_value"),
        case("top_p 0", set("top_p", json!(0)), 400, BAD, "invalid_value"),
        case("top_k -7", set("top_k", json!(-7)), 400, BAD, "invalid_value"),
        case("max_tokens -1", set("max_tokens", json!(-1)), 400, BAD, "invalid_type"),
        case("max_tokens 0", set("max_tokens", json!(0)), 400, BAD, "invalid_value"),
        case("max_tokens 1.5", set("max_tokens", json!(1.5)), 400, BAD, "invalid_type"),
        case("max_tokens over the context", set("max_tokens", json!(1_000_000)), 400, BAD, "context_length_exceeded"),
        case("prompt over the context", user(json!("hello ".repeat(40_000))), 400, BAD, "context_length_exceeded"),
        case("n = 2", set("n", json!(2)), 400, BAD, "unsupported_parameter"),
        case("stream is a string", set("stream", json!("yes")), 400, BAD, "invalid_type"),
        case("stop is a number", set("stop", json!(7)), 400, BAD, "invalid_type"),
        case("17 stop strings", set("stop", json!(vec!["x"; 17])), 400, BAD, "invalid_value"),
        case("logprobs", set("logprobs", json!(true)), 400, BAD, "unsupported_parameter"),
        case(
            "tools",
            set("tools", json!([{"type": "function", "function": {"name": "f"}}])),
            400,
            BAD,
            "unsupported_parameter",
        ),
        case("frequency_penalty 0.5", set("frequency_penalty", json!(0.5)), 400, BAD, "unsupported_parameter"),
        case("seed is a string", set("seed", json!("42")), 400, BAD, "invalid_type"),
        Case {
            body: raw("application/json", format!("{{\"pad\": \"{}\"}}", "x".repeat(1_100_000)).as_bytes()),
            ..case("body over --max-body-bytes", json!(null), 413, BAD, "request_too_large")
        },
        Case {
            body: raw("text/plain", b"{}"),
            ..case("Content-Type text/plain", json!(null), 415, BAD, "unsupported_media_type")
        },
        Case {
            method: "GET",
            body: raw("application/json", b""),
            ..case("GET on chat completions", json!(null), 405, BAD, "method_not_allowed")
        },
        Case {
            path: "/v1/completions",
            ..case("unknown endpoint", user(json!("hi")), 404, "not_found_error", "not_found")
        },
    ];
    v.sort_by_key(|c| c.status);
    v
}

#[test]
fn malformed_requests_get_openai_errors_and_the_server_survives() {
    let server =
        Server::start(&["--max-body-bytes", "1000000", "--max-image-bytes", "300000", "--max-tiles-per-request", "4"]);
    let good = chat_body(Some(&face_bytes()), "Describe the facial expression.", 8, false);
    let before = server.chat(&good);
    assert_eq!(before.status, 200, "{}", before.text());
    let want = before.json()["choices"][0]["message"]["content"].clone();

    let cases = cases();
    assert!(cases.len() >= 25, "the table has {} cases", cases.len());
    println!("| request | status | error type | code | message |\n|---|---|---|---|---|");
    let mut failures = Vec::new();
    for c in &cases {
        let (ct, body) = match &c.body {
            Body::Json(v) => ("application/json", v.to_string().into_bytes()),
            Body::Raw(ct, b) => (*ct, b.clone()),
        };
        let r = request(&server.addr, c.method, c.path, &[("Content-Type", ct)], &body);
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let e = &v["error"];
        let msg = e["message"].as_str().unwrap_or("");
        println!(
            "| {} | {} | {} | {} | {} |",
            c.what,
            r.status,
            e["type"].as_str().unwrap_or("-"),
            e["code"].as_str().unwrap_or("-"),
            msg.chars().take(90).collect::<String>().replace('|', "/")
        );
        let shape_ok = e.is_object()
            && e["message"].is_string()
            && e["type"].is_string()
            && e.get("param").is_some()
            && e["code"].is_string();
        if r.status != c.status || e["type"] != c.kind || e["code"] != c.code || !shape_ok {
            failures.push(format!(
                "{}: want {} {} {}, got {} {}",
                c.what,
                c.status,
                c.kind,
                c.code,
                r.status,
                r.text().chars().take(300).collect::<String>()
            ));
        }
    }
    // Not HTTP at all: hyper answers 400 itself; the server must live on.
    let garbage = raw_request(&server.addr, b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n");
    assert_eq!(garbage.status, 400, "garbage request line");
    assert!(failures.is_empty(), "{} of {} cases wrong:\n{}", failures.len(), cases.len(), failures.join("\n"));

    let after = server.chat(&good);
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.json()["choices"][0]["message"]["content"], want, "same answer after the hostile requests");
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.metric("facellm_kv_blocks_used"), 0.0);
}
