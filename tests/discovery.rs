//! Model discovery: a backend listed with `models = []` serves what its host says it
//! serves (vLLM `/v1/models`, Ollama `/api/tags`), asked by the health checker and kept
//! current; the domain's model lists follow, and a model the host does not report is
//! refused before any host sees the request.

mod common;
use common::*;
use std::time::Duration;

const D: &str = "dom-discover";

fn discovered_models_are_served_and_listed(driver: &str) {
    let vllm = sim("vllm", &["--models", "alpha,beta"]);
    let ollama = sim("ollama", &["--models", "tiny:1b"]);
    // A static backend next to the discovering ones: its list stays as configured.
    let body = domains_config(&[(
        D,
        &[
            ("vllm", vllm.addr, &[]),
            ("ollama", ollama.addr, &[]),
            ("vllm", vllm.addr, &["gamma"]),
        ],
    )])
    // Checks on (the test configs turn them off by default), quick.
    .replace(
        "[auth]",
        "[health]\ninterval_ms = 100\ntimeout_ms = 1000\n\n[auth]",
    );
    let gw = gateway(driver, &body);
    let listed = |path: &str, field: &str| -> Vec<String> {
        let r = get(gw.addr, path);
        assert_eq!(r.status, 200, "{path}");
        let v = r.json();
        let list = v[field].as_array().cloned().unwrap_or_default();
        let key = if field == "data" { "id" } else { "name" };
        let mut names: Vec<String> = list
            .iter()
            .filter_map(|m| m[key].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    };
    let models_path = format!("/proxy/{D}/v1/models");
    assert!(
        eventually(Duration::from_secs(10), || listed(&models_path, "data")
            == ["alpha", "beta", "gamma", "tiny:1b"]),
        "discovered models listed: {:?}",
        listed(&models_path, "data")
    );
    assert_eq!(
        listed(&format!("/proxy/{D}/api/tags"), "models"),
        ["tiny:1b"]
    );

    // Discovered models route to the host that reported them (the access record names
    // the host; the simulators' own counters also count the health checks).
    let path = format!("/proxy/{D}/v1/chat/completions");
    for (model, host) in [("alpha", &vllm), ("tiny:1b", &ollama)] {
        let r = post(gw.addr, &path, &chat_body(model, false, ""));
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        let served_by = |line: &&str| {
            line.contains(&format!("model=\"{model}\""))
                && line.contains(&format!("backend={}", host.addr))
        };
        assert!(
            eventually(Duration::from_secs(5), || gw
                .log()
                .lines()
                .any(|l| served_by(&l))),
            "{model} not served by {}:\n{}",
            host.addr,
            gw.log()
        );
    }
    // A model no host reports is refused by cubegate itself.
    let r = post(gw.addr, &path, &chat_body("delta", false, ""));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("model_not_found"), "{}", r.text());
}

for_each_driver!(discovered_models_are_served_and_listed);
