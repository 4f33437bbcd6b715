//! Ollama's HTTP server (Go/gin): the native `/api/*` routes, `GET /`, and the
//! OpenAI-compatible `/v1/*` layer (delegated to `openai.rs` in Ollama style).
//! Native chat and generate stream by default as NDJSON, one object a line, the last with
//! `"done": true`, the counts and (deterministic, config-derived) durations. Unknown
//! paths get gin's `404 page not found`.

use super::openai::{self, Style};
use super::text::{self, json_str};
use super::{prompt, Config, Host, Reply, StreamFormat, Work};
use serde_json::Value;
use std::io::Write;

/// The Ollama version `GET /api/version` reports.
pub const VERSION: &str = "0.5.7";

const NDJSON: &str = "application/x-ndjson";
const JSON: &str = "application/json; charset=utf-8";

fn json(status: u16, body: Vec<u8>) -> Reply {
    Reply::Full {
        status,
        content_type: JSON,
        body,
        work: None,
    }
}

/// `{"error": message}` with `status`.
fn error(status: u16, message: &str) -> Reply {
    json(
        status,
        format!("{{\"error\":{}}}", json_str(message)).into_bytes(),
    )
}

fn not_found() -> Reply {
    Reply::Full {
        status: 404,
        content_type: "text/plain",
        body: b"404 page not found".to_vec(),
        work: None,
    }
}

/// Answers one request.
pub fn route(cfg: &Config, host: &Host, method: &str, path: &str, body: &[u8]) -> Reply {
    let get = method == "GET" || method == "HEAD";
    let post = method == "POST";
    match path {
        "/" if get => Reply::Full {
            status: 200,
            content_type: "text/plain; charset=utf-8",
            body: b"Ollama is running".to_vec(),
            work: None,
        },
        "/api/version" if get => json(200, format!("{{\"version\":\"{VERSION}\"}}").into_bytes()),
        "/api/tags" if get => tags(cfg),
        "/api/ps" if get => ps(host),
        "/api/show" if post => with_model(cfg, body, show),
        "/api/chat" if post => generate(cfg, body, true),
        "/api/generate" if post => generate(cfg, body, false),
        "/api/embed" if post => embed(cfg, body, false),
        "/api/embeddings" if post => embed(cfg, body, true),
        "/api/pull" | "/api/push" if post => pull(body),
        "/api/create" if post => json(200, b"{\"status\":\"success\"}".to_vec()),
        "/api/copy" if post => copy(cfg, body),
        "/api/delete" if method == "DELETE" => with_model(cfg, body, |_, _| json(200, Vec::new())),
        "/v1/models" if get => openai::models(cfg, Style::Ollama),
        "/v1/chat/completions" if post => openai::generate(cfg, Style::Ollama, body, true),
        "/v1/completions" if post => openai::generate(cfg, Style::Ollama, body, false),
        "/v1/embeddings" if post => openai::embeddings(cfg, Style::Ollama, body),
        _ if get && path.starts_with("/v1/models/") => {
            match super::find_model(cfg, &path["/v1/models/".len()..]) {
                Some(m) => json(
                    200,
                    format!(
                        "{{\"id\":{},\"object\":\"model\",\"created\":{},\"owned_by\":\"library\"}}",
                        json_str(m),
                        text::created(text::seed(m, None))
                    )
                    .into_bytes(),
                ),
                None => openai::error(Style::Ollama, 404, "model not found"),
            }
        }
        _ => not_found(),
    }
}

/// Parses the body as a JSON object, answering 400 like Ollama does when it is not.
fn parse(body: &[u8]) -> Result<Value, Reply> {
    if body.is_empty() {
        return Err(error(400, "missing request body"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(error(400, "the request body must be a JSON object")),
        Err(e) => Err(error(400, &format!("invalid JSON request body: {e}"))),
    }
}

/// The request's `model` (or legacy `name`) field.
fn model_field(v: &Value) -> Option<&str> {
    v.get("model")
        .and_then(Value::as_str)
        .or_else(|| v.get("name").and_then(Value::as_str))
        .filter(|m| !m.is_empty())
}

/// Runs `f` for a known model named in the body; 404 `model 'X' not found` otherwise.
fn with_model(cfg: &Config, body: &[u8], f: impl Fn(&Config, &str) -> Reply) -> Reply {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(name) = model_field(&v) else {
        return error(400, "model is required");
    };
    match super::find_model(cfg, name) {
        Some(m) => f(cfg, m),
        None => error(404, &format!("model '{name}' not found")),
    }
}

fn details() -> &'static str {
    "{\"parent_model\":\"\",\"format\":\"gguf\",\"family\":\"llama\",\"families\":[\"llama\"],\"parameter_size\":\"1.2B\",\"quantization_level\":\"Q8_0\"}"
}

/// The answer to every request in the `error` fault mode.
pub fn unavailable() -> Reply {
    error(503, "the GPU host is unavailable (simulated fault: error)")
}

/// A model's size on disk (and in VRAM once loaded), derived from its name.
fn model_size(model: &str) -> u64 {
    1_000_000_000 + text::mix(text::seed(model, None)) % 4_000_000_000
}

/// `GET /api/ps`: the models loaded (used within the keep-alive), with when each unloads.
fn ps(host: &Host) -> Reply {
    let mut out = Vec::from(&b"{\"models\":["[..]);
    for (i, (m, expires)) in host.loaded_models().into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let name = json_str(&m);
        let size = model_size(&m);
        let _ = write!(
            out,
            "{{\"name\":{name},\"model\":{name},\"size\":{size},\"digest\":\"{}\",\"details\":{},\"expires_at\":\"",
            text::digest(&m),
            details()
        );
        text::rfc3339(expires, &mut out);
        let _ = write!(out, "\",\"size_vram\":{size}}}");
    }
    out.extend_from_slice(b"]}");
    json(200, out)
}

fn tags(cfg: &Config) -> Reply {
    let mut out = Vec::from(&b"{\"models\":["[..]);
    for (i, m) in cfg.models.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let name = json_str(m);
        let size = model_size(m);
        let _ = write!(
            out,
            "{{\"name\":{name},\"model\":{name},\"modified_at\":\"2024-01-01T00:00:00Z\",\"size\":{size},\"digest\":\"{}\",\"details\":{}}}",
            text::digest(m),
            details()
        );
    }
    out.extend_from_slice(b"]}");
    json(200, out)
}

fn show(_cfg: &Config, model: &str) -> Reply {
    let body = format!(
        "{{\"license\":\"(simulated license)\",\"modelfile\":{},\"parameters\":\"stop                           \\\"<|eot_id|>\\\"\",\"template\":\"{{{{ .Prompt }}}}\",\"details\":{},\"model_info\":{{\"general.architecture\":\"llama\",\"general.parameter_count\":1235814432,\"llama.context_length\":131072,\"llama.embedding_length\":2048}},\"capabilities\":[\"completion\"],\"modified_at\":\"2024-01-01T00:00:00Z\"}}",
        json_str(&format!(
            "# Modelfile generated by \"ollama show\"\nFROM {model}\n"
        )),
        details()
    );
    json(200, body.into_bytes())
}

fn pull(body: &[u8]) -> Reply {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if model_field(&v).is_none() {
        return error(400, "model is required");
    }
    if v.get("stream").and_then(Value::as_bool) == Some(false) {
        return json(200, b"{\"status\":\"success\"}".to_vec());
    }
    Reply::Full {
        status: 200,
        content_type: NDJSON,
        body: b"{\"status\":\"pulling manifest\"}\n{\"status\":\"verifying sha256 digest\"}\n{\"status\":\"writing manifest\"}\n{\"status\":\"success\"}\n".to_vec(),
        work: None,
    }
}

fn copy(cfg: &Config, body: &[u8]) -> Reply {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(src) = v.get("source").and_then(Value::as_str) else {
        return error(400, "source is required");
    };
    match super::find_model(cfg, src) {
        Some(_) => json(200, Vec::new()),
        None => error(404, &format!("model '{src}' not found")),
    }
}

/// `POST /api/chat` (`chat = true`) and `POST /api/generate`.
fn generate(cfg: &Config, body: &[u8], chat: bool) -> Reply {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(name) = model_field(&v) else {
        return error(400, "model is required");
    };
    let Some(model) = super::find_model(cfg, name) else {
        return error(
            404,
            &format!("model \"{name}\" not found, try pulling it first"),
        );
    };
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let num_predict = v
        .get("options")
        .and_then(|o| o.get("num_predict"))
        .and_then(Value::as_i64);
    let limit = num_predict
        .filter(|&n| n >= 0)
        .map(|n| (n as usize).min(openai::MAX_ANSWER));
    let prompt = if chat {
        v.get("messages")
    } else {
        v.get("prompt")
    };
    let empty = match prompt {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => {
            let what = if chat {
                "messages must be an array"
            } else {
                "prompt must be a string"
            };
            return error(400, what);
        }
    };
    let seed = text::seed(model, prompt);
    let tokens = prompt.map(prompt::tokens).unwrap_or_default();
    let nd = NdStream {
        chat,
        model: json_str(model),
        seed,
        n: limit.unwrap_or(cfg.tokens),
        prompt_tokens: tokens.len().max(1),
        finish: if limit.is_some() { "length" } else { "stop" },
        first_ns: cfg.first_token_delay.as_nanos() as u64,
        token_ns: cfg.token_delay.as_nanos() as u64,
    };
    if empty {
        // Ollama answers an empty prompt by loading the model: one "load" object.
        let mut out = Vec::new();
        nd.begin(&mut out, 0);
        let content: &[u8] = if chat {
            b",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"load\",\"done\":true}"
        } else {
            b",\"response\":\"\",\"done\":true,\"done_reason\":\"load\"}"
        };
        out.extend_from_slice(content);
        return json(200, out);
    }
    let work = Work {
        model: model.to_string(),
        prompt: tokens,
        output_tokens: nd.n,
    };
    if stream {
        return Reply::Stream {
            fmt: Box::new(nd),
            work,
        };
    }
    let mut out = Vec::new();
    nd.last(&mut out, &json_str(&text::text(seed, nd.n)));
    Reply::Full {
        status: 200,
        content_type: JSON,
        body: out,
        work: Some(work),
    }
}

/// One native answer (NDJSON lines when streamed).
struct NdStream {
    chat: bool,
    /// JSON string literal of the model name.
    model: String,
    seed: u64,
    n: usize,
    prompt_tokens: usize,
    finish: &'static str,
    first_ns: u64,
    token_ns: u64,
}

impl NdStream {
    /// `{"model":M,"created_at":"…"` for line `i`.
    fn begin(&self, out: &mut Vec<u8>, i: usize) {
        out.extend_from_slice(b"{\"model\":");
        out.extend_from_slice(self.model.as_bytes());
        out.extend_from_slice(b",\"created_at\":\"");
        text::created_at(self.seed, i, out);
        out.push(b'"');
    }

    /// The final object, with `content` (a JSON string literal) as the text.
    fn last(&self, out: &mut Vec<u8>, content: &str) {
        self.begin(out, self.n);
        let (p, c) = (self.prompt_tokens as u64, self.n as u64);
        let load = 1_000_000u64;
        let prompt_eval = self.first_ns + 20_000 * p;
        let eval = (self.token_ns + 10_000) * c;
        let total = load + prompt_eval + eval + 100_000;
        let f = self.finish;
        let _ = if self.chat {
            write!(
                out,
                ",\"message\":{{\"role\":\"assistant\",\"content\":{content}}},\"done_reason\":\"{f}\",\"done\":true"
            )
        } else {
            write!(
                out,
                ",\"response\":{content},\"done\":true,\"done_reason\":\"{f}\""
            )
        };
        let _ = write!(
            out,
            ",\"total_duration\":{total},\"load_duration\":{load},\"prompt_eval_count\":{p},\"prompt_eval_duration\":{prompt_eval},\"eval_count\":{c},\"eval_duration\":{eval}}}"
        );
    }
}

impl StreamFormat for NdStream {
    fn content_type(&self) -> &'static str {
        NDJSON
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn open(&self, _out: &mut Vec<u8>) -> bool {
        false
    }

    fn token(&self, i: usize, tok: &str, out: &mut Vec<u8>) {
        self.begin(out, i);
        if self.chat {
            out.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":\"");
            out.extend_from_slice(tok.as_bytes());
            out.extend_from_slice(b"\"},\"done\":false}\n");
        } else {
            out.extend_from_slice(b",\"response\":\"");
            out.extend_from_slice(tok.as_bytes());
            out.extend_from_slice(b"\",\"done\":false}\n");
        }
    }

    fn close(&self, step: usize, out: &mut Vec<u8>) -> bool {
        if step > 0 {
            return false;
        }
        self.last(out, "\"\"");
        out.push(b'\n');
        true
    }
}

/// `POST /api/embed` (`{"embeddings":[[…]]}`) and legacy `POST /api/embeddings`
/// (`{"prompt":…}` → `{"embedding":[…]}`).
fn embed(cfg: &Config, body: &[u8], legacy: bool) -> Reply {
    let v = match parse(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(name) = model_field(&v) else {
        return error(400, "model is required");
    };
    let Some(model) = super::find_model(cfg, name) else {
        return error(
            404,
            &format!("model \"{name}\" not found, try pulling it first"),
        );
    };
    let mut out = Vec::with_capacity(64 + cfg.embed_dim * 12);
    if legacy {
        out.extend_from_slice(b"{\"embedding\":");
        match v.get("prompt") {
            Some(p @ Value::String(s)) if !s.is_empty() => {
                text::embedding(text::seed(model, Some(p)), cfg.embed_dim, &mut out)
            }
            _ => out.extend_from_slice(b"[]"),
        }
        out.push(b'}');
        return json(200, out);
    }
    let inputs = match v.get("input") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        input => match openai::embed_inputs(input) {
            Ok(i) => i,
            Err(msg) => return error(400, msg),
        },
    };
    let _ = write!(out, "{{\"model\":{},\"embeddings\":[", json_str(model));
    let mut p = 0;
    for (i, input) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        p += prompt::count(input).max(1);
        text::embedding(text::seed(model, Some(input)), cfg.embed_dim, &mut out);
    }
    let _ = write!(
        out,
        "],\"total_duration\":{},\"load_duration\":1000000,\"prompt_eval_count\":{p}}}",
        1_100_000 + 20_000 * p as u64
    );
    json(200, out)
}
