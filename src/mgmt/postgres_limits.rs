//! Limits set through the management API, in the PostgreSQL store: a domain's two sets, a
//! member's own set, an API key's set.
//!
//! The design of `sqlite_limits.rs`, kept: each set goes with its owner by the schema, not
//! by code that must remember to. A member's set references the membership (`ON DELETE
//! CASCADE`), so removing the member drops it and changing their role (an upsert) keeps
//! it; revoking a key is an UPDATE, so a trigger drops the key's set, and the read skips
//! revoked keys besides. A set is written whole in one statement (`INSERT … SELECT …
//! WHERE EXISTS (owner) ON CONFLICT DO UPDATE` of every column). What the shared server
//! adds is other boxes writing at the same time: an owner removed after the statement's
//! snapshot fails the foreign key, which answers "no owner" as the check would have, and
//! the key's row is read `FOR SHARE`, so a revocation either waits for the write (and its
//! trigger then drops the set) or is seen by it.

use super::store::{
    limit_figures, LimitsOf, StoreError, LIMIT_COLUMNS as SET, MEMBER_LIMIT_COLUMNS as MEMBER_SET,
};
use crate::scope::DomainId;
use crate::usage::limits::{ApiLimits, DomainLimits, Limits};
use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, Row};

/// The schema (migration 2 of `postgres.rs`).
pub(super) const MIGRATION: &str = "CREATE TABLE domain_limits (
        domain_id TEXT PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
        requests_per_minute BIGINT NOT NULL,
        tokens_per_minute BIGINT NOT NULL,
        tokens_per_day BIGINT NOT NULL,
        concurrent BIGINT NOT NULL,
        member_requests_per_minute BIGINT NOT NULL,
        member_tokens_per_minute BIGINT NOT NULL,
        member_tokens_per_day BIGINT NOT NULL,
        member_concurrent BIGINT NOT NULL
    );
    CREATE TABLE member_limits (
        domain_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        requests_per_minute BIGINT NOT NULL,
        tokens_per_minute BIGINT NOT NULL,
        tokens_per_day BIGINT NOT NULL,
        concurrent BIGINT NOT NULL,
        PRIMARY KEY (domain_id, user_id),
        FOREIGN KEY (domain_id, user_id)
            REFERENCES memberships(domain_id, user_id) ON DELETE CASCADE
    );
    CREATE TABLE key_limits (
        key_id TEXT PRIMARY KEY REFERENCES api_keys(id) ON DELETE CASCADE,
        requests_per_minute BIGINT NOT NULL,
        tokens_per_minute BIGINT NOT NULL,
        tokens_per_day BIGINT NOT NULL,
        concurrent BIGINT NOT NULL
    );
    CREATE FUNCTION key_limits_go_with_the_key() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM key_limits WHERE key_id = NEW.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER key_limits_go_with_the_key AFTER UPDATE OF revoked ON api_keys
        FOR EACH ROW WHEN (NEW.revoked) EXECUTE FUNCTION key_limits_go_with_the_key();
    SELECT cubegate_notify_on(ARRAY['domain_limits', 'member_limits', 'key_limits']);";

/// The four figures of a set, in the columns' order, as BIGINT.
fn figures(l: &Limits) -> [i64; 4] {
    limit_figures(l).map(i64::from)
}

/// The set in the four columns from `at`.
fn limits_at(r: &Row, at: usize) -> Result<Limits, StoreError> {
    let figure = |i: usize| -> Result<u32, StoreError> {
        let n: i64 = r.try_get(at + i)?;
        u32::try_from(n).map_err(|_| StoreError::Db(format!("a stored limit out of range: {n}")))
    };
    Ok(Limits {
        requests_per_minute: figure(0)?,
        tokens_per_minute: figure(1)?,
        tokens_per_day: figure(2)?,
        concurrent: figure(3)?,
    })
}

/// `ON CONFLICT (key) DO UPDATE` replacing each of `columns` (lists like [`SET`]).
fn replacing(key: &str, columns: &[&str]) -> String {
    let assignments: Vec<String> = columns
        .iter()
        .flat_map(|list| list.split(", "))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "ON CONFLICT ({key}) DO UPDATE SET {}",
        assignments.join(", ")
    )
}

/// Runs a set's write: `sql` takes the owner's `names` (text) first, then the `figures`;
/// false when it wrote nothing or the owner went meanwhile (the foreign key).
fn write_set(
    c: &mut Client,
    sql: &str,
    names: &[&str],
    figures: &[i64],
) -> Result<bool, StoreError> {
    // Typed, so `SELECT $2` reads a BIGINT rather than text that would not fit the column.
    let types: Vec<Type> = (names.iter().map(|_| Type::TEXT))
        .chain(figures.iter().map(|_| Type::INT8))
        .collect();
    let statement = c.prepare_typed(sql, &types)?;
    let params: Vec<&(dyn ToSql + Sync)> = (names.iter().map(|n| n as &(dyn ToSql + Sync)))
        .chain(figures.iter().map(|f| f as &(dyn ToSql + Sync)))
        .collect();
    match c.execute(&statement, &params) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn set_domain(
    c: &mut Client,
    domain: &str,
    set: &DomainLimits,
) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO domain_limits (domain_id, {SET}, {MEMBER_SET})
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
         WHERE EXISTS (SELECT 1 FROM domains WHERE id = $1) {}",
        replacing("domain_id", &[SET, MEMBER_SET])
    );
    let both = [figures(&set.domain), figures(&set.per_member)].concat();
    write_set(c, &sql, &[domain], &both)
}

pub(super) fn set_member(
    c: &mut Client,
    domain: &str,
    user: &str,
    set: &Limits,
) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO member_limits (domain_id, user_id, {SET})
         SELECT $1, $2, $3, $4, $5, $6
         WHERE EXISTS (SELECT 1 FROM memberships WHERE domain_id = $1 AND user_id = $2) {}",
        replacing("domain_id, user_id", &[SET])
    );
    write_set(c, &sql, &[domain, user], &figures(set))
}

pub(super) fn set_key(
    c: &mut Client,
    domain: &str,
    key: &str,
    set: &Limits,
) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO key_limits (key_id, {SET})
         SELECT $2, $3, $4, $5, $6
         WHERE EXISTS (SELECT 1 FROM api_keys
             WHERE id = $2 AND domain_id = $1 AND NOT revoked FOR SHARE) {}",
        replacing("key_id", &[SET])
    );
    write_set(c, &sql, &[domain, key], &figures(set))
}

pub(super) fn clear(c: &mut Client, of: LimitsOf<'_>) -> Result<bool, StoreError> {
    let n = match of {
        LimitsOf::Domain(domain) => {
            c.execute("DELETE FROM domain_limits WHERE domain_id = $1", &[&domain])?
        }
        LimitsOf::Member(domain, user) => c.execute(
            "DELETE FROM member_limits WHERE domain_id = $1 AND user_id = $2",
            &[&domain, &user],
        )?,
        LimitsOf::Key(domain, key) => c.execute(
            "DELETE FROM key_limits WHERE key_id = $2
             AND key_id IN (SELECT id FROM api_keys WHERE domain_id = $1)",
            &[&domain, &key],
        )?,
    };
    Ok(n > 0)
}

pub(super) fn read_all(c: &mut Client) -> Result<ApiLimits, StoreError> {
    let mut api = ApiLimits::default();
    let sql = format!("SELECT domain_id, {SET}, {MEMBER_SET} FROM domain_limits");
    for r in c.query(&sql, &[])? {
        let set = DomainLimits {
            domain: limits_at(&r, 1)?,
            per_member: limits_at(&r, 5)?,
        };
        api.domains
            .insert(DomainId::from(r.try_get::<_, String>(0)?), set);
    }
    let sql = format!("SELECT domain_id, user_id, {SET} FROM member_limits");
    for r in c.query(&sql, &[])? {
        api.members
            .entry(DomainId::from(r.try_get::<_, String>(0)?))
            .or_default()
            .insert(r.try_get(1)?, limits_at(&r, 2)?);
    }
    let sql = format!(
        "SELECT key_id, {SET} FROM key_limits
         WHERE key_id IN (SELECT id FROM api_keys WHERE NOT revoked)"
    );
    for r in c.query(&sql, &[])? {
        api.keys.insert(r.try_get(0)?, limits_at(&r, 1)?);
    }
    Ok(api)
}
