//! The management plane: users, tokens, domains and memberships, on an embedded store.
//!
//! It runs on its own threads ([`server`]), keeps its state in SQLite ([`store`]), signs
//! the tokens it issues with its own Ed25519 keys ([`tokens`]), and after every change
//! publishes what the data plane needs — its public keys, the memberships, the disabled
//! users and a new revocation epoch — as a new snapshot. Workers pick it up before their
//! next request and empty their token caches on the epoch change, so a revoked membership
//! or a disabled user stops working within one request, cached tokens included. Usage is
//! read back by [`usage`] from rows the usage writer (`crate::usage::writer`) stores.

pub mod access;
pub mod answer;
pub mod api;
pub mod caller;
pub mod https;
pub mod keyring;
pub mod limits;
pub mod login;
pub mod login_limit;
pub mod migrate;
pub mod postgres;
pub mod postgres_limits;
pub mod postgres_schema;
pub mod postgres_session;
pub mod postgres_usage;
pub mod publish;
pub mod request;
pub mod server;
pub mod sqlite;
pub mod sqlite_export;
pub mod sqlite_limits;
pub mod sqlite_usage;
pub mod store;
pub mod tokens;
pub mod usage;
pub mod usage_query;
pub mod watch;

use crate::auth::claims::{ClaimRules, Role};
use crate::config::{Config, StoreKind};
use crate::snapshot::Published;
use sqlite::Store;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{Storage, User};
use tokens::SigningKey;

/// Failed logins allowed per account and per client address in `LOGIN_WINDOW`.
const LOGIN_FAILURES: u32 = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Failed logins per "account:<email>" / "addr:<ip>": (count, window start).
type FailureTable = HashMap<String, (u32, Instant)>;

/// Accounts and addresses tracked at most (a flood of names cannot grow it further).
const MAX_TRACKED: usize = 100_000;

pub struct Management {
    /// Pauses the API during a hand-over.
    pub gate: Arc<server::Gate>,
    /// The listening socket (a copy), to pass on in a hand-over.
    pub listener: std::sync::OnceLock<std::net::TcpListener>,
    store: Mutex<Box<dyn Storage>>,
    /// Where the signing keys are kept (files, or the shared store).
    key_home: keyring::KeyHome,
    /// Whether a shared store is reachable, for `/metrics`.
    pub(crate) health: watch::StoreHealth,
    /// Every worker's counters, for `GET /metrics`.
    registry: crate::metrics::Registry,
    /// Oldest first; the last one signs.
    keys: std::sync::RwLock<Vec<SigningKey>>,
    published: Arc<Published>,
    /// Held by one management publication at a time, from its read of the store to its
    /// snapshot.
    publishing: Mutex<()>,
    /// A SIGHUP's reload the management plane has yet to apply.
    pending_sync: Mutex<publish::PendingSync>,
    issuer: String,
    access_ttl: u64,
    refresh_ttl: u64,
    rules: ClaimRules,
    /// Failed logins per "account:<email>" / "addr:<ip>": (count, window start).
    failures: Mutex<(FailureTable, Instant)>,
    /// Verified against when the account does not exist, so both cases cost the same
    /// (made on first use: it costs a hash).
    dummy_hash: std::sync::OnceLock<String>,
}

/// Opens the store, bootstraps the admin and keys on first start, publishes the first
/// management snapshot and starts the management listener.
/// Returns the plane and the address its listener is bound to.
/// `inherited` = a listening socket passed by systemd or by the previous process;
/// `stop` = a SIGTERM came (see [`open_store`]).
pub fn start(
    config: &Config,
    published: Arc<Published>,
    registry: crate::metrics::Registry,
    inherited: Option<std::net::TcpListener>,
    certs: Option<Arc<crate::tls::CertStore>>,
    stop: &AtomicBool,
) -> Result<(Arc<Management>, std::net::SocketAddr), String> {
    let m = &config.management;
    let store = open_store(config, stop)?;
    let key_home = match m.store {
        StoreKind::Sqlite => keyring::KeyHome::Files(m.data_dir.clone()),
        StoreKind::Postgres => keyring::KeyHome::Store(Box::new(keyring::Sealer::from_env(
            &m.key_encryption_key_env,
        )?)),
    };
    let keys = key_home.load_or_create(&*store)?;
    let mgmt = Arc::new(Management {
        store: Mutex::new(store),
        key_home,
        health: watch::StoreHealth::default(),
        registry,
        keys: std::sync::RwLock::new(keys),
        published,
        publishing: Mutex::new(()),
        pending_sync: Mutex::default(),
        issuer: config.auth.issuer.clone(),
        access_ttl: m.access_token_ttl_s,
        refresh_ttl: m.refresh_token_ttl_s,
        rules: ClaimRules {
            leeway_s: config.auth.leeway_s as f64,
            namespace: String::new(),
            domains_claim: config.auth.domains_claim.clone(),
            claim_headers: Vec::new(),
        },
        failures: Mutex::new((HashMap::new(), Instant::now())),
        gate: Arc::default(),
        listener: std::sync::OnceLock::new(),
        dummy_hash: std::sync::OnceLock::new(),
    });
    mgmt.bootstrap_admin(config)?;
    mgmt.sync_config_domains(config)?;
    mgmt.publish();
    let listener = match inherited {
        Some(l) => l,
        None => std::net::TcpListener::bind(&m.listen)
            .map_err(|e| format!("management.listen: cannot listen on {}: {e}", m.listen))?,
    };
    let listener_copy = listener
        .try_clone()
        .map_err(|e| format!("management.listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let handler_state = mgmt.clone();
    let handler: server::Handler = Arc::new(move |req| api::route(&handler_state, req));
    let gate = mgmt.gate.clone();
    let transport = server::Transport {
        tls: certs.map(crate::tls::server_config),
        handshake_limit: config.timeouts.header_read(),
    };
    let https = transport.tls.is_some();
    std::thread::Builder::new()
        .name("cubegate-mgmt-accept".into())
        .spawn(move || server::serve(listener, handler, gate, transport))
        .map_err(|e| format!("cannot start the management listener: {e}"))?;
    let _ = mgmt.listener.set(listener_copy);
    if m.store == StoreKind::Postgres {
        watch::spawn(mgmt.clone(), postgres_url(config)?)
            .map_err(|e| format!("cannot start the store watcher: {e}"))?;
    }
    tracing::info!(listen = %addr, https, keys = mgmt.keys().len(), "management API listening");
    Ok((mgmt, addr))
}

/// Opens the configured store: SQLite under `management.data_dir` (creating the
/// directory), or PostgreSQL, waiting for it while it cannot be reached (the box is not
/// ready until it has its state) unless `stop` is set meanwhile (a SIGTERM: the wait ends
/// with [`STOPPED_WAITING`]). Migrations are applied either way. The management plane
/// holds one; the usage writer opens its own.
pub fn open_store(config: &Config, stop: &AtomicBool) -> Result<Box<dyn Storage>, String> {
    match config.management.store {
        StoreKind::Sqlite => {
            let dir = &config.management.data_dir;
            std::fs::create_dir_all(dir).map_err(|e| {
                format!("management.data_dir: cannot create {}: {e}", dir.display())
            })?;
            let store = Store::open(&dir.join("cubegate.db"))
                .map_err(|e| format!("management.data_dir: cannot open the store: {e}"))?;
            Ok(Box::new(store))
        }
        StoreKind::Postgres => {
            let url = postgres_url(config)?;
            let mut wait = Duration::from_millis(250);
            loop {
                match postgres::PgStore::connect(&url) {
                    Ok(store) => return Ok(Box::new(store)),
                    Err(store::StoreError::Unavailable(why)) => {
                        tracing::warn!(
                            "waiting for PostgreSQL (management.store = \"postgres\"): {why}; retrying in {wait:?}"
                        );
                        let until = Instant::now() + wait;
                        while Instant::now() < until {
                            if stop.load(Ordering::Relaxed) {
                                return Err(STOPPED_WAITING.into());
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(format!("management.store = \"postgres\": {e}")),
                }
            }
        }
    }
}

/// What [`open_store`] answers when a SIGTERM ended its wait for the database.
pub const STOPPED_WAITING: &str = "stopped while waiting for PostgreSQL";

/// What `check-config` can know of the store without reaching it: with PostgreSQL, that
/// the connection string and the key encryption key are in the environment and well
/// formed.
pub fn check_store_settings(config: &Config) -> Result<(), String> {
    if config.management.store == StoreKind::Postgres {
        postgres_session::session_config(&postgres_url(config)?).map_err(|e| e.to_string())?;
        keyring::Sealer::from_env(&config.management.key_encryption_key_env)?;
    }
    Ok(())
}

/// The PostgreSQL connection string, from the variable `management.postgres_url_env` names.
fn postgres_url(config: &Config) -> Result<String, String> {
    let var = &config.management.postgres_url_env;
    std::env::var(var).map_err(|_| {
        format!("management.store = \"postgres\": set the connection string in the environment variable {var} (management.postgres_url_env), e.g. postgresql://cubegate@db.example/cubegate")
    })
}

impl Management {
    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, Box<dyn Storage>> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bootstrap_admin(&self, config: &Config) -> Result<(), String> {
        if self.store().user_count().map_err(|e| e.to_string())? > 0 {
            return Ok(());
        }
        let var = &config.management.admin_password_env;
        let password = std::env::var(var).map_err(|_| {
            format!("first start: set the platform admin's password in the environment variable {var} (management.admin_password_env)")
        })?;
        login::check_password_strength(&password, &[&config.management.admin_email])
            .map_err(|why| format!("{var}: {why}"))?;
        let user = User {
            id: tokens::random_id(),
            email: config.management.admin_email.clone(),
            password_hash: login::hash_password(&password)?,
            first_name: String::new(),
            last_name: String::new(),
            role: Role::Admin,
            disabled: false,
            created_at: unix_now(),
        };
        match self.store().insert_user(&user) {
            Ok(()) => tracing::info!(email = %user.email, "created the platform admin"),
            // Another box on the same shared store made it at the same moment.
            Err(store::StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        Ok(())
    }

    /// Domains of the config file exist in the store too, so members can be added to them.
    pub fn sync_config_domains(&self, config: &Config) -> Result<(), String> {
        let store = self.store();
        let known: Vec<String> = store
            .domains()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|d| d.id)
            .collect();
        for d in &config.domains {
            if !known.contains(&d.id) {
                let name = if d.name.is_empty() {
                    d.id.clone()
                } else {
                    d.name.clone()
                };
                let domain = store::Domain {
                    id: d.id.clone(),
                    name,
                };
                // A name the API already gave another domain must not stop the box from
                // starting: the file's domain then goes by its id.
                let inserted = match store.insert_domain(&domain, unix_now()) {
                    Err(store::StoreError::Conflict(_)) => {
                        let by_id = store::Domain {
                            id: d.id.clone(),
                            name: d.id.clone(),
                        };
                        store.insert_domain(&by_id, unix_now())
                    }
                    other => other,
                };
                if let Err(e) = inserted {
                    tracing::error!(domain = %d.id, "cannot record the config domain: {e}");
                    continue;
                }
            }
            store
                .mark_config_domain(&d.id)
                .map_err(|e| format!("domains: {e}"))?;
        }
        Ok(())
    }

    fn dummy_hash(&self) -> &str {
        self.dummy_hash.get_or_init(|| {
            login::hash_password("not a real password, only for timing").unwrap_or_default()
        })
    }

    pub(crate) fn keys(&self) -> std::sync::RwLockReadGuard<'_, Vec<SigningKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs with the newest key (`load_or_create_keys` never returns an empty list).
    pub(crate) fn sign(&self, claims: &serde_json::Value) -> String {
        let keys = self.keys();
        keys[keys.len() - 1].sign(claims)
    }

    /// Adds a new signing key: it signs from now on, the older ones keep verifying (and stay
    /// in the JWKS) so tokens they issued live out their time. On a shared store every box
    /// takes it up through the change notification.
    pub fn rotate_key(&self) -> Result<String, String> {
        let home = self.key_home.add(&**self.store())?;
        self.reload_keys()?;
        let kid = self
            .keys()
            .last()
            .map(|k| k.kid.clone())
            .ok_or("no key after rotation")?;
        self.publish();
        tracing::info!(kid, home, "signing key rotated");
        Ok(kid)
    }

    /// Reads the signing keys again from where they are kept.
    pub(crate) fn reload_keys(&self) -> Result<(), String> {
        let fresh = self.key_home.load_or_create(&**self.store())?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// `Some(retry_after)` when the account or the address has failed too often; counts a
    /// failure when `failed`. Only failures take room (checks do not), the table is swept
    /// at most once a second, and when it is full every login waits (fails closed) rather
    /// than the table growing.
    fn login_limited(&self, email: &str, client: IpAddr, failed: bool) -> Option<u64> {
        // With `[fleet]`, counted over every box too; the local table still counts (it is
        // what decides whenever Redis does not answer).
        let fleet = login_limit::fleet_limited(email, client, failed, LOGIN_FAILURES, LOGIN_WINDOW);
        let mut guard = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (table, swept) = &mut *guard;
        let now = Instant::now();
        if now.duration_since(*swept) >= Duration::from_secs(1) {
            table.retain(|_, (_, since)| now.duration_since(*since) < LOGIN_WINDOW);
            *swept = now;
        }
        let mut limited = None;
        for key in [
            format!("account:{}", email.to_lowercase()),
            format!("addr:{client}"),
        ] {
            let entry = if failed {
                if table.len() >= MAX_TRACKED && !table.contains_key(&key) {
                    return Some(LOGIN_WINDOW.as_secs());
                }
                let e = table.entry(key).or_insert((0, now));
                e.0 += 1;
                Some(*e)
            } else {
                table.get(&key).copied()
            };
            if let Some((_, since)) = entry.filter(|(count, _)| *count >= LOGIN_FAILURES) {
                let left = LOGIN_WINDOW.saturating_sub(now.duration_since(since));
                limited = Some(left.as_secs().max(1));
            }
        }
        if table.len() >= MAX_TRACKED {
            return Some(LOGIN_WINDOW.as_secs());
        }
        limited.max(fleet)
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
