//! `facellm serve` as clients use it: the real binary on 127.0.0.1 with the built-in demo model, driven
//! over raw HTTP/1.1. Answers (JSON and SSE) must equal `facellm generate`'s greedy output for the same
//! input, with the right usage; a second question about the same face must hit the vision and prefix
//! caches; a client that hangs up must give its KV blocks back; a full queue answers 503 with Retry-After;
//! the API key, local-image folder and graceful shutdown must hold.

mod server_common;

use std::time::Duration;

use serde_json::{json, Value};
use server_common::*;

#[test]
fn answers_equal_cli_generate() {
    let dir = demo_model_dir();
    let server = Server::start(&[]);
    let face = face_bytes();
    let cases: [(Option<&[u8]>, &str, usize); 2] =
        [(Some(&face), "Describe the facial expression of this person.", 24), (None, "Hello, who are you?", 16)];
    for (image, prompt, max_tokens) in cases {
        let want = cli_generate(dir.path(), image.map(|_| face_path()).as_deref(), prompt, max_tokens);

        let r = server.chat(&chat_body(image, prompt, max_tokens, false));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], MODEL);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(want.text.as_str()), "non-streaming text");
        assert_eq!(v["choices"][0]["finish_reason"].as_str(), Some(want.finish_reason.as_str()));
        let u = &v["usage"];
        assert_eq!(u["prompt_tokens"].as_u64(), Some(want.prompt_tokens as u64), "usage.prompt_tokens");
        assert_eq!(u["completion_tokens"].as_u64(), Some(want.completion_tokens as u64), "usage.completion_tokens");
        assert_eq!(u["total_tokens"].as_u64(), Some((want.prompt_tokens + want.completion_tokens) as u64));

        let r = server.chat(&chat_body(image, prompt, max_tokens, true));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));
        let data = r.sse_data();
        let first: Value = serde_json::from_str(&data[0]).expect("first chunk");
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let (text, finish, usage) = collect_stream(&data);
        assert_eq!(text, want.text, "streaming text");
        assert_eq!(finish.as_deref(), Some(want.finish_reason.as_str()));
        let usage = usage.expect("usage chunk (stream_options.include_usage)");
        assert_eq!(usage["prompt_tokens"].as_u64(), Some(want.prompt_tokens as u64));
        assert_eq!(usage["completion_tokens"].as_u64(), Some(want.completion_tokens as u64));
    }
    let models = server.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(server.get("/health").json()["status"], "ok");
}

/// The second question about the same face: the vision features come from the cache and the prompt's
/// image blocks from the prefix cache, and it reaches its first token sooner. Only the hits are asserted;
/// the times are printed (they depend on the machine).
#[test]
fn prefix_reuse_visible_in_metrics() {
    let server = Server::start(&[]);
    let face = face_bytes();
    let mut ttft = Vec::new();
    for q in ["Describe the facial expression of this person.", "How old does this person look?"] {
        let mut s = Stream::open(&server.addr, &chat_body(Some(&face), q, 4, true));
        ttft.push(s.time_to_first_content());
        while s.next_data().is_some() {}
    }
    println!("TTFT first question {:?}, second question about the same face {:?}", ttft[0], ttft[1]);
    assert_eq!(server.metric("facellm_vision_images_encoded_total"), 1.0, "the tower ran once");
    assert!(server.metric("facellm_vision_cache_hits_total") >= 1.0, "vision cache hit");
    assert!(server.metric("facellm_prefix_cache_hits_total") >= 1.0, "prefix cache hit");
    assert!(server.metric("facellm_prefix_cache_hit_tokens_total") >= 256.0, "the image's blocks were reused");
    let used = server.wait_metric("facellm_kv_blocks_used", Duration::from_secs(10), |v| v == 0.0);
    assert_eq!(used, 0.0, "finished requests hold no blocks");
    assert!(server.metric("facellm_kv_blocks_cached") > 0.0, "the prefix stays cached for the next question");
}

/// Clients that hang up mid-stream (streaming) or mid-answer (non-streaming) free their sequences: the KV
/// blocks in use return to zero, and the server goes on answering.
#[test]
fn disconnect_frees_kv_blocks() {
    let server = Server::start(&[]);
    let face = face_bytes();
    let mut s = Stream::open(&server.addr, &chat_body(Some(&face), "Tell me everything.", 20_000, true));
    s.time_to_first_content();
    assert!(server.metric("facellm_kv_blocks_used") > 0.0, "a running stream holds blocks");
    drop(s);
    let used = server.wait_metric("facellm_kv_blocks_used", Duration::from_secs(20), |v| v == 0.0);
    assert_eq!(used, 0.0, "blocks freed after the client hung up");

    // Non-streaming: send the request and close the connection without reading the answer.
    {
        let body = chat_body(None, "Another long answer, please.", 20_000, false).to_string();
        let mut c = std::net::TcpStream::connect(&server.addr).expect("connect");
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut c, req.as_bytes()).expect("send");
        server.wait_metric("facellm_kv_blocks_used", Duration::from_secs(20), |v| v > 0.0);
    }
    let used = server.wait_metric("facellm_kv_blocks_used", Duration::from_secs(20), |v| v == 0.0);
    assert_eq!(used, 0.0, "blocks freed after the non-streaming client hung up");
    assert!(server.metric("facellm_sequences_finished_total{reason=\"cancelled\"}") >= 2.0);
    assert_eq!(server.metric("facellm_requests_in_engine"), 0.0);
    let r = server.chat(&chat_body(None, "Still there?", 3, false));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// With room for one request (one running, none waiting), a second gets 503 with Retry-After in OpenAI's
/// error shape; once the first is gone, requests are served again.
#[test]
fn queue_full_is_503_with_retry_after() {
    let server = Server::start(&["--max-seqs", "1", "--max-queue", "0"]);
    let mut s = Stream::open(&server.addr, &chat_body(None, "A long story, please.", 20_000, true));
    s.time_to_first_content();
    let r = server.chat(&chat_body(None, "Me too", 3, false));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "Retry-After header");
    let e = r.json();
    assert_eq!(e["error"]["type"], "overloaded_error");
    assert_eq!(e["error"]["code"], "queue_full");
    assert!(server.metric("facellm_http_responses_total{route=\"/v1/chat/completions\",code=\"503\"}") >= 1.0);
    drop(s);
    server.wait_metric("facellm_requests_in_engine", Duration::from_secs(20), |v| v == 0.0);
    let r = server.chat(&chat_body(None, "Me too", 3, false));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn api_key_and_local_images() {
    let images = tempfile::tempdir().expect("tempdir");
    std::fs::write(images.path().join("face.jpg"), face_bytes()).expect("copy face");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret.jpg"), face_bytes()).expect("copy face");
    let allowed = images.path().to_str().expect("utf-8 path");
    let server = Server::start(&["--api-key", "sk-test", "--allow-local-images", allowed]);
    let body = |url: &str| {
        json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Who?"}]}]})
    };
    let call = |key: Option<&str>, b: &Value| {
        let auth = key.map(|k| format!("Bearer {k}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        request(&server.addr, "POST", "/v1/chat/completions", &headers, b.to_string().as_bytes())
    };
    let ok = body("face.jpg");
    assert_eq!(call(None, &ok).status, 401);
    let wrong = call(Some("sk-wrong"), &ok);
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"]["type"], "authentication_error");
    assert_eq!(request(&server.addr, "GET", "/v1/models", &[], b"").status, 401);
    assert_eq!(server.get("/health").status, 200, "health needs no key");

    let r = call(Some("sk-test"), &ok);
    assert_eq!(r.status, 200, "relative path in the allowed folder: {}", r.text());
    let abs = format!("file://{}/face.jpg", allowed);
    assert_eq!(call(Some("sk-test"), &body(&abs)).status, 200, "file:// URL in the allowed folder");
    for bad in [
        format!("{}/secret.jpg", outside.path().display()),
        "../secret.jpg".to_string(),
        "/etc/passwd".to_string(),
        "missing.jpg".to_string(),
    ] {
        let r = call(Some("sk-test"), &body(&bad));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_image_url", "{bad}");
    }
}

/// SIGTERM while a stream runs: the stream still ends properly (finished within the grace, or an error
/// event) with `[DONE]`, new connections are refused, and the process exits 0.
#[test]
fn graceful_shutdown_ends_streams() {
    let server = Server::start(&["--shutdown-grace", "1"]);
    let mut s = Stream::open(&server.addr, &chat_body(None, "A very long story.", 20_000, true));
    s.time_to_first_content();
    let addr = server.addr.clone();
    let status = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut last = None;
            while let Some(d) = s.next_data() {
                last = Some(d);
            }
            last
        });
        let status = server.terminate();
        let last = reader.join().expect("reader");
        assert_eq!(last.as_deref(), Some("[DONE]"), "the stream ended with [DONE]");
        status
    });
    assert!(status.success(), "exit status {status:?}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "nothing listens after shutdown");
}

/// A request past `--request-timeout` ends: 504 in OpenAI's shape when not streaming, an error event and
/// `[DONE]` when streaming; its blocks are freed.
#[test]
fn request_timeout() {
    let server = Server::start(&["--request-timeout", "1"]);
    let r = server.chat(&chat_body(None, "A very long story.", 20_000, false));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "timeout_error");
    let r = server.chat(&chat_body(None, "A very long story.", 20_000, true));
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&data[data.len() - 2]).expect("error event");
    assert_eq!(err["error"]["code"], "timeout", "{err}");
    let used = server.wait_metric("facellm_kv_blocks_used", Duration::from_secs(10), |v| v == 0.0);
    assert_eq!(used, 0.0);
}
