//! Custom authentication (`[auth] check_url`): what cubegate asks an outside service about
//! a bearer token it cannot verify itself, and what it makes of the answer.
//!
//! A deployment may accept tokens cubegate has no key for (an opaque SSO token, an LDAP
//! session): Cube's `checkAuth`, Envoy's `ext_authz`, nginx's `auth_request`. The service
//! gets `{"token","method","path","domain","client"}` and answers 200 with an identity
//! (`{"sub","domains","role","claims"?,"max_age_s"?}`) or 401/403. This module is pure: it
//! builds the request body ([`request_body`]) and judges the answer ([`read_answer`]); the
//! data plane makes the non-blocking call, and [`super::Authenticator::settle_check`]
//! caches the verdict. So the parsing can be unit-tested and fuzzed on its own.
//!
//! The answer is treated as hostile, like a token's claims: bounded size, duplicate member
//! names refused, `sub` printable and short (it travels as `X-User-Id`), domains a bounded
//! list of short strings, `role` exactly "admin" or "user". A 200 that breaks any of this
//! is the service failing (503), never a grant; so is any status but 200, 401 and 403.

use super::cache::{TokenCache, Verdict, NEGATIVE_TTL_S};
use super::claims::{self, ClaimRules, Role, VerifiedClaims};
use super::jws::{self, JsonObject};
use super::keys::KeyStore;
use super::{unix_now, AuthError, Authenticated, Authenticator, Refusal, TokenError};
use crate::config::{AuthConfig, BackendUrl, ConfigError};
use crate::scope::DomainId;
use serde_json::Value;
use std::rc::Rc;
use std::time::Duration;

/// Largest answer read from the check service.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How long a grant is remembered when the answer names no `max_age_s`.
pub const DEFAULT_MAX_AGE_S: f64 = 60.0;
/// Most domains one answer may list.
const MAX_DOMAINS: usize = 1024;
/// Longest domain id an answer may list (as `validate_domain_id` allows).
const MAX_DOMAIN_BYTES: usize = 128;

/// Where the check service is and how long it may take.
#[derive(Debug, Clone)]
pub struct CheckService {
    /// Where to connect, the `Host` to send, and (https) the name its certificate carries.
    pub url: BackendUrl,
    /// The path to POST to (`/` when the URL has none).
    pub path: String,
    /// The whole call: connect, TLS, request, answer.
    pub timeout: Duration,
    /// Longest a grant is remembered, whatever the answer asks.
    pub max_age_s: f64,
}

impl CheckService {
    /// The service `config` names, if any; resolves its host (the config was validated
    /// already, so an error here is a name that stopped resolving).
    pub fn from_config(config: &AuthConfig) -> Result<Option<CheckService>, ConfigError> {
        let Some(url) = &config.check_url else {
            return Ok(None);
        };
        let url = crate::config::check_url("auth.check_url", url)?;
        let path = if url.base_path.is_empty() {
            "/".to_string()
        } else {
            url.base_path.clone()
        };
        Ok(Some(CheckService {
            url,
            path,
            timeout: Duration::from_millis(config.check_timeout_ms),
            max_age_s: config.check_max_age_s as f64,
        }))
    }
}

/// The JSON the service gets: the token and what the request asks for. `path` is without
/// its query string (which may carry secrets of its own); `client` is the caller's IP.
pub fn request_body(token: &[u8], method: &str, path: &str, domain: &str, client: &str) -> Vec<u8> {
    serde_json::json!({
        "token": String::from_utf8_lossy(token),
        "method": method,
        "path": path,
        "domain": domain,
        "client": client,
    })
    .to_string()
    .into_bytes()
}

/// What the service said about a token.
#[derive(Debug, PartialEq)]
pub enum CheckVerdict {
    /// Allowed as this identity, remembered for `max_age_s` (already capped).
    Granted {
        claims: VerifiedClaims,
        max_age_s: f64,
    },
    /// 401 or 403: not a credential the service accepts.
    Refused,
}

/// Judges the service's answer (`status`, whole `body`). `Err` says why the service is
/// taken to have failed, in words for the log and the 503.
pub fn read_answer(
    status: u16,
    body: &[u8],
    rules: &ClaimRules,
    max_age_cap_s: f64,
) -> Result<CheckVerdict, String> {
    match status {
        200 => {}
        401 | 403 => return Ok(CheckVerdict::Refused),
        other => return Err(format!("the authentication service answered {other}")),
    }
    let malformed = |why: &str| format!("the authentication service's answer is malformed: {why}");
    if body.len() > MAX_ANSWER_BYTES {
        return Err(malformed("larger than 64 KiB"));
    }
    let answer: JsonObject =
        serde_json::from_slice(body).map_err(|_| malformed("not a JSON object"))?;
    let sub = match answer.get("sub") {
        Some(Value::String(s)) if claims::is_header_safe(s) => s.clone(),
        _ => return Err(malformed("\"sub\" must be 1..=256 printable characters")),
    };
    let domains = match answer.get("domains") {
        None => Vec::new(),
        Some(Value::Array(list)) if list.len() <= MAX_DOMAINS => list
            .iter()
            .map(|d| match d {
                Value::String(s) if !s.is_empty() && s.len() <= MAX_DOMAIN_BYTES => {
                    Some(DomainId::new(s))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("\"domains\" must list domain ids (1..=128 characters)"))?,
        Some(_) => return Err(malformed("\"domains\" must be a list of at most 1024")),
    };
    let role = match answer.get("role") {
        None => Role::User,
        Some(Value::String(r)) => {
            Role::parse(r).ok_or_else(|| malformed("\"role\" must be \"admin\" or \"user\""))?
        }
        Some(_) => return Err(malformed("\"role\" must be \"admin\" or \"user\"")),
    };
    let headers = match answer.get("claims") {
        None => Vec::new(),
        Some(Value::Object(claims)) => claims::mapped_headers(rules, |c| claims.get(c)),
        Some(_) => return Err(malformed("\"claims\" must be an object")),
    };
    let max_age_s = match answer.get("max_age_s") {
        None => DEFAULT_MAX_AGE_S,
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| malformed("\"max_age_s\" must be a number of seconds >= 0"))?,
        Some(_) => return Err(malformed("\"max_age_s\" must be a number of seconds >= 0")),
    };
    Ok(CheckVerdict::Granted {
        claims: VerifiedClaims::of_check(sub, domains, role, headers),
        max_age_s: max_age_s.min(max_age_cap_s),
    })
}

/// Why a check service's answer gave no identity.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckFailure {
    /// It refused the token (401).
    Refused(Refusal),
    /// It is down, slow or answered nonsense (503): why, for the log and the client.
    Unavailable(String),
}

impl Authenticator {
    /// The check service, when `[auth] check_url` is set.
    pub fn check_service(&self) -> Option<&CheckService> {
        self.check.as_ref()
    }

    /// Settles a token [`AuthError::NeedsCheck`] sent to the check service, from its
    /// `answer` (status and body, or why the call failed): a grant is cached for its
    /// `max_age_s`, a refusal like a failed token; a failure is not cached (the next
    /// request asks again).
    pub fn settle_check(
        &self,
        token: &[u8],
        answer: Result<(u16, &[u8]), String>,
        cache: &mut TokenCache,
    ) -> Result<Authenticated, CheckFailure> {
        let max_age_cap_s = self.check.as_ref().map_or(0.0, |c| c.max_age_s);
        let (status, body) = answer.map_err(CheckFailure::Unavailable)?;
        let verdict = read_answer(status, body, &self.rules, max_age_cap_s)
            .map_err(CheckFailure::Unavailable)?;
        let now = unix_now();
        match verdict {
            CheckVerdict::Granted { claims, max_age_s } => {
                let claims = Rc::new(claims);
                if max_age_s > 0.0 {
                    let until = now + max_age_s;
                    let vouched = Verdict::Vouched {
                        claims: claims.clone(),
                        until,
                    };
                    cache.insert(token, vouched);
                }
                Ok(Authenticated {
                    identity: self.identity(claims),
                    from_cache: false,
                })
            }
            CheckVerdict::Refused => {
                let error = TokenError::CheckRefused;
                let until = now + NEGATIVE_TTL_S;
                cache.insert(token, Verdict::Invalid { error, until });
                Err(CheckFailure::Refused(Refusal {
                    error: AuthError::Token(error),
                    from_cache: false,
                }))
            }
        }
    }
}

/// A JWT naming an issuer of the key store: verified here, never sent to the check service
/// (whatever its fate: a bad signature of a trusted issuer is refused, not asked about).
pub(super) fn of_trusted_issuer(token: &[u8], keys: &KeyStore) -> bool {
    jws::parse(token).is_ok_and(|parsed| {
        parsed
            .payload
            .get("iss")
            .and_then(|v| v.as_str())
            .is_some_and(|iss| keys.issuer(iss).is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ClaimRules {
        ClaimRules {
            leeway_s: 30.0,
            namespace: String::new(),
            domains_claim: "domains".into(),
            claim_headers: vec![("email".into(), "X-User-Email".into())],
        }
    }

    fn read(status: u16, body: &str) -> Result<CheckVerdict, String> {
        read_answer(status, body.as_bytes(), &rules(), 300.0)
    }

    #[test]
    fn a_grant_is_the_identity_it_names() {
        let body = r#"{"sub":"alice","domains":["d1","d2"],"role":"admin",
            "claims":{"email":"a@example.com","groups":["x"]},"max_age_s":30}"#;
        let Ok(CheckVerdict::Granted { claims, max_age_s }) = read(200, body) else {
            panic!("granted");
        };
        assert_eq!(claims.sub(), "alice");
        assert_eq!(
            claims.domains(),
            Some(&[DomainId::new("d1"), "d2".into()][..])
        );
        assert_eq!(claims.role(), Role::Admin);
        assert_eq!(claims.issuer(), None, "never one of this box's users");
        assert_eq!(
            claims.headers(),
            [("X-User-Email".to_string(), "a@example.com".to_string())]
        );
        assert_eq!(max_age_s, 30.0);
        // The defaults: a user, no domains, the default age; an age past the cap is capped.
        let Ok(CheckVerdict::Granted { claims, max_age_s }) = read(200, r#"{"sub":"bob"}"#) else {
            panic!("granted");
        };
        assert_eq!(claims.role(), Role::User);
        assert_eq!(claims.domains(), Some(&[][..]));
        assert_eq!(max_age_s, DEFAULT_MAX_AGE_S);
        let capped = read(200, r#"{"sub":"bob","max_age_s":1e300}"#);
        assert!(
            matches!(capped, Ok(CheckVerdict::Granted { max_age_s, .. }) if max_age_s == 300.0)
        );
    }

    #[test]
    fn refusals_and_failures() {
        assert_eq!(read(401, "whatever"), Ok(CheckVerdict::Refused));
        assert_eq!(read(403, ""), Ok(CheckVerdict::Refused));
        for status in [201, 204, 301, 400, 404, 500, 502, 503] {
            let e = read(status, r#"{"sub":"alice"}"#).unwrap_err();
            assert!(e.contains(&status.to_string()), "{e}");
        }
    }

    /// A 200 that is not a well-formed identity is the service failing, never a grant.
    #[test]
    fn hostile_answers_are_failures() {
        let long_sub = format!(r#"{{"sub":"{}"}}"#, "a".repeat(257));
        let many = format!(r#"{{"sub":"a","domains":[{}"d"]}}"#, "\"d\",".repeat(1024));
        let huge = format!(r#"{{"sub":"a","pad":"{}"}}"#, "x".repeat(MAX_ANSWER_BYTES));
        let deep = format!(
            r#"{{"sub":"a","claims":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let long_domain = format!(r#"{{"sub":"a","domains":["{}"]}}"#, "d".repeat(129));
        let cases = [
            "",
            "not json",
            "[]",
            r#""alice""#,
            "{}",
            r#"{"sub":""}"#,
            r#"{"sub":7}"#,
            r#"{"sub":"a\r\nX-Evil: 1"}"#,
            r#"{"sub":"a","sub":"admin"}"#,
            r#"{"sub":"a","domains":"d1"}"#,
            r#"{"sub":"a","domains":[1]}"#,
            r#"{"sub":"a","domains":[""]}"#,
            r#"{"sub":"a","role":"root"}"#,
            r#"{"sub":"a","role":["admin"]}"#,
            r#"{"sub":"a","claims":"email"}"#,
            r#"{"sub":"a","max_age_s":-1}"#,
            r#"{"sub":"a","max_age_s":"60"}"#,
            r#"{"sub":"a"} trailing"#,
            &long_sub,
            &many,
            &huge,
            &deep,
            &long_domain,
        ];
        for body in cases {
            let got = read(200, body);
            assert!(got.is_err(), "{:.80}: {got:?}", body);
        }
        // Unsafe claim values are left out, not forwarded.
        let evil = r#"{"sub":"a","claims":{"email":"a\r\nX-Evil: 1"}}"#;
        let Ok(CheckVerdict::Granted { claims, .. }) = read(200, evil) else {
            panic!("granted");
        };
        assert!(claims.headers().is_empty());
    }

    /// A grant is remembered for its age, a refusal briefly, a failure not at all; API
    /// keys never go to the service.
    #[test]
    fn settled_verdicts_are_cached_as_they_should() {
        let config = AuthConfig {
            check_url: Some("http://127.0.0.1:9/check".into()),
            ..AuthConfig::default()
        };
        let auth = Authenticator::new(&config);
        let keys = KeyStore::default();
        let directory = super::super::directory::Directory::default();
        let mut cache = TokenCache::new(16, Default::default());
        let run = |token: &str, cache: &mut TokenCache| {
            let header = format!("Bearer {token}");
            auth.authenticate(Some(header.as_bytes()), &keys, &directory, 0, cache)
        };
        assert_eq!(
            run("opaque-1", &mut cache).unwrap_err().error,
            AuthError::NeedsCheck
        );
        let grant = br#"{"sub":"alice","domains":["d1"]}"#;
        let granted = auth.settle_check(b"opaque-1", Ok((200, grant)), &mut cache);
        assert_eq!(granted.unwrap().identity.user_id(), "alice");
        let again = run("opaque-1", &mut cache).unwrap();
        assert!(again.from_cache);
        assert_eq!(again.identity.user_id(), "alice");

        let refused = auth.settle_check(b"opaque-2", Ok((403, b"")), &mut cache);
        assert!(matches!(refused, Err(CheckFailure::Refused(_))));
        let cached = run("opaque-2", &mut cache).unwrap_err();
        assert_eq!(cached.error, AuthError::Token(TokenError::CheckRefused));
        assert!(cached.from_cache);

        let down = auth.settle_check(b"opaque-3", Err("down".into()), &mut cache);
        assert!(matches!(down, Err(CheckFailure::Unavailable(_))));
        let garbage = auth.settle_check(b"opaque-3", Ok((200, b"{")), &mut cache);
        assert!(matches!(garbage, Err(CheckFailure::Unavailable(_))));
        let unseen = br#"{"sub":"bob","max_age_s":0}"#;
        assert!(auth
            .settle_check(b"opaque-4", Ok((200, unseen)), &mut cache)
            .is_ok());
        for token in ["opaque-3", "opaque-4"] {
            let next = run(token, &mut cache).unwrap_err().error;
            assert_eq!(next, AuthError::NeedsCheck, "{token} asks again");
        }
        let key = run("cg_unknown", &mut cache).unwrap_err().error;
        assert_eq!(key, AuthError::Token(TokenError::UnknownApiKey));
    }

    #[test]
    fn the_request_names_the_token_and_the_request() {
        let body = request_body(b"opaque-123", "POST", "/proxy/d1/v1/chat", "d1", "10.0.0.7");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"token":"opaque-123","method":"POST",
                "path":"/proxy/d1/v1/chat","domain":"d1","client":"10.0.0.7"})
        );
    }
}
