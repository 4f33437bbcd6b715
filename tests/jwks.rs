//! Keys fetched from a JWKS URL: loaded at start, rotated without a restart (a token naming
//! an unknown `kid` triggers an immediate, rate-limited refresh), and kept when the JWKS
//! endpoint fails. The endpoint is a small scripted HTTP server on loopback.

mod common;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ISSUER: &str = "https://idp.test/";

struct Key {
    kid: &'static str,
    pair: Ed25519KeyPair,
}

impl Key {
    fn new(kid: &'static str, seed: u8) -> Key {
        Key {
            kid,
            pair: Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap(),
        }
    }

    fn jwk(&self) -> String {
        format!(
            r#"{{"kty":"OKP","crv":"Ed25519","kid":"{}","alg":"EdDSA","use":"sig","x":"{}"}}"#,
            self.kid,
            URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref())
        )
    }

    fn token(&self, sub: &str, domains: &[&str]) -> String {
        self.token_of(ISSUER, sub, domains)
    }

    fn token_of(&self, iss: &str, sub: &str, domains: &[&str]) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let header = format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#, self.kid);
        let claims = serde_json::json!({"iss": iss, "sub": sub, "exp": exp, "aud": "cubegate", "domains": domains});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.pair.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// Serves `GET /jwks` with whatever `doc` holds (or 500 while `failing`), counting fetches.
struct JwksServer {
    addr: std::net::SocketAddr,
    doc: Arc<Mutex<String>>,
    failing: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl JwksServer {
    fn start(doc: String) -> JwksServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let s = JwksServer {
            addr: listener.local_addr().unwrap(),
            doc: Arc::new(Mutex::new(doc)),
            failing: Arc::default(),
            fetches: Arc::default(),
            stop: Arc::default(),
        };
        let (doc, failing, fetches, stop) = (
            s.doc.clone(),
            s.failing.clone(),
            s.fetches.clone(),
            s.stop.clone(),
        );
        std::thread::spawn(move || {
            // Bounded: at most 10 minutes, normally stopped by Drop.
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                fetches.fetch_add(1, Ordering::SeqCst);
                let answer = if failing.load(Ordering::SeqCst) {
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_string()
                } else {
                    let body = doc.lock().unwrap().clone();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: public, max-age=3600\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = c.write_all(answer.as_bytes());
            }
        });
        s
    }

    fn set(&self, keys: &[&Key]) {
        let list: Vec<String> = keys.iter().map(|k| k.jwk()).collect();
        *self.doc.lock().unwrap() = format!(r#"{{"keys":[{}]}}"#, list.join(","));
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn chat(gw: &Gateway, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    let body = chat_body(VLLM_MODEL, false, "");
    let req = request_bytes(
        "POST",
        "/proxy/dom/v1/chat/completions",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    // A token under an unknown kid may wait out a whole forced-refresh window (10 s) and
    // the fetch before it is answered: the client waits longer than that.
    let mut s = connect(gw.addr);
    s.set_read_timeout(Some(CLIENT_PATIENCE)).unwrap();
    s.write_all(&req).unwrap();
    Reader::new(s)
        .response()
        .unwrap_or_else(|| panic!("no answer; gateway log:\n{}", gw.log()))
}

/// Longer than the gateway's longest wait for a JWKS refresh (window + fetch).
const CLIENT_PATIENCE: Duration = Duration::from_secs(30);

fn jwks_rotation(driver: &str) {
    let k1 = Key::new("k1", 1);
    let k2 = Key::new("k2", 2);
    let k3 = Key::new("k3", 3);
    let server = JwksServer::start(String::new());
    server.set(&[&k1]);
    let vllm = sim("vllm", &[]);
    let gw = jwks_gateway(driver, &[(ISSUER, &server)], &vllm);

    let r = chat(&gw, &k1.token("alice", &["dom"]));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());

    // The provider rotates to k2: a k2 token works at once, without a restart.
    server.set(&[&k1, &k2]);
    let before = server.fetches.load(Ordering::SeqCst);
    let r = chat(&gw, &k2.token("bob", &["dom"]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(server.fetches.load(Ordering::SeqCst) > before);

    // A token for another domain is still refused (403), and a k1 token still works.
    let r = chat(&gw, &k2.token("bob", &["other"]));
    assert_eq!(r.status, 403);
    assert_eq!(chat(&gw, &k1.token("alice", &["dom"])).status, 200);

    // The endpoint fails: the last good keys stay, and a kid it never had is refused.
    server.failing.store(true, Ordering::SeqCst);
    let r = chat(&gw, &k3.token("carol", &["dom"]));
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("unknown key"));
    assert_eq!(chat(&gw, &k2.token("bob", &["dom"])).status, 200);

    // Forced refreshes are rate-limited: a burst of unknown kids inside the window costs
    // one deferred fetch, and each of them is answered after it.
    let before = server.fetches.load(Ordering::SeqCst);
    std::thread::scope(|s| {
        let burst: Vec<_> = (0..3)
            .map(|i| {
                let token = k3.token(&format!("u{i}"), &["dom"]);
                let gw = &gw;
                s.spawn(move || chat(gw, &token).status)
            })
            .collect();
        for b in burst {
            assert_eq!(b.join().unwrap(), 401);
        }
    });
    assert!(server.fetches.load(Ordering::SeqCst) <= before + 1);
}

/// A gateway in `jwt` mode trusting each (issuer, JWKS server), once every JWKS is loaded.
fn jwks_gateway(driver: &str, issuers: &[(&str, &JwksServer)], sim: &Proc) -> Gateway {
    let mut body = domains_config(&[("dom", &[("vllm", sim.addr, &[VLLM_MODEL])])]);
    body = body.replace("mode = \"none\"", "mode = \"jwt\"");
    for (iss, server) in issuers {
        body.push_str(&format!(
            "\n[[auth.trusted]]\nissuer = \"{iss}\"\naudiences = [\"cubegate\"]\njwks_url = \"http://{}/jwks\"\n",
            server.addr
        ));
    }
    let gw = gateway(driver, &body);
    assert!(eventually(Duration::from_secs(10), || gw
        .log()
        .matches("JWKS loaded")
        .count()
        >= issuers.len()));
    gw
}

const ISSUER_A: &str = "https://a.idp.test/";
const ISSUER_B: &str = "https://b.idp.test/";

/// Refreshes are per issuer and deferred, not dropped: a flood of made-up `kid`s for
/// issuer A does not hold back B's rotation, and a token under A's new `kid` that arrives
/// inside A's rate-limit window is accepted once the window ends (no 401 remembered).
fn jwks_refresh_per_issuer_and_deferred(driver: &str) {
    let (a1, a2, b1, b2) = (
        Key::new("a1", 11),
        Key::new("a2", 12),
        Key::new("b1", 21),
        Key::new("b2", 22),
    );
    let (server_a, server_b) = (
        JwksServer::start(String::new()),
        JwksServer::start(String::new()),
    );
    server_a.set(&[&a1]);
    server_b.set(&[&b1]);
    let vllm = sim("vllm", &[]);
    let gw = jwks_gateway(
        driver,
        &[(ISSUER_A, &server_a), (ISSUER_B, &server_b)],
        &vllm,
    );
    assert_eq!(
        chat(&gw, &a1.token_of(ISSUER_A, "ann", &["dom"])).status,
        200
    );
    assert_eq!(
        chat(&gw, &b1.token_of(ISSUER_B, "bea", &["dom"])).status,
        200
    );

    std::thread::scope(|s| {
        // Made-up kids for A, from several clients: A's window is now taken.
        let flood: Vec<_> = (0..4)
            .map(|i| {
                let forged = Key::new(["x1", "x2", "x3", "x4"][i], 30 + i as u8);
                let token = forged.token_of(ISSUER_A, "mallory", &["dom"]);
                let gw = &gw;
                s.spawn(move || chat(gw, &token).status)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));

        // B rotates: its new kid works at once, A's window notwithstanding.
        server_b.set(&[&b1, &b2]);
        let started = std::time::Instant::now();
        let r = chat(&gw, &b2.token_of(ISSUER_B, "bea", &["dom"]));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "B's refresh waited {:?} behind A's window",
            started.elapsed()
        );

        // A rotates inside its window: the a2 token is served once the deferred refresh
        // runs (at the window's end), not refused.
        server_a.set(&[&a1, &a2]);
        let r = chat(&gw, &a2.token_of(ISSUER_A, "ann", &["dom"]));
        assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
        // And again at once, from the cache.
        assert_eq!(
            chat(&gw, &a2.token_of(ISSUER_A, "ann", &["dom"])).status,
            200
        );
        for f in flood {
            assert_eq!(f.join().unwrap(), 401);
        }
    });
    // The flood cost A one fetch per window, not one per token.
    assert!(
        server_a.fetches.load(Ordering::SeqCst) <= 4,
        "{} fetches of A",
        server_a.fetches.load(Ordering::SeqCst)
    );
}

/// A key that carries an expiry is used until then and not after, and the JWKS is
/// fetched again before it runs out (though its max-age is an hour), so a successor key
/// published meanwhile is in force in time.
fn expiring_keys(driver: &str) {
    let (k1, k2) = (Key::new("k1", 41), Key::new("k2", 42));
    let server = JwksServer::start(String::new());
    let k1_until = unix_in(7);
    let with_exp = k1
        .jwk()
        .replacen('{', &format!(r#"{{"exp":{k1_until},"#), 1);
    *server.doc.lock().unwrap() = format!(r#"{{"keys":[{with_exp}]}}"#);
    let vllm = sim("vllm", &[]);
    let gw = jwks_gateway(driver, &[(ISSUER, &server)], &vllm);
    assert_eq!(chat(&gw, &k1.token("ann", &["dom"])).status, 200);
    // The provider adds k2; no token asks for it, yet it is fetched before k1 expires.
    *server.doc.lock().unwrap() = format!(r#"{{"keys":[{with_exp},{}]}}"#, k2.jwk());
    let fetched = server.fetches.load(Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(8), || server
            .fetches
            .load(Ordering::SeqCst)
            > fetched),
        "the JWKS was not fetched again before its key's expiry"
    );
    assert_eq!(chat(&gw, &k2.token("bea", &["dom"])).status, 200);
    // Past k1's expiry its tokens are refused, and say why.
    std::thread::sleep(Duration::from_secs(
        (k1_until + 1).saturating_sub(unix_in(0)),
    ));
    let r = chat(&gw, &k1.token("ann", &["dom"]));
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate").unwrap().contains("expired"),
        "{:?}",
        r.header("www-authenticate")
    );
}

for_each_driver!(
    jwks_rotation,
    jwks_refresh_per_issuer_and_deferred,
    expiring_keys
);
