//! Management API for limits (issue 12): a domain's own set and its members' default, one
//! member's own set, one API key's set — `GET`, `PUT` and `DELETE` on
//! `/domains/{id}/limits`, `/domains/{id}/members/{user_id}/limits` and
//! `/domains/{id}/keys/{key_id}/limits`, for the domain's admins and the platform admin.
//!
//! A set is checked by hand, not by serde, so a bad value is a 400 naming its field
//! (`per_member.tokens_per_minute`), which serde's messages do not. A write goes to the
//! store and is published at once, so the data plane applies it from the next request; a
//! read answers from the published snapshot — what is in force, and where it comes from —
//! so what the API shows is what the workers use.
//!
//! Precedence, as the data plane reads it ([`LimitBook`]): a domain's sets from the API
//! replace the config file's for that domain (both sets: `PUT` fills an absent one with
//! what was in force, so the domain never falls back to half the file); a member's own set
//! replaces the domain's per-member default; `DELETE` returns to the file's sets or to the
//! default.

use super::answer::{body, store_error, Answer};
use super::caller::domain_admin;
use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::LimitsOf;
use super::{unix_now, Management};
use crate::usage::limits::{DomainLimits, LimitBook, Limits};
use serde_json::{json, Map, Value};

/// The figures of a set, as the API names them.
const FIELDS: &str = "requests_per_minute, tokens_per_minute, tokens_per_day, concurrent";

/// `/domains/{domain}/{rest…}/limits`.
pub fn route(m: &Management, req: &Request, domain: &str, rest: &[&str]) -> Answer {
    let of = match rest {
        [] => LimitsOf::Domain(domain),
        ["members", user] => LimitsOf::Member(domain, user),
        ["keys", key] => LimitsOf::Key(domain, key),
        _ => return Err(error_reply(404, "not_found", "no such route")),
    };
    if !matches!(req.method.as_str(), "GET" | "PUT" | "DELETE") {
        return Err(error_reply(
            405,
            "method_not_allowed",
            "limits take GET, PUT and DELETE",
        ));
    }
    domain_admin(m, req, domain)?;
    must_exist(m, of)?;
    match (req.method.as_str(), of) {
        ("PUT", LimitsOf::Domain(_)) => put_domain(m, req, domain)?,
        ("PUT", _) => {
            let set = parse_limits(&body::<Value>(req)?, "")?;
            let stored = {
                let store = m.store();
                match of {
                    LimitsOf::Member(d, user) => store.set_member_limits(d, user, &set),
                    LimitsOf::Key(d, key) => store.set_key_limits(d, key, &set),
                    LimitsOf::Domain(_) => Ok(false), // put_domain, above
                }
            };
            if !stored.map_err(store_error)? {
                return Err(not_found(of));
            }
            m.publish();
        }
        ("DELETE", _) => {
            m.store().clear_limits(of).map_err(store_error)?;
            m.publish();
            return Ok(Reply::empty(204));
        }
        _ => {}
    }
    Ok(Reply::json(200, &in_force(m, of)?))
}

/// `PUT /domains/{id}/limits` `{"domain": LIMITS, "per_member": LIMITS}`: a set present
/// replaces that set whole; a set absent (or null) stays as it is in force now.
fn put_domain(m: &Management, req: &Request, domain: &str) -> Result<(), Reply> {
    let body: Value = body(req)?;
    let Value::Object(fields) = &body else {
        return Err(invalid(
            "the body must be {\"domain\": LIMITS, \"per_member\": LIMITS}",
        ));
    };
    if let Some(other) = fields.keys().find(|k| *k != "domain" && *k != "per_member") {
        return Err(invalid(&format!(
            "{other}: unknown field (the fields are domain and per_member)"
        )));
    }
    let part = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_limits(v, name).map(Some),
    };
    let (own, per_member) = (part("domain")?, part("per_member")?);
    let stored = {
        // Read and written under one hold of the store: two admins setting one set each
        // cannot undo each other's.
        let store = m.store();
        let api = store.api_limits().map_err(store_error)?;
        let now = api.domains.get(domain).copied().unwrap_or_else(|| {
            let snapshot = m.published.load();
            snapshot
                .limits
                .file
                .get(domain)
                .copied()
                .unwrap_or_default()
        });
        let next = DomainLimits {
            domain: own.unwrap_or(now.domain),
            per_member: per_member.unwrap_or(now.per_member),
        };
        store.set_domain_limits(domain, &next)
    };
    if !stored.map_err(store_error)? {
        return Err(not_found(LimitsOf::Domain(domain)));
    }
    m.publish();
    Ok(())
}

/// A limit set (LIMITS) out of a JSON value; `at` names where it sits in the body ("" =
/// it is the body), for the errors.
pub(super) fn parse_limits(value: &Value, at: &str) -> Result<Limits, Reply> {
    let named = |field: &str| {
        if at.is_empty() {
            field.to_string()
        } else {
            format!("{at}.{field}")
        }
    };
    let Value::Object(fields) = value else {
        let what = if at.is_empty() { "the body" } else { at };
        return Err(invalid(&format!(
            "{what}: must be an object of limits ({FIELDS}), not {value}"
        )));
    };
    let mut set = Limits::default();
    for (field, v) in fields {
        let slot = match field.as_str() {
            "requests_per_minute" => &mut set.requests_per_minute,
            "tokens_per_minute" => &mut set.tokens_per_minute,
            "tokens_per_day" => &mut set.tokens_per_day,
            "concurrent" => &mut set.concurrent,
            _ => {
                return Err(invalid(&format!(
                    "{}: unknown limit (the limits are {FIELDS})",
                    named(field)
                )))
            }
        };
        *slot = v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                invalid(&format!(
                    "{}: must be a whole number from 0 to {} (0 = no limit), not {v}",
                    named(field),
                    u32::MAX
                ))
            })?;
    }
    Ok(set)
}

fn invalid(message: &str) -> Reply {
    error_reply(400, "invalid_limits", message)
}

fn not_found(of: LimitsOf<'_>) -> Reply {
    let message = match of {
        LimitsOf::Domain(d) => format!("no such domain: {d}"),
        LimitsOf::Member(d, user) => format!("user {user} is not a member of domain {d}"),
        LimitsOf::Key(d, key) => format!("no live API key {key} in domain {d}"),
    };
    error_reply(404, "not_found", &message)
}

/// 404 naming what is missing: the domain, the membership, or the live key in the domain.
fn must_exist(m: &Management, of: LimitsOf<'_>) -> Result<(), Reply> {
    let store = m.store();
    let found = match of {
        LimitsOf::Domain(d) => store.domain_from_config(d).map(|o| o.is_some()),
        LimitsOf::Member(d, user) => store
            .memberships()
            .map(|all| all.iter().any(|(md, mu, _)| md == d && mu == user)),
        LimitsOf::Key(d, key) => store
            .live_api_keys(unix_now())
            .map(|all| all.iter().any(|k| k.id == key && k.domain_id == d)),
    };
    if found.map_err(store_error)? {
        Ok(())
    } else {
        Err(not_found(of))
    }
}

/// The set in force for `of`, from the published snapshot, and where it comes from.
fn in_force(m: &Management, of: LimitsOf<'_>) -> Result<Value, Reply> {
    let snapshot = m.published.load();
    let book: &LimitBook = &snapshot.limits;
    Ok(match of {
        LimitsOf::Domain(d) => {
            let set = book.domain(d);
            let source = if book.api.domains.contains_key(d) {
                "api"
            } else if book
                .file
                .get(d)
                .is_some_and(|f| *f != DomainLimits::default())
            {
                "file"
            } else {
                "none"
            };
            let members: Map<String, Value> = book
                .api
                .members
                .get(d)
                .into_iter()
                .flatten()
                .map(|(user, set)| (user.clone(), json!(set)))
                .collect();
            let keys: Map<String, Value> = m
                .store()
                .live_api_keys(unix_now())
                .map_err(store_error)?
                .into_iter()
                .filter(|k| k.domain_id == d)
                .filter_map(|k| Some((k.id.clone(), json!(book.api.keys.get(&k.id)?))))
                .collect();
            json!({
                "domain_id": d, "source": source, "domain": set.domain,
                "per_member": set.per_member, "members": members, "keys": keys,
            })
        }
        LimitsOf::Member(d, user) => {
            let own = book
                .api
                .members
                .get(d)
                .is_some_and(|s| s.contains_key(user));
            let source = if own { "member" } else { "per_member" };
            json!({
                "domain_id": d, "user_id": user, "limits": book.member(d, user), "source": source,
            })
        }
        LimitsOf::Key(d, key) => {
            let source = if book.api.keys.contains_key(key) {
                "key"
            } else {
                "none"
            };
            json!({"domain_id": d, "key_id": key, "limits": book.key(key), "source": source})
        }
    })
}
