//! How an answer is read from its backend (`src/proxy/read_answer.rs`), seen on the wire:
//! a stream that trickles (read into 2 KiB), then floods (reads fill it: a pooled 16 KiB
//! buffer), then trickles again, reaches the client byte for byte; and a request the
//! client pipelines while a slow answer is awaited (the client's read buffer is trimmed
//! then) is kept and answered after it, on the same connection.

mod common;
use common::*;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

const D: &str = "reads-domain";

/// The chunks of the first answer, with the pause before each: a slow start (the watch
/// arms, the client's buffer is trimmed), a trickle, a flood of 100 KB in one chunk, then
/// a trickle again.
fn script() -> Vec<(Duration, Vec<u8>)> {
    let ms = Duration::from_millis;
    let flood: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    vec![
        (ms(80), b"data: first\n\n".to_vec()),
        (ms(30), b"data: second\n\n".to_vec()),
        (ms(30), flood),
        (ms(30), b"data: after the flood\n\n".to_vec()),
        (ms(30), b"data: [DONE]\n\n".to_vec()),
    ]
}

/// A backend that streams `script()` as a chunked answer to a request whose body says
/// "stream", and answers anything else with a small whole answer naming it.
fn trickling_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                while let Some(request) = read_request(&mut s) {
                    let head_end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                    let text = String::from_utf8_lossy(&request[head_end + 4..]).into_owned();
                    if text.contains("stream") {
                        s.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                              Transfer-Encoding: chunked\r\n\r\n",
                        )
                        .unwrap();
                        for (pause, chunk) in script() {
                            std::thread::sleep(pause);
                            let mut out = format!("{:x}\r\n", chunk.len()).into_bytes();
                            out.extend_from_slice(&chunk);
                            out.extend_from_slice(b"\r\n");
                            s.write_all(&out).unwrap();
                        }
                        s.write_all(b"0\r\n\r\n").unwrap();
                    } else {
                        let answer = format!("whole answer to {}", text.len());
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                            answer.len()
                        );
                        s.write_all(head.as_bytes()).unwrap();
                        s.write_all(answer.as_bytes()).unwrap();
                    }
                }
            });
        }
    });
    addr
}

fn trickle_flood_trickle_and_a_pipelined_request(driver: &str) {
    let backend = trickling_backend();
    let gw = gateway(
        driver,
        &domains_config(&[(D, &[("vllm", backend, &["m"])])]),
    );
    let path = format!("/proxy/{D}/v1/chat/completions");
    let first = request_bytes(
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        br#"{"model":"m","stream":true}"#,
    );
    let second_body = r#"{"model":"m","messages":[{"role":"user","content":"next"}]}"#;
    let second = request_bytes(
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        second_body.as_bytes(),
    );
    let mut s = connect(gw.addr);
    s.write_all(&first).unwrap();
    // Sent while the first answer is still awaited (the backend starts after 80 ms).
    std::thread::sleep(Duration::from_millis(40));
    s.write_all(&second).unwrap();
    let mut reader = Reader::new(s);

    let r = reader.response().expect("first answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete, "the stream ended with its last chunk");
    let expected: Vec<u8> = script().into_iter().flat_map(|(_, c)| c).collect();
    assert_eq!(r.body.len(), expected.len());
    assert!(r.body == expected, "the stream arrived byte for byte");

    let r = reader
        .response()
        .expect("the pipelined request was answered");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("whole answer to {}", second_body.len()));
}

for_each_driver!(trickle_flood_trickle_and_a_pipelined_request);
