//! Authentication and authorization: the seam between parsing a request and routing it.
//!
//! [`Authenticator::authenticate`] turns the `Authorization` header into an [`Identity`]:
//! the per-worker [`cache::TokenCache`] answers tokens seen before; a new token is parsed
//! and verified with `ring` ([`jws`]) against the keys of its issuer ([`keys::KeyStore`]),
//! its claims checked ([`claims`]), and the verdict cached, good or bad; an API key is
//! looked up in the management plane's [`directory::Directory`]. Either way the caller
//! learns whether the verdict came from the cache. [`authorize`] then decides whether that
//! identity may use an endpoint of a domain. The data plane calls exactly these two, in
//! that order, before anything reaches a backend.
//!
//! This module is a leaf: it returns its own errors ([`AuthError`] in a [`Refusal`],
//! [`Denied`]), which the data plane maps to answers; it builds its key store from the
//! configuration itself ([`keys::KeyStore::from_config`]); and it knows domains and
//! endpoints only by the shared names in `crate::scope`. So it can be tested and fuzzed on
//! its own.
//!
//! With `[auth] check_url`, a token that is neither an API key nor a JWT of a trusted
//! issuer is refused with [`AuthError::NeedsCheck`]: the data plane then asks the check
//! service (an async call this leaf does not make) and hands the answer to
//! [`Authenticator::settle_check`], which judges it ([`check`]) and caches the verdict.
//!
//! `auth.mode = "none"` (development) makes every caller an anonymous platform admin, and
//! says so loudly at startup.

mod authorize;
pub mod cache;
pub mod check;
pub mod claims;
pub mod directory;
pub mod jwks_fetch;
pub mod jws;
pub mod keys;

pub use authorize::{authorize, Denied};

use crate::config::{AuthConfig, AuthMode};
use cache::{TokenCache, Verdict, NEGATIVE_TTL_S};
pub use check::CheckFailure;
use check::{of_trusted_issuer, CheckService};
use claims::{ClaimRules, Role, VerifiedClaims};
use directory::Directory;
use keys::KeyStore;
use std::fmt;
use std::rc::Rc;

/// Why a bearer token was refused. The text goes into `WWW-Authenticate` and the error
/// body: it names the failed check, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed(&'static str),
    TooLarge,
    UnsupportedAlg,
    AlgNotAllowed,
    UnknownIssuer,
    UnknownKey,
    /// The key with the token's `kid` is past its expiry.
    KeyExpired,
    BadSignature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
    MissingExp,
    MissingSub,
    WrongType,
    UnknownApiKey,
    Disabled,
    /// The check service (`[auth] check_url`) answered 401 or 403.
    CheckRefused,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "malformed token: {why}"),
            TokenError::TooLarge => f.write_str("token too large"),
            TokenError::UnsupportedAlg => {
                f.write_str("unsupported or forbidden signature algorithm")
            }
            TokenError::AlgNotAllowed => {
                f.write_str("the token's algorithm is not the one its key is for")
            }
            TokenError::UnknownIssuer => f.write_str("token from an issuer that is not trusted"),
            TokenError::UnknownKey => f.write_str("token signed with an unknown key (kid)"),
            TokenError::KeyExpired => {
                f.write_str("token signed with a key that has expired (its JWK exp or certificate)")
            }
            TokenError::BadSignature => f.write_str("bad token signature"),
            TokenError::Expired => f.write_str("token expired"),
            TokenError::NotYetValid => f.write_str("token not valid yet (nbf)"),
            TokenError::IssuedInFuture => f.write_str("token issued in the future (iat)"),
            TokenError::WrongIssuer => f.write_str("token has no valid issuer (iss)"),
            TokenError::WrongAudience => f.write_str("token is not meant for this service (aud)"),
            TokenError::MissingExp => f.write_str("token has no expiry (exp)"),
            TokenError::MissingSub => f.write_str("token has no subject (sub)"),
            TokenError::WrongType => {
                f.write_str("a refresh token cannot be used as a bearer token")
            }
            TokenError::UnknownApiKey => f.write_str("unknown or revoked API key"),
            TokenError::Disabled => f.write_str("the user of this token is disabled"),
            TokenError::CheckRefused => {
                f.write_str("the authentication service (auth.check_url) refused this token")
            }
        }
    }
}

/// Why a request is unauthenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    NotBearer,
    Token(TokenError),
    /// Neither an API key nor a JWT of a trusted issuer, and a check service is configured:
    /// the data plane asks it (a caller that cannot ask refuses the token).
    NeedsCheck,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => {
                f.write_str("missing bearer token: send Authorization: Bearer <token>")
            }
            AuthError::NotBearer => {
                f.write_str("the Authorization header must be \"Bearer <token>\"")
            }
            AuthError::Token(e) => write!(f, "{e}"),
            AuthError::NeedsCheck => f.write_str(
                "this token is neither an API key nor a token of a trusted issuer, and the authentication service cannot be asked here",
            ),
        }
    }
}

/// A refused credential, and whether the verdict came from the token cache (a fresh
/// verdict on an unknown `kid` is worth a JWKS refresh; a cached one was waited for once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub error: AuthError,
    pub from_cache: bool,
}

/// An accepted credential, and whether the verdict came from the token cache.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub identity: Identity,
    pub from_cache: bool,
}

/// Who is calling, as far as the data plane needs to know.
#[derive(Debug, Clone)]
pub enum Identity {
    /// `auth.mode = "none"`, no credential.
    Development,
    /// `auth.mode = "none"` with a credential that verified: its identity goes upstream
    /// and into the records, while domain and admin checks stay off as in development.
    DevelopmentAs(Rc<VerifiedClaims>),
    Token(Rc<VerifiedClaims>),
}

impl Identity {
    /// The API key the request came with, if it came with one.
    pub fn api_key_id(&self) -> Option<&str> {
        match self {
            Identity::Development => None,
            Identity::Token(c) | Identity::DevelopmentAs(c) => c.api_key(),
        }
    }

    /// Sent upstream as `X-User-Id`.
    pub fn user_id(&self) -> &str {
        match self {
            Identity::Development => "anonymous",
            Identity::Token(c) | Identity::DevelopmentAs(c) => c.sub(),
        }
    }

    pub fn platform_admin(&self) -> bool {
        match self {
            Identity::Development | Identity::DevelopmentAs(_) => true,
            Identity::Token(c) => c.role() == Role::Admin,
        }
    }
}

pub struct Authenticator {
    mode: AuthMode,
    rules: ClaimRules,
    /// `[auth] check_url`: where tokens this box cannot verify are checked.
    check: Option<CheckService>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Authenticator {
        // The config was validated at load; a check_url that fails now (its name stopped
        // resolving) leaves custom authentication off: those tokens are refused, not let in.
        let check = CheckService::from_config(config).unwrap_or_else(|e| {
            tracing::error!("custom authentication is off: {e}");
            None
        });
        Authenticator {
            mode: config.mode,
            check,
            rules: ClaimRules {
                leeway_s: config.leeway_s as f64,
                namespace: config.claims_namespace.clone(),
                domains_claim: config.domains_claim.clone(),
                claim_headers: config
                    .claim_headers
                    .iter()
                    .map(|(c, h)| (c.clone(), h.clone()))
                    .collect(),
            },
        }
    }

    /// Phase `authenticate`: checks the bearer credential (`authorization` is the raw
    /// header value, if any), from the cache when it can. Tokens are verified with `keys`,
    /// API keys looked up in `directory`; the cache is emptied when the key generation or
    /// `revocation_epoch` moved since its entries were made.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        keys: &KeyStore,
        directory: &Directory,
        revocation_epoch: u64,
        cache: &mut TokenCache,
    ) -> Result<Authenticated, Refusal> {
        // Development mode: no credential is needed, but a token or API key that is sent
        // is checked as in production (what a client tests here is what production does).
        // Anything else (an SDK's placeholder `api_key="unused"`) counts as none.
        // With a check service, any bearer value may be a credential it knows.
        let credential = |a: &[u8]| match self.check {
            Some(_) => bearer_credential(a).is_some(),
            None => looks_like_a_credential(a),
        };
        if self.mode == AuthMode::None && !authorization.is_some_and(credential) {
            return Ok(Authenticated {
                identity: Identity::Development,
                from_cache: false,
            });
        }
        let fresh = |error| Refusal {
            error,
            from_cache: false,
        };
        let value = authorization.ok_or(fresh(AuthError::Missing))?;
        let token = bearer_credential(value).ok_or(fresh(AuthError::NotBearer))?;
        let now = unix_now();
        cache.sync_epoch((keys.generation, revocation_epoch));
        if let Some(verdict) = cache.get(token, now) {
            let cached = |e| Refusal {
                error: AuthError::Token(e),
                from_cache: true,
            };
            return match verdict {
                Verdict::Valid(claims) => {
                    claims::still_valid(claims, self.rules.leeway_s, now).map_err(cached)?;
                    Ok(Authenticated {
                        identity: self.identity(claims.clone()),
                        from_cache: true,
                    })
                }
                Verdict::Vouched { claims, .. } => Ok(Authenticated {
                    identity: self.identity(claims.clone()),
                    from_cache: true,
                }),
                Verdict::Invalid { error, .. } => Err(cached(*error)),
            };
        }
        // Only tokens that passed this check are ever cached, so a hit needs no re-check.
        if !is_token68(token) {
            return Err(fresh(AuthError::NotBearer));
        }
        if self.check.is_some()
            && !token.starts_with(API_KEY_PREFIX)
            && !of_trusted_issuer(token, keys)
        {
            return Err(fresh(AuthError::NeedsCheck));
        }
        let metrics = &cache.metrics;
        metrics.token_verifications.inc();
        let verdict = if token.starts_with(API_KEY_PREFIX) {
            metrics.api_key_checks.inc();
            api_key_claims(token, keys, directory, now)
        } else {
            let count = |alg: jws::Alg| {
                if let Some(i) = jws::Alg::ALL.iter().position(|a| *a == alg) {
                    metrics.signatures[i].inc();
                }
            };
            verify_token_counted(token, keys, &self.rules, now, &count)
        };
        match verdict {
            Ok(claims) => {
                let claims = Rc::new(claims);
                cache.insert(token, Verdict::Valid(claims.clone()));
                Ok(Authenticated {
                    identity: self.identity(claims),
                    from_cache: false,
                })
            }
            Err(error) => {
                let until = now + NEGATIVE_TTL_S;
                cache.insert(token, Verdict::Invalid { error, until });
                Err(fresh(AuthError::Token(error)))
            }
        }
    }
}

/// A bearer value shaped like a token of ours (a compact JWS) or an API key.
fn looks_like_a_credential(authorization: &[u8]) -> bool {
    bearer_credential(authorization).is_some_and(|t| {
        t.starts_with(API_KEY_PREFIX) || t.iter().filter(|&&b| b == b'.').count() == 2
    })
}

impl Authenticator {
    /// The identity verified claims make in this mode.
    fn identity(&self, claims: Rc<VerifiedClaims>) -> Identity {
        match self.mode {
            AuthMode::None => Identity::DevelopmentAs(claims),
            _ => Identity::Token(claims),
        }
    }
}

/// What every API key starts with.
pub const API_KEY_PREFIX: &[u8] = b"cg_";

/// An API key of the management plane: looked up by its SHA-256 (only digests are
/// stored); it acts for the user who made it, in its one domain.
fn api_key_claims(
    token: &[u8],
    keys: &KeyStore,
    directory: &Directory,
    now: f64,
) -> Result<VerifiedClaims, TokenError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let key = directory
        .api_key(digest.as_ref())
        .ok_or(TokenError::UnknownApiKey)?;
    if key.expires_at.is_some_and(|e| now > e as f64) {
        return Err(TokenError::Expired);
    }
    let own = keys.issuers.iter().position(|i| i.own).unwrap_or(0);
    Ok(VerifiedClaims::of_api_key(key, own))
}

/// The JWKS URL of the issuer a bearer token names (`authorization` is the raw header
/// value), when its keys are fetched: where to look for a `kid` this box does not know.
pub fn jwks_url_of<'k>(authorization: &[u8], keys: &'k KeyStore) -> Option<&'k str> {
    let token = bearer_credential(authorization)?;
    let parsed = jws::parse(token).ok()?;
    let iss = parsed.payload.get("iss")?.as_str()?;
    keys.issuer(iss)?.1.jwks_url.as_deref()
}

/// Parses and verifies a token against the key store, then validates its claims.
pub fn verify_token(
    token: &[u8],
    keys: &KeyStore,
    rules: &ClaimRules,
    now: f64,
) -> Result<VerifiedClaims, TokenError> {
    verify_token_counted(token, keys, rules, now, &|_| {})
}

/// `verify_token`, calling `on_signature` for every signature it checks.
pub fn verify_token_counted(
    token: &[u8],
    keys: &KeyStore,
    rules: &ClaimRules,
    now: f64,
    on_signature: &dyn Fn(jws::Alg),
) -> Result<VerifiedClaims, TokenError> {
    if token.starts_with(API_KEY_PREFIX) {
        // API keys are checked against the directory's digests, not here.
        return Err(TokenError::UnknownApiKey);
    }
    let parsed = jws::parse(token)?;
    let iss = parsed
        .payload
        .get("iss")
        .and_then(|v| v.as_str())
        .ok_or(TokenError::WrongIssuer)?;
    let (index, issuer) = keys.issuer(iss).ok_or(TokenError::UnknownIssuer)?;
    let mut outcome = Err(TokenError::UnknownKey);
    for key in issuer.candidates(parsed.kid.as_deref()) {
        if key.expired(now) {
            if outcome == Err(TokenError::UnknownKey) {
                outcome = Err(TokenError::KeyExpired);
            }
            continue;
        }
        on_signature(parsed.alg);
        match key.verify(parsed.alg, parsed.signing_input, &parsed.signature) {
            Ok(()) => {
                outcome = Ok(());
                break;
            }
            // A key that allowed the algorithm but did not match says more than one that
            // did not allow it.
            Err(e) if outcome != Err(TokenError::BadSignature) => outcome = Err(e),
            Err(_) => {}
        }
    }
    outcome?;
    claims::validate(
        &parsed.payload,
        index,
        issuer,
        issuer.require_exp,
        rules,
        now,
    )
}

/// The token of a `Bearer` credential (scheme case-insensitive, RFC 6750 token68 charset).
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    bearer_credential(value).filter(|t| is_token68(t))
}

/// The credential after `Bearer `, not yet checked for its charset.
fn bearer_credential(value: &[u8]) -> Option<&[u8]> {
    if value.len() < 8 || !value[..7].eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(value[7..].trim_ascii()).filter(|t| !t.is_empty())
}

const TOKEN68: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=');
        b += 1;
    }
    table
};

fn is_token68(token: &[u8]) -> bool {
    token.iter().all(|&b| TOKEN68[b as usize])
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(b"Bearer abc.def"), Some(&b"abc.def"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
    }

    /// Says whether each verdict, good or bad, came from the cache; a new revocation epoch
    /// makes the next one fresh again.
    #[test]
    fn verdicts_say_whether_they_were_cached() {
        let auth = Authenticator::new(&AuthConfig::default());
        let keys = KeyStore::default();
        let mut directory = Directory::default();
        let key = b"cg_live";
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        directory.add_api_key(
            digest.as_ref().to_vec(),
            directory::ApiKey {
                id: "k1".into(),
                domain: "d1".into(),
                user: "u1".into(),
                expires_at: None,
            },
        );
        let mut cache = TokenCache::new(16, Default::default());
        let mut run = |header: &[u8], epoch| {
            auth.authenticate(Some(header), &keys, &directory, epoch, &mut cache)
        };
        let first = run(b"Bearer cg_live", 0).unwrap();
        assert!(!first.from_cache);
        assert_eq!(first.identity.user_id(), "u1");
        assert_eq!(first.identity.api_key_id(), Some("k1"));
        assert!(!first.identity.platform_admin());
        assert!(run(b"Bearer cg_live", 0).unwrap().from_cache);
        let unknown = AuthError::Token(TokenError::UnknownApiKey);
        let refused = |from_cache| Refusal {
            error: unknown,
            from_cache,
        };
        assert_eq!(run(b"Bearer cg_gone", 0).unwrap_err(), refused(false));
        assert_eq!(run(b"Bearer cg_gone", 0).unwrap_err(), refused(true));
        assert_eq!(run(b"Bearer cg_gone", 1).unwrap_err(), refused(false));
        assert!(!run(b"Bearer cg_live", 1).unwrap().from_cache);
        assert_eq!(
            run(b"Basic x", 1).unwrap_err(),
            Refusal {
                error: AuthError::NotBearer,
                from_cache: false
            }
        );
        let missing = auth.authenticate(None, &keys, &directory, 1, &mut cache);
        assert_eq!(missing.unwrap_err().error, AuthError::Missing);
    }
}
