//! The TOML configuration: schema, defaults and validation.
//!
//! Everything an operator can set lives here, and nowhere else: limits and timeouts are read
//! from [`Limits`] and [`Timeouts`] by every phase of a request. Parsing is strict
//! (`deny_unknown_fields`) so a typo in a key is an error that names the key, not a silently
//! ignored setting. `validate` turns the raw values into checked ones (addresses resolved,
//! URLs split, models checked) so the rest of the program never re-validates.

mod checks;
pub mod fleet;
mod fleet_limits;
mod limits;
mod usage;

pub use fleet::{HealthConfig, Routing, Sticky};
pub use fleet_limits::FleetConfig;
pub use limits::{Limits, Timeouts};
pub use usage::UsageConfig;

pub use checks::check_url;
use checks::{check_range, parse_listen, validate_models, validate_trusted};
pub use checks::{is_valid_model_name, parse_backend_url, validate_domain_id};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Hard ceiling on `limits.max_headers`: the header array lives on the worker's stack.
pub const MAX_HEADERS_CEILING: usize = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub management: ManagementConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Auto,
    Uring,
    Legacy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: String,
    /// 0 = one worker per CPU core.
    pub workers: usize,
    pub driver: Driver,
    /// Pin worker i to CPU i (mod the CPUs this process may use).
    pub pin_workers: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) trusted for `https://` backends; unset = the system store.
    pub backend_ca_file: Option<PathBuf>,
    /// Move bodies that need no inspection with splice(2) instead of a userspace copy.
    pub splice_bodies: bool,
    /// One access record per request (target `cubegate::access`, info level).
    pub access_log: bool,
    /// Idle keep-alive connections kept per backend per worker.
    pub upstream_idle_per_backend: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            driver: Driver::Auto,
            pin_workers: false,
            tls_cert: None,
            tls_key: None,
            backend_ca_file: None,
            splice_bodies: false,
            access_log: true,
            upstream_idle_per_backend: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub admin_email: String,
    pub admin_password_env: String,
    pub access_token_ttl_s: u64,
    pub refresh_token_ttl_s: u64,
    /// Both set = the management listener speaks HTTPS with this certificate and key.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Where users, tokens, domains and keys live: this box's SQLite file, or a PostgreSQL
    /// database shared by several boxes.
    pub store: StoreKind,
    /// The environment variable holding the PostgreSQL connection string (a URL or
    /// `key=value` pairs), so the password is not in the config file.
    pub postgres_url_env: String,
    /// The environment variable holding the key (32 bytes, hex or base64) that seals the
    /// signing keys' private halves in PostgreSQL.
    pub key_encryption_key_env: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl Default for ManagementConfig {
    fn default() -> Self {
        ManagementConfig {
            listen: "127.0.0.1:8081".into(),
            data_dir: PathBuf::from("/var/lib/cubegate"),
            admin_email: "admin@example.com".into(),
            admin_password_env: "CUBEGATE_ADMIN_PASSWORD".into(),
            access_token_ttl_s: 900,
            refresh_token_ttl_s: 86400,
            tls_cert: None,
            tls_key: None,
            store: StoreKind::Sqlite,
            postgres_url_env: "CUBEGATE_POSTGRES_URL".into(),
            key_encryption_key_env: "CUBEGATE_KEY_ENCRYPTION_KEY".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Jwt,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub issuer: String,
    pub leeway_s: u64,
    pub claims_namespace: String,
    pub domains_claim: String,
    /// Verified tokens remembered per worker.
    pub token_cache_entries: usize,
    /// Claim name → header sent upstream with its value (e.g. "email" = "X-User-Email").
    pub claim_headers: std::collections::BTreeMap<String, String>,
    pub trusted: Vec<TrustedIssuer>,
    /// Custom authentication: a bearer token that is neither a JWT of a trusted issuer nor
    /// an API key is POSTed here (`http[s]://host[:port]/path`; plain http only to loopback).
    pub check_url: Option<String>,
    /// The whole call to `check_url` (connect, TLS, request, answer).
    pub check_timeout_ms: u64,
    /// Longest a granted check is remembered, whatever its `max_age_s` asks.
    pub check_max_age_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Jwt,
            issuer: "cubegate".into(),
            leeway_s: 30,
            claims_namespace: String::new(),
            domains_claim: "domains".into(),
            token_cache_entries: 65536,
            claim_headers: Default::default(),
            trusted: Vec::new(),
            check_url: None,
            check_timeout_ms: 1000,
            check_max_age_s: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuer {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_url: Option<String>,
    pub jwks: Option<String>,
    pub hs_secret_env: Option<String>,
    /// Refuse tokens without `exp` (default true).
    #[serde(default = "yes")]
    pub require_exp: bool,
}

fn yes() -> bool {
    true
}

/// Size limits. Every byte a client or backend sends is counted against one of these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub sticky: Sticky,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// The whole domain's limits (`[domains.limits]`).
    #[serde(default)]
    pub limits: crate::usage::limits::Limits,
    /// Each member's default (`[domains.member_limits]`).
    #[serde(default)]
    pub member_limits: crate::usage::limits::Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Vllm,
    Ollama,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub kind: BackendKind,
    pub url: String,
    pub models: Vec<String>,
    /// Requests this box sends the host at once; above it they wait in cubegate's queue.
    /// 0 = no limit.
    #[serde(default)]
    pub max_in_flight: u32,
}

/// A configuration problem: the key it concerns and what is wrong with it.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A backend URL split into what the proxy needs: where to connect, what to send as
/// `Host`, and the path prefix to put before the forwarded path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub addr: SocketAddr,
    /// `https://`: the name the backend's certificate is checked against.
    pub tls_name: Option<rustls::pki_types::ServerName<'static>>,
    pub authority: String,
    pub base_path: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's message already names the key and the line.
            err(
                "",
                format!("invalid configuration: {}", e.to_string().trim_end()),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_listen("proxy.listen", &self.proxy.listen)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        parse_listen("management.listen", &self.management.listen)?;
        if self.proxy.tls_cert.is_some() != self.proxy.tls_key.is_some() {
            return Err(err(
                "proxy.tls_cert",
                "tls_cert and tls_key must be set together (both = HTTPS, neither = HTTP)",
            ));
        }
        if self.management.tls_cert.is_some() != self.management.tls_key.is_some() {
            return Err(err(
                "management.tls_cert",
                "tls_cert and tls_key must be set together (both = HTTPS, neither = HTTP)",
            ));
        }
        if self.proxy.workers > 1024 {
            return Err(err("proxy.workers", "at most 1024 workers"));
        }
        let l = &self.limits;
        check_range(
            "limits.max_head_bytes",
            l.max_head_bytes as u64,
            1024,
            1 << 20,
        )?;
        check_range(
            "limits.max_headers",
            l.max_headers as u64,
            8,
            MAX_HEADERS_CEILING as u64,
        )?;
        check_range("limits.max_uri_bytes", l.max_uri_bytes as u64, 64, 1 << 20)?;
        if l.max_uri_bytes > l.max_head_bytes {
            return Err(err(
                "limits.max_uri_bytes",
                "must not exceed limits.max_head_bytes",
            ));
        }
        check_range("limits.max_body_bytes", l.max_body_bytes, 1, 1 << 34)?;
        check_range(
            "limits.max_upstream_head_bytes",
            l.max_upstream_head_bytes as u64,
            1024,
            1 << 20,
        )?;
        check_range(
            "limits.max_connections",
            l.max_connections as u64,
            1,
            1 << 24,
        )?;
        check_range("limits.max_queued", l.max_queued as u64, 0, 1 << 24)?;
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.header_read_ms", t.header_read_ms),
            ("timeouts.idle_keepalive_s", t.idle_keepalive_s),
            ("timeouts.body_read_ms", t.body_read_ms),
            ("timeouts.upstream_connect_ms", t.upstream_connect_ms),
            ("timeouts.first_byte_s", t.first_byte_s),
            ("timeouts.between_chunks_s", t.between_chunks_s),
            ("timeouts.body_total_s", t.body_total_s),
        ] {
            check_range(key, v, 1, 86_400_000)?;
        }
        check_range("timeouts.drain_s", t.drain_s, 0, 86_400)?;
        check_range("timeouts.queue_s", t.queue_s, 0, 86_400)?;
        self.health.validate()?;
        self.usage.validate()?;
        self.fleet.validate()?;
        check_range(
            "auth.token_cache_entries",
            self.auth.token_cache_entries as u64,
            1,
            1 << 24,
        )?;
        for (i, t) in self.auth.trusted.iter().enumerate() {
            validate_trusted(i, t)?;
        }
        if let Some(url) = &self.auth.check_url {
            check_url("auth.check_url", url)?;
        }
        check_range(
            "auth.check_timeout_ms",
            self.auth.check_timeout_ms,
            1,
            60_000,
        )?;
        check_range("auth.check_max_age_s", self.auth.check_max_age_s, 0, 86_400)?;
        for (claim, header) in &self.auth.claim_headers {
            let key = format!("auth.claim_headers.{claim:?}");
            let token = !header.is_empty()
                && header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !token {
                return Err(err(key, format!("{header:?} is not a header name")));
            }
            if crate::http::headers::is_hop_by_hop_request(header.as_bytes()) {
                return Err(err(
                    key,
                    format!("{header:?} is a header cubegate sets or drops itself"),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.domains.iter().enumerate() {
            let key = format!("domains[{i}]");
            validate_domain_id(&format!("{key}.id"), &d.id)?;
            if !seen.insert(d.id.as_str()) {
                return Err(err(
                    format!("{key}.id"),
                    format!("duplicate domain id {:?}", d.id),
                ));
            }
            if d.backends.is_empty() {
                return Err(err(
                    format!("{key}.backends"),
                    "a domain needs at least one backend",
                ));
            }
            if d.sticky == Sticky::User
                && matches!(d.routing, Routing::LeastLoaded | Routing::RoundRobin)
            {
                // Only `auto` and `prefix` look at a request's content: the setting would
                // silently do nothing.
                return Err(err(
                    format!("{key}.sticky"),
                    "\"user\" needs routing = \"auto\" or \"prefix\" (least_loaded and round_robin place by load or turn, not by content)",
                ));
            }
            for (j, b) in d.backends.iter().enumerate() {
                let bkey = format!("{key}.backends[{j}]");
                parse_backend_url(&format!("{bkey}.url"), &b.url)?;
                validate_models(&format!("{bkey}.models"), &b.models)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:8080");
        assert_eq!(c.auth.mode, AuthMode::Jwt);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[proxy]\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[proxy]\nlisten = \"nope\"\n", "proxy.listen"),
            ("[limits]\nmax_headers = 100000\n", "limits.max_headers"),
            ("[timeouts]\nfirst_byte_s = 0\n", "timeouts.first_byte_s"),
            ("[usage]\nflush_ms = 50\n", "usage.flush_ms"),
            ("[usage]\nretention_days = 0\n", "usage.retention_days"),
            ("[fleet]\nsync_ms = 5\n", "fleet.sync_ms"),
            ("[fleet]\nredis_url_env = \"A=B\"\n", "fleet.redis_url_env"),
            (
                "[[domains]]\nid = \"a b\"\n[[domains.backends]]\nkind=\"vllm\"\nurl=\"http://127.0.0.1:1\"\nmodels=[\"m\"]\n",
                "domains[0].id",
            ),
            (
                "[[domains]]\nid = \"a\"\n[[domains.backends]]\nkind=\"vllm\"\nurl=\"ftp://x\"\nmodels=[\"m\"]\n",
                "domains[0].backends[0].url",
            ),
            (
                "[[domains]]\nid = \"a\"\n[[domains.backends]]\nkind=\"vllm\"\nurl=\"http://127.0.0.1:1\"\nmodels=[\"*\", \"m\"]\n",
                "domains[0].backends[0].models",
            ),
            ("[[domains]]\nid = \"a\"\n", "domains[0].backends"),
            (
                "[[domains]]\nid = \"a\"\nrouting = \"round_robin\"\nsticky = \"user\"\n[[domains.backends]]\nkind=\"vllm\"\nurl=\"http://127.0.0.1:1\"\nmodels=[\"m\"]\n",
                "domains[0].sticky",
            ),
            ("[auth]\ncheck_url = \"ftp://x/check\"\n", "auth.check_url"),
            (
                "[auth]\ncheck_url = \"http://192.0.2.1/check\"\n",
                "auth.check_url",
            ),
            ("[auth]\ncheck_timeout_ms = 0\n", "auth.check_timeout_ms"),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err();
            assert!(e.to_string().starts_with(key), "{key}: {e}");
        }
    }

    #[test]
    fn backend_url_forms() {
        let u = parse_backend_url("k", "http://127.0.0.1:8000/").unwrap();
        assert_eq!(u.addr, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(u.base_path, "");
        let u = parse_backend_url("k", "http://[::1]/ollama/").unwrap();
        assert_eq!(u.addr, "[::1]:80".parse().unwrap());
        assert_eq!(u.authority, "[::1]");
        assert_eq!(u.base_path, "/ollama");
        assert!(parse_backend_url("k", "http://user@127.0.0.1").is_err());
        assert!(u.tls_name.is_none());
        let u = parse_backend_url("k", "https://127.0.0.1/v").unwrap();
        assert_eq!(u.addr, "127.0.0.1:443".parse().unwrap());
        assert_eq!(u.tls_name.unwrap().to_str(), "127.0.0.1");
        let u = parse_backend_url("k", "https://[::1]:8443").unwrap();
        assert_eq!(u.addr, "[::1]:8443".parse().unwrap());
        assert_eq!(u.tls_name.unwrap().to_str(), "::1");
        let u = parse_backend_url("k", "https://localhost:8443").unwrap();
        assert_eq!(u.tls_name.unwrap().to_str(), "localhost");
        assert!(parse_backend_url("k", "ftp://127.0.0.1").is_err());
    }
}
