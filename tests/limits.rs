//! Limits from `[domains.limits]` / `[domains.member_limits]`, enforced across the
//! workers of one box: exactly N requests a minute pass, a concurrency limit holds, token
//! limits settle to what answers used, and every answer to a limited caller carries
//! OpenAI's `x-ratelimit-*` headers; over a limit, 429 `rate_limit_exceeded` names it,
//! with `Retry-After`. The OpenAI Python SDK's own retry obeys that `Retry-After`.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const D: &str = "3f8a1c2e-0000-4000-8000-0000000000bb";

fn limited_gateway(driver: &str, sim: &Proc, limits: &str) -> Gateway {
    let body = domains_config(&[(D, &[("vllm", sim.addr, &[VLLM_MODEL])])]);
    gateway(driver, &format!("{body}{limits}"))
}

fn chat(addr: std::net::SocketAddr, extra: &str) -> Response {
    post_with(
        addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[("Content-Type", "application/json")],
        &chat_body(VLLM_MODEL, false, extra),
    )
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A requests-per-minute limit split over two workers and eight client threads lets
/// exactly that many through; the rest get 429 naming the limit.
fn requests_per_minute_is_exact(driver: &str) {
    let host = sim("vllm", &["--tokens", "2"]);
    let gw = limited_gateway(
        driver,
        &host,
        "[domains.limits]\nrequests_per_minute = 25\n",
    );
    same_minute(15);
    let addr = gw.addr;
    let answers: Vec<Response> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|_| s.spawn(move || (0..5).map(|_| chat(addr, "")).collect::<Vec<_>>()))
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Response> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        (ok, limited.len()),
        (25, 15),
        "statuses: {:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let refusal = limited[0];
    let v: serde_json::Value = serde_json::from_slice(&refusal.body).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("25 requests per minute") && message.contains("this domain"),
        "{message}"
    );
    let retry: u64 = header(refusal, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(header(refusal, "x-ratelimit-limit-requests"), Some("25"));
    assert_eq!(header(refusal, "x-ratelimit-remaining-requests"), Some("0"));
    assert!(header(refusal, "x-ratelimit-reset-requests")
        .unwrap()
        .ends_with('s'));
    // Answers that passed carry the figures too, each one fewer remaining.
    let mut remaining: Vec<u32> = answers
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            header(r, "x-ratelimit-remaining-requests")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..25).collect::<Vec<u32>>());
    let series = format!(
        "cubegate_limit_rejections_total{{domain=\"{D}\",scope=\"domain\",limit=\"requests_per_minute\"}}"
    );
    assert_eq!(metric(management_addr(&gw), &series), 15);
}

/// A member's default concurrency limit: with one stream in flight the next request is
/// refused (Retry-After 1) and admitted once the stream has ended.
fn concurrency_limit_holds_and_frees(driver: &str) {
    let host = sim("vllm", &["--tokens", "10", "--token-delay-us", "50000"]);
    let gw = limited_gateway(driver, &host, "[domains.member_limits]\nconcurrent = 1\n");
    let mut stream = send_chat(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        VLLM_MODEL,
        true,
    );
    assert_eq!(stream.head().unwrap().0, 200);
    let refused = chat(gw.addr, "");
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(header(&refused, "retry-after"), Some("1"));
    assert!(refused.text().contains("concurrent"), "{}", refused.text());
    while let Some(Some(_)) = stream.chunk() {}
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || chat(gw.addr, "").status == 200),
        "the slot was not given back"
    );
}

/// Tokens per minute: the reservation (prompt estimate + max_tokens) is settled to the
/// host's count, so small answers leave room; once the window's use reaches the limit,
/// requests are refused until it resets.
fn tokens_per_minute_settle_to_real_use(driver: &str) {
    let host = sim("vllm", &["--tokens", "10"]);
    let gw = limited_gateway(driver, &host, "[domains.limits]\ntokens_per_minute = 200\n");
    same_minute(10);
    // Each answer uses its prompt (8 tokens) + 10; with no max_tokens each request
    // reserves 1,024 more, which would refuse the second one if reservations were never
    // settled to the real use.
    let mut ok = 0;
    let mut remaining = Vec::new();
    for _ in 0..30 {
        let r = chat(gw.addr, "");
        if r.status != 200 {
            assert_eq!(r.status, 429, "{}", r.text());
            assert!(r.text().contains("200 tokens per minute"), "{}", r.text());
            break;
        }
        ok += 1;
        remaining.push(
            header(&r, "x-ratelimit-remaining-tokens")
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
    }
    assert!(
        (10..=12).contains(&ok),
        "{ok} answers of 18 tokens fit in 200: {remaining:?}"
    );
    assert_eq!(
        header(&chat(gw.addr, ""), "x-ratelimit-limit-tokens"),
        Some("200")
    );
}

/// The OpenAI Python SDK, refused for concurrency, waits the 429's Retry-After and
/// succeeds on its own retry.
fn openai_sdk_retries_after_a_429(driver: &str) {
    let available = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !available {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the openai package"
        );
        eprintln!("skipped: python3 with the openai package is not installed");
        return;
    }
    // A 1.5-s stream holds the one slot while the SDK asks; the script starts it itself,
    // so the SDK's first attempt surely finds the slot taken.
    let host = sim("vllm", &["--tokens", "30", "--token-delay-us", "50000"]);
    let gw = limited_gateway(driver, &host, "[domains.limits]\nconcurrent = 1\n");
    let script = format!(
        "import http.client, json, threading, time, openai\n\
         h = http.client.HTTPConnection('{addr}')\n\
         h.request('POST', '/proxy/{D}/v1/chat/completions', body=json.dumps({{'model': '{VLLM_MODEL}', 'stream': True, 'messages': [{{'role': 'user', 'content': 'long'}}]}}), headers={{'Content-Type': 'application/json'}})\n\
         s = h.getresponse()\n\
         assert s.status == 200, s.status\n\
         threading.Thread(target=s.read).start()\n\
         c = openai.OpenAI(base_url='http://{addr}/proxy/{D}/v1', api_key='none', max_retries=5)\n\
         t = time.time()\n\
         r = c.chat.completions.with_raw_response.create(model='{VLLM_MODEL}', messages=[{{'role': 'user', 'content': 'hi'}}])\n\
         print(r.http_response.status_code, round(time.time() - t, 2), r.retries_taken)\n",
        addr = gw.addr
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields[0], "200", "{text}");
    let waited: f64 = fields[1].parse().unwrap();
    assert!(fields[2] != "0", "the SDK did not retry: {text}");
    assert!(
        waited >= 0.9,
        "the SDK retried before Retry-After (1 s): {text}"
    );
}

for_each_driver!(
    requests_per_minute_is_exact,
    concurrency_limit_holds_and_frees,
    tokens_per_minute_settle_to_real_use,
    openai_sdk_retries_after_a_429,
);
