//! HTTPS on the management listener (`[management] tls_cert` / `tls_key`), end to end
//! against the real binary with certificates from `cubegate gen-cert`.
//!
//! Covered: a login (`POST /users/tokens/issue`) and `/metrics` over HTTPS with a client
//! that trusts the generated certificate (TLS 1.3 and 1.2, ALPN http/1.1); the public
//! port's forwarding to the management API (its hop is HTTPS too); plain HTTP on the
//! management port gets the public port's 400 `plain_http_on_https_port`; a client that
//! stalls the handshake (silent, or half a ClientHello) is let go within
//! `timeouts.header_read`; SIGHUP swaps the certificate (new connections see the new one,
//! the public port's hop follows it, a broken key keeps the running one); check-config
//! refuses a missing key file naming `management.tls_key`, and a lone `tls_cert`.

mod common;

use common::*;
use rustls::ClientConfig;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A gateway whose management listener speaks HTTPS with `cert`/`key`; handshakes and
/// heads must arrive within 1 s.
fn mgmt_tls_gateway(driver: &str, cert: &Path, key: &Path) -> Gateway {
    let body = format!(
        "[management]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nadmin_email = \"{TEST_ADMIN_EMAIL}\"\n{}\n\n[timeouts]\nheader_read_ms = 1000\n",
        unique_dir("store").display(),
        tls_lines(cert, key),
    );
    gateway(driver, &body)
}

/// One request over a fresh HTTPS connection; its answer.
fn https_call(addr: SocketAddr, config: Arc<ClientConfig>, request: &[u8]) -> Response {
    let mut tls = tls_connect(addr, config).expect("handshake");
    tls.write_all(request).unwrap();
    tls.flush().unwrap();
    Reader::new(tls).response().expect("an answer over HTTPS")
}

fn login_request() -> Vec<u8> {
    let body = serde_json::json!({"username": TEST_ADMIN_EMAIL, "password": TEST_ADMIN_PASSWORD});
    request_bytes(
        "POST",
        "/users/tokens/issue",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// Waits (bounded) until the server closes `s`; how long that took.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    s.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    assert!(peer_closed(s), "the connection was not closed");
    started.elapsed()
}

/// 1. Login and /metrics over HTTPS (TLS 1.3 and 1.2, ALPN), the public port's forwarding,
///    plain HTTP refused, stalled handshakes let go.
fn management_over_https(driver: &str) {
    let dir = unique_dir("mgmt-tls");
    let (cert, key) = gen_cert(&dir);
    let gw = mgmt_tls_gateway(driver, &cert, &key);
    let mgmt = management_addr(&gw);
    let trusting = client_config(&cert, false);

    let tls = tls_connect(mgmt, trusting.clone()).expect("handshake");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(tls);
    let issued = https_call(mgmt, trusting.clone(), &login_request());
    assert_eq!(issued.status, 201, "{}", issued.text());
    let token = issued.json()["access_token"].as_str().unwrap().to_string();
    let auth = format!("Bearer {token}");
    let profile = https_call(
        mgmt,
        client_config(&cert, true),
        &request_bytes("GET", "/users/profile", &[("Authorization", &auth)], b""),
    );
    assert_eq!(profile.status, 200, "TLS 1.2: {}", profile.text());
    assert_eq!(profile.json()["email"], TEST_ADMIN_EMAIL);

    let metrics = https_call(
        mgmt,
        trusting.clone(),
        &request_bytes("GET", "/metrics", &[], b""),
    );
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("cubegate_"), "{}", metrics.text());

    // The public port forwards the management API (its hop to the listener is HTTPS).
    let via_public = login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
    assert_eq!(via_public.status, 201, "{}", via_public.text());
    let keys = get(gw.addr, "/keys/.well-known/jwks.json");
    assert_eq!(keys.status, 200, "{}", keys.text());

    // Plain HTTP on the HTTPS management port: the public port's answer, then the end.
    expect_refusal(
        mgmt,
        &request_bytes("GET", "/metrics", &[], b""),
        400,
        "plain_http_on_https_port",
        true,
    );

    // A client that never starts the handshake, and one that sends half a ClientHello,
    // are let go after timeouts.header_read (1 s), not held.
    let mut silent = connect(mgmt);
    let mut half = connect(mgmt);
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let waited = closed_within(&mut silent, Duration::from_secs(8));
    assert!(
        waited < Duration::from_secs(5),
        "silent client held {waited:?}"
    );
    let waited = closed_within(&mut half, Duration::from_secs(8));
    assert!(
        waited < Duration::from_secs(5),
        "half handshake held {waited:?}"
    );
    // And the listener still serves.
    let again = https_call(mgmt, trusting, &request_bytes("GET", "/metrics", &[], b""));
    assert_eq!(again.status, 200);
}

/// The management listener answers a client that trusts `cert`, and the public port's
/// hop to it works.
fn expect_served_with(gw: &Gateway, cert: &Path, when: &str) {
    let metrics = request_bytes("GET", "/metrics", &[], b"");
    let answer = https_call(management_addr(gw), client_config(cert, false), &metrics);
    assert_eq!(answer.status, 200, "{when}");
    let via_public = login(gw.addr, TEST_ADMIN_EMAIL, TEST_ADMIN_PASSWORD);
    assert_eq!(via_public.status, 201, "{when}: {}", via_public.text());
}

/// 2. SIGHUP reloads the management certificate: new connections see the new one, the
///    public port's hop follows it, and a broken key file keeps the running one.
fn sighup_swaps_the_management_certificate(driver: &str) {
    let dir = unique_dir("mgmt-tls-reload");
    let (a, b, live) = (dir.join("a"), dir.join("b"), dir.join("live"));
    let (cert_a, _) = gen_cert(&a);
    let (cert_b, _) = gen_cert(&b);
    std::fs::create_dir_all(&live).unwrap();
    let (cert, key) = (live.join("cert.pem"), live.join("key.pem"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(a.join("key.pem"), &key).unwrap();
    let gw = mgmt_tls_gateway(driver, &cert, &key);
    let mgmt = management_addr(&gw);
    let metrics = request_bytes("GET", "/metrics", &[], b"");
    assert_eq!(
        https_call(mgmt, client_config(&cert_a, false), &metrics).status,
        200
    );

    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(b.join("key.pem"), &key).unwrap();
    gw.signal("HUP");
    expect_log(
        &gw,
        "reloaded the TLS certificate of the management listener",
        Duration::from_secs(10),
    );
    assert!(
        tls_connect(mgmt, client_config(&cert_a, false)).is_err(),
        "a new connection still got the old certificate"
    );
    expect_served_with(&gw, &cert_b, "after the swap");

    // A key that is not PEM: the reload is refused and says so; B keeps being served.
    std::fs::write(&key, "not a key").unwrap();
    gw.signal("HUP");
    expect_log(
        &gw,
        "reload kept the running TLS certificate of the management listener",
        Duration::from_secs(10),
    );
    assert!(gw.log().contains("management.tls_key"), "{}", gw.log());
    expect_served_with(&gw, &cert_b, "after a refused reload");
}

for_each_driver!(
    management_over_https,
    sighup_swaps_the_management_certificate
);

/// Writes a configuration whose `[management]` section has `tls_lines` and runs
/// check-config on it: (exit code, stderr).
fn check_management_tls(dir: &Path, name: &str, tls_lines: &str) -> (Option<i32>, String) {
    let section = format!(
        "[management]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{tls_lines}\n",
        dir.join("store").display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config_text("legacy", &section)).unwrap();
    check_config(&path)
}

/// 3. check-config reads the management certificate files: a missing key file is refused
///    with exit 2 naming `management.tls_key`, a file that is not PEM names
///    `management.tls_cert`, and one key without the other is refused.
#[test]
fn check_config_refuses_bad_management_tls_files() {
    let dir = unique_dir("mgmt-tls-check");
    let (cert, key) = gen_cert(&dir);
    let (code, stderr) = check_management_tls(&dir, "ok", &tls_lines(&cert, &key));
    assert_eq!(code, Some(0), "{stderr}");

    let missing = dir.join("nowhere").join("key.pem");
    let (code, stderr) = check_management_tls(&dir, "missing", &tls_lines(&cert, &missing));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("management.tls_key"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");

    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let (code, stderr) = check_management_tls(&dir, "garbage", &tls_lines(&garbage, &key));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("management.tls_cert"), "{stderr}");

    let half = format!("tls_cert = \"{}\"", cert.display());
    let (code, stderr) = check_management_tls(&dir, "half", &half);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("management.tls_cert") && stderr.contains("set together"),
        "{stderr}"
    );
}
