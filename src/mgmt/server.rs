//! The management listener: a small blocking HTTP/1.1 server on its own threads.
//!
//! Management traffic is rare and its work blocks (argon2 hashing, SQLite), so it runs on
//! plain threads, one per connection, at most `MAX_CONCURRENT` at once (more get 503), far
//! from the data-plane workers. One request per connection (`Connection: close`), read by
//! [`super::request`] with the data plane's strict head parser, bounded, and with a timeout
//! on every read. The data plane forwards `/users/*`, `/domains/*` and `/keys/*` here, so
//! one public address serves everything. With `[management] tls_cert`/`tls_key` set the
//! listener speaks only HTTPS ([`super::https`]); the data plane's hop then does too.

use super::https::{Https, NoSession};
use super::request::{read_request, Refusal, Request, Wire, IO_TIMEOUT};
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MAX_CONCURRENT: usize = 64;

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply {
            status,
            body: serde_json::to_vec(value).unwrap_or_default(),
            headers: Vec::new(),
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            body: Vec::new(),
            headers: Vec::new(),
        }
    }
}

pub type Handler = Arc<dyn Fn(Request) -> Reply + Send + Sync>;

/// Lets the management API be paused: during a hand-over no request may change the store
/// after the new process has read it.
#[derive(Default)]
pub struct Gate {
    paused: AtomicBool,
    /// The accept loop has seen the pause and accepts nothing more.
    parked: AtomicBool,
    /// Requests being handled.
    active: Arc<AtomicUsize>,
}

impl Gate {
    /// Stops accepting and waits (up to `limit`) for the requests in flight to finish,
    /// calling `tick` as it waits. Connections that arrive meanwhile wait in the socket's
    /// queue.
    pub fn pause(&self, limit: Duration, tick: &dyn Fn()) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if self.parked.load(Ordering::SeqCst) && self.active.load(Ordering::SeqCst) == 0 {
                return true;
            }
            tick();
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn resume(&self) {
        // Not parked any more as far as a next `pause` knows: it waits for the accept
        // loop to park again.
        self.parked.store(false, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// How long one accept waits before the loop looks at the gate again.
const ACCEPT_SLICE: Duration = Duration::from_millis(100);

/// How the listener speaks: plain HTTP, or HTTPS.
#[derive(Clone)]
pub struct Transport {
    /// HTTPS: the rustls configuration of every handshake (its certificate reloads).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How long a TLS handshake may take (`timeouts.header_read`, as on the public port).
    pub handshake_limit: Duration,
}

/// Accepts connections for the life of the process (the thread is detached).
pub fn serve(listener: TcpListener, handler: Handler, gate: Arc<Gate>, transport: Transport) {
    // Blocking accepts that give up after a slice (SO_RCVTIMEO applies to accept), so a
    // pause takes effect without a wake-up mechanism.
    let _ = listener.set_nonblocking(false);
    let _ = socket2::SockRef::from(&listener).set_read_timeout(Some(ACCEPT_SLICE));
    let active = gate.active.clone();
    loop {
        if gate.paused.load(Ordering::SeqCst) {
            gate.parked.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        gate.parked.store(false, Ordering::SeqCst);
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        // (An accepted socket inherits the listener's short SO_RCVTIMEO; `handle` sets
        // its own timeouts before any read.)
        let _ = stream.set_nonblocking(false);
        if active.load(Ordering::Relaxed) >= MAX_CONCURRENT {
            // Over TLS there is no answering before a handshake, which is not done on
            // this thread: the connection just closes.
            if transport.tls.is_none() {
                let _ = write_reply(
                    &mut stream,
                    &error_reply(503, "busy", "the management API is busy; retry shortly"),
                );
            }
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (handler, active, transport) = (handler.clone(), active.clone(), transport.clone());
        let spawned = std::thread::Builder::new()
            .name("cubegate-mgmt".into())
            .spawn(move || {
                handle(stream, &handler, &transport);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::error!("cannot start a management thread");
        }
    }
}

fn handle(mut stream: TcpStream, handler: &Handler, transport: &Transport) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let peer = stream
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let Some(config) = &transport.tls else {
        answer(&mut stream, peer, handler);
        return;
    };
    match super::https::accept(stream, config.clone(), transport.handshake_limit) {
        Ok(mut session) => {
            answer(&mut session, peer, handler);
            Https::close(session);
        }
        Err(NoSession::PlainHttp(stream)) => refuse_plain_http(stream),
        Err(NoSession::Failed(e)) => {
            tracing::debug!(%peer, "management TLS handshake failed: {e}");
        }
    }
}

/// Plain HTTP on the HTTPS management port: the public port's answer, then the end.
fn refuse_plain_http(mut stream: TcpStream) {
    let reply = Reply {
        status: 400,
        body: crate::tls::PLAIN_HTTP_BODY.to_vec(),
        headers: Vec::new(),
    };
    let _ = write_reply(&mut stream, &reply);
    // The request is still unread: closing on it would reset the connection, and the
    // client could lose the answer. Half-close, then read it away (briefly, bounded).
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = std::io::copy(&mut (&stream).take(MAX_UNREAD), &mut std::io::sink());
}

/// Bytes read away after refusing plain HTTP, at most.
const MAX_UNREAD: u64 = 64 * 1024;

/// Reads one request off the connection and writes the handler's reply.
fn answer<S: Wire + Write>(stream: &mut S, peer: IpAddr, handler: &Handler) {
    let reply = match read_request(stream, peer) {
        Ok(req) => handler(req),
        // The same status, code and words as the data plane's answer to this head.
        Err(Refusal::Head(e)) => error_reply(e.status(), e.code(), &e.to_string()),
        Err(Refusal::Transfer { status, message }) => {
            error_reply(status, "invalid_request", message)
        }
    };
    let _ = write_reply(stream, &reply);
}

pub fn error_reply(status: u16, code: &str, message: &str) -> Reply {
    let kind = match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    Reply::json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind, "code": code}}),
    )
}

fn write_reply(stream: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        crate::http::response::reason_phrase(reply.status),
        reply.body.len()
    );
    let typed = reply.headers.iter().any(|(n, _)| *n == "Content-Type");
    if !reply.body.is_empty() && !typed {
        out.push_str("Content-Type: application/json\r\n");
    }
    for (n, v) in &reply.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&reply.body);
    stream.write_all(&bytes)?;
    stream.flush()
}
