//! Usage in the PostgreSQL store: one row per minute per (domain, user, API key, model).
//!
//! The design of `sqlite_usage.rs`, kept: rows are only ever added to, a batch is one
//! transaction of UPSERTs that add to what is there, so batches from several workers, a
//! retry, and now several boxes writing the same minute all sum correctly. The primary key
//! starts with the minute (range scans and pruning read it in order); indexes by domain and
//! by user serve the usage API's two views; a request without an API key is stored with
//! key_id '' (a NULL would never conflict). What the shared server adds: a batch takes its
//! rows in one fixed order, so two boxes adding to the same rows wait for each other rather
//! than deadlock; names are grouped and ordered `COLLATE "C"`, byte order as in SQLite.
//! Usage does not notify the data plane (it is not what a box republishes), and has no
//! foreign keys: it outlives the users and domains it names. A NUL in a name (TEXT cannot
//! hold one) is stored as U+FFFD rather than failing the batch.

use super::store::{StoreError, UsageGroup, UsageGroupValue, UsageQuery, UsageRow};
use crate::usage::tally::{Tally, UsageKey};
use postgres::types::ToSql;
use postgres::Client;

/// The schema (migration 3 of `postgres.rs`).
pub(super) const MIGRATION: &str = "CREATE TABLE usage (
        minute BIGINT NOT NULL,
        domain_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key_id TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        counted BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, domain_id, user_id, key_id, model)
    );
    CREATE INDEX usage_by_domain ON usage(domain_id, minute);
    CREATE INDEX usage_by_user ON usage(user_id, minute);";

const UPSERT: &str = "INSERT INTO usage
        (minute, domain_id, user_id, key_id, model, requests, prompt_tokens, completion_tokens, errors, counted)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (minute, domain_id, user_id, key_id, model) DO UPDATE SET
        requests = usage.requests + excluded.requests,
        prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = usage.completion_tokens + excluded.completion_tokens,
        errors = usage.errors + excluded.errors,
        counted = usage.counted + excluded.counted";

/// TEXT as PostgreSQL can hold it: a NUL byte (which SQLite keeps, and which a client can
/// put in a model name) becomes U+FFFD, since one refused row would fail its whole batch
/// on every flush and no usage would be stored again.
fn storable(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains('\0') {
        name.replace('\0', "\u{FFFD}").into()
    } else {
        name.into()
    }
}

/// BIGINT is signed.
fn stored(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The order a batch takes its rows (and their locks) in.
fn lock_order(k: &UsageKey) -> (i64, &str, &str, Option<&str>, &str) {
    (k.minute, &k.domain, &k.user, k.key.as_deref(), &k.model)
}

pub(super) fn record(c: &mut Client, rows: &[(UsageKey, Tally)]) -> Result<(), StoreError> {
    let mut ordered: Vec<&(UsageKey, Tally)> = rows.iter().collect();
    ordered.sort_by(|(a, _), (b, _)| lock_order(a).cmp(&lock_order(b)));
    let mut tx = c.transaction()?;
    let upsert = tx.prepare(UPSERT)?;
    for (k, t) in ordered {
        tx.execute(
            &upsert,
            &[
                &k.minute,
                &storable(&k.domain),
                &storable(&k.user),
                &storable(k.key.as_deref().unwrap_or("")),
                &storable(&k.model),
                &stored(t.requests),
                &stored(t.prompt_tokens),
                &stored(t.completion_tokens),
                &stored(t.errors),
                &stored(t.counted),
            ],
        )?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn query(c: &mut Client, q: &UsageQuery<'_>) -> Result<Vec<UsageRow>, StoreError> {
    let group = match q.group {
        UsageGroup::Domain => "domain_id COLLATE \"C\"",
        UsageGroup::User => "user_id COLLATE \"C\"",
        UsageGroup::Key => "key_id COLLATE \"C\"",
        UsageGroup::Model => "model COLLATE \"C\"",
        UsageGroup::Hour => "minute / 60 * 3600",
        UsageGroup::Day => "minute / 1440 * 86400",
    };
    let by_start = matches!(q.group, UsageGroup::Hour | UsageGroup::Day);
    let mut filters = String::new();
    let mut values: Vec<&(dyn ToSql + Sync)> = vec![&q.from_minute, &q.to_minute];
    // Spelled out rather than `$3 IS NULL OR …`, so the planner can use the index.
    if let Some(domain) = &q.domain {
        values.push(domain);
        filters.push_str(&format!(" AND domain_id = ${}", values.len()));
    }
    if let Some(user) = &q.user {
        values.push(user);
        filters.push_str(&format!(" AND user_id = ${}", values.len()));
    }
    // SUM of BIGINT is NUMERIC: back to BIGINT (a sum past it fails, as SQLite's does).
    let sql = format!(
        "SELECT {group} AS g, SUM(requests)::BIGINT, SUM(prompt_tokens)::BIGINT,
         SUM(completion_tokens)::BIGINT, SUM(errors)::BIGINT, SUM(counted)::BIGINT
         FROM usage WHERE minute >= $1 AND minute < $2{filters} GROUP BY g ORDER BY g"
    );
    let loaded = |n: i64| u64::try_from(n).unwrap_or(0);
    c.query(&sql, &values)?
        .iter()
        .map(|r| {
            let group = if by_start {
                UsageGroupValue::Start(r.try_get(0)?)
            } else {
                UsageGroupValue::Name(r.try_get(0)?)
            };
            Ok(UsageRow {
                group,
                sums: Tally {
                    requests: loaded(r.try_get(1)?),
                    prompt_tokens: loaded(r.try_get(2)?),
                    completion_tokens: loaded(r.try_get(3)?),
                    errors: loaded(r.try_get(4)?),
                    counted: loaded(r.try_get(5)?),
                },
            })
        })
        .collect()
}

pub(super) fn prune(c: &mut Client, before_minute: i64) -> Result<u64, StoreError> {
    Ok(c.execute("DELETE FROM usage WHERE minute < $1", &[&before_minute])?)
}
