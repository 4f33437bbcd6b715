//! Who is calling the management API: a live user of this box, by an access token this box
//! issued, and whether that user is the platform admin or an admin of a domain.

use super::answer::store_error;
use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::User;
use super::{unix_now, Management};
use crate::auth::bearer_token;
use crate::auth::claims::Role;
use crate::auth::directory::DomainRole;

/// The authenticated caller of a management request: a live user of this box.
pub(super) fn caller(m: &Management, req: &Request) -> Result<User, Reply> {
    let unauthorized = |why: &str| {
        let mut r = error_reply(401, "invalid_token", why);
        r.headers
            .push(("WWW-Authenticate", "Bearer realm=\"cubegate\"".into()));
        r
    };
    let token = req
        .authorization
        .as_deref()
        .and_then(|v| bearer_token(v.as_bytes()))
        .ok_or_else(|| {
            unauthorized("missing bearer token: send Authorization: Bearer <access token>")
        })?;
    let snapshot = m.published.load();
    let claims = crate::auth::verify_token(token, &snapshot.keys, &m.rules, unix_now() as f64)
        .map_err(|e| unauthorized(&e.to_string()))?;
    let own = claims.issuer().and_then(|i| snapshot.keys.issuers.get(i));
    if !own.is_some_and(|i| i.own) {
        return Err(unauthorized(
            "the management API takes tokens issued by this box",
        ));
    }
    let user = m.store().user_by_id(claims.sub()).map_err(store_error)?;
    match user {
        Some(u) if !u.disabled => Ok(u),
        _ => Err(unauthorized(
            "the user of this token is unknown or disabled",
        )),
    }
}

pub(super) fn admin(m: &Management, req: &Request) -> Result<User, Reply> {
    let u = caller(m, req)?;
    if u.role == Role::Admin {
        Ok(u)
    } else {
        Err(error_reply(
            403,
            "forbidden",
            "only the platform admin may do this",
        ))
    }
}

pub(super) fn domain_admin(m: &Management, req: &Request, domain: &str) -> Result<User, Reply> {
    let u = caller(m, req)?;
    if u.role == Role::Admin {
        return Ok(u);
    }
    let is_admin = m
        .store()
        .memberships()
        .map_err(store_error)?
        .iter()
        .any(|(d, user, role)| d == domain && *user == u.id && *role == DomainRole::Admin);
    if is_admin {
        Ok(u)
    } else {
        Err(error_reply(
            403,
            "forbidden",
            "only the platform admin or an admin of this domain may do this",
        ))
    }
}
