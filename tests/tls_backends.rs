//! `https://` backends: cubegate as a TLS client, checked against a CA bundle.
//!
//! The HTTPS backend here is a second cubegate with TLS on its listener, in front of the
//! simulator: front (plain) → `https://127.0.0.1:<port>/proxy/<domain>` → HTTPS gateway →
//! simulator. So both ends are real server code, and the backend's certificate comes from
//! `cubegate gen-cert`.

mod common;

use common::*;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DOMAIN: &str = "3f8a1c2e-0000-4000-8000-000000000001";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

fn chat_path() -> String {
    format!("/proxy/{DOMAIN}/v1/chat/completions")
}

/// An HTTPS gateway in front of the simulator, with a certificate made for `names`.
fn https_backend(driver: &str, sim: SocketAddr, names: &[&str]) -> (Gateway, std::path::PathBuf) {
    let dir = unique_dir("tls-backend");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cubegate"));
    cmd.args(["gen-cert", "--out-dir"]).arg(&dir);
    for n in names {
        cmd.args(["--name", n]);
    }
    assert!(cmd.status().unwrap().success());
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let models: &[&str] = &[MODEL];
    let gw = gateway_with(
        driver,
        &tls_lines(&cert, &key),
        &domains_config(&[(DOMAIN, &[("vllm", sim, models)])]),
    );
    (gw, cert)
}

/// A plain gateway whose one backend is `url`, trusting the CAs in `ca`.
fn front(driver: &str, url: &str, ca: &Path) -> Gateway {
    let body = format!(
        "[auth]\nmode = \"none\"\n\n[timeouts]\nfirst_byte_s = 5\nbetween_chunks_s = 5\n\n\
         [[domains]]\nid = \"{DOMAIN}\"\n[[domains.backends]]\nkind = \"vllm\"\nurl = \"{url}\"\n\
         models = [\"{MODEL}\"]\n"
    );
    gateway_with(
        driver,
        &format!("backend_ca_file = \"{}\"", ca.display()),
        &body,
    )
}

/// Streamed and whole answers come back through an https backend, byte for byte what the
/// backend sent, and one client's requests reuse the pooled TLS connection.
fn https_backend_streams_and_is_pooled(driver: &str) {
    let sim = sim("vllm", &["--tokens", "15"]);
    let (backend, cert) = https_backend(driver, sim.addr, &["127.0.0.1"]);
    let url = format!("https://127.0.0.1:{}/proxy/{DOMAIN}", backend.addr.port());
    let gw = front(driver, &url, &cert);

    let mut r = Reader::new(connect(gw.addr));
    const ROUNDS: usize = 5;
    for i in 0..ROUNDS {
        let stream = i % 2 == 0;
        let request = request_bytes(
            "POST",
            &chat_path(),
            &[("Content-Type", "application/json")],
            chat_body(MODEL, stream, "").as_bytes(),
        );
        r.stream.write_all(&request).unwrap();
        let answer = r.response().expect("an answer");
        assert_eq!(answer.status, 200, "round {i}: {}", answer.text());
        assert!(answer.complete, "round {i}");
        let text = answer.text();
        if stream {
            assert!(
                text.trim_end().ends_with("data: [DONE]"),
                "round {i}: {text}"
            );
            assert!(text.matches("data: ").count() >= 15, "round {i}: {text}");
        } else {
            assert!(
                answer.json()["choices"][0]["message"]["content"].is_string(),
                "{text}"
            );
        }
    }
    let handshakes = metric(management_addr(&backend), "cubegate_tls_handshakes_total");
    assert!(
        (1..ROUNDS as u64).contains(&handshakes),
        "{ROUNDS} requests on one client connection took {handshakes} TLS handshakes to the backend"
    );
    assert_eq!(
        metric(management_addr(&gw), "cubegate_upstream_connects_total"),
        handshakes
    );
}

/// A backend whose certificate the CA bundle does not vouch for, or that is not made out
/// to the URL's host, is a 502: no request bytes reach it, and the log names the reason.
fn untrusted_https_backend_is_refused(driver: &str) {
    let sim = sim("vllm", &[]);
    let (backend, _) = https_backend(driver, sim.addr, &["127.0.0.1"]);
    let url = format!("https://127.0.0.1:{}/proxy/{DOMAIN}", backend.addr.port());
    // Trusts some other certificate.
    let other = unique_dir("tls-other");
    let (other_cert, _) = gen_cert(&other);
    let gw = front(driver, &url, &other_cert);
    let r = post(gw.addr, &chat_path(), &chat_body(MODEL, false, ""));
    assert_eq!(r.status, 502, "{}", r.text());
    expect_log(&gw, "UnknownIssuer", Duration::from_secs(3));

    // Trusts the certificate, but it is made out to another name.
    let (named, named_cert) = https_backend(driver, sim.addr, &["backend.example"]);
    let url = format!("https://127.0.0.1:{}/proxy/{DOMAIN}", named.addr.port());
    let gw = front(driver, &url, &named_cert);
    let r = post(gw.addr, &chat_path(), &chat_body(MODEL, false, ""));
    assert_eq!(r.status, 502, "{}", r.text());
    expect_log(
        &gw,
        "certificate not valid for name",
        Duration::from_secs(3),
    );
    assert_eq!(sim_stats(&sim)["requests"], 0);
}

for_each_driver!(
    https_backend_streams_and_is_pooled,
    untrusted_https_backend_is_refused,
);

/// A CA file that cannot be read is refused at startup, naming the key.
#[test]
fn missing_backend_ca_file_is_refused() {
    let dir = unique_dir("tls-ca");
    let path = dir.join("c.toml");
    let missing = dir.join("nope.pem");
    std::fs::write(
        &path,
        config_text_with(
            "legacy",
            &format!("backend_ca_file = \"{}\"", missing.display()),
            "",
        ),
    )
    .unwrap();
    let (code, stderr) = check_config(&path);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("proxy.backend_ca_file") && stderr.contains("nope.pem"),
        "{stderr}"
    );
}
