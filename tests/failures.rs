//! Backend failure behaviour, seen from the client on the wire: a backend that is down
//! (502 `backend_unreachable`, connection kept alive, next candidate tried), too slow to
//! answer (504 `backend_timeout`), dies mid-stream (truncated chunked answer, connection
//! closed), speaks broken HTTP (502 `backend_bad_response` / `backend_closed`) or frames
//! its body by closing the connection (HTTP/1.0, `Connection: close`); and a client that
//! goes away mid-stream or before the backend's head makes the gateway drop the upstream
//! connection (observed through the simulator's `/sim/stats` counters).

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const DOMAIN: &str = "failures-domain";

fn chat_path() -> String {
    format!("/proxy/{DOMAIN}/v1/chat/completions")
}

/// A loopback port nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A gateway with one domain whose backends are `backends` (all vLLM, serving `model`).
fn gateway_for(driver: &str, backends: &[SocketAddr], model: &str) -> Gateway {
    let models: &[&str] = &[model];
    let list: Vec<(&str, SocketAddr, &[&str])> =
        backends.iter().map(|a| ("vllm", *a, models)).collect();
    gateway(driver, &domains_config(&[(DOMAIN, &list)]))
}

fn stat(sim: &Proc, key: &str) -> u64 {
    sim_stats(sim)[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in /sim/stats"))
}

/// Asserts the contract's error shape and returns the code.
fn assert_error_shape(r: &Response) -> String {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{:?}",
        r.headers
    );
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    r.error_code()
}

/// Reads one request (head + Content-Length body) off `s`. Bounded by size and by the
/// socket's timeouts.
fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return false;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    true
}

/// A scripted backend: a std listener thread that answers each of at most `max_conns`
/// connections with `response` after reading the request, then closes its side and waits
/// (bounded) for the gateway to close too. The thread gives up after 20 s and returns how
/// many connections it served.
fn scripted_backend(response: Vec<u8>, max_conns: usize) -> (SocketAddr, JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0;
        while served < max_conns && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                    served += 1;
                    if !read_request(&mut s) {
                        continue;
                    }
                    let _ = s.write_all(&response);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    // Wait for the gateway to hang up (bounded by the read timeout).
                    let mut tmp = [0u8; 4096];
                    for _ in 0..1000 {
                        match s.read(&mut tmp) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
        served
    });
    (addr, handle)
}

/// 1. A backend nobody listens on: 502 `backend_unreachable` in the contract's JSON shape,
///    and the client connection stays usable for the next request.
fn backend_down_is_502_and_connection_survives(driver: &str) {
    let gw = gateway_for(driver, &[dead_addr()], VLLM_MODEL);
    let mut r = send_chat(gw.addr, &chat_path(), VLLM_MODEL, false);
    let resp = r.response().expect("an answer to the first request");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(assert_error_shape(&resp), "backend_unreachable");
    assert!(resp.complete);
    assert_ne!(
        resp.header("connection").map(str::to_ascii_lowercase),
        Some("close".into()),
        "a backend failure must not close the client connection"
    );
    // Same connection, second request.
    r.stream
        .write_all(&request_bytes("GET", "/health", &[], b""))
        .unwrap();
    let health = r.response().expect("the connection was kept alive");
    assert_eq!(health.status, 200, "{}", health.text());
    assert!(health.complete);
}

/// 2. A backend that does not send its head within `first_byte_s` (2 s here): 504
///    `backend_timeout`.
fn backend_slow_is_504(driver: &str) {
    let sim = sim("vllm", &[]);
    let gw = gateway_for(driver, &[sim.addr], VLLM_MODEL);
    let resp = post_with(
        gw.addr,
        &chat_path(),
        &[("x-sim-stall-ms", "4000")],
        &chat_body(VLLM_MODEL, false, r#","max_tokens":2"#),
    );
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_eq!(assert_error_shape(&resp), "backend_timeout");
    // The backend did get the request (it was slow, not unreachable).
    assert_eq!(stat(&sim, "requests"), 1);
    assert_eq!(get(gw.addr, "/health").status, 200);
}

/// 3. The backend dies after two stream events without a terminating chunk: the client got
///    the 200 head and some chunks, then the connection closes without a terminating chunk
///    (a truncated answer, never a "complete" one), and nothing hangs.
fn backend_dies_mid_stream(driver: &str) {
    let sim = sim("vllm", &["--tokens", "10"]);
    let gw = gateway_for(driver, &[sim.addr], VLLM_MODEL);
    let mut r = Reader::new(connect(gw.addr));
    let body = chat_body(VLLM_MODEL, true, "");
    r.stream
        .write_all(&request_bytes(
            "POST",
            &chat_path(),
            &[
                ("Content-Type", "application/json"),
                ("x-sim-die-after", "2"),
            ],
            body.as_bytes(),
        ))
        .unwrap();
    let resp = r.response().expect("a response head");
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("transfer-encoding")
            .map(str::to_ascii_lowercase),
        Some("chunked".into())
    );
    assert!(
        !resp.chunks.is_empty(),
        "some events arrived before the death"
    );
    assert!(
        !resp.complete,
        "no terminating chunk may be sent for a truncated answer"
    );
    let text = resp.text();
    assert!(text.contains("data: "), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    // The gateway closed the connection (EOF, not a read timeout).
    assert!(
        peer_closed(&mut r.stream),
        "the client connection must close"
    );
    assert!(eventually(Duration::from_secs(5), || stat(
        &sim,
        "streams_died"
    ) == 1));
    assert_eq!(stat(&sim, "streams_completed"), 0);
    // The gateway itself is fine.
    assert_eq!(get(gw.addr, "/health").status, 200);
}

/// 4. A client that goes away mid-stream: the gateway closes the upstream connection and
///    the backend stops generating.
fn client_disconnect_mid_stream_closes_upstream(driver: &str) {
    let sim = sim("vllm", &["--tokens", "2000", "--token-delay-us", "20000"]);
    let gw = gateway_for(driver, &[sim.addr], VLLM_MODEL);
    let mut r = send_chat(gw.addr, &chat_path(), VLLM_MODEL, true);
    let (status, _) = r.head().expect("a response head");
    assert_eq!(status, 200);
    let first = r
        .chunk()
        .expect("a first chunk")
        .expect("not the last chunk");
    assert!(!first.is_empty());
    assert_eq!(stat(&sim, "active_streams"), 1);
    drop(r);
    assert!(
        eventually(Duration::from_secs(5), || {
            let s = sim_stats(&sim);
            s["streams_aborted"] == 1 && s["active_streams"] == 0
        }),
        "the backend kept streaming for a client that left: {}",
        sim_stats(&sim)
    );
    assert_eq!(stat(&sim, "streams_completed"), 0);
    assert_eq!(get(gw.addr, "/health").status, 200);
}

/// 5. A client that goes away while the backend has not answered yet (stalled before its
///    head): the gateway drops the upstream connection, so the backend never produces the
///    answer. The simulator's stall watches its peer and gives up without counting a
///    stream; had the gateway kept the connection, the stream (5 tokens, no delay) would
///    be counted as completed 1.5 s after the request arrived.
fn client_disconnect_before_backend_head_closes_upstream(driver: &str) {
    let sim = sim("vllm", &["--tokens", "5"]);
    let gw = gateway_for(driver, &[sim.addr], VLLM_MODEL);
    let mut s = connect(gw.addr);
    let body = chat_body(VLLM_MODEL, true, "");
    s.write_all(&request_bytes(
        "POST",
        &chat_path(),
        &[
            ("Content-Type", "application/json"),
            ("x-sim-stall-ms", "1500"),
        ],
        body.as_bytes(),
    ))
    .unwrap();
    // The request reached the backend (which is now stalling).
    assert!(eventually(Duration::from_secs(5), || stat(
        &sim, "requests"
    ) == 1));
    drop(s);
    // Give the stall time to run out, then look (bounded wait, no timing assertion).
    std::thread::sleep(Duration::from_millis(2500));
    let st = sim_stats(&sim);
    assert_eq!(
        st["streams_completed"], 0,
        "the backend answered a client that had left: {st}"
    );
    assert_eq!(st["active_streams"], 0, "{st}");
    // A control request afterwards completes and is counted: the counter works.
    let ok = post(gw.addr, &chat_path(), &chat_body(VLLM_MODEL, true, ""));
    assert_eq!(ok.status, 200);
    assert!(ok.complete);
    assert!(eventually(Duration::from_secs(5), || stat(
        &sim,
        "streams_completed"
    ) == 1));
    assert_eq!(stat(&sim, "streams_completed"), 1);
}

/// 6. Two backends serve the model and one is down: every request still succeeds (the
///    gateway moves on to the next candidate after a refused connection).
fn down_backend_is_skipped_for_the_next_candidate(driver: &str) {
    let sim = sim("vllm", &[]);
    let gw = gateway_for(driver, &[dead_addr(), sim.addr], VLLM_MODEL);
    for i in 0..6 {
        let r = post(
            gw.addr,
            &chat_path(),
            &chat_body(VLLM_MODEL, false, r#","max_tokens":3"#),
        );
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert!(r.complete);
        assert_eq!(r.json()["object"], "chat.completion", "{}", r.text());
    }
    assert_eq!(stat(&sim, "requests"), 6);
}

/// 7. A backend whose response head is not valid HTTP framing (Content-Length and chunked
///    together, or not HTTP at all): 502 `backend_bad_response`. One that closes without
///    a byte: 502 `backend_closed`.
fn backend_speaking_garbage_is_502(driver: &str) {
    let cases: [(&[u8], &str); 3] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "backend_bad_response",
        ),
        (
            b"SSH-2.0-OpenSSH_9.6\r\nthis is not http\r\n\r\n",
            "backend_bad_response",
        ),
        (b"", "backend_closed"),
    ];
    for (answer, code) in cases {
        let (addr, backend) = scripted_backend(answer.to_vec(), 1);
        let gw = gateway_for(driver, &[addr], "m");
        let r = post(gw.addr, &chat_path(), &chat_body("m", false, ""));
        assert_eq!(
            r.status,
            502,
            "{:?}: {}",
            String::from_utf8_lossy(answer),
            r.text()
        );
        assert_eq!(assert_error_shape(&r), code, "{}", r.text());
        assert_eq!(get(gw.addr, "/health").status, 200);
        drop(gw);
        assert_eq!(backend.join().unwrap(), 1, "one connection to the backend");
    }
}

/// A deterministic body larger than one read.
fn big_body() -> Vec<u8> {
    let mut b = Vec::with_capacity(200_000);
    let mut i = 0u32;
    while b.len() < 200_000 {
        b.extend_from_slice(format!("line {i:06} of an until-close body\n").as_bytes());
        i += 1;
    }
    b
}

/// 8. A backend that frames its body by closing the connection (an HTTP/1.0 answer
///    without Content-Length, or HTTP/1.1 with `Connection: close` and no length): the
///    client receives the whole body, byte for byte.
fn until_close_body_reaches_the_client_whole(driver: &str) {
    let body = big_body();
    let heads: [&[u8]; 2] = [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
    ];
    for head in heads {
        let mut answer = head.to_vec();
        answer.extend_from_slice(&body);
        let (addr, backend) = scripted_backend(answer, 1);
        let gw = gateway_for(driver, &[addr], "m");
        let r = post(gw.addr, &chat_path(), &chat_body("m", false, ""));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(head));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert!(r.complete);
        assert_eq!(
            r.body.len(),
            body.len(),
            "{}",
            String::from_utf8_lossy(head)
        );
        assert!(r.body == body, "the body arrived altered");
        drop(gw);
        assert_eq!(backend.join().unwrap(), 1);
    }
}

for_each_driver!(
    backend_down_is_502_and_connection_survives,
    backend_slow_is_504,
    backend_dies_mid_stream,
    client_disconnect_mid_stream_closes_upstream,
    client_disconnect_before_backend_head_closes_upstream,
    down_backend_is_skipped_for_the_next_candidate,
    backend_speaking_garbage_is_502,
    until_close_body_reaches_the_client_whole,
);
