//! `cubegate migrate-store`: one box's SQLite store (and its signing key files) copied into
//! a PostgreSQL database, so the box can join a fleet on the shared store without its users
//! logging in again.
//!
//! What moves: users (password hashes as they are), domains (and which ones the config file
//! owns), memberships, live API keys, live refresh tokens (sessions survive), backends and
//! limits set through the API, usage rows, and the signing keys — sealed with the key
//! encryption key on the way, so tokens the box issued before keep verifying on every box.
//! Spent and revoked refresh tokens and revoked API keys stay behind: they can only be
//! refused, and unknown ones are refused too.
//!
//! It refuses a target that already holds users unless `--force`; then, and on any second
//! run, everything already there is left as it is (rows are matched by id), and usage is
//! copied only into a target that holds none for those minutes, so running it again never
//! counts a token twice; it is copied in one transaction, so a run that failed part way
//! leaves none of it and the next run copies it all.

use super::keyring::{KeyHome, Sealer};
use super::sqlite::Store;
use super::store::{Storage, StoreError, UsageGroup, UsageQuery};
use super::tokens;
use std::path::Path;

/// What one run copied (and skipped because the target had it).
#[derive(Debug, Default)]
pub struct Copied {
    pub users: (usize, usize),
    pub domains: (usize, usize),
    pub memberships: usize,
    pub api_keys: (usize, usize),
    pub refresh_tokens: (usize, usize),
    pub backends: usize,
    pub limit_sets: usize,
    pub usage_rows: usize,
    pub usage_skipped: bool,
    pub signing_keys: (usize, usize),
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pair = |(n, skipped): (usize, usize)| format!("{n} (already there: {skipped})");
        writeln!(f, "users:          {}", pair(self.users))?;
        writeln!(f, "domains:        {}", pair(self.domains))?;
        writeln!(f, "memberships:    {}", self.memberships)?;
        writeln!(f, "API keys:       {}", pair(self.api_keys))?;
        writeln!(f, "refresh tokens: {}", pair(self.refresh_tokens))?;
        writeln!(f, "backends:       {}", self.backends)?;
        writeln!(f, "limit sets:     {}", self.limit_sets)?;
        if self.usage_skipped {
            writeln!(
                f,
                "usage rows:     0 (the target has usage for those minutes already)"
            )?;
        } else {
            writeln!(f, "usage rows:     {}", self.usage_rows)?;
        }
        write!(f, "signing keys:   {}", pair(self.signing_keys))
    }
}

/// Counts an insert that may find its row there already.
fn tally(counter: &mut (usize, usize), result: Result<(), StoreError>) -> Result<(), StoreError> {
    match result {
        Ok(()) => counter.0 += 1,
        Err(StoreError::Conflict(_)) => counter.1 += 1,
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Copies the store under `data_dir` into `target`, sealing the key files with `sealer`.
pub fn migrate(
    data_dir: &Path,
    target: &mut dyn Storage,
    sealer: Sealer,
    force: bool,
) -> Result<Copied, String> {
    let db = data_dir.join("cubegate.db");
    if !db.exists() {
        return Err(format!(
            "{}: no store here (cubegate.db)",
            data_dir.display()
        ));
    }
    let source = Store::open(&db).map_err(|e| format!("{}: {e}", db.display()))?;
    let held = target.user_count().map_err(|e| e.to_string())?;
    if held > 0 && !force {
        return Err(format!(
            "the target database already holds {held} users: refusing to merge into it (--force copies what is missing and leaves what is there)"
        ));
    }
    copy(&source, target, data_dir, sealer).map_err(|e| e.to_string())
}

fn copy(
    source: &Store,
    target: &mut dyn Storage,
    data_dir: &Path,
    sealer: Sealer,
) -> Result<Copied, StoreError> {
    let mut done = Copied::default();
    let now = super::unix_now();
    for u in source.users()? {
        tally(&mut done.users, target.insert_user(&u))?;
    }
    for d in source.domains()? {
        tally(&mut done.domains, target.insert_domain(&d, now))?;
        if source.domain_from_config(&d.id)? == Some(true) {
            target.mark_config_domain(&d.id)?;
        }
    }
    for (domain, user, role) in source.memberships()? {
        target.set_membership(&domain, &user, role)?;
        done.memberships += 1;
    }
    let keys = source.live_api_keys(now)?;
    for k in &keys {
        tally(&mut done.api_keys, target.insert_api_key(k, now))?;
    }
    for (jti, family, user, expires_at) in source.live_refresh_tokens(now)? {
        tally(
            &mut done.refresh_tokens,
            target.insert_refresh(&jti, &family, &user, expires_at),
        )?;
    }
    for (domain, _name, json) in source.api_backends()? {
        target.set_backends(&domain, &json)?;
        done.backends += 1;
    }
    let limits = source.api_limits()?;
    for (domain, set) in &limits.domains {
        done.limit_sets += usize::from(target.set_domain_limits(domain.as_str(), set)?);
    }
    for (domain, members) in &limits.members {
        for (user, set) in members {
            done.limit_sets += usize::from(target.set_member_limits(domain.as_str(), user, set)?);
        }
    }
    for k in &keys {
        if let Some(set) = limits.keys.get(&k.id) {
            done.limit_sets += usize::from(target.set_key_limits(&k.domain_id, &k.id, set)?);
        }
    }
    copy_usage(source, target, &mut done)?;
    copy_keys(data_dir, target, sealer, &mut done)?;
    Ok(done)
}

/// Usage goes only into minutes the target has none for: a second run adds nothing.
fn copy_usage(
    source: &Store,
    target: &mut dyn Storage,
    done: &mut Copied,
) -> Result<(), StoreError> {
    let rows = source.usage_rows()?;
    let (Some(first), Some(last)) = (
        rows.iter().map(|(k, _)| k.minute).min(),
        rows.iter().map(|(k, _)| k.minute).max(),
    ) else {
        return Ok(());
    };
    let there = target.usage(&UsageQuery {
        from_minute: first,
        to_minute: last + 1,
        domain: None,
        user: None,
        group: UsageGroup::Domain,
    })?;
    if !there.is_empty() {
        done.usage_skipped = true;
        return Ok(());
    }
    // In one transaction: a copy that failed part way must leave nothing, since the next
    // run copies usage only into minutes that hold none.
    target.record_usage(&rows)?;
    done.usage_rows = rows.len();
    Ok(())
}

/// The key files, sealed into the target (a key already there by id is left).
fn copy_keys(
    data_dir: &Path,
    target: &dyn Storage,
    sealer: Sealer,
    done: &mut Copied,
) -> Result<(), StoreError> {
    let there: Vec<String> = target.sealed_keys()?.into_iter().map(|k| k.kid).collect();
    let files = tokens::key_files(data_dir).map_err(StoreError::Db)?;
    let home = KeyHome::Store(Box::new(sealer));
    for (created_at_ns, pkcs8) in files {
        let key = tokens::key_from_pkcs8(&pkcs8).map_err(StoreError::Db)?;
        if there.contains(&key.kid) {
            done.signing_keys.1 += 1;
            continue;
        }
        home.store_key(target, &key.kid, created_at_ns, &pkcs8)
            .map_err(StoreError::Db)?;
        done.signing_keys.0 += 1;
    }
    Ok(())
}

/// The command: the store under `data_dir` into the PostgreSQL database whose connection
/// string is in environment variable `url_var`, keys sealed with the key in `kek_var`.
pub fn run(data_dir: &Path, url_var: &str, kek_var: &str, force: bool) -> Result<Copied, String> {
    let url = std::env::var(url_var)
        .map_err(|_| format!("set the PostgreSQL connection string in {url_var}"))?;
    let sealer = Sealer::from_env(kek_var)?;
    let mut target =
        super::postgres::PgStore::connect(&url).map_err(|e| format!("PostgreSQL: {e}"))?;
    migrate(data_dir, &mut target, sealer, force)
}
