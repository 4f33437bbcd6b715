//! Hostile and malformed client input: every case gets a clear 4xx in the contract's JSON
//! shape, the connection closes where the framing can no longer be trusted, nothing
//! reaches a backend, and the gateway keeps serving.

mod common;
use common::*;
use std::io::Write;

const D: &str = "dom";

fn start(driver: &str) -> (Proc, Gateway) {
    let vllm = sim("vllm", &[]);
    let mut cfg = domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])]);
    cfg.push_str("\n[limits]\nmax_body_bytes = 4096\nmax_head_bytes = 8192\nmax_uri_bytes = 2048\nmax_headers = 32\n");
    let gw = gateway(driver, &cfg);
    (vllm, gw)
}

fn chat_path() -> String {
    format!("/proxy/{D}/v1/chat/completions")
}

fn framing_attacks_are_refused(driver: &str) {
    let (vllm, gw) = start(driver);
    let p = chat_path();
    let body = chat_body(VLLM_MODEL, false, "");
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}", body.len()), 400, "malformed_request"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"), 400, "malformed_request"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n"), 400, "malformed_request"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), 501, "unsupported_transfer_encoding"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), 400, "bad_chunked_body"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"), 400, "bad_chunked_body"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n"), 400, "bad_chunked_body"),
        (format!("GET {p} HTTP/1.1\r\nHost: t\r\nX-Evil: a\0b\r\n\r\n"), 400, "malformed_request"),
        (format!("GET {p} HTTP/1.1\r\nHost: t\r\nX-Evil: a\rb\r\n\r\n"), 400, "malformed_request"),
        (format!("GET {p} HTTP/1.1\r\nHost: t\r\n continued\r\n\r\n"), 400, "malformed_request"),
        (format!("GET {p} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400, "malformed_request"),
        (format!("GET {p} HTTP/1.1\r\n\r\n"), 400, "malformed_request"),
        ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_string(), 400, "malformed_request"),
        ("\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03".to_string(), 400, "malformed_request"),
        (format!("POST {p} HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{{}}"), 417, "expectation_failed"),
    ];
    for (raw, status, code) in &cases {
        expect_refusal(gw.addr, raw.as_bytes(), *status, code, true);
    }
    // None of it reached the backend.
    assert_eq!(sim_stats(&vllm)["requests"], 0);
    assert_eq!(get(gw.addr, "/health").status, 200);
}

fn limits_are_enforced(driver: &str) {
    let (vllm, gw) = start(driver);
    let p = chat_path();
    let long_uri = format!(
        "GET /proxy/{D}/v1/{} HTTP/1.1\r\nHost: t\r\n\r\n",
        "a".repeat(3000)
    );
    expect_refusal(gw.addr, long_uri.as_bytes(), 414, "uri_too_long", true);
    let big_head = format!(
        "GET {p} HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    expect_refusal(gw.addr, big_head.as_bytes(), 431, "head_too_large", true);
    let many = format!(
        "GET {p} HTTP/1.1\r\nHost: t\r\n{}\r\n",
        "X-A: 1\r\n".repeat(40)
    );
    expect_refusal(gw.addr, many.as_bytes(), 431, "too_many_headers", true);
    // Content-Length over the limit: refused before reading the body.
    let big_body = format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n");
    expect_refusal(gw.addr, big_body.as_bytes(), 413, "body_too_large", true);
    // A chunked body that grows past the limit before its "model".
    let mut chunked =
        format!("POST {p} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    let filler = format!(r#"{{"messages":"{}"#, "x".repeat(5000));
    chunked.extend(format!("{:x}\r\n", filler.len()).bytes());
    chunked.extend(filler.bytes());
    chunked.extend(b"\r\n");
    expect_refusal(gw.addr, &chunked, 413, "body_too_large", true);
    assert_eq!(sim_stats(&vllm)["requests"], 0);
}

fn routing_refusals(driver: &str) {
    let (_vllm, gw) = start(driver);
    for (path, status, code) in [
        ("/nowhere", 404, "no_route"),
        ("/proxy/dom/v2/models", 404, "no_route"),
        ("/proxy/dom/v1/../../etc/passwd", 400, "bad_path"),
        ("/proxy/dom/v1/%2e%2e/models", 400, "bad_path"),
        ("/proxy/other/v1/models", 404, "domain_not_found"),
        ("/proxy/dom/api/chat", 404, "no_ollama_backend"),
    ] {
        let r = get(gw.addr, path);
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.error_code(), code, "{path}");
    }
    let r = post(gw.addr, "/proxy/dom/v1/models", "{}");
    assert_eq!(r.status, 405);
    // Errors that leave the framing intact keep the connection.
    let mut s = connect(gw.addr);
    send(
        &mut s,
        &request_bytes("GET", "/proxy/other/v1/models", &[], b""),
    );
    send(&mut s, &request_bytes("GET", "/health", &[], b""));
    let mut r = Reader::new(s);
    assert_eq!(r.response().unwrap().status, 404);
    assert_eq!(r.response().unwrap().status, 200);
}

fn slow_and_truncated_clients(driver: &str) {
    let (vllm, gw) = start(driver);
    let p = chat_path();
    // A head that never finishes: 408 after header_read_ms.
    let mut s = connect(gw.addr);
    send(
        &mut s,
        format!("POST {p} HTTP/1.1\r\nHost: t\r\n").as_bytes(),
    );
    let resp = Reader::new(s).response().expect("408");
    assert_eq!(resp.status, 408);
    assert_eq!(resp.error_code(), "header_read_timeout");
    // A body that stops arriving: 408 after body_read_ms.
    let mut s = connect(gw.addr);
    send(
        &mut s,
        format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{{\"messages\":")
            .as_bytes(),
    );
    let resp = Reader::new(s).response().expect("408");
    assert_eq!(resp.status, 408);
    assert_eq!(resp.error_code(), "body_read_timeout");
    // A client that hangs up mid-body: nothing reaches the backend, nothing breaks.
    for _ in 0..10 {
        let mut s = connect(gw.addr);
        send(
            &mut s,
            format!("POST {p} HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n{{\"mess")
                .as_bytes(),
        );
        drop(s);
    }
    // A head sent one byte at a time still works.
    let mut s = connect(gw.addr);
    let body = chat_body(VLLM_MODEL, false, "");
    for b in request_bytes("POST", &p, &[], body.as_bytes()) {
        s.write_all(&[b]).unwrap();
    }
    let resp = Reader::new(s).response().expect("response");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(sim_stats(&vllm)["requests"], 1);
}

/// Bounded random garbage: the gateway answers or closes, and stays up.
fn random_garbage_does_not_hurt(driver: &str) {
    let (_vllm, gw) = start(driver);
    let mut seed: u64 = 0x9E3779B97F4A7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let base = request_bytes(
        "POST",
        &chat_path(),
        &[],
        chat_body(VLLM_MODEL, false, "").as_bytes(),
    );
    for _ in 0..60 {
        let mut raw = base.clone();
        for _ in 0..(next() % 6 + 1) {
            let i = (next() as usize) % raw.len();
            raw[i] = next() as u8;
        }
        let mut s = connect(gw.addr);
        send(&mut s, &raw);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut r = Reader::new(s);
        if let Some(resp) = r.response() {
            assert!(resp.status < 600);
        }
    }
    assert_eq!(get(gw.addr, "/health").status, 200);
}

for_each_driver!(
    framing_attacks_are_refused,
    limits_are_enforced,
    routing_refusals,
    slow_and_truncated_clients,
    random_garbage_does_not_hurt,
);
