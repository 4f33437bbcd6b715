//! Raw bytes to the management listener itself (not through the public port): it reads
//! heads with the data plane's parser, so every ambiguous or oversized head gets the data
//! plane's status, code and words, in the management API's JSON shape, and the connection
//! closes. Well-formed requests, chunked bodies included, still work on both paths.

mod common;
use common::*;

fn login_body() -> String {
    format!(r#"{{"username":"{TEST_ADMIN_EMAIL}","password":"{TEST_ADMIN_PASSWORD}"}}"#)
}

/// Expects the refusal and that its message names the problem.
fn expect_named_refusal(
    addr: std::net::SocketAddr,
    raw: &str,
    status: u16,
    code: &str,
    names: &str,
) {
    let r = expect_refusal(addr, raw.as_bytes(), status, code, true);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(names), "{raw:?}: {message}");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

fn ambiguous_heads_are_refused(driver: &str) {
    let gw = gateway(driver, "[auth]\nmode = \"jwt\"\n");
    let mgmt = management_addr(&gw);
    let p = "/users/tokens/issue";
    let body = login_body();
    let n = body.len();
    let cases = [
        (
            format!("POST {p} HTTP/1.1\r\nHost: m\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"),
            "both Content-Length and Transfer-Encoding",
        ),
        (
            format!("POST {p} HTTP/1.1\r\nHost: m\r\nContent-Length: {n}\r\nContent-Length: {}\r\n\r\n{body}", n + 5),
            "conflicting Content-Length",
        ),
        (
            format!("POST {p} HTTP/1.1\nHost: m\r\nContent-Length: {n}\r\n\r\n{body}"),
            "line ending",
        ),
        (
            format!("POST {p} HTTP/1.1\r\nHost: m\r\nContent-Length : {n}\r\n\r\n{body}"),
            "header name",
        ),
        (
            "GET /users/profile HTTP/1.1\r\nHost: m\r\nX-A: 1\r\n folded\r\n\r\n".to_string(),
            "malformed request",
        ),
        (
            "GET /users/profile HTTP/1.1\r\nHost: m\r\nX-A: a\x01b\r\n\r\n".to_string(),
            "control characters",
        ),
    ];
    for (raw, names) in &cases {
        expect_named_refusal(mgmt, raw, 400, "malformed_request", names);
    }
    // Over-long heads: the management API's 32 KiB, the data plane's 8 KiB request line.
    let big_head = format!(
        "GET /users/profile HTTP/1.1\r\nHost: m\r\nX-Big: {}\r\n\r\n",
        "b".repeat(40_000)
    );
    expect_named_refusal(mgmt, &big_head, 431, "head_too_large", "32768 bytes");
    let long_uri = format!(
        "GET /users/{} HTTP/1.1\r\nHost: m\r\n\r\n",
        "a".repeat(9000)
    );
    expect_named_refusal(mgmt, &long_uri, 414, "uri_too_long", "URI too long");
    // And the listener still answers well-formed requests.
    let r = raw(mgmt, &request_bytes("POST", p, &[], body.as_bytes())).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
}

/// A chunked body is decoded on both paths: sent straight to the management listener, and
/// forwarded (still chunked) by the data plane from the public port.
fn chunked_bodies_are_decoded(driver: &str) {
    let gw = gateway(driver, "[auth]\nmode = \"jwt\"\n");
    let body = login_body();
    let (first, rest) = body.split_at(10);
    let chunked = format!(
        "POST /users/tokens/issue HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n",
        first.len(),
        rest.len()
    );
    for addr in [management_addr(&gw), gw.addr] {
        let r = raw(addr, chunked.as_bytes()).unwrap();
        assert_eq!(r.status, 201, "{addr}: {}", r.text());
        assert!(r.json()["access_token"].is_string());
    }
    let broken =
        "POST /users/tokens/issue HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    let r = raw(management_addr(&gw), broken.as_bytes()).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
}

for_each_driver!(ambiguous_heads_are_refused, chunked_bodies_are_decoded);
