//! The PostgreSQL store's schema: versioned migrations, and the change notification.
//!
//! Migrations are versioned in the code (`cubegate_schema` holds how many are applied) and
//! applied all in one transaction that first takes an advisory lock, so boxes starting at
//! the same moment cannot both migrate: the second waits, then finds nothing to do. Each
//! table whose changes the data plane must see has a statement-level trigger that bumps
//! `cubegate_state.version` and notifies [`CHANGES_CHANNEL`] with it; PostgreSQL delivers
//! the notification at commit, so another box that hears it reads the change. Usage and
//! refresh tokens do not notify: no box republishes for them.

use super::store::StoreError;
use postgres::Client;

/// The channel every change the data plane must see is notified on; the payload is the
/// new `cubegate_state.version`.
pub const CHANGES_CHANNEL: &str = "cubegate_changes";

/// Held while migrating, so boxes starting together migrate one after the other
/// ("cubegate" in ASCII).
const MIGRATION_LOCK: i64 = 0x6375_6265_6761_7465;

/// Schema versions, in order, all applied in one transaction. Never edit one that shipped:
/// add the next (one that needs longer than the statement timeout sets its own with
/// `SET LOCAL statement_timeout`).
const MIGRATIONS: &[&str] = &[
    // 1: users, refresh tokens, domains, memberships, API keys, backends, signing keys,
    // and the change counter with the triggers that bump it.
    r#"CREATE TABLE users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        first_name TEXT NOT NULL DEFAULT '',
        last_name TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        disabled BOOLEAN NOT NULL DEFAULT false,
        created_at BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX users_email ON users (lower(email COLLATE "C"));
    CREATE TABLE refresh_tokens (
        jti TEXT PRIMARY KEY,
        family TEXT NOT NULL,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_at BIGINT NOT NULL,
        spent BOOLEAN NOT NULL DEFAULT false,
        revoked BOOLEAN NOT NULL DEFAULT false
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
    CREATE INDEX refresh_tokens_user ON refresh_tokens(user_id);
    CREATE TABLE domains (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        from_config BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE memberships (
        domain_id TEXT NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
        user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'member')),
        PRIMARY KEY (domain_id, user_id)
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        domain_id TEXT NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        digest BYTEA NOT NULL UNIQUE,
        created_by TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        expires_at BIGINT,
        revoked BOOLEAN NOT NULL DEFAULT false,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE domain_backends (
        domain_id TEXT PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
        backends TEXT NOT NULL
    );
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL,
        sealed BYTEA NOT NULL
    );
    CREATE TABLE cubegate_state (version BIGINT NOT NULL);
    INSERT INTO cubegate_state VALUES (0);
    CREATE FUNCTION cubegate_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        v BIGINT;
    BEGIN
        UPDATE cubegate_state SET version = version + 1 RETURNING version INTO v;
        PERFORM pg_notify('cubegate_changes', v::text);
        RETURN NULL;
    END $$;
    -- What makes a table one whose changes the data plane must see (later migrations
    -- call it for the tables they add).
    CREATE FUNCTION cubegate_notify_on(tables TEXT[]) RETURNS void LANGUAGE plpgsql AS $$
    DECLARE
        t TEXT;
    BEGIN
        FOREACH t IN ARRAY tables LOOP
            EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %I
                FOR EACH STATEMENT EXECUTE FUNCTION cubegate_changed()', t || '_changed', t);
        END LOOP;
    END $$;
    SELECT cubegate_notify_on(ARRAY['users', 'domains', 'memberships', 'api_keys',
        'domain_backends', 'signing_keys']);"#,
    // 2: limits set through the management API.
    super::postgres_limits::MIGRATION,
    // 3: usage per minute per (domain, user, API key, model).
    super::postgres_usage::MIGRATION,
];

/// Applies the migrations this database lacks.
pub(super) fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS cubegate_schema (version INT NOT NULL);
         INSERT INTO cubegate_schema SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM cubegate_schema)",
    )?;
    let version: i32 = tx
        .query_one("SELECT version FROM cubegate_schema", &[])?
        .try_get(0)?;
    let applied = usize::try_from(version).unwrap_or(0);
    // A newer box may have migrated further: what it added is left alone.
    let Some(pending) = MIGRATIONS.get(applied..).filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    for sql in pending {
        tx.batch_execute(sql)?;
    }
    let latest = MIGRATIONS.len() as i32;
    tx.execute("UPDATE cubegate_schema SET version = $1", &[&latest])?;
    tx.commit()?;
    Ok(())
}
