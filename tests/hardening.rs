//! Defences found by review: disguised model keys, response desync on pooled connections,
//! chunked trailers and extensions never reaching a backend, spoofable header spellings,
//! model ids in paths, and every write bounded by a timeout (a client that never reads, a
//! backend that never reads). Scripted backends on loopback record exactly what arrives.

mod common;
use common::*;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

const D: &str = "dom";

fn gw_for(driver: &str, backend: SocketAddr) -> Gateway {
    gateway(
        driver,
        &domains_config(&[(D, &[("vllm", backend, &["m", "other"])])]),
    )
}

/// Bytes a backend sends after its answer must never reach the next client.
fn no_response_desync_on_pooled_connections(driver: &str) {
    let (backend, _) = scripted_backend(
        3,
        Some(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSMUGGLE"),
    );
    let gw = gw_for(driver, backend);
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(150));
        let r = post(
            gw.addr,
            &format!("/proxy/{D}/v1/chat/completions"),
            r#"{"model":"m"}"#,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.text(),
            format!("answer-{i}"),
            "request {i} got someone else's answer"
        );
    }
}

/// Chunk extensions and trailers are dropped: the backend gets our own framing only.
fn chunked_bodies_are_reframed(driver: &str) {
    let (backend, seen) = scripted_backend(1, None);
    let gw = gw_for(driver, backend);
    let body = r#"{"model":"m","prompt":"hi"}"#;
    let mut raw = format!(
        "POST /proxy/{D}/v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for piece in body.as_bytes().chunks(5) {
        raw.extend(format!("{:x};ext=\"q\"\r\n", piece.len()).bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nX-User-Id: admin\r\nAuthorization: Bearer stolen\r\n\r\n");
    let r = raw_send(gw.addr, &raw);
    assert_eq!(r.status, 200, "{}", r.text());
    let got = String::from_utf8_lossy(&seen.lock().unwrap()[0]).into_owned();
    assert!(!got.contains("ext="), "{got}");
    assert!(!got.contains("stolen"), "{got}");
    assert!(!got.contains("X-User-Id: admin"), "{got}");
    // The payload itself arrived whole.
    let (_, framed) = got.split_once("\r\n\r\n").unwrap();
    let mut payload = String::new();
    let mut rest = framed;
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size, 16).unwrap();
        if n == 0 {
            break;
        }
        payload.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    assert_eq!(payload, body);
}

fn raw_send(addr: SocketAddr, bytes: &[u8]) -> Response {
    raw(addr, bytes).expect("response")
}

/// Header spellings that servers fold into identity headers are dropped; a disguised
/// model key is refused; a model id in the path must be one the domain offers.
fn spoofing_and_disguises(driver: &str) {
    let (backend, seen) = scripted_backend(1, None);
    let gw = gw_for(driver, backend);
    let r = post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[
            ("X_User_Id", "admin"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-Real-IP", "1.2.3.4"),
        ],
        r#"{"model":"m"}"#,
    );
    assert_eq!(r.status, 200);
    let got = String::from_utf8_lossy(&seen.lock().unwrap()[0]).to_ascii_lowercase();
    assert!(!got.contains("x_user_id"), "{got}");
    assert!(!got.contains("forwarded: for=1.2.3.4"), "{got}");
    assert!(!got.contains("x-real-ip"), "{got}");
    assert!(got.contains("x-user-id: anonymous"), "{got}");
    assert!(got.contains("x-forwarded-proto: http\r\n"), "{got}");

    let r = post(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        r#"{"model":"m","MODEL":"secret"}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "invalid_body");
    let r = get(gw.addr, &format!("/proxy/{D}/v1/models/not-offered"));
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "model_not_found");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "refused requests reached the backend"
    );
}

/// A client that pipelines requests and never reads their answers is cut off once a write
/// to it has waited `between_chunks_s` (2 s in the test config).
fn client_that_never_reads_is_dropped(driver: &str) {
    let (backend, _) = scripted_backend(0, None);
    let gw = gw_for(driver, backend);
    let s = connect(gw.addr);
    let mut writer = s.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let one = request_bytes("GET", &format!("/proxy/{D}/v1/models"), &[], b"");
    let sender = std::thread::spawn(move || {
        for _ in 0..50_000 {
            if writer.write_all(&one).is_err() {
                break;
            }
        }
    });
    // Not reading for a while: the gateway's writes stall, then time out.
    std::thread::sleep(Duration::from_secs(5));
    let mut r = Reader::new(s);
    let mut answers = 0;
    let closed = loop {
        match r.response() {
            Some(resp) => {
                assert_eq!(resp.status, 200);
                answers += 1;
                if answers > 50_000 {
                    break false;
                }
            }
            None => break true,
        }
    };
    assert!(closed, "the gateway kept a client that never read");
    assert!(
        answers < 50_000,
        "every request was answered: no write ever stalled"
    );
    let _ = sender.join();
    assert_eq!(get(gw.addr, "/health").status, 200);
}

/// A backend that accepts a request but never reads its body: 504, not a hang.
fn backend_that_never_reads_is_a_timeout(driver: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let holder = std::thread::spawn(move || {
        // Accept and hold the connection without reading, for a bounded time.
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(12));
        drop(conn);
    });
    let gw = gw_for(driver, backend);
    let body = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(12_000_000));
    let s = connect(gw.addr);
    let mut writer = s.try_clone().unwrap();
    let path = format!("/proxy/{D}/v1/completions");
    let req = request_bytes(
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&req);
    });
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let resp = Reader::new(s).response().expect("an answer");
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert_eq!(resp.error_code(), "backend_write_timeout");
    let _ = sender.join();
    let _ = holder.join();
}

/// Past `limits.max_connections` a worker stops accepting; a waiting connection is served
/// as soon as another one closes.
fn connection_cap_holds_new_connections_back(driver: &str) {
    let (backend, _) = scripted_backend(0, None);
    let mut body = domains_config(&[(D, &[("vllm", backend, &["m"])])]);
    body.push_str("\n[limits]\nmax_connections = 2\n");
    let gw = gateway(driver, &body);
    // Two workers, one connection each: the third waits in the backlog.
    let mut readers: Vec<Reader> = (0..3)
        .map(|_| {
            let mut s = connect(gw.addr);
            s.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            send(&mut s, &request_bytes("GET", "/health", &[], b""));
            Reader::new(s)
        })
        .collect();
    let answered: Vec<bool> = readers.iter_mut().map(|r| r.response().is_some()).collect();
    assert!(answered.iter().filter(|a| **a).count() <= 2, "{answered:?}");
    let waiting = answered
        .iter()
        .position(|a| !a)
        .expect("one connection must wait");
    // Closing the served ones lets the waiting one in.
    let mut waiting_reader = readers.remove(waiting);
    drop(readers);
    waiting_reader
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(
        waiting_reader
            .response()
            .expect("served after others closed")
            .status,
        200
    );
}

/// A body trickled in just under the pause limit still has to finish within
/// `timeouts.body_total_s`.
fn trickled_body_hits_the_total_deadline(driver: &str) {
    let (backend, seen) = scripted_backend(1, None);
    let mut body = domains_config(&[(D, &[("vllm", backend, &["m"])])]);
    body = body.replace("drain_s = 5", "drain_s = 5\nbody_total_s = 2");
    let gw = gateway(driver, &body);
    let mut s = connect(gw.addr);
    let head = format!("POST /proxy/{D}/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{{\"model\":\"m\",\"p\":\"");
    send(&mut s, head.as_bytes());
    let reader_side = s.try_clone().unwrap();
    // One byte every 400 ms (the pause limit is 1 s), for at most 10 s.
    let trickle = std::thread::spawn(move || {
        for _ in 0..25 {
            std::thread::sleep(Duration::from_millis(400));
            if s.write_all(b"x").is_err() {
                break;
            }
        }
    });
    reader_side
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let resp = Reader::new(reader_side).response().expect("an answer");
    assert_eq!(resp.status, 408, "{}", resp.text());
    assert_eq!(resp.error_code(), "body_read_timeout");
    let _ = trickle.join();
    assert!(seen.lock().unwrap().is_empty());
}

/// `[auth] claim_headers`: a verified claim travels upstream as a header, and a client
/// cannot send that header itself.
fn claims_become_headers_and_cannot_be_spoofed(driver: &str) {
    let (backend, seen) = scripted_backend(1, None);
    let secret = "a shared secret of more than thirty-two bytes";
    let body = format!(
        "{}\n[[auth.trusted]]\nissuer = \"https://idp.test/\"\nhs_secret_env = \"TEST_HS_SECRET\"\n",
        domains_config(&[(D, &[("vllm", backend, &["m"])])])
            .replace("mode = \"none\"", "mode = \"jwt\"\nclaim_headers = { \"email\" = \"X-User-Email\" }")
    );
    let gw = gateway_env(driver, &body, &[("TEST_HS_SECRET", secret)]);
    let claims = serde_json::json!({"iss": "https://idp.test/", "sub": "u1", "exp": unix_in(600), "email": "alice@example.com", "domains": [D]});
    let token = hs256_token(secret, &claims);
    let auth = format!("Bearer {token}");
    let r = post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[
            ("Authorization", &auth),
            ("X-User-Email", "mallory@example.com"),
        ],
        r#"{"model":"m"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = String::from_utf8_lossy(&seen.lock().unwrap()[0]).into_owned();
    assert!(got.contains("X-User-Email: alice@example.com\r\n"), "{got}");
    assert!(!got.contains("mallory"), "{got}");
    assert!(got.contains("X-User-Id: u1\r\n"), "{got}");
}

/// `auth.mode = "none"` carries a security context: without a token the caller is
/// anonymous; a token that verifies is that identity upstream and in the access record
/// (domain checks still off: its domains claim does not list this domain); a token that
/// does not verify is refused as in production.
fn development_mode_keeps_a_verified_identity(driver: &str) {
    let (backend, seen) = scripted_backend(3, None);
    let secret = "a shared secret of more than thirty-two bytes";
    let body = format!(
        "{}\n[[auth.trusted]]\nissuer = \"https://idp.test/\"\nhs_secret_env = \"TEST_HS_SECRET\"\n",
        domains_config(&[(D, &[("vllm", backend, &["m"])])]).replace(
            "mode = \"none\"",
            "mode = \"none\"\nclaim_headers = { \"email\" = \"X-User-Email\" }"
        )
    );
    // One worker: the recording backend serves one connection at a time, which the
    // worker's pool reuses.
    let gw = gateway_with_env(
        driver,
        "workers = 1",
        &body,
        &[("TEST_HS_SECRET", secret), ("CUBEGATE_LOG_FORMAT", "json")],
    );
    let path = format!("/proxy/{D}/v1/chat/completions");
    let send = |auth: Option<&str>, id: &str| {
        let bearer = auth.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("X-Request-Id", id)];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b));
        }
        post_with(gw.addr, &path, &headers, r#"{"model":"m"}"#)
    };
    assert_eq!(send(None, "dev-anon").status, 200);
    // An SDK's placeholder key is no credential.
    assert_eq!(send(Some("unused"), "dev-placeholder").status, 200);
    let claims = serde_json::json!({"iss": "https://idp.test/", "sub": "dev-user", "exp": unix_in(600), "email": "dev@example.com", "domains": ["elsewhere"]});
    let token = hs256_token(secret, &claims);
    let r = send(Some(&token), "dev-token");
    assert_eq!(r.status, 200, "{}", r.text());
    let forged = hs256_token("not the secret at all, but just as long", &claims);
    let refused = send(Some(&forged), "dev-forged");
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert_eq!(refused.error_code(), "invalid_token");

    let seen = seen.lock().unwrap();
    let anon = String::from_utf8_lossy(&seen[0]).into_owned();
    let known = String::from_utf8_lossy(&seen[2]).into_owned();
    assert!(anon.contains("X-User-Id: anonymous\r\n"), "{anon}");
    assert!(known.contains("X-User-Id: dev-user\r\n"), "{known}");
    assert!(
        known.contains("X-User-Email: dev@example.com\r\n"),
        "{known}"
    );
    assert_eq!(access_record(&gw, "dev-token")["user"], "dev-user");
    assert_eq!(access_record(&gw, "dev-anon")["user"], "anonymous");
}

for_each_driver!(
    development_mode_keeps_a_verified_identity,
    claims_become_headers_and_cannot_be_spoofed,
    connection_cap_holds_new_connections_back,
    trickled_body_hits_the_total_deadline,
    no_response_desync_on_pooled_connections,
    chunked_bodies_are_reframed,
    spoofing_and_disguises,
    client_that_never_reads_is_dropped,
    backend_that_never_reads_is_a_timeout,
);
