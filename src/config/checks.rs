//! Checks on configuration values, each naming the key it concerns: addresses, limits,
//! domain ids, model lists, backend and JWKS URLs. Used by `Config::validate` and by the
//! management API, which validates backends the same way the file's are.

use super::{err, BackendUrl, ConfigError, TrustedIssuer};
use std::net::{SocketAddr, ToSocketAddrs};

pub(super) fn validate_trusted(i: usize, t: &TrustedIssuer) -> Result<(), ConfigError> {
    let key = |k: &str| format!("auth.trusted[{i}].{k}");
    if t.issuer.is_empty() {
        return Err(err(key("issuer"), "must not be empty"));
    }
    let sources = [
        t.jwks_url.is_some(),
        t.jwks.is_some(),
        t.hs_secret_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(err(
            key("issuer"),
            "set exactly one of jwks_url, jwks or hs_secret_env",
        ));
    }
    if let Some(url) = &t.jwks_url {
        check_jwks_url(url).map_err(|p| err(key("jwks_url"), p))?;
    }
    Ok(())
}

/// JWKS must come over https; plain http only from a loopback address (tests, sidecars).
pub fn check_jwks_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("{url:?} must be an https:// URL"));
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let addr = host
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| host.parse::<std::net::IpAddr>());
    match addr {
        Ok(ip) if ip.is_loopback() => Ok(()),
        _ => Err(format!(
            "{url:?}: plain http is only allowed to a loopback address; use https://"
        )),
    }
}

pub(super) fn check_range(key: &str, v: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if v < min || v > max {
        return Err(err(key, format!("{v} is out of range ({min}..={max})")));
    }
    Ok(())
}

pub(super) fn parse_listen(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse::<SocketAddr>().map_err(|_| {
        err(
            key,
            format!("{v:?} is not an IP:port address (e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"),
        )
    })
}

/// Domain ids appear in URLs and headers: keep them to URL-safe characters.
pub fn validate_domain_id(key: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 128 {
        return Err(err(key, "must be 1..=128 characters"));
    }
    if id == "." || id == ".." {
        return Err(err(key, "\".\" and \"..\" are not domain ids"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(err(
            key,
            format!("{id:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

pub(super) fn validate_models(key: &str, models: &[String]) -> Result<(), ConfigError> {
    if models.is_empty() {
        return Err(err(
            key,
            "list at least one model, or [\"*\"] for any model",
        ));
    }
    if models.iter().any(|m| m == "*") && models.len() > 1 {
        return Err(err(key, "\"*\" (any model) must be the only entry"));
    }
    for m in models {
        if m.is_empty() || m.len() > 256 || m.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
            return Err(err(
                key,
                format!("{m:?} is not a valid model name (1..=256 printable characters, no quotes or backslashes)"),
            ));
        }
    }
    Ok(())
}

/// `http://host[:port][/base]`. The host is resolved once, here: the data plane never
/// resolves names.
pub fn parse_backend_url(key: &str, url: &str) -> Result<BackendUrl, ConfigError> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err(err(
            key,
            "https:// backends are not available in this build yet; use http://",
        ));
    } else {
        return Err(err(key, format!("{url:?} must start with http://")));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(err(key, format!("{url:?} has no usable host")));
    }
    if path.contains('?') || path.contains('#') {
        return Err(err(
            key,
            format!("{url:?} must not have a query or fragment"),
        ));
    }
    let with_port = if authority.starts_with('[') {
        if authority.ends_with(']') {
            format!("{authority}:80")
        } else {
            authority.to_string()
        }
    } else if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| err(key, format!("cannot resolve {authority:?}: {e}")))?
        .next()
        .ok_or_else(|| err(key, format!("{authority:?} resolves to no address")))?;
    Ok(BackendUrl {
        addr,
        authority: authority.to_string(),
        base_path: path.trim_end_matches('/').to_string(),
    })
}
