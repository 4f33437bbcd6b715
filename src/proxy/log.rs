//! Phase `log`: what a finished request leaves behind — the worker's counters and
//! histograms, its usage sum (`[usage]`), and (when `proxy.access_log` is on) one JSON
//! access record.
//!
//! Counters are the worker's own (summed at scrape time), so recording is a few
//! non-atomic adds; the usage sum is a lookup in the worker's own map that allocates only
//! for a new (minute, domain, user, key, model). A request counts as usage once it was
//! authorized for its domain: refusals before that (unknown domain, 401, 403) are not the
//! domain's usage; everything after (unknown model, bad body, full queue, backend errors)
//! is a request and an error. The access record names the user by id and the API key by
//! its id; never a token, a password, a prompt or the query string. It carries the
//! answer's tokens and where they come from (`usage`: `reported` by the host, `counted`
//! by the gateway).

use super::request::Request;
use super::worker::Worker;
use crate::http::head::Span;
use crate::usage::tally::Tally;
use std::net::SocketAddr;

/// Phase `log`.
pub fn log(worker: &Worker, buf: &[u8], peer: SocketAddr, req: &mut Request) {
    super::admit::settle(req);
    let req = &*req;
    let record = &req.record;
    let m = &worker.metrics;
    m.response(record.status);
    if let Some((slot, route)) = record.route {
        m.by_domain.count(slot, route, record.status);
    }
    if let Some(first_byte) = record.first_byte {
        m.first_byte.observe(first_byte);
    }
    let duration = req.started.elapsed();
    m.duration.observe(duration);
    let text = |s: Span| std::str::from_utf8(s.of(buf)).unwrap_or("");
    // Usage: every request authorized for a domain (the identity is set only then).
    if let (Some(domain), Some(identity)) = (record.domain, req.identity.as_ref()) {
        worker.usage.record(
            text(domain),
            identity.user_id(),
            identity.api_key_id(),
            record.model.as_deref().unwrap_or(""),
            &Tally::of_request(record.status, record.usage),
        );
    }
    if !worker.access_log {
        return;
    }
    let target = text(req.head.target);
    let path = target.split('?').next().unwrap_or("");
    let identity = req.identity.as_ref();
    let usage = record.usage.as_ref();
    tracing::info!(
        target: "cubegate::access",
        request_id = req.id.as_str(),
        client = %peer.ip(),
        method = text(req.head.method_span),
        path,
        domain = record.domain.map(text).unwrap_or("-"),
        user = identity.map_or("-", |i| i.user_id()),
        key = identity.and_then(|i| i.api_key_id()).unwrap_or("-"),
        model = record.model.as_deref().unwrap_or("-"),
        status = record.status,
        bytes = record.bytes,
        ttfb_ms = record.first_byte.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
        duration_ms = duration.as_secs_f64() * 1000.0,
        backend = %record.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
        placement = record.placement.map_or("-", |p| p.as_str()),
        prompt_tokens = usage.map_or(0, |u| u.prompt_tokens),
        completion_tokens = usage.map_or(0, |u| u.completion_tokens),
        usage = usage.map_or("-", |u| u.source.as_str()),
        "access"
    );
}
