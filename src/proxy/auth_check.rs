//! Phase `authenticate`'s one outside call: asking the check service (`[auth] check_url`)
//! about a bearer token that is neither an API key nor a JWT of a trusted issuer.
//!
//! The call runs on the worker's own runtime (monoio networking, never a blocking socket),
//! on a connection of its own, bounded in time by `auth.check_timeout_ms` and in size
//! ([`crate::auth::check::MAX_ANSWER_BYTES`]). What the answer means, and caching it, is
//! [`crate::auth`]'s business; this file only carries bytes. Requests on one worker that
//! carry the same uncached token at once share one call: the first asks, the others wait
//! for its verdict. A service that fails answers 503 (`auth_check_unavailable`), never
//! 401, and says why in the log; the failure is not cached, so the next request asks again.

use super::connection::Connection;
use super::error::GatewayError;
use super::exchange::{exchange, Peer};
use super::request::Request;
use super::worker::{SharedCheck, Worker};
use crate::auth::check::{request_body, CheckService, MAX_ANSWER_BYTES};
use crate::auth::{bearer_token, AuthError, Authenticated, CheckFailure, Refusal};
use std::time::{Duration, Instant};

/// How often a request waiting for another's call looks for its verdict.
const SHARED_POLL: Duration = Duration::from_millis(5);

/// Settles the token in `authorization` with the check service.
pub async fn check_with_service(
    worker: &Worker,
    conn: &Connection,
    req: &Request,
    authorization: Option<&[u8]>,
) -> Result<Authenticated, GatewayError> {
    let needs_check = || {
        GatewayError::from(Refusal {
            error: AuthError::NeedsCheck,
            from_cache: false,
        })
    };
    let (Some(service), Some(token)) = (
        worker.auth.check_service(),
        authorization.and_then(bearer_token),
    ) else {
        return Err(needs_check());
    };
    let waiting = worker.checks_in_flight.borrow().get(token).cloned();
    let outcome = match waiting {
        Some(shared) => wait_for(&shared, service.timeout).await,
        None => lead(worker, conn, req, service, token).await,
    };
    outcome.map_err(|failure| match failure {
        CheckFailure::Refused(refusal) => refusal.into(),
        CheckFailure::Unavailable(why) => {
            tracing::warn!(
                request_id = req.id.as_str(),
                error = %why,
                "authentication service (auth.check_url) unavailable: answering 503"
            );
            GatewayError::AuthCheckUnavailable
        }
    })
}

/// Makes the call for every request on this worker that waits for this token.
async fn lead(
    worker: &Worker,
    conn: &Connection,
    req: &Request,
    service: &CheckService,
    token: &[u8],
) -> Result<Authenticated, CheckFailure> {
    let shared = SharedCheck::default();
    let _in_flight = InFlight::register(worker, token, shared.clone());
    let request = check_request(conn, req, service, token);
    let peer = Peer {
        addr: service.url.addr,
        tls_name: service.url.tls_name.as_ref(),
        tls_config: worker.backend_tls.as_ref(),
    };
    worker.metrics.auth_checks.inc();
    let answer = exchange(&peer, request, MAX_ANSWER_BYTES, service.timeout).await;
    let answer = answer.as_ref().map(|(status, body)| (*status, &body[..]));
    let outcome = worker.auth.settle_check(
        token,
        answer.map_err(Clone::clone),
        &mut worker.tokens.borrow_mut(),
    );
    if matches!(outcome, Err(CheckFailure::Unavailable(_))) {
        worker.metrics.auth_check_failures.inc();
    }
    *shared.borrow_mut() = Some(outcome.clone());
    outcome
}

/// Waits (bounded by the call's own timeout and a little) for another request's call.
async fn wait_for(shared: &SharedCheck, timeout: Duration) -> Result<Authenticated, CheckFailure> {
    let deadline = Instant::now() + timeout + SHARED_POLL * 4;
    loop {
        if let Some(outcome) = shared.borrow().as_ref() {
            return outcome.clone();
        }
        if Instant::now() >= deadline {
            return Err(CheckFailure::Unavailable(
                "no verdict from the call another request made for this token".into(),
            ));
        }
        monoio::time::sleep(SHARED_POLL).await;
    }
}

/// The POST to the check service: `{"token","method","path","domain","client"}`.
fn check_request(
    conn: &Connection,
    req: &Request,
    service: &CheckService,
    token: &[u8],
) -> Vec<u8> {
    let buf = conn.buffer();
    let text = |s: crate::http::head::Span| std::str::from_utf8(s.of(buf)).unwrap_or("");
    let method = text(req.head.method_span);
    let path = text(req.head.target).split('?').next().unwrap_or("");
    let domain = req.record.domain.map(text).unwrap_or("");
    let client = conn.peer().ip().to_string();
    let body = request_body(token, method, path, domain, &client);
    let mut out = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: application/json\r\nUser-Agent: cubegate\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        service.path,
        service.url.authority,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// A token's entry among the calls in flight, removed however the call ends (also when
/// the request is dropped mid-call), so no later request waits for a call nobody makes.
struct InFlight<'w> {
    worker: &'w Worker,
    token: Box<[u8]>,
}

impl<'w> InFlight<'w> {
    fn register(worker: &'w Worker, token: &[u8], shared: SharedCheck) -> InFlight<'w> {
        let token: Box<[u8]> = token.into();
        worker
            .checks_in_flight
            .borrow_mut()
            .insert(token.clone(), shared);
        InFlight { worker, token }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.worker
            .checks_in_flight
            .borrow_mut()
            .remove(&self.token);
    }
}
