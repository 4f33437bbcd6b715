//! One client connection: the request loop and the phases before forwarding.
//!
//! `serve_connection` reads requests one after another (keep-alive; pipelined requests are
//! answered in order because the next head is only parsed once the previous answer is out).
//! For each: `read_request_head` → `route::classify` → `authenticate` → `authorize` →
//! local answer, or `read_model` → `pick_backends` → `forward::forward`. The read buffer
//! holds the head at offset 0 and grows behind it with body bytes while the model is
//! sought; it is bounded by the head and body limits.

use super::error::GatewayError;
use super::forward::{forward, ForwardRequest};
use super::io::{ClientRead, ClientWrite};
use super::local;
use super::read_model::{read_model, read_whole_body};
use super::route::{classify, Api, Route};
use super::upstream::pick_backends;
use super::{RequestId, Worker};
use crate::auth::{AuthError, Refusal, TokenError};
use crate::http::head::{
    check_partial, parse_request_head, worth_parsing, BodyFraming, Method, RequestHead, Span,
};
use crate::http::headers::is_acceptable_request_id;
use crate::http::response::write_local_response;
use crate::scope::Endpoint;
use crate::snapshot::SnapshotRef;
use crate::tls::stream::{handshake, HandshakeError};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

const READ_SIZE: usize = 16 * 1024;
const INITIAL_READ: usize = 4 * 1024;
/// How long a request with an unknown `kid` waits for a JWKS refresh.
const JWKS_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

pub struct ClientConn {
    pub rd: ClientRead,
    pub wr: ClientWrite,
    /// Head of the current request at offset 0, then whatever followed it.
    pub rbuf: Vec<u8>,
    pub head: RequestHead,
    /// What the access record of the current request says.
    pub log: RequestLog,
    pub peer: SocketAddr,
    /// Scratch for heads and local answers.
    pub out: Vec<u8>,
    /// Bytes of `rbuf` that belong to the current request (head + body read so far).
    pub(super) consumed: usize,
    /// The current request's body has not been read to its end.
    pub(super) body_pending: bool,
    /// When the current request's body must be complete.
    body_deadline: Instant,
}

impl ClientConn {
    /// Bytes read past the current request (pipelined requests waiting their turn).
    pub fn pending_bytes(&self) -> usize {
        self.rbuf.len().saturating_sub(self.consumed)
    }

    /// How long the next body read may wait: the pause limit, cut by the whole-body deadline.
    pub fn body_wait(&self, worker: &Worker) -> std::time::Duration {
        let left = self.body_deadline.saturating_duration_since(Instant::now());
        worker.timeouts.body_read().min(left)
    }
}

/// Makes sure a read into `buf` has room for `want` bytes (monoio reads into the spare
/// capacity; a full buffer would read 0 bytes and look like EOF).
pub fn reserve(buf: &mut Vec<u8>, want: usize) {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
}

/// Reads more bytes behind what `buf` already holds. monoio reads into a `Vec` from its
/// start (and sets its length), so appending goes through a slice of the spare capacity.
pub async fn read_more<R: AsyncReadRent>(
    rd: &mut R,
    mut buf: Vec<u8>,
    want: usize,
) -> (std::io::Result<usize>, Vec<u8>) {
    reserve(&mut buf, want);
    let len = buf.len();
    let (res, slice) = rd.read(buf.slice_mut(len..)).await;
    (res, slice.into_inner())
}

pub async fn serve_connection(
    worker: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    _open: OpenConnection,
) {
    let _ = stream.set_nodelay(true);
    let Some((rd, wr)) = open_client(&worker, stream, peer).await else {
        return;
    };
    let mut conn = ClientConn {
        rd,
        wr,
        // Small to start (a head is rarely 1 KiB): an idle keep-alive connection should
        // cost little; reads grow it when a body or a big head needs more.
        rbuf: Vec::with_capacity(INITIAL_READ),
        head: RequestHead::default(),
        log: RequestLog::default(),
        peer,
        out: Vec::with_capacity(1024),
        consumed: 0,
        body_pending: false,
        body_deadline: Instant::now(),
    };
    loop {
        match read_request_head(&worker, &mut conn).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let id = worker.next_request_id();
                tracing::info!(peer = %peer, request_id = id.as_str(), error = %e, "bad request head");
                send_error(worker.timeouts.between_chunks(), &mut conn, &e, &id, false).await;
                break;
            }
        }
        if !handle_request(&worker, &mut conn).await || worker.draining.get() {
            break;
        }
    }
    // Under TLS this writes close_notify, which a client that stopped reading would never
    // take: bounded, or one such client would hold its connection slot for good.
    let _ = monoio::time::timeout(SHUTDOWN_LIMIT, conn.wr.shutdown()).await;
}

/// How long the goodbye (close_notify, FIN) may take before the socket is just closed.
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

const PLAIN_HTTP_BODY: &[u8] = br#"{"error":{"message":"this port speaks HTTPS: use https://","type":"invalid_request_error","code":"plain_http_on_https_port"}}"#;

/// The connection's two halves: as they are, or after a TLS handshake when the listener
/// speaks HTTPS. `None` = the handshake failed or timed out (the connection just closes:
/// there is no HTTP yet to answer in).
async fn open_client(
    worker: &Worker,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(ClientRead, ClientWrite)> {
    let Some(config) = &worker.tls else {
        let (rd, wr) = stream.into_split();
        return Some((ClientRead::Plain(rd), ClientWrite::Plain(wr)));
    };
    let session = rustls::ServerConnection::new(config.clone()).ok()?;
    let (mut reader, mut writer) = crate::tls::stream::pair(session);
    let shake = handshake(&mut stream, &mut reader, &mut writer, true);
    match monoio::time::timeout(worker.timeouts.header_read(), shake).await {
        Ok(Ok(())) => {}
        Ok(Err(HandshakeError::PlainHttp)) => {
            worker.metrics.tls_handshake_failures.inc();
            // Said in HTTP, the only language this client understands.
            let mut answer = Vec::with_capacity(256);
            let id = worker.next_request_id();
            write_local_response(
                &mut answer,
                400,
                &[],
                "application/json",
                PLAIN_HTTP_BODY,
                id.as_bytes(),
                false,
            );
            let _ =
                monoio::time::timeout(worker.timeouts.between_chunks(), stream.write_all(answer))
                    .await;
            let _ = stream.shutdown().await;
            return None;
        }
        Ok(Err(e)) => {
            worker.metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            worker.metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, "TLS handshake timed out");
            return None;
        }
    }
    worker.metrics.tls_handshakes.inc();
    let (rd, wr) = stream.into_split();
    Some((
        ClientRead::Tls {
            tcp: rd,
            tls: reader,
        },
        ClientWrite::Tls {
            tcp: wr,
            tls: writer,
        },
    ))
}

/// The facts of one request for its access record. Never a token, a password or a prompt:
/// the path is logged without its query, the user by id.
#[derive(Default)]
pub struct RequestLog {
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// From the request's start to the answer's head going out.
    pub first_byte: Option<std::time::Duration>,
    pub backend: Option<SocketAddr>,
    pub user: Option<String>,
    /// The API key's id, when the credential was one.
    pub api_key: Option<String>,
    pub model: Option<String>,
    pub domain: Option<Span>,
    /// (metrics slot of the domain, route kind) of a proxied request.
    pub route: Option<(u16, usize)>,
    /// When the request's head was complete.
    pub started: Option<Instant>,
}

fn write_access_record(conn: &ClientConn, request_id: &RequestId, started: Instant) {
    let buf = &conn.rbuf;
    let text = |s: Span| std::str::from_utf8(s.of(buf)).unwrap_or("");
    let target = text(conn.head.target);
    let path = target.split('?').next().unwrap_or("");
    let log = &conn.log;
    tracing::info!(
        target: "cubegate::access",
        request_id = request_id.as_str(),
        client = %conn.peer.ip(),
        method = text(conn.head.method_span),
        path,
        domain = log.domain.map(text).unwrap_or("-"),
        user = log.user.as_deref().unwrap_or("-"),
        key = log.api_key.as_deref().unwrap_or("-"),
        model = log.model.as_deref().unwrap_or("-"),
        status = log.status,
        bytes = log.bytes,
        ttfb_ms = log.first_byte.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        backend = %log.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
        "access"
    );
}

/// Counts an open connection (for the connection cap and for draining) from the moment
/// it is accepted; the count drops even if serving panicked.
pub struct OpenConnection(Rc<Worker>);

impl OpenConnection {
    pub fn new(worker: Rc<Worker>) -> Self {
        worker.connections.set(worker.connections.get() + 1);
        worker.metrics.connections.up();
        OpenConnection(worker)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.set(self.0.connections.get() - 1);
        self.0.metrics.connections.down();
    }
}

/// Waits for the next request head. `Ok(false)` = the connection should end quietly
/// (client closed, idle timeout, draining).
async fn read_request_head(worker: &Worker, conn: &mut ClientConn) -> Result<bool, GatewayError> {
    let mut deadline: Option<Instant> = None;
    let mut scanned = 0;
    loop {
        if !conn.rbuf.is_empty() {
            let complete = if worth_parsing(&conn.rbuf, scanned) {
                parse_request_head(&conn.rbuf, &worker.limits, &mut conn.head)?.is_some()
            } else {
                check_partial(&conn.rbuf, &worker.limits)?;
                false
            };
            if complete {
                conn.consumed = conn.head.len;
                conn.body_pending = conn.head.framing != BodyFraming::None;
                conn.body_deadline = Instant::now() + worker.timeouts.body_total();
                return Ok(true);
            }
            scanned = conn.rbuf.len();
            deadline.get_or_insert_with(|| Instant::now() + worker.timeouts.header_read());
        }
        reserve(&mut conn.rbuf, READ_SIZE);
        let buf = std::mem::take(&mut conn.rbuf);
        let read = match deadline {
            // Between requests (the buffer is empty): idle timeout, and cancellable by
            // draining.
            None => {
                debug_assert!(buf.is_empty());
                if worker.draining.get() {
                    conn.rbuf = buf;
                    return Ok(false);
                }
                let handle = worker.drain.borrow().handle();
                monoio::time::timeout(
                    worker.timeouts.idle_keepalive(),
                    conn.rd.cancelable_read_more(buf, READ_SIZE, handle),
                )
                .await
                .ok()
            }
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                match monoio::time::timeout(left, conn.rd.read_more(buf, READ_SIZE)).await {
                    Ok(r) => Some(r),
                    Err(_) => return Err(GatewayError::HeaderReadTimeout),
                }
            }
        };
        let Some((res, buf)) = read else {
            return Ok(false); // idle timeout
        };
        conn.rbuf = buf;
        match res {
            Ok(0) | Err(_) => return Ok(false),
            Ok(_) => {}
        }
    }
}

/// Serves one request. Returns whether the connection may carry another.
async fn handle_request(worker: &Worker, conn: &mut ClientConn) -> bool {
    let started = Instant::now();
    let request_id = match conn.head.request_id.map(|s| s.of(&conn.rbuf)) {
        Some(v) if is_acceptable_request_id(v) => {
            let mut id = RequestId::default();
            id.set(v);
            id
        }
        _ => worker.next_request_id(),
    };
    worker.metrics.requests.inc();
    conn.log = RequestLog {
        started: Some(started),
        ..RequestLog::default()
    };
    let snapshot = worker.snapshot.borrow_mut().current();
    let outcome = dispatch(worker, conn, &snapshot, &request_id).await;
    let keep_alive = match outcome {
        Ok(keep) => keep && !conn.body_pending,
        Err(e) => {
            let keep = !e.closes_connection() && !conn.body_pending && conn.head.keep_alive;
            tracing::debug!(request_id = request_id.as_str(), status = e.status(), error = %e, "request refused");
            send_error(
                worker.timeouts.between_chunks(),
                conn,
                &e,
                &request_id,
                keep,
            )
            .await
        }
    };
    let m = &worker.metrics;
    m.response(conn.log.status);
    if let Some((slot, route)) = conn.log.route {
        m.by_domain.count(slot, route, conn.log.status);
    }
    if let Some(first_byte) = conn.log.first_byte {
        m.first_byte.observe(first_byte);
    }
    m.duration.observe(started.elapsed());
    if worker.access_log {
        write_access_record(conn, &request_id, started);
    }
    // A failed write may have taken the read buffer with it: then the connection ends.
    let keep_alive = keep_alive && conn.head.keep_alive && conn.rbuf.len() >= conn.consumed;
    if keep_alive {
        conn.rbuf.drain(..conn.consumed);
        conn.consumed = 0;
        // One huge body must not pin its buffer for the connection's idle life.
        if conn.rbuf.capacity() > 4 * READ_SIZE && conn.rbuf.len() <= READ_SIZE {
            conn.rbuf.shrink_to(READ_SIZE);
        }
    }
    keep_alive
}

async fn dispatch(
    worker: &Worker,
    conn: &mut ClientConn,
    snapshot: &SnapshotRef,
    request_id: &RequestId,
) -> Result<bool, GatewayError> {
    let target = std::str::from_utf8(conn.head.target.of(&conn.rbuf))
        .map_err(|_| crate::http::HttpError::MalformedHead("request target is not UTF-8"))?;
    let (domain_span, api, endpoint, upstream_target) = match classify(conn.head.method, target) {
        Route::Health => {
            return local::respond(
                worker.timeouts.between_chunks(),
                conn,
                200,
                local::HEALTH_BODY,
                "application/json",
                request_id,
            )
            .await
        }
        Route::Management => {
            let target = Span {
                start: conn.head.target.start,
                end: conn.head.target.end,
            };
            return forward_to_management(worker, conn, request_id, target).await;
        }
        Route::NotFound => return Err(GatewayError::NoRoute),
        Route::BadPath => return Err(GatewayError::BadPath),
        Route::Proxy {
            domain,
            api,
            endpoint,
            upstream_target,
        } => (
            span_in(&conn.rbuf, domain),
            api,
            endpoint,
            span_in(&conn.rbuf, upstream_target),
        ),
    };

    // authenticate → domain → authorize. Authentication comes first so an anonymous
    // caller cannot probe which domains exist.
    conn.log.domain = Some(domain_span);
    let domain_id = std::str::from_utf8(domain_span.of(&conn.rbuf)).unwrap_or("");
    let domain = snapshot.domains.get(domain_id);
    conn.log.route = Some((
        domain.map_or(0, |d| d.metrics_slot),
        endpoint.metric_index(),
    ));
    let auth_header = conn.head.authorization.map(|s| s.of(&conn.rbuf));
    let tokens = &worker.tokens;
    let first = worker.auth.authenticate(
        auth_header,
        &snapshot.keys,
        &snapshot.directory,
        snapshot.revocation_epoch,
        &mut tokens.borrow_mut(),
    );
    let authenticated = match first {
        // A verdict the cache already had was waited for once; do not wait again.
        Err(Refusal {
            error: AuthError::Token(TokenError::UnknownKey),
            from_cache: false,
        }) if snapshot.keys.has_fetched_issuers() => {
            // Perhaps the identity provider rotated its keys: ask for its JWKS now and give
            // the fetch a moment before answering.
            let before = worker.snapshot.borrow().published_generation();
            worker.jwks_refresh.request();
            let deadline = Instant::now() + JWKS_WAIT;
            while worker.snapshot.borrow().published_generation() == before
                && Instant::now() < deadline
            {
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let fresh = worker.snapshot.borrow_mut().current();
            worker.auth.authenticate(
                auth_header,
                &fresh.keys,
                &fresh.directory,
                fresh.revocation_epoch,
                &mut tokens.borrow_mut(),
            )?
        }
        other => other?,
    };
    let identity = authenticated.identity;
    let Some(domain) = domain else {
        return Err(GatewayError::UnknownDomain(domain_id.to_string()));
    };
    crate::auth::authorize(
        &identity,
        &domain.id,
        endpoint,
        &snapshot.keys,
        &snapshot.directory,
    )?;
    let ollama_only = api == Api::Ollama;
    if ollama_only && !domain.has_ollama() {
        return Err(GatewayError::NoOllamaBackend(domain.id.clone()));
    }

    // Answers the domain map gives without a backend.
    let local_list = match endpoint {
        Endpoint::ListModels => Some(&domain.models_json),
        Endpoint::ListTags if !domain.passthrough => Some(&domain.tags_json),
        _ => None,
    };
    if let Some(body) = local_list {
        if !matches!(conn.head.method, Method::Get | Method::Head) {
            return Err(GatewayError::MethodNotAllowed(
                "model lists are read with GET",
            ));
        }
        return local::respond(
            worker.timeouts.between_chunks(),
            conn,
            200,
            body,
            "application/json",
            request_id,
        )
        .await;
    }

    // `/v1/models/{id}` names its model in the path: it must be one the domain offers.
    let path_model = std::str::from_utf8(upstream_target.of(&conn.rbuf))
        .ok()
        .and_then(|t| t.strip_prefix("/v1/models/"))
        .map(|rest| rest.split('?').next().unwrap_or("").to_string());
    let model = read_model(worker, conn, domain, endpoint).await?;
    if worker.access_log {
        conn.log.model = model.model().map(str::to_string);
        conn.log.user = Some(identity.user_id().to_string());
        conn.log.api_key = identity.api_key_id().map(str::to_string);
    }
    let named = path_model.as_deref().or(model.model());
    let order = pick_backends(worker, domain, named, ollama_only, endpoint)?;
    let body_in_buf = conn.consumed - conn.head.len;
    let mut req = ForwardRequest {
        domain,
        identity: &identity,
        request_id,
        upstream_target,
        body_in_buf,
        tracker: model.tracker,
        scanner: model.scanner,
        management: false,
        claim_header_names: &worker.claim_header_names,
    };
    let keep_alive = forward(worker, conn, &mut req, &order).await?;
    conn.body_pending = false;
    Ok(keep_alive)
}

/// `/users/*`, `/domains/*`, `/keys/*` on the public port go to the management listener
/// as they are (it authenticates them itself).
async fn forward_to_management(
    worker: &Worker,
    conn: &mut ClientConn,
    request_id: &RequestId,
    target: Span,
) -> Result<bool, GatewayError> {
    let domain = &worker.management;
    let model = read_whole_body(worker, conn, crate::mgmt::server::MAX_BODY as u64).await?;
    let identity = crate::auth::Identity::Development;
    let mut req = ForwardRequest {
        domain,
        identity: &identity,
        request_id,
        upstream_target: target,
        body_in_buf: conn.consumed - conn.head.len,
        tracker: model.tracker,
        scanner: None,
        management: true,
        claim_header_names: &[],
    };
    let keep_alive = forward(worker, conn, &mut req, &[0]).await?;
    conn.body_pending = false;
    Ok(keep_alive)
}

fn span_in(buf: &[u8], part: &str) -> Span {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    Span {
        start: start as u32,
        end: (start + part.len()) as u32,
    }
}

/// Writes an error in the contract's JSON shape. Returns whether the connection stays.
pub async fn send_error(
    limit: std::time::Duration,
    conn: &mut ClientConn,
    e: &GatewayError,
    request_id: &RequestId,
    keep_alive: bool,
) -> bool {
    let body = e.to_json();
    conn.log.status = e.status();
    conn.log.bytes = body.len() as u64;
    let challenge;
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if let GatewayError::Unauthorized(why) = e {
        challenge = match why {
            AuthError::Missing => "Bearer realm=\"cubegate\"".to_string(),
            _ => format!(
                "Bearer realm=\"cubegate\", error=\"invalid_token\", error_description=\"{}\"",
                why.to_string().replace('"', "'")
            ),
        };
        extra.push(("WWW-Authenticate", &challenge));
    }
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    write_local_response(
        &mut out,
        e.status(),
        &extra,
        "application/json",
        &body,
        request_id.as_bytes(),
        keep_alive,
    );
    match write_to_client(conn, out, limit).await {
        Some(back) => {
            conn.out = back;
            keep_alive
        }
        None => false,
    }
}

/// Writes a whole buffer to the client, within `limit`: a client that stops reading is
/// treated as gone. `None` = failed (the buffer went with it; the connection must end).
pub async fn write_to_client(
    conn: &mut ClientConn,
    buf: Vec<u8>,
    limit: std::time::Duration,
) -> Option<Vec<u8>> {
    match monoio::time::timeout(limit, conn.wr.write_all(buf)).await {
        Ok((Ok(_), back)) => Some(back),
        _ => None,
    }
}
