//! The embedded [`Storage`]: SQLite (bundled) under `management.data_dir`.
//!
//! WAL mode with `synchronous = FULL`, so a write that returned success survives a
//! `kill -9` (and a power cut); foreign keys on; schema migrations are versioned in the
//! code through `PRAGMA user_version`, applied in one transaction each. Every multi-row
//! change runs in a transaction, so an error leaves nothing half-written. The store is
//! used only from management threads, never from a data-plane worker. Roles are stored by
//! name (the schema's CHECK constraints list them) and read back as `Role`/`DomainRole`.
//! Limits set through the API live in `sqlite_limits.rs`, usage rows in `sqlite_usage.rs`.

use super::store::{
    ApiKeyRow, Domain, LimitsOf, Rotation, Storage, StoreError, UsageQuery, UsageRow, User,
};
use crate::auth::claims::Role;
use crate::auth::directory::DomainRole;
use crate::usage::limits::{ApiLimits, DomainLimits, Limits};
use crate::usage::tally::{Tally, UsageKey};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, ToSql};
use std::path::Path;

/// A role enum goes into its column by name and comes back through its `parse`.
macro_rules! stored_by_name {
    ($role:ty, $what:literal) => {
        impl ToSql for $role {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl FromSql for $role {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let name = value.as_str()?;
                <$role>::parse(name).ok_or_else(|| {
                    FromSqlError::Other(format!(concat!("unknown ", $what, " {:?}"), name).into())
                })
            }
        }
    };
}

stored_by_name!(Role, "role");
stored_by_name!(DomainRole, "domain role");

/// Schema versions, in order. Never edit one that shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: users, refresh tokens, domains, memberships, API keys.
    "CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        first_name TEXT NOT NULL DEFAULT '',
        last_name TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE refresh_tokens (
        jti TEXT PRIMARY KEY,
        family TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL,
        spent INTEGER NOT NULL DEFAULT 0,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
    CREATE TABLE domains (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE memberships (
        domain_id TEXT NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'member')),
        PRIMARY KEY (domain_id, user_id)
    );",
    // 2: API keys, backends set through the API, which domains the config file owns.
    "CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        domain_id TEXT NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        digest BLOB NOT NULL UNIQUE,
        created_by TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_at INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE domain_backends (
        domain_id TEXT PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
        backends TEXT NOT NULL
    );
    ALTER TABLE domains ADD COLUMN from_config INTEGER NOT NULL DEFAULT 0;",
    // 3: limits set through the management API.
    super::sqlite_limits::MIGRATION,
    // 4: usage per minute per (domain, user, API key, model).
    super::sqlite_usage::MIGRATION,
];

pub struct Store {
    pub(super) db: Connection,
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// A unique-key failure as `Conflict(what)`, any other as itself.
fn conflict_or(e: rusqlite::Error, what: &'static str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(what)
    } else {
        e.into()
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Store { db };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: usize = self
            .db
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.db.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
        Ok(User {
            id: r.get(0)?,
            email: r.get(1)?,
            password_hash: r.get(2)?,
            first_name: r.get(3)?,
            last_name: r.get(4)?,
            role: r.get(5)?,
            disabled: r.get(6)?,
            created_at: r.get(7)?,
        })
    }

    const USER_COLUMNS: &'static str =
        "id, email, password_hash, first_name, last_name, role, disabled, created_at";
}

impl Storage for Store {
    fn user_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
    }

    fn insert_user(&self, u: &User) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO users (id, email, password_hash, first_name, last_name, role, disabled, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![u.id, u.email, u.password_hash, u.first_name, u.last_name, u.role, u.disabled, u.created_at],
            )
            .map_err(|e| if is_unique_violation(&e) { StoreError::Conflict("a user with this email") } else { e.into() })?;
        Ok(())
    }

    fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        let sql = format!("SELECT {} FROM users WHERE email = ?1", Self::USER_COLUMNS);
        Ok(self
            .db
            .query_row(&sql, [email], Self::user_from_row)
            .optional()?)
    }

    fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        let sql = format!("SELECT {} FROM users WHERE id = ?1", Self::USER_COLUMNS);
        Ok(self
            .db
            .query_row(&sql, [id], Self::user_from_row)
            .optional()?)
    }

    fn users(&self) -> Result<Vec<User>, StoreError> {
        let sql = format!(
            "SELECT {} FROM users ORDER BY created_at, email",
            Self::USER_COLUMNS
        );
        let mut st = self.db.prepare(&sql)?;
        let rows = st.query_map([], Self::user_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn insert_refresh(
        &self,
        jti: &str,
        family: &str,
        user_id: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO refresh_tokens (jti, family, user_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![jti, family, user_id, expires_at],
            )
            .map_err(|e| conflict_or(e, "a refresh token with this id"))?;
        Ok(())
    }

    fn rotate_refresh(
        &mut self,
        old: &str,
        new: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<Rotation, StoreError> {
        let tx = self.db.transaction()?;
        let row: Option<(String, String, i64, bool, bool, bool)> = tx
            .query_row(
                "SELECT t.family, t.user_id, t.expires_at, t.spent, t.revoked, u.disabled
                 FROM refresh_tokens t JOIN users u ON u.id = t.user_id WHERE t.jti = ?1",
                [old],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((family, user_id, expires_at, spent, revoked, disabled)) = row else {
            return Ok(Rotation::Invalid);
        };
        if spent || revoked {
            tx.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE family = ?1",
                [&family],
            )?;
            tx.commit()?;
            return Ok(Rotation::Reused);
        }
        if expires_at < now || disabled {
            return Ok(Rotation::Invalid);
        }
        tx.execute("UPDATE refresh_tokens SET spent = 1 WHERE jti = ?1", [old])?;
        tx.execute(
            "INSERT INTO refresh_tokens (jti, family, user_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![new, family, user_id, new_expires_at],
        )?;
        tx.commit()?;
        Ok(Rotation::Rotated)
    }

    fn revoke_family_of(&self, jti: &str) -> Result<bool, StoreError> {
        let n = self.db.execute(
            "UPDATE refresh_tokens SET revoked = 1 WHERE family = (SELECT family FROM refresh_tokens WHERE jti = ?1)",
            [jti],
        )?;
        Ok(n > 0)
    }

    fn insert_domain(&self, d: &Domain, now: i64) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO domains (id, name, created_at) VALUES (?1, ?2, ?3)",
                params![d.id, d.name, now],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict("a domain with this id or name")
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    fn domains(&self) -> Result<Vec<Domain>, StoreError> {
        let mut st = self
            .db
            .prepare("SELECT id, name FROM domains ORDER BY created_at, id")?;
        let rows = st.query_map([], |r| {
            Ok(Domain {
                id: r.get(0)?,
                name: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_membership(&self, domain: &str, user: &str, role: DomainRole) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO memberships (domain_id, user_id, role) VALUES (?1, ?2, ?3)
                 ON CONFLICT (domain_id, user_id) DO UPDATE SET role = excluded.role",
                params![domain, user, role],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
                {
                    StoreError::NotFound("the domain or the user")
                }
                e => e.into(),
            })?;
        Ok(())
    }

    fn remove_membership(&self, domain: &str, user: &str) -> Result<bool, StoreError> {
        let n = self.db.execute(
            "DELETE FROM memberships WHERE domain_id = ?1 AND user_id = ?2",
            params![domain, user],
        )?;
        Ok(n > 0)
    }

    fn memberships(&self) -> Result<Vec<(String, String, DomainRole)>, StoreError> {
        let mut st = self
            .db
            .prepare("SELECT domain_id, user_id, role FROM memberships")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn mark_config_domain(&self, id: &str) -> Result<(), StoreError> {
        self.db
            .execute("UPDATE domains SET from_config = 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    fn domain_from_config(&self, id: &str) -> Result<Option<bool>, StoreError> {
        Ok(self
            .db
            .query_row("SELECT from_config FROM domains WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn set_backends(&self, domain: &str, backends_json: &str) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO domain_backends (domain_id, backends) VALUES (?1, ?2)
             ON CONFLICT (domain_id) DO UPDATE SET backends = excluded.backends",
            params![domain, backends_json],
        )?;
        Ok(())
    }

    fn api_backends(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut st = self.db.prepare(
            "SELECT d.id, d.name, b.backends FROM domain_backends b JOIN domains d ON d.id = b.domain_id WHERE d.from_config = 0",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn insert_api_key(&self, k: &ApiKeyRow, now: i64) -> Result<(), StoreError> {
        self.db.execute(
            "INSERT INTO api_keys (id, domain_id, name, digest, created_by, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                k.id,
                k.domain_id,
                k.name,
                k.digest,
                k.created_by,
                k.expires_at,
                now
            ],
        )
        .map_err(|e| conflict_or(e, "an API key with this id or digest"))?;
        Ok(())
    }

    fn revoke_api_key(&self, domain: &str, id: &str) -> Result<bool, StoreError> {
        let n = self.db.execute(
            "UPDATE api_keys SET revoked = 1 WHERE id = ?1 AND domain_id = ?2 AND revoked = 0",
            params![id, domain],
        )?;
        Ok(n > 0)
    }

    fn live_api_keys(&self, now: i64) -> Result<Vec<ApiKeyRow>, StoreError> {
        let mut st = self.db.prepare(
            "SELECT id, domain_id, name, digest, created_by, expires_at FROM api_keys
             WHERE revoked = 0 AND (expires_at IS NULL OR expires_at > ?1)",
        )?;
        let rows = st.query_map([now], |r| {
            Ok(ApiKeyRow {
                id: r.get(0)?,
                domain_id: r.get(1)?,
                name: r.get(2)?,
                digest: r.get(3)?,
                created_by: r.get(4)?,
                expires_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_domain_limits(&self, domain: &str, set: &DomainLimits) -> Result<bool, StoreError> {
        super::sqlite_limits::set_domain(&self.db, domain, set)
    }

    fn set_member_limits(
        &self,
        domain: &str,
        user: &str,
        set: &Limits,
    ) -> Result<bool, StoreError> {
        super::sqlite_limits::set_member(&self.db, domain, user, set)
    }

    fn set_key_limits(&self, domain: &str, key: &str, set: &Limits) -> Result<bool, StoreError> {
        super::sqlite_limits::set_key(&self.db, domain, key, set)
    }

    fn clear_limits(&self, of: LimitsOf<'_>) -> Result<bool, StoreError> {
        super::sqlite_limits::clear(&self.db, of)
    }

    fn api_limits(&self) -> Result<ApiLimits, StoreError> {
        super::sqlite_limits::read_all(&self.db)
    }

    fn set_disabled(&mut self, user: &str, disabled: bool) -> Result<bool, StoreError> {
        let tx = self.db.transaction()?;
        let n = tx.execute(
            "UPDATE users SET disabled = ?2 WHERE id = ?1",
            params![user, disabled],
        )?;
        if disabled {
            tx.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ?1",
                [user],
            )?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn record_usage(&mut self, rows: &[(UsageKey, Tally)]) -> Result<(), StoreError> {
        super::sqlite_usage::record(&mut self.db, rows)
    }

    fn usage(&self, q: &UsageQuery<'_>) -> Result<Vec<UsageRow>, StoreError> {
        super::sqlite_usage::query(&self.db, q)
    }

    fn prune_usage(&self, before_minute: i64) -> Result<u64, StoreError> {
        super::sqlite_usage::prune(&self.db, before_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, email: &str) -> User {
        User::plain(id, email)
    }

    #[test]
    fn users_domains_memberships_and_refresh_families() {
        let dir = std::env::temp_dir().join(format!("cubegate-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.insert_user(&user("u1", "A@x.io")).unwrap();
            assert!(matches!(
                s.insert_user(&user("u2", "a@X.io")),
                Err(StoreError::Conflict(_))
            ));
            assert_eq!(s.user_by_email("a@x.io").unwrap().unwrap().id, "u1");
            s.insert_domain(
                &Domain {
                    id: "d1".into(),
                    name: "one".into(),
                },
                1,
            )
            .unwrap();
            assert!(matches!(
                s.set_membership("nope", "u1", DomainRole::Member),
                Err(StoreError::NotFound(_))
            ));
            s.set_membership("d1", "u1", DomainRole::Member).unwrap();
            s.set_membership("d1", "u1", DomainRole::Admin).unwrap();
            assert_eq!(
                s.memberships().unwrap(),
                vec![("d1".into(), "u1".into(), DomainRole::Admin)]
            );
            assert_eq!(s.user_by_id("u1").unwrap().unwrap().role, Role::User);
            s.insert_refresh("r1", "f1", "u1", 100).unwrap();
            assert_eq!(
                s.rotate_refresh("r1", "r2", 100, 10).unwrap(),
                Rotation::Rotated
            );
            // r1 presented again: refused, and the whole family (r2 too) is revoked.
            assert_eq!(
                s.rotate_refresh("r1", "r3", 100, 10).unwrap(),
                Rotation::Reused
            );
            assert_eq!(
                s.rotate_refresh("r2", "r4", 100, 10).unwrap(),
                Rotation::Reused
            );
            assert_eq!(
                s.rotate_refresh("nope", "r5", 100, 10).unwrap(),
                Rotation::Invalid
            );
        }
        // Reopening keeps everything (and migrations are not re-run).
        let s = Store::open(&path).unwrap();
        assert_eq!(s.user_count().unwrap(), 1);
        assert_eq!(s.domains().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
