//! Usage metering end to end, through the public port: requests as members, as a domain
//! admin and with an API key are summed by the workers, stored by the usage writer and read
//! back through `GET /domains/{id}/usage` and `GET /users/profile/usage` — as JSON and as
//! CSV, seen by each role as it may see them; bad questions are refused naming the
//! parameter; a clean stop (SIGTERM, or a SIGUSR2 hand-over) keeps even what was not
//! flushed yet, a kill -9 keeps what was flushed.
//!
//! Token counts come from the answer meter (issue 12, part 1); these tests check requests
//! and errors exactly.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const D: &str = "metered";
const PASSWORD: &str = "a long passphrase for usage 42";
/// A model the domain does not serve, with a comma (CSV must quote it).
const UNSERVED: &str = "no,such-model";
/// How long a test waits for the writer (flush_ms = 200 here, workers send every second).
const FLUSHED: Duration = Duration::from_secs(10);

fn config() -> (Proc, String) {
    let vllm = sim("vllm", &[]);
    let body = domains_config(&[(D, &[("vllm", vllm.addr, &[VLLM_MODEL])])])
        .replace("mode = \"none\"", "mode = \"jwt\"");
    (vllm, format!("{body}\n[usage]\nflush_ms = 200\n"))
}

/// A new user of the gateway: (id, access token).
fn user(gw: &Gateway, admin: &str, email: &str) -> (String, String) {
    let r = api_call(
        gw.addr,
        "POST",
        "/users",
        Some(admin),
        Some(json!({"email": email, "password": PASSWORD})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let login = login(gw.addr, email, PASSWORD);
    assert_eq!(login.status, 201, "{}", login.text());
    (
        id,
        login.json()["access_token"].as_str().unwrap().to_string(),
    )
}

fn join(gw: &Gateway, admin: &str, user: &str, role: &str) {
    let path = format!("/domains/{D}/members/{user}");
    let r = api_call(
        gw.addr,
        "PUT",
        &path,
        Some(admin),
        Some(json!({"role": role})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

fn chat(gw: &Gateway, bearer: &str, model: &str, stream: bool) -> u16 {
    let auth = format!("Bearer {bearer}");
    let r = post_with(
        gw.addr,
        &format!("/proxy/{D}/v1/chat/completions"),
        &[("Authorization", &auth)],
        &chat_body(model, stream, ""),
    );
    r.status
}

fn usage(gw: &Gateway, bearer: &str, path_and_query: &str) -> Response {
    api_call(gw.addr, "GET", path_and_query, Some(bearer), None)
}

fn domain_usage(gw: &Gateway, bearer: &str, query: &str) -> Value {
    let r = usage(gw, bearer, &format!("/domains/{D}/usage?{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Waits (bounded) until the domain's stored usage counts `requests`.
fn wait_for_requests(gw: &Gateway, admin: &str, requests: u64) {
    let mut last = Value::Null;
    let stored = eventually(FLUSHED, || {
        last = domain_usage(gw, admin, "group_by=user");
        last["total"]["requests"] == requests
    });
    assert!(stored, "usage never reached {requests} requests: {last}");
}

/// The row whose `field` is `value`.
fn row<'a>(answer: &'a Value, field: &str, value: &Value) -> &'a Value {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| &r[field] == value)
        .unwrap_or_else(|| panic!("no row with {field} = {value} in {answer}"))
}

/// (requests, errors) of a row or a total.
fn counts(v: &Value) -> (u64, u64) {
    (
        v["requests"].as_u64().unwrap(),
        v["errors"].as_u64().unwrap(),
    )
}

/// RFC 4180 records (quoted fields, doubled quotes).
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut field) = (Vec::new(), Vec::new(), String::new());
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

fn usage_by_role_and_format(driver: &str) {
    let (vllm, body) = config();
    let mut gw = gateway(driver, &body);
    let admin = admin_token(gw.addr);
    let (alice_id, alice) = user(&gw, &admin, "alice@usage.test");
    let (bob_id, bob) = user(&gw, &admin, "bob@usage.test");
    let (_, carol) = user(&gw, &admin, "carol@usage.test");
    join(&gw, &admin, &alice_id, "admin");
    join(&gw, &admin, &bob_id, "member");
    let made = api_call(
        gw.addr,
        "POST",
        &format!("/domains/{D}/keys"),
        Some(&alice),
        Some(json!({"name": "ci"})),
    );
    assert_eq!(made.status, 201, "{}", made.text());
    let key_id = made.json()["id"].as_str().unwrap().to_string();
    let key = made.json()["key"].as_str().unwrap().to_string();

    // bob: 3 whole answers, 1 stream, 1 model the domain does not serve (404: an error of
    // the domain, since he was authorized for it). alice: 1 with her token, 2 with the key.
    // carol is no member: refused before authorization, not the domain's usage.
    for stream in [false, false, false, true] {
        assert_eq!(chat(&gw, &bob, VLLM_MODEL, stream), 200);
    }
    assert_eq!(chat(&gw, &bob, UNSERVED, false), 404);
    assert_eq!(chat(&gw, &alice, VLLM_MODEL, false), 200);
    assert_eq!(chat(&gw, &key, VLLM_MODEL, false), 200);
    assert_eq!(chat(&gw, &key, VLLM_MODEL, true), 200);
    assert_eq!(chat(&gw, &carol, VLLM_MODEL, false), 403);
    wait_for_requests(&gw, &admin, 8);

    // The platform admin and the domain admin see everything.
    for viewer in [&admin, &alice] {
        let by_user = domain_usage(&gw, viewer, "group_by=user");
        assert_eq!(by_user["domain_id"], D);
        assert_eq!(by_user["group_by"], "user");
        assert_eq!(by_user["rows"].as_array().unwrap().len(), 2, "{by_user}");
        assert_eq!(counts(row(&by_user, "user_id", &json!(bob_id))), (5, 1));
        assert_eq!(counts(row(&by_user, "user_id", &json!(alice_id))), (3, 0));
        assert_eq!(counts(&by_user["total"]), (8, 1));
    }
    let by_key = domain_usage(&gw, &admin, "group_by=key");
    assert_eq!(counts(row(&by_key, "key_id", &Value::Null)), (6, 1));
    assert_eq!(counts(row(&by_key, "key_id", &json!(key_id))), (2, 0));
    let by_model = domain_usage(&gw, &admin, "");
    assert_eq!(by_model["group_by"], "model", "the default grouping");
    assert_eq!(counts(row(&by_model, "model", &json!(VLLM_MODEL))), (7, 0));
    assert_eq!(counts(row(&by_model, "model", &json!(UNSERVED))), (1, 1));
    for r in by_model["rows"].as_array().unwrap() {
        let (p, c) = (r["prompt_tokens"].as_u64(), r["completion_tokens"].as_u64());
        assert_eq!(r["total_tokens"].as_u64(), Some(p.unwrap() + c.unwrap()));
    }
    // Tokens: seven answers (two of them streams the gateway asked usage of), each what
    // the host reports for this prompt, asked directly.
    let direct: Value = post(
        vllm.addr,
        "/v1/chat/completions",
        &chat_body(VLLM_MODEL, false, ""),
    )
    .json();
    let served = row(&by_model, "model", &json!(VLLM_MODEL));
    assert_eq!(
        (
            served["prompt_tokens"].as_u64(),
            served["completion_tokens"].as_u64()
        ),
        (
            Some(7 * direct["usage"]["prompt_tokens"].as_u64().unwrap()),
            Some(7 * direct["usage"]["completion_tokens"].as_u64().unwrap())
        ),
        "{by_model}"
    );
    assert_eq!(row(&by_model, "model", &json!(UNSERVED))["total_tokens"], 0);
    let by_hour = domain_usage(&gw, &admin, "group_by=hour");
    assert_eq!(counts(&by_hour["total"]), (8, 1));
    let hour = by_hour["rows"][0]["hour"].as_str().unwrap();
    assert!(hour.ends_with(":00:00Z") && hour.len() == 20, "{hour}");
    let by_day = domain_usage(&gw, &admin, "group_by=day");
    assert!(by_day["rows"][0]["day"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00Z"));

    // A plain member sees only their own rows; a stranger and an anonymous caller nothing.
    let bobs = domain_usage(&gw, &bob, "group_by=user");
    assert_eq!(bobs["rows"].as_array().unwrap().len(), 1, "{bobs}");
    assert_eq!(counts(&bobs["total"]), (5, 1));
    let stranger = usage(&gw, &carol, &format!("/domains/{D}/usage"));
    assert_eq!(stranger.status, 404, "{}", stranger.text());
    let nobody = api_call(gw.addr, "GET", &format!("/domains/{D}/usage"), None, None);
    assert_eq!(nobody.status, 401);
    let unknown = usage(&gw, &admin, "/domains/no-such-domain/usage");
    assert_eq!(unknown.status, 404);

    // The caller's own usage across domains.
    let mine = usage(&gw, &bob, "/users/profile/usage");
    assert_eq!(mine.status, 200, "{}", mine.text());
    let mine = mine.json();
    assert_eq!(mine["user_id"], bob_id.as_str());
    assert_eq!(mine["group_by"], "domain");
    assert_eq!(counts(row(&mine, "domain_id", &json!(D))), (5, 1));
    let alices = usage(&gw, &alice, "/users/profile/usage?group_by=model").json();
    assert_eq!(counts(&alices["total"]), (3, 0));

    // CSV: a header, one line per row, the comma in a model name quoted.
    let auth = format!("Bearer {admin}");
    let csv = raw(
        gw.addr,
        &request_bytes(
            "GET",
            &format!("/domains/{D}/usage?group_by=model"),
            &[("Authorization", &auth), ("Accept", "text/csv")],
            b"",
        ),
    )
    .unwrap();
    assert_eq!(csv.status, 200, "{}", csv.text());
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    let records = csv_records(&csv.text());
    assert_eq!(
        records[0],
        [
            "model",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "errors"
        ]
    );
    assert_eq!(records.len(), 3, "{}", csv.text());
    let unserved = records
        .iter()
        .find(|r| r[0] == UNSERVED)
        .expect("the comma round-trips");
    assert_eq!((unserved[1].as_str(), unserved[5].as_str()), ("1", "1"));

    // Bad questions: 400 naming the parameter.
    for (query, names) in [
        ("group_by=week", "group_by"),
        ("group_by=domain", "group_by"),
        ("from=yesterday", "from"),
        ("to=2026-02-30T00:00:00Z", "to"),
        ("from=2000000000&to=1000000000", "from"),
        ("from=0&to=2000000000", "from"),
        ("limit=3", "limit"),
    ] {
        let r = usage(&gw, &admin, &format!("/domains/{D}/usage?{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(names), "{query}: {message}");
    }
    let r = usage(&gw, &bob, "/users/profile/usage?group_by=user");
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("domain, model, hour, day"),
        "{}",
        r.text()
    );
    // A range with nothing in it, in RFC 3339 with an offset.
    let later = domain_usage(
        &gw,
        &admin,
        "from=2100-01-01T00:00:00%2B02:00&to=2100-01-02T00:00:00Z",
    );
    assert_eq!(counts(&later["total"]), (0, 0));
    assert_eq!(later["from"], "2099-12-31T22:00:00Z");

    // SIGTERM right after two more requests: the workers' last batches and the writer's
    // last flush happen before the exit, so a restart sees them at once.
    assert_eq!(chat(&gw, &bob, VLLM_MODEL, false), 200);
    assert_eq!(chat(&gw, &bob, VLLM_MODEL, true), 200);
    gw.expect_clean_exit("TERM");
    let path = gw.config_path.clone();
    drop(gw);
    let gw = gateway_from(&path);
    let admin = admin_token(gw.addr);
    let after = domain_usage(&gw, &admin, "group_by=user");
    assert_eq!(counts(&after["total"]), (10, 1), "{after}");

    // kill -9 once a request is flushed: it stays.
    assert_eq!(chat(&gw, &bob, VLLM_MODEL, false), 200);
    wait_for_requests(&gw, &admin, 11);
    drop(gw);
    let gw = gateway_from(&path);
    let admin = admin_token(gw.addr);
    let after = domain_usage(&gw, &admin, "group_by=user");
    assert_eq!(counts(row(&after, "user_id", &json!(bob_id))), (8, 1));
    assert_eq!(counts(&after["total"]), (11, 1));
}

/// SIGUSR2: the old process stores its sums before it leaves, the successor (same
/// address, same store) answers them. The writer's interval is a minute here, so what is
/// stored was written by the stop.
fn handover_keeps_usage(driver: &str) {
    let (_vllm, body) = config();
    let body = body.replace("flush_ms = 200", "flush_ms = 60000");
    let mut gw = gateway(driver, &body);
    let mut reaper = Reaper(None);
    let admin = admin_token(gw.addr);
    for stream in [false, true, false] {
        assert_eq!(chat(&gw, &admin, VLLM_MODEL, stream), 200);
    }
    gw.expect_clean_exit("USR2");
    reaper.0 = successor_pid(&gw.log());
    assert!(reaper.0.is_some(), "no hand-over:\n{}", gw.log());
    let answer = domain_usage(&gw, &admin, "");
    assert_eq!(counts(&answer["total"]), (3, 0), "{answer}");
}

fn usage_off_stores_nothing(driver: &str) {
    let (_vllm, body) = config();
    let body = body.replace("[usage]\n", "[usage]\nenabled = false\n");
    let gw = gateway(driver, &body);
    let admin = admin_token(gw.addr);
    assert_eq!(chat(&gw, &admin, VLLM_MODEL, false), 200);
    std::thread::sleep(Duration::from_millis(1500));
    let answer = domain_usage(&gw, &admin, "");
    assert_eq!(counts(&answer["total"]), (0, 0), "{answer}");
    // The token series is on the management listener's /metrics all the same.
    let metrics = get(management_addr(&gw), "/metrics").text();
    assert!(
        metrics.contains("# TYPE cubegate_tokens_total counter"),
        "{metrics}"
    );
}

for_each_driver!(
    usage_by_role_and_format,
    handover_keeps_usage,
    usage_off_stores_nothing
);
