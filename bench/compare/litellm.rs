//! The LiteLLM row of compare: `litellm --config` (its proxy, uvicorn with one worker)
//! with the two simulators as `hosted_vllm` models named `fast` and `stream`, its master
//! key as the bearer.
//!
//! Set up to run offline, because out of the box LiteLLM reaches the internet, and
//! without it does not measure as a proxy at all:
//! - at start it fetches its model price list from GitHub, retrying; the bundled copy
//!   (`LITELLM_LOCAL_MODEL_COST_MAP`) is used instead;
//! - before the first chunk of every streamed answer it prices the request by counting
//!   the prompt's tokens, and for a model whose name holds `llama-3` it loads the Hugging
//!   Face tokenizer `Xenova/llama-3-tokenizer` to count them. Offline the download is
//!   retried five times with sleeps (1 + 2 + 4 + 8 + 8 s) on the event-loop thread, and
//!   the failure is not cached: every stream stopped the whole proxy for ~23 s, so the
//!   closed loop after the warmup's streams timed out on every connection (the probe
//!   sends whole answers, which carry their usage and count nothing).
//!   `disable_hf_tokenizer_download` makes it count with its bundled tiktoken encoding,
//!   and `HF_HUB_OFFLINE` makes any other Hub lookup fail at once instead of retrying.
//!
//! `LITELLM_LOG=WARNING` also turns off uvicorn's access line per request: access logs are
//! off for every system compare measures. Idle client connections are kept 75 s, as by
//! the other systems.

use super::systems::{self, Endpoint, Env, NotRun, Running, MODEL};
use std::process::Command;
use std::time::Duration;

/// How long LiteLLM may take to answer its first requests: it imports for seconds, and
/// for tens of seconds on a busy machine.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// Seconds an idle client connection is kept, as nginx (`keepalive_timeout 75s`) and
/// cubegate (`idle_keepalive_s`) keep theirs. uvicorn's default is 5 s: the streams' open
/// loop, 64 connections at a few streams/s, comes back to a connection after longer than
/// that and found it closed (a quarter of the streams failed).
const KEEPALIVE_S: u32 = 75;

/// The master key, sent as the bearer.
const KEY: &str = "sk-cubegate-bench";

/// The environment LiteLLM is started with: no fetch, no download, no access log.
pub const ENV: [(&str, &str); 3] = [
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
    ("HF_HUB_OFFLINE", "1"),
    ("LITELLM_LOG", "WARNING"),
];

/// LiteLLM's config: one model per simulator, the master key, no tokenizer download.
pub fn config(env: &Env) -> String {
    let mut s = String::from("model_list:\n");
    for (name, addr) in [("fast", env.fast), ("stream", env.stream)] {
        s.push_str(&format!(
            "  - model_name: {name}\n    litellm_params:\n      model: hosted_vllm/{MODEL}\n\
             \x20     api_base: http://{addr}/v1\n      api_key: none\n"
        ));
    }
    s.push_str(&format!(
        "general_settings:\n  master_key: {KEY}\n\
         litellm_settings:\n  disable_hf_tokenizer_download: true\n"
    ));
    s
}

/// Starts LiteLLM with one worker (`--num_workers`), pinned like every proxy.
pub fn start(env: &Env) -> Result<Running, NotRun> {
    if env.tls.is_some() {
        return Err(NotRun::Skipped("not set up for --tls".into()));
    }
    let Some(bin) = systems::find_program("litellm") else {
        return Err(NotRun::Skipped("not installed".into()));
    };
    let port = systems::port()?;
    let cfg = systems::write(env, "litellm.yaml", &config(env))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(port.to_string())
        .arg("--num_workers")
        .arg(env.workers.to_string())
        .arg("--keepalive_timeout")
        .arg(KEEPALIVE_S.to_string())
        .envs(ENV);
    let proc = systems::spawn(env, "litellm", cmd)?;
    let ep = |m: &str| Endpoint {
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        model: m.into(),
        cacert: None,
    };
    Ok(Running {
        proc: Some(proc),
        fast: ep("fast"),
        stream: ep("stream"),
        bearer: Some(KEY.into()),
        version: systems::version_of(&bin, &["--version"]),
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env {
            dir: std::env::temp_dir(),
            tls: None,
            fast: "127.0.0.1:1001".parse().unwrap(),
            stream: "127.0.0.1:1002".parse().unwrap(),
            secret: String::new(),
            token: String::new(),
            workers: 1,
            proxy_cpus: None,
            cubegate_bin: None,
            shared_store: Err("none".into()),
        }
    }

    /// Both simulators as models, the key, and what keeps a stream from stalling offline.
    #[test]
    fn config_names_both_models_and_never_downloads_a_tokenizer() {
        let c = config(&env());
        assert!(c.contains(
            "  - model_name: fast\n    litellm_params:\n      \
             model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct\n      \
             api_base: http://127.0.0.1:1001/v1\n"
        ));
        assert!(c.contains("model_name: stream"));
        assert!(c.contains("api_base: http://127.0.0.1:1002/v1"));
        assert!(c.contains("  master_key: sk-cubegate-bench\n"));
        assert!(c.contains("litellm_settings:\n  disable_hf_tokenizer_download: true\n"));
        let env: Vec<&str> = ENV.iter().map(|(k, _)| *k).collect();
        assert!(env.contains(&"LITELLM_LOCAL_MODEL_COST_MAP"));
        assert!(env.contains(&"HF_HUB_OFFLINE"));
    }
}
