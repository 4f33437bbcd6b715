//! Socket tests of the load generator against scripted servers on 127.0.0.1:0 (event
//! counts and order of arrival, open-loop latency from the intended time, truncated
//! streams) and a short smoke run against the simulator. No test asserts a performance
//! figure; the only time bounds are lower bounds that a scripted sleep guarantees.

use super::{run, Kind, LoadArgs};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn args(addr: SocketAddr, kind: Kind) -> LoadArgs {
    LoadArgs {
        connections: 1,
        requests: Some(1),
        timeout: 5.0,
        request_timeout: 10.0,
        ..LoadArgs::new(&format!("http://{addr}/"), kind)
    }
}

/// A server on 127.0.0.1:0 that hands each of `conns` accepted connections to `script`
/// (accepting for at most 5 s; every socket read times out after 5 s).
fn scripted(conns: usize, script: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    l.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut served = 0;
        while served < conns && Instant::now() < deadline {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    s.set_nodelay(true).expect("nodelay");
                    std::thread::spawn(move || script(s));
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    addr
}

/// Reads one request (head and Content-Length body); false at EOF.
fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().expect("length"));
            if buf.len() >= i + 4 + len {
                return true;
            }
        }
        match s.read(&mut b) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// Writes `pieces` one by one with a pause between them.
fn dribble(s: &mut TcpStream, pieces: &[&[u8]], pause: Duration) {
    for p in pieces {
        if s.write_all(p).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
}

/// `payload` as one chunk.
fn chunk(payload: &[u8]) -> Vec<u8> {
    let mut c = format!("{:x}\r\n", payload.len()).into_bytes();
    c.extend_from_slice(payload);
    c.extend_from_slice(b"\r\n");
    c
}

/// An SSE answer whose chunk boundaries fall inside events, written in 11-byte pieces
/// (so reads end inside chunk headers too) with pauses between them.
fn sse_script(mut s: TcpStream) {
    let mut wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
Transfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for payload in [
        &b"data: {\"i\":0}\n\n"[..],
        b"data: {\"",
        b"i\":1}\n\n",
        b"data: {\"i\":2}\n\ndata: {\"i\":3}",
        b"\n\ndata: {\"i\":4}\n\ndata: [DONE]\n\n",
    ] {
        wire.extend_from_slice(&chunk(payload));
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let pieces: Vec<&[u8]> = wire.chunks(11).collect();
    while read_request(&mut s) {
        dribble(&mut s, &pieces, Duration::from_millis(2));
    }
}

#[test]
fn sse_events_counted_and_gaps_recorded() {
    let addr = scripted(1, sse_script);
    let mut a = args(addr, Kind::ChatStream);
    a.requests = Some(2);
    let s = run(&a).expect("run");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!((s.completed, s.ok), (2, 2));
    assert_eq!(s.events, 10);
    assert_eq!(s.latency_us.first_event.count, 2);
    assert_eq!(s.latency_us.first_byte.count, 2);
    assert_eq!(s.latency_us.between_events.count, 8);
}

/// An Ollama NDJSON answer without a length, ended by closing the connection.
fn ndjson_script(mut s: TcpStream) {
    if read_request(&mut s) {
        dribble(
            &mut s,
            &[
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n",
                b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"mess",
                b"age\":{\"content\":\"b\"},\"done\":false}\n",
                b"{\"message\":{\"content\":\"c\"},\"done\":false}\n{\"done\":true,\"eval_count\":3}\n",
            ],
            Duration::from_millis(15),
        );
    }
}

#[test]
fn ndjson_events_until_close() {
    let addr = scripted(2, ndjson_script);
    let mut a = args(addr, Kind::OllamaStream);
    a.requests = Some(2);
    let s = run(&a).expect("run");
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.ok, 2);
    assert_eq!(s.events, 8);
    assert_eq!(s.latency_us.between_events.count, 6);
}

/// A stream that ends, properly framed, without `[DONE]`.
fn no_done_script(mut s: TcpStream) {
    if read_request(&mut s) {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: x\r\n2\r\n\n\n\r\n0\r\n\r\n",
        );
    }
}

/// A stream cut in the middle of a chunk.
fn cut_script(mut s: TcpStream) {
    if read_request(&mut s) {
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: x\n\n");
    }
}

#[test]
fn truncated_streams_are_errors() {
    for (script, err) in [
        (no_done_script as fn(TcpStream), "incomplete"),
        (cut_script, "closed"),
    ] {
        let addr = scripted(1, script);
        let s = run(&args(addr, Kind::ChatStream)).expect("run");
        assert_eq!(s.completed, 0);
        assert_eq!(s.errors.get(err), Some(&1), "{:?}", s.errors);
        assert_eq!(s.errors_total, 1, "{:?}", s.errors);
        // Both failed after their first event: streams cut mid-way.
        assert_eq!(s.errors_mid_stream, 1);
    }
    // A connection closed before any answer failed before its first event.
    let addr = scripted(1, |mut s| {
        read_request(&mut s);
    });
    let s = run(&args(addr, Kind::ChatStream)).expect("run");
    assert_eq!(
        (s.errors_total, s.errors_mid_stream),
        (1, 0),
        "{:?}",
        s.errors
    );
}

#[test]
fn given_bodies_are_sent_in_turn() {
    let mut a = args("127.0.0.1:9".parse().unwrap(), Kind::ChatStream);
    let bodies: Vec<bytes::Bytes> = ["{\"a\":1}", "{\"b\":22}"]
        .map(|b: &'static str| bytes::Bytes::from_static(b.as_bytes()))
        .to_vec();
    a.bodies = Some(std::sync::Arc::new(bodies));
    let reqs = super::build_requests(&a, "h", "/v1/chat/completions");
    assert_eq!(reqs.len(), 2);
    let text = String::from_utf8_lossy(&reqs[1]);
    assert!(
        text.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{text}"
    );
    assert!(text.contains("Content-Length: 8\r\n"), "{text}");
    assert!(text.contains("Accept: text/event-stream\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n{\"b\":22}"), "{text}");
}

/// Answers each request on the connection 200 ms after reading it.
fn slow_script(mut s: TcpStream) {
    while read_request(&mut s) {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn open_loop_latency_counts_from_intended_time() {
    let addr = scripted(1, slow_script);
    let mut a = args(addr, Kind::Chat);
    a.rate = Some(100.0);
    a.requests = Some(3);
    let s = run(&a).expect("run");
    assert_eq!(s.ok, 3);
    // Request 3 was due at 20 ms but could leave only after the first two answers (400 ms
    // or more); its 200 ms service is counted from when it was due.
    let l = &s.latency_us;
    assert!(l.send_lag.max >= 350_000, "{:?}", l.send_lag);
    assert!(l.total.max >= 550_000, "{:?}", l.total);
    // (HDR histograms keep 3 significant digits: allow their rounding, ~0.1 %.)
    assert!(l.total.max + 1_000 >= l.send_lag.max + 200_000, "{l:?}");
}

#[test]
fn smoke_against_the_simulator() {
    use crate::sim;
    for (flavor, kind) in [
        (sim::Flavor::Vllm, Kind::ChatStream),
        (sim::Flavor::Vllm, Kind::Chat),
        (sim::Flavor::Ollama, Kind::OllamaStream),
        (sim::Flavor::Ollama, Kind::OllamaChat),
    ] {
        let server = sim::start(sim::Config {
            flavor,
            listen: "127.0.0.1:0".into(),
            models: vec![match flavor {
                sim::Flavor::Vllm => "meta-llama/Llama-3.1-8B-Instruct".into(),
                sim::Flavor::Ollama => "llama3.2:1b".into(),
            }],
            tokens: 16,
            token_delay: Duration::ZERO,
            first_token_delay: Duration::ZERO,
            threads: 1,
            embed_dim: 8,
            gpu: sim::GpuConfig::default(),
        })
        .expect("simulator");
        let mut a = args(server.addr, kind);
        a.connections = 4;
        a.threads = 2;
        a.requests = Some(40);
        a.tokens = Some(8);
        a.warmup = 0.1;
        let s = run(&a).expect("run");
        assert!(s.errors.is_empty(), "{kind:?}: {:?}", s.errors);
        assert_eq!((s.completed, s.ok), (40, 40), "{kind:?}");
        if kind == Kind::ChatStream || kind == Kind::OllamaStream {
            // Same request, same answer: every stream has the same number of events.
            assert!(
                s.events >= 40 * 8 && s.events % 40 == 0,
                "{kind:?}: {}",
                s.events
            );
        } else {
            assert_eq!(s.events, 0);
        }
        let json = serde_json::to_value(&s).expect("json");
        assert_eq!(json["completed"], 40);
        assert!(s.human().contains("requests/s"));
    }
}

static SOURCES: std::sync::Mutex<Vec<std::net::IpAddr>> = std::sync::Mutex::new(Vec::new());

/// Records the client's address, then answers each request at once.
fn source_script(mut s: TcpStream) {
    if let Ok(peer) = s.peer_addr() {
        SOURCES.lock().unwrap().push(peer.ip());
    }
    while read_request(&mut s) {
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn connections_spread_over_source_addresses() {
    let addr = scripted(6, source_script);
    let mut a = args(addr, Kind::Chat);
    a.connections = 6;
    a.source_ips = 3;
    a.requests = Some(12);
    let s = run(&a).expect("run");
    assert_eq!(s.ok, 12);
    let mut seen = SOURCES.lock().unwrap().clone();
    seen.sort();
    seen.dedup();
    let want: Vec<std::net::IpAddr> = (1..=3).map(|i| [127, 0, 0, i].into()).collect();
    assert_eq!(seen, want);
}

/// Answers every request on the connection at once.
fn quick_script(mut s: TcpStream) {
    while read_request(&mut s) {
        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn open_warmup_is_the_start_of_one_schedule() {
    let addr = scripted(1, quick_script);
    let mut a = args(addr, Kind::Chat);
    a.requests = None;
    a.rate = Some(100.0);
    a.warmup = 0.2;
    a.duration = Some(0.3);
    a.open_warmup = true;
    let s = run(&a).expect("run");
    // 50 requests due in 0.5 s; the 20 due in the first 0.2 s are sent, not recorded.
    assert!((28..=30).contains(&s.sent), "{}", s.sent);
    assert_eq!(s.ok, s.sent);
    assert_eq!(s.unsent, 0);
    assert_eq!(s.run.warmup_s, 0.2);
    assert_eq!(s.run.duration_s, Some(0.3));
}
