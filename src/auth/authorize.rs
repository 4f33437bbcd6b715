//! Phase `authorize`: may this identity use this endpoint of this domain?
//!
//! A platform admin may do anything; otherwise the user must be a member of the domain
//! (the management plane's [`Directory`], for this box's own tokens and API keys) or the
//! token's domains claim must list it, and admin endpoints need the domain's admin role. A
//! disabled user of this box is refused whatever their token says. The answer is a
//! [`Denied`], which the data plane maps to its 401 or 403.

use super::directory::{Directory, DomainRole};
use super::keys::KeyStore;
use super::Identity;
use crate::scope::{DomainId, Endpoint};
use std::fmt;

/// Why an authenticated caller may not do what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The user of this box behind the credential is disabled (answered as a bad token:
    /// the credential itself is no good any more).
    Disabled,
    /// Neither a member of the domain nor listed in the token's domains claim.
    NotInDomain(DomainId),
    /// An admin endpoint, without the domain's admin role.
    AdminOnly,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Disabled => write!(f, "{}", super::TokenError::Disabled),
            Denied::NotInDomain(domain) => {
                write!(f, "this token may not use domain {domain:?}")
            }
            Denied::AdminOnly => f.write_str(
                "only domain admins may pull, push, create, copy or delete models, or use endpoints cubegate does not know",
            ),
        }
    }
}

/// Phase `authorize`: may `who` use `endpoint` of `domain`? `keys` is the store `who` was
/// verified with (it says which issuer is this box's own).
pub fn authorize(
    who: &Identity,
    domain: &DomainId,
    endpoint: Endpoint,
    keys: &KeyStore,
    directory: &Directory,
) -> Result<(), Denied> {
    let claims = match who {
        Identity::Development => return Ok(()),
        Identity::Token(c) | Identity::DevelopmentAs(c) => c,
    };
    // Memberships and disabled users belong to this box's users: only its own tokens and
    // API keys use them (an outside issuer's `sub` is another namespace of ids).
    let own = claims
        .issuer()
        .and_then(|i| keys.issuers.get(i))
        .is_some_and(|i| i.own);
    if own && directory.is_disabled(claims.sub()) {
        return Err(Denied::Disabled);
    }
    // Development mode: domain and admin checks are off.
    if who.platform_admin() {
        return Ok(());
    }
    let membership = own
        .then(|| directory.role(domain.as_str(), claims.sub()))
        .flatten();
    let listed = claims.domains().is_some_and(|d| d.contains(domain));
    if membership.is_none() && !listed {
        return Err(Denied::NotInDomain(domain.clone()));
    }
    if endpoint.is_admin() && membership != Some(DomainRole::Admin) {
        return Err(Denied::AdminOnly);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::claims::{self, ClaimRules, VerifiedClaims};
    use crate::auth::directory::ApiKey;
    use crate::auth::jws::JsonObject;
    use crate::auth::keys::IssuerKeys;
    use std::rc::Rc;

    /// Index 0: this box's issuer; index 1: an outside one.
    fn keys() -> KeyStore {
        let issuer = |name: &str, own| IssuerKeys {
            issuer: name.into(),
            audiences: Vec::new(),
            keys: Vec::new(),
            jwks_url: None,
            require_exp: false,
            own,
        };
        KeyStore {
            issuers: vec![issuer("cubegate", true), issuer("https://idp/", false)],
            generation: 1,
        }
    }

    fn token(issuer: usize, claims: serde_json::Value) -> Identity {
        let keys = keys();
        let mut payload = claims;
        payload["iss"] = keys.issuers[issuer].issuer.clone().into();
        let payload = JsonObject(payload.as_object().unwrap().clone().into_iter().collect());
        let rules = ClaimRules {
            leeway_s: 0.0,
            namespace: String::new(),
            domains_claim: "domains".into(),
            claim_headers: Vec::new(),
        };
        let c = claims::validate(&payload, issuer, &keys.issuers[issuer], false, &rules, 0.0);
        Identity::Token(Rc::new(c.unwrap()))
    }

    fn api_key(user: &str, domain: &str) -> Identity {
        let key = ApiKey {
            id: "k1".into(),
            domain: domain.into(),
            user: user.into(),
            expires_at: None,
        };
        Identity::Token(Rc::new(VerifiedClaims::of_api_key(&key, 0)))
    }

    fn directory() -> Directory {
        let mut d = Directory::default();
        d.add_member("d1".into(), "alice".into(), DomainRole::Member);
        d.add_member("d1".into(), "bob".into(), DomainRole::Admin);
        d.add_member("d1".into(), "carol".into(), DomainRole::Admin);
        d.disable("carol".into());
        d
    }

    fn check(who: &Identity, domain: &str, endpoint: Endpoint) -> Result<(), Denied> {
        authorize(who, &domain.into(), endpoint, &keys(), &directory())
    }

    #[test]
    fn members_and_domain_admins() {
        let alice = token(0, serde_json::json!({"sub": "alice"}));
        assert_eq!(check(&alice, "d1", Endpoint::Chat), Ok(()));
        assert_eq!(check(&alice, "d1", Endpoint::Admin), Err(Denied::AdminOnly));
        assert_eq!(
            check(&alice, "d2", Endpoint::Chat),
            Err(Denied::NotInDomain("d2".into()))
        );
        let bob = token(0, serde_json::json!({"sub": "bob"}));
        assert_eq!(check(&bob, "d1", Endpoint::Other), Ok(()));
        let admin = token(0, serde_json::json!({"sub": "root", "role": "admin"}));
        assert_eq!(check(&admin, "d9", Endpoint::Admin), Ok(()));
        assert_eq!(check(&Identity::Development, "d9", Endpoint::Admin), Ok(()));
    }

    #[test]
    fn disabled_users_are_refused_even_as_admins() {
        let carol = token(0, serde_json::json!({"sub": "carol", "role": "admin"}));
        assert_eq!(check(&carol, "d1", Endpoint::Chat), Err(Denied::Disabled));
        assert_eq!(
            check(&api_key("carol", "d1"), "d1", Endpoint::Chat),
            Err(Denied::Disabled)
        );
    }

    #[test]
    fn outside_issuers_use_their_domains_claim_not_memberships() {
        // The outside issuer's "bob" is not this box's bob.
        let bob = token(1, serde_json::json!({"sub": "bob"}));
        assert_eq!(
            check(&bob, "d1", Endpoint::Chat),
            Err(Denied::NotInDomain("d1".into()))
        );
        // Nor is its "carol" disabled here.
        let listed = token(1, serde_json::json!({"sub": "carol", "domains": ["d1"]}));
        assert_eq!(check(&listed, "d1", Endpoint::Chat), Ok(()));
        assert_eq!(
            check(&listed, "d1", Endpoint::Admin),
            Err(Denied::AdminOnly)
        );
    }

    #[test]
    fn api_keys_reach_their_one_domain_as_users() {
        let key = api_key("dave", "d1");
        assert_eq!(check(&key, "d1", Endpoint::Chat), Ok(()));
        assert_eq!(check(&key, "d1", Endpoint::Admin), Err(Denied::AdminOnly));
        assert_eq!(
            check(&key, "d2", Endpoint::Chat),
            Err(Denied::NotInDomain("d2".into()))
        );
    }
}
