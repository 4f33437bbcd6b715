//! HTTPS on the public listener, end to end: a rustls client (and curl where present)
//! against the real binary with a certificate from `cubegate gen-cert`.
//!
//! Covered: TLS 1.3 and 1.2 with ALPN http/1.1; keep-alive, pipelining, streaming and
//! large bodies through TLS; plain HTTP on the HTTPS port; a SIGHUP certificate swap with
//! a stream in flight (the stream finishes, new handshakes get the new certificate, a bad
//! key file keeps the running one); a gone TLS client stops the backend (the client watch
//! works under TLS); draining closes idle TLS keep-alive connections at once; ten reloads
//! under load (certificate and domain map) fail no request; startup refuses unreadable or
//! mismatched certificate and key files with the key's name.

mod common;

use common::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const DOMAIN: &str = "3f8a1c2e-0000-4000-8000-000000000001";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn chat_path() -> String {
    format!("/proxy/{DOMAIN}/v1/chat/completions")
}

fn tls_gateway(driver: &str, dir: &Path, backends: &[SocketAddr]) -> Gateway {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let models: &[&str] = &[MODEL];
    let list: Vec<BackendSpec> = backends.iter().map(|a| ("vllm", *a, models)).collect();
    gateway_with(
        driver,
        &tls_lines(&cert, &key),
        &domains_config(&[(DOMAIN, &list)]),
    )
}

fn send_on(tls: &mut Tls, bytes: &[u8]) {
    tls.write_all(bytes).unwrap();
    tls.flush().unwrap();
}

fn chat_request(stream: bool) -> Vec<u8> {
    request_bytes(
        "POST",
        &chat_path(),
        &[("Content-Type", "application/json")],
        chat_body(MODEL, stream, "").as_bytes(),
    )
}

/// SSE `data:` events in a body, and whether it ended with `[DONE]`.
fn sse_events(body: &[u8]) -> (usize, bool) {
    let text = String::from_utf8_lossy(body);
    let events = text.matches("data: ").count();
    (events, text.trim_end().ends_with("data: [DONE]"))
}

/// 1. TLS 1.3 with ALPN, then on the same connection: a health check, a streamed chat, a
///    big request body, and two pipelined requests in one write. A TLS 1.2 client works
///    too, and plain HTTP on the port gets a 400 that says to use https.
fn https_end_to_end(driver: &str) {
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let sim = sim("vllm", &["--tokens", "20"]);
    let gw = tls_gateway(driver, &dir, &[sim.addr]);

    let mut tls = tls_connect(gw.addr, client_config(&cert, false)).expect("handshake");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    send_on(&mut tls, &request_bytes("GET", "/health", &[], b""));
    let mut r = Reader::new(tls);
    let health = r.response().expect("health answer");
    assert_eq!(health.status, 200);

    send_on(&mut r.stream, &chat_request(true));
    let chat = r.response().expect("chat answer");
    assert_eq!(chat.status, 200, "{}", chat.text());
    assert!(chat.complete);
    let (events, done) = sse_events(&chat.body);
    assert!(events >= 20 && done, "{events} events, done={done}");

    // A 300 KB prompt: the request body crosses many TLS records.
    let filler = "x".repeat(300 * 1024);
    let big = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{filler}"}}],"max_tokens":3}}"#
    );
    send_on(
        &mut r.stream,
        &request_bytes(
            "POST",
            &chat_path(),
            &[("Content-Type", "application/json")],
            big.as_bytes(),
        ),
    );
    let answer = r.response().expect("big-body answer");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.complete);

    // Two requests in one write (one TLS record): both answered, in order.
    let mut two = request_bytes("GET", "/health", &[("X-Request-Id", "first-one")], b"");
    two.extend(request_bytes(
        "GET",
        "/health",
        &[("X-Request-Id", "second-one")],
        b"",
    ));
    send_on(&mut r.stream, &two);
    let a = r.response().expect("first pipelined");
    let b = r.response().expect("second pipelined");
    assert_eq!(a.header("x-request-id"), Some("first-one"));
    assert_eq!(b.header("x-request-id"), Some("second-one"));

    // TLS 1.2.
    let mut old = tls_connect(gw.addr, client_config(&cert, true)).expect("TLS 1.2 handshake");
    assert_eq!(
        old.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    send_on(&mut old, &request_bytes("GET", "/health", &[], b""));
    assert_eq!(Reader::new(old).response().unwrap().status, 200);

    // Plain HTTP on the HTTPS port.
    let plain = raw(gw.addr, &request_bytes("GET", "/health", &[], b"")).expect("an answer");
    assert_eq!(plain.status, 400);
    assert_eq!(plain.error_code(), "plain_http_on_https_port");
    assert!(plain.text().contains("https://"));
}

/// A request that came over HTTPS reaches the backend with `X-Forwarded-Proto: https`.
fn forwarded_proto_says_https(driver: &str) {
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let (backend, seen) = scripted_backend(1, None);
    let gw = tls_gateway(driver, &dir, &[backend]);
    let mut tls = tls_connect(gw.addr, client_config(&cert, false)).expect("handshake");
    send_on(&mut tls, &chat_request(false));
    let answer = Reader::new(tls).response().expect("answer");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let got = String::from_utf8_lossy(&seen.lock().unwrap()[0]).to_ascii_lowercase();
    assert!(got.contains("x-forwarded-proto: https\r\n"), "{got}");
}

/// 2. SIGHUP with a new certificate while a stream is in flight: the stream finishes on its
///    session, new handshakes get the new certificate (a client that trusts only the old
///    one is refused), and a broken key file on the next SIGHUP keeps the running one.
fn certificate_swap_keeps_the_stream(driver: &str) {
    let dir = unique_dir("tls");
    let (cert, key) = gen_cert(&dir);
    let old_cert = dir.join("old.pem");
    std::fs::copy(&cert, &old_cert).unwrap();
    let sim = sim("vllm", &["--tokens", "40", "--token-delay-us", "50000"]);
    let gw = tls_gateway(driver, &dir, &[sim.addr]);

    let mut tls = tls_connect(gw.addr, client_config(&old_cert, false)).unwrap();
    send_on(&mut tls, &chat_request(true));
    let mut r = Reader::new(tls);
    let (status, _) = r.head().expect("stream head");
    assert_eq!(status, 200);
    let first = r.chunk().expect("a first chunk").expect("not the end");
    assert!(!first.is_empty());

    gen_cert(&dir);
    gw.signal("HUP");
    expect_log(&gw, "reloaded the TLS certificate", Duration::from_secs(5));
    let Err(err) = tls_connect(gw.addr, client_config(&old_cert, false)) else {
        panic!("a client trusting only the old certificate is accepted after the swap");
    };
    assert!(err.to_string().contains("certificate"), "{err}");
    let mut fresh = tls_connect(gw.addr, client_config(&cert, false)).expect("new certificate");
    send_on(&mut fresh, &request_bytes("GET", "/health", &[], b""));
    assert_eq!(Reader::new(fresh).response().unwrap().status, 200);

    // The stream that started before the swap runs to its end.
    let mut body = first;
    let mut ended = false;
    for _ in 0..200 {
        match r.chunk() {
            Some(Some(c)) => body.extend(c),
            Some(None) => {
                ended = true;
                break;
            }
            None => break,
        }
    }
    assert!(
        ended,
        "the stream in flight was cut by the certificate swap"
    );
    let (events, done) = sse_events(&body);
    assert!(events >= 40 && done, "{events} events, done={done}");
    // The same connection carries on: the client watch armed during the slow stream was
    // cancelled cleanly under TLS.
    send_on(&mut r.stream, &request_bytes("GET", "/health", &[], b""));
    assert_eq!(
        r.response().expect("keep-alive after the stream").status,
        200
    );

    // A broken key: the reload is refused and the running certificate stays.
    std::fs::write(&key, "not a key").unwrap();
    gw.signal("HUP");
    expect_log(
        &gw,
        "reload kept the running TLS certificate",
        Duration::from_secs(5),
    );
    assert!(gw.log().contains("proxy.tls_key"));
    let mut still = tls_connect(gw.addr, client_config(&cert, false)).expect("still serving");
    send_on(&mut still, &request_bytes("GET", "/health", &[], b""));
    assert_eq!(Reader::new(still).response().unwrap().status, 200);
}

/// 3. A TLS client that leaves while the backend has not answered yet: the client watch
///    sees it through TLS and the backend never completes the answer.
fn gone_tls_client_stops_the_backend(driver: &str) {
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let sim = sim("vllm", &["--tokens", "5"]);
    let gw = tls_gateway(driver, &dir, &[sim.addr]);
    let mut tls = tls_connect(gw.addr, client_config(&cert, false)).unwrap();
    send_on(
        &mut tls,
        &request_bytes(
            "POST",
            &chat_path(),
            &[
                ("Content-Type", "application/json"),
                ("x-sim-stall-ms", "1500"),
            ],
            chat_body(MODEL, true, "").as_bytes(),
        ),
    );
    assert!(eventually(Duration::from_secs(5), || sim_stats(&sim)
        ["requests"]
        == 1));
    // Gone without a close_notify, as a killed client goes.
    drop(tls);
    std::thread::sleep(Duration::from_millis(2500));
    let st = sim_stats(&sim);
    assert_eq!(
        st["streams_completed"], 0,
        "the backend answered a TLS client that had left: {st}"
    );
    // Control: a client that stays gets its answer, and it is counted.
    let mut stays = tls_connect(gw.addr, client_config(&cert, false)).unwrap();
    send_on(&mut stays, &chat_request(true));
    assert_eq!(Reader::new(stays).response().unwrap().status, 200);
    assert!(eventually(Duration::from_secs(5), || sim_stats(&sim)
        ["streams_completed"]
        == 1));
}

/// 4. SIGTERM with an idle TLS keep-alive connection: the idle read is cancelled and the
///    process exits without waiting for the drain deadline.
fn drain_closes_idle_tls_connections(driver: &str) {
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let sim = sim("vllm", &[]);
    let mut gw = tls_gateway(driver, &dir, &[sim.addr]);
    let mut tls = tls_connect(gw.addr, client_config(&cert, false)).unwrap();
    send_on(&mut tls, &request_bytes("GET", "/health", &[], b""));
    let mut r = Reader::new(tls);
    assert_eq!(r.response().unwrap().status, 200);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        !gw.log().contains("drain deadline reached"),
        "an idle TLS connection held the drain until its deadline:\n{}",
        gw.log()
    );
    // The client sees the connection end (close_notify, then EOF).
    let mut tmp = [0u8; 16];
    let n = std::io::Read::read(&mut r.stream, &mut tmp).unwrap_or(0);
    assert_eq!(n, 0);
}

/// 5. curl, where installed: a streamed chat over HTTPS, verified against the certificate.
fn curl_streams_over_https(driver: &str) {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed; skipping");
        return;
    }
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let sim = sim("vllm", &["--tokens", "12"]);
    let gw = tls_gateway(driver, &dir, &[sim.addr]);
    let url = format!("https://localhost:{}{}", gw.addr.port(), chat_path());
    let out = Command::new("curl")
        .args(["-sS", "-N", "--http1.1", "--max-time", "20", "--cacert"])
        .arg(&cert)
        .args([
            "--resolve",
            &format!("localhost:{}:127.0.0.1", gw.addr.port()),
        ])
        .args(["-H", "Content-Type: application/json", "-d"])
        .arg(chat_body(MODEL, true, ""))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (events, done) = sse_events(&out.stdout);
    assert!(
        events >= 12 && done,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

for_each_driver!(
    forwarded_proto_says_https,
    https_end_to_end,
    certificate_swap_keeps_the_stream,
    gone_tls_client_stops_the_backend,
    drain_closes_idle_tls_connections,
    curl_streams_over_https,
);

/// check-config (and serve) refuse TLS files that cannot work, naming the key and the file.
#[test]
fn bad_tls_files_are_refused_at_startup() {
    let dir = unique_dir("tls-bad");
    let (cert, key) = gen_cert(&dir);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (_, other_key) = gen_cert(&other);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let missing = dir.join("missing.pem");

    let cases: [(&Path, &Path, &str, &str); 4] = [
        (&missing, &key, "proxy.tls_cert", "cannot read"),
        (&garbage, &key, "proxy.tls_cert", "no PEM CERTIFICATE"),
        (
            &cert,
            &garbage,
            "proxy.tls_key",
            "no usable PEM private key",
        ),
        (
            &cert,
            &other_key,
            "proxy.tls_key",
            "does not belong to the certificate",
        ),
    ];
    for (c, k, key_name, words) in cases {
        let path = dir.join("case.toml");
        std::fs::write(&path, config_text_with("legacy", &tls_lines(c, k), "")).unwrap();
        for command in ["check-config", "serve"] {
            let out = Command::new(env!("CARGO_BIN_EXE_cubegate"))
                .args([command, "--config"])
                .arg(&path)
                .env("CUBEGATE_ADMIN_PASSWORD", TEST_ADMIN_PASSWORD)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} {c:?} {k:?}: {stderr}"
            );
            assert!(
                stderr.contains(key_name) && stderr.contains(words),
                "{command} {c:?} {k:?}: {stderr}"
            );
        }
    }
    // Half a pair.
    let path = dir.join("half.toml");
    let half = format!("tls_cert = \"{}\"", cert.display());
    std::fs::write(&path, config_text_with("legacy", &half, "")).unwrap();
    let (code, stderr) = check_config(&path);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("set together"));
}

/// gen-cert keeps an existing certificate unless told otherwise, and the key is private.
#[test]
fn gen_cert_keeps_existing_files_and_a_private_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = unique_dir("gen-cert");
    let (cert, key) = gen_cert(&dir);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = std::fs::read(&cert).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cubegate"))
        .args(["gen-cert", "--out-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&cert).unwrap(), before);
}

/// A client that trusts every certificate in `certs`.
fn client_config_for(certs: &[&Path]) -> Arc<ClientConfig> {
    build_client(certs, false)
}

/// 6. Ten SIGHUPs under load over HTTPS, each swapping the certificate and the domain map
///    (a second model comes and goes): clients on fresh connections and on kept-alive
///    ones see no failed request, and every reload is applied.
fn reloads_under_load(driver: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    const OTHER: &str = "other-model";
    let root = unique_dir("tls-reload");
    let (a, b) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    gen_cert(&a);
    gen_cert(&b);
    let live = root.join("live");
    std::fs::create_dir_all(&live).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(a.join(f), live.join(f)).unwrap();
    }
    let sim = sim(
        "vllm",
        &["--tokens", "3", "--models", &format!("{MODEL},{OTHER}")],
    );
    let one: &[&str] = &[MODEL];
    let two: &[&str] = &[MODEL, OTHER];
    let tls = tls_lines(&live.join("cert.pem"), &live.join("key.pem"));
    let mut gw = gateway_with(
        driver,
        &tls,
        &domains_config(&[(DOMAIN, &[("vllm", sim.addr, one)])]),
    );
    let config = client_config_for(&[&a.join("cert.pem"), &b.join("cert.pem")]);

    let stop = Arc::new(AtomicBool::new(false));
    let addr = gw.addr;
    let client = |keep_alive: bool| {
        let (stop, config) = (stop.clone(), config.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let (mut ok, mut failures) = (0usize, Vec::new());
            let mut conn: Option<Reader<Tls>> = None;
            for i in 0..20_000 {
                if stop.load(Ordering::Relaxed) || std::time::Instant::now() > deadline {
                    break;
                }
                let mut r = match conn.take() {
                    Some(r) => r,
                    None => match tls_connect(addr, config.clone()) {
                        Ok(t) => Reader::new(t),
                        Err(e) => {
                            failures.push(format!("request {i}: handshake: {e}"));
                            continue;
                        }
                    },
                };
                send_on(&mut r.stream, &chat_request(false));
                match r.response() {
                    Some(resp) if resp.status == 200 && resp.complete => ok += 1,
                    Some(resp) => {
                        failures.push(format!("request {i}: {} {}", resp.status, resp.text()))
                    }
                    None => failures.push(format!("request {i}: closed without an answer")),
                }
                if keep_alive {
                    conn = Some(r);
                }
            }
            (ok, failures)
        })
    };
    let clients = [client(true), client(false), client(true)];

    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(150));
        let pair = if round % 2 == 0 { &b } else { &a };
        for f in ["cert.pem", "key.pem"] {
            // Through a rename, as certificate tools do: never a half-written file.
            let tmp = live.join(format!("{f}.new"));
            std::fs::copy(pair.join(f), &tmp).unwrap();
            std::fs::rename(&tmp, live.join(f)).unwrap();
        }
        let models = if round % 2 == 0 { two } else { one };
        std::fs::write(
            &gw.config_path,
            config_text_with(
                driver,
                &tls,
                &domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]),
            ),
        )
        .unwrap();
        gw.signal("HUP");
    }
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .matches("reloaded the TLS certificate")
            .count()
            == 10),
        "{}",
        gw.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let answered = expect_no_failures(clients.into_iter().collect(), "across 10 reloads");
    assert!(answered > 30, "only {answered} requests ran");
    assert_eq!(gw.log().matches("reloaded the domain map").count(), 10);
    // The last reload (round 9) left one model; the new certificate is "a".
    let mut fresh = tls_connect(gw.addr, client_config(&a.join("cert.pem"), false)).unwrap();
    send_on(
        &mut fresh,
        &request_bytes("GET", &format!("/proxy/{DOMAIN}/v1/models"), &[], b""),
    );
    let listed = Reader::new(fresh).response().unwrap().json();
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(20)), Some(0));
}

mod reload {
    use super::*;
    #[test]
    fn uring() {
        reloads_under_load("uring")
    }
    #[test]
    fn legacy() {
        reloads_under_load("legacy")
    }
}

/// 7. Hostile handshakes: a TLS record header promising more than any record may hold,
///    random bytes after a handshake byte, and a client that connects and says nothing
///    are all closed (the silent one after `header_read_ms`), counted as failed
///    handshakes, and the gateway goes on serving.
fn hostile_handshakes_are_closed(driver: &str) {
    use std::io::Read;
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let sim = sim("vllm", &[]);
    let gw = tls_gateway(driver, &dir, &[sim.addr]);
    let attempts: [&[u8]; 3] = [
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00],
        &[
            0x16, 0x03, 0x03, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
            11,
        ],
        &[],
    ];
    for bytes in attempts {
        let mut s = connect(gw.addr);
        s.write_all(bytes).unwrap();
        let mut buf = [0u8; 512];
        // An alert may come first; then the connection must end (EOF or reset).
        let mut ended = false;
        for _ in 0..4 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    ended = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        assert!(ended, "{bytes:?}: the connection stayed open");
    }
    let failures = metric(
        management_addr(&gw),
        "cubegate_tls_handshake_failures_total",
    );
    assert_eq!(failures, 3);
    let mut ok = tls_connect(gw.addr, client_config(&cert, false)).unwrap();
    send_on(&mut ok, &request_bytes("GET", "/health", &[], b""));
    assert_eq!(Reader::new(ok).response().unwrap().status, 200);
}

mod hostile {
    use super::*;
    #[test]
    fn uring() {
        hostile_handshakes_are_closed("uring")
    }
    #[test]
    fn legacy() {
        hostile_handshakes_are_closed("legacy")
    }
}

/// 8. A TLS client that stops reading a long stream: after `between_chunks` the answer is
///    abandoned and the connection closed. Saying goodbye (close_notify) into its full
///    socket is bounded, so the connection does not linger holding a slot.
fn stalled_tls_reader_is_let_go(driver: &str) {
    let dir = unique_dir("tls");
    let (cert, _) = gen_cert(&dir);
    let sim = sim("vllm", &["--tokens", "400000", "--token-delay-us", "0"]);
    let gw = tls_gateway(driver, &dir, &[sim.addr]);
    let mgmt = management_addr(&gw);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&gw.addr.into()).unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let session = ClientConnection::new(client_config(&cert, false), name).unwrap();
    let mut tls = StreamOwned::new(session, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    send_on(&mut tls, &chat_request(true));
    // Read nothing more. between_chunks_s = 2 in this config.
    let open = || metric(mgmt, "cubegate_connections");
    assert!(
        eventually(Duration::from_secs(10), || open() == 0),
        "the stalled TLS connection is still open: {}",
        open()
    );
    drop(tls);
}

mod stalled {
    use super::*;
    #[test]
    fn uring() {
        stalled_tls_reader_is_let_go("uring")
    }
    #[test]
    fn legacy() {
        stalled_tls_reader_is_let_go("legacy")
    }
}
