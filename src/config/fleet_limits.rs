//! `[fleet]`: the cubegate boxes behind one balancer that share their limits through Redis
//! (not the GPU hosts, which are [`super::fleet`]).
//!
//! Without it each box enforces every limit on its own, so three boxes let a domain through
//! three times its limit. The URL lives in the environment, not the file (it may carry a
//! password), and the variable being unset or empty keeps a box on its own, exactly as
//! before: a config file can name the variable on every box and only the boxes that set it
//! share.

use super::checks::check_range;
use super::{err, ConfigError};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The environment variable holding the `redis://host:port/` URL; "" = none.
    pub redis_url_env: String,
    /// How often a box exchanges its counts with the others.
    pub sync_ms: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            redis_url_env: "CUBEGATE_REDIS_URL".into(),
            sync_ms: 100,
        }
    }
}

impl FleetConfig {
    pub fn sync(&self) -> Duration {
        Duration::from_millis(self.sync_ms)
    }

    /// The Redis URL from the environment; None = this box alone.
    pub fn redis_url(&self) -> Option<String> {
        if self.redis_url_env.is_empty() {
            return None;
        }
        std::env::var(&self.redis_url_env)
            .ok()
            .filter(|url| !url.trim().is_empty())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("fleet.sync_ms", self.sync_ms, 10, 10_000)?;
        if self.redis_url_env.contains(['=', '\0']) {
            return Err(err(
                "fleet.redis_url_env",
                format!(
                    "{:?} is not an environment variable's name",
                    self.redis_url_env
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn the_table_parses_and_an_empty_variable_name_means_alone() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            (c.fleet.redis_url_env.as_str(), c.fleet.sync_ms),
            ("CUBEGATE_REDIS_URL", 100)
        );
        let c = Config::parse("[fleet]\nredis_url_env = \"\"\nsync_ms = 50\n").unwrap();
        assert_eq!(c.fleet.redis_url(), None);
        assert!(Config::parse("[fleet]\nredis_url = \"redis://x/\"\n")
            .unwrap_err()
            .to_string()
            .contains("redis_url"));
    }
}
