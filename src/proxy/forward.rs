//! Phase `forward`: getting one request to a backend, trying the chosen backends in
//! order, then streaming the answer back (`stream_response`).
//!
//! Failures are retried only where that is certainly safe: a backend that refuses a
//! connection is skipped for the next candidate, and a pooled connection that turns out
//! stale (fails before any answer byte, with the whole request still in hand) is replaced
//! by a fresh one, once. What goes on the wire is `send_request`'s.

use super::body::BodyTracker;
use super::connection::Connection;
use super::error::GatewayError;
use super::io::BackendStream;
use super::pool::Upstream;
use super::read_model::read_whole_body;
use super::request::{ForwardRequest, Persistence, Request};
use super::send_request::{send_head_and_buffered_body, stream_request_body};
use super::stream_response::{stream_response, StreamEnd, StreamError};
use super::worker::Worker;
use crate::http::head::Method;
use crate::snapshot::Backend;
use monoio::net::TcpStream;
use std::time::Instant;

/// Forwards the request to the first backend of `order` that takes it, and streams the
/// answer. Returns whether the client connection may be kept alive.
pub async fn forward(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    fwd: &mut ForwardRequest<'_>,
    order: &[usize],
) -> Result<Persistence, GatewayError> {
    let persistence = forward_in_order(worker, conn, req, fwd, order).await?;
    // Forwarding read the body to its end.
    req.body_done();
    Ok(persistence)
}

/// `/users/*`, `/domains/*`, `/keys/*` on the public port go to the management listener
/// as they are (it authenticates them itself). The body is read whole first: the
/// management API's few threads must only ever see complete requests (a client trickling
/// a body through the public port cannot hold one of them).
pub async fn forward_to_management(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
) -> Result<Persistence, GatewayError> {
    let body = read_whole_body(worker, conn, req, crate::mgmt::request::MAX_BODY as u64).await?;
    let target = req.head.target;
    let mut fwd = ForwardRequest {
        domain: &worker.management,
        upstream_target: target,
        tracker: body.tracker,
        scanner: None,
        management: true,
    };
    forward(worker, conn, req, &mut fwd, &[0]).await
}

async fn forward_in_order(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    fwd: &mut ForwardRequest<'_>,
    order: &[usize],
) -> Result<Persistence, GatewayError> {
    let mut last_error = GatewayError::UpstreamClosed;
    for &index in order {
        let backend = &fwd.domain.backends[index];
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
        match attempt(worker, conn, req, fwd, backend, up).await {
            Ok(keep) => return Ok(keep),
            Err(Attempt::Stale) => {
                // A pooled socket the backend had already closed: once more, fresh.
                let stream = connect(worker, backend).await?;
                let fresh = Upstream {
                    stream,
                    addr: backend.addr,
                    reused: false,
                };
                return match attempt(worker, conn, req, fwd, backend, fresh).await {
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
    conn: &mut Connection,
    req: &mut Request,
    fwd: &mut ForwardRequest<'_>,
    backend: &Backend,
    mut up: Upstream,
) -> Result<Persistence, Attempt> {
    req.record.backend = Some(up.addr);
    let body_complete_in_buf = fwd.tracker.as_ref().is_none_or(BodyTracker::is_done);
    // A send that fails on a reused socket never reached a live backend: resend. A reused
    // socket that closes without a byte of answer may have been acted on, so only requests
    // that are safe to repeat are resent then.
    let retryable = up.reused && body_complete_in_buf;
    let repeatable = retryable
        && matches!(
            req.head.method,
            Method::Get | Method::Head | Method::Options
        );
    send_head_and_buffered_body(worker, conn, req, fwd, backend, &mut up)
        .await
        .map_err(|e| match e {
            // A backend that stopped reading was alive: not a stale socket.
            GatewayError::UpstreamWriteTimeout => Attempt::Failed(e),
            _ if retryable => Attempt::Stale,
            _ => Attempt::Failed(e),
        })?;
    if !body_complete_in_buf {
        stream_request_body(worker, conn, req, fwd, &mut up)
            .await
            .map_err(Attempt::Failed)?;
    }
    match stream_response(worker, conn, req, &mut up).await {
        Ok(StreamEnd::Complete {
            upstream_reusable,
            client,
        }) => {
            if upstream_reusable {
                worker.pools.borrow_mut().put(up.addr, up.stream);
            }
            Ok(client)
        }
        Ok(StreamEnd::Aborted) => Ok(Persistence::Close),
        Err(StreamError::NothingReceived) if repeatable => Err(Attempt::Stale),
        Err(StreamError::NothingReceived) => Err(Attempt::Failed(GatewayError::UpstreamClosed)),
        Err(StreamError::Gateway(e)) => Err(Attempt::Failed(e)),
    }
}

/// Opens a fresh connection with the configured timeout, which also bounds the TLS
/// handshake of an `https://` backend.
async fn connect(worker: &Worker, backend: &Backend) -> Result<BackendStream, GatewayError> {
    let timeout = worker.timeouts.upstream_connect();
    let started = Instant::now();
    let tcp = match monoio::time::timeout(timeout, TcpStream::connect_addr(backend.addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            stream
        }
        Ok(Err(e)) => return Err(GatewayError::UpstreamConnect(e)),
        Err(_) => return Err(GatewayError::UpstreamConnectTimeout),
    };
    let Some(name) = &backend.tls else {
        return Ok(BackendStream::plain(tcp));
    };
    let Some(config) = &worker.backend_tls else {
        return Err(GatewayError::UpstreamConnect(std::io::Error::other(
            "https:// backend, but no CA certificates are trusted: set proxy.backend_ca_file",
        )));
    };
    let left = timeout.saturating_sub(started.elapsed());
    BackendStream::tls(tcp, config.clone(), name.clone(), left)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => GatewayError::UpstreamConnectTimeout,
            _ => GatewayError::UpstreamConnect(e),
        })
}
