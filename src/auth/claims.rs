//! Claims validation: from a verified payload to the [`VerifiedClaims`] the data plane uses.
//!
//! Time checks use the configured leeway; `exp` is required unless the issuer is configured
//! otherwise; `aud` is checked when the issuer lists audiences; `sub` must be a short
//! printable string, since it travels upstream as the `X-User-Id` header. Custom claims
//! (`domains`, `role`) are read under the configured namespace, the way auth platforms emit
//! them (`https://example.com/domains`).
//!
//! `VerifiedClaims` has private fields and no public constructor: only [`validate`] (after
//! the signature check) and the API-key lookup in `auth` make one, so holding one proves
//! the credential was checked. The platform role is a [`Role`], never a string.

use super::directory::ApiKey;
use super::jws::JsonObject;
use super::keys::IssuerKeys;
use super::TokenError;
use crate::scope::DomainId;
use serde_json::Value;
use std::fmt;

/// A user's role on the whole platform (the `role` claim of this box's tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May do anything, in every domain.
    Admin,
    User,
}

impl Role {
    /// The name tokens, the management API and the store use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a valid credential says, as far as the data plane needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedClaims {
    sub: String,
    /// Index of the issuer in the key store it was verified with; `None`: vouched for by
    /// the check service (`[auth] check_url`), no issuer of the key store.
    issuer: Option<usize>,
    exp: Option<f64>,
    nbf: Option<f64>,
    /// The domain ids the token lists (`None`: the claim is absent).
    domains: Option<Vec<DomainId>>,
    /// `role` = "admin": a platform admin; anything else (or none): a user.
    role: Role,
    /// Expiry without leeway (API keys: no clock of another party is involved).
    exact_exp: bool,
    /// (header, value) for `[auth] claim_headers`: sent upstream with each request.
    headers: Vec<(String, String)>,
    /// The id of the API key this came from (for the access record); `None` for tokens.
    api_key: Option<String>,
}

impl VerifiedClaims {
    /// What an API key grants: its creator, in its one domain, as a user (never an admin),
    /// until its expiry exactly. `issuer` is this box's issuer in the key store.
    pub(super) fn of_api_key(key: &ApiKey, issuer: usize) -> VerifiedClaims {
        VerifiedClaims {
            sub: key.user.clone(),
            issuer: Some(issuer),
            exp: key.expires_at.map(|e| e as f64),
            nbf: None,
            domains: Some(vec![key.domain.clone()]),
            role: Role::User,
            exact_exp: true,
            headers: Vec::new(),
            api_key: Some(key.id.clone()),
        }
    }

    /// What the check service vouched for ([`super::check`]): no issuer of the key store,
    /// so never one of this box's users; no expiry of its own (its cache entry's age, the
    /// answer's `max_age_s`, bounds it).
    pub(super) fn of_check(
        sub: String,
        domains: Vec<DomainId>,
        role: Role,
        headers: Vec<(String, String)>,
    ) -> VerifiedClaims {
        VerifiedClaims {
            sub,
            issuer: None,
            exp: None,
            nbf: None,
            domains: Some(domains),
            role,
            exact_exp: true,
            headers,
            api_key: None,
        }
    }

    /// The subject: the user id (`X-User-Id` upstream).
    pub fn sub(&self) -> &str {
        &self.sub
    }

    /// Index of the issuer in the key store the claims were verified with (`None`: the
    /// check service vouched for them).
    pub fn issuer(&self) -> Option<usize> {
        self.issuer
    }

    pub fn exp(&self) -> Option<f64> {
        self.exp
    }

    /// The domain ids the token lists (`None`: the claim is absent).
    pub fn domains(&self) -> Option<&[DomainId]> {
        self.domains.as_deref()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// (header, value) pairs of `[auth] claim_headers`, for the backend.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The id of the API key the credential was, if it was one.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }
}

/// Validation settings shared by every issuer.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    pub leeway_s: f64,
    pub namespace: String,
    pub domains_claim: String,
    /// (claim name, upstream header): claims passed to backends as headers.
    pub claim_headers: Vec<(String, String)>,
}

impl ClaimRules {
    /// A custom claim (`domains`, `role`). This box's own tokens use plain names; an outside
    /// issuer's are read under `claims_namespace` only, when one is set, so a plain `role`
    /// from another identity provider never makes anyone an admin here.
    fn custom<'a>(&self, payload: &'a JsonObject, name: &str, own: bool) -> Option<&'a Value> {
        if own || self.namespace.is_empty() {
            payload.get(name)
        } else {
            payload.get(&format!("{}{name}", self.namespace))
        }
    }
}

/// Checks the claims of a payload whose signature `issuer`'s key verified; the only way,
/// besides an API key, to a [`VerifiedClaims`].
pub fn validate(
    payload: &JsonObject,
    issuer_index: usize,
    issuer: &IssuerKeys,
    require_exp: bool,
    rules: &ClaimRules,
    now: f64,
) -> Result<VerifiedClaims, TokenError> {
    match payload.get("iss") {
        Some(Value::String(s)) if *s == issuer.issuer => {}
        _ => return Err(TokenError::WrongIssuer),
    }
    let exp = numeric(payload, "exp")?;
    let nbf = numeric(payload, "nbf")?;
    let iat = numeric(payload, "iat")?;
    match exp {
        None if require_exp => return Err(TokenError::MissingExp),
        Some(e) if now > e + rules.leeway_s => return Err(TokenError::Expired),
        _ => {}
    }
    if nbf.is_some_and(|n| now + rules.leeway_s < n) {
        return Err(TokenError::NotYetValid);
    }
    if iat.is_some_and(|i| now + rules.leeway_s < i) {
        return Err(TokenError::IssuedInFuture);
    }
    if !issuer.audiences.is_empty() {
        let listed = |a: &str| issuer.audiences.iter().any(|want| want == a);
        let ok = match payload.get("aud") {
            Some(Value::String(a)) => listed(a),
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str().is_some_and(listed)),
            _ => false,
        };
        if !ok {
            return Err(TokenError::WrongAudience);
        }
    }
    let sub = match payload.get("sub") {
        Some(Value::String(s)) if is_header_safe(s) => s.clone(),
        Some(_) => {
            return Err(TokenError::Malformed(
                "\"sub\" must be 1..=256 printable characters",
            ))
        }
        None => return Err(TokenError::MissingSub),
    };
    if payload.get("type").and_then(Value::as_str) == Some("refresh") {
        return Err(TokenError::WrongType);
    }
    let domains = match rules.custom(payload, &rules.domains_claim, issuer.own) {
        None => None,
        Some(Value::String(d)) => Some(vec![DomainId::new(d)]),
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|d| d.as_str().map(DomainId::new))
                .collect::<Option<Vec<_>>>()
                .ok_or(TokenError::Malformed("the domains claim must list strings"))?,
        ),
        Some(_) => return Err(TokenError::Malformed("the domains claim must list strings")),
    };
    let role = rules
        .custom(payload, "role", issuer.own)
        .and_then(Value::as_str)
        .and_then(Role::parse)
        .unwrap_or(Role::User);
    let headers = mapped_headers(rules, |claim| payload.get(claim));
    Ok(VerifiedClaims {
        sub,
        issuer: Some(issuer_index),
        exp,
        nbf,
        domains,
        role,
        exact_exp: false,
        headers,
        api_key: None,
    })
}

/// `[auth] claim_headers` of the claims `lookup` finds: only values that can travel as a
/// header value unchanged (a plain printable string, number or boolean, at most 1 KiB).
pub(super) fn mapped_headers<'a>(
    rules: &ClaimRules,
    lookup: impl Fn(&str) -> Option<&'a Value>,
) -> Vec<(String, String)> {
    rules
        .claim_headers
        .iter()
        .filter_map(|(claim, header)| {
            let value = match lookup(claim)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            let safe = value.len() <= 1024 && value.bytes().all(|b| (0x20..0x7f).contains(&b));
            safe.then(|| (header.clone(), value))
        })
        .collect()
}

/// Re-checks the time claims of a cached verdict.
pub fn still_valid(c: &VerifiedClaims, leeway_s: f64, now: f64) -> Result<(), TokenError> {
    let leeway_s = if c.exact_exp { 0.0 } else { leeway_s };
    if c.exp.is_some_and(|e| now > e + leeway_s) {
        return Err(TokenError::Expired);
    }
    if c.nbf.is_some_and(|n| now + leeway_s < n) {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

fn numeric(payload: &JsonObject, name: &'static str) -> Result<Option<f64>, TokenError> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .map(Some)
            .ok_or(TokenError::Malformed("a time claim is not a finite number")),
        Some(_) => Err(TokenError::Malformed(
            "a time claim (exp, nbf, iat) is not a number",
        )),
    }
}

/// A `sub` that can travel as the `X-User-Id` header: 1..=256 printable characters.
pub(super) fn is_header_safe(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(aud: &[&str]) -> IssuerKeys {
        IssuerKeys {
            issuer: "https://idp/".into(),
            audiences: aud.iter().map(|s| s.to_string()).collect(),
            keys: Vec::new(),
            jwks_url: None,
            require_exp: true,
            own: false,
        }
    }

    fn rules() -> ClaimRules {
        ClaimRules {
            leeway_s: 30.0,
            namespace: "https://cube/".into(),
            domains_claim: "domains".into(),
            claim_headers: vec![("email".into(), "X-User-Email".into())],
        }
    }

    fn obj(v: serde_json::Value) -> JsonObject {
        JsonObject(v.as_object().unwrap().clone().into_iter().collect())
    }

    #[test]
    fn verdicts() {
        let now = 1_000_000.0;
        let ok = serde_json::json!({"iss":"https://idp/","sub":"u1","exp":now+60.0,"aud":["x","cubegate"],"https://cube/domains":["d1"],"https://cube/role":"admin"});
        let c = validate(
            &obj(ok.clone()),
            0,
            &issuer(&["cubegate"]),
            true,
            &rules(),
            now,
        )
        .unwrap();
        assert_eq!(c.sub(), "u1");
        assert_eq!(c.domains(), Some(&[DomainId::from("d1")][..]));
        assert_eq!(c.role(), Role::Admin);
        assert!(c.headers().is_empty());
        let mut with_email = ok.clone();
        with_email["email"] = "a@b.c".into();
        let c = validate(
            &obj(with_email),
            0,
            &issuer(&["cubegate"]),
            true,
            &rules(),
            now,
        )
        .unwrap();
        assert_eq!(
            c.headers(),
            [("X-User-Email".to_string(), "a@b.c".to_string())]
        );
        let mut evil = ok.clone();
        evil["email"] = "a\r\nX-Evil: 1".into();
        let c = validate(&obj(evil), 0, &issuer(&["cubegate"]), true, &rules(), now).unwrap();
        assert!(c.headers().is_empty(), "unsafe values are not forwarded");
        let cases = [
            (
                serde_json::json!({"iss":"https://idp/","sub":"u","exp":now-31.0}),
                TokenError::Expired,
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"u"}),
                TokenError::MissingExp,
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"u","exp":now+9.0,"nbf":now+31.0}),
                TokenError::NotYetValid,
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"u","exp":now+9.0,"iat":now+31.0}),
                TokenError::IssuedInFuture,
            ),
            (
                serde_json::json!({"iss":"https://other/","sub":"u","exp":now+9.0}),
                TokenError::WrongIssuer,
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"u","exp":now+9.0,"aud":"else"}),
                TokenError::WrongAudience,
            ),
            (
                serde_json::json!({"iss":"https://idp/","exp":now+9.0,"aud":"cubegate"}),
                TokenError::MissingSub,
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"a\r\nX-Evil: 1","exp":now+9.0,"aud":"cubegate"}),
                TokenError::Malformed(""),
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"u","exp":"soon","aud":"cubegate"}),
                TokenError::Malformed(""),
            ),
            (
                serde_json::json!({"iss":"https://idp/","sub":"u","exp":now+9.0,"aud":"cubegate","type":"refresh"}),
                TokenError::WrongType,
            ),
        ];
        for (payload, want) in cases {
            let got = validate(
                &obj(payload.clone()),
                0,
                &issuer(&["cubegate"]),
                true,
                &rules(),
                now,
            )
            .unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{payload}"
            );
        }
        // Leeway: 29 s past exp is still fine.
        let late = serde_json::json!({"iss":"https://idp/","sub":"u","exp":now-29.0});
        assert!(validate(&obj(late), 0, &issuer(&[]), true, &rules(), now).is_ok());
    }
}
