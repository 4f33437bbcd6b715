//! Limits set through the management API, in the SQLite store: a domain's two sets, a
//! member's own set, an API key's set.
//!
//! Each set lives beside what it limits and goes with it, by the schema rather than by
//! code that must remember to: a member's set references the membership (`ON DELETE
//! CASCADE`), so removing the member drops it, and changing their role (an upsert) keeps
//! it; revoking a key is an UPDATE, so a trigger drops the key's set, and the read skips
//! revoked keys besides. A set is written whole (`INSERT OR REPLACE … WHERE EXISTS`): the
//! write and the check that its owner exists are one statement, so a member removed
//! meanwhile cannot be given a set. The API reads every set at each publication; there
//! are as many rows as members and keys with limits, a management-path cost only.

use super::store::{
    limit_figures as figures, LimitsOf, StoreError, LIMIT_COLUMNS as SET,
    MEMBER_LIMIT_COLUMNS as MEMBER_SET,
};
use crate::scope::DomainId;
use crate::usage::limits::{ApiLimits, DomainLimits, Limits};
use rusqlite::{params, Connection, Row};

/// The schema (migration 3 of `sqlite.rs`).
pub(super) const MIGRATION: &str = "CREATE TABLE domain_limits (
        domain_id TEXT PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
        requests_per_minute INTEGER NOT NULL,
        tokens_per_minute INTEGER NOT NULL,
        tokens_per_day INTEGER NOT NULL,
        concurrent INTEGER NOT NULL,
        member_requests_per_minute INTEGER NOT NULL,
        member_tokens_per_minute INTEGER NOT NULL,
        member_tokens_per_day INTEGER NOT NULL,
        member_concurrent INTEGER NOT NULL
    );
    CREATE TABLE member_limits (
        domain_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        requests_per_minute INTEGER NOT NULL,
        tokens_per_minute INTEGER NOT NULL,
        tokens_per_day INTEGER NOT NULL,
        concurrent INTEGER NOT NULL,
        PRIMARY KEY (domain_id, user_id),
        FOREIGN KEY (domain_id, user_id)
            REFERENCES memberships(domain_id, user_id) ON DELETE CASCADE
    );
    CREATE TABLE key_limits (
        key_id TEXT PRIMARY KEY REFERENCES api_keys(id) ON DELETE CASCADE,
        requests_per_minute INTEGER NOT NULL,
        tokens_per_minute INTEGER NOT NULL,
        tokens_per_day INTEGER NOT NULL,
        concurrent INTEGER NOT NULL
    );
    CREATE TRIGGER key_limits_go_with_the_key AFTER UPDATE OF revoked ON api_keys
    WHEN NEW.revoked = 1
    BEGIN
        DELETE FROM key_limits WHERE key_id = NEW.id;
    END;";

/// The set in the four columns from `at`.
fn limits_at(r: &Row<'_>, at: usize) -> rusqlite::Result<Limits> {
    Ok(Limits {
        requests_per_minute: r.get(at)?,
        tokens_per_minute: r.get(at + 1)?,
        tokens_per_day: r.get(at + 2)?,
        concurrent: r.get(at + 3)?,
    })
}

pub(super) fn set_domain(
    db: &Connection,
    domain: &str,
    set: &DomainLimits,
) -> Result<bool, StoreError> {
    let [a, b, c, d] = figures(&set.domain);
    let [e, f, g, h] = figures(&set.per_member);
    let sql = format!(
        "INSERT OR REPLACE INTO domain_limits (domain_id, {SET}, {MEMBER_SET})
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
         WHERE EXISTS (SELECT 1 FROM domains WHERE id = ?1)"
    );
    let n = db.execute(&sql, params![domain, a, b, c, d, e, f, g, h])?;
    Ok(n > 0)
}

pub(super) fn set_member(
    db: &Connection,
    domain: &str,
    user: &str,
    set: &Limits,
) -> Result<bool, StoreError> {
    let [a, b, c, d] = figures(set);
    let sql = format!(
        "INSERT OR REPLACE INTO member_limits (domain_id, user_id, {SET})
         SELECT ?1, ?2, ?3, ?4, ?5, ?6
         WHERE EXISTS (SELECT 1 FROM memberships WHERE domain_id = ?1 AND user_id = ?2)"
    );
    let n = db.execute(&sql, params![domain, user, a, b, c, d])?;
    Ok(n > 0)
}

pub(super) fn set_key(
    db: &Connection,
    domain: &str,
    key: &str,
    set: &Limits,
) -> Result<bool, StoreError> {
    let [a, b, c, d] = figures(set);
    let sql = format!(
        "INSERT OR REPLACE INTO key_limits (key_id, {SET})
         SELECT ?2, ?3, ?4, ?5, ?6
         WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = ?2 AND domain_id = ?1 AND revoked = 0)"
    );
    let n = db.execute(&sql, params![domain, key, a, b, c, d])?;
    Ok(n > 0)
}

pub(super) fn clear(db: &Connection, of: LimitsOf<'_>) -> Result<bool, StoreError> {
    let n = match of {
        LimitsOf::Domain(domain) => {
            db.execute("DELETE FROM domain_limits WHERE domain_id = ?1", [domain])?
        }
        LimitsOf::Member(domain, user) => db.execute(
            "DELETE FROM member_limits WHERE domain_id = ?1 AND user_id = ?2",
            [domain, user],
        )?,
        LimitsOf::Key(domain, key) => db.execute(
            "DELETE FROM key_limits WHERE key_id = ?2
             AND key_id IN (SELECT id FROM api_keys WHERE domain_id = ?1)",
            [domain, key],
        )?,
    };
    Ok(n > 0)
}

pub(super) fn read_all(db: &Connection) -> Result<ApiLimits, StoreError> {
    let mut api = ApiLimits::default();
    let mut st = db.prepare(&format!(
        "SELECT domain_id, {SET}, {MEMBER_SET} FROM domain_limits"
    ))?;
    let rows = st.query_map([], |r| {
        let set = DomainLimits {
            domain: limits_at(r, 1)?,
            per_member: limits_at(r, 5)?,
        };
        Ok((r.get::<_, String>(0)?, set))
    })?;
    for row in rows {
        let (domain, set) = row?;
        api.domains.insert(DomainId::from(domain), set);
    }
    let mut st = db.prepare(&format!(
        "SELECT domain_id, user_id, {SET} FROM member_limits"
    ))?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get(1)?, limits_at(r, 2)?))
    })?;
    for row in rows {
        let (domain, user, set) = row?;
        api.members
            .entry(DomainId::from(domain))
            .or_default()
            .insert(user, set);
    }
    let mut st = db.prepare(&format!(
        "SELECT key_id, {SET} FROM key_limits
         WHERE key_id IN (SELECT id FROM api_keys WHERE revoked = 0)"
    ))?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, limits_at(r, 1)?)))?;
    for row in rows {
        let (key, set) = row?;
        api.keys.insert(key, set);
    }
    Ok(api)
}

#[cfg(test)]
mod tests {
    use crate::auth::directory::DomainRole;
    use crate::mgmt::sqlite::Store;
    use crate::mgmt::store::{ApiKeyRow, Domain, LimitsOf, Storage, User};
    use crate::usage::limits::{DomainLimits, Limits};

    fn rpm(n: u32) -> Limits {
        Limits {
            requests_per_minute: n,
            ..Limits::default()
        }
    }

    fn store_with_member_and_key(tag: &str) -> (std::path::PathBuf, Store) {
        let dir =
            std::env::temp_dir().join(format!("cubegate-limits-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::open(&dir.join("t.db")).unwrap();
        s.insert_user(&User::plain("u1", "u1@x.io")).unwrap();
        let domain = Domain {
            id: "d1".into(),
            name: "one".into(),
        };
        s.insert_domain(&domain, 1).unwrap();
        s.set_membership("d1", "u1", DomainRole::Member).unwrap();
        let key = ApiKeyRow {
            id: "k1".into(),
            domain_id: "d1".into(),
            name: "ci".into(),
            digest: vec![1; 32],
            created_by: "u1".into(),
            expires_at: None,
        };
        s.insert_api_key(&key, 1).unwrap();
        (dir, s)
    }

    #[test]
    fn sets_are_kept_replaced_and_cleared() {
        let (dir, s) = store_with_member_and_key("sets");
        let both = DomainLimits {
            domain: rpm(100),
            per_member: rpm(10),
        };
        assert!(s.set_domain_limits("d1", &both).unwrap());
        assert!(!s.set_domain_limits("nope", &both).unwrap());
        assert!(s.set_member_limits("d1", "u1", &rpm(5)).unwrap());
        assert!(s.set_member_limits("d1", "u1", &rpm(6)).unwrap());
        assert!(!s.set_member_limits("d1", "stranger", &rpm(5)).unwrap());
        assert!(s.set_key_limits("d1", "k1", &rpm(7)).unwrap());
        assert!(!s.set_key_limits("other", "k1", &rpm(7)).unwrap());
        let api = s.api_limits().unwrap();
        assert_eq!(api.domains["d1"], both);
        assert_eq!(api.members["d1"]["u1"], rpm(6));
        assert_eq!(api.keys["k1"], rpm(7));
        // Reopened: still there.
        drop(s);
        let s = Store::open(&dir.join("t.db")).unwrap();
        assert_eq!(s.api_limits().unwrap().members["d1"]["u1"], rpm(6));
        assert!(s.clear_limits(LimitsOf::Domain("d1")).unwrap());
        assert!(!s.clear_limits(LimitsOf::Domain("d1")).unwrap());
        assert!(!s.clear_limits(LimitsOf::Key("other", "k1")).unwrap());
        assert!(s.clear_limits(LimitsOf::Key("d1", "k1")).unwrap());
        assert!(s.clear_limits(LimitsOf::Member("d1", "u1")).unwrap());
        let api = s.api_limits().unwrap();
        assert!(api.domains.is_empty() && api.members.is_empty() && api.keys.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sets_go_with_their_membership_and_key() {
        let (dir, s) = store_with_member_and_key("owners");
        s.set_member_limits("d1", "u1", &rpm(5)).unwrap();
        s.set_key_limits("d1", "k1", &rpm(7)).unwrap();
        // A role change keeps the member's set; removing the member drops it.
        s.set_membership("d1", "u1", DomainRole::Admin).unwrap();
        assert_eq!(s.api_limits().unwrap().members["d1"]["u1"], rpm(5));
        s.remove_membership("d1", "u1").unwrap();
        s.set_membership("d1", "u1", DomainRole::Member).unwrap();
        assert!(s.api_limits().unwrap().members.is_empty());
        // Revoking the key drops its set, and a revoked key takes none.
        assert!(s.revoke_api_key("d1", "k1").unwrap());
        assert!(s.api_limits().unwrap().keys.is_empty());
        assert!(!s.set_key_limits("d1", "k1", &rpm(7)).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
