//! `cubegate-bench backend` as a GPU host, through its command line: the GPU flags, a fault
//! chosen at start and switched on the control listener, vLLM's `/metrics` after a shared
//! prefix, Ollama's `/api/version` and `/api/ps`, and the help naming every flag.
//! (The model itself is tested in depth next to the code, in `bench/sim/`.)

mod common;
use common::*;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

/// The value of `name{…labels…} value` on a vLLM `/metrics` page.
fn vllm_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[test]
fn gpu_flags_fault_at_start_and_control() {
    let vllm = sim(
        "vllm",
        &[
            "--slots",
            "2",
            "--prefix-cache-tokens",
            "4096",
            "--prefill-us-per-token",
            "100",
            "--fault",
            "error",
            "--control",
            "127.0.0.1:0",
        ],
    );
    let control = control_addr(&vllm);
    let health = get(vllm.addr, "/health");
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["error"]["code"], 503);
    assert_eq!(put(control, "/fault/none").status, 200);
    assert_eq!(get(vllm.addr, "/health").status, 200);
    // The same long system prompt twice: the second finds it cached.
    let system = (0..100)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    for question in ["one", "two"] {
        let body = format!(
            r#"{{"model":"{VLLM_MODEL}","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{question}"}}]}}"#
        );
        let r = post(vllm.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["usage"]["prompt_tokens"], 4 + 100 + 4 + 1);
    }
    let text = get(vllm.addr, "/metrics").text();
    assert_eq!(vllm_metric(&text, "vllm:prefix_cache_queries_total"), 218.0);
    // 104 system tokens + 3 of the user header = 107 shared: 6 whole blocks.
    assert_eq!(vllm_metric(&text, "vllm:prefix_cache_hits_total"), 96.0);
    assert_eq!(vllm_metric(&text, "vllm:num_requests_running"), 0.0);
    assert_eq!(vllm_metric(&text, "vllm:num_requests_waiting"), 0.0);
    // Refused, then listening again on the same port.
    assert_eq!(put(control, "/fault/refuse").status, 200);
    let refused = TcpStream::connect_timeout(&vllm.addr, Duration::from_secs(5));
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(put(control, "/fault/none").status, 200);
    assert_eq!(get(vllm.addr, "/health").status, 200);
    let stats = get(control, "/stats").json();
    assert_eq!(stats["fault"], "none");
    assert_eq!(stats["by_status"]["503"], 1);
    assert_eq!(stats["prefix_cache_hits"], 96);
}

#[test]
fn ollama_version_and_ps() {
    let ollama = sim("ollama", &["--slots", "1"]);
    let version = get(ollama.addr, "/api/version");
    assert_eq!(version.status, 200);
    assert!(version.json()["version"].is_string());
    let r = post(
        ollama.addr,
        "/api/chat",
        &chat_body(OLLAMA_MODEL, false, ""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let ps = get(ollama.addr, "/api/ps").json();
    assert_eq!(ps["models"][0]["name"], OLLAMA_MODEL);
    assert!(ps["models"][0]["expires_at"].is_string());
}

#[test]
fn backend_help_names_the_gpu_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_cubegate-bench"))
        .args(["backend", "--help"])
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--slots",
        "--prefix-cache-tokens",
        "--prefill-us-per-token",
        "--fault",
        "die-mid-stream",
        "--slow-factor",
        "--control",
        "/fault/",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
}
