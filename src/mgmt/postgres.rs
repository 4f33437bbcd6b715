//! The shared [`Storage`]: PostgreSQL, so several boxes keep one set of users, domains,
//! keys, limits and usage.
//!
//! Every method answers as SQLite's (`sqlite.rs`) does, statement for statement; what
//! differs is what a server shared over the network brings. Its connection can go away:
//! [`PgStore`] holds one session (`postgres_session.rs`) and, before each call, opens a new
//! one when there is none or it has closed. An error that leaves the connection closed, or
//! a SQLSTATE saying the server is going away or timed the statement out, is `Unavailable`
//! and drops the session, so once the server is back the next call works, with no restart.
//! Boxes starting at once migrate one after the other, and every change the data plane must
//! see is notified on [`CHANGES_CHANNEL`] (`postgres_schema.rs`). Several boxes spending one
//! refresh token at once: the token's row is locked, so exactly one rotates it; rotating,
//! revoking and disabling also take the user's advisory lock first, so a revocation never
//! misses the token a concurrent rotation is making. Text SQLite compares BINARY or NOCASE
//! is compared `COLLATE "C"` here (emails by `lower(email COLLATE "C")`, which folds ASCII
//! only, as NOCASE does), so uniqueness and order match byte for byte whatever the
//! database's default collation. Limits live in `postgres_limits.rs`, usage in
//! `postgres_usage.rs`.

use super::postgres_schema::migrate;
use super::postgres_session::{conflict, missing, session_config, Session};
use super::store::{
    ApiKeyRow, Domain, LimitsOf, Rotation, SealedKey, Storage, StoreError, UsageQuery, UsageRow,
    User,
};
use crate::auth::claims::Role;
use crate::auth::directory::DomainRole;
use crate::usage::limits::{ApiLimits, DomainLimits, Limits};
use crate::usage::tally::{Tally, UsageKey};
use postgres::types::ToSql;
use postgres::{Client, Config, Row, Transaction};
use std::cell::RefCell;
use std::time::Instant;

pub use super::postgres_schema::CHANGES_CHANNEL;

/// The shared store. Its session is made on first use and again after it is lost; the
/// management plane holds the store behind a mutex, so one call uses it at a time.
pub struct PgStore {
    config: Config,
    session: RefCell<Option<Session>>,
}

/// A role stored by name, read back through its `parse`.
fn parsed<T>(name: &str, parse: fn(&str) -> Option<T>, what: &str) -> Result<T, StoreError> {
    parse(name).ok_or_else(|| StoreError::Db(format!("unknown {what} {name:?}")))
}

/// A connection with the store's settings, for a thread that `LISTEN`s on
/// [`CHANGES_CHANNEL`].
pub fn connect_listener(url: &str) -> Result<Client, StoreError> {
    Ok(Session::open(&session_config(url)?)?.client)
}

/// The advisory lock class of a user's refresh tokens ("cube").
const SESSIONS_LOCK: i32 = 0x6375_6265;

/// Serializes every change to `user`'s refresh tokens (rotating, revoking, disabling) until
/// the transaction ends. Row locks alone do not: a statement's snapshot misses the token a
/// concurrent rotation inserts, so a revocation racing it would leave that token alive.
fn lock_sessions_of(tx: &mut Transaction<'_>, user: &str) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&SESSIONS_LOCK, &user],
    )?;
    Ok(())
}

const INSERT_REFRESH: &str =
    "INSERT INTO refresh_tokens (jti, family, user_id, expires_at) VALUES ($1, $2, $3, $4)";

const USER_COLUMNS: &str =
    "id, email, password_hash, first_name, last_name, role, disabled, created_at";

fn user_from_row(r: &Row) -> Result<User, StoreError> {
    Ok(User {
        id: r.try_get(0)?,
        email: r.try_get(1)?,
        password_hash: r.try_get(2)?,
        first_name: r.try_get(3)?,
        last_name: r.try_get(4)?,
        role: parsed(r.try_get(5)?, Role::parse, "role")?,
        disabled: r.try_get(6)?,
        created_at: r.try_get(7)?,
    })
}

impl PgStore {
    /// Connects (`url`: a URL or key=value connection string) and applies migrations.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        let config = session_config(url)?;
        let session = Session::open(&config)?;
        let store = PgStore {
            config,
            session: RefCell::new(Some(session)),
        };
        store.with_client(migrate)?;
        Ok(store)
    }

    /// Runs `work` on the session, made first when there is none or it closed. When the
    /// work leaves the connection closed or finds the server unavailable, the session is
    /// dropped and the error is `Unavailable`: the next call starts a new one.
    fn with_client<T>(
        &self,
        work: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self.session.borrow_mut();
        let session = match slot.take().and_then(Session::still_open) {
            Some(s) => slot.insert(s),
            None => slot.insert(Session::open(&self.config)?),
        };
        let result = work(&mut session.client);
        session.last_used = Instant::now();
        if session.client.is_closed() || matches!(result, Err(StoreError::Unavailable(_))) {
            if let Some(lost) = slot.take() {
                lost.abandon();
            }
            return result.map_err(|e| match e {
                StoreError::Db(text) => StoreError::Unavailable(text),
                other => other,
            });
        }
        result
    }

    /// How many changes the data plane must see have been committed (what the last
    /// notification on [`CHANGES_CHANNEL`] carried).
    pub fn state_version(&self) -> Result<i64, StoreError> {
        self.with_client(|c| {
            Ok(c.query_one("SELECT version FROM cubegate_state", &[])?
                .try_get(0)?)
        })
    }

    /// Runs one statement; how many rows it changed.
    fn change(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        self.change_or(sql, params, StoreError::from)
    }

    /// Like [`PgStore::change`], the server's refusal read by `refused` (a key that exists
    /// already, an owner that does not).
    fn change_or(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        refused: impl FnOnce(postgres::Error) -> StoreError,
    ) -> Result<u64, StoreError> {
        self.with_client(|c| c.execute(sql, params).map_err(refused))
    }

    /// Every row `sql` selects, through `from_row`.
    fn select<T>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        from_row: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.with_client(|c| c.query(sql, params)?.iter().map(from_row).collect())
    }
}

impl Storage for PgStore {
    fn user_count(&self) -> Result<u64, StoreError> {
        self.with_client(|c| {
            let n: i64 = c.query_one("SELECT COUNT(*) FROM users", &[])?.try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn insert_user(&self, u: &User) -> Result<(), StoreError> {
        let sql =
            format!("INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)");
        self.change_or(
            &sql,
            &[
                &u.id,
                &u.email,
                &u.password_hash,
                &u.first_name,
                &u.last_name,
                &u.role.as_str(),
                &u.disabled,
                &u.created_at,
            ],
            |e| conflict(e, "a user with this email"),
        )?;
        Ok(())
    }

    fn user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users
             WHERE lower(email COLLATE \"C\") = lower($1::TEXT COLLATE \"C\")"
        );
        // At most one: the email's unique index is this very expression.
        Ok(self.select(&sql, &[&email], user_from_row)?.pop())
    }

    fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        Ok(self.select(&sql, &[&id], user_from_row)?.pop())
    }

    fn users(&self) -> Result<Vec<User>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY created_at, lower(email COLLATE \"C\")"
        );
        self.select(&sql, &[], user_from_row)
    }

    fn insert_refresh(
        &self,
        jti: &str,
        family: &str,
        user_id: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.change_or(
            INSERT_REFRESH,
            &[&jti, &family, &user_id, &expires_at],
            |e| conflict(e, "a refresh token with this id"),
        )?;
        Ok(())
    }

    fn rotate_refresh(
        &mut self,
        old: &str,
        new: &str,
        new_expires_at: i64,
        now: i64,
    ) -> Result<Rotation, StoreError> {
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            let owner =
                tx.query_opt("SELECT user_id FROM refresh_tokens WHERE jti = $1", &[&old])?;
            let Some(owner) = owner else {
                return Ok(Rotation::Invalid);
            };
            lock_sessions_of(&mut tx, &owner.try_get::<_, String>(0)?)?;
            // Read after the lock (a new snapshot), and locked until commit: a second box
            // spending the same token waits, then reads it spent and answers Reused.
            let row = tx.query_opt(
                "SELECT t.family, t.user_id, t.expires_at, t.spent, t.revoked, u.disabled
                 FROM refresh_tokens t JOIN users u ON u.id = t.user_id WHERE t.jti = $1
                 FOR UPDATE OF t",
                &[&old],
            )?;
            let Some(row) = row else {
                return Ok(Rotation::Invalid);
            };
            let family: String = row.try_get(0)?;
            let user_id: String = row.try_get(1)?;
            let expires_at: i64 = row.try_get(2)?;
            let (spent, revoked, disabled): (bool, bool, bool) =
                (row.try_get(3)?, row.try_get(4)?, row.try_get(5)?);
            if spent || revoked {
                tx.execute(
                    "UPDATE refresh_tokens SET revoked = true WHERE family = $1",
                    &[&family],
                )?;
                tx.commit()?;
                return Ok(Rotation::Reused);
            }
            if expires_at < now || disabled {
                return Ok(Rotation::Invalid);
            }
            tx.execute(
                "UPDATE refresh_tokens SET spent = true WHERE jti = $1",
                &[&old],
            )?;
            tx.execute(INSERT_REFRESH, &[&new, &family, &user_id, &new_expires_at])?;
            tx.commit()?;
            Ok(Rotation::Rotated)
        })
    }

    fn revoke_family_of(&self, jti: &str) -> Result<bool, StoreError> {
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            let sql = "SELECT user_id, family FROM refresh_tokens WHERE jti = $1";
            let Some(row) = tx.query_opt(sql, &[&jti])? else {
                return Ok(false);
            };
            let (user, family): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            // After the lock no rotation of the family is under way: every token it made
            // is committed, and this statement's snapshot sees it.
            lock_sessions_of(&mut tx, &user)?;
            let changed = tx.execute(
                "UPDATE refresh_tokens SET revoked = true WHERE family = $1",
                &[&family],
            )?;
            tx.commit()?;
            Ok(changed > 0)
        })
    }

    fn insert_domain(&self, d: &Domain, now: i64) -> Result<(), StoreError> {
        self.change_or(
            "INSERT INTO domains (id, name, created_at) VALUES ($1, $2, $3)",
            &[&d.id, &d.name, &now],
            |e| conflict(e, "a domain with this id or name"),
        )?;
        Ok(())
    }

    fn domains(&self) -> Result<Vec<Domain>, StoreError> {
        self.select(
            "SELECT id, name FROM domains ORDER BY created_at, id COLLATE \"C\"",
            &[],
            |r| {
                Ok(Domain {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                })
            },
        )
    }

    fn set_membership(&self, domain: &str, user: &str, role: DomainRole) -> Result<(), StoreError> {
        self.change_or(
            "INSERT INTO memberships (domain_id, user_id, role) VALUES ($1, $2, $3)
             ON CONFLICT (domain_id, user_id) DO UPDATE SET role = excluded.role",
            &[&domain, &user, &role.as_str()],
            |e| missing(e, "the domain or the user"),
        )?;
        Ok(())
    }

    fn remove_membership(&self, domain: &str, user: &str) -> Result<bool, StoreError> {
        let changed = self.change(
            "DELETE FROM memberships WHERE domain_id = $1 AND user_id = $2",
            &[&domain, &user],
        )?;
        Ok(changed > 0)
    }

    fn memberships(&self) -> Result<Vec<(String, String, DomainRole)>, StoreError> {
        self.select(
            "SELECT domain_id, user_id, role FROM memberships",
            &[],
            |r| {
                let role = parsed(r.try_get(2)?, DomainRole::parse, "domain role")?;
                Ok((r.try_get(0)?, r.try_get(1)?, role))
            },
        )
    }

    fn mark_config_domain(&self, id: &str) -> Result<(), StoreError> {
        self.change(
            "UPDATE domains SET from_config = true WHERE id = $1",
            &[&id],
        )?;
        Ok(())
    }

    fn domain_from_config(&self, id: &str) -> Result<Option<bool>, StoreError> {
        let sql = "SELECT from_config FROM domains WHERE id = $1";
        Ok(self.select(sql, &[&id], |r| Ok(r.try_get(0)?))?.pop())
    }

    fn set_backends(&self, domain: &str, backends_json: &str) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO domain_backends (domain_id, backends) VALUES ($1, $2)
             ON CONFLICT (domain_id) DO UPDATE SET backends = excluded.backends",
            &[&domain, &backends_json],
        )?;
        Ok(())
    }

    fn api_backends(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        self.select(
            "SELECT d.id, d.name, b.backends
             FROM domain_backends b JOIN domains d ON d.id = b.domain_id
             WHERE NOT d.from_config",
            &[],
            |r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)),
        )
    }

    fn insert_api_key(&self, k: &ApiKeyRow, now: i64) -> Result<(), StoreError> {
        self.change_or(
            "INSERT INTO api_keys (id, domain_id, name, digest, created_by, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &k.id,
                &k.domain_id,
                &k.name,
                &k.digest,
                &k.created_by,
                &k.expires_at,
                &now,
            ],
            |e| conflict(e, "an API key with this id or digest"),
        )?;
        Ok(())
    }

    fn revoke_api_key(&self, domain: &str, id: &str) -> Result<bool, StoreError> {
        let changed = self.change(
            "UPDATE api_keys SET revoked = true WHERE id = $1 AND domain_id = $2 AND NOT revoked",
            &[&id, &domain],
        )?;
        Ok(changed > 0)
    }

    fn live_api_keys(&self, now: i64) -> Result<Vec<ApiKeyRow>, StoreError> {
        self.select(
            "SELECT id, domain_id, name, digest, created_by, expires_at FROM api_keys
             WHERE NOT revoked AND (expires_at IS NULL OR expires_at > $1)",
            &[&now],
            |r| {
                Ok(ApiKeyRow {
                    id: r.try_get(0)?,
                    domain_id: r.try_get(1)?,
                    name: r.try_get(2)?,
                    digest: r.try_get(3)?,
                    created_by: r.try_get(4)?,
                    expires_at: r.try_get(5)?,
                })
            },
        )
    }

    fn set_domain_limits(&self, domain: &str, set: &DomainLimits) -> Result<bool, StoreError> {
        self.with_client(|c| super::postgres_limits::set_domain(c, domain, set))
    }

    fn set_member_limits(
        &self,
        domain: &str,
        user: &str,
        set: &Limits,
    ) -> Result<bool, StoreError> {
        self.with_client(|c| super::postgres_limits::set_member(c, domain, user, set))
    }

    fn set_key_limits(&self, domain: &str, key: &str, set: &Limits) -> Result<bool, StoreError> {
        self.with_client(|c| super::postgres_limits::set_key(c, domain, key, set))
    }

    fn clear_limits(&self, of: LimitsOf<'_>) -> Result<bool, StoreError> {
        self.with_client(|c| super::postgres_limits::clear(c, of))
    }

    fn api_limits(&self) -> Result<ApiLimits, StoreError> {
        self.with_client(super::postgres_limits::read_all)
    }

    fn set_disabled(&mut self, user: &str, disabled: bool) -> Result<bool, StoreError> {
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            lock_sessions_of(&mut tx, user)?;
            let n = tx.execute(
                "UPDATE users SET disabled = $2 WHERE id = $1",
                &[&user, &disabled],
            )?;
            if disabled {
                tx.execute(
                    "UPDATE refresh_tokens SET revoked = true WHERE user_id = $1",
                    &[&user],
                )?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    fn record_usage(&mut self, rows: &[(UsageKey, Tally)]) -> Result<(), StoreError> {
        self.with_client(|c| super::postgres_usage::record(c, rows))
    }

    fn usage(&self, q: &UsageQuery<'_>) -> Result<Vec<UsageRow>, StoreError> {
        self.with_client(|c| super::postgres_usage::query(c, q))
    }

    fn prune_usage(&self, before_minute: i64) -> Result<u64, StoreError> {
        self.with_client(|c| super::postgres_usage::prune(c, before_minute))
    }

    fn sealed_keys(&self) -> Result<Vec<SealedKey>, StoreError> {
        self.select(
            "SELECT kid, created_at, sealed FROM signing_keys
             ORDER BY created_at, kid COLLATE \"C\"",
            &[],
            |r| {
                Ok(SealedKey {
                    kid: r.try_get(0)?,
                    created_at_ns: r.try_get(1)?,
                    sealed: r.try_get(2)?,
                })
            },
        )
    }

    fn insert_first_sealed_key(&self, key: &SealedKey) -> Result<bool, StoreError> {
        self.with_client(|c| {
            let mut tx = c.transaction()?;
            // Boxes starting together on an empty database: one makes the first key, the
            // others wait here and then find it.
            tx.batch_execute("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")?;
            let held: i64 = tx
                .query_one("SELECT COUNT(*) FROM signing_keys", &[])?
                .try_get(0)?;
            if held > 0 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO signing_keys (kid, created_at, sealed) VALUES ($1, $2, $3)",
                &[&key.kid, &key.created_at_ns, &key.sealed],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn insert_sealed_key(&self, key: &SealedKey) -> Result<(), StoreError> {
        self.change_or(
            "INSERT INTO signing_keys (kid, created_at, sealed) VALUES ($1, $2, $3)",
            &[&key.kid, &key.created_at_ns, &key.sealed],
            |e| conflict(e, "a signing key with this kid"),
        )?;
        Ok(())
    }
}
