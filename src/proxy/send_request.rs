//! Writing one request to a backend: the head rewritten for it, the body bytes already
//! read in the same write, and the rest streamed from the client as it arrives.
//!
//! The head loses the hop-by-hop headers (also those named in `Connection`), the client's
//! credential and any header that carries verified claims; it gains `X-Forwarded-For`,
//! `X-Request-Id`, `X-Domain-Id`, `X-User-Id` and the configured claim headers. A chunked
//! body is re-framed with our own chunk sizes. A stream whose usage the gateway asks for
//! gets `"stream_options":{"include_usage":true}` right after its `{`. The body keeps
//! passing through the model scanner as it streams, so a second `"model"` key aborts the
//! request before its last byte reaches the backend.

use super::body::{BodyError, BodyTracker};
use super::connection::Connection;
use super::error::GatewayError;
use super::io::OutBuf;
use super::pool::Upstream;
use super::request::{ForwardRequest, Metering, Request};
use super::splice::{splice_exact, SpliceError};
use super::worker::Worker;
use crate::http::chunked::ChunkedDecoder;
use crate::http::head::{BodyFraming, Method, Span};
use crate::http::headers::{eq_ignore_case, has_token, is_hop_by_hop_request};
use crate::http::response::push_u64;
use crate::snapshot::Backend;
use monoio::buf::IoBuf;
use std::io::Write as _;

/// What a stream's body gains when the gateway asks for its usage (`Metering::AskForUsage`).
const ASK_FOR_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// Sends the head and the body bytes already in the connection's buffer.
pub async fn send_head_and_buffered_body(
    worker: &Worker,
    conn: &mut Connection,
    req: &Request,
    fwd: &ForwardRequest<'_>,
    backend: &Backend,
    up: &mut Upstream,
) -> Result<(), GatewayError> {
    let limit = worker.timeouts.between_chunks();
    let mut out = conn.take_scratch();
    write_upstream_head(&mut out, worker, conn, req, fwd, backend);
    let mut body = req.head.len..req.consumed;
    let chunked = req.head.framing == BodyFraming::Chunked;
    if let Metering::AskForUsage { open_at } = fwd.metering {
        // The body's `{`, the option, then the rest (a Content-Length body: payload
        // offsets are buffer offsets).
        let split = body.start + open_at + 1;
        out.extend_from_slice(&conn.buffer()[body.start..split]);
        out.extend_from_slice(ASK_FOR_USAGE);
        body.start = split;
    }
    // Small bodies ride in the head's write; big ones go straight from the read buffer.
    // Chunked bodies are re-framed (see `reframe`), so they are always copied.
    let inline = chunked || body.len() <= 16 * 1024;
    if chunked {
        let mut decoder = ChunkedDecoder::new();
        let _ = reframe(&mut decoder, &conn.buffer()[body.clone()], &mut out);
        if decoder.is_done() {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    } else if inline {
        out.extend_from_slice(&conn.buffer()[body.clone()]);
    }
    let out = write_upstream(up, out, limit).await?;
    conn.return_scratch(out);
    if !inline {
        // The buffer comes back even when the write fails, so a retry on a fresh
        // connection still has the body; only a timeout loses it (and is not retried).
        let rbuf = conn.take_buffer();
        match monoio::time::timeout(limit, up.stream.write_all(rbuf.slice(body))).await {
            Ok((res, rbuf)) => {
                conn.return_buffer(rbuf.into_inner());
                res.map_err(|_| GatewayError::UpstreamClosed)?;
            }
            Err(_) => return Err(GatewayError::UpstreamWriteTimeout),
        }
    }
    Ok(())
}

/// Writes to the backend with a timeout: a backend that stops reading is a failed one.
/// On failure the buffer is gone (the caller's connection closes).
async fn write_upstream<B: OutBuf>(
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
    worker: &Worker,
    conn: &Connection,
    req: &Request,
    fwd: &ForwardRequest<'_>,
    backend: &Backend,
) {
    let buf = conn.buffer();
    let head = &req.head;
    out.extend_from_slice(head.method_span.of(buf));
    out.push(b' ');
    out.extend_from_slice(backend.base_path.as_bytes());
    out.extend_from_slice(fwd.upstream_target.of(buf));
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
        let credential = fwd.management && eq_ignore_case(n, b"authorization");
        if (is_hop_by_hop_request(n) && !credential) || listed_in_connection(n) {
            continue;
        }
        // Headers that carry verified claims come from the token only.
        if !fwd.management
            && worker
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
    out.extend_from_slice(conn.peer_ip_text());
    out.extend_from_slice(if worker.tls.is_some() {
        b"\r\nX-Forwarded-Proto: https\r\nX-Request-Id: "
    } else {
        b"\r\nX-Forwarded-Proto: http\r\nX-Request-Id: "
    });
    out.extend_from_slice(req.id.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let (false, Some(identity)) = (fwd.management, &req.identity) {
        out.extend_from_slice(b"X-Domain-Id: ");
        out.extend_from_slice(fwd.domain.id.as_str().as_bytes());
        out.extend_from_slice(b"\r\nX-User-Id: ");
        out.extend_from_slice(identity.user_id().as_bytes());
        out.extend_from_slice(b"\r\n");
        if let crate::auth::Identity::Token(claims) | crate::auth::Identity::DevelopmentAs(claims) =
            identity
        {
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
            if matches!(head.method, Method::Post | Method::Put) {
                out.extend_from_slice(b"Content-Length: 0\r\n");
            }
        }
        BodyFraming::Length(n) => {
            let added = match fwd.metering {
                Metering::AskForUsage { .. } => ASK_FOR_USAGE.len() as u64,
                _ => 0,
            };
            out.extend_from_slice(b"Content-Length: ");
            push_u64(out, n + added);
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Streams the part of the body not yet read from the client to the backend. Bytes read
/// past the body's end (a pipelined next request) are kept in the client's read buffer.
pub async fn stream_request_body(
    worker: &Worker,
    conn: &mut Connection,
    req: &Request,
    fwd: &mut ForwardRequest<'_>,
    up: &mut Upstream,
) -> Result<(), GatewayError> {
    let Some(tracker) = fwd.tracker.as_mut() else {
        return Ok(());
    };
    let max_body = worker.limits.max_body_bytes;
    // Nothing left to inspect: splice the rest when enabled.
    if let BodyTracker::Length { remaining } = tracker {
        let limit = req.body_wait(worker.timeouts.body_read());
        let (rd, _, _) = conn.split();
        let plain = (worker.splice && fwd.scanner.is_none())
            .then(|| rd.plain().zip(up.stream.plain_mut()))
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
        let wait = req.body_wait(worker.timeouts.body_read());
        let (res, buf) = conn.read_into(std::mem::take(copy), wait).await;
        *copy = buf;
        res?;
        let mut scan_error = None;
        framed.clear();
        let used = tracker
            .feed(copy, max_body, |payload| {
                if let Some(s) = fwd.scanner.as_mut() {
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
            conn.keep_pipelined(&copy[used..]);
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
