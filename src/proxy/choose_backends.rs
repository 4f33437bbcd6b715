//! Phase `choose_backends`: which GPU hosts may serve this request, in the order to try
//! them.
//!
//! The candidates are the domain's backends that serve the model (any backend for admin
//! operations that name a model the domain does not list yet, such as a pull); the
//! worker's pools order them (round robin among those up, then those that recently
//! refused a connection, which are still tried: a down mark is a hint, not a verdict).

use super::error::GatewayError;
use super::route::{Api, ProxyRoute};
use super::worker::Worker;
use crate::snapshot::Domain;
use std::net::SocketAddr;

/// Phase `choose_backends`: the backends that may serve this model on this route, in the
/// order to try them.
/// `body_model` is what `read_model` found; `/v1/models/{id}` names its model in the
/// path instead, and that must be one the domain offers too.
pub fn choose_backends(
    worker: &Worker,
    buf: &[u8],
    route: &ProxyRoute,
    domain: &Domain,
    body_model: Option<&str>,
) -> Result<Vec<usize>, GatewayError> {
    let model = path_model(buf, route).or(body_model);
    let ollama_only = route.api == Api::Ollama;
    let endpoint = route.endpoint;
    let mut candidates: Vec<(usize, SocketAddr)> = domain
        .candidates(model, ollama_only)
        .map(|i| (i, domain.backends[i].addr))
        .collect();
    if candidates.is_empty() && model.is_some() && endpoint.is_admin() {
        // Admin operations may name a model the domain does not list yet (a pull).
        candidates = domain
            .candidates(None, ollama_only)
            .map(|i| (i, domain.backends[i].addr))
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
    let mut order = Vec::with_capacity(candidates.len());
    worker.pools.borrow_mut().order(&candidates, &mut order);
    Ok(order)
}

/// The model `/v1/models/{id}` names.
fn path_model<'b>(buf: &'b [u8], route: &ProxyRoute) -> Option<&'b str> {
    let target = std::str::from_utf8(route.upstream_target.of(buf)).ok()?;
    let rest = target.strip_prefix("/v1/models/")?;
    rest.split('?').next()
}
