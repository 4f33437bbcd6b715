//! End-to-end proxying: streaming through both backend flavors, answers identical to the
//! backend's own, model lists per domain, routing by model, keep-alive and pipelining,
//! `Expect: 100-continue`, chunked request bodies, and the headers upstream receives.

mod common;
use common::*;
use std::io::Write;

const D: &str = "dom-a";

fn two_flavor_gateway(driver: &str, vllm: &Proc, ollama: &Proc) -> Gateway {
    gateway(
        driver,
        &domains_config(&[
            (
                D,
                &[
                    ("vllm", vllm.addr, &[VLLM_MODEL]),
                    ("ollama", ollama.addr, &[OLLAMA_MODEL]),
                ],
            ),
            ("dom-b", &[("ollama", ollama.addr, &["*"])]),
        ]),
    )
}

/// Streams arrive chunk by chunk: the first event is in the client's hands while the
/// backend is still generating (its stream is still active).
fn streaming_arrives_before_the_backend_finishes(driver: &str) {
    let vllm = sim("vllm", &["--tokens", "10", "--token-delay-us", "100000"]);
    let ollama = sim("ollama", &["--tokens", "10", "--token-delay-us", "100000"]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    for (path, model, backend) in [
        (format!("/proxy/{D}/v1/chat/completions"), VLLM_MODEL, &vllm),
        (format!("/proxy/{D}/api/chat"), OLLAMA_MODEL, &ollama),
        (
            format!("/proxy/{D}/v1/chat/completions"),
            OLLAMA_MODEL,
            &ollama,
        ),
    ] {
        let body = chat_body(model, true, "");
        let mut s = connect(gw.addr);
        s.write_all(&request_bytes(
            "POST",
            &path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ))
        .unwrap();
        let mut r = Reader::new(s);
        let (status, headers) = r.head().expect("head");
        assert_eq!(status, 200, "{path}");
        assert!(headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked"));
        let first = r.chunk().expect("a chunk").expect("not the last chunk");
        assert!(!first.is_empty());
        let stats = sim_stats(backend);
        assert_eq!(stats["active_streams"], 1, "backend already done: {stats}");
        // Read the rest: it ends properly.
        let mut rest = Vec::new();
        while let Some(c) = r.chunk().expect("stream ended early") {
            rest.extend_from_slice(&c);
        }
        let text = String::from_utf8_lossy(&rest);
        assert!(
            text.contains("[DONE]") || text.contains("\"done\":true"),
            "{text}"
        );
    }
}

/// The same request gets the same bytes through cubegate as straight from the backend.
fn answers_identical_to_direct(driver: &str) {
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    let cases = [
        (
            "/v1/chat/completions",
            VLLM_MODEL,
            true,
            &vllm,
            r#","stream_options":{"include_usage":true}"#,
        ),
        ("/v1/chat/completions", VLLM_MODEL, false, &vllm, ""),
        (
            "/v1/completions",
            VLLM_MODEL,
            true,
            &vllm,
            r#","prompt":"hello","max_tokens":7"#,
        ),
        (
            "/v1/embeddings",
            VLLM_MODEL,
            false,
            &vllm,
            r#","input":"abc""#,
        ),
        ("/api/chat", OLLAMA_MODEL, true, &ollama, ""),
        (
            "/api/chat",
            OLLAMA_MODEL,
            false,
            &ollama,
            r#","options":{"num_predict":3}"#,
        ),
        (
            "/api/generate",
            OLLAMA_MODEL,
            true,
            &ollama,
            r#","prompt":"why""#,
        ),
        (
            "/api/embed",
            OLLAMA_MODEL,
            false,
            &ollama,
            r#","input":"abc""#,
        ),
    ];
    for (path, model, stream, backend, extra) in cases {
        let body = chat_body(model, stream, extra);
        let direct = post(backend.addr, path, &body);
        let via = post(gw.addr, &format!("/proxy/{D}{path}"), &body);
        assert_eq!(direct.status, 200, "{path}: {}", direct.text());
        assert_eq!(via.status, 200, "{path}: {}", via.text());
        assert!(via.complete);
        assert_eq!(via.text(), direct.text(), "{path} stream={stream}");
        assert_eq!(
            via.header("content-type"),
            direct.header("content-type"),
            "{path}"
        );
        if stream {
            assert!(
                via.chunks.len() > 2,
                "{path}: streamed as {} chunks",
                via.chunks.len()
            );
        }
    }
}

fn models_list_per_domain(driver: &str) {
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    let r = get(gw.addr, &format!("/proxy/{D}/v1/models"));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [OLLAMA_MODEL, VLLM_MODEL]);
    assert!(v["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["object"] == "model"));
    // Ollama's tags list shows only the Ollama backend's models.
    let tags = get(gw.addr, &format!("/proxy/{D}/api/tags")).json();
    assert_eq!(tags["models"][0]["name"], OLLAMA_MODEL);
    assert_eq!(tags["models"].as_array().unwrap().len(), 1);
    // A pass-through domain forwards /api/tags to its backend.
    let tags_b = get(gw.addr, "/proxy/dom-b/api/tags");
    assert_eq!(tags_b.status, 200);
    assert_eq!(tags_b.text(), get(ollama.addr, "/api/tags").text());
    // Unknown domain.
    let r = get(gw.addr, "/proxy/nope/v1/models");
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "domain_not_found");
}

fn routes_by_model(driver: &str) {
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    let path = format!("/proxy/{D}/v1/chat/completions");
    let a = post(gw.addr, &path, &chat_body(VLLM_MODEL, false, ""));
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["model"], VLLM_MODEL);
    assert_eq!(a.header("server"), Some("uvicorn"));
    let b = post(gw.addr, &path, &chat_body(OLLAMA_MODEL, false, ""));
    assert_eq!(b.status, 200);
    assert_eq!(b.json()["model"], OLLAMA_MODEL);
    assert_eq!(b.header("server"), None);
    // A model the domain does not list never reaches a backend.
    let before = sim_stats(&vllm)["requests"].as_u64().unwrap();
    let c = post(gw.addr, &path, &chat_body("gpt-4", false, ""));
    assert_eq!(c.status, 404);
    assert_eq!(c.error_code(), "model_not_found");
    assert!(c.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-4"));
    assert_eq!(sim_stats(&vllm)["requests"].as_u64().unwrap(), before);
    // Ollama's native API only goes to Ollama hosts.
    let d = post(
        gw.addr,
        &format!("/proxy/{D}/api/chat"),
        &chat_body(VLLM_MODEL, false, ""),
    );
    assert_eq!(d.status, 404);
    // No model, a repeated model, a disguised model: refused before any backend.
    for (body, code) in [
        (r#"{"messages":[]}"#, "model_required"),
        (r#"{"model":"a","model":"b"}"#, "invalid_body"),
        (r#"{"model":"x","mod\u0065l":"y"}"#, "invalid_body"),
        (r#"{"model":""}"#, "invalid_model"),
        (r#"[1,2]"#, "invalid_body"),
    ] {
        let r = post(gw.addr, &path, body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error_code(), code, "{body}");
    }
    assert_eq!(sim_stats(&vllm)["requests"].as_u64().unwrap(), before);
}

fn keep_alive_and_pipelining(driver: &str) {
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    let path = format!("/proxy/{D}/v1/chat/completions");
    let mut batch = Vec::new();
    for i in 0..4 {
        let body = chat_body(VLLM_MODEL, i % 2 == 0, "");
        let rid = format!("req-{i}");
        batch.extend(request_bytes(
            "POST",
            &path,
            &[("X-Request-Id", &rid), ("Content-Type", "application/json")],
            body.as_bytes(),
        ));
    }
    batch.extend(request_bytes(
        "GET",
        &format!("/proxy/{D}/v1/models"),
        &[("X-Request-Id", "req-4")],
        b"",
    ));
    let mut s = connect(gw.addr);
    // All at once, in one write: answered in order.
    s.write_all(&batch).unwrap();
    let mut r = Reader::new(s);
    for i in 0..5 {
        let resp = r.response().expect("response");
        assert_eq!(resp.status, 200, "request {i}");
        assert!(resp.complete);
        assert_eq!(
            resp.header("x-request-id"),
            Some(format!("req-{i}").as_str())
        );
    }
    // And the connection is still good for more, one at a time.
    for i in 0..3 {
        let body = chat_body(OLLAMA_MODEL, true, "");
        r.stream
            .write_all(&request_bytes(
                "POST",
                &format!("/proxy/{D}/api/chat"),
                &[],
                body.as_bytes(),
            ))
            .unwrap();
        let resp = r.response().expect("response");
        assert_eq!(resp.status, 200, "sequential {i}");
    }
}

fn expect_continue_and_chunked_bodies(driver: &str) {
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    let path = format!("/proxy/{D}/v1/chat/completions");
    let body = chat_body(VLLM_MODEL, false, "");
    let direct = post(vllm.addr, "/v1/chat/completions", &body);

    // Expect: 100-continue: the head first, the body only after "100 Continue".
    let mut s = connect(gw.addr);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut r = Reader::new(s);
    let interim = r.response().expect("100 Continue");
    assert_eq!(interim.status, 100);
    r.stream.write_all(body.as_bytes()).unwrap();
    let resp = r.response().expect("final response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), direct.text());

    // A chunked request body, split so "model" straddles chunks, routed by its model.
    let mut s = connect(gw.addr);
    let mut raw = format!("POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .into_bytes();
    for piece in body.as_bytes().chunks(7) {
        raw.extend(format!("{:x}\r\n", piece.len()).bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    // Sent in small pieces with pauses, so the gateway sees it arrive in parts.
    for part in raw.chunks(40) {
        s.write_all(part).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let resp = Reader::new(s).response().expect("response");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), direct.text());
}

/// Upstream never sees the client's token; it gets the identity and tracing headers, and
/// client-supplied identity headers are not passed through.
fn identity_headers_upstream(driver: &str) {
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = two_flavor_gateway(driver, &vllm, &ollama);
    let r = post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[
            ("Authorization", "Bearer secret-token"),
            ("X-Domain-Id", "spoofed"),
            ("X-Request-Id", "trace-123"),
        ],
        &chat_body(VLLM_MODEL, false, ""),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-sim-saw-authorization"), Some("no"));
    assert_eq!(r.header("x-sim-domain-id"), Some(D));
    assert_eq!(r.header("x-request-id"), Some("trace-123"));
    assert!(!r.text().contains("secret-token"));
    // Without a client id, one is generated.
    let r = post(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &chat_body(VLLM_MODEL, false, ""),
    );
    assert!(r.header("x-request-id").is_some_and(|v| v.len() >= 8));
    // Health.
    let h = get(gw.addr, "/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
}

/// Large bodies, both ways, with splice(2) on and off: identical bytes either way.
fn large_bodies_with_and_without_splice(driver: &str) {
    let vllm = sim("vllm", &["--embed-dim", "50000"]);
    for splice in [false, true] {
        let gw = gateway_with(
            driver,
            &format!("splice_bodies = {splice}"),
            &domains_config(&[
                ("routed", &[("vllm", vllm.addr, &[VLLM_MODEL])]),
                ("open", &[("vllm", vllm.addr, &["*"])]),
            ]),
        );
        let body = chat_body(VLLM_MODEL, false, r#","input":"abc""#);
        let direct = post(vllm.addr, "/v1/embeddings", &body);
        assert!(direct.body.len() > 200_000);
        for domain in ["routed", "open"] {
            for _ in 0..3 {
                let via = post(gw.addr, &format!("/proxy/{domain}/v1/embeddings"), &body);
                assert_eq!(via.status, 200);
                assert!(
                    via.body == direct.body,
                    "splice={splice} {domain}: bodies differ"
                );
            }
        }
        // A 3 MB request body through a pass-through domain (spliced when enabled) and a
        // routed one (scanned for "model" to its end).
        let big = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}],"model":"{VLLM_MODEL}","max_tokens":3}}"#,
            "word ".repeat(600_000)
        );
        // (The simulator, like vLLM, refuses it as over the context length: what matters
        // is that all of it crossed the gateway and the backend's answer came back.)
        let direct = post(vllm.addr, "/v1/chat/completions", &big);
        assert!(
            direct.text().contains("maximum context length"),
            "{}",
            direct.text()
        );
        for domain in ["routed", "open"] {
            let via = post(
                gw.addr,
                &format!("/proxy/{domain}/v1/chat/completions"),
                &big,
            );
            assert_eq!(
                via.status,
                direct.status,
                "splice={splice} {domain}: {}",
                via.text()
            );
            assert_eq!(via.text(), direct.text());
        }
    }
}

/// A scripted backend that answers one request per connection and then closes it while
/// claiming keep-alive: the gateway's pooled connection goes stale under it.
fn closing_backend(connections: usize) -> (std::net::SocketAddr, std::thread::JoinHandle<usize>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut served = 0;
        for _ in 0..connections {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head and the Content-Length body.
            let complete = loop {
                let Ok(n) = s.read(&mut buf) else { break false };
                if n == 0 {
                    break false;
                }
                req.extend_from_slice(&buf[..n]);
                if let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if req.len() >= end + 4 + len {
                        break true;
                    }
                }
            };
            if complete {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                served += 1;
            }
            // Closed here, though the answer promised keep-alive.
        }
        served
    });
    (addr, handle)
}

fn stale_pooled_connection_is_retried(driver: &str) {
    let (backend, served) = closing_backend(3);
    let gw = gateway(
        driver,
        &domains_config(&[(D, &[("vllm", backend, &["m"])])]),
    );
    let path = format!("/proxy/{D}/v1/chat/completions");
    for i in 0..3 {
        // Give the backend's close time to arrive, so the pooled socket is really stale.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let r = post(gw.addr, &path, r#"{"model":"m"}"#);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(served.join().unwrap(), 3);
}

for_each_driver!(
    stale_pooled_connection_is_retried,
    large_bodies_with_and_without_splice,
    streaming_arrives_before_the_backend_finishes,
    answers_identical_to_direct,
    models_list_per_domain,
    routes_by_model,
    keep_alive_and_pipelining,
    expect_continue_and_chunked_bodies,
    identity_headers_upstream,
);

/// One access record per request, with every field, and never the token; JSON lines when
/// asked for (as under journald).
fn access_records(driver: &str) {
    let vllm = sim("vllm", &[]);
    let body = domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])]);
    let gw = gateway_env(driver, &body, &[("CUBEGATE_LOG_FORMAT", "json")]);
    let r = post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions?secret=q"),
        &[
            ("X-Request-Id", "audit-1"),
            ("Authorization", "Bearer not-logged-ever"),
        ],
        &chat_body(VLLM_MODEL, true, ""),
    );
    assert_eq!(r.status, 200);
    assert!(eventually(std::time::Duration::from_secs(5), || gw
        .log()
        .contains("audit-1")));
    let log = gw.log();
    assert!(
        !log.contains("not-logged-ever"),
        "the token reached the log"
    );
    assert!(!log.contains("secret=q"), "the query reached the log");
    assert!(
        !log.contains("tell me about gateways"),
        "the prompt reached the log"
    );
    let record: serde_json::Value = log
        .lines()
        .filter(|l| l.contains("audit-1"))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .next()
        .unwrap();
    let f = &record["fields"];
    assert_eq!(record["target"], "cubegate::access");
    assert_eq!(f["request_id"], "audit-1");
    assert_eq!(f["method"], "POST");
    assert_eq!(f["path"], format!("/proxy/{D}/v1/chat/completions"));
    assert_eq!(f["domain"], D);
    assert_eq!(f["user"], "anonymous");
    assert_eq!(f["key"], "-", "no API key was used");
    assert_eq!(f["model"], VLLM_MODEL);
    assert_eq!(f["status"], 200);
    assert!(f["bytes"].as_u64().unwrap() > 100);
    assert!(f["ttfb_ms"].as_f64().unwrap() >= 0.0);
    assert!(f["duration_ms"].as_f64().unwrap() >= f["ttfb_ms"].as_f64().unwrap());
    assert_eq!(f["backend"], vllm.addr.to_string());
    // Every line is JSON.
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

mod access {
    use super::*;
    #[test]
    fn uring() {
        access_records("uring")
    }
    #[test]
    fn legacy() {
        access_records("legacy")
    }
}

/// `/metrics` on the management listener after a known mix of traffic: exact counts.
fn metrics_after_known_traffic(driver: &str) {
    let vllm = sim("vllm", &[]);
    let gw = gateway(
        driver,
        &domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])]),
    );
    let path = format!("/proxy/{D}/v1/chat/completions");
    for _ in 0..3 {
        assert_eq!(
            post(gw.addr, &path, &chat_body(VLLM_MODEL, true, "")).status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            post(gw.addr, &path, &chat_body("nope", false, "")).status,
            404
        );
    }
    assert_eq!(get(gw.addr, &format!("/proxy/{D}/v1/models")).status, 200);
    // A domain that does not exist: counted, but under "_other" (no series per made-up id).
    let unknown = "/proxy/made-up-domain/v1/chat/completions";
    assert_eq!(
        post(gw.addr, unknown, &chat_body(VLLM_MODEL, false, "")).status,
        404
    );
    let mgmt = management_addr(&gw);
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let mut text = String::new();
    // The last request's record lands just after its answer: give it a moment.
    assert!(
        eventually(std::time::Duration::from_secs(5), || {
            text = get(mgmt, "/metrics").text();
            value(&text, "cubegate_request_duration_seconds_count") == 7.0
                && value(&text, "cubegate_connections") == 0.0
        }),
        "{text}"
    );
    assert_eq!(value(&text, "cubegate_requests_total"), 7.0);
    assert_eq!(value(&text, "cubegate_responses_total{class=\"2xx\"}"), 4.0);
    assert_eq!(value(&text, "cubegate_responses_total{class=\"4xx\"}"), 3.0);
    let series = |route: &str, status: &str| {
        format!("cubegate_domain_requests_total{{domain=\"{D}\",route=\"{route}\",status=\"{status}\"}}")
    };
    assert_eq!(value(&text, &series("chat", "2xx")), 3.0);
    assert_eq!(value(&text, &series("chat", "4xx")), 2.0);
    assert_eq!(value(&text, &series("models", "2xx")), 1.0);
    assert_eq!(
        value(
            &text,
            "cubegate_domain_requests_total{domain=\"_other\",route=\"chat\",status=\"4xx\"}"
        ),
        1.0
    );
    assert!(!text.contains("made-up-domain"), "{text}");
    let labelled: usize = text
        .lines()
        .filter(|l| l.starts_with("cubegate_domain_requests_total{"))
        .count();
    assert_eq!(labelled, 4, "only series that counted something: {text}");
    assert_eq!(value(&text, "cubegate_responses_total{class=\"5xx\"}"), 0.0);
    assert_eq!(value(&text, "cubegate_first_byte_seconds_count"), 3.0);
    assert_eq!(value(&text, "cubegate_streams"), 0.0);
    let connects = value(&text, "cubegate_upstream_connects_total");
    let reuses = value(&text, "cubegate_upstream_reuses_total");
    assert_eq!(connects + reuses, 3.0, "three requests reached the backend");
    // Every connection opened went back to its worker's pool.
    assert_eq!(value(&text, "cubegate_upstream_idle_connections"), connects);
}

mod metrics {
    use super::*;
    #[test]
    fn uring() {
        metrics_after_known_traffic("uring")
    }
    #[test]
    fn legacy() {
        metrics_after_known_traffic("legacy")
    }
}
