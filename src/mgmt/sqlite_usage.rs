//! Usage in the SQLite store: one row per minute per (domain, user, API key, model).
//!
//! Rows are only ever added to: a batch is one transaction of UPSERTs that add to what is
//! there (`requests = requests + excluded.requests`, …), so batches from several workers,
//! a retry after a failed write, or two processes writing across a hand-over all sum
//! correctly. The primary key starts with the minute (range scans and pruning read it in
//! order); indexes by domain and by user serve the usage API's two views. A request
//! without an API key is stored with key_id '' (a NULL would never conflict, so sums
//! would not merge). No foreign keys: usage outlives the users and domains it names.

use super::store::{StoreError, UsageGroup, UsageGroupValue, UsageQuery, UsageRow};
use crate::usage::tally::{Tally, UsageKey};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ToSql};

/// The schema (migration 3 of `sqlite.rs`).
pub(super) const MIGRATION: &str = "CREATE TABLE usage (
        minute INTEGER NOT NULL,
        domain_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        key_id TEXT NOT NULL DEFAULT '',
        model TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        counted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (minute, domain_id, user_id, key_id, model)
    ) WITHOUT ROWID;
    CREATE INDEX usage_by_domain ON usage(domain_id, minute);
    CREATE INDEX usage_by_user ON usage(user_id, minute);";

const UPSERT: &str = "INSERT INTO usage
        (minute, domain_id, user_id, key_id, model, requests, prompt_tokens, completion_tokens, errors, counted)
        VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
        ON CONFLICT (minute, domain_id, user_id, key_id, model) DO UPDATE SET
        requests = requests + excluded.requests,
        prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens,
        errors = errors + excluded.errors,
        counted = counted + excluded.counted";

/// SQLite integers are signed.
fn stored(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn loaded(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

pub(super) fn record(db: &mut Connection, rows: &[(UsageKey, Tally)]) -> Result<(), StoreError> {
    let tx = db.transaction()?;
    {
        let mut upsert = tx.prepare_cached(UPSERT)?;
        for (k, t) in rows {
            upsert.execute(params![
                k.minute,
                &*k.domain,
                &*k.user,
                k.key.as_deref().unwrap_or(""),
                &*k.model,
                stored(t.requests),
                stored(t.prompt_tokens),
                stored(t.completion_tokens),
                stored(t.errors),
                stored(t.counted),
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn query(db: &Connection, q: &UsageQuery<'_>) -> Result<Vec<UsageRow>, StoreError> {
    let group = match q.group {
        UsageGroup::Domain => "domain_id",
        UsageGroup::User => "user_id",
        UsageGroup::Key => "key_id",
        UsageGroup::Model => "model",
        UsageGroup::Hour => "minute / 60 * 3600",
        UsageGroup::Day => "minute / 1440 * 86400",
    };
    let mut filters = String::new();
    let mut values: Vec<&dyn ToSql> = vec![&q.from_minute, &q.to_minute];
    // Spelled out rather than `?3 IS NULL OR …`, so SQLite can use the index.
    if let Some(domain) = &q.domain {
        values.push(domain);
        filters.push_str(&format!(" AND domain_id = ?{}", values.len()));
    }
    if let Some(user) = &q.user {
        values.push(user);
        filters.push_str(&format!(" AND user_id = ?{}", values.len()));
    }
    let sql = format!(
        "SELECT {group} AS g, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(errors), SUM(counted)
         FROM usage WHERE minute >= ?1 AND minute < ?2{filters} GROUP BY g ORDER BY g"
    );
    let mut st = db.prepare(&sql)?;
    let rows = st.query_map(values.as_slice(), |r| {
        let group = match r.get_ref(0)? {
            ValueRef::Integer(start) => UsageGroupValue::Start(start),
            _ => UsageGroupValue::Name(r.get(0)?),
        };
        Ok(UsageRow {
            group,
            sums: Tally {
                requests: loaded(r.get(1)?),
                prompt_tokens: loaded(r.get(2)?),
                completion_tokens: loaded(r.get(3)?),
                errors: loaded(r.get(4)?),
                counted: loaded(r.get(5)?),
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn prune(db: &Connection, before_minute: i64) -> Result<u64, StoreError> {
    let n = db.execute("DELETE FROM usage WHERE minute < ?1", [before_minute])?;
    Ok(n as u64)
}

/// A fresh database file for a unit test (its directory emptied first).
#[cfg(test)]
pub(crate) fn scratch_db(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cubegate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir.join("t.db")
}

#[cfg(test)]
mod tests {
    use super::super::sqlite::Store;
    use super::super::store::Storage;
    use super::*;

    fn key(minute: i64, user: &str, api_key: Option<&str>, model: &str) -> UsageKey {
        UsageKey {
            minute,
            domain: "d".into(),
            user: user.into(),
            key: api_key.map(Into::into),
            model: model.into(),
        }
    }

    fn tally(requests: u64, prompt: u64, completion: u64, errors: u64) -> Tally {
        Tally {
            requests,
            prompt_tokens: prompt,
            completion_tokens: completion,
            errors,
            counted: 0,
        }
    }

    fn store(tag: &str) -> Store {
        Store::open(&scratch_db(tag)).unwrap()
    }

    fn by(group: UsageGroup, from: i64, to: i64) -> UsageQuery<'static> {
        UsageQuery {
            from_minute: from,
            to_minute: to,
            domain: Some("d"),
            user: None,
            group,
        }
    }

    #[test]
    fn upserts_add_to_what_is_stored() {
        let mut s = store("usage-merge");
        let m = 29_000_000;
        s.record_usage(&[
            (key(m, "u1", None, "a,b"), tally(2, 10, 20, 1)),
            (key(m, "u1", Some("k1"), "a,b"), tally(1, 1, 1, 0)),
        ])
        .unwrap();
        // The same key again (another worker, a retry): added, not replaced.
        s.record_usage(&[
            (key(m, "u1", None, "a,b"), tally(3, 5, 5, 0)),
            (key(m + 1, "u2", None, "c"), tally(1, 0, 0, 1)),
        ])
        .unwrap();
        let models = s.usage(&by(UsageGroup::Model, m, m + 2)).unwrap();
        assert_eq!(
            models,
            vec![
                UsageRow {
                    group: UsageGroupValue::Name("a,b".into()),
                    sums: tally(6, 16, 26, 1)
                },
                UsageRow {
                    group: UsageGroupValue::Name("c".into()),
                    sums: tally(1, 0, 0, 1)
                },
            ]
        );
        let keys = s.usage(&by(UsageGroup::Key, m, m + 2)).unwrap();
        assert_eq!(keys[0].group, UsageGroupValue::Name(String::new()));
        assert_eq!(keys[0].sums.requests, 6);
        assert_eq!(keys[1].group, UsageGroupValue::Name("k1".into()));
        // `to` is exclusive; a user filter narrows.
        let first = s.usage(&by(UsageGroup::User, m, m + 1)).unwrap();
        assert_eq!(first.len(), 1);
        let mine = UsageQuery {
            user: Some("u2"),
            ..by(UsageGroup::Hour, m, m + 2)
        };
        let hours = s.usage(&mine).unwrap();
        assert_eq!(hours.len(), 1);
        assert_eq!(hours[0].group, UsageGroupValue::Start((m + 1) / 60 * 3600));
        let other_domain = UsageQuery {
            domain: Some("elsewhere"),
            ..by(UsageGroup::Day, m, m + 2)
        };
        assert!(s.usage(&other_domain).unwrap().is_empty());
    }

    #[test]
    fn pruning_drops_only_older_minutes() {
        let mut s = store("usage-prune");
        s.record_usage(&[
            (key(100, "u", None, "m"), tally(1, 0, 0, 0)),
            (key(199, "u", None, "m"), tally(1, 0, 0, 0)),
            (key(200, "u", None, "m"), tally(1, 0, 0, 0)),
        ])
        .unwrap();
        assert_eq!(s.prune_usage(200).unwrap(), 2);
        assert_eq!(s.prune_usage(200).unwrap(), 0);
        let left = s.usage(&by(UsageGroup::Day, 0, 1000)).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].sums.requests, 1);
    }
}
