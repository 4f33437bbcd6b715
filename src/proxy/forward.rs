//! Phases `send_upstream_request` and the attempt loop: getting one request to a backend.
//!
//! The head is rewritten for the backend (Host and path prefix of the backend, hop-by-hop
//! and client-supplied identity headers dropped, `X-Forwarded-For`, `X-Request-Id`,
//! `X-Domain-Id`, `X-User-Id` added), then the part of the body already read is sent with
//! it in one write, and the rest is streamed from the client as it arrives, still passing
//! through the model scanner so a second `"model"` key aborts the request before its last
//! byte reaches the backend.
//!
//! Failures are retried only where that is certainly safe: a backend that refuses a
//! connection is skipped for the next candidate, and a pooled connection that turns out
//! stale (fails before any answer byte, with the whole request still in hand) is replaced
//! by a fresh one, once.

use super::body::{BodyError, BodyTracker};
use super::conn::ClientConn;
use super::error::GatewayError;
use super::model_scan::ModelScanner;
use super::splice::{splice_exact, SpliceError};
use super::stream::{stream_response, StreamEnd, StreamError};
use super::upstream::{connect, Upstream};
use super::{RequestId, Worker};
use crate::auth::Identity;
use crate::http::chunked::ChunkedDecoder;
use crate::http::head::{BodyFraming, Method, Span};
use crate::http::headers::{eq_ignore_case, has_token, is_hop_by_hop_request};
use crate::http::response::push_u64;
use crate::snapshot::{Backend, Domain};
use monoio::buf::IoBuf;
use std::io::Write as _;

/// What the proxy knows about a request once it has decided to forward it.
pub struct ForwardRequest<'a> {
    pub domain: &'a Domain,
    pub identity: &'a Identity,
    pub request_id: &'a RequestId,
    /// Path from `/v1` or `/api` on, with the query.
    pub upstream_target: Span,
    /// Raw body bytes already in the client's read buffer, right after the head.
    pub body_in_buf: usize,
    /// Where the body ends; `None` = no body.
    pub tracker: Option<BodyTracker>,
    /// Still watching the body for a second `"model"`.
    pub scanner: Option<ModelScanner>,
    /// To the management listener: the client's Authorization goes along (the management
    /// API authenticates itself) and no identity headers are added.
    pub management: bool,
    /// `[auth] claim_headers` names: dropped from the client's headers.
    pub claim_header_names: &'a [String],
}

/// Forwards the request to the first backend of `order` that takes it, and streams the
/// answer. Returns whether the client connection may be kept alive.
pub async fn forward(
    worker: &Worker,
    conn: &mut ClientConn,
    req: &mut ForwardRequest<'_>,
    order: &[usize],
) -> Result<bool, GatewayError> {
    let mut last_error = GatewayError::UpstreamClosed;
    for &index in order {
        let backend = &req.domain.backends[index];
        let pooled = worker
            .pools
            .borrow_mut()
            .take(backend.addr, backend.tls.as_ref());
        let up = match pooled {
            Some(stream) => {
                worker.metrics.upstream_reuses.inc();
                Upstream {
                    stream,
                    addr: backend.addr,
                    reused: true,
                }
            }
            None => match connect(worker, backend).await {
                Ok(stream) => {
                    worker.metrics.upstream_connects.inc();
                    Upstream {
                        stream,
                        addr: backend.addr,
                        reused: false,
                    }
                }
                Err(e) => {
                    worker.metrics.upstream_connect_failures.inc();
                    tracing::warn!(backend = %backend.addr, error = %e, "backend connect failed");
                    worker.pools.borrow_mut().mark_down(backend.addr);
                    last_error = e;
                    continue;
                }
            },
        };
        match attempt(worker, conn, req, backend, up).await {
            Ok(keep) => return Ok(keep),
            Err(Attempt::Stale) => {
                // A pooled socket the backend had already closed: once more, fresh.
                let stream = connect(worker, backend).await?;
                let fresh = Upstream {
                    stream,
                    addr: backend.addr,
                    reused: false,
                };
                return match attempt(worker, conn, req, backend, fresh).await {
                    Ok(keep) => Ok(keep),
                    Err(Attempt::Stale) => Err(GatewayError::UpstreamClosed),
                    Err(Attempt::Failed(e)) => Err(e),
                };
            }
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
    Err(last_error)
}

enum Attempt {
    /// A reused connection failed before the backend answered anything: safe to retry.
    Stale,
    Failed(GatewayError),
}

async fn attempt(
    worker: &Worker,
    conn: &mut ClientConn,
    req: &mut ForwardRequest<'_>,
    backend: &Backend,
    mut up: Upstream,
) -> Result<bool, Attempt> {
    conn.log.backend = Some(up.addr);
    let body_complete_in_buf = req.tracker.as_ref().is_none_or(BodyTracker::is_done);
    // A send that fails on a reused socket never reached a live backend: resend. A reused
    // socket that closes without a byte of answer may have been acted on, so only requests
    // that are safe to repeat are resent then.
    let retryable = up.reused && body_complete_in_buf;
    let repeatable = retryable
        && matches!(
            conn.head.method,
            Method::Get | Method::Head | Method::Options
        );
    send_head_and_buffered_body(worker, conn, req, backend, &mut up)
        .await
        .map_err(|e| {
            if retryable {
                Attempt::Stale
            } else {
                Attempt::Failed(e)
            }
        })?;
    if !body_complete_in_buf {
        stream_request_body(worker, conn, req, &mut up)
            .await
            .map_err(Attempt::Failed)?;
    }
    match stream_response(worker, conn, &mut up, req.request_id).await {
        Ok(StreamEnd::Complete {
            upstream_reusable,
            client_keep_alive,
        }) => {
            if upstream_reusable {
                worker.pools.borrow_mut().put(up.addr, up.stream);
            }
            Ok(client_keep_alive)
        }
        Ok(StreamEnd::Aborted) => Ok(false),
        Err(StreamError::NothingReceived) if repeatable => Err(Attempt::Stale),
        Err(StreamError::NothingReceived) => Err(Attempt::Failed(GatewayError::UpstreamClosed)),
        Err(StreamError::Gateway(e)) => Err(Attempt::Failed(e)),
    }
}

async fn send_head_and_buffered_body(
    worker: &Worker,
    conn: &mut ClientConn,
    req: &ForwardRequest<'_>,
    backend: &Backend,
    up: &mut Upstream,
) -> Result<(), GatewayError> {
    let limit = worker.timeouts.between_chunks();
    let mut out = std::mem::take(&mut conn.out);
    out.clear();
    write_upstream_head(&mut out, conn, req, backend);
    let body = conn.head.len..conn.head.len + req.body_in_buf;
    let chunked = conn.head.framing == BodyFraming::Chunked;
    // Small bodies ride in the head's write; big ones go straight from the read buffer.
    // Chunked bodies are re-framed (see `reframe`), so they are always copied.
    let inline = chunked || body.len() <= 16 * 1024;
    if chunked {
        let mut decoder = ChunkedDecoder::new();
        let _ = reframe(&mut decoder, &conn.rbuf[body.clone()], &mut out);
        if decoder.is_done() {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    } else if inline {
        out.extend_from_slice(&conn.rbuf[body.clone()]);
    }
    conn.out = write_upstream(up, out, limit).await?;
    if !inline {
        let rbuf = std::mem::take(&mut conn.rbuf);
        conn.rbuf = write_upstream(up, rbuf.slice(body), limit)
            .await?
            .into_inner();
    }
    Ok(())
}

/// Writes to the backend with a timeout: a backend that stops reading is a failed one.
/// On failure the buffer is gone (the caller's connection closes).
async fn write_upstream<B: super::io::OutBuf>(
    up: &mut Upstream,
    buf: B,
    limit: std::time::Duration,
) -> Result<B, GatewayError> {
    match monoio::time::timeout(limit, up.stream.write_all(buf)).await {
        Ok((Ok(_), buf)) => Ok(buf),
        Ok((Err(_), _)) => Err(GatewayError::UpstreamClosed),
        Err(_) => Err(GatewayError::UpstreamWriteTimeout),
    }
}

/// Re-frames chunked payload: the backend gets our own chunk sizes and none of the
/// client's chunk extensions or trailers (trailers would be headers that skipped every
/// header rule). Returns the raw bytes consumed.
fn reframe(
    decoder: &mut ChunkedDecoder,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, crate::http::chunked::ChunkError> {
    decoder.feed(raw, |payload| push_chunk(out, payload))
}

fn push_chunk(out: &mut Vec<u8>, payload: &[u8]) {
    if payload.is_empty() {
        return;
    }
    let _ = write!(out, "{:x}\r\n", payload.len());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

fn write_upstream_head(
    out: &mut Vec<u8>,
    conn: &ClientConn,
    req: &ForwardRequest<'_>,
    backend: &Backend,
) {
    let buf = &conn.rbuf;
    let head = &conn.head;
    out.extend_from_slice(head.method_span.of(buf));
    out.push(b' ');
    out.extend_from_slice(backend.base_path.as_bytes());
    out.extend_from_slice(req.upstream_target.of(buf));
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(backend.authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    // Headers the client named in Connection are hop-by-hop too. Most requests carry no
    // Connection header: then nothing is looked up per header.
    let is_connection = |n: &Span| eq_ignore_case(n.of(buf), b"connection");
    let has_connection = head.headers.iter().any(|(n, _)| is_connection(n));
    let listed_in_connection = |name: &[u8]| {
        has_connection
            && head
                .headers
                .iter()
                .any(|(n, v)| is_connection(n) && has_token(v.of(buf), name))
    };
    for (name, value) in &head.headers {
        let n = name.of(buf);
        let credential = req.management && eq_ignore_case(n, b"authorization");
        if (is_hop_by_hop_request(n) && !credential) || listed_in_connection(n) {
            continue;
        }
        // Headers that carry verified claims come from the token only.
        if !req.management
            && req
                .claim_header_names
                .iter()
                .any(|h| eq_ignore_case(n, h.as_bytes()))
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.of(buf));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(prior) = head.forwarded_for {
        out.extend_from_slice(prior.of(buf));
        out.extend_from_slice(b", ");
    }
    let _ = write!(out, "{}", conn.peer.ip());
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: http\r\nX-Request-Id: ");
    out.extend_from_slice(req.request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !req.management {
        out.extend_from_slice(b"X-Domain-Id: ");
        out.extend_from_slice(req.domain.id.as_str().as_bytes());
        out.extend_from_slice(b"\r\nX-User-Id: ");
        out.extend_from_slice(req.identity.user_id().as_bytes());
        out.extend_from_slice(b"\r\n");
        if let crate::auth::Identity::Token(claims) = req.identity {
            for (name, value) in claims.headers() {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    match head.framing {
        BodyFraming::None => {
            if matches!(
                head.method,
                crate::http::head::Method::Post | crate::http::head::Method::Put
            ) {
                out.extend_from_slice(b"Content-Length: 0\r\n");
            }
        }
        BodyFraming::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Streams the part of the body not yet read from the client to the backend. Bytes read
/// past the body's end (a pipelined next request) are kept in the client's read buffer.
async fn stream_request_body(
    worker: &Worker,
    conn: &mut ClientConn,
    req: &mut ForwardRequest<'_>,
    up: &mut Upstream,
) -> Result<(), GatewayError> {
    let Some(tracker) = req.tracker.as_mut() else {
        return Ok(());
    };
    let max_body = worker.limits.max_body_bytes;
    // Nothing left to inspect: splice the rest when enabled.
    if let BodyTracker::Length { remaining } = tracker {
        let limit = conn.body_wait(worker);
        let plain = (worker.splice && req.scanner.is_none())
            .then(|| conn.rd.plain().zip(up.stream.plain_mut()))
            .flatten();
        if let Some((rd, up_plain)) = plain {
            let mut pipe = worker.take_pipe().ok_or(GatewayError::BodyIncomplete)?;
            splice_exact(rd, up_plain, &mut pipe, *remaining, limit)
                .await
                .map_err(|e| match e {
                    SpliceError::Source => GatewayError::BodyIncomplete,
                    SpliceError::Destination => GatewayError::UpstreamClosed,
                })?;
            worker.return_pipe(pipe);
            *remaining = 0;
            return Ok(());
        }
    }
    let chunked = matches!(tracker, BodyTracker::Chunked { .. });
    let limit = worker.timeouts.between_chunks();
    let mut pooled = worker.buffer();
    let copy = &mut pooled.buf;
    let mut framed = Vec::new();
    while !tracker.is_done() {
        copy.clear();
        let read = monoio::time::timeout(
            conn.body_wait(worker),
            conn.rd.read_more(std::mem::take(copy), super::BUFFER_SIZE),
        )
        .await;
        let (res, buf) = read.map_err(|_| GatewayError::BodyReadTimeout)?;
        *copy = buf;
        match res {
            Ok(0) | Err(_) => return Err(GatewayError::BodyIncomplete),
            Ok(_) => {}
        }
        let mut scan_error = None;
        framed.clear();
        let used = tracker
            .feed(copy, max_body, |payload| {
                if let Some(s) = req.scanner.as_mut() {
                    if let Err(e) = s.feed(payload) {
                        scan_error.get_or_insert(e);
                    }
                }
                if chunked {
                    push_chunk(&mut framed, payload);
                }
            })
            .map_err(|e| match e {
                BodyError::Chunk(c) => GatewayError::BadChunkedBody(c),
                BodyError::TooLarge => GatewayError::BodyTooLarge(max_body),
            })?;
        if let Some(e) = scan_error {
            // Dropping the upstream connection before the body's last byte means the
            // backend never acts on this request.
            return Err(GatewayError::InvalidBody(e));
        }
        if used < copy.len() {
            conn.rbuf.extend_from_slice(&copy[used..]);
        }
        if chunked {
            if tracker.is_done() {
                framed.extend_from_slice(b"0\r\n\r\n");
            }
            framed = write_upstream(up, std::mem::take(&mut framed), limit).await?;
        } else {
            let slice = std::mem::take(copy).slice(..used);
            *copy = write_upstream(up, slice, limit).await?.into_inner();
        }
    }
    Ok(())
}
