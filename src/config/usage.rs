//! `[usage]`: whether requests are metered and stored, how often the sums are written, and
//! how long they are kept.

use super::checks::check_range;
use super::ConfigError;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Sum every request per minute per (domain, user, API key, model) and store it.
    pub enabled: bool,
    /// How often the writer commits what the workers sent (one transaction each time).
    pub flush_ms: u64,
    /// Rows older than this are deleted (at start and then hourly).
    pub retention_days: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            flush_ms: 1000,
            retention_days: 90,
        }
    }
}

impl UsageConfig {
    pub fn flush(&self) -> Duration {
        Duration::from_millis(self.flush_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("usage.flush_ms", self.flush_ms, 100, 60_000)?;
        check_range("usage.retention_days", self.retention_days, 1, 3650)
    }
}
