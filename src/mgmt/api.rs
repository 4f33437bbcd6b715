//! The management API: the Cube AI / SuperMQ shapes for tokens, users, domains and
//! memberships, and this issuer's JWKS.
//!
//! Bodies are parsed strictly (`deny_unknown_fields`: a typo is a 400 naming it, not a
//! silently ignored field). Token endpoints live in `login`, keys/backends/disabling in
//! `access`, usage in `usage`, who is calling in `caller`, the answers' shapes in
//! `answer`; this module routes and holds users, domains, memberships and the fleet's
//! `GET /backends`.

use super::answer::{body, store_error, user_json, Answer};
use super::caller::{admin, caller, domain_admin};
use super::login::{self, check_password_strength, hash_password};
use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::{Domain, User};
use super::tokens::random_id;
use super::{unix_now, Management};
use crate::auth::claims::Role;
use crate::auth::directory::DomainRole;
use serde::Deserialize;
use serde_json::json;

pub fn route(m: &Management, req: Request) -> Reply {
    let path = req.path.trim_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').collect();
    let result = match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["users", "tokens", "issue"]) => login::issue(m, &req),
        ("POST", ["users", "tokens", "refresh"]) => login::refresh(m, &req),
        ("POST", ["users", "tokens", "revoke"]) => login::revoke(m, &req),
        ("POST", ["users"]) => create_user(m, &req),
        ("GET", ["users"]) => list_users(m, &req),
        ("GET", ["users", "profile"]) => caller(m, &req).map(|u| Reply::json(200, &user_json(&u))),
        ("GET", ["users", "profile", "usage"]) => super::usage::profile_usage(m, &req),
        ("POST", ["domains"]) => create_domain(m, &req),
        ("GET", ["domains"]) => list_domains(m, &req),
        ("GET", ["domains", id]) => get_domain(m, &req, id),
        ("GET", ["domains", id, "usage"]) => super::usage::domain_usage(m, &req, id),
        ("PUT", ["domains", id, "members", user]) => set_member(m, &req, id, user),
        ("DELETE", ["domains", id, "members", user]) => remove_member(m, &req, id, user),
        ("POST", ["users", id, "disable"]) => super::access::set_disabled(m, &req, id, true),
        ("POST", ["users", id, "enable"]) => super::access::set_disabled(m, &req, id, false),
        ("PUT", ["domains", id, "backends"]) => super::access::set_backends(m, &req, id),
        ("POST", ["domains", id, "keys"]) => super::access::create_key(m, &req, id),
        ("DELETE", ["domains", id, "keys", key]) => super::access::revoke_key(m, &req, id, key),
        (_, ["domains", id, rest @ .., "limits"]) => super::limits::route(m, &req, id, rest),
        ("POST", ["keys", "rotate"]) => admin(m, &req).and_then(|_| {
            m.rotate_key()
                .map(|kid| Reply::json(201, &json!({"kid": kid})))
                .map_err(|e| error_reply(500, "rotation_failed", &e))
        }),
        ("GET", ["backends"]) => admin(m, &req).map(|_| backends(m)),
        ("GET", ["metrics"]) => Ok(Reply {
            status: 200,
            body: (crate::metrics::render(&m.registry) + &m.health.render()).into_bytes(),
            headers: vec![("Content-Type", "text/plain; version=0.0.4".into())],
        }),
        ("GET", ["keys", ".well-known", "jwks.json"]) => Ok(Reply::json(
            200,
            &json!({"keys": m.keys().iter().map(|k| k.jwk()).collect::<Vec<_>>()}),
        )),
        (_, ["users" | "domains" | "keys", ..]) => Err(error_reply(
            404,
            "not_found",
            "no such management endpoint (or not available in this build yet)",
        )),
        _ => Err(error_reply(404, "not_found", "no such route")),
    };
    result.unwrap_or_else(|e| e)
}

/// `GET /backends`: every GPU host, its state and load, and the models domains list for it.
fn backends(m: &Management) -> Reply {
    let snapshot = m.published.load();
    let status = crate::fleet::status_json(|host| {
        let mut models: Vec<String> = snapshot
            .domains
            .values()
            .flat_map(|d| d.backends.iter())
            .filter(|b| std::ptr::eq(&*b.host, host))
            .flat_map(|b| b.models.iter().cloned())
            .collect();
        models.sort_unstable();
        models.dedup();
        models
    });
    Reply::json(200, &status)
}

fn check_email(e: &str) -> Result<(), Reply> {
    let ok = e.len() <= 254
        && e.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(error_reply(
            400,
            "invalid_email",
            "email: not a valid address",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    password: String,
    #[serde(default)]
    first_name: String,
    #[serde(default)]
    last_name: String,
}

fn create_user(m: &Management, req: &Request) -> Answer {
    admin(m, req)?;
    let new: NewUser = body(req)?;
    check_email(&new.email)?;
    check_password_strength(&new.password, &[&new.email])
        .map_err(|why| error_reply(400, "weak_password", &format!("password: {why}")))?;
    let user = User {
        id: random_id(),
        email: new.email,
        password_hash: hash_password(&new.password)
            .map_err(|e| error_reply(500, "hash_failed", &e))?,
        first_name: new.first_name,
        last_name: new.last_name,
        role: Role::User,
        disabled: false,
        created_at: unix_now(),
    };
    m.store().insert_user(&user).map_err(store_error)?;
    Ok(Reply::json(201, &user_json(&user)))
}

fn list_users(m: &Management, req: &Request) -> Answer {
    admin(m, req)?;
    let users = m.store().users().map_err(store_error)?;
    let list: Vec<_> = users.iter().map(user_json).collect();
    Ok(Reply::json(
        200,
        &json!({"total": list.len(), "users": list}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDomain {
    name: String,
    id: Option<String>,
}

fn create_domain(m: &Management, req: &Request) -> Answer {
    admin(m, req)?;
    let new: NewDomain = body(req)?;
    if new.name.is_empty() || new.name.len() > 128 {
        return Err(error_reply(
            400,
            "invalid_name",
            "name: must be 1..=128 characters",
        ));
    }
    let id = new.id.unwrap_or_else(random_id);
    crate::config::validate_domain_id("id", &id)
        .map_err(|e| error_reply(400, "invalid_id", &e.to_string()))?;
    let domain = Domain { id, name: new.name };
    m.store()
        .insert_domain(&domain, unix_now())
        .map_err(store_error)?;
    Ok(Reply::json(
        201,
        &json!({"id": domain.id, "name": domain.name}),
    ))
}

fn visible_domains(m: &Management, u: &User) -> Result<Vec<Domain>, Reply> {
    let store = m.store();
    let all = store.domains().map_err(store_error)?;
    if u.role == Role::Admin {
        return Ok(all);
    }
    let mine: Vec<String> = store
        .memberships()
        .map_err(store_error)?
        .into_iter()
        .filter(|(_, user, _)| *user == u.id)
        .map(|(d, _, _)| d)
        .collect();
    Ok(all.into_iter().filter(|d| mine.contains(&d.id)).collect())
}

fn list_domains(m: &Management, req: &Request) -> Answer {
    let u = caller(m, req)?;
    let list: Vec<_> = visible_domains(m, &u)?
        .into_iter()
        .map(|d| json!({"id": d.id, "name": d.name}))
        .collect();
    Ok(Reply::json(
        200,
        &json!({"total": list.len(), "domains": list}),
    ))
}

fn get_domain(m: &Management, req: &Request, id: &str) -> Answer {
    let u = caller(m, req)?;
    visible_domains(m, &u)?
        .into_iter()
        .find(|d| d.id == id)
        .map(|d| Reply::json(200, &json!({"id": d.id, "name": d.name})))
        .ok_or_else(|| error_reply(404, "not_found", "no such domain (or not visible to you)"))
}

/// The platform admin, or an admin member of the domain.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Membership {
    role: String,
}

fn set_member(m: &Management, req: &Request, domain: &str, user: &str) -> Answer {
    domain_admin(m, req, domain)?;
    let body: Membership = body(req)?;
    let role = DomainRole::parse(&body.role)
        .ok_or_else(|| error_reply(400, "invalid_role", "role: must be \"admin\" or \"member\""))?;
    m.store()
        .set_membership(domain, user, role)
        .map_err(store_error)?;
    m.publish();
    Ok(Reply::json(
        200,
        &json!({"domain_id": domain, "user_id": user, "role": role.as_str()}),
    ))
}

fn remove_member(m: &Management, req: &Request, domain: &str, user: &str) -> Answer {
    domain_admin(m, req, domain)?;
    if !m
        .store()
        .remove_membership(domain, user)
        .map_err(store_error)?
    {
        return Err(error_reply(404, "not_found", "no such membership"));
    }
    m.publish();
    Ok(Reply::empty(204))
}
