//! The usage API: `GET /domains/{id}/usage` and `GET /users/profile/usage`, as JSON or,
//! with `Accept: text/csv`, as CSV.
//!
//! Who sees what: the platform admin and a domain's admins see all of the domain's rows;
//! a plain member sees only their own (requests made with their tokens and with the API
//! keys they created); anyone else gets the 404 `GET /domains/{id}` gives them. The profile
//! view is always the caller's own, across domains. The answer shows what the usage writer
//! has stored: requests of the last `[usage] flush_ms` plus about a second are not in it
//! yet.

use super::answer::{store_error, Answer};
use super::caller::caller;
use super::request::Request;
use super::server::{error_reply, Reply};
use super::store::{UsageGroup, UsageGroupValue, UsageQuery, UsageRow, User};
use super::usage_query::{format_time, usage_params, UsageParams};
use super::{unix_now, Management};
use crate::auth::claims::Role;
use crate::auth::directory::DomainRole;
use crate::usage::tally::Tally;
use serde_json::{json, Map, Value};

/// What a domain's usage may be grouped by.
const DOMAIN_GROUPS: [UsageGroup; 5] = [
    UsageGroup::User,
    UsageGroup::Key,
    UsageGroup::Model,
    UsageGroup::Hour,
    UsageGroup::Day,
];
/// What the caller's own usage may be grouped by.
const PROFILE_GROUPS: [UsageGroup; 4] = [
    UsageGroup::Domain,
    UsageGroup::Model,
    UsageGroup::Hour,
    UsageGroup::Day,
];

/// `GET /domains/{id}/usage?from=&to=&group_by=user|key|model|hour|day`.
pub fn domain_usage(m: &Management, req: &Request, domain: &str) -> Answer {
    let me = caller(m, req)?;
    let params = usage_params(&req.query, &DOMAIN_GROUPS, UsageGroup::Model, unix_now())?;
    let only_mine = domain_view(m, &me, domain)?;
    let rows = stored_usage(
        m,
        &params,
        Some(domain),
        only_mine.then_some(me.id.as_str()),
    )?;
    Ok(answer(req, ("domain_id", domain), &params, &rows))
}

/// `GET /users/profile/usage?from=&to=&group_by=domain|model|hour|day`.
pub fn profile_usage(m: &Management, req: &Request) -> Answer {
    let me = caller(m, req)?;
    let params = usage_params(&req.query, &PROFILE_GROUPS, UsageGroup::Domain, unix_now())?;
    let rows = stored_usage(m, &params, None, Some(me.id.as_str()))?;
    Ok(answer(req, ("user_id", me.id.as_str()), &params, &rows))
}

/// Whether `me` sees only their own rows of `domain` (a plain member), all of them (an
/// admin), or nothing (404, as for the domain itself).
fn domain_view(m: &Management, me: &User, domain: &str) -> Result<bool, Reply> {
    let hidden = || error_reply(404, "not_found", "no such domain (or not visible to you)");
    let store = m.store();
    if me.role == Role::Admin {
        let exists = store.domain_from_config(domain).map_err(store_error)?;
        return exists.map(|_| false).ok_or_else(hidden);
    }
    let role = store
        .memberships()
        .map_err(store_error)?
        .into_iter()
        .find(|(d, user, _)| d == domain && *user == me.id)
        .map(|(_, _, role)| role);
    match role {
        Some(DomainRole::Admin) => Ok(false),
        Some(DomainRole::Member) => Ok(true),
        None => Err(hidden()),
    }
}

fn stored_usage(
    m: &Management,
    params: &UsageParams,
    domain: Option<&str>,
    user: Option<&str>,
) -> Result<Vec<UsageRow>, Reply> {
    let (from_minute, to_minute) = params.minutes();
    let q = UsageQuery {
        from_minute,
        to_minute,
        domain,
        user,
        group: params.group,
    };
    m.store().usage(&q).map_err(store_error)
}

/// The name of the column a grouping fills.
fn group_field(group: UsageGroup) -> &'static str {
    match group {
        UsageGroup::Domain => "domain_id",
        UsageGroup::User => "user_id",
        UsageGroup::Key => "key_id",
        UsageGroup::Model => "model",
        UsageGroup::Hour => "hour",
        UsageGroup::Day => "day",
    }
}

/// A group's value as text: a name, "" for no API key, an hour or day as RFC 3339.
fn group_text(value: &UsageGroupValue) -> String {
    match value {
        UsageGroupValue::Name(name) => name.clone(),
        UsageGroupValue::Start(t) => format_time(*t),
    }
}

/// The figures every row and the total show, in column order.
fn figures(t: &Tally) -> [(&'static str, u64); 5] {
    [
        ("requests", t.requests),
        ("prompt_tokens", t.prompt_tokens),
        ("completion_tokens", t.completion_tokens),
        ("total_tokens", t.prompt_tokens + t.completion_tokens),
        ("errors", t.errors),
    ]
}

fn figures_json(t: &Tally, into: &mut Map<String, Value>) {
    for (name, n) in figures(t) {
        into.insert(name.into(), n.into());
    }
}

fn answer(req: &Request, scope: (&str, &str), p: &UsageParams, rows: &[UsageRow]) -> Reply {
    let field = group_field(p.group);
    let wants_csv = req
        .accept
        .as_deref()
        .is_some_and(|a| a.to_ascii_lowercase().contains("text/csv"));
    if wants_csv {
        return csv(field, rows);
    }
    let mut total = Tally::default();
    let rows: Vec<Value> = rows
        .iter()
        .map(|row| {
            total.add(&row.sums);
            let mut o = Map::new();
            let value = match &row.group {
                UsageGroupValue::Name(key) if key.is_empty() && p.group == UsageGroup::Key => {
                    Value::Null
                }
                other => group_text(other).into(),
            };
            o.insert(field.into(), value);
            figures_json(&row.sums, &mut o);
            Value::Object(o)
        })
        .collect();
    let mut sums = Map::new();
    figures_json(&total, &mut sums);
    let mut body = json!({
        "from": format_time(p.from),
        "to": format_time(p.to),
        "group_by": p.group.as_str(),
        "rows": rows,
        "total": sums,
    });
    body[scope.0] = scope.1.into();
    Reply::json(200, &body)
}

/// RFC 4180: a header line, one line per row, CRLF; a field with a comma, a quote or a
/// line break is quoted, its quotes doubled.
fn csv(field: &str, rows: &[UsageRow]) -> Reply {
    let mut out = String::new();
    out.push_str(field);
    for (name, _) in figures(&Tally::default()) {
        out.push(',');
        out.push_str(name);
    }
    out.push_str("\r\n");
    for row in rows {
        out.push_str(&csv_field(&group_text(&row.group)));
        for (_, n) in figures(&row.sums) {
            out.push(',');
            out.push_str(&n.to_string());
        }
        out.push_str("\r\n");
    }
    Reply {
        status: 200,
        body: out.into_bytes(),
        headers: vec![("Content-Type", "text/csv; charset=utf-8".into())],
    }
}

fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("llama3.2:1b"), "llama3.2:1b");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        let rows = [UsageRow {
            group: UsageGroupValue::Name("m,\"x\"".into()),
            sums: Tally {
                requests: 2,
                prompt_tokens: 3,
                completion_tokens: 4,
                errors: 1,
                counted: 0,
            },
        }];
        let reply = csv("model", &rows);
        assert_eq!(
            String::from_utf8(reply.body).unwrap(),
            "model,requests,prompt_tokens,completion_tokens,total_tokens,errors\r\n\"m,\"\"x\"\"\",2,3,4,7,1\r\n"
        );
    }
}
