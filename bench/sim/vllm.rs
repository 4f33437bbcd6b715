//! vLLM's HTTP server (`vllm serve`, FastAPI/uvicorn): the routes and their answers.
//! The OpenAI endpoints themselves live in `openai.rs` (shared with Ollama's `/v1/*`);
//! this file maps paths to them and answers the few vLLM-only routes. Unknown paths get
//! FastAPI's `{"detail":"Not Found"}`, a wrong method `{"detail":"Method Not Allowed"}`.

use super::openai::{self, Style};
use super::{Config, Reply};

/// The vLLM version `GET /version` reports.
pub const VERSION: &str = "0.8.5";

/// Answers one request.
pub fn route(cfg: &Config, method: &str, path: &str, body: &[u8]) -> Reply {
    let allowed: &[&str] = match path {
        "/health" | "/ping" | "/version" | "/v1/models" | "/metrics" => &["GET", "HEAD"],
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/tokenize" => &["POST"],
        _ => return Reply::json(404, b"{\"detail\":\"Not Found\"}".to_vec()),
    };
    if !allowed.contains(&method) {
        return Reply::json(405, b"{\"detail\":\"Method Not Allowed\"}".to_vec());
    }
    match path {
        "/health" | "/ping" => Reply::Full {
            status: 200,
            content_type: "",
            body: Vec::new(),
            gen: 0,
        },
        "/version" => Reply::json(200, format!("{{\"version\":\"{VERSION}\"}}").into_bytes()),
        "/metrics" => Reply::Full {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: b"# vLLM simulator: no metrics\n".to_vec(),
            gen: 0,
        },
        "/v1/models" => openai::models(cfg, Style::Vllm),
        "/v1/chat/completions" => openai::generate(cfg, Style::Vllm, body, true),
        "/v1/completions" => openai::generate(cfg, Style::Vllm, body, false),
        "/v1/embeddings" => openai::embeddings(cfg, Style::Vllm, body),
        _ => tokenize(cfg, body),
    }
}

/// `POST /tokenize`: `{"count":N,"max_model_len":…,"tokens":[…]}` for a prompt or messages.
fn tokenize(cfg: &Config, body: &[u8]) -> Reply {
    let v = match openai::parse_body(Style::Vllm, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let prompt = v.get("prompt").or_else(|| v.get("messages"));
    let Some(prompt) = prompt else {
        return openai::error(Style::Vllm, 400, "prompt or messages: Field required");
    };
    let model = v
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or(&cfg.models[0]);
    let n = super::text::prompt_tokens(prompt);
    let seed = super::text::seed(model, Some(prompt));
    let tokens: Vec<String> = (0..n)
        .map(|i| (super::text::mix(seed ^ i as u64) % 128_000).to_string())
        .collect();
    let body = format!(
        "{{\"count\":{n},\"max_model_len\":{},\"tokens\":[{}],\"token_strs\":null}}",
        openai::MAX_MODEL_LEN,
        tokens.join(",")
    );
    Reply::json(200, body.into_bytes())
}
