//! Fetching trusted issuers' JWKS, off the request path.
//!
//! One thread keeps every `jwks_url` issuer's keys fresh: it fetches at start, again before
//! the document's `Cache-Control: max-age` runs out (clamped between a floor and a
//! ceiling) or before its earliest key expiry (a JWK's `exp`, its certificate's
//! `notAfter`; expired keys verify nothing), and at once when a worker meets a `kid` it does not know, so key rotation at
//! the identity provider needs no restart. Such a forced refresh is for that token's JWKS
//! only and rate-limited per JWKS: one asked for inside the window is deferred to the
//! window's end, not dropped, so a token under a new `kid` succeeds by then, and a flood of
//! made-up `kid`s for one issuer costs that issuer one fetch per window and delays no
//! other issuer's. Workers wait for the attempt they asked for through a per-URL count of
//! finished attempts ([`RefreshHandle::attempts`]). New keys reach the
//! workers as a new snapshot: the fetcher reads and publishes keys through a [`KeyCell`],
//! which the snapshot's publication cell implements (so this module needs nothing of the
//! snapshot). A JWKS that cannot be fetched or parsed keeps the last good
//! keys and is reported in the log. The endpoint is untrusted: sizes, times and redirects
//! are bounded (redirects are not followed).
//!
//! The HTTP client here is deliberately small: one GET, HTTP/1.1, `Connection: close`,
//! over plain TCP (loopback only, enforced by the config) or rustls with the ring provider
//! and the system's CA store.

use super::keys::{parse_jwks, KeyStore, MAX_JWKS_BYTES};
use crate::http::chunked::ChunkedDecoder;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Refresh bounds: never more often than the floor, never less often than the ceiling.
const MAX_AGE_FLOOR: Duration = Duration::from_secs(60);
const MAX_AGE_CEILING: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// After a failure, try again this soon.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15);
/// A forced refresh (unknown kid) at most this often per JWKS.
pub const FORCED_MIN_INTERVAL: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A key about to expire is fetched for again at most this often.
const EXPIRY_FLOOR: Duration = Duration::from_secs(5);

/// Asks the fetcher to refresh one JWKS (a worker met an unknown `kid` of its issuer).
/// Cheap to clone, one per worker.
#[derive(Clone)]
pub struct RefreshHandle {
    tx: Sender<String>,
    attempts: Attempts,
}

/// Finished fetch attempts (good or failed) per JWKS URL.
type Attempts = Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>;

impl RefreshHandle {
    /// The count of finished attempts for `url`: read it before [`Self::request`], and
    /// the attempt asked for has finished (its keys, if any, published) once it moved.
    pub fn attempts(&self, url: &str) -> Arc<AtomicU64> {
        attempts_of(&self.attempts, url)
    }

    pub fn request(&self, url: &str) {
        let _ = self.tx.send(url.to_string());
    }
}

fn attempts_of(attempts: &Attempts, url: &str) -> Arc<AtomicU64> {
    let mut map = attempts.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(url.to_string()).or_default().clone()
}

/// The fetcher's end of the refresh requests.
pub struct Wakeups {
    rx: Receiver<String>,
    attempts: Attempts,
}

pub fn channel() -> (RefreshHandle, Wakeups) {
    let (tx, rx) = std::sync::mpsc::channel();
    let attempts = Attempts::default();
    (
        RefreshHandle {
            tx,
            attempts: attempts.clone(),
        },
        Wakeups { rx, attempts },
    )
}

/// Where the keys workers verify with are read from and published to.
pub trait KeyCell {
    /// The key store in force now.
    fn current_keys(&self) -> Arc<KeyStore>;
    /// Publishes the store `next` makes of the one in force (atomically with respect to
    /// other publications, so a concurrent change is built on, not overwritten).
    fn publish_keys(&self, next: &dyn Fn(&KeyStore) -> KeyStore);
}

struct State {
    url: String,
    next: Instant,
    last_forced: Option<Instant>,
    /// The fetch at `next` was asked for by a worker (and starts a new window).
    forced: bool,
}

impl State {
    /// A worker asked for this JWKS now: at once, or at the end of the current window.
    fn force(&mut self, now: Instant) {
        let open = self
            .last_forced
            .map_or(now, |t| t + FORCED_MIN_INTERVAL)
            .max(now);
        self.next = self.next.min(open);
        self.forced = true;
    }
}

/// Runs the fetcher until the process ends (the thread is detached).
pub fn run(cell: &dyn KeyCell, wakeups: Wakeups) {
    let mut states: Vec<State> = Vec::new();
    loop {
        // The issuer list comes from the keys in force, so a reload that adds or drops an
        // issuer is followed without being told.
        let urls: Vec<String> = cell
            .current_keys()
            .issuers
            .iter()
            .filter_map(|i| i.jwks_url.clone())
            .collect();
        states.retain(|s| urls.contains(&s.url));
        for url in &urls {
            if !states.iter().any(|s| &s.url == url) {
                states.push(State {
                    url: url.clone(),
                    next: Instant::now(),
                    last_forced: None,
                    forced: false,
                });
            }
        }
        let now = Instant::now();
        for state in states.iter_mut().filter(|s| s.next <= now) {
            if std::mem::take(&mut state.forced) {
                state.last_forced = Some(now);
            }
            state.next = Instant::now() + refresh(cell, &state.url);
            attempts_of(&wakeups.attempts, &state.url).fetch_add(1, Ordering::Release);
        }
        let wait = states
            .iter()
            .map(|s| s.next.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5));
        match wakeups.rx.recv_timeout(wait) {
            Ok(url) => {
                let now = Instant::now();
                for url in std::iter::once(url).chain(wakeups.rx.try_iter()) {
                    if let Some(s) = states.iter_mut().find(|s| s.url == url) {
                        s.force(now);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Fetches one JWKS and publishes its keys. Returns when to fetch it next.
fn refresh(cell: &dyn KeyCell, url: &str) -> Duration {
    crate::metrics::GLOBAL.jwks_fetches.inc();
    let (body, max_age) = match fetch(url) {
        Ok(r) => r,
        Err(e) => {
            crate::metrics::GLOBAL.jwks_fetch_failures.inc();
            tracing::error!(url, "JWKS fetch failed, keeping the last good keys: {e}");
            return RETRY_AFTER_FAILURE;
        }
    };
    let (keys, skipped) = match parse_jwks(&body) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(url, "JWKS unusable, keeping the last good keys: {e}");
            return RETRY_AFTER_FAILURE;
        }
    };
    for why in &skipped {
        tracing::debug!(url, "JWKS key skipped: {why}");
    }
    if keys.is_empty() {
        tracing::error!(url, "JWKS has no usable key, keeping the last good keys");
        return RETRY_AFTER_FAILURE;
    }
    let count = keys.len();
    let expiry = before_earliest_expiry(&keys, unix_now());
    cell.publish_keys(&|old| {
        let mut store = old.rebuilt();
        for issuer in store.issuers.iter_mut() {
            if issuer.jwks_url.as_deref() == Some(url) {
                // Several issuers may share one JWKS URL: each gets the keys.
                issuer.keys = keys.clone();
            }
        }
        store
    });
    tracing::info!(url, keys = count, "JWKS loaded");
    let by_age = max_age
        .unwrap_or(DEFAULT_MAX_AGE)
        .clamp(MAX_AGE_FLOOR, MAX_AGE_CEILING)
        .mul_f64(0.8);
    expiry.map_or(by_age, |e| e.min(by_age))
}

/// When to fetch again so that a key's expiry does not leave the issuer without keys: a
/// little before the earliest expiry still ahead (a tenth of the time left, at most a
/// minute), never sooner than `EXPIRY_FLOOR`.
fn before_earliest_expiry(keys: &[super::jws::VerifyingKey], now: f64) -> Option<Duration> {
    let earliest = keys
        .iter()
        .filter_map(|k| k.not_after)
        .filter(|t| *t > now)
        .min_by(f64::total_cmp)?;
    let left = earliest - now;
    let ahead = (left / 10.0).min(60.0);
    Some(Duration::from_secs_f64(left - ahead).max(EXPIRY_FLOOR))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// GET `url`; returns the body and the `Cache-Control` max-age.
pub fn fetch(url: &str) -> Result<(Vec<u8>, Option<Duration>), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("unsupported URL scheme".into());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default_port = if tls { 443 } else { 80 };
    let host = authority
        .rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok())
        .map_or(authority, |(h, _)| h);
    let target = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nUser-Agent: cubegate\r\nConnection: close\r\n\r\n"
    );
    let raw = if tls {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| format!("invalid TLS server name {host:?}"))?;
        let conn = rustls::ClientConnection::new(tls_config()?, name).map_err(|e| e.to_string())?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        exchange(&mut stream, request.as_bytes())?
    } else {
        let mut tcp = tcp;
        exchange(&mut tcp, request.as_bytes())?
    };
    parse_response(&raw)
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no CA certificates found in the system store".into());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

/// Sends the request and reads the whole answer, bounded.
fn exchange<S: Read + Write>(stream: &mut S, request: &[u8]) -> Result<Vec<u8>, String> {
    stream
        .write_all(request)
        .map_err(|e| format!("send: {e}"))?;
    let limit = MAX_JWKS_BYTES + 64 * 1024;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = Instant::now() + IO_TIMEOUT * 2;
    loop {
        if Instant::now() > deadline {
            return Err("JWKS endpoint too slow".into());
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > limit {
                    return Err(format!("answer larger than {limit} bytes"));
                }
            }
            // A TLS peer that closes without close_notify still sent a complete answer
            // if the framing says so; let the parser decide.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(raw)
}

fn parse_response(raw: &[u8]) -> Result<(Vec<u8>, Option<Duration>), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err("malformed HTTP answer".into()),
    };
    let status = resp.code.unwrap_or(0);
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    let mut max_age = None;
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        let v = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("cache-control") {
            max_age = v
                .split(',')
                .filter_map(|d| d.trim().strip_prefix("max-age="))
                .find_map(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            if v.split(',')
                .any(|d| d.trim() == "no-store" || d.trim() == "no-cache")
            {
                max_age = Some(Duration::ZERO);
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| "bad Content-Length")?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[head_len..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut d = ChunkedDecoder::new();
        d.feed(rest, |p| out.extend_from_slice(p))
            .map_err(|e| format!("bad chunked body: {e}"))?;
        if !d.is_done() {
            return Err("truncated chunked body".into());
        }
        out
    } else if let Some(n) = length {
        if rest.len() < n {
            return Err("truncated body".into());
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok((body, max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let (b, age) = parse_response(
            b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=120\r\nContent-Length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!(b, b"{}");
        assert_eq!(age, Some(Duration::from_secs(120)));
        let (b, _) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(b, b"{}");
        assert!(parse_response(b"HTTP/1.1 302 Found\r\nLocation: x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        let (_, age) =
            parse_response(b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n\r\n{}").unwrap();
        assert_eq!(age, Some(Duration::ZERO));
    }
}
