//! Process behaviour of the `cubegate` binary: `check-config` (exit codes, messages that
//! name the offending key), SIGTERM (drains the in-flight stream, refuses new connections,
//! exits 0), SIGHUP (reloads the domain map without disturbing a stream in flight; a
//! broken file keeps the running map) and the default `auth.mode = "jwt"` (fails closed
//! with 401 `invalid_token` and a `WWW-Authenticate: Bearer` challenge; `/health` stays
//! open).

mod common;
use common::*;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const DOMAIN: &str = "lifecycle-domain";
const MODEL_A: &str = "model-a";
const MODEL_B: &str = "model-b";

fn chat_path() -> String {
    format!("/proxy/{DOMAIN}/v1/chat/completions")
}

/// Starts a streaming chat for `model` and reads the head and the first chunk.
fn start_stream(addr: SocketAddr, model: &str) -> Reader {
    let mut r = send_chat(addr, &chat_path(), model, true);
    let (status, headers) = r.head().expect("a response head");
    assert_eq!(status, 200, "{headers:?}");
    let first = r
        .chunk()
        .expect("a first chunk")
        .expect("not the last chunk");
    assert!(!first.is_empty());
    r
}

/// Reads the rest of a chunked stream: (payload, terminating chunk seen). Bounded.
fn finish_stream(r: &mut Reader) -> (String, bool) {
    let mut body = Vec::new();
    for _ in 0..100_000 {
        match r.chunk() {
            Some(Some(c)) => body.extend_from_slice(&c),
            Some(None) => return (String::from_utf8_lossy(&body).into_owned(), true),
            None => break,
        }
    }
    (String::from_utf8_lossy(&body).into_owned(), false)
}

/// The model ids `GET /proxy/<domain>/v1/models` lists.
fn listed_models(addr: SocketAddr) -> Vec<String> {
    let r = get(addr, &format!("/proxy/{DOMAIN}/v1/models"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["data"]
        .as_array()
        .expect("an OpenAI list")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or("").to_string())
        .collect()
}

/// 1. `check-config` accepts the shipped example and refuses broken files with a message
///    naming the key.
fn check_config_exit_codes(driver: &str) {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cubegate.toml");
    let (code, err) = check_config(&example);
    assert_eq!(code, Some(0), "config/cubegate.toml refused: {err}");
    let dir = temp_dir("check-config");
    let models: &[&str] = &[VLLM_MODEL];
    let addr: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        config_text(
            driver,
            &domains_config(&[(DOMAIN, &[("vllm", addr, models)])]),
        ),
    )
    .unwrap();
    let (code, err) = check_config(&good);
    assert_eq!(code, Some(0), "a valid {driver} config refused: {err}");

    let backend = |url: &str| {
        format!("[[domains.backends]]\nkind = \"vllm\"\nurl = \"{url}\"\nmodels = [\"m\"]\n")
    };
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "unknown key",
            "[proxy]\nlisten_adress = \"127.0.0.1:8080\"\n".into(),
            &["listen_adress"],
        ),
        (
            "wrong type",
            "[proxy]\nworkers = \"x\"\n".into(),
            &["workers"],
        ),
        (
            "out of range",
            "[limits]\nmax_headers = 100000\n".into(),
            &["limits.max_headers"],
        ),
        (
            "non-http backend",
            format!("[[domains]]\nid = \"a\"\n{}", backend("ftp://x")),
            &["domains[0].backends[0].url", "ftp://x"],
        ),
        (
            "duplicate domain ids",
            format!(
                "[[domains]]\nid = \"a\"\n{}[[domains]]\nid = \"a\"\n{}",
                backend("http://127.0.0.1:1"),
                backend("http://127.0.0.1:2")
            ),
            &["domains[1].id", "duplicate"],
        ),
    ];
    for (i, (what, text, needles)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, err) = check_config(&path);
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: exit code {code:?} for\n{text}"
        );
        for n in needles.iter() {
            assert!(err.contains(n), "{what}: stderr does not name {n:?}: {err}");
        }
    }
}

/// 2. SIGTERM: the stream in flight completes (`data: [DONE]` and the terminating chunk),
///    new connections are refused (or closed unanswered) while it is still running, and
///    the process exits 0.
fn sigterm_drains_in_flight_stream(driver: &str) {
    // 30 tokens × 100 ms: the stream outlives the signal by ~3 s, inside drain_s = 5.
    let sim = sim("vllm", &["--tokens", "30", "--token-delay-us", "100000"]);
    let models: &[&str] = &[VLLM_MODEL];
    let mut gw = gateway(
        driver,
        &domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]),
    );
    let addr = gw.addr;
    let mut r = start_stream(addr, VLLM_MODEL);
    gw.signal("TERM");

    // New connections: refused, or accepted and closed without an answer.
    let refused = || match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(_) => true,
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
            send(&mut s, &request_bytes("GET", "/health", &[], b""));
            Reader::new(s).response().is_none()
        }
    };
    assert!(
        eventually(Duration::from_secs(5), refused),
        "new connections are still served after SIGTERM"
    );
    // …while the stream was still in flight.
    assert_eq!(
        sim_stats(&sim)["active_streams"],
        1,
        "the stream ended before new connections were refused"
    );

    let (rest, terminated) = finish_stream(&mut r);
    assert!(
        terminated,
        "no terminating chunk after SIGTERM: {rest}\nsim: {}\nexit: {:?}\nlog:\n{}",
        sim_stats(&sim),
        gw.child.try_wait(),
        gw.log()
    );
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(
        peer_closed(&mut r.stream),
        "connection left open after drain"
    );
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "log:\n{}",
        gw.log()
    );
    assert_eq!(sim_stats(&sim)["streams_completed"], 1);
}

/// 2b. A connection the process accepted before SIGTERM, whose first request arrives
///     while it drains, is answered (its client did nothing wrong), then closed.
fn sigterm_answers_connection_accepted_before_it(driver: &str) {
    let sim = sim("vllm", &[]);
    let models: &[&str] = &[VLLM_MODEL];
    let mut gw = gateway(
        driver,
        &domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]),
    );
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Accepted well before the signal; the drain flag is looked at every 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    gw.signal("TERM");
    std::thread::sleep(Duration::from_millis(400));
    send(&mut s, &request_bytes("GET", "/health", &[], b""));
    let mut r = Reader::new(s);
    let answer = r.response();
    assert_eq!(
        answer.as_ref().map(|a| a.status),
        Some(200),
        "log:\n{}",
        gw.log()
    );
    assert!(
        peer_closed(&mut r.stream),
        "connection left open after drain"
    );
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        gw.log()
    );
}

/// 3. SIGHUP: a new model appears without a restart and serves, the stream in flight on
///    the old map completes; a broken file (bad TOML, or valid TOML failing validation)
///    is refused and the running map keeps serving.
fn sighup_reloads_domain_map(driver: &str) {
    let sim = sim(
        "vllm",
        &[
            "--models",
            &format!("{MODEL_A},{MODEL_B}"),
            "--tokens",
            "40",
            "--token-delay-us",
            "100000",
        ],
    );
    let only_a: &[&str] = &[MODEL_A];
    let both: &[&str] = &[MODEL_A, MODEL_B];
    let mut gw = gateway(
        driver,
        &domains_config(&[(DOMAIN, &[("vllm", sim.addr, only_a)])]),
    );
    let addr = gw.addr;
    assert_eq!(listed_models(addr), [MODEL_A]);
    let refused = post(
        addr,
        &chat_path(),
        &chat_body(MODEL_B, false, r#","max_tokens":1"#),
    );
    assert_eq!(refused.status, 404, "{}", refused.text());
    assert_eq!(refused.error_code(), "model_not_found");

    let mut stream_a = start_stream(addr, MODEL_A);
    std::fs::write(
        &gw.config_path,
        config_text(
            driver,
            &domains_config(&[(DOMAIN, &[("vllm", sim.addr, both)])]),
        ),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || listed_models(addr)
            .iter()
            .any(|m| m == MODEL_B)),
        "model B never appeared; log:\n{}",
        gw.log()
    );
    // The reload happened while the stream on A was in flight.
    assert_eq!(sim_stats(&sim)["active_streams"], 1);
    let b = post(
        addr,
        &chat_path(),
        &chat_body(MODEL_B, false, r#","max_tokens":1"#),
    );
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.json()["model"], MODEL_B);

    let (rest, terminated) = finish_stream(&mut stream_a);
    assert!(
        terminated,
        "the stream on A was cut by the reload: {rest}\nsim: {}\nexit: {:?}\nlog:\n{}",
        sim_stats(&sim),
        gw.proc.child.try_wait(),
        gw.log()
    );
    assert!(rest.contains("data: [DONE]"), "{rest}");

    // Broken files: refused, the running map stays.
    let broken = [
        "[proxy\nthis is not toml".to_string(),
        config_text(
            driver,
            &format!(
                "[[domains]]\nid = \"{DOMAIN}\"\n[[domains.backends]]\nkind = \"vllm\"\nurl = \"ftp://x\"\nmodels = [\"{MODEL_A}\"]\n"
            ),
        ),
    ];
    for (i, text) in broken.iter().enumerate() {
        std::fs::write(&gw.config_path, text).unwrap();
        gw.signal("HUP");
        assert!(
            eventually(Duration::from_secs(5), || gw
                .log()
                .matches("reload refused")
                .count()
                == i + 1),
            "broken config {i} not reported; log:\n{}",
            gw.log()
        );
        assert_eq!(get(addr, "/health").status, 200);
        assert_eq!(listed_models(addr), [MODEL_A, MODEL_B], "broken config {i}");
        let b = post(
            addr,
            &chat_path(),
            &chat_body(MODEL_B, false, r#","max_tokens":1"#),
        );
        assert_eq!(b.status, 200, "broken config {i}: {}", b.text());
    }
}

/// 3b. A signal that arrives as soon as the gateway has announced `cubegate listening on`
///     is handled like any other: SIGHUP reloads, it does not kill the process.
///
///     Known gateway bug (this test demonstrates it, often but not on every run since it is
///     a race): `runtime::serve` logs "listening" and serves traffic before
///     `handle_signals` installs the handlers, so a SIGHUP (or SIGTERM) in that window gets
///     the default action and terminates the process (no reload, no drain, not exit 0).
///     Busy threads in the test make the window likelier to be hit on small machines.
fn signal_right_after_startup_is_handled(driver: &str) {
    use std::os::unix::process::ExitStatusExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    for i in 0..STARTUP_ROUNDS {
        // Two busy threads only while the gateway starts and the signal goes out.
        let stop = AtomicBool::new(false);
        let mut gw = std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                    }
                });
            }
            let gw = gateway(driver, "[auth]\nmode = \"none\"\n");
            gw.signal("HUP");
            stop.store(true, Ordering::Relaxed);
            gw
        });
        let reloaded = eventually(Duration::from_secs(5), || {
            gw.log().contains("reloaded the domain map")
        });
        if !reloaded {
            let status = gw.proc.child.try_wait().ok().flatten();
            panic!(
                "round {i}: SIGHUP sent right after \"cubegate listening on\" was not handled: \
                 the process {} (signal handlers not installed yet)\nlog:\n{}",
                match status {
                    Some(s) if s.signal().is_some() => {
                        format!("was killed by signal {}", s.signal().unwrap_or(0))
                    }
                    Some(s) => format!("exited with {s}"),
                    None => "is still running but did not reload".into(),
                },
                gw.log()
            );
        }
        assert_eq!(get(gw.addr, "/health").status, 200, "round {i}");
    }
}

const STARTUP_ROUNDS: usize = 30;

/// 4. The default auth mode (`jwt`, no `[auth]` section): a proxied request without a token
///    is 401 `invalid_token` with a `WWW-Authenticate: Bearer …` challenge and never reaches
///    the backend; `/health` needs no token.
fn jwt_mode_requires_a_token(driver: &str) {
    let sim = sim("vllm", &[]);
    let models: &[&str] = &[VLLM_MODEL];
    let config = domains_config(&[(DOMAIN, &[("vllm", sim.addr, models)])]);
    let config = config.replace("[auth]\nmode = \"none\"\n", "");
    assert!(!config.contains("[auth]"), "{config}");
    let gw = gateway(driver, &config);

    let requests = [
        request_bytes(
            "POST",
            &chat_path(),
            &[("Content-Type", "application/json")],
            chat_body(VLLM_MODEL, false, "").as_bytes(),
        ),
        request_bytes("GET", &format!("/proxy/{DOMAIN}/v1/models"), &[], b""),
        request_bytes(
            "POST",
            &chat_path(),
            &[
                ("Content-Type", "application/json"),
                ("Authorization", "Bearer not.a.token"),
            ],
            chat_body(VLLM_MODEL, false, "").as_bytes(),
        ),
        request_bytes(
            "POST",
            &chat_path(),
            &[
                ("Content-Type", "application/json"),
                ("Authorization", "Basic dXNlcjpwYXNz"),
            ],
            chat_body(VLLM_MODEL, false, "").as_bytes(),
        ),
    ];
    for (i, req) in requests.iter().enumerate() {
        let r = raw(gw.addr, req).expect("a response");
        assert_eq!(r.status, 401, "request {i}: {}", r.text());
        let challenge = r.header("www-authenticate").unwrap_or("");
        assert!(
            challenge.starts_with("Bearer"),
            "request {i}: WWW-Authenticate = {challenge:?}"
        );
        assert_eq!(r.error_code(), "invalid_token", "request {i}");
        assert_eq!(r.json()["error"]["type"], "authentication_error");
    }
    let health = get(gw.addr, "/health");
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(
        sim_stats(&sim)["requests"],
        0,
        "a refused request reached the backend"
    );
}

for_each_driver!(
    check_config_exit_codes,
    sigterm_drains_in_flight_stream,
    sigterm_answers_connection_accepted_before_it,
    sighup_reloads_domain_map,
    signal_right_after_startup_is_handled,
    jwt_mode_requires_a_token,
);

/// systemd's notify protocol: READY=1 once listening, WATCHDOG=1 while the workers run,
/// RELOADING=1 / READY=1 around a SIGHUP, STOPPING=1 on SIGTERM.
fn systemd_notify(driver: &str) {
    let (server, socket) = notify_listener("notify");
    let mut gw = gateway_env(
        driver,
        "[auth]\nmode = \"none\"\n",
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen = Vec::new();
    let next = |seen: &mut Vec<String>| {
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).expect("a notification");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    for _ in 0..4 {
        next(&mut seen);
    }
    assert_eq!(seen[0], "READY=1", "{seen:?}");
    assert!(seen[1..].iter().all(|m| m == "WATCHDOG=1"), "{seen:?}");
    gw.signal("HUP");
    for _ in 0..8 {
        next(&mut seen);
        if seen.last().is_some_and(|m| m == "READY=1") {
            break;
        }
    }
    let reloading = seen
        .iter()
        .position(|m| m == "RELOADING=1")
        .expect("RELOADING=1");
    assert!(seen[reloading..].iter().any(|m| m == "READY=1"), "{seen:?}");
    gw.signal("TERM");
    for _ in 0..8 {
        next(&mut seen);
        if seen.last().is_some_and(|m| m == "STOPPING=1") {
            break;
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("STOPPING=1"),
        "{seen:?}"
    );
    assert_eq!(gw.wait_exit(Duration::from_secs(10)), Some(0));
}

mod notify {
    use super::*;
    #[test]
    fn uring() {
        systemd_notify("uring")
    }
    #[test]
    fn legacy() {
        systemd_notify("legacy")
    }
}
