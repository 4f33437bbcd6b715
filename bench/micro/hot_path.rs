//! criterion micro-benchmarks of the request path's pure pieces: head parsing, finding the
//! model in a body, routing, choosing a GPU host (prefix keys and the `auto` policy),
//! chunked framing and writing the client's response head.
//!
//! Run: `cargo bench --bench hot_path` (add `-- --quick` for a fast pass).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use cubegate::internals::config::{BackendKind, Limits, Routing};
use cubegate::internals::fleet::balance::{Balancer, Hub, Pool};
use cubegate::internals::fleet::host::Host;
use cubegate::internals::fleet::policy::{rank, RoutingState};
use cubegate::internals::fleet::prefix::PrefixKeys;
use cubegate::internals::http::chunked::ChunkedDecoder;
use cubegate::internals::http::head::{parse_request_head, Method, RequestHead};
use cubegate::internals::http::response::{parse_response_head, write_client_head, ClientFraming};
use cubegate::internals::proxy::model_scan::ModelScanner;
use cubegate::internals::proxy::route::classify;

const HEAD: &[u8] = b"POST /proxy/3f8a1c2e-0000-4000-8000-000000000001/v1/chat/completions HTTP/1.1\r\n\
Host: gateway.example.com\r\nUser-Agent: OpenAI/Python 1.54.0\r\nAccept: application/json\r\n\
Content-Type: application/json\r\nAuthorization: Bearer eyJhbGciOiJFZERTQSIsImtpZCI6IjEifQ.eyJzdWIiOiJ1c2VyIn0.c2lnbmF0dXJl\r\n\
X-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\nContent-Length: 180\r\n\r\n";

fn chat_body(history_bytes: usize) -> Vec<u8> {
    format!(
        r#"{{"messages":[{{"role":"system","content":"You are helpful."}},{{"role":"user","content":"{}"}}],"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"max_tokens":256}}"#,
        "lorem ipsum \\\"quoted\\\" ".repeat(history_bytes / 22 + 1)
    )
    .into_bytes()
}

fn head_parsing(c: &mut Criterion) {
    let limits = Limits::default();
    let mut head = RequestHead::default();
    c.bench_function("parse_request_head/openai_sdk", |b| {
        b.iter(|| parse_request_head(black_box(HEAD), &limits, &mut head).unwrap())
    });
}

fn model_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("model_scan");
    for size in [200usize, 10_000, 200_000] {
        let body = chat_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(format!("body_{size}B"), |b| {
            b.iter(|| {
                let mut s = ModelScanner::new();
                s.feed(black_box(&body)).unwrap();
                assert!(s.model().is_some());
            })
        });
    }
    g.finish();
}

fn routing(c: &mut Criterion) {
    c.bench_function("route/classify_chat", |b| {
        b.iter(|| {
            classify(
                Method::Post,
                black_box("/proxy/3f8a1c2e-0000-4000-8000-000000000001/v1/chat/completions"),
            )
        })
    });
}

fn chunked(c: &mut Criterion) {
    let mut stream = Vec::new();
    for _ in 0..64 {
        let event = br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" token"}}]}

"#;
        stream.extend(format!("{:x}\r\n", event.len()).bytes());
        stream.extend_from_slice(event);
        stream.extend_from_slice(b"\r\n");
    }
    stream.extend_from_slice(b"0\r\n\r\n");
    let mut g = c.benchmark_group("chunked");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("track_sse_64_events", |b| {
        b.iter(|| {
            let mut d = ChunkedDecoder::new();
            let n = d.feed(black_box(&stream), |_| {}).unwrap();
            assert!(d.is_done() && n == stream.len());
        })
    });
    g.finish();
}

fn response_head(c: &mut Criterion) {
    let raw = b"HTTP/1.1 200 OK\r\ndate: Mon, 23 Nov 2026 10:00:00 GMT\r\nserver: uvicorn\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut out = Vec::with_capacity(1024);
    c.bench_function("response_head/parse_and_write", |b| {
        b.iter(|| {
            let h = parse_response_head(black_box(raw), 65536, false)
                .unwrap()
                .unwrap();
            out.clear();
            write_client_head(
                &mut out,
                raw,
                &h,
                ClientFraming::Chunked,
                b"0123abcd-00-0000000001",
                true,
                b"",
            );
            black_box(&out);
        })
    });
}

/// What `choose_backends` adds per request: the prefix keys of a chat body (8 KiB of
/// history) and the `auto` policy's order over 8 hosts.
fn host_choice(c: &mut Criterion) {
    let body = chat_body(8 * 1024);
    c.bench_function("fleet/prefix_keys_8k_body", |b| {
        b.iter(|| black_box(PrefixKeys::of(black_box(&body), true)))
    });
    let hosts: Vec<std::sync::Arc<Host>> = (0..8)
        .map(|i| {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
            std::sync::Arc::new(Host::new(
                format!("http://{addr}"),
                BackendKind::Vllm,
                addr,
                None,
                addr.to_string(),
                String::new(),
            ))
        })
        .collect();
    let candidates: Vec<(usize, &Host)> =
        hosts.iter().enumerate().map(|(i, h)| (i, &**h)).collect();
    let keys = PrefixKeys::of(&body, true);
    // As a worker's: its reviews go through the box's balancer.
    let mut state = RoutingState::with_hub(std::sync::Arc::new(Hub::default()));
    let mut out = Vec::with_capacity(8);
    // A request a microsecond: the balancer's once-a-second review runs now and then,
    // as it does on the request path (which passes the time it already read).
    let t0 = std::time::Instant::now();
    let mut tick = 0u64;
    c.bench_function("fleet/rank_auto_8_hosts", |b| {
        b.iter(|| {
            tick += 1;
            black_box(rank(
                t0 + std::time::Duration::from_micros(tick),
                Routing::Auto,
                &candidates,
                &keys,
                &mut state,
                &mut out,
            ))
        })
    });
    // A second of a worker's balancer with the most groups it tracks (4,096), each asked
    // for once: 4,096 requests' counting and one review, the worker's own (`local`) or
    // through the box's balancer (`hub`: counts merged, the hub's review, homes taken
    // back). Each iteration is one second later than the last.
    let order = |key: u64| (0..8).map(move |i| (key + i) % 8);
    let pool = Pool::of(0..8);
    for (name, mut worker) in [
        ("local", Balancer::default()),
        (
            "hub",
            Balancer::with_hub(std::sync::Arc::new(Hub::default())),
        ),
    ] {
        let mut second = 0u64;
        c.bench_function(&format!("fleet/balancer_second_4096_groups_{name}"), |b| {
            b.iter(|| {
                second += 1;
                let now = t0 + std::time::Duration::from_secs(second);
                for key in 0..4096u64 {
                    black_box(worker.note(
                        now,
                        key.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        pool,
                        order(key),
                    ));
                }
            })
        });
    }
}

criterion_group!(
    benches,
    head_parsing,
    model_scan,
    routing,
    host_choice,
    chunked,
    response_head
);
criterion_main!(benches);
