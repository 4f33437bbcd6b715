//! Checks on configuration values, each naming the key it concerns: addresses, limits,
//! domain ids, model lists, backend and JWKS URLs. Used by `Config::validate` and by the
//! management API, which validates backends the same way the file's are.

use super::{err, BackendUrl, ConfigError, TrustedIssuer};
use std::net::SocketAddr;

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

/// `[auth] check_url`: a URL as backends have them. Bearer tokens travel in it, so plain
/// http only to a loopback address (a sidecar); anything else must be https.
pub fn check_url(key: &str, url: &str) -> Result<BackendUrl, ConfigError> {
    let parsed = parse_backend_url(key, url)?;
    if parsed.tls_name.is_none() && !parsed.addr.ip().is_loopback() {
        return Err(err(
            key,
            format!("{url:?}: tokens travel in this call, so plain http is only allowed to a loopback address; use https://"),
        ));
    }
    Ok(parsed)
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

/// A backend's models: names, `["*"]` for any model, or `[]` to ask the host.
pub(super) fn validate_models(key: &str, models: &[String]) -> Result<(), ConfigError> {
    if models.iter().any(|m| m == "*") && models.len() > 1 {
        return Err(err(key, "\"*\" (any model) must be the only entry"));
    }
    for m in models {
        if !is_valid_model_name(m) {
            return Err(err(
                key,
                format!("{m:?} is not a valid model name (1..=256 printable characters, no quotes or backslashes)"),
            ));
        }
    }
    Ok(())
}

/// 1..=256 printable characters, no quotes or backslashes (they travel in JSON and logs).
pub fn is_valid_model_name(m: &str) -> bool {
    !m.is_empty() && m.len() <= 256 && !m.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `http[s]://host[:port][/base]`. The host is resolved once, here: the data plane never
/// resolves names. For https the host is also the name the backend's certificate must
/// carry (a DNS name, or an IP address SAN).
pub fn parse_backend_url(key: &str, url: &str) -> Result<BackendUrl, ConfigError> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, false, 80)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, true, 443)
    } else {
        return Err(err(
            key,
            format!("{url:?} must start with http:// or https://"),
        ));
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
            format!("{authority}:{default_port}")
        } else {
            authority.to_string()
        }
    } else if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = resolve(&with_port)
        .map_err(|e| err(key, format!("cannot resolve {authority:?}: {e}")))?
        .next()
        .ok_or_else(|| err(key, format!("{authority:?} resolves to no address")))?;
    let tls_name = if tls {
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| {
            err(
                key,
                format!("{host:?} is not a name a certificate can carry"),
            )
        })?;
        Some(name)
    } else {
        None
    };
    Ok(BackendUrl {
        addr,
        tls_name,
        authority: authority.to_string(),
        base_path: path.trim_end_matches('/').to_string(),
    })
}

/// `host:port` to addresses, through the system resolver.
#[cfg(not(fuzzing))]
fn resolve(host_port: &str) -> std::io::Result<std::vec::IntoIter<SocketAddr>> {
    std::net::ToSocketAddrs::to_socket_addrs(host_port)
}

/// Under the fuzzer (`--cfg fuzzing`, see fuzz/) only IP literals resolve: a fuzzed config
/// must not send DNS queries, which are slow and answer differently from run to run.
#[cfg(fuzzing)]
fn resolve(host_port: &str) -> std::io::Result<std::option::IntoIter<SocketAddr>> {
    let addr = host_port.parse::<SocketAddr>();
    addr.map(|a| Some(a).into_iter())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}
