//! The OpenAI-compatible API, as served by vLLM and by Ollama's `/v1/*` layer:
//! `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`.
//! The two servers differ in details (ids, field order, extra fields, error shape),
//! selected by [`Style`]. Streams are SSE: `data: {json}\n\n` events, then
//! `data: [DONE]\n\n`, with a usage event first when `stream_options.include_usage`.

use super::text::{self, json_str};
use super::{prompt, Config, Reply, StreamFormat, Work};
use serde_json::Value;
use std::io::Write;

/// Whose flavor of the OpenAI API to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Vllm,
    Ollama,
}

/// vLLM's `--max-model-len` as the simulator reports it.
pub const MAX_MODEL_LEN: usize = 8192;
/// Upper bound on a requested answer length (keeps the simulator cheap).
pub const MAX_ANSWER: usize = 1 << 20;

/// An error response in the style's shape.
pub fn error(style: Style, status: u16, message: &str) -> Reply {
    let msg = json_str(message);
    let body = match style {
        Style::Vllm => {
            let kind = match status {
                400 => "BadRequestError",
                404 => "NotFoundError",
                503 => "ServiceUnavailableError",
                _ => "InternalServerError",
            };
            format!(
                "{{\"error\":{{\"message\":{msg},\"type\":\"{kind}\",\"param\":null,\"code\":{status}}}}}"
            )
        }
        Style::Ollama => {
            let kind = match status {
                400 => "invalid_request_error",
                404 => "not_found_error",
                _ => "api_error",
            };
            format!(
                "{{\"error\":{{\"message\":{msg},\"type\":\"{kind}\",\"param\":null,\"code\":null}}}}"
            )
        }
    };
    Reply::json(status, body.into_bytes())
}

/// `GET /v1/models`.
pub fn models(cfg: &Config, style: Style) -> Reply {
    let mut out = Vec::from(&b"{\"object\":\"list\",\"data\":["[..]);
    for (i, m) in cfg.models.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let id = json_str(m);
        let created = text::created(text::seed(m, None));
        let _ = match style {
            Style::Vllm => write!(
                out,
                "{{\"id\":{id},\"object\":\"model\",\"created\":{created},\"owned_by\":\"vllm\",\"root\":{id},\"parent\":null,\"max_model_len\":{MAX_MODEL_LEN},\"permission\":[{{\"id\":\"modelperm-{}\",\"object\":\"model_permission\",\"created\":{created},\"allow_create_engine\":false,\"allow_sampling\":true,\"allow_logprobs\":true,\"allow_search_indices\":false,\"allow_view\":true,\"allow_fine_tuning\":false,\"organization\":\"*\",\"group\":null,\"is_blocking\":false}}]}}",
                text::hex_id(text::seed(m, None))
            ),
            Style::Ollama => write!(
                out,
                "{{\"id\":{id},\"object\":\"model\",\"created\":{created},\"owned_by\":\"library\"}}"
            ),
        };
    }
    out.extend_from_slice(b"]}");
    Reply::json(200, out)
}

/// The request fields shared by chat and completions.
struct Common {
    model: String,
    stream: bool,
    include_usage: bool,
    /// The answer length the request asked for, if any.
    limit: Option<usize>,
}

fn parse_common(cfg: &Config, style: Style, v: &Value) -> Result<Common, Reply> {
    let Some(obj) = v.as_object() else {
        return Err(error(style, 400, "the request body must be a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        None | Some(Value::Null) if style == Style::Vllm => cfg.models[0].clone(),
        None | Some(Value::Null) => return Err(error(style, 400, "model is required")),
        Some(_) => return Err(error(style, 400, "model: Input should be a valid string")),
    };
    let Some(model) = super::find_model(cfg, &model) else {
        let msg = match style {
            Style::Vllm => format!("The model `{model}` does not exist."),
            Style::Ollama => format!("model \"{model}\" not found, try pulling it first"),
        };
        return Err(error(style, 404, &msg));
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(error(style, 400, "stream: Input should be a valid boolean")),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut limit = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(x) => match x.as_u64() {
                Some(0) if style == Style::Vllm => {
                    let msg = format!("{key} must be at least 1, got 0.");
                    return Err(error(style, 400, &msg));
                }
                Some(n) => limit = Some((n as usize).min(MAX_ANSWER)),
                None => {
                    let msg = format!("{key}: Input should be a valid non-negative integer");
                    return Err(error(style, 400, &msg));
                }
            },
        }
    }
    Ok(Common {
        model: model.to_string(),
        stream,
        include_usage,
        limit,
    })
}

/// Parses a JSON body, answering 400 in the style's shape when it is not JSON.
pub fn parse_body(style: Style, body: &[u8]) -> Result<Value, Reply> {
    if body.is_empty() {
        return Err(error(
            style,
            400,
            "the request body is empty; expected JSON",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            style,
            400,
            &format!("the request body is not valid JSON: {e}"),
        )
    })
}

/// `POST /v1/chat/completions` (`chat = true`) and `POST /v1/completions`.
pub fn generate(cfg: &Config, style: Style, body: &[u8], chat: bool) -> Reply {
    let v = match parse_body(style, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let c = match parse_common(cfg, style, &v) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let field = if chat { "messages" } else { "prompt" };
    let prompt = match v.get(field) {
        Some(p @ Value::Array(_)) if chat => p,
        Some(p @ (Value::String(_) | Value::Array(_))) if !chat => p,
        _ => {
            let msg = format!("{field}: Field required (a JSON array of messages or a prompt)");
            return error(style, 400, &msg);
        }
    };
    let tokens = prompt::tokens(prompt);
    let prompt_tokens = tokens.len().max(1);
    let n = c.limit.unwrap_or(cfg.tokens);
    let work = Work {
        model: c.model.clone(),
        prompt: tokens,
        output_tokens: n,
    };
    if style == Style::Vllm && c.limit.is_some() && prompt_tokens + n > MAX_MODEL_LEN {
        let msg = format!(
            "This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {} tokens ({prompt_tokens} in the messages, {n} in the completion). Please reduce the length of the messages or completion.",
            prompt_tokens + n
        );
        return error(style, 400, &msg);
    }
    let seed = text::seed(&c.model, Some(prompt));
    let finish = if c.limit.is_some() { "length" } else { "stop" };
    let created = text::created(seed);
    let model = json_str(&c.model);
    let id = match style {
        Style::Vllm => text::hex_id(seed),
        Style::Ollama => (text::mix(seed) % 1000).to_string(),
    };
    let id_prefix = if chat { "chatcmpl-" } else { "cmpl-" };
    if c.stream {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let fp = if style == Style::Ollama {
            ",\"system_fingerprint\":\"fp_ollama\""
        } else {
            ""
        };
        let prefix = format!(
            "data: {{\"id\":\"{id_prefix}{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model}{fp},"
        );
        let fmt = OaStream {
            style,
            chat,
            prefix,
            seed,
            n,
            prompt_tokens,
            finish,
            include_usage: c.include_usage,
        };
        return Reply::Stream {
            fmt: Box::new(fmt),
            work,
        };
    }
    let answer = json_str(&text::text(seed, n));
    let (p, t) = (prompt_tokens, prompt_tokens + n);
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    let mut out = format!(
        "{{\"id\":\"{id_prefix}{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model},"
    );
    let choice = match (style, chat) {
        (Style::Vllm, true) => format!(
            "{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"reasoning_content\":null,\"content\":{answer},\"tool_calls\":[]}},\"logprobs\":null,\"finish_reason\":\"{finish}\",\"stop_reason\":null}}"
        ),
        (Style::Vllm, false) => format!(
            "{{\"index\":0,\"text\":{answer},\"logprobs\":null,\"finish_reason\":\"{finish}\",\"stop_reason\":null,\"prompt_logprobs\":null}}"
        ),
        (Style::Ollama, true) => format!(
            "{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":{answer}}},\"finish_reason\":\"{finish}\"}}"
        ),
        (Style::Ollama, false) => {
            format!("{{\"text\":{answer},\"index\":0,\"finish_reason\":\"{finish}\"}}")
        }
    };
    match style {
        Style::Vllm => out.push_str(&format!(
            "\"choices\":[{choice}],\"usage\":{{\"prompt_tokens\":{p},\"total_tokens\":{t},\"completion_tokens\":{n},\"prompt_tokens_details\":null}},\"prompt_logprobs\":null}}"
        )),
        Style::Ollama => out.push_str(&format!(
            "\"system_fingerprint\":\"fp_ollama\",\"choices\":[{choice}],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{n},\"total_tokens\":{t}}}}}"
        )),
    }
    Reply::Full {
        status: 200,
        content_type: "application/json",
        body: out.into_bytes(),
        work: Some(work),
    }
}

/// One SSE answer in either style.
struct OaStream {
    style: Style,
    chat: bool,
    /// `data: {"id":…,"object":…,"created":…,"model":…,` (and Ollama's fingerprint).
    prefix: String,
    seed: u64,
    n: usize,
    prompt_tokens: usize,
    finish: &'static str,
    include_usage: bool,
}

impl StreamFormat for OaStream {
    fn content_type(&self) -> &'static str {
        "text/event-stream; charset=utf-8"
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn open(&self, out: &mut Vec<u8>) -> bool {
        if self.style != Style::Vllm || !self.chat {
            return false;
        }
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(b"\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
        true
    }

    fn token(&self, _i: usize, tok: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(self.prefix.as_bytes());
        let (before, after): (&[u8], &[u8]) = match (self.style, self.chat) {
            (Style::Vllm, true) => (
                b"\"choices\":[{\"index\":0,\"delta\":{\"content\":\"",
                b"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
            ),
            (Style::Vllm, false) => (
                b"\"choices\":[{\"index\":0,\"text\":\"",
                b"\",\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}]}\n\n",
            ),
            (Style::Ollama, true) => (
                b"\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"",
                b"\"},\"finish_reason\":null}]}\n\n",
            ),
            (Style::Ollama, false) => (
                b"\"choices\":[{\"text\":\"",
                b"\",\"index\":0,\"finish_reason\":null}]}\n\n",
            ),
        };
        out.extend_from_slice(before);
        out.extend_from_slice(tok.as_bytes());
        out.extend_from_slice(after);
    }

    fn close(&self, step: usize, out: &mut Vec<u8>) -> bool {
        // Steps: final (finish_reason), usage (optional), [DONE].
        let step = if step >= 1 && !self.include_usage {
            step + 1
        } else {
            step
        };
        let f = self.finish;
        let (p, c) = (self.prompt_tokens, self.n);
        let t = p + c;
        match step {
            0 => {
                out.extend_from_slice(self.prefix.as_bytes());
                let _ = match (self.style, self.chat) {
                    (Style::Vllm, true) => write!(out, "\"choices\":[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{f}\",\"stop_reason\":null}}]}}\n\n"),
                    (Style::Vllm, false) => write!(out, "\"choices\":[{{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":\"{f}\",\"stop_reason\":null}}]}}\n\n"),
                    (Style::Ollama, true) => write!(out, "\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":\"{f}\"}}]}}\n\n"),
                    (Style::Ollama, false) => write!(out, "\"choices\":[{{\"text\":\"\",\"index\":0,\"finish_reason\":\"{f}\"}}]}}\n\n"),
                };
            }
            1 => {
                out.extend_from_slice(self.prefix.as_bytes());
                let _ = match self.style {
                    Style::Vllm => write!(out, "\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"total_tokens\":{t},\"completion_tokens\":{c}}}}}\n\n"),
                    Style::Ollama => write!(out, "\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{t}}}}}\n\n"),
                };
            }
            2 => out.extend_from_slice(b"data: [DONE]\n\n"),
            _ => return false,
        }
        true
    }
}

/// `POST /v1/embeddings`.
pub fn embeddings(cfg: &Config, style: Style, body: &[u8]) -> Reply {
    let v = match parse_body(style, body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let c = match parse_common(cfg, style, &v) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let inputs = match embed_inputs(v.get("input")) {
        Ok(i) => i,
        Err(msg) => return error(style, 400, msg),
    };
    let model = json_str(&c.model);
    let mut out = Vec::with_capacity(64 + inputs.len() * (16 + cfg.embed_dim * 12));
    let seed = text::seed(&c.model, v.get("input"));
    if style == Style::Vllm {
        let _ = write!(
            out,
            "{{\"id\":\"embd-{}\",\"object\":\"list\",\"created\":{},\"model\":{model},\"data\":[",
            text::hex_id(seed),
            text::created(seed)
        );
    } else {
        out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    }
    let mut p = 0;
    for (i, input) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        p += prompt::count(input).max(1);
        let _ = write!(
            out,
            "{{\"object\":\"embedding\",\"index\":{i},\"embedding\":"
        );
        text::embedding(text::seed(&c.model, Some(input)), cfg.embed_dim, &mut out);
        out.push(b'}');
    }
    let _ = match style {
        Style::Vllm => write!(out, "],\"usage\":{{\"prompt_tokens\":{p},\"total_tokens\":{p},\"completion_tokens\":0,\"prompt_tokens_details\":null}}}}"),
        Style::Ollama => write!(out, "],\"model\":{model},\"usage\":{{\"prompt_tokens\":{p},\"total_tokens\":{p}}}}}"),
    };
    Reply::json(200, out)
}

/// The inputs of an embeddings request: a string, an array of strings, an array of
/// token ids (one input), or an array of such arrays.
pub fn embed_inputs(input: Option<&Value>) -> Result<Vec<&Value>, &'static str> {
    let err = "input: expected a string, an array of strings or an array of token ids";
    match input {
        Some(s @ Value::String(_)) => Ok(vec![s]),
        Some(a @ Value::Array(items)) => {
            if items.is_empty() {
                return Err("input must not be empty");
            }
            if items.iter().all(Value::is_number) {
                return Ok(vec![a]);
            }
            if items.iter().all(|x| x.is_string() || x.is_array()) {
                return Ok(items.iter().collect());
            }
            Err(err)
        }
        _ => Err(err),
    }
}
