//! Token verification end to end: the real gateway (both drivers), `[auth] mode = "jwt"`,
//! two trusted issuers (an inline JWKS with an Ed25519 and an RSA key; an HMAC secret from
//! the environment), the backend simulator behind it. Tokens are made with `jsonwebtoken`
//! and the test-only keys in `tests/keys/`.

mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use common::*;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

const ISS: &str = "https://idp.test/";
const ISS_HS: &str = "https://hs.test/";
const AUD: &str = "cubegate";
const HS_ENV: &str = "CUBEGATE_TEST_HS_SECRET";
const HS_SECRET: &str = "e2e-test-only-hmac-secret-0123456789-abcdef";
const DOM_A: &str = "dom-a";
const DOM_B: &str = "dom-b";
const DOM_O: &str = "dom-o";
const DOM_SPY: &str = "dom-spy";
const SPY_MODEL: &str = "spy-model";

fn key_file(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&key_file("rsa2048.pem")).unwrap()
}

fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(&key_file("ed25519.pem")).unwrap()
}

/// The inline JWKS: the Ed25519 key (kid "ed") and the RSA key (kid "rsa", `alg` RS256).
fn jwks() -> String {
    let mut rsa =
        serde_json::to_value(Jwk::from_encoding_key(&rsa_key(), Algorithm::RS256).unwrap())
            .unwrap();
    rsa["kid"] = "rsa".into();
    let pem = String::from_utf8(key_file("ed25519.pub.pem")).unwrap();
    let der = STANDARD
        .decode(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    assert_eq!(der.len(), 44, "Ed25519 SubjectPublicKeyInfo");
    let ed = json!({"kty": "OKP", "crv": "Ed25519", "x": B64.encode(&der[12..]), "kid": "ed", "use": "sig"});
    let doc = json!({"keys": [ed, rsa]}).to_string();
    assert!(!doc.contains('\''), "fits in a TOML literal string");
    doc
}

/// The gateway's config (after `[proxy]`): auth, short timeouts, and four domains.
fn config(vllm: SocketAddr, ollama: SocketAddr, spy: SocketAddr, namespace: &str) -> String {
    let backends = domains_config(&[
        (DOM_A, &[("vllm", vllm, &[VLLM_MODEL])]),
        (DOM_B, &[("vllm", vllm, &[VLLM_MODEL])]),
        (DOM_O, &[("ollama", ollama, &[OLLAMA_MODEL])]),
        (DOM_SPY, &[("vllm", spy, &[SPY_MODEL])]),
    ]);
    let rest = backends
        .strip_prefix("[auth]\nmode = \"none\"\n")
        .expect("domains_config starts with [auth]");
    format!(
        "[auth]\nmode = \"jwt\"\nleeway_s = 30\nclaims_namespace = \"{namespace}\"\n\n\
         [[auth.trusted]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks = '{}'\n\n\
         [[auth.trusted]]\nissuer = \"{ISS_HS}\"\naudiences = [\"{AUD}\"]\nhs_secret_env = \"{HS_ENV}\"\n\n{rest}",
        jwks()
    )
}

/// A fake upstream that records each request head it gets (the simulator does not echo
/// `X-User-Id`) and answers a small JSON body. Serves at most `n` connections.
fn spy_upstream(n: usize) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..n {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut buf = Vec::new();
            let mut tmp = [0u8; 8192];
            // Head, then as much body as Content-Length says (bounded reads).
            for _ in 0..64 {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&tmp[..k]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let _ = tx.send(head);
            let body = br#"{"id":"spy","object":"chat.completion","choices":[]}"#;
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = s.write_all(body);
        }
    });
    (addr, rx)
}

struct Env {
    gw: Gateway,
    _vllm: Proc,
    ollama: Proc,
    spy: mpsc::Receiver<String>,
}

fn start(driver: &str, namespace: &str) -> Env {
    let vllm = sim("vllm", &["--tokens", "3"]);
    let ollama = sim("ollama", &["--tokens", "3"]);
    let (spy_addr, spy) = spy_upstream(8);
    let body = config(vllm.addr, ollama.addr, spy_addr, namespace);
    let gw = gateway_env(driver, &body, &[(HS_ENV, HS_SECRET)]);
    Env {
        gw,
        _vllm: vllm,
        ollama,
        spy,
    }
}

/// Good claims for `iss`, with `extra` merged in (a null removes a claim).
fn claims(iss: &str, extra: Value) -> Value {
    let now = unix_now();
    let mut v = json!({"iss": iss, "sub": "alice", "aud": AUD, "iat": now, "exp": now + 600, "domains": [DOM_A, DOM_O]});
    for (k, x) in extra.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn ed_token(extra: Value) -> String {
    sign(Algorithm::EdDSA, Some("ed"), &claims(ISS, extra), &ed_key())
}

fn hs_token(alg: Algorithm, extra: Value) -> String {
    sign(
        alg,
        None,
        &claims(ISS_HS, extra),
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
}

/// A request with `Authorization: Bearer <token>`; returns the response and its raw bytes.
fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    raw(
        addr,
        &request_bytes(method, path, &headers, body.as_bytes()),
    )
    .expect("response")
}

fn chat(addr: SocketAddr, domain: &str, token: Option<&str>) -> Response {
    call(
        addr,
        "POST",
        &format!("/proxy/{domain}/v1/chat/completions"),
        token,
        &chat_body(VLLM_MODEL, false, ""),
    )
}

fn pull(addr: SocketAddr, token: &str) -> Response {
    call(
        addr,
        "POST",
        &format!("/proxy/{DOM_O}/api/pull"),
        Some(token),
        &format!(r#"{{"model":"{OLLAMA_MODEL}","stream":false}}"#),
    )
}

/// The whole response as text, to look for leaked token material.
fn everything(r: &Response) -> String {
    let mut s = String::new();
    for (n, v) in &r.headers {
        s.push_str(&format!("{n}: {v}\n"));
    }
    s.push_str(&r.text());
    s
}

fn assert_no_token_material(r: &Response, token: &str, log: &str) {
    let all = everything(r);
    for (i, part) in token.split('.').enumerate() {
        // Parts long enough not to occur by chance.
        if part.len() >= 16 {
            assert!(
                !all.contains(part),
                "token part {i} echoed in the response:\n{all}"
            );
            assert!(
                !log.contains(part),
                "token part {i} in the gateway's log:\n{log}"
            );
        }
    }
}

/// 401 with the Bearer challenge naming `what`, and no token material anywhere.
fn assert_401(r: &Response, token: &str, what: &str, label: &str, env: &Env) {
    let what_label = format!("{label} ({what})");
    assert_eq!(r.status, 401, "{what_label}: {}", r.text());
    assert_eq!(r.error_code(), "invalid_token", "{what_label}");
    let challenge = r
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{what_label}: no WWW-Authenticate"));
    assert!(
        challenge.starts_with("Bearer "),
        "{what_label}: {challenge}"
    );
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    let desc = challenge
        .split("error_description=\"")
        .nth(1)
        .and_then(|d| d.split('"').next())
        .unwrap_or_else(|| panic!("{what_label}: no error_description in {challenge}"));
    assert!(
        desc.to_lowercase().contains(what),
        "{what_label}: error_description {desc:?}"
    );
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.to_lowercase().contains(what),
        "{what_label}: error message {message:?}"
    );
    assert_no_token_material(r, token, &env.gw.log());
}

fn good_tokens_for_each_key_type(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    let rsa = rsa_key();
    let tokens = [
        ("EdDSA", ed_token(json!({}))),
        (
            "RS256",
            sign(Algorithm::RS256, Some("rsa"), &claims(ISS, json!({})), &rsa),
        ),
        (
            "RS256 without kid",
            sign(Algorithm::RS256, None, &claims(ISS, json!({})), &rsa),
        ),
        (
            "EdDSA without kid",
            sign(Algorithm::EdDSA, None, &claims(ISS, json!({})), &ed_key()),
        ),
        ("HS256", hs_token(Algorithm::HS256, json!({}))),
        ("HS384", hs_token(Algorithm::HS384, json!({}))),
        ("HS512", hs_token(Algorithm::HS512, json!({}))),
    ];
    for (what, token) in &tokens {
        let r = chat(addr, DOM_A, Some(token));
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.header("x-sim-saw-authorization"), Some("no"), "{what}");
        assert_eq!(r.header("x-sim-domain-id"), Some(DOM_A), "{what}");
        assert!(r.json()["choices"].is_array(), "{what}");
        let r = call(
            addr,
            "GET",
            &format!("/proxy/{DOM_A}/v1/models"),
            Some(token),
            "",
        );
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        // Ollama's native API, on the domain the token also lists.
        let r = call(
            addr,
            "POST",
            &format!("/proxy/{DOM_O}/api/chat"),
            Some(token),
            &chat_body(OLLAMA_MODEL, false, ""),
        );
        assert_eq!(r.status, 200, "{what} (ollama): {}", r.text());
        assert_eq!(r.header("x-sim-saw-authorization"), Some("no"), "{what}");
    }
    // The scheme is case-insensitive.
    let r = raw(
        addr,
        &request_bytes(
            "POST",
            &format!("/proxy/{DOM_A}/v1/chat/completions"),
            &[("authorization", &format!("bearer {}", tokens[0].1))],
            chat_body(VLLM_MODEL, false, "").as_bytes(),
        ),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // Signature checks by algorithm: each token is verified once per worker at most (then
    // cached), and no algorithm that was not used shows up.
    let mgmt = management_addr(&env.gw);
    let checks = |alg: &str| {
        metric(
            mgmt,
            &format!("cubegate_token_signature_checks_total{{alg=\"{alg}\"}}"),
        )
    };
    for alg in ["HS256", "HS384", "HS512"] {
        assert!((1..=2).contains(&checks(alg)), "{alg}: {}", checks(alg));
    }
    assert!(checks("RS256") >= 2 && checks("EdDSA") >= 2);
    for alg in ["PS256", "ES256", "ES384", "RS512"] {
        assert_eq!(checks(alg), 0, "{alg}");
    }
    let _ = &env.ollama;
}

fn refusals_are_401_with_the_reason(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    let now = unix_now();
    let rsa = rsa_key();
    let other_ed = EncodingKey::from_ed_pem(&key_file("ed25519-other.pem")).unwrap();
    let other_rsa = EncodingKey::from_rsa_pem(&key_file("rsa2048-other.pem")).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", ed_token(json!({"exp": now - 3600})), "expired"),
        (
            "expired HS256",
            hs_token(Algorithm::HS256, json!({"exp": now - 3600})),
            "expired",
        ),
        (
            "untrusted issuer",
            ed_token(json!({"iss": "https://evil.test/"})),
            "issuer",
        ),
        ("no issuer", ed_token(json!({"iss": null})), "issuer"),
        (
            "bad signature (other Ed25519 key)",
            sign(
                Algorithm::EdDSA,
                Some("ed"),
                &claims(ISS, json!({})),
                &other_ed,
            ),
            "signature",
        ),
        (
            "bad signature (other RSA key)",
            sign(
                Algorithm::RS256,
                Some("rsa"),
                &claims(ISS, json!({})),
                &other_rsa,
            ),
            "signature",
        ),
        (
            "bad signature (other HS secret)",
            sign(
                Algorithm::HS256,
                None,
                &claims(ISS_HS, json!({})),
                &EncodingKey::from_secret(b"a-different-secret-of-32-bytes-or-more!!"),
            ),
            "signature",
        ),
        (
            "unknown kid",
            sign(
                Algorithm::EdDSA,
                Some("rotated-away"),
                &claims(ISS, json!({})),
                &ed_key(),
            ),
            "unknown key",
        ),
        ("not yet valid", ed_token(json!({"nbf": now + 3600})), "nbf"),
        (
            "issued in the future",
            ed_token(json!({"iat": now + 3600})),
            "iat",
        ),
        (
            "wrong audience",
            ed_token(json!({"aud": "someone-else"})),
            "aud",
        ),
        ("no expiry", ed_token(json!({"exp": null})), "exp"),
        (
            "refresh token",
            ed_token(json!({"type": "refresh"})),
            "refresh",
        ),
        (
            "PS256 against the RS256-only JWK",
            sign(Algorithm::PS256, Some("rsa"), &claims(ISS, json!({})), &rsa),
            "algorithm",
        ),
        (
            "HS256 with the RSA public key as secret",
            sign(
                Algorithm::HS256,
                Some("rsa"),
                &claims(ISS, json!({})),
                &EncodingKey::from_secret(&key_file("rsa2048.pub.pem")),
            ),
            "algorithm",
        ),
        ("malformed", "abc.def.ghi".to_string(), "malformed"),
    ];
    let mut alg_none = ed_token(json!({}));
    alg_none.truncate(alg_none.rfind('.').unwrap() + 1);
    let head_end = alg_none.find('.').unwrap();
    alg_none.replace_range(..head_end, &B64.encode(r#"{"alg":"none"}"#));
    for (what, token, reason) in cases.iter().map(|(w, t, r)| (*w, t.as_str(), *r)).chain([(
        "alg none",
        alg_none.as_str(),
        "algorithm",
    )]) {
        for domain in [DOM_A, DOM_B, "no-such-domain"] {
            let r = chat(addr, domain, Some(token));
            assert_401(&r, token, reason, &format!("{what} on {domain}"), &env);
        }
    }
    // No credential at all: a plain challenge.
    let r = chat(addr, DOM_A, None);
    assert_eq!(r.status, 401, "{}", r.text());
    let challenge = r.header("www-authenticate").expect("WWW-Authenticate");
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    // Another scheme.
    let basic = raw(
        addr,
        &request_bytes(
            "POST",
            &format!("/proxy/{DOM_A}/v1/chat/completions"),
            &[("Authorization", "Basic YWxpY2U6c2VjcmV0")],
            chat_body(VLLM_MODEL, false, "").as_bytes(),
        ),
    )
    .unwrap();
    assert_eq!(basic.status, 401, "{}", basic.text());
    assert!(basic
        .header("www-authenticate")
        .is_some_and(|c| c.starts_with("Bearer")));
    assert!(!everything(&basic).contains("YWxpY2U6c2VjcmV0"));
}

fn forbidden_is_403(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    // Valid, but for another domain / no domains at all.
    for (what, token) in [
        (
            "domains lists others",
            ed_token(json!({"domains": [DOM_B]})),
        ),
        ("domains empty", ed_token(json!({"domains": []}))),
        ("no domains claim", ed_token(json!({"domains": null}))),
        (
            "domains a single other string",
            hs_token(Algorithm::HS256, json!({"domains": DOM_B})),
        ),
        (
            "role user",
            ed_token(json!({"domains": [DOM_B], "role": "user"})),
        ),
    ] {
        let r = chat(addr, DOM_A, Some(&token));
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        assert_eq!(r.error_code(), "forbidden", "{what}");
        assert!(
            r.header("www-authenticate").is_none(),
            "{what}: 403 is no challenge"
        );
        assert!(
            r.text().contains(DOM_A),
            "{what}: names the domain: {}",
            r.text()
        );
    }
    let single = hs_token(Algorithm::HS256, json!({"domains": DOM_A}));
    assert_eq!(
        chat(addr, DOM_A, Some(&single)).status,
        200,
        "domains as one string"
    );
    // Admin-only path: the token lists the domain but is no admin.
    let member = ed_token(json!({"domains": [DOM_O]}));
    let r = pull(addr, &member);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "forbidden");
    for path in ["push", "create", "copy"] {
        let r = call(
            addr,
            "POST",
            &format!("/proxy/{DOM_O}/api/{path}"),
            Some(&member),
            &format!(r#"{{"model":"{OLLAMA_MODEL}"}}"#),
        );
        assert_eq!(r.status, 403, "{path}: {}", r.text());
    }
    let r = call(
        addr,
        "DELETE",
        &format!("/proxy/{DOM_O}/api/delete"),
        Some(&member),
        &format!(r#"{{"model":"{OLLAMA_MODEL}"}}"#),
    );
    assert_eq!(r.status, 403, "delete: {}", r.text());
    // The same token may use the domain's ordinary API.
    let r = call(
        addr,
        "POST",
        &format!("/proxy/{DOM_O}/api/chat"),
        Some(&member),
        &chat_body(OLLAMA_MODEL, false, ""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // An admin may pull (HS and JWKS issuers alike).
    for admin in [
        ed_token(json!({"domains": [DOM_O], "role": "admin"})),
        hs_token(Algorithm::HS512, json!({"domains": null, "role": "admin"})),
    ] {
        let r = pull(addr, &admin);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["status"], "success");
        assert_eq!(r.header("x-sim-saw-authorization"), Some("no"));
    }
    let _ = &env.ollama;
}

fn namespaced_claims(driver: &str) {
    let env = start(driver, "https://cube.example/");
    let addr = env.gw.addr;
    let ns = |extra: Value| {
        let mut c = json!({"domains": null});
        for (k, v) in extra.as_object().unwrap() {
            c[format!("https://cube.example/{k}")] = v.clone();
        }
        ed_token(c)
    };
    let r = chat(addr, DOM_A, Some(&ns(json!({"domains": [DOM_A]}))));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = chat(addr, DOM_A, Some(&ns(json!({"domains": [DOM_B]}))));
    assert_eq!(r.status, 403, "{}", r.text());
    // Another namespace does not count.
    let mut c = json!({"domains": null});
    c["https://evil.example/domains"] = json!([DOM_A]);
    c["https://evil.example/role"] = json!("admin");
    let r = chat(addr, DOM_A, Some(&ed_token(c)));
    assert_eq!(r.status, 403, "{}", r.text());
    // Namespaced admin role opens the admin path.
    let r = pull(addr, &ns(json!({"domains": [DOM_O], "role": "user"})));
    assert_eq!(r.status, 403, "{}", r.text());
    let r = pull(addr, &ns(json!({"domains": [DOM_O], "role": "admin"})));
    assert_eq!(r.status, 200, "{}", r.text());
}

fn upstream_sees_identity_not_the_token(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    for (sub, token) in [
        ("alice", ed_token(json!({"domains": [DOM_SPY]}))),
        (
            "svc-42",
            hs_token(
                Algorithm::HS256,
                json!({"sub": "svc-42", "domains": [DOM_SPY]}),
            ),
        ),
    ] {
        let r = call(
            addr,
            "POST",
            &format!("/proxy/{DOM_SPY}/v1/chat/completions"),
            Some(&token),
            &chat_body(SPY_MODEL, false, ""),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let head = env
            .spy
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream saw the request");
        let lines: Vec<String> = head
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .lines()
            .map(str::to_lowercase)
            .collect();
        assert!(
            !lines.iter().any(|l| l.starts_with("authorization:")),
            "Authorization reached the upstream:\n{head}"
        );
        for part in token.split('.') {
            assert!(
                !head.contains(part),
                "token material reached the upstream:\n{head}"
            );
        }
        let user: Vec<_> = lines
            .iter()
            .filter(|l| l.starts_with("x-user-id:"))
            .collect();
        assert_eq!(
            user,
            [&format!("x-user-id: {}", sub.to_lowercase())],
            "{head}"
        );
        assert!(lines.contains(&format!("x-domain-id: {DOM_SPY}")), "{head}");
        assert!(
            lines.iter().any(|l| l.starts_with("x-request-id:")),
            "{head}"
        );
    }
    // Client-sent X-User-Id / X-Domain-Id are not passed through as the identity.
    let token = ed_token(json!({"sub": "bob", "domains": [DOM_SPY]}));
    let auth = format!("Bearer {token}");
    let r = raw(
        addr,
        &request_bytes(
            "POST",
            &format!("/proxy/{DOM_SPY}/v1/chat/completions"),
            &[
                ("Authorization", &auth),
                ("X-User-Id", "root"),
                ("X-Domain-Id", DOM_A),
                ("Content-Type", "application/json"),
            ],
            chat_body(SPY_MODEL, false, "").as_bytes(),
        ),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let head = env
        .spy
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .to_lowercase();
    let users: Vec<_> = head
        .lines()
        .filter(|l| l.starts_with("x-user-id:"))
        .collect();
    assert_eq!(users, ["x-user-id: bob"], "{head}");
    let domains: Vec<_> = head
        .lines()
        .filter(|l| l.starts_with("x-domain-id:"))
        .collect();
    assert_eq!(domains, [format!("x-domain-id: {DOM_SPY}")], "{head}");
}

/// Two `Authorization` headers are ambiguous (RFC 9110: not a list-valued field): a proxy
/// in front may judge the first while cubegate judges the last. Neither order may be
/// served.
fn duplicate_authorization_headers_are_refused(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    let good = format!("Bearer {}", ed_token(json!({})));
    let bad = "Bearer not.a.token".to_string();
    let single = chat(addr, DOM_A, Some(&good["Bearer ".len()..]));
    assert_eq!(single.status, 200, "control: {}", single.text());
    for (what, first, second) in [
        ("good, bad", &good, &bad),
        ("bad, good", &bad, &good),
        ("good, good", &good, &good),
    ] {
        let r = raw(
            addr,
            &request_bytes(
                "POST",
                &format!("/proxy/{DOM_A}/v1/chat/completions"),
                &[
                    ("Content-Type", "application/json"),
                    ("Authorization", first),
                    ("Authorization", second),
                ],
                chat_body(VLLM_MODEL, false, "").as_bytes(),
            ),
        )
        .expect("response");
        assert!(
            r.status == 400 || r.status == 401,
            "{what}: two Authorization headers answered {}: {}",
            r.status,
            r.text()
        );
    }
}

fn cache_verifies_once_per_worker(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    let mgmt = management_addr(&env.gw);
    let hits = "cubegate_token_cache_hits_total";
    let neg = "cubegate_token_cache_negative_hits_total";
    let ver = "cubegate_token_verifications_total";
    let (h0, n0, v0) = (metric(mgmt, hits), metric(mgmt, neg), metric(mgmt, ver));
    assert_eq!(v0, 0, "no token seen yet");
    let token = ed_token(json!({}));
    // Twenty requests, each on a new connection (spread over the workers).
    for i in 0..20 {
        let r = call(
            addr,
            "GET",
            &format!("/proxy/{DOM_A}/v1/models"),
            Some(&token),
            "",
        );
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let (h1, n1, v1) = (metric(mgmt, hits), metric(mgmt, neg), metric(mgmt, ver));
    assert!(
        v1 - v0 >= 1 && v1 - v0 <= 2,
        "verifications {} (2 workers)",
        v1 - v0
    );
    assert!(h1 - h0 >= 18, "cache hits {}", h1 - h0);
    assert_eq!(
        h1 - h0 + v1 - v0,
        20,
        "every request is a hit or a verification"
    );
    assert_eq!(n1, n0);
    // Twenty on one keep-alive connection.
    let mut reader = Reader::new(connect(addr));
    let auth = format!("Bearer {token}");
    for i in 0..20 {
        reader
            .stream
            .write_all(&request_bytes(
                "GET",
                &format!("/proxy/{DOM_A}/v1/models"),
                &[("Authorization", &auth)],
                b"",
            ))
            .unwrap();
        let r = reader.response().expect("response");
        assert_eq!(r.status, 200, "keep-alive request {i}");
    }
    let (h2, v2) = (metric(mgmt, hits), metric(mgmt, ver));
    assert!(
        v2 - v1 <= 1,
        "the keep-alive worker may not have seen it yet: {}",
        v2 - v1
    );
    assert!(v2 <= 2, "at most one verification per worker in all: {v2}");
    assert!(h2 - h1 >= 19, "keep-alive hits {}", h2 - h1);
    // A forged token twenty times: answered from the negative cache.
    let other = EncodingKey::from_ed_pem(&key_file("ed25519-other.pem")).unwrap();
    let forged = sign(
        Algorithm::EdDSA,
        Some("ed"),
        &claims(ISS, json!({})),
        &other,
    );
    for i in 0..20 {
        let r = chat(addr, DOM_A, Some(&forged));
        assert_eq!(r.status, 401, "forged {i}: {}", r.text());
        assert!(r
            .header("www-authenticate")
            .is_some_and(|c| c.contains("signature")));
    }
    let (h3, n3, v3) = (metric(mgmt, hits), metric(mgmt, neg), metric(mgmt, ver));
    assert!(
        v3 - v2 >= 1 && v3 - v2 <= 2,
        "forged verifications {}",
        v3 - v2
    );
    assert!(n3 - n1 >= 18, "negative hits {}", n3 - n1);
    assert_eq!(h3, h2, "a forged token is never a positive hit");
    // A different token with the same claims but one is a new verification, not a hit.
    let fresh = ed_token(json!({"jti": "another"}));
    assert_ne!(fresh, token);
    let r = call(
        addr,
        "GET",
        &format!("/proxy/{DOM_A}/v1/models"),
        Some(&fresh),
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(metric(mgmt, ver), v3 + 1);
}

/// Repeated requests (answered from the cache after the first) get the verifier's verdict:
/// a token expired but within the 30 s leeway keeps passing, one past it keeps failing
/// with the same reason.
fn cached_verdicts_agree_with_fresh_ones(driver: &str) {
    let env = start(driver, "");
    let addr = env.gw.addr;
    let now = unix_now();
    let in_leeway = ed_token(json!({"exp": now - 20}));
    for _ in 0..6 {
        assert_eq!(chat(addr, DOM_A, Some(&in_leeway)).status, 200);
    }
    let expired = ed_token(json!({"exp": now - 40}));
    for _ in 0..6 {
        let r = chat(addr, DOM_A, Some(&expired));
        assert_eq!(r.status, 401);
        assert!(r
            .header("www-authenticate")
            .is_some_and(|c| c.contains("expired")));
    }
}

for_each_driver!(
    good_tokens_for_each_key_type,
    refusals_are_401_with_the_reason,
    forbidden_is_403,
    namespaced_claims,
    upstream_sees_identity_not_the_token,
    cache_verifies_once_per_worker,
    cached_verdicts_agree_with_fresh_ones,
    duplicate_authorization_headers_are_refused,
);
