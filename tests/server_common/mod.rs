//! Shared by the `server_*` tests: start the real `facellm serve` binary on 127.0.0.1 (port 0, the chosen
//! port read from its first line), a small HTTP/1.1 client over `TcpStream` (so tests control every byte and
//! can hang up mid-stream), SSE parsing, `/metrics` reading, and `facellm generate` as the reference.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_facellm");
pub const MODEL: &str = "facellm-demo";

pub fn face_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/demo/pd_astronaut_eileen_collins.jpg")
}

pub fn face_bytes() -> Vec<u8> {
    std::fs::read(face_path()).expect("bundled face")
}

pub fn data_url(bytes: &[u8], mime: &str) -> String {
    use base64::Engine as _;
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A running `facellm serve`; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// `facellm serve --model demo --port 0 --quiet` plus `extra`; waits until it listens.
    pub fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--model", "demo", "--port", "0", "--quiet"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start facellm serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("first line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, addr }
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        request(&self.addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }

    pub fn chat(&self, body: &Value) -> Response {
        self.post_json("/v1/chat/completions", body)
    }

    /// A counter or gauge from /metrics (the first line starting with `name` followed by a space).
    pub fn metric(&self, name: &str) -> f64 {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "metrics: {}", r.text());
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }

    /// Polls a metric until `pred` holds or `timeout` passes; returns the last value.
    pub fn wait_metric(&self, name: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> f64 {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if pred(v) || t0.elapsed() > timeout {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "the server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.text().lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    raw_request(addr, &raw)
}

/// Sends `raw` bytes as they are and parses the response.
pub fn raw_request(addr: &str, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    // A server may answer (413) before reading a large body and close: a failed write is not a failure.
    let _ = s.write_all(raw);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Response {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {:?}", String::from_utf8_lossy(&buf[..buf.len().min(200)])));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).expect("status");
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = buf[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// A streaming request read chunk by chunk: the time to the first content delta, and the connection, to
/// read on or to drop (hang up) midway.
pub struct Stream {
    pub conn: BufReader<TcpStream>,
    pub started: Instant,
}

impl Stream {
    pub fn open(addr: &str, body: &Value) -> Stream {
        let body = body.to_string();
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let started = Instant::now();
        s.write_all(req.as_bytes()).expect("send");
        Stream { conn: BufReader::new(s), started }
    }

    /// The next `data:` payload, or `None` at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.conn.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// Reads to the first chunk with content text; returns the elapsed time since the request was sent.
    pub fn time_to_first_content(&mut self) -> Duration {
        while let Some(d) = self.next_data() {
            let v: Value = serde_json::from_str(&d).unwrap_or(Value::Null);
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                return self.started.elapsed();
            }
        }
        panic!("the stream ended without content");
    }
}

/// The text and usage of an SSE answer: content deltas concatenated, the finish reason, the usage chunk.
pub fn collect_stream(data: &[String]) -> (String, Option<String>, Option<Value>) {
    let mut text = String::new();
    let (mut finish, mut usage) = (None, None);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {data:?}");
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk not JSON ({e}): {d}"));
        assert!(v.get("error").is_none(), "error in stream: {d}");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            usage = Some(v["usage"].clone());
        }
    }
    (text, finish, usage)
}

/// `facellm generate --output json` on the demo model (same weights as `serve --model demo`).
pub struct Reference {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: String,
}

pub fn demo_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    facellm::model::random::write_demo_model(dir.path(), "demo").expect("demo model");
    dir
}

pub fn cli_generate(model: &Path, image: Option<&Path>, prompt: &str, max_tokens: usize) -> Reference {
    let mut cmd = Command::new(BIN);
    cmd.args(["--quiet", "generate", "--model"]).arg(model);
    if let Some(img) = image {
        cmd.arg("--image").arg(img);
    }
    let out = cmd
        .args([
            "--prompt",
            prompt,
            "--max-new-tokens",
            &max_tokens.to_string(),
            "--temperature",
            "0",
            "--output",
            "json",
        ])
        .output()
        .expect("facellm generate");
    assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("generate json");
    Reference {
        text: v["text"].as_str().expect("text").to_string(),
        prompt_tokens: v["prompt_ids"].as_array().expect("prompt_ids").len(),
        completion_tokens: v["generated_ids"].as_array().expect("generated_ids").len(),
        finish_reason: v["finish_reason"].as_str().expect("finish_reason").to_string(),
    }
}

/// A chat request body: one user message with the image (when given, as a data: URL) before the text.
pub fn chat_body(image: Option<&[u8]>, prompt: &str, max_tokens: usize, stream: bool) -> Value {
    let content = match image {
        Some(bytes) => serde_json::json!([
            {"type": "image_url", "image_url": {"url": data_url(bytes, "image/jpeg")}},
            {"type": "text", "text": prompt}
        ]),
        None => Value::String(prompt.to_string()),
    };
    let mut body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if stream {
        body["stream"] = Value::Bool(true);
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}
