//! Custom authentication (`[auth] check_url`) end to end: the real gateway (both drivers)
//! in front of a scripted backend, and a check service in this test (a std listener that
//! answers each token as scripted and counts the calls).
//!
//! A token the service grants reaches the backend as its identity (X-User-Id, claim
//! headers) and shows in the access record; the verdict is cached (one call per token per
//! worker, so these gateways run one worker); 401/403 refuse; a domain the answer does not
//! list is 403; a service that is down, slow, failing or talking nonsense is 503 with
//! `auth_check_unavailable` (never 401); JWTs of trusted issuers and API keys are never
//! sent to the service.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const D: &str = "dom-c";
const MODEL: &str = "m";
const HS_ENV: &str = "CUBEGATE_TEST_CHECK_HS";
const HS_SECRET: &str = "check-test-only-hmac-secret-0123456789-abc";
const ISS: &str = "https://hs.test/";

/// What the check service was asked: each call's JSON body, in order.
type Calls = Arc<Mutex<Vec<Value>>>;

/// The scripted check service: answers by token; `tok-slow` never answers.
fn check_service() -> (SocketAddr, Calls) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let Some(req) = read_request(&mut s) else {
                    return;
                };
                let text = String::from_utf8_lossy(&req).into_owned();
                let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                let asked: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                seen.lock().unwrap().push(asked.clone());
                let (status, answer) = match asked["token"].as_str().unwrap_or("") {
                    "tok-alice" => (
                        200,
                        json!({"sub": "alice", "domains": [D], "role": "user",
                        "claims": {"email": "alice@example.com"}, "max_age_s": 60})
                        .to_string(),
                    ),
                    "tok-admin" => (
                        200,
                        json!({"sub": "root", "domains": [], "role": "admin"}).to_string(),
                    ),
                    "tok-elsewhere" => (
                        200,
                        json!({"sub": "olga", "domains": ["other"]}).to_string(),
                    ),
                    "tok-refused" => (401, "{}".to_string()),
                    "tok-forbidden" => (403, "{}".to_string()),
                    "tok-garbage" => (200, "<html>surprise</html>".to_string()),
                    "tok-evil-sub" => (
                        200,
                        json!({"sub": "a\r\nX-Evil: 1", "domains": [D]}).to_string(),
                    ),
                    "tok-500" => (500, "{}".to_string()),
                    "tok-slow" => {
                        std::thread::sleep(Duration::from_secs(8));
                        return;
                    }
                    _ => (401, "{}".to_string()),
                };
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                        answer.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    (addr, calls)
}

fn calls_for(calls: &Calls, token: &str) -> usize {
    let calls = calls.lock().unwrap();
    calls.iter().filter(|c| c["token"] == token).count()
}

/// One worker (the verdict cache is per worker), JSON logs (the access record), a trusted
/// HS256 issuer, `email` mapped to `X-User-Email`, the check service at `check`.
fn gateway_for(driver: &str, backend: SocketAddr, check: SocketAddr) -> Gateway {
    gateway_in_mode(driver, "jwt", backend, check)
}

fn gateway_in_mode(driver: &str, mode: &str, backend: SocketAddr, check: SocketAddr) -> Gateway {
    let url = format!("http://{check}/check");
    gateway_checking(driver, mode, backend, &url, "")
}

fn gateway_checking(
    driver: &str,
    mode: &str,
    backend: SocketAddr,
    check_url: &str,
    proxy_extra: &str,
) -> Gateway {
    let domains = domains_config(&[(D, &[("vllm", backend, &[MODEL])])]);
    let rest = domains
        .strip_prefix("[auth]\nmode = \"none\"\n")
        .expect("domains_config starts with [auth]");
    let body = format!(
        "[auth]\nmode = \"{mode}\"\nclaim_headers = {{ email = \"X-User-Email\" }}\n\
         check_url = \"{check_url}\"\ncheck_timeout_ms = 500\n\n\
         [[auth.trusted]]\nissuer = \"{ISS}\"\nhs_secret_env = \"{HS_ENV}\"\n\n{rest}"
    );
    gateway_with_env(
        driver,
        &format!("workers = 1\n{proxy_extra}"),
        &body,
        &[(HS_ENV, HS_SECRET), ("CUBEGATE_LOG_FORMAT", "json")],
    )
}

fn chat(gw: &Gateway, bearer: &str, request_id: &str) -> Response {
    let auth = format!("Bearer {bearer}");
    post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions?q=1"),
        &[("Authorization", &auth), ("X-Request-Id", request_id)],
        &format!(r#"{{"model":"{MODEL}"}}"#),
    )
}

/// A granted token reaches the backend as its identity, once asked per worker.
fn granted_tokens_reach_the_backend_and_are_cached(driver: &str) {
    let (check, calls) = check_service();
    let (backend, seen) = scripted_backend(8, None);
    let gw = gateway_for(driver, backend, check);
    for i in 0..3 {
        let r = chat(&gw, "tok-alice", &format!("alice-{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(calls_for(&calls, "tok-alice"), 1, "the verdict is cached");
    let asked = calls.lock().unwrap()[0].clone();
    assert_eq!(
        asked,
        json!({"token": "tok-alice", "method": "POST",
            "path": format!("/proxy/{D}/v1/chat/completions"), "domain": D, "client": "127.0.0.1"})
    );
    let head = String::from_utf8_lossy(&seen.lock().unwrap()[0]).to_lowercase();
    assert!(head.contains("x-user-id: alice\r\n"), "{head}");
    assert!(
        head.contains("x-user-email: alice@example.com\r\n"),
        "{head}"
    );
    assert!(
        !head.contains("tok-alice"),
        "the token reached the backend: {head}"
    );
    let record = access_record(&gw, "alice-0");
    assert_eq!(record["user"], "alice", "{record}");
    assert_eq!(record["status"], 200, "{record}");
    // role "admin" is a platform admin, whatever the domains.
    assert_eq!(chat(&gw, "tok-admin", "root-0").status, 200);
    assert!(!gw.log().contains("tok-alice"), "the token reached the log");
}

/// 401/403 refuse (401, cached briefly); a domain the answer does not list is 403.
fn refusals(driver: &str) {
    let (check, calls) = check_service();
    let (backend, _) = scripted_backend(1, None);
    let gw = gateway_for(driver, backend, check);
    for token in ["tok-refused", "tok-forbidden", "tok-refused"] {
        let r = chat(&gw, token, "refused");
        assert_eq!(r.status, 401, "{token}: {}", r.text());
        assert_eq!(r.error_code(), "invalid_token");
        assert!(r.text().contains("authentication service"), "{}", r.text());
        assert!(r.header("www-authenticate").is_some());
    }
    assert_eq!(calls_for(&calls, "tok-refused"), 1, "refusals are cached");
    let r = chat(&gw, "tok-elsewhere", "elsewhere");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "forbidden");
}

/// A service that fails, talks nonsense or is slow is 503 (never 401), within the
/// timeout, and not cached; the log says why.
fn failures_are_503(driver: &str) {
    let (check, calls) = check_service();
    let (backend, _) = scripted_backend(1, None);
    let gw = gateway_for(driver, backend, check);
    for token in [
        "tok-garbage",
        "tok-evil-sub",
        "tok-500",
        "tok-slow",
        "tok-garbage",
    ] {
        let started = Instant::now();
        let r = chat(&gw, token, "failing");
        assert_eq!(r.status, 503, "{token}: {}", r.text());
        assert_eq!(r.error_code(), "auth_check_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.text().contains("auth.check_url"), "{}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{token}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        calls_for(&calls, "tok-garbage"),
        2,
        "failures are not cached"
    );
    expect_log(
        &gw,
        "authentication service (auth.check_url) unavailable",
        Duration::from_secs(5),
    );
    // The log reaches the test through a pipe and a reader thread: wait for each line.
    expect_log(&gw, "answered 500", Duration::from_secs(5));
    expect_log(&gw, "no answer within 500 ms", Duration::from_secs(5));
    let log = gw.log();
    assert!(!log.contains("X-Evil"), "{log}");
    let mgmt = management_addr(&gw);
    assert_eq!(metric(mgmt, "cubegate_auth_checks_total"), 5);
    assert_eq!(metric(mgmt, "cubegate_auth_check_failures_total"), 5);
}

/// A check service that is not there: 503 at once.
fn service_down_is_503(driver: &str) {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (backend, _) = scripted_backend(1, None);
    let gw = gateway_for(driver, backend, closed);
    let r = chat(&gw, "opaque-token", "down");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "auth_check_unavailable");
    expect_log(&gw, "cannot connect", Duration::from_secs(5));
}

/// Tokens of trusted issuers (good or bad) and API keys are settled here, never asked.
fn own_credentials_never_reach_the_service(driver: &str) {
    let (check, calls) = check_service();
    let (backend, _) = scripted_backend(4, None);
    let gw = gateway_for(driver, backend, check);
    let claims = json!({"iss": ISS, "sub": "jay", "exp": unix_in(600), "domains": [D]});
    let good = hs256_token(HS_SECRET, &claims);
    assert_eq!(chat(&gw, &good, "jwt").status, 200);
    let forged = hs256_token("another-secret-of-sufficient-length-000000", &claims);
    let r = chat(&gw, &forged, "forged");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("signature"), "{}", r.text());
    let r = chat(&gw, "cg_not_a_key_of_this_box", "key");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("API key"), "{}", r.text());
    assert!(
        calls.lock().unwrap().is_empty(),
        "{:?}",
        calls.lock().unwrap()
    );
    // A JWT of an issuer this box does not trust is the service's to judge.
    let untrusted = hs256_token(HS_SECRET, &json!({"iss": "https://else/", "sub": "x"}));
    assert_eq!(chat(&gw, &untrusted, "untrusted").status, 401);
    let asked: HashMap<String, usize> =
        calls
            .lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, c| {
                *m.entry(c["token"].as_str().unwrap_or("").to_string())
                    .or_default() += 1;
                m
            });
    assert_eq!(asked.get(&untrusted), Some(&1), "{asked:?}");
}

/// Development mode: no token is the anonymous caller; any bearer value is a credential
/// the service judges (a refusal is 401, as in production), and a grant is the identity.
fn development_mode_asks_too(driver: &str) {
    let (check, calls) = check_service();
    let (backend, seen) = scripted_backend(4, None);
    let gw = gateway_in_mode(driver, "none", backend, check);
    let r = post(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &format!(r#"{{"model":"{MODEL}"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(calls.lock().unwrap().is_empty());
    assert_eq!(chat(&gw, "tok-refused", "dev-refused").status, 401);
    assert_eq!(
        chat(&gw, "tok-elsewhere", "dev-olga").status,
        200,
        "no domain checks"
    );
    let heads = seen.lock().unwrap();
    let head = String::from_utf8_lossy(&heads[heads.len() - 1]).to_lowercase();
    assert!(head.contains("x-user-id: olga\r\n"), "{head}");
}

/// An https check service, checked against `proxy.backend_ca_file` like https backends:
/// here a TLS gateway (its certificate from `cubegate gen-cert`) in front of the scripted
/// service.
fn https_check_service(driver: &str) {
    let (check, calls) = check_service();
    let dir = unique_dir("check-tls");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_cubegate"))
        .args(["gen-cert", "--name", "127.0.0.1", "--out-dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(made.success());
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let tls_front = gateway_with(
        driver,
        &tls_lines(&cert, &key),
        &domains_config(&[("chk", &[("vllm", check, &["*"])])]),
    );
    let (backend, seen) = scripted_backend(2, None);
    let url = format!(
        "https://127.0.0.1:{}/proxy/chk/v1/check",
        tls_front.addr.port()
    );
    let ca = format!("backend_ca_file = \"{}\"", cert.display());
    let gw = gateway_checking(driver, "jwt", backend, &url, &ca);
    let r = chat(&gw, "tok-alice", "tls-alice");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    assert_eq!(calls_for(&calls, "tok-alice"), 1);
    let head = String::from_utf8_lossy(&seen.lock().unwrap()[0]).to_lowercase();
    assert!(head.contains("x-user-id: alice\r\n"), "{head}");
    // Without the CA, the service's certificate is not trusted: the service failed.
    let untrusting = gateway_checking(driver, "jwt", backend, &url, "");
    let r = chat(&untrusting, "tok-alice", "tls-untrusted");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(calls_for(&calls, "tok-alice"), 1, "no request got through");
}

for_each_driver!(
    https_check_service,
    development_mode_asks_too,
    granted_tokens_reach_the_backend_and_are_cached,
    refusals,
    failures_are_503,
    service_down_is_503,
    own_credentials_never_reach_the_service,
);
