//! `cubegate check-config`: everything `serve` would refuse in a configuration file, found
//! without starting anything — the file's keys, the domain map and trusted issuers as a
//! snapshot would be built from them, the TLS files it names and the `[fleet]` Redis URL
//! its environment holds.

use crate::auth::keys::KeyStore;
use crate::config::{Config, ConfigError};
use crate::snapshot::Snapshot;
use std::path::Path;

/// What a valid configuration holds, for the one line check-config prints.
pub struct CheckSummary {
    pub domains: usize,
    pub backends: usize,
    pub auth_mode: crate::config::AuthMode,
    pub driver: crate::config::Driver,
}

impl std::fmt::Display for CheckSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok ({} domains, {} backends, auth.mode = {:?}, driver = {:?})",
            self.domains, self.backends, self.auth_mode, self.driver
        )
    }
}

/// Checks the file at `path` as `serve` would read it.
pub fn check_config(path: &Path) -> Result<CheckSummary, ConfigError> {
    let config = Config::load(path)?;
    let keys = KeyStore::from_config(&config, 0)?;
    let snapshot = Snapshot::from_config(&config, 0, keys)?;
    check_tls_files(&config)?;
    // The Redis URL comes from the environment, as at `serve`; it is not connected to.
    crate::usage::fleet::settings(&config.fleet)?;
    crate::mgmt::check_store_settings(&config).map_err(|problem| ConfigError {
        key: "management.store".into(),
        problem,
    })?;
    Ok(CheckSummary {
        domains: snapshot.domains.len(),
        backends: snapshot.domains.values().map(|d| d.backends.len()).sum(),
        auth_mode: config.auth.mode,
        driver: config.proxy.driver,
    })
}

/// The TLS files a configuration names must load.
fn check_tls_files(config: &Config) -> Result<(), ConfigError> {
    use crate::tls::Listener;
    for listener in [Listener::Public, Listener::Management] {
        if let Some((cert, key)) = listener.files(config) {
            crate::tls::CertStore::load(listener, &cert, &key).map_err(ConfigError::from)?;
        }
    }
    if let Some(ca) = &config.proxy.backend_ca_file {
        crate::tls::backend_config(Some(ca)).map_err(ConfigError::from)?;
    }
    Ok(())
}
