//! A connection's life and a request's life, as the list of their phases.
//!
//! `serve_connection` opens the connection (TLS handshake when the listener speaks HTTPS)
//! and serves requests one after another: keep-alive, and pipelined requests answered in
//! order, because the next head is only parsed once the previous answer is out.
//! `serve_request` runs one request's phases, each a function in the module of its name:
//!
//! `route` → `authenticate` → `authorize` → `answer_locally` (model lists) or
//! `read_model` → `choose_backends` → `forward` (→ `stream_response`) → `log`.
//!
//! Any phase may stop the request with a [`GatewayError`]; it is answered here, in one
//! place, and the connection stays open only when its framing is still trustworthy.

use super::admit::admit;
use super::answer_locally::{self, send_error, send_head_error};
use super::authenticate::authenticate;
use super::authorize::{authorize, find_domain};
use super::choose_backends::choose_backends;
use super::connection::Connection;
use super::error::GatewayError;
use super::forward::{forward, forward_to_management};
use super::log::log;
use super::read_model::{read_model, ModelRead};
use super::request::{ForwardRequest, Metering, Persistence, Request};
use super::route::{route, Api, Destination, ProxyRoute};
use super::worker::{OpenConnection, Worker};
use crate::http::head::BodyFraming;
use crate::scope::Endpoint;
use crate::snapshot::SnapshotRef;
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::rc::Rc;

pub async fn serve_connection(
    worker: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    _open: OpenConnection,
) {
    let Some(mut conn) = Connection::open(&worker, stream, peer).await else {
        return;
    };
    loop {
        let req = match conn.next_request(&worker).await {
            Ok(Some(req)) => req,
            Ok(None) => break,
            Err(e) => {
                send_head_error(&worker, &mut conn, &e).await;
                break;
            }
        };
        let persistence = serve_request(&worker, &mut conn, req).await;
        if persistence == Persistence::Close || worker.draining.get() {
            break;
        }
    }
    conn.close().await;
}

/// Serves one request: its phases, the answer to an error any of them stopped at, its
/// log. Returns whether the connection may carry another request.
async fn serve_request(worker: &Worker, conn: &mut Connection, mut req: Request) -> Persistence {
    worker.metrics.requests.inc();
    let snapshot = worker.snapshot.borrow_mut().current();
    let persistence = match run_phases(worker, conn, &mut req, &snapshot).await {
        Ok(persistence) => persistence.and(req.persistence()),
        Err(e) => {
            let persistence = if e.closes_connection() {
                Persistence::Close
            } else {
                req.persistence()
            };
            tracing::debug!(request_id = req.id.as_str(), status = e.status(), error = %e, "request refused");
            send_error(worker, conn, &req.id, &mut req.record, &e, persistence).await
        }
    };
    log(worker, conn.buffer(), conn.peer(), &mut req);
    conn.finish(req, persistence)
}

/// The phases of one request, in order.
async fn run_phases(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    snapshot: &SnapshotRef,
) -> Result<Persistence, GatewayError> {
    let route = match route(conn.buffer(), &req.head)? {
        Destination::Health => return answer_locally::health(worker, conn, req).await,
        Destination::Management => return forward_to_management(worker, conn, req).await,
        Destination::Proxy(route) => route,
    };
    let found = find_domain(conn.buffer(), &route, snapshot);
    req.record.domain = Some(route.domain);
    req.record.route = Some((
        found.map_or(0, |d| d.metrics_slot),
        route.endpoint.metric_index(),
    ));

    let identity = authenticate(worker, conn, req, snapshot).await?;
    let domain = authorize(conn.buffer(), &route, found, &identity, snapshot)?;
    req.identity = Some(identity);

    if let Some(list) = answer_locally::model_list(domain, route.endpoint) {
        return answer_locally::serve_model_list(worker, conn, req, &list).await;
    }

    let body = read_model(worker, conn, req, domain, route.endpoint).await?;
    if worker.access_log || worker.usage.is_on() {
        req.record.model = body.model().map(|m| worker.usage.model_name(m));
    }
    req.admission = admit(worker, req, domain, &snapshot.limits, &body)?;
    let choice = choose_backends(worker, conn.buffer(), req, &route, domain, &body)?;
    req.record.placement = Some(choice.placement);
    let metering = metering(req, &route, &body);
    let mut fwd = ForwardRequest {
        domain,
        upstream_target: route.upstream_target,
        tracker: body.tracker,
        scanner: body.scanner,
        management: false,
        metering,
    };
    forward(worker, conn, req, &mut fwd, &choice.order).await
}

/// How this request's answer is metered: always (token limits and the access record need
/// the counts; `[usage] enabled` only decides whether they are stored), and a streamed
/// OpenAI chat or completion whose whole body is at hand and that did not ask for usage
/// itself is asked for it.
fn metering(req: &Request, route: &ProxyRoute, body: &ModelRead) -> Metering {
    let prompt = matches!(route.endpoint, Endpoint::Chat | Endpoint::Completions);
    let whole = body.tracker.is_none() && matches!(req.head.framing, BodyFraming::Length(_));
    match &body.scanner {
        Some(s) if route.api == Api::OpenAi && prompt && whole && s.finished() => {
            if s.stream() && !s.has_stream_options() {
                Metering::AskForUsage {
                    open_at: s.open_at(),
                }
            } else {
                Metering::On
            }
        }
        _ => Metering::On,
    }
}
