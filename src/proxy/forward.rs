//! Phase `forward`: the request to a GPU host, its answer back to the client.
//!
//! The hosts are tried in the order `choose_backends` gave. A host is taken only with a
//! place on it (its `max_in_flight`); when every host that may serve the request is full,
//! the request waits in the worker's fair queue (bounded in number and in
//! `timeouts.queue_s`, left at once when the client goes away) and takes the first host
//! of its order that frees up. A host that fails before any byte of the answer reached
//! the client — refused, reset, a 502/503 answer, no first byte, taken out of rotation
//! while awaited — is blamed for it (see `fleet::host`), and the request goes to the next
//! host, up to `MAX_HOSTS`, with its body sent again from the read buffer; a body too
//! large to keep there is not sent again, and the error says so. Never after the answer
//! began. One try on one host is `upstream`'s.

use super::connection::Connection;
use super::error::GatewayError;
use super::read_answer::WATCH_BUF;
use super::read_model::read_whole_body;
use super::request::{ForwardRequest, Metering, Persistence, Request};
use super::stream_response::Fallback;
use super::upstream::try_host;
use super::worker::Worker;
use crate::fleet::host::InFlight;
use crate::fleet::queue::Ticket;
use futures_util::future::{select, Either};
use monoio::io::Canceller;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Hosts one request may be tried on.
pub const MAX_HOSTS: usize = 3;
/// How often a queued request looks for a free place (places freed on other workers are
/// seen this way).
const QUEUE_POLL: Duration = Duration::from_millis(2);

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
        metering: Metering::Off,
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
    // The body can be sent again only while all of it is in the read buffer.
    let replayable = fwd.tracker.as_ref().is_none_or(|t| t.is_done());
    let mut attempts = 0;
    // The hosts not tried yet: the order itself until a host fails (no copy per request).
    let mut left: std::borrow::Cow<[usize]> = order.into();
    let mut last_error = GatewayError::NoHealthyBackend;
    loop {
        let (index, place) = match take_place(worker, conn, req, fwd, &left).await? {
            Taken::Place(index, place) => (index, place),
            Taken::NoneUp => return Err(last_error),
            Taken::ClientGone => return Ok(Persistence::Close),
        };
        attempts += 1;
        let backend = &fwd.domain.backends[index];
        let host = &backend.host;
        let more = replayable
            && attempts < MAX_HOSTS
            && left
                .iter()
                .any(|i| *i != index && fwd.domain.backends[*i].host.is_up());
        let fallback = Fallback {
            host: (!fwd.management).then_some(&**host),
            retry_unavailable: more,
        };
        let outcome = try_host(worker, conn, req, fwd, backend, fallback).await;
        drop(place);
        match outcome {
            Ok(persistence) => {
                host.record_success();
                return Ok(persistence);
            }
            Err(failed) => {
                let Some(failure) = failed.retry else {
                    return Err(failed.error);
                };
                if !fwd.management {
                    host.record_failure(failure);
                }
                if !replayable {
                    tracing::info!(request_id = req.id.as_str(), backend = %backend.addr, "not retried on another host: the request body was too large to keep");
                    return Err(failed.error);
                }
                if attempts >= MAX_HOSTS {
                    return Err(failed.error);
                }
                host.retries.fetch_add(1, Relaxed);
                tracing::info!(request_id = req.id.as_str(), backend = %backend.addr, error = %failed.error, "retrying on another host");
                last_error = failed.error;
                left = left.iter().copied().filter(|i| *i != index).collect();
            }
        }
    }
}

/// What `take_place` got.
enum Taken {
    /// A place on the backend of this index.
    Place(usize, InFlight),
    /// No host of the order is in rotation any more.
    NoneUp,
    /// The client went away while the request waited in the queue.
    ClientGone,
}

/// A place on the first host of `order` that is in rotation and has room, waiting in the
/// worker's fair queue while every such host is full.
async fn take_place(
    worker: &Worker,
    conn: &mut Connection,
    req: &Request,
    fwd: &ForwardRequest<'_>,
    order: &[usize],
) -> Result<Taken, GatewayError> {
    let first_free = || {
        let mut any_up = false;
        for &i in order {
            let host = &fwd.domain.backends[i].host;
            if !host.is_up() {
                continue;
            }
            any_up = true;
            if let Some(place) = host.try_acquire() {
                return (true, Some((i, place)));
            }
        }
        (any_up, None)
    };
    match first_free() {
        (_, Some((i, place))) => return Ok(Taken::Place(i, place)),
        (false, None) => return Ok(Taken::NoneUp),
        (true, None) => {}
    }
    let hosts = order
        .iter()
        .map(|&i| fwd.domain.backends[i].host.clone())
        .collect();
    let ticket = worker
        .queue
        .borrow_mut()
        .join(fwd.domain.metrics_slot, hosts)
        .ok_or(GatewayError::QueueFull)?;
    let first_choice = order.first().map(|&i| fwd.domain.backends[i].host.clone());
    let mut waited = Queued {
        worker,
        ticket: Some(ticket),
        counted: first_choice,
        served: false,
    };
    if let Some(h) = &waited.counted {
        h.queued.fetch_add(1, Relaxed);
    }
    let deadline = Instant::now() + worker.timeouts.queue();
    let wait = async {
        loop {
            monoio::time::sleep(QUEUE_POLL).await;
            if waited.is_turn() {
                match first_free() {
                    (_, Some((i, place))) => {
                        waited.served = true;
                        return Ok(Taken::Place(i, place));
                    }
                    (false, None) => return Err(GatewayError::NoHealthyBackend),
                    (true, None) => {}
                }
            }
            if Instant::now() >= deadline {
                tracing::debug!(
                    request_id = req.id.as_str(),
                    "no host had room within timeouts.queue_s"
                );
                return Err(GatewayError::QueueTimeout);
            }
        }
    };
    let body_read = fwd.tracker.as_ref().is_none_or(|t| t.is_done());
    if !body_read || conn.pending_bytes(req.consumed) >= worker.limits.max_head_bytes {
        // Socket bytes are still the body's, or the client is far ahead with pipelined
        // requests (alive, and its backlog should not grow by a read): no watch.
        return wait.await;
    }
    watch_client(conn, wait).await
}

/// Runs a queue wait while watching the client, as `stream_response` does while a host
/// thinks: a client that goes away ends the wait at once (its request would otherwise
/// keep its place in line, then take a host's place for nobody). Bytes it sends meanwhile
/// (a pipelined request) are kept for later.
async fn watch_client(
    conn: &mut Connection,
    wait: impl Future<Output = Result<Taken, GatewayError>>,
) -> Result<Taken, GatewayError> {
    let canceller = Canceller::new();
    let (rd, _, rbuf) = conn.split();
    let mut watch =
        pin!(rd.cancelable_read_more(Vec::with_capacity(WATCH_BUF), WATCH_BUF, canceller.handle()));
    match select(pin!(wait), watch.as_mut()).await {
        Either::Left((taken, _)) => {
            let _ = canceller.cancel();
            // Data that raced the cancellation is returned, not lost.
            if let (Ok(n), buf) = watch.await {
                rbuf.extend_from_slice(&buf[..n]);
            }
            taken
        }
        Either::Right(((Ok(n), buf), wait)) if n > 0 => {
            rbuf.extend_from_slice(&buf[..n]);
            wait.await
        }
        // EOF or reset: dropping the wait leaves the queue.
        Either::Right(_) => Ok(Taken::ClientGone),
    }
}

/// A request's place in the worker's queue, left however the wait ends (also when the
/// client goes away and the request's future is dropped).
struct Queued<'w> {
    worker: &'w Worker,
    ticket: Option<Ticket>,
    /// The first-choice host, whose `queued` count this request is in.
    counted: Option<std::sync::Arc<crate::fleet::host::Host>>,
    /// It leaves with a place (its domain's turn is then over).
    served: bool,
}

impl Queued<'_> {
    fn is_turn(&self) -> bool {
        self.ticket.as_ref().is_some_and(|t| {
            self.worker
                .queue
                .borrow()
                .is_turn(t, |h| h.is_up() && h.has_room())
        })
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.worker.queue.borrow_mut().leave(t, self.served);
        }
        if let Some(h) = self.counted.take() {
            h.queued.fetch_sub(1, Relaxed);
        }
    }
}
