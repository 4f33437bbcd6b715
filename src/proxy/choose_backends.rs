//! Phase `choose_backends`: which GPU hosts may serve this request, in the order to try
//! them.
//!
//! The candidates are the domain's backends that serve the model (any backend for admin
//! operations that name a model the domain does not list yet, such as a pull); the
//! domain's routing policy ([`crate::fleet::policy`]) orders those in rotation. For chat
//! and completion requests the policy sees the request's prefix keys, hashed from the body
//! bytes `read_model` already holds. The domain's `sticky` may pin a conversation instead:
//! an `X-Session-Id` header (the default), or the body's OpenAI `"user"` field, which the
//! model scanner hashed on its way through.

use super::error::GatewayError;
use super::read_model::ModelRead;
use super::request::Request;
use super::route::{Api, ProxyRoute};
use super::worker::Worker;
use crate::config::Sticky;
use crate::fleet::policy::{rank, Placement, Policy};
use crate::fleet::prefix::PrefixKeys;
use crate::http::headers::eq_ignore_case;
use crate::scope::Endpoint;
use crate::snapshot::Domain;

/// The hosts to try, first choice first, and how the first was picked.
pub struct Choice {
    pub order: Vec<usize>,
    pub placement: Placement,
}

/// Phase `choose_backends`. `body` is what `read_model` found; `/v1/models/{id}` names
/// its model in the path instead, and that must be one the domain offers too.
pub fn choose_backends(
    worker: &Worker,
    buf: &[u8],
    req: &Request,
    route: &ProxyRoute,
    domain: &Domain,
    body: &ModelRead,
) -> Result<Choice, GatewayError> {
    let model = path_model(buf, route).or(body.model());
    let ollama_only = route.api == Api::Ollama;
    let mut candidates: Vec<(usize, &crate::fleet::host::Host)> = domain
        .candidates(model, ollama_only)
        .map(|i| (i, &*domain.backends[i].host))
        .collect();
    if candidates.is_empty() && model.is_some() && route.endpoint.is_admin() {
        // Admin operations may name a model the domain does not list yet (a pull).
        candidates = domain
            .candidates(None, ollama_only)
            .map(|i| (i, &*domain.backends[i].host))
            .collect();
    }
    if candidates.is_empty() {
        return Err(match model {
            Some(m) => GatewayError::UnknownModel {
                domain: domain.id.clone(),
                model: m.to_string(),
            },
            None => GatewayError::NoOllamaBackend(domain.id.clone()),
        });
    }
    let keys = match domain.routing {
        Policy::Auto | Policy::Prefix => prefix_keys(buf, req, route.endpoint, domain, body),
        Policy::LeastLoaded | Policy::RoundRobin => PrefixKeys::default(),
    };
    let mut order = Vec::with_capacity(candidates.len());
    let mut state = worker.routing.borrow_mut();
    let placement = rank(
        req.started,
        domain.routing,
        &candidates,
        &keys,
        &mut state,
        &mut order,
    )
    .ok_or(GatewayError::NoHealthyBackend)?;
    worker.metrics.placements[placement.index()].inc();
    let moved = state.take_moves();
    if moved > 0 {
        worker.metrics.group_moves.add(moved);
    }
    Ok(Choice { order, placement })
}

/// What places this request by its content: its session or user when the domain pins
/// those and the request names one, else the leading bytes of a prompt-carrying body.
fn prefix_keys(
    buf: &[u8],
    req: &Request,
    endpoint: Endpoint,
    domain: &Domain,
    body: &ModelRead,
) -> PrefixKeys {
    if domain.sticky != Sticky::None {
        let session = req
            .head
            .headers
            .iter()
            .find(|(n, _)| eq_ignore_case(n.of(buf), b"x-session-id"))
            .map(|(_, v)| v.of(buf))
            .filter(|v| !v.is_empty());
        if let Some(id) = session {
            return PrefixKeys::of_session(id);
        }
    }
    if domain.sticky == Sticky::User {
        if let Some(user) = body.scanner.as_ref().and_then(|s| s.user()) {
            return PrefixKeys::of_user(user);
        }
    }
    match endpoint {
        Endpoint::Chat | Endpoint::Completions => {
            PrefixKeys::of(&buf[req.head.len..req.consumed], !req.body_pending())
        }
        _ => PrefixKeys::default(),
    }
}

/// The model `/v1/models/{id}` names.
fn path_model<'b>(buf: &'b [u8], route: &ProxyRoute) -> Option<&'b str> {
    let target = std::str::from_utf8(route.upstream_target.of(buf)).ok()?;
    let rest = target.strip_prefix("/v1/models/")?;
    rest.split('?').next()
}
