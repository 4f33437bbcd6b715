//! The contract's acceptance check: the official OpenAI and Ollama Python clients, pointed
//! at cubegate with the simulator behind it, get answers identical to calling the
//! simulator directly. `.ci/run` installs the clients; on a machine without them this test
//! says so and passes only outside CI.

mod common;
use common::*;
use std::process::Command;

fn clients_available() -> bool {
    Command::new("python3")
        .args(["-c", "import openai, ollama"])
        .status()
        .is_ok_and(|s| s.success())
}

fn official_clients(driver: &str) {
    if !clients_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the Python clients (pip install openai ollama)"
        );
        eprintln!("skipped: python3 with the openai and ollama packages is not installed");
        return;
    }
    let vllm = sim("vllm", &[]);
    let ollama = sim("ollama", &[]);
    let gw = gateway(
        driver,
        &domains_config(&[(
            "dom",
            &[
                ("vllm", vllm.addr, &[VLLM_MODEL]),
                ("ollama", ollama.addr, &[OLLAMA_MODEL]),
            ],
        )]),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/official.py");
    let out = Command::new("python3")
        .arg(script)
        .args([
            &gw.addr.to_string(),
            "dom",
            &vllm.addr.to_string(),
            &ollama.addr.to_string(),
            VLLM_MODEL,
            OLLAMA_MODEL,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
}

for_each_driver!(official_clients);
