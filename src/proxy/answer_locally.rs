//! Phase `answer_locally`: answers cubegate gives itself, without a backend — health, the
//! domain's model lists (rendered into the snapshot when it was built, so serving one is a
//! single write), and every error, in the contract's JSON shape.

use super::connection::Connection;
use super::error::GatewayError;
use super::request::{AccessRecord, Persistence, Request};
use super::request_id::RequestId;
use super::worker::Worker;
use crate::auth::AuthError;
use crate::http::head::Method;
use crate::http::response::write_local_response;
use crate::scope::Endpoint;
use crate::snapshot::Domain;

pub const HEALTH_BODY: &[u8] = br#"{"status":"ok"}"#;

/// `GET /health`.
pub async fn health(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
) -> Result<Persistence, GatewayError> {
    respond(worker, conn, req, HEALTH_BODY).await
}

/// The domain's model list when `endpoint` asks for one the domain map can give (`None`:
/// the request goes on to a backend).
pub fn model_list(domain: &Domain, endpoint: Endpoint) -> Option<std::borrow::Cow<'_, [u8]>> {
    match endpoint {
        Endpoint::ListModels => Some(domain.models_body()),
        Endpoint::ListTags if !domain.passthrough => Some(domain.tags_body()),
        _ => None,
    }
}

/// Serves a model list from `model_list`.
pub async fn serve_model_list(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    body: &[u8],
) -> Result<Persistence, GatewayError> {
    if !matches!(req.head.method, Method::Get | Method::Head) {
        return Err(GatewayError::MethodNotAllowed(
            "model lists are read with GET",
        ));
    }
    respond(worker, conn, req, body).await
}

/// Writes a complete 200 JSON answer.
async fn respond(
    worker: &Worker,
    conn: &mut Connection,
    req: &mut Request,
    body: &[u8],
) -> Result<Persistence, GatewayError> {
    req.record.status = 200;
    req.record.bytes = body.len() as u64;
    // A request that came with a body it did not need: its end is not sought, so the
    // connection cannot carry another request.
    let persistence = req.persistence();
    let mut out = conn.take_scratch();
    write_local_response(
        &mut out,
        200,
        &[],
        "application/json",
        body,
        req.id.as_bytes(),
        persistence.is_keep_alive(),
    );
    if req.head.method == Method::Head {
        out.truncate(out.len() - body.len());
    }
    match conn
        .write_within(out, worker.timeouts.between_chunks())
        .await
    {
        Some(back) => {
            conn.return_scratch(back);
            Ok(persistence)
        }
        None => Ok(Persistence::Close),
    }
}

/// Writes an error in the contract's JSON shape (`Close` also says so to the client).
/// Returns whether the connection stays.
pub async fn send_error(
    worker: &Worker,
    conn: &mut Connection,
    id: &RequestId,
    record: &mut AccessRecord,
    e: &GatewayError,
    persistence: Persistence,
) -> Persistence {
    let body = e.to_json();
    record.status = e.status();
    record.bytes = body.len() as u64;
    let challenge;
    let retry_after;
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if let Some(s) = e.retry_after_s() {
        retry_after = s.to_string();
        extra.push(("Retry-After", &retry_after));
    }
    let rate = match e {
        GatewayError::RateLimited(r) => r.headers.pairs(),
        _ => Vec::new(),
    };
    extra.extend(rate.iter().map(|(name, value)| (*name, value.as_str())));
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
    let mut out = conn.take_scratch();
    write_local_response(
        &mut out,
        e.status(),
        &extra,
        "application/json",
        &body,
        id.as_bytes(),
        persistence.is_keep_alive(),
    );
    match conn
        .write_within(out, worker.timeouts.between_chunks())
        .await
    {
        Some(back) => {
            conn.return_scratch(back);
            persistence
        }
        None => Persistence::Close,
    }
}

/// `send_error` before any request exists (a head that could not be parsed); the
/// connection closes after it.
pub async fn send_head_error(worker: &Worker, conn: &mut Connection, e: &GatewayError) {
    let id = worker.next_request_id();
    tracing::info!(peer = %conn.peer(), request_id = id.as_str(), error = %e, "bad request head");
    let mut record = AccessRecord::default();
    send_error(worker, conn, &id, &mut record, e, Persistence::Close).await;
}
