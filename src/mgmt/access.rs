//! Management API for what reaches the data plane besides memberships: a domain's backends,
//! API keys (with their limits, when created with some), and disabling users. Each change
//! is published at once (with a new revocation epoch), so a revoked key or a disabled user
//! stops working on the next request.

use super::answer::{body, store_error, user_json, Answer};
use super::caller::{admin, domain_admin};
use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::ApiKeyRow;
use super::tokens::random_id;
use super::{unix_now, Management};
use crate::config::BackendConfig;
use crate::usage::limits::Limits;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

pub fn set_disabled(m: &Management, req: &Request, user: &str, disabled: bool) -> Answer {
    let me = admin(m, req)?;
    if me.id == user && disabled {
        return Err(error_reply(
            400,
            "invalid_request",
            "the platform admin cannot disable itself",
        ));
    }
    let changed = m
        .store()
        .set_disabled(user, disabled)
        .map_err(store_error)?;
    if !changed {
        return Err(error_reply(404, "not_found", "no such user"));
    }
    m.publish();
    let u = m.store().user_by_id(user).map_err(store_error)?;
    Ok(Reply::json(200, &u.map_or(json!({}), |u| user_json(&u))))
}

pub fn set_backends(m: &Management, req: &Request, domain: &str) -> Answer {
    // Where the gateway connects is the platform's call: a domain admin pointing backends
    // at arbitrary hosts would turn cubegate into a request forger.
    admin(m, req)?;
    let owner = m.store().domain_from_config(domain).map_err(store_error)?;
    match owner {
        None => return Err(error_reply(404, "not_found", "no such domain")),
        Some(true) => {
            return Err(error_reply(
                409,
                "owned_by_config",
                "this domain's backends are set in the config file; edit the file and send SIGHUP",
            ))
        }
        Some(false) => {}
    }
    let backends: Vec<BackendConfig> = body(req)?;
    if backends.is_empty() {
        return Err(error_reply(
            400,
            "invalid_backends",
            "list at least one backend",
        ));
    }
    // The same checks as the config file's (URL, models), before anything is stored.
    crate::snapshot::Domain::build("backends", domain, &backends, true)
        .map_err(|e| error_reply(400, "invalid_backends", &e.to_string()))?;
    let json = serde_json::to_string(
        &serde_json::from_slice::<serde_json::Value>(&req.body).unwrap_or_default(),
    )
    .unwrap_or_default();
    m.store().set_backends(domain, &json).map_err(store_error)?;
    m.publish();
    Ok(Reply::json(
        200,
        &json!({"domain_id": domain, "backends": backends.len()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    expires_in_s: Option<u64>,
    /// The key's limit set (LIMITS), checked by `limits::parse_limits`.
    #[serde(default)]
    limits: Option<serde_json::Value>,
}

pub fn create_key(m: &Management, req: &Request, domain: &str) -> Answer {
    let me = domain_admin(m, req, domain)?;
    let new: NewKey = body(req)?;
    if new.name.is_empty() || new.name.len() > 128 {
        return Err(error_reply(
            400,
            "invalid_name",
            "name: must be 1..=128 characters",
        ));
    }
    let limits = match &new.limits {
        Some(v) => super::limits::parse_limits(v, "limits")?,
        None => Limits::default(),
    };
    let exists = m
        .store()
        .domain_from_config(domain)
        .map_err(store_error)?
        .is_some();
    if !exists {
        return Err(error_reply(404, "not_found", "no such domain"));
    }
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| error_reply(500, "no_randomness", "cannot make a key"))?;
    let key = format!("cg_{}", URL_SAFE_NO_PAD.encode(secret));
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let now = unix_now();
    let row = ApiKeyRow {
        id: random_id(),
        domain_id: domain.to_string(),
        name: new.name,
        digest: digest.as_ref().to_vec(),
        created_by: me.id,
        expires_at: new
            .expires_in_s
            .map(|s| now.saturating_add(s.min(10 * 365 * 86400) as i64)),
    };
    {
        let store = m.store();
        store.insert_api_key(&row, now).map_err(store_error)?;
        if !limits.is_none() {
            // No key goes out without the limits it was asked with.
            if let Err(e) = store.set_key_limits(domain, &row.id, &limits) {
                let _ = store.revoke_api_key(domain, &row.id);
                return Err(store_error(e));
            }
        }
    }
    m.publish();
    // The key itself is shown this once; only its digest is kept.
    Ok(Reply::json(
        201,
        &json!({"id": row.id, "key": key, "name": row.name, "domain_id": domain, "expires_at": row.expires_at, "limits": limits}),
    ))
}

pub fn revoke_key(m: &Management, req: &Request, domain: &str, key: &str) -> Answer {
    domain_admin(m, req, domain)?;
    let revoked = m.store().revoke_api_key(domain, key).map_err(store_error)?;
    if !revoked {
        return Err(error_reply(
            404,
            "not_found",
            "no such live key in this domain",
        ));
    }
    m.publish();
    Ok(Reply::empty(204))
}
