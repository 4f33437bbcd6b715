//! The shapes of management answers: a result whose error is itself a reply, strict JSON
//! bodies, store failures mapped to statuses, and a user as the API shows one.

use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::{StoreError, User};
use serde::Deserialize;
use serde_json::json;

pub(super) type Answer = Result<Reply, Reply>;

pub(super) fn body<'a, T: Deserialize<'a>>(req: &'a Request) -> Result<T, Reply> {
    serde_json::from_slice(&req.body)
        .map_err(|e| error_reply(400, "invalid_body", &format!("invalid JSON body: {e}")))
}

pub(super) fn store_error(e: StoreError) -> Reply {
    match e {
        StoreError::Conflict(_) => error_reply(409, "conflict", &e.to_string()),
        StoreError::NotFound(_) => error_reply(404, "not_found", &e.to_string()),
        StoreError::Db(ref err) => {
            tracing::error!("management store: {err}");
            error_reply(500, "store_error", "the store failed; nothing was changed")
        }
        StoreError::Unavailable(ref err) => {
            tracing::error!("management store unreachable: {err}");
            error_reply(
                503,
                "store_unavailable",
                "the management store (PostgreSQL) is unreachable; nothing was changed. The proxy keeps serving from the last state; try again shortly",
            )
        }
    }
}

pub(super) fn user_json(u: &User) -> serde_json::Value {
    json!({
        "id": u.id, "email": u.email, "first_name": u.first_name, "last_name": u.last_name,
        "role": u.role.as_str(), "status": if u.disabled { "disabled" } else { "enabled" },
        "created_at": u.created_at,
    })
}
