//! Phase `admit`: the limits that apply to this request — its domain's, its member's, its
//! API key's ([`crate::usage::limits`]) — checked, and its share reserved.
//!
//! A request under no limit costs one hash probe per scope and nothing else. A limited one
//! reserves its tokens (an estimate of the prompt, a quarter of the body's bytes, plus its
//! `max_tokens` or `RESERVE_COMPLETION`), which is settled to the answer's real count
//! ([`settle`]) before the answer's last bytes go out (so a client's next request already
//! sees it), or in the `log` phase for an answer that did not end well. Its admission
//! travels with the request and gives its concurrency slot back when the request is
//! dropped. Counters are shared by all workers through
//! [`crate::usage::limiter`]; each worker keeps the ones it used.

use super::error::GatewayError;
use super::read_model::ModelRead;
use super::request::Request;
use super::worker::Worker;
use crate::snapshot::Domain;
use crate::usage::admission::{admit as admit_to, Admission, Applied, ScopeKind};
use crate::usage::fleet::view::Fleet;
use crate::usage::limiter::{counters, Clock, Counters, Scope};
use crate::usage::limits::LimitBook;
use crate::usage::UsageSource;
use std::sync::Arc;

/// Completion tokens reserved for a request that names no `max_tokens`.
pub const RESERVE_COMPLETION: u32 = 1024;

/// Phase `admit`. `None`: no limit applies.
pub fn admit(
    worker: &Worker,
    req: &Request,
    domain: &Domain,
    book: &LimitBook,
    body: &ModelRead,
) -> Result<Option<Admission>, GatewayError> {
    let metrics_slot = domain.metrics_slot;
    let domain = domain.id.as_str();
    let Some(identity) = req.identity.as_ref() else {
        return Ok(None);
    };
    let user = identity.user_id();
    let key = identity.api_key_id();
    let own = book.domain(domain);
    let scopes = [
        (ScopeKind::Domain, own.domain),
        (
            ScopeKind::Member,
            book.own_member(domain, user).unwrap_or(own.per_member),
        ),
        (ScopeKind::Key, key.map(|k| book.key(k)).unwrap_or_default()),
    ];
    if scopes.iter().all(|(_, l)| l.is_none()) {
        return Ok(None);
    }
    let applied: Vec<Applied> = scopes
        .iter()
        .filter(|(_, l)| !l.is_none())
        .map(|&(scope, limits)| {
            let id = match scope {
                ScopeKind::Domain => Scope::Domain(domain),
                ScopeKind::Member => Scope::Member { domain, user },
                ScopeKind::Key => Scope::Key(key.unwrap_or_default()),
            };
            Applied {
                scope,
                limits,
                counters: worker_counters(worker, id),
            }
        })
        .collect();
    let reserve = reservation(req, body);
    admit_to(applied, Clock::now(), Fleet::now(), reserve)
        .map(Some)
        .map_err(|r| {
            worker.metrics.limit_rejections.count(metrics_slot, &r);
            GatewayError::RateLimited(Box::new(r))
        })
}

/// The scope's counters, from the worker's own map (the shared registry the first time).
fn worker_counters(worker: &Worker, scope: Scope<'_>) -> Arc<Counters> {
    let key = scope.key();
    worker
        .limit_counters
        .borrow_mut()
        .entry(key)
        .or_insert_with(|| counters(&scope))
        .clone()
}

/// A prompt's tokens as guessed from its body: a quarter of its bytes.
fn prompt_estimate(req: &Request) -> u64 {
    (req.body_in_buffer() / 4) as u64
}

/// Tokens a request reserves: its prompt's estimate and the completion it may ask for.
fn reservation(req: &Request, body: &ModelRead) -> u32 {
    let prompt = prompt_estimate(req);
    let completion = body
        .scanner
        .as_ref()
        .and_then(|s| s.max_tokens())
        .unwrap_or(u64::from(RESERVE_COMPLETION));
    (prompt + completion).min(u64::from(u32::MAX)) as u32
}

/// A limited request's token reservation becomes what the answer used: the host's
/// figures, or (when it reported none) the prompt's estimate and the events delivered;
/// nothing when no answer came.
pub fn settle(req: &mut Request) {
    let estimate = prompt_estimate(req);
    let Some(admission) = req.admission.as_mut() else {
        return;
    };
    let used = match req.record.usage {
        Some(u) if u.source == UsageSource::Reported => u.prompt_tokens + u.completion_tokens,
        Some(u) => estimate + u.completion_tokens,
        None => 0,
    };
    admission.settle(used);
}
