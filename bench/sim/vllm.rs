//! vLLM's HTTP server (`vllm serve`, FastAPI/uvicorn): the routes and their answers.
//! The OpenAI endpoints themselves live in `openai.rs` (shared with Ollama's `/v1/*`);
//! this file maps paths to them and answers the few vLLM-only routes. Unknown paths get
//! FastAPI's `{"detail":"Not Found"}`, a wrong method `{"detail":"Method Not Allowed"}`.
//! `/metrics` publishes the GPU host's load in vLLM's Prometheus names.

use super::openai::{self, Style};
use super::{Config, Host, Reply};
use std::fmt::Write;

/// The vLLM version `GET /version` reports: one that publishes both the current metric
/// names (`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_*`) and their deprecated
/// predecessors (`vllm:gpu_cache_usage_perc`, `vllm:gpu_prefix_cache_*`), as `/metrics`
/// here does.
pub const VERSION: &str = "0.10.1";

/// Answers one request.
pub fn route(cfg: &Config, host: &Host, method: &str, path: &str, body: &[u8]) -> Reply {
    let allowed: &[&str] = match path {
        "/health" | "/ping" | "/version" | "/v1/models" | "/metrics" => &["GET", "HEAD"],
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/tokenize" => &["POST"],
        _ => return Reply::json(404, b"{\"detail\":\"Not Found\"}".to_vec()),
    };
    if !allowed.contains(&method) {
        return Reply::json(405, b"{\"detail\":\"Method Not Allowed\"}".to_vec());
    }
    match path {
        "/health" | "/ping" => Reply::empty(200),
        "/version" => Reply::json(200, format!("{{\"version\":\"{VERSION}\"}}").into_bytes()),
        "/metrics" => metrics(host),
        "/v1/models" => openai::models(cfg, Style::Vllm),
        "/v1/chat/completions" => openai::generate(cfg, Style::Vllm, body, true),
        "/v1/completions" => openai::generate(cfg, Style::Vllm, body, false),
        "/v1/embeddings" => openai::embeddings(cfg, Style::Vllm, body),
        _ => tokenize(body),
    }
}

/// `POST /tokenize`: `{"count":N,"max_model_len":…,"tokens":[…]}` for a prompt or messages.
/// The ids are the simulator's own tokens (`prompt.rs`), the ones its prefix cache sees.
fn tokenize(body: &[u8]) -> Reply {
    let v = match openai::parse_body(Style::Vllm, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let prompt = v.get("prompt").or_else(|| v.get("messages"));
    let Some(prompt) = prompt else {
        return openai::error(Style::Vllm, 400, "prompt or messages: Field required");
    };
    let tokens: Vec<String> = super::prompt::tokens(prompt)
        .iter()
        .map(u32::to_string)
        .collect();
    let n = tokens.len();
    let body = format!(
        "{{\"count\":{n},\"max_model_len\":{},\"tokens\":[{}],\"token_strs\":null}}",
        openai::MAX_MODEL_LEN,
        tokens.join(",")
    );
    Reply::json(200, body.into_bytes())
}

/// The answer to every request in the `error` fault mode (what a vLLM whose engine died
/// answers, `/health` included).
pub fn unavailable() -> Reply {
    openai::error(
        Style::Vllm,
        503,
        "The GPU host is unavailable (simulated fault: error).",
    )
}

/// `GET /metrics`: the scheduler and KV-cache figures vLLM v1 publishes, in Prometheus
/// text, labelled with the first served model (the state is the host's, not a model's).
fn metrics(host: &Host) -> Reply {
    let label = format!(
        "{{model_name={},engine=\"0\"}}",
        prometheus_label(&host.model_label)
    );
    let (usage, _) = host.kv_cache();
    let running = host.batch.running() as f64;
    let waiting = host.batch.waiting() as f64;
    let queries = host.prefix_queries() as f64;
    let hits = host.prefix_hits() as f64;
    let families: [(&str, &str, &str, f64); 8] = [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", running),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", usage),
        ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.", queries),
        ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.", hits),
        ("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.", usage),
        ("vllm:gpu_prefix_cache_queries_total", "counter", "GPU prefix cache queries, in terms of number of queriedtokens. DEPRECATED: Use vllm:prefix_cache_queries instead.", queries),
        ("vllm:gpu_prefix_cache_hits_total", "counter", "GPU prefix cache hits, in terms of number of cached tokens. DEPRECATED: Use vllm:prefix_cache_hits instead.", hits),
    ];
    let mut out = String::with_capacity(2048);
    for (name, kind, help, value) in families {
        // `{:?}` prints floats as Python does (`0.0`, `3.0`, `0.25`).
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{label} {value:?}\n"
        );
    }
    Reply::Full {
        status: 200,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body: out.into_bytes(),
        work: None,
    }
}

/// A Prometheus label value, quoted (backslash, quote and newline escaped).
fn prometheus_label(value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}
