//! Authentication and authorization: the seam between parsing a request and routing it.
//!
//! `authenticate` turns the `Authorization` header into an [`Identity`]: the per-worker
//! [`cache::TokenCache`] answers tokens seen before; a new token is parsed and verified with
//! `ring` ([`jws`]) against the keys of its issuer ([`keys`], held in the snapshot), its
//! claims checked ([`claims`]), and the verdict cached, good or bad. `authorize` then decides
//! whether that identity may use a domain's endpoint. The data plane calls exactly these
//! two, in that order, before anything reaches a backend.
//!
//! `auth.mode = "none"` (development) makes every caller an anonymous platform admin, and
//! says so loudly at startup.

pub mod cache;
pub mod claims;
pub mod jwks_fetch;
pub mod jws;
pub mod keys;

use crate::config::{AuthConfig, AuthMode, Config, ConfigError};
use crate::proxy::error::GatewayError;
use crate::scope::Endpoint;
use crate::snapshot::{Domain, Snapshot};
use cache::{TokenCache, Verdict, NEGATIVE_TTL_S};
use claims::{ClaimRules, VerifiedClaims};
use jws::{Alg, AlgSet, VerifyingKey};
use keys::{IssuerKeys, KeyStore};
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
        }
    }
}

/// Why a request is unauthenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    NotBearer,
    Token(TokenError),
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
        }
    }
}

/// Who is calling, as far as the data plane needs to know.
#[derive(Debug, Clone)]
pub enum Identity {
    /// `auth.mode = "none"`.
    Development,
    Token(Rc<VerifiedClaims>),
}

impl Identity {
    /// Sent upstream as `X-User-Id`.
    /// The API key the request came with, if it came with one.
    pub fn api_key_id(&self) -> Option<&str> {
        match self {
            Identity::Development => None,
            Identity::Token(c) => c.api_key.as_deref(),
        }
    }

    pub fn user_id(&self) -> &str {
        match self {
            Identity::Development => "anonymous",
            Identity::Token(c) => &c.sub,
        }
    }

    pub fn platform_admin(&self) -> bool {
        match self {
            Identity::Development => true,
            Identity::Token(c) => c.admin,
        }
    }
}

pub struct Authenticator {
    mode: AuthMode,
    rules: ClaimRules,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Authenticator {
        Authenticator {
            mode: config.mode,
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
    /// header value, if any), from the cache when it can.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        snapshot: &Snapshot,
        cache: &mut TokenCache,
    ) -> Result<Identity, GatewayError> {
        if self.mode == AuthMode::None {
            return Ok(Identity::Development);
        }
        let value = authorization.ok_or(GatewayError::Unauthorized(AuthError::Missing))?;
        let not_bearer = || GatewayError::Unauthorized(AuthError::NotBearer);
        let token = bearer_credential(value).ok_or_else(not_bearer)?;
        let now = unix_now();
        cache.sync_epoch((snapshot.keys.generation, snapshot.revocation_epoch));
        let refused = |e| GatewayError::Unauthorized(AuthError::Token(e));
        if let Some(verdict) = cache.get(token, now) {
            return match verdict {
                Verdict::Valid(claims) => {
                    claims::still_valid(claims, self.rules.leeway_s, now).map_err(refused)?;
                    Ok(Identity::Token(claims.clone()))
                }
                Verdict::Invalid { error, .. } => Err(refused(*error)),
            };
        }
        // Only tokens that passed this check are ever cached, so a hit needs no re-check.
        if !is_token68(token) {
            return Err(not_bearer());
        }
        let metrics = &cache.metrics;
        metrics.token_verifications.inc();
        let verdict = if token.starts_with(API_KEY_PREFIX) {
            metrics.api_key_checks.inc();
            api_key_claims(token, snapshot, now)
        } else {
            let count = |alg: jws::Alg| {
                if let Some(i) = jws::Alg::ALL.iter().position(|a| *a == alg) {
                    metrics.signatures[i].inc();
                }
            };
            verify_token_counted(token, &snapshot.keys, &self.rules, now, &count)
        };
        match verdict {
            Ok(claims) => {
                let claims = Rc::new(claims);
                cache.insert(token, Verdict::Valid(claims.clone()));
                Ok(Identity::Token(claims))
            }
            Err(error) => {
                let until = now + NEGATIVE_TTL_S;
                cache.insert(token, Verdict::Invalid { error, until });
                Err(refused(error))
            }
        }
    }

    /// Phase `authorize`: may `who` use `endpoint` of `domain`? A platform admin may do
    /// anything; otherwise the user must be a member of the domain (management plane) or
    /// the token's domains claim must list it, and admin endpoints need the domain's admin
    /// role.
    pub fn authorize(
        &self,
        who: &Identity,
        domain: &Domain,
        endpoint: Endpoint,
        snapshot: &Snapshot,
    ) -> Result<(), GatewayError> {
        let Identity::Token(claims) = who else {
            return Ok(());
        };
        if snapshot
            .keys
            .issuers
            .get(claims.issuer)
            .is_some_and(|i| i.own)
            && snapshot.members.disabled.contains(&claims.sub)
        {
            return Err(GatewayError::Unauthorized(AuthError::Token(
                TokenError::Disabled,
            )));
        }
        if who.platform_admin() {
            return Ok(());
        }
        // Memberships belong to this box's users: only its own tokens and API keys use them
        // (an outside issuer's `sub` is another namespace of ids).
        let own = snapshot
            .keys
            .issuers
            .get(claims.issuer)
            .is_some_and(|i| i.own);
        let membership = own
            .then(|| snapshot.members.role(domain.id.as_str(), &claims.sub))
            .flatten();
        let listed = claims
            .domains
            .as_ref()
            .is_some_and(|d| d.iter().any(|id| id == domain.id.as_str()));
        if membership.is_none() && !listed {
            return Err(GatewayError::Forbidden(format!(
                "this token may not use domain {:?}",
                domain.id
            )));
        }
        if endpoint.is_admin() && membership != Some(true) {
            return Err(GatewayError::Forbidden(
                "only domain admins may pull, push, create, copy or delete models, or use endpoints cubegate does not know".into(),
            ));
        }
        Ok(())
    }
}

/// What every API key starts with.
pub const API_KEY_PREFIX: &[u8] = b"cg_";

/// An API key of the management plane: looked up by its SHA-256 (only digests are
/// stored); it acts for the user who made it, in its one domain.
fn api_key_claims(
    token: &[u8],
    snapshot: &Snapshot,
    now: f64,
) -> Result<VerifiedClaims, TokenError> {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let key = snapshot
        .members
        .api_keys
        .get(digest.as_ref())
        .ok_or(TokenError::UnknownApiKey)?;
    let exp = key.expires_at.map(|e| e as f64);
    if exp.is_some_and(|e| now > e) {
        return Err(TokenError::Expired);
    }
    let own = snapshot
        .keys
        .issuers
        .iter()
        .position(|i| i.own)
        .unwrap_or(0);
    Ok(VerifiedClaims {
        sub: key.user.clone(),
        issuer: own,
        exp,
        nbf: None,
        domains: Some(vec![key.domain.clone()]),
        admin: false,
        exact_exp: true,
        headers: Vec::new(),
        api_key: Some(key.id.clone()),
    })
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
        // API keys are checked against the snapshot's digests, not here.
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

/// Builds the key store from the configuration: HS secrets from the environment and
/// inline JWKS now; JWKS URLs start empty and are filled by the fetcher.
pub fn build_key_store(config: &Config, generation: u64) -> Result<KeyStore, ConfigError> {
    // This box's own issuer comes first; its keys arrive from the management plane.
    let mut issuers = vec![IssuerKeys {
        issuer: config.auth.issuer.clone(),
        audiences: Vec::new(),
        keys: Vec::new(),
        jwks_url: None,
        require_exp: true,
        own: true,
    }];
    for (i, t) in config.auth.trusted.iter().enumerate() {
        let key = |k: &str| format!("auth.trusted[{i}].{k}");
        let err = |k: &str, p: String| ConfigError {
            key: key(k),
            problem: p,
        };
        let mut keys: Vec<VerifyingKey> = Vec::new();
        if let Some(var) = &t.hs_secret_env {
            let secret = std::env::var(var).map_err(|_| {
                err(
                    "hs_secret_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            if secret.len() < 32 {
                return Err(err(
                    "hs_secret_env",
                    format!("the secret in {var} is shorter than 32 bytes: too weak for HMAC"),
                ));
            }
            keys.push(VerifyingKey::hmac(
                None,
                secret.as_bytes(),
                AlgSet::of(&[Alg::HS256, Alg::HS384, Alg::HS512]),
            ));
        }
        if let Some(jwks) = &t.jwks {
            let (parsed, skipped) =
                keys::parse_jwks(jwks.as_bytes()).map_err(|e| err("jwks", e))?;
            if parsed.is_empty() {
                return Err(err(
                    "jwks",
                    format!("no usable key ({})", skipped.join("; ")),
                ));
            }
            keys.extend(parsed);
        }
        issuers.push(IssuerKeys {
            issuer: t.issuer.clone(),
            audiences: t.audiences.clone(),
            keys,
            jwks_url: t.jwks_url.clone(),
            require_exp: t.require_exp,
            own: false,
        });
    }
    Ok(KeyStore {
        issuers,
        generation,
    })
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
}
