//! Phase `authorize`: may this caller use this endpoint of this domain?
//!
//! The domain is looked up only now, after authentication (an anonymous caller cannot
//! learn which domains exist); the decision itself is [`crate::auth`]'s. A route the
//! domain cannot serve at all (Ollama's native API on a domain without an Ollama host) is
//! refused here too, before anything is read of the body.

use super::error::GatewayError;
use super::route::{Api, ProxyRoute};
use crate::auth::Identity;
use crate::snapshot::{Domain, Snapshot};

/// The domain a route names, if it exists (not yet revealed to the caller).
pub fn find_domain<'s>(
    buf: &[u8],
    route: &ProxyRoute,
    snapshot: &'s Snapshot,
) -> Option<&'s Domain> {
    snapshot.domains.get(domain_id(buf, route)).map(|d| &**d)
}

fn domain_id<'b>(buf: &'b [u8], route: &ProxyRoute) -> &'b str {
    std::str::from_utf8(route.domain.of(buf)).unwrap_or("")
}

/// Phase `authorize`: the domain (`found` by `find_domain`) the request may use, or why
/// not.
pub fn authorize<'s>(
    buf: &[u8],
    route: &ProxyRoute,
    found: Option<&'s Domain>,
    identity: &Identity,
    snapshot: &Snapshot,
) -> Result<&'s Domain, GatewayError> {
    let Some(domain) = found else {
        return Err(GatewayError::UnknownDomain(
            domain_id(buf, route).to_string(),
        ));
    };
    crate::auth::authorize(
        identity,
        &domain.id,
        route.endpoint,
        &snapshot.keys,
        &snapshot.directory,
    )?;
    if route.api == Api::Ollama && !domain.has_ollama() {
        return Err(GatewayError::NoOllamaBackend(domain.id.clone()));
    }
    Ok(domain)
}
