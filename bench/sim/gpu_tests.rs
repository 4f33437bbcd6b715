//! End-to-end tests of the GPU host model over loopback: the prefix cache (hits,
//! block granularity, LRU eviction), the bounded batch and its FIFO queue, vLLM's
//! `/health` and `/metrics`, Ollama's `/api/version` and `/api/ps`. Assertions are on
//! counters and orderings; the one timing compared (a cached prefill against an uncached
//! one) differs by a factor of 50 and is checked with a factor of 2.

use super::tests::{cfg, connect, post, read_response};
use super::*;
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

pub(super) fn start_sim(gpu: GpuConfig, tweak: impl FnOnce(&mut Config)) -> Server {
    let mut c = Config {
        gpu,
        ..cfg(Flavor::Vllm)
    };
    tweak(&mut c);
    start(c).expect("simulator starts")
}

/// `GET path` on a new connection: (head, body).
pub(super) fn get(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut s = connect(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let (head, body, _) = read_response(&mut s, &mut Vec::new());
    (head, body)
}

/// `POST path` with a JSON body on a new connection: (head, body, ended properly).
pub(super) fn send(addr: SocketAddr, path: &str, body: &str) -> (String, Vec<u8>, bool) {
    let mut s = connect(addr);
    s.write_all(post(path, "", body).as_bytes()).expect("write");
    read_response(&mut s, &mut Vec::new())
}

/// Sends a completions request on a new connection and leaves its answer to be read.
pub(super) fn open_completion(addr: SocketAddr, body: &str) -> TcpStream {
    let mut s = connect(addr);
    s.write_all(post("/v1/completions", "", body).as_bytes())
        .expect("write");
    s
}

/// A simulator with a prefix cache of `tokens` tokens and nothing else.
fn with_cache(tokens: usize) -> Server {
    let gpu = GpuConfig {
        prefix_cache_tokens: tokens,
        ..GpuConfig::default()
    };
    start_sim(gpu, |_| {})
}

pub(super) fn stats(srv: &Server) -> Value {
    serde_json::from_slice(&srv.host.stats_json()).expect("stats are JSON")
}

/// Polls `cond` every 5 ms for up to 10 s.
pub(super) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `n` distinct words (one token each); `tag` makes different prompts.
fn words(tag: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{tag}{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A completions request whose prompt is exactly `prompt`'s words.
fn completion(prompt: &str, max_tokens: usize, stream: bool) -> String {
    format!(r#"{{"prompt":"{prompt}","max_tokens":{max_tokens},"stream":{stream}}}"#)
}

fn hits(srv: &Server) -> u64 {
    stats(srv)["prefix_cache_hits"].as_u64().expect("hits")
}

/// Runs one completion of `prompt` and returns the prefix-cache hits it added.
fn hits_of(srv: &Server, prompt: &str) -> u64 {
    let before = hits(srv);
    let (head, body, ok) = send(srv.addr, "/v1/completions", &completion(prompt, 1, false));
    assert!(ok && head.starts_with("http/1.1 200"), "{head}");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(prompt.split(' ').count() as u64)
    );
    hits(srv) - before
}

/// The value of the metric line `name{...} value`.
pub(super) fn metric(text: &str, name: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    let value = line.rsplit(' ').next().expect("a value");
    value.parse().expect("a number")
}

fn metrics(srv: &Server) -> String {
    let (head, body) = get(srv.addr, "/metrics");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    String::from_utf8(body).expect("utf8")
}

#[test]
fn the_same_prefix_twice_skips_its_prefill() {
    let srv = start_sim(
        GpuConfig {
            prefix_cache_tokens: 10_000,
            prefill_per_token: Duration::from_millis(2),
            ..GpuConfig::default()
        },
        |_| {},
    );
    let shared = words("system", 300);
    let ask = |question: &str| {
        let body = format!(
            r#"{{"messages":[{{"role":"system","content":"{shared}"}},{{"role":"user","content":"{question}"}}],"max_tokens":1}}"#
        );
        let t0 = Instant::now();
        let (head, body, ok) = send(srv.addr, "/v1/chat/completions", &body);
        assert!(ok && head.starts_with("http/1.1 200"), "{head}");
        let v: Value = serde_json::from_slice(&body).expect("json");
        (t0.elapsed(), v["usage"]["prompt_tokens"].as_u64())
    };
    // 4 + 300 (system) + 4 + 2 (user) = 310 tokens, 2 ms each: at least 620 ms.
    let (first, tokens) = ask("first question");
    assert_eq!(tokens, Some(310));
    assert!(first >= Duration::from_millis(620), "{first:?}");
    // The system message and the user header fill 19 blocks (304 tokens); only the rest
    // is computed: 6 tokens, 12 ms.
    let (second, _) = ask("other question");
    assert!(
        second < first / 2,
        "cached {second:?} vs uncached {first:?}"
    );
    let s = stats(&srv);
    assert_eq!(s["prefix_cache_queries"], 620);
    assert_eq!(s["prefix_cache_hits"], 304);
    let m = metrics(&srv);
    assert_eq!(metric(&m, "vllm:prefix_cache_queries_total"), 620.0);
    assert_eq!(metric(&m, "vllm:prefix_cache_hits_total"), 304.0);
    assert_eq!(
        metric(&m, "vllm:kv_cache_usage_perc"),
        0.0,
        "nothing running"
    );
}

#[test]
fn only_whole_blocks_are_cached_and_the_last_token_is_computed() {
    let srv = with_cache(1600);
    let short = words("s", 15);
    assert_eq!((hits_of(&srv, &short), hits_of(&srv, &short)), (0, 0));
    let one_block = words("o", 17);
    assert_eq!(
        (hits_of(&srv, &one_block), hits_of(&srv, &one_block)),
        (0, 16)
    );
    let two_blocks = words("t", 32);
    hits_of(&srv, &two_blocks);
    assert_eq!(
        hits_of(&srv, &two_blocks),
        16,
        "a fully cached prompt recomputes"
    );
    assert_eq!(stats(&srv)["cached_blocks"], 3);
}

#[test]
fn least_recently_used_blocks_are_evicted_at_capacity() {
    let srv = with_cache(5 * 16);
    let (a, b, c) = (words("a", 33), words("b", 33), words("c", 49));
    hits_of(&srv, &a);
    hits_of(&srv, &b);
    assert_eq!(hits_of(&srv, &a), 32, "A is cached and now the most recent");
    // C needs 4 blocks: the free one, B's two, then A's tail block.
    hits_of(&srv, &c);
    assert_eq!(hits_of(&srv, &a), 16, "A kept its first block");
    assert_eq!(hits_of(&srv, &b), 0, "B was evicted");
}

#[test]
fn slots_bound_the_batch_and_the_queue_is_fifo() {
    // Two threads, so slots are handed across runtimes.
    let srv = start_sim(
        GpuConfig {
            slots: Some(2),
            prefix_cache_tokens: 1600,
            ..GpuConfig::default()
        },
        |c| {
            c.threads = 2;
            c.token_delay = Duration::from_millis(10);
        },
    );
    // Endless streams: each holds its slot until its client leaves.
    let open = |tag: &str| open_completion(srv.addr, &completion(&words(tag, 40), 8000, true));
    let running = || srv.host.batch.running();
    let waiting = || srv.host.batch.waiting();
    let a = open("a");
    let b = open("b");
    wait_until("two run", || running() == 2);
    let mut c = open("c");
    wait_until("C waits", || waiting() == 1);
    let mut d = open("d");
    wait_until("D waits", || waiting() == 2);
    let m = metrics(&srv);
    assert_eq!(metric(&m, "vllm:num_requests_running"), 2.0);
    assert_eq!(metric(&m, "vllm:num_requests_waiting"), 2.0);
    assert!(metric(&m, "vllm:kv_cache_usage_perc") > 0.0);
    // A leaves: C, first in the queue, runs; D still waits and has had no byte.
    drop(a);
    let mut first = [0u8; 1];
    c.read_exact(&mut first).expect("C's answer starts");
    d.set_nonblocking(true).expect("nonblocking");
    let nothing = d.read(&mut first).map_err(|e| e.kind());
    assert_eq!(
        nothing.err(),
        Some(ErrorKind::WouldBlock),
        "D has not started"
    );
    assert_eq!((running(), waiting()), (2, 1));
    // B leaves: D runs.
    drop(b);
    d.set_nonblocking(false).expect("blocking");
    d.read_exact(&mut first).expect("D's answer starts");
    assert_eq!((running(), waiting()), (2, 0));
    drop((c, d));
    wait_until("all ended", || running() == 0);
    let m = metrics(&srv);
    assert_eq!(metric(&m, "vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);
}

#[test]
fn a_queued_client_that_leaves_gives_up_its_place() {
    let srv = start_sim(
        GpuConfig {
            slots: Some(1),
            ..GpuConfig::default()
        },
        |c| c.token_delay = Duration::from_millis(10),
    );
    let open = || open_completion(srv.addr, &completion("x", 8000, true));
    let running = open();
    wait_until("one runs", || srv.host.batch.running() == 1);
    let queued = open();
    wait_until("one waits", || srv.host.batch.waiting() == 1);
    drop(queued);
    wait_until("the queue empties", || srv.host.batch.waiting() == 0);
    drop(running);
    wait_until("the slot frees", || srv.host.batch.running() == 0);
    assert_eq!(
        stats(&srv)["streams_aborted"],
        1,
        "only the running one had started"
    );
}

#[test]
fn vllm_health_and_metrics_shapes() {
    let srv = start_sim(GpuConfig::default(), |_| {});
    let (head, body) = get(srv.addr, "/health");
    assert!(
        head.starts_with("http/1.1 200") && body.is_empty(),
        "{head}"
    );
    let (head, body) = get(srv.addr, "/metrics");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let text = String::from_utf8(body).expect("utf8");
    let label = "{model_name=\"meta-llama/Llama-3.1-8B-Instruct\",engine=\"0\"}";
    for (name, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{text}");
        assert!(text.contains(&format!("\n{name}{label} 0.0\n")), "{text}");
    }
    // Without the GPU flags: unlimited slots, nothing queued, no cache counted.
    let (_, _, ok) = send(srv.addr, "/v1/completions", &completion("a b c", 2, false));
    assert!(ok);
    let s = stats(&srv);
    assert_eq!(
        (
            s["running"].as_u64(),
            s["waiting"].as_u64(),
            s["prefix_cache_queries"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(s["by_status"]["200"], 3);
}

#[test]
fn ollama_version_and_loaded_models() {
    let srv = start(Config {
        gpu: GpuConfig {
            slots: Some(4),
            ..GpuConfig::default()
        },
        ..cfg(Flavor::Ollama)
    })
    .expect("start");
    let (head, body) = get(srv.addr, "/api/version");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["version"], ollama::VERSION);
    let ps = || -> Value { serde_json::from_slice(&get(srv.addr, "/api/ps").1).expect("json") };
    assert_eq!(
        ps()["models"].as_array().map(Vec::len),
        Some(0),
        "nothing loaded yet"
    );
    let body =
        r#"{"model":"llama3.2:1b","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
    let (head, _, ok) = send(srv.addr, "/api/chat", body);
    assert!(ok && head.starts_with("http/1.1 200"), "{head}");
    let models = ps()["models"].clone();
    let m = &models[0];
    assert_eq!(
        (m["name"].as_str(), m["model"].as_str()),
        (Some("llama3.2:1b"), Some("llama3.2:1b"))
    );
    assert_eq!(m["size"], m["size_vram"]);
    assert_eq!(m["details"]["format"], "gguf");
    assert_eq!(m["digest"].as_str().map(str::len), Some(64));
    let expires = m["expires_at"].as_str().expect("expires_at");
    assert!(expires.len() == 30 && expires.ends_with('Z'), "{expires}");
}

/// A connection that reads nothing back within `wait`: true if no byte came.
pub(super) fn silent_for(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut b = [0u8; 1];
    let silent = matches!(
        s.read(&mut b).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)
    );
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    silent
}

#[test]
fn slow_queue_waits_and_cold_prefills_are_counted() {
    let srv = start_sim(
        GpuConfig {
            slots: Some(1),
            prefix_cache_tokens: 1600,
            prefill_per_token: Duration::from_millis(1),
            ..GpuConfig::default()
        },
        |c| c.token_delay = Duration::from_millis(10),
    );
    let slow = |what: &str| stats(&srv)[what].as_u64().expect(what);
    // 120 uncached tokens: a 120-ms prefill; the same prompt again finds 112 cached.
    let prompt = words("p", 120);
    hits_of(&srv, &prompt);
    assert_eq!(slow("prefills_over_100ms"), 1);
    assert_eq!(hits_of(&srv, &prompt), 112);
    assert_eq!(
        slow("prefills_over_100ms"),
        1,
        "8 tokens computed: not slow"
    );
    assert_eq!(slow("queue_waits_over_100ms"), 0);
    // One slot, held by an endless stream: the next request waits until it leaves.
    let holder = open_completion(srv.addr, &completion("h", 8000, true));
    wait_until("the holder runs", || srv.host.batch.running() == 1);
    let mut waiter = open_completion(srv.addr, &completion("w", 1, false));
    wait_until("one waits", || srv.host.batch.waiting() == 1);
    std::thread::sleep(Duration::from_millis(150));
    drop(holder);
    let (head, _, ok) = read_response(&mut waiter, &mut Vec::new());
    assert!(ok && head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(slow("queue_waits_over_100ms"), 1);
    assert_eq!(slow("prefills_over_100ms"), 1);
}
