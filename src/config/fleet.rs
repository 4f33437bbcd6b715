//! The fleet's configuration: how each domain routes among its GPU hosts, and how hosts
//! are checked (`[health]`).

use super::checks::check_range;
use super::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// `[[domains]] routing`: in what order a request tries the hosts that may serve it (see
/// `fleet::policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Prefix-cache affinity bounded by load: the best cubegate has.
    #[default]
    Auto,
    /// Prefix-cache affinity without the load bound.
    Prefix,
    LeastLoaded,
    RoundRobin,
}

/// `[[domains]] sticky`: what pins a conversation to the host that served it, beyond its
/// prefix (under `auto` and `prefix`; the other policies look at no request content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// An `X-Session-Id` header.
    #[default]
    Header,
    /// The header, else the body's top-level OpenAI `"user"` (the end user's id): each
    /// user's requests go to one host while it has room.
    User,
    /// Nothing: the prefix alone places every request.
    None,
}

/// `[health]`: active checks (vLLM `GET /health` and its `/metrics`, Ollama
/// `GET /api/version`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// 0 = no active checks: an ejected host returns when its backoff ends.
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 1000,
            timeout_ms: 1000,
        }
    }
}

impl HealthConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("health.interval_ms", self.interval_ms, 0, 3_600_000)?;
        check_range("health.timeout_ms", self.timeout_ms, 1, 600_000)
    }
}
