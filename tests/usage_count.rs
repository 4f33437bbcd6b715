//! Token counting, answer by answer: for every answer kind the access record's
//! `prompt_tokens` / `completion_tokens` are what the simulated host reported, and a
//! stream whose usage the gateway asked for reaches the client byte for byte as the host
//! would have sent it without the question.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;

const D: &str = "3f8a1c2e-0000-4000-8000-0000000000aa";

fn gateway_for(driver: &str, kind: &str, sim: &Proc, model: &str) -> Gateway {
    let body = domains_config(&[(D, &[(kind, sim.addr, &[model])])]);
    gateway_env(driver, &body, &[("CUBEGATE_LOG_FORMAT", "json")])
}

/// POSTs `body` to `path` on `addr` (a gateway's `/proxy/D` prefix or a host directly),
/// tagged with a request id.
fn call(addr: SocketAddr, path: &str, body: &str, id: &str) -> Response {
    let r = post_with(
        addr,
        path,
        &[("Content-Type", "application/json"), ("X-Request-Id", id)],
        body,
    );
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r
}

/// (prompt, completion, source) of an access record.
fn counted(gw: &Gateway, id: &str) -> (u64, u64, String) {
    let f = access_record(gw, id);
    (
        f["prompt_tokens"].as_u64().unwrap(),
        f["completion_tokens"].as_u64().unwrap(),
        f["usage"].as_str().unwrap().to_string(),
    )
}

/// The usage an OpenAI answer (whole, or the usage event of a stream) carries.
fn openai_usage(r: &Response) -> (u64, u64) {
    let text = r.text();
    let usage: Value = if text.starts_with("data:") {
        let event = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .unwrap_or_else(|| panic!("no usage event in {text}"));
        event["usage"].clone()
    } else {
        serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
    };
    (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap_or(0),
    )
}

/// The counts of Ollama's last object (whole answers are one object).
fn ollama_usage(r: &Response) -> (u64, u64) {
    let last: Value = serde_json::from_str(r.text().lines().last().unwrap()).unwrap();
    (
        last["prompt_eval_count"].as_u64().unwrap(),
        last["eval_count"].as_u64().unwrap_or(0),
    )
}

fn reported(usage: (u64, u64)) -> (u64, u64, String) {
    (usage.0, usage.1, "reported".into())
}

/// OpenAI answers from vLLM: whole, streamed with the client's own `include_usage`, and
/// streamed without it (asked for by the gateway, taken out again), chat and completions;
/// embeddings.
fn openai_answers_are_counted_as_reported(driver: &str) {
    let host = sim("vllm", &["--tokens", "7"]);
    let gw = gateway_for(driver, "vllm", &host, VLLM_MODEL);
    let chat = "/v1/chat/completions";
    let cases = [
        ("whole", chat, chat_body(VLLM_MODEL, false, "")),
        (
            "own-usage",
            chat,
            chat_body(
                VLLM_MODEL,
                true,
                r#","stream_options":{"include_usage":true}"#,
            ),
        ),
        (
            "completion",
            "/v1/completions",
            format!(r#"{{"model":"{VLLM_MODEL}","prompt":"once upon a time","stream":false}}"#),
        ),
        (
            "embedding",
            "/v1/embeddings",
            format!(r#"{{"model":"{VLLM_MODEL}","input":["a b c","d e"]}}"#),
        ),
    ];
    for (id, path, body) in &cases {
        let r = call(gw.addr, &format!("/proxy/{D}{path}"), body, id);
        assert_eq!(counted(&gw, id), reported(openai_usage(&r)), "{id}");
    }
    // Streams that did not ask: the client gets what the host sends without the option;
    // the count is what the host reports with it.
    for (id, path, body) in [
        ("stream-chat", chat, chat_body(VLLM_MODEL, true, "")),
        (
            "stream-completion",
            "/v1/completions",
            format!(r#"{{"model":"{VLLM_MODEL}","prompt":"once upon a time","stream":true}}"#),
        ),
    ] {
        let through = call(gw.addr, &format!("/proxy/{D}{path}"), &body, id);
        let direct = call(host.addr, path, &body, "direct");
        assert_eq!(
            through.text(),
            direct.text(),
            "{id}: the client's bytes differ"
        );
        assert!(!through.text().contains("\"usage\""), "{}", through.text());
        let asked = body.replacen('{', r#"{"stream_options":{"include_usage":true},"#, 1);
        let with_usage = call(host.addr, path, &asked, "direct-usage");
        assert_eq!(
            counted(&gw, id),
            reported(openai_usage(&with_usage)),
            "{id}"
        );
    }
}

/// Ollama's native answers (chat and generate, whole and streamed; embed) and its
/// OpenAI-compatible stream.
fn ollama_answers_are_counted_as_reported(driver: &str) {
    let host = sim("ollama", &["--tokens", "5"]);
    let gw = gateway_for(driver, "ollama", &host, OLLAMA_MODEL);
    let generate =
        |stream: bool| format!(r#"{{"model":"{OLLAMA_MODEL}","prompt":"why","stream":{stream}}}"#);
    for (id, path, body) in [
        (
            "chat-stream",
            "/api/chat",
            chat_body(OLLAMA_MODEL, true, ""),
        ),
        (
            "chat-whole",
            "/api/chat",
            chat_body(OLLAMA_MODEL, false, ""),
        ),
        ("generate-stream", "/api/generate", generate(true)),
        ("generate-whole", "/api/generate", generate(false)),
        (
            "embed",
            "/api/embed",
            format!(r#"{{"model":"{OLLAMA_MODEL}","input":"some words here"}}"#),
        ),
    ] {
        let r = call(gw.addr, &format!("/proxy/{D}{path}"), &body, id);
        assert_eq!(counted(&gw, id), reported(ollama_usage(&r)), "{id}");
    }
    let body = chat_body(OLLAMA_MODEL, true, "");
    let through = call(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &body,
        "compat",
    );
    let direct = call(host.addr, "/v1/chat/completions", &body, "direct");
    assert_eq!(through.text(), direct.text());
    let asked = body.replacen('{', r#"{"stream_options":{"include_usage":true},"#, 1);
    let with_usage = call(host.addr, "/v1/chat/completions", &asked, "direct-usage");
    assert_eq!(counted(&gw, "compat"), reported(openai_usage(&with_usage)));
}

/// A stream the client leaves early: the host reported nothing yet, so the record counts
/// the events delivered and says so.
fn a_cut_stream_counts_what_was_delivered(driver: &str) {
    let host = sim("vllm", &["--tokens", "200", "--token-delay-us", "20000"]);
    let gw = gateway_for(driver, "vllm", &host, VLLM_MODEL);
    let mut s = connect(gw.addr);
    let body = chat_body(VLLM_MODEL, true, "");
    send(
        &mut s,
        &request_bytes(
            "POST",
            &format!("/proxy/{D}/v1/chat/completions"),
            &[
                ("Content-Type", "application/json"),
                ("X-Request-Id", "cut"),
            ],
            body.as_bytes(),
        ),
    );
    let mut r = Reader::new(s);
    let (status, _) = r.head().unwrap();
    assert_eq!(status, 200);
    let mut events = 0;
    while events < 5 {
        let chunk = r.chunk().unwrap().unwrap();
        events += String::from_utf8_lossy(&chunk).matches("\n\n").count();
    }
    drop(r);
    let (prompt, completion, source) = counted(&gw, "cut");
    assert_eq!(source, "counted");
    assert_eq!(prompt, 0);
    assert!(
        (5..=40).contains(&completion),
        "{completion} events counted, 5 or a few more were delivered"
    );
}

for_each_driver!(
    openai_answers_are_counted_as_reported,
    ollama_answers_are_counted_as_reported,
    a_cut_stream_counts_what_was_delivered,
);
