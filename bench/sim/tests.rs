//! Tests of the simulator: pure ones over the flavors' replies and the HTTP helpers, and
//! socket ones that start the simulator on 127.0.0.1:0 and speak raw HTTP to it.

use super::http::{self, BodyKind, Chunked, HeadError};
use super::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;

pub(super) fn cfg(flavor: Flavor) -> Config {
    Config {
        flavor,
        listen: "127.0.0.1:0".to_string(),
        models: vec![match flavor {
            Flavor::Vllm => "meta-llama/Llama-3.1-8B-Instruct".to_string(),
            Flavor::Ollama => "llama3.2:1b".to_string(),
        }],
        tokens: 16,
        token_delay: Duration::ZERO,
        first_token_delay: Duration::ZERO,
        threads: 1,
        embed_dim: 8,
        gpu: GpuConfig::default(),
    }
}

fn route(c: &Config, method: &str, path: &str, body: &str) -> Reply {
    let host = Host::new(c);
    match c.flavor {
        Flavor::Vllm => vllm::route(c, &host, method, path, body.as_bytes()),
        Flavor::Ollama => ollama::route(c, &host, method, path, body.as_bytes()),
    }
}

/// The bytes a reply would put on the wire (payload only, streams without framing).
fn bytes(r: &Reply) -> (u16, Vec<u8>) {
    match r {
        Reply::Full { status, body, .. } => (*status, body.clone()),
        Reply::Stream { fmt, work } => (200, render(&**fmt, work.output_tokens)),
    }
}

const CHAT: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"hello world"}]}"#;

#[test]
fn same_request_same_bytes() {
    let c = cfg(Flavor::Vllm);
    for body in [
        CHAT.to_string(),
        CHAT.replace("}]}", "}],\"stream\":true}"),
        r#"{"prompt":"a b c","max_tokens":5}"#.to_string(),
    ] {
        let path = if body.contains("messages") {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let a = bytes(&route(&c, "POST", path, &body));
        let b = bytes(&route(&c, "POST", path, &body));
        assert_eq!(a.0, 200, "{}", String::from_utf8_lossy(&a.1));
        assert_eq!(a, b);
    }
    let o = cfg(Flavor::Ollama);
    let body = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        bytes(&route(&o, "POST", "/api/chat", body)),
        bytes(&route(&o, "POST", "/api/chat", body))
    );
}

#[test]
fn max_tokens_and_num_predict_win() {
    let c = cfg(Flavor::Vllm);
    let body = CHAT.replace("}]}", "}],\"max_tokens\":3}");
    let (status, b) = bytes(&route(&c, "POST", "/v1/chat/completions", &body));
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (_, b) = bytes(&route(&c, "POST", "/v1/chat/completions", CHAT));
    let v: Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let body = CHAT.replace("}]}", "}],\"max_completion_tokens\":2,\"stream\":true}");
    let (_, b) = bytes(&route(&c, "POST", "/v1/chat/completions", &body));
    assert_eq!(
        String::from_utf8_lossy(&b)
            .matches("\"delta\":{\"content\"")
            .count(),
        2
    );
    let o = cfg(Flavor::Ollama);
    let body =
        r#"{"model":"llama3.2:1b","prompt":"hi","stream":false,"options":{"num_predict":4}}"#;
    let (_, b) = bytes(&route(&o, "POST", "/api/generate", body));
    let v: Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["eval_count"], 4);
    assert_eq!(v["done_reason"], "length");
    assert_eq!(
        v["response"].as_str().map(|s| s.split(' ').count()),
        Some(4)
    );
}

#[test]
fn sse_framing_ends_with_done() {
    let c = cfg(Flavor::Vllm);
    let body = CHAT.replace(
        "}]}",
        "}],\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
    );
    let (_, b) = bytes(&route(&c, "POST", "/v1/chat/completions", &body));
    let s = String::from_utf8(b).expect("utf8");
    assert!(s.ends_with("data: [DONE]\n\n"));
    let events: Vec<&str> = s.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 1 + 16 + 1 + 1 + 1);
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value =
            serde_json::from_str(e.strip_prefix("data: ").expect("data: ")).expect("json");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    let usage: Value = serde_json::from_str(&events[events.len() - 2][6..]).expect("json");
    assert_eq!(usage["choices"].as_array().map(Vec::len), Some(0));
    assert_eq!(usage["usage"]["completion_tokens"], 16);
    let (_, full) = bytes(&route(&c, "POST", "/v1/chat/completions", CHAT));
    let full: Value = serde_json::from_slice(&full).expect("json");
    assert_eq!(
        full["choices"][0]["message"]["content"].as_str(),
        Some(text.as_str())
    );
}

#[test]
fn ndjson_last_line_has_counts() {
    let o = cfg(Flavor::Ollama);
    let body = r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"one two"}],"options":{"num_predict":5}}"#;
    let (_, b) = bytes(&route(&o, "POST", "/api/chat", body));
    let s = String::from_utf8(b).expect("utf8");
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 6);
    for l in &lines[..5] {
        let v: Value = serde_json::from_str(l).expect("json");
        assert_eq!(v["done"], false);
    }
    let last: Value = serde_json::from_str(lines[5]).expect("json");
    assert_eq!(last["done"], true);
    assert_eq!(last["eval_count"], 5);
    assert_eq!(last["prompt_eval_count"], 6);
    assert_eq!(last["done_reason"], "length");
}

#[test]
fn errors_have_the_servers_shapes() {
    let c = cfg(Flavor::Vllm);
    let (s, b) = bytes(&route(
        &c,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"x","messages":[]}"#,
    ));
    assert_eq!(s, 404);
    let v: Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["error"]["message"], "The model `x` does not exist.");
    assert_eq!(v["error"]["code"], 404);
    let (s, _) = bytes(&route(&c, "POST", "/v1/chat/completions", "{nope"));
    assert_eq!(s, 400);
    let (s, _) = bytes(&route(&c, "GET", "/v1/chat/completions", ""));
    assert_eq!(s, 405);
    let o = cfg(Flavor::Ollama);
    let (s, b) = bytes(&route(
        &o,
        "POST",
        "/api/generate",
        r#"{"model":"x","prompt":"p"}"#,
    ));
    assert_eq!(s, 404);
    assert_eq!(
        b,
        br#"{"error":"model \"x\" not found, try pulling it first"}"#
    );
    let (s, _) = bytes(&route(&o, "POST", "/api/chat", ""));
    assert_eq!(s, 400);
}

#[test]
fn head_parsing() {
    let (h, n) = http::parse_head(
        b"POST /v1/x?q=1 HTTP/1.1\r\nContent-Length: 3\r\nX-Request-Id: r1\r\n\r\nabc",
    )
    .expect("ok")
    .expect("complete");
    assert_eq!(
        (h.path.as_str(), n, h.body),
        ("/v1/x", 64, Some(BodyKind::Length(3)))
    );
    assert_eq!(h.request_id.as_deref(), Some(&b"r1"[..]));
    assert!(http::parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("ok")
        .is_none());
    assert_eq!(
        http::parse_head(b"GARBAGE\r\n\r\n").err(),
        Some(HeadError(400, "malformed HTTP request"))
    );
    let both = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(http::parse_head(both).err().map(|e| e.0), Some(400));
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(70_000));
    assert_eq!(
        http::parse_head(big.as_bytes()).err().map(|e| e.0),
        Some(431)
    );
    let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n";
    assert_eq!(http::parse_head(huge).err().map(|e| e.0), Some(413));
}

#[test]
fn chunked_decoding_incremental() {
    let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
    for split in 0..input.len() {
        let mut d = Chunked::default();
        let mut out = Vec::new();
        let used = d.feed(&input[..split], &mut out).expect("ok");
        let rest = [&input[used..split], &input[split..]].concat();
        let used2 = d.feed(&rest, &mut out).expect("ok");
        assert!(d.done(), "split {split}");
        assert_eq!(out, b"hello world");
        assert_eq!(&rest[used2..], b"NEXT");
    }
    let mut d = Chunked::default();
    assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
    let mut d = Chunked::default();
    assert!(d.feed(b"2\r\nabX", &mut Vec::new()).is_err());
}

#[test]
fn chunk_framing() {
    let mut b = Vec::new();
    http::chunk_begin(&mut b);
    b.extend_from_slice(&[b'x'; 300]);
    let start = http::chunk_end(&mut b);
    assert!(b[start..].starts_with(b"12c\r\nxxx"));
    assert!(b.ends_with(b"x\r\n"));
}

// ---- over sockets ----

pub(super) fn connect(addr: SocketAddr) -> TcpStream {
    assert!(addr.ip().is_loopback());
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// Reads one response: (head, de-chunked body, whether it ended properly).
pub(super) fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>, bool) {
    let mut tmp = [0u8; 8192];
    let mut fill = |s: &mut TcpStream, pending: &mut Vec<u8>| -> bool {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                pending.extend_from_slice(&tmp[..n]);
                true
            }
        }
    };
    let mut end = None;
    for _ in 0..10_000 {
        end = memchr::memmem::find(pending, b"\r\n\r\n");
        if end.is_some() || !fill(s, pending) {
            break;
        }
    }
    let Some(end) = end else {
        return (String::new(), Vec::new(), false);
    };
    let head = String::from_utf8_lossy(&pending[..end + 4]).to_ascii_lowercase();
    pending.drain(..end + 4);
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        let mut d = Chunked::default();
        for _ in 0..100_000 {
            let used = d.feed(pending, &mut body).expect("valid chunking");
            pending.drain(..used);
            if d.done() {
                return (head, body, true);
            }
            if !fill(s, pending) {
                break;
            }
        }
        return (head, body, false);
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    for _ in 0..100_000 {
        if pending.len() >= len || !fill(s, pending) {
            break;
        }
    }
    let ok = pending.len() >= len;
    body.extend(pending.drain(..len.min(pending.len())));
    (head, body, ok)
}

pub(super) fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn serves_keep_alive_streams_and_errors() {
    let srv = start(Config {
        threads: 2,
        ..cfg(Flavor::Vllm)
    })
    .expect("start");
    let mut s = connect(srv.addr);
    let mut pending = Vec::new();
    let stream_body = CHAT.replace("}]}", "}],\"stream\":true,\"max_tokens\":4}");
    let req = post(
        "/v1/chat/completions",
        "X-Request-Id: rq-1\r\nAuthorization: Bearer t\r\nX-Domain-Id: dom\r\n",
        &stream_body,
    );
    s.write_all(req.as_bytes()).expect("write");
    let (head, body, ok) = read_response(&mut s, &mut pending);
    assert!(ok && head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-request-id: rq-1") && head.contains("x-sim-saw-authorization: yes"));
    assert!(head.contains("x-sim-domain-id: dom") && head.contains("text/event-stream"));
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    // Same connection: a chunked request body, answered with Content-Length.
    let chunked = "POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n18\r\nmpt\":\"x\",\"max_tokens\":2}\r\n0\r\n\r\n";
    s.write_all(chunked.as_bytes()).expect("write");
    let (head, body, ok) = read_response(&mut s, &mut pending);
    assert!(
        ok && head.starts_with("http/1.1 200"),
        "{head} {}",
        String::from_utf8_lossy(&body)
    );
    assert!(head.contains("x-sim-saw-authorization: no") && head.contains("x-sim-domain-id: -"));
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // Garbage: 400 and close.
    s.write_all(b"GARBAGE\r\n\r\n").expect("write");
    let (head, _, _) = read_response(&mut s, &mut pending);
    assert!(head.starts_with("http/1.1 400"), "{head}");
    // die-after: the stream stops without its terminating chunk.
    let mut s = connect(srv.addr);
    let req = post(
        "/v1/chat/completions",
        "x-sim-die-after: 2\r\n",
        &stream_body,
    );
    s.write_all(req.as_bytes()).expect("write");
    let (_, body, ok) = read_response(&mut s, &mut Vec::new());
    assert!(!ok);
    assert_eq!(
        String::from_utf8_lossy(&body)
            .matches("\"delta\":{\"content\"")
            .count(),
        2
    );
    assert_eq!(srv.host.stats.streams_died.load(Relaxed), 1);
    assert_eq!(srv.host.stats.streams_completed.load(Relaxed), 1);
    let mut s = connect(srv.addr);
    s.write_all(b"GET /sim/stats HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let (_, body, _) = read_response(&mut s, &mut Vec::new());
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        v["requests"], 3,
        "malformed requests and /sim/stats are not counted"
    );
}

#[test]
fn client_disconnect_stops_the_stream() {
    let srv = start(Config {
        tokens: 100_000,
        token_delay: Duration::from_millis(5),
        ..cfg(Flavor::Ollama)
    })
    .expect("start");
    let mut s = connect(srv.addr);
    let req = post(
        "/api/generate",
        "",
        r#"{"model":"llama3.2:1b","prompt":"hi"}"#,
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = [0u8; 4096];
    let mut got = 0;
    for _ in 0..100 {
        got += s.read(&mut buf).expect("read");
        if got > 500 {
            break;
        }
    }
    assert!(got > 500);
    assert_eq!(srv.host.stats.active_streams.load(Relaxed), 1);
    drop(s);
    let mut aborted = 0;
    for _ in 0..200 {
        aborted = srv.host.stats.streams_aborted.load(Relaxed);
        if aborted == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(aborted, 1);
    assert_eq!(srv.host.stats.active_streams.load(Relaxed), 0);
}

#[test]
fn ollama_streams_ndjson_by_default_and_stalls() {
    let srv = start(cfg(Flavor::Ollama)).expect("start");
    let mut s = connect(srv.addr);
    let req = post(
        "/api/chat",
        "x-sim-stall-ms: 100\r\n",
        r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}]}"#,
    );
    let t0 = std::time::Instant::now();
    s.write_all(req.as_bytes()).expect("write");
    let (head, body, ok) = read_response(&mut s, &mut Vec::new());
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(ok && head.contains("application/x-ndjson"), "{head}");
    let text = String::from_utf8(body).expect("utf8");
    let last: Value = serde_json::from_str(text.lines().last().expect("lines")).expect("json");
    assert_eq!(
        (last["done"].as_bool(), last["eval_count"].as_u64()),
        (Some(true), Some(16))
    );
}
