//! One try of a request on one GPU host: a connection (pooled or new), the request sent,
//! the answer streamed back — and, when it fails before the answer's first byte reached
//! the client, what that says about the host and whether another host may take it.
//!
//! A pooled connection that turns out stale (fails before any answer byte, with the whole
//! request still in hand) is replaced by a fresh one on the same host, once: that is the
//! connection's fault, not the host's.

use super::body::BodyTracker;
use super::connection::Connection;
use super::error::GatewayError;
use super::io::BackendStream;
use super::pool::Upstream;
use super::request::{ForwardRequest, Persistence, Request};
use super::send_request::{send_head_and_buffered_body, stream_request_body};
use super::stream_response::{stream_response, Fallback, StreamEnd, StreamError};
use super::worker::Worker;
use crate::fleet::host::Failure;
use crate::http::head::Method;
use crate::snapshot::Backend;
use monoio::net::TcpStream;
use std::time::Instant;

/// How a try on one host failed.
pub struct HostFailed {
    pub error: GatewayError,
    /// The host is to blame (counts towards its ejection), and nothing reached the
    /// client: another host may take the request if its body can be sent again. `None`:
    /// the request itself failed (a bad body, a gone client) or the answer had begun.
    pub retry: Option<Failure>,
}

impl HostFailed {
    fn last(error: GatewayError) -> HostFailed {
        HostFailed { error, retry: None }
    }

    fn host(error: GatewayError, failure: Failure) -> HostFailed {
        HostFailed {
            error,
            retry: Some(failure),
        }
    }
}

/// Tries the request on `backend`'s host.
pub async fn try_host(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    fwd: &mut ForwardRequest<'_>,
    backend: &Backend,
    fallback: Fallback<'_>,
) -> Result<Persistence, HostFailed> {
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
        None => fresh(worker, backend, fwd.management).await?,
    };
    match attempt(worker, conn, req, fwd, backend, up, fallback).await {
        Err(Attempt::Stale) => {
            // A pooled socket the backend had already closed: once more, fresh.
            let up = fresh(worker, backend, fwd.management).await?;
            match attempt(worker, conn, req, fwd, backend, up, fallback).await {
                Ok(p) => Ok(p),
                Err(Attempt::Stale) => Err(HostFailed::host(
                    GatewayError::UpstreamClosed,
                    Failure::Failed,
                )),
                Err(Attempt::Failed(f)) => Err(f),
            }
        }
        Ok(p) => Ok(p),
        Err(Attempt::Failed(f)) => Err(f),
    }
}

/// A new connection to the host, counted. `management`: the host is the management
/// listener (its TLS, when on, is checked against its own certificate).
async fn fresh(
    worker: &Worker,
    backend: &Backend,
    management: bool,
) -> Result<Upstream, HostFailed> {
    match connect(worker, backend, management).await {
        Ok(stream) => {
            worker.metrics.upstream_connects.inc();
            Ok(Upstream {
                stream,
                addr: backend.addr,
                reused: false,
            })
        }
        Err(e) => {
            worker.metrics.upstream_connect_failures.inc();
            tracing::warn!(backend = %backend.addr, error = %e, "backend connect failed");
            let refused = matches!(&e, GatewayError::UpstreamConnect(io)
                if io.kind() == std::io::ErrorKind::ConnectionRefused);
            let failure = if refused {
                Failure::Refused
            } else {
                Failure::Failed
            };
            Err(HostFailed::host(e, failure))
        }
    }
}

enum Attempt {
    /// A reused connection failed before the backend answered anything: safe to retry.
    Stale,
    Failed(HostFailed),
}

async fn attempt(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    fwd: &mut ForwardRequest<'_>,
    backend: &Backend,
    mut up: Upstream,
    fallback: Fallback<'_>,
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
            GatewayError::UpstreamWriteTimeout => {
                Attempt::Failed(HostFailed::host(e, Failure::Failed))
            }
            _ if retryable => Attempt::Stale,
            _ => Attempt::Failed(HostFailed::host(e, Failure::Failed)),
        })?;
    if !body_complete_in_buf {
        // Part of the body now streams from the client: it cannot be sent again, so a
        // failure from here on ends the request.
        stream_request_body(worker, conn, req, fwd, &mut up)
            .await
            .map_err(|e| Attempt::Failed(HostFailed::last(e)))?;
    }
    match stream_response(worker, conn, req, &mut up, fallback, fwd.metering).await {
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
        Err(StreamError::NothingReceived) => Err(Attempt::Failed(HostFailed::host(
            GatewayError::UpstreamClosed,
            Failure::Failed,
        ))),
        Err(StreamError::HostEjected) => Err(Attempt::Failed(HostFailed::host(
            GatewayError::UpstreamFirstByteTimeout,
            Failure::Failed,
        ))),
        Err(StreamError::Unavailable(status)) => Err(Attempt::Failed(HostFailed::host(
            GatewayError::UpstreamUnavailable(status),
            Failure::Failed,
        ))),
        // Nothing reached the client yet: another host may answer in time.
        Err(StreamError::Gateway(e @ GatewayError::UpstreamFirstByteTimeout))
        | Err(StreamError::Gateway(e @ GatewayError::UpstreamBadResponse(_))) => {
            Err(Attempt::Failed(HostFailed::host(e, Failure::Failed)))
        }
        Err(StreamError::Gateway(e)) => Err(Attempt::Failed(HostFailed::last(e))),
    }
}

/// Opens a fresh connection with the configured timeout, which also bounds the TLS
/// handshake of an `https://` backend (or of an HTTPS management listener).
async fn connect(
    worker: &Worker,
    backend: &Backend,
    management: bool,
) -> Result<BackendStream, GatewayError> {
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
    let trust = if management {
        &worker.mgmt_tls
    } else {
        &worker.backend_tls
    };
    let Some(config) = trust else {
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
