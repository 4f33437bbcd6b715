//! End-to-end tests of the fault modes over loopback, each chosen at start or switched
//! through the control listener and back: refuse, hang, error, die-mid-stream, slow.
//! Silence is checked for a short while (a false pass at worst, never a flake); times
//! only as lower bounds.

use super::gpu_tests::{get, open_completion, send, silent_for, start_sim, stats, wait_until};
use super::tests::{connect, post, read_response};
use super::*;
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

fn with_control(fault: Fault) -> GpuConfig {
    GpuConfig {
        fault,
        control: Some("127.0.0.1:0".to_string()),
        ..GpuConfig::default()
    }
}

/// One request to the control listener: (status, body).
fn control(srv: &Server, method: &str, path: &str) -> (u16, String) {
    let addr = srv.control_addr.expect("a control listener");
    let mut s = connect(addr);
    let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn set_fault(srv: &Server, mode: &str) {
    let (status, body) = control(srv, "PUT", &format!("/fault/{mode}"));
    assert_eq!((status, body), (200, format!("{{\"fault\":\"{mode}\"}}")));
}

fn refused(srv: &Server) -> bool {
    matches!(
        TcpStream::connect_timeout(&srv.addr, Duration::from_secs(5)).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    )
}

const CHAT: &str = r#"{"messages":[{"role":"user","content":"hello there"}],"max_tokens":10}"#;

#[test]
fn error_answers_503_everywhere_until_switched_back() {
    let srv = start_sim(with_control(Fault::Error), |_| {});
    for path in ["/health", "/metrics", "/v1/models"] {
        let (head, body) = get(srv.addr, path);
        assert!(head.starts_with("http/1.1 503"), "{path}: {head}");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], 503);
    }
    let (head, _, _) = send(srv.addr, "/v1/chat/completions", CHAT);
    assert!(head.starts_with("http/1.1 503"), "{head}");
    let (head, _) = get(srv.addr, "/sim/stats");
    assert!(
        head.starts_with("http/1.1 200"),
        "the simulator's own stats: {head}"
    );
    set_fault(&srv, "none");
    let (head, _) = get(srv.addr, "/health");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let (status, body) = control(&srv, "GET", "/stats");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((status, v["by_status"]["503"].as_u64()), (200, Some(4)));
    assert_eq!(v["fault"], "none");
}

#[test]
fn hang_holds_every_request_until_the_mode_changes() {
    let srv = start_sim(with_control(Fault::None), |_| {});
    set_fault(&srv, "hang");
    let mut s = connect(srv.addr);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    assert!(silent_for(&mut s, Duration::from_millis(300)));
    let mut chat = connect(srv.addr);
    chat.write_all(post("/v1/chat/completions", "", CHAT).as_bytes())
        .expect("write");
    assert!(silent_for(&mut chat, Duration::from_millis(100)));
    set_fault(&srv, "none");
    let (head, _, ok) = read_response(&mut s, &mut Vec::new());
    assert!(ok && head.starts_with("http/1.1 200"), "{head}");
    let (head, _, ok) = read_response(&mut chat, &mut Vec::new());
    assert!(ok && head.starts_with("http/1.1 200"), "{head}");
}

#[test]
fn refuse_closes_the_port_and_rebinds_it() {
    let srv = start_sim(with_control(Fault::None), |c| c.threads = 2);
    let mut old = connect(srv.addr);
    old.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("write");
    let mut pending = Vec::new();
    assert!(read_response(&mut old, &mut pending).2);
    for round in 0..2 {
        set_fault(&srv, "refuse");
        assert!(refused(&srv), "round {round}");
        if round == 0 {
            // An open connection is closed at its next request, unanswered.
            old.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                .expect("write");
            let (head, _, _) = read_response(&mut old, &mut pending);
            assert_eq!(head, "");
        }
        set_fault(&srv, "none");
        // Both threads listen again (SO_REUSEPORT spreads these connections over them).
        for _ in 0..8 {
            let (head, _) = get(srv.addr, "/health");
            assert!(head.starts_with("http/1.1 200"), "round {round}: {head}");
        }
    }
}

#[test]
fn refuse_from_the_start() {
    let srv = start_sim(with_control(Fault::Refuse), |_| {});
    assert!(refused(&srv));
    let (status, body) = control(&srv, "GET", "/fault");
    assert_eq!((status, body.as_str()), (200, "{\"fault\":\"refuse\"}"));
    set_fault(&srv, "none");
    let (head, _) = get(srv.addr, "/health");
    assert!(head.starts_with("http/1.1 200"), "{head}");
}

#[test]
fn die_mid_stream_cuts_generations_but_not_health() {
    let srv = start_sim(with_control(Fault::DieMidStream), |_| {});
    let stream = CHAT.replace("}]", "}],\"stream\":true");
    let (head, body, ok) = send(srv.addr, "/v1/chat/completions", &stream);
    assert!(head.starts_with("http/1.1 200") && !ok, "{head}");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(
        text.matches("\"delta\":{\"content\"").count(),
        fault::DIE_AFTER_EVENTS
    );
    let (head, body, ok) = send(srv.addr, "/v1/chat/completions", CHAT);
    assert!(
        head.starts_with("http/1.1 200") && !ok,
        "cut mid-body: {head}"
    );
    assert!(!body.is_empty());
    let (head, _) = get(srv.addr, "/health");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let s = stats(&srv);
    assert_eq!(
        (s["streams_died"].as_u64(), s["answers_cut"].as_u64()),
        (Some(1), Some(1))
    );
    set_fault(&srv, "none");
    let (_, _, ok) = send(srv.addr, "/v1/chat/completions", &stream);
    assert!(ok, "whole again");
}

#[test]
fn a_fault_switched_mid_stream_reaches_it() {
    let srv = start_sim(with_control(Fault::None), |c| {
        c.token_delay = Duration::from_millis(10);
    });
    let body = r#"{"prompt":"x","max_tokens":8000,"stream":true}"#;
    let mut s = open_completion(srv.addr, body);
    wait_until("the stream runs", || {
        srv.host
            .stats
            .active_streams
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    });
    set_fault(&srv, "die-mid-stream");
    let (head, _, ok) = read_response(&mut s, &mut Vec::new());
    assert!(head.starts_with("http/1.1 200") && !ok, "{head}");
    assert_eq!(stats(&srv)["streams_died"], 1);
}

#[test]
fn slow_stretches_the_delays() {
    let srv = start_sim(
        GpuConfig {
            slow_factor: 5,
            prefill_per_token: Duration::from_millis(1),
            ..with_control(Fault::None)
        },
        |c| c.first_token_delay = Duration::from_millis(60),
    );
    let timed = || {
        let t0 = Instant::now();
        let (_, _, ok) = send(srv.addr, "/v1/chat/completions", CHAT);
        assert!(ok);
        t0.elapsed()
    };
    // 6 prompt tokens of prefill + 60 ms to the first token + 9 tokens at no delay.
    assert!(timed() >= Duration::from_millis(66));
    set_fault(&srv, "slow");
    assert!(timed() >= Duration::from_millis(5 * 66));
    let (head, _) = get(srv.addr, "/health");
    assert!(head.starts_with("http/1.1 200"), "{head}");
}
