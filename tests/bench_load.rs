//! `cubegate-bench load` against a real gateway: distinct signed bearer tokens exercise the
//! token cache as asked (each token verified at most once per worker, the rest are hits),
//! and the JSON summary counts every request.

mod common;
use common::*;
use std::process::Command;

const SECRET: &str = "the bench and the gateway share this secret";

fn load_with_distinct_tokens(driver: &str) {
    let vllm = sim("vllm", &[]);
    let body = format!(
        "{}\n[[auth.trusted]]\nissuer = \"https://bench.cubegate/\"\nhs_secret_env = \"BENCH_SECRET\"\n",
        domains_config(&[("dom", &[("vllm", vllm.addr, &[VLLM_MODEL])])])
            .replace("mode = \"none\"", "mode = \"jwt\"")
    );
    let gw = gateway_env(driver, &body, &[("BENCH_SECRET", SECRET)]);
    let json = unique_dir("load").join("summary.json");
    let out = Command::new(env!("CARGO_BIN_EXE_cubegate-bench"))
        .args(["load", "--url"])
        .arg(format!("http://{}/proxy/dom/v1/chat/completions", gw.addr))
        .args(["--kind", "chat", "--connections", "2", "--requests", "60"])
        .args([
            "--sign-hs256",
            SECRET,
            "--distinct-tokens",
            "5",
            "--token-domain",
            "dom",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("cubegate-bench load");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(summary["ok"], 60, "{summary}");
    let text = get(management_addr(&gw), "/metrics").text();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let verified = value("cubegate_token_verifications_total");
    assert!(
        (5..=10).contains(&verified),
        "5 tokens, 2 workers: {verified} verifications"
    );
    assert_eq!(value("cubegate_token_cache_hits_total") + verified, 60);
}

mod tokens {
    use super::*;
    #[test]
    fn uring() {
        load_with_distinct_tokens("uring")
    }
    #[test]
    fn legacy() {
        load_with_distinct_tokens("legacy")
    }
}

/// `cubegate-bench load` over HTTPS, trusting the gateway's certificate with `--cacert`:
/// whole answers and streams all complete; without `--cacert` the refused certificate is
/// named instead of leaving bare connect errors.
fn load_over_https(driver: &str) {
    let vllm = sim("vllm", &[]);
    let dir = unique_dir("load-tls");
    let (cert, key) = gen_cert(&dir);
    let gw = gateway_with(
        driver,
        &tls_lines(&cert, &key),
        &domains_config(&[("dom", &[("vllm", vllm.addr, &[VLLM_MODEL])])]),
    );
    let url = format!(
        "https://127.0.0.1:{}/proxy/dom/v1/chat/completions",
        gw.addr.port()
    );
    for kind in ["chat", "chat-stream"] {
        let json = dir.join(format!("{kind}.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_cubegate-bench"))
            .args(["load", "--url", &url, "--kind", kind])
            .args(["--connections", "2", "--requests", "40", "--cacert"])
            .arg(&cert)
            .arg("--json")
            .arg(&json)
            .output()
            .expect("cubegate-bench load");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(summary["ok"], 40, "{kind}: {summary}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cubegate-bench"))
        .args(["load", "--url", &url, "--requests", "3", "--timeout", "2"])
        .output()
        .expect("cubegate-bench load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
}

for_each_driver!(load_over_https);
